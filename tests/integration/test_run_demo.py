"""Acceptance: `run`, `verify`, `rollback` and `run --dry-run` on the demo store (docs/design.md §5).

Both primary-key variants. The demo is built once and copied per test. Expectations come
from the ground truth (built from construction knowledge), and every check reads the stores
themselves through tests.support.snapshot: all rows with their vectors, every object and
its hash, every ledger row. The real CLI runs as a subprocess in the demo's folder with no
flags, so its defaults (./repage-data/...) are exercised too.
"""

from __future__ import annotations

import json

import pytest

from repage.migration.runner import RunLimits, Selection, run_migration
from repage.migration.work import RunOptions
from repage.stores.open import open_stores
from tests.support import Demo
from tests.support.snapshot import changed, diff

pytestmark = pytest.mark.slow
KEYS = ("--path", "keys")  # these tests are about the keys path; `auto` also runs pdf (test_pdf_path.py)


# ---------------------------------------------------------------- expectations


def keys_docs(demo: Demo) -> list[dict]:
    return demo.by_path("keys")


def expected_key(chunk: dict) -> str | None:
    """Canonical when the image is in the bucket (it was moved), else the key as it was."""
    return chunk["canonical_key"] if chunk["image_in_bucket"] else (chunk["current_key"] or None)


def expected_changes(doc: dict, move_images: bool = True) -> dict:
    """One document's changes as `run --dry-run` must list them."""
    chunks = sorted(
        (
            [c["chunk_id"]],
            [0, c["true_page"]],
            [c["current_key"] or None, expected_key(c) if move_images else c["current_key"] or None],
        )
        for c in doc["affected_chunks"]
    )
    copies = sorted(
        {
            (c["bucket_key"], c["canonical_key"])
            for c in doc["affected_chunks"]
            if move_images and c["image_in_bucket"] and c["bucket_key"] != c["canonical_key"]
        }
    )
    return {"chunks": chunks, "copies": [list(c) for c in copies]}


def listed_changes(change: dict) -> dict:
    chunks = sorted((c["chunk"], c["page"], c["image_r2_key"]) for c in change["chunks"])
    return {"chunks": chunks, "copies": sorted(change["copies"])}


def key_of(row: dict) -> str | None:
    return row.get("image_r2_key") or None


# ---------------------------------------------------------------- checks on a snapshot


def check_migrated(demo: Demo, snap: dict, docs: list[dict], *, moved: bool = True) -> None:
    """Every affected chunk of `docs` has its true page, and its canonical key when moved."""
    rows, objects = snap["milvus"]["rows"], snap["objects"]
    before = demo.pristine["objects"]
    problems = []
    for d in docs:
        for c in d["affected_chunks"]:
            row = rows[c["chunk_id"]]
            want_key = expected_key(c) if moved else (c["current_key"] or None)
            if (row["page"], key_of(row)) != (c["true_page"], want_key):
                problems.append(
                    f"{d['filename']} {c['chunk_id']}: page {row['page']} key {key_of(row)!r}, "
                    f"want page {c['true_page']} key {want_key!r}"
                )
            if moved and c["image_in_bucket"]:
                if objects.get(c["canonical_key"]) != before[c["bucket_key"]]:
                    problems.append(f"{c['canonical_key']}: missing or not the bytes of {c['bucket_key']}")
    assert not problems, "\n".join(problems[:20])


def check_nothing_else_changed(demo: Demo, snap: dict, migrated: set[str], *, moved: bool = True) -> None:
    """Rows: same set; only page/image_r2_key of affected chunks of `migrated` documents differ.
    Objects: the originals untouched, plus exactly the canonical copies of moved images.
    No chunk anywhere has a page other than its true one (0 only where not fixed yet)."""
    before, after = demo.pristine["milvus"]["rows"], snap["milvus"]["rows"]
    assert set(after) == set(before), "rows appeared or disappeared"
    truth = {c["chunk_id"]: (d, c) for d in demo.docs for c in d["affected_chunks"]}
    wrong = []
    for ident, row in after.items():
        old = before[ident]
        rest = {k: v for k, v in row.items() if k not in ("page", "image_r2_key")}
        assert rest == {k: v for k, v in old.items() if k not in ("page", "image_r2_key")}, (
            f"{ident}: a field other than page/image_r2_key changed:\n" + diff(old, row)
        )
        doc_chunk = truth.get(ident)
        if doc_chunk is None or doc_chunk[0]["document_id"] not in migrated:
            if (row["page"], key_of(row)) != (old["page"], key_of(old)):
                wrong.append(f"{ident}: not to be migrated, changed {diff(old, row)}")
            continue
        if row["page"] != doc_chunk[1]["true_page"]:  # every migrated chunk has its true page
            wrong.append(f"{ident}: page {row['page']}, true page {doc_chunk[1]['true_page']}")
    assert not wrong, "\n".join(wrong[:20])
    for d in demo.docs:  # the headline: not one wrong page (unfixed chunks still read 0)
        for c in d["affected_chunks"]:
            assert after[c["chunk_id"]]["page"] in (0, c["true_page"]), c["chunk_id"]
    copies = {
        c["canonical_key"]
        for d in demo.docs
        if d["document_id"] in migrated
        for c in d["affected_chunks"]
        if moved and c["image_in_bucket"]
    }
    objects = snap["objects"]
    assert set(objects) == set(demo.pristine["objects"]) | copies, diff(demo.pristine["objects"], objects)
    assert {k: objects[k] for k in demo.pristine["objects"]} == demo.pristine["objects"], "an original changed"


def ledger_states(snap: dict) -> dict[str, str]:
    return {d: row["state"] for d, row in snap["ledger"]["documents"].items()}


def scanned_states(demo: Demo) -> dict[str, str]:
    return {d["document_id"]: d["expected_state"] for d in demo.docs}


# ---------------------------------------------------------------- tests


def test_ground_truth_has_the_hard_cases(pristine):
    keys = keys_docs(pristine)
    assert len(keys) >= 3
    assert any(d["page_count"] >= 11 and any(c["true_page"] >= 10 for c in d["affected_chunks"]) for d in keys)
    assert any(c["true_page"] == 0 for d in keys for c in d["affected_chunks"])
    assert any(c["current_key"] == "" for d in keys for c in d["affected_chunks"])  # found by listing
    assert any(c["current_key"] == c["canonical_key"] for d in keys for c in d["affected_chunks"])  # nothing to move


def test_run_fixes_every_keys_chunk_and_nothing_else(demo):
    with open_stores(demo.settings) as stores:  # the library entry point; an empty ledger: it scans first
        summary = run_migration(stores, RunOptions(), RunLimits(batch_size=4), Selection())
    assert (summary.migrated, summary.failed, summary.errors) == (len(keys_docs(demo)), 0, {})
    snap = demo.snapshot()
    migrated = {d["document_id"] for d in keys_docs(demo)}
    check_migrated(demo, snap, keys_docs(demo))
    check_nothing_else_changed(demo, snap, migrated)
    want = {**scanned_states(demo), **dict.fromkeys(migrated, "migrated")}
    assert ledger_states(snap) == want
    moves = sum(len(expected_changes(d)["copies"]) for d in keys_docs(demo))
    assert summary.objects_copied == moves == len(snap["ledger"]["object_journal"])

    with open_stores(demo.settings) as stores:  # again: nothing left to do, nothing changes
        again = run_migration(stores, RunOptions(), RunLimits(), Selection())
    assert (again.documents, again.migrated, again.chunks_written) == (0, 0, 0)
    after = demo.snapshot()
    assert after == snap, "a second run changed the stores:\n" + diff(snap, after)


def test_cli_run_rerun_verify_and_rollback_all(demo):
    migrated = {d["document_id"] for d in keys_docs(demo)}
    report = demo.cli_json("run", *KEYS)
    assert (report["migrated"], report["failed"], report["errors"]) == (len(migrated), 0, {})
    first = demo.snapshot()
    check_migrated(demo, first, keys_docs(demo))
    check_nothing_else_changed(demo, first, migrated)

    report = demo.cli_json("run", *KEYS)  # idempotent: the full snapshot, ledger included, is unchanged
    assert (report["documents"], report["migrated"], report["failed"]) == (0, 0, 0)
    second = demo.snapshot()
    assert second == first, "a second `repage run` changed the stores:\n" + diff(first, second)

    report = demo.cli_json("verify")
    assert report["ok"] and report["failed"] == {}, report
    assert (report["checked"], report["passed"]) == (len(migrated), len(migrated))
    verified = demo.snapshot()
    assert ledger_states(verified) == {**ledger_states(first), **dict.fromkeys(migrated, "verified")}
    assert (verified["milvus"], verified["objects"]) == (first["milvus"], first["objects"])

    report = demo.cli_json("rollback", "--all")
    assert report["ok"] and (report["checked"], report["passed"]) == (len(migrated), len(migrated)), report
    restored = demo.snapshot()
    for part in ("milvus", "objects"):  # exactly the store as built
        assert restored[part] == demo.pristine[part], f"rollback left {part} different:\n" + diff(
            demo.pristine[part], restored[part]
        )
    assert ledger_states(restored) == {**ledger_states(first), **dict.fromkeys(migrated, "rolled_back")}


def check_dry_run(demo: Demo, report: dict) -> None:
    keys = keys_docs(demo)
    listed = {c["document_id"]: listed_changes(c) for c in report["dry_run_changes"]}
    assert set(listed) == {d["document_id"] for d in keys}
    for d in keys:
        assert listed[d["document_id"]] == expected_changes(d), d["filename"]
    assert (report["documents"], report["failed"], report["chunks_written"], report["objects_copied"]) == (
        len(keys),
        0,
        0,
        0,
    )


def test_dry_run_on_an_empty_ledger_writes_nothing_anywhere(demo):
    before = demo.snapshot()
    assert before["ledger"] is None  # just built: no ledger yet
    report = demo.cli_json("run", *KEYS, "--dry-run")
    check_dry_run(demo, report)
    after = demo.snapshot()
    assert after == before, "`run --dry-run` changed the stores:\n" + diff(before, after)


def test_dry_run_after_a_scan_lists_exactly_what_run_then_does(demo):
    demo.cli_json("scan")
    before = demo.snapshot()
    report = demo.cli_json("run", *KEYS, "--dry-run")
    check_dry_run(demo, report)
    after = demo.snapshot()
    assert after == before, "`run --dry-run` changed the stores:\n" + diff(before, after)

    real = demo.cli_json("run", *KEYS)
    assert real["migrated"] == len(report["dry_run_changes"])
    journal = demo.snapshot(milvus=False, objects=False)["ledger"]
    done = {}
    for entry in journal["chunk_journal"].values():
        done.setdefault(entry["document_id"], []).append(
            (
                json.loads(entry["identity"]),
                [entry["old_page"], entry["new_page"]],
                [entry["old_key"], entry["new_key"] if entry["new_key"] is not None else entry["old_key"]],
            )
        )
    for change in report["dry_run_changes"]:
        assert sorted(done[change["document_id"]]) == listed_changes(change)["chunks"]
    copies = sorted([o["old_key"], o["new_key"]] for o in journal["object_journal"].values())
    assert copies == sorted(c for change in report["dry_run_changes"] for c in change["copies"])


def run_pages_only(demo: Demo) -> set[str]:
    keys = keys_docs(demo)
    migrated = {d["document_id"] for d in keys}
    report = demo.cli_json("run", *KEYS, "--no-move-images")
    assert (report["migrated"], report["failed"], report["objects_copied"]) == (len(keys), 0, 0), report
    snap = demo.snapshot()
    check_migrated(demo, snap, keys, moved=False)  # true pages, every key exactly as it was
    check_nothing_else_changed(demo, snap, migrated, moved=False)
    assert snap["objects"] == demo.pristine["objects"]
    return migrated


def test_no_move_images_fixes_pages_and_leaves_keys_and_objects(demo):
    run_pages_only(demo)
    assert demo.cli_json("verify")["ok"]


def test_a_run_after_no_move_images_moves_the_images(demo):
    migrated = run_pages_only(demo)
    keys = keys_docs(demo)
    report = demo.cli_json("run", *KEYS)
    assert report["failed"] == 0, report
    snap = demo.snapshot()
    check_migrated(demo, snap, keys)
    check_nothing_else_changed(demo, snap, migrated)
    assert demo.cli_json("verify")["ok"]
    assert demo.cli_json("rollback", "--all")["ok"]  # both steps undone: the store as built
    restored = demo.snapshot(ledger=False)
    assert restored == {k: demo.pristine[k] for k in restored}, diff(demo.pristine, restored)


def test_limit_and_batch_size_migrate_exactly_that_many(demo):
    report = demo.cli_json("run", *KEYS, "--limit", "2", "--batch-size", "1")
    assert (report["migrated"], report["documents"], report["batches"], report["failed"]) == (2, 2, 2, 0), report
    snap = demo.snapshot()
    states = ledger_states(snap)
    migrated = {d for d, s in states.items() if s == "migrated"}
    assert len(migrated) == 2 and migrated <= {d["document_id"] for d in keys_docs(demo)}
    assert {d: s for d, s in states.items() if d not in migrated} == {
        d: s for d, s in scanned_states(demo).items() if d not in migrated
    }
    check_migrated(demo, snap, [demo.doc(d) for d in migrated])
    check_nothing_else_changed(demo, snap, migrated)


def test_document_id_migrates_only_that_document(demo):
    target = max(keys_docs(demo), key=lambda d: (d["page_count"], len(d["affected_chunks"])))
    assert target["page_count"] >= 11
    report = demo.cli_json("run", "--document-id", target["document_id"])
    assert (report["migrated"], report["documents"], report["failed"]) == (1, 1, 0), report
    snap = demo.snapshot()
    states = ledger_states(snap)
    assert {d for d, s in states.items() if s == "migrated"} == {target["document_id"]}
    check_migrated(demo, snap, [target])
    check_nothing_else_changed(demo, snap, {target["document_id"]})
    rows = changed(demo.pristine["milvus"]["rows"], snap["milvus"]["rows"])
    assert rows and all(demo.pristine["milvus"]["rows"][r]["document_id"] == target["document_id"] for r in rows)

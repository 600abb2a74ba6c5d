"""Acceptance: the pdf path (docs/design.md §2.2) on the demo store, both primary-key variants.

Expectations come from the ground truth (construction knowledge) and the checks read the
stores themselves (tests.support.snapshot). The images the pdf path uploads are compared
with the demo's own extraction (repage.demo.ingest), an independent reference. The real CLI
runs in the demo's folder with no flags, so its defaults (`--path auto`) are exercised.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from repage.demo.ingest import extract_images
from tests.support import Demo
from tests.support.snapshot import diff
from tests.unit.test_pdfpages import encrypted_pdf

pytestmark = pytest.mark.slow
PDF = ("--path", "pdf")


# ---------------------------------------------------------------- helpers


def pdf_docs(demo: Demo) -> list[dict]:
    return demo.by_path("pdf")


def bucket_file(demo: Demo, key: str) -> bytes:
    return (demo.data_dir / "bucket" / key).read_bytes()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def pdf_images(demo: Demo, doc: dict) -> dict:
    """(page, n) -> PNG bytes of every image of the document's source PDF, as the demo extracts them."""
    found = extract_images(bucket_file(demo, doc["source_key"]), full_pages=doc["kind"] == "scan")
    return {(im.page, im.n): im.png for im in found}


def key_of(row: dict) -> str | None:
    return row.get("image_r2_key") or None


def states(snap: dict) -> dict[str, str]:
    return {d: row["state"] for d, row in snap["ledger"]["documents"].items()}


def rows_of(snap: dict, doc: dict) -> dict:
    return {k: r for k, r in snap["milvus"]["rows"].items() if r["document_id"] == doc["document_id"]}


def objects_under(snap: dict, doc: dict) -> dict:
    prefix = f"{doc['dataset_id']}/{doc['document_id']}/"
    return {k: v for k, v in snap["objects"].items() if k.startswith(prefix)}


def check_pdf_docs_recovered(demo: Demo, snap: dict, docs: list[dict]) -> None:
    """True page and canonical key on every chunk; every canonical image exists and is the right one."""
    rows, problems = snap["milvus"]["rows"], []
    for d in docs:
        images = pdf_images(demo, d)
        for c in d["affected_chunks"]:
            row = rows[c["chunk_id"]]
            if (row["page"], key_of(row)) != (c["true_page"], c["canonical_key"]):
                problems.append(
                    f"{d['filename']} {c['chunk_id']}: page {row['page']} key {key_of(row)}, "
                    f"want {c['true_page']} {c['canonical_key']}"
                )
                continue
            if c["image_in_bucket"]:  # copied: the bucket's bytes exactly
                ok = snap["objects"].get(c["canonical_key"]) == demo.pristine["objects"][c["bucket_key"]]
            else:  # uploaded from the PDF: the PDF's image, pixel for pixel
                ok = np.array_equal(
                    pixels(bucket_file(demo, c["canonical_key"])), pixels(images[(c["true_page"], c["n"])])
                )
            if not ok:
                problems.append(f"{d['filename']}: {c['canonical_key']} is not the image of chunk {c['chunk_id']}")
    assert not problems, "\n".join(problems[:20])


def check_only_affected_chunks_changed(demo: Demo, snap: dict, migrated: set[str]) -> None:
    before, after = demo.pristine["milvus"]["rows"], snap["milvus"]["rows"]
    assert set(after) == set(before), "rows appeared or disappeared"
    affected = {c["chunk_id"] for d in demo.docs if d["document_id"] in migrated for c in d["affected_chunks"]}
    for ident, row in after.items():
        old = before[ident]
        same = ("page", "image_r2_key") if ident in affected else ()
        assert {k: v for k, v in row.items() if k not in same} == {k: v for k, v in old.items() if k not in same}, (
            f"{ident} changed:\n" + diff(old, row)
        )
    wrong = [
        c["chunk_id"]
        for d in demo.docs
        for c in d["affected_chunks"]
        if after[c["chunk_id"]]["page"] not in (0, c["true_page"])
    ]
    assert wrong == [], f"wrong pages: {wrong[:10]}"


# ---------------------------------------------------------------- tests


def test_the_demo_has_the_hard_pdf_cases(pristine):
    docs = pdf_docs(pristine)
    for scenario in ("docling", "missing-images"):
        big = [
            d
            for d in docs
            if d["scenario"] == scenario
            and d["page_count"] >= 11
            and any(c["true_page"] >= 10 for c in d["affected_chunks"])
        ]
        assert big, f"no {scenario} document with 11+ pages and images past page 10"
        assert any(d["kind"] == "scan" for d in docs if d["scenario"] == scenario)
    assert any("%20" in d["source_key"] for d in docs)  # a source stored under its URL-encoded key
    assert any(c["current_key"] and not c["image_in_bucket"] for d in docs for c in d["affected_chunks"])


def test_run_recovers_every_pdf_page_and_restores_missing_images(demo):
    report = demo.cli_json("run")  # --path auto: keys and pdf
    docs, keys = pdf_docs(demo), demo.by_path("keys")
    assert (report["failed"], report["migrated"], report["errors"]) == (0, len(docs) + len(keys), {}), report
    snap = demo.snapshot()
    assert {d["document_id"]: states(snap)[d["document_id"]] for d in docs} == dict.fromkeys(
        (d["document_id"] for d in docs), "migrated"
    )
    check_pdf_docs_recovered(demo, snap, docs)
    migrated = {d["document_id"] for d in docs + keys}
    check_only_affected_chunks_changed(demo, snap, migrated)
    chunks = sum(len(d["affected_chunks"]) for d in docs)
    print(f"\npdf path ({demo.pk}): {chunks} chunks, {chunks} recovered without review, 0 in review, 0 wrong")

    new = set(snap["objects"]) - set(demo.pristine["objects"])
    canonical = {
        c["canonical_key"]
        for d in docs + keys
        for c in d["affected_chunks"]
        if c["image_in_bucket"] or d["expected_path"] == "pdf"
    } - set(demo.pristine["objects"])
    assert new == canonical
    assert {k: snap["objects"][k] for k in demo.pristine["objects"]} == demo.pristine["objects"]

    ledger = snap["ledger"]
    for d in docs:  # the pdf path records its GETs and bytes per document
        row = ledger["documents"][d["document_id"]]
        assert row["bytes_read"] >= len(bucket_file(demo, d["source_key"])) and row["object_requests_b"] >= 1
    uploads = [o for o in ledger["object_journal"].values() if o["old_key"].startswith("pdf:")]
    assert len(uploads) == sum(1 for d in docs for c in d["affected_chunks"] if not c["image_in_bucket"])
    usage = demo.cli_json("status")["usage_by_path"]["pdf"]
    assert usage["bytes_read"] == sum(ledger["documents"][d["document_id"]]["bytes_read"] for d in docs)

    again = demo.cli_json("run")
    assert (again["documents"], again["chunks_written"]) == (0, 0)
    verify = demo.cli_json("verify")
    assert verify["ok"] and verify["passed"] == len(migrated), verify
    gc = demo.cli_json("gc", "--grace", "0")
    assert not any(k.startswith("pdf:") for k in gc["kept"])
    rolled = demo.cli_json("rollback", "--all")
    assert rolled["ok"] and rolled["passed"] == len(migrated), rolled
    restored = demo.snapshot(ledger=False)
    gone = {
        c["bucket_key"]
        for d in keys + docs
        for c in d["affected_chunks"]
        if c["image_in_bucket"] and c["bucket_key"] != c["canonical_key"]
    }
    assert restored["milvus"] == demo.pristine["milvus"], diff(demo.pristine["milvus"], restored["milvus"])
    # gc deleted the superseded originals; rollback copied every one back: the bucket as built
    assert restored["objects"] == demo.pristine["objects"], diff(demo.pristine["objects"], restored["objects"])
    assert gone  # (and there were some)


def test_dry_run_lists_uploads_and_copies_and_writes_nothing(demo):
    before = demo.snapshot()
    report = demo.cli_json("run", *PDF, "--dry-run")
    docs = {d["document_id"]: d for d in pdf_docs(demo)}
    listed = {c["document_id"]: c for c in report["dry_run_changes"]}
    assert set(listed) == set(docs)
    for doc_id, change in listed.items():
        want = {c["chunk_id"]: [0, c["true_page"]] for c in docs[doc_id]["affected_chunks"]}
        assert {c["chunk"][0] if len(c["chunk"]) == 1 else None: c["page"] for c in change["chunks"]} == want
        uploads = [old for old, _ in change["copies"] if old.startswith("pdf:")]
        assert len(uploads) == sum(1 for c in docs[doc_id]["affected_chunks"] if not c["image_in_bucket"])
    assert demo.snapshot() == before


def test_corrupt_encrypted_and_vanished_sources_touch_nothing_else(demo):
    docs = pdf_docs(demo)
    corrupt = next(d for d in docs if d["scenario"] == "docling")
    locked = next(d for d in docs if d["scenario"] == "missing-images")
    gone = next(d for d in docs if d["scenario"] == "docling" and d is not corrupt)
    (demo.data_dir / "bucket" / corrupt["source_key"]).write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 500)
    (demo.data_dir / "bucket" / locked["source_key"]).write_bytes(encrypted_pdf())
    demo.cli_json("scan")  # the scan still sees every source ...
    (demo.data_dir / "bucket" / gone["source_key"]).unlink()  # ... then one disappears before the run
    before = demo.snapshot()
    report = demo.cli_json("run", *PDF, check=1)
    assert report["failed"] == 2 and report["migrated"] == len(docs) - 3, report
    assert report["other"] == {"unrecoverable": 1}, report
    assert "corrupt" in report["errors"][corrupt["document_id"]]
    assert "encrypted" in report["errors"][locked["document_id"]]
    snap = demo.snapshot()
    lost = snap["ledger"]["documents"][gone["document_id"]]
    assert lost["state"] == "unrecoverable" and "source PDF is missing" in lost["reason"]
    for d in (corrupt, locked):
        row = snap["ledger"]["documents"][d["document_id"]]
        assert row["state"] == "failed" and d["source_key"] in row["last_error"]
    for d in (corrupt, locked, gone):  # nothing written for them: rows, objects, journal
        assert rows_of(snap, d) == rows_of(before, d), diff(rows_of(before, d), rows_of(snap, d))
        assert objects_under(snap, d) == objects_under(before, d)
        assert not [j for j in snap["ledger"]["chunk_journal"].values() if j["document_id"] == d["document_id"]]
    check_pdf_docs_recovered(demo, snap, [d for d in docs if d not in (corrupt, locked, gone)])
    status = demo.cli_json("status")
    assert {e["document_id"] for e in status["last_errors"]} >= {corrupt["document_id"], locked["document_id"]}


def rotated(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        out = io.BytesIO()
        im.convert("RGB").rotate(8, fillcolor="white").save(out, "PNG")
        return out.getvalue()


def flipped(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        out = io.BytesIO()
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, "PNG")
        return out.getvalue()


def test_weak_matches_go_to_review_and_a_person_decides(demo):
    docs = pdf_docs(demo)
    accepted = next(d for d in docs if d["scenario"] == "docling" and d["kind"] == "scan")
    rejected = next(d for d in docs if d["scenario"] == "docling" and d["kind"] == "native")
    a_chunk = min(accepted["affected_chunks"], key=lambda c: c["true_page"])
    r_chunk = rejected["affected_chunks"][0]
    for chunk, change in ((a_chunk, rotated), (r_chunk, flipped)):  # the bucket image no longer is the PDF's
        path = demo.data_dir / "bucket" / chunk["bucket_key"]
        path.write_bytes(change(path.read_bytes()))
    before = demo.snapshot()

    report = demo.cli_json("run", *PDF)
    assert report["other"] == {"review": 2} and report["failed"] == 0, report
    snap = demo.snapshot()
    for d in (accepted, rejected):  # nothing written for them, all evidence kept
        assert states(snap)[d["document_id"]] == "review"
        assert rows_of(snap, d) == rows_of(before, d) and objects_under(snap, d) == objects_under(before, d)
    check_pdf_docs_recovered(demo, snap, [d for d in docs if d not in (accepted, rejected)])
    total = sum(len(d["affected_chunks"]) for d in docs)
    assert (total - 2) / total >= 0.95

    listing = demo.cli_json("review")
    assert listing["pending"] == 2
    items = {r["document_id"]: r for r in listing["reviews"]}
    (weak,) = items[accepted["document_id"]]["chunks"]
    assert weak["image_index"] == a_chunk["image_index"] and weak["distance"] > 10
    assert weak["proposed"][0] == a_chunk["true_page"] and weak["candidate_pages"][0]["page"] == a_chunk["true_page"]
    assert {"margin", "index_page", "reason"} <= set(weak)
    assert demo.cli("review").stdout.count("image_index") == 2  # the people's view too

    assert demo.cli_json("review", "accept", accepted["document_id"])["path"] == "pdf"
    assert demo.cli_json("review", "reject", rejected["document_id"])["path"] == "reprocess"
    report = demo.cli_json("run", *PDF)
    assert (report["migrated"], report["failed"]) == (1, 0), report
    snap = demo.snapshot()
    assert states(snap)[accepted["document_id"]] == "migrated"
    rows = snap["milvus"]["rows"]
    assert all(rows[c["chunk_id"]]["page"] == c["true_page"] for c in accepted["affected_chunks"])
    assert snap["ledger"]["documents"][rejected["document_id"]]["path"] == "reprocess"
    assert states(snap)[rejected["document_id"]] == "pending"
    assert rows_of(snap, rejected) == rows_of(before, rejected)
    assert json.loads(snap["ledger"]["reviews"][accepted["document_id"]]["evidence"])["chunks"]
    assert demo.cli_json("verify")["ok"]


@pytest.mark.parametrize("failpoint", ["after-journal", "after-object-copy"])
def test_a_run_killed_mid_pdf_migration_finishes_from_the_journal(demo, failpoint):
    """The extracted images die with the process: the resumed run extracts them again (same bytes)."""
    import os
    import signal
    import subprocess
    import time

    from tests.support import APP_ENV, repage_command

    target = next(d for d in pdf_docs(demo) if d["scenario"] == "missing-images" and d["page_count"] >= 11)
    (demo.root / "repage.toml").write_text("[repage]\nlease_seconds = 1\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPAGE_") and k not in APP_ENV}
    args = [*repage_command(), "run", *PDF, "--document-id", target["document_id"], "--json"]
    demo.release()
    child = subprocess.run(
        args, cwd=demo.root, env={**env, "REPAGE_FAILPOINT": failpoint}, capture_output=True, text=True, timeout=180
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    killed = demo.snapshot()
    uploads = [o for o in killed["ledger"]["object_journal"].values() if o["old_key"].startswith("pdf:")]
    assert uploads and states(killed)[target["document_id"]] == "running"
    time.sleep(1.5)  # the dead worker's lease expires

    report = demo.cli_json("run", *PDF, "--document-id", target["document_id"])
    assert (report["migrated"], report["failed"]) == (1, 0), report
    snap = demo.snapshot()
    check_pdf_docs_recovered(demo, snap, [target])
    check_only_affected_chunks_changed(demo, snap, {target["document_id"]})
    assert demo.cli_json("verify")["ok"]

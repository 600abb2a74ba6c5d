"""Acceptance: verify checks the end state the app sees, drift goes back to work, gc keeps what it
must (docs/design.md §5.5, §5.8).

After a full keys-path repair each test changes the stores behind repage's back, the way a
re-ingest or a stray script would, and checks that `repage verify` names the document, that the
next `repage run` repairs it from the journal, and that the store then matches the truth.
"""

from __future__ import annotations

import pytest

from repage.domain.records import ChunkChange
from repage.stores.open import open_stores
from tests.integration.test_run_demo import KEYS, check_migrated, check_nothing_else_changed, keys_docs
from tests.support import Demo

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("pristine", ["chunk_id"], indirect=True)]


@pytest.fixture(scope="module")
def repaired_template(pristine, tmp_path_factory) -> Demo:
    """The keys documents run and verified once per module; each test tampers with its own copy."""
    template = pristine.copy(tmp_path_factory.mktemp("repaired"))
    repaired(template)
    template.release()
    return template


@pytest.fixture
def demo(repaired_template, tmp_path) -> Demo:
    return repaired_template.copy(tmp_path)


def keys_ids(demo: Demo) -> set[str]:
    return {d["document_id"] for d in keys_docs(demo)}


def repaired(demo: Demo) -> set[str]:
    """The keys documents, run and verified: the starting point of every test here."""
    migrated = {d["document_id"] for d in keys_docs(demo)}
    report = demo.cli_json("run", *KEYS)
    assert (report["migrated"], report["failed"]) == (len(migrated), 0), report
    assert demo.cli_json("verify")["passed"] == len(migrated)
    return migrated


def moved_chunk(demo: Demo) -> tuple[dict, dict]:
    """A keys document and one of its chunks whose image repage copied to a canonical key."""
    return next(
        (d, c)
        for d in keys_docs(demo)
        for c in d["affected_chunks"]
        if c["image_in_bucket"] and c["bucket_key"] != c["canonical_key"]
    )


def kept_chunk(demo: Demo, other_than: set[str]) -> tuple[dict, dict]:
    """A chunk that had its canonical key (and its image) before the repair: nothing moved."""
    return next(
        (d, c)
        for d in keys_docs(demo)
        if d["document_id"] not in other_than
        for c in d["affected_chunks"]
        if c["image_in_bucket"] and c["current_key"] == c["canonical_key"]
    )


def set_chunk(demo: Demo, chunk: dict, *, page: int | None = None, key: str | None = None) -> None:
    demo.release()
    with open_stores(demo.settings) as stores:
        vectors = stores.vectors
        identity = (chunk["chunk_id"],)
        row = vectors.find_by_identity([identity])[identity][0]
        new_page = row["page"] if page is None else page
        vectors.write_changes([ChunkChange(identity, row[vectors.info().pk_field], new_page, key)])
        vectors.persist()


def objects_of(demo: Demo):
    demo.release()
    return open_stores(demo.settings)


def verify_fails(demo: Demo) -> dict:
    report = demo.cli_json("verify", check=1)
    assert not report["ok"]
    return report["failed"]


def test_verify_names_every_tamper_and_the_next_run_repairs_them(demo):
    migrated = keys_ids(demo)
    moved_doc, moved = moved_chunk(demo)
    reset_doc, reset = next(
        (d, c)
        for d in keys_docs(demo)
        if d["document_id"] != moved_doc["document_id"]
        for c in d["affected_chunks"]
        if c["true_page"] > 0
    )
    set_chunk(demo, reset, page=0)  # a re-ingest wrote page 0 again
    with objects_of(demo) as stores:
        stores.objects.put(moved["canonical_key"], b"other bytes")  # a moved image overwritten
        kept_doc, kept = kept_chunk(demo, {reset_doc["document_id"], moved_doc["document_id"]})
        stores.objects.delete(kept["canonical_key"])  # an image repage never moved, deleted

    failed = verify_fails(demo)
    named = {reset_doc["document_id"], moved_doc["document_id"], kept_doc["document_id"]}
    assert len(named) == 3
    assert set(failed) == named, failed
    assert "page is 0" in failed[reset_doc["document_id"]]
    assert moved["canonical_key"] in failed[moved_doc["document_id"]]
    assert kept["canonical_key"] in failed[kept_doc["document_id"]]
    states = demo.cli_json("status")["by_state"]
    assert states.get("drifted") == len(named), states
    assert set(verify_fails(demo)) == named  # still drifted: still named, still exit 1

    report = demo.cli_json("run", *KEYS)
    assert (report["migrated"], report["failed"]) == (len(named), 0), report
    again = demo.cli_json("verify")
    assert again["ok"] and again["passed"] == len(migrated), again
    snap = demo.snapshot()
    check_migrated(demo, snap, keys_docs(demo))
    check_nothing_else_changed(demo, snap, migrated)
    assert snap["objects"][kept["canonical_key"]] == demo.pristine["objects"][kept["canonical_key"]]


def test_a_changed_key_is_drift_and_is_put_back(demo):
    doc, chunk = moved_chunk(demo)
    set_chunk(demo, chunk, key=chunk["bucket_key"])
    failed = verify_fails(demo)
    assert list(failed) == [doc["document_id"]] and "image_r2_key is" in failed[doc["document_id"]]
    assert demo.cli_json("run", *KEYS)["migrated"] == 1
    assert demo.cli_json("verify")["ok"]
    check_migrated(demo, demo.snapshot(), keys_docs(demo))


def test_deleted_and_added_chunks_are_named_and_a_lost_chunk_fails_with_its_reason(demo):
    doc, chunk = moved_chunk(demo)
    demo.release()
    with open_stores(demo.settings) as stores:
        vectors = stores.vectors
        identity = (chunk["chunk_id"],)
        row = vectors.find_by_identity([identity], with_vectors=True)[identity][0]
        vectors.delete_by_pks([row[vectors.info().pk_field]])
        vectors.persist()
    failed = verify_fails(demo)
    assert list(failed) == [doc["document_id"]]
    assert "chunks now" in failed[doc["document_id"]] and "0 rows" in failed[doc["document_id"]]
    report = demo.cli_json("run", *KEYS, check=1)  # cannot be repaired: the chunk is gone
    assert list(report["errors"]) == [doc["document_id"]], report
    assert "no longer in the collection" in report["errors"][doc["document_id"]]

    other = next(d for d in keys_docs(demo) if d["document_id"] != doc["document_id"])
    demo.release()
    with open_stores(demo.settings) as stores:  # a re-ingest added a chunk
        vectors = stores.vectors
        some = vectors.fetch_documents([other["document_id"]])[0]
        extra = {k: v for k, v in some.items() if k != vectors.info().pk_field or not vectors.info().auto_id}
        extra.update(chunk_id=f"{some['chunk_id']}-extra", chunk_index=10_000)
        vectors.insert([extra])
        vectors.persist()
    failed = verify_fails(demo)
    assert other["document_id"] in failed and "chunks now" in failed[other["document_id"]]


def test_an_overwritten_copy_whose_original_is_gone_fails_with_the_reason(demo):
    doc, chunk = moved_chunk(demo)
    with objects_of(demo) as stores:
        stores.objects.put(chunk["canonical_key"], b"other bytes")
        stores.objects.delete(chunk["bucket_key"])
    assert list(verify_fails(demo)) == [doc["document_id"]]
    report = demo.cli_json("run", *KEYS, check=1)
    assert list(report["errors"]) == [doc["document_id"]], report
    assert chunk["bucket_key"] in report["errors"][doc["document_id"]], report


def test_verify_sample_checks_that_many_documents(demo):
    migrated = keys_ids(demo)
    report = demo.cli_json("verify", "--sample", "2")
    assert (report["checked"], report["passed"]) == (2, 2), report
    assert demo.cli_json("verify", "--sample", "100")["checked"] == len(migrated)


def test_gc_keeps_referenced_and_young_originals_and_deletes_the_rest(demo):
    doc, chunk = moved_chunk(demo)
    originals = {
        c["bucket_key"]
        for d in keys_docs(demo)
        for c in d["affected_chunks"]
        if c["image_in_bucket"] and c["bucket_key"] != c["canonical_key"]
    }
    young = demo.cli_json("gc", "--grace", "1h")
    assert young["deleted"] == 0, young  # inside the grace period nothing goes
    assert originals <= set(demo.snapshot(milvus=False, ledger=False)["objects"])

    other = next(c for d in keys_docs(demo) for c in d["affected_chunks"] if c["chunk_id"] != chunk["chunk_id"])
    set_chunk(demo, other, key=chunk["bucket_key"])  # a chunk points at an original again
    old = demo.cli_json("gc", "--grace", "0")
    assert chunk["bucket_key"] in old["kept"], old
    assert old["deleted"] == len(originals) - 1, old
    left = set(demo.snapshot(milvus=False, ledger=False)["objects"])
    assert left & originals == {chunk["bucket_key"]}


def test_worker_audit_flags(demo):
    plain = demo.cli_json("worker", "--once")
    assert plain["last_cycle"]["audit"] == {}, plain  # off unless asked
    audited = demo.cli_json("worker", "--once", "--audit-every", "1h", "--audit-sample", "2")
    assert audited["last_cycle"]["audit"] == {"checked": 2, "drifted": []}, audited
    by_state = demo.cli_json("status")["by_state"]  # the worker's trickle repaired the pdf path's too
    done = by_state.get("migrated", 0) + by_state.get("verified", 0)
    whole = demo.cli_json("worker", "--once", "--audit-every", "1h", "--audit-sample", "1000")
    assert whole["last_cycle"]["audit"] == {"checked": done, "drifted": []}, whole

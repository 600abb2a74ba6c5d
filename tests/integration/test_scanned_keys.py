"""A run reads the rows the scan recorded by primary key, and only while they are what the scan saw
(docs/design.md §5.1): a chunk deleted and written again under a new key, or fixed by another
tool, sends its document back to the document filter, and the store ends right either way.

Both primary-key variants: with `auto` a row written again gets a new primary key.
"""

from __future__ import annotations

import pytest

from repage.migration.runner import RunLimits, Selection, run_migration
from repage.migration.work import RunOptions
from repage.stores.open import open_stores
from tests.integration.test_run_demo import check_migrated, keys_docs
from tests.support import Demo

pytestmark = pytest.mark.slow


def run_spied(demo: Demo) -> tuple[list[str], list[str]]:
    """`run --path keys` in process; the documents read by document filter, and by primary key
    (before the write, and in the read-back after it)."""
    by_filter: list[str] = []
    by_pk: list[str] = []
    with open_stores(demo.settings) as stores:
        vectors = stores.vectors
        fetch_for_repair, fetch_by_pks = vectors.fetch_for_repair, vectors.fetch_by_pks

        def spy_filter(ids):
            by_filter.extend(ids)
            return fetch_for_repair(ids)

        def spy_pks(pks):
            rows = fetch_by_pks(pks)
            by_pk.extend(dict.fromkeys(r["document_id"] for r in rows))
            return rows

        vectors.fetch_for_repair, vectors.fetch_by_pks = spy_filter, spy_pks
        summary = run_migration(stores, RunOptions(), RunLimits(batch_size=3), Selection(paths={"keys"}))
    assert (summary.failed, summary.errors) == (0, {})
    return by_filter, by_pk


def chunk_counts(demo: Demo, ids: list[str]) -> dict[str, int]:
    demo.release()
    with open_stores(demo.settings) as stores:
        rows = stores.vectors.fetch_documents(ids, fields=["document_id"], with_vectors=False)
        recorded = {d: stores.ledger.get(d).total_chunks for d in ids}
    counted = {d: sum(1 for r in rows if r["document_id"] == d) for d in ids}
    assert recorded == counted  # the scan's census, kept by a run that read by primary key
    return counted


def test_after_a_scan_a_run_reads_only_by_primary_key(demo):
    keys = keys_docs(demo)
    ids = [d["document_id"] for d in keys if d["affected_chunks"]]
    demo.cli_json("scan")
    by_filter, by_pk = run_spied(demo)
    assert (by_filter, set(by_pk)) == ([], set(ids))
    check_migrated(demo, demo.snapshot(), keys)
    chunk_counts(demo, ids)
    assert demo.cli_json("verify")["ok"]


def rewrite_chunk(demo: Demo, doc: dict, *, page: int | None = None) -> None:
    """One affected chunk deleted and inserted again as it was (an auto_id collection gives it a
    new primary key), or with `page` set, as another tool fixing it would."""
    chunk = doc["affected_chunks"][0]
    demo.release()
    with open_stores(demo.settings) as stores:
        vectors = stores.vectors
        [row] = [r for r in vectors.fetch_documents([doc["document_id"]]) if r["chunk_id"] == chunk["chunk_id"]]
        vectors.delete_by_pks([row[vectors.info().pk_field]])
        if vectors.info().auto_id:
            row.pop(vectors.info().pk_field)
        if page is not None:
            row["page"] = page
        vectors.insert([row])
        vectors.persist()


def test_rows_changed_since_the_scan_are_read_by_document_filter(demo):
    keys = [d for d in keys_docs(demo) if d["affected_chunks"]]
    rewritten, fixed = keys[0], next(d for d in keys[1:] if d["affected_chunks"][0]["true_page"] > 0)
    demo.cli_json("scan")
    rewrite_chunk(demo, rewritten)
    rewrite_chunk(demo, fixed, page=fixed["affected_chunks"][0]["true_page"])
    by_filter, _ = run_spied(demo)
    with open_stores(demo.settings) as stores:
        auto_id = stores.vectors.info().auto_id  # a rewritten row has a new primary key
    assert set(by_filter) == ({rewritten["document_id"]} if auto_id else set()) | {fixed["document_id"]}
    # the chunk another tool fixed is no longer affected: the run leaves it (and its key) alone
    rest = [dict(d, affected_chunks=d["affected_chunks"][1:]) if d is fixed else d for d in keys]
    check_migrated(demo, demo.snapshot(), rest)
    assert demo.cli_json("verify")["ok"]


def add_late_chunk(demo: Demo, doc: dict) -> str:
    """A copy of one of the document's affected chunks arrives after the scan (page 0, the same
    legacy key, a new chunk id and index); returns its chunk id."""
    chunk = doc["affected_chunks"][0]
    demo.release()
    with open_stores(demo.settings) as stores:
        vectors = stores.vectors
        [row] = [r for r in vectors.fetch_documents([doc["document_id"]]) if r["chunk_id"] == chunk["chunk_id"]]
        late = {k: v for k, v in row.items() if not (vectors.info().auto_id and k == vectors.info().pk_field)}
        late.update(chunk_id=f"{chunk['chunk_id']}-late", chunk_index=10_000, page=0)
        vectors.insert([late])
        vectors.persist()
    return late["chunk_id"]


def test_a_chunk_added_after_the_scan_is_named_by_verify_and_fixed_by_the_next_run(demo):
    keys = [d for d in keys_docs(demo) if d["affected_chunks"]]
    doc = next(d for d in keys if d["affected_chunks"][0]["true_page"] > 0)
    demo.cli_json("scan")
    late = add_late_chunk(demo, doc)
    assert demo.cli_json("run", "--path", "keys")["failed"] == 0  # read by primary key: the late chunk is unseen
    named = demo.cli_json("verify", check=1)
    assert set(named["failed"]) == {doc["document_id"]}, named
    assert demo.cli_json("run", "--path", "keys")["migrated"] == 1  # drifted: read by filter, late chunk included
    demo.release()
    with open_stores(demo.settings) as stores:
        rows = stores.vectors.fetch_documents([doc["document_id"]], with_vectors=False)
    assert {r["chunk_id"]: r["page"] for r in rows}[late] == doc["affected_chunks"][0]["true_page"]
    check_migrated(demo, demo.snapshot(), keys)
    assert demo.cli_json("verify")["ok"]

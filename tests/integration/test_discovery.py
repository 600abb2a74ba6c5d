"""Acceptance: documents that arrive broken after a repair are found and fixed (docs/design.md §5.9).

The store is repaired end to end; then a broken document arrives (a keys document ingested again
under a new id: page 0, legacy keys, its images in the bucket) and a repaired chunk is written at
page 0 again. The next `repage run` finds and fixes both, and so does one `repage worker --once`
on another copy; `status` counts them as found since the last scan.
"""

from __future__ import annotations

import pytest

from repage.stores.open import open_stores
from tests.integration.test_run_demo import KEYS, check_migrated, keys_docs
from tests.support import Demo

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("pristine", ["chunk_id"], indirect=True)]
NEW_ID = "arrived-after-the-repair"


def as_built(demo: Demo, doc: dict) -> list[dict]:
    """The document's rows as the broken pipeline wrote them (page 0, its keys), with vectors."""
    demo.release()
    with open_stores(demo.settings) as stores:
        return stores.vectors.fetch_documents([doc["document_id"]])


def ingest_again(demo: Demo, rows: list[dict], old_id: str) -> None:
    """The same document ingested under a new id: its chunks and its images, as the bug writes them."""
    demo.release()
    with open_stores(demo.settings) as stores:
        copies = []
        for row in rows:
            copy = {k: v for k, v in row.items()}
            copy.update(document_id=NEW_ID, chunk_id=row["chunk_id"].replace(old_id, NEW_ID), page=0)
            if key := row.get("image_r2_key"):
                copy["image_r2_key"] = key.replace(old_id, NEW_ID)
                if stores.objects.exists(key):
                    stores.objects.put(copy["image_r2_key"], stores.objects.get(key))
            copies.append(copy)
        stores.vectors.insert(copies)
        stores.vectors.persist()


def break_one_again(demo: Demo, chunk: dict) -> None:
    from repage.domain.records import ChunkChange

    demo.release()
    with open_stores(demo.settings) as stores:
        identity = (chunk["chunk_id"],)
        row = stores.vectors.find_by_identity([identity])[identity][0]
        stores.vectors.write_changes([ChunkChange(identity, row["chunk_id"], 0, row["image_r2_key"])])
        stores.vectors.persist()


def arrange(demo: Demo) -> tuple[dict, dict]:
    """Repair the store, then a document arrives broken and a repaired chunk breaks again."""
    doc = next(
        d for d in keys_docs(demo) if d["affected_chunks"] and all(c["true_page"] > 0 for c in d["affected_chunks"])
    )
    rows = as_built(demo, doc)
    assert demo.cli_json("run", *KEYS)["failed"] == 0
    other = next(d for d in keys_docs(demo) if d["document_id"] != doc["document_id"])
    chunk = next(c for c in other["affected_chunks"] if c["true_page"] > 0)
    ingest_again(demo, rows, doc["document_id"])
    break_one_again(demo, chunk)
    return doc, other


def pages_of(demo: Demo, document_id: str) -> dict[str, int]:
    demo.release()
    with open_stores(demo.settings) as stores:
        return {r["chunk_id"]: r["page"] for r in stores.vectors.fetch_documents([document_id], with_vectors=False)}


def check_fixed(demo: Demo, doc: dict, other: dict) -> None:
    want = {c["chunk_id"].replace(doc["document_id"], NEW_ID): c["true_page"] for c in doc["affected_chunks"]}
    got = pages_of(demo, NEW_ID)
    assert {c: got[c] for c in want} == want
    check_migrated(demo, demo.snapshot(), [other])


def test_the_next_run_finds_and_fixes_them(demo):
    doc, other = arrange(demo)
    report = demo.cli_json("run", *KEYS)
    assert report["discovered"] == {"new": 1, "again": 1}, report
    assert report["migrated"] == 2 and report["failed"] == 0, report
    assert demo.cli_json("status")["found_since_last_scan"] == 2
    check_fixed(demo, doc, other)
    again = demo.cli_json("run", *KEYS)  # nothing new: a chunk whose true page is 0 is no news
    assert again["discovered"] == {"new": 0, "again": 0} and again["documents"] == 0, again
    assert demo.cli_json("verify")["ok"]


def test_one_worker_cycle_finds_and_fixes_them(demo):
    doc, other = arrange(demo)
    report = demo.cli_json("worker", "--once")
    assert report["last_cycle"]["discovered"] == {"new": 1, "again": 1}, report
    check_fixed(demo, doc, other)
    assert demo.cli_json("status")["found_since_last_scan"] == 2

"""rollback and gc, a batch of documents at a time, from the journal (docs/design.md §5.5, §5.8).

rollback: copies an original back first where `gc` deleted it, writes the journal's old values
back (one write per batch, read by stable identity), resets the moves to intended, deletes the
copies no chunk points at, and marks the documents rolled back. A reprocessed document is
restored from its backup (docs/design.md §2.4).
gc: deletes a superseded original only after the grace period and only when no chunk points at it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from repage.domain.identity import ChunkIdentity
from repage.domain.keys import is_pdf_image_ref
from repage.domain.records import ChunkChange, ChunkJournalEntry, ObjectJournalEntry, ObjectState
from repage.domain.states import RepairPath, State
from repage.errors import RepageError, StoreUnavailable
from repage.migration.verify import OBJECT_CHECKS, VERIFIABLE, VERIFY_BATCH, CheckReport, journalled_rows, records_in
from repage.stores.milvus import bounded_batches, eq_filter, in_filter


def _parallel(fn: Callable[[Any], Any], items: Sequence[Any], concurrency: int) -> list[Any]:
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="repage-objects") as pool:
        return list(pool.map(fn, items))


# ---- rollback


def rollback_documents(
    stores,
    document_ids: Iterable[str] | None = None,
    *,
    batch_size: int = VERIFY_BATCH,
    concurrency: int = OBJECT_CHECKS,
) -> CheckReport:
    report, started = CheckReport(), time.perf_counter()
    records = records_in(stores.ledger, set(VERIFIABLE), document_ids)
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        report.checked += len(batch)
        for record in batch:
            if record.path == RepairPath.REPROCESS:
                _settle_one(report, record.document_id, partial(_rollback_reprocessed, stores, record))
        journalled = [r.document_id for r in batch if r.path != RepairPath.REPROCESS]
        if journalled:
            _rollback_journalled(stores, journalled, report, concurrency)
    report.seconds = time.perf_counter() - started
    return report


def _settle_one(report: CheckReport, document_id: str, step: Callable[[], None]) -> None:
    try:
        step()
        report.passed.append(document_id)
    except RepageError as exc:
        report.failed[document_id] = str(exc)


def _rollback_reprocessed(stores, record) -> None:
    """Whole rows were replaced: back from the backup (docs/design.md §2.4)."""
    from repage.reprocess.backup import restore

    restore(stores, record)
    stores.ledger.transition(record.document_id, State.ROLLED_BACK, reason="rolled back from the reprocess backup")


def _rollback_journalled(stores, document_ids: list[str], report: CheckReport, concurrency: int) -> None:
    vectors, ledger = stores.vectors, stores.ledger
    journals, moves = ledger.chunk_journals(document_ids), ledger.object_journals(document_ids)
    # originals first: a chunk must never point at a missing image
    _parallel(lambda m: _restore_original(stores.objects, m), [m for d in document_ids for m in moves[d]], concurrency)
    found = vectors.find_written(journalled_rows(journals))
    changes: dict[str, list[ChunkChange]] = {}
    for doc in document_ids:
        try:
            changes[doc] = [_old_values(vectors, found, c) for c in journals[doc]]
        except RepageError as exc:
            report.failed[doc] = str(exc)
    written = _write_or_isolate(vectors, changes, report)
    vectors.persist()  # on Milvus Lite, flushed before the ledger says rolled back (docs/milvus-lite-durability.md)
    if written:
        written = _drop_copies(stores, {d: moves[d] for d in written}, report, concurrency)
        with ledger.transaction():
            for doc in written:
                ledger.transition(doc, State.ROLLED_BACK, reason="rolled back from the journal")
        report.passed.extend(written)


def _restore_original(objects, move: ObjectJournalEntry) -> None:
    if is_pdf_image_ref(move.old_key):  # an upload from the source PDF: no original to restore
        return
    if not objects.exists(move.old_key) and objects.exists(move.new_key):
        objects.copy(move.new_key, move.old_key)


def _old_values(vectors, found: dict, entry: ChunkJournalEntry) -> ChunkChange:
    rows = found.get(ChunkIdentity.from_text(entry.identity)) or []
    if not rows:
        raise RepageError(f"chunk {entry.identity} of a migrated document no longer exists; restore by hand")
    key = (entry.old_key or "") if entry.new_key is not None else None
    page = entry.old_page or 0  # journalled from an INT64 field: never None for a written chunk
    return ChunkChange(ChunkIdentity.from_text(entry.identity), rows[0][vectors.info().pk_field], page, key)


def _write_or_isolate(vectors, changes: dict[str, list[ChunkChange]], report: CheckReport) -> list[str]:
    """One write for the batch; if it fails (not an outage), each document alone: a bad one fails alone."""
    try:
        vectors.write_changes([c for doc_changes in changes.values() for c in doc_changes])
        return list(changes)
    except StoreUnavailable:
        raise
    except RepageError:
        if len(changes) == 1:
            raise
    written = []
    for doc, doc_changes in changes.items():
        try:
            vectors.write_changes(doc_changes)
            written.append(doc)
        except StoreUnavailable:
            raise
        except RepageError as exc:
            report.failed[doc] = f"document {doc}: writing its old values failed: {exc}"
    return written


def _drop_copies(
    stores, moves: dict[str, list[ObjectJournalEntry]], report: CheckReport, concurrency: int
) -> list[str]:
    """Moves back to intended (a later run copies again), then the copies no chunk points at go.
    Returns the documents done; one a worker claimed meanwhile is reported, its copies kept."""
    refused = stores.ledger.set_objects_state(
        {d: (None, [(m.old_key, m.new_key) for m in ms]) for d, ms in moves.items() if ms}, ObjectState.INTENDED
    )
    report.failed.update(refused)
    copies = [m.new_key for d, ms in moves.items() if d not in refused for m in ms]
    referenced = referenced_keys(stores.vectors, copies)
    _parallel(stores.objects.delete, sorted(set(copies) - referenced), concurrency)
    return [d for d in moves if d not in refused]


def referenced_keys(vectors, keys: Sequence[str], batch: int = 5000, batch_bytes: int = 512 * 1024) -> set[str]:
    """The keys some chunk points at: one count per `batch` keys (and `batch_bytes` of filter),
    one per key only where any is.

    A count's cost on Milvus Lite is mostly the scan, not the list: 500 keys 75 ms, 2,000 keys
    104 ms (docs/performance.md)."""
    if "image_r2_key" not in vectors.info().fields:
        return set()
    found = set[str]()
    cost = lambda key: len(key) + 4  # noqa: E731 (quotes and a comma)
    for group in bounded_batches(list(dict.fromkeys(keys)), cost, batch, batch_bytes):
        if vectors.count(in_filter("image_r2_key", group)) > 0:
            found.update(k for k in group if vectors.count(eq_filter("image_r2_key", k)) > 0)
    return found


# ---- gc


def gc_objects(
    stores, grace_seconds: float, *, batch_size: int = VERIFY_BATCH, concurrency: int = OBJECT_CHECKS
) -> dict:
    """Delete originals superseded more than `grace_seconds` ago that no chunk references."""
    ledger = stores.ledger
    cutoff = ledger.db_now() - grace_seconds
    deleted: list[str] = []
    kept: dict[str, str] = {}
    records = list(ledger.documents(states={State.MIGRATED, State.VERIFIED}))  # drifted ones may need them
    for start in range(0, len(records), batch_size):
        ids = [r.document_id for r in records[start : start + batch_size]]
        due = {d: [m for m in ms if _superseded(m, cutoff)] for d, ms in ledger.object_journals(ids).items()}
        referenced = referenced_keys(stores.vectors, [m.old_key for ms in due.values() for m in ms])
        kept.update(dict.fromkeys(sorted(referenced), "a chunk still points at it"))
        gone = {d: [m for m in ms if m.old_key not in referenced] for d, ms in due.items()}
        # journalled first: a crash before the delete leaves an original rollback finds in place
        refused = ledger.set_objects_state(
            {d: (None, [(m.old_key, m.new_key) for m in ms]) for d, ms in gone.items() if ms}, ObjectState.DELETED
        )
        keys = [m.old_key for d, ms in gone.items() if d not in refused for m in ms]
        _parallel(stores.objects.delete, keys, concurrency)
        deleted += keys
    return {"deleted": len(deleted), "kept": kept, "grace_seconds": grace_seconds}


def _superseded(move: ObjectJournalEntry, cutoff: float) -> bool:
    """A verified move older than the cutoff; `pdf:` origins are the source PDF, never deleted."""
    if is_pdf_image_ref(move.old_key):
        return False
    return move.state == ObjectState.VERIFIED and move.created_at is not None and move.created_at <= cutoff

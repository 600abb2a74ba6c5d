"""verify, rollback and gc: all three work from the journal, never from guesses.

verify: chunk count unchanged; each journalled chunk is one row whose page and key are
the journalled new values and whose other fields and vector match the journal checksum;
every moved image resolves at its new key with the journalled size and content hash.
rollback: writes the journal's old values back, removes the copies repage made, and
copies an image back first if `gc` already deleted its original.
gc: deletes a superseded object only after the grace period and only when no chunk
points at it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from repage.domain.identity import ChunkIdentity
from repage.domain.keys import is_pdf_image_ref
from repage.domain.records import ChunkChange, ObjectState
from repage.domain.states import RepairPath, State
from repage.errors import ObjectNotFound, RepageError
from repage.stores.milvus import eq_filter, in_filter


@dataclass
class CheckReport:
    checked: int = 0
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"checked": self.checked, "passed": len(self.passed), "failed": self.failed, "ok": not self.failed}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- verify


def verify_document(stores, record) -> str | None:
    """None when the document checks out, else the first problem found."""
    vectors, ledger = stores.vectors, stores.ledger
    journal = ledger.chunk_journal(record.document_id)
    rows = vectors.fetch_documents([record.document_id])
    if record.total_chunks is not None and len(rows) != record.total_chunks:
        return f"{len(rows)} chunks now, {record.total_chunks} before the migration"
    found = vectors.find_by_identity([ChunkIdentity.from_text(c.identity) for c in journal], with_vectors=True)
    for entry in journal:
        problem = _check_chunk(vectors, entry, found.get(ChunkIdentity.from_text(entry.identity), []))
        if problem:
            return f"chunk {entry.identity}: {problem}"
    for move in ledger.object_journal(record.document_id):
        problem = _check_object(stores.objects, move)
        if problem:
            return problem
    return None


def _check_chunk(vectors, entry, rows: list[dict]) -> str | None:
    if len(rows) != 1:
        return f"{len(rows)} rows (expected 1)"
    row = rows[0]
    key = entry.new_key if entry.new_key is not None else entry.old_key
    if row.get("page") != entry.new_page:
        return f"page is {row.get('page')}, recovered page is {entry.new_page}"
    if (row.get("image_r2_key") or None) != (key or None):
        return f"image_r2_key is {row.get('image_r2_key')!r}, expected {key!r}"
    if vectors.row_checksum(row) != entry.row_checksum:
        return "a field other than page/image_r2_key, or the vector, changed"
    return None


def _check_object(objects, move) -> str | None:
    try:
        head = objects.head(move.new_key)
        data = objects.get(move.new_key)
    except ObjectNotFound:
        return f"image {move.new_key} does not exist"
    if head.size != move.size or _sha256(data) != move.content_hash:
        return f"image {move.new_key} differs from {move.old_key} (size or content hash)"
    return None


def verify_documents(stores, document_ids: Iterable[str] | None = None) -> CheckReport:
    report = CheckReport()
    for record in _records(stores.ledger, {State.MIGRATED, State.VERIFIED}, document_ids):
        report.checked += 1
        try:
            problem = verify_document(stores, record)
        except RepageError as exc:
            problem = str(exc)
        if problem:
            report.failed[record.document_id] = problem
            stores.ledger.add_event("verify-failed", record.document_id, detail=problem)
            continue
        report.passed.append(record.document_id)
        if record.state == State.MIGRATED:
            stores.ledger.transition(record.document_id, State.VERIFIED, reason="verify passed")
    return report


def _records(ledger, states: set[State], document_ids: Iterable[str] | None):
    if document_ids is None:
        return list(ledger.documents(states=states))
    records = (ledger.get(d) for d in document_ids)
    return [r for r in records if r is not None and r.state in states]


# ---- rollback


def rollback_document(stores, record) -> None:
    """Restore the journal's old values exactly, then drop the copies repage made."""
    if record.path == RepairPath.REPROCESS:  # whole rows were replaced: back from the local pipeline's backup
        from repage.reprocess.local import restore_backup

        restore_backup(stores, record)
        stores.ledger.transition(record.document_id, State.ROLLED_BACK, reason="rolled back from the reprocess backup")
        return
    vectors, objects, ledger = stores.vectors, stores.objects, stores.ledger
    journal = ledger.chunk_journal(record.document_id)
    moves = ledger.object_journal(record.document_id)
    for move in moves:  # originals first: a chunk must never point at a missing image
        if is_pdf_image_ref(move.old_key):  # an upload from the source PDF: no original to restore
            continue
        if not objects.exists(move.old_key) and objects.exists(move.new_key):
            objects.copy(move.new_key, move.old_key)
    found = vectors.find_by_identity([ChunkIdentity.from_text(c.identity) for c in journal])
    changes = [
        ChunkChange(
            ChunkIdentity.from_text(c.identity),
            _current_pk(vectors, found, c),
            c.old_page,
            (c.old_key or "") if c.new_key is not None else None,
        )
        for c in journal
    ]
    vectors.write_changes(changes)
    vectors.persist()  # on Milvus Lite, flushed before the ledger says rolled back (docs/milvus-lite-durability.md)
    referenced = _referenced_keys(vectors, [move.new_key for move in moves])
    for move in moves:
        # back to intended: a later run of this document must copy the image again
        ledger.set_object_state(record.document_id, None, move.old_key, move.new_key, ObjectState.INTENDED)
        if move.new_key not in referenced:
            objects.delete(move.new_key)
    ledger.transition(record.document_id, State.ROLLED_BACK, reason="rolled back from the journal")


def _current_pk(vectors, found: dict, entry):
    rows = found.get(ChunkIdentity.from_text(entry.identity)) or []
    if not rows:
        raise RepageError(f"chunk {entry.identity} of a migrated document no longer exists; restore by hand")
    return rows[0][vectors.info().pk_field]


def _referenced(vectors, key: str) -> bool:
    if "image_r2_key" not in vectors.info().fields:
        return False
    return vectors.count(eq_filter("image_r2_key", key)) > 0


def _referenced_keys(vectors, keys: list[str], batch: int = 500) -> set[str]:
    """The keys some chunk points at: one count per `batch` keys, one per key only where any is."""
    if "image_r2_key" not in vectors.info().fields:
        return set()
    found: set[str]
    keys, found = list(dict.fromkeys(keys)), set()
    for start in range(0, len(keys), batch):
        group = keys[start : start + batch]
        if vectors.count(in_filter("image_r2_key", group)) > 0:
            found.update(k for k in group if _referenced(vectors, k))
    return found


def rollback_documents(stores, document_ids: Iterable[str] | None = None) -> CheckReport:
    report = CheckReport()
    for record in _records(stores.ledger, {State.MIGRATED, State.VERIFIED}, document_ids):
        report.checked += 1
        try:
            rollback_document(stores, record)
            report.passed.append(record.document_id)
        except RepageError as exc:
            report.failed[record.document_id] = str(exc)
    return report


# ---- gc


def gc_objects(stores, grace_seconds: float) -> dict:
    """Delete originals superseded more than `grace_seconds` ago that no chunk references."""
    ledger, objects, vectors = stores.ledger, stores.objects, stores.vectors
    cutoff = ledger.db_now() - grace_seconds
    deleted, kept = [], {}
    for record in ledger.documents(states={State.MIGRATED, State.VERIFIED}):
        for move in ledger.object_journal(record.document_id):
            if is_pdf_image_ref(move.old_key):  # the source PDF, not a superseded object: never deleted
                continue
            if move.state != ObjectState.VERIFIED or move.created_at is None or move.created_at > cutoff:
                continue
            if _referenced(vectors, move.old_key):
                kept[move.old_key] = "a chunk still points at it"
                continue
            objects.delete(move.old_key)
            ledger.set_object_state(record.document_id, None, move.old_key, move.new_key, ObjectState.DELETED)
            deleted.append(move.old_key)
    return {"deleted": len(deleted), "kept": kept, "grace_seconds": grace_seconds}

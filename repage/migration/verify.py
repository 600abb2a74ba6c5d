"""verify works from the journal, never from guesses (rollback and gc: repage/migration/rollback.py).

verify (docs/design.md §5.8) checks the end state the app sees, a batch of documents at a time:
the chunk count is unchanged; each journalled chunk is one row whose page and key are the
journalled new values and whose other fields and vector match the journal checksum; every moved
image resolves at its new key with the journalled size and content hash, and every canonical
image an affected chunk kept exists. A document that fails becomes `drifted` with its journal
reopened: the next run repairs it from the journal.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from repage.domain.identity import ChunkIdentity
from repage.domain.keys import parse_image_key
from repage.domain.records import ChunkJournalEntry, ObjectJournalEntry
from repage.domain.states import State
from repage.errors import IllegalTransition, ObjectNotFound, StaleLease

VERIFIABLE = frozenset({State.MIGRATED, State.VERIFIED, State.DRIFTED})
VERIFY_BATCH = 200  # documents per query, as a run's batch
OBJECT_CHECKS = 8  # bucket requests in flight while verifying


@dataclass
class CheckReport:
    checked: int = 0
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the whole pass (make bench compares it with the run's)

    def as_dict(self) -> dict:
        return {
            "checked": self.checked,
            "passed": len(self.passed),
            "failed": self.failed,
            "ok": not self.failed,
            "seconds": round(self.seconds, 3),
        }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- verify


@dataclass
class Finding:
    """What verify found for one document: its problems, and the moves to copy again."""

    problems: list[str] = field(default_factory=list)
    redo: list[tuple[str, str]] = field(default_factory=list)
    identities: list[str] = field(default_factory=list)

    @property
    def problem(self) -> str | None:
        if not self.problems:
            return None
        more = f"; and {len(self.problems) - 3} more" if len(self.problems) > 3 else ""
        return "; ".join(self.problems[:3]) + more


def verify_documents(
    stores,
    document_ids: Iterable[str] | None = None,
    *,
    sample: int | None = None,
    batch_size: int = VERIFY_BATCH,
    concurrency: int = OBJECT_CHECKS,
) -> CheckReport:
    """Check migrated, verified and drifted documents (or `sample` random done ones) batch by batch."""
    ledger = stores.ledger
    if sample is not None:
        records = ledger.sample_documents({State.MIGRATED, State.VERIFIED}, sample)
    else:
        records = records_in(ledger, set(VERIFIABLE), document_ids)
    report, started = CheckReport(), time.perf_counter()
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        findings = check_documents(stores, [r.document_id for r in batch], concurrency)
        with ledger.transaction():
            for record in batch:
                try:
                    _settle(ledger, record, findings[record.document_id], report)
                except (StaleLease, IllegalTransition):  # claimed by a run meanwhile: it is that run's now
                    continue
    report.seconds = time.perf_counter() - started
    return report


def check_documents(stores, document_ids: Sequence[str], concurrency: int = OBJECT_CHECKS) -> dict[str, Finding]:
    """One chunk count query and one journalled-rows query for the batch; object checks in parallel."""
    ledger, vectors = stores.ledger, stores.vectors
    records = {d: ledger.get(d) for d in document_ids}
    journals, moves = ledger.chunk_journals(document_ids), ledger.object_journals(document_ids)
    counts = _chunk_counts(vectors, document_ids)
    found = vectors.find_written(journalled_rows(journals))
    findings = {d: Finding(identities=[e.identity for e in journals[d]]) for d in document_ids}
    for doc, finding in findings.items():
        total = records[doc].total_chunks if records[doc] is not None else None
        if total is not None and counts[doc] != total:
            finding.problems.append(f"{counts[doc]} chunks now, {total} before the migration")
        for entry in journals[doc]:
            if problem := _check_chunk(vectors, entry, found.get(ChunkIdentity.from_text(entry.identity), [])):
                finding.problems.append(f"chunk {entry.identity}: {problem}")
    _check_objects(stores.objects, journals, moves, findings, concurrency)
    return findings


def journalled_rows(journals: Mapping[str, Sequence[ChunkJournalEntry]]) -> dict[tuple, str | None]:
    """{identity: primary key the run recorded}: read by primary key where the store keeps keys
    (a point read; a filter of 200 documents' identities scans every row, and grows with the
    store), by identity elsewhere or where a key is missing (MilvusVectors.find_written)."""
    return {ChunkIdentity.from_text(e.identity): e.new_pk or e.old_pk for entries in journals.values() for e in entries}


def _chunk_counts(vectors, document_ids: Sequence[str]) -> Counter:
    """Distinct chunk identities per document, light fields only."""
    identity = vectors.info().identity
    rows = vectors.fetch_documents(document_ids, fields=["document_id", *identity.fields], with_vectors=False)
    return Counter(doc for doc, _ in {(r["document_id"], identity.key(r)) for r in rows})


def _check_chunk(vectors, entry: ChunkJournalEntry, rows: list[dict]) -> str | None:
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


def kept_canonical_keys(chunks: Sequence[ChunkJournalEntry], moves: Sequence[ObjectJournalEntry]) -> list[str]:
    """Canonical keys the document's chunks point at that no move of its journal wrote."""
    moved = {m.new_key for m in moves}
    finals = {c.new_key if c.new_key is not None else c.old_key for c in chunks}
    return sorted(k for k in finals if k and k not in moved and parse_image_key(k).fmt == "canonical")


def _check_objects(objects, journals, moves, findings: dict[str, Finding], concurrency: int) -> None:
    tasks = [(d, m) for d in findings for m in moves[d]]
    tasks += [(d, key) for d in findings for key in kept_canonical_keys(journals[d], moves[d])]
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="repage-verify") as pool:
        results = list(pool.map(lambda task: _check_object(objects, task[1]), tasks))
    for (doc, target), problem in zip(tasks, results):
        if problem is not None:
            findings[doc].problems.append(problem)
            if isinstance(target, ObjectJournalEntry):
                findings[doc].redo.append((target.old_key, target.new_key))


def _check_object(objects, target: ObjectJournalEntry | str) -> str | None:
    """A moved image: at its new key with the journalled size and hash. A kept one: it exists."""
    if isinstance(target, str):
        return None if objects.exists(target) else f"image {target} (kept at its canonical key) does not exist"
    try:
        data = objects.get(target.new_key)  # one GET: the size a HEAD would give, and the bytes to hash
    except ObjectNotFound:
        return f"image {target.new_key} does not exist"
    if len(data) != target.size or _sha256(data) != target.content_hash:
        return f"image {target.new_key} differs from {target.old_key} (size or content hash)"
    return None


def _settle(ledger, record, finding: Finding, report: CheckReport) -> None:
    """Passed: verified. Failed: drifted, its journal reopened for the next run (docs/design.md §5.8).
    The ledger first: a document a run claimed meanwhile raises here and is not reported."""
    doc = record.document_id
    if finding.problem is None:
        if record.state == State.DRIFTED:  # put right meanwhile: the journal is applied again
            ledger.mark_chunks_applied(doc, None, finding.identities)
        if record.state != State.VERIFIED:
            ledger.transition(doc, State.VERIFIED, reason="verify passed")
        report.passed.append(doc)
    else:
        ledger.reopen_journal(doc, finding.redo)
        if record.state != State.DRIFTED:
            ledger.transition(doc, State.DRIFTED, reason="drift found by verify", error=finding.problem)
        ledger.add_event("verify-failed", doc, detail=finding.problem)
        report.failed[doc] = finding.problem
    report.checked += 1


def records_in(ledger, states: set[State], document_ids: Iterable[str] | None):
    """The documents in `states`: all of them, or those of `document_ids`."""
    if document_ids is None:
        return list(ledger.documents(states=states))
    records = (ledger.get(d) for d in document_ids)
    return [r for r in records if r is not None and r.state in states]

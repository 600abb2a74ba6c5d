"""How documents enter the ledger: a scan's records, and the claim priority set on them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from repage.domain.records import ScanRecord
from repage.domain.states import RepairPath, State, check_transition
from repage.stores.ledger.connection import LedgerBase, batches
from repage.stores.ledger.schema import docs_t

_RESCANNABLE = (State.PENDING, State.FAILED, State.DEFERRED, State.REVIEW)


class Scans(LedgerBase):
    """upsert_scan and set_priority."""

    def upsert_scan(self, records: Iterable[ScanRecord]) -> None:
        """Insert new documents; refresh re-scannable ones; leave running and done ones alone.

        pending/failed/deferred/review: path, reason and counts are refreshed, state kept.
        rolled_back: re-opened to pending when the scan finds it affected again.
        running and DONE: untouched (a scan never counts a done document as affected).
        """
        for batch in batches(records):
            latest = {r.document_id: r for r in batch}  # last one wins within a batch
            for rec in latest.values():
                check_transition(None, State(rec.state))
            with self._tx() as conn:
                self._upsert_batch(conn, dict(sorted(latest.items())))  # sorted: PG lock order

    def _upsert_batch(self, conn: sa.Connection, recs: dict[str, ScanRecord]) -> None:
        c = docs_t.c
        existing = dict(conn.execute(sa.select(c.document_id, c.state).where(c.document_id.in_(list(recs)))).all())
        new = [r for d, r in recs.items() if d not in existing]
        refresh = [r for d, r in recs.items() if existing.get(d) in _RESCANNABLE]
        reopen = [r for d, r in recs.items() if existing.get(d) == State.ROLLED_BACK and r.state == State.PENDING]
        now = self._now()
        if new:
            # ignore: another scanner may insert the same document between our SELECT and INSERT
            conn.execute(
                self._insert_ignore(docs_t).values(created_at=now, updated_at=now),
                [
                    {
                        "document_id": r.document_id,
                        "dataset_id": r.dataset_id,
                        "filename": r.filename,
                        "state": State(r.state).value,
                        "path": RepairPath(r.path).value,
                        "reason": r.reason,
                        "affected_chunks": r.affected_chunks,
                        "total_chunks": r.total_chunks,
                        "images_to_move": r.images_to_move,
                        "chunk_keys": _chunk_keys_json(r),
                    }
                    for r in new
                ],
            )
        for rows, src, extra in (
            (refresh, _RESCANNABLE, {}),
            (reopen, (State.ROLLED_BACK,), {"state": State.PENDING.value}),
        ):
            if rows:
                conn.execute(
                    self._rescan_update(src, extra),
                    [
                        {
                            "b_id": r.document_id,
                            "b_dataset": r.dataset_id,
                            "b_filename": r.filename,
                            "b_path": RepairPath(r.path).value,
                            "b_reason": r.reason,
                            "b_affected": r.affected_chunks,
                            "b_total": r.total_chunks,
                            "b_moves": r.images_to_move,
                            "b_keys": _chunk_keys_json(r),
                        }
                        for r in rows
                    ],
                )

    def _rescan_update(self, src: Sequence[State], extra: dict[str, Any]) -> Any:
        c = docs_t.c
        total = sa.bindparam("b_total", type_=sa.Integer)
        values = dict(
            dataset_id=sa.bindparam("b_dataset"),
            filename=sa.bindparam("b_filename"),
            path=sa.bindparam("b_path"),
            reason=sa.bindparam("b_reason"),
            affected_chunks=sa.bindparam("b_affected"),
            images_to_move=sa.bindparam("b_moves"),
            total_chunks=sa.func.coalesce(total, c.total_chunks),
            chunk_keys=sa.bindparam("b_keys"),
        )
        where = [
            c.document_id == sa.bindparam("b_id"),
            sa.or_(*(c.state == s.value for s in src)),
        ]  # executemany: no expanding IN
        if not extra:  # a refresh that changes nothing leaves the row (and its updated_at) alone
            where.append(sa.or_(*(c[name].is_distinct_from(value) for name, value in values.items())))
        return sa.update(docs_t).where(*where).values(**values, updated_at=self._now(), **extra)

    def chunk_keys(self, document_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
        """The scan's (primary key, identity) pairs of these documents' affected chunks, where recorded."""
        c = docs_t.c
        found: dict[str, list[tuple[str, str]]] = {}
        with self._tx(write=False) as conn:
            for batch in batches(list(dict.fromkeys(document_ids))):
                query = sa.select(c.document_id, c.chunk_keys).where(
                    c.document_id.in_(batch), c.chunk_keys.is_not(None)
                )
                for doc, keys in conn.execute(query):
                    found[doc] = [(pk, ident) for pk, ident in json.loads(keys)]
        return found

    def set_priority(self, priorities: Mapping[str, float]) -> None:
        """Set the claim priority of documents (order="priority" claims highest first)."""
        stmt = (
            sa.update(docs_t)
            .where(docs_t.c.document_id == sa.bindparam("b_id"))
            .values(priority=sa.bindparam("b_priority"))
        )
        for batch in batches(sorted(priorities.items())):
            with self._tx() as conn:
                conn.execute(stmt, [{"b_id": d, "b_priority": float(p)} for d, p in batch])


def _chunk_keys_json(record: ScanRecord) -> str | None:
    return json.dumps([list(pair) for pair in record.chunk_keys]) if record.chunk_keys else None

"""The access queue: decayed usage of documents (repage/domain/access.py) and lazy requests,
which claims take before everything else (repage/migration/lazy.py, the worker)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import sqlalchemy as sa

from repage.domain.access import Decayed
from repage.domain.records import AccessRecord
from repage.domain.states import CLAIMABLE, RepairPath, State, check_transition
from repage.stores.ledger.connection import LedgerBase, batches
from repage.stores.ledger.schema import accesses_t, docs_t, events_t


class Accesses(LedgerBase):
    """record_accesses, the enqueue requests, top_accesses and document_ids_by_dataset."""

    def record_accesses(self, hits: Mapping[str, tuple[str | None, Decayed]], half_life_s: float) -> int:
        """Add decayed hits (document -> (dataset_id, Decayed)); returns documents touched.

        Read-modify-write under the row lock (PostgreSQL) or the write lock (SQLite): flushes
        of several service processes add up instead of overwriting each other.
        """
        a = accesses_t.c
        update = (
            sa.update(accesses_t)
            .where(a.document_id == sa.bindparam("b_id"))
            .values(
                dataset_id=sa.func.coalesce(sa.bindparam("b_dataset", type_=sa.String), a.dataset_id),
                score=sa.bindparam("b_score"),
                scored_at=sa.bindparam("b_at"),
                access_rank=sa.bindparam("b_rank"),
            )
        )
        for batch in batches(sorted(hits.items())):
            ids = [doc for doc, _ in batch]
            with self._tx() as conn:
                conn.execute(
                    self._insert_ignore(accesses_t),
                    [{"document_id": doc, "score": 0.0, "scored_at": hit.at} for doc, (_, hit) in batch],
                )
                known = {
                    r.document_id: Decayed(r.score, r.scored_at)
                    for r in conn.execute(
                        sa.select(a.document_id, a.score, a.scored_at).where(a.document_id.in_(ids)).with_for_update()
                    )
                }
                rows = []
                for doc, (dataset_id, hit) in batch:
                    total = known[doc].merge(hit, half_life_s)
                    rows.append(
                        {
                            "b_id": doc,
                            "b_dataset": dataset_id,
                            "b_score": total.score,
                            "b_at": total.at,
                            "b_rank": total.rank(half_life_s),
                        }
                    )
                conn.execute(update, rows)
        return len(hits)

    # ----------------------------------------------------------------- lazy requests

    def enqueue(self, document_ids: Sequence[str], *, retry_failed: bool = False) -> dict[str, str]:
        """Ask for documents to be claimed before everything else (lazy repair, admin).

        Per document: "enqueued" (newly: an `enqueued` event is written), "queued" (it was
        already), or its state when there is nothing to queue (running, done, review,
        deferred, failed). A document no scan has recorded is enqueued: the worker scans it.
        `retry_failed` first moves a failed document back to pending (the retry edge).
        """
        outcome: dict[str, str] = {}
        for batch in batches(dict.fromkeys(document_ids)):
            with self._tx() as conn:
                outcome.update(self._enqueue_batch(conn, batch, retry_failed))
        return outcome

    def _enqueue_batch(self, conn: sa.Connection, batch: list[str], retry_failed: bool) -> dict[str, str]:
        c, a = docs_t.c, accesses_t.c
        states = dict(conn.execute(sa.select(c.document_id, c.state).where(c.document_id.in_(batch))).all())
        failed = [d for d in batch if states.get(d) == State.FAILED.value] if retry_failed else []
        if failed:
            check_transition(State.FAILED, State.PENDING)
            conn.execute(
                sa.update(docs_t)
                .where(c.document_id.in_(failed), c.state == State.FAILED.value)
                .values(state=State.PENDING.value, updated_at=self._now())
            )
            states.update(dict.fromkeys(failed, State.PENDING.value))
        wanted = [d for d in batch if states.get(d, State.PENDING.value) == State.PENDING.value]
        outcome = {d: states[d] for d in batch if d not in wanted}
        if wanted:
            now = self._now()
            conn.execute(
                self._insert_ignore(accesses_t), [{"document_id": d, "score": 0.0, "scored_at": 0.0} for d in wanted]
            )
            newly = set(
                conn.scalars(
                    sa.update(accesses_t)
                    .where(a.document_id.in_(wanted), a.enqueued_at.is_(None))
                    .values(enqueued_at=now)
                    .returning(a.document_id)
                )
            )
            if newly:
                conn.execute(
                    sa.insert(events_t).values(at=now, kind="enqueued"),
                    [{"document_id": d, "count": 1} for d in sorted(newly)],
                )
            outcome.update({d: "enqueued" if d in newly else "queued" for d in wanted})
        return outcome

    def enqueued(self, *, unscanned_only: bool = False, limit: int | None = None) -> list[str]:
        """Enqueued documents, oldest request first; `unscanned_only`: those no scan recorded."""
        a, c = accesses_t.c, docs_t.c
        q = sa.select(a.document_id).where(a.enqueued_at.is_not(None)).order_by(a.enqueued_at, a.document_id)
        if unscanned_only:
            q = q.where(~sa.exists().where(c.document_id == a.document_id))
        if limit is not None:
            q = q.limit(limit)
        with self._tx(write=False) as conn:
            return list(conn.scalars(q))

    def enqueued_count(self) -> int:
        """How many documents wait in the lazy queue (the read path's requests, docs/design.md §10.2)."""
        a = accesses_t.c
        with self._tx(write=False) as conn:
            return int(conn.scalar(sa.select(sa.func.count()).where(a.enqueued_at.is_not(None))) or 0)

    def clear_enqueued(
        self, document_ids: Sequence[str] | None = None, *, keep_paths: set[RepairPath] | None = None
    ) -> int:
        """Drop enqueue requests: of `document_ids`; or else of every scanned document that a
        claim (of `keep_paths`) can no longer take. Running documents keep theirs."""
        a, c = accesses_t.c, docs_t.c
        if document_ids is not None:
            wheres = [a.document_id.in_(batch) for batch in batches(dict.fromkeys(document_ids))]
        else:
            claimable: sa.ColumnElement[bool] = c.state.in_(sorted(s.value for s in CLAIMABLE))
            if keep_paths is not None:
                claimable = sa.and_(claimable, c.path.in_(sorted(RepairPath(p).value for p in keep_paths)))
            settled = sa.select(c.document_id).where(~sa.or_(claimable, c.state == State.RUNNING.value))
            wheres = [a.document_id.in_(settled)]
        cleared = 0
        for where in wheres:
            with self._tx() as conn:
                cleared += conn.execute(
                    sa.update(accesses_t).where(a.enqueued_at.is_not(None), where).values(enqueued_at=None)
                ).rowcount
        return cleared

    # ----------------------------------------------------------------- reading

    def top_accesses(self, limit: int = 20) -> list[AccessRecord]:
        """Documents by access rank (decayed count), highest first."""
        a, c = accesses_t.c, docs_t.c
        q = (
            sa.select(
                a.document_id,
                sa.func.coalesce(a.dataset_id, c.dataset_id).label("dataset_id"),
                a.score,
                a.scored_at,
                a.access_rank,
                a.enqueued_at,
                c.state,
                c.path,
            )
            .select_from(accesses_t.outerjoin(docs_t, c.document_id == a.document_id))
            .where(a.score > 0)
            .order_by(a.access_rank.desc(), a.document_id)
            .limit(limit)
        )
        with self._tx(write=False) as conn:
            rows = conn.execute(q).all()
        return [
            AccessRecord(
                r.document_id,
                r.dataset_id,
                float(r.score),
                float(r.scored_at),
                r.access_rank,
                r.enqueued_at,
                State(r.state) if r.state else None,
                RepairPath(r.path) if r.path else None,
            )
            for r in rows
        ]

    def document_ids_by_dataset(self, dataset_ids: Iterable[str]) -> dict[str, list[str]]:
        """The documents the ledger knows per dataset (an imported dataset hit counts for each)."""
        c = docs_t.c
        out: dict[str, list[str]] = {}
        for batch in batches(sorted(set(dataset_ids))):
            with self._tx(write=False) as conn:
                for dataset, doc in conn.execute(
                    sa.select(c.dataset_id, c.document_id).where(c.dataset_id.in_(batch)).order_by(c.document_id)
                ):
                    out.setdefault(dataset, []).append(doc)
        return out

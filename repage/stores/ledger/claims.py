"""Claims and leases (docs/design.md §4): pending documents to running under a lease, renewed
while a worker holds them, and handed back when it dies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa

from repage.domain.records import Claim
from repage.domain.states import CLAIMABLE, RepairPath, State
from repage.errors import StaleLease
from repage.stores.ledger.connection import batches
from repage.stores.ledger.fencing import Fenced
from repage.stores.ledger.schema import accesses_t, docs_t

ORDERS = ("oldest", "random", "priority")
_CLAIMABLE = sorted(s.value for s in CLAIMABLE)  # pending, and drifted documents to repair from their journal


class Claims(Fenced):
    """claim_batch, the lease renewals and release_expired."""

    def claim_batch(
        self,
        owner: str,
        limit: int,
        lease_seconds: float,
        *,
        paths: set[RepairPath] | None = None,
        dataset_id: str | None = None,
        document_ids: Sequence[str] | None = None,
        order: str = "oldest",
        min_access_rank: float | None = None,
        enqueued_only: bool = False,
    ) -> list[Claim]:
        """Move up to `limit` pending documents to running under a new lease, in `order`.

        `priority`: enqueued (lazy) documents first, then `priority`, then access rank.
        `min_access_rank` keeps documents ranked at least that (repage/domain/access.py
        rank_threshold); `enqueued_only` keeps enqueued documents only.
        """
        if order not in ORDERS:
            raise ValueError(f"claim order {order!r} is not one of {ORDERS}")
        if limit <= 0 or (paths is not None and not paths):
            return []
        c = docs_t.c
        with self._tx() as conn:
            ids = self._pick(conn, limit, paths, dataset_id, document_ids, order, min_access_rank, enqueued_only)
            if not ids:
                return []
            now = self._now()
            rows = conn.execute(
                sa.update(docs_t)
                .where(c.document_id.in_(ids), c.state.in_(_CLAIMABLE))
                .values(
                    state=State.RUNNING.value,
                    lease_owner=owner,
                    lease_expires=now + lease_seconds,
                    fencing_token=c.fencing_token + 1,
                    started_at=now,
                    finished_at=None,
                    updated_at=now,
                )
                .returning(
                    c.document_id, c.dataset_id, c.filename, c.path, c.fencing_token, c.affected_chunks, c.lease_expires
                )
            ).all()
        rank = {d: i for i, d in enumerate(ids)}
        claims = [
            Claim(
                r.document_id,
                r.dataset_id,
                r.filename,
                RepairPath(r.path),
                r.fencing_token,
                r.affected_chunks,
                r.lease_expires,
            )
            for r in rows
        ]
        return sorted(claims, key=lambda cl: rank[cl.document_id])

    def _pick(
        self,
        conn: sa.Connection,
        limit: int,
        paths: set[RepairPath] | None,
        dataset_id: str | None,
        document_ids: Sequence[str] | None,
        order: str,
        min_access_rank: float | None = None,
        enqueued_only: bool = False,
    ) -> list[str]:
        c, a = docs_t.c, accesses_t.c
        q = sa.select(c.document_id).where(c.state.in_(_CLAIMABLE))
        if paths is not None:
            q = q.where(c.path.in_(sorted(RepairPath(p).value for p in paths)))
        if dataset_id is not None:
            q = q.where(c.dataset_id == dataset_id)
        if order == "priority" or min_access_rank is not None or enqueued_only:
            q = q.select_from(docs_t.outerjoin(accesses_t, a.document_id == c.document_id))
            q = q.where(a.access_rank >= min_access_rank) if min_access_rank is not None else q
            q = q.where(a.enqueued_at.is_not(None)) if enqueued_only else q
        q = q.order_by(
            *{
                "oldest": (c.created_at, c.document_id),
                "random": (sa.func.random(),),
                "priority": (
                    a.enqueued_at.is_(None),
                    a.enqueued_at,
                    c.priority.desc(),
                    a.access_rank.desc().nulls_last(),
                    c.created_at,
                    c.document_id,
                ),
            }[order]
        )
        if not self._sqlite:
            # PostgreSQL: rows another claimer holds are skipped, not waited for (throughput;
            # the UPDATE's `state = pending` is what makes a double claim impossible). SQLite
            # would drop this clause silently; there BEGIN IMMEDIATE serializes claimers.
            q = q.with_for_update(skip_locked=True, of=docs_t)  # OF: never lock the accesses side
        if document_ids is None:
            return list(conn.scalars(q.limit(limit)))
        picked: list[str] = []
        for batch in batches(dict.fromkeys(document_ids)):  # bounded IN lists
            picked += conn.scalars(q.where(c.document_id.in_(batch)).limit(limit - len(picked)))
            if len(picked) >= limit:
                break
        return picked

    def release_expired(self) -> int:
        """Return running documents whose lease has expired to pending; how many."""
        c = docs_t.c
        with self._tx() as conn:
            return conn.execute(
                sa.update(docs_t)
                .where(c.state == State.RUNNING.value, c.lease_expires < self._now())
                .values(state=State.PENDING.value, lease_owner=None, lease_expires=None, updated_at=self._now())
            ).rowcount

    def renew_lease(self, document_id: str, token: int, lease_seconds: float) -> float:
        """Extend a live lease to db_now()+lease_seconds; returns the new expiry. StaleLease if lost."""
        c = docs_t.c
        with self._tx() as conn:
            expires = conn.scalar(
                sa.update(docs_t)
                .where(*self._live(document_id, token))
                .values(lease_expires=self._now() + lease_seconds, updated_at=self._now())
                .returning(c.lease_expires)
            )
        if expires is None:
            raise StaleLease(f"lease on document {document_id} with token {token} is no longer current")
        return float(expires)

    def renew_leases(self, tokens: Mapping[str, int], lease_seconds: float) -> set[str]:
        """renew_lease for many documents in one statement per 500; returns those whose lease was lost."""
        c = docs_t.c
        renewed: set[str] = set()
        with self._tx() as conn:
            for batch in batches(sorted(tokens.items())):
                renewed.update(
                    conn.scalars(
                        sa.update(docs_t)
                        .where(
                            sa.tuple_(c.document_id, c.fencing_token).in_(batch),
                            c.state == State.RUNNING.value,
                            c.lease_expires >= self._now(),
                        )
                        .values(lease_expires=self._now() + lease_seconds, updated_at=self._now())
                        .returning(c.document_id)
                    )
                )
        return set(tokens) - renewed

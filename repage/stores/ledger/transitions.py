"""State transitions (docs/design.md §4): a document along an edge of the state table, and the
bulk edges back to pending (retry, images still to move)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from repage.domain.states import RepairPath, State, check_transition
from repage.errors import IllegalTransition, StaleLease
from repage.stores.ledger.connection import batches
from repage.stores.ledger.fencing import Fenced
from repage.stores.ledger.schema import ADDITIVE, docs_t

_SETTABLE = ("total_chunks", "affected_chunks", "images_to_move", "path", "priority")


def edge_values(dst: State, reason: str | None, error: str | None, now: Any) -> dict[str, Any]:
    """The columns an edge into `dst` sets; `now` is the database clock (LedgerBase._now)."""
    values: dict[str, Any] = {"state": dst.value, "updated_at": now}
    if dst != State.PENDING:
        values["finished_at"] = now  # the end of an attempt, or of verify/rollback
    if dst == State.FAILED:
        values["attempts"] = docs_t.c.attempts + 1
    if reason is not None:
        values["reason"] = reason
    if error is not None:
        values["last_error"] = error
    return values


def field_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """transition()'s `fields` as column values: counters are added to, the rest set."""
    unknown = set(fields) - set(ADDITIVE) - set(_SETTABLE)
    if unknown:
        raise TypeError(f"transition() got unknown fields {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name in ADDITIVE:
            values[name] = docs_t.c[name] + value
        else:
            values[name] = RepairPath(value).value if name == "path" else value
    return values


class Transitions(Fenced):
    """transition, retry_failed and requeue_image_moves."""

    def transition(
        self,
        document_id: str,
        dst: State,
        *,
        token: int | None = None,
        reason: str | None = None,
        error: str | None = None,
        **fields: Any,
    ) -> None:
        """Move a document along an edge of the state table.

        A running document needs the current `token` and a live lease (else StaleLease); the
        check is part of the UPDATE, so a worker whose lease expired cannot win a race.
        A token given for a document that is not running is stale too.
        `fields`: dollars, object_requests_a, object_requests_b, bytes_read are ADDED to the
        document's totals; total_chunks, affected_chunks, path, priority are SET.
        Entering running is claim_batch's job; documents enter the ledger through upsert_scan.
        """
        dst = State(dst)
        values = field_values(fields)
        c = docs_t.c
        with self._tx() as conn:
            row = conn.execute(
                sa.select(c.state, c.fencing_token).where(c.document_id == document_id).with_for_update()
            ).first()
            if row is None:
                raise IllegalTransition(f"document {document_id} is not in the ledger: scan it first")
            src = State(row.state)
            if token is not None and (src != State.RUNNING or token != row.fencing_token):
                raise StaleLease(
                    f"document {document_id}: token {token} is stale (state {src}, current token {row.fencing_token})"
                )
            check_transition(src, dst)
            if dst == State.RUNNING:
                raise IllegalTransition(f"document {document_id}: pending -> running is claim_batch's job")
            where: tuple[Any, ...] = (c.document_id == document_id, c.state == src.value)
            if src == State.RUNNING:
                if token is None:
                    raise StaleLease(f"document {document_id} is running: its fencing token is required")
                where = self._live(document_id, token)
                values.update(lease_owner=None, lease_expires=None)
            values.update(edge_values(dst, reason, error, self._now()))
            if conn.execute(sa.update(docs_t).where(*where).values(**values)).rowcount != 1:
                raise StaleLease(f"lease on document {document_id} expired before {src} -> {dst}")

    def transition_many(
        self, dst: State, items: Mapping[str, tuple[int, Mapping[str, Any]]], *, error: str | None = None
    ) -> dict[str, str]:
        """transition() of many running documents along the same edge, in one transaction:
        {document_id: (fencing token, {reason?, counters and fields as transition() takes})}.

        Every document's token and lease are checked (one query per 500, as the other batch
        calls do), then the live ones are moved by one UPDATE per set of field names, each row
        under the live-lease condition. Returns {document_id: why} for the refused (stale token,
        expired lease, not running): those are left as they were, the others move.
        """
        dst = State(dst)
        check_transition(State.RUNNING, dst)
        if dst == State.RUNNING:
            raise IllegalTransition("pending -> running is claim_batch's job")
        c = docs_t.c
        with self._tx() as conn:
            refused, _ = self._leases(conn, {d: token for d, (token, _) in items.items()})
            # a running document needs its token; None would be a maintenance write on one no worker holds
            refused.update({d: f"document {d}: pass its fencing token" for d, (t, _) in items.items() if t is None})
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for doc, (token, fields) in items.items():
                if doc not in refused:
                    field_values({n: v for n, v in fields.items() if n != "reason"})  # unknown names raise
                    row = {f"b_{n}": RepairPath(v).value if n == "path" else v for n, v in fields.items()}
                    groups.setdefault(tuple(sorted(fields)), []).append({**row, "b_document_id": doc, "b_token": token})
            now = self._now()
            for names, params in groups.items():
                values: dict[str, Any] = {
                    n: c[n] + sa.bindparam(f"b_{n}") if n in ADDITIVE else sa.bindparam(f"b_{n}")
                    for n in names
                    if n != "reason"
                }
                reason: Any = sa.bindparam("b_reason") if "reason" in names else None  # edge_values takes SQL too
                values.update(edge_values(dst, reason, error, now), lease_owner=None, lease_expires=None)
                stmt = (
                    sa.update(docs_t)
                    .where(
                        c.document_id == sa.bindparam("b_document_id"),
                        c.state == State.RUNNING.value,
                        c.fencing_token == sa.bindparam("b_token"),
                        c.lease_expires >= now,
                    )
                    .values(**values)
                )
                for batch in batches(params):
                    moved = conn.execute(stmt, batch).rowcount
                    if moved != len(batch):  # a lease ran out since the check: name those, leave them
                        refused.update(self._not_moved(conn, [p["b_document_id"] for p in batch], dst))
        return refused

    def _not_moved(self, conn: sa.Connection, documents: Sequence[str], dst: State) -> dict[str, str]:
        """Of `documents` just moved out of running, those still running: their lease expired."""
        c = docs_t.c
        still = conn.execute(
            sa.select(c.document_id).where(c.document_id.in_(documents), c.state == State.RUNNING.value)
        ).scalars()
        return {d: f"lease on document {d} expired before running -> {dst}" for d in still}

    def requeue_image_moves(self, dataset_id: str | None = None, document_ids: Sequence[str] | None = None) -> int:
        """Migrated/verified documents whose images a pages-only run left at legacy keys go
        back to pending, so a run that moves images picks them up. How many."""
        c = docs_t.c
        where = [c.state.in_([State.MIGRATED.value, State.VERIFIED.value]), c.images_to_move > 0]
        return self._back_to_pending(where, dataset_id, document_ids, reason="images still to move")

    def retry_failed(self, dataset_id: str | None = None, document_ids: Sequence[str] | None = None) -> int:
        """Failed documents (of the dataset / ids) go back to pending: the retry edge. How many.
        Their last_error and attempts stay, so `status` still tells what went wrong before."""
        check_transition(State.FAILED, State.PENDING)
        return self._back_to_pending([docs_t.c.state == State.FAILED.value], dataset_id, document_ids)

    def _back_to_pending(
        self, where: list[Any], dataset_id: str | None, document_ids: Sequence[str] | None, **values: Any
    ) -> int:
        """Documents matching `where` (of the dataset / ids) back to pending, 500 ids per statement."""
        c = docs_t.c
        if dataset_id is not None:
            where = [*where, c.dataset_id == dataset_id]
        moved = 0
        for batch in batches(document_ids) if document_ids is not None else [None]:
            clause = where + ([c.document_id.in_(batch)] if batch is not None else [])
            with self._tx() as conn:
                moved += conn.execute(
                    sa.update(docs_t)
                    .where(*clause)
                    .values(state=State.PENDING.value, finished_at=None, updated_at=self._now(), **values)
                ).rowcount
        return moved

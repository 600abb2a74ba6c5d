"""Fencing (docs/design.md §4): whether a write under a fencing token may go ahead.

A claim bumps the document's `fencing_token`; every write of a worker carries it. A write
with a token that is not current, or whose lease has expired, raises StaleLease. A write
without a token (`token=None`) is a maintenance write (verify, rollback, gc) and is refused
while a worker holds the document. The checks read the lease against the database clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from repage.domain.states import State
from repage.errors import StaleLease
from repage.stores.ledger.connection import LedgerBase, batches
from repage.stores.ledger.schema import docs_t


def lease_problem(document_id: str, row: Any, token: int | None) -> str | None:
    """Why a write under `token` is refused on this document (None: it may go ahead)."""
    if row is None:
        return f"document {document_id} is not in the ledger"
    running = row.state == State.RUNNING.value
    if token is None and running:
        return f"document {document_id} is leased to a worker: pass its fencing token"
    if token is not None and not (running and row.fencing_token == token and row.live):
        return f"document {document_id}: token {token} is stale or its lease expired"
    return None


def raise_refused(refused: Mapping[str, str]) -> None:
    """The one-document forms of the batch calls raise what the batch form reports."""
    for why in refused.values():
        raise StaleLease(why)


class Fenced(LedgerBase):
    """The lease checks the writing parts of the Ledger share."""

    def _live(self, document_id: str, token: int) -> tuple[Any, ...]:
        """WHERE clauses that hold only while `token` owns a live lease on the document."""
        c = docs_t.c
        return (
            c.document_id == document_id,
            c.state == State.RUNNING.value,
            c.fencing_token == token,
            c.lease_expires >= self._now(),
        )

    def _require_lease(self, conn: sa.Connection, document_id: str, token: int | None) -> int:
        """Check (and on PostgreSQL lock) the document's lease; returns its fencing token."""
        refused, current = self._leases(conn, {document_id: token})
        raise_refused(refused)
        return current[document_id]

    def _leases(self, conn: sa.Connection, tokens: Mapping[str, int | None]) -> tuple[dict[str, str], dict[str, int]]:
        """Check (and on PostgreSQL lock, in id order) many documents' leases in one query per 500.

        Returns ({document_id: why it is refused}, {document_id: its current fencing token}).
        A token of None is maintenance: allowed only on a document no worker holds.
        """
        c = docs_t.c
        rows: dict[str, Any] = {}
        for batch in batches(sorted(tokens)):
            rows.update(
                (r.document_id, r)
                for r in conn.execute(
                    sa.select(c.document_id, c.state, c.fencing_token, (c.lease_expires >= self._now()).label("live"))
                    .where(c.document_id.in_(batch))
                    .order_by(c.document_id)
                    .with_for_update()
                )
            )
        refused = {d: why for d, t in tokens.items() if (why := lease_problem(d, rows.get(d), t))}
        return refused, {d: r.fencing_token for d, r in rows.items() if d not in refused}

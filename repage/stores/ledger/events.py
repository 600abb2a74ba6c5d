"""The event log: what happened when (progress, spend, lazy requests, pauses), by the database clock."""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from repage.domain.records import Event
from repage.stores.ledger.connection import LedgerBase, from_row
from repage.stores.ledger.schema import events_t


class Events(LedgerBase):
    """add_event, events and prune_events."""

    def add_event(self, kind: str, document_id: str | None = None, count: int = 1, detail: str | None = None) -> None:
        with self._tx() as conn:
            conn.execute(
                sa.insert(events_t).values(
                    at=self._now(), kind=kind, document_id=document_id, count=count, detail=detail
                )
            )

    def events(
        self, since: float | None = None, kinds: Iterable[str] | None = None, limit: int | None = None
    ) -> list[Event]:
        """Events in time order; with `limit`, the most recent `limit` of them."""
        t = events_t
        q = sa.select(t).order_by(t.c.id.desc())
        if since is not None:
            q = q.where(t.c.at >= since)
        if kinds is not None:
            q = q.where(t.c.kind.in_(list(kinds)))
        if limit is not None:
            q = q.limit(limit)
        with self._tx(write=False) as conn:
            rows = conn.execute(q).all()
        return [from_row(Event, r) for r in reversed(rows)]

    def prune_events(self, before: float, kinds: Iterable[str] | None = None) -> int:
        """Delete events older than `before` (DB-clock epoch seconds), of `kinds` if given; how many."""
        where = [events_t.c.at < before] + ([events_t.c.kind.in_(list(kinds))] if kinds is not None else [])
        with self._tx() as conn:
            return conn.execute(sa.delete(events_t).where(*where)).rowcount

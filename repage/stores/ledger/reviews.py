"""Reviews (docs/design.md §2): page matches below the confidence threshold, with the evidence a
person decides on, and the decision that sends the document back to pending."""

from __future__ import annotations

import sqlalchemy as sa

from repage.domain.records import ReviewRecord
from repage.domain.states import RepairPath, State, check_transition
from repage.errors import IllegalTransition
from repage.stores.ledger.connection import from_row
from repage.stores.ledger.fencing import Fenced
from repage.stores.ledger.schema import docs_t, reviews_t
from repage.stores.ledger.transitions import edge_values


class Reviews(Fenced):
    """save_review, reviews, get_review and resolve_review."""

    def save_review(self, document_id: str, token: int | None, evidence: str) -> None:
        """Record a document's review (status pending), replacing an older one, under its lease."""
        t = reviews_t
        with self._tx() as conn:
            self._require_lease(conn, document_id, token)
            conn.execute(sa.delete(t).where(t.c.document_id == document_id))
            now = self._now()
            conn.execute(
                sa.insert(t).values(
                    document_id=document_id, status="pending", evidence=evidence, created_at=now, updated_at=now
                )
            )

    def reviews(self, status: str | None = "pending") -> list[ReviewRecord]:
        """Reviews (of one status, or all), oldest first."""
        t = reviews_t
        q = sa.select(t).order_by(t.c.created_at, t.c.document_id)
        if status is not None:
            q = q.where(t.c.status == status)
        with self._tx(write=False) as conn:
            return [from_row(ReviewRecord, r) for r in conn.execute(q).all()]

    def get_review(self, document_id: str) -> ReviewRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(reviews_t).where(reviews_t.c.document_id == document_id)).first()
        return None if row is None else from_row(ReviewRecord, row)

    def resolve_review(self, document_id: str, decision: str, *, reason: str, path: RepairPath | None = None) -> None:
        """accepted | rejected: the review's status and the document's review -> pending edge, atomically.

        `path` re-routes the document (a rejected match leaves it to reprocess).
        """
        if decision not in ("accepted", "rejected"):
            raise ValueError(f"review decision {decision!r}: use accepted or rejected")
        c, r = docs_t.c, reviews_t.c
        with self._tx() as conn:
            state = conn.scalar(sa.select(c.state).where(c.document_id == document_id).with_for_update())
            status = conn.scalar(sa.select(r.status).where(r.document_id == document_id))
            if state != State.REVIEW.value or status != "pending":
                raise IllegalTransition(
                    f"document {document_id} has no pending review "
                    f"(state {state or 'unknown'}, review {status or 'none'})"
                )
            check_transition(State.REVIEW, State.PENDING)
            conn.execute(
                sa.update(reviews_t).where(r.document_id == document_id).values(status=decision, updated_at=self._now())
            )
            values = edge_values(State.PENDING, reason, None, self._now())
            if path is not None:
                values["path"] = RepairPath(path).value
            conn.execute(
                sa.update(docs_t).where(c.document_id == document_id, c.state == State.REVIEW.value).values(**values)
            )

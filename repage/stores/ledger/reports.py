"""Reading the documents back: one, many, counts per state and path, spend and I/O totals."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from repage.domain.records import DocumentRecord
from repage.domain.states import RepairPath, State
from repage.stores.ledger.connection import LedgerBase, batches
from repage.stores.ledger.schema import ADDITIVE, docs_t

_PAGE = 1000  # documents() rows per query


def document_record(row: Any) -> DocumentRecord:
    data = dict(row._mapping)
    data.pop("chunk_keys", None)  # the run's reading aid (Ledger.chunk_keys), not part of the record
    data["state"], data["path"] = State(data["state"]), RepairPath(data["path"])
    return DocumentRecord(**data)


class Reports(LedgerBase):
    """counts, documents, get, last_errors, totals and usage_by_path."""

    def counts(self) -> dict[tuple[str, str], int]:
        c = docs_t.c
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(c.state, c.path, sa.func.count()).group_by(c.state, c.path)).all()
        return {(s, p): n for s, p, n in rows}

    def documents(
        self, states: set[State] | None = None, limit: int | None = None, dataset_id: str | None = None
    ) -> Iterator[DocumentRecord]:
        """Documents in id order, fetched in pages so no transaction stays open while iterating."""
        c, after, left = docs_t.c, None, limit
        while left is None or left > 0:
            size = _PAGE if left is None else min(_PAGE, left)
            q = sa.select(docs_t).order_by(c.document_id).limit(size)
            if states is not None:
                q = q.where(c.state.in_([State(s).value for s in states]))
            if dataset_id is not None:
                q = q.where(c.dataset_id == dataset_id)
            if after is not None:
                q = q.where(c.document_id > after)
            with self._tx(write=False) as conn:
                rows = conn.execute(q).all()
            yield from (document_record(r) for r in rows)
            if len(rows) < size:
                return
            after, left = rows[-1].document_id, None if left is None else left - len(rows)

    def states_of(self, document_ids: Sequence[str]) -> dict[str, tuple[State, RepairPath, float]]:
        """State, path and last change (DB clock) of those of `document_ids` the ledger knows, in
        one query per 500."""
        c, found = docs_t.c, dict[str, tuple[State, RepairPath, float]]()
        with self._tx(write=False) as conn:
            for batch in batches(dict.fromkeys(document_ids)):
                q = sa.select(c.document_id, c.state, c.path, c.updated_at).where(c.document_id.in_(batch))
                found.update(
                    {r.document_id: (State(r.state), RepairPath(r.path), r.updated_at) for r in conn.execute(q)}
                )
        return found

    def sample_documents(self, states: set[State], size: int) -> list[DocumentRecord]:
        """Up to `size` documents in these states, picked at random by the database."""
        c = docs_t.c
        q = sa.select(docs_t).where(c.state.in_([State(s).value for s in states])).order_by(sa.func.random())
        with self._tx(write=False) as conn:
            return [document_record(r) for r in conn.execute(q.limit(max(size, 0))).all()]

    def get(self, document_id: str) -> DocumentRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(docs_t).where(docs_t.c.document_id == document_id)).first()
        return None if row is None else document_record(row)

    def last_errors(self, n: int) -> list[DocumentRecord]:
        """The n most recently updated documents that carry an error message."""
        c = docs_t.c
        with self._tx(write=False) as conn:
            rows = conn.execute(
                sa.select(docs_t).where(c.last_error.is_not(None)).order_by(c.updated_at.desc(), c.document_id).limit(n)
            ).all()
        return [document_record(r) for r in rows]

    def failed_errors(self) -> list[tuple[str, str | None]]:
        """(path, last error) of every failed document: /metrics counts them by kind (docs/design.md §12)."""
        c = docs_t.c
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(c.path, c.last_error).where(c.state == State.FAILED.value)).all()
        return [(r.path, r.last_error) for r in rows]

    def load_of(self, path: RepairPath, states: set[State]) -> tuple[int, int]:
        """(documents, affected chunks) of `path` in `states`: what is left to do on a path, in one query."""
        c = docs_t.c
        q = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(c.affected_chunks), 0)).where(
            c.path == RepairPath(path).value, c.state.in_(sorted(State(s).value for s in states))
        )
        with self._tx(write=False) as conn:
            documents, chunks = conn.execute(q).one()
        return int(documents), int(chunks)

    def totals(self) -> dict[str, float | int]:
        """Spend and I/O summed over all documents, plus the document count."""
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(sa.func.count().label("documents"), *_sums())).one()
        out: dict[str, float | int] = {k: int(v) for k, v in row._mapping.items()}
        out["dollars"] = float(row.dollars)
        return out

    def usage_by_path(self) -> dict[str, dict[str, float | int]]:
        """Documents, requests, bytes read and dollars summed per path (what each path cost so far)."""
        c = docs_t.c
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(c.path, sa.func.count().label("documents"), *_sums()).group_by(c.path)).all()
        return {
            r.path: {
                "documents": int(r.documents),
                **{n: int(r._mapping[n]) for n in ADDITIVE if n != "dollars"},
                "dollars": float(r.dollars),
            }
            for r in rows
        }


def _sums() -> list[Any]:
    """The spend and I/O counters summed (0 over no rows), labelled by their names."""
    return [sa.func.coalesce(sa.func.sum(docs_t.c[name]), 0).label(name) for name in ADDITIVE]

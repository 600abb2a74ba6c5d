"""The journals (docs/design.md §4, §5): intended chunk changes and object moves, recorded
before the stores are touched and advanced as each step (copied, verified, applied) lands.

A retried step journals the same change again: readers take the newest row per chunk
identity, or per (old_key, new_key) move.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields as dc_fields
from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from repage.domain.records import ChunkJournalEntry, JournalIntent, ObjectJournalEntry, ObjectState
from repage.errors import StoreError
from repage.stores.ledger.connection import batches, from_row
from repage.stores.ledger.fencing import Fenced, raise_refused
from repage.stores.ledger.schema import chunks_t, objects_t

_STAMPED = ("id", "document_id", "fencing_token", "created_at")  # journal columns the ledger fills


class Journals(Fenced):
    """Writing, advancing and reading the chunk and object journals."""

    # ----------------------------------------------------------------- intents

    def add_journals(self, intents: Sequence[JournalIntent]) -> dict[str, str]:
        """Record many documents' intents (docs/design.md §5 step 1) in one transaction, each entry
        stamped with its document's fencing token. Returns {document_id: why} for the documents
        whose lease is gone: nothing is written for those."""
        with self._tx() as conn:
            refused, current = self._leases(conn, {i.document_id: i.token for i in intents})
            live = [i for i in intents if i.document_id not in refused]
            # objects first: a chunk journal is only ever resumed with its moves recorded
            for table, entries in (
                (objects_t, [(i.document_id, e) for i in live for e in i.moves]),
                (chunks_t, [(i.document_id, e) for i in live for e in i.chunks]),
            ):
                for batch in batches(entries):
                    conn.execute(
                        sa.insert(table).values(created_at=self._now()),
                        [
                            {
                                **{f.name: getattr(e, f.name) for f in dc_fields(e) if f.name not in _STAMPED},
                                "document_id": doc,
                                "fencing_token": current[doc],
                            }
                            for doc, e in batch
                        ],
                    )
        return refused

    def add_chunk_journal(self, document_id: str, token: int | None, entries: Sequence[ChunkJournalEntry]) -> None:
        """Record intended chunk changes (docs/design.md §5 step 1); later entries supersede earlier ones."""
        raise_refused(self.add_journals([JournalIntent(document_id, token, chunks=entries)]))

    def add_object_journal(self, document_id: str, token: int | None, entries: Sequence[ObjectJournalEntry]) -> None:
        """Record intended object moves (docs/design.md §5 step 1), normally in state `intended`."""
        raise_refused(self.add_journals([JournalIntent(document_id, token, moves=entries)]))

    # ----------------------------------------------------------------- progress

    def mark_chunks_applied(
        self,
        document_id: str,
        token: int | None,
        identities: Iterable[str],
        *,
        new_pks: Mapping[str, str] | None = None,
    ) -> None:
        """Mark the latest entry of each identity applied; record keys a server assigned
        (docs/design.md §5 step 4)."""
        pks = {i: (new_pks or {}).get(i) for i in identities}
        raise_refused(self.mark_chunks_applied_many({document_id: (token, pks)}))

    def mark_chunks_applied_many(
        self, items: Mapping[str, tuple[int | None, Mapping[str, str | None]]]
    ) -> dict[str, str]:
        """mark_chunks_applied for many documents: {document_id: (token, {identity: new pk or None})}.
        One transaction; returns {document_id: why} for those whose lease is gone (left as they were)."""
        t = chunks_t
        stmt = (
            sa.update(t)
            .where(t.c.id == sa.bindparam("b_id"))
            .values(applied=True, new_pk=sa.func.coalesce(sa.bindparam("b_pk", type_=sa.Text), t.c.new_pk))
        )
        with self._tx() as conn:
            refused, _ = self._leases(conn, {d: token for d, (token, _) in items.items()})
            live = {d: pks for d, (_, pks) in items.items() if d not in refused}
            newest = _newest(conn, t, live, t.c.identity)
            params = [{"b_id": i, "b_pk": live[d][ident]} for (d, ident), i in newest.items() if ident in live[d]]
            for batch in batches(params):
                conn.execute(stmt, batch)
        return refused

    def set_object_state(
        self,
        document_id: str,
        token: int | None,
        old_key: str,
        new_key: str,
        state: ObjectState | str,
        *,
        size: int | None = None,
        content_hash: str | None = None,
    ) -> None:
        """Advance the latest journal entry of one move; size/hash are set when given."""
        t = objects_t
        values: dict[str, Any] = {"state": ObjectState(state).value}
        values.update({k: v for k, v in (("size", size), ("content_hash", content_hash)) if v is not None})
        newest = (
            sa.select(sa.func.max(t.c.id))
            .where(t.c.document_id == document_id, t.c.old_key == old_key, t.c.new_key == new_key)
            .scalar_subquery()
        )
        with self._tx() as conn:
            self._require_lease(conn, document_id, token)
            if conn.execute(sa.update(t).where(t.c.id == newest).values(**values)).rowcount != 1:
                raise StoreError(f"document {document_id}: no object journal entry {old_key} -> {new_key}")

    def set_objects_state(
        self, items: Mapping[str, tuple[int | None, Sequence[tuple[str, str]]]], state: ObjectState | str
    ) -> dict[str, str]:
        """Advance the latest journal entry of each (old_key, new_key) move of many documents:
        {document_id: (token, moves)}, one transaction. Returns {document_id: why} for those
        refused (lease gone, or a move not in the journal); nothing is changed for those."""
        t = objects_t
        stmt = sa.update(t).where(t.c.id == sa.bindparam("b_id")).values(state=ObjectState(state).value)
        with self._tx() as conn:
            refused, _ = self._leases(conn, {d: token for d, (token, _) in items.items()})
            newest = _newest(conn, t, [d for d in items if d not in refused], t.c.old_key, t.c.new_key)
            params = []
            for doc, (_, moves) in items.items():
                if doc in refused:
                    continue
                if missing := sorted((o, n) for o, n in moves if (doc, o, n) not in newest):
                    refused[doc] = f"document {doc}: no object journal entry {missing[0][0]} -> {missing[0][1]}"
                    continue
                params += [{"b_id": newest[(doc, o, n)]} for o, n in moves]
            for batch in batches(params):
                conn.execute(stmt, batch)
        return refused

    def reopen_journal(self, document_id: str, redo: Sequence[tuple[str, str]] = ()) -> None:
        """Mark the document's latest chunk entries unapplied and the `redo` moves intended, so
        the next claim finishes it from its journal (docs/design.md §5.8: drift repair)."""
        t = chunks_t
        with self._tx() as conn:
            self._require_lease(conn, document_id, None)
            ids = list(_newest(conn, t, [document_id], t.c.identity).values())
            for batch in batches(ids):
                conn.execute(sa.update(t).where(t.c.id.in_(batch)).values(applied=False))
        if redo:
            refused = self.set_objects_state({document_id: (None, redo)}, ObjectState.INTENDED)
            raise_refused(refused)

    # ----------------------------------------------------------------- reading

    def chunk_journal(self, document_id: str) -> list[ChunkJournalEntry]:
        """The latest entry per chunk identity, in identity order."""
        return self.chunk_journals([document_id])[document_id]

    def chunk_journals(self, document_ids: Sequence[str]) -> dict[str, list[ChunkJournalEntry]]:
        """chunk_journal of many documents, in one query per 500 ({} entries for those without)."""
        rows = self._latest_many(chunks_t, document_ids, chunks_t.c.identity)
        return {d: [from_row(ChunkJournalEntry, r) for r in rows.get(d, [])] for d in document_ids}

    def object_journal(self, document_id: str) -> list[ObjectJournalEntry]:
        """The latest entry per (old_key, new_key), in key order."""
        return self.object_journals([document_id])[document_id]

    def object_journals(self, document_ids: Sequence[str]) -> dict[str, list[ObjectJournalEntry]]:
        """object_journal of many documents, in one query per 500 ([] for those without)."""
        rows = self._latest_many(objects_t, document_ids, objects_t.c.old_key, objects_t.c.new_key)
        return {
            d: [replace(from_row(ObjectJournalEntry, r), state=ObjectState(r.state)) for r in rows.get(d, [])]
            for d in document_ids
        }

    def _latest_many(
        self, table: sa.Table, document_ids: Sequence[str], *group: sa.Column[Any]
    ) -> dict[str, list[Any]]:
        """The newest journal row per `group` of each document, in `group` order."""
        t = table
        found: defaultdict[str, list[Any]] = defaultdict(list)
        with self._tx(write=False) as conn:
            for batch in batches(dict.fromkeys(document_ids)):
                newest = (
                    sa.select(sa.func.max(t.c.id))
                    .where(t.c.document_id.in_(batch))
                    .group_by(t.c.document_id, *group)
                    .scalar_subquery()
                )
                rows = conn.execute(sa.select(t).where(t.c.id.in_(newest)).order_by(t.c.document_id, *group, t.c.id))
                for row in rows:
                    found[row.document_id].append(row)
        return found


def _newest(
    conn: sa.Connection, t: sa.Table, documents: Iterable[str], *group: sa.Column[Any]
) -> dict[tuple[Any, ...], int]:
    """{(document_id, *group values): id of the newest journal row} for these documents."""
    newest: dict[tuple[Any, ...], int] = {}
    for batch in batches(sorted(documents)):
        newest.update(
            ((d, *g), i)
            for d, *g, i in conn.execute(
                sa.select(t.c.document_id, *group, sa.func.max(t.c.id))
                .where(t.c.document_id.in_(batch))
                .group_by(t.c.document_id, *group)
            )
        )
    return newest

"""The stable identity of a chunk (docs/design.md §1, §5): how a row is found again. Pure.

A server renumbers the primary keys of an auto-id collection on every upsert, so a chunk is
never named by its primary key but by the fields its collection offers for that:
- a VARCHAR `chunk_id` (the primary key itself, or a field beside an auto-id `id`);
- else `document_id` + `chunk_index` (early collections).

`key(row)` is the identity as a tuple of those fields' values (hashable: stores are queried
and rows grouped by it); `as_text(key)` is the form the ledger's chunk journal stores. Journals
already written are matched by that text, so its form never changes.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from repage.errors import SchemaError

BY_CHUNK_ID = ("chunk_id",)
BY_DOCUMENT_AND_INDEX = ("document_id", "chunk_index")


@dataclass(frozen=True)
class ChunkIdentity:
    """The fields that name a chunk in one collection, in the order its keys list them."""

    fields: tuple[str, ...]

    @classmethod
    def of_collection(cls, collection: str, fields: Collection[str], varchar_fields: Collection[str]) -> ChunkIdentity:
        """The identity a collection's schema offers: `chunk_id` when it is a VARCHAR, else
        `document_id` + `chunk_index`; a schema with neither has no stable identity."""
        if "chunk_id" in varchar_fields:
            return cls(BY_CHUNK_ID)
        if "chunk_index" not in fields:
            raise SchemaError(
                f"collection {collection!r} has neither 'chunk_id' nor 'chunk_index': no stable chunk identity"
            )
        return cls(BY_DOCUMENT_AND_INDEX)

    @property
    def by_chunk_id(self) -> bool:
        return self.fields == BY_CHUNK_ID

    def key(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        """The row's identity; a field the row lacks reads None (as journals have recorded it)."""
        return tuple(row.get(f) for f in self.fields)

    def text(self, row: Mapping[str, Any]) -> str:
        """The row's identity as the chunk journal records it."""
        return self.as_text(self.key(row))

    @staticmethod
    def as_text(key: Sequence[Any]) -> str:
        """The chunk journal's form of a key: compact JSON, `["doc_3"]` or `["doc",3]`."""
        return json.dumps(list(key), separators=(",", ":"))

    @staticmethod
    def from_text(text: str) -> tuple[Any, ...]:
        """The key a chunk journal's text names (the inverse of `as_text`)."""
        return tuple(json.loads(text))

    def backup_text(self, row: Mapping[str, Any]) -> str:
        """The row's identity as a local reprocess backup keys its checksums: JSON with the
        default separators, `["doc", 3]`. Backups already in a bucket are read with it, so it stays."""
        return json.dumps(list(self.key(row)))


__all__ = ["BY_CHUNK_ID", "BY_DOCUMENT_AND_INDEX", "ChunkIdentity"]

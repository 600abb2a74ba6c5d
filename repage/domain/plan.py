"""Classify a document into a recovery path (docs/design.md §2.1), cheapest first. Pure.

Input: the document's affected chunks (light rows from Milvus), optionally the image
keys found by listing its image prefix, and whether its source object exists.
Output: a `DocumentPlan` with the path, the ledger state scan records, a reason a
person can read, and the page recovered for each chunk where the keys tell it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from repage.domain.keys import ParsedKey, parse_image_key
from repage.domain.states import RepairPath, State

AFFECTED_TYPES = frozenset({"ocr", "image"})


def is_affected(row: Mapping[str, Any]) -> bool:
    """The affected-chunk predicate of docs/design.md §1.3, in Python (mirrors the Milvus filter)."""
    if row.get("page", 0) != 0:
        return False
    return row.get("chunk_type") in AFFECTED_TYPES or float(row.get("ocr_confidence") or 0.0) > 0.0


@dataclass(frozen=True)
class ChunkPage:
    """Where one affected chunk's page comes from."""

    identity: tuple[Any, ...]
    page: int | None
    image_index: int | None
    current_key: str | None  # the chunk's image_r2_key as stored ('' -> None)
    found_key: str | None  # the key its image was found at (chunk key, or by listing)
    fmt: str  # format of found_key: canonical | legacy | docling | custom | unknown
    evidence: str  # 'key' | 'listing' | 'none'


@dataclass(frozen=True)
class DocumentPlan:
    document_id: str
    dataset_id: str
    filename: str
    path: RepairPath
    state: State
    reason: str
    chunks: tuple[ChunkPage, ...]

    @property
    def affected(self) -> int:
        return len(self.chunks)

    @property
    def resolved(self) -> int:
        return sum(1 for c in self.chunks if c.page is not None)


def _key_of(row: Mapping[str, Any]) -> str | None:
    key = row.get("image_r2_key")
    return key or None


def needs_listing(rows: Iterable[Mapping[str, Any]], patterns: Sequence[re.Pattern[str]] = ()) -> bool:
    """True when some affected chunk's own key carries no page: then listing may find one."""
    return any(not _parse(_key_of(r), patterns).has_page for r in rows)


def _parse(key: str | None, patterns: Sequence[re.Pattern[str]]) -> ParsedKey:
    return parse_image_key(key or "", patterns=patterns)


def index_listing(keys: Iterable[str], patterns: Sequence[re.Pattern[str]] = ()) -> dict[int, tuple[str, ParsedKey]]:
    """Listed image keys by image index; a page-bearing key wins over a page-less one."""
    by_index: dict[int, tuple[str, ParsedKey]] = {}
    for key in sorted(keys):  # sorted: the same listing always gives the same choice
        parsed = parse_image_key(key, patterns=patterns)
        if parsed.index is None:
            continue
        known = by_index.get(parsed.index)
        if known is None or (parsed.has_page and not known[1].has_page):
            by_index[parsed.index] = (key, parsed)
    return by_index


def resolve_chunk(
    row: Mapping[str, Any],
    identity: tuple[Any, ...],
    listing: Mapping[int, tuple[str, ParsedKey]] | None,
    listed_keys: frozenset[str],
    patterns: Sequence[re.Pattern[str]] = (),
) -> ChunkPage:
    """The page of one chunk from its own key, else from a listed key with its image_index."""
    key = _key_of(row)
    index = row.get("image_index")
    own = _parse(key, patterns)
    if own.has_page:
        return ChunkPage(identity, own.page, own.index if own.index is not None else index, key, key, own.fmt, "key")
    listed_key, listed = (listing or {}).get(index, (None, None)) if index is not None else (None, None)
    if listed is not None and listed.has_page:
        return ChunkPage(identity, listed.page, index, key, listed_key, listed.fmt, "listing")
    found = key if key in listed_keys else None
    return ChunkPage(identity, None, index, key, found, own.fmt if found else "unknown", "none")


def classify(
    document_id: str,
    rows: Sequence[Mapping[str, Any]],
    identities: Sequence[tuple[Any, ...]],
    *,
    dataset_id: str,
    filename: str,
    listed_keys: Iterable[str] | None = None,
    source_exists: bool | None = None,
    patterns: Sequence[re.Pattern[str]] = (),
) -> DocumentPlan:
    """Decide the path of one document. `rows` are its affected chunks only."""
    if not rows:
        return DocumentPlan(
            document_id, dataset_id, filename, RepairPath.NONE, State.SKIPPED, "no image/OCR chunk with page 0", ()
        )
    keys = frozenset(listed_keys or ())
    listing = index_listing(keys, patterns) if listed_keys is not None else None
    chunks = tuple(resolve_chunk(r, i, listing, keys, patterns) for r, i in zip(rows, identities, strict=True))
    path, state, reason = _choose_path(chunks, filename, source_exists)
    return DocumentPlan(document_id, dataset_id, filename, path, state, reason, chunks)


def _choose_path(
    chunks: Sequence[ChunkPage], filename: str, source_exists: bool | None
) -> tuple[RepairPath, State, str]:
    unresolved = sum(1 for c in chunks if c.page is None)
    if not unresolved:
        via = "listing" if any(c.evidence == "listing" for c in chunks) else "chunk keys"
        return RepairPath.KEYS, State.PENDING, f"all {len(chunks)} pages in image keys ({via})"
    if source_exists and filename.lower().endswith(".pdf"):
        return (
            RepairPath.PDF,
            State.PENDING,
            f"{unresolved} of {len(chunks)} chunks have no page in any key; source PDF exists",
        )
    if source_exists:
        return RepairPath.REPROCESS, State.PENDING, f"{unresolved} chunks have no page in any key; source is not a PDF"
    return (
        RepairPath.NONE,
        State.UNRECOVERABLE,
        (f"{unresolved} of {len(chunks)} chunks have no page in any key and the source object is missing"),
    )

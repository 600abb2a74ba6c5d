"""The records the stores hand back and take in: ledger rows, journal entries, chunk changes. Pure.

Plain frozen dataclasses, so the migration, the reports and the tests speak of documents,
claims and journal entries without importing an SDK adapter (docs/design.md §3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from repage.domain.states import RepairPath, State


class ObjectState(StrEnum):
    """Where one object move stands in the safety protocol (docs/design.md §5)."""

    INTENDED = "intended"  # journaled before the copy (docs/design.md §5 step 1)
    COPIED = "copied"  # CopyObject returned
    VERIFIED = "verified"  # HEAD matched size and content hash
    DELETED = "deleted"  # old object removed by gc


@dataclass(frozen=True)
class ScanRecord:
    """What a scan found out about one document: how it enters the ledger, or is refreshed."""

    document_id: str
    dataset_id: str
    filename: str
    path: RepairPath
    state: State  # pending, skipped or unrecoverable: the edges from (new)
    reason: str
    affected_chunks: int
    total_chunks: int | None = None
    images_to_move: int = 0
    # (primary key, identity text) of each affected chunk as scanned: a run reads these rows by
    # primary key and falls back to the document filter when they no longer match (docs/design.md §5.1)
    chunk_keys: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Claim:
    """A document a worker holds: its fencing token goes with every write it makes."""

    document_id: str
    dataset_id: str
    filename: str
    path: RepairPath
    fencing_token: int
    affected_chunks: int
    lease_expires: float = 0.0  # DB-clock epoch seconds; renew before it passes


@dataclass(frozen=True)
class ChunkJournalEntry:
    """One intended (or applied) chunk change (docs/design.md §4)."""

    identity: str  # stable chunk identity as a JSON string (chunk_id, or document_id+chunk_index)
    old_pk: str | None = None  # primary keys as text: INT64 and VARCHAR keys both fit
    new_pk: str | None = None
    old_page: int | None = None
    new_page: int | None = None
    old_key: str | None = None  # image_r2_key before / after
    new_key: str | None = None
    row_checksum: str | None = None  # checksum of the rest of the row
    applied: bool = False
    # set by the ledger when read back:
    id: int | None = None
    document_id: str | None = None
    fencing_token: int | None = None
    created_at: float | None = None


@dataclass(frozen=True)
class ObjectJournalEntry:
    """One object move, old key to new key, and how far it got."""

    old_key: str
    new_key: str
    size: int | None = None
    content_hash: str | None = None
    state: ObjectState = ObjectState.INTENDED
    # set by the ledger when read back:
    id: int | None = None
    document_id: str | None = None
    fencing_token: int | None = None
    created_at: float | None = None


@dataclass(frozen=True)
class JournalIntent:
    """One document's intents for add_journals: its object moves, then its chunk changes."""

    document_id: str
    token: int | None
    moves: Sequence[ObjectJournalEntry] = ()
    chunks: Sequence[ChunkJournalEntry] = ()


@dataclass(frozen=True)
class DocumentRecord:
    """A document's row in the ledger: state, path, lease, counts, timings and spend."""

    document_id: str
    dataset_id: str
    filename: str
    state: State
    path: RepairPath
    reason: str
    priority: float
    attempts: int
    affected_chunks: int
    total_chunks: int | None
    images_to_move: int
    lease_owner: str | None
    fencing_token: int
    lease_expires: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    dollars: float
    object_requests_a: int
    object_requests_b: int
    bytes_read: int
    last_error: str | None


@dataclass(frozen=True)
class Event:
    """One line of the ledger's event log (progress, spend, lazy requests)."""

    id: int
    at: float
    kind: str
    document_id: str | None
    count: int
    detail: str | None


@dataclass(frozen=True)
class ReviewRecord:
    """A page match below the confidence threshold, with the evidence a person decides on."""

    document_id: str
    status: str  # pending | accepted | rejected
    evidence: str  # JSON
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class AccessRecord:
    """A document's decayed accesses (repage/domain/access.py) and its lazy request, with its state."""

    document_id: str
    dataset_id: str | None
    score: float  # decayed count as of scored_at
    scored_at: float
    access_rank: float | None
    enqueued_at: float | None
    state: State | None  # None: no scan has recorded the document yet
    path: RepairPath | None


@dataclass(frozen=True)
class ChunkChange:
    """The page (and image key) one chunk should end up with, found by its stable identity."""

    identity: tuple[Any, ...]
    pk: Any
    page: int
    image_r2_key: str | None = None

"""What one batch works on and reports: a run's options, one document's work and the batch's result.

Plain data shared by the batch (`migrate`), the pdf path (`pdfpath`), the reprocess stage and the runner.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from repage.domain.records import ChunkJournalEntry, Claim, ObjectJournalEntry
from repage.domain.states import State


@dataclass(frozen=True)
class RunOptions:
    move_images: bool = True
    dry_run: bool = False
    failpoint: str | None = None  # name from FAILPOINTS: SIGKILL ourselves there (crash tests)
    engine: object | None = None  # repage.migration.compute LocalEngine/RayEngine for the CPU-heavy steps; None: local


@dataclass
class Usage:
    """Requests and bytes one document cost; dollars come from the price table."""

    class_a: int = 0
    class_b: int = 0
    bytes_read: int = 0


class ByteBudget:
    """At most `cap` bytes, taken by any thread: the originals one batch keeps in memory from
    planning to their checked PUT (docs/design.md §5.2). Never given back: a bound per batch."""

    def __init__(self, cap: int):
        self.cap, self.taken = cap, 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.taken + size > self.cap:
                return False
            self.taken += size
            return True


@dataclass
class DocumentWork:
    claim: Claim
    rows: list[dict]
    all_rows: bool = True  # rows holds every chunk of the document; False: only the scanned affected ones
    chunks: list[ChunkJournalEntry] = field(default_factory=list)
    moves: list[ObjectJournalEntry] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    outcome: State | None = None  # set when the document ends before the write
    reason: str | None = None  # why it ended there (review, unrecoverable), for the ledger
    # object bytes read or extracted by the plan: the pdf path's, and originals kept for a checked PUT
    blobs: dict[str, bytes] = field(default_factory=dict)
    budget: ByteBudget | None = None  # the batch's, for the originals kept in `blobs` (set by plan_works)
    verified: list[ObjectJournalEntry] = field(default_factory=list)  # copies checked, not yet journalled
    lease_lost: bool = False  # another worker owns it now: no renewal, nothing more written
    journal: list[ChunkJournalEntry] = field(default_factory=list)  # an earlier attempt's, read by prepare
    restored: list[ObjectJournalEntry] = field(default_factory=list)  # resumed: kept images to restore from the PDF
    unplanned: int = 0  # resumed: affected chunks its journal does not name (arrived since); planned on the next claim

    @property
    def document_id(self) -> str:
        return self.claim.document_id


@dataclass
class BatchResult:
    migrated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    other: dict[str, State] = field(default_factory=dict)
    chunks_written: int = 0
    objects_copied: int = 0
    usage: Usage = field(default_factory=Usage)
    changes: list[dict] = field(default_factory=list)  # dry run: the exact changes
    dollars: float = 0.0  # reprocess jobs' dollars (repage/reprocess/stage.py); requests are priced from usage

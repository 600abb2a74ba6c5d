"""The slow path's plug-in interface (docs/design.md §2.4): submit a document, poll its job, report its cost.

A `Reprocessor` runs the full ingestion pipeline for one document somewhere (the app's
admin API, or the local reference pipeline) and says when it is done. The run
(repage/reprocess/stage.py) owns everything else: claims, leases, the budget, the ledger.

    job = reprocessor.submit(document)          # starts the work
    status = reprocessor.poll(job)              # running | ready | failed
    dollars = reprocessor.cost(job)             # what the backend reports it spent, or None

`open_reprocessor(settings, stores)` picks the backend from configuration:
`reprocess_backend = "http" | "local"` (default: http when `reprocess_url` is set, else local).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from repage.domain.estimate import reprocess_dollars


class JobStatus(StrEnum):
    RUNNING = "running"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ReprocessDocument:
    """What a backend needs to know about one document."""

    document_id: str
    dataset_id: str
    filename: str
    fencing_token: int | None = None  # the run's lease on it: journal writes carry it
    affected_chunks: int = 0


@dataclass
class Job:
    """One document's reprocess job, as a backend tracks it."""

    document: ReprocessDocument
    backend: str
    status: JobStatus = JobStatus.RUNNING
    error: str | None = None
    dollars: float | None = None  # reported by the backend; None: not reported
    detail: dict[str, Any] = field(default_factory=dict)  # backend-specific (HTTP reply, chunk counts)

    @property
    def document_id(self) -> str:
        return self.document.document_id


@runtime_checkable
class Reprocessor(Protocol):
    name: str

    def submit(self, document: ReprocessDocument) -> Job: ...

    def poll(self, job: Job) -> JobStatus: ...

    def cost(self, job: Job) -> float | None: ...

    def close(self) -> None: ...


def estimated_dollars(prices, images: int) -> float:
    """The price table's figure for one document with `images` image/OCR chunks: the low end of the
    range (`estimated_dollar_range`). Prices: docs/design.md §6.2; the published ranges: §8.1.
    """
    return estimated_dollar_range(prices, images)[0]


def estimated_dollar_range(prices, images: int) -> tuple[float, float]:
    """(low, high) dollars of one document with `images` image/OCR chunks, by the price table."""
    return reprocess_dollars(1, images, prices)


def chunk_counts(rows: Sequence[Mapping]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        kind = str(row.get("chunk_type") or "text")
        counts[kind] = counts.get(kind, 0) + 1
    return counts

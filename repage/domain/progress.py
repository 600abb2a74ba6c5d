"""Progress figures from the ledger's event log (docs/design.md §12): rates and the ETA, and the kind
of a failure from its message. Pure: events in, numbers out; the clock is an argument."""

from __future__ import annotations

from collections.abc import Sequence

from repage.domain.records import Event

# What failed a document, read off its last error (a fixed set: a Prometheus label, docs/design.md §6.5).
# First match wins; the messages are the ones repage writes (docs/design.md §11).
FAILURE_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reprocess", ("reprocess", "tesseract")),
    ("unavailable", ("unavailable", "does not answer", "timed out", "timeout")),
    ("throttled", ("throttl", "slowdown", "429", "rate limit")),
    ("object_missing", ("missing", "not found", "no such", "404", "does not exist")),
    ("copy_mismatch", ("does not match",)),
    ("milvus_write", ("writing its chunks", "read back", "readback")),
    ("source", ("pdf", "source", "page past", "encrypted", "corrupt")),
    ("bad_input", ("malformed", "invalid", "bad input", "not a valid")),
)
OTHER = "other"


def failure_kind(message: str | None) -> str:
    """The kind of a failed document's last error: one of FAILURE_KINDS' names, or "other"."""
    text = (message or "").lower()
    for kind, needles in FAILURE_KINDS:
        if any(needle in text for needle in needles):
            return kind
    return OTHER


def per_second(events: Sequence[Event], now: float, window: float) -> tuple[float, float]:
    """(recent, overall) sum of the events' counts per second: over the last `window` seconds
    (from the first event inside it, if later), and since the first event."""
    if not events:
        return 0.0, 0.0
    recent = [e for e in events if e.at >= now - window]
    span = max(now - events[0].at, 1e-9)
    recent_span = max(min(window, now - recent[0].at), 1e-9) if recent else window
    return sum(e.count for e in recent) / recent_span, sum(e.count for e in events) / span


def eta_seconds(todo: int, recent_rate: float, overall_rate: float) -> float | None:
    """Documents to do over the recent rate (else the overall one): 0 when nothing is left,
    None while no document has been migrated yet."""
    if not todo:
        return 0.0
    rate = recent_rate or overall_rate
    return todo / rate if rate else None

"""What /metrics exports about the migration (docs/design.md §12): `repage status`'s figures plus
bucket requests per second, failures by kind, the lazy queue, the pause and its reason, and the time
of the last batch. Reads the ledger only; `now` dates the rates and the ETA."""

from __future__ import annotations

from collections import Counter

from repage.domain.progress import failure_kind, per_second
from repage.migration.status import RECENT_SECONDS, migration_status, pause_reason

MIGRATED = "migrated"  # ledger events a run writes per batch (repage/migration/runner.py)
OBJECT_REQUESTS = "object-requests"
REASON_CHARS = 200  # a pause reason is a label value: kept short


def monitor_figures(ledger, prices, now: float | None = None) -> dict:
    now = ledger.db_now() if now is None else now
    figures = migration_status(ledger, prices, now=now)
    recent, overall = per_second(ledger.events(kinds=[OBJECT_REQUESTS]), now, RECENT_SECONDS)
    figures["throughput"] |= {"recent_requests_per_s": recent, "overall_requests_per_s": overall}
    figures["failures"] = failures(ledger)
    figures["lazy_queue"] = ledger.enqueued_count()
    figures["paused"], figures["pause_reason"] = pause_state(ledger)
    figures["last_batch_at"] = last_batch_at(ledger)
    return figures


def failures(ledger) -> list[dict]:
    """Failed documents by path and kind (repage.domain.progress.failure_kind)."""
    counts = Counter((path, failure_kind(error)) for path, error in ledger.failed_errors())
    return [{"path": p, "kind": k, "documents": n} for (p, k), n in sorted(counts.items())]


def pause_state(ledger) -> tuple[bool, str]:
    """Whether the migration is paused and why (docs/design.md §10.3), the reason cut to a label's length."""
    reason = pause_reason(ledger)
    return reason is not None, (reason or "")[:REASON_CHARS]


def last_batch_at(ledger) -> float | None:
    """When a run last finished a batch that migrated documents or made bucket requests."""
    latest = [e.at for kind in (MIGRATED, OBJECT_REQUESTS) for e in ledger.events(kinds=[kind], limit=1)]
    return max(latest, default=None)

"""The figures of `repage status` (and of the service's /migration/status). Reads the ledger only."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime

from repage.domain.access import Decayed, half_life_seconds
from repage.domain.estimate import request_dollars
from repage.domain.progress import eta_seconds
from repage.domain.states import DONE, State

RECENT_SECONDS = 300.0  # "recent" throughput: the last five minutes
TODO = {State.PENDING, State.RUNNING, State.FAILED, State.REVIEW, State.DEFERRED, State.DRIFTED}


def throughput(events, now: float, window: float) -> dict:
    """Documents and chunks per second over the window, and since the first batch."""
    if not events:
        return {"recent_documents_per_s": 0.0, "overall_documents_per_s": 0.0, "recent_chunks_per_s": 0.0}
    recent = [e for e in events if e.at >= now - window]
    span = max(now - events[0].at, 1e-9)
    recent_span = max(min(window, now - recent[0].at), 1e-9) if recent else window
    return {
        "recent_documents_per_s": sum(e.count for e in recent) / recent_span,
        "overall_documents_per_s": sum(e.count for e in events) / span,
        "recent_chunks_per_s": sum(_chunks(e) for e in recent) / recent_span,
    }


def _chunks(event) -> int:
    try:
        return int(event.detail or 0)
    except ValueError:
        return 0


def usage_by_path(ledger, prices) -> dict:
    """What each path has cost so far: bucket requests (A: list/put/copy, B: get/head), bytes read
    (the pdf path's source PDFs and images) and dollars."""
    out = {}
    for path, u in sorted(ledger.usage_by_path().items()):
        dollars = request_dollars(u["object_requests_a"], u["object_requests_b"], prices) + u["dollars"]
        out[path] = {
            "documents": u["documents"],
            "class_a": u["object_requests_a"],
            "class_b": u["object_requests_b"],
            "bytes_read": u["bytes_read"],
            "dollars": dollars,
        }
    return out


PAUSE, RESUME = "pause", "resume"  # ledger events: the latest of the two decides
DISCOVERED = "discovered"  # documents incremental discovery queued (repage/migration/discover.py)
SCAN_COMPLETE = "scan-complete"  # a scan recorded every document (repage/migration/scan.py)


def pause_reason(ledger) -> str | None:
    """Who paused the migration and why (the pause event's detail); None while it is not paused."""
    # One kind per query: each is an index search; both kinds in one IN list scan every event.
    pause, resume = (ledger.events(kinds=[kind], limit=1) for kind in (PAUSE, RESUME))
    if not pause or (resume and resume[-1].id > pause[-1].id):
        return None
    return pause[-1].detail or "paused"


def is_paused(ledger) -> bool:
    return pause_reason(ledger) is not None


def set_paused(ledger, paused: bool, who: str = "admin") -> None:
    """Pause or resume every worker and service sharing the ledger; `who` says who and why."""
    ledger.add_event(PAUSE if paused else RESUME, detail=who)


def found_since_last_scan(ledger) -> int:
    """Documents discovery queued after the last full scan: new arrivals and ones broken again."""
    scans = ledger.events(kinds=[SCAN_COMPLETE], limit=1)
    since = scans[-1].at if scans else None
    return sum(e.count for e in ledger.events(since=since, kinds=[DISCOVERED]))


def spent_dollars(ledger, prices) -> float:
    """What the whole migration has cost so far: bucket requests and reprocess jobs."""
    totals = ledger.totals()
    requests = request_dollars(int(totals.get("object_requests_a", 0)), int(totals.get("object_requests_b", 0)), prices)
    return requests + float(totals.get("dollars", 0.0))


def migration_status(ledger, prices, now: float | None = None) -> dict:
    """`repage status --json`; `now` (epoch seconds, default the ledger's clock) dates the rates and the ETA."""
    counts = ledger.counts()
    by_state: Counter[str] = Counter()
    by_path: Counter[str] = Counter()
    for (state, path), n in counts.items():
        by_state[state] += n
        by_path[path] += n
    now = ledger.db_now() if now is None else now
    rates = throughput(ledger.events(kinds=["migrated"]), now, RECENT_SECONDS)
    todo = sum(by_state[s.value] for s in TODO)
    done = sum(by_state[s.value] for s in DONE)
    spent = spent_dollars(ledger, prices)
    migrated = by_state[State.MIGRATED.value] + by_state[State.VERIFIED.value]
    return {
        "documents": sum(by_state.values()),
        "done": done,
        "todo": todo,
        "by_state": dict(by_state),
        "by_path": dict(by_path),
        "by_state_and_path": [{"state": s, "path": p, "documents": n} for (s, p), n in sorted(counts.items())],
        "throughput": rates,
        "eta_seconds": eta_seconds(todo, rates["recent_documents_per_s"], rates["overall_documents_per_s"]),
        "dollars_spent": spent,
        "dollars_projected": spent + (spent / migrated * todo if migrated else 0.0),
        "usage_by_path": usage_by_path(ledger, prices),
        "last_errors": [
            {"document_id": r.document_id, "state": str(r.state), "error": r.last_error} for r in ledger.last_errors(10)
        ],
        "paused_because": pause_reason(ledger),  # None: not paused
        "found_since_last_scan": found_since_last_scan(ledger),
    }


def top_documents(ledger, half_life_hours: float, limit: int = 20, now: float | None = None) -> dict:
    """`repage access top` of an open ledger (the dashboard's hot documents too)."""
    half_life = half_life_seconds(half_life_hours)
    now = time.time() if now is None else now
    return {
        "half_life_hours": half_life_hours,
        "documents": [
            {
                "document_id": r.document_id,
                "dataset_id": r.dataset_id,
                "accesses": round(Decayed(r.score, r.scored_at).value(now, half_life), 3),
                "last_access": datetime.fromtimestamp(r.scored_at, tz=UTC).isoformat(timespec="seconds"),
                "enqueued": r.enqueued_at is not None,
                "state": r.state.value if r.state else None,
                "path": r.path.value if r.path else None,
            }
            for r in ledger.top_accesses(limit)
        ],
    }

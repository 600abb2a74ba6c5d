"""`repage worker`: long-running; lazy requests first, then the background trickle.

Each cycle:
1. paused (an admin's `pause` event in the ledger)? do nothing;
2. the read path's Milvus latency (p95 that services publish as `read-latency` events)
   above `max_read_latency_s`? back off, doubling the wait up to `backoff_max_s`: users
   first, like a database health indicator;
3. lazy: scan the enqueued documents no scan has recorded yet, then migrate every
   enqueued document (neither quota nor quiet hours apply: someone is reading it);
4. trickle: outside quiet hours and within the daily quota, one batch of pending documents
   in priority order (manual priority, then decayed accesses), with `min_accesses`.
   One batch per cycle, so a lazy request never waits behind a long trickle.
The migration itself is the same Runner (and limits) as `repage run`. A stop (SIGTERM)
is honoured between batches: the current batch finishes and nothing is left running.

Everything a restart needs is in the ledger: enqueue requests, pause, the day's quota
(`worker-trickle` events, counted by the worker's clock day) and leases.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, tzinfo
from datetime import time as dtime
from typing import cast

from repage.domain.states import RepairPath
from repage.domain.watch import FailureWatch
from repage.errors import ConfigError, InvalidFilterValue, RepageError
from repage.migration.runner import RunLimits, Runner, RunSummary, Selection, with_migration_budget
from repage.migration.scan import scan_completed, scan_documents, scan_store
from repage.migration.status import (  # noqa: F401 - the pause signal, re-exported for the web
    PAUSE,
    RESUME,
    is_paused,
    pause_reason,
    set_paused,
)
from repage.migration.work import RunOptions

log = logging.getLogger("repage.migration.worker")

READ_LATENCY = "read-latency"  # published by services: {"p95": s, "n": samples, "source": id}
SPENT = "worker-spent"  # micro-dollars the worker's runs spent; detail = the worker's clock day
TRICKLE = "worker-trickle"  # documents the trickle processed; detail = the worker's clock day
PATHS = frozenset({RepairPath.KEYS, RepairPath.PDF})  # what the worker migrates; reprocess only when allowed
WITH_REPROCESS = PATHS | {RepairPath.REPROCESS}
_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


class WallClock:
    """Epoch seconds (quotas and quiet hours are about the calendar, not a monotonic clock)."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


@dataclass(frozen=True)
class QuietHours:
    """A daily window (may wrap midnight) in which the trickle does not run."""

    start: dtime
    end: dtime

    @classmethod
    def parse(cls, text: str) -> QuietHours:
        parts = text.split("-")
        matches = [_HHMM.fullmatch(p.strip()) for p in parts] if len(parts) == 2 else []
        if len(matches) != 2 or not all(matches):
            raise ConfigError(f"--quiet-hours {text!r}: use HH:MM-HH:MM, e.g. 08:00-20:00")
        start, end = (dtime(int(m[1]), int(m[2])) for m in cast("list[re.Match[str]]", matches))  # all(matches)
        if start == end:
            raise ConfigError(f"--quiet-hours {text!r}: start and end are equal")
        return cls(start, end)

    def contains(self, moment: datetime) -> bool:
        now = moment.time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end  # wraps midnight

    def seconds_until_start(self, moment: datetime) -> float:
        """From `moment` (outside the window) to the next start of the window."""
        start = moment.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        if start <= moment:
            start += timedelta(days=1)
        return (start - moment).total_seconds()

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True)
class WorkerConfig:
    daily_quota: int | None = None  # trickle documents per day (lazy requests do not count)
    quiet_hours: QuietHours | None = None
    min_accesses: float | None = None  # trickle: only documents with this many decayed accesses
    max_read_latency_s: float = 0.5  # back off above this read-path Milvus p95
    latency_max_age_s: float = 60.0  # older latency reports mean nobody is reading
    poll_seconds: float = 5.0  # wait when there is nothing to do
    backoff_max_s: float = 300.0
    tz: tzinfo | None = None  # for quiet hours and the quota day; None: the machine's zone
    audit_every_s: float | None = None  # verify a random sample this often (docs/design.md §5.8); None: never
    audit_sample: int = 100  # documents per audit
    max_failures: int | None = None  # pause after more failed documents than this (repage/domain/watch.py)
    max_error_rate: float | None = None  # pause above this failure ratio over the last `error_window` documents
    error_window: int = 100
    daily_budget_dollars: float | None = None  # bucket dollars per worker-clock day; the trickle waits for the next
    discover_every_s: float | None = 3600.0  # look for new and re-broken documents (docs/design.md §5.9)
    allow_reprocess: bool = False  # reprocess-path documents too, under the budgets (docs/design.md §9.5)


@dataclass
class CycleReport:
    cycle: int
    at: float
    paused: bool = False
    read_latency_p95: float | None = None
    backed_off: bool = False
    lazy: dict = field(default_factory=dict)
    trickle: dict = field(default_factory=dict)
    trickle_skipped: str | None = None
    quota_left: int | None = None
    audit: dict = field(default_factory=dict)  # the audit of this cycle, when one was due
    discovered: dict = field(default_factory=dict)  # what discovery queued, when it was due
    wait_seconds: float = 0.0

    @property
    def documents(self) -> int:
        return self.lazy.get("documents", 0) + self.trickle.get("documents", 0)

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- ledger signals


def publish_read_latency(ledger, p95: float, samples: int, source: str) -> None:
    ledger.add_event(READ_LATENCY, count=samples, detail=json.dumps({"p95": p95, "source": source}))


def read_latency_p95(ledger, max_age_s: float) -> float | None:
    """The worst p95 among the latest report of each service in the last `max_age_s`."""
    latest: dict[str, float] = {}
    for event in ledger.events(since=ledger.db_now() - max_age_s, kinds=[READ_LATENCY]):  # (kind, at) index
        try:
            data = json.loads(event.detail or "{}")
            latest[str(data.get("source"))] = float(data["p95"])  # events come in time order
        except (ValueError, KeyError, TypeError):
            continue
    return max(latest.values()) if latest else None


# --------------------------------------------------------------------------- the worker


class Worker:
    """Lazy requests first, then the trickle. `cycle()` is one pass; `run_forever()` loops."""

    def __init__(
        self,
        stores,
        *,
        config: WorkerConfig = WorkerConfig(),
        limits: RunLimits = RunLimits(),
        options: RunOptions = RunOptions(),
        clock=None,
        stop_event: threading.Event | None = None,
        on_cycle=None,
    ):
        self.stores, self.config, self.limits, self.options = stores, config, limits, options
        self.on_cycle = on_cycle  # called with each CycleReport (the CLI prints them)
        self.clock = clock or WallClock()
        self.stop_event = stop_event or threading.Event()
        self.cycles = 0
        self.last: CycleReport | None = None
        self.totals = {"lazy": 0, "trickle": 0, "migrated": 0, "failed": 0}
        self._backoffs = 0
        self._next_audit: float | None = None  # the first cycle audits (when audits are on)
        self._next_discovery: float | None = None
        self.watch = FailureWatch(config.max_failures, config.max_error_rate, config.error_window)
        self._was_paused = False
        self._budget_spent_on: str | None = None  # the worker-clock day its daily budget ran out

    # ---- one cycle

    def cycle(self) -> CycleReport:
        self.cycles += 1
        report = self.last = self._cycle(CycleReport(self.cycles, self.clock.now()))
        if self.on_cycle is not None:
            self.on_cycle(report)
        return report

    def _cycle(self, report: CycleReport) -> CycleReport:
        ledger = self.stores.ledger
        report.paused = is_paused(ledger)
        if self._was_paused and not report.paused:  # resumed: the stop rule counts afresh
            self.watch.reset()
        self._was_paused = report.paused
        if not report.paused:
            report.read_latency_p95 = read_latency_p95(ledger, self.config.latency_max_age_s)
            report.backed_off = self._too_slow(report.read_latency_p95)
        if report.paused or report.backed_off:
            self._backoffs = self._backoffs + 1 if report.backed_off else 0
            report.wait_seconds = min(
                self.config.poll_seconds * 2 ** max(self._backoffs - 1, 0), self.config.backoff_max_s
            )
            return report
        self._backoffs = 0
        report.discovered = self._discover()
        report.lazy = self._lazy()
        if not self.stop_event.is_set():
            report.trickle, report.trickle_skipped, report.quota_left = self._trickle()
        if not self.stop_event.is_set():
            report.audit = self._audit()
        report.wait_seconds = 0.0 if report.documents else self.config.poll_seconds
        return report

    @property
    def _slow(self) -> bool:
        return self.config.allow_reprocess

    @property
    def _paths(self) -> frozenset[RepairPath]:
        return WITH_REPROCESS if self._slow else PATHS

    def _discover(self) -> dict:
        """On the first cycle after a full scan, then every `discover_every_s`."""
        every, now = self.config.discover_every_s, self.clock.now()
        due = self._next_discovery is None or now >= self._next_discovery
        if every is None or not due or not scan_completed(self.stores.ledger):
            return {}
        self._next_discovery = now + every
        from repage.migration.discover import discover

        return discover(self.stores)

    def _audit(self) -> dict:
        """Verify a random sample when due: drift found goes back to work (docs/design.md §5.8)."""
        every, now = self.config.audit_every_s, self.clock.now()
        if every is None or (self._next_audit is not None and now < self._next_audit):
            return {}
        self._next_audit = now + every
        from repage.migration.verify import verify_documents

        checked = verify_documents(self.stores, sample=self.config.audit_sample)
        return {"checked": checked.checked, "drifted": sorted(checked.failed)}

    def _too_slow(self, p95: float | None) -> bool:
        return p95 is not None and p95 > self.config.max_read_latency_s

    def _lazy(self) -> dict:
        ledger = self.stores.ledger
        unscanned = ledger.enqueued(unscanned_only=True, limit=1000)
        found = self._scan(unscanned) if unscanned else []
        if missing := sorted(set(unscanned) - set(found)):  # no chunk in Milvus: nothing to do
            ledger.clear_enqueued(missing)
        summary = None
        if ledger.enqueued(limit=1):
            selection = Selection(paths=self._paths, order="priority", enqueued_only=True, allow_reprocess=self._slow)
            summary = self._run(selection, self.limits)
        # done or failed: request settled; a reprocess document stays queued until reprocessing is allowed
        ledger.clear_enqueued(keep_paths=set(WITH_REPROCESS))
        return {"scanned": len(found), **self._count(summary, "lazy")}

    def _scan(self, document_ids: list[str]) -> list[str]:
        """Scan enqueued documents; an id a Milvus filter cannot carry is dropped, not retried forever."""
        try:
            return scan_documents(self.stores, document_ids)
        except InvalidFilterValue:
            found = []
            for doc in document_ids:
                try:
                    found += scan_documents(self.stores, [doc])
                except InvalidFilterValue as exc:
                    log.warning("repage worker: dropping enqueued document %r: %s", doc[:80], exc)
            return found

    def _trickle(self) -> tuple[dict, str | None, int | None]:
        moment = datetime.fromtimestamp(self.clock.now(), tz=self.config.tz)
        quiet = self.config.quiet_hours
        left = self._quota_left(moment)
        if quiet is not None and quiet.contains(moment):
            return {}, f"quiet hours {quiet}", left
        if left == 0:
            return {}, "daily quota reached", left
        if self._budget_spent_on == moment.date().isoformat():
            return {}, "daily budget spent", left
        ledger = self.stores.ledger
        if not scan_completed(ledger):  # a fresh ledger: the trickle needs to know the documents
            scan_store(self.stores)
        size = self.limits.batch_size if left is None else min(self.limits.batch_size, left)
        until_quiet = quiet.seconds_until_start(moment) if quiet is not None else None
        limits = replace(
            self.limits, limit=size, max_duration_seconds=_min(until_quiet, self.limits.max_duration_seconds)
        )
        selection = Selection(
            paths=self._paths,
            order="priority",  # most-accessed first, the reprocess path's expensive documents included
            min_accesses=self.config.min_accesses,
            access_now=self.clock.now(),
            allow_reprocess=self._slow,
        )
        summary = self._run(selection, limits, quota_day=moment.date().isoformat())
        return self._count(summary, "trickle"), None, None if left is None else left - summary.documents

    def _quota_left(self, moment: datetime) -> int | None:
        quota = self.config.daily_quota
        if quota is None:
            return None
        day = moment.date().isoformat()
        events = self.stores.ledger.events(kinds=[TRICKLE], limit=quota + 100)  # one per batch of >= 1
        return max(0, quota - sum(e.count for e in events if e.detail == day))

    def _run(self, selection: Selection, limits: RunLimits, *, quota_day: str | None = None) -> RunSummary:
        """One Runner pass; between batches it counts the quota and the day's dollars, feeds the stop
        rule and heeds stop, pause and latency. A spent migration budget pauses the migration."""
        run_stop = threading.Event()
        seen = RunSummary()  # what earlier batches of this pass were already counted for
        day = self._day()
        limits, daily_binds = self._with_budgets(limits, day)

        def on_batch(summary: RunSummary) -> None:
            ledger = self.stores.ledger
            if quota_day is not None and summary.documents > seen.documents:
                ledger.add_event(TRICKLE, count=summary.documents - seen.documents, detail=quota_day)
            if (spent := round((summary.dollars - seen.dollars) * 1e6)) > 0:
                ledger.add_event(SPENT, count=spent, detail=day)
            self.watch.add(summary.documents - seen.documents, summary.failed - seen.failed)
            seen.documents, seen.failed, seen.dollars = summary.documents, summary.failed, summary.dollars
            if (why := self.watch.reason()) is not None:
                set_paused(ledger, True, who=f"worker stopped itself: {why}")
            if self._interrupted():
                run_stop.set()

        if self.stop_event.is_set():
            run_stop.set()
        summary = Runner(
            self.stores, self.options, limits, selection, clock=self.clock, on_batch=on_batch, stop=run_stop
        ).run()
        if summary.stopped_because.startswith("budget"):
            if daily_binds:  # today's budget: the trickle waits for the next day
                self._budget_spent_on = day
            else:  # the migration's: nothing more until an admin raises it and resumes
                why = f"worker stopped itself: budget_dollars: {summary.stopped_because}"
                set_paused(self.stores.ledger, True, who=why)
        return summary

    def _day(self) -> str:
        return datetime.fromtimestamp(self.clock.now(), tz=self.config.tz).date().isoformat()

    def _with_budgets(self, limits: RunLimits, day: str) -> tuple[RunLimits, bool]:
        """The run may spend what the migration's budget and today's both have left; and whether
        today's is the smaller."""
        limits = with_migration_budget(self.stores, limits)
        daily = self._daily_left(day)
        if daily is None or (limits.budget_dollars is not None and limits.budget_dollars < daily):
            return limits, False
        return replace(limits, budget_dollars=daily), True

    def _daily_left(self, day: str) -> float | None:
        daily = self.config.daily_budget_dollars
        if daily is None:
            return None
        events = self.stores.ledger.events(kinds=[SPENT], since=self.stores.ledger.db_now() - 3 * 86_400)
        return max(0.0, daily - sum(e.count for e in events if e.detail == day) / 1e6)

    def _interrupted(self) -> bool:
        if self.stop_event.is_set():
            return True
        ledger = self.stores.ledger
        return is_paused(ledger) or self._too_slow(read_latency_p95(ledger, self.config.latency_max_age_s))

    def _count(self, summary: RunSummary | None, phase: str) -> dict:
        if summary is None:
            return {"documents": 0, "migrated": 0, "failed": 0}
        self.totals[phase] += summary.documents
        self.totals["migrated"] += summary.migrated
        self.totals["failed"] += summary.failed
        return {
            "documents": summary.documents,
            "migrated": summary.migrated,
            "failed": summary.failed,
            "stopped_because": summary.stopped_because,
        }

    # ---- the loop

    def run_forever(self, *, once: bool = False) -> None:
        """Cycle until stopped (SIGTERM sets stop_event); store errors are logged and waited out."""
        while not self.stop_event.is_set():
            try:
                report = self.cycle()
                wait = report.wait_seconds
            except RepageError as exc:  # a store is down: say so in one line, try again later
                log.warning("repage worker: cycle failed: %s", exc)
                self._backoffs += 1
                wait = min(self.config.poll_seconds * 2**self._backoffs, self.config.backoff_max_s)
                if once:
                    raise
            if once:
                return
            if wait > 0:
                self.stop_event.wait(wait)

    def state(self) -> dict:
        return {
            "cycles": self.cycles,
            "stopping": self.stop_event.is_set(),
            "totals": dict(self.totals),
            "last_cycle": self.last.as_dict() if self.last else None,
        }


def _min(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return min(values) if values else None


class WorkerThread:
    """The worker inside the service process (`repage serve --with-worker`), with its own stores."""

    def __init__(
        self, settings, *, config: WorkerConfig, limits: RunLimits, options: RunOptions = RunOptions(), shared=None
    ):
        self.settings, self.config, self.limits, self.options = settings, config, limits, options
        self.shared = shared  # the service's stores: one Milvus client and ledger per process
        self.stop_event = threading.Event()
        self.worker: Worker | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._main, name="repage-worker", daemon=True)

    def start(self) -> WorkerThread:
        self._thread.start()
        return self

    def _main(self) -> None:
        from repage.stores.open import Stores, open_objects, open_stores

        try:
            if self.shared is not None:
                stores = Stores(self.settings, vectors=self.shared.vectors, ledger=self.shared.ledger)
                stores.objects = open_objects(self.settings)
                stores._opened.append(stores.objects)  # close only what this thread opened
            else:
                stores = open_stores(self.settings)
            with stores:
                self.worker = Worker(
                    stores, config=self.config, limits=self.limits, options=self.options, stop_event=self.stop_event
                )
                self.worker.run_forever()
        except Exception as exc:  # noqa: BLE001 - the service stays up and reports the dead worker
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("repage worker thread stopped: %s", self.error)

    def stop(self, timeout: float = 600.0) -> None:
        """Ask for a stop and wait: the current batch finishes first."""
        self.stop_event.set()
        self._thread.join(timeout)

    def state(self) -> dict:
        base = self.worker.state() if self.worker else {"cycles": 0}
        return {**base, "alive": self._thread.is_alive(), "error": self.error}


def run_worker(
    settings,
    *,
    config: WorkerConfig,
    limits: RunLimits,
    options: RunOptions = RunOptions(),
    stop_event: threading.Event | None = None,
    once: bool = False,
    on_cycle=None,
) -> dict:
    """`repage worker`: cycle until `stop_event` is set (SIGTERM), or once; the totals."""
    from repage.stores.open import open_stores

    with open_stores(settings) as stores:
        worker = Worker(stores, config=config, limits=limits, options=options, stop_event=stop_event, on_cycle=on_cycle)
        worker.run_forever(once=once)
        return worker.state()

"""A run: claim batches from the ledger and migrate them until done or a limit says stop.

Stops cleanly between batches (the documents of a finished batch are settled, nothing
is left running) on: --limit, --max-failures, --max-error-rate, --max-duration,
--budget, or a stop request (pause from the service, SIGTERM).
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from itertools import islice

from repage.domain.estimate import request_dollars, worst_case_document_dollars
from repage.domain.keys import compile_patterns
from repage.domain.records import Claim, DocumentRecord
from repage.domain.states import CLAIMABLE, RepairPath, State
from repage.errors import IllegalTransition, RepageError, StaleLease, StoreUnavailable
from repage.migration.migrate import BatchMigrator, BatchResult, DocumentWork, RunOptions
from repage.migration.scan import scan_completed, scan_store
from repage.migration.status import pause_reason, spent_dollars
from repage.stores.ledger import Ledger
from repage.stores.throttle import AdaptiveLimiter, Clock, SystemClock

MIN_DOCS_FOR_ERROR_RATE = 20  # an error rate over a handful of documents says nothing
# A store that does not answer (Milvus down or restarting) is no document's failure: the batch is
# tried again after each of these waits (~30 s in all, leases kept), then given back to pending
# and the run stops cleanly; the next run finishes it.
UNAVAILABLE_WAITS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
OBJECT_REQUESTS = "object-requests"  # ledger event per batch: count = bucket requests, detail = "class_a class_b"


@dataclass(frozen=True)
class RunLimits:
    limit: int | None = None  # documents
    batch_size: int = 200  # Settings.batch_size says why
    concurrency: int = 4
    object_ops_per_second: float | None = None
    milvus_writes_per_second: float | None = None
    pause_seconds: float = 0.0
    max_failures: int | None = None
    max_error_rate: float | None = None
    max_duration_seconds: float | None = None
    budget_dollars: float | None = None  # what this run may spend (--budget; else what budget_dollars has left)
    reprocess_concurrency: int = 2  # reprocess jobs in flight (the slow path's own concurrency)
    # claim the next batch and read and plan it while this one is applied (docs/design.md §5.10)
    plan_ahead: bool = True


@dataclass(frozen=True)
class Selection:
    paths: frozenset[RepairPath] = frozenset({RepairPath.KEYS})
    document_ids: tuple[str, ...] | None = None
    dataset_id: str | None = None
    order: str = "oldest"
    min_accesses: float | None = None  # only documents with at least this many decayed accesses
    access_now: float | None = None  # epoch seconds the decay is judged at (None: now)
    enqueued_only: bool = False  # only documents lazy repair or an admin enqueued
    retry_failed: bool = False  # failed documents of the selection go back to pending first (the retry edge)
    # reprocess-path documents claimed while this is off go to deferred (docs/design.md §4.3, §2.4); on: they are
    # reprocessed, and deferred ones of the selection go back to pending first
    allow_reprocess: bool = False
    # look for new and re-broken documents before the run (docs/design.md §5.9); only on a whole-store run
    discover: bool = True


@dataclass
class RunSummary:
    documents: int = 0
    migrated: int = 0
    failed: int = 0
    other: dict[str, int] = field(default_factory=dict)
    chunks_written: int = 0
    objects_copied: int = 0
    class_a: int = 0
    class_b: int = 0
    dollars: float = 0.0
    reprocess_dollars: float = 0.0  # part of `dollars`: reprocess jobs (reported, or the price table)
    seconds: float = 0.0
    batches: int = 0
    stopped_because: str = "no more pending documents"
    errors: dict[str, str] = field(default_factory=dict)
    dry_run_changes: list[dict] = field(default_factory=list)
    throttled: int = 0
    pending_at_start: int = 0  # documents the run could claim when it started (progress total)
    unavailable: str | None = None  # set when the run stopped because a store stopped answering
    discovered: dict = field(default_factory=dict)  # what discovery queued first: {"new": n, "again": m}

    def as_dict(self) -> dict:
        data = asdict(self)
        if not self.dry_run_changes:
            data.pop("dry_run_changes")
        return data


def owner_name() -> str:
    """Who holds a lease: host, pid and a random part (pids repeat across machines)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Runner:
    def __init__(
        self,
        stores,
        options: RunOptions,
        limits: RunLimits,
        selection: Selection,
        *,
        clock: Clock | None = None,
        on_batch: Callable[[RunSummary], None] | None = None,
        stop: threading.Event | None = None,
    ):
        self.stores, self.options, self.limits, self.selection = stores, options, limits, selection
        self.clock = clock or SystemClock()
        self.on_batch = on_batch
        self.stop = stop or threading.Event()
        self.owner = owner_name()
        # Latency is judged on the median of the last few object requests: one slow reply of
        # the store (a GC pause, a tail latency) must not halve the rate for the next ~10 s.
        self.object_limiter = AdaptiveLimiter(
            limits.object_ops_per_second, self.clock, latency_window=max(16, 4 * limits.concurrency)
        )
        self.write_limiter = AdaptiveLimiter(limits.milvus_writes_per_second, self.clock)
        self.migrator = BatchMigrator(
            stores,
            options,
            object_limiter=self.object_limiter,
            write_limiter=self.write_limiter,
            concurrency=limits.concurrency,
            lease_seconds=stores.settings.lease_seconds,
            patterns=compile_patterns(stores.settings.key_patterns),
        )
        self.summary = RunSummary()
        self._over_budget: str | None = None  # why the last claim was given back whole
        self._in_flight: Sequence[Claim] = []  # the batch being applied (a claim ahead counts it)
        self._dry_records: Iterator[DocumentRecord] | None = None  # dry run: one pass over the pending documents
        from repage.reprocess.stage import ReprocessStage

        prices = stores.settings.prices
        self.reprocess = ReprocessStage(
            stores,
            enabled=selection.allow_reprocess,
            budget_dollars=limits.budget_dollars,
            concurrency=limits.reprocess_concurrency,
            clock=self.clock,
            spent=lambda: request_dollars(self.summary.class_a, self.summary.class_b, prices),
        )

    def run(self) -> RunSummary:
        started = self.clock.now()
        if self.options.move_images and not self.options.dry_run:
            sel = self.selection
            self.stores.ledger.requeue_image_moves(sel.dataset_id, sel.document_ids)
        if self.selection.retry_failed and not self.options.dry_run:
            self.stores.ledger.retry_failed(self.selection.dataset_id, self.selection.document_ids)
        if self.selection.allow_reprocess and RepairPath.REPROCESS in self.selection.paths and not self.options.dry_run:
            self._undefer()
        self.summary.pending_at_start = self._pending()
        ahead: PlannedAhead | None = None
        try:
            while (reason := self._stop_reason(started)) is None:
                if ahead is not None:
                    claims, planned, ahead = ahead.claims, ahead.works(), None
                else:
                    claims, planned = self._claim(), None
                if not claims:
                    if self._over_budget is not None:
                        self.summary.stopped_because = self._over_budget
                    break
                self._in_flight = claims
                ahead = self._plan_ahead(started)
                self._account(self._migrate(claims, planned))
                self._in_flight = []
                self.summary.seconds = self.clock.now() - started
                if self.on_batch:
                    self.on_batch(self.summary)
                if self.limits.pause_seconds and self._stop_reason(started) is None:
                    self.clock.sleep(self.limits.pause_seconds)
            else:
                self.summary.stopped_because = reason
        finally:
            if ahead is not None:  # claimed but not applied: back to pending, nothing left running
                ahead.works()
                self._release_batch(ahead.claims, "given back: the run stopped before this batch")
        self.reprocess.close()  # the backend's HTTP client, if one was opened
        self.summary.seconds = self.clock.now() - started
        self.summary.throttled = self.object_limiter.throttled_count + self.write_limiter.throttled_count
        return self.summary

    def _plan_ahead(self, started: float) -> PlannedAhead | None:
        """The next batch, claimed now and read and planned in the background while this one is
        applied: its Milvus reads and bucket GETs overlap this batch's copies and write (§5.10).
        Not in a dry run, nor when batches are paced (--pause), nor when a limit already says stop."""
        lim = self.limits
        if not lim.plan_ahead or lim.pause_seconds or self.options.dry_run or self._stop_reason(started):
            return None
        claims = self._claim()
        return PlannedAhead(self.migrator, claims) if claims else None

    def _undefer(self) -> None:
        """Reprocessing is enabled: deferred reprocess documents of the selection go back to pending."""
        sel, ledger = self.selection, self.stores.ledger
        for record in ledger.documents(states={State.DEFERRED}, dataset_id=sel.dataset_id):
            chosen = sel.document_ids is None or record.document_id in sel.document_ids
            if record.path == RepairPath.REPROCESS and chosen:
                try:
                    ledger.transition(record.document_id, State.PENDING, reason="reprocessing enabled for this run")
                except IllegalTransition:
                    pass  # another run took it meanwhile

    def _pending(self) -> int:
        counts = self.stores.ledger.counts()
        total = sum(
            n
            for (state, path), n in counts.items()
            if State(state) in CLAIMABLE and RepairPath(path) in self.selection.paths
        )
        if self.selection.document_ids is not None:
            total = min(total, len(self.selection.document_ids))
        return min(total, self.limits.limit) if self.limits.limit is not None else total

    def _claim(self):
        ledger = self.stores.ledger
        size = self.limits.batch_size
        if self.limits.limit is not None:
            size = min(size, self.limits.limit - self.summary.documents - len(self._in_flight))
            if size <= 0:
                return []
        if self.options.dry_run:
            return self._peek(size)
        ledger.release_expired()
        sel = self.selection
        claims = ledger.claim_batch(
            self.owner,
            size,
            self.stores.settings.lease_seconds,
            paths=set(sel.paths),
            dataset_id=sel.dataset_id,
            document_ids=sel.document_ids,
            order=sel.order,
            enqueued_only=sel.enqueued_only,
            min_access_rank=self._min_access_rank(),
        )
        return self._within_budget(claims)

    def _within_budget(self, claims: list) -> list:
        """The claims whose worst-case cost fits in what is left of the budget; the rest go back to
        pending, so a run overspends by nothing (docs/design.md §12). The reprocess stage reserves
        its own jobs."""
        budget = self.limits.budget_dollars
        self._over_budget = None  # a claim ahead given back whole is claimed again after this batch
        if budget is None or not claims:
            return claims
        in_flight = sum(self._reservation(c) for c in self._in_flight if c.path != RepairPath.REPROCESS)
        left, reserved, keep = budget - self.summary.dollars - in_flight, 0.0, list[Claim]()
        for claim in claims:
            cost = 0.0 if claim.path == RepairPath.REPROCESS else self._reservation(claim)
            if reserved + cost > left:
                if not keep:
                    self._over_budget = (
                        f"budget ${budget:g}: the next document may cost ${cost:.6f}, ${max(left, 0):.6f} left"
                    )
                break
            keep.append(claim)
            reserved += cost
        if len(keep) < len(claims):
            self._release_batch(claims[len(keep) :], "given back: over the budget")
        return keep

    def _reservation(self, claim) -> float:
        return worst_case_document_dollars(claim.affected_chunks, self.stores.settings.prices)

    def _min_access_rank(self) -> float | None:
        from repage.domain.access import half_life_seconds, rank_threshold

        sel = self.selection
        if not sel.min_accesses:
            return None
        now = sel.access_now if sel.access_now is not None else time.time()  # access times are wall clock
        return rank_threshold(sel.min_accesses, now, half_life_seconds(self.stores.settings.access_half_life_hours))

    def _peek(self, size: int):
        """Dry run: pending documents as if claimed, without touching the ledger."""
        if self._dry_records is None:
            sel = self.selection
            self._dry_records = (
                r
                for r in self.stores.ledger.documents(states=set(CLAIMABLE), dataset_id=sel.dataset_id)
                if r.path in sel.paths and (sel.document_ids is None or r.document_id in sel.document_ids)
            )
        return [
            Claim(r.document_id, r.dataset_id, r.filename, r.path, r.fencing_token, r.affected_chunks)
            for r in islice(self._dry_records, size)
        ]

    def _migrate(self, claims: Sequence, planned: list[DocumentWork] | None = None) -> BatchResult:
        """One batch; `planned`: its works read and planned ahead (used by the first attempt only)."""
        slow = [c for c in claims if c.path == RepairPath.REPROCESS]
        if slow:  # the slow path: its own stage (repage/reprocess/stage.py), after the batch's other documents
            return self._migrate_with_reprocess([c for c in claims if c.path != RepairPath.REPROCESS], slow)
        waits = iter(UNAVAILABLE_WAITS)
        while True:
            try:
                works, planned = planned, None
                return self._migrate_once(claims, works)
            except StoreUnavailable as exc:  # the store is down, not the documents: wait, else give them back
                wait = None if self.options.dry_run or self.stop.is_set() else next(waits, None)
                if wait is None:
                    self.summary.unavailable = str(exc)
                    return self._release_batch(claims, f"store unavailable: {exc}")
                with self.migrator.keeping_leases([DocumentWork(c, []) for c in claims]):
                    self.clock.sleep(wait)  # a retried batch resumes from its journal (every step is idempotent)
            except RepageError as exc:  # a batch-wide failure (the write): each document failed
                return self._fail_batch(claims, f"batch failed: {exc}")

    def _migrate_with_reprocess(self, fast: Sequence, slow: Sequence) -> BatchResult:
        result = self._migrate(fast) if fast else BatchResult()
        try:
            more = self.reprocess.process(slow, self.migrator, dry_run=self.options.dry_run)
        except RepageError as exc:  # the backend could not even be opened (configuration)
            more = self._fail_batch(slow, f"reprocess failed: {exc}")
        result.migrated += more.migrated
        result.failed.update(more.failed)
        result.other.update(more.other)
        result.chunks_written += more.chunks_written
        result.changes += more.changes
        result.dollars += more.dollars
        return result

    def _migrate_once(self, claims: Sequence, planned: list[DocumentWork] | None = None) -> BatchResult:
        if self.options.dry_run:
            return self.migrator.apply(self.migrator.plan(claims))
        works = planned if planned is not None else self.migrator.prepare(claims)
        with self.migrator.keeping_leases(works):
            if planned is None:
                self.migrator.plan_works(works)
            return self.migrator.apply(works)

    def _release_batch(self, claims: Sequence, message: str) -> BatchResult:
        """Back to pending (the edge of a run stopped mid-batch); a dry run has nothing to release."""
        if self.options.dry_run:
            return self._fail_batch(claims, message)
        for claim in claims:
            try:
                self.stores.ledger.transition(
                    claim.document_id, State.PENDING, token=claim.fencing_token, reason=message
                )
            except RepageError:
                pass  # settled before the outage, taken over, or the ledger is down too: the lease expires
        return BatchResult()

    def _fail_batch(self, claims: Sequence, message: str) -> BatchResult:
        result = BatchResult()
        for claim in claims:
            if self.options.dry_run:
                result.failed[claim.document_id] = message
                continue
            try:
                self.stores.ledger.transition(claim.document_id, State.FAILED, token=claim.fencing_token, error=message)
                result.failed[claim.document_id] = message
            except (StaleLease, IllegalTransition):
                pass  # settled by the batch before it failed, or taken over by another worker
        return result

    def _account(self, result: BatchResult) -> None:
        s, prices = self.summary, self.stores.settings.prices
        s.batches += 1
        s.documents += len(result.migrated) + len(result.failed) + len(result.other)
        s.migrated += len(result.migrated)
        s.failed += len(result.failed)
        for state in result.other.values():
            s.other[str(state)] = s.other.get(str(state), 0) + 1
        s.errors.update(result.failed)
        s.chunks_written += result.chunks_written
        s.objects_copied += result.objects_copied
        s.class_a += result.usage.class_a
        s.class_b += result.usage.class_b
        s.reprocess_dollars += result.dollars
        s.dollars = request_dollars(s.class_a, s.class_b, prices) + s.reprocess_dollars
        s.dry_run_changes.extend(result.changes)
        if self.options.dry_run:
            s.documents += len(result.changes)
        else:  # throughput history for status and the dashboard
            if result.migrated:
                self.stores.ledger.add_event("migrated", count=len(result.migrated), detail=str(result.chunks_written))
            if requests := result.usage.class_a + result.usage.class_b:
                self.stores.ledger.add_event(
                    OBJECT_REQUESTS, count=requests, detail=f"{result.usage.class_a} {result.usage.class_b}"
                )

    def _stop_reason(self, started: float) -> str | None:
        s, lim = self.summary, self.limits
        if self.stop.is_set():
            return "stop requested"
        if s.unavailable:
            return f"a store is unavailable: {s.unavailable}"
        if not self.options.dry_run and (why := pause_reason(self.stores.ledger)) is not None:
            return f"paused: {why}"  # repage pause, POST /migration/pause, or a worker that stopped itself
        if lim.limit is not None and s.documents >= lim.limit:
            return f"--limit {lim.limit} reached"
        if lim.max_failures is not None and s.failed > lim.max_failures:
            return f"--max-failures {lim.max_failures} exceeded ({s.failed} failed)"
        if (
            lim.max_error_rate is not None
            and s.documents >= MIN_DOCS_FOR_ERROR_RATE
            and s.failed / s.documents > lim.max_error_rate
        ):
            return f"--max-error-rate {lim.max_error_rate} exceeded ({s.failed}/{s.documents} failed)"
        if lim.max_duration_seconds is not None and self.clock.now() - started >= lim.max_duration_seconds:
            return f"--max-duration {lim.max_duration_seconds:.0f}s reached"
        if self.reprocess.stopped_because is not None:
            return self.reprocess.stopped_because
        if lim.budget_dollars is not None and s.dollars >= lim.budget_dollars:
            return f"--budget ${lim.budget_dollars} spent (${s.dollars:.4f})"
        return None


class PlannedAhead:
    """A claimed batch read and planned on a thread of its own (docs/design.md §5.10).

    Planning only reads (Milvus rows, originals from the bucket, the ledger's journals) and
    renews the batch's leases; every write stays with the run's own thread, in batch order.
    """

    def __init__(self, migrator: BatchMigrator, claims: Sequence[Claim]):
        self.migrator, self.claims = migrator, claims
        self._works: list[DocumentWork] | None = None
        self._thread: threading.Thread | None = None
        # the leases are kept from the claim until the run takes the batch, however long this one takes
        self._leases = ExitStack()
        self._leases.enter_context(migrator.keeping_leases([DocumentWork(c, []) for c in claims]))
        if all(c.path != RepairPath.REPROCESS for c in claims):  # the slow path plans in its own stage
            self._thread = threading.Thread(target=self._plan, name="repage-plan-ahead", daemon=True)
            self._thread.start()

    def _plan(self) -> None:
        try:
            works = self.migrator.prepare(self.claims)
            self.migrator.plan_works(works)
        except Exception:  # noqa: BLE001 (the run plans the batch again itself, where the error is handled)
            return
        self._works = works

    def works(self) -> list[DocumentWork] | None:
        """The planned works, once ready; None when there are none (the slow path) or planning
        failed: then the run reads and plans the batch itself, where its errors are handled
        (a store outage waited out, a batch-wide failure recorded), as without planning ahead."""
        if self._thread is not None:
            self._thread.join()
        self._leases.close()
        return self._works


def with_migration_budget(stores, limits: RunLimits) -> RunLimits:
    """Without --budget, a run may spend what `budget_dollars` (the whole migration's) has left."""
    budget = stores.settings.budget_dollars
    if limits.budget_dollars is not None or budget is None or stores.ledger is None:
        return limits
    left = max(0.0, budget - spent_dollars(stores.ledger, stores.settings.prices))
    return replace(limits, budget_dollars=left)


def _discover(stores, options: RunOptions, selection: Selection) -> dict:
    """New and re-broken documents queued before a whole-store run (not a dry run: it writes the ledger)."""
    if options.dry_run or not selection.discover or selection.document_ids is not None:
        return {}
    from repage.migration.discover import discover

    return discover(stores, selection.dataset_id)


def run_migration(stores, options: RunOptions, limits: RunLimits, selection: Selection, **kwargs) -> RunSummary:
    """The one entry point for `repage run` and the service: scans first when the ledger is empty.

    A dry run on an empty ledger scans into a throw-away SQLite ledger, so the configured
    ledger stays untouched like every other store.
    """
    limits = with_migration_budget(stores, limits)
    # None: a dry run with no ledger yet. A ledger with documents but no finished scan was left by
    # a run killed mid-scan: scan again (scans are idempotent and keep running/done documents).
    if stores.ledger is not None and stores.ledger.counts() and (options.dry_run or scan_completed(stores.ledger)):
        found = _discover(stores, options, selection)
        summary = Runner(stores, options, limits, selection, **kwargs).run()
        summary.discovered = found
        return summary
    if not options.dry_run:
        scan_store(stores, dataset_id=selection.dataset_id)
        return Runner(stores, options, limits, selection, **kwargs).run()
    with tempfile.TemporaryDirectory(prefix="repage-dry-run-") as tmp:
        scratch = replace(stores, ledger=Ledger(f"sqlite:///{tmp}/ledger.db"), _opened=[])
        try:
            scan_store(scratch, dataset_id=selection.dataset_id)
            return Runner(scratch, options, limits, selection, **kwargs).run()
        finally:
            scratch.ledger.close()

"""Prometheus metrics of the service (prometheus-client), in a registry per app.

Labels never carry a document id (unbounded cardinality, and ids are customer data):
only small fixed sets (read outcome, migration state and path, failure kind) and the pause reason.
Counters kept by LazyRepair and gauges read from the ledger are exported by a custom
collector at scrape time, so the request path only increments plain integers.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

READ_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAZY_COUNTERS = (
    ("reads", "Responses passed through lazy repair"),
    ("corrected_chunks", "Chunk pages corrected in responses from their image keys"),
    ("affected_chunks", "Affected chunks (page 0, image/OCR) seen in responses"),
    ("enqueue_requests", "Documents marked for migration by the read path (deduplicated per flush)"),
    ("dropped", "Buffered documents dropped because the lazy buffer was full"),
    ("flush_errors", "Lazy buffer flushes that failed (ledger unavailable)"),
    ("flushed_enqueues", "Enqueue requests written to the ledger"),
)


def process_source() -> str:
    """Who publishes a latency report: one service process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LatencyWindow:
    """Read-path Milvus latencies of the last `window_s` seconds; p95 for the worker's back-off."""

    def __init__(self, window_s: float = 30.0, max_samples: int = 10_000, now: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._now = now
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._samples.append((self._now(), seconds))

    def p95(self) -> tuple[float | None, int]:
        """(p95 in seconds or None, number of samples) over the window."""
        cutoff = self._now() - self.window_s
        with self._lock:
            while self._samples and self._samples[0][0] < cutoff:
                self._samples.popleft()
            values = sorted(s for _, s in self._samples)
        if not values:
            return None, 0
        return values[min(len(values) - 1, int(0.95 * len(values)))], len(values)


class _StateCollector:
    """Exports LazyRepair's counters and the ledger's figures at scrape time."""

    def __init__(self, lazy, ledger_figures: Callable[[], dict], window: LatencyWindow, throttle=None):
        self.lazy, self.ledger_figures, self.window, self.throttle = lazy, ledger_figures, window, throttle

    def describe(self):
        return []  # no duplicate check against other collectors: names are all repage_*

    def collect(self):
        stats = self.lazy.stats.as_dict()
        for name, doc in LAZY_COUNTERS:
            yield CounterMetricFamily(f"repage_lazy_{name}", doc, value=stats[name])
        yield GaugeMetricFamily(
            "repage_lazy_buffered_documents", "Documents waiting in the lazy buffer", value=self.lazy.buffered()
        )
        p95, _ = self.window.p95()
        yield GaugeMetricFamily(
            "repage_read_latency_p95_seconds",
            "Read-path Milvus p95 over the last 30 s",
            value=p95 if p95 is not None else 0.0,
        )
        yield from self._auth()
        yield from self._ledger()

    def _auth(self):
        """Failed authentications by kind (bearer, login) and requests refused by the throttle."""
        if self.throttle is None:
            return
        failures = CounterMetricFamily("repage_auth_failures", "Failed authentications, by kind", labels=["kind"])
        for kind in ("bearer", "login"):
            failures.add_metric([kind], self.throttle.failures.get(kind, 0))
        yield failures
        yield CounterMetricFamily(
            "repage_auth_throttled",
            "Requests refused (429) after too many failed authentications",
            value=self.throttle.refused,
        )

    def _ledger(self):
        up = GaugeMetricFamily("repage_ledger_up", "Whether the ledger answered this scrape")
        try:
            figures = self.ledger_figures()
        except Exception:  # noqa: BLE001 - a scrape must answer even when the ledger does not
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _documents(figures)
        yield from _rates(figures["throughput"])
        yield from _progress(figures)


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=math.nan if value is None else float(value))


def _documents(figures: dict):
    """Documents by state, by state and path, failed ones by path and kind (docs/design.md §12)."""
    states = GaugeMetricFamily("repage_migration_documents", "Documents by ledger state", labels=["state"])
    for state, count in sorted(figures["by_state"].items()):
        states.add_metric([state], count)
    yield states
    paths = GaugeMetricFamily(
        "repage_migration_path_documents", "Documents by ledger state and repair path", labels=["state", "path"]
    )
    for row in figures["by_state_and_path"]:
        paths.add_metric([row["state"], row["path"]], row["documents"])
    yield paths
    failed = GaugeMetricFamily(
        "repage_migration_failures", "Failed documents by path and kind of their last error", labels=["path", "kind"]
    )
    for row in figures["failures"]:
        failed.add_metric([row["path"], row["kind"]], row["documents"])
    yield failed


def _rates(rates: dict):
    """Documents, chunks and bucket requests per second: over the last five minutes and overall."""
    for what, doc in (
        ("documents", "Documents migrated"),
        ("chunks", "Chunks written"),
        ("requests", "Bucket requests"),
    ):
        family = GaugeMetricFamily(
            f"repage_migration_{what}_per_second", f"{doc} per second, by window", labels=["window"]
        )
        for window in ("recent", "overall"):
            family.add_metric([window], rates.get(f"{window}_{what}_per_s", math.nan))
        yield family


def _progress(figures: dict):
    """Dollars, ETA (NaN while unknown), the lazy queue, the pause with its reason, the last batch."""
    yield _gauge(
        "repage_migration_dollars_spent", "Dollars spent: bucket requests and reprocess", figures["dollars_spent"]
    )
    yield _gauge(
        "repage_migration_dollars_projected", "Dollars projected for the whole migration", figures["dollars_projected"]
    )
    yield _gauge(
        "repage_migration_eta_seconds", "Seconds left at the recent rate (NaN: unknown)", figures["eta_seconds"]
    )
    yield _gauge(
        "repage_lazy_queue_documents", "Documents the read path queued, not yet migrated", figures["lazy_queue"]
    )
    paused = GaugeMetricFamily(
        "repage_worker_paused", "1 while the migration is paused; the reason as a label", labels=["reason"]
    )
    paused.add_metric([figures["pause_reason"]], 1.0 if figures["paused"] else 0.0)
    yield paused
    yield _gauge(
        "repage_migration_last_batch_timestamp_seconds",
        "When a run last finished a batch (epoch seconds; NaN: never)",
        figures["last_batch_at"],
    )


class ServiceMetrics:
    def __init__(self, lazy, ledger_figures: Callable[[], dict], throttle=None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.window = LatencyWindow()
        self.reads = Counter("repage_reads", "Chunk reads served, by outcome", ["outcome"], registry=self.registry)
        self.read_seconds = Histogram(
            "repage_read_milvus_seconds",
            "Milvus latency of read-path queries",
            buckets=READ_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(lazy, ledger_figures, self.window, throttle))

    def observe_read(self, seconds: float, outcome: str) -> None:
        self.reads.labels(outcome=outcome).inc()
        if outcome != "error":
            self.read_seconds.observe(seconds)
            self.window.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyPublisher:
    """Runs in the lazy flusher thread: every `every_s`, the window's p95 to the ledger
    (`read-latency` event) for workers in any process; old reports are pruned hourly."""

    def __init__(self, ledger, window: LatencyWindow, *, every_s: float = 5.0, keep_s: float = 3600.0):
        self.ledger, self.window, self.every_s, self.keep_s = ledger, window, every_s, keep_s
        self.source = process_source()
        self._last = self._last_prune = 0.0

    def __call__(self) -> None:
        from repage.migration.worker import READ_LATENCY, publish_read_latency

        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        p95, samples = self.window.p95()
        if p95 is not None:
            publish_read_latency(self.ledger, p95, samples, self.source)
        if now - self._last_prune >= 600.0:
            self._last_prune = now
            self.ledger.prune_events(self.ledger.db_now() - self.keep_s, kinds=[READ_LATENCY])

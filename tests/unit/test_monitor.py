"""The migration's figures for `repage status` and /metrics (docs/design.md §12) on a real SQLite
ledger: a run of known speed is written into the event log with known timestamps, and the clock is
given, so the rates and the ETA are exact."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from repage.config import Prices
from repage.domain.progress import OTHER, eta_seconds, failure_kind, per_second
from repage.domain.records import Event, ScanRecord
from repage.domain.states import RepairPath, State
from repage.migration.monitor import monitor_figures
from repage.migration.status import migration_status
from repage.migration.worker import set_paused
from repage.stores.ledger import Ledger
from repage.web.metrics import LAZY_COUNTERS, ServiceMetrics

T = 1_900_000_000.0  # "now": every figure is dated by it
PENDING, FAILED, MIGRATED = 600, 3, 64
# the run: four batches of 16 documents (160 chunks, 128 bucket requests each), one every 64 s up to now;
# an older, faster run long before the five-minute window must not count in the ETA
BATCHES = [(T - 256 + 64 * i, 16, 160, 128) for i in range(4)]
OLD_BATCH = (T - 1000, 100, 1000, 800)


def scan_record(doc: str, path: RepairPath = RepairPath.KEYS) -> ScanRecord:
    return ScanRecord(doc, "ds", f"{doc}.pdf", path, State.PENDING, "legacy keys", affected_chunks=10)


def write_event(db: str, at: float, kind: str, count: int, detail: str | None) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO events (at, kind, count, detail) VALUES (?, ?, ?, ?)", (at, kind, count, detail))


@pytest.fixture
def ledger(tmp_path):
    db = tmp_path / "ledger.db"
    ledger = Ledger(f"sqlite:///{db}")
    docs = [f"p{i:04d}" for i in range(PENDING)]
    failed = [f"f{i}" for i in range(FAILED)]
    done = [f"m{i:03d}" for i in range(MIGRATED)]
    ledger.upsert_scan([scan_record(d) for d in docs + done] + [scan_record(d, RepairPath.PDF) for d in failed])
    claims = ledger.claim_batch("test", MIGRATED + FAILED, 60, document_ids=failed + done)
    errors = iter(["images a/b.png are missing and no source PDF can restore them", "HTTP 503 SlowDown", "boom"])
    for claim in claims:
        if claim.document_id in failed:
            ledger.transition(claim.document_id, State.FAILED, token=claim.fencing_token, error=next(errors))
        else:
            ledger.transition(claim.document_id, State.MIGRATED, token=claim.fencing_token, object_requests_a=1000)
    for at, documents, chunks, requests in [OLD_BATCH, *BATCHES]:
        write_event(str(db), at, "migrated", documents, str(chunks))
        write_event(str(db), at, "object-requests", requests, f"{requests // 2} {requests // 2}")
    ledger.enqueue(docs[:7])
    yield ledger
    ledger.close()


def test_the_eta_is_what_is_left_over_the_recent_speed(ledger):
    status = migration_status(ledger, Prices(), now=T)
    # recent: 64 documents in the 256 s since the window's first batch = 0.25/s; 600 + 3 failed to do
    assert status["throughput"]["recent_documents_per_s"] == 0.25
    assert status["todo"] == PENDING + FAILED
    assert status["eta_seconds"] == (PENDING + FAILED) / 0.25
    later = migration_status(ledger, Prices(), now=T + 44)  # no batch since: the recent speed drops to 64/300
    assert later["eta_seconds"] == pytest.approx((PENDING + FAILED) / (64 / 300))


def test_monitor_figures_add_requests_failures_queue_pause_and_last_batch(ledger):
    figures = monitor_figures(ledger, Prices(), now=T)
    rates = figures["throughput"]
    assert (rates["recent_requests_per_s"], rates["overall_requests_per_s"]) == (2.0, (800 + 512) / 1000)
    assert rates["recent_chunks_per_s"] == 2.5
    assert figures["failures"] == [
        {"path": "pdf", "kind": "object_missing", "documents": 1},
        {"path": "pdf", "kind": "other", "documents": 1},
        {"path": "pdf", "kind": "throttled", "documents": 1},
    ]
    assert figures["lazy_queue"] == 7
    assert figures["last_batch_at"] == BATCHES[-1][0]
    assert (figures["paused"], figures["pause_reason"]) == (False, "")
    set_paused(ledger, True, who="max-failures: 3 documents failed")
    assert monitor_figures(ledger, Prices(), now=T)["pause_reason"] == "max-failures: 3 documents failed"


def scrape(ledger, now: float) -> dict:
    """/metrics as Prometheus parses it: {(name, labels): value}."""
    counters = {name: 0 for name, _ in LAZY_COUNTERS}
    lazy = SimpleNamespace(stats=SimpleNamespace(as_dict=lambda: counters), buffered=lambda: 0)
    text = ServiceMetrics(lazy, lambda: monitor_figures(ledger, Prices(), now=now)).render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_export_the_run(ledger):
    m = scrape(ledger, T)
    assert m[("repage_migration_eta_seconds", ())] == (PENDING + FAILED) / 0.25
    assert m[("repage_migration_path_documents", (("path", "keys"), ("state", "pending")))] == PENDING
    assert m[("repage_migration_path_documents", (("path", "keys"), ("state", "migrated")))] == MIGRATED
    assert m[("repage_migration_documents", (("state", "failed"),))] == FAILED
    assert m[("repage_migration_documents_per_second", (("window", "recent"),))] == 0.25
    assert m[("repage_migration_chunks_per_second", (("window", "recent"),))] == 2.5
    assert m[("repage_migration_requests_per_second", (("window", "recent"),))] == 2.0
    assert m[("repage_migration_failures", (("kind", "throttled"), ("path", "pdf")))] == 1
    spent = MIGRATED * 1000 * Prices().class_a_per_million / 1e6
    assert m[("repage_migration_dollars_spent", ())] == pytest.approx(spent)
    assert m[("repage_migration_dollars_projected", ())] == pytest.approx(spent + spent / MIGRATED * 603)
    assert m[("repage_lazy_queue_documents", ())] == 7
    assert m[("repage_migration_last_batch_timestamp_seconds", ())] == BATCHES[-1][0]
    assert m[("repage_worker_paused", (("reason", ""),))] == 0
    set_paused(ledger, True, who="budget: $0.50 spent of $0.50")
    assert scrape(ledger, T)[("repage_worker_paused", (("reason", "budget: $0.50 spent of $0.50"),))] == 1


def test_rates_and_eta_from_events_alone():
    events = [Event(i, at, "migrated", None, n, None) for i, (at, n, _, _) in enumerate([OLD_BATCH, *BATCHES])]
    assert per_second(events, T, 300.0) == (0.25, 164 / 1000)
    assert per_second(events[:1], T, 300.0) == (0.0, 0.1)  # nothing recent: the overall rate is left
    assert eta_seconds(100, 0.0, 0.1) == pytest.approx(1000.0)
    assert eta_seconds(100, 0.25, 0.1) == 400.0
    assert eta_seconds(0, 0.0, 0.0) == 0.0 and eta_seconds(5, 0.0, 0.0) is None


@pytest.mark.parametrize(
    "message,kind",
    [
        ("document d: image a/b.png is missing and the source PDF has no image 3 on its page", "object_missing"),
        ("document d: reprocess API POST /x: HTTP 500: oops", "reprocess"),
        ("document d: copy of a to b does not match (size or content hash)", "copy_mismatch"),
        ("document d: writing its chunks failed: gone", "milvus_write"),
        ("document d: the source PDF is encrypted", "source"),
        ("document d: Milvus at http://m:19530 does not answer", "unavailable"),
        (None, OTHER),
    ],
)
def test_failure_kinds(message, kind):
    assert failure_kind(message) == kind

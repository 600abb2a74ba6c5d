"""The worker under an injected clock: lazy first, daily quota, quiet hours, min-accesses,
the read-latency back-off and pause; and a SIGTERM mid-batch that loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from repage.domain.access import Decayed, half_life_seconds
from repage.domain.states import State
from repage.errors import ConfigError
from repage.migration.runner import RunLimits
from repage.migration.scan import scan_store
from repage.migration.work import RunOptions
from repage.migration.worker import QuietHours, Worker, WorkerConfig, publish_read_latency, set_paused
from repage.stores.ledger import Ledger
from repage.stores.open import open_stores
from repage.stores.throttle import FakeClock
from tests.fixtures.milvus import unique_name
from tests.integration.test_cli import in_own_process
from tests.support.service_store import create_store, env_for, expected_pages, fltr_rows, settings_for, write_images

DOCS = [f"d{i}" for i in range(6)]
TEN_AM = datetime(2024, 5, 1, 10, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def stores(milvus_lite_uri, tmp_path):
    collection = unique_name("worker")
    rows = fltr_rows(DOCS)
    create_store(milvus_lite_uri, collection, rows)
    settings = settings_for(milvus_lite_uri, collection, "memory://", f"sqlite:///{tmp_path}/ledger.db")
    with open_stores(settings) as opened:
        opened.rows = rows
        yield opened
        opened.vectors.drop_collection()


def make_worker(stores, clock, **config) -> Worker:
    config.setdefault("tz", UTC)
    return Worker(
        stores,
        config=WorkerConfig(poll_seconds=1.0, **config),
        limits=RunLimits(batch_size=3),
        options=RunOptions(move_images=False),
        clock=clock,
    )


def states(stores) -> dict[str, State]:
    return {r.document_id: r.state for r in stores.ledger.documents()}


def migrated(stores) -> set[str]:
    return {d for d, s in states(stores).items() if s == State.MIGRATED}


def test_lazy_requests_first_even_unscanned_and_stored_pages_fixed(stores):
    stores.ledger.enqueue(["d4"])  # read before any scan: the worker scans it itself
    report = make_worker(stores, FakeClock(TEN_AM), daily_quota=0).cycle()
    assert report.lazy["scanned"] == 1 and report.lazy["migrated"] == 1
    assert report.trickle_skipped == "daily quota reached"
    assert migrated(stores) == {"d4"} and stores.ledger.enqueued() == []
    rows = stores.vectors.fetch_documents(["d4"], with_vectors=False)
    want = expected_pages(stores.rows)
    assert {r["chunk_id"]: r["page"] for r in rows} == {c: p for c, p in want.items() if c.startswith("d4_")}


def test_daily_quota_by_the_clock_day_survives_a_restart(stores):
    scan_store(stores)
    clock = FakeClock(TEN_AM)
    worker = make_worker(stores, clock, daily_quota=4)
    assert worker.cycle().trickle["documents"] == 3
    report = worker.cycle()
    assert report.trickle["documents"] == 1 and report.quota_left == 0
    assert worker.cycle().trickle_skipped == "daily quota reached"
    restarted = make_worker(stores, clock, daily_quota=4)  # the day's count is in the ledger
    assert restarted.cycle().trickle_skipped == "daily quota reached"
    clock.advance(86_400)
    assert restarted.cycle().trickle["documents"] == 2
    assert len(migrated(stores)) == 6


def test_quiet_hours_hold_the_trickle_but_not_lazy_requests(stores):
    scan_store(stores)
    clock = FakeClock(TEN_AM)
    worker = make_worker(stores, clock, quiet_hours=QuietHours.parse("09:00-17:00"))
    stores.ledger.enqueue(["d2"])
    report = worker.cycle()
    assert report.trickle_skipped == "quiet hours 09:00-17:00" and report.lazy["migrated"] == 1
    assert migrated(stores) == {"d2"}
    clock.advance(7.5 * 3600)  # 17:30
    assert worker.cycle().trickle["documents"] == 3


def test_min_accesses_and_priority_order(stores):
    scan_store(stores)
    half_life = half_life_seconds(stores.settings.access_half_life_hours)
    stores.ledger.record_accesses(
        {"d1": (None, Decayed(3.0, TEN_AM)), "d3": (None, Decayed(9.0, TEN_AM)), "d5": (None, Decayed(1.0, TEN_AM))},
        half_life,
    )
    worker = make_worker(stores, FakeClock(TEN_AM), min_accesses=2)
    report = worker.cycle()
    assert report.trickle["documents"] == 2 and migrated(stores) == {"d1", "d3"}
    assert worker.cycle().trickle["documents"] == 0  # d5 has one access, the rest none


def test_read_latency_backs_off_then_resumes(stores):
    scan_store(stores)
    stores.ledger.enqueue(["d0"])
    worker = make_worker(stores, FakeClock(TEN_AM), max_read_latency_s=0.2)
    publish_read_latency(stores.ledger, 0.9, 500, "svc-a")
    publish_read_latency(stores.ledger, 0.05, 500, "svc-b")
    first, second = worker.cycle(), worker.cycle()
    assert first.backed_off and first.read_latency_p95 == 0.9 and first.wait_seconds == 1.0
    assert second.wait_seconds == 2.0  # doubling while it stays slow
    assert migrated(stores) == set()
    publish_read_latency(stores.ledger, 0.05, 500, "svc-a")  # svc-a's latest report is fine again
    report = worker.cycle()
    assert not report.backed_off and report.lazy["migrated"] == 1


def test_pause_and_resume(stores):
    scan_store(stores)
    worker = make_worker(stores, FakeClock(TEN_AM))
    set_paused(stores.ledger, True)
    assert worker.cycle().paused and migrated(stores) == set()
    set_paused(stores.ledger, False)
    assert worker.cycle().trickle["documents"] == 3


@pytest.mark.parametrize("text", ["9-17", "09:00", "25:00-01:00", "10:00-10:00", "10:60-11:00"])
def test_bad_quiet_hours(text):
    with pytest.raises(ConfigError):
        QuietHours.parse(text)


def test_quiet_hours_wrap_midnight():
    quiet = QuietHours.parse("22:00-06:00")
    at = lambda h, m=0: datetime(2024, 5, 1, h, m, tzinfo=UTC)  # noqa: E731
    assert quiet.contains(at(23)) and quiet.contains(at(5, 59)) and not quiet.contains(at(6))
    assert quiet.seconds_until_start(at(21, 30)) == 1800
    assert quiet.seconds_until_start(at(7)) == 15 * 3600


# --------------------------------------------------------------------------- SIGTERM


def _build_slow_store(uri: str, rows: list[dict]) -> None:
    create_store(uri, "fltr_documents", rows)


@pytest.mark.slow
def test_sigterm_mid_batch_finishes_the_batch_and_loses_nothing(tmp_path):
    docs = [f"s{i:02d}" for i in range(30)]
    rows = fltr_rows(docs)
    uri = str(tmp_path / "milvus.db")
    in_own_process(_build_slow_store, uri, rows)  # the worker process opens Lite; we must not
    (tmp_path / "bucket").mkdir()
    write_images(tmp_path / "bucket", rows)
    ledger_url = f"sqlite:///{tmp_path}/ledger.db"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("REPAGE_")},
        **env_for(uri, "fltr_documents", f"file://{tmp_path / 'bucket'}", ledger_url),
    }
    # 20 documents x 2 images x 4 bucket requests at 40/s: a batch of about 4 s
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "repage.cli",
            "worker",
            "--batch-size",
            "20",
            "--object-ops-per-second",
            "40",
            "--poll",
            "0.2",
            "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        running = _wait_for_running(ledger_url, worker)
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, err
    assert json.loads(out)["totals"]["migrated"] == 20
    with Ledger(ledger_url) as ledger:
        final = {r.document_id: r.state for r in ledger.documents()}
    assert all(final[d] == State.MIGRATED for d in running)
    assert sorted(final.values()).count(State.MIGRATED) == 20
    assert sorted(final.values()).count(State.PENDING) == 10  # the rest waits for the next start
    verify = subprocess.run(
        [sys.executable, "-m", "repage.cli", "verify", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    report = json.loads(verify.stdout)
    assert verify.returncode == 0 and report["passed"] == 20 and not report["failed"], verify.stderr


def _wait_for_running(ledger_url: str, proc: subprocess.Popen, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            with Ledger(ledger_url) as ledger:
                running = [r.document_id for r in ledger.documents(states={State.RUNNING})]
        except Exception:  # noqa: BLE001 - the worker may not have created the ledger yet
            running = []
        if running:
            return running
        time.sleep(0.05)
    raise AssertionError("the worker never claimed a batch")


def test_an_enqueued_id_milvus_cannot_filter_on_is_dropped(stores):
    stores.ledger.enqueue(["d1", "bad\x00id"])
    report = make_worker(stores, FakeClock(TEN_AM), daily_quota=0).cycle()
    assert report.lazy["migrated"] == 1 and stores.ledger.enqueued() == []


def reset_page(stores, chunk_id: str) -> None:
    from repage.domain.records import ChunkChange

    identity = (chunk_id,)
    row = stores.vectors.find_by_identity([identity])[identity][0]
    stores.vectors.write_changes([ChunkChange(identity, row["chunk_id"], 0, row["image_r2_key"])])


def test_the_audit_runs_on_its_schedule_and_sends_drift_back_to_work(stores):
    scan_store(stores)
    clock = FakeClock(TEN_AM)
    # discovery off: it would find the reset page first (a page at 0 is also what it looks for)
    worker = make_worker(stores, clock, audit_every_s=3600.0, audit_sample=50, discover_every_s=None)
    first = worker.cycle()  # one batch, then the first audit
    assert first.trickle["documents"] == 3 and first.audit == {"checked": 3, "drifted": []}
    assert {d for d, s in states(stores).items() if s == State.VERIFIED} == {"d0", "d1", "d2"}
    reset_page(stores, "d2_1")  # a re-ingest wrote page 0 again
    assert worker.cycle().audit == {}  # the next batch; no audit due yet
    assert states(stores)["d2"] == State.VERIFIED
    clock.advance(3600)
    assert worker.cycle().audit == {"checked": 6, "drifted": ["d2"]}
    assert states(stores)["d2"] == State.DRIFTED
    assert worker.cycle().trickle["documents"] == 1  # repaired from its journal
    assert states(stores)["d2"] == State.MIGRATED
    want = expected_pages(stores.rows)["d2_1"]
    assert stores.vectors.find_by_identity([("d2_1",)])[("d2_1",)][0]["page"] == want


def test_no_audit_unless_asked(stores):
    scan_store(stores)
    worker = make_worker(stores, FakeClock(TEN_AM))
    assert worker.cycle().audit == {} and worker.cycle().audit == {}
    assert State.VERIFIED not in states(stores).values()


def test_the_worker_pauses_itself_after_max_failures_and_resume_continues(stores, monkeypatch):
    from repage.errors import StoreError
    from repage.migration.status import migration_status, pause_reason

    for row in stores.rows:
        if row["image_r2_key"]:
            stores.objects.put(row["image_r2_key"], b"png " + row["chunk_id"].encode())
    scan_store(stores)

    def refused(src: str, dst: str) -> None:
        raise StoreError(f"AccessDenied on {dst}: the bucket key was revoked")

    monkeypatch.setattr(stores.objects, "copy", refused)
    worker = Worker(
        stores,
        config=WorkerConfig(poll_seconds=1.0, tz=UTC, max_failures=2),
        limits=RunLimits(batch_size=1),
        options=RunOptions(move_images=True),
        clock=FakeClock(TEN_AM),
    )
    for _ in range(3):  # one batch (one document) per trickle cycle here
        assert not worker.cycle().paused
    failed = {d for d, s in states(stores).items() if s == State.FAILED}
    assert len(failed) == 3  # the third failure is one more than allowed: paused after its batch
    why = migration_status(stores.ledger, stores.settings.prices)["paused_because"]
    assert why is not None and "--max-failures 2 exceeded (3 failed)" in why
    held = worker.cycle()
    assert held.paused and held.documents == 0  # paused: the rest of the quota is not burnt
    monkeypatch.undo()  # the key is fixed; an admin resumes
    set_paused(stores.ledger, False)
    assert pause_reason(stores.ledger) is None
    assert worker.cycle().trickle["migrated"] == 1
    assert pause_reason(stores.ledger) is None  # the count started afresh at the resume


def test_without_max_failures_the_worker_keeps_going(stores, monkeypatch):
    from repage.errors import StoreError
    from repage.migration.status import pause_reason

    for row in stores.rows:
        if row["image_r2_key"]:
            stores.objects.put(row["image_r2_key"], b"png")
    scan_store(stores)
    monkeypatch.setattr(stores.objects, "copy", lambda src, dst: (_ for _ in ()).throw(StoreError("AccessDenied")))
    worker = Worker(stores, config=WorkerConfig(tz=UTC), limits=RunLimits(batch_size=2), clock=FakeClock(TEN_AM))
    for _ in range(3):  # two documents per cycle
        assert not worker.cycle().paused
    assert pause_reason(stores.ledger) is None
    assert all(s == State.FAILED for s in states(stores).values())


def test_a_daily_budget_holds_the_trickle_until_the_next_day(stores):
    from repage.migration.status import pause_reason

    for row in stores.rows:
        if row["image_r2_key"]:
            stores.objects.put(row["image_r2_key"], b"png")
    scan_store(stores)
    clock = FakeClock(TEN_AM)
    from repage.domain.estimate import worst_case_document_dollars

    one = worst_case_document_dollars(2, stores.settings.prices)  # every document here has 2 affected chunks
    worker = Worker(
        stores,
        config=WorkerConfig(tz=UTC, daily_budget_dollars=2 * one),
        limits=RunLimits(batch_size=6),
        options=RunOptions(move_images=True),
        clock=clock,
    )
    first = worker.cycle()
    assert first.trickle["migrated"] == 2, first  # what the day's budget pays for, reserved at worst case
    assert "budget" in first.trickle["stopped_because"]
    assert worker.cycle().trickle_skipped == "daily budget spent"
    clock.advance(86_400)
    assert worker.cycle().trickle["migrated"] == 2  # a new day, a new budget
    assert pause_reason(stores.ledger) is None  # a daily budget holds the trickle, it pauses nothing


@pytest.fixture
def slow_stores(milvus_lite_uri, tmp_path):
    """Two keys documents and one only reprocessing can fix (no key names a page, not a PDF)."""
    collection = unique_name("slow")
    rows = fltr_rows(["k0", "k1", "s0"])
    for row in rows:
        if row["document_id"] == "s0":
            row.update(filename="s0.docx", image_r2_key=None, image_size=None)
    create_store(milvus_lite_uri, collection, rows)
    settings = settings_for(milvus_lite_uri, collection, "memory://", f"sqlite:///{tmp_path}/ledger.db")
    with open_stores(settings) as opened:
        from repage.domain.keys import source_key_candidates

        fields = {"dataset_id": "ds", "document_id": "s0", "filename": "s0.docx"}
        opened.objects.put(source_key_candidates(settings.source_key_template, fields)[0], b"a word document")
        scan_store(opened)
        yield opened
        opened.vectors.drop_collection()


def test_a_lazily_requested_reprocess_document_stays_queued_until_reprocessing_is_allowed(slow_stores):
    from repage.domain.states import RepairPath

    stores = slow_stores
    assert stores.ledger.get("s0").path == RepairPath.REPROCESS
    stores.ledger.enqueue(["s0", "k0"])
    worker = make_worker(stores, FakeClock(TEN_AM), daily_quota=0)
    assert worker.cycle().lazy["migrated"] == 1  # k0; s0 needs the slow path
    assert states(stores)["s0"] == State.PENDING and stores.ledger.enqueued() == ["s0"]  # still queued
    allowed = make_worker(stores, FakeClock(TEN_AM), daily_quota=0, allow_reprocess=True)
    report = allowed.cycle()
    assert report.lazy["documents"] == 1  # claimed by the slow path (no backend set up here: it fails, named)
    assert states(stores)["s0"] != State.PENDING and stores.ledger.enqueued() == []

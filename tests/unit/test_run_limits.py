"""Each run limit is honoured (docs/design.md §11): the CLI's flags reach RunLimits, and the
Runner, on an injected clock and a real Milvus Lite store, stops or waits as each one says."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from repage import api
from repage.cli import app
from repage.errors import StoreError
from repage.migration.runner import MIN_DOCS_FOR_ERROR_RATE, RunLimits, Runner, Selection
from repage.migration.scan import scan_store
from repage.migration.work import RunOptions
from repage.stores.open import open_stores
from repage.stores.throttle import FakeClock
from tests.fixtures.milvus import unique_name
from tests.support.service_store import create_store, fltr_rows, settings_for

DOCS = [f"r{i}" for i in range(MIN_DOCS_FOR_ERROR_RATE + 4)]


@pytest.fixture
def stores(milvus_lite_uri, tmp_path):
    collection = unique_name("limits")
    rows = fltr_rows(DOCS)
    create_store(milvus_lite_uri, collection, rows)
    settings = settings_for(milvus_lite_uri, collection, "memory://", f"sqlite:///{tmp_path}/ledger.db")
    with open_stores(settings) as opened:
        for row in rows:
            if row["image_r2_key"]:
                opened.objects.put(row["image_r2_key"], b"png")
        scan_store(opened)
        yield opened
        opened.vectors.drop_collection()


def run(stores, clock: FakeClock, **limits):
    limits.setdefault("batch_size", 1)
    return Runner(stores, RunOptions(move_images=False), RunLimits(**limits), Selection(), clock=clock).run()


def test_pause_waits_between_batches_on_the_clock(stores):
    clock = FakeClock(0.0)
    summary = run(stores, clock, pause_seconds=7.0, limit=3)
    assert summary.batches == 3 and clock.now() == pytest.approx(14.0, abs=1.0)  # two pauses, none after the last


def test_max_duration_stops_between_batches(stores):
    clock = FakeClock(0.0)
    summary = run(stores, clock, pause_seconds=10.0, max_duration_seconds=25.0)
    assert summary.batches == 3 and summary.stopped_because.startswith("--max-duration")


def test_milvus_writes_per_second_spaces_the_writes(stores):
    clock = FakeClock(0.0)
    summary = run(stores, clock, milvus_writes_per_second=0.5, limit=4)
    assert summary.batches == 4 and clock.now() >= 5.9  # 4 writes at 0.5/s: 3 waits of 2 s (a burst of 1)


def test_max_error_rate_stops_a_run_that_fails_too_often(stores, monkeypatch):
    def refused(src: str, dst: str) -> None:
        raise StoreError("AccessDenied")

    monkeypatch.setattr(stores.objects, "copy", refused)
    clock = FakeClock(0.0)
    summary = Runner(stores, RunOptions(), RunLimits(batch_size=2, max_error_rate=0.5), Selection(), clock=clock).run()
    assert summary.stopped_because.startswith("--max-error-rate"), summary
    assert summary.documents == MIN_DOCS_FOR_ERROR_RATE < len(DOCS)


def ledger_calls(stores, monkeypatch) -> list[str]:
    """The run's claims and settled batches, in order: C<n> claimed n documents, M<n> migrated n."""
    calls: list[str] = []
    ledger = stores.ledger
    claim_batch, transition_many = ledger.claim_batch, ledger.transition_many

    def claim(*args, **kwargs):
        claims = claim_batch(*args, **kwargs)
        calls.append(f"C{len(claims)}")
        return claims

    def settle(state, items):
        calls.append(f"M{len(items)}")
        return transition_many(state, items)

    monkeypatch.setattr(ledger, "claim_batch", claim)
    monkeypatch.setattr(ledger, "transition_many", settle)
    return calls


@pytest.mark.parametrize("plan_ahead, order", [(True, "C1 C1 M1 C1 M1 M1"), (False, "C1 M1 C1 M1 C1 M1")])
def test_plan_ahead_claims_the_next_batch_before_this_one_settles(stores, monkeypatch, plan_ahead, order):
    calls = ledger_calls(stores, monkeypatch)
    summary = run(stores, FakeClock(0.0), limit=3, plan_ahead=plan_ahead)
    assert (summary.migrated, " ".join(calls)) == (3, order)


def test_a_batch_claimed_ahead_goes_back_to_pending_when_the_run_stops(stores):
    runner = Runner(stores, RunOptions(move_images=False), RunLimits(batch_size=2), Selection(), clock=FakeClock(0.0))
    runner.on_batch = lambda summary: runner.stop.set()
    summary = runner.run()
    states = {d: stores.ledger.get(d).state for d in DOCS}
    assert (summary.documents, summary.stopped_because) == (2, "stop requested")
    assert sorted(states.values()).count("migrated") == 2 and "running" not in states.values()
    assert sum(1 for s in states.values() if s == "pending") == len(DOCS) - 2


FLAGS = {
    "--pause": ("2.5", "pause_seconds", 2.5),
    "--milvus-writes-per-second": ("3", "milvus_writes_per_second", 3.0),
    "--object-ops-per-second": ("40", "object_ops_per_second", 40.0),
    "--max-error-rate": ("0.25", "max_error_rate", 0.25),
    "--max-failures": ("4", "max_failures", 4),
    "--max-duration": ("2m", "max_duration_seconds", 120.0),
    "--budget": ("1.5", "budget_dollars", 1.5),
    "--limit": ("9", "limit", 9),
    "--batch-size": ("7", "batch_size", 7),
    "--concurrency": ("3", "concurrency", 3),
    "--no-plan-ahead": (None, "plan_ahead", False),
}


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_every_run_flag_reaches_the_run_limits(flag, monkeypatch, tmp_path):
    seen = {}

    def fake_run(settings, options, limits, selection, **kwargs):
        seen["limits"] = limits
        return {"failed": 0, "documents": 0, "migrated": 0}

    monkeypatch.setattr(api, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    value, field, want = FLAGS[flag]
    args = [flag] if value is None else [flag, value]
    result = CliRunner().invoke(app, ["run", *args, "--json"], env={"REPAGE_LEDGER_URL": f"sqlite:///{tmp_path}/l.db"})
    assert result.exit_code == 0, result.output
    assert getattr(seen["limits"], field) == want

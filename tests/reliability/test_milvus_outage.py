"""Milvus outage (docs/design.md §11, §13): the `milvus-lite server` process is SIGKILLed while
`repage run` migrates, and started again on the same data folder and port.

The run either rides the outage out (backs off, resumes) or stops cleanly (failed documents,
the breaker); a re-run (`--retry-failed`) finishes. Either way no chunk row is lost or
doubled, `verify` passes and the store equals a complete migration.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.milvus import MILVUS_LITE, _free_port, _wait_until_answers
from tests.reliability.stores import check_clone, clone_folder, make_template
from tests.support import wait_for
from tests.support.reliability import CliLog

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

KEYS_DOCS = 21
OUTAGE_SECONDS = 2.0


class LiteServer:
    """A `milvus-lite server` this test owns: it can be killed and started again on its folder and port."""

    def __init__(self, root: Path):
        self.data_dir = root / "milvus.db"
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "milvus-server.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> LiteServer:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [
                    str(MILVUS_LITE),
                    "server",
                    "--data-dir",
                    str(self.data_dir),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_until_answers(self.uri, self.proc)
        self.starts += 1
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def lite(tmp_path):
    server = LiteServer(tmp_path).start()
    yield server
    server.stop()


def ledger_states(path: Path) -> dict[str, int]:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return dict(conn.execute("SELECT state, count(*) FROM documents GROUP BY state").fetchall())
    except sqlite3.Error:
        return {}


@pytest.mark.parametrize("kill_when", ["first-migrated", "first-claim"])
def test_milvus_killed_mid_run_and_restarted_loses_nothing(trial, lite, tmp_path, kill_when):
    trial.name = f"milvus-outage-{kill_when}"
    template = make_template(lite.uri, tmp_path / "template", keys_docs=KEYS_DOCS)
    workdir = tmp_path / "work"
    workdir.mkdir()
    clone = clone_folder(template, lite.uri, workdir)
    cli = CliLog()
    # --pause: the run takes a few seconds, so the kill lands in its middle
    proc = cli.start("run", "--json", "--pause", "0.3", env=clone.env, cwd=workdir)
    state = "migrated" if kill_when == "first-migrated" else "running"
    wait_for(
        lambda: proc.poll() is not None or ledger_states(workdir / "ledger.db").get(state),
        f"a {state} document",
        every=0.02,
    )  # the run must be caught mid-flight
    assert proc.poll() is None, "the run ended before the outage"
    lite.kill()
    trial.faults = 1
    time.sleep(OUTAGE_SECONDS)  # the outage itself: Milvus stays down this long, nothing waits on it
    lite.start()
    first = cli.finish(proc)
    outcome = describe(first)
    trial.detail.update(first_run=outcome)

    partial = trial.compared(check_clone(clone, final=False))
    assert partial.ok, f"after the outage ({outcome}):\n" + partial.report()
    if outcome != "completed":
        rerun = cli.run("run", "--retry-failed", "--json", env=clone.env, cwd=workdir)
        assert rerun.returncode == 0 and rerun.json()["failed"] == 0, str(rerun)
    verified = cli.run("verify", "--json", env=clone.env, cwd=workdir)
    trial.verified(verified)
    assert verified.returncode == 0 and verified.json()["ok"], str(verified)
    final = trial.compared(check_clone(clone, final=True))
    assert final.ok, f"after the outage ({outcome}) and the re-run:\n" + final.report()


def describe(result) -> str:
    """completed | a clean stop; anything else (a crash, a traceback, no summary) fails."""
    if result.returncode == 0:
        summary = result.json()
        assert summary["failed"] == 0 and summary["stopped_because"] == "no more pending documents", summary
        return "completed"
    assert result.returncode in (1, 2), str(result)
    if not result.stdout.strip():
        return f"stopped: {result.stderr.strip().splitlines()[-1][:160]}"
    summary = result.json()
    return (
        f"stopped ({summary['stopped_because']}) with {summary['failed']} failed: "
        f"{next(iter(summary['errors'].values()), '')[:160]}"
    )


def test_an_outage_longer_than_the_waits_stops_the_run_cleanly_and_fails_nothing(trial, milvus_server_uri, tmp_path):
    """Milvus stays down through every wait: the batch goes back to pending (no document failed,
    no attempt counted, nothing left running), the run says why, and the next run finishes."""
    trial.name = "milvus-outage-longer-than-waits"
    from repage.errors import StoreUnavailable
    from repage.migration.runner import UNAVAILABLE_WAITS, RunLimits, Runner, Selection
    from repage.migration.scan import scan_store
    from repage.migration.work import RunOptions
    from repage.stores.throttle import FakeClock

    template = make_template(milvus_server_uri, tmp_path / "template", keys_docs=4, seed=5)
    workdir = tmp_path / "work"
    workdir.mkdir()
    clone = clone_folder(template, milvus_server_uri, workdir)
    try:
        with clone.open() as stores:
            scan_store(stores)
            real, real_by_pks = stores.vectors.fetch_documents, stores.vectors.fetch_by_pks
            down = {"calls": 0}

            def unavailable(*args, **kwargs):
                down["calls"] += 1
                raise StoreUnavailable("Milvus at http://127.0.0.1:1 does not answer: server unavailable")

            stores.vectors.fetch_documents = stores.vectors.fetch_by_pks = unavailable
            clock = FakeClock()
            summary = Runner(stores, RunOptions(), RunLimits(batch_size=3), Selection(), clock=clock).run()
            trial.faults = down["calls"]
            assert summary.stopped_because.startswith("a store is unavailable"), summary
            assert summary.failed == 0 and summary.unavailable, summary
            # one read per attempt, and one by the batch planned ahead (docs/design.md §5.10), released with it
            assert down["calls"] == len(UNAVAILABLE_WAITS) + 2 and clock.sleeps == list(UNAVAILABLE_WAITS)
            records = list(stores.ledger.documents())
            assert {r.state for r in records if r.path.value == "keys"} == {"pending"}, records
            assert all(r.attempts == 0 and r.lease_owner is None for r in records)

            stores.vectors.fetch_documents, stores.vectors.fetch_by_pks = real, real_by_pks  # the outage is over
            again = Runner(stores, RunOptions(), RunLimits(batch_size=3), Selection()).run()
            assert again.failed == 0 and again.migrated == 4, again
        from repage.migration.verify import verify_documents

        with clone.open() as stores:
            report = verify_documents(stores)
        trial.verified(report)
        assert not report.failed, report
        final = trial.compared(check_clone(clone, final=True))
        assert final.ok, final.report()
    finally:
        clone.drop()

"""`repage status --watch N --json` (docs/design.md §6.4): JSON Lines, one report per line, each flushed
as it is made. The real CLI as a subprocess on a real SQLite ledger; lines are read as they come."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading

import pytest

from repage.domain.records import ScanRecord
from repage.domain.states import RepairPath, State
from repage.stores.ledger import Ledger
from tests.support import APP_ENV, repage_command

pytestmark = pytest.mark.slow
LINE_TIMEOUT = 60.0  # a report that is made but not flushed never arrives: the reader fails after this


def scan_records(*docs: str) -> list[ScanRecord]:
    return [ScanRecord(d, "ds", f"{d}.pdf", RepairPath.KEYS, State.PENDING, "legacy keys", 3) for d in docs]


@pytest.fixture
def ledger_url(tmp_path):
    url = f"sqlite:///{tmp_path}/ledger.db"
    ledger = Ledger(url)
    ledger.upsert_scan(scan_records("doc-1", "doc-2"))
    ledger.close()
    return url


def status(ledger_url: str, *args: str) -> tuple[list[str], dict]:
    # PYTHONUNBUFFERED off: a user's pipe is block-buffered, and only repage's own flush gets a line out
    drop = {*APP_ENV, "PYTHONUNBUFFERED"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPAGE_") and k not in drop}
    return [*repage_command(), "--ledger-url", ledger_url, "status", *args], env


def test_a_bounded_watch_prints_one_json_object_per_line(ledger_url):
    command, env = status(ledger_url, "--watch", "0.01", "--json", "--count", "3")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and proc.stdout.endswith("\n")
    reports = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and r["documents"] == 2 and r["todo"] == 2 for r in reports)


def test_without_watch_json_is_one_document(ledger_url):
    command, env = status(ledger_url, "--json")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["documents"] == 2


class LineReader:
    """Lines of a process's stdout, handed over by a thread as each arrives."""

    def __init__(self, stream):
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=lambda: [self.lines.put(line) for line in stream], daemon=True)
        self.thread.start()

    def next(self) -> dict:
        try:
            line = self.lines.get(timeout=LINE_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no report line within {LINE_TIMEOUT} s: not flushed per line") from None
        assert line.endswith("\n") and line.count("\n") == 1
        return json.loads(line)


def watching(ledger_url: str, every: str):
    """`status --watch EVERY --json` running, and a reader of its lines; terminated afterwards."""
    command, env = status(ledger_url, "--watch", every, "--json")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, LineReader(proc.stdout)


def stop(proc: subprocess.Popen, reader: LineReader) -> None:
    proc.terminate()
    proc.wait(timeout=30)
    reader.thread.join(timeout=30)  # it reads to the end of the stream before the stream closes
    proc.stdout.close()
    proc.stderr.close()


def test_each_report_is_flushed_as_it_is_made(ledger_url):
    proc, reader = watching(ledger_url, "600")  # the next report is ten minutes away
    try:
        assert reader.next()["documents"] == 2  # the first arrives now, not when a buffer fills or the process ends
        assert proc.poll() is None
    finally:
        stop(proc, reader)


def test_every_report_reads_the_ledger_again(ledger_url):
    proc, reader = watching(ledger_url, "0.05")
    try:
        assert reader.next()["documents"] == 2
        ledger = Ledger(ledger_url)
        ledger.upsert_scan(scan_records("doc-3"))
        ledger.close()
        while (report := reader.next())["documents"] != 3:  # a later report sees the new document
            assert report["documents"] == 2
    finally:
        stop(proc, reader)

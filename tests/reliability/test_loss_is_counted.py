"""The suite's own figures can be trusted: a loss is counted and fails the summary.

- The summary exits non-zero on a failed trial, on a lost document or chunk, and on no
  figures at all; it counts failed trials and prints them.
- End to end: a real trial (Milvus down longer than the run's waits) run by a nested pytest
  with REPAGE_TEST_INJECT_LOSS=1, which corrupts one chunk's page in Milvus after the run and
  before the comparison with the ground truth (tests/support/ground_truth.py). The trial fails,
  still writes its line (lost 1 document, 1 chunk, failed), and the summary on those results
  exits non-zero showing lost = 1: what `REPAGE_TEST_INJECT_LOSS=1 make reliability` does to
  every trial that compares a store.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ground_truth import INJECT_ENV
from tests.support.reliability import RESULTS_ENV

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRIAL = (
    "tests/reliability/test_milvus_outage.py::"
    "test_an_outage_longer_than_the_waits_stops_the_run_cleanly_and_fails_nothing"
)
LOST = re.compile(r"lost = (\d+) of (\d+) documents compared \((\d+) of (\d+) chunks\)")


def summary(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.support.reliability", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def line(**figures) -> str:
    row = {
        "test": "t",
        "trials": 1,
        "faults": 1,
        "documents_verified": 3,
        "documents_compared": 3,
        "chunks_compared": 9,
        "lost": 0,
        "lost_chunks": 0,
        "failed": False,
        "error": None,
    }
    return json.dumps(row | figures) + "\n"


def test_the_summary_fails_on_a_failed_trial_a_loss_or_no_figures(trial, tmp_path):
    trial.trials = 0  # a check of the suite's machinery, not a trial of repage
    results = tmp_path / "results.jsonl"
    results.write_text(line() + line(test="u"), encoding="utf-8")
    ok = summary(results)
    assert ok.returncode == 0, ok
    assert ok.stdout.strip() == (
        "reliability: 2 trials run (2 tests, 0 failed), 2 faults injected, 6 documents "
        "verified, lost = 0 of 6 documents compared (0 of 18 chunks)"
    ), ok.stdout

    results.write_text(line() + line(test="broken", failed=True, error="AssertionError: boom\nmore"), encoding="utf-8")
    failed = summary(results)
    assert failed.returncode == 1 and "(2 tests, 1 failed)" in failed.stdout, failed
    assert "FAILED broken: AssertionError: boom" in failed.stderr, failed.stderr

    for lost in ({"lost": 1, "lost_chunks": 1}, {"lost_chunks": 1}):
        results.write_text(line() + line(**lost), encoding="utf-8")
        result = summary(results)
        assert result.returncode == 1, (lost, result)

    results.write_text("", encoding="utf-8")
    assert summary(results).returncode == 1
    assert summary(tmp_path / "never-written.jsonl").returncode == 1


def test_an_injected_loss_is_recorded_by_the_failing_trial_and_fails_the_summary(trial, tmp_path):
    trial.faults = 1  # the injected loss
    results = tmp_path / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in (RESULTS_ENV, INJECT_ENV)}
    env.update({RESULTS_ENV: str(results), INJECT_ENV: "1"})
    inner = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TRIAL],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert inner.returncode == 1, f"the trial should fail on the injected loss:\n{inner.stdout[-3000:]}"

    rows = [json.loads(x) for x in results.read_text(encoding="utf-8").splitlines() if x.strip()]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["test"] == "milvus-outage-longer-than-waits" and row["failed"], row
    assert (row["lost"], row["lost_chunks"]) == (1, 1), row  # the one corrupted chunk, nothing else
    assert "lost = 1 of" in (row["error"] or ""), row["error"]
    assert row["documents_verified"] >= 1, row  # verify ran before the corruption and passed

    result = summary(results)
    assert result.returncode == 1, result
    figures = LOST.search(result.stdout)
    assert figures and int(figures.group(1)) >= 1 and int(figures.group(3)) >= 1, result.stdout
    assert "1 failed" in result.stdout and "FAILED milvus-outage-longer-than-waits" in result.stderr, result
    trial.detail.update(injected_summary=result.stdout.strip())

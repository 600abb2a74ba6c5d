"""Shared fixtures. Each store's servers live in tests/fixtures/<store>.py.

And no silent skips: with env CI set (CI runs everything), a skipped test or module fails
the run, naming the reason; elsewhere the run's last line sums the skips up by reason.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.milvus",
    "tests.fixtures.ledger",
    "tests.fixtures.proxy",
    "tests.fixtures.demo",
]


def _skip_reason(report) -> str:
    """'Skipped: why' of a skip's longrepr (path, line, message), as one line without the prefix."""
    text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return " ".join(text.removeprefix("Skipped: ").split())


def _fail_skip_in_ci(report) -> None:
    """Turn a skip into a failure when CI is set. It runs where the report is made (an xdist
    worker too), before the report travels to the terminal: every reporter sees a failure."""
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    where = f"{report.longrepr[0]}:{report.longrepr[1]}: " if isinstance(report.longrepr, tuple) else ""
    report.longrepr = f"{where}skipped, but CI must run every test: {_skip_reason(report)}"
    report.outcome = "failed"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_skip_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    report = yield  # a module-level pytest.skip / importorskip skips the whole file here
    _fail_skip_in_ci(report)
    return report


def pytest_unconfigure(config) -> None:
    """Print the skips by reason as the run's very last line (after pytest's own counts)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if not skipped or hasattr(config, "workerinput"):
        return
    reasons = Counter(_skip_reason(r) for r in skipped)
    listed = "; ".join(f"{n} x {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    reporter.write_line(f"{len(skipped)} skipped (CI=true would fail them): {listed}", yellow=True, bold=True)

"""Every reliability test is a trial that writes its figures, whatever happens.

The `trial` fixture (autouse, so set up before the test's other function fixtures and torn
down after them) hands the test a tests.support.reliability.Trial to fill in, and writes
it in its teardown with the outcome of the test's setup and call, taken from their reports:
a test that fails, before or after it measured a loss, still adds its line, flagged.
"""

from __future__ import annotations

import pytest

from tests.support.reliability import Trial

REPORTS = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    # The report itself, read in the teardown: another hook may still change its outcome (with
    # CI set, tests/conftest.py turns a skip into a failure).
    item.stash.setdefault(REPORTS, {})[report.when] = (report, call.excinfo)
    return report


def _error(report, excinfo) -> str:
    if excinfo is not None and not excinfo.errisinstance(pytest.skip.Exception):
        return excinfo.exconly()
    return report.longreprtext


@pytest.fixture(autouse=True)
def trial(request):
    trial = Trial(request.node.name)
    yield trial
    reports = request.node.stash.get(REPORTS, {})
    phases = [(when, *reports[when]) for when in ("setup", "call") if when in reports]
    errors = [f"{when}: {_error(report, excinfo)}" for when, report, excinfo in phases if report.failed]
    trial.write(
        failed=bool(errors),
        error="\n".join(errors)[:4000] or None,
        skipped=any(report.skipped for _, report, _ in phases),
    )

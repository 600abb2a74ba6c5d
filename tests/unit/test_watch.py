"""The worker's stop rule (repage/domain/watch.py)."""

from __future__ import annotations

from repage.domain.watch import FailureWatch


def test_max_failures_counts_failed_documents_until_a_reset():
    watch = FailureWatch(max_failures=2)
    watch.add(documents=5, failed=2)
    assert watch.reason() is None
    watch.add(documents=1, failed=1)
    assert watch.reason() == "--max-failures 2 exceeded (3 failed)"
    watch.reset()
    assert watch.reason() is None


def test_error_rate_over_a_sliding_window():
    watch = FailureWatch(max_error_rate=0.5, window=20)
    watch.add(documents=4, failed=4)
    assert watch.reason() is None  # too few documents to judge a ratio
    watch.add(documents=6, failed=1)
    assert watch.reason() is None  # 5 of 10: not above one half
    watch.add(documents=1, failed=1)
    assert watch.reason() == "--max-error-rate 0.5 exceeded (6 of the last 11 failed)"
    watch.add(documents=20, failed=0)  # the failures slide out of the window
    assert watch.reason() is None


def test_no_limits_never_stop():
    watch = FailureWatch()
    watch.add(documents=1000, failed=1000)
    assert watch.reason() is None

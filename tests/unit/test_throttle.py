"""Throttle: token bucket rate, AIMD limiter, retry with backoff. All on FakeClock except
one multi-threaded check on the real clock (~1 s)."""

from __future__ import annotations

import random
import threading
from bisect import bisect_left

import pytest

from repage.errors import StoreError, Throttled, Transient
from repage.stores.throttle import AdaptiveLimiter, FakeClock, SystemClock, TokenBucket, call_with_backoff


def acquisition_times(bucket: TokenBucket, clock: FakeClock, count: int) -> list[float]:
    times = []
    for _ in range(count):
        bucket.acquire()
        times.append(clock.now())
    return times


def window_counts(times: list[float], width: float) -> list[int]:
    """Counts in [t, t + width) for each t that starts a window lying wholly inside the run."""
    end = times[-1]
    return [bisect_left(times, t + width) - i for i, t in enumerate(times) if t + width <= end]


# ---- token bucket ---------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.5, 3.0, 20.0, 250.0])
def test_bucket_rate_holds_in_every_5_second_window(rate):
    clock = FakeClock()
    times = acquisition_times(TokenBucket(rate, clock=clock), clock, int(rate * 60) + 2)
    counts = window_counts(times, 5.0)
    assert counts and all(abs(c - rate * 5) <= max(1, 0.1 * rate * 5) for c in counts), (min(counts), max(counts))
    assert times[-1] == pytest.approx((len(times) - 1) / rate)


def test_bucket_first_acquire_is_free_and_burst_is_bounded():
    clock = FakeClock()
    bucket = TokenBucket(10.0, burst=3, clock=clock)
    acquisition_times(bucket, clock, 3)
    assert clock.sleeps == []
    bucket.acquire()
    assert clock.sleeps == [pytest.approx(0.1)]


def test_bucket_does_not_repay_a_backlog_as_a_burst():
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock)
    bucket.acquire()
    clock.advance(60)  # idle for a minute: with burst 1 at most one free acquisition
    bucket.acquire()
    bucket.acquire()
    assert clock.sleeps == [pytest.approx(0.1)]


def test_bucket_charges_large_requests_after_the_fact():
    clock = FakeClock()
    bucket = TokenBucket(100.0, clock=clock)
    assert bucket.acquire(50) == 0.0  # a 50-row batch goes now...
    assert bucket.acquire(1) == pytest.approx(0.5)  # ...and the next unit waits for it


def test_unlimited_bucket_never_sleeps():
    clock = FakeClock()
    bucket = TokenBucket(None, clock=clock)
    for _ in range(10_000):
        bucket.acquire()
    assert clock.sleeps == [] and clock.now() == 0.0 and bucket.acquired == 10_000


def test_bucket_rate_can_change():
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock)
    bucket.acquire()
    bucket.set_rate(2.0)
    bucket.acquire()  # slot reserved at the old rate
    bucket.acquire()
    assert clock.sleeps == [pytest.approx(0.1), pytest.approx(0.5)]
    bucket.set_rate(None)
    bucket.acquire()
    assert len(clock.sleeps) == 2


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_bucket_rejects_bad_rates(bad):
    with pytest.raises(ValueError):
        TokenBucket(bad)


def test_threads_share_the_rate_on_the_real_clock():
    rate, run_s, threads = 200.0, 1.0, 8
    bucket = TokenBucket(rate, clock=SystemClock())
    clock = SystemClock()
    stamps: list[float] = []
    lock = threading.Lock()
    deadline = clock.now() + run_s

    def worker() -> None:
        while True:
            bucket.acquire()
            now = clock.now()
            if now >= deadline:
                return
            with lock:
                stamps.append(now)

    started = clock.now()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    in_run = [s for s in stamps if started <= s < started + run_s]
    assert abs(len(in_run) - rate * run_s) <= 0.1 * rate * run_s, len(in_run)


# ---- adaptive limiter ------------------------------------------------------------------


def limiter(clock: FakeClock, **options) -> AdaptiveLimiter:
    return AdaptiveLimiter(20.0, clock, rng=random.Random(7), **options)


def test_throttle_halves_the_rate_and_holds_for_retry_after():
    clock = FakeClock()
    lim = limiter(clock)
    assert lim.on_throttled(retry_after=2.5) == 2.5
    assert lim.current_rate == 10.0 and lim.throttled_count == 1
    lim.acquire()
    assert sum(clock.sleeps) == pytest.approx(2.5)


def test_throttle_without_retry_after_backs_off_with_growing_jitter():
    clock = FakeClock()
    lim = limiter(clock, backoff_initial=0.1)
    holds = [lim.on_throttled() for _ in range(4)]
    for attempt, hold in enumerate(holds, start=1):
        step = 0.1 * 2 ** (attempt - 1)
        assert step / 2 <= hold <= step
    lim.on_success(0.01)
    assert 0.05 <= lim.on_throttled() <= 0.1  # a success resets the streak


def test_throttles_within_the_cooldown_cut_the_rate_once():
    clock = FakeClock()
    lim = limiter(clock, cooldown_s=1.0)
    for _ in range(5):  # five threads hit by the same 503 burst
        lim.on_throttled()
    assert lim.current_rate == 10.0 and lim.throttled_count == 5
    clock.advance(1.0)
    lim.on_throttled()
    assert lim.current_rate == 5.0


def test_rate_never_drops_below_min_rate():
    clock = FakeClock()
    lim = limiter(clock, min_rate=4.0)
    for _ in range(10):
        lim.on_throttled()
        clock.advance(2.0)
    assert lim.current_rate == 4.0


def test_rate_recovers_additively_up_to_max_rate():
    clock = FakeClock()
    lim = limiter(clock)  # default step: max_rate / 20 = 1 req/s per saturated second
    lim.on_throttled()
    rates = []
    for _ in range(400):
        lim.on_success(0.01)
        rates.append(lim.current_rate)
    assert rates[0] == pytest.approx(10.1)
    assert rates == sorted(rates) and rates[-1] == 20.0
    # additive: about step * seconds; 10 -> 20 needs ~ sum of r over the climb = 150 successes
    assert 140 <= rates.index(20.0) <= 160


def test_rising_latency_slows_down_and_a_new_normal_is_learned():
    clock = FakeClock()
    lim = limiter(clock)
    for _ in range(10):
        lim.on_success(0.010)
    assert lim.current_rate == 20.0 and lim.baseline_latency == pytest.approx(0.010)
    lim.on_success(0.050)  # 5x the baseline: write latency is rising
    assert lim.current_rate == 10.0 and lim.slowdowns == 1
    assert lim.baseline_latency == pytest.approx(0.012)  # the spike counted as only 2x
    clock.advance(1.0)
    lim.on_success(0.050)
    assert lim.current_rate == 5.0 and lim.slowdowns == 2
    for _ in range(30):
        clock.advance(1.0)
        lim.on_success(0.050)  # a lasting 50 ms becomes the baseline; no more cuts
    assert lim.baseline_latency == pytest.approx(0.050, rel=0.05)
    assert lim.slowdowns < 8 and lim.current_rate > 5.0


def test_latency_is_ignored_until_the_baseline_is_warm():
    lim = limiter(FakeClock())
    lim.on_success(0.01)
    lim.on_success(1.0)
    assert lim.slowdowns == 0 and lim.current_rate == 20.0


def test_unlimited_limiter_starts_from_observed_throughput():
    clock = FakeClock()
    lim = AdaptiveLimiter(None, clock, rng=random.Random(1))
    for _ in range(300):  # 300 acquisitions in 1.5 s: ~200/s observed
        lim.acquire()
        clock.advance(0.005)
    assert lim.current_rate is None and clock.sleeps == []
    lim.on_throttled(retry_after=0)
    assert lim.current_rate == pytest.approx(100.0, rel=0.1)
    for _ in range(100):
        lim.on_success(0.01)
    assert lim.current_rate > 100.0


# ---- call_with_backoff -------------------------------------------------------------------


class Flaky:
    """Raises Throttled for the first `failures` calls; each call takes `latency` fake seconds."""

    def __init__(self, clock: FakeClock, failures: int, retry_after: float | None = None, latency: float = 0.01):
        self.clock, self.failures, self.retry_after, self.latency = clock, failures, retry_after, latency
        self.calls: list[float] = []

    def __call__(self) -> str:
        self.calls.append(self.clock.now())
        self.clock.advance(self.latency)
        if len(self.calls) <= self.failures:
            raise Throttled("503 SlowDown", retry_after=self.retry_after)
        return "ok"


def test_call_with_backoff_retries_then_succeeds_and_slows_down():
    clock = FakeClock()
    lim = limiter(clock)
    fn = Flaky(clock, failures=3)
    assert call_with_backoff(fn, lim, clock=clock, rng=random.Random(3)) == "ok"
    assert len(fn.calls) == 4 and lim.throttled_count == 3
    assert lim.current_rate < 20.0 and lim.baseline_latency == pytest.approx(0.01)
    gaps = [b - a for a, b in zip(fn.calls, fn.calls[1:])]
    assert all(gap >= 0.05 for gap in gaps) and gaps[2] > gaps[0]  # exponential


def test_call_with_backoff_gives_up_after_attempts():
    clock = FakeClock()
    lim = limiter(clock)
    fn = Flaky(clock, failures=100)
    with pytest.raises(Throttled, match="SlowDown"):
        call_with_backoff(fn, lim, attempts=5, clock=clock, backoff_max=1.0)
    assert len(fn.calls) == 5 and lim.throttled_count == 5


@pytest.mark.parametrize("adaptive", [True, False], ids=["limiter-holds", "backoff-waits"])
def test_call_with_backoff_respects_retry_after(adaptive):
    clock = FakeClock()
    fn = Flaky(clock, failures=2, retry_after=3.0)
    call_with_backoff(fn, limiter(clock) if adaptive else TokenBucket(None, clock=clock), clock=clock)
    assert [b - a for a, b in zip(fn.calls, fn.calls[1:])] == [pytest.approx(3.01), pytest.approx(3.01)]


def test_call_with_backoff_retries_transient_errors_without_cutting_the_rate():
    """A 500 or a reset connection (Transient) is retried with backoff like a throttle, but it is
    no "slow down": the limiter's rate and throttle count stay as they were."""
    clock = FakeClock()
    lim = limiter(clock)
    calls = []

    def flaky():
        calls.append(clock.now())
        if len(calls) <= 2:
            raise Transient("HTTP 500 InternalError")
        return "ok"

    rate = lim.current_rate
    assert call_with_backoff(flaky, lim, clock=clock, rng=random.Random(1)) == "ok"
    assert len(calls) == 3 and lim.throttled_count == 0 and lim.current_rate >= rate
    assert all(b - a >= 0.05 for a, b in zip(calls, calls[1:]))  # a real wait between tries


def test_call_with_backoff_passes_other_errors_through_at_once():
    clock = FakeClock()
    lim = limiter(clock)
    calls = []

    def broken():
        calls.append(1)
        raise StoreError("500")

    with pytest.raises(StoreError):
        call_with_backoff(broken, lim, clock=clock)
    assert calls == [1] and lim.throttled_count == 0


def test_call_with_backoff_works_with_a_plain_bucket_and_charges_cost():
    clock = FakeClock()
    bucket = TokenBucket(100.0, clock=clock)
    fn = Flaky(clock, failures=1, latency=0.0)
    assert call_with_backoff(fn, bucket, cost=10, rng=random.Random(0)) == "ok"
    assert bucket.acquired == 20


def test_latency_window_ignores_one_stall_but_not_a_majority():
    clock = FakeClock()
    lim = AdaptiveLimiter(20.0, clock, latency_window=5)
    for _ in range(10):
        lim.on_success(0.100)
    lim.on_success(1.0)  # one stall in the window: the median is still 100 ms
    assert lim.slowdowns == 0 and lim.current_rate == 20.0
    for _ in range(3):
        clock.advance(1.0)
        lim.on_success(1.0)  # now most recent replies are slow
    assert lim.slowdowns >= 1 and lim.current_rate < 20.0


def test_microsecond_latencies_never_count_as_slow():
    """A local store answers in microseconds; doubling that is noise, not load."""
    lim = AdaptiveLimiter(20.0, FakeClock())
    for _ in range(10):
        lim.on_success(0.00005)
    lim.on_success(0.0009)  # 18x the baseline, but under the 50 ms floor
    assert lim.slowdowns == 0 and lim.current_rate == 20.0

"""Rate limits and adaptive backoff for bucket and Milvus requests (docs/design.md §11).

The SDKs' own retries are off (§7), so that throttling reaches this module.

- `TokenBucket`: a fixed rate, shared by threads.
- `AdaptiveLimiter`: AIMD on top of a bucket. It halves the rate when the store
  throttles (429/503 SlowDown, Milvus rate limit) or when latency climbs, and adds it
  back slowly while requests succeed.
- `call_with_backoff`: one request, retried on `Throttled` with jittered exponential
  backoff. The limiter hears about every throttle and every success.

Time comes from an injected `Clock`. The unit tests run on `FakeClock` and never sleep.
No vendor SDK is imported here: the adapters translate vendor errors to `Throttled`
(obstore's and pymilvus' own retries are off), and this module decides how long to wait.
"""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, TypeVar

import tenacity

from repage.errors import Throttled, Transient

T = TypeVar("T")
_Rate = TypeVar("_Rate", bound=float | None)  # check_rate returns what it is given


class Clock(Protocol):
    def now(self) -> float: ...  # monotonic seconds

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock:
    """Test clock: `sleep` moves `now` forward at once and records the call."""

    def __init__(self, start: float = 0.0):
        self._now = start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._now += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        """Time passing without anyone sleeping, e.g. while a request is in flight."""
        with self._lock:
            self._now += seconds


def check_rate(rate: _Rate, name: str = "rate") -> _Rate:
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"{name} must be a positive number of requests per second or None, not {rate!r}")
    return rate


class TokenBucket:
    """At most `rate` units per second, with up to `burst` units at once. `rate=None` means no limit.

    This is GCRA, the token bucket written as a schedule. Each `acquire` reserves the
    next free slot under the lock, then sleeps outside the lock until that slot. Threads
    queue in reservation order, and a slow wakeup never shifts anyone else's slot.
    When callers fall behind, the schedule restarts at `now`, so a backlog is never
    repaid as a burst.

    `burst` defaults to 1. A bucket that starts full, or fills during a pause, sends
    `burst` requests at once on top of the steady rate. Any window that starts at
    such a moment is over the rate by that many. With burst 1, a saturated caller gets
    rate*W ± 1 acquisitions in every window of W seconds. That is the figure rate caps
    (R2 per-bucket limits, Milvus quotas) are measured by, and the tests check it.
    """

    def __init__(self, rate: float | None, burst: float = 1.0, clock: Clock | None = None):
        if not burst >= 1:
            raise ValueError(f"burst must be >= 1, not {burst!r}")
        self.clock = clock or SystemClock()
        self._rate = check_rate(rate)
        self._burst = float(burst)
        self._tat = -math.inf  # theoretical arrival time of the next unit
        self._lock = threading.Lock()
        self.acquired = 0.0

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        """Sets the rate for reservations made from now on. Sleepers keep their slots."""
        with self._lock:
            self._rate = check_rate(rate)

    def acquire(self, n: float = 1.0) -> float:
        """Blocks until `n` units are available. Returns the seconds it slept."""
        if not n > 0:
            raise ValueError(f"acquire needs a positive amount, not {n!r}")
        wait = self._reserve(n)
        if wait > 0:
            self.clock.sleep(wait)
        return max(wait, 0.0)

    def _reserve(self, n: float) -> float:
        with self._lock:
            self.acquired += n
            if self._rate is None:
                return 0.0
            now = self.clock.now()
            interval = 1.0 / self._rate
            tat = max(self._tat, now)
            # A request larger than the burst pays afterwards: it starts at its slot, then blocks the next ones.
            tolerance = max(0.0, self._burst - n) * interval
            self._tat = tat + n * interval
            return max(now, tat - tolerance) - now

    # A plain bucket can stand in for a limiter in `call_with_backoff`; it does not adapt.
    def on_throttled(self, retry_after: float | None = None) -> float:
        return 0.0

    def on_success(self, latency_s: float) -> None:
        pass


class AdaptiveLimiter:
    """AIMD rate control for one store, shared by every thread that writes to it.

    Decrease: a throttle, or a latency above `latency_factor` x the EWMA baseline,
    multiplies the rate by `decrease`, but never below `min_rate`. The latency judged is
    the median of the last `latency_window` samples (default 1: each sample alone). A
    window wider than twice the requests in flight ignores one stall of the store, which
    slows every in-flight request at once, and still reacts when most requests slow down.
    Each cut takes `max_rate / 2 / increase_step` seconds to win back, so a limiter that
    cut on every tail latency would run well under its rate. A throttle also holds
    every caller for `retry_after`, or for a jittered exponential backoff when the
    server gives no Retry-After. After one decrease, later signals do nothing until
    `cooldown_s` has passed. Without that, N threads hit by one 503 burst would cut
    the rate N times.
    Increase: each success adds `increase_step / rate`. At a saturated rate r that
    adds up to `increase_step` requests/s per second, the additive half of AIMD,
    capped at `max_rate`. The default step recovers the whole range in about 20 s.
    `max_rate=None` starts unlimited. The first decrease starts from the observed
    throughput, measured over the last second.
    """

    LATENCY_ALPHA = 0.2  # EWMA weight of a new latency sample
    WARMUP_SAMPLES = 5  # samples before the baseline is trusted
    WINDOW_S = 1.0  # throughput window while unlimited

    def __init__(
        self,
        max_rate: float | None,
        clock: Clock | None = None,
        *,
        min_rate: float = 1.0,
        decrease: float = 0.5,
        increase_step: float | None = None,
        latency_factor: float = 2.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        cooldown_s: float = 1.0,
        rng: random.Random | None = None,
        slow_latency_floor_s: float = 0.05,
        latency_window: int = 1,
    ):
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), not {decrease!r}")
        if not latency_factor > 1:
            raise ValueError(f"latency_factor must be > 1, not {latency_factor!r}")
        if not latency_window >= 1:
            raise ValueError(f"latency_window must be >= 1, not {latency_window!r}")
        self.clock = clock or SystemClock()
        self.max_rate = check_rate(max_rate, "max_rate")
        self.min_rate = min(check_rate(min_rate, "min_rate"), max_rate or math.inf)
        self.decrease, self.latency_factor, self.cooldown_s = decrease, latency_factor, cooldown_s
        # Below this a latency rise is noise (a local disk answers in microseconds and
        # doubles on any scheduler hiccup), not a store under load.
        self.slow_latency_floor_s = slow_latency_floor_s
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self._step = increase_step if increase_step is not None else (max_rate / 20 if max_rate else None)
        self._rng = rng or random.Random()
        self._bucket = TokenBucket(max_rate, clock=self.clock)
        self._lock = threading.Lock()
        self._hold_until = -math.inf
        self._last_decrease = -math.inf
        self._streak = 0  # throttles since the last success
        self._baseline: float | None = None
        self._samples = 0
        self._recent: deque[float] = deque(maxlen=int(latency_window))
        self._window = (self.clock.now(), 0, 0.0)  # (start, count, rate of the previous window)
        self.throttled_count = 0
        self.slowdowns = 0

    @property
    def current_rate(self) -> float | None:
        return self._bucket.rate

    baseline_latency = property(lambda self: self._baseline)

    def acquire(self, n: float = 1.0) -> float:
        """Waits out any throttle hold, then for the rate. Returns the seconds it waited."""
        waited = 0.0
        while (hold := self._hold_remaining()) > 0:  # loop: another thread may extend the hold
            self.clock.sleep(hold)
            waited += hold
        if self.current_rate is None:
            self._count_throughput()
        return waited + self._bucket.acquire(n)

    def on_throttled(self, retry_after: float | None = None) -> float:
        """The store said slow down. Returns the hold every caller now waits out."""
        with self._lock:
            now = self.clock.now()
            self.throttled_count += 1
            self._streak += 1
            hold = (
                retry_after
                if retry_after is not None
                else jittered_backoff(self._streak, self.backoff_initial, self.backoff_max, self._rng)
            )
            self._hold_until = max(self._hold_until, now + hold)
            self._decrease(now)
            return hold

    def on_success(self, latency_s: float) -> None:
        with self._lock:
            self._streak = 0
            self._recent.append(latency_s)
            typical = statistics.median(self._recent)
            slow = (
                self._baseline is not None
                and self._samples >= self.WARMUP_SAMPLES
                and typical >= self.slow_latency_floor_s
                and typical > self.latency_factor * self._baseline
            )
            self._observe_latency(latency_s)
            if slow:
                self.slowdowns += self._decrease(self.clock.now())
            else:
                self._increase()

    # ---- internals (callers hold self._lock unless noted) ----------------------------

    def _hold_remaining(self) -> float:
        with self._lock:
            return self._hold_until - self.clock.now()

    def _observe_latency(self, latency_s: float) -> None:
        # A spike counts as only latency_factor x the baseline. One outlier cannot
        # drag the baseline up, and a lasting slowdown still becomes the new normal.
        if self._baseline is None:
            self._baseline = latency_s
        else:
            sample = min(latency_s, self.latency_factor * self._baseline)
            self._baseline += self.LATENCY_ALPHA * (sample - self._baseline)
        self._samples += 1

    def _decrease(self, now: float) -> bool:
        if now - self._last_decrease < self.cooldown_s:
            return False
        before = self.current_rate if self.current_rate is not None else self._observed_rate(now)
        if self._step is None:
            self._step = max(before / 20, self.min_rate)
        self._bucket.set_rate(max(self.min_rate, before * self.decrease))
        self._last_decrease = now
        return True

    def _increase(self) -> None:
        rate = self.current_rate
        if rate is None or self._step is None:
            return
        rate += self._step / rate
        self._bucket.set_rate(rate if self.max_rate is None else min(rate, self.max_rate))

    def _count_throughput(self) -> None:
        # Called without the lock held; it takes the lock itself.
        with self._lock:
            now = self.clock.now()
            start, count, previous = self._window
            if now - start >= self.WINDOW_S:
                start, count, previous = now, 0, count / (now - start)
            self._window = (start, count + 1, previous)

    def _observed_rate(self, now: float) -> float:
        start, count, previous = self._window
        return max(previous, count / max(now - start, self.WINDOW_S), self.min_rate)


_RNG = random.Random()  # shared: seeding a new one per call cost more than the call


def jittered_backoff(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter". The delay is 50-100% of the exponential
    step. The lower half keeps the pause real. The random half keeps workers from
    retrying in lockstep."""
    step = min(maximum, initial * 2 ** min(attempt - 1, 60))
    return step * (0.5 + 0.5 * rng.random())


def call_with_backoff(
    fn: Callable[[], T],
    limiter: AdaptiveLimiter | TokenBucket,
    *,
    attempts: int = 8,
    clock: Clock | None = None,
    cost: float = 1.0,
    backoff_initial: float = 0.1,
    backoff_max: float = 10.0,
    rng: random.Random | None = None,
) -> T:
    """Calls `fn` with the limiter's permission. Retries on `Throttled` and `Transient` (a 500, a
    reset connection: the limiter's rate is not cut for those) up to `attempts` calls in all.

    The wait before a retry is max(Retry-After, jittered exponential backoff). The
    limiter's hold runs from the same moment, so the two overlap and do not add up.
    After the last attempt the last error is re-raised. Other errors pass
    through at once. The retry loop is tenacity, the library under stamina: stamina's
    sync API sleeps with `time.sleep` and has no sleep or clock parameter. Its only test
    hook (`set_testing`) zeroes every wait, so a test cannot check that Retry-After
    was honoured.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, not {attempts!r}")
    clock = clock or limiter.clock
    rng = rng or _RNG

    def once() -> T:
        limiter.acquire(cost)
        started = clock.now()
        try:
            result = fn()
        except Throttled as exc:
            limiter.on_throttled(exc.retry_after)
            raise
        limiter.on_success(clock.now() - started)
        return result

    def pause(error: BaseException | None, attempt: int) -> float:
        retry_after = getattr(error, "retry_after", None) or 0.0
        return max(retry_after, jittered_backoff(attempt, backoff_initial, backoff_max, rng))

    # The first attempt is called directly: a tenacity.Retrying built and run for every request
    # cost ~15 us, a third of a local GET (docs/performance.md, round 2). Only a retryable failure
    # goes on to tenacity, which makes attempts 2..N with the waits the whole loop would have made.
    try:
        return once()
    except (Throttled, Transient) as exc:
        if attempts == 1:
            raise
        clock.sleep(pause(exc, 1))

    def wait(state: tenacity.RetryCallState) -> float:
        assert state.outcome is not None  # tenacity waits only after an attempt
        return pause(state.outcome.exception(), state.attempt_number + 1)  # attempt 1 came before

    retrying = tenacity.Retrying(
        sleep=clock.sleep,
        wait=wait,
        stop=tenacity.stop_after_attempt(attempts - 1),
        retry=tenacity.retry_if_exception_type((Throttled, Transient)),
        reraise=True,
    )
    return retrying(once)

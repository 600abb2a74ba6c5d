"""Throttling against a real S3 API (moto), counted at a proxy: the rate a `TokenBucket`
promises is the rate the server sees, and injected 503s make `call_with_backoff` back
off, slow the limiter and then succeed, with exactly the retried requests on the wire."""

from __future__ import annotations

import http.client
import random
import threading
from bisect import bisect_left
from http.server import ThreadingHTTPServer

import pytest

from repage.errors import Throttled
from repage.stores.throttle import AdaptiveLimiter, SystemClock, TokenBucket, call_with_backoff

# counting_proxy is imported as a fixture until tests/conftest.py lists tests.fixtures.proxy.
from tests.fixtures.proxy import CountingProxy, ProxyHandler, counting_proxy  # noqa: F401
from tests.fixtures.s3 import create_bucket, s3_store, unique_bucket_name

RATE = 20.0
RUN_S = 12.0
WINDOW_S = 5.0
WORKERS = 4  # more workers than needed, so one slow moto reply never leaves a slot unused


@pytest.fixture
def proxied_store(counting_proxy, moto_endpoint):  # noqa: F811
    name = unique_bucket_name()
    create_bucket(moto_endpoint, name)  # straight to moto: not counted
    store = s3_store(counting_proxy.endpoint, name)
    yield store, f"/{name}/"
    store.close()


def window_counts(times: list[float], width: float) -> list[int]:
    """Requests in [t, t + width) for every request time t whose window lies wholly inside the run."""
    end = times[-1]
    return [bisect_left(times, t + width) - i for i, t in enumerate(times) if t + width <= end]


def migrate_some(store, bucket: TokenBucket, worker: int, deadline: float, clock: SystemClock) -> None:
    """put, copy to a new key, head the copy: the moves of docs/design.md §5.2, each gated."""
    n = 0
    while clock.now() < deadline:
        src, dst = f"ds/doc{worker}/images/{n}_legacy.png", f"ds/doc{worker}/images/0_{n}.png"
        for op in (
            lambda src=src: store.put(src, b"\x89PNG" + bytes(64)),
            lambda src=src, dst=dst: store.copy(src, dst),
            lambda dst=dst: store.head(dst),
        ):
            bucket.acquire()
            if clock.now() >= deadline:
                return
            op()
        n += 1


@pytest.mark.slow
def test_token_bucket_rate_holds_at_the_server_in_every_5_second_window(proxied_store, counting_proxy):  # noqa: F811
    store, _ = proxied_store
    clock = SystemClock()
    bucket = TokenBucket(RATE, clock=clock)
    deadline = clock.now() + RUN_S
    pool = [threading.Thread(target=migrate_some, args=(store, bucket, w, deadline, clock)) for w in range(WORKERS)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()

    seen = counting_proxy.seen()
    assert seen and all(s.status in (200, 204) for s in seen), {s.status for s in seen}
    assert {s.method for s in seen} == {"PUT", "HEAD"}
    times = sorted(s.at for s in seen)
    counts = window_counts(times, WINDOW_S)
    assert len(counts) > RATE * 5, "the run was too short to hold full windows"
    expected = RATE * WINDOW_S
    assert all(abs(c - expected) <= 0.1 * expected for c in counts), (min(counts), max(counts))


def test_injected_503s_slow_the_limiter_and_the_retry_succeeds(proxied_store, counting_proxy):  # noqa: F811
    store, prefix = proxied_store
    limiter = AdaptiveLimiter(RATE, SystemClock(), backoff_initial=0.05, rng=random.Random(5))
    counting_proxy.inject_throttle(3, status=503)

    call_with_backoff(
        lambda: store.put("ds/doc/images/0_0.png", b"png"), limiter, backoff_initial=0.05, rng=random.Random(6)
    )

    seen = counting_proxy.seen()
    path = prefix + "ds/doc/images/0_0.png"
    assert [(s.method, s.path, s.status, s.injected) for s in seen] == (
        [("PUT", path, 503, True)] * 3 + [("PUT", path, 200, False)]
    )
    assert limiter.throttled_count == 3 and limiter.current_rate < RATE
    gaps = [b.at - a.at for a, b in zip(seen, seen[1:])]
    assert all(gap >= 0.025 for gap in gaps), gaps  # at least half the first backoff step
    assert store.get("ds/doc/images/0_0.png") == b"png"


@pytest.mark.parametrize("status", [503, 429])
def test_backoff_gives_up_after_attempts_and_sends_nothing_more(proxied_store, counting_proxy, status):  # noqa: F811
    store, prefix = proxied_store
    limiter = AdaptiveLimiter(RATE, SystemClock(), backoff_initial=0.02, rng=random.Random(5))
    counting_proxy.inject_throttle(10, status=status, retry_after=0.05)

    with pytest.raises(Throttled, match=str(status)):
        call_with_backoff(lambda: store.head("k"), limiter, attempts=3, backoff_initial=0.02)

    seen = counting_proxy.seen()
    assert [(s.method, s.path, s.status) for s in seen] == [("HEAD", prefix + "k", status)] * 3
    assert limiter.throttled_count == 3
    counting_proxy.reset()
    assert counting_proxy.seen() == []
    store.put("k", b"x")  # injections cleared: requests reach moto again
    assert [s.status for s in counting_proxy.seen()] == [200]


# ---- the proxy itself ----------------------------------------------------------------------


class EchoUpstream(ProxyHandler):
    """Records what arrives (headers in order, raw body) and answers with a chunked body."""

    protocol_version = "HTTP/1.1"
    received: list

    def do_PUT(self) -> None:
        body = self._read_body()
        self.received.append((self.command, self.path, list(self.headers.raw_items()), body))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-amz-request-id", "r1")
        self.end_headers()
        self.wfile.write(b"5\r\nhello\r\n0\r\n\r\n")

    def log_message(self, *args) -> None:
        pass


def test_proxy_forwards_requests_byte_exact_and_reframes_chunked_replies():
    handler = type("Echo", (EchoUpstream,), {"received": []})
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    proxy = CountingProxy(f"http://127.0.0.1:{upstream.server_port}").start()
    headers = [
        ("Host", "signed-for.example:9000"),
        ("Authorization", "AWS4-HMAC-SHA256 Credential=x/y, Signature=ab"),
        ("x-amz-date", "20250101T000000Z"),
        ("x-amz-content-sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"),
        ("Transfer-Encoding", "chunked"),
    ]
    chunked = b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-amz-checksum-crc32:AAAA\r\n\r\n"
    try:
        conn = http.client.HTTPConnection("127.0.0.1", int(proxy.endpoint.rsplit(":", 1)[1]), timeout=10)
        conn.putrequest("PUT", "/bkt/a%20b.png?x-id=PutObject&z=%2F", skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(chunked)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"hello")
        assert response.getheader("x-amz-request-id") == "r1" and response.getheader("Content-Length") == "5"
        conn.close()
    finally:
        proxy.stop()
        upstream.shutdown()
        upstream.server_close()
    assert handler.received == [("PUT", "/bkt/a%20b.png?x-id=PutObject&z=%2F", headers, chunked)]
    assert [(s.method, s.path, s.status) for s in proxy.seen()] == [("PUT", "/bkt/a%20b.png?x-id=PutObject&z=%2F", 200)]

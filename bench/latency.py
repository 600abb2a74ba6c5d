"""moto_server behind a fixed delay per request: a bucket as far away as R2 is from a worker.

moto_server on 127.0.0.1 answers in a few milliseconds; R2 seen from a worker takes tens.
`LatencyProxy` is the tests' counting proxy (tests/fixtures/proxy.py: byte-exact forwarding,
every request recorded) that sleeps `delay_ms` after reading each request and before
forwarding it, so every request pays the delay once, whatever its kind. Clients sign for
the proxy's address; moto accepts any Host, as with the counting proxy.
"""

from __future__ import annotations

import time

from tests.fixtures.proxy import CountingProxy, ProxyHandler


class LatencyHandler(ProxyHandler):
    proxy: LatencyProxy

    def _forward(self, body: bytes):
        time.sleep(self.proxy.delay_s)
        return super()._forward(body)


class LatencyProxy(CountingProxy):
    def __init__(self, upstream: str, delay_ms: float):
        super().__init__(upstream)
        self.delay_s = delay_ms / 1000.0
        self._server.RequestHandlerClass = type("Handler", (LatencyHandler,), {"proxy": self})

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def take_count(self) -> int:
        """Requests seen since the last call (the log is cleared)."""
        seen = len(self.seen())
        self.reset()
        return seen

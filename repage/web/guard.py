"""Guards in front of the endpoints (docs/design.md §6.6): failed authentication throttled per
client address, and the open mode's Host allow-list against DNS rebinding."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

FAILURES_PER_WINDOW = 10
WINDOW_SECONDS = 60.0
MAX_ADDRESSES = 10_000  # addresses remembered at once; the oldest is forgotten first
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


def client_address(request: Request) -> str:
    """The peer's address (uvicorn puts a trusted proxy's X-Forwarded-For here, §6.6)."""
    return request.client.host if request.client else "unknown"


class AuthThrottle:
    """At most `limit` failed authentications per address in a sliding `window_s`; past that the
    address gets 429 with Retry-After until its oldest failure leaves the window. `now` injected."""

    def __init__(
        self,
        limit: int = FAILURES_PER_WINDOW,
        window_s: float = WINDOW_SECONDS,
        now: Callable[[], float] = time.monotonic,
    ):
        self.limit, self.window_s, self._now = limit, window_s, now
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()
        self.failures: dict[str, int] = {}  # by kind (bearer, login), for /metrics
        self.refused = 0

    def retry_after(self, address: str) -> float | None:
        """Seconds until the address may try again; None when it may now."""
        with self._lock:
            times = self._recent(address)
            if len(times) < self.limit:
                return None
            return max(0.0, times[0] + self.window_s - self._now())

    def check(self, address: str) -> None:
        wait = self.retry_after(address)
        if wait is not None:
            with self._lock:
                self.refused += 1
            seconds = max(1, math.ceil(wait))
            raise HTTPException(
                429, f"too many failed attempts: retry in {seconds} s", headers={"Retry-After": str(seconds)}
            )

    def failed(self, address: str, kind: str) -> None:
        with self._lock:
            times = self._recent(address)
            times.append(self._now())
            self._failures[address] = times
            self._failures.move_to_end(address)
            while len(self._failures) > MAX_ADDRESSES:
                self._failures.popitem(last=False)
            self.failures[kind] = self.failures.get(kind, 0) + 1

    def _recent(self, address: str) -> deque[float]:
        times = self._failures.get(address, deque())
        cutoff = self._now() - self.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            self._failures.pop(address, None)
        return times


@dataclass
class LoopbackHostOnly:
    """ASGI middleware for the open mode: a Host header other than localhost, 127.0.0.1 or [::1]
    (any port) gets 421, so a rebound DNS name cannot reach the tokenless service (§6.6)."""

    app: Any

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or host_allowed(dict(scope["headers"]).get(b"host", b"")):
            return await self.app(scope, receive, send)
        body = b'{"detail":"Host not allowed: use http://127.0.0.1 or http://localhost"}'
        await send(
            {
                "type": "http.response.start",
                "status": 421,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def host_allowed(raw: bytes) -> bool:
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):
        name = host[: host.find("]") + 1]
    else:
        name = host.rsplit(":", 1)[0] if ":" in host else host
    return name in LOOPBACK_HOSTS

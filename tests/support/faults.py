"""A fault-injecting S3 reverse proxy for the reliability suite (docs/design.md §13).

`FaultProxy` is the counting proxy of tests/fixtures/proxy.py (byte-exact forwarding to
moto_server, every request recorded) with a seeded fault plan on top. Each request draws
once from the plan's RNG; with probability `rate` it gets one fault, chosen by weight:

- `500`       an S3 InternalError answered by the proxy (never reaches moto);
- `503`       503 SlowDown (never reaches moto);
- `429`       429 TooManyRequests (never reaches moto);
- `latency`   a latency spike: the request waits `latency_s`, then is forwarded normally;
- `reset`     the connection is reset (TCP RST) before anything is forwarded;
- `truncate`  the request IS forwarded (so it takes effect in moto: a copy is made, a put
              lands), then the reply is cut: the full Content-Length is announced, half the
              body is sent and the connection is reset. The client must treat the call as
              failed although it happened: the idempotency case.
- `corrupt`   one byte of the request's body is flipped on the way, then it is forwarded: bits
              flipped in transit. Only when a plan's weights name it (not in the default mix).
              With `verify_sha256` (tests/fixtures/proxy.py) a PUT so changed is refused
              (400 BadDigest), as S3 and R2 refuse it; without, moto stores the changed body.

`set_plan(rate=0)` switches faults off for the clean run. `faults` lists what was injected.
The RNG is drawn in arrival order under a lock, so a plan's fault sequence is reproducible
per request order (concurrent requests may arrive in a different order run to run).
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message

from tests.fixtures.proxy import CountingProxy, ProxyHandler, Seen

KINDS = ("500", "503", "429", "latency", "reset", "truncate")
NAMED_ONLY = ("corrupt",)  # a plan gets these only by naming them in its weights


@dataclass
class FaultPlan:
    rate: float = 0.0
    seed: int = 0
    weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 1.0))
    latency_s: float = 0.25
    # Only requests this accepts can get a fault: (method, path, headers) -> bool. None: all.
    when: Callable[[str, str, Message], bool] | None = None
    limit: int | None = None  # at most this many faults under this plan (None: no limit)

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(KINDS) - set(NAMED_ONLY)
        if unknown or not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"bad fault plan: rate {self.rate}, unknown kinds {sorted(unknown)}")


@dataclass(frozen=True)
class Fault:
    kind: str
    method: str
    path: str


class FaultProxy(CountingProxy):
    def __init__(self, upstream: str, plan: FaultPlan | None = None, *, verify_sha256: bool = False):
        super().__init__(upstream, verify_sha256=verify_sha256)
        self._server.RequestHandlerClass = type("FaultHandler", (FaultHandler,), {"proxy": self})
        self.faults: list[Fault] = []
        self.set_plan(plan or FaultPlan())

    def set_plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self.plan = plan
            self._rng = random.Random(plan.seed)
            self._left = plan.limit

    def off(self) -> None:
        self.set_plan(FaultPlan(rate=0.0))

    def draw(self, method: str, path: str, headers: Message) -> str | None:
        """The fault for this request, or None."""
        with self._lock:
            plan = self.plan
            if plan.rate <= 0 or (plan.when is not None and not plan.when(method, path, headers)):
                return None
            if self._left == 0 or self._rng.random() >= plan.rate:
                return None
            if self._left is not None:
                self._left -= 1
            kinds = [k for k, w in plan.weights.items() if w > 0]
            return self._rng.choices(kinds, weights=[plan.weights[k] for k in kinds])[0]

    def _note(self, kind: str, method: str, path: str) -> None:
        with self._lock:
            self.faults.append(Fault(kind, method, path))

    def fault_counts(self) -> Counter[str]:
        with self._lock:
            return Counter(f.kind for f in self.faults)


class FaultHandler(ProxyHandler):
    proxy: FaultProxy

    def handle_one(self) -> None:
        arrived = time.monotonic()
        body = self._read_body()
        kind = self.proxy.draw(self.command, self.path, self.headers)
        if kind is None:
            return self._pass(arrived, body)
        self.proxy._note(kind, self.command, self.path)
        if kind in ("500", "503", "429"):
            self.proxy._record(Seen(arrived, self.command, self.path, int(kind), True))
            return self._answer_error(int(kind))
        if kind == "latency":
            time.sleep(self.proxy.plan.latency_s)
            return self._pass(arrived, body)
        if kind == "corrupt":
            return self._pass(arrived, flip_one_byte(body))
        if kind == "reset":
            self.proxy._record(Seen(arrived, self.command, self.path, 0, True))
            return self._reset()
        # truncate: forwarded for real, then the reply is cut short
        index = self.proxy._record(Seen(arrived, self.command, self.path, 0, True))
        try:
            status, reason, headers, payload = self._forward(body)
        except OSError:
            return self._reset()
        self.proxy._set_status(index, status)
        if self.command == "HEAD" or len(payload) < 2:
            return self._reset()  # nothing to cut: the reply is lost altogether
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload[: len(payload) // 2])
        self.wfile.flush()
        self._reset()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = handle_one

    def _pass(self, arrived: float, body: bytes) -> None:
        index = self.proxy._record(Seen(arrived, self.command, self.path, 0, False))
        try:
            status, reason, headers, payload = self._forward(body)
        except OSError as exc:
            status, reason, headers, payload = 502, "Bad Gateway", [], f"proxy: upstream failed: {exc!r}".encode()
        self.proxy._set_status(index, status)
        self._relay(status, reason, headers, payload)

    def _answer_error(self, status: int) -> None:
        code = {500: "InternalError", 503: "SlowDown", 429: "TooManyRequests"}[status]
        message = (
            "We encountered an internal error. Please try again."
            if status == 500
            else "Please reduce your request rate."
        )
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a dropped load balancer does."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass


def flip_one_byte(body: bytes) -> bytes:
    """The body with its middle byte inverted (an empty body stays empty)."""
    if not body:
        return body
    middle = len(body) // 2
    return body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]


def is_checked_put(method: str, path: str, headers: Message) -> bool:
    """A PUT that carries x-amz-checksum-sha256 (the PUT path of a move, docs/design.md §5.2)."""
    return method == "PUT" and headers.get("x-amz-checksum-sha256") is not None


def is_copy(method: str, path: str, headers: Message) -> bool:
    """A CopyObject request (PUT with x-amz-copy-source)."""
    return method == "PUT" and headers.get("x-amz-copy-source") is not None

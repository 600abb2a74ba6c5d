"""Where the CPU-heavy steps run: in this process (default) or as Ray tasks on a cluster.

An engine has one method, `map(fn, items) -> list`, results in the order of `items`. `fn`
must be a module-level function and `items` picklable: a Ray task runs in another process,
maybe on another machine, so nothing that holds a connection crosses (gRPC channels do not
survive fork, docs/design.md §7.1, §9.4); a task that needs a store opens its own client from the settings.

The pdf path hands its PDF fingerprinting, matching and image extraction to the engine
(repage/pdfpath.py: `PdfJob`, `run_pdf_job`). The ledger, Milvus writes and bucket copies
stay in the calling process, under its leases and fencing tokens.

Ray is an optional extra (`pip install 'repage[ray]'`); it is imported here only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from repage.errors import ConfigError

ENGINES = ("local", "ray")


class LocalEngine:
    """Calls `fn` in this process, one item after the other (the caller's threads parallelize)."""

    name = "local"
    remote = False

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        return [fn(item) for item in items]

    def close(self) -> None:
        pass


class RayEngine:
    """Runs `fn` as Ray tasks on the cluster at `address` (None: a local one Ray starts itself).

    Ray is connected here, in the calling (main) thread and before any store is opened: ray.init
    forks Ray's own processes, and a fork while gRPC threads (pymilvus) run is unsafe. A process
    that already called ray.init (a test's local cluster) is used as it is. `close()` disconnects
    only if this engine connected.
    """

    name = "ray"
    remote = True

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, init: bool = True):
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("--engine ray needs Ray: pip install 'repage[ray]'") from exc
        self._ray = ray
        self.address, self.num_cpus, self._init = address, num_cpus, init
        self._lock = threading.Lock()
        self._connected = False
        self._task: Any = None  # ray.remote(_apply), made once connected
        self._connect()

    def _connect(self) -> None:
        with self._lock:
            if self._ray.is_initialized():
                return
            if not self._init:
                raise ConfigError("Ray is not initialized in this process")
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address:
                kwargs["address"] = self.address
            elif self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
            try:
                self._ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"Ray cluster {self.address or '(local)'}: {exc}") from exc
            self._connected = True

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        items = list(items)
        if not items:
            return []
        self._connect()
        with self._lock:
            if self._task is None:
                self._task = self._ray.remote(_apply)
        refs = [self._task.remote(fn, item) for item in items]
        try:
            return self._ray.get(refs)
        except self._ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            raise cause from exc  # the task's own error (BadInput, ObjectNotFound, ...), as the local engine raises

    def close(self) -> None:
        if self._connected:
            self._ray.shutdown()
            self._connected = False


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    """The one Ray task: `fn(item)` in a Ray worker (fn travels by reference to its module)."""
    return fn(item)


def make_engine(name: str = "local", *, address: str | None = None) -> LocalEngine | RayEngine:
    """The engine `--engine NAME` asks for; `address` from --ray-address or RAY_ADDRESS (read by the CLI)."""
    if name == "local":
        if address:
            raise ConfigError("--ray-address needs --engine ray")
        return LocalEngine()
    if name == "ray":
        return RayEngine(address)
    raise ConfigError(f"--engine {name!r}: use {' or '.join(ENGINES)}")


__all__ = ["ENGINES", "LocalEngine", "RayEngine", "make_engine"]

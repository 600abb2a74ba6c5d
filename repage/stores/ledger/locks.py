"""A lock that every repage process of one migration shares, kept where they all meet: the ledger.

Used to take turns at a Milvus Lite store (docs/design.md §7, docs/milvus-lite-durability.md):
Lite is one writer per collection, and two writes, or a write and a flush, that run at once in
its server corrupt its write-ahead log or lose rows; a query that runs while it flushes may miss
the rows being flushed. So writes and flushes take the lock exclusively, queries shared.

Why here and not elsewhere:
- PostgreSQL ledger: a session-level advisory lock (`pg_advisory_lock`). Every process that
  shares the migration shares this database, on any machine; a lock file could not be shared
  across machines, and the Lite server's own folder is not known to a client that reaches it
  over `http://`. A process that dies holding it loses its session, and the server frees the lock.
- SQLite ledger: an `flock` on a file beside the ledger. A SQLite ledger is only ever shared by
  processes of one machine (it is a local file); the kernel frees the lock when a process dies.
- Retrying the errors of concurrent flushes would not do: by the time one is reported, two
  flushes have already written through one WAL file, and concurrent writes fail silently.

Each thread takes the lock on its own (its own connection or open file), so threads of one
process take turns exactly as processes do; a thread that holds it may take it again (nested
calls are free). A thread holding it shared may not ask for it exclusively (no upgrades).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from repage.errors import StoreUnavailable
from repage.stores.ledger.connection import LedgerBase, one_line, shown_url, url_redactor

try:  # POSIX only; elsewhere a SQLite ledger's processes are not coordinated (threads still are)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

# A writer holds the lock for one batch's write, read-back and flush (~0.3 s at 1,200 rows):
# waiting longer than this means a process is stuck holding it, not that the store is busy.
WAIT_SECONDS = 600


def lock_key(name: str) -> int:
    """The advisory-lock key for `name`: 64 bits of its sha256, as PostgreSQL's signed bigint."""
    return int.from_bytes(hashlib.sha256(f"repage:{name}".encode()).digest()[:8], "big", signed=True)


class SharedLock:
    """`hold(exclusive=...)`: a context manager over the lock named `name` in the ledger at `url`."""

    def __init__(self, url: str, name: str):
        self._raw_url, self.name = url, name
        self._local = threading.local()  # .depth, .exclusive: this thread's hold
        self._engine: sa.Engine | None = None
        self._setup_lock = threading.Lock()
        self._url: sa.URL | None = None  # parsed on first use: only a Lite store ever takes the lock
        self._path: pathlib.Path | None = None

    def _setup(self) -> sa.URL:
        with self._setup_lock:
            if self._url is None:
                url = LedgerBase._parse_url(self._raw_url)  # noqa: SLF001 (the ledger's own URL rules)
                if url.get_backend_name() == "sqlite":
                    db = pathlib.Path(url.database or "")
                    self._path = db.with_name(db.name + ".milvus-lite.lock")
                self._url = url
            return self._url

    @contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth:
            if exclusive and not self._local.exclusive:
                raise RuntimeError(f"lock {self.name!r}: held shared by this thread, cannot be taken exclusively")
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        self._setup()
        take = self._hold_file if self._path is not None else self._hold_advisory
        with take(exclusive):
            self._local.depth, self._local.exclusive = 1, exclusive
            try:
                yield
            finally:
                self._local.depth = 0

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # ------------------------------------------------------------------ SQLite: a lock file

    @contextmanager
    def _hold_file(self, exclusive: bool) -> Iterator[None]:
        assert self._path is not None
        if fcntl is None or not self._path.parent.is_dir():
            # No ledger folder yet: no other process can share this ledger yet either (and a
            # read-only command such as `doctor` must not create it).
            yield
            return
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield  # closing the file (below, or the process dying) releases the lock
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ PostgreSQL: an advisory lock

    def _pg(self) -> sa.Engine:
        with self._setup_lock:
            if self._engine is None:
                assert self._url is not None  # hold() ran _setup() first
                engine = sa.create_engine(
                    self._url, pool_pre_ping=True, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10}
                )
                sa.event.listen(engine, "connect", _bounded_lock_wait)
                self._engine = engine
            return self._engine

    @contextmanager
    def _hold_advisory(self, exclusive: bool) -> Iterator[None]:
        suffix = "" if exclusive else "_shared"
        key = {"k": lock_key(self.name)}
        try:
            conn = self._pg().connect()
        except sa_exc.SQLAlchemyError as exc:
            raise self._unavailable(exc) from exc
        try:
            try:
                conn.execute(sa.text(f"SELECT pg_advisory_lock{suffix}(:k)"), key)
            except sa_exc.SQLAlchemyError as exc:
                raise self._unavailable(exc) from exc
            try:
                yield
            finally:
                try:
                    conn.execute(sa.text(f"SELECT pg_advisory_unlock{suffix}(:k)"), key)
                except sa_exc.SQLAlchemyError:
                    conn.invalidate()  # the session ends, and with it the lock
        finally:
            conn.close()

    def _unavailable(self, exc: Any) -> StoreUnavailable:
        url = self._setup()
        shown = shown_url(url)
        msg = url_redactor(self._raw_url, url)(one_line(getattr(exc, "orig", None) or exc))
        return StoreUnavailable(f"ledger {shown}: lock {self.name!r} not taken: {msg}")


def _bounded_lock_wait(dbapi_conn: Any, _record: Any) -> None:
    """lock_timeout bounds the wait in pg_advisory_lock: a stuck holder, not a busy store (a SET,
    not the URL's `options`, which may carry the user's own settings such as search_path)."""
    with dbapi_conn.cursor() as cur:
        cur.execute(f"SET lock_timeout = {WAIT_SECONDS * 1000}")
    dbapi_conn.commit()

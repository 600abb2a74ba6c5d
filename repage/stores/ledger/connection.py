"""The ledger's connection: URL, engine, the one transaction helper, and the database clock.

Every ledger call opens its transaction through `LedgerBase._tx`, and only there: SQLite
writers begin with BEGIN IMMEDIATE and take turns within the process, driver errors become
repage errors with the password redacted, and calls inside `transaction()` become savepoints.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields as dc_fields
from itertools import islice
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from repage.errors import ConfigError, StoreError, StoreUnavailable
from repage.redact import Redactor, redact_url, url_secrets
from repage.stores.files import make_private_dirs
from repage.stores.ledger.schema import create_or_upgrade, docs_t, stored_version

BATCH = 500  # rows per executemany / IN list: well under SQLite's and libpq's parameter limits


def batches(items: Iterable[Any], size: int = BATCH) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def from_row(cls: type, row: Any) -> Any:
    """A record dataclass from a row that has (at least) its fields as columns."""
    m = row._mapping
    return cls(**{f.name: m[f.name] for f in dc_fields(cls)})


def url_redactor(raw: str, url: sa.URL | None = None) -> Redactor:
    """For driver messages: the password as written (it may hold `/`, `@`, `:` unencoded) and as
    SQLAlchemy parsed it (cut at an `@`, the rest taken for the host)."""
    return Redactor(*url_secrets(raw), url.password if url is not None else None)


def shown_url(url: sa.URL) -> str:
    """The URL for messages and `doctor`: SQLAlchemy hides the password it parsed, repage.redact
    the whole user info (a password's piece after an unencoded `@` would pass for the host)."""
    return redact_url(url.render_as_string(hide_password=True))


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class LedgerBase:
    """The engine and transactions every part of the Ledger works through."""

    def __init__(self, url: str):
        self._url = self._parse_url(url)
        self._redact = url_redactor(url, self._url)
        self._sqlite = self._url.get_backend_name() == "sqlite"
        self._write_lock = threading.RLock()
        self._local = threading.local()  # .conn: this thread's open transaction(), if any
        self._engine = self._make_engine()
        with self._tx() as conn:
            create_or_upgrade(conn, postgresql=not self._sqlite, name=self.describe())

    # ----------------------------------------------------------------- connection

    @staticmethod
    def _parse_url(raw: str) -> sa.URL:
        try:
            url = sa.make_url(raw)
        except (sa_exc.ArgumentError, ValueError) as exc:
            raise ConfigError(
                f"ledger URL {redact_url(raw)!r} is malformed: "
                "use sqlite:///PATH or postgresql://HOST/DB, USER:PASSWORD@ before HOST"
            ) from exc
        backend = url.get_backend_name()
        if backend in ("postgres", "postgresql"):
            return url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we ship
        if backend != "sqlite":
            raise ConfigError(
                f"ledger URL {redact_url(raw)!r}: unsupported scheme {url.drivername!r} "
                "(use sqlite:/// or postgresql://)"
            )
        if url.database in (None, "", ":memory:"):
            raise ConfigError(
                "ledger URL must name a SQLite file (sqlite:///PATH): an in-memory ledger is neither kept nor shared"
            )
        return url

    def _make_engine(self) -> sa.Engine:
        if not self._sqlite:
            return sa.create_engine(self._url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
        db = pathlib.Path(self._url.database or "")  # _parse_url refused a URL without one
        try:
            # owner-only: the ledger holds the store's keys and errors (SQLite gives -wal/-shm the db's mode)
            make_private_dirs(db.parent)  # every level it creates (docs/design.md §6.6)
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreUnavailable(f"ledger {db} cannot be created: {exc.strerror}") from exc
        # check_same_thread off: the pool hands connections to whichever thread asks.
        engine = sa.create_engine(self._url, connect_args={"timeout": 30, "check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine

    @classmethod
    def probe(cls, raw_url: str) -> dict[str, Any]:
        """Whether the ledger answers, without creating or writing anything (for `doctor`)."""
        url = cls._parse_url(raw_url)
        shown = shown_url(url)
        if url.get_backend_name() == "sqlite":
            db = pathlib.Path(url.database or "")
            if not db.exists():
                return {"url": shown, "exists": False, "note": "created by the first scan"}
            url = url.set(database=f"file:{db.resolve()}?mode=ro", query={"uri": "true"})
        engine = sa.create_engine(
            url, connect_args={} if url.get_backend_name() == "sqlite" else {"connect_timeout": 10}
        )
        try:
            with engine.connect() as conn:
                version = stored_version(conn)
                has_meta = sa.inspect(conn).has_table("repage_meta")
                documents = conn.scalar(sa.select(sa.func.count()).select_from(docs_t)) if has_meta else 0
        except sa_exc.SQLAlchemyError as exc:
            msg = url_redactor(raw_url, url)(one_line(exc))
            raise StoreUnavailable(f"ledger {shown} does not answer: {msg}") from exc
        finally:
            engine.dispose()
        return {"url": shown, "exists": True, "schema_version": version, "documents": documents}

    def describe(self) -> str:
        """The URL with its password redacted, for logs and `doctor`."""
        return shown_url(self._url)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- transactions

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group this thread's ledger writes into one transaction: one commit (one fsync) for many.

        Each call inside runs in its own savepoint, so one that fails (a StaleLease, say) is
        undone alone and raises as usual; the others commit together when the block ends.
        Wrap only ledger calls, never a Milvus or bucket call (docs/design.md §4), nor work
        handed to other threads that write to the ledger: they wait for the block to end
        (SQLite: the process's writer lock; PostgreSQL: the row locks). Nested blocks join
        the outermost one.
        """
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        with self._tx() as conn:
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sa.Connection]:
        """One short transaction; driver errors become repage errors with a redacted message.

        Inside transaction() (same thread) it is a savepoint of that transaction instead.
        """
        outer = getattr(self._local, "conn", None)
        # SQLite: threads of one process take turns here. Left to SQLite, a waiting writer
        # polls the file lock with sleeps of up to 100 ms: many small writes crawl.
        serialize = self._write_lock if (write and self._sqlite) else contextlib.nullcontext()
        try:
            if outer is not None:
                with outer.begin_nested():
                    yield outer
                return
            with serialize, self._engine.connect() as conn:
                if write:
                    conn.execution_options(repage_write=True)  # SQLite: BEGIN IMMEDIATE
                with conn.begin():
                    yield conn
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            msg = self._redact(one_line(exc.orig or exc))
            raise StoreUnavailable(f"ledger {self.describe()} is unavailable: {msg}") from exc
        except sa_exc.DBAPIError as exc:
            msg = self._redact(one_line(exc.orig or exc))
            raise StoreError(f"ledger {self.describe()}: {msg}") from exc

    def _insert_ignore(self, table: sa.Table) -> Any:
        """INSERT that skips rows whose primary key is taken already (on conflict do nothing)."""
        insert = sqlite_dialect.insert if self._sqlite else pg_dialect.insert
        return insert(table).on_conflict_do_nothing(index_elements=[c.name for c in table.primary_key])

    # ----------------------------------------------------------------- clock

    def _now(self) -> sa.ColumnElement[float]:
        """SQL for the database clock in epoch seconds (evaluated by the server, not here)."""
        if self._sqlite:
            expr = (sa.func.julianday(sa.literal_column("'now'")) - 2440587.5) * 86400.0
        else:
            expr = sa.cast(sa.extract("epoch", sa.func.clock_timestamp()), sa.Double)
        return sa.type_coerce(expr, sa.Double)

    def db_now(self) -> float:
        with self._tx(write=False) as conn:
            return float(conn.execute(sa.select(self._now())).scalar_one())


# --------------------------------------------------------------------------- SQLite hooks


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 module (documented SQLAlchemy recipe) so that
    # _sqlite_on_begin can issue BEGIN IMMEDIATE: SQLite has no SKIP LOCKED, so writers
    # take the write lock up front instead of failing to upgrade a read lock mid-transaction.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout = 30000")  # wait for the writer lock instead of failing
    cur.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor it them
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _sqlite_on_begin(conn: sa.Connection) -> None:
    write = conn.get_execution_options().get("repage_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

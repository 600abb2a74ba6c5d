"""The ledger (DESIGN §4): progress, leases and journals in SQLite (WAL) or PostgreSQL.

SQLAlchemy Core only; the only module that imports sqlalchemy. Every public method runs
in its own short transaction and closes it before returning, because callers make Milvus
and bucket calls between ledger calls (never hold a lock across the network).

Times (lease expiry, created/updated/started/finished, events) are epoch seconds from the
DATABASE clock, so workers on machines with skewed clocks agree on when a lease expired.

Fencing: a claim bumps the document's `fencing_token`; every write of a worker carries it.
A write with a token that is not current, or whose lease has expired, raises StaleLease.
A write without a token (`token=None`) is a maintenance write (verify, rollback, gc) and
is refused while a worker holds the document.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from dataclasses import fields as dc_fields
from enum import StrEnum
from itertools import islice
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from repage.domain.access import Decayed
from repage.errors import ConfigError, IllegalTransition, StaleLease, StoreError, StoreUnavailable
from repage.domain.states import Path, State, check_transition

SCHEMA_VERSION = 1
BATCH = 500  # rows per executemany / IN list: well under SQLite's and libpq's parameter limits
_PG_INIT_LOCK = 0x7265_7061_6765  # advisory lock id ("repage") serializing schema creation
_RESCANNABLE = (State.PENDING, State.FAILED, State.DEFERRED, State.REVIEW)
_ADDITIVE = ("dollars", "object_requests_a", "object_requests_b", "bytes_read")
_SETTABLE = ("total_chunks", "affected_chunks", "images_to_move", "path", "priority")
ORDERS = ("oldest", "random", "priority")
_STAMPED = ("id", "document_id", "fencing_token", "created_at")  # journal columns the ledger fills


class ObjectState(StrEnum):
    INTENDED = "intended"  # journaled before the copy (DESIGN §5 step 1)
    COPIED = "copied"      # CopyObject returned
    VERIFIED = "verified"  # HEAD matched size and content hash
    DELETED = "deleted"    # old object removed by gc


# --------------------------------------------------------------------------- schema

_md = sa.MetaData()
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only


def _counter(name: str, type_: Any = sa.BigInteger) -> sa.Column[Any]:
    return sa.Column(name, type_, nullable=False, server_default=sa.text("0"))


meta_t = sa.Table(
    "repage_meta", _md,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

docs_t = sa.Table(
    "documents", _md,
    sa.Column("document_id", sa.String, primary_key=True),
    sa.Column("dataset_id", sa.String, nullable=False),
    sa.Column("filename", sa.Text, nullable=False, server_default=""),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("path", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    _counter("priority", sa.Double), _counter("attempts", sa.Integer),
    _counter("affected_chunks", sa.Integer), sa.Column("total_chunks", sa.Integer),
    _counter("images_to_move", sa.Integer),  # from the scan: non-canonical images (for estimate)
    # lease: owner, token (monotonic per document) and expiry, all from the DB clock
    sa.Column("lease_owner", sa.String), _counter("fencing_token"), sa.Column("lease_expires", sa.Double),
    sa.Column("created_at", sa.Double, nullable=False), sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double), sa.Column("finished_at", sa.Double),
    _counter("dollars", sa.Double), _counter("object_requests_a"), _counter("object_requests_b"),
    _counter("bytes_read"), sa.Column("last_error", sa.Text),
    sa.Index("ix_documents_state_path", "state", "path"),
    sa.Index("ix_documents_state_priority", "state", "priority"),
    sa.Index("ix_documents_state_created", "state", "created_at", "document_id"),
    sa.Index("ix_documents_state_lease", "state", "lease_expires"),
    sa.Index("ix_documents_dataset", "dataset_id"),
    sa.Index("ix_documents_updated", "updated_at"),
)

def _doc_fk() -> sa.ForeignKey:
    return sa.ForeignKey("documents.document_id", ondelete="CASCADE")

chunks_t = sa.Table(
    "chunk_journal", _md,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("document_id", sa.String, _doc_fk(), nullable=False),
    sa.Column("fencing_token", sa.BigInteger, nullable=False),
    sa.Column("identity", sa.Text, nullable=False),
    sa.Column("old_pk", sa.Text), sa.Column("new_pk", sa.Text),
    sa.Column("old_page", sa.Integer), sa.Column("new_page", sa.Integer),
    sa.Column("old_key", sa.Text), sa.Column("new_key", sa.Text),
    sa.Column("row_checksum", sa.Text),
    sa.Column("applied", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_chunk_journal_doc_identity", "document_id", "identity"),
)

objects_t = sa.Table(
    "object_journal", _md,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("document_id", sa.String, _doc_fk(), nullable=False),
    sa.Column("fencing_token", sa.BigInteger, nullable=False),
    sa.Column("old_key", sa.Text, nullable=False), sa.Column("new_key", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger), sa.Column("content_hash", sa.Text),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_object_journal_doc_keys", "document_id", "old_key", "new_key"),
    sa.Index("ix_object_journal_state", "state"),
)

events_t = sa.Table(
    "events", _md,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("document_id", sa.String),
    sa.Column("count", sa.Integer, nullable=False, server_default=sa.text("1")),
    sa.Column("detail", sa.Text),
    sa.Index("ix_events_at", "at"),
    sa.Index("ix_events_kind_at", "kind", "at"),
)

# Usage and lazy requests (repage/access.py, repage/lazy.py). No foreign key on purpose:
# the read path sees documents that no scan has recorded yet, and their accesses count too.
accesses_t = sa.Table(
    "accesses", _md,
    sa.Column("document_id", sa.String, primary_key=True),
    sa.Column("dataset_id", sa.String),
    _counter("score", sa.Double),  # decayed access count as of scored_at
    sa.Column("scored_at", sa.Double, nullable=False),  # epoch seconds of the hits (app clock)
    sa.Column("access_rank", sa.Double),  # log2(score) + scored_at/half-life: orders by decayed count
    sa.Column("enqueued_at", sa.Double),  # lazy repair or an admin asked for it: claimed first
    sa.Index("ix_accesses_rank", "access_rank"),
    sa.Index("ix_accesses_enqueued", "enqueued_at"),
)

# Page matches below the confidence threshold (DESIGN §2), with the evidence a person decides
# on; one row per document, the latest review (created within schema version 1, like accesses).
reviews_t = sa.Table(
    "reviews", _md,
    sa.Column("document_id", sa.String, _doc_fk(), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # pending | accepted | rejected
    sa.Column("evidence", sa.Text, nullable=False),  # JSON written by repage/pdfpath.py
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Index("ix_reviews_status", "status"),
)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ScanRecord:
    document_id: str
    dataset_id: str
    filename: str
    path: Path
    state: State  # pending, skipped or unrecoverable: the edges from (new)
    reason: str
    affected_chunks: int
    total_chunks: int | None = None
    images_to_move: int = 0


@dataclass(frozen=True)
class Claim:
    document_id: str
    dataset_id: str
    filename: str
    path: Path
    fencing_token: int
    affected_chunks: int
    lease_expires: float = 0.0  # DB-clock epoch seconds; renew before it passes


@dataclass(frozen=True)
class ChunkJournalEntry:
    identity: str  # stable chunk identity as a JSON string (chunk_id, or document_id+chunk_index)
    old_pk: str | None = None  # primary keys as text: INT64 and VARCHAR keys both fit
    new_pk: str | None = None
    old_page: int | None = None
    new_page: int | None = None
    old_key: str | None = None  # image_r2_key before / after
    new_key: str | None = None
    row_checksum: str | None = None  # checksum of the rest of the row
    applied: bool = False
    # set by the ledger when read back:
    id: int | None = None
    document_id: str | None = None
    fencing_token: int | None = None
    created_at: float | None = None


@dataclass(frozen=True)
class ObjectJournalEntry:
    old_key: str
    new_key: str
    size: int | None = None
    content_hash: str | None = None
    state: ObjectState = ObjectState.INTENDED
    id: int | None = None
    document_id: str | None = None
    fencing_token: int | None = None
    created_at: float | None = None


@dataclass(frozen=True)
class JournalIntent:
    """One document's intents for add_journals: its object moves, then its chunk changes."""

    document_id: str
    token: int | None
    moves: Sequence[ObjectJournalEntry] = ()
    chunks: Sequence[ChunkJournalEntry] = ()


@dataclass(frozen=True)
class DocumentRecord:
    document_id: str
    dataset_id: str
    filename: str
    state: State
    path: Path
    reason: str
    priority: float
    attempts: int
    affected_chunks: int
    total_chunks: int | None
    images_to_move: int
    lease_owner: str | None
    fencing_token: int
    lease_expires: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    dollars: float
    object_requests_a: int
    object_requests_b: int
    bytes_read: int
    last_error: str | None


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    kind: str
    document_id: str | None
    count: int
    detail: str | None


@dataclass(frozen=True)
class ReviewRecord:
    document_id: str
    status: str  # pending | accepted | rejected
    evidence: str  # JSON
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class AccessRecord:
    """A document's decayed accesses (repage/access.py) and its lazy request, with its state."""

    document_id: str
    dataset_id: str | None
    score: float  # decayed count as of scored_at
    scored_at: float
    access_rank: float | None
    enqueued_at: float | None
    state: State | None  # None: no scan has recorded the document yet
    path: Path | None


# --------------------------------------------------------------------------- helpers


def _batches(items: Iterable[Any], size: int = BATCH) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _lease_problem(document_id: str, row: Any, token: int | None) -> str | None:
    """Why a write under `token` is refused on this document (None: it may go ahead)."""
    if row is None:
        return f"document {document_id} is not in the ledger"
    running = row.state == State.RUNNING.value
    if token is None and running:
        return f"document {document_id} is leased to a worker: pass its fencing token"
    if token is not None and not (running and row.fencing_token == token and row.live):
        return f"document {document_id}: token {token} is stale or its lease expired"
    return None


def _raise_refused(refused: Mapping[str, str]) -> None:
    """The one-document forms of the batch calls raise what the batch form reports."""
    for why in refused.values():
        raise StaleLease(why)


def _redact(text: str, password: str | None = None) -> str:
    """Hide `user:password@` in any URL-looking text (also in driver messages)."""
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return text.replace(password, "***") if password else text


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _record(row: Any) -> DocumentRecord:
    data = dict(row._mapping)
    data["state"], data["path"] = State(data["state"]), Path(data["path"])
    return DocumentRecord(**data)


def _from_row(cls: type, row: Any) -> Any:
    m = row._mapping
    return cls(**{f.name: m[f.name] for f in dc_fields(cls)})


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """Progress, leases and journals. Safe to share between threads; one per process."""

    def __init__(self, url: str):
        self._url = self._parse_url(url)
        self._sqlite = self._url.get_backend_name() == "sqlite"
        self._write_lock = threading.RLock()
        self._local = threading.local()  # .conn: this thread's open transaction(), if any
        self._engine = self._make_engine()
        self._init_schema()

    # ----------------------------------------------------------------- connection

    @staticmethod
    def _parse_url(raw: str) -> sa.URL:
        try:
            url = sa.make_url(raw)
        except (sa_exc.ArgumentError, ValueError) as exc:
            raise ConfigError(f"ledger URL {_redact(raw)!r} is malformed: "
                              "use sqlite:///PATH or postgresql://USER@HOST/DB") from exc
        backend = url.get_backend_name()
        if backend in ("postgres", "postgresql"):
            return url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we ship
        if backend != "sqlite":
            raise ConfigError(f"ledger URL {_redact(raw)!r}: unsupported scheme {url.drivername!r} "
                              "(use sqlite:/// or postgresql://)")
        if url.database in (None, "", ":memory:"):
            raise ConfigError("ledger URL must name a SQLite file (sqlite:///PATH): "
                              "an in-memory ledger is neither kept nor shared")
        return url

    def _make_engine(self) -> sa.Engine:
        if not self._sqlite:
            return sa.create_engine(self._url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
        db = pathlib.Path(self._url.database)
        try:
            # owner-only: the ledger holds the store's keys and errors (SQLite gives -wal/-shm the db's mode)
            db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
        shown = url.render_as_string(hide_password=True)
        if url.get_backend_name() == "sqlite":
            db = pathlib.Path(url.database)
            if not db.exists():
                return {"url": shown, "exists": False, "note": "created by the first scan"}
            url = url.set(database=f"file:{db.resolve()}?mode=ro", query={"uri": "true"})
        engine = sa.create_engine(url, connect_args={} if url.get_backend_name() == "sqlite"
                                  else {"connect_timeout": 10})
        try:
            with engine.connect() as conn:
                has_meta = sa.inspect(conn).has_table("repage_meta")
                version = conn.scalar(sa.select(meta_t.c.value).where(meta_t.c.key == "schema_version")) \
                    if has_meta else None
                documents = conn.scalar(sa.select(sa.func.count()).select_from(docs_t)) if has_meta else 0
        except sa_exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"ledger {shown} does not answer: {_redact(_one_line(exc), url.password)}") from exc
        finally:
            engine.dispose()
        return {"url": shown, "exists": True, "schema_version": version, "documents": documents}

    def describe(self) -> str:
        """The URL with its password redacted, for logs and `doctor`."""
        return self._url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group this thread's ledger writes into one transaction: one commit (one fsync) for many.

        Each call inside runs in its own savepoint, so one that fails (a StaleLease, say) is
        undone alone and raises as usual; the others commit together when the block ends.
        Wrap only ledger calls, never a Milvus or bucket call (DESIGN §4), nor work handed to
        other threads that write to the ledger: they wait for the block to end (SQLite: the
        process's writer lock; PostgreSQL: the row locks). Nested blocks join the outermost one.
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
            msg = _redact(_one_line(exc.orig or exc), self._url.password)
            raise StoreUnavailable(f"ledger {self.describe()} is unavailable: {msg}") from exc
        except sa_exc.DBAPIError as exc:
            msg = _redact(_one_line(exc.orig or exc), self._url.password)
            raise StoreError(f"ledger {self.describe()}: {msg}") from exc

    def _init_schema(self) -> None:
        with self._tx() as conn:
            if not self._sqlite:  # concurrent first starts would race on CREATE TABLE
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_INIT_LOCK)))
            if sa.inspect(conn).has_table("repage_meta"):
                found = conn.scalar(sa.select(meta_t.c.value).where(meta_t.c.key == "schema_version"))
                if found is not None and int(found) > SCHEMA_VERSION:
                    raise ConfigError(
                        f"ledger {self.describe()} has schema version {found}, newer than this "
                        f"repage knows ({SCHEMA_VERSION}): upgrade repage")
                if found is not None:
                    _md.create_all(conn)  # tables added within version 1 (accesses); checkfirst
                    return  # older versions would be migrated here; there is only version 1
            _md.create_all(conn)
            conn.execute(sa.delete(meta_t).where(meta_t.c.key == "schema_version"))
            conn.execute(sa.insert(meta_t).values(key="schema_version", value=str(SCHEMA_VERSION)))

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
            return float(conn.scalar(sa.select(self._now())))

    # ----------------------------------------------------------------- scan

    def upsert_scan(self, records: Iterable[ScanRecord]) -> None:
        """Insert new documents; refresh re-scannable ones; leave running and done ones alone.

        pending/failed/deferred/review: path, reason and counts are refreshed, state kept.
        rolled_back: re-opened to pending when the scan finds it affected again.
        running and DONE: untouched (a scan never counts a done document as affected).
        """
        for batch in _batches(records):
            latest = {r.document_id: r for r in batch}  # last one wins within a batch
            for rec in latest.values():
                check_transition(None, State(rec.state))
            with self._tx() as conn:
                self._upsert_batch(conn, dict(sorted(latest.items())))  # sorted: PG lock order

    def _upsert_batch(self, conn: sa.Connection, recs: dict[str, ScanRecord]) -> None:
        c = docs_t.c
        existing = dict(conn.execute(sa.select(c.document_id, c.state).where(c.document_id.in_(list(recs)))).all())
        new = [r for d, r in recs.items() if d not in existing]
        refresh = [r for d, r in recs.items() if existing.get(d) in _RESCANNABLE]
        reopen = [r for d, r in recs.items()
                  if existing.get(d) == State.ROLLED_BACK and r.state == State.PENDING]
        now = self._now()
        if new:
            conn.execute(self._insert_ignore().values(created_at=now, updated_at=now), [
                {"document_id": r.document_id, "dataset_id": r.dataset_id, "filename": r.filename,
                 "state": State(r.state).value, "path": Path(r.path).value, "reason": r.reason,
                 "affected_chunks": r.affected_chunks, "total_chunks": r.total_chunks,
                 "images_to_move": r.images_to_move} for r in new])
        for rows, src, extra in ((refresh, _RESCANNABLE, {}),
                                 (reopen, (State.ROLLED_BACK,), {"state": State.PENDING.value})):
            if rows:
                conn.execute(self._rescan_update(src, extra), [
                    {"b_id": r.document_id, "b_dataset": r.dataset_id, "b_filename": r.filename,
                     "b_path": Path(r.path).value, "b_reason": r.reason,
                     "b_affected": r.affected_chunks, "b_total": r.total_chunks, "b_moves": r.images_to_move} for r in rows])

    def _insert_ignore(self) -> Any:
        # Another scanner may insert the same document between our SELECT and INSERT.
        insert = sqlite_dialect.insert if self._sqlite else pg_dialect.insert
        return insert(docs_t).on_conflict_do_nothing(index_elements=["document_id"])

    def _rescan_update(self, src: Sequence[State], extra: dict[str, Any]) -> Any:
        c = docs_t.c
        total = sa.bindparam("b_total", type_=sa.Integer)
        values = dict(dataset_id=sa.bindparam("b_dataset"), filename=sa.bindparam("b_filename"),
                      path=sa.bindparam("b_path"), reason=sa.bindparam("b_reason"),
                      affected_chunks=sa.bindparam("b_affected"), images_to_move=sa.bindparam("b_moves"),
                      total_chunks=sa.func.coalesce(total, c.total_chunks))
        where = [c.document_id == sa.bindparam("b_id"),
                 sa.or_(*(c.state == s.value for s in src))]  # executemany: no expanding IN
        if not extra:  # a refresh that changes nothing leaves the row (and its updated_at) alone
            where.append(sa.or_(*(c[name].is_distinct_from(value) for name, value in values.items())))
        return sa.update(docs_t).where(*where).values(**values, updated_at=self._now(), **extra)

    def set_priority(self, priorities: Mapping[str, float]) -> None:
        """Set the claim priority of documents (order="priority" claims highest first)."""
        stmt = (sa.update(docs_t).where(docs_t.c.document_id == sa.bindparam("b_id"))
                .values(priority=sa.bindparam("b_priority")))
        for batch in _batches(sorted(priorities.items())):
            with self._tx() as conn:
                conn.execute(stmt, [{"b_id": d, "b_priority": float(p)} for d, p in batch])

    # ----------------------------------------------------------------- leases

    def claim_batch(self, owner: str, limit: int, lease_seconds: float, *,
                    paths: set[Path] | None = None, dataset_id: str | None = None,
                    document_ids: Sequence[str] | None = None, order: str = "oldest",
                    min_access_rank: float | None = None, enqueued_only: bool = False) -> list[Claim]:
        """Move up to `limit` pending documents to running under a new lease, in `order`.

        `priority`: enqueued (lazy) documents first, then `priority`, then access rank.
        `min_access_rank` keeps documents ranked at least that (repage/access.py
        rank_threshold); `enqueued_only` keeps enqueued documents only.
        """
        if order not in ORDERS:
            raise ValueError(f"claim order {order!r} is not one of {ORDERS}")
        if limit <= 0 or (paths is not None and not paths):
            return []
        c = docs_t.c
        with self._tx() as conn:
            ids = self._pick(conn, limit, paths, dataset_id, document_ids, order, min_access_rank, enqueued_only)
            if not ids:
                return []
            now = self._now()
            rows = conn.execute(
                sa.update(docs_t).where(c.document_id.in_(ids), c.state == State.PENDING.value)
                .values(state=State.RUNNING.value, lease_owner=owner, lease_expires=now + lease_seconds,
                        fencing_token=c.fencing_token + 1, started_at=now, finished_at=None, updated_at=now)
                .returning(c.document_id, c.dataset_id, c.filename, c.path, c.fencing_token,
                           c.affected_chunks, c.lease_expires)).all()
        rank = {d: i for i, d in enumerate(ids)}
        claims = [Claim(r.document_id, r.dataset_id, r.filename, Path(r.path), r.fencing_token,
                        r.affected_chunks, r.lease_expires) for r in rows]
        return sorted(claims, key=lambda cl: rank[cl.document_id])

    def _pick(self, conn: sa.Connection, limit: int, paths: set[Path] | None, dataset_id: str | None,
              document_ids: Sequence[str] | None, order: str, min_access_rank: float | None = None,
              enqueued_only: bool = False) -> list[str]:
        c, a = docs_t.c, accesses_t.c
        q = sa.select(c.document_id).where(c.state == State.PENDING.value)
        if paths is not None:
            q = q.where(c.path.in_(sorted(Path(p).value for p in paths)))
        if dataset_id is not None:
            q = q.where(c.dataset_id == dataset_id)
        if order == "priority" or min_access_rank is not None or enqueued_only:
            q = q.select_from(docs_t.outerjoin(accesses_t, a.document_id == c.document_id))
            q = q.where(a.access_rank >= min_access_rank) if min_access_rank is not None else q
            q = q.where(a.enqueued_at.is_not(None)) if enqueued_only else q
        q = q.order_by(*{"oldest": (c.created_at, c.document_id), "random": (sa.func.random(),),
                         "priority": (a.enqueued_at.is_(None), a.enqueued_at, c.priority.desc(),
                                      a.access_rank.desc().nulls_last(), c.created_at, c.document_id)}[order])
        if not self._sqlite:
            # PostgreSQL: rows another claimer holds are skipped, not waited for (throughput;
            # the UPDATE's `state = pending` is what makes a double claim impossible). SQLite
            # would drop this clause silently; there BEGIN IMMEDIATE serializes claimers.
            q = q.with_for_update(skip_locked=True, of=docs_t)  # OF: never lock the accesses side
        if document_ids is None:
            return list(conn.scalars(q.limit(limit)))
        picked: list[str] = []
        for batch in _batches(dict.fromkeys(document_ids)):  # bounded IN lists
            picked += conn.scalars(q.where(c.document_id.in_(batch)).limit(limit - len(picked)))
            if len(picked) >= limit:
                break
        return picked

    def requeue_image_moves(self, dataset_id: str | None = None,
                            document_ids: Sequence[str] | None = None) -> int:
        """Migrated/verified documents whose images a pages-only run left at legacy keys go
        back to pending, so a run that moves images picks them up. How many."""
        c = docs_t.c
        where = [c.state.in_([State.MIGRATED.value, State.VERIFIED.value]), c.images_to_move > 0]
        return self._back_to_pending(where, dataset_id, document_ids, reason="images still to move")

    def retry_failed(self, dataset_id: str | None = None, document_ids: Sequence[str] | None = None) -> int:
        """Failed documents (of the dataset / ids) go back to pending: the retry edge. How many.
        Their last_error and attempts stay, so `status` still tells what went wrong before."""
        check_transition(State.FAILED, State.PENDING)
        return self._back_to_pending([docs_t.c.state == State.FAILED.value], dataset_id, document_ids)

    def _back_to_pending(self, where: list[Any], dataset_id: str | None, document_ids: Sequence[str] | None,
                         **values: Any) -> int:
        """Documents matching `where` (of the dataset / ids) back to pending, 500 ids per statement."""
        c = docs_t.c
        if dataset_id is not None:
            where = [*where, c.dataset_id == dataset_id]
        moved = 0
        for batch in _batches(document_ids) if document_ids is not None else [None]:
            clause = where + ([c.document_id.in_(batch)] if batch is not None else [])
            with self._tx() as conn:
                moved += conn.execute(sa.update(docs_t).where(*clause).values(
                    state=State.PENDING.value, finished_at=None, updated_at=self._now(), **values)).rowcount
        return moved

    def release_expired(self) -> int:
        """Return running documents whose lease has expired to pending; how many."""
        c = docs_t.c
        with self._tx() as conn:
            return conn.execute(
                sa.update(docs_t).where(c.state == State.RUNNING.value, c.lease_expires < self._now())
                .values(state=State.PENDING.value, lease_owner=None, lease_expires=None,
                        updated_at=self._now())).rowcount

    def renew_lease(self, document_id: str, token: int, lease_seconds: float) -> float:
        """Extend a live lease to db_now()+lease_seconds; returns the new expiry. StaleLease if lost."""
        c = docs_t.c
        with self._tx() as conn:
            expires = conn.scalar(
                sa.update(docs_t).where(*self._live(document_id, token))
                .values(lease_expires=self._now() + lease_seconds, updated_at=self._now())
                .returning(c.lease_expires))
        if expires is None:
            raise StaleLease(f"lease on document {document_id} with token {token} is no longer current")
        return float(expires)

    def renew_leases(self, tokens: Mapping[str, int], lease_seconds: float) -> set[str]:
        """renew_lease for many documents in one statement per 500; returns those whose lease was lost."""
        c, renewed = docs_t.c, set()
        with self._tx() as conn:
            for batch in _batches(sorted(tokens.items())):
                renewed.update(conn.scalars(
                    sa.update(docs_t).where(sa.tuple_(c.document_id, c.fencing_token).in_(batch),
                                            c.state == State.RUNNING.value, c.lease_expires >= self._now())
                    .values(lease_expires=self._now() + lease_seconds, updated_at=self._now())
                    .returning(c.document_id)))
        return set(tokens) - renewed

    def _live(self, document_id: str, token: int) -> tuple[Any, ...]:
        """WHERE clauses that hold only while `token` owns a live lease on the document."""
        c = docs_t.c
        return (c.document_id == document_id, c.state == State.RUNNING.value,
                c.fencing_token == token, c.lease_expires >= self._now())

    # ----------------------------------------------------------------- transitions

    def transition(self, document_id: str, dst: State, *, token: int | None = None,
                   reason: str | None = None, error: str | None = None, **fields: Any) -> None:
        """Move a document along an edge of the state table.

        A running document needs the current `token` and a live lease (else StaleLease); the
        check is part of the UPDATE, so a worker whose lease expired cannot win a race.
        A token given for a document that is not running is stale too.
        `fields`: dollars, object_requests_a, object_requests_b, bytes_read are ADDED to the
        document's totals; total_chunks, affected_chunks, path, priority are SET.
        Entering running is claim_batch's job; documents enter the ledger through upsert_scan.
        """
        dst = State(dst)
        values = self._field_values(fields)
        c = docs_t.c
        with self._tx() as conn:
            row = conn.execute(sa.select(c.state, c.fencing_token)
                               .where(c.document_id == document_id).with_for_update()).first()
            if row is None:
                raise IllegalTransition(f"document {document_id} is not in the ledger: scan it first")
            src = State(row.state)
            if token is not None and (src != State.RUNNING or token != row.fencing_token):
                raise StaleLease(f"document {document_id}: token {token} is stale "
                                 f"(state {src}, current token {row.fencing_token})")
            check_transition(src, dst)
            if dst == State.RUNNING:
                raise IllegalTransition(f"document {document_id}: pending -> running is claim_batch's job")
            where: tuple[Any, ...] = (c.document_id == document_id, c.state == src.value)
            if src == State.RUNNING:
                if token is None:
                    raise StaleLease(f"document {document_id} is running: its fencing token is required")
                where = self._live(document_id, token)
                values.update(lease_owner=None, lease_expires=None)
            values.update(self._edge_values(dst, reason, error))
            if conn.execute(sa.update(docs_t).where(*where).values(**values)).rowcount != 1:
                raise StaleLease(f"lease on document {document_id} expired before {src} -> {dst}")

    def _edge_values(self, dst: State, reason: str | None, error: str | None) -> dict[str, Any]:
        now = self._now()
        values: dict[str, Any] = {"state": dst.value, "updated_at": now}
        if dst != State.PENDING:
            values["finished_at"] = now  # the end of an attempt, or of verify/rollback
        if dst == State.FAILED:
            values["attempts"] = docs_t.c.attempts + 1
        if reason is not None:
            values["reason"] = reason
        if error is not None:
            values["last_error"] = error
        return values

    @staticmethod
    def _field_values(fields: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(fields) - set(_ADDITIVE) - set(_SETTABLE)
        if unknown:
            raise TypeError(f"transition() got unknown fields {sorted(unknown)}")
        values: dict[str, Any] = {}
        for name, value in fields.items():
            if name in _ADDITIVE:
                values[name] = docs_t.c[name] + value
            else:
                values[name] = Path(value).value if name == "path" else value
        return values

    # ----------------------------------------------------------------- journals

    def _require_lease(self, conn: sa.Connection, document_id: str, token: int | None) -> int:
        """Check (and on PostgreSQL lock) the document's lease; returns its fencing token."""
        refused, current = self._leases(conn, {document_id: token})
        _raise_refused(refused)
        return current[document_id]

    def _leases(self, conn: sa.Connection, tokens: Mapping[str, int | None]) -> tuple[dict[str, str], dict[str, int]]:
        """Check (and on PostgreSQL lock, in id order) many documents' leases in one query per 500.

        Returns ({document_id: why it is refused}, {document_id: its current fencing token}).
        A token of None is maintenance: allowed only on a document no worker holds.
        """
        c, rows = docs_t.c, {}
        for batch in _batches(sorted(tokens)):
            rows.update((r.document_id, r) for r in conn.execute(
                sa.select(c.document_id, c.state, c.fencing_token, (c.lease_expires >= self._now()).label("live"))
                .where(c.document_id.in_(batch)).order_by(c.document_id).with_for_update()))
        refused = {d: why for d, t in tokens.items() if (why := _lease_problem(d, rows.get(d), t))}
        return refused, {d: r.fencing_token for d, r in rows.items() if d not in refused}

    def add_journals(self, intents: Sequence[JournalIntent]) -> dict[str, str]:
        """Record many documents' intents (DESIGN §5 step 1) in one transaction, each entry stamped
        with its document's fencing token. Returns {document_id: why} for the documents whose lease
        is gone: nothing is written for those."""
        with self._tx() as conn:
            refused, current = self._leases(conn, {i.document_id: i.token for i in intents})
            live = [i for i in intents if i.document_id not in refused]
            # objects first: a chunk journal is only ever resumed with its moves recorded
            for table, entries in ((objects_t, [(i.document_id, e) for i in live for e in i.moves]),
                                   (chunks_t, [(i.document_id, e) for i in live for e in i.chunks])):
                for batch in _batches(entries):
                    conn.execute(sa.insert(table).values(created_at=self._now()), [
                        {**{f.name: getattr(e, f.name) for f in dc_fields(e) if f.name not in _STAMPED},
                         "document_id": doc, "fencing_token": current[doc]} for doc, e in batch])
        return refused

    def _latest(self, table: sa.Table, document_id: str, *group: sa.Column[Any]) -> list[Any]:
        """The newest journal row per `group` (a retried step journals the same change again)."""
        return self._latest_many(table, [document_id], *group).get(document_id, [])

    def _latest_many(self, table: sa.Table, document_ids: Sequence[str], *group: sa.Column[Any]) -> dict[str, list]:
        t, found = table, defaultdict(list)
        with self._tx(write=False) as conn:
            for batch in _batches(dict.fromkeys(document_ids)):
                newest = (sa.select(sa.func.max(t.c.id)).where(t.c.document_id.in_(batch))
                          .group_by(t.c.document_id, *group).scalar_subquery())
                for row in conn.execute(sa.select(t).where(t.c.id.in_(newest)).order_by(t.c.document_id, *group, t.c.id)):
                    found[row.document_id].append(row)
        return found

    def add_chunk_journal(self, document_id: str, token: int | None,
                          entries: Sequence[ChunkJournalEntry]) -> None:
        """Record intended chunk changes (DESIGN §5 step 1); later entries supersede earlier ones."""
        _raise_refused(self.add_journals([JournalIntent(document_id, token, chunks=entries)]))

    def add_object_journal(self, document_id: str, token: int | None,
                           entries: Sequence[ObjectJournalEntry]) -> None:
        """Record intended object moves (DESIGN §5 step 1), normally in state `intended`."""
        _raise_refused(self.add_journals([JournalIntent(document_id, token, moves=entries)]))

    def mark_chunks_applied(self, document_id: str, token: int | None, identities: Iterable[str],
                            *, new_pks: Mapping[str, str] | None = None) -> None:
        """Mark the latest entry of each identity applied; record keys a server assigned (§5.4)."""
        pks = {i: (new_pks or {}).get(i) for i in identities}
        _raise_refused(self.mark_chunks_applied_many({document_id: (token, pks)}))

    def mark_chunks_applied_many(self, items: Mapping[str, tuple[int | None, Mapping[str, str | None]]]
                                 ) -> dict[str, str]:
        """mark_chunks_applied for many documents: {document_id: (token, {identity: new pk or None})}.
        One transaction; returns {document_id: why} for those whose lease is gone (left as they were)."""
        t = chunks_t
        stmt = sa.update(t).where(t.c.id == sa.bindparam("b_id")).values(
            applied=True, new_pk=sa.func.coalesce(sa.bindparam("b_pk", type_=sa.Text), t.c.new_pk))
        with self._tx() as conn:
            refused, _ = self._leases(conn, {d: token for d, (token, _) in items.items()})
            live = {d: pks for d, (_, pks) in items.items() if d not in refused}
            newest = self._newest(conn, t, live, t.c.identity)
            params = [{"b_id": i, "b_pk": live[d][ident]} for (d, ident), i in newest.items() if ident in live[d]]
            for batch in _batches(params):
                conn.execute(stmt, batch)
        return refused

    def _newest(self, conn: sa.Connection, t: sa.Table, documents: Iterable[str],
                *group: sa.Column[Any]) -> dict[tuple, int]:
        """{(document_id, *group values): id of the newest journal row} for these documents."""
        newest: dict[tuple, int] = {}
        for batch in _batches(sorted(documents)):
            newest.update(((d, *g), i) for d, *g, i in conn.execute(
                sa.select(t.c.document_id, *group, sa.func.max(t.c.id)).where(t.c.document_id.in_(batch))
                .group_by(t.c.document_id, *group)))
        return newest

    def set_object_state(self, document_id: str, token: int | None, old_key: str, new_key: str,
                         state: ObjectState | str, *, size: int | None = None,
                         content_hash: str | None = None) -> None:
        """Advance the latest journal entry of one move; size/hash are set when given."""
        t = objects_t
        values: dict[str, Any] = {"state": ObjectState(state).value}
        values.update({k: v for k, v in (("size", size), ("content_hash", content_hash)) if v is not None})
        newest = (sa.select(sa.func.max(t.c.id)).where(
            t.c.document_id == document_id, t.c.old_key == old_key, t.c.new_key == new_key).scalar_subquery())
        with self._tx() as conn:
            self._require_lease(conn, document_id, token)
            if conn.execute(sa.update(t).where(t.c.id == newest).values(**values)).rowcount != 1:
                raise StoreError(f"document {document_id}: no object journal entry {old_key} -> {new_key}")

    def set_objects_state(self, items: Mapping[str, tuple[int | None, Sequence[tuple[str, str]]]],
                          state: ObjectState | str) -> dict[str, str]:
        """Advance the latest journal entry of each (old_key, new_key) move of many documents:
        {document_id: (token, moves)}, one transaction. Returns {document_id: why} for those
        refused (lease gone, or a move not in the journal); nothing is changed for those."""
        t = objects_t
        stmt = sa.update(t).where(t.c.id == sa.bindparam("b_id")).values(state=ObjectState(state).value)
        with self._tx() as conn:
            refused, _ = self._leases(conn, {d: token for d, (token, _) in items.items()})
            newest = self._newest(conn, t, [d for d in items if d not in refused], t.c.old_key, t.c.new_key)
            params = []
            for doc, (_, moves) in items.items():
                if doc in refused:
                    continue
                if missing := sorted((o, n) for o, n in moves if (doc, o, n) not in newest):
                    refused[doc] = f"document {doc}: no object journal entry {missing[0][0]} -> {missing[0][1]}"
                    continue
                params += [{"b_id": newest[(doc, o, n)]} for o, n in moves]
            for batch in _batches(params):
                conn.execute(stmt, batch)
        return refused

    def chunk_journal(self, document_id: str) -> list[ChunkJournalEntry]:
        """The latest entry per chunk identity, in identity order."""
        return self.chunk_journals([document_id])[document_id]

    def chunk_journals(self, document_ids: Sequence[str]) -> dict[str, list[ChunkJournalEntry]]:
        """chunk_journal of many documents, in one query per 500 ({} entries for those without)."""
        rows = self._latest_many(chunks_t, document_ids, chunks_t.c.identity)
        return {d: [_from_row(ChunkJournalEntry, r) for r in rows.get(d, [])] for d in document_ids}

    def object_journal(self, document_id: str) -> list[ObjectJournalEntry]:
        """The latest entry per (old_key, new_key), in key order."""
        rows = self._latest(objects_t, document_id, objects_t.c.old_key, objects_t.c.new_key)
        return [replace(_from_row(ObjectJournalEntry, r), state=ObjectState(r.state)) for r in rows]

    # ----------------------------------------------------------------- reports

    def counts(self) -> dict[tuple[str, str], int]:
        c = docs_t.c
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(c.state, c.path, sa.func.count()).group_by(c.state, c.path)).all()
        return {(s, p): n for s, p, n in rows}

    def documents(self, states: set[State] | None = None, limit: int | None = None,
                  dataset_id: str | None = None) -> Iterator[DocumentRecord]:
        """Documents in id order, fetched in pages so no transaction stays open while iterating."""
        c, after, left = docs_t.c, None, limit
        while left is None or left > 0:
            size = 1000 if left is None else min(1000, left)
            q = sa.select(docs_t).order_by(c.document_id).limit(size)
            if states is not None:
                q = q.where(c.state.in_([State(s).value for s in states]))
            if dataset_id is not None:
                q = q.where(c.dataset_id == dataset_id)
            if after is not None:
                q = q.where(c.document_id > after)
            with self._tx(write=False) as conn:
                rows = conn.execute(q).all()
            yield from (_record(r) for r in rows)
            if len(rows) < size:
                return
            after, left = rows[-1].document_id, None if left is None else left - len(rows)

    def get(self, document_id: str) -> DocumentRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(docs_t).where(docs_t.c.document_id == document_id)).first()
        return None if row is None else _record(row)

    def last_errors(self, n: int) -> list[DocumentRecord]:
        """The n most recently updated documents that carry an error message."""
        c = docs_t.c
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(docs_t).where(c.last_error.is_not(None))
                                .order_by(c.updated_at.desc(), c.document_id).limit(n)).all()
        return [_record(r) for r in rows]

    def totals(self) -> dict[str, float | int]:
        """Spend and I/O summed over all documents, plus the document count."""
        c = docs_t.c
        cols = [sa.func.coalesce(sa.func.sum(c[name]), 0).label(name) for name in _ADDITIVE]
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(sa.func.count().label("documents"), *cols)).one()
        out: dict[str, float | int] = {k: int(v) for k, v in row._mapping.items()}
        out["dollars"] = float(row.dollars)
        return out

    def usage_by_path(self) -> dict[str, dict[str, float | int]]:
        """Documents, requests, bytes read and dollars summed per path (what each path cost so far)."""
        c = docs_t.c
        cols = [sa.func.coalesce(sa.func.sum(c[name]), 0).label(name) for name in _ADDITIVE]
        with self._tx(write=False) as conn:
            rows = conn.execute(sa.select(c.path, sa.func.count().label("documents"), *cols).group_by(c.path)).all()
        return {r.path: {"documents": int(r.documents), **{n: int(r._mapping[n]) for n in _ADDITIVE if n != "dollars"},
                         "dollars": float(r.dollars)} for r in rows}

    # ----------------------------------------------------------------- reviews

    def save_review(self, document_id: str, token: int | None, evidence: str) -> None:
        """Record a document's review (status pending), replacing an older one, under its lease."""
        t = reviews_t
        with self._tx() as conn:
            self._require_lease(conn, document_id, token)
            conn.execute(sa.delete(t).where(t.c.document_id == document_id))
            now = self._now()
            conn.execute(sa.insert(t).values(document_id=document_id, status="pending", evidence=evidence,
                                             created_at=now, updated_at=now))

    def reviews(self, status: str | None = "pending") -> list[ReviewRecord]:
        """Reviews (of one status, or all), oldest first."""
        t = reviews_t
        q = sa.select(t).order_by(t.c.created_at, t.c.document_id)
        if status is not None:
            q = q.where(t.c.status == status)
        with self._tx(write=False) as conn:
            return [_from_row(ReviewRecord, r) for r in conn.execute(q).all()]

    def get_review(self, document_id: str) -> ReviewRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(sa.select(reviews_t).where(reviews_t.c.document_id == document_id)).first()
        return None if row is None else _from_row(ReviewRecord, row)

    def resolve_review(self, document_id: str, decision: str, *, reason: str, path: Path | None = None) -> None:
        """accepted | rejected: the review's status and the document's review -> pending edge, atomically.

        `path` re-routes the document (a rejected match leaves it to reprocess).
        """
        if decision not in ("accepted", "rejected"):
            raise ValueError(f"review decision {decision!r}: use accepted or rejected")
        c, r = docs_t.c, reviews_t.c
        with self._tx() as conn:
            state = conn.scalar(sa.select(c.state).where(c.document_id == document_id).with_for_update())
            status = conn.scalar(sa.select(r.status).where(r.document_id == document_id))
            if state != State.REVIEW.value or status != "pending":
                raise IllegalTransition(f"document {document_id} has no pending review "
                                        f"(state {state or 'unknown'}, review {status or 'none'})")
            check_transition(State.REVIEW, State.PENDING)
            conn.execute(sa.update(reviews_t).where(r.document_id == document_id)
                         .values(status=decision, updated_at=self._now()))
            values = self._edge_values(State.PENDING, reason, None)
            if path is not None:
                values["path"] = Path(path).value
            conn.execute(sa.update(docs_t).where(c.document_id == document_id, c.state == State.REVIEW.value)
                         .values(**values))

    def add_event(self, kind: str, document_id: str | None = None, count: int = 1,
                  detail: str | None = None) -> None:
        with self._tx() as conn:
            conn.execute(sa.insert(events_t).values(at=self._now(), kind=kind, document_id=document_id,
                                                    count=count, detail=detail))

    def events(self, since: float | None = None, kinds: Iterable[str] | None = None,
               limit: int | None = None) -> list[Event]:
        """Events in time order; with `limit`, the most recent `limit` of them."""
        t = events_t
        q = sa.select(t).order_by(t.c.id.desc())
        if since is not None:
            q = q.where(t.c.at >= since)
        if kinds is not None:
            q = q.where(t.c.kind.in_(list(kinds)))
        if limit is not None:
            q = q.limit(limit)
        with self._tx(write=False) as conn:
            rows = conn.execute(q).all()
        return [_from_row(Event, r) for r in reversed(rows)]

    def prune_events(self, before: float, kinds: Iterable[str] | None = None) -> int:
        """Delete events older than `before` (DB-clock epoch seconds), of `kinds` if given; how many."""
        where = [events_t.c.at < before] + ([events_t.c.kind.in_(list(kinds))] if kinds is not None else [])
        with self._tx() as conn:
            return conn.execute(sa.delete(events_t).where(*where)).rowcount

    # ----------------------------------------------------------------- usage and lazy requests

    def _accesses_insert(self) -> Any:
        insert = sqlite_dialect.insert if self._sqlite else pg_dialect.insert
        return insert(accesses_t).on_conflict_do_nothing(index_elements=["document_id"])

    def record_accesses(self, hits: Mapping[str, tuple[str | None, Decayed]], half_life_s: float) -> int:
        """Add decayed hits (document -> (dataset_id, Decayed)); returns documents touched.

        Read-modify-write under the row lock (PostgreSQL) or the write lock (SQLite): flushes
        of several service processes add up instead of overwriting each other.
        """
        a = accesses_t.c
        update = (sa.update(accesses_t).where(a.document_id == sa.bindparam("b_id")).values(
            dataset_id=sa.func.coalesce(sa.bindparam("b_dataset", type_=sa.String), a.dataset_id),
            score=sa.bindparam("b_score"), scored_at=sa.bindparam("b_at"), access_rank=sa.bindparam("b_rank")))
        for batch in _batches(sorted(hits.items())):
            ids = [doc for doc, _ in batch]
            with self._tx() as conn:
                conn.execute(self._accesses_insert(),
                             [{"document_id": doc, "score": 0.0, "scored_at": hit.at} for doc, (_, hit) in batch])
                known = {r.document_id: Decayed(r.score, r.scored_at) for r in conn.execute(
                    sa.select(a.document_id, a.score, a.scored_at).where(a.document_id.in_(ids)).with_for_update())}
                rows = []
                for doc, (dataset_id, hit) in batch:
                    total = known[doc].merge(hit, half_life_s)
                    rows.append({"b_id": doc, "b_dataset": dataset_id, "b_score": total.score, "b_at": total.at,
                                 "b_rank": total.rank(half_life_s)})
                conn.execute(update, rows)
        return len(hits)

    def enqueue(self, document_ids: Sequence[str], *, retry_failed: bool = False) -> dict[str, str]:
        """Ask for documents to be claimed before everything else (lazy repair, admin).

        Per document: "enqueued" (newly: an `enqueued` event is written), "queued" (it was
        already), or its state when there is nothing to queue (running, done, review,
        deferred, failed). A document no scan has recorded is enqueued: the worker scans it.
        `retry_failed` first moves a failed document back to pending (the retry edge).
        """
        outcome: dict[str, str] = {}
        for batch in _batches(dict.fromkeys(document_ids)):
            with self._tx() as conn:
                outcome.update(self._enqueue_batch(conn, batch, retry_failed))
        return outcome

    def _enqueue_batch(self, conn: sa.Connection, batch: list[str], retry_failed: bool) -> dict[str, str]:
        c, a = docs_t.c, accesses_t.c
        states = dict(conn.execute(sa.select(c.document_id, c.state).where(c.document_id.in_(batch))).all())
        failed = [d for d in batch if states.get(d) == State.FAILED.value] if retry_failed else []
        if failed:
            check_transition(State.FAILED, State.PENDING)
            conn.execute(sa.update(docs_t).where(c.document_id.in_(failed), c.state == State.FAILED.value)
                         .values(state=State.PENDING.value, updated_at=self._now()))
            states.update(dict.fromkeys(failed, State.PENDING.value))
        wanted = [d for d in batch if states.get(d, State.PENDING.value) == State.PENDING.value]
        outcome = {d: states[d] for d in batch if d not in wanted}
        if wanted:
            now = self._now()
            conn.execute(self._accesses_insert(), [{"document_id": d, "score": 0.0, "scored_at": 0.0} for d in wanted])
            newly = set(conn.scalars(sa.update(accesses_t).where(a.document_id.in_(wanted), a.enqueued_at.is_(None))
                                     .values(enqueued_at=now).returning(a.document_id)))
            if newly:
                conn.execute(sa.insert(events_t).values(at=now, kind="enqueued"),
                             [{"document_id": d, "count": 1} for d in sorted(newly)])
            outcome.update({d: "enqueued" if d in newly else "queued" for d in wanted})
        return outcome

    def enqueued(self, *, unscanned_only: bool = False, limit: int | None = None) -> list[str]:
        """Enqueued documents, oldest request first; `unscanned_only`: those no scan recorded."""
        a, c = accesses_t.c, docs_t.c
        q = sa.select(a.document_id).where(a.enqueued_at.is_not(None)).order_by(a.enqueued_at, a.document_id)
        if unscanned_only:
            q = q.where(~sa.exists().where(c.document_id == a.document_id))
        if limit is not None:
            q = q.limit(limit)
        with self._tx(write=False) as conn:
            return list(conn.scalars(q))

    def clear_enqueued(self, document_ids: Sequence[str] | None = None, *,
                       keep_paths: set[Path] | None = None) -> int:
        """Drop enqueue requests: of `document_ids`; or else of every scanned document that a
        claim (of `keep_paths`) can no longer take. Running documents keep theirs."""
        a, c = accesses_t.c, docs_t.c
        if document_ids is not None:
            wheres = [a.document_id.in_(batch) for batch in _batches(dict.fromkeys(document_ids))]
        else:
            claimable = c.state == State.PENDING.value
            if keep_paths is not None:
                claimable = sa.and_(claimable, c.path.in_(sorted(Path(p).value for p in keep_paths)))
            settled = sa.select(c.document_id).where(~sa.or_(claimable, c.state == State.RUNNING.value))
            wheres = [a.document_id.in_(settled)]
        cleared = 0
        for where in wheres:
            with self._tx() as conn:
                cleared += conn.execute(sa.update(accesses_t).where(a.enqueued_at.is_not(None), where)
                                        .values(enqueued_at=None)).rowcount
        return cleared

    def top_accesses(self, limit: int = 20) -> list[AccessRecord]:
        """Documents by access rank (decayed count), highest first."""
        a, c = accesses_t.c, docs_t.c
        q = (sa.select(a.document_id, sa.func.coalesce(a.dataset_id, c.dataset_id).label("dataset_id"), a.score,
                       a.scored_at, a.access_rank, a.enqueued_at, c.state, c.path)
             .select_from(accesses_t.outerjoin(docs_t, c.document_id == a.document_id))
             .where(a.score > 0).order_by(a.access_rank.desc(), a.document_id).limit(limit))
        with self._tx(write=False) as conn:
            rows = conn.execute(q).all()
        return [AccessRecord(r.document_id, r.dataset_id, float(r.score), float(r.scored_at), r.access_rank,
                             r.enqueued_at, State(r.state) if r.state else None, Path(r.path) if r.path else None)
                for r in rows]

    def document_ids_by_dataset(self, dataset_ids: Iterable[str]) -> dict[str, list[str]]:
        """The documents the ledger knows per dataset (an imported dataset hit counts for each)."""
        c, out = docs_t.c, {}
        for batch in _batches(sorted(set(dataset_ids))):
            with self._tx(write=False) as conn:
                for dataset, doc in conn.execute(sa.select(c.dataset_id, c.document_id)
                                                 .where(c.dataset_id.in_(batch)).order_by(c.document_id)):
                    out.setdefault(dataset, []).append(doc)
        return out


# --------------------------------------------------------------------------- SQLite hooks


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 module (documented SQLAlchemy recipe) so that
    # _sqlite_on_begin can issue BEGIN IMMEDIATE: SQLite has no SKIP LOCKED, so writers
    # take the write lock up front instead of failing to upgrade a read lock mid-transaction.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout = 30000")  # wait for the writer lock instead of failing
    cur.execute("PRAGMA journal_mode = WAL")    # readers never block the writer, nor it them
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _sqlite_on_begin(conn: sa.Connection) -> None:
    write = conn.get_execution_options().get("repage_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


__all__ = [
    "Ledger", "ScanRecord", "Claim", "ChunkJournalEntry", "ObjectJournalEntry", "ObjectState",
    "DocumentRecord", "Event", "AccessRecord", "ReviewRecord", "SCHEMA_VERSION", "ORDERS",
]

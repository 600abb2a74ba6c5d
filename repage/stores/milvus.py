"""Milvus adapter: the only module that imports pymilvus.

Reads the collection schema instead of assuming it, streams affected chunks, fetches
whole documents within Milvus' per-request limits and writes page fixes either as a
partial update or as a full-row upsert that keeps every other field bit for bit.

pymilvus retries (3.0.2, `pymilvus/decorators.py::retry_on_rpc_failure`): every RPC
is wrapped in a loop that retries rate-limit errors (`ErrorCode.RATE_LIMIT` /
`common_pb2.RateLimit`) and gRPC transient errors up to 75 times with backoff up to
3 s. There is no client-wide switch; the loop reads per-call kwargs instead:
`retry_on_rate_limit=False` turns the rate-limit retry off (we pass it on every call
so repage's own throttle sees the 429-equivalent), and a `timeout` bounds the
transient-error retry by wall time instead of by count. RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED and INVALID_ARGUMENT are never retried by pymilvus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import ConnectionConfigException, ErrorCode, MilvusException
from pymilvus.grpc_gen import common_pb2

from repage.domain.identity import ChunkIdentity
from repage.domain.records import ChunkChange
from repage.errors import ConfigError, InvalidFilterValue, SchemaError, StoreError, StoreUnavailable, Throttled
from repage.redact import Redactor, redact_url
from repage.stores.files import make_private_dirs


def _quiet_pymilvus_logging() -> None:
    """pymilvus installs its own stderr handlers at import and logs every failed RPC with a
    traceback; repage translates those errors into one-line messages itself (CLI contract).
    Hand its loggers to the application's logging config, and at CRITICAL by default."""
    for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer"):
        log = logging.getLogger(name)
        log.handlers[:] = [logging.NullHandler()]
        log.propagate = True
        log.setLevel(logging.CRITICAL if name == "pymilvus" else logging.NOTSET)


_quiet_pymilvus_logging()

MAX_QUERY_ROWS = 16_384  # Milvus' hard cap on rows returned by one query
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # Milvus' cap on one request/response
MAX_STRING_BYTES = 65_535  # longest VARCHAR Milvus stores
MAX_FILTER_BYTES = 1024 * 1024  # keep expressions parseable quickly by the proxy
MAX_WRITE_ROWS = 10_000
SIZE_MARGIN = 0.8  # estimates are rough: stay 20% under every limit
TEXT_BYTES_GUESS = 4096  # a FLTR chunk is ~1k tokens before we have measured any row

LIGHT_FIELDS = (
    "document_id",
    "dataset_id",
    "filename",
    "chunk_type",
    "page",
    "image_index",
    "ocr_confidence",
    "image_r2_key",
    "image_size",
    "chunk_index",
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_INT64 = (-(2**63), 2**63 - 1)


# ---------------------------------------------------------------- filter safety (pure)


def validate_identifier(name: Any) -> str:
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise InvalidFilterValue(f"field name {name!r} is not a valid Milvus field name")
    return name


def quote_string(value: Any, *, field: str = "value") -> str:
    """A Milvus string literal; refuses what the filter grammar cannot carry safely."""
    if not isinstance(value, str):
        raise InvalidFilterValue(f"{field}: expected a string, got {type(value).__name__}")
    if _CONTROL.search(value):
        raise InvalidFilterValue(f"{field}: value contains a control character (e.g. NUL)")
    if len(value.encode("utf-8")) > MAX_STRING_BYTES:
        raise InvalidFilterValue(f"{field}: value longer than {MAX_STRING_BYTES} bytes")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_int(value: Any, *, field: str = "value") -> str:
    if isinstance(value, (bool, str, float)):
        raise InvalidFilterValue(f"{field}: expected an integer, got {type(value).__name__}")
    try:
        number = operator.index(value)  # accepts numpy ints, refuses floats and objects
    except TypeError as exc:
        raise InvalidFilterValue(f"{field}: expected an integer, got {type(value).__name__}") from exc
    if not _INT64[0] <= number <= _INT64[1]:
        raise InvalidFilterValue(f"{field}: {number} is outside INT64")
    return str(number)


def literal(field: str, value: Any) -> str:
    return quote_string(value, field=field) if isinstance(value, str) else quote_int(value, field=field)


def eq_filter(field: str, value: Any) -> str:
    return f"{validate_identifier(field)} == {literal(field, value)}"


def in_filter(field: str, values: Sequence[Any]) -> str:
    validate_identifier(field)
    values = list(values)
    if not values:
        raise InvalidFilterValue(f"{field}: empty value list")
    if len({isinstance(v, str) for v in values}) > 1:
        raise InvalidFilterValue(f"{field}: mixed strings and numbers in one list")
    return f"{field} in [{', '.join(literal(field, v) for v in values)}]"


def affected_filter(fields: Sequence[str]) -> str:
    """DESIGN §1's affected-chunk filter, built only from fields the schema has."""
    if "page" not in fields:
        raise SchemaError("collection has no field 'page': cannot tell affected chunks apart")
    return f"page == 0 && {image_chunk_filter(fields)}"


def image_chunk_filter(fields: Sequence[str]) -> str:
    """Image and OCR chunks, whatever their page: the only chunks repage ever writes."""
    have = set(fields)
    terms = [f'chunk_type == "{t}"' for t in ("ocr", "image") if "chunk_type" in have]
    if "ocr_confidence" in have:
        terms.append("ocr_confidence > 0.0")
    if not terms:
        raise SchemaError("collection has no field 'chunk_type': cannot tell affected chunks apart")
    return f"({' || '.join(terms)})"


AFFECTED_FILTER = affected_filter(("page", "chunk_type", "ocr_confidence"))


# ---------------------------------------------------------------- checksums (pure)


def _canonical(value: Any, as_vector: bool) -> Any:
    if isinstance(value, np.ndarray) or as_vector:
        return np.asarray(value, dtype=np.float32).tobytes().hex()
    if isinstance(value, np.generic):
        return value.item()
    return value


def row_checksum(
    row: Mapping[str, Any], exclude: Sequence[str] = ("page", "image_r2_key"), *, vector_fields: Sequence[str] = ()
) -> str:
    """sha256 of every field but `exclude`, vectors as float32 bytes, `$meta` flattened."""
    flat = {k: v for k, v in row.items() if k != "$meta"}
    flat.update(row.get("$meta") or {})
    canon = {k: _canonical(v, k in vector_fields) for k, v in flat.items() if k not in exclude}
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _row_bytes(row: Mapping[str, Any]) -> int:
    total = 0
    for value in row.values():
        if isinstance(value, str):
            total += len(value.encode("utf-8"))
        elif isinstance(value, (list, tuple, np.ndarray)):
            total += 4 * len(value)
        elif isinstance(value, dict):
            total += len(json.dumps(value, default=str))
        else:
            total += 8
    return total


def bounded_batches(items: Sequence[Any], cost: Callable[[Any], int], max_items: int, max_cost: int):
    """Consecutive slices bounded by count and summed cost (at least one item each)."""
    batch: list[Any] = []
    spent = 0
    for item in items:
        c = cost(item)
        if batch and (len(batch) >= max_items or spent + c > max_cost):
            yield batch
            batch, spent = [], 0
        batch.append(item)
        spent += c
    if batch:
        yield batch


def supports_partial_update_version(version: str) -> bool:
    """Lite 3.x: yes; Lite 2.5.x: no (it deletes the row it rejects); Milvus >= 2.6: yes."""
    lite = re.match(r"milvus_lite-(\d+)\.", version or "")
    if lite:
        return int(lite.group(1)) >= 3
    server = re.search(r"(\d+)\.(\d+)", version or "")  # "v2.6.3", "... Milvus 2.5"
    return server is not None and (int(server.group(1)), int(server.group(2))) >= (2, 6)


# ---------------------------------------------------------------- schema and changes


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    pk_field: str
    pk_type: str  # 'int64' | 'varchar'
    auto_id: bool
    vector_field: str
    dim: int
    fields: tuple[str, ...]
    dynamic: bool
    identity_fields: tuple[str, ...]
    server_version: str

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def identity(self) -> ChunkIdentity:
        """The rows' stable identity (docs/design.md §1): never their primary key, which a server may renumber."""
        return ChunkIdentity(self.identity_fields)


def parse_schema(name: str, desc: Mapping[str, Any], version: str) -> CollectionInfo:
    fields = list(desc["fields"])
    by_name = {f["name"]: f for f in fields}
    for required in ("document_id", "page"):
        if required not in by_name:
            raise SchemaError(f"collection {name!r} has no field {required!r}")
    pk = next(f for f in fields if f.get("is_primary"))
    vec = next((f for f in fields if f["type"] == DataType.FLOAT_VECTOR), None)
    if vec is None:
        raise SchemaError(f"collection {name!r} has no FLOAT_VECTOR field 'vector'")
    varchar = {f["name"] for f in fields if f["type"] == DataType.VARCHAR}
    return CollectionInfo(
        name=name,
        pk_field=pk["name"],
        pk_type="varchar" if pk["type"] == DataType.VARCHAR else "int64",
        auto_id=bool(pk.get("auto_id") or desc.get("auto_id")),
        vector_field=vec["name"],
        dim=int(vec["params"]["dim"]),
        fields=tuple(by_name),
        dynamic=bool(desc.get("enable_dynamic_field")),
        identity_fields=ChunkIdentity.of_collection(name, by_name, varchar).fields,
        server_version=version,
    )


# ---------------------------------------------------------------- connection and errors


def normalize_uri(uri: str) -> str:
    if re.match(r"(https?|tcp)://|unix:", uri):
        return uri
    if not uri.endswith(".db"):
        raise ConfigError(f"Milvus URI {uri!r}: give a Lite path ending in .db or http(s)://host:port")
    path = Path(uri).expanduser().resolve()
    make_private_dirs(path.parent)  # pymilvus refuses a missing parent; owner-only (docs/design.md §6.6)
    return str(path)


def _is_rate_limit(exc: BaseException) -> bool:
    if isinstance(exc, grpc.RpcError):
        return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return isinstance(exc, MilvusException) and (
        exc.code == ErrorCode.RATE_LIMIT
        or exc.compatible_code == common_pb2.RateLimit
        or "rate limit" in str(exc.message).lower()
    )


def _is_released(exc: MilvusException) -> bool:
    """The collection is not loaded (code 101; Lite: "is in state 'released'")."""
    text = str(exc.message).lower()
    return exc.code == 101 or "not loaded" in text or "state 'released'" in text


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, grpc.RpcError):
        return exc.code() in _UNAVAILABLE_CODES
    return isinstance(exc, ConnectionConfigException) or (
        isinstance(exc, MilvusException) and exc.code == 2
    )  # 2 = CONNECT_FAILED


_UNAVAILABLE_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)


def _one_line(exc: BaseException, secret: str) -> str:
    text = exc.message if isinstance(exc, MilvusException) else str(exc)
    if isinstance(exc, grpc.RpcError):
        text = f"{exc.code().name}: {exc.details()}"
    text = " ".join(str(text).split())[:300]
    return Redactor(secret)(text)  # the token, and any URL's user info (repage.redact)


@contextmanager
def vendor_errors(what: str, secret: str = ""):
    """Translate pymilvus/gRPC errors into repage's tree; messages never carry the token."""
    try:
        yield
    except (MilvusException, grpc.RpcError) as exc:
        msg = f"Milvus {what} failed: {_one_line(exc, secret)}"
        if _is_rate_limit(exc):
            raise Throttled(msg) from exc
        if _is_unavailable(exc):
            raise StoreUnavailable(msg) from exc
        raise StoreError(msg) from exc


# pymilvus pings every 10 s even on an idle channel; a gRPC server with the default policy (Milvus
# Lite's) answers the third such ping with GOAWAY "too_many_pings" and the next call on that
# channel fails. Pings only while a call is in flight: a dead peer is still found, by that call.
GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": 0}


def connect(uri: str, token: str | None, timeout: float) -> MilvusClient:
    uri = normalize_uri(uri)
    where = redact_url(uri)
    try:
        # dedicated: never share a gRPC channel through pymilvus' process-wide registry,
        # which a forked worker would inherit with a dead channel.
        client = MilvusClient(uri, token=token or "", timeout=timeout, dedicated=True, grpc_options=GRPC_OPTIONS)
    except ConnectionConfigException as exc:
        hint = "" if "://" in uri else " (another process may hold this Lite folder: share it via `milvus-lite server`)"
        raise StoreUnavailable(f"Milvus at {where} could not be opened{hint}") from exc
    except (MilvusException, grpc.RpcError) as exc:
        raise StoreUnavailable(f"Milvus at {where} does not answer: {_one_line(exc, token or '')}") from exc
    forget_schemas(client)
    return client


def forget_schemas(client: MilvusClient) -> None:
    """Drop the schemas pymilvus cached for this client's server and database.

    pymilvus 3.0.2 caches them for the whole process by (host:port, database, collection
    name) and forgets one only when this process drops or alters that collection. The
    same name can since denote another collection: recreated by another process, or in
    another Milvus Lite folder whose in-process server got a port a released one had
    (Lite binds port 0). insert, upsert and query_iterator would then use the old schema,
    e.g. its primary key. So a new client starts from what the server says now.
    """
    handler = client._get_connection()  # noqa: SLF001 (pymilvus has no public way to do this)
    handler._invalidate_db_schemas(client._config.db_name)  # noqa: SLF001


# ---------------------------------------------------------------- the adapter


class MilvusVectors:
    """One collection in one Milvus (Lite file, Lite server, Milvus or Zilliz)."""

    def __init__(
        self,
        uri: str,
        collection: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        max_query_rows: int = MAX_QUERY_ROWS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        lite_lock: Any = None,
    ):
        self.uri, self.collection = normalize_uri(uri), collection
        self._token, self._timeout = token or "", timeout
        self.max_query_rows, self.max_request_bytes = max_query_rows, max_request_bytes
        self.ops: Counter = Counter()  # RPCs by kind: for tests and the cost model
        self._size_models: dict[tuple, _SizeModel] = {}  # by query shape, see fetch_documents
        self._info: CollectionInfo | None = None
        # Milvus Lite only (see `is_lite`): the turns this process takes with the others at the
        # store (`hold(exclusive)`, repage/stores/ledger/locks.py), and whether it wrote since it
        # last flushed.
        self._lite: bool | None = None
        self._lite_lock = lite_lock if lite_lock is not None else _process_lock(self.uri, collection)
        self._unflushed = False
        self._client: MilvusClient | None = connect(self.uri, token, timeout)
        try:
            self._open_collection()
        except BaseException:
            self.close()
            raise

    # -- plumbing
    @property
    def client(self) -> MilvusClient:
        """The open pymilvus client; a closed store refuses every call."""
        if self._client is None:
            raise StoreError(f"the connection to collection {self.collection!r} is closed")
        return self._client

    def _rpc(self, method: str, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self._timeout)
        kwargs["retry_on_rate_limit"] = False  # repage's throttle, not pymilvus' 75 tries
        self.ops[method] += 1
        with self._turn(method), vendor_errors(method, self._token):
            if method in _LITE_WRITES and method != "flush":
                self._unflushed = True  # before the call: a failed write may have been applied
            try:
                return getattr(self.client, method)(*args, **kwargs)
            except MilvusException as exc:
                if not _is_released(exc) or method == "load_collection":
                    raise
            # A restarted Milvus (Lite) holds the collection released: load it, then try once more.
            self.ops["reload"] += 1
            self.client.load_collection(self.collection, timeout=self._timeout)
            return getattr(self.client, method)(*args, **kwargs)

    def _open_collection(self) -> None:
        if not self._rpc("has_collection", self.collection):
            raise ConfigError(
                f"collection {self.collection!r} does not exist at {redact_url(self.uri)}; set REPAGE_COLLECTION"
            )
        state = self._rpc("get_load_state", self.collection)
        if "Loaded" not in str(state.get("state")):  # a reopened Lite DB comes back released
            self._rpc("load_collection", self.collection)

    def describe(self) -> str:
        kind = "Milvus Lite" if "://" not in self.uri else "Milvus"
        token = ", token set" if self._token else ""
        return f"{kind} {redact_url(self.uri)}, collection {self.collection!r}{token}"

    def close(self) -> None:
        """Flush what this process wrote to a Milvus Lite store (a stopping service or worker
        leaves nothing in Lite's write-ahead log: docs/milvus-lite-durability.md), then disconnect."""
        if self._client is None:
            return
        try:
            self.persist()
        except StoreError as exc:  # closing anyway: the next run re-checks its work
            logging.getLogger(__name__).warning("repage: flushing Milvus Lite on close failed: %s", exc)
        finally:
            self._client.close()
            self._client = None
            close_lock = getattr(self._lite_lock, "close", None)
            if close_lock is not None:
                close_lock()

    def __enter__(self) -> MilvusVectors:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- Milvus Lite: turns and flushes (docs/design.md §7, docs/milvus-lite-durability.md)
    @property
    def is_lite(self) -> bool:
        """Whether this is Milvus Lite, in process (a folder) or a `milvus-lite server` (an http
        URI): it names itself "milvus_lite-<version>" to GetVersion, where a server says "v2.x"."""
        if self._lite is None:
            with vendor_errors("get_server_version", self._token):
                version = str(self.client.get_server_version(timeout=self._timeout))
            self._lite = version.startswith("milvus_lite-")
        return self._lite

    def _turn(self, method: str):
        """Lite is one writer per collection: its server runs requests on a thread pool with no lock
        around a collection's write-ahead log or its flush, so two writes at once interleave their
        bytes in the log (reopened, it is read up to the first broken record: every later write is
        lost), a write racing a flush can vanish, and a query during a flush may miss the rows being
        flushed. Every repage process and thread takes turns: writes and flushes alone, queries
        together. A real server needs none of it."""
        if not self.is_lite:
            return nullcontext()
        return self._lite_lock.hold(exclusive=method in _LITE_WRITES)

    def exclusive(self):
        """The store to this thread alone while the block runs (Lite; elsewhere a no-op): a batch
        writes, reads back and flushes with no other repage write or flush in between."""
        return self._turn("flush")

    def persist(self) -> bool:
        """Make this process's acknowledged writes survive a stop of Milvus Lite; True if it flushed.

        Lite keeps writes in a memory table and a write-ahead log until a flush seals them into
        Parquet; the log does not survive concurrent writers, and a `milvus-lite server` stopped by
        SIGTERM exits without flushing. So on Lite: flush (taking turns: concurrent flushes fail or
        lose rows). A real server's write is durable once acknowledged, and servers rate-limit flush:
        never there.
        """
        if not self._unflushed or not self.is_lite:
            return False
        with self.exclusive():
            self._rpc("flush", self.collection)
            self._unflushed = False
        return True

    # -- schema
    def info(self) -> CollectionInfo:
        if self._info is None:
            desc = self._rpc("describe_collection", self.collection)
            version = str(self._rpc("get_server_version"))
            self._info = parse_schema(self.collection, desc, version)
        return self._info

    def supports_partial_update(self) -> bool:
        return supports_partial_update_version(self.info().server_version)

    def _keys_stable(self) -> bool:
        """Whether an upsert keeps primary keys: a real server renumbers auto_id rows."""
        info = self.info()
        return not info.auto_id or info.server_version.startswith("milvus_lite-")

    def _light_fields(self) -> list[str]:
        info = self.info()
        wanted = (info.pk_field, *info.identity_fields, *LIGHT_FIELDS)
        return [f for f in dict.fromkeys(wanted) if f in info.fields]

    def _output_fields(self, fields: Sequence[str] | None, with_vectors: bool) -> list[str]:
        info = self.info()
        if fields:
            out = [validate_identifier(f) for f in fields]
            return out + [info.vector_field] if with_vectors and info.vector_field not in out else out
        if with_vectors:
            return ["*"]
        return [f for f in info.fields if f != info.vector_field] + (["$meta"] if info.dynamic else [])

    def _bytes_per_row(self, with_vectors: bool) -> int:
        return (self.info().dim * 4 if with_vectors else 0) + TEXT_BYTES_GUESS

    def row_checksum(self, row: Mapping[str, Any]) -> str:
        info = self.info()
        exclude = ("page", "image_r2_key") + ((info.pk_field,) if info.auto_id else ())
        return row_checksum(row, exclude, vector_fields=(info.vector_field,))

    # -- reads
    def _query(self, expr: str, output_fields: Sequence[str], limit: int | None = None, **params: Any) -> list[dict]:
        if limit:
            params["limit"] = limit
        # strict_float32: float vectors come back as float32 numpy views of one array per reply,
        # not as lists of Python floats (8x the memory, and ~30x the decoding time of a batch).
        rows = self._rpc(
            "query",
            self.collection,
            filter=expr,
            output_fields=list(output_fields),
            consistency_level="Strong",
            strict_float32=True,
            **params,
        )
        return [dict(r) for r in rows]

    def count(self, filter: str = "") -> int:
        """count(*) of rows matching `filter`, which callers build with eq_filter/in_filter."""
        rows = self._rpc(
            "query", self.collection, filter=filter, output_fields=["count(*)"], consistency_level="Strong"
        )
        return int(rows[0]["count(*)"])

    def _iterate(self, expr: str, output_fields: Sequence[str], batch_rows: int) -> Iterator[list[dict]]:
        """Pages in primary-key order, by a cursor on the pk. Not pymilvus' query_iterator:
        3.0.2 inlines the last VARCHAR pk unescaped (`pk > "<raw>" and (...)`), so a
        chunk_id containing `"` breaks the scan or, worse, widens its filter."""
        pk, cursor = self.info().pk_field, None
        batch = min(batch_rows, self.max_query_rows)
        while True:
            bound = None if cursor is None else f"{pk} > {literal(pk, cursor)}"
            page_expr = " && ".join(f"({e})" for e in (bound, expr) if e)
            # iterator=True asks the server for the lowest pks in pk order, as its own iterator does
            rows = self._query(page_expr, output_fields, limit=batch, iterator="True", reduce_stop_for_best="True")
            if rows:
                yield rows
            if len(rows) < batch:
                return
            cursor = max(r[pk] for r in rows)

    def iter_affected(
        self, dataset_id: str | None = None, *, page_rows: int = 10_000, fields: Sequence[str] | None = None
    ) -> Iterator[list[dict]]:
        """Affected chunks in pages of `page_rows`, in primary-key order (not by document)."""
        expr = affected_filter(self.info().fields)
        return self._pages(expr, dataset_id, page_rows, fields or self._light_fields())

    def iter_documents(
        self, dataset_id: str | None = None, *, page_rows: int = 10_000, fields: Sequence[str] | None = None
    ) -> Iterator[list[dict]]:
        """Every chunk, light fields only, so a scan also sees documents with nothing to fix."""
        wanted = fields or ("document_id", "dataset_id", "filename")
        out = [f for f in dict.fromkeys((self.info().pk_field, *wanted)) if f in self.info().fields]
        return self._pages("", dataset_id, page_rows, out)

    def _pages(self, expr: str, dataset_id: str | None, page_rows: int, fields: Sequence[str]) -> Iterator[list[dict]]:
        if page_rows < 1:
            raise ConfigError(f"page_rows must be at least 1, not {page_rows}")
        if dataset_id is not None:
            if "dataset_id" not in self.info().fields:
                raise SchemaError(f"collection {self.collection!r} has no field 'dataset_id'")
            expr = " && ".join(f"({e})" for e in (expr, eq_filter("dataset_id", dataset_id)) if e)
        out = [validate_identifier(f) for f in fields]
        return self._regroup(self._iterate(expr, out, page_rows), page_rows)

    @staticmethod
    def _regroup(batches: Iterator[list[dict]], page_rows: int) -> Iterator[list[dict]]:
        page: list[dict] = []
        for batch in batches:
            page.extend(batch)
            while len(page) >= page_rows:
                yield page[:page_rows]
                page = page[page_rows:]
        if page:
            yield page

    def _row_cap(self, bytes_per_row: float) -> int:
        by_bytes = int(self.max_request_bytes * SIZE_MARGIN // max(bytes_per_row, 1))
        return max(1, min(self.max_query_rows, by_bytes))

    def _query_split(self, keys: list, make_filter: Callable[[list], str], out: Sequence[str], cap: int) -> list[dict]:
        """Query for `keys`; a full page may be truncated, so halve and retry."""
        rows = self._query(make_filter(keys), out, limit=cap)
        if len(rows) < cap:
            return rows
        if len(keys) == 1:  # one key alone has more rows than a page: stream it
            self.ops["split_iterate"] += 1
            return [r for batch in self._iterate(make_filter(keys), out, cap) for r in batch]
        self.ops["split"] += 1
        mid = len(keys) // 2
        return self._query_split(keys[:mid], make_filter, out, cap) + self._query_split(
            keys[mid:], make_filter, out, cap
        )

    def fetch_for_repair(self, document_ids: Sequence[str]) -> list[dict]:
        """Every chunk of these documents; vectors only on image/OCR chunks, the ones repage writes.

        A 1536-dim vector is ~6 KB of a ~7 KB row and text chunks are only counted, so two
        queries (text rows without vectors, image rows with them) move a third of the bytes.
        """
        info = self.info()
        with_vectors = self.fetch_documents(document_ids, where=image_chunk_filter(info.fields))
        # The rest with light fields only (they are counted and classified, never written), and
        # not by the filter's negation: a NULL ocr_confidence makes both sides false.
        seen = {info.identity.key(r) for r in with_vectors}
        rest = [
            r
            for r in self.fetch_documents(document_ids, fields=self._light_fields(), with_vectors=False)
            if info.identity.key(r) not in seen
        ]
        return with_vectors + rest

    def fetch_documents(
        self,
        document_ids: Sequence[str],
        *,
        fields: Sequence[str] | None = None,
        with_vectors: bool = True,
        where: str | None = None,
    ) -> list[dict]:
        """Every chunk of these documents (and `where`, a filter built here from the schema),
        in as few queries as rows/bytes limits allow."""
        pending = list(dict.fromkeys(document_ids))
        for doc in pending:
            quote_string(doc, field="document_id")  # refuse bad ids before any I/O
        out = self._output_fields(fields, with_vectors)
        make_filter = (
            (lambda ks: in_filter("document_id", ks))
            if where is None
            else (lambda ks: f"{in_filter('document_id', ks)} && ({where})")
        )
        # kept across calls: the rows per document learnt by one batch size the next one's queries
        model = self._size_models.setdefault((where, tuple(out)), _SizeModel(self._bytes_per_row(with_vectors)))
        rows: list[dict] = []
        while pending:
            cap = self._row_cap(model.bytes_per_row)
            batch = next(bounded_batches(pending, _identity_cost, model.ids_per_call(cap), MAX_FILTER_BYTES))
            pending = pending[len(batch) :]
            got = self._query_split(batch, make_filter, out, cap)
            model.observe(len(batch), got)
            rows.extend(got)
        return rows

    def _identity_filter(self, identities: list[tuple]) -> str:
        if self.info().identity.by_chunk_id:
            return in_filter("chunk_id", [i[0] for i in identities])
        by_doc: dict[str, list] = defaultdict(list)
        for doc, index in identities:
            by_doc[doc].append(index)
        return " || ".join(
            f"({eq_filter('document_id', d)} && {in_filter('chunk_index', ix)})" for d, ix in by_doc.items()
        )

    def find_by_identity(self, identities: Sequence[tuple], *, with_vectors: bool = False) -> dict[tuple, list[dict]]:
        """Rows by stable identity (never by an old primary key); lists expose duplicates."""
        info = self.info()
        wanted = list(dict.fromkeys(tuple(i) for i in identities))
        found: dict[tuple, list[dict]] = {i: [] for i in wanted}
        if not wanted:
            return found
        self._identity_filter(wanted)  # validate every value before any I/O
        out = self._output_fields(None, with_vectors)
        cap = self._row_cap(self._bytes_per_row(with_vectors))
        for group in bounded_batches(wanted, _identity_cost, max(1, cap // 2), MAX_FILTER_BYTES):
            for row in self._query_split(group, self._identity_filter, out, cap):
                key = info.identity.key(row)
                found.setdefault(key, []).append(row)
        return found

    def find_written(self, written: Mapping[tuple, Any]) -> dict[tuple, list[dict]]:
        """Rows just written ({identity: primary key}), with vectors, by stable identity.

        Where an upsert keeps primary keys (Milvus Lite; collections without auto_id) the rows
        are read by primary key, and each row counts for the identity its own fields name: a
        point read, which Lite answers without materialising every unsealed row (4x faster
        after a batch's writes) and a server from its primary-key index. Elsewhere a row's
        key may have changed: by identity.
        """
        if not self._keys_stable() or None in written.values():
            return self.find_by_identity(list(written), with_vectors=True)
        info = self.info()
        found: dict[tuple, list[dict]] = {tuple(i): [] for i in written}
        for row in self.fetch_by_pks(list(written.values())):
            found.setdefault(info.identity.key(row), []).append(row)
        return found

    def fetch_by_pks(self, pks: Sequence[Any]) -> list[dict]:
        """The rows with these primary keys (as text or native), every field and the vector.

        A point read: Lite answers it without materialising the unsealed rows a filter query
        scans, and a server from its primary-key index (docs/performance.md).
        """
        info = self.info()
        keys = [int(pk) if info.pk_type == "int64" else str(pk) for pk in dict.fromkeys(pks)]
        if not keys:
            return []
        in_filter(info.pk_field, keys)  # validate every value before any I/O
        out, cap = self._output_fields(None, True), self._row_cap(self._bytes_per_row(True))
        return [
            row
            for group in bounded_batches(keys, _identity_cost, cap, MAX_FILTER_BYTES)
            for row in self._query(in_filter(info.pk_field, group), out, limit=cap)
        ]

    # -- writes
    def insert(self, rows: Sequence[Mapping[str, Any]]) -> list:
        pks: list = []
        for batch in self._write_batches(rows):
            pks.extend(self._rpc("insert", self.collection, batch)["ids"])
        return pks

    def delete_by_pks(self, pks: Sequence[Any]) -> None:
        # Not `delete(ids=...)`: pymilvus 3.0.2 quotes VARCHAR pks without escaping them.
        pk = self.info().pk_field
        for batch in bounded_batches(list(pks), _identity_cost, MAX_WRITE_ROWS, MAX_FILTER_BYTES):
            self._rpc("delete", self.collection, filter=in_filter(pk, batch))

    def upsert_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Full rows (primary key included) written over the rows with those keys, in as few requests
        as the size caps allow: each row is replaced whole, never absent (the reprocess path)."""
        for batch in self._write_batches(rows):
            self._upsert(batch, False)

    def _write_batches(self, rows: Sequence[Mapping[str, Any]]):
        limit = int(self.max_request_bytes * SIZE_MARGIN)
        return bounded_batches([dict(r) for r in rows], _row_bytes, MAX_WRITE_ROWS, limit)

    def _upsert(self, rows: list[dict], partial: bool) -> None:
        """One upsert request; the seam a test double overrides to act like another server."""
        self._rpc("upsert", self.collection, rows, partial_update=partial)

    def write_changes(
        self, changes: Sequence[ChunkChange], *, rows_before: Mapping[tuple, Mapping[str, Any]] | None = None
    ) -> None:
        """Set page (and image_r2_key) on these chunks; idempotent under a crash-retry."""
        changes = list({tuple(c.identity): c for c in changes}.values())  # last one wins
        if not changes:
            return
        if any(c.image_r2_key is not None for c in changes) and "image_r2_key" not in self.info().fields:
            raise SchemaError(f"collection {self.collection!r} has no field 'image_r2_key'")
        partial = self.supports_partial_update()
        extras: list[Any]
        if partial and self._keys_stable():
            rows, extras = [self._partial_row(c, c.pk) for c in changes], []
        else:
            rows, extras = self._resolve_rows(changes, rows_before or {}, partial)
        # A partial upsert needs one field set per request: rows that also set
        # image_r2_key go in other requests than rows that set only page.
        for shape in sorted({tuple(sorted(r)) for r in rows}):
            for batch in self._write_batches([r for r in rows if tuple(sorted(r)) == shape]):
                self._upsert(batch, partial)
        if extras:  # only after the kept rows are written: a crash here loses nothing
            self.delete_by_pks(extras)

    def _partial_row(self, change: ChunkChange, pk: Any) -> dict:
        row = {self.info().pk_field: pk, "page": change.page}
        if change.image_r2_key is not None:
            row["image_r2_key"] = change.image_r2_key
        return row

    def _resolve_rows(
        self, changes: list[ChunkChange], rows_before: Mapping[tuple, Mapping], partial: bool
    ) -> tuple[list[dict], list]:
        """Rows to write, found by identity, and pks of crash duplicates to delete."""
        need_full = not partial and any(tuple(c.identity) not in rows_before for c in changes)
        current = self.find_by_identity([c.identity for c in changes], with_vectors=need_full)
        rows, extras = [], []
        for change in changes:
            keep, dupes = self._pick(change, current.get(tuple(change.identity), []))
            extras.extend(dupes)
            if _at_target(keep, change):
                continue
            pk = keep[self.info().pk_field]
            base = rows_before.get(tuple(change.identity)) or keep
            rows.append(self._partial_row(change, pk) if partial else self._full_row(change, pk, base))
        return rows, extras

    def _pick(self, change: ChunkChange, rows: list[dict]) -> tuple[dict, list]:
        """The row to keep (preferring one already fixed) and the duplicates to drop."""
        if not rows:
            raise StoreError(f"chunk {change.identity!r} not found in {self.collection!r}")
        pk = self.info().pk_field
        ordered = sorted(rows, key=lambda r: (_at_target(r, change), r[pk]), reverse=True)
        keep, dupes = ordered[0], ordered[1:]
        if any(self.row_checksum(d) != self.row_checksum(keep) for d in dupes):
            raise StoreError(
                f"chunk {change.identity!r} has {len(rows)} rows that differ: not a retry duplicate, resolve by hand"
            )
        return keep, [d[pk] for d in dupes]

    def _full_row(self, change: ChunkChange, pk: Any, base: Mapping[str, Any]) -> dict:
        """The whole row again: vector, every field and dynamic `$meta` keys kept as read."""
        info = self.info()
        row = {k: v for k, v in base.items() if k != "$meta"}
        row.update(base.get("$meta") or {})
        if not info.dynamic:
            row = {k: v for k, v in row.items() if k in info.fields}
        row.update(self._partial_row(change, pk))
        if info.vector_field not in row:
            raise StoreError(f"chunk {change.identity!r}: full-row write needs its vector")
        return row

    # -- setup helpers (demo and tests)
    @classmethod
    def create_collection(
        cls,
        uri: str,
        collection: str,
        token: str | None = None,
        *,
        pk: str = "auto",
        dim: int = 1536,
        dynamic: bool = False,
        chunk_id_field: bool = True,
        index_type: str = "FLAT",
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> MilvusVectors:
        """Create the FLTR collection of DESIGN §1 and open it."""
        client = connect(uri, token, timeout)
        try:
            with vendor_errors("create_collection", token or ""):
                schema = fltr_schema(client, pk=pk, dim=dim, dynamic=dynamic, chunk_id_field=chunk_id_field)
                client.create_collection(collection, schema=schema, timeout=timeout)
                index = client.prepare_index_params()
                index.add_index("vector", index_type=index_type, metric_type="COSINE")
                # sync=False: pymilvus' index wait sleeps 0.5 s first and calls AllocTimestamp,
                # which Lite lacks; load_collection below waits for readiness anyway.
                client.create_index(collection, index, timeout=timeout, sync=False)
                client.load_collection(collection, timeout=timeout)
        finally:
            client.close()
        return cls(uri, collection, token, timeout=timeout, **kwargs)

    def drop_collection(self) -> None:
        self._rpc("drop_collection", self.collection)

    def flush(self) -> None:
        """Seal the collection's growing rows, as a server does on its own after a bulk load.

        For builders of test and benchmark stores: Milvus Lite answers every query by
        materialising its unflushed rows, so an unflushed store is slower than any real one.
        """
        self._rpc("flush", self.collection)
        self._unflushed = False


# Milvus Lite requests that change the collection: one at a time across processes (see `_turn`)
_LITE_WRITES = frozenset({"insert", "upsert", "delete", "flush", "drop_collection"})
_PROCESS_LOCKS: dict[tuple[str, str], _ProcessLock] = {}


class _ProcessLock:
    """Turns within this process only: for adapters opened without a shared lock (tests, builders)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    @contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        with self._lock:
            yield


def _process_lock(uri: str, collection: str) -> _ProcessLock:
    return _PROCESS_LOCKS.setdefault((uri, collection), _ProcessLock())


def fltr_schema(client: MilvusClient, *, pk: str, dim: int, dynamic: bool, chunk_id_field: bool):
    if pk not in ("auto", "chunk_id"):
        raise ConfigError(f"pk must be 'auto' or 'chunk_id', not {pk!r}")
    schema = client.create_schema(auto_id=pk == "auto", enable_dynamic_field=dynamic)
    if pk == "auto":
        schema.add_field("id", DataType.INT64, is_primary=True, auto_id=True)
    if pk == "chunk_id" or chunk_id_field:
        schema.add_field("chunk_id", DataType.VARCHAR, max_length=512, is_primary=pk == "chunk_id")
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    for name, kind, extra in _FLTR_FIELDS:
        schema.add_field(name, kind, **extra)
    return schema


_V = DataType.VARCHAR
_FLTR_FIELDS: tuple[tuple[str, DataType, dict[str, Any]], ...] = (
    ("text", _V, {"max_length": 65535}),
    ("dataset_id", _V, {"max_length": 128}),
    ("document_id", _V, {"max_length": 256}),
    ("filename", _V, {"max_length": 1024}),
    ("chunk_index", DataType.INT64, {}),
    ("document_type", _V, {"max_length": 64}),
    ("title", _V, {"max_length": 1024}),
    ("chunk_type", _V, {"max_length": 32}),
    ("page", DataType.INT64, {"default_value": 0}),
    ("image_index", DataType.INT64, {"nullable": True}),
    ("ocr_confidence", DataType.FLOAT, {"nullable": True}),
    ("image_r2_key", _V, {"max_length": 512, "nullable": True}),
    ("image_size", _V, {"max_length": 64, "nullable": True}),
)


class _SizeModel:
    """Adapts ids-per-query to the rows per document and bytes per row seen so far."""

    def __init__(self, bytes_per_row: float, rows_per_doc: float = 32.0):
        self.bytes_per_row, self.rows_per_doc = bytes_per_row, rows_per_doc
        self._ids = self._rows = self._bytes = 0

    def ids_per_call(self, cap: int) -> int:
        return max(1, int(cap * SIZE_MARGIN // max(self.rows_per_doc, 1.0)))

    def observe(self, ids: int, rows: list[dict]) -> None:
        self._ids += ids
        self._rows += len(rows)
        self._bytes += sum(_row_bytes(r) for r in rows)
        self.rows_per_doc = max(self._rows / self._ids, 1.0)
        if self._rows:  # measured size replaces the guess, which is deliberately generous
            self.bytes_per_row = max(self._bytes / self._rows, 64.0)


def _identity_cost(key: Any) -> int:
    return len(str(key)) + 8


def _at_target(row: Mapping[str, Any], change: ChunkChange) -> bool:
    key_ok = change.image_r2_key is None or row.get("image_r2_key") == change.image_r2_key
    return row.get("page") == change.page and key_ok

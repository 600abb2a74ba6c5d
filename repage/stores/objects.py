"""The bucket adapter: the only module that imports obstore (docs/design.md §3.2, §7.3).

`ObjectStore` is a small synchronous facade over obstore's sync functions for
`file://`, `memory://` and `s3://` (R2, moto). It

- turns obstore's own retries off, so repage's backoff sees throttling (obstore
  retries 5xx *and* 429 up to 10 times by default, for minutes);
- translates obstore errors into the `repage.errors` tree, `raise ... from exc`;
- counts requests by R2 billing class ('A' list/put/copy, 'B' get/head, 'free'
  delete) for the cost model;
- on S3, proves once whether the server checks a PUT's `x-amz-checksum-sha256` (a probe
  that must be refused), and then offers `put_checked` (docs/design.md §5.2);
- keeps secrets out of repr, `describe()` and error messages.

Keys are passed to obstore as they are: a key holding `%20` is stored as the three
characters `%20`, never decoded or encoded a second time. A list prefix is matched
per path segment: `a/b` lists `a/b/...`, never `a/bc`.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError
from obstore.store import LocalStore, MemoryStore, S3Store

from repage.errors import (
    BadInput,
    ChecksumMismatch,
    ConfigError,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
    Throttled,
    Transient,
)
from repage.redact import Redactor, redact_url
from repage.stores.files import make_private_dirs

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config

T = TypeVar("T")

LIST_PAGE_SIZE = 1000  # S3/R2 return at most 1000 keys per ListObjectsV2 request
DOWNLOAD_CHUNK = 1 << 20  # bytes per chunk a streamed download holds at a time
CHECK_PREFIX = "__repage_check__"
# The checksum probe's objects (docs/design.md §5.2): a reserved prefix no document key starts with.
PROBE_PREFIX = ".repage/probe/"
PROBE_BODY = b"repage probe: does this server check x-amz-checksum-sha256 on PUT?"
SHA256_HEADER = "x-amz-checksum-sha256"
RETRY_CONFIG: RetryConfig = {"max_retries": 0, "retry_timeout": timedelta(seconds=10)}
CLIENT_OPTIONS: ClientConfig = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=120)}
REQUEST_CLASS = {"list": "A", "put": "A", "copy": "A", "get": "B", "head": "B", "delete": "free"}
URL_HELP = "use file:///abs/path, file://./relative, memory:// or s3://BUCKET"
CREDENTIALS_HELP = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
BUCKET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")
STATUS = re.compile(r"status code: (\d{3})|status: (\d{3})")
S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
CONNECT_FAILURE = ("error sending request", "kind: Connect", "Connection refused", "dns error")
# A connection that was open and broke (reset, closed mid-reply): a retry may succeed. A refused
# connection reads "kind: Connect" instead and stays StoreUnavailable (the server is not there).
TRANSIENT_STATUS = (500, 502, 504)
TRANSIENT_FAILURE = ("kind: Interrupted", "ConnectionReset", "response body error", "IncompleteMessage")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None
    last_modified: datetime | None

    @classmethod
    def from_meta(cls, meta) -> ObjectInfo:
        etag = meta.get("e_tag")
        return cls(
            key=meta["path"],
            size=int(meta["size"]),
            etag=etag.strip('"') if etag else None,
            last_modified=meta.get("last_modified"),
        )


class ObjectStore:
    """A bucket (or folder, or memory) with counted, translated, synchronous requests."""

    def __init__(
        self,
        store,
        *,
        description: str,
        redact: Redactor | None = None,
        variant: Callable[..., Any] | None = None,
    ):
        self._store = store
        self._description = description
        self._redact = redact or Redactor()
        self._lock = threading.Lock()
        # S3 only: another client of the same bucket with extra headers or S3 config, for the
        # checksum probe and put_checked; None for a folder or memory (nothing there checks).
        self._variant = variant
        self._checked: S3Store | None = None  # sends x-amz-checksum-sha256, once the probe proved it
        self._verifies: bool | None = None  # the probe's answer; None: not asked, or no answer yet
        # one key per adapter: a probe made again after no answer replaces (then deletes) what an
        # earlier attempt may have stored, rather than leave it behind
        self._probe_key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        self._probe_lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        # the default cap of `get` (whole objects in memory); open_objects sets it from the
        # settings' max_object_bytes (docs/design.md §6.6)
        self.max_get_bytes: int | None = None

    # ---- construction ---------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        endpoint: str | None = None,
        region: str = "auto",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        allow_http: bool | None = None,
    ) -> ObjectStore:
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if sep and scheme == "file":
            return cls._local(url, rest)
        if sep and scheme == "memory":
            return cls._memory(url, rest)
        if sep and scheme == "s3":
            redact = Redactor(access_key_id, secret_access_key)
            credentials = (access_key_id, secret_access_key)
            return cls._s3(url, rest, endpoint, region, credentials, allow_http, redact)
        raise ConfigError(f"store URL {redact_url(url)!r} is not supported: {URL_HELP}")

    @classmethod
    def _local(cls, url: str, rest: str) -> ObjectStore:
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.strip("/"):
            raise ConfigError(f"store URL {redact_url(url)!r} names no folder: {URL_HELP}")
        folder = Path(rest).expanduser().resolve()
        try:
            make_private_dirs(folder)  # a new bucket folder is owner-only (docs/design.md §6.6)
            store = LocalStore(folder)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"store folder {str(folder)!r} from {redact_url(url)!r} cannot be used ({exc}): "
                "fix the path or its permissions"
            ) from exc
        return cls(store, description=folder.as_uri())

    @classmethod
    def _memory(cls, url: str, rest: str) -> ObjectStore:
        if rest.strip("/"):
            raise ConfigError(f"store URL {redact_url(url)!r}: a memory store takes no name or path, use memory://")
        return cls(MemoryStore(), description="memory://")

    @classmethod
    def _s3(cls, url, rest, endpoint, region, credentials, allow_http, redact) -> ObjectStore:
        shown = redact(redact_url(url))  # the URL's user info, and the credentials anywhere in it
        bucket = rest.rstrip("/")
        if not BUCKET_NAME.match(bucket):
            raise ConfigError(
                f"store URL {shown!r} does not name a bucket: use s3://BUCKET (3-63 letters, digits, '.', '-', no path)"
            )
        if not all(credentials):
            raise ConfigError(f"store URL {shown!r} needs credentials: {CREDENTIALS_HELP}")
        options: ClientConfig = CLIENT_OPTIONS.copy()
        if endpoint is not None:
            options["allow_http"] = check_endpoint(endpoint, allow_http, redact)
        elif allow_http is not None:
            options["allow_http"] = allow_http
        if endpoint is None and region == "auto":
            region = "us-east-1"  # 'auto' is R2's; plain AWS S3 needs a real region
        config: S3Config = {"region": region, "virtual_hosted_style_request": False}
        if endpoint is not None:
            config["endpoint"] = endpoint.rstrip("/")

        def client(headers: dict[str, str] | None = None, **extra) -> S3Store:
            """A client of this bucket; `headers` go on every request, signed (the probe's)."""
            return S3Store(  # type: ignore[misc]  # S3Config may hold "bucket"; this config never does
                bucket,
                access_key_id=credentials[0],
                secret_access_key=credentials[1],
                client_options={**options, "default_headers": headers} if headers else options,
                retry_config=RETRY_CONFIG,
                **config,
                **extra,
            )

        try:
            store = client()
        except (obstore.exceptions.BaseError, ValueError) as exc:
            raise ConfigError(f"store URL {shown!r} cannot be opened: {redact(first_line(exc))}") from exc
        where = f" at {redact_url(endpoint)}" if endpoint else ""
        return cls(store, description=f"s3://{bucket}{where} (region {region})", redact=redact, variant=client)

    # ---- display and accounting -----------------------------------------------

    def describe(self) -> str:
        """Where this store is, for display; never holds a secret."""
        return self._description

    def __repr__(self) -> str:
        return f"ObjectStore({self._description!r})"

    __str__ = describe

    def request_counts(self) -> Counter[str]:
        """A copy of `counts`, taken under the lock."""
        with self._lock:
            return Counter(self.counts)

    def _count(self, op: str) -> None:
        with self._lock:
            self.counts[REQUEST_CLASS[op]] += 1

    # ---- requests ---------------------------------------------------------------

    def list(self, prefix: str) -> Iterator[list[ObjectInfo]]:
        """Objects under `prefix` (per path segment; '' = all), one page per request."""
        store = self._open()
        stream = self._call(
            "list", prefix, lambda: obstore.list(store, prefix or None, chunk_size=LIST_PAGE_SIZE), count=False
        )
        pages = 0
        while True:
            page = self._call("list", prefix, lambda: next(stream, None), count=False)
            if page is not None or pages == 0:
                self._count("list")
            if page is None:
                return
            pages += 1
            yield [ObjectInfo.from_meta(meta) for meta in page]

    def head(self, key: str) -> ObjectInfo:
        store = self._open()
        return ObjectInfo.from_meta(self._call("head", key, lambda: obstore.head(store, key)))

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """The whole object in memory. One larger than `max_bytes` (default `max_get_bytes`) is
        refused from its size, before its body is read: BadInput names the key and both sizes."""
        store = self._open()
        limit = max_bytes if max_bytes is not None else self.max_get_bytes

        def read() -> bytes:
            result = obstore.get(store, key)
            if limit is not None:
                _check_size(key, int(result.meta["size"]), limit)
            return bytes(result.bytes())

        return self._call("get", key, read)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object; an `end` past the object's size is clamped."""
        if not 0 <= start < end:
            raise ValueError(f"byte range [{start}, {end}) of {key!r} is empty: need 0 <= start < end")
        store = self._open()
        return self._call("get", key, lambda: bytes(obstore.get_range(store, key, start=start, end=end)))

    def download(self, key: str, dest: BinaryIO, *, max_bytes: int | None = None) -> int:
        """Stream the object into `dest` with one GET, chunk by chunk (memory stays bounded).

        Returns the bytes written. An object larger than `max_bytes` is refused before its
        body is read (BadInput names the key and both sizes).
        """
        store = self._open()
        result = self._call("get", key, lambda: obstore.get(store, key))
        if max_bytes is not None:
            _check_size(key, int(result.meta["size"]), max_bytes)
        chunks = self._call("get", key, lambda: iter(result.stream(min_chunk_size=DOWNLOAD_CHUNK)), count=False)
        written = 0
        while (chunk := self._call("get", key, lambda: next(chunks, None), count=False)) is not None:
            dest.write(chunk)
            written += len(chunk)
        return written

    def put(self, key: str, data: bytes) -> None:
        store = self._open()
        # One PUT per object (no multipart), so one put is one Class A request.
        self._call("put", key, lambda: obstore.put(store, key, data, use_multipart=False))

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy; overwrites `dst`."""
        store = self._open()
        self._call("copy", src, lambda: obstore.copy(store, src, dst, overwrite=True), dst=dst)

    def put_checked(self, key: str, data: bytes) -> None:
        """One PUT carrying `x-amz-checksum-sha256`, which object_store computes from `data` itself:
        a server that `verifies_sha256` stores the body only if its own SHA-256 of what it received
        matches, else ChecksumMismatch and nothing is stored (docs/design.md §5.2, §7.3)."""
        self._open()
        if not self.verifies_sha256:
            raise StoreError(f"{self._description} has not shown that it checks SHA-256 on PUT: use put, then get")
        checked = self._checked
        assert checked is not None  # set by the probe that proved it
        self._call("put", key, lambda: obstore.put(checked, key, data, use_multipart=False))

    @property
    def verifies_sha256(self) -> bool:
        """Whether this bucket refuses a PUT whose body does not match its `x-amz-checksum-sha256`,
        proved once by a probe (`_probe_sha256`); a folder or memory store never does. A probe that
        gets no answer (throttled, flaky, unreachable) raises and is made again at the next call."""
        self._open()
        if self._variant is None:
            return False
        with self._probe_lock:
            if self._verifies is None:
                self._verifies = self._probe_sha256()
            return self._verifies

    def _probe_sha256(self) -> bool:
        """PUT a tiny object under PROBE_PREFIX whose checksum is the SHA-256 of other bytes: the
        server checks only if it refuses it (BadDigest) and stores nothing. A stored probe object is
        deleted. Through `_call` like any request: counted, redacted, translated."""
        key = self._probe_key
        assert self._variant is not None  # verifies_sha256 asks only on S3
        wrong = self._variant(headers={SHA256_HEADER: sha256_base64(b"not " + PROBE_BODY)})
        try:
            self._call("put", key, lambda: obstore.put(wrong, key, PROBE_BODY, use_multipart=False))
        except ChecksumMismatch:
            if not self.exists(key):
                self._checked = self._variant(checksum_algorithm="sha256")
                return True
        except (Throttled, Transient, StoreUnavailable):
            raise  # no answer yet
        except StoreError:
            pass  # refused for another reason (a header it does not know, say): nothing proved
        self.delete(key)
        return False

    def delete(self, key: str) -> None:
        """Deletes `key`; a missing key is not an error."""
        store = self._open()
        try:
            self._call("delete", key, lambda: obstore.delete(store, key))
        except ObjectNotFound:
            pass

    def check(self) -> None:
        """One cheap request (first list page). StoreUnavailable if the store cannot be used;
        Throttled and Transient pass through (the store answers, it is just busy or flaky)."""
        try:
            next(iter(self.list(CHECK_PREFIX)), None)
        except (StoreUnavailable, Throttled, Transient):
            raise
        except StoreError as exc:
            raise StoreUnavailable(f"store check failed: {exc}") from exc

    def close(self) -> None:
        self._store = self._checked = self._variant = None

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- plumbing ---------------------------------------------------------------

    def _open(self):
        if self._store is None:
            raise StoreError(f"{self._description} is closed: open a new ObjectStore")
        return self._store

    def _call(self, op: str, key: str, fn: Callable[[], T], *, count: bool = True, dst: str | None = None) -> T:
        if count:
            self._count(op)
        try:
            return fn()
        except (obstore.exceptions.BaseError, OSError, ValueError, TypeError) as exc:  # TypeError: delete of a bad key
            target = key if dst is None else f"{key} -> {dst}"
            error = translate_error(exc, op=op, key=key, target=target, where=self._description, redact=self._redact)
            raise error from exc


def sha256_base64(data: bytes) -> str:
    """The value of an `x-amz-checksum-sha256` header: base64 of the raw digest."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _check_size(key: str, size: int, limit: int) -> None:
    if size > limit:
        raise BadInput(
            f"object {key!r} is {size:,} bytes, over the limit of {limit:,} (max_object_bytes): "
            "raise the limit or handle the document by hand"
        )


# ---- error translation -------------------------------------------------------------


def check_endpoint(endpoint: str, allow_http: bool | None, redact: Redactor) -> bool:
    """Validates an S3 endpoint URL; returns the allow_http to use."""
    parts = urlsplit(endpoint)
    shown = redact(redact_url(endpoint))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"S3 endpoint {shown!r} is not an http(s) URL: use e.g. https://<account_id>.r2.cloudflarestorage.com"
        )
    # it would ride along in every error text; urlsplit stops the user info at the first `/`, so a
    # password holding one (`https://id:se/cret@host`) is caught by its `@` (repage.redact)
    if parts.username is not None or parts.password is not None or "@" in endpoint:
        raise ConfigError(
            f"S3 endpoint {shown!r} carries credentials: give the endpoint without them and set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    try:
        parts.port  # noqa: B018 (raises on a port that is no number)
    except ValueError:
        raise ConfigError(f"S3 endpoint {shown!r} has no numeric port: use https://HOST or https://HOST:PORT") from None
    if parts.scheme == "http" and allow_http is False:
        raise ConfigError(f"S3 endpoint {shown!r} is plain http but allow_http is off: use https or allow http")
    return parts.scheme == "http" if allow_http is None else allow_http


def first_line(exc: BaseException) -> str:
    line = str(exc).split("\n", 1)[0].strip()
    return line if len(line) <= 300 else line[:297] + "..."


def http_status(text: str) -> int | None:
    match = STATUS.search(text)
    return int(match.group(1) or match.group(2)) if match else None


def translate_error(exc: BaseException, *, op: str, key: str, target: str, where: str, redact: Redactor) -> StoreError:
    """Maps an obstore error to the repage tree (the caller raises it `from exc`)."""
    text = str(exc)
    status = http_status(text)
    code_match = S3_CODE.search(text)
    code = code_match.group(1) if code_match else None
    reason = redact(f"HTTP {status} {code or ''}".strip() if status else first_line(exc))
    target = redact(target)
    if code == "NoSuchBucket":
        return StoreUnavailable(f"{where}: the bucket does not exist: create it or fix REPAGE_STORE_URL")
    if code == "BadDigest":  # S3 and R2 say so when a body does not match its checksum header
        return ChecksumMismatch(
            f"{where} refused {op} {target!r} ({reason}): the body it received does not match the "
            "SHA-256 sent with it, nothing was stored; run the document again"
        )
    if status in (429, 503) or code == "SlowDown":
        return Throttled(f"{where} asked to slow down on {op} {target!r} ({reason}): back off and retry")
    if isinstance(exc, FileNotFoundError) or status == 404:
        return ObjectNotFound(f"object {key!r} not found in {where}")
    if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or status in (401, 403):
        return StoreUnavailable(
            f"{where} refused {op} {target!r} ({reason}): check the credentials: {CREDENTIALS_HELP}"
        )
    if status in TRANSIENT_STATUS or (status is None and any(marker in text for marker in TRANSIENT_FAILURE)):
        return Transient(f"{op} {target!r} in {where} failed ({reason}): a transient error, retry")
    if status is None and any(marker in text for marker in CONNECT_FAILURE):
        return StoreUnavailable(f"{where} does not answer ({reason}): check the endpoint and that the server is up")
    if isinstance(exc, (ValueError, TypeError)):
        return StoreError(f"{op} {target!r} in {where} failed: invalid key or argument ({reason})")
    return StoreError(f"{op} {target!r} in {where} failed ({reason})")

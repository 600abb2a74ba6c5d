"""One contract for every ObjectStore backend (file, memory, s3 on moto), then S3-only
behaviour: missing bucket, unreachable endpoint, throttling without obstore retries,
and secrets kept out of repr and errors."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from repage.errors import (
    BadInput,
    ChecksumMismatch,
    ConfigError,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
    Throttled,
)
from repage.stores.objects import PROBE_PREFIX, ObjectInfo, ObjectStore
from tests.fixtures.s3 import create_bucket, free_port, s3_store, unique_bucket_name
from tests.support.faults import FaultPlan, FaultProxy, is_checked_put

SPECIAL_KEYS = [
    "ds/doc/images/x y.png",
    "ds/doc/images/x%20y.png",
    "ds/doc/images/100%.png",
    "ds/doc/images/é ü 日本.png",
    "ds/doc/images/a+b.png",
    "ds/My Report (v2) #1.pdf",
]


def all_keys(store: ObjectStore, prefix: str = "") -> list[str]:
    return sorted(info.key for page in store.list(prefix) for info in page)


# ---- the contract -------------------------------------------------------------------


def test_put_then_get_and_head_agree_on_bytes_and_size(object_store):
    object_store.put("ds/doc/images/0_0.png", b"\x89PNG" + bytes(100))
    info = object_store.head("ds/doc/images/0_0.png")
    assert object_store.get("ds/doc/images/0_0.png") == b"\x89PNG" + bytes(100)
    assert info.key == "ds/doc/images/0_0.png"
    assert info.size == 104
    assert isinstance(info.last_modified, datetime) and info.last_modified.tzinfo is not None
    assert info.etag is None or (info.etag and '"' not in info.etag)


def test_get_refuses_an_object_over_its_cap_naming_the_key(object_store):
    """docs/design.md §6.6: from the object's size, before its body; the cap per call or per store."""
    key = "ds/doc/source big.pdf"
    object_store.put(key, bytes(5000))
    with pytest.raises(BadInput, match=r"'ds/doc/source big.pdf' is 5,000 bytes, over the limit of 4,999") as caught:
        object_store.get(key, max_bytes=4999)
    assert len(str(caught.value).splitlines()) == 1
    assert object_store.get(key, max_bytes=5000) == bytes(5000)
    object_store.max_get_bytes = 1024  # as open_objects sets it from max_object_bytes
    with pytest.raises(BadInput, match="over the limit of 1,024"):
        object_store.get(key)
    assert object_store.get(key, max_bytes=10_000) == bytes(5000)  # a call's own cap wins


def test_put_overwrites(object_store):
    object_store.put("k", b"old")
    object_store.put("k", b"new!")
    assert object_store.get("k") == b"new!"
    assert object_store.head("k").size == 4


def test_object_info_is_frozen(object_store):
    object_store.put("k", b"x")
    info = object_store.head("k")
    with pytest.raises(AttributeError):
        info.size = 2  # type: ignore[misc]


def test_list_prefix_is_per_path_segment(object_store):
    for key in ["a/b/1.png", "a/b/2.png", "a/b/deeper/3.png", "a/bc/4.png", "a/b.png"]:
        object_store.put(key, b"x")
    assert all_keys(object_store, "a/b") == ["a/b/1.png", "a/b/2.png", "a/b/deeper/3.png"]
    assert all_keys(object_store, "a/b/") == ["a/b/1.png", "a/b/2.png", "a/b/deeper/3.png"]
    assert len(all_keys(object_store, "")) == 5


def test_list_of_missing_prefix_is_empty_and_costs_one_request(object_store):
    assert list(object_store.list("nothing/here")) == []
    assert object_store.counts == Counter({"A": 1})


def test_list_pages_over_a_thousand_keys(object_store):
    keys = [f"big/{i:05d}.png" for i in range(1100)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: object_store.put(key, b"x"), keys))
    object_store.counts.clear()
    pages = list(object_store.list("big"))
    assert [len(page) for page in pages] == [1000, 100]
    assert sorted(info.key for page in pages for info in page) == keys
    assert all(isinstance(info, ObjectInfo) for page in pages for info in page)
    assert object_store.counts == Counter({"A": 2})


def test_copy_preserves_bytes_and_overwrites_destination(object_store):
    payload = bytes(range(256)) * 40
    object_store.put("old/0_doc.pdf-3-0.png", payload)
    object_store.put("new/3_0.png", b"stale")
    object_store.copy("old/0_doc.pdf-3-0.png", "new/3_0.png")
    assert object_store.get("new/3_0.png") == payload
    assert object_store.head("new/3_0.png").size == len(payload)
    assert object_store.get("old/0_doc.pdf-3-0.png") == payload


def test_copy_of_missing_source_raises_object_not_found(object_store):
    with pytest.raises(ObjectNotFound, match="missing/src"):
        object_store.copy("missing/src", "dst")


def test_delete_is_idempotent(object_store):
    object_store.put("k", b"x")
    object_store.delete("k")
    object_store.delete("k")
    object_store.delete("never/existed")
    assert not object_store.exists("k")


@pytest.mark.parametrize("call", ["get", "head", "get_range"])
def test_missing_object_raises_object_not_found(object_store, call):
    with pytest.raises(ObjectNotFound, match="no/such/key") as raised:
        if call == "get_range":
            object_store.get_range("no/such/key", 0, 4)
        else:
            getattr(object_store, call)("no/such/key")
    assert raised.value.__cause__ is not None


def test_exists(object_store):
    object_store.put("here", b"x")
    assert object_store.exists("here")
    assert not object_store.exists("not/here")


def test_get_range_returns_the_half_open_range_and_clamps_the_end(object_store):
    object_store.put("pdf", b"0123456789")
    assert object_store.get_range("pdf", 2, 5) == b"234"
    assert object_store.get_range("pdf", 0, 10) == b"0123456789"
    assert object_store.get_range("pdf", 7, 100) == b"789"
    with pytest.raises(ValueError):
        object_store.get_range("pdf", 5, 5)


@pytest.mark.parametrize("key", SPECIAL_KEYS)
def test_special_keys_round_trip_unchanged(object_store, key):
    object_store.put(key, key.encode())
    assert object_store.get(key) == key.encode()
    assert object_store.head(key).key == key
    assert all_keys(object_store, key.rsplit("/", 1)[0]) == [key]
    object_store.copy(key, key + ".copy")
    assert object_store.get(key + ".copy") == key.encode()


def test_percent_keys_are_not_decoded_or_encoded_twice(object_store):
    object_store.put("d/x y.png", b"space")
    object_store.put("d/x%20y.png", b"percent")
    object_store.put("d/x%2520y.png", b"double")
    assert object_store.get("d/x y.png") == b"space"
    assert object_store.get("d/x%20y.png") == b"percent"
    assert object_store.get("d/x%2520y.png") == b"double"
    assert all_keys(object_store, "d") == ["d/x y.png", "d/x%20y.png", "d/x%2520y.png"]


def test_counts_requests_by_r2_class(object_store):
    object_store.put("a", b"abc")  # A
    object_store.copy("a", "b")  # A
    list(object_store.list("z"))  # A
    object_store.get("a")  # B
    object_store.get_range("a", 0, 1)  # B
    object_store.head("a")  # B
    object_store.exists("nope")  # B (a failed request still counts)
    object_store.delete("a")  # free
    assert object_store.counts == Counter({"A": 3, "B": 4, "free": 1})
    assert object_store.request_counts() == object_store.counts


def test_counts_are_thread_safe(object_store):
    object_store.put("k", b"x")
    object_store.counts.clear()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: object_store.exists("k"), range(80)))
    assert object_store.counts == Counter({"B": 80})


def test_check_passes_on_a_usable_store(object_store):
    object_store.check()
    assert object_store.counts == Counter({"A": 1})


def test_closed_store_refuses_requests(object_store):
    object_store.close()
    with pytest.raises(StoreError, match="closed"):
        object_store.get("k")


def test_invalid_key_is_a_store_error_naming_the_key(object_store):
    with pytest.raises(StoreError, match=r"a//b"):
        object_store.put("a//b", b"x")


# ---- from_url -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["", "bucket", "ftp://host/x", "s3://", "s3://bkt/some/path", "s3://x", "file://", "memory://name"],
)
def test_malformed_url_is_a_one_line_config_error_naming_it(url):
    with pytest.raises(ConfigError) as raised:
        ObjectStore.from_url(url, access_key_id="k", secret_access_key="s")
    message = str(raised.value)
    assert "\n" not in message
    assert repr(url) in message


def test_s3_without_credentials_is_a_config_error():
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        ObjectStore.from_url("s3://bkt", endpoint="http://127.0.0.1:9", access_key_id="only-the-id")


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "ftp://host", "https://"])
def test_bad_endpoint_is_a_config_error(endpoint):
    with pytest.raises(ConfigError, match="endpoint"):
        ObjectStore.from_url("s3://bkt", endpoint=endpoint, access_key_id="k", secret_access_key="s")


def test_relative_file_url_resolves_and_creates_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ObjectStore.from_url("file://./data/bucket")
    assert (tmp_path / "data" / "bucket").is_dir()
    assert store.describe() == (tmp_path / "data" / "bucket").as_uri()
    store.put("k", b"x")
    assert (tmp_path / "data" / "bucket" / "k").read_bytes() == b"x"


def test_absolute_file_url_creates_the_folder(tmp_path):
    store = ObjectStore.from_url(f"file://{tmp_path}/new/folder")
    store.put("a/b", b"x")
    assert (tmp_path / "new" / "folder" / "a" / "b").read_bytes() == b"x"


# ---- S3 only ---------------------------------------------------------------------------


def test_check_on_a_missing_bucket_raises_store_unavailable(moto_endpoint):
    store = s3_store(moto_endpoint, unique_bucket_name())
    with pytest.raises(StoreUnavailable, match="does not exist"):
        store.check()


def test_missing_bucket_on_get_is_store_unavailable_not_object_not_found(moto_endpoint):
    store = s3_store(moto_endpoint, unique_bucket_name())
    with pytest.raises(StoreUnavailable):
        store.get("k")


def test_check_on_an_unreachable_endpoint_raises_store_unavailable_fast():
    store = s3_store(f"http://127.0.0.1:{free_port()}", "bkt")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="does not answer"):
        store.check()
    assert time.monotonic() - started < 2.0


def test_bucket_created_over_http_is_usable(moto_endpoint):
    name = unique_bucket_name()
    create_bucket(moto_endpoint, name)
    store = s3_store(moto_endpoint, name)
    store.check()
    assert "s3://" + name in store.describe()


class StubS3(BaseHTTPRequestHandler):
    """Answers every request with one canned status and S3 error body; counts requests."""

    status = 503
    code = "SlowDown"
    requests: list[str]

    def answer(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{self.code}</Code>'
            f"<Message>echo: {self.headers.get('Authorization')}</Message></Error>"
        ).encode()
        self.send_response(self.status)
        self.send_header("Retry-After", "2")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = answer

    def log_message(self, *args) -> None:
        pass


@contextmanager
def stub_s3(status: int, code: str):
    handler = type("Handler", (StubS3,), {"status": status, "code": code, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler.requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (429, "TooManyRequests")])
@pytest.mark.parametrize("call", ["get", "head", "put", "list", "copy"])
def test_throttling_raises_throttled_at_once_without_obstore_retries(status, code, call):
    with stub_s3(status, code) as (endpoint, requests):
        store = s3_store(endpoint, "bkt")
        started = time.monotonic()
        with pytest.raises(Throttled) as raised:
            {
                "get": lambda: store.get("k"),
                "head": lambda: store.head("k"),
                "put": lambda: store.put("k", b"x"),
                "list": lambda: list(store.list("p")),
                "copy": lambda: store.copy("k", "k2"),
            }[call]()
        assert time.monotonic() - started < 1.0
    assert len(requests) == 1, requests
    assert isinstance(raised.value.__cause__, Exception)
    assert str(status) in str(raised.value)


def test_secrets_never_appear_in_repr_describe_or_errors():
    key_id, secret = "AKIAEXAMPLEKEYID1234", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET"
    with stub_s3(403, "AccessDenied") as (endpoint, _):
        store = s3_store(endpoint, "bkt", access_key_id=key_id, secret_access_key=secret)
        shown = [repr(store), str(store), store.describe(), repr(vars(store))]
        errors = []
        for call in (lambda: store.get("k"), lambda: store.check(), lambda: list(store.list("p"))):
            with pytest.raises(StoreError) as raised:
                call()
            errors.append(str(raised.value))
    assert all(key_id not in text and secret not in text for text in shown + errors), shown + errors
    assert any("AccessDenied" in text or "403" in text for text in errors)
    with pytest.raises(ConfigError) as raised:
        ObjectStore.from_url(f"s3://{secret}", access_key_id=key_id, secret_access_key=secret)
    assert secret not in str(raised.value)


# ---- the checksum probe and checked PUTs (docs/design.md §5.2) ---------------------------------
# moto 5.2.5 stores a PUT whatever its x-amz-checksum-sha256 says (docs/design.md §7.4): the
# server that checks, as S3 and R2 do, is moto behind a proxy that checks (tests/fixtures/proxy.py).


def probe_keys(store: ObjectStore) -> list[str]:
    return all_keys(store, PROBE_PREFIX.rstrip("/"))


@pytest.mark.parametrize("backend", ["file", "memory"])
def test_a_folder_or_memory_never_checks_and_the_probe_costs_nothing(tmp_path, backend):
    url = (tmp_path / "bucket").as_uri() if backend == "file" else "memory://"
    with ObjectStore.from_url(url) as store:
        assert store.verifies_sha256 is False
        assert store.counts == Counter()
        with pytest.raises(StoreError, match="has not shown that it checks SHA-256"):
            store.put_checked("k", b"x")
        assert not store.exists("k")


def test_plain_moto_stores_a_wrong_checksum_so_the_probe_says_no_and_deletes_its_object(moto_endpoint):
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    with s3_store(moto_endpoint, bucket) as store:
        assert store.verifies_sha256 is False
        assert store.counts == Counter({"A": 1, "free": 1})  # the probe's PUT, and the DELETE of what it stored
        assert probe_keys(store) == []
        store.counts.clear()
        assert store.verifies_sha256 is False  # asked once per adapter
        assert store.counts == Counter()
        with pytest.raises(StoreError, match="has not shown"):
            store.put_checked("k", b"x")


def test_a_checking_server_refuses_the_probe_stores_nothing_and_the_probe_says_yes(moto_endpoint, verifying_proxy):
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    with s3_store(verifying_proxy.endpoint, bucket) as store:
        assert store.verifies_sha256 is True
        assert store.counts == Counter({"A": 1, "B": 1})  # the refused PUT, the HEAD that finds nothing
        seen = [(s.method, s.path.split("?")[0].removeprefix(f"/{bucket}/"), s.status) for s in verifying_proxy.seen()]
        key = seen[0][1]
        assert key.startswith(PROBE_PREFIX) and seen == [("PUT", key, 400), ("HEAD", key, 404)]
        assert verifying_proxy.checksums == Counter({"bad": 1})
        assert probe_keys(store) == []
        store.counts.clear()
        assert store.verifies_sha256 is True and store.counts == Counter()


def test_a_checked_put_with_the_right_checksum_is_stored_byte_for_byte(moto_endpoint, verifying_proxy):
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    payload = bytes(range(256)) * 41
    with s3_store(verifying_proxy.endpoint, bucket) as store:
        store.put_checked("ds/doc/images/p3_0.png", payload)
        assert verifying_proxy.checksums == Counter({"bad": 1, "ok": 1})  # the probe's, then this one
        assert store.counts == Counter({"A": 2, "B": 1})
    with s3_store(moto_endpoint, bucket) as direct:
        assert direct.get("ds/doc/images/p3_0.png") == payload


def test_a_checked_put_whose_body_changes_on_the_way_is_refused_naming_the_key_and_nothing_is_stored(moto_endpoint):
    """Bits flipped in transit: the server's SHA-256 of what it got differs from the header, so
    it refuses (400 BadDigest); one line naming the key, and no object."""
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    proxy = FaultProxy(moto_endpoint, verify_sha256=True).start()
    try:
        store = s3_store(proxy.endpoint, bucket)
        assert store.verifies_sha256 is True
        proxy.set_plan(FaultPlan(rate=1.0, weights={"corrupt": 1.0}, when=is_checked_put))
        with pytest.raises(ChecksumMismatch) as caught:
            store.put_checked("ds/doc/images/p3_0.png", b"\x89PNG" + bytes(500))
        message = str(caught.value)
        assert len(message.splitlines()) == 1
        assert "'ds/doc/images/p3_0.png'" in message and "BadDigest" in message and "nothing was stored" in message
        assert proxy.fault_counts() == Counter({"corrupt": 1})
        assert proxy.checksums == Counter({"bad": 2})  # the probe's, and this one
        proxy.off()
        assert not store.exists("ds/doc/images/p3_0.png")
        store.close()
    finally:
        proxy.stop()


def test_a_probe_that_is_throttled_raises_and_is_made_again_next_time(moto_endpoint, verifying_proxy):
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    with s3_store(verifying_proxy.endpoint, bucket) as store:
        verifying_proxy.inject_throttle(1)
        with pytest.raises(Throttled):
            store.verifies_sha256  # noqa: B018 (the property makes the probe)
        assert store.verifies_sha256 is True  # asked again: no answer is not a "no"
        assert store.counts == Counter({"A": 2, "B": 1})


class RefusesButKeeps(BaseHTTPRequestHandler):
    """A server that answers every PUT 400 BadDigest yet keeps it: a HEAD finds the object."""

    protocol_version = "HTTP/1.1"
    requests: list[str]

    def _reply(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.requests.append(f"{self.command} {self.path}")
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_PUT(self) -> None:
        self._reply(400, b"<Error><Code>BadDigest</Code><Message>no match</Message></Error>")

    def do_HEAD(self) -> None:
        self._reply(200, b"", ETag='"e"', **{"Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"})

    def do_POST(self) -> None:  # obstore's DELETE: a POST of ?delete
        self._reply(200, b"<DeleteResult><Deleted><Key>k</Key></Deleted></DeleteResult>")

    def log_message(self, *args) -> None:
        pass


def test_a_server_that_refuses_the_probe_but_keeps_it_does_not_pass_and_the_object_is_deleted():
    handler = type("Handler", (RefusesButKeeps,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        with s3_store(f"http://127.0.0.1:{server.server_port}", "bkt") as store:
            assert store.verifies_sha256 is False
    finally:
        server.shutdown()
        server.server_close()
    key = handler.requests[0].split()[1].split("?")[0].removeprefix("/bkt/")
    assert key.startswith(PROBE_PREFIX)
    assert [r.split("?")[0] for r in handler.requests] == [f"PUT /bkt/{key}", f"HEAD /bkt/{key}", "POST /bkt"]

"""Acceptance: the reprocess path (docs/design.md §2.4) against a stand-in admin API over real HTTP.

The stand-in is an http.server on 127.0.0.1 in a thread speaking the app's default shape
(`POST /api/v1/admin/documents/{id}/reprocess`, `GET /api/v1/admin/documents/{id}`); each
document id picks a behaviour. Milvus Lite (in process), a memory bucket and a SQLite ledger
are real; the run's clock is a FakeClock, so polls and retry backoffs wait no wall time.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from repage.config import load_settings
from repage.domain.records import ScanRecord
from repage.domain.states import RepairPath, State
from repage.migration.runner import RunLimits, Runner, Selection
from repage.migration.work import RunOptions
from repage.stores.ledger import Ledger
from repage.stores.milvus import MilvusVectors
from repage.stores.objects import ObjectStore
from repage.stores.open import Stores
from repage.stores.throttle import FakeClock
from tests.fixtures.milvus import insert_sample, unique_name

TOKEN = "s3cret-admin-token-xyz"
DOCS = ("ok-1", "ok-2", "ok-3", "ok-4", "bad", "slow", "flaky", "deferred-1")
SMALL_DIM = 8


class AdminApi:
    """The app's admin API, scripted per document id; records every request."""

    def __init__(self):
        self.calls: list[tuple[str, str, str | None]] = []  # (method, document_id, authorization)
        self.polls: dict[str, int] = {}
        self.posts: dict[str, int] = {}
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                m = re.fullmatch(r"/api/v1/admin/documents/([^/]+)/reprocess", self.path)
                api.answer(self, "POST", m.group(1) if m else None)

            def do_GET(self):
                m = re.fullmatch(r"/api/v1/admin/documents/([^/]+)", self.path)
                api.answer(self, "GET", m.group(1) if m else None)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, handler, method: str, doc: str | None) -> None:
        with self._lock:
            self.calls.append((method, doc, handler.headers.get("Authorization")))
            if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._send(handler, 401, {"detail": "bad token"})
            if doc is None:
                return self._send(handler, 404, {"detail": "no such route"})
            if method == "POST":
                self.posts[doc] = self.posts.get(doc, 0) + 1
                if doc == "flaky" and self.posts[doc] <= 2:
                    return self._send(handler, 503, {"detail": "overloaded"})
                return self._send(handler, 202, {"status": "processing"})
            self.polls[doc] = n = self.polls.get(doc, 0) + 1
            if doc == "bad":
                return self._send(handler, 200, {"status": "failed", "error": "OCR worker crashed"})
            if doc == "slow":
                return self._send(handler, 200, {"status": "processing"})
            if doc == "flaky" and n == 1:
                return self._send(handler, 500, {"detail": "hiccup"})
            if n < 3:
                return self._send(handler, 200, {"status": "processing"})
            body = {"status": "ready"}
            if doc.startswith("ok-"):
                body["cost_dollars"] = 0.25  # flaky reports nothing: the price table applies
            return self._send(handler, 200, body)

    @staticmethod
    def _send(handler, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def api():
    server = AdminApi()
    yield server
    server.close()


@pytest.fixture(scope="module")
def collection(milvus_lite_uri):
    name = unique_name("reprocess")
    MilvusVectors.create_collection(milvus_lite_uri, name, dim=SMALL_DIM).close()
    store = MilvusVectors(milvus_lite_uri, name)
    insert_sample(store, DOCS)
    yield milvus_lite_uri, name
    store.drop_collection()
    store.close()


@pytest.fixture
def stores(api, collection, tmp_path):
    uri, name = collection
    settings = load_settings(
        {},
        app_fallbacks=False,
        flags={
            "milvus_uri": uri,
            "collection": name,
            "store_url": "memory://",
            "ledger_url": f"sqlite:///{tmp_path}/l.db",
            "reprocess_url": api.url,
            "reprocess_token": TOKEN,
            "reprocess_timeout_seconds": 60,
            "reprocess_poll_seconds": 5,
        },
    )
    ledger = Ledger(settings.ledger_url)
    ledger.upsert_scan(
        [ScanRecord(d, "ds1", f"{d}.png", RepairPath.REPROCESS, State.PENDING, "source is not a PDF", 3) for d in DOCS]
    )
    vectors = MilvusVectors(uri, name)
    objects = ObjectStore.from_url("memory://")
    yield Stores(settings, vectors, objects, ledger, _opened=[ledger, objects, vectors])
    for store in (ledger, objects, vectors):
        store.close()


def run(stores, *docs, clock=None, **limits):
    selection = Selection(paths=frozenset({RepairPath.REPROCESS}), document_ids=docs, allow_reprocess=True)
    limits = RunLimits(batch_size=limits.pop("batch_size", 8), **limits)
    return Runner(stores, RunOptions(), limits, selection, clock=clock or FakeClock()).run()


def state(stores, doc: str):
    return stores.ledger.get(doc)


def test_success_failure_timeout_and_retried_5xx(stores, api):
    price = stores.settings.prices
    estimate = price.reprocess_compute_per_document + 3 * (price.vision_per_image + price.ocr_per_image)
    summary = run(stores, "ok-1", "bad", "slow", "flaky", reprocess_concurrency=4)

    ok, bad, slow, flaky = (state(stores, d) for d in ("ok-1", "bad", "slow", "flaky"))
    assert ok.state == State.MIGRATED and ok.dollars == pytest.approx(0.25)  # the backend's reported cost
    assert ok.total_chunks == 7 and "reprocessed (http)" in ok.reason
    assert bad.state == State.FAILED and "OCR worker crashed" in bad.last_error
    assert bad.dollars == pytest.approx(estimate)  # it ran: no reported cost, the price table's figure
    assert slow.state == State.FAILED and "timed out after" in slow.last_error
    assert api.polls["slow"] >= 3  # polled until the timeout (the FakeClock is shared: others' sleeps count)
    # 503, 503, then accepted: three POSTs; the first poll's 500 retried too
    assert api.posts["flaky"] == 3 and flaky.state == State.MIGRATED
    assert flaky.dollars == pytest.approx(estimate)
    assert (summary.migrated, summary.failed) == (2, 2)
    assert summary.reprocess_dollars == pytest.approx(0.25 + 3 * estimate)
    assert summary.dollars == pytest.approx(summary.reprocess_dollars)
    # the token travels only in the Authorization header, never in a message
    assert {auth for _, _, auth in api.calls} == {f"Bearer {TOKEN}"}
    assert all(TOKEN not in (e or "") for e in summary.errors.values())
    assert TOKEN not in repr(
        Runner(stores, RunOptions(), RunLimits(), Selection(allow_reprocess=True)).reprocess.reprocessor
    )


def test_budget_exhausted_mid_run_stops_cleanly(stores, api):
    # each job reports $0.25 and is reserved at the top of the price range (`high`): after two, $0.50
    # is spent and the third's reservation does not fit in what is left: back to pending, the run stops
    from repage.reprocess.base import estimated_dollar_range

    high = estimated_dollar_range(stores.settings.prices, stores.ledger.get("ok-4").affected_chunks)[1]
    budget = 0.50 + 0.99 * high
    summary = run(stores, "ok-2", "ok-3", "ok-4", batch_size=1, budget_dollars=budget, reprocess_concurrency=1)
    states = {d: state(stores, d).state for d in ("ok-2", "ok-3", "ok-4")}
    assert states == {"ok-2": State.MIGRATED, "ok-3": State.MIGRATED, "ok-4": State.PENDING}
    assert "--budget" in summary.stopped_because and "left" in summary.stopped_because
    assert summary.dollars == pytest.approx(0.50) and summary.migrated == 2
    assert "ok-4" not in api.posts  # never submitted: no dollars spent on it
    assert state(stores, "ok-4").lease_owner is None and state(stores, "ok-4").dollars == 0


def test_auto_without_allow_defers_then_allow_reprocesses(stores, api):
    selection = Selection(
        paths=frozenset({RepairPath.KEYS, RepairPath.PDF, RepairPath.REPROCESS}), document_ids=("deferred-1",)
    )
    Runner(stores, RunOptions(), RunLimits(), selection, clock=FakeClock()).run()
    record = state(stores, "deferred-1")
    assert record.state == State.DEFERRED and "--allow-reprocess" in record.reason
    assert "deferred-1" not in api.posts
    summary = Runner(
        stores,
        RunOptions(),
        RunLimits(),
        Selection(paths=selection.paths, document_ids=("deferred-1",), allow_reprocess=True),
        clock=FakeClock(),
    ).run()
    assert summary.migrated == 1 and state(stores, "deferred-1").state == State.MIGRATED


# ---------------------------------------------------------------- another app's API, configured in repage.toml

OTHER_SHAPE = """
[repage.reprocess_api]
submit_method = "PUT"
submit_path = "/v2/datasets/{dataset_id}/reprocess-jobs"
submit_body = { document = "{document_id}", source = "{filename}", mode = "full", priority = 3 }
poll_path = "/v2/jobs/{job_id}"
job_id_field = "job.id"
status_field = "job.state"
ready_values = ["DONE"]
failed_values = ["CRASHED"]
cost_fields = ["job.billing.usd"]
error_fields = ["job.message"]
"""


class JobsApi:
    """Another app's reprocess API: PUT a job per dataset with a JSON body naming the document, poll
    the job by the id the PUT answered; nested replies. Records every request."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict | None]] = []  # (method, path, JSON body)
        self.jobs: dict[str, str] = {}  # job id -> document id
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_PUT(self):
                length = int(self.headers.get("Content-Length") or 0)
                api.answer(self, "PUT", json.loads(self.rfile.read(length)) if length else None)

            def do_GET(self):
                api.answer(self, "GET", None)

            do_POST = do_GET  # the default shape's method: this app answers it 404

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, handler, method: str, body: dict | None) -> None:
        with self._lock:
            self.requests.append((method, handler.path, body))
            if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
                return AdminApi._send(handler, 401, {})
            if method == "PUT" and re.fullmatch(r"/v2/datasets/ds1/reprocess-jobs", handler.path) and body:
                job = f"job-{len(self.jobs) + 1}"
                self.jobs[job] = body["document"]
                return AdminApi._send(handler, 201, {"job": {"id": job, "state": "QUEUED"}})
            m = re.fullmatch(r"/v2/jobs/(job-\d+)", handler.path)
            if method == "GET" and m and m.group(1) in self.jobs:
                if self.jobs[m.group(1)] == "bad":
                    return AdminApi._send(handler, 200, {"job": {"state": "CRASHED", "message": "no pages found"}})
                return AdminApi._send(handler, 200, {"job": {"state": "DONE", "billing": {"usd": 0.4}}})
            return AdminApi._send(handler, 404, {"detail": "no such route"})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jobs_api():
    server = JobsApi()
    yield server
    server.close()


@pytest.fixture
def other_app(stores, jobs_api, tmp_path):
    """The stores, with the reprocess URL and shape of another app (repage.toml)."""
    toml = tmp_path / "repage.toml"
    toml.write_text(OTHER_SHAPE, encoding="utf-8")
    flags = {name: getattr(stores.settings, name) for name in ("milvus_uri", "collection", "store_url", "ledger_url")}
    settings = load_settings(
        {}, toml_path=toml, app_fallbacks=False, flags=flags | {"reprocess_url": jobs_api.url, "reprocess_token": TOKEN}
    )
    return Stores(settings, stores.vectors, stores.objects, stores.ledger)


def test_another_apps_paths_and_payloads_from_repage_toml(other_app, jobs_api):
    summary = run(other_app, "ok-1", "bad")

    ok, bad = state(other_app, "ok-1"), state(other_app, "bad")
    assert ok.state == State.MIGRATED and ok.dollars == pytest.approx(0.4)  # job.billing.usd
    assert bad.state == State.FAILED and "no pages found" in bad.last_error  # job.message
    assert (summary.migrated, summary.failed) == (1, 1)
    puts = sorted(
        (path, body["document"], body["source"]) for method, path, body in jobs_api.requests if method == "PUT"
    )
    assert puts == [("/v2/datasets/ds1/reprocess-jobs", d, f"{d}.png") for d in ("bad", "ok-1")]
    assert all(body == {**body, "mode": "full", "priority": 3} for m, _, body in jobs_api.requests if m == "PUT")
    polled = {path for method, path, _ in jobs_api.requests if method == "GET"}
    assert polled == {f"/v2/jobs/{job}" for job in jobs_api.jobs}
    assert not [r for r in jobs_api.requests if "/api/v1/admin" in r[1]]  # the default shape is never used

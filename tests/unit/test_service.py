"""The service app in-process (FastAPI TestClient, a stand-in Milvus, a real SQLite ledger):
bearer tokens, read-repair, errors, metrics without ids, and a ledger that is down.
The real server over HTTP is tests/integration/test_service.py."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from repage.errors import ConfigError, StoreUnavailable
from repage.migration.worker import is_paused
from repage.stores.ledger import Ledger
from repage.web.service import check_exposure, create_app, create_router, make_parts
from tests.support.service_store import expected_pages, fltr_rows, settings_for

READ, ADMIN = "read-tok-3f9a7c-5d1e0b8a2c4f6e9d7b3a", "admin-tok-81be20-c7a94f3e1d0b6a2e58d9"
DOCS = ["doc-1", "doc-2"]


class StandInVectors:
    """fetch_documents over fixed rows; `down` makes it fail like an unreachable Milvus."""

    def __init__(self, rows):
        self.rows, self.down = rows, False

    def fetch_documents(self, ids, *, fields=None, with_vectors=True):
        if self.down:
            raise StoreUnavailable("Milvus at http://127.0.0.1:1 does not answer")
        return [{k: v for k, v in r.items() if k != "vector"} for r in self.rows if r["document_id"] in ids]


class DownLedger:
    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise StoreUnavailable("ledger sqlite:///x is unavailable: disk I/O error")

        return fail


def settings(tmp_path, **tokens):
    return settings_for(
        str(tmp_path / "m.db"), "fltr_documents", "memory://", f"sqlite:///{tmp_path}/ledger.db", **tokens
    )


@pytest.fixture
def service(tmp_path):
    s = settings(tmp_path, read_token=READ, admin_token=ADMIN)
    ledger = Ledger(s.ledger_url)
    rows = fltr_rows(DOCS)
    vectors = StandInVectors(rows)
    app = create_app(s, stores=SimpleNamespace(vectors=vectors, ledger=ledger), flush_seconds=0.05)
    with TestClient(app) as client:
        yield SimpleNamespace(client=client, ledger=ledger, vectors=vectors, rows=rows, app=app)
    ledger.close()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


READ_ENDPOINTS = [("get", "/documents/doc-1/chunks"), ("get", "/migration/status"), ("get", "/metrics")]
ADMIN_ENDPOINTS = [("post", "/migration/documents/doc-1"), ("post", "/migration/pause"), ("post", "/migration/resume")]


@pytest.mark.parametrize("method,url", READ_ENDPOINTS + ADMIN_ENDPOINTS)
def test_missing_or_wrong_token_is_401(service, method, url):
    for headers in ({}, bearer("nope"), {"Authorization": "Basic " + READ}, {"Authorization": "Bearer "}):
        reply = getattr(service.client, method)(url, headers=headers)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("method,url", READ_ENDPOINTS)
def test_read_endpoints_take_either_token(service, method, url):
    for token in (READ, ADMIN):
        assert getattr(service.client, method)(url, headers=bearer(token)).status_code == 200


@pytest.mark.parametrize("method,url", ADMIN_ENDPOINTS)
def test_admin_endpoints_refuse_the_read_token(service, method, url):
    assert getattr(service.client, method)(url, headers=bearer(READ)).status_code == 403
    assert getattr(service.client, method)(url, headers=bearer(ADMIN)).status_code in (200, 202)


def test_healthz_needs_no_token(service):
    assert service.client.get("/healthz").json() == {"ok": True}


def test_chunks_come_back_with_pages_repaired(service):
    reply = service.client.get("/documents/doc-2/chunks", headers=bearer(READ))
    body = reply.json()
    want = expected_pages(service.rows)
    assert [c["chunk_index"] for c in body["chunks"]] == [0, 1, 2]
    assert {c["chunk_id"]: c["page"] for c in body["chunks"]} == {
        k: v for k, v in want.items() if k.startswith("doc-2")
    }
    assert body["pages_corrected"] == 2


def test_reads_are_noted_in_the_ledger_in_the_background(service):
    for _ in range(5):
        service.client.get("/documents/doc-1/chunks", headers=bearer(READ))
    deadline = time.monotonic() + 10
    while not service.ledger.enqueued() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert service.ledger.enqueued() == ["doc-1"]
    assert [e.document_id for e in service.ledger.events(kinds=["enqueued"])] == ["doc-1"]


@pytest.mark.parametrize("doc_id", ["a b", 'x"y', "é", "-lead", "a" * 300])
def test_bad_document_ids_are_refused_before_milvus(service, doc_id):
    reply = service.client.get(f"/documents/{doc_id}/chunks", headers=bearer(READ))
    assert reply.status_code in (404, 422)  # 404 only where the router itself cannot match the path
    assert service.client.post(f"/migration/documents/{doc_id}", headers=bearer(ADMIN)).status_code in (404, 405, 422)


def test_unknown_document_404_and_milvus_down_503(service):
    assert service.client.get("/documents/nope/chunks", headers=bearer(READ)).status_code == 404
    service.vectors.down = True
    reply = service.client.get("/documents/doc-1/chunks", headers=bearer(READ))
    assert reply.status_code == 503 and "does not answer" in reply.json()["detail"]


def test_admin_enqueue_and_pause(service):
    reply = service.client.post("/migration/documents/doc-9", headers=bearer(ADMIN))
    assert reply.status_code == 202 and reply.json() == {"document_id": "doc-9", "outcome": "enqueued"}
    assert service.client.post("/migration/pause", headers=bearer(ADMIN)).json() == {"paused": True}
    assert is_paused(service.ledger)
    status = service.client.get("/migration/status", headers=bearer(READ)).json()
    assert status["service"]["paused"] is True and "by_state" in status and status["service"]["worker"] is None
    service.client.post("/migration/resume", headers=bearer(ADMIN))
    assert not is_paused(service.ledger)


def test_metrics_have_counters_and_no_document_ids(service):
    service.client.get("/documents/doc-1/chunks", headers=bearer(READ))
    service.client.get("/documents/nope/chunks", headers=bearer(READ))
    text = service.client.get("/metrics", headers=bearer(READ)).text
    for name in (
        'repage_reads_total{outcome="ok"} 1.0',
        'repage_reads_total{outcome="not_found"} 1.0',
        "repage_lazy_corrected_chunks_total 2.0",
        "repage_read_milvus_seconds_bucket",
        "repage_ledger_up 1.0",
        'repage_worker_paused{reason=""} 0.0',
        # the migration's figures (docs/design.md §12): on an empty ledger, nothing done and no batch yet
        "repage_migration_eta_seconds 0.0",
        'repage_migration_requests_per_second{window="recent"} 0.0',
        "repage_lazy_queue_documents ",  # doc-1 is queued when the lazy buffer flushes: 0 or 1 by now
        "repage_migration_last_batch_timestamp_seconds NaN",
    ):
        assert name in text
    assert "doc-1" not in text and "nope" not in text


def test_tokens_never_reach_the_logs(service, caplog):
    caplog.set_level(logging.DEBUG)
    for token in (READ, ADMIN, "wrong-token-xyz"):
        for method, url in READ_ENDPOINTS + ADMIN_ENDPOINTS:
            getattr(service.client, method)(url, headers=bearer(token))
    assert caplog.records  # something was logged, and none of it carries a token
    assert not any(t in caplog.text for t in (READ, ADMIN, "wrong-token-xyz"))


def test_a_ledger_that_is_down_does_not_fail_reads(tmp_path):
    s = settings(tmp_path, read_token=READ, admin_token=ADMIN)
    app = create_app(
        s, stores=SimpleNamespace(vectors=StandInVectors(fltr_rows(DOCS)), ledger=DownLedger()), flush_seconds=0.01
    )
    with TestClient(app) as client:
        for _ in range(3):
            reply = client.get("/documents/doc-1/chunks", headers=bearer(READ))
            assert reply.status_code == 200 and reply.json()["pages_corrected"] == 2
        assert client.get("/migration/status", headers=bearer(READ)).status_code == 503
        assert client.post("/migration/pause", headers=bearer(ADMIN)).status_code == 503
        assert "repage_ledger_up 0.0" in client.get("/metrics", headers=bearer(READ)).text
        deadline = time.monotonic() + 10
        while app.state.repage.lazy.stats.flush_errors == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.repage.lazy.stats.flush_errors >= 1 and app.state.repage.lazy.buffered() == 1


def test_exposure_rules(tmp_path):
    none, both = settings(tmp_path), settings(tmp_path, read_token=READ, admin_token=ADMIN)
    check_exposure(both, "0.0.0.0", insecure_local=False)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(none, host, insecure_local=True)
    with pytest.raises(ConfigError, match="REPAGE_READ_TOKEN"):
        check_exposure(none, "127.0.0.1", insecure_local=False)
    with pytest.raises(ConfigError, match="loopback"):
        check_exposure(none, "0.0.0.0", insecure_local=True)
    with pytest.raises(ConfigError):
        check_exposure(settings(tmp_path, admin_token=ADMIN), "10.0.0.1", insecure_local=False)
    with pytest.raises(ConfigError):
        create_app(none, stores=SimpleNamespace(vectors=None, ledger=None))


def test_insecure_local_serves_without_tokens(tmp_path):
    s = settings(tmp_path)
    ledger = Ledger(s.ledger_url)
    app = create_app(
        s, stores=SimpleNamespace(vectors=StandInVectors(fltr_rows(DOCS)), ledger=ledger), insecure_local=True
    )
    with TestClient(app, base_url="http://localhost:8080") as client:
        assert client.get("/documents/doc-1/chunks").status_code == 200
        assert client.post("/migration/pause").status_code == 200
    ledger.close()


def test_router_mounts_in_an_existing_app(tmp_path):
    s = settings(tmp_path, read_token=READ, admin_token=ADMIN)
    ledger = Ledger(s.ledger_url)
    parts = make_parts(s, StandInVectors(fltr_rows(DOCS)), ledger)
    existing = FastAPI()
    existing.include_router(create_router(parts), prefix="/repage")
    with TestClient(existing) as client:
        assert client.get("/repage/documents/doc-1/chunks", headers=bearer(READ)).json()["pages_corrected"] == 2
    parts.lazy.close()
    ledger.close()


def test_the_existing_app_example_repairs_pages(milvus_lite_uri, tmp_path):
    """examples/existing_app.py against a Lite store: its own endpoint returns repaired pages."""
    import importlib.util
    from pathlib import Path

    from tests.fixtures.milvus import unique_name
    from tests.support.service_store import create_store

    spec = importlib.util.spec_from_file_location(
        "existing_app", Path(__file__).parents[2] / "examples" / "existing_app.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    collection, rows = unique_name("example"), fltr_rows(DOCS)
    create_store(milvus_lite_uri, collection, rows)
    s = settings_for(
        milvus_lite_uri, collection, "memory://", f"sqlite:///{tmp_path}/ledger.db", read_token=READ, admin_token=ADMIN
    )
    with TestClient(module.create_existing_app(s)) as client:
        chunks = client.get("/documents/doc-1/chunks").json()["chunks"]
        assert {c["chunk_id"]: c["page"] for c in chunks} == {
            k: v for k, v in expected_pages(rows).items() if k.startswith("doc-1")
        }
        assert client.get("/repage/migration/status", headers=bearer(READ)).status_code == 200
    with Ledger(s.ledger_url) as ledger:
        assert ledger.enqueued() == ["doc-1"]  # flushed on shutdown

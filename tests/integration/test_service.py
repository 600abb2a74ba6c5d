"""`repage serve --with-worker` as a real uvicorn server over HTTP on 127.0.0.1, with the
store in `milvus-lite server` (service and test share it; docs/design.md §9.1): read-repair at once,
the worker fixing the store, 100 concurrent reads, tokens and logs, pause/resume."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from repage.domain.states import State
from repage.stores.ledger import Ledger
from repage.stores.milvus import MilvusVectors
from tests.fixtures.milvus import _free_port, unique_name
from tests.support import wait_for
from tests.support.service_store import create_store, env_for, expected_pages, fltr_rows, server_answers, write_images

pytestmark = pytest.mark.slow

READ, ADMIN = "read-8c1d5e0f9b-3a6e2c7d1f0b4e9a8c5d", "admin-2a7f4e61c3-d9b0e5a1c8f2e7b3a6d4"
DOCS = ["a0", "hot", "p0", "x1", "x2"]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def server(milvus_server_uri, tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    collection = unique_name("svc")
    rows = fltr_rows(DOCS, images=4)
    create_store(milvus_server_uri, collection, rows)
    (root / "bucket").mkdir()
    write_images(root / "bucket", rows)
    ledger_url = f"sqlite:///{root}/ledger.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPAGE_")}
    env.update(
        env_for(milvus_server_uri, collection, f"file://{root / 'bucket'}", ledger_url),
        REPAGE_READ_TOKEN=READ,
        REPAGE_ADMIN_TOKEN=ADMIN,
        PYTHONUNBUFFERED="1",
    )
    port = _free_port()
    log_path = root / "server.log"
    with log_path.open("w") as log:
        # --daily-quota 0: no trickle, so whatever gets migrated was asked for by a read or an admin
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "repage.cli",
                "serve",
                "--port",
                str(port),
                "--with-worker",
                "--daily-quota",
                "0",
                "--poll",
                "0.1",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server_answers(base, proc, log_path), "the server to answer")
        vectors = MilvusVectors(milvus_server_uri, collection)
        yield {
            "base": base,
            "rows": rows,
            "ledger_url": ledger_url,
            "vectors": vectors,
            "log": log_path,
            "proc": proc,
            "env": env,
        }
        vectors.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def stored_pages(server, doc: str) -> dict[str, int]:
    rows = server["vectors"].fetch_documents([doc], fields=["chunk_id", "page"], with_vectors=False)
    return {r["chunk_id"]: r["page"] for r in rows}


def want(server, doc: str) -> dict[str, int]:
    return {c: p for c, p in expected_pages(server["rows"]).items() if c.startswith(f"{doc}_")}


def state_of(server, doc: str) -> State | None:
    with Ledger(server["ledger_url"]) as ledger:
        record = ledger.get(doc)
    return record.state if record else None


def test_a_never_migrated_document_reads_right_at_once_and_is_fixed_by_the_worker(server):
    assert set(stored_pages(server, "a0").values()) == {0}  # broken in Milvus
    reply = httpx.get(f"{server['base']}/documents/a0/chunks", headers=bearer(READ), timeout=30)
    assert reply.status_code == 200
    assert {c["chunk_id"]: c["page"] for c in reply.json()["chunks"]} == want(server, "a0")
    wait_for(lambda: stored_pages(server, "a0") == want(server, "a0"), "the worker to fix a0 in Milvus")
    # the ledger says migrated only after the read-back (docs/design.md §5.4): a moment after the write
    wait_for(lambda: state_of(server, "a0") == State.MIGRATED, "the ledger to record a0 migrated")


def hot_score(server) -> float:
    with Ledger(server["ledger_url"]) as ledger:
        return next(a.score for a in ledger.top_accesses(100) if a.document_id == "hot")


def test_100_concurrent_reads_enqueue_once_and_migrate_once(server):
    with (
        httpx.Client(
            base_url=server["base"], headers=bearer(READ), timeout=60, limits=httpx.Limits(max_connections=100)
        ) as client,
        ThreadPoolExecutor(100) as pool,
    ):
        replies = list(pool.map(lambda _: client.get("/documents/hot/chunks"), range(100)))
    assert [r.status_code for r in replies] == [200] * 100
    assert all({c["chunk_id"]: c["page"] for c in r.json()["chunks"]} == want(server, "hot") for r in replies)
    wait_for(lambda: state_of(server, "hot") == State.MIGRATED, "hot to be migrated")
    with Ledger(server["ledger_url"]) as ledger:
        record = ledger.get("hot")
        enqueued = [e for e in ledger.events(kinds=["enqueued"]) if e.document_id == "hot"]
    assert len(enqueued) == 1
    assert record.fencing_token == 1 and record.attempts == 0  # one claim
    db = sqlite3.connect(server["ledger_url"].removeprefix("sqlite:///"))
    try:
        journal = db.execute(
            "SELECT identity, COUNT(*) FROM chunk_journal WHERE document_id = 'hot' GROUP BY identity"
        ).fetchall()
        tokens = db.execute("SELECT DISTINCT fencing_token FROM chunk_journal WHERE document_id = 'hot'").fetchall()
    finally:
        db.close()
    assert len(journal) == 4 and all(n == 1 for _, n in journal) and tokens == [(1,)]
    # every read counted (decayed by seconds of a 72 h half-life); the service flushes its counts
    # to the ledger on its own period, which may come after the worker's migration
    wait_for(lambda: hot_score(server) >= 99.0, "every read of hot to reach the ledger")
    assert stored_pages(server, "hot") == want(server, "hot")


def test_tokens_and_logs(server):
    base = server["base"]
    assert httpx.get(f"{base}/migration/status").status_code == 401
    assert httpx.get(f"{base}/migration/status", headers=bearer("not-the-token")).status_code == 401
    assert httpx.get(f"{base}/migration/status", headers=bearer(READ)).status_code == 200
    assert httpx.get(f"{base}/metrics", headers=bearer(ADMIN)).status_code == 200
    assert httpx.post(f"{base}/migration/documents/x1").status_code == 401
    assert httpx.post(f"{base}/migration/documents/x1", headers=bearer("not-the-token")).status_code == 401
    assert httpx.post(f"{base}/migration/documents/x1", headers=bearer(READ)).status_code == 403
    assert httpx.post(f"{base}/migration/documents/x1", headers=bearer(ADMIN)).status_code == 202
    log = wait_for(
        lambda: (text := server["log"].read_text()) and '"POST /migration/documents/x1 HTTP/1.1" 202' in text and text,
        "the access log line",
    )
    assert '"GET /migration/status HTTP/1.1" 401' in log  # the access log is on ...
    for secret in (READ, ADMIN, "not-the-token"):
        assert secret not in log  # ... and carries no token


def test_pause_stops_the_worker_and_resume_starts_it(server):
    base, admin = server["base"], bearer(ADMIN)

    def worker_state() -> dict:
        return httpx.get(f"{base}/migration/status", headers=admin, timeout=10).json()["service"]["worker"]

    assert httpx.post(f"{base}/migration/pause", headers=admin).json() == {"paused": True}
    try:
        wait_for(lambda: (worker_state()["last_cycle"] or {}).get("paused"), "the worker to see the pause")
        assert httpx.post(f"{base}/migration/documents/p0", headers=admin).json()["outcome"] == "enqueued"
        cycles = worker_state()["cycles"]
        wait_for(lambda: worker_state()["cycles"] >= cycles + 3, "three paused cycles")
        assert state_of(server, "p0") is None  # not even scanned while paused
        assert set(stored_pages(server, "p0").values()) == {0}
    finally:
        assert httpx.post(f"{base}/migration/resume", headers=admin).json() == {"paused": False}
    wait_for(lambda: state_of(server, "p0") == State.MIGRATED, "p0 to be migrated after resume")
    assert stored_pages(server, "p0") == want(server, "p0")


def test_metrics_over_http_carry_no_document_ids(server):
    # its own read and migration: under xdist this test may be the first of the module on its worker
    base = server["base"]
    assert httpx.get(f"{base}/documents/x2/chunks", headers=bearer(READ), timeout=30).status_code == 200
    wait_for(lambda: state_of(server, "x2") == State.MIGRATED, "x2 to be migrated by the worker")
    text = httpx.get(f"{base}/metrics", headers=bearer(READ)).text
    assert "repage_read_milvus_seconds_count" in text and 'repage_migration_documents{state="migrated"}' in text
    assert not any(doc in text for doc in DOCS)


@pytest.mark.parametrize("args,env_tokens", [([], False), (["--insecure-local", "--host", "0.0.0.0"], False)])
def test_refuses_to_start_exposed_without_tokens(server, args, env_tokens):
    env = {k: v for k, v in server["env"].items() if k not in ("REPAGE_READ_TOKEN", "REPAGE_ADMIN_TOKEN")}
    proc = subprocess.run(
        [sys.executable, "-m", "repage.cli", "serve", "--port", str(_free_port()), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "token" in lines[0].lower()

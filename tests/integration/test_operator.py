"""The unattended operator's knobs through the real CLI (docs/design.md §9.5): `serve --with-worker`
passes every run option to its worker, worker options without --with-worker are refused, `pause`
and `resume` with the reason in `status`, and [worker] in repage.toml."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from repage.domain.states import State
from repage.stores.ledger import Ledger
from repage.stores.milvus import MilvusVectors
from tests.fixtures.milvus import _free_port, unique_name
from tests.support import wait_for
from tests.support.service_store import create_store, env_for, expected_pages, fltr_rows, server_answers, write_images

pytestmark = pytest.mark.slow
DOCS = ["n0", "n1", "n2"]


@pytest.fixture
def store(milvus_server_uri, tmp_path):
    collection = unique_name("oper")
    rows = fltr_rows(DOCS, images=2)
    create_store(milvus_server_uri, collection, rows)
    (tmp_path / "bucket").mkdir()
    write_images(tmp_path / "bucket", rows)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPAGE_")}
    ledger_url = f"sqlite:///{tmp_path}/ledger.db"
    env.update(
        env_for(milvus_server_uri, collection, f"file://{tmp_path / 'bucket'}", ledger_url), PYTHONUNBUFFERED="1"
    )
    return {"root": tmp_path, "env": env, "rows": rows, "uri": milvus_server_uri, "collection": collection}


def repage(store, *args: str, check: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "repage.cli", *args], env=store["env"], cwd=store["root"], capture_output=True, text=True
    )
    assert proc.returncode == check, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    return proc


def bucket_files(store) -> set[str]:
    bucket = store["root"] / "bucket"
    return {str(p.relative_to(bucket)) for p in bucket.rglob("*") if p.is_file()}


def test_serve_with_worker_and_no_move_images_fixes_pages_and_moves_no_image(store):
    before = bucket_files(store)
    port = _free_port()
    log = store["root"] / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "repage.cli", "serve", "--insecure-local", "--port", str(port)]
            + ["--with-worker", "--no-move-images", "--poll", "0.1"],
            env=store["env"],
            cwd=store["root"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    ledger_url = store["env"]["REPAGE_LEDGER_URL"]

    def all_migrated() -> bool:
        with Ledger(ledger_url) as ledger:
            return {r.state for r in ledger.documents()} == {State.MIGRATED}

    try:
        wait_for(lambda: server_answers(f"http://127.0.0.1:{port}", proc, log), "the server to answer")
        wait_for(all_migrated, "the worker to migrate every document", timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    vectors = MilvusVectors(store["uri"], store["collection"])
    try:
        rows = vectors.fetch_documents(DOCS, with_vectors=False)
    finally:
        vectors.close()
    assert {r["chunk_id"]: r["page"] for r in rows} == expected_pages(store["rows"])
    keys = {r["chunk_id"]: r["image_r2_key"] for r in store["rows"]}
    assert {r["chunk_id"]: r["image_r2_key"] for r in rows} == keys  # every key as it was
    assert bucket_files(store) == before  # no image copied


@pytest.mark.parametrize(
    "flag", [["--no-move-images"], ["--daily-quota", "5"], ["--max-failures", "3"], ["--audit-every", "1h"]]
)
def test_worker_options_without_with_worker_are_a_usage_error(store, flag):
    proc = repage(store, "serve", "--insecure-local", *flag, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag[0] in lines[0] and "--with-worker" in lines[0], proc.stderr


def test_pause_and_resume_with_the_reason_in_status(store):
    repage(store, "scan", "--json")
    paused = json.loads(repage(store, "pause", "--reason", "bucket maintenance", "--json").stdout)
    assert paused == {"paused": True, "paused_because": "bucket maintenance"}
    status = json.loads(repage(store, "status", "--json").stdout)
    assert status["paused_because"] == "bucket maintenance"
    worker = json.loads(repage(store, "worker", "--once", "--json").stdout)
    assert worker["last_cycle"]["paused"] and worker["totals"]["migrated"] == 0
    assert json.loads(repage(store, "resume", "--json").stdout) == {"paused": False, "paused_because": None}
    assert json.loads(repage(store, "status", "--json").stdout)["paused_because"] is None


def test_worker_settings_in_repage_toml(store):
    (store["root"] / "repage.toml").write_text("[repage.worker]\ndaily_quota = 1\n")
    repage(store, "scan", "--json")
    first = json.loads(repage(store, "worker", "--once", "--json").stdout)
    assert first["totals"]["trickle"] == 1, first  # the toml's quota, not unlimited
    flag = json.loads(repage(store, "worker", "--once", "--daily-quota", "3", "--json").stdout)
    assert flag["totals"]["trickle"] == 2, flag  # the flag overrides it: 3 for the day, 1 used


def test_estimate_sample_times_that_many_documents(store):
    repage(store, "scan", "--json")
    for n in (1, 2):
        report = json.loads(repage(store, "estimate", "--sample", str(n), "--json").stdout)
        assert report["latencies"]["sample_size"] == n, report["latencies"]


def test_a_run_heeds_the_pause(store):
    repage(store, "scan", "--json")
    repage(store, "pause", "--reason", "bucket maintenance", "--json")
    held = json.loads(repage(store, "run", "--json").stdout)
    assert held["documents"] == 0 and held["stopped_because"] == "paused: bucket maintenance", held
    repage(store, "resume", "--json")
    assert json.loads(repage(store, "run", "--json").stdout)["migrated"] == len(DOCS)

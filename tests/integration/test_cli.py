"""The CLI contract (docs/design.md §6.3, §6.4): exit codes, one-line errors, --help examples, read-only doctor."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repage.stores.milvus import MilvusVectors
from tests.fixtures.s3 import unique_bucket_name

COMMANDS = [
    "doctor",
    "scan",
    "estimate",
    "demo",
    "run",
    "status",
    "verify",
    "rollback",
    "gc",
    "review",
    "review accept",
    "review reject",
]
APP_ENV = ("MILVUS_URI", "MILVUS_TOKEN", "R2_ACCOUNT_ID", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "R2_BUCKET_NAME")


def repage(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REPAGE_") and k not in APP_ENV}
    return subprocess.run(
        [sys.executable, "-m", "repage.cli", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        timeout=120,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def lite_store(tmp_path_factory) -> dict:
    """A small FLTR collection in a Lite file, a bucket folder and a ledger path."""
    root = tmp_path_factory.mktemp("cli")
    uri = str(root / "milvus.db")
    in_own_process(_build_small_store, uri)
    (root / "bucket").mkdir()
    return {
        "REPAGE_MILVUS_URI": uri,
        "REPAGE_STORE_URL": f"file://{root / 'bucket'}",
        "REPAGE_LEDGER_URL": f"sqlite:///{root / 'ledger.db'}",
        "root": str(root),
    }


def in_own_process(target, *args) -> None:
    """Milvus Lite holds its folder until the process exits: write it from a child."""
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=target, args=args)
    child.start()
    child.join(120)
    assert child.exitcode == 0


def _build_small_store(uri: str) -> None:
    vectors = MilvusVectors.create_collection(uri, "fltr_documents", pk="chunk_id", dim=8)
    vectors.insert(
        [
            {
                "chunk_id": f"d1_{i}",
                "vector": [0.1 * (i + 1)] * 8,
                "text": "t",
                "dataset_id": "ds",
                "document_id": "d1",
                "filename": "a.pdf",
                "chunk_index": i,
                "document_type": "pdf",
                "title": "a",
                "chunk_type": "image",
                "page": 0,
                "image_index": i,
                "ocr_confidence": 0.0,
                "image_r2_key": f"ds/d1/images/{i}_a.pdf-{i + 3}-0.png",
                "image_size": "10x10",
            }
            for i in range(3)
        ]
    )
    vectors.close()


def env_of(store: dict, **overrides: str) -> dict:
    return {k: v for k, v in {**store, **overrides}.items() if k.startswith("REPAGE_")}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    proc = repage(*command.split(), "--help")
    assert proc.returncode == 0
    assert "Example: repage" in proc.stdout


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"REPAGE_MILVUS_URI": "ftp://nowhere"}, "REPAGE_MILVUS_URI"),
        ({"REPAGE_STORE_URL": "gs://bucket"}, "REPAGE_STORE_URL"),
        ({"REPAGE_LEDGER_URL": "mysql://x"}, "REPAGE_LEDGER_URL"),
        ({"REPAGE_MILVUS_URI": "http://127.0.0.1:1"}, "127.0.0.1:1"),
        ({"REPAGE_COLLECTION": "no_such_collection"}, "no_such_collection"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(lite_store, overrides, needle):
    proc = repage("scan", env=env_of(lite_store, **overrides))
    assert proc.returncode == 2, proc.stderr
    assert needle in one_line_error(proc)


def test_missing_required_field_exits_2(tmp_path):
    uri = str(tmp_path / "milvus.db")
    in_own_process(_build_pageless_store, uri)
    (tmp_path / "bucket").mkdir()
    proc = repage(
        "scan",
        env={
            "REPAGE_MILVUS_URI": uri,
            "REPAGE_STORE_URL": f"file://{tmp_path / 'bucket'}",
            "REPAGE_LEDGER_URL": f"sqlite:///{tmp_path / 'l.db'}",
        },
    )
    assert proc.returncode == 2
    assert "'page'" in one_line_error(proc)


def _build_pageless_store(uri: str) -> None:
    """A collection without the `page` field, made with pymilvus directly (a test may)."""
    from pymilvus import DataType, MilvusClient

    from repage.stores.milvus import connect

    client = connect(uri, None, 10)
    schema = MilvusClient.create_schema(auto_id=True)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=4)
    schema.add_field("document_id", DataType.VARCHAR, max_length=64)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="COSINE")
    client.create_collection("fltr_documents", schema=schema, index_params=index)
    client.close()


def test_missing_bucket_exits_2(lite_store, moto_endpoint):
    proc = repage(
        "scan",
        env=env_of(lite_store, REPAGE_STORE_URL=f"s3://{unique_bucket_name()}", REPAGE_S3_ENDPOINT=moto_endpoint)
        | {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "bucket" in one_line_error(proc).lower()


def test_bad_flag_values_exit_2(lite_store):
    assert repage("run", "--path", "sideways", env=env_of(lite_store)).returncode == 2
    assert repage("rollback", env=env_of(lite_store)).returncode == 2
    assert repage("gc", "--grace", "soon", env=env_of(lite_store)).returncode == 2


def test_doctor_reports_and_writes_nothing(tmp_path, lite_store):
    env = env_of(lite_store, REPAGE_MILVUS_TOKEN="tok-SECRET", REPAGE_LEDGER_URL=f"sqlite:///{tmp_path}/l.db")
    before = sorted(p.name for p in Path(lite_store["root"]).iterdir())
    proc = repage("doctor", "--json", env=env)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert report["stores"]["milvus"]["schema"]["pk_field"] == "chunk_id"
    assert report["stores"]["milvus"]["partial_update"] is True
    assert report["stores"]["ledger"]["exists"] is False
    assert "SECRET" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in Path(lite_store["root"]).iterdir()) == before
    assert not (tmp_path / "l.db").exists()  # no ledger file made

    empty = repage("doctor", "--json", cwd=tmp_path)  # defaults: ./repage-data does not exist
    assert empty.returncode == 2
    assert not (tmp_path / "repage-data").exists()


def test_demo_never_reads_app_variables(tmp_path):
    proc = repage("demo", "--help", env={"MILVUS_URI": "http://production:19530"})
    assert proc.returncode == 0
    from repage.config import demo_settings

    assert demo_settings(tmp_path).milvus_uri.startswith(str(tmp_path))


def test_scan_then_run_json_and_exit_0(lite_store, tmp_path):
    bucket = Path(lite_store["REPAGE_STORE_URL"].removeprefix("file://"))
    for i in range(3):
        key = bucket / "ds" / "d1" / "images" / f"{i}_a.pdf-{i + 3}-0.png"
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(b"png%d" % i)
    scan = repage("scan", "--json", env=env_of(lite_store))
    assert scan.returncode == 0, scan.stderr
    assert json.loads(scan.stdout)["totals"] == {"keys": 1}
    run = repage("run", "--json", env=env_of(lite_store))
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["migrated"] == 1 and summary["chunks_written"] == 3
    status = json.loads(repage("status", "--json", env=env_of(lite_store)).stdout)
    assert status["by_state"] == {"migrated": 1}

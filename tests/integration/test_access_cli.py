"""`repage access import|top` and `run --order priority --min-accesses` through the CLI."""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.test_cli import in_own_process, one_line_error, repage
from tests.support.service_store import create_store, env_for, fltr_rows, write_images

pytestmark = pytest.mark.slow


def _build(uri: str, rows: list[dict]) -> None:
    create_store(uri, "fltr_documents", rows)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("access")
    rows = fltr_rows(["u0", "u1", "u2"], dataset="ds-a") + fltr_rows(["u3", "u4", "u5"], dataset="ds-b")
    in_own_process(_build, str(root / "milvus.db"), rows)
    (root / "bucket").mkdir()
    write_images(root / "bucket", rows)
    env = env_for(str(root / "milvus.db"), "fltr_documents", f"file://{root / 'bucket'}", f"sqlite:///{root}/ledger.db")
    assert repage("scan", "--json", env=env).returncode == 0
    return {"env": env, "root": root}


@pytest.mark.parametrize("command", [["serve"], ["worker"], ["access"], ["access", "import"], ["access", "top"]])
def test_new_commands_have_help_with_an_example(command):
    proc = repage(*command, "--help")
    assert proc.returncode == 0 and "Example: repage" in proc.stdout


def test_import_top_and_a_priority_run_with_min_accesses(store):
    now = int(time.time())
    log = store["root"] / "queries.csv"
    log.write_text(
        "document_id,dataset_id,timestamp,count\n"
        f"u4,,{now},3\n"
        f"u1,,{now - 60},\n"
        f",ds-a,{now - 120},\n"  # a dataset hit: one for each of u0, u1, u2
        f",ds-none,{now},\n"
    )  # no scanned document in it: reported
    imported = repage("access", "import", str(log), "--json", env=store["env"])
    assert imported.returncode == 0, imported.stderr
    report = json.loads(imported.stdout)
    assert report["rows"] == 4 and report["documents_updated"] == 4 and report["unmatched_datasets"] == ["ds-none"]

    top = json.loads(repage("access", "top", "--json", env=store["env"]).stdout)["documents"]
    assert [d["document_id"] for d in top] == ["u4", "u1", "u0", "u2"]
    assert [round(d["accesses"]) for d in top] == [3, 2, 1, 1]

    # u1 has 2 hits decayed by a minute or two (1.9996...), u0 and u2 one each
    run = repage("run", "--order", "priority", "--min-accesses", "1.5", "--no-move-images", "--json", env=store["env"])
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["migrated"] == 2
    status = json.loads(repage("status", "--json", env=store["env"]).stdout)
    assert status["by_state"] == {"migrated": 2, "pending": 4}


def test_a_bad_row_fails_the_whole_import_with_one_line(store):
    log = store["root"] / "bad.jsonl"
    log.write_text('{"document_id": "u5", "timestamp": 1700000000}\n{"document_id": "u5", "timestamp": "soon"}\n')
    proc = repage("access", "import", str(log), env=store["env"])
    assert proc.returncode == 2
    assert one_line_error(proc).startswith(f"repage: error: {log}:2: timestamp 'soon'")
    top = json.loads(repage("access", "top", "--json", env=store["env"]).stdout)["documents"]
    assert "u5" not in [d["document_id"] for d in top]  # all or nothing

"""Fixes survive a SIGTERM of the `milvus-lite server` that several `repage run` processes share.

Each trial: a fresh `milvus-lite server` on a temp folder holds a tiny sealed broken store (the
crash tests' synthetic one); three `repage run --batch-size 1` processes migrate it at once (one
ledger: SQLite and PostgreSQL in turn); every fix is read through the server; the server is
stopped with SIGTERM (it exits without flushing: docs/milvus-lite-durability.md); the folder is
opened in process and every fix must still be there.

Without repage's turns and flush on Lite (docs/design.md §7) this loses every fix written after
the first two writes that reached the server at the same moment: about one trial in six on two
cores. The figures (trials, documents lost) are printed and recorded before anything is asserted.

Twenty trials are 60 runner processes and 20 servers: started as interpreters they would spend
minutes importing. So both are forked from a forkserver that imported repage and milvus_lite once;
each child runs the same entry point as its command (`repage.cli.main` with `run --json
--batch-size 1`, `milvus_lite.cmdline.main` with `server ...`) and opens its own connections.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from repage.migration.scan import scan_store
from repage.stores.milvus import MilvusVectors
from repage.stores.open import open_stores
from tests.fixtures.ledger import pg_schema_url
from tests.fixtures.milvus import _free_port, _wait_until_answers
from tests.support.crash import DIM, Schema, Template, build_synthetic, child_env, scenario_settings, write_config

FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(
    ["repage.cli", "repage.cli.commands", "milvus_lite.cmdline", "milvus_lite.adapter.grpc.server"]
)

pytestmark = pytest.mark.slow

TRIALS = 20
RUNNERS = 3
KEYS_DOCS = 8  # tiny: 10 documents in all, ~50 chunks; each runner writes a handful of batches
TIMEOUT = 60.0
COLLECTION = "fltr_documents"
# REPAGE_TEST_LITE_WITHOUT_TURNS=1: run the runners without repage's turns and flush on Lite, to see
# this test fail as the incident did (the figures are printed before the asserts).
WITHOUT_TURNS = os.environ.get("REPAGE_TEST_LITE_WITHOUT_TURNS") == "1"


@pytest.fixture(scope="module")
def template(milvus_server_uri, tmp_path_factory):
    return Template(
        milvus_server_uri,
        tmp_path_factory.mktemp("lite-durability-template"),
        build_synthetic(keys_docs=KEYS_DOCS),
        Schema(),
    )


def _command(kind: str, argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """A forked child running `repage` or `milvus-lite` with argv, as its console script would."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
    sys.argv = [kind, *argv]
    if kind == "repage":
        from repage.cli import main

        if WITHOUT_TURNS:  # the runners as before the fix: no lock, no flush (shows the test can fail)
            MilvusVectors.is_lite = property(lambda self: False)  # type: ignore[method-assign,assignment]
        main()
    else:
        from milvus_lite.cmdline import main as lite_main

        sys.exit(lite_main(argv))


def start(kind: str, argv: list[str], env: dict, cwd: Path, name: str):
    proc = FORKSERVER.Process(
        target=_command,
        args=(kind, argv, env, str(cwd), str(cwd / f"{name}.out"), str(cwd / f"{name}.err")),
        daemon=True,
    )
    proc.start()
    return proc


class _Polled:
    """What tests.fixtures.milvus._wait_until_answers polls: a Popen-like view of a forked child."""

    def __init__(self, proc):
        self.proc = proc

    def poll(self):
        return self.proc.exitcode

    @property
    def returncode(self):
        return self.proc.exitcode


@contextlib.contextmanager
def lite_server(data_dir: Path, workdir: Path):
    """A `milvus-lite server` on `data_dir`; stopped with SIGTERM (as a service manager does)."""
    port = _free_port()
    proc = start(
        "milvus-lite",
        ["server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)],
        dict(os.environ),
        workdir,
        "server",
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_until_answers(uri, _Polled(proc))
        yield uri
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(TIMEOUT)
        if proc.exitcode is None:
            proc.kill()
            proc.join()


@contextlib.contextmanager
def ledger_for(trial: int, workdir: Path):
    if trial % 2 == 0:
        yield f"sqlite:///{workdir / 'ledger.db'}"
        return
    urls = pg_schema_url("repage_lite")  # a fresh schema, dropped when the generator closes
    try:
        yield next(urls)
    finally:
        urls.close()


def missing_fixes(vectors: MilvusVectors, template: Template) -> set[str]:
    """Documents with at least one chunk not at its expected page and key."""
    expected = template.synthetic.expected
    fields = ["document_id", "chunk_index", "page", "image_r2_key"]
    rows = vectors.fetch_documents(template.synthetic.doc_ids, fields=fields, with_vectors=False)
    got = {(r["document_id"], r["chunk_index"]): (r["page"], r["image_r2_key"]) for r in rows}
    return {doc for (doc, index), want in expected.items() if got.get((doc, index)) != want}


def trial(template: Template, workdir: Path, k: int) -> dict:
    data = workdir / "milvus.db"
    with ledger_for(k, workdir) as ledger_url:
        with lite_server(data, workdir) as uri:
            with MilvusVectors.create_collection(
                uri, COLLECTION, dim=DIM, pk=template.schema.pk, chunk_id_field=template.schema.chunk_id_field
            ) as store:
                store.insert(template.rows)
                store.flush()  # a sealed store, as one in production: only repage's fixes are unflushed
            shutil.copytree(template.bucket, workdir / "bucket")
            settings = scenario_settings(uri, COLLECTION, workdir, 30.0).model_copy(
                update={"ledger_url": ledger_url, "batch_size": 1}
            )
            with open_stores(settings) as stores:
                scan_store(stores)  # once, before the runners (each would scan an empty ledger first)
            config = write_config(workdir, settings)
            argv = ["--config", str(config), "run", "--json", "--batch-size", "1"]
            procs = [start("repage", argv, child_env(settings), workdir, f"runner-{i}") for i in range(RUNNERS)]
            hung = 0
            for proc in procs:
                proc.join(TIMEOUT)
                if proc.exitcode is None:
                    # Seen once in ~50 runs: a runner that printed its summary never finished exiting
                    # (CPython's final garbage collection spinning); counted apart, not a durability fact.
                    proc.kill()
                    proc.join()
                    hung += 1
            outputs = [
                ((workdir / f"runner-{i}.out").read_text(), (workdir / f"runner-{i}.err").read_text())
                for i in range(RUNNERS)
            ]
            with MilvusVectors(uri, COLLECTION) as vectors:
                before = missing_fixes(vectors, template)
        # the server is gone (SIGTERM); what did it keep?
        with MilvusVectors(str(data), COLLECTION) as vectors:
            after = missing_fixes(vectors, template)
    summaries = [json.loads(out) if out.strip().startswith("{") else {} for out, _ in outputs]
    if hung and any(not s for s in summaries):
        raise AssertionError(f"trial {k}: a runner hung before it finished its run: {outputs}")
    return {
        "trial": k,
        "ledger": "sqlite" if k % 2 == 0 else "postgresql",
        "exit_codes": [p.exitcode for p in procs],
        "hung_at_exit": hung,
        "migrated": [s.get("migrated") for s in summaries],
        "errors": [err[-500:] for (_, err), p in zip(outputs, procs) if p.exitcode != 0],
        "missing_before_sigterm": len(before),
        "missing_after_restart": len(after),
    }


def test_fixes_survive_a_sigterm_of_the_shared_lite_server(template, tmp_path, record_property):
    results: list[dict] = []
    try:
        for k in range(TRIALS):
            workdir = tmp_path / f"trial-{k}"
            workdir.mkdir()
            results.append(trial(template, workdir, k))
    finally:  # record first, assert after: the figures are the point of this test, pass or fail
        figures = {
            "trials": len(results),
            "documents_per_trial": len(template.synthetic.doc_ids),
            "trials_losing_fixes": sum(1 for r in results if r["missing_after_restart"]),
            "documents_lost": sum(r["missing_after_restart"] for r in results),
            "runners_hung_at_exit": sum(r["hung_at_exit"] for r in results),
            "runners_failed": sum(1 for r in results for code in r["exit_codes"] if code != 0)
            - sum(r["hung_at_exit"] for r in results),
        }
        print("lite durability:", json.dumps(figures))
        for r in results:
            print("  ", json.dumps(r))
        record_property("lite_durability", json.dumps(figures))
    assert figures["runners_failed"] == 0, [r for r in results if r["errors"]]
    assert all(r["missing_before_sigterm"] == 0 for r in results), results
    assert figures["documents_lost"] == 0, figures

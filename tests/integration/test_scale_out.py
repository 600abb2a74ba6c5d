"""Scale-out (docs/design.md §9.2, §9.3): three `repage run` processes share one migration on one PostgreSQL ledger.

Stores: Milvus Lite through `milvus-lite server`, a file:// bucket, a fresh PostgreSQL schema.
The workers (lease 2 s, batches of 2 documents):
- A SIGKILLs itself mid-batch (REPAGE_FAILPOINT=after-copy: journal written, images copied,
  nothing written to Milvus);
- B SIGSTOPs itself right after journalling its first batch (REPAGE_FAILPOINT=stop:after-journal),
  the lease heartbeat thread stopped with it; it is SIGCONTinued only after its leases expired
  on the database clock and C took its documents over (their fencing tokens moved on);
- C is a healthy worker that starts once A is dead and B stalled, and finishes everyone's work
  (A's and B's documents from their journals).
Then: per document, every journal row carries one fencing token (one writer planned and the
others finished that plan; nobody re-planned it); B's late writes were refused (its summary
counts those documents as pending, and not one journal row with B's stale tokens was added
after its leases expired); `repage verify` passes; the store equals the expected one.

Milvus has no conditional write, so the fencing token cannot guard the Milvus write itself.
The protocol makes a stale write harmless instead: a worker renews its lease (refused once
stale) right before the write, and a document taken over is finished from the first writer's
journal, never re-planned, so a stalled worker that slipped past the renewal writes exactly
the values the new owner writes. (B here resumes before that point; its copy of images to
canonical keys writes the same bytes, checked by content hash.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from repage.domain.states import State
from repage.migration.scan import scan_store
from repage.stores.open import open_ledger, open_stores
from tests.fixtures.ledger import pg_schema_url
from tests.support.crash import (
    Schema,
    Template,
    build_synthetic,
    child_env,
    diff_objects,
    diff_rows,
    drop_collection,
    object_hashes,
    snapshot,
    wait_for_expired_leases,
)

pytestmark = pytest.mark.slow

LEASE_SECONDS = 2.0
BATCH_SIZE = 2
KEYS_DOCS = 16
TIMEOUT = 90.0


@pytest.fixture
def pg_url():
    yield from pg_schema_url("repage_scale")


def _worker(settings, workdir: Path, failpoint: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "repage.cli", "--config", str(workdir / "repage.toml"), "run", "--json"],
        env=child_env(settings, failpoint),
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stopped(proc: subprocess.Popen) -> bool:
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def _poll(what: str, check, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_three_workers_kill_and_stall(milvus_server_uri, pg_url, tmp_path):
    synthetic = build_synthetic(keys_docs=KEYS_DOCS)
    template = Template(milvus_server_uri, tmp_path / "template", synthetic, Schema())
    workdir = tmp_path / "run"
    workdir.mkdir()
    settings = template.clone(workdir, lease_seconds=LEASE_SECONDS).model_copy(update={"ledger_url": pg_url})
    (workdir / "repage.toml").write_text(
        f"[repage]\nlease_seconds = {LEASE_SECONDS}\nbatch_size = {BATCH_SIZE}\nconcurrency = 2\n", encoding="utf-8"
    )
    db = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    procs: list[subprocess.Popen] = []
    try:
        with open_stores(settings) as stores:
            scan_store(stores)  # once, before the workers (each `run` would scan an empty ledger first)

        a = _worker(settings, workdir, "after-copy")
        b = _worker(settings, workdir, "stop:after-journal")
        procs += [a, b]
        _poll("A to die at its failpoint", lambda: a.poll() is not None)
        assert a.returncode == -signal.SIGKILL, a.stderr.read()[-2000:]
        _poll("B to stop itself after journalling", lambda: b.poll() is None and _stopped(b))

        with db.connect() as conn:
            held = dict(
                conn.execute(
                    sa.text(
                        "SELECT document_id, fencing_token FROM documents"
                        " WHERE state = 'running' AND lease_owner LIKE :o"
                    ),
                    {"o": f"%:{b.pid}:%"},
                ).all()
            )
            a_held = conn.execute(
                sa.text("SELECT count(*) FROM documents WHERE state = 'running' AND lease_owner LIKE :o"),
                {"o": f"%:{a.pid}:%"},
            ).scalar()
        assert held and a_held, (held, a_held)  # both died holding leases mid-batch

        def stale_rows() -> int:
            with db.connect() as conn:
                return sum(
                    conn.execute(
                        sa.text(f"SELECT count(*) FROM {table} WHERE document_id = :d AND fencing_token = :t"),
                        {"d": d, "t": t},
                    ).scalar()
                    for d, t in held.items()
                    for table in ("chunk_journal", "object_journal")
                )

        journalled = stale_rows()
        assert journalled > 0  # B journalled its batch before it stalled
        with open_ledger(settings) as ledger:
            wait_for_expired_leases(ledger)  # B's and A's leases ran out on the database clock

        c = _worker(settings, workdir)
        procs.append(c)
        with open_ledger(settings) as ledger:
            _poll("C to take B's documents over", lambda: all(ledger.get(d).fencing_token > t for d, t in held.items()))
        os.kill(b.pid, signal.SIGCONT)

        out_b, err_b = b.communicate(timeout=TIMEOUT)
        out_c, err_c = c.communicate(timeout=TIMEOUT)
        assert b.returncode == 0, err_b[-3000:]
        assert c.returncode == 0, err_c[-3000:]
        summary_b, summary_c = json.loads(out_b), json.loads(out_c)
        # B's late writes were refused: its stalled documents counted as pending (taken over), none by B
        assert summary_b["other"].get("pending", 0) >= len(held), summary_b
        assert summary_b["failed"] == 0 and summary_c["failed"] == 0, (summary_b, summary_c)
        assert stale_rows() == journalled, "B wrote journal rows with a stale fencing token"

        with db.connect() as conn:
            tokens = conn.execute(
                sa.text(
                    "SELECT document_id, count(DISTINCT fencing_token) FROM "
                    "(SELECT document_id, fencing_token FROM chunk_journal UNION ALL "
                    " SELECT document_id, fencing_token FROM object_journal) j GROUP BY document_id"
                )
            ).all()
            per_identity = conn.execute(
                sa.text("SELECT identity, count(*), bool_and(applied) FROM chunk_journal GROUP BY identity")
            ).all()
            states = dict(conn.execute(sa.text("SELECT state, count(*) FROM documents GROUP BY state")).all())
        assert tokens and all(n == 1 for _, n in tokens), f"documents journalled by several writers: {tokens}"
        assert per_identity and all(n == 1 and applied for _, n, applied in per_identity), per_identity
        assert set(states) <= {State.MIGRATED.value, State.SKIPPED.value, State.UNRECOVERABLE.value}, states

        verify = subprocess.run(
            [sys.executable, "-m", "repage.cli", "--config", str(workdir / "repage.toml"), "verify", "--json"],
            env=child_env(settings),
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]

        with open_stores(settings) as stores:
            got = snapshot(stores, synthetic.doc_ids)
        problems = diff_rows(got.rows, template.expected_logical()) + diff_objects(
            got.objects, object_hashes(synthetic.expected_objects())
        )
        assert not problems, "\n".join(problems)
        assert got.row_count == len(synthetic.rows)
        assert got.states == synthetic.states
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()
        db.dispose()
        drop_collection(settings)

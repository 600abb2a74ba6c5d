"""Bucket faults (docs/design.md §11, §13): `repage run` through a fault-injecting proxy in front of
moto_server, at 5%, 20% and 50% of requests failing (500 InternalError, 503 SlowDown, 429,
latency spikes, connection resets, replies cut short after the request took effect).

Each trial runs the real CLI with the breaker set (--max-error-rate, --max-failures) and
--max-duration (the proxy throttles at any rate, so AIMD slows a run at 20-50% to a crawl).
The run either completes or stops cleanly: one JSON summary or a one-line error, no document
left running, no chunk row lost or doubled, every chunk either untouched or fully migrated,
every original object still there. Then the faults go off and a clean run (`--retry-failed`,
the retry edge of DESIGN §4) finishes: `verify` passes and the store equals a complete
migration, row by row (every field and the vector) and object by object.

Retried faults rarely fail a document, so the breaker gets its own trial: a bucket that answers
every CopyObject with 500. And each fault kind is checked alone: the error class it becomes
decides whether repage's backoff retries it.

A bucket that checks a PUT's SHA-256 (the proxy checks it as S3 and R2 do; moto does not) gets
the PUT path of docs/design.md §5.2: the same faults plus bodies changed on the way, and a trial
where every move's PUT arrives changed, so each fails its document, naming the key.
"""

from __future__ import annotations

import re

import pytest

from repage.errors import StoreUnavailable, Throttled, Transient
from repage.stores.throttle import AdaptiveLimiter, call_with_backoff
from tests.fixtures.s3 import create_bucket, free_port, s3_store, unique_bucket_name
from tests.reliability.stores import check_clone, clone_s3, make_template
from tests.support.faults import KINDS, FaultPlan, FaultProxy, is_checked_put, is_copy
from tests.support.reliability import CliLog

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

KEYS_DOCS = 24  # + a text-only and an unrecoverable document: over the breaker's 20-document floor
MAX_ERROR_RATE = "0.3"
MAX_FAILURES = "10"
MAX_DURATION = "15s"  # a run the proxy throttles at every rate crawls (AIMD): the limit stops it cleanly


@pytest.fixture(scope="module")
def template(milvus_server_uri, tmp_path_factory):
    return make_template(milvus_server_uri, tmp_path_factory.mktemp("faults-template"), keys_docs=KEYS_DOCS)


@pytest.fixture
def proxy(moto_endpoint):
    proxy = FaultProxy(moto_endpoint).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def checking_proxy(moto_endpoint):
    """The fault proxy, checking x-amz-checksum-sha256 as S3 and R2 do: moves are checked PUTs."""
    proxy = FaultProxy(moto_endpoint, verify_sha256=True).start()
    yield proxy
    proxy.stop()


@pytest.mark.parametrize(
    "kind,error",
    [
        ("500", Transient),
        ("503", Throttled),
        ("429", Throttled),
        ("reset", Transient),
        ("truncate", Transient),
        ("latency", None),
    ],
)
def test_each_fault_is_a_retryable_error_that_backoff_gets_through(trial, proxy, moto_endpoint, kind, error):
    """Per request kind: one fault is the right error (so repage's backoff retries it; obstore's own
    retries are off), and with backoff two faults in a row are ridden out. A refused connection
    (nothing listening) is StoreUnavailable and is not retried."""
    trial.name = f"s3-fault-kind-{kind}"
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    store = s3_store(proxy.endpoint, bucket)
    s3_store(moto_endpoint, bucket).put("k/a.png", b"x" * 3000)
    ops = {
        "get": lambda: store.get("k/a.png"),
        "head": lambda: store.head("k/a.png"),
        "copy": lambda: store.copy("k/a.png", "k/b.png"),
        "put": lambda: store.put("k/c.png", b"y" * 100),
        "list": lambda: [i.key for page in store.list("k") for i in page],
    }
    trial.trials = len(ops)
    for name, op in ops.items():
        proxy.set_plan(FaultPlan(rate=1.0, weights={kind: 1.0}, limit=1, latency_s=0.05))
        if error is None:
            op()
        else:
            with pytest.raises(error):
                op()
        proxy.set_plan(FaultPlan(rate=1.0, weights={kind: 1.0}, limit=2, latency_s=0.05))
        call_with_backoff(op, AdaptiveLimiter(None, min_rate=100.0), backoff_initial=0.01, backoff_max=0.05)
        trial.faults = proxy.fault_counts()[kind]
        assert trial.faults > 0, name
    assert store.get("k/b.png") == b"x" * 3000
    dead = s3_store(f"http://127.0.0.1:{free_port()}", bucket)
    calls = []

    def refused():
        calls.append(1)
        return dead.get("k/a.png")

    with pytest.raises(StoreUnavailable):
        call_with_backoff(refused, AdaptiveLimiter(None), backoff_initial=0.01)
    assert calls == [1]


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
def test_faulty_bucket_run_completes_or_stops_cleanly_and_a_clean_run_loses_nothing(
    trial, template, proxy, milvus_server_uri, moto_endpoint, tmp_path, rate
):
    trial.name = f"s3-faults-{rate:.0%}"
    plan = FaultPlan(rate=rate, seed=int(rate * 1000))
    faulted_then_clean(trial, template, proxy, milvus_server_uri, moto_endpoint, tmp_path, plan)


def test_checked_puts_through_faults_and_changed_bodies_lose_nothing(
    trial, template, checking_proxy, milvus_server_uri, moto_endpoint, tmp_path
):
    """The PUT path (docs/design.md §5.2) at 20%: every fault kind, and bodies changed on the way,
    which the server refuses; a clean run then finishes, and nothing is lost."""
    trial.name = "s3-faults-checked-puts-20%"
    plan = FaultPlan(rate=0.2, seed=202, weights={**dict.fromkeys(KINDS, 1.0), "corrupt": 1.0})
    faulted_then_clean(trial, template, checking_proxy, milvus_server_uri, moto_endpoint, tmp_path, plan)
    assert checking_proxy.checksums["ok"] > 0 and checking_proxy.fault_counts()["corrupt"] > 0


def faulted_then_clean(trial, template, proxy, milvus_server_uri, moto_endpoint, tmp_path, plan: FaultPlan) -> None:
    """One run under `plan` that completes or stops cleanly, then a clean run: verify passes and
    the store equals a complete migration."""
    clone = clone_s3(template, milvus_server_uri, moto_endpoint, proxy.endpoint, tmp_path)
    cli = CliLog()
    try:
        proxy.set_plan(plan)
        faulted = cli.run(
            "run",
            "--json",
            "--max-error-rate",
            MAX_ERROR_RATE,
            "--max-failures",
            MAX_FAILURES,
            "--max-duration",
            MAX_DURATION,
            "--object-ops-per-second",
            "200",
            env=clone.env,
            cwd=tmp_path,
        )
        injected = proxy.fault_counts()
        proxy.off()
        trial.faults = sum(injected.values())
        trial.detail.update(fault_kinds=dict(injected))
        outcome = check_clean_stop(faulted)
        trial.detail.update(first_run=outcome)
        partial = trial.compared(check_clone(clone, final=False))
        assert partial.ok, f"after the faulted run ({outcome}):\n" + partial.report()
        finish_cleanly(trial, clone, cli, tmp_path)
        trial.detail.update(cli_calls=len(cli.calls))
        assert trial.faults > 0, "the proxy injected no fault"
    finally:
        trial.faults = sum(proxy.fault_counts().values())  # also when the faulted run itself failed
        clone.drop()


def finish_cleanly(trial, clone, cli, tmp_path) -> None:
    """`run --retry-failed` with the faults off finishes everything; verify passes; the store equals
    a complete migration, row by row and object by object."""
    clean = cli.run("run", "--retry-failed", "--json", env=clone.env, cwd=tmp_path)
    assert clean.returncode == 0, str(clean)
    summary = clean.json()
    assert summary["failed"] == 0 and summary["stopped_because"] == "no more pending documents", summary
    verified = cli.run("verify", "--json", env=clone.env, cwd=tmp_path)
    trial.verified(verified)
    assert verified.returncode == 0 and verified.json()["ok"], str(verified)
    final = trial.compared(check_clone(clone, final=True))
    assert final.ok, "after the clean run:\n" + final.report()


def test_a_move_whose_put_arrives_changed_fails_its_document_naming_the_key_and_stores_nothing(
    trial, template, checking_proxy, milvus_server_uri, moto_endpoint, tmp_path
):
    """Every checked PUT's body changed on the way: the server refuses each (400 BadDigest), so each
    document with a move fails with one line naming the key, no copy is stored, the breaker stops
    the run; with the faults off a clean run finishes and loses nothing."""
    trial.name = "s3-checked-put-mismatch"
    clone = clone_s3(template, milvus_server_uri, moto_endpoint, checking_proxy.endpoint, tmp_path)
    cli = CliLog()
    try:
        checking_proxy.set_plan(FaultPlan(rate=1.0, seed=5, weights={"corrupt": 1.0}, when=is_checked_put))
        faulted = cli.run("run", "--json", "--max-failures", "1", env=clone.env, cwd=tmp_path)
        trial.faults = sum(checking_proxy.fault_counts().values())
        checking_proxy.off()
        assert faulted.returncode == 1, str(faulted)
        summary = faulted.json()
        assert summary["stopped_because"].startswith("--max-failures 1 exceeded"), summary
        errors = summary["errors"]
        assert summary["failed"] >= 2 and summary["migrated"] == 0 and len(errors) == summary["failed"], summary
        refused = re.compile(r"^document (\S+): .* refused put '([^']+)' \(HTTP 400 BadDigest\): .*nothing was stored")
        named = {doc: refused.match(message) for doc, message in errors.items()}
        assert all(m is not None and m.group(1) == doc for doc, m in named.items()), errors
        assert all(len(message.splitlines()) == 1 for message in errors.values()), errors
        canonical = set(template.synthetic.moves.values())
        with clone.open() as stores:
            for doc, match in named.items():
                assert match.group(2) in canonical and not stores.objects.exists(match.group(2)), (doc, match.group(2))
        assert checking_proxy.checksums["bad"] >= summary["failed"] and checking_proxy.checksums["ok"] == 0
        partial = trial.compared(check_clone(clone, final=False))
        assert partial.ok, "after the refused PUTs:\n" + partial.report()
        finish_cleanly(trial, clone, cli, tmp_path)
    finally:
        trial.faults = sum(checking_proxy.fault_counts().values())
        clone.drop()


def check_clean_stop(result) -> str:
    """What the faulted run did: completed, stopped by the breaker, finished with failures, or
    refused to start (a one-line error); anything else fails the test."""
    if result.returncode == 0:
        summary = result.json()
        assert summary["failed"] == 0, summary
        if summary["stopped_because"] == "no more pending documents":
            return f"completed {summary['migrated']} documents"
        assert summary["stopped_because"].startswith("--max-duration"), summary
        return f"stopped after {summary['documents']} documents: {summary['stopped_because']}"
    assert result.returncode in (1, 2), str(result)
    if not result.stdout.strip():  # the store check or the scan failed: a one-line error, nothing written
        return f"refused: {result.stderr.strip().splitlines()[-1][:120]}"
    summary = result.json()
    reason = summary["stopped_because"]
    if reason.startswith(("--max-error-rate", "--max-failures", "--max-duration")):
        return f"breaker: {reason}"
    assert reason == "no more pending documents", summary
    return f"finished with {summary['failed']} failed"


def test_a_bucket_that_fails_every_copy_trips_the_breaker_and_loses_nothing(
    trial, template, proxy, milvus_server_uri, moto_endpoint, tmp_path
):
    """Every CopyObject answers 500 (after its retries): the first batch fails, --max-failures
    stops the run between batches, the rest stays pending; the clean run finishes everything."""
    trial.name = "s3-breaker"
    clone = clone_s3(template, milvus_server_uri, moto_endpoint, proxy.endpoint, tmp_path)
    cli = CliLog()
    try:
        proxy.set_plan(FaultPlan(rate=1.0, seed=7, weights={"500": 1.0}, when=is_copy))
        faulted = cli.run("run", "--json", "--max-failures", "1", env=clone.env, cwd=tmp_path)
        trial.faults = sum(proxy.fault_counts().values())
        proxy.off()
        assert faulted.returncode == 1, str(faulted)
        summary = faulted.json()
        trial.detail.update(first_run=summary["stopped_because"])
        assert summary["stopped_because"].startswith("--max-failures 1 exceeded"), summary
        assert summary["failed"] >= 2 and summary["migrated"] == 0, summary
        assert all("InternalError" in e and "copy" in e for e in summary["errors"].values()), summary["errors"]
        with clone.open() as stores:
            counts = stores.ledger.counts()
            last = {r.document_id: r.last_error for r in stores.ledger.documents()}
        pending = sum(n for (state, _), n in counts.items() if state == "pending")
        assert pending >= len(clone.doc_ids) - 2 - summary["documents"], counts  # the rest was never claimed
        assert all(doc in (last[doc] or "") for doc in summary["errors"]), "last_error names the document"
        partial = trial.compared(check_clone(clone, final=False))
        assert partial.ok, "after the breaker stopped the run:\n" + partial.report()

        clean = cli.run("run", "--retry-failed", "--json", env=clone.env, cwd=tmp_path)
        assert clean.returncode == 0 and clean.json()["failed"] == 0, str(clean)
        verified = cli.run("verify", "--json", env=clone.env, cwd=tmp_path)
        trial.verified(verified)
        assert verified.returncode == 0 and verified.json()["ok"], str(verified)
        final = trial.compared(check_clone(clone, final=True))
        assert final.ok, "after the clean run:\n" + final.report()
    finally:
        trial.faults = sum(proxy.fault_counts().values())  # also when the faulted run itself failed
        clone.drop()


def test_a_worker_against_a_bucket_that_fails_every_copy_pauses_itself_and_resume_continues(
    trial, template, proxy, milvus_server_uri, moto_endpoint, tmp_path
):
    """The unattended case (docs/design.md §9.5): a revoked key fails every copy; the worker pauses
    the migration after --max-failures with the reason in `status --json`, instead of failing its
    whole quota; once the key works again, `resume` and the worker finish the store."""
    import signal

    from tests.support import wait_for

    trial.name = "s3-worker-pauses"
    clone = clone_s3(template, milvus_server_uri, moto_endpoint, proxy.endpoint, tmp_path)
    cli = CliLog()
    try:
        assert cli.run("scan", "--json", env=clone.env, cwd=tmp_path).returncode == 0
        proxy.set_plan(FaultPlan(rate=1.0, seed=11, weights={"500": 1.0}, when=is_copy))
        worker = cli.start(
            "worker",
            "--max-failures",
            "1",
            "--batch-size",
            "1",
            "--poll",
            "0.05",
            "--json",
            env=clone.env,
            cwd=tmp_path,
        )

        def paused_because() -> str | None:
            if worker.poll() is not None:
                raise AssertionError(f"the worker exited {worker.returncode} before pausing")
            with clone.open() as stores:
                from repage.migration.status import pause_reason

                return pause_reason(stores.ledger)

        why = wait_for(paused_because, "the worker to pause itself", timeout=120)
        worker.send_signal(signal.SIGTERM)
        stopped = cli.finish(worker)
        trial.faults = sum(proxy.fault_counts().values())
        proxy.off()
        assert why.startswith("worker stopped itself: --max-failures 1 exceeded (2 failed)"), why
        status = cli.run("status", "--json", env=clone.env, cwd=tmp_path).json()
        assert status["paused_because"] == why and status["by_state"]["failed"] == 2, status
        assert stopped.json()["totals"]["failed"] == 2, str(stopped)  # not the whole store
        trial.detail.update(paused_because=why)

        assert cli.run("resume", "--json", env=clone.env, cwd=tmp_path).json()["paused"] is False
        assert cli.run("status", "--json", env=clone.env, cwd=tmp_path).json()["paused_because"] is None
        clean = cli.run("run", "--retry-failed", "--json", env=clone.env, cwd=tmp_path)
        assert clean.returncode == 0 and clean.json()["failed"] == 0, str(clean)
        verified = cli.run("verify", "--json", env=clone.env, cwd=tmp_path)
        trial.verified(verified)
        assert verified.returncode == 0 and verified.json()["ok"], str(verified)
        final = trial.compared(check_clone(clone, final=True))
        assert final.ok, "after the resume and the clean run:\n" + final.report()
    finally:
        trial.faults = sum(proxy.fault_counts().values())
        clone.drop()

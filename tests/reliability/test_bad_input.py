"""Bad input (docs/design.md §13): the corpus of tests/reliability/corpus.py in one collection and
one moto bucket, driven through the real CLI (`scan`, `run`, `verify`, `status`).

Each bad document ends with a clear record (failed: last_error naming the document and the
culprit; unrecoverable / review / skipped: a reason) and its rows exactly as they were, or is
migrated exactly as it should be. No other document is touched: every row of the collection is
compared with its ground truth (the store read before the run, with the page and key a
migration sets on the documents that migrate: tests/support/ground_truth.py). Every original
object is still there, unchanged; the only new objects are the canonical copies of migrated
documents.

Also here: a run restricted by `--document-id` / `--dataset-id` values built to inject into a
filter touches exactly what they name (nothing, for the dataset), and a document whose chunks
are deleted in the middle of a batch fails alone while the rest of its batch migrates.
"""

from __future__ import annotations

import hashlib

import pytest

from repage.config import load_settings
from repage.domain.states import State
from repage.migration.runner import RunLimits, Runner, Selection
from repage.migration.scan import scan_store
from repage.migration.work import RunOptions
from repage.stores.milvus import MilvusVectors
from repage.stores.objects import ObjectStore
from tests.fixtures.milvus import unique_name
from tests.fixtures.s3 import create_bucket, unique_bucket_name
from tests.reliability.corpus import DIM, DS, Case, build_corpus
from tests.reliability.stores import check_clone, clone_folder, make_template, with_retries, write_config
from tests.support.ground_truth import StoreContent, Truth, compare_store, read_store
from tests.support.reliability import MILVUS_TOKEN, S3_KEY_ID, S3_SECRET, CliLog, assert_no_secret

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

INJECTED_DOCUMENT = 'inj" || true || "x'


@pytest.fixture
def corpus(milvus_server_uri, moto_endpoint, tmp_path):
    cases = build_corpus()
    collection = unique_name("bad")

    def create() -> None:
        with MilvusVectors.create_collection(
            milvus_server_uri, collection, dim=DIM, pk="auto", chunk_id_field=True
        ) as vectors:
            vectors.insert([row for case in cases for row in case.rows])

    with_retries(create)
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    with ObjectStore.from_url(
        f"s3://{bucket}", endpoint=moto_endpoint, access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET
    ) as objects:
        for case in cases:
            for key, data in case.objects.items():
                objects.put(key, data)
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {
        "REPAGE_MILVUS_URI": milvus_server_uri,
        "REPAGE_MILVUS_TOKEN": MILVUS_TOKEN,
        "REPAGE_COLLECTION": collection,
        "REPAGE_STORE_URL": f"s3://{bucket}",
        "REPAGE_S3_ENDPOINT": moto_endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "REPAGE_LEDGER_URL": ledger,
    }
    write_config(tmp_path)
    settings = load_settings(
        {},
        flags=dict(
            milvus_uri=milvus_server_uri,
            collection=collection,
            store_url=f"s3://{bucket}",
            s3_endpoint=moto_endpoint,
            aws_access_key_id=S3_KEY_ID,
            aws_secret_access_key=S3_SECRET,
            ledger_url=ledger,
        ),
        app_fallbacks=False,
    )
    yield cases, env, settings

    def drop() -> None:
        with MilvusVectors(milvus_server_uri, collection) as vectors:
            vectors.drop_collection()

    with_retries(drop)


def changed_documents(before: StoreContent, after: StoreContent) -> set[str]:
    return {
        ident[0] for ident in before.rows.keys() | after.rows.keys() if before.rows.get(ident) != after.rows.get(ident)
    }


def corpus_truth(cases: list[Case], before: StoreContent) -> Truth:
    """The corpus after a complete run: the rows as they were after the scan (and the deletions
    after it), with the page and key of `final` on the chunks of the documents that migrate, all
    else unchanged; every object there before, unchanged, plus the canonical copy of each
    migrated image holding its source's bytes."""
    by_id = {c.document_id: c for c in cases}
    rows: dict = {}
    for (doc, index), got in before.rows.items():
        assert len(got) == 1, f"chunk {(doc, index)!r} had {len(got)} rows before the run"
        row, case = dict(got[0]), by_id.get(doc)
        if case is not None and case.expect == "migrated" and index in case.final:
            row["page"], row["image_r2_key"] = case.final[index]
        rows[(doc, index)] = [row]
    owners = {key: c.document_id for c in cases for key in c.objects}
    copies = canonical_copies(cases)
    owners.update({key: doc for key, (doc, _) in copies.items()})
    objects = dict(before.objects) | {key: sha for key, (_, sha) in copies.items()}
    return Truth(rows, objects, owners, documents=set(by_id))


def test_bad_input_gives_a_clear_record_and_touches_no_other_document(trial, corpus, tmp_path):
    cases, env, settings = corpus
    trial.name, trial.trials = "bad-input", len(cases)
    trial.faults = sum(
        c.expect != "migrated"
        or c.after_scan is not None
        or c.name.startswith(("injection", "unicode", "long", "percent", "not-an-image", "index"))
        for c in cases
        if not c.name.startswith("good")
    )
    by_id = {c.document_id: c for c in cases}
    cli = CliLog()
    scan = cli.run("scan", "--json", env=env, cwd=tmp_path)
    assert scan.returncode == 0, str(scan)
    scanned = {d["document_id"]: d for d in scan.json()["documents"]}
    assert set(scanned) == set(by_id), "every document is recorded by the scan, none aborts it"
    after_scan(cases, settings)
    before = read_store(settings)

    # a value built to inject into a filter touches exactly what it names
    one = cli.run("run", "--json", "--document-id", INJECTED_DOCUMENT, env=env, cwd=tmp_path)
    assert one.returncode == 0 and one.json()["documents"] == 1 and one.json()["migrated"] == 1, str(one)
    one_run = read_store(settings)
    assert changed_documents(before, one_run) == {INJECTED_DOCUMENT}
    none = cli.run("run", "--json", "--dataset-id", 'x" || true || "', env=env, cwd=tmp_path)
    assert none.returncode == 0 and none.json()["documents"] == 0, str(none)
    assert read_store(settings) == one_run, "a run of an injected dataset id changed something"

    run = cli.run("run", "--json", env=env, cwd=tmp_path)
    assert run.returncode == 1, str(run)  # finished with failures: the bad documents
    summary = run.json()
    assert summary["stopped_because"] == "no more pending documents", summary
    from repage.stores.open import open_ledger

    with open_ledger(settings) as ledger:  # before verify, which records its own reason
        records = {r.document_id: r for r in ledger.documents()}
    verify = cli.run("verify", "--json", env=env, cwd=tmp_path)
    trial.verified(verify)
    assert verify.returncode == 0 and verify.json()["ok"], str(verify)
    status = cli.run("status", "--json", env=env, cwd=tmp_path).json()
    # every row and object against the truth: bad documents untouched, migrated ones exactly right
    final = trial.compared(compare_store(settings, corpus_truth(cases, before), final=True))

    problems = [p for case in cases for p in check_record(case, records.get(case.document_id))]
    failed = {c.document_id for c in cases if c.expect == "failed"}
    shown = {e["document_id"] for e in status["last_errors"]}
    problems += [f"status does not list the error of {d!r}" for d in sorted(failed - shown) if len(failed) <= 10]
    assert final.ok and not problems, "\n".join([final.report(), *problems])


def after_scan(cases: list[Case], settings) -> None:
    """Documents deleted mid-run: chunks gone from Milvus, or images gone from the bucket."""
    for case in cases:
        if case.after_scan == "delete-chunks":

            def delete(document_id=case.document_id) -> None:
                with MilvusVectors(settings.milvus_uri, settings.collection) as vectors:
                    rows = vectors.fetch_documents([document_id], with_vectors=False)
                    vectors.delete_by_pks([r[vectors.info().pk_field] for r in rows])

            with_retries(delete)
        elif case.after_scan == "delete-images":
            from repage.stores.open import open_objects

            with open_objects(settings) as objects:
                for key in case.objects:
                    objects.delete(key)


def check_record(case: Case, rec) -> list[str]:
    """The ledger's record of a case: the expected state, and for a failed or left-alone document
    the reason naming the document and the culprit. (Its rows and objects: corpus_truth.)"""
    name = f"{case.name} ({case.document_id!r})"
    if rec is None:
        return [f"{name}: not in the ledger"]
    if case.expect == "migrated":
        problems = (
            []
            if rec.state in (State.MIGRATED, State.VERIFIED)
            else [f"{name}: {rec.state}, expected migrated ({rec.last_error or rec.reason})"]
        )
        if case.after_scan == "delete-chunks" and "deleted" not in rec.reason:
            problems.append(f"{name}: the reason does not say the document was deleted: {rec.reason!r}")
        return problems
    problems = (
        []
        if rec.state == State(case.expect)
        else [f"{name}: {rec.state}, expected {case.expect} ({rec.last_error or rec.reason})"]
    )
    told = (rec.last_error or "") if case.expect == "failed" else rec.reason
    if case.expect == "failed" and case.document_id not in told and repr(case.document_id) not in told:
        problems.append(f"{name}: last_error does not name the document: {told!r}")
    problems += [f"{name}: {w!r} not in {told!r}" for w in case.words if w not in told]
    return problems


def canonical_copies(cases: list[Case]) -> dict[str, tuple[str, str]]:
    """The new objects a complete run makes: canonical key -> (document, sha256 of its source's bytes)."""
    copies: dict[str, tuple[str, str]] = {}
    for case in cases:
        if case.expect != "migrated" or case.after_scan:
            continue
        legacy = {r["chunk_index"]: r["image_r2_key"] for r in case.rows}
        for index, (_, key) in case.final.items():
            source = legacy.get(index) or next(
                (k for k in case.objects if k.startswith(f"{DS}/{case.document_id}/")), None
            )
            if key and source in case.objects:
                copies[key] = (case.document_id, hashlib.sha256(case.objects[source]).hexdigest())
    return copies


def test_a_document_deleted_in_the_middle_of_a_batch_fails_alone(trial, milvus_server_uri, tmp_path, caplog):
    """Its chunks vanish between the batch's planning and its write: it fails, named, with the
    reason; the other documents of the batch are written and verified; nothing else changes."""
    trial.name = "deleted-mid-batch"
    template = make_template(milvus_server_uri, tmp_path / "template", keys_docs=6, seed=3)
    workdir = tmp_path / "work"
    workdir.mkdir()
    clone = clone_folder(template, milvus_server_uri, workdir)
    victim: list[str] = []
    try:
        with clone.open() as stores:
            scan_store(stores)
            runner = Runner(stores, RunOptions(), RunLimits(batch_size=4, concurrency=2), Selection())
            write = runner.migrator._write

            def deleting_write(works, result):
                if not victim and len(works) > 1:
                    victim.append(works[1].document_id)
                    rows = stores.vectors.fetch_documents(victim, with_vectors=False)
                    stores.vectors.delete_by_pks([r[stores.vectors.info().pk_field] for r in rows])
                return write(works, result)

            runner.migrator._write = deleting_write
            summary = runner.run()
            trial.faults = len(victim)
            assert victim, "no batch of two or more documents was written"
            assert list(summary.errors) == victim, summary.errors
            error = summary.errors[victim[0]]
            assert victim[0] in error and "deleted during the run" in error, error
            record_ = stores.ledger.get(victim[0])
            assert record_.state == State.FAILED and "deleted during the run" in record_.last_error
            from repage.migration.verify import verify_documents

            report = verify_documents(stores)
            trial.verified(report)
            assert not report.failed and len(report.passed) == summary.migrated == 5, report
        assert_no_secret(caplog.text, "log records")
        # every other document is exactly as a complete migration leaves it, in the ledger too; the
        # victim has no chunk left, and its copies (made before its write failed) may stay until gc,
        # as any failed document's do
        final = trial.compared(check_clone(clone, final=True, leave_out=victim[0]))
        assert final.ok, final.report()
    finally:
        clone.drop()

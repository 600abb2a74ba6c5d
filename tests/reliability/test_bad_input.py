"""Bad input (issue 11, part 3): the corpus of tests/reliability/corpus.py in one collection and
one moto bucket, driven through the real CLI (`scan`, `run`, `verify`, `status`).

Each bad document ends with a clear record (failed: last_error naming the document and the
culprit; unrecoverable / review / skipped: a reason) and its rows exactly as they were, or is
migrated exactly as it should be. No other document is touched: every row of the collection is
compared with the snapshot taken before the run, and only the fields a migration sets may
differ, only on the documents that migrate. Every original object is still there, unchanged;
the only new objects are the canonical copies of migrated documents.

Also here: a run restricted by `--document-id` / `--dataset-id` values built to inject into a
filter touches exactly what they name (nothing, for the dataset), and a document whose chunks
are deleted in the middle of a batch fails alone while the rest of its batch migrates.
"""

from __future__ import annotations

import hashlib
import math
import pytest

from repage.config import load_settings
from repage.migration.migrate import RunOptions
from repage.migration.runner import RunLimits, Runner, Selection
from repage.migration.scan import scan_store
from repage.domain.states import State
from repage.stores.objects import ObjectStore
from repage.stores.milvus import MilvusVectors
from tests.fixtures.milvus import unique_name
from tests.fixtures.s3 import create_bucket, unique_bucket_name
from tests.reliability.corpus import DIM, DS, Case, build_corpus
from tests.reliability.stores import clone_folder, make_template, with_retries, write_config
from tests.support.crash import diff_objects, diff_rows, snapshot
from tests.support.crash import object_hashes as hashes
from tests.support.reliability import MILVUS_TOKEN, S3_KEY_ID, S3_SECRET, CliLog, assert_no_secret, record
from tests.support.snapshot import milvus_rows, object_hashes

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

MIGRATION_FIELDS = {"page", "image_r2_key"}
INJECTED_DOCUMENT = 'inj" || true || "x'


@pytest.fixture
def corpus(milvus_server_uri, moto_endpoint, tmp_path):
    cases = build_corpus()
    collection = unique_name("bad")

    def create() -> None:
        with MilvusVectors.create_collection(milvus_server_uri, collection, dim=DIM, pk="auto",
                                             chunk_id_field=True) as vectors:
            vectors.insert([row for case in cases for row in case.rows])
    with_retries(create)
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    with ObjectStore.from_url(f"s3://{bucket}", endpoint=moto_endpoint, access_key_id=S3_KEY_ID,
                              secret_access_key=S3_SECRET) as objects:
        for case in cases:
            for key, data in case.objects.items():
                objects.put(key, data)
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {"REPAGE_MILVUS_URI": milvus_server_uri, "REPAGE_MILVUS_TOKEN": MILVUS_TOKEN,
           "REPAGE_COLLECTION": collection, "REPAGE_STORE_URL": f"s3://{bucket}",
           "REPAGE_S3_ENDPOINT": moto_endpoint, "AWS_ACCESS_KEY_ID": S3_KEY_ID,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET, "REPAGE_LEDGER_URL": ledger}
    write_config(tmp_path)
    settings = load_settings({}, flags=dict(milvus_uri=milvus_server_uri, collection=collection,
                                            store_url=f"s3://{bucket}", s3_endpoint=moto_endpoint,
                                            aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET,
                                            ledger_url=ledger), app_fallbacks=False)
    yield cases, env, settings

    def drop() -> None:
        with MilvusVectors(milvus_server_uri, collection) as vectors:
            vectors.drop_collection()
    with_retries(drop)


def snap(settings) -> tuple[dict, dict]:
    rows = {k: {f: "NaN" if isinstance(v, float) and math.isnan(v) else v for f, v in row.items()}
            for k, row in with_retries(lambda: milvus_rows(settings))["rows"].items()}  # NaN != NaN: as a word
    return rows, object_hashes(settings)


def doc_rows(rows: dict, document_id: str) -> dict:
    return {k: r for k, r in rows.items() if r["document_id"] == document_id}


def changed_documents(before: dict, after: dict) -> set[str]:
    docs = {r["document_id"] for k, r in before.items() if after.get(k) != r}
    return docs | {r["document_id"] for k, r in after.items() if k not in before}


def test_bad_input_gives_a_clear_record_and_touches_no_other_document(corpus, tmp_path):
    cases, env, settings = corpus
    by_id = {c.document_id: c for c in cases}
    cli = CliLog()
    scan = cli.run("scan", "--json", env=env, cwd=tmp_path)
    assert scan.returncode == 0, str(scan)
    scanned = {d["document_id"]: d for d in scan.json()["documents"]}
    assert set(scanned) == set(by_id), "every document is recorded by the scan, none aborts it"
    after_scan(cases, settings)
    before_rows, before_objects = snap(settings)

    # a value built to inject into a filter touches exactly what it names
    one = cli.run("run", "--json", "--document-id", INJECTED_DOCUMENT, env=env, cwd=tmp_path)
    assert one.returncode == 0 and one.json()["documents"] == 1 and one.json()["migrated"] == 1, str(one)
    rows, objects = snap(settings)
    assert changed_documents(before_rows, rows) == {INJECTED_DOCUMENT}
    none = cli.run("run", "--json", "--dataset-id", 'x" || true || "', env=env, cwd=tmp_path)
    assert none.returncode == 0 and none.json()["documents"] == 0, str(none)
    assert snap(settings) == (rows, objects), "a run of an injected dataset id changed something"

    run = cli.run("run", "--json", env=env, cwd=tmp_path)
    assert run.returncode == 1, str(run)  # finished with failures: the bad documents
    summary = run.json()
    assert summary["stopped_because"] == "no more pending documents", summary
    from repage.stores.open import open_ledger

    with open_ledger(settings) as ledger:  # before verify, which records its own reason
        records = {r.document_id: r for r in ledger.documents()}
    verify = cli.run("verify", "--json", env=env, cwd=tmp_path)
    assert verify.returncode == 0 and verify.json()["ok"], str(verify)
    status = cli.run("status", "--json", env=env, cwd=tmp_path).json()
    after_rows, after_objects = snap(settings)

    problems: list[str] = []
    for case in cases:
        problems += check_case(case, records.get(case.document_id), before_rows, after_rows)
    problems += check_objects(cases, before_objects, after_objects)
    migrating = {c.document_id for c in cases if c.expect == "migrated"}
    strays = changed_documents(before_rows, after_rows) - migrating
    problems += [f"document {d!r} changed though it was not to migrate" for d in sorted(strays)]
    failed = {c.document_id for c in cases if c.expect == "failed"}
    shown = {e["document_id"] for e in status["last_errors"]}
    problems += [f"status does not list the error of {d!r}" for d in sorted(failed - shown) if len(failed) <= 10]
    record("bad-input", trials=len(cases), faults=sum(c.expect != "migrated" or c.after_scan is not None
                                                      or c.name.startswith(("injection", "unicode", "long", "percent",
                                                                            "not-an-image", "index"))
                                                      for c in cases if not c.name.startswith("good")),
           documents_verified=len(cases), lost=len(problems))
    assert not problems, "\n".join(problems)


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


def check_case(case: Case, rec, before_rows: dict, after_rows: dict) -> list[str]:
    name = f"{case.name} ({case.document_id!r})"
    if rec is None:
        return [f"{name}: not in the ledger"]
    before, after = doc_rows(before_rows, case.document_id), doc_rows(after_rows, case.document_id)
    if case.expect == "migrated":
        problems = [] if rec.state in (State.MIGRATED, State.VERIFIED) else \
            [f"{name}: {rec.state}, expected migrated ({rec.last_error or rec.reason})"]
        if set(after) != set(before):
            problems.append(f"{name}: rows appeared or disappeared")
        for key, row in after.items():
            old = before.get(key, {})
            want = case.final.get(row["chunk_index"])
            if want is not None and (row["page"], row["image_r2_key"] or None) != want:
                problems.append(f"{name}: chunk {row['chunk_index']} has page {row['page']} key "
                                f"{row['image_r2_key']!r}, expected {want}")
            fields = MIGRATION_FIELDS if want is not None else set()
            if {k: v for k, v in row.items() if k not in fields} != {k: v for k, v in old.items() if k not in fields}:
                problems.append(f"{name}: chunk {row['chunk_index']} changed beyond page and key")
        if case.after_scan == "delete-chunks" and "deleted" not in rec.reason:
            problems.append(f"{name}: the reason does not say the document was deleted: {rec.reason!r}")
        return problems
    problems = [] if rec.state == State(case.expect) else \
        [f"{name}: {rec.state}, expected {case.expect} ({rec.last_error or rec.reason})"]
    told = (rec.last_error or "") if case.expect == "failed" else rec.reason
    if case.expect == "failed" and case.document_id not in told and repr(case.document_id) not in told:
        problems.append(f"{name}: last_error does not name the document: {told!r}")
    problems += [f"{name}: {w!r} not in {told!r}" for w in case.words if w not in told]
    if after != before:
        problems.append(f"{name}: its rows changed although it was not migrated")
    return problems


def check_objects(cases: list[Case], before: dict, after: dict) -> list[str]:
    """Originals unchanged and all there; new objects only canonical copies of migrated documents."""
    problems = [f"object {k!r} lost" for k in before if k not in after]
    problems += [f"object {k!r} changed" for k in before if k in after and after[k] != before[k]]
    allowed: dict[str, str] = {}
    for case in cases:
        if case.expect != "migrated" or case.after_scan:
            continue
        legacy = {r["chunk_index"]: r["image_r2_key"] for r in case.rows}
        for index, (_, key) in case.final.items():
            source = legacy.get(index) or next((k for k in case.objects if k.startswith(f"{DS}/{case.document_id}/")),
                                               None)
            if key and source in case.objects:
                allowed[key] = hashlib.sha256(case.objects[source]).hexdigest()
    for key in sorted(after.keys() - before.keys()):
        if key not in allowed:
            problems.append(f"unexpected new object {key!r}")
        elif after[key] != allowed[key]:
            problems.append(f"copy {key!r} does not hold its source's bytes")
    problems += [f"canonical copy {k!r} missing" for k in allowed if k not in after]
    return problems


def test_a_document_deleted_in_the_middle_of_a_batch_fails_alone(milvus_server_uri, tmp_path, caplog):
    """Its chunks vanish between the batch's planning and its write: it fails, named, with the
    reason; the other documents of the batch are written and verified; nothing else changes."""
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
            assert victim, "no batch of two or more documents was written"
            assert list(summary.errors) == victim, summary.errors
            error = summary.errors[victim[0]]
            assert victim[0] in error and "deleted during the run" in error, error
            record_ = stores.ledger.get(victim[0])
            assert record_.state == State.FAILED and "deleted during the run" in record_.last_error
            from repage.migration.verify import verify_documents

            report = verify_documents(stores)
            assert not report.failed and len(report.passed) == summary.migrated == 5, report
            got = snapshot(stores, clone.doc_ids)
        assert_no_secret(caplog.text, "log records")
        # every other document is exactly as a complete migration leaves it; the victim's copies
        # (made before its write failed) stay until gc, as any failed document's do
        syn, doc = template.synthetic, victim[0]
        want_rows = {k: v for k, v in template.expected_logical().items() if k[0] != doc}
        copies = {new for old, new in syn.moves.items() if f"/{doc}/" in old}
        want_objects = {k: v for k, v in hashes(syn.expected_objects()).items() if k not in copies}
        problems = diff_rows(got.rows, want_rows)
        problems += diff_objects({k: v for k, v in got.objects.items() if k not in copies}, want_objects)
        problems += [f"{d}: {s}, expected {syn.states[d]}" for d, s in got.states.items()
                     if d != doc and s != syn.states[d]]
        record("deleted-mid-batch", faults=1, documents_verified=len(clone.doc_ids), lost=len(problems))
        assert not problems, "\n".join(problems)
    finally:
        clone.drop()

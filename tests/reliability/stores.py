"""Stores for the reliability suite: the crash suite's synthetic FLTR store (tests/support/crash.py),
cloned into a `milvus-lite server` collection and a moto bucket (or a folder), and the
check that nothing was lost: the clone compared with its ground truth by
tests/support/ground_truth.py (every chunk row exactly once with the fields a complete
migration gives it, every original object still there with its bytes, every copy right).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from repage.config import Settings, load_settings
from repage.stores.milvus import MilvusVectors
from repage.stores.objects import ObjectStore
from repage.stores.open import open_stores
from tests.fixtures.s3 import create_bucket, unique_bucket_name
from tests.support.crash import DIM, Schema, Template
from tests.support.ground_truth import (
    Comparison,
    compare_store,
    template_partial_truth,
    template_truth,
    with_retries,
)
from tests.support.reliability import MILVUS_TOKEN, S3_KEY_ID, S3_SECRET

LEASE_SECONDS = 3.0
BATCH_SIZE = 3
CONCURRENCY = 4


@dataclass
class Clone:
    """One scenario's private copy of the template: a collection, a bucket, a ledger."""

    template: Template
    workdir: Path
    settings: Settings  # talks to the bucket directly (no proxy): for checks
    env: dict[str, str]  # for the CLI: the bucket through `endpoint` (the fault proxy)

    @property
    def doc_ids(self) -> list[str]:
        return self.template.synthetic.doc_ids

    def open(self):
        return with_retries(lambda: open_stores(self.settings))

    def drop(self) -> None:
        def drop() -> None:
            with MilvusVectors(self.settings.milvus_uri, self.settings.collection) as vectors:
                vectors.drop_collection()

        with_retries(drop)


def new_collection(template: Template, uri: str) -> str:
    name = f"rel_{uuid.uuid4().hex[:12]}"
    s = template.schema

    def create() -> None:
        with MilvusVectors.create_collection(
            uri, name, dim=DIM, pk=s.pk, dynamic=s.dynamic, chunk_id_field=s.chunk_id_field
        ) as store:
            store.insert(template.rows)

    with_retries(create)
    return name


def write_config(workdir: Path) -> None:
    (workdir / "repage.toml").write_text(
        f"[repage]\nlease_seconds = {LEASE_SECONDS}\nbatch_size = {BATCH_SIZE}\nconcurrency = {CONCURRENCY}\n",
        encoding="utf-8",
    )


def clone_s3(template: Template, uri: str, moto_endpoint: str, endpoint: str, workdir: Path) -> Clone:
    """The template in a new collection and a new moto bucket (filled directly, not through `endpoint`)."""
    collection = new_collection(template, uri)
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    with ObjectStore.from_url(
        f"s3://{bucket}", endpoint=moto_endpoint, access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET
    ) as objects:
        for key, data in template.synthetic.objects.items():
            objects.put(key, data)
    ledger = f"sqlite:///{workdir / 'ledger.db'}"
    flags = dict(
        milvus_uri=uri,
        collection=collection,
        store_url=f"s3://{bucket}",
        s3_endpoint=moto_endpoint,
        aws_access_key_id=S3_KEY_ID,
        aws_secret_access_key=S3_SECRET,
        ledger_url=ledger,
        lease_seconds=LEASE_SECONDS,
        batch_size=BATCH_SIZE,
        concurrency=CONCURRENCY,
    )
    env = {
        "REPAGE_MILVUS_URI": uri,
        "REPAGE_MILVUS_TOKEN": MILVUS_TOKEN,
        "REPAGE_COLLECTION": collection,
        "REPAGE_STORE_URL": f"s3://{bucket}",
        "REPAGE_S3_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "REPAGE_LEDGER_URL": ledger,
    }
    write_config(workdir)
    return Clone(template, workdir, load_settings({}, flags=flags, app_fallbacks=False), env)


def clone_folder(template: Template, uri: str, workdir: Path) -> Clone:
    """The template in a new collection (on `uri`) and a copy of its bucket folder."""
    import shutil

    collection = new_collection(template, uri)
    shutil.copytree(template.bucket, workdir / "bucket")
    ledger = f"sqlite:///{workdir / 'ledger.db'}"
    store_url = (workdir / "bucket").as_uri()
    flags = dict(
        milvus_uri=uri,
        collection=collection,
        store_url=store_url,
        ledger_url=ledger,
        lease_seconds=LEASE_SECONDS,
        batch_size=BATCH_SIZE,
        concurrency=CONCURRENCY,
    )
    env = {
        "REPAGE_MILVUS_URI": uri,
        "REPAGE_COLLECTION": collection,
        "REPAGE_STORE_URL": store_url,
        "REPAGE_LEDGER_URL": ledger,
    }
    write_config(workdir)
    return Clone(template, workdir, load_settings({}, flags=flags, app_fallbacks=False), env)


def make_template(uri: str, root: Path, *, keys_docs: int, seed: int = 11) -> Template:
    from tests.support.crash import build_synthetic

    return with_retries(
        lambda: Template(
            uri,
            root,
            build_synthetic(seed=seed, keys_docs=keys_docs),
            Schema(pk="auto", chunk_id_field=True, dynamic=False),
        )
    )


# ---------------------------------------------------------------- nothing lost


def check_clone(clone: Clone, *, final: bool, leave_out: str | None = None) -> Comparison:
    """The clone against its ground truth (tests/support/ground_truth.py). `final`: a complete
    migration, row by row and object by object, and the ledger's end states; else (between a
    faulted run and the clean one) a consistent partial one: every chunk there exactly once,
    untouched or fully migrated, every original object there, and no document left running.
    `leave_out`: a document the test deleted; the ledger state of it is the test's to check."""
    template = clone.template
    truth = template_truth(template, leave_out=leave_out) if final else template_partial_truth(template)
    comparison = compare_store(clone.settings, truth, final=final)
    with clone.open() as stores:
        states = {r.document_id: r.state.value for r in stores.ledger.documents()}
    if final:
        want = template.synthetic.states
        bad = {
            d: (states.get(d), want.get(d))
            for d in states.keys() | want.keys()
            if states.get(d) != want.get(d) and d != leave_out
        }
        comparison.add([f"ledger states differ (got, want): {bad}"] if bad else [])
    else:
        comparison.add(f"document {d} left running" for d, s in states.items() if s == "running")
    return comparison

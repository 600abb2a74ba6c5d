"""Stores for the reliability suite: the crash suite's synthetic FLTR store (tests/support/crash.py),
cloned into a `milvus-lite server` collection and a moto bucket (or a folder), and the
checks that nothing was lost: every chunk row exactly once with the fields a complete
migration gives it, every original object still there with its bytes, every copy right.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from repage.stores.open import open_stores
from repage.config import Settings, load_settings
from repage.errors import StoreUnavailable
from repage.stores.objects import ObjectStore
from repage.stores.milvus import MilvusVectors
from tests.fixtures.s3 import create_bucket, unique_bucket_name
from tests.support.crash import DIM, Schema, Template, diff_objects, diff_rows, object_hashes, snapshot
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


def with_retries(fn, attempts: int = 5):
    """The test process's own Milvus calls, retried when the channel is refused for a moment.

    This long-lived process keeps gRPC subchannels to the session's `milvus-lite server` idle
    between tests; the server answers their keepalive pings with GOAWAY "too_many_pings", and a
    new channel sharing such a subchannel can fail its first RPC with UNAVAILABLE. (A repage
    process is fresh, and a run retries an unavailable Milvus: runner.UNAVAILABLE_WAITS.)"""
    from pymilvus.exceptions import MilvusException

    for attempt in range(attempts):
        try:
            return fn()
        except (StoreUnavailable, MilvusException):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    return None


def new_collection(template: Template, uri: str) -> str:
    name = f"rel_{uuid.uuid4().hex[:12]}"
    s = template.schema

    def create() -> None:
        with MilvusVectors.create_collection(uri, name, dim=DIM, pk=s.pk, dynamic=s.dynamic,
                                             chunk_id_field=s.chunk_id_field) as store:
            store.insert(template.rows)
    with_retries(create)
    return name


def write_config(workdir: Path) -> None:
    (workdir / "repage.toml").write_text(
        f"[repage]\nlease_seconds = {LEASE_SECONDS}\nbatch_size = {BATCH_SIZE}\nconcurrency = {CONCURRENCY}\n",
        encoding="utf-8")


def clone_s3(template: Template, uri: str, moto_endpoint: str, endpoint: str, workdir: Path) -> Clone:
    """The template in a new collection and a new moto bucket (filled directly, not through `endpoint`)."""
    collection = new_collection(template, uri)
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    with ObjectStore.from_url(f"s3://{bucket}", endpoint=moto_endpoint, access_key_id=S3_KEY_ID,
                              secret_access_key=S3_SECRET) as objects:
        for key, data in template.synthetic.objects.items():
            objects.put(key, data)
    ledger = f"sqlite:///{workdir / 'ledger.db'}"
    flags = dict(milvus_uri=uri, collection=collection, store_url=f"s3://{bucket}", s3_endpoint=moto_endpoint,
                 aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET, ledger_url=ledger,
                 lease_seconds=LEASE_SECONDS, batch_size=BATCH_SIZE, concurrency=CONCURRENCY)
    env = {"REPAGE_MILVUS_URI": uri, "REPAGE_MILVUS_TOKEN": MILVUS_TOKEN, "REPAGE_COLLECTION": collection,
           "REPAGE_STORE_URL": f"s3://{bucket}", "REPAGE_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY_ID,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET, "REPAGE_LEDGER_URL": ledger}
    write_config(workdir)
    return Clone(template, workdir, load_settings({}, flags=flags, app_fallbacks=False), env)


def clone_folder(template: Template, uri: str, workdir: Path) -> Clone:
    """The template in a new collection (on `uri`) and a copy of its bucket folder."""
    import shutil

    collection = new_collection(template, uri)
    shutil.copytree(template.bucket, workdir / "bucket")
    ledger = f"sqlite:///{workdir / 'ledger.db'}"
    store_url = (workdir / "bucket").as_uri()
    flags = dict(milvus_uri=uri, collection=collection, store_url=store_url, ledger_url=ledger,
                 lease_seconds=LEASE_SECONDS, batch_size=BATCH_SIZE, concurrency=CONCURRENCY)
    env = {"REPAGE_MILVUS_URI": uri, "REPAGE_COLLECTION": collection, "REPAGE_STORE_URL": store_url,
           "REPAGE_LEDGER_URL": ledger}
    write_config(workdir)
    return Clone(template, workdir, load_settings({}, flags=flags, app_fallbacks=False), env)


def make_template(uri: str, root: Path, *, keys_docs: int, seed: int = 11) -> Template:
    from tests.support.crash import build_synthetic

    return with_retries(lambda: Template(uri, root, build_synthetic(seed=seed, keys_docs=keys_docs),
                                         Schema(pk="auto", chunk_id_field=True, dynamic=False)))


# ---------------------------------------------------------------- nothing lost


def lost_problems(clone: Clone, *, final: bool) -> list[str]:
    """What is lost, duplicated or wrong. `final`: the store must equal a complete migration;
    else (between a faulted run and the clean one) it must be a consistent partial one: every
    row there exactly once, each either untouched or fully migrated, every original object there."""
    template, syn = clone.template, clone.template.synthetic
    with clone.open() as stores:
        got = snapshot(stores, clone.doc_ids)
    want_objects = object_hashes(syn.expected_objects())
    if final:
        problems = diff_rows(got.rows, template.expected_logical()) + diff_objects(got.objects, want_objects)
        if got.states != syn.states:
            bad = {d: (s, syn.states.get(d)) for d, s in got.states.items() if s != syn.states.get(d)}
            problems.append(f"ledger states differ (got, want): {bad}")
    else:
        problems = _partial_problems(got, template)
        originals = object_hashes(syn.objects)
        problems += [f"original object {k} lost" for k in originals if k not in got.objects]
        problems += [f"original object {k} changed" for k in originals if k in got.objects
                     and got.objects[k] != originals[k]]
        problems += [f"copy {k} has other bytes" for k in want_objects if k in got.objects
                     and got.objects[k] != want_objects[k]]
        problems += [f"document {d} left running" for d, s in got.states.items() if s == "running"]
    if got.row_count != len(syn.rows):
        problems.append(f"{got.row_count} rows in the collection, {len(syn.rows)} in the template")
    return problems


def _partial_problems(got, template: Template) -> list[str]:
    before, after = template.logical, template.expected_logical()
    problems = [f"lost chunk {i}" for i in sorted(before.keys() - got.rows.keys())]
    problems += [f"unexpected chunk {i}" for i in sorted(got.rows.keys() - before.keys())]
    for ident in sorted(got.rows.keys() & before.keys()):
        rows = got.rows[ident]
        if len(rows) != 1:
            problems.append(f"chunk {ident}: {len(rows)} rows")
        elif rows != before[ident] and rows != after[ident]:
            problems.append(f"chunk {ident}: neither untouched nor migrated: {_differs(rows[0], after[ident][0])}")
    return problems[:20]


def _differs(got: dict, want: dict) -> dict:
    return {k: (got.get(k), want.get(k)) for k in got.keys() | want.keys() if got.get(k) != want.get(k)
            and k != "vector"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

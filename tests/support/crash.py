"""Crash-test helpers (docs/design.md §5.6): a small FLTR-shaped broken store, cloned per scenario,
children that SIGKILL themselves at a failpoint, logical snapshots and their diff.

The store is synthetic on purpose (the demo takes a minute to build): legacy PyMuPDF4LLM
keys `{ds}/{doc}/images/{index}_{basename}-{page}-{n}.png` on the chunks, `image_index`
from the lexicographic sort (so `-10-0` sorts before `-2-0`), page 0 on every image and
OCR chunk, 11+ page documents, and the corner cases of the keys path: an image missing
from the bucket, a chunk that lost its key (found by listing), an image already at its
canonical key, an image whose true page is 0, a text-only and an unrecoverable document.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from repage.config import ENV_NAMES, Settings, load_settings
from repage.domain.keys import canonical_image_key, legacy_image_key, legacy_image_name, legacy_sort_index
from repage.domain.states import State
from repage.migration.runner import RunLimits, Runner, Selection, run_migration
from repage.migration.scan import scan_store
from repage.migration.work import RunOptions
from repage.stores.milvus import MilvusVectors
from repage.stores.objects import ObjectStore
from repage.stores.open import Stores, open_ledger, open_objects, open_stores

REPO = Path(__file__).resolve().parents[2]
DIM = 8
# A killed child's documents return to pending once this expires: short, so the tests wait
# little, yet well over a batch (~0.1 s), so a loaded machine does not expire live leases.
LEASE_SECONDS = 1.0
REFERENCE_LEASE_SECONDS = 120.0  # the uninterrupted run never loses a lease: its step count is exact
BATCH_SIZE = 3
CONCURRENCY = 4
APP_ENV_NAMES = (
    "MILVUS_URI",
    "MILVUS_TOKEN",
    "R2_ACCOUNT_ID",
    "R2_ACCESS_KEY_ID",
    "R2_SECRET_ACCESS_KEY",
    "R2_BUCKET_NAME",
    "REPAGE_FAILPOINT",
    "REPAGE_DEBUG",
)
BASENAMES = ("tmplg9eqtl2.pdf", "22-1426_Documents_part08of19.pdf", "Field manual - rev_3.pdf", "report_2021-final.pdf")


# ---------------------------------------------------------------- the synthetic store


@dataclass
class Synthetic:
    """Rows (no primary key), objects, and what a complete migration must produce."""

    rows: list[dict]
    objects: dict[str, bytes]
    expected: dict[tuple, tuple[int, str | None]]  # (document_id, chunk_index) -> (page, image_r2_key)
    moves: dict[str, str]  # legacy key -> canonical key the migration copies it to
    doc_ids: list[str]
    states: dict[str, str]  # document -> state after run + verify

    def expected_objects(self) -> dict[str, bytes]:
        out = dict(self.objects)
        out.update({new: self.objects[old] for old, new in self.moves.items()})
        return out


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _png(rng: random.Random) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + rng.randbytes(rng.randrange(120, 1500))


def build_synthetic(seed: int = 4, keys_docs: int = 10) -> Synthetic:
    rng = random.Random(seed)
    datasets = (_uuid(rng), _uuid(rng))
    syn = Synthetic([], {}, {}, {}, [], {})

    def row(ds: str, doc: str, filename: str, kind: str, page: int, **extra: Any) -> dict:
        index = sum(1 for r in syn.rows if r["document_id"] == doc)
        base = dict(
            text=f"{kind} chunk {index} of {filename}",
            dataset_id=ds,
            document_id=doc,
            filename=filename,
            chunk_index=index,
            document_type="pdf",
            title=filename.rsplit(".", 1)[0],
            chunk_type=kind,
            page=page,
            image_index=None,
            ocr_confidence=0.0,
            image_r2_key=None,
            image_size=None,
            vector=[rng.uniform(-1, 1) for _ in range(DIM)],
        )
        base.update(extra)
        syn.rows.append(base)
        return base

    for d in range(keys_docs):
        ds, doc = datasets[d % 2], _uuid(rng)
        basename = BASENAMES[d % len(BASENAMES)]
        filename = basename if d % 3 else f"Scanned doc {d}.pdf"
        pages = 11 + d % 4
        image_pages = {rng.randrange(10, pages), rng.randrange(2, 10), *rng.sample(range(1, pages), 3)}
        if d in (0, 4):
            image_pages.add(0)  # a true page 0: still reads 0 after the repair
        images = [(p, n) for p in sorted(image_pages) for n in range(1 + (rng.random() < 0.3))]
        names = {im: legacy_image_name(basename, im[0], im[1], "png") for im in images}
        index_of = legacy_sort_index(names.values())
        syn.doc_ids.append(doc)
        syn.states[doc] = State.VERIFIED.value
        for p in range(pages):
            row(ds, doc, filename, "text", p)
        for k, (p, n) in enumerate(sorted(images, key=lambda im: index_of[names[im]])):
            i = index_of[names[(p, n)]]
            legacy = legacy_image_key(ds, doc, i, names[(p, n)])
            canonical = canonical_image_key(ds, doc, p, i, "png")
            data = _png(rng)
            chunk_key, final_key = legacy, canonical
            if d == 1 and k == 0:  # the image never reached the bucket: page fixed, key kept
                final_key = legacy
            elif d == 3 and k == 0:  # already canonical (a reprocess from a stale checkpoint)
                chunk_key = canonical
                syn.objects[canonical] = data
            else:
                syn.objects[legacy] = data
                syn.moves[legacy] = canonical
            size = f"{rng.randrange(40, 1200)}x{rng.randrange(40, 900)}"
            lost = d == 2 and k == 0  # the chunk lost its key: found by listing the prefix
            image = row(
                ds, doc, filename, "image", 0, image_index=i, image_size=size, image_r2_key="" if lost else chunk_key
            )
            syn.expected[(doc, image["chunk_index"])] = (p, final_key)
            if rng.random() < 0.5:  # the OCR chunk of the same image shares its key
                ocr = row(
                    ds,
                    doc,
                    filename,
                    "ocr",
                    0,
                    image_index=i,
                    image_size=size,
                    image_r2_key=chunk_key,
                    ocr_confidence=round(rng.uniform(0.6, 0.98), 3),
                )
                syn.expected[(doc, ocr["chunk_index"])] = (p, final_key)

    text_only, lost = _uuid(rng), _uuid(rng)
    for p in range(3):
        row(datasets[0], text_only, "notes.pdf", "text", p)
    row(datasets[1], lost, "gone.pdf", "text", 0)
    row(datasets[1], lost, "gone.pdf", "image", 0, image_index=0, image_r2_key="", image_size="10x10")
    syn.doc_ids += [text_only, lost]
    syn.states.update({text_only: State.SKIPPED.value, lost: State.UNRECOVERABLE.value})
    return syn


# ---------------------------------------------------------------- template and clones


@dataclass(frozen=True)
class Schema:
    pk: str = "auto"
    chunk_id_field: bool = True
    dynamic: bool = False


class Template:
    """The broken store built once into the Lite server and a folder; cloned per scenario."""

    def __init__(self, uri: str, root: Path, synthetic: Synthetic, schema: Schema):
        self.uri, self.root, self.synthetic, self.schema = uri, root, synthetic, schema
        self.bucket = root / "template-bucket"
        name = f"tpl_{uuid.uuid4().hex[:10]}"
        with MilvusVectors.create_collection(
            uri, name, dim=DIM, pk=schema.pk, dynamic=schema.dynamic, chunk_id_field=schema.chunk_id_field
        ) as store:
            store.insert([self._row(store, r) for r in synthetic.rows])
            self.info = store.info()
            stored = store.fetch_documents(synthetic.doc_ids)
            self.logical = logical_rows(stored, self.info)
            self.rows = [self._clone_row(r) for r in stored]
            store.drop_collection()  # the rows above are the template from here on
        with ObjectStore.from_url(self.bucket.as_uri()) as objects:
            for key, data in synthetic.objects.items():
                objects.put(key, data)

    def _row(self, store: MilvusVectors, row: dict) -> dict:
        out = dict(row)
        if "chunk_id" in store.info().fields:
            out["chunk_id"] = f"{row['document_id']}_{row['chunk_index']}"
        if store.info().dynamic:  # $meta must survive full-row writes
            out.update(lang="en", tags=["scan", row["document_id"][:8]], score_hint=row["chunk_index"] / 7)
        return out

    def _clone_row(self, row: dict) -> dict:
        out = {k: v for k, v in row.items() if k != "$meta"}
        out.update(row.get("$meta") or {})
        if self.info.auto_id:
            out.pop(self.info.pk_field)
        return out

    def expected_logical(self) -> dict[tuple, list[dict]]:
        """The template's rows with the pages and keys a complete migration writes."""
        out = {}
        for ident, rows in self.logical.items():
            fixed = dict(rows[0])
            if ident in self.synthetic.expected:
                fixed["page"], fixed["image_r2_key"] = self.synthetic.expected[ident]
            out[ident] = [fixed]
        return out

    def clone(self, workdir: Path, lease_seconds: float = LEASE_SECONDS) -> Settings:
        """A new collection with the template's rows, a copy of the bucket, an empty ledger."""
        name = f"crash_{uuid.uuid4().hex[:12]}"
        s = self.schema
        with MilvusVectors.create_collection(
            self.uri, name, dim=DIM, pk=s.pk, dynamic=s.dynamic, chunk_id_field=s.chunk_id_field
        ) as store:
            store.insert(self.rows)
        shutil.copytree(self.bucket, workdir / "bucket")
        return scenario_settings(self.uri, name, workdir, lease_seconds)


def scenario_settings(uri: str, collection: str, workdir: Path, lease_seconds: float) -> Settings:
    flags = dict(
        milvus_uri=uri,
        collection=collection,
        store_url=(workdir / "bucket").as_uri(),
        ledger_url=f"sqlite:///{workdir / 'ledger.db'}",
        lease_seconds=lease_seconds,
        batch_size=BATCH_SIZE,
        concurrency=CONCURRENCY,
    )
    return load_settings({}, flags=flags, app_fallbacks=False)


def drop_collection(settings: Settings) -> None:
    with MilvusVectors(settings.milvus_uri, settings.collection) as store:
        store.drop_collection()


def limits_for(settings: Settings) -> RunLimits:
    """What `repage run` builds from these settings with no flags."""
    return RunLimits(batch_size=settings.batch_size, concurrency=settings.concurrency)


# ---------------------------------------------------------------- stores and runs


def renumbering_stores(settings: Settings, *, kill_on_upsert: int | None = None) -> Stores:
    """Stores whose vectors act like a real server on an auto_id collection."""
    from tests.fixtures.milvus import RenumberingVectors

    class Killing(RenumberingVectors):
        """SIGKILLs the process inside its `kill_on_upsert`-th upsert, after the insert and
        before the delete: old and new row side by side, as a crash mid-write leaves them."""

        upserts = 0

        def insert(self, rows):
            pks = super().insert(rows)
            if self._in_upsert:
                Killing.upserts += 1
                if Killing.upserts == kill_on_upsert:
                    os.kill(os.getpid(), signal.SIGKILL)
            return pks

        _in_upsert = False

        def _upsert(self, rows, partial):
            self._in_upsert = True
            try:
                super()._upsert(rows, partial)
            finally:
                self._in_upsert = False

    stores = Stores(settings)
    try:
        for name, opener in (
            ("ledger", open_ledger),
            ("vectors", lambda s: Killing(s.milvus_uri, s.collection)),
            ("objects", open_objects),
        ):
            store = opener(settings)
            setattr(stores, name, store)
            stores._opened.append(store)
    except BaseException:
        stores.close()
        raise
    return stores


def open_for(settings: Settings, renumbering: bool) -> Stores:
    return renumbering_stores(settings) if renumbering else open_stores(settings)


@dataclass
class CleanRun:
    summary: Any
    hits: int
    by_name: Counter = field(default_factory=Counter)


def counted_run(stores: Stores) -> CleanRun:
    """An uninterrupted run (scan first, as `repage run` does) counting the failpoint steps."""
    if not stores.ledger.counts():
        scan_store(stores)
    runner = Runner(stores, RunOptions(), limits_for(stores.settings), Selection())
    points, by_name = runner.migrator.failpoints, Counter()
    hit = points.hit

    def counting(name: str) -> None:
        by_name[name] += 1
        hit(name)

    points.hit = counting
    summary = runner.run()
    return CleanRun(summary, points.count, by_name)


def resume(stores: Stores):
    """The next run after a crash: once the dead worker's leases expired, finish the work."""
    wait_for_expired_leases(stores.ledger)
    return run_migration(stores, RunOptions(), limits_for(stores.settings), Selection())


def wait_for_expired_leases(ledger, timeout: float = 30.0) -> int:
    """Poll the ledger's own clock until every running document's lease has expired."""
    leases = [r.lease_expires for r in ledger.documents(states={State.RUNNING}) if r.lease_expires is not None]
    if not leases:
        return 0
    until, deadline = max(leases), time.monotonic() + timeout
    while (now := ledger.db_now()) <= until:
        if time.monotonic() > deadline:
            raise AssertionError(f"leases did not expire within {timeout}s")
        time.sleep(min(0.02, until - now + 0.001))
    return len(leases)


# ---------------------------------------------------------------- children


@dataclass
class ChildResult:
    returncode: int | None
    stdout: str = ""
    stderr: str = ""


def write_config(workdir: Path, settings: Settings) -> Path:
    """The run's tuning as a repage.toml (the child gets the stores from REPAGE_* env)."""
    path = workdir / "repage.toml"
    path.write_text(
        f"[repage]\nlease_seconds = {settings.lease_seconds}\nbatch_size = {settings.batch_size}\n"
        f"concurrency = {settings.concurrency}\n",
        encoding="utf-8",
    )
    return path


def child_env(settings: Settings, failpoint: str | None = None) -> dict:
    """This environment without inherited repage/app variables, plus the stores of `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES and k not in APP_ENV_NAMES}
    env.update(
        REPAGE_MILVUS_URI=settings.milvus_uri,
        REPAGE_COLLECTION=settings.collection,
        REPAGE_STORE_URL=settings.store_url,
        REPAGE_LEDGER_URL=settings.ledger_url,
        PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH")))),
    )
    if failpoint:
        env["REPAGE_FAILPOINT"] = failpoint
    return env


def run_cli_child(settings: Settings, workdir: Path, failpoint: str | None, timeout: float = 120.0) -> ChildResult:
    """`python -m repage.cli run` with REPAGE_* env and a repage.toml (lease, batch size)."""
    env = child_env(settings, failpoint)
    config = write_config(workdir, settings)
    proc = subprocess.run(
        [sys.executable, "-m", "repage.cli", "--config", str(config), "run", "--json"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return ChildResult(proc.returncode, proc.stdout, proc.stderr)


def _renumbering_child(flags: dict, failpoint: str | None, kill_on_upsert: int | None) -> None:
    settings = load_settings({}, flags=flags, app_fallbacks=False)
    with renumbering_stores(settings, kill_on_upsert=kill_on_upsert) as stores:
        summary = run_migration(stores, RunOptions(failpoint=failpoint), limits_for(settings), Selection())
    sys.exit(1 if summary.failed else 0)


def _scan_killing_child(flags: dict, flush_every: int) -> None:
    """`repage run` on an empty ledger, killed right after the scan's first ledger flush, as
    a crash part-way through the scan of a store larger than one flush (500 documents)."""
    from repage.migration import scan
    from repage.stores.ledger import Ledger

    scan.FLUSH_EVERY = flush_every
    upsert_scan = Ledger.upsert_scan

    def upsert_then_die(self, records):
        records = list(records)
        upsert_scan(self, records)
        if records:
            os.kill(os.getpid(), signal.SIGKILL)

    Ledger.upsert_scan = upsert_then_die
    settings = load_settings({}, flags=flags, app_fallbacks=False)
    with open_stores(settings) as stores:
        run_migration(stores, RunOptions(), limits_for(settings), Selection())
    sys.exit(0)


def _flags(settings: Settings) -> dict:
    return {
        k: getattr(settings, k)
        for k in ("milvus_uri", "collection", "store_url", "ledger_url", "lease_seconds", "batch_size", "concurrency")
    }


def run_scan_killing_child(settings: Settings, flush_every: int, timeout: float = 120.0) -> ChildResult:
    return _spawn(_scan_killing_child, (_flags(settings), flush_every), timeout)


def run_renumbering_child(
    settings: Settings, failpoint: str | None = None, *, kill_on_upsert: int | None = None, timeout: float = 120.0
) -> ChildResult:
    """A spawned process (fresh gRPC channels, no inherited state) running the migration
    with the renumbering adapter, dying at the failpoint."""
    return _spawn(_renumbering_child, (_flags(settings), failpoint, kill_on_upsert), timeout)


def _spawn(target, args: tuple, timeout: float) -> ChildResult:
    proc = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return ChildResult(None, stderr=f"child still running after {timeout}s")
    return ChildResult(proc.exitcode)


# ---------------------------------------------------------------- snapshots


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def logical_rows(rows: list[dict], info) -> dict[tuple, list[dict]]:
    """Rows by stable identity (document_id, chunk_index): every field, `$meta` flattened, the
    vector as float32 bytes; an auto_id primary key left out (a server renumbers it)."""
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        flat = {k: _plain(v) for k, v in row.items() if k != "$meta"}
        flat.update({k: _plain(v) for k, v in (row.get("$meta") or {}).items()})
        if info.auto_id:
            flat.pop(info.pk_field, None)
        flat[info.vector_field] = np.asarray(row[info.vector_field], dtype=np.float32).tobytes().hex()
        out.setdefault((flat["document_id"], flat["chunk_index"]), []).append(flat)
    return dict(sorted(out.items()))


@dataclass
class Snapshot:
    rows: dict[tuple, list[dict]]
    row_count: int
    objects: dict[str, str]  # key -> sha256 of the bytes
    states: dict[str, str]
    pks: dict[str, list[str]]  # current primary keys by journal identity (within one collection only)


def snapshot(stores: Stores, doc_ids: list[str]) -> Snapshot:
    vectors, info = stores.vectors, stores.vectors.info()
    rows = vectors.fetch_documents(doc_ids)
    pks: dict[str, list[str]] = {}
    for r in rows:
        pks.setdefault(info.identity.text(r), []).append(str(r[info.pk_field]))
    objects = {}
    for page in stores.objects.list(""):
        for obj in page:
            objects[obj.key] = hashlib.sha256(stores.objects.get(obj.key)).hexdigest()
    states = {r.document_id: r.state.value for r in stores.ledger.documents()}
    return Snapshot(logical_rows(rows, info), vectors.count(""), dict(sorted(objects.items())), states, pks)


def object_hashes(objects: dict[str, bytes]) -> dict[str, str]:
    return dict(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in objects.items()))


def diff_rows(got: dict[tuple, list[dict]], want: dict[tuple, list[dict]], limit: int = 12) -> list[str]:
    problems = []
    for ident in sorted(want.keys() - got.keys()):
        problems.append(f"lost chunk {ident}")
    for ident in sorted(got.keys() - want.keys()):
        problems.append(f"unexpected chunk {ident}")
    for ident in sorted(got.keys() & want.keys()):
        g, w = got[ident], want[ident]
        if len(g) != len(w):
            problems.append(f"chunk {ident}: {len(g)} rows, expected {len(w)} (duplicated or lost)")
        elif g != w:
            fields = sorted(k for k in g[0].keys() | w[0].keys() if g[0].get(k) != w[0].get(k))
            shown = {k: (g[0].get(k), w[0].get(k)) for k in fields if k != "vector"}
            problems.append(f"chunk {ident}: fields differ {fields} (got, want) {shown}")
    return problems[:limit] + ([f"... {len(problems) - limit} more"] if len(problems) > limit else [])


def diff_objects(got: dict[str, str], want: dict[str, str], limit: int = 12) -> list[str]:
    problems = [f"missing object {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"orphaned object {k}" for k in sorted(got.keys() - want.keys())]
    problems += [f"object {k} has other bytes" for k in sorted(got.keys() & want.keys()) if got[k] != want[k]]
    return problems[:limit] + ([f"... {len(problems) - limit} more"] if len(problems) > limit else [])


def diff_snapshots(got: Snapshot, want: Snapshot) -> list[str]:
    problems = diff_rows(got.rows, want.rows) + diff_objects(got.objects, want.objects)
    if got.row_count != sum(len(v) for v in got.rows.values()):
        problems.append(
            f"collection holds {got.row_count} rows, {sum(len(v) for v in got.rows.values())} belong to known documents"
        )
    if got.row_count != want.row_count:
        problems.append(f"{got.row_count} rows in the collection, {want.row_count} after an uninterrupted run")
    if got.states != want.states:
        bad = {d: (s, want.states.get(d)) for d, s in got.states.items() if s != want.states.get(d)}
        problems.append(f"ledger states differ (got, want): {bad}")
    return problems

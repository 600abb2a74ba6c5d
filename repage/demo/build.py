"""`build_demo`: a realistic broken store (Milvus + bucket) and its ground truth.

Order matters for a safe rebuild: wipe what the previous demo left (its collection,
its objects, the ledger file inside data_dir), build everything in memory, then write
Milvus, the bucket, and the ground truth last, so a ground-truth file on disk always
describes a store that was fully written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from repage.config import Settings, demo_settings
from repage.demo import corpus as corpus_mod
from repage.demo.embed import MODEL_NAME, embed_all
from repage.demo.ingest import IngestedDoc, ingest_corpus
from repage.errors import ConfigError, StoreError
from repage.stores.files import make_private_dirs
from repage.stores.milvus import AFFECTED_FILTER, MilvusVectors
from repage.stores.objects import ObjectStore
from repage.stores.open import open_objects

GROUND_TRUTH = "ground-truth.json"
CONFIG = "repage.toml"  # the demo's settings for later commands: `repage --config repage-data/repage.toml ...`
COLLECTION = "fltr_documents"
LEDGER_SIDECARS = ("", "-wal", "-shm", "-journal")

VectorsFactory = Callable[..., MilvusVectors]  # called as factory(pk=..., dim=...)
Log = Callable[[str], None]


@dataclass
class DemoSummary:
    """What was built, where, and how long it took (seconds)."""

    data_dir: str
    milvus: str
    collection: str
    pk: str
    store: str
    ground_truth: str
    ledger: str
    embedding_model: str
    seed: int
    packages: list[str]
    config: str = ""  # data_dir/repage.toml: the demo's stores and embedding model, for later commands
    datasets: dict[str, str] = field(default_factory=dict)  # name -> dataset_id
    documents: int = 0
    pages: int = 0
    chunks: int = 0
    images: int = 0
    images_in_bucket: int = 0
    affected_chunks: int = 0
    objects: int = 0
    bytes_uploaded: int = 0
    scenarios: dict[str, dict[str, int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    to_dict = as_dict


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)


# ---------------------------------------------------------------- stores


def fresh_collection(uri: str, collection: str = COLLECTION, token: str | None = None) -> VectorsFactory:
    """A factory that drops `collection` if it exists and creates it anew (pk variant, dim)."""

    def factory(*, pk: str, dim: int) -> MilvusVectors:
        try:
            old = MilvusVectors(uri, collection, token)
        except ConfigError:  # the collection does not exist yet: nothing to wipe
            pass
        else:
            with old:
                old.drop_collection()
        return MilvusVectors.create_collection(uri, collection, token, pk=pk, dim=dim)

    return factory


def _open_vectors(
    vectors: VectorsFactory | MilvusVectors | None, settings: Settings, pk: str, dim: int
) -> MilvusVectors:
    if vectors is None:
        token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
        vectors = fresh_collection(settings.milvus_uri, settings.collection, token)
    if not isinstance(vectors, MilvusVectors):
        return vectors(pk=pk, dim=dim)
    # An instance cannot be recreated with another pk variant: accept it only empty and matching.
    info = vectors.info()
    variant = "auto" if info.auto_id else "chunk_id"
    if variant != pk or info.dim != dim or vectors.count("") != 0:
        raise ConfigError(
            f"collection {info.name!r} is not an empty pk={pk} dim={dim} collection: pass "
            "repage.demo.fresh_collection(uri) so the demo can recreate it"
        )
    return vectors


def _inside(path: Path, data_dir: Path) -> bool:
    return path.resolve().is_relative_to(data_dir)


def _sqlite_path(ledger_url: str) -> Path | None:
    return Path(ledger_url.removeprefix("sqlite:///")) if ledger_url.startswith("sqlite:///") else None


def _wipe_ledger(ledger: Path | None, data_dir: Path, log: Log) -> None:
    if ledger is None:  # a PostgreSQL ledger is no file of ours to delete
        log("demo: the ledger is not a SQLite file: left as it is")
        return
    if not _inside(ledger, data_dir):
        raise ConfigError(f"ledger {ledger} is outside {data_dir}: the demo only deletes files inside its data dir")
    for suffix in LEDGER_SIDECARS:
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)


def _previous_datasets(data_dir: Path) -> set[str]:
    try:
        truth = json.loads((data_dir / GROUND_TRUTH).read_text(encoding="utf-8"))
        return {d["dataset_id"] for d in truth.get("documents", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _wipe_objects(objects: ObjectStore, datasets: set[str]) -> int:
    """Delete every object under the demo's dataset prefixes (and nothing else)."""
    # Keys first, deletes after: never delete under a listing that is still paging.
    keys = [info.key for ds in sorted(datasets) for page in objects.list(f"{ds}/") for info in page]
    for key in keys:
        objects.delete(key)
    return len(keys)


def _open_objects(settings: Settings, data_dir: Path) -> ObjectStore:
    """The settings' store; a local bucket folder inside data_dir is recreated empty."""
    url = settings.store_url
    if url.startswith("file://"):
        folder = Path(url.removeprefix("file://")).expanduser().resolve()
        if _inside(folder, data_dir) and folder != data_dir:
            shutil.rmtree(folder, ignore_errors=True)
            make_private_dirs(folder)
    return open_objects(settings)


# ---------------------------------------------------------------- rows and truth


def milvus_rows(docs: Sequence[IngestedDoc], dim: int) -> list[dict]:
    """Every chunk row with its vector; both pk variants take the same rows (chunk_id field)."""
    rows = [row for doc in docs for row in doc.rows]
    for row, vector in zip(rows, embed_all((r["text"] for r in rows), dim), strict=True):
        row["vector"] = vector
    return rows


def _scenario_counts(docs: Sequence[IngestedDoc]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for doc in docs:
        t = doc.truth
        counts[t["scenario"]].update(
            documents=1,
            pages=t["page_count"],
            chunks=t["chunk_count"],
            images=t["images_total"],
            images_in_bucket=t["images_in_bucket"],
            affected_chunks=len(t["affected_chunks"]),
        )
    return {name: dict(c) for name, c in sorted(counts.items())}


def ground_truth(docs: Sequence[IngestedDoc], summary: DemoSummary) -> dict:
    return {
        "about": "Written by `repage demo` from construction knowledge; never read by the migration.",
        "seed": summary.seed,
        "collection": summary.collection,
        "pk": summary.pk,
        "embedding_model": summary.embedding_model,
        "packages": summary.packages,
        "datasets": summary.datasets,
        "affected_filter": AFFECTED_FILTER,
        "totals": {
            k: getattr(summary, k)
            for k in ("documents", "pages", "chunks", "images", "images_in_bucket", "affected_chunks")
        },
        "documents": [doc.truth for doc in docs],
    }


def demo_config(settings: Settings) -> dict[str, str]:
    """What later commands need to work on the demo store: its local stores (never a server URL, which
    may carry a password) and the embedding model its vectors come from, which the local reprocess
    pipeline must compute (docs/design.md §2.4, §7.4)."""
    local = {
        "milvus_uri": settings.milvus_uri.endswith(".db") and "://" not in settings.milvus_uri,
        "store_url": settings.store_url.startswith("file://"),
        "ledger_url": settings.ledger_url.startswith("sqlite:///"),
        "collection": True,
    }
    values = {name: getattr(settings, name) for name, ok in local.items() if ok}
    return values | {"embedding_model": MODEL_NAME, "reprocess_backend": "local"}


def write_config(path: Path, settings: Settings) -> Path:
    """The demo's repage.toml (docs/design.md §6.2), owner-only like the rest of the data folder."""
    lines = ["# written by `repage demo`: the demo store's settings", "[repage]"]
    lines += [f"{name} = {json.dumps(value)}" for name, value in demo_config(settings).items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.chmod(0o600)
    os.replace(tmp, path)
    return path


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _summarize(summary: DemoSummary, docs: Sequence[IngestedDoc]) -> None:
    summary.documents = len(docs)
    summary.datasets = {d.corpus.spec.dataset: d.dataset_id for d in docs}
    summary.pages = sum(d.corpus.page_count for d in docs)
    summary.chunks = sum(len(d.rows) for d in docs)
    summary.images = sum(d.images_total for d in docs)
    summary.images_in_bucket = sum(d.truth["images_in_bucket"] for d in docs)
    summary.affected_chunks = sum(d.affected for d in docs)
    summary.objects = sum(len(d.uploads) for d in docs)
    summary.bytes_uploaded = sum(len(data) for d in docs for _, data in d.uploads)
    summary.scenarios = _scenario_counts(docs)


# ---------------------------------------------------------------- the entry point


def build_demo(
    data_dir: Path,
    *,
    pk: str = "auto",
    settings: Settings | None = None,
    vectors: VectorsFactory | MilvusVectors | None = None,
    objects: ObjectStore | None = None,
    dim: int = 1536,
    cache_dir: Path | None = None,
    seed: int = 7,
    ledger_path: Path | None = None,
    log: Log | None = None,
) -> DemoSummary:
    """Build the demo store into `data_dir` (wiping the previous demo first).

    settings: where the stores are; default `demo_settings(data_dir)` (Milvus Lite
    data_dir/milvus.db, bucket folder data_dir/bucket, ledger data_dir/ledger.db).
    vectors: overrides settings: a factory(pk=, dim=) returning a freshly created
    collection (see `fresh_collection`), or an empty MilvusVectors of that pk and dim.
    objects: overrides settings: any ObjectStore; only the demo's dataset prefixes are
    deleted in it (a bucket folder from settings inside data_dir is recreated instead).
    ledger_path: the SQLite ledger file to delete (default from settings; inside data_dir).
    """
    if pk not in ("auto", "chunk_id"):
        raise ConfigError(f"pk must be 'auto' or 'chunk_id', not {pk!r}")
    data_dir = Path(data_dir).expanduser().resolve()
    make_private_dirs(data_dir)  # owner-only at every level, as the ledger in it
    settings = settings or demo_settings(data_dir)
    log = log or (lambda message: None)
    ledger = ledger_path or _sqlite_path(settings.ledger_url)
    timer = _Timer()
    with timer("total"):
        with timer("wipe"):
            _wipe_ledger(ledger, data_dir, log)
            previous = _previous_datasets(data_dir)
            (data_dir / GROUND_TRUTH).unlink(missing_ok=True)
        docs = _make_documents(cache_dir, seed, timer, log)
        with timer("embed"):
            rows = milvus_rows(docs, dim)
        store = _write_vectors(vectors, settings, pk, dim, rows, timer, log)
        summary = DemoSummary(
            data_dir=str(data_dir),
            milvus=store.describe(),
            collection=store.collection,
            pk=pk,
            store="",
            ground_truth=str(data_dir / GROUND_TRUTH),
            ledger=str(ledger or settings.ledger_url),
            embedding_model=MODEL_NAME,
            seed=seed,
            packages=corpus_mod.packages(),
        )
        _summarize(summary, docs)
        with timer("check"):
            try:
                _check_counts(store, summary)
            finally:
                _close_ours(store, vectors)
        with timer("bucket"):
            summary.store = _write_objects(objects, settings, data_dir, docs, previous)
        log(f"demo: {summary.objects} objects ({summary.bytes_uploaded / 1e6:.1f} MB) in {summary.store}")
        _write_json(data_dir / GROUND_TRUTH, ground_truth(docs, summary))
        log(f"demo: ground truth in {summary.ground_truth}")
        summary.config = str(write_config(data_dir / CONFIG, settings))
        log(f"demo: settings in {summary.config} (repage --config {summary.config} ...)")
    summary.timings = timer.timings
    return summary


def _make_documents(cache_dir: Path | None, seed: int, timer: _Timer, log: Log) -> list[IngestedDoc]:
    cache = cache_dir or corpus_mod.DEFAULT_CACHE
    with timer("corpus"):
        log(f"demo: Debian packages {', '.join(corpus_mod.packages())} (cache {cache})")
        made = corpus_mod.build_corpus(cache, seed=seed)
    with timer("ingest"):
        docs = ingest_corpus(made, seed)
    pages = sum(d.corpus.page_count for d in docs)
    log(f"demo: {len(docs)} documents, {pages} pages, {sum(d.images_total for d in docs)} images")
    return docs


def _write_vectors(
    vectors, settings: Settings, pk: str, dim: int, rows: list[dict], timer: _Timer, log: Log
) -> MilvusVectors:
    with timer("milvus"):
        store = _open_vectors(vectors, settings, pk, dim)
        try:
            store.insert(rows)
        except BaseException:
            _close_ours(store, vectors)
            raise
    log(f"demo: {len(rows)} chunks (pk={pk}, {MODEL_NAME}) in {store.describe()}")
    return store


def _write_objects(
    objects: ObjectStore | None, settings: Settings, data_dir: Path, docs: Sequence[IngestedDoc], previous: set[str]
) -> str:
    """Upload images and sources; returns where. Closes the store only if it opened it."""
    store = objects or _open_objects(settings, data_dir)
    try:
        _wipe_objects(store, previous | {d.dataset_id for d in docs})
        for doc in docs:
            for key, data in doc.uploads:
                store.put(key, data)
        return store.describe()
    finally:
        if objects is None:
            store.close()


def _check_counts(store: MilvusVectors, summary: DemoSummary) -> None:
    """Milvus must hold exactly what we built: catches a silent partial insert."""
    total, affected = store.count(""), store.count(AFFECTED_FILTER)
    if (total, affected) != (summary.chunks, summary.affected_chunks):
        raise StoreError(
            f"demo collection holds {total} chunks ({affected} affected), "
            f"built {summary.chunks} ({summary.affected_chunks} affected)"
        )


def _close_ours(store: MilvusVectors, given: object) -> None:
    # Close what build_demo opened (an in-process Lite keeps its folder locked);
    # an instance the caller passed stays theirs to close.
    if store is not given:
        store.close()

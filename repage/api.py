"""The library's entry points: one function per command, called by the CLI and the HTTP service.

Each takes Settings (already validated), opens what it needs and returns a plain dict
(the `--json` document). Nothing here prints: progress goes to the callbacks the caller
passes, and people's renderings live in `repage.cli.render`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from repage.config import Settings
from repage.domain.access import (
    AccessImportError,
    aggregate,
    format_of,
    half_life_seconds,
    parse_access_log,
    spread_datasets,
)
from repage.errors import ConfigError, RepageError
from repage.migration import probe
from repage.migration.review import accept, list_reviews, reject
from repage.migration.scan import scan_completed, scan_store
from repage.migration.status import top_documents
from repage.stores.files import permission_warnings
from repage.stores.open import open_objects, open_stores, open_vectors

Progress = Callable[[int, int], None]
Log = Callable[[str], None]


def doctor(settings: Settings) -> dict:
    """Resolved configuration (redacted) and whether each store answers. Writes nothing."""
    report: dict = {"settings": settings.redacted(), "stores": {}}
    for name, check in (("milvus", _doctor_vectors), ("bucket", _doctor_objects), ("ledger", _doctor_ledger)):
        try:
            report["stores"][name] = {"ok": True, **check(settings)}
        except RepageError as exc:
            report["stores"][name] = {"ok": False, "error": str(exc)}
    report["ok"] = all(s["ok"] for s in report["stores"].values())
    # local files others can read: a warning each, not a failure (docs/design.md §6.6)
    report["warnings"] = permission_warnings(settings.ledger_url, settings.store_url, settings.milvus_uri)
    return report


def _doctor_vectors(settings: Settings) -> dict:
    if not settings.milvus_uri.startswith(("http://", "https://", "tcp://")) and not Path(settings.milvus_uri).exists():
        raise RepageError(
            f"Milvus Lite file {settings.milvus_uri} does not exist (doctor creates nothing): "
            "run `repage demo` or set REPAGE_MILVUS_URI"
        )
    vectors = open_vectors(settings)
    try:
        info = vectors.info()
        return {
            "uri": vectors.describe(),
            "schema": info.as_dict(),
            "partial_update": vectors.supports_partial_update(),
            "rows": vectors.count(),
        }
    finally:
        vectors.close()


def _doctor_objects(settings: Settings) -> dict:
    url = settings.store_url
    if url.startswith("file://") and not Path(url.removeprefix("file://")).is_dir():
        raise RepageError(f"bucket folder {url} does not exist (doctor creates nothing)")
    objects = open_objects(settings)
    try:
        objects.check()
        return {"url": objects.describe()}
    finally:
        objects.close()


def _doctor_ledger(settings: Settings) -> dict:
    from repage.stores.ledger import Ledger

    return Ledger.probe(settings.ledger_url)


def scan(settings: Settings, *, dataset_id: str | None = None, progress: Progress | None = None) -> dict:
    with open_stores(settings) as stores:
        started = time.perf_counter()
        report = scan_store(stores, dataset_id=dataset_id, progress=progress)
        result = report.as_dict()
        result["seconds"] = round(time.perf_counter() - started, 3)
        return result


def estimate(settings: Settings, *, sample: int = 20) -> dict:
    """Scan first when the ledger is empty, then measure latencies and apply the model."""
    with open_stores(settings) as stores:
        assert stores.ledger is not None  # open_stores opened it
        if not stores.ledger.counts() or not scan_completed(stores.ledger):  # none, or a killed scan's part
            scan_store(stores)
        return probe.estimate_store(stores, sample=sample).as_report()


def demo(
    settings: Settings, *, data_dir: Path, pk: str, log: Log | None = None, progress: Progress | None = None
) -> dict:
    """Build the broken demo store under data_dir, scan, estimate, migrate and verify it.

    The before/after figures compare Milvus with the demo's ground truth: the report
    reads it, the migration never does.
    """
    from repage.demo import build_demo
    from repage.migration.runner import RunLimits, Selection
    from repage.migration.work import RunOptions

    log = log or (lambda message: None)
    started = time.perf_counter()
    summary = build_demo(data_dir, settings=settings, pk=pk, log=log)
    report: dict[str, Any] = {
        "build": _build_summary(summary),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    truth = json.loads(Path(summary.ground_truth).read_text())
    report["before"] = page_accuracy(settings, truth)
    report["scan"] = scan(settings, progress=progress)
    report["scan"].pop("documents")
    report["estimate"] = estimate(settings)
    from repage.domain.states import RepairPath

    log("migrating the keys and pdf paths ...")
    report["run"] = run(
        settings,
        RunOptions(),
        RunLimits(batch_size=settings.batch_size, concurrency=settings.concurrency),
        Selection(paths=frozenset({RepairPath.KEYS, RepairPath.PDF})),
    )
    report["verify"] = verify(settings)
    report["after"] = page_accuracy(settings, truth)
    return report


def _build_summary(summary) -> dict:
    keep = (
        "data_dir",
        "documents",
        "pages",
        "chunks",
        "images",
        "images_in_bucket",
        "affected_chunks",
        "embedding_model",
        "packages",
        "config",
    )
    return {k: v for k, v in summary.as_dict().items() if k in keep}


def page_accuracy(settings: Settings, truth: dict) -> dict:
    """Per expected path: affected chunks whose page equals the true page, still 0, or wrong."""
    with open_stores(settings, objects=False, ledger=False) as stores:
        assert stores.vectors is not None  # open_stores opened it
        docs = [d["document_id"] for d in truth["documents"]]
        rows = stores.vectors.fetch_documents(docs, fields=["chunk_id", "page"], with_vectors=False)
    pages = {r["chunk_id"]: r["page"] for r in rows}
    by_path: dict[str, dict[str, int]] = {}
    for doc in truth["documents"]:
        counts = by_path.setdefault(doc["expected_path"], {"right": 0, "still_0": 0, "wrong": 0})
        for chunk in doc["affected_chunks"]:
            page = pages.get(chunk["chunk_id"])
            label = "right" if page == chunk["true_page"] else "still_0" if page == 0 else "wrong"
            counts[label] += 1
    return by_path


def run(settings: Settings, options, limits, selection, *, on_batch=None, stop=None) -> dict:
    from repage.migration.runner import run_migration
    from repage.stores.ledger import Ledger

    # A dry run writes nothing anywhere: not even a new ledger (run_migration scans into a scratch one).
    no_ledger = options.dry_run and not Ledger.probe(settings.ledger_url).get("schema_version")
    with open_stores(settings, ledger=not no_ledger) as stores:
        return run_migration(stores, options, limits, selection, on_batch=on_batch, stop=stop).as_dict()


def status(settings: Settings) -> dict:
    from repage.migration.status import migration_status

    with open_stores(settings, vectors=False, objects=False) as stores:
        return migration_status(stores.ledger, settings.prices)


def set_paused(settings: Settings, paused: bool, who: str = "admin") -> dict:
    """`repage pause`/`resume` and the service's admin routes: the ledger's pause signal."""
    from repage.migration.status import pause_reason
    from repage.migration.status import set_paused as write_pause

    with open_stores(settings, vectors=False, objects=False) as stores:
        write_pause(stores.ledger, paused, who)
        reason = pause_reason(stores.ledger)
    return {"paused": reason is not None, "paused_because": reason}


def verify(settings: Settings, document_ids=None, *, sample: int | None = None) -> dict:
    from repage.migration.verify import verify_documents

    with open_stores(settings) as stores:
        # the run's bucket concurrency: a bucket 30 ms away needs as many requests in flight here
        return verify_documents(stores, document_ids, sample=sample, concurrency=settings.concurrency).as_dict()


def rollback(settings: Settings, document_ids=None) -> dict:
    from repage.migration.rollback import rollback_documents

    with open_stores(settings) as stores:
        return rollback_documents(stores, document_ids, concurrency=settings.concurrency).as_dict()


def gc(settings: Settings, grace_seconds: float) -> dict:
    from repage.migration.rollback import gc_objects

    with open_stores(settings) as stores:
        return gc_objects(stores, grace_seconds, concurrency=settings.concurrency)


def review_list(settings: Settings) -> dict:
    with open_stores(settings, vectors=False, objects=False) as stores:
        return list_reviews(stores.ledger)


def review_decide(settings: Settings, document_id: str, decision: str) -> dict:
    with open_stores(settings, vectors=False, objects=False) as stores:
        return (accept if decision == "accept" else reject)(stores.ledger, document_id)


def import_access_file(settings: Settings, path: Path, fmt: str | None = None) -> dict:
    """Read a CSV/JSONL access log (all or nothing), then add its decayed hits to the ledger.

    A dataset hit counts for each document the ledger knows in that dataset: scan first.
    """
    fmt = format_of(path.name, fmt)
    half_life = half_life_seconds(settings.access_half_life_hours)
    try:
        with path.open(newline="", encoding="utf-8") as lines:
            agg = aggregate(parse_access_log(lines, fmt, str(path), now=time.time()), half_life)
    except UnicodeDecodeError as exc:
        raise AccessImportError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    with open_stores(settings, vectors=False, objects=False) as stores:
        assert stores.ledger is not None  # open_stores opened it
        members = stores.ledger.document_ids_by_dataset(agg.datasets)
        documents = spread_datasets(agg, members, half_life)
        stores.ledger.record_accesses({d: (agg.dataset_of.get(d), hits) for d, hits in documents.items()}, half_life)
    unmatched = sorted(ds for ds in agg.datasets if ds not in members)
    return {
        "file": str(path),
        "format": fmt,
        "rows": agg.rows,
        "documents": len(agg.documents),
        "datasets": len(agg.datasets),
        "documents_updated": len(documents),
        "unmatched_datasets": unmatched[:20],
        "unmatched_dataset_count": len(unmatched),
    }


def access_top(settings: Settings, limit: int = 20) -> dict:
    """The most used documents by decayed access count, now."""
    with open_stores(settings, vectors=False, objects=False) as stores:
        return top_documents(stores.ledger, settings.access_half_life_hours, limit)

"""One entry point per command: the CLI and the HTTP service both call these.

Each takes Settings (already validated), opens what it needs, returns a plain dict
(the `--json` document). Renderers for people live at the bottom.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from repage.migration import probe
from repage.stores.open import open_objects, open_stores, open_vectors
from repage.config import Settings
from repage.errors import RepageError
from repage.domain.estimate import human_seconds
from repage.migration.scan import scan_completed, scan_store


def doctor(settings: Settings) -> dict:
    """Resolved configuration (redacted) and whether each store answers. Writes nothing."""
    report: dict = {"settings": settings.redacted(), "stores": {}}
    for name, check in (("milvus", _doctor_vectors), ("bucket", _doctor_objects), ("ledger", _doctor_ledger)):
        try:
            report["stores"][name] = {"ok": True, **check(settings)}
        except RepageError as exc:
            report["stores"][name] = {"ok": False, "error": str(exc)}
    report["ok"] = all(s["ok"] for s in report["stores"].values())
    return report


def _doctor_vectors(settings: Settings) -> dict:
    if not settings.milvus_uri.startswith(("http://", "https://", "tcp://")) and not Path(settings.milvus_uri).exists():
        raise RepageError(f"Milvus Lite file {settings.milvus_uri} does not exist (doctor creates nothing): "
                          "run `repage demo` or set REPAGE_MILVUS_URI")
    vectors = open_vectors(settings)
    try:
        info = vectors.info()
        return {"uri": vectors.describe(), "schema": info.as_dict(),
                "partial_update": vectors.supports_partial_update(), "rows": vectors.count()}
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


def scan(settings: Settings, *, dataset_id: str | None = None, console: Console | None = None) -> dict:
    with open_stores(settings) as stores:
        started = time.perf_counter()
        report = scan_store(stores, dataset_id=dataset_id, progress=_progress(console, "scan"))
        result = report.as_dict()
        result["seconds"] = round(time.perf_counter() - started, 3)
        return result


def estimate(settings: Settings, *, sample: int = 20) -> dict:
    """Scan first when the ledger is empty, then measure latencies and apply the model."""
    with open_stores(settings) as stores:
        if not stores.ledger.counts() or not scan_completed(stores.ledger):  # none, or a killed scan's part
            scan_store(stores)
        return probe.estimate_store(stores, sample=sample).as_report()


def demo(settings: Settings, *, data_dir: Path, pk: str, console: Console | None = None) -> dict:
    """Build the broken demo store under data_dir, scan, estimate, migrate and verify it.

    The before/after figures compare Milvus with the demo's ground truth: the report
    reads it, the migration never does.
    """
    from repage.demo import build_demo
    from repage.migration.migrate import RunOptions
    from repage.migration.runner import RunLimits, Selection

    log = _log(console)
    started = time.perf_counter()
    summary = build_demo(data_dir, settings=settings, pk=pk, log=log)
    report = {"build": _build_summary(summary), "build_seconds": round(time.perf_counter() - started, 1)}
    truth = json.loads(Path(summary.ground_truth).read_text())
    report["before"] = page_accuracy(settings, truth)
    report["scan"] = scan(settings, console=console)
    report["scan"].pop("documents")
    report["estimate"] = estimate(settings)
    from repage.domain.states import Path as RepairPath

    log("migrating the keys and pdf paths ...")
    report["run"] = run(settings, RunOptions(), RunLimits(batch_size=settings.batch_size,
                                                          concurrency=settings.concurrency),
                        Selection(paths=frozenset({RepairPath.KEYS, RepairPath.PDF})))
    report["verify"] = verify(settings)
    report["after"] = page_accuracy(settings, truth)
    return report


def _build_summary(summary) -> dict:
    keep = ("data_dir", "documents", "pages", "chunks", "images", "images_in_bucket", "affected_chunks",
            "embedding_model", "packages")
    return {k: v for k, v in summary.as_dict().items() if k in keep}


def page_accuracy(settings: Settings, truth: dict) -> dict:
    """Per expected path: affected chunks whose page equals the true page, still 0, or wrong."""
    with open_stores(settings, objects=False, ledger=False) as stores:
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


def _progress(console: Console | None, what: str) -> Callable[[int, int], None] | None:
    if console is None:
        return None

    def show(done: int, total: int) -> None:
        if done == total or done % 500 == 0:
            console.print(f"{what}: {done}/{total} documents", markup=False)
    return show


def _log(console: Console | None) -> Callable[[str], None]:
    return (lambda message: console.print(message, markup=False)) if console else (lambda message: None)


# ---- renderers (people) ----

def render_doctor(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        for key, value in report["settings"].items():
            console.print(f"{key:24} {value}", markup=False)
        for name, state in report["stores"].items():
            mark = "ok" if state["ok"] else "FAILED"
            detail = state.get("error") or ", ".join(f"{k}={v}" for k, v in state.items() if k not in {"ok", "schema"})
            console.print(f"{name:8} {mark:6} {detail}", markup=False)
            if "schema" in state:
                console.print(f"         schema: {state['schema']}", markup=False)
    return render


def render_scan(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        table = Table("dataset", *sorted(report["totals"]), title="documents by path")
        for dataset, counts in report["datasets"].items():
            table.add_row(dataset, *(str(counts.get(k, 0)) for k in sorted(report["totals"])))
        table.add_row("total", *(str(report["totals"][k]) for k in sorted(report["totals"])))
        console.print(table)
        console.print(f"affected chunks: {report['affected_chunks']}; object requests: {report['object_requests']}",
                      markup=False)
    return render


def render_estimate(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        table = Table("path", "docs", "chunks", "requests A/B", "time", "dollars", "seed's figure",
                      title=f"estimate at concurrency {report['concurrency']}")
        for p in report["paths"]:
            seed = p["seed_seconds"]
            seed_text = f"{human_seconds(seed[0])}-{human_seconds(seed[1])}" if seed else "-"
            table.add_row(p["path"], str(p["documents"]), str(p["chunks"]), f"{p['class_a']}/{p['class_b']}",
                          human_seconds(p["seconds"]), f"${p['dollars']:.4f}", seed_text)
        table.add_row("total", "", "", "", human_seconds(report["total_seconds"]), f"${report['total_dollars']:.4f}", "")
        console.print(table)
        lat = report["latencies"]
        console.print(
            f"measured on {lat['sample_size']} documents: Milvus batch query {lat['milvus_query_s'] * 1e3:.0f} ms, "
            f"HEAD {lat['object_head_s'] * 1e3:.2f} ms, LIST {lat['object_list_s'] * 1e3:.2f} ms, "
            f"GET {lat['object_copy_s'] * 1e3:.2f} ms, source PDFs {lat['get_bytes_per_s'] / 1e6:.0f} MB/s, "
            f"PDF extraction {lat['pdf_seconds_per_mb']:.2f} s/MB, ledger {lat['ledger_round_trip_s'] * 1e3:.2f} ms"
            + (f", GET at the run's concurrency {lat['object_request_s'] * 1e3:.2f} ms/request"
               if lat.get("object_request_s") is not None else ""),
            markup=False)
        console.print(f"assumed: {report['assumptions']}", markup=False)
    return render


def render_demo(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        b = report["build"]
        console.print(f"built in {report['build_seconds']} s under {b['data_dir']}: {b['documents']} documents, "
                      f"{b['pages']} pages, {b['chunks']} chunks ({b['affected_chunks']} with page 0), "
                      f"{b['images_in_bucket']} images in the bucket; vectors: {b['embedding_model']}", markup=False)
        render_scan(console)(report["scan"])
        render_estimate(console)(report["estimate"])
        render_run(console)(report["run"])
        render_check(console, "verify")(report["verify"])
        table = Table("path", "right before", "right after", "still 0 after", "wrong after",
                      title="affected chunks against the ground truth (true page 0 reads right before)")
        for path, after in sorted(report["after"].items()):
            before = report["before"].get(path, {})
            table.add_row(path, str(before.get("right", 0)), str(after["right"]), str(after["still_0"]),
                          str(after["wrong"]))
        console.print(table)
    return render


# ---- the migration (issue 4 commands)

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


def verify(settings: Settings, document_ids=None) -> dict:
    from repage.migration.verify import verify_documents

    with open_stores(settings) as stores:
        return verify_documents(stores, document_ids).as_dict()


def rollback(settings: Settings, document_ids=None) -> dict:
    from repage.migration.verify import rollback_documents

    with open_stores(settings) as stores:
        return rollback_documents(stores, document_ids).as_dict()


def gc(settings: Settings, grace_seconds: float) -> dict:
    from repage.migration.verify import gc_objects

    with open_stores(settings) as stores:
        return gc_objects(stores, grace_seconds)


def render_status(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        table = Table("state", "path", "documents", title="migration status")
        for row in report["by_state_and_path"]:
            table.add_row(row["state"], row["path"], str(row["documents"]))
        console.print(table)
        rates = report["throughput"]
        eta = report["eta_seconds"]
        console.print(f"done {report['done']} / {report['documents']}; "
                      f"{rates['recent_documents_per_s']:.2f} docs/s recent, "
                      f"{rates['overall_documents_per_s']:.2f} overall; "
                      f"ETA {human_seconds(eta) if eta is not None else 'unknown'}; "
                      f"${report['dollars_spent']:.4f} spent, ${report['dollars_projected']:.4f} projected",
                      markup=False)
        for path, u in report.get("usage_by_path", {}).items():
            console.print(f"  {path}: {u['class_a']} class A + {u['class_b']} class B requests (GETs), "
                          f"{u['bytes_read'] / 1e6:.1f} MB read, ${u['dollars']:.4f}", markup=False)
        for err in report["last_errors"]:
            console.print(f"  {err['document_id']} ({err['state']}): {err['error']}", markup=False)
    return render


def render_check(console: Console, what: str) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        console.print(f"{what}: {report['passed']} of {report['checked']} documents ok", markup=False)
        for doc, problem in report["failed"].items():
            console.print(f"  {doc}: {problem}", markup=False)
    return render


def render_run(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        console.print(
            f"{report['migrated']} migrated, {report['failed']} failed, {report['chunks_written']} chunks, "
            f"{report['objects_copied']} images moved, ${report['dollars']:.4f}, {report['seconds']:.1f} s "
            f"({report['stopped_because']})", markup=False)
        for change in report.get("dry_run_changes", []):
            console.print(f"  {change['document_id']}: {len(change['chunks'])} chunks, "
                          f"{len(change['copies'])} copies", markup=False)
            for chunk in change["chunks"]:
                console.print(f"    {chunk['chunk']} page {chunk['page'][0]} -> {chunk['page'][1]}, "
                              f"key {chunk['image_r2_key'][0]} -> {chunk['image_r2_key'][1]}", markup=False)
        for doc, error in report["errors"].items():
            console.print(f"  failed {doc}: {error}", markup=False)
    return render

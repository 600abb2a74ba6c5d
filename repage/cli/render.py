"""Everything the CLI prints for people (Rich); `--json` output bypasses all of it."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from repage import redact
from repage.domain.estimate import human_seconds


def progress_printer(console: Console | None, what: str) -> Callable[[int, int], None] | None:
    """Every 500 documents and at the end: `what: done/total documents`."""
    if console is None:
        return None

    def show(done: int, total: int) -> None:
        if done == total or done % 500 == 0:
            console.print(f"{what}: {done}/{total} documents", markup=False)

    return show


def log_printer(console: Console | None) -> Callable[[str], None] | None:
    return (lambda message: console.print(redact.active()(message), markup=False)) if console else None


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
        console.print(
            f"affected chunks: {report['affected_chunks']}; object requests: {report['object_requests']}", markup=False
        )

    return render


def dollar_range(low: float, high: float | None) -> str:
    """$0.1000, or $0.1000-$1.0000 where the price is a range (reprocess, docs/design.md §8.1)."""
    return f"${low:.4f}" if high is None or high == low else f"${low:.4f}-${high:.4f}"


def render_estimate(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        table = Table(
            "path",
            "docs",
            "chunks",
            "requests A/B",
            "time",
            "dollars",
            "published range",
            title=f"estimate at concurrency {report['concurrency']}",
        )
        for p in report["paths"]:
            seed = p["seed_seconds"]
            seed_text = f"{human_seconds(seed[0])}-{human_seconds(seed[1])}" if seed else "-"
            table.add_row(
                p["path"],
                str(p["documents"]),
                str(p["chunks"]),
                f"{p['class_a']}/{p['class_b']}",
                human_seconds(p["seconds"]),
                dollar_range(p["dollars"], p.get("dollars_high")),
                seed_text,
            )
        total = dollar_range(report["total_dollars"], report.get("total_dollars_high"))
        table.add_row("total", "", "", "", human_seconds(report["total_seconds"]), total, "")
        console.print(table)
        lat = report["latencies"]
        console.print(
            f"measured on {lat['sample_size']} documents: Milvus batch query {lat['milvus_query_s'] * 1e3:.0f} ms, "
            f"HEAD {lat['object_head_s'] * 1e3:.2f} ms, LIST {lat['object_list_s'] * 1e3:.2f} ms, "
            f"GET {lat['object_copy_s'] * 1e3:.2f} ms, source PDFs {lat['get_bytes_per_s'] / 1e6:.0f} MB/s, "
            f"PDF extraction {lat['pdf_seconds_per_mb']:.2f} s/MB, ledger {lat['ledger_round_trip_s'] * 1e3:.2f} ms"
            + (
                f", GET at the run's concurrency {lat['object_request_s'] * 1e3:.2f} ms/request"
                if lat.get("object_request_s") is not None
                else ""
            ),
            markup=False,
        )
        console.print(f"assumed: {report['assumptions']}", markup=False)

    return render


def render_demo(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        b = report["build"]
        console.print(
            f"built in {report['build_seconds']} s under {b['data_dir']}: {b['documents']} documents, "
            f"{b['pages']} pages, {b['chunks']} chunks ({b['affected_chunks']} with page 0), "
            f"{b['images_in_bucket']} images in the bucket; vectors: {b['embedding_model']}",
            markup=False,
        )
        render_scan(console)(report["scan"])
        render_estimate(console)(report["estimate"])
        render_run(console)(report["run"])
        render_check(console, "verify")(report["verify"])
        table = Table(
            "path",
            "right before",
            "right after",
            "still 0 after",
            "wrong after",
            title="affected chunks against the ground truth (true page 0 reads right before)",
        )
        for path, after in sorted(report["after"].items()):
            before = report["before"].get(path, {})
            table.add_row(
                path, str(before.get("right", 0)), str(after["right"]), str(after["still_0"]), str(after["wrong"])
            )
        console.print(table)
        if b.get("config"):
            console.print(
                f"the reprocess documents: repage --config {b['config']} run --path reprocess (local pipeline)",
                markup=False,
            )

    return render


def render_status(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        table = Table("state", "path", "documents", title="migration status")
        for row in report["by_state_and_path"]:
            table.add_row(row["state"], row["path"], str(row["documents"]))
        console.print(table)
        rates = report["throughput"]
        eta = report["eta_seconds"]
        console.print(
            f"done {report['done']} / {report['documents']}; "
            f"{rates['recent_documents_per_s']:.2f} docs/s recent, "
            f"{rates['overall_documents_per_s']:.2f} overall; "
            f"ETA {human_seconds(eta) if eta is not None else 'unknown'}; "
            f"${report['dollars_spent']:.4f} spent, ${report['dollars_projected']:.4f} projected",
            markup=False,
        )
        for path, u in report.get("usage_by_path", {}).items():
            console.print(
                f"  {path}: {u['class_a']} class A + {u['class_b']} class B requests (GETs), "
                f"{u['bytes_read'] / 1e6:.1f} MB read, ${u['dollars']:.4f}",
                markup=False,
            )
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
            f"({report['stopped_because']})",
            markup=False,
        )
        for change in report.get("dry_run_changes", []):
            console.print(
                f"  {change['document_id']}: {len(change['chunks'])} chunks, {len(change['copies'])} copies",
                markup=False,
            )
            for chunk in change["chunks"]:
                console.print(
                    f"    {chunk['chunk']} page {chunk['page'][0]} -> {chunk['page'][1]}, "
                    f"key {chunk['image_r2_key'][0]} -> {chunk['image_r2_key'][1]}",
                    markup=False,
                )
        for doc, error in report["errors"].items():
            console.print(f"  failed {doc}: {error}", markup=False)

    return render


def render_import(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        console.print(
            f"{report['rows']} rows from {report['file']} ({report['format']}): "
            f"{report['documents']} documents, {report['datasets']} datasets; "
            f"{report['documents_updated']} documents updated",
            markup=False,
        )
        if report["unmatched_dataset_count"]:
            console.print(
                f"{report['unmatched_dataset_count']} datasets have no scanned documents "
                f"(run `repage scan` first): {', '.join(report['unmatched_datasets'])}",
                markup=False,
            )

    return render


def render_top(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        table = Table(
            "document",
            "dataset",
            "accesses",
            "last access (UTC)",
            "state",
            "enqueued",
            title=f"most used documents (half-life {report['half_life_hours']:g} h)",
        )
        for d in report["documents"]:
            table.add_row(
                d["document_id"],
                d["dataset_id"] or "-",
                f"{d['accesses']:.2f}",
                d["last_access"],
                d["state"] or "not scanned",
                "yes" if d["enqueued"] else "",
            )
        console.print(table)

    return render


def render_review(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        console.print(f"{report['pending']} documents in review", markup=False)
        for item in report["reviews"]:
            if item.get("check") == "reprocess-result":  # a refused reprocess result (docs/design.md §2.4)
                console.print(f"{item['document_id']}  {item['filename']}: {item['reason']}", markup=False)
                continue
            console.print(
                f"{item['document_id']}  {item['filename']}: {len(item['chunks'])} chunks below the threshold "
                f"(distance <= {item['thresholds']['max_hash_distance']}, margin >= "
                f"{item['thresholds']['min_hash_margin']}); PDF has {item['images_in_pdf']} images for "
                f"{item['distinct_image_indexes']} image indexes",
                markup=False,
            )
            for chunk in item["chunks"]:
                pages = ", ".join(
                    f"{c['page']}" + (f" (d={c['distance']})" if c["distance"] is not None else "")
                    for c in chunk.get("candidate_pages") or []
                )
                console.print(
                    f"  image_index {chunk['image_index']}: distance {chunk.get('distance')}, margin "
                    f"{chunk.get('margin')}, candidates [{pages}], proposed {chunk.get('proposed')}: "
                    f"{chunk.get('reason')}",
                    markup=False,
                )

    return render


def print_cycle(console: Console) -> Callable[[object], None]:
    """One stderr line per worker cycle that did or skipped something."""

    def show(report) -> None:
        if report.paused or report.backed_off or report.documents:
            state = (
                "paused"
                if report.paused
                else f"backing off (read p95 {report.read_latency_p95:.3f} s)"
                if report.backed_off
                else f"lazy {report.lazy.get('migrated', 0)} migrated, "
                f"trickle {report.trickle.get('migrated', 0)} migrated"
                + (f" ({report.trickle_skipped})" if report.trickle_skipped else "")
            )
            console.print(f"cycle {report.cycle}: {state}", markup=False)

    return show

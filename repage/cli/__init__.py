"""Typer commands. Each builds the objects, calls one library function, prints, exits.

Exit codes (DESIGN §6): 0 done, 1 finished with failures, 2 bad usage or configuration
(one line on stderr, no traceback).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from repage import operations
from repage.config import DEFAULT_DATA_DIR, Settings, demo_settings, load_settings
from repage.errors import ConfigError, RepageError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Recover page numbers of image/OCR chunks in a Milvus + S3/R2 RAG store.")
err = Console(stderr=True, highlight=False, soft_wrap=True)  # soft wrap: an error stays one line
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
EngineFlag = Annotated[str, typer.Option("--engine", help="Where PDF extraction and matching run: local or ray.")]
RayAddressFlag = Annotated[str | None, typer.Option("--ray-address", help="Ray cluster (ray://host:10001 or host:6379); default RAY_ADDRESS, else a local Ray.")]


def engine_from(name: str, address: str | None):
    """The CPU engine of `--engine`; RAY_ADDRESS is read here, at the edge, and only for ray."""
    from repage.migration.compute import make_engine

    if name == "ray" and not address:
        address = os.environ.get("RAY_ADDRESS") or None
    return make_engine(name, address=address)


class Exit:
    DONE, FAILURES, USAGE = 0, 1, 2


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="repage.toml to read (default: ./repage.toml if present).")] = None,
    milvus_uri: Annotated[str | None, typer.Option(help="Milvus Lite file or http://host:19530.")] = None,
    collection: Annotated[str | None, typer.Option(help="Collection name.")] = None,
    store_url: Annotated[str | None, typer.Option(help="file://DIR, s3://BUCKET or memory://.")] = None,
    ledger_url: Annotated[str | None, typer.Option(help="sqlite:///PATH or postgresql://...")] = None,
) -> None:
    """Global options; flags win over REPAGE_* variables and repage.toml."""
    flags = {"milvus_uri": milvus_uri, "collection": collection, "store_url": store_url, "ledger_url": ledger_url}
    ctx.obj = {"config": config, "flags": flags}


def settings_from(ctx: typer.Context) -> Settings:
    """Validated settings for a command: flags > env > app fallbacks > toml > defaults."""
    config = ctx.obj["config"]
    if config is not None and not config.exists():
        raise ConfigError(f"--config {config}: no such file")
    toml_path = config or (Path("repage.toml") if Path("repage.toml").exists() else None)
    return load_settings(os.environ, toml_path=toml_path, flags=ctx.obj["flags"])


def run_command(action: Callable[[], Any]) -> Any:
    """Run a command body, turning repage errors into one line and an exit code."""
    try:
        return action()
    except ConfigError as exc:
        err.print(f"repage: error: {exc}", markup=False)
        raise typer.Exit(Exit.USAGE) from None
    except RepageError as exc:
        err.print(f"repage: failed: {exc}", markup=False)
        raise typer.Exit(Exit.FAILURES) from None
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:  # a bug: one line, and the traceback only when asked for
        if os.environ.get("REPAGE_DEBUG"):
            raise
        err.print(f"repage: internal error: {type(exc).__name__}: {exc} (set REPAGE_DEBUG=1 for the traceback)",
                  markup=False)
        raise typer.Exit(Exit.FAILURES) from None


def emit(data: dict, as_json: bool, render: Callable[[dict], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        render(data)


@app.command()
def doctor(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Check configuration and stores; read-only, it never writes anywhere.

    Example: repage doctor --json
    """
    def body():
        report = operations.doctor(settings_from(ctx))
        emit(report, as_json, operations.render_doctor(out))
        if not report["ok"]:
            raise typer.Exit(Exit.USAGE)
    run_command(body)


@app.command()
def scan(
    ctx: typer.Context,
    dataset_id: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Find affected documents, classify each into a path and record it in the ledger.

    Example: repage scan --dataset-id 3f2a... --json
    """
    def body():
        report = operations.scan(settings_from(ctx), dataset_id=dataset_id, console=None if as_json else err)
        emit(report, as_json, operations.render_scan(out))
    run_command(body)


@app.command()
def estimate(
    ctx: typer.Context,
    sample: Annotated[int, typer.Option(min=1, help="Documents to sample for latency measurements.")] = 20,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Concurrency to estimate for.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Time and dollars per path, from latencies measured on real calls (scans first if needed).

    Example: repage estimate --sample 50 --concurrency 8
    """
    def body():
        settings = settings_from(ctx)
        if concurrency:
            settings = settings.model_copy(update={"concurrency": concurrency})
        report = operations.estimate(settings, sample=sample)
        emit(report, as_json, operations.render_estimate(out))
    run_command(body)


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Where the demo store is built (wiped first).")] = Path(DEFAULT_DATA_DIR),
    pk: Annotated[str, typer.Option(help="Primary-key variant: auto or chunk_id.")] = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Build a real broken store from Debian's PDFs under ./repage-data, then scan and estimate it.

    Never reads the app's MILVUS_*/R2_* variables: a demo never touches production.
    Example: repage demo --pk chunk_id
    """
    def body():
        if pk not in {"auto", "chunk_id"}:
            raise ConfigError(f"--pk {pk!r}: use auto or chunk_id")
        report = operations.demo(demo_settings(data_dir), data_dir=data_dir, pk=pk, console=None if as_json else err)
        emit(report, as_json, operations.render_demo(out))
    run_command(body)


def parse_duration(text: str | None) -> float | None:
    """'90', '90s', '15m', '2h', '7d' -> seconds."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ConfigError(f"duration {text!r}: use a number of seconds or 30s, 15m, 2h, 7d") from None


@app.command()
def run(
    ctx: typer.Context,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after this many documents.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Documents per batch (one query, one write).")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Object operations in flight.")] = None,
    object_ops_per_second: Annotated[float | None, typer.Option(min=0.01, help="Bucket request rate limit.")] = None,
    milvus_writes_per_second: Annotated[float | None, typer.Option(min=0.01, help="Milvus write rate limit.")] = None,
    pause: Annotated[float, typer.Option(min=0, help="Seconds to wait between batches.")] = 0.0,
    dry_run: Annotated[bool, typer.Option(help="Print the exact changes; write nothing anywhere.")] = False,
    document_id: Annotated[list[str] | None, typer.Option(help="Only this document (repeatable).")] = None,
    dataset_id: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    path: Annotated[str, typer.Option(help="auto (keys, pdf, then reprocess with --allow-reprocess), keys, pdf or reprocess.")] = "auto",
    allow_reprocess: Annotated[bool, typer.Option("--allow-reprocess", help="auto: reprocess what keys and pdf cannot fix (else deferred); costs dollars, see --budget.")] = False,
    reprocess_concurrency: Annotated[int | None, typer.Option(min=1, help="Reprocess jobs in flight (default reprocess_concurrency).")] = None,
    order: Annotated[str, typer.Option(help="oldest, random or priority.")] = "oldest",
    move_images: Annotated[bool, typer.Option(help="Copy images to canonical keys (--no-move-images: pages only).")] = True,
    max_failures: Annotated[int | None, typer.Option(min=0, help="Stop cleanly after more failures than this.")] = None,
    max_error_rate: Annotated[float | None, typer.Option(min=0, max=1, help="Stop cleanly above this failure ratio.")] = None,
    max_duration: Annotated[str | None, typer.Option(help="Stop cleanly after this long (30m, 2h).")] = None,
    budget: Annotated[float | None, typer.Option(min=0, help="Stop cleanly once this many dollars are spent.")] = None,
    min_accesses: Annotated[float | None, typer.Option(min=0, help="Only documents with this many decayed accesses.")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Retry failed documents (failed -> pending first).")] = False,
    engine: EngineFlag = "local",
    ray_address: RayAddressFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Migrate pending documents in batches (scans first when the ledger is empty).

    Example: repage run --limit 100 --batch-size 50 --object-ops-per-second 200 --no-move-images
    """
    from repage.migration.migrate import RunOptions
    from repage.migration.runner import RunLimits, Selection
    from repage.domain.states import Path as RepairPath

    def body():
        # auto claims reprocess documents too: reprocessed with --allow-reprocess, else deferred with the reason
        paths = {"auto": {RepairPath.KEYS, RepairPath.PDF, RepairPath.REPROCESS}, "keys": {RepairPath.KEYS},
                 "pdf": {RepairPath.PDF}, "reprocess": {RepairPath.REPROCESS}}
        if path not in paths:
            raise ConfigError(f"--path {path!r}: use auto, keys, pdf or reprocess")
        if order not in {"oldest", "random", "priority"}:
            raise ConfigError(f"--order {order!r}: use oldest, random or priority")
        settings = settings_from(ctx)
        limits = RunLimits(limit=limit, batch_size=batch_size or settings.batch_size,
                           concurrency=concurrency or settings.concurrency,
                           object_ops_per_second=object_ops_per_second,
                           milvus_writes_per_second=milvus_writes_per_second, pause_seconds=pause,
                           max_failures=max_failures, max_error_rate=max_error_rate,
                           max_duration_seconds=parse_duration(max_duration), budget_dollars=budget,
                           reprocess_concurrency=reprocess_concurrency or settings.reprocess_concurrency)
        cpu = engine_from(engine, ray_address)
        options = RunOptions(move_images=move_images, dry_run=dry_run, failpoint=os.environ.get("REPAGE_FAILPOINT"),
                             engine=cpu)
        selection = Selection(paths=frozenset(paths[path]), document_ids=tuple(document_id) if document_id else None,
                              dataset_id=dataset_id, order=order, min_accesses=min_accesses or None,
                              retry_failed=retry_failed, allow_reprocess=allow_reprocess or path == "reprocess")
        try:
            with _RunProgress(enabled=not as_json) as progress:
                report = operations.run(settings, options, limits, selection, on_batch=progress.update)
        finally:
            cpu.close()
        emit(report, as_json, operations.render_run(out))
        if report["failed"] or report.get("unavailable"):  # an outage left work undone
            raise typer.Exit(Exit.FAILURES)
    run_command(body)


class _RunProgress:
    """A Rich progress bar on stderr: documents, documents/s, ETA and dollars, per batch."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("run"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]:.1f} docs/s"), TimeRemainingColumn(),
                                 TextColumn("${task.fields[dollars]:.4f}  {task.fields[failed]} failed"),
                                 console=err, disable=not enabled)
        self.task = None

    def __enter__(self) -> _RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, summary) -> None:
        if self.task is None:
            self.task = self.progress.add_task("run", total=summary.pending_at_start or None,
                                               rate=0.0, dollars=0.0, failed=0)
        rate = summary.documents / summary.seconds if summary.seconds else 0.0
        self.progress.update(self.task, completed=summary.documents, rate=rate, dollars=summary.dollars,
                             failed=summary.failed)


@app.command()
def status(
    ctx: typer.Context,
    watch: Annotated[float | None, typer.Option(help="Refresh every N seconds until interrupted.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Totals by state and path, throughput, ETA, dollars, last errors (reads the ledger only).

    Example: repage status --watch 5
    """
    import time

    def body():
        settings = settings_from(ctx)
        while True:
            emit(operations.status(settings), as_json, operations.render_status(out))
            if not watch:
                return
            time.sleep(watch)
    run_command(body)


@app.command()
def verify(
    ctx: typer.Context,
    document_id: Annotated[list[str] | None, typer.Option(help="Only this document (repeatable).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Check every migrated document against its journal; passing ones become verified.

    Example: repage verify --json
    """
    def body():
        report = operations.verify(settings_from(ctx), document_id or None)
        emit(report, as_json, operations.render_check(out, "verify"))
        if report["failed"]:
            raise typer.Exit(Exit.FAILURES)
    run_command(body)


@app.command()
def rollback(
    ctx: typer.Context,
    document_id: Annotated[list[str] | None, typer.Option(help="Roll back this document (repeatable).")] = None,
    all_documents: Annotated[bool, typer.Option("--all", help="Roll back every migrated document.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Restore the journal's old page and image key values exactly, and remove the copies.

    Example: repage rollback --document-id 5b1c...
    """
    def body():
        if bool(document_id) == all_documents:
            raise ConfigError("rollback needs exactly one of --document-id ID or --all")
        report = operations.rollback(settings_from(ctx), None if all_documents else document_id)
        emit(report, as_json, operations.render_check(out, "rollback"))
        if report["failed"]:
            raise typer.Exit(Exit.FAILURES)
    run_command(body)


@app.command()
def gc(
    ctx: typer.Context,
    grace: Annotated[str, typer.Option(help="Keep superseded images this long (7d, 12h, 0).")] = "7d",
    as_json: JsonFlag = False,
) -> None:
    """Delete superseded images after the grace period, only when no chunk points at them.

    Example: repage gc --grace 7d
    """
    def body():
        report = operations.gc(settings_from(ctx), parse_duration(grace))
        emit(report, as_json, lambda r: out.print(f"deleted {r['deleted']} superseded images; kept {len(r['kept'])}",
                                                    markup=False))
    run_command(body)


from repage.cli import service as cli_service  # noqa: E402,F401 — registers serve, worker, access
from repage.cli import review as cli_review  # noqa: E402,F401 — registers review


def fewer_malloc_arenas() -> None:
    """Two glibc malloc arenas, as MALLOC_ARENA_MAX=2 would give (a user's own setting wins).

    glibc gives threads that allocate their own arenas (up to 8 per core); the threads of
    gRPC, obstore's runtime and the batch pools each keep the memory they freed, and a long
    run's RSS creeps up by tens of MB (bench: 278 -> 250 MB at 1,000 documents, no creep).
    A no-op where libc is not glibc.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # -8 = M_ARENA_MAX; before any thread allocates
    except (OSError, AttributeError):
        pass


def main() -> None:
    # gRPC's C core logs keepalive chatter with Milvus Lite's server on stderr; our errors are one line.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    fewer_malloc_arenas()
    app(prog_name="repage")


if __name__ == "__main__":
    # `python -m repage.cli` runs this file as __main__, a second copy of the module: run the
    # imported repage.cli instead, whose app the other command modules registered on.
    from repage import cli as _cli

    _cli.main()

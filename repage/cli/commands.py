"""The migration commands: doctor, scan, estimate, demo, run, status, verify, rollback, gc.

Each builds its objects, calls one function of `repage.api`, prints and exits (docs/design.md §6).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from repage import api
from repage.cli import render
from repage.cli.common import (
    EngineFlag,
    Exit,
    JsonFlag,
    RayAddressFlag,
    app,
    emit,
    emit_line,
    engine_from,
    err,
    out,
    parse_duration,
    run_command,
    settings_from,
)
from repage.config import DEFAULT_DATA_DIR, demo_settings
from repage.errors import BadInput, ConfigError

if TYPE_CHECKING:
    from rich.progress import TaskID


@app.command()
def doctor(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Check configuration and stores; read-only, it never writes anywhere.

    Example: repage doctor --json
    """

    def body():
        report = api.doctor(settings_from(ctx))
        emit(report, as_json, render.render_doctor(out))
        for warning in report["warnings"]:  # one line each, on stderr (docs/design.md §6.6)
            err.print(f"repage: warning: {warning}", markup=False)
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
        report = api.scan(
            settings_from(ctx),
            dataset_id=dataset_id,
            progress=None if as_json else render.progress_printer(err, "scan"),
        )
        emit(report, as_json, render.render_scan(out))

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
        report = api.estimate(settings, sample=sample)
        emit(report, as_json, render.render_estimate(out))

    run_command(body)


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Where the demo store is built (wiped first).")] = Path(
        DEFAULT_DATA_DIR
    ),
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
        console = None if as_json else err
        report = api.demo(
            demo_settings(data_dir),
            data_dir=data_dir,
            pk=pk,
            log=render.log_printer(console),
            progress=render.progress_printer(console, "scan"),
        )
        emit(report, as_json, render.render_demo(out))

    run_command(body)


@app.command()
def run(
    ctx: typer.Context,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after this many documents.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Documents per batch (one query, one write).")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Object operations in flight.")] = None,
    object_ops_per_second: Annotated[float | None, typer.Option(min=0.01, help="Bucket request rate limit.")] = None,
    milvus_writes_per_second: Annotated[float | None, typer.Option(min=0.01, help="Milvus write rate limit.")] = None,
    pause: Annotated[float, typer.Option(min=0, help="Seconds to wait between batches.")] = 0.0,
    plan_ahead: Annotated[
        bool, typer.Option(help="Read and plan the next batch while this one is written (--no-plan-ahead: in turn).")
    ] = True,
    dry_run: Annotated[bool, typer.Option(help="Print the exact changes; write nothing anywhere.")] = False,
    document_id: Annotated[list[str] | None, typer.Option(help="Only this document (repeatable).")] = None,
    dataset_id: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    path: Annotated[
        str, typer.Option(help="auto (keys, pdf, then reprocess with --allow-reprocess), keys, pdf or reprocess.")
    ] = "auto",
    allow_reprocess: Annotated[
        bool,
        typer.Option(
            "--allow-reprocess",
            help="auto: reprocess what keys and pdf cannot fix (else deferred); costs dollars, see --budget.",
        ),
    ] = False,
    reprocess_concurrency: Annotated[
        int | None, typer.Option(min=1, help="Reprocess jobs in flight (default reprocess_concurrency).")
    ] = None,
    order: Annotated[str, typer.Option(help="oldest, random or priority.")] = "oldest",
    move_images: Annotated[
        bool, typer.Option(help="Copy images to canonical keys (--no-move-images: pages only).")
    ] = True,
    max_failures: Annotated[int | None, typer.Option(min=0, help="Stop cleanly after more failures than this.")] = None,
    max_error_rate: Annotated[
        float | None, typer.Option(min=0, max=1, help="Stop cleanly above this failure ratio.")
    ] = None,
    max_duration: Annotated[str | None, typer.Option(help="Stop cleanly after this long (30m, 2h).")] = None,
    budget: Annotated[float | None, typer.Option(min=0, help="Stop cleanly once this many dollars are spent.")] = None,
    min_accesses: Annotated[
        float | None, typer.Option(min=0, help="Only documents with this many decayed accesses.")
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Retry failed documents (failed -> pending first).")
    ] = False,
    engine: EngineFlag = "local",
    ray_address: RayAddressFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Migrate pending documents in batches (scans first when the ledger is empty).

    Example: repage run --limit 100 --batch-size 50 --object-ops-per-second 200 --no-move-images
    """
    from repage.domain.states import RepairPath
    from repage.migration.runner import RunLimits, Selection
    from repage.migration.work import RunOptions

    def body():
        # auto claims reprocess documents too: reprocessed with --allow-reprocess, else deferred with the reason
        paths = {
            "auto": {RepairPath.KEYS, RepairPath.PDF, RepairPath.REPROCESS},
            "keys": {RepairPath.KEYS},
            "pdf": {RepairPath.PDF},
            "reprocess": {RepairPath.REPROCESS},
        }
        if path not in paths:
            raise ConfigError(f"--path {path!r}: use auto, keys, pdf or reprocess")
        if order not in {"oldest", "random", "priority"}:
            raise ConfigError(f"--order {order!r}: use oldest, random or priority")
        settings = settings_from(ctx)
        limits = RunLimits(
            limit=limit,
            batch_size=batch_size or settings.batch_size,
            concurrency=concurrency or settings.concurrency,
            object_ops_per_second=object_ops_per_second,
            milvus_writes_per_second=milvus_writes_per_second,
            pause_seconds=pause,
            plan_ahead=plan_ahead,
            max_failures=max_failures,
            max_error_rate=max_error_rate,
            max_duration_seconds=parse_duration(max_duration),
            budget_dollars=budget,
            reprocess_concurrency=reprocess_concurrency or settings.reprocess_concurrency,
        )
        cpu = engine_from(engine, ray_address)
        options = RunOptions(
            move_images=move_images, dry_run=dry_run, failpoint=os.environ.get("REPAGE_FAILPOINT"), engine=cpu
        )
        selection = Selection(
            paths=frozenset(paths[path]),
            document_ids=tuple(document_id) if document_id else None,
            dataset_id=dataset_id,
            order=order,
            min_accesses=min_accesses or None,
            retry_failed=retry_failed,
            allow_reprocess=allow_reprocess or path == "reprocess",
        )
        try:
            with _RunProgress(enabled=not as_json) as progress:
                report = api.run(settings, options, limits, selection, on_batch=progress.update)
        finally:
            cpu.close()
        emit(report, as_json, render.render_run(out))
        if report["failed"] or report.get("unavailable"):  # an outage left work undone
            raise typer.Exit(Exit.FAILURES)

    run_command(body)


class _RunProgress:
    """A Rich progress bar on stderr: documents, documents/s, ETA and dollars, per batch."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("run"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} docs/s"),
            TimeRemainingColumn(),
            TextColumn("${task.fields[dollars]:.4f}  {task.fields[failed]} failed"),
            console=err,
            disable=not enabled,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> _RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, summary) -> None:
        if self.task is None:
            self.task = self.progress.add_task(
                "run", total=summary.pending_at_start or None, rate=0.0, dollars=0.0, failed=0
            )
        rate = summary.documents / summary.seconds if summary.seconds else 0.0
        self.progress.update(
            self.task, completed=summary.documents, rate=rate, dollars=summary.dollars, failed=summary.failed
        )


@app.command()
def status(
    ctx: typer.Context,
    watch: Annotated[float | None, typer.Option(min=0.01, help="Refresh every N seconds until interrupted.")] = None,
    count: Annotated[
        int | None, typer.Option(min=1, help="With --watch: stop after this many reports (default: never).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Totals by state and path, throughput, ETA, dollars, last errors (reads the ledger only).

    With --watch and --json: JSON Lines, one report per line, flushed as it is written.
    Example: repage status --watch 5 --json --count 12
    """
    import math
    import time

    def body():
        settings = settings_from(ctx)
        reports = 0
        with _reader_may_leave():
            while reports < (1 if watch is None else count or math.inf):
                if reports:
                    time.sleep(watch or 0.0)
                if watch is not None and as_json:
                    emit_line(api.status(settings))
                else:
                    emit(api.status(settings), as_json, render.render_status(out))
                reports += 1

    run_command(body)


@contextmanager
def _reader_may_leave():
    """A reader that closes the pipe (`repage status --watch 5 --json | head -1`) ends the command quietly."""
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches the closed pipe


@app.command()
def verify(
    ctx: typer.Context,
    document_id: Annotated[list[str] | None, typer.Option(help="Only this document (repeatable).")] = None,
    sample: Annotated[
        int | None, typer.Option(min=1, help="Check this many random migrated/verified documents (an audit).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Check the store against the journal; passing documents become verified, failing ones drifted
    (the next run repairs them from the journal).

    Example: repage verify --sample 100 --json
    """

    def body():
        if document_id and sample is not None:
            raise BadInput("give --document-id or --sample, not both")
        report = api.verify(settings_from(ctx), document_id or None, sample=sample)
        emit(report, as_json, render.render_check(out, "verify"))
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
        report = api.rollback(settings_from(ctx), None if all_documents else document_id)
        emit(report, as_json, render.render_check(out, "rollback"))
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
        report = api.gc(settings_from(ctx), parse_duration(grace))
        emit(
            report,
            as_json,
            lambda r: out.print(f"deleted {r['deleted']} superseded images; kept {len(r['kept'])}", markup=False),
        )

    run_command(body)

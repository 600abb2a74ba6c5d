"""Commands `serve`, `worker` and `access` (import, top), registered on `repage.cli.app`.

Thin like the rest of the CLI: build settings and options, call one function, print.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from repage.cli.common import (
    EngineFlag,
    Exit,
    JsonFlag,
    RayAddressFlag,
    app,
    emit,
    engine_from,
    err,
    out,
    parse_duration,
    run_command,
    settings_from,
)
from repage.cli.render import print_cycle
from repage.errors import ConfigError

access_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help=(
        "Usage-based priority: import access logs, show the most used documents.\n\n"
        "Example: repage access import queries.csv && repage access top --limit 10"
    ),
)

# Worker options, shared by `worker` and `serve --with-worker`.
Quota = Annotated[
    int | None, typer.Option("--daily-quota", min=0, help="Trickle documents per day (lazy ones do not count).")
]
Quiet = Annotated[
    str | None, typer.Option("--quiet-hours", help="HH:MM-HH:MM (local time) when the trickle does not run.")
]
MinAccesses = Annotated[
    float | None, typer.Option("--min-accesses", min=0, help="Trickle only documents with this many decayed accesses.")
]
MaxLatency = Annotated[
    float,
    typer.Option("--max-read-latency", min=0.001, help="Back off while the read path's Milvus p95 (s) is above this."),
]
Poll = Annotated[float, typer.Option("--poll", min=0.01, help="Seconds to wait when there is nothing to do.")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", min=1, help="Documents per batch.")]
Concurrency = Annotated[int | None, typer.Option("--concurrency", min=1, help="Object operations in flight.")]
ObjectRate = Annotated[
    float | None, typer.Option("--object-ops-per-second", min=0.01, help="Bucket request rate limit.")
]
WriteRate = Annotated[
    float | None, typer.Option("--milvus-writes-per-second", min=0.01, help="Milvus write rate limit.")
]
MoveImages = Annotated[bool, typer.Option("--move-images/--no-move-images", help="Copy images to canonical keys.")]
AuditEvery = Annotated[
    str | None,
    typer.Option("--audit-every", help="Verify a random sample of done documents this often (6h, 1d); off if unset."),
]
AuditSample = Annotated[int | None, typer.Option("--audit-sample", min=1, help="Documents per audit (default 100).")]
MaxFailures = Annotated[
    int | None, typer.Option("--max-failures", min=0, help="Pause the migration after more failures than this.")
]
MaxErrorRate = Annotated[
    float | None,
    typer.Option("--max-error-rate", min=0, max=1, help="Pause above this failure ratio over the last 100 documents."),
]
AllowReprocess = Annotated[
    bool | None,
    typer.Option(
        "--allow-reprocess/--no-allow-reprocess",
        help="Reprocess documents only the slow path can fix, under the budgets ($0.10-1.00 each).",
    ),
]
DailyBudget = Annotated[
    float | None, typer.Option("--daily-budget", min=0, help="Bucket dollars per day; the trickle waits for the next.")
]


def _worker_setup(settings, flags: dict):
    """WorkerConfig, RunLimits and RunOptions from the worker flags, [worker] in repage.toml beneath them."""
    from repage.migration.runner import RunLimits
    from repage.migration.work import RunOptions
    from repage.migration.worker import QuietHours, WorkerConfig

    toml = settings.worker
    pick = lambda name: flags[name] if flags.get(name) is not None else getattr(toml, name)  # noqa: E731
    quiet = pick("quiet_hours")
    config = WorkerConfig(
        daily_quota=pick("daily_quota"),
        quiet_hours=QuietHours.parse(quiet) if quiet else None,
        min_accesses=pick("min_accesses") or None,
        max_read_latency_s=flags["max_read_latency"],
        poll_seconds=flags["poll"],
        audit_every_s=parse_duration(pick("audit_every")),
        audit_sample=pick("audit_sample"),
        max_failures=pick("max_failures"),
        max_error_rate=pick("max_error_rate"),
        daily_budget_dollars=pick("daily_budget_dollars"),
        allow_reprocess=bool(pick("allow_reprocess")),
    )
    limits = RunLimits(
        batch_size=flags["batch_size"] or settings.batch_size,
        concurrency=flags["concurrency"] or settings.concurrency,
        object_ops_per_second=flags["object_ops_per_second"],
        milvus_writes_per_second=flags["milvus_writes_per_second"],
    )
    options = RunOptions(move_images=flags["move_images"], failpoint=os.environ.get("REPAGE_FAILPOINT"))
    return config, limits, options


# a worker flag's default: `serve` without --with-worker refuses any other value (it would be ignored)
WORKER_DEFAULTS = {
    "daily_quota": None,
    "quiet_hours": None,
    "min_accesses": None,
    "max_read_latency": 0.5,
    "poll": 5.0,
    "batch_size": None,
    "concurrency": None,
    "object_ops_per_second": None,
    "milvus_writes_per_second": None,
    "move_images": True,
    "audit_every": None,
    "audit_sample": None,
    "max_failures": None,
    "max_error_rate": None,
    "daily_budget_dollars": None,
    "allow_reprocess": None,
}


def _worker_flags(values: dict) -> dict:
    return {name: values[name] for name in WORKER_DEFAULTS}


def _refuse_worker_flags(flags: dict) -> None:
    given = [name for name, default in WORKER_DEFAULTS.items() if flags[name] != default]
    if given:
        names = ", ".join("--" + n.replace("_", "-").replace("move-images", "no-move-images") for n in given)
        raise ConfigError(f"{names}: worker options, only with --with-worker")


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to bind.")] = 8080,
    with_worker: Annotated[bool, typer.Option("--with-worker", help="Run the worker in this process too.")] = False,
    insecure_local: Annotated[
        bool, typer.Option("--insecure-local", help="Serve without tokens (loopback only).")
    ] = False,
    secure_cookie: Annotated[
        bool | None,
        typer.Option(
            "--secure-cookie/--no-secure-cookie",
            help="Mark the dashboard's session cookie Secure (default: unless bound to loopback).",
        ),
    ] = None,
    forwarded_allow_ips: Annotated[
        str | None,
        typer.Option(help="Addresses of a TLS proxy whose X-Forwarded-For/-Proto headers to trust."),
    ] = None,
    daily_quota: Quota = None,
    quiet_hours: Quiet = None,
    min_accesses: MinAccesses = None,
    max_read_latency: MaxLatency = 0.5,
    poll: Poll = 5.0,
    batch_size: BatchSize = None,
    concurrency: Concurrency = None,
    object_ops_per_second: ObjectRate = None,
    milvus_writes_per_second: WriteRate = None,
    move_images: MoveImages = True,
    audit_every: AuditEvery = None,
    audit_sample: AuditSample = None,
    max_failures: MaxFailures = None,
    max_error_rate: MaxErrorRate = None,
    daily_budget_dollars: DailyBudget = None,
    allow_reprocess: AllowReprocess = None,
) -> None:
    """Serve chunks with lazy page repair, migration status, metrics and admin endpoints.

    Needs REPAGE_READ_TOKEN and REPAGE_ADMIN_TOKEN (32+ characters, different), unless bound to
    loopback with --insecure-local.
    Example: repage serve --host 0.0.0.0 --port 8080 --with-worker --daily-quota 500
    """
    flags = _worker_flags(locals())
    from repage.web.service import serve as run_server

    def body():
        settings = settings_from(ctx)
        if not with_worker:
            _refuse_worker_flags(flags)
        config, limits, options = _worker_setup(settings, flags)
        run_server(
            settings,
            host=host,
            port=port,
            insecure_local=insecure_local,
            with_worker=with_worker,
            worker_config=config,
            worker_limits=limits,
            worker_options=options,
            secure_cookie=secure_cookie,
            forwarded_allow_ips=forwarded_allow_ips,
        )

    run_command(body)


def worker(
    ctx: typer.Context,
    daily_quota: Quota = None,
    quiet_hours: Quiet = None,
    min_accesses: MinAccesses = None,
    max_read_latency: MaxLatency = 0.5,
    poll: Poll = 5.0,
    batch_size: BatchSize = None,
    concurrency: Concurrency = None,
    object_ops_per_second: ObjectRate = None,
    milvus_writes_per_second: WriteRate = None,
    move_images: MoveImages = True,
    audit_every: AuditEvery = None,
    audit_sample: AuditSample = None,
    max_failures: MaxFailures = None,
    max_error_rate: MaxErrorRate = None,
    daily_budget_dollars: DailyBudget = None,
    allow_reprocess: AllowReprocess = None,
    once: Annotated[bool, typer.Option("--once", help="Run one cycle and exit.")] = False,
    engine: EngineFlag = "local",
    ray_address: RayAddressFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Migrate lazily requested documents first, then trickle the rest in priority order.

    SIGTERM or Ctrl-C stops it after the current batch; a restart resumes from the ledger.
    Example: repage worker --daily-quota 500 --quiet-hours 08:00-20:00 --min-accesses 3
    """
    flags = _worker_flags(locals())
    from repage.migration.worker import run_worker

    def body():
        settings = settings_from(ctx)
        config, limits, options = _worker_setup(settings, flags)
        cpu = engine_from(engine, ray_address)
        options = replace(options, engine=cpu)
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):  # finish the batch, then exit 0
            signal.signal(signum, lambda *_: stop.set())
        try:
            report = run_worker(
                settings,
                config=config,
                limits=limits,
                options=options,
                stop_event=stop,
                once=once,
                on_cycle=None if as_json else print_cycle(err),
            )
        finally:
            cpu.close()
        emit(
            report,
            as_json,
            lambda r: out.print(
                f"worker stopped after {r['cycles']} cycles: {r['totals']['migrated']} migrated, "
                f"{r['totals']['failed']} failed",
                markup=False,
            ),
        )
        if report["totals"]["failed"]:
            raise typer.Exit(Exit.FAILURES)

    run_command(body)


@access_app.command("import")
def access_import(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(help="CSV (with header) or JSONL: document_id or dataset_id, timestamp[, count].")
    ],
    fmt: Annotated[str | None, typer.Option("--format", help="csv or jsonl (default: from the file name).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Add an access log's hits (decayed by their age) to document priorities; all or nothing.

    A dataset hit counts for each of its scanned documents.
    Example: repage access import query-log.jsonl --json
    """
    from repage.api import import_access_file
    from repage.cli.render import render_import

    def body():
        if fmt is not None and fmt not in {"csv", "jsonl"}:
            raise ConfigError(f"--format {fmt!r}: use csv or jsonl")
        emit(import_access_file(settings_from(ctx), file, fmt), as_json, render_import(out))

    run_command(body)


@access_app.command("top")
def access_top(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="How many documents.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """The most used documents by decayed access count (what `run --order priority` takes first).

    Example: repage access top --limit 10 --json
    """
    from repage.api import access_top as top
    from repage.cli.render import render_top

    def body():
        emit(top(settings_from(ctx), limit), as_json, render_top(out))

    run_command(body)


def pause(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why (shown by status, the dashboard and /metrics).")] = "admin",
    as_json: JsonFlag = False,
) -> None:
    """Pause every worker sharing the ledger after its current batch (as POST /migration/pause).

    Example: repage pause --reason "bucket maintenance"
    """
    run_command(lambda: _set_pause(ctx, True, reason, as_json))


def resume(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Resume the workers: after a pause by an admin, or by a worker that stopped itself.

    Example: repage resume
    """
    run_command(lambda: _set_pause(ctx, False, "admin", as_json))


def _set_pause(ctx: typer.Context, paused: bool, who: str, as_json: bool) -> None:
    from repage import api

    report = api.set_paused(settings_from(ctx), paused, who)
    emit(report, as_json, lambda r: out.print("paused" if r["paused"] else "resumed", markup=False))


app.command()(serve)
app.command()(worker)
app.command()(pause)
app.command()(resume)
app.add_typer(access_app, name="access")

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
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


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


def main() -> None:
    app(prog_name="repage")


if __name__ == "__main__":
    main()

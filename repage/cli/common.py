"""What every command shares: the Typer app, its consoles and flags, settings, `run_command`.

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

from repage.config import Settings, load_settings
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

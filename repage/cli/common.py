"""What every command shares: the Typer app, its consoles and flags, settings, `run_command`.

Exit codes (docs/design.md §6.4): 0 done, 1 finished with failures, 2 bad usage or configuration
(one line on stderr, no traceback).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, overload

import typer
from rich.console import Console

from repage import redact
from repage.config import Settings, environ_redactor, load_settings
from repage.errors import ConfigError, RepageError

# no locals in a traceback Typer prints: they hold the settings and tokens (docs/design.md §6.1)
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    help="Recover page numbers of image/OCR chunks in a Milvus + S3/R2 RAG store.",
)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # soft wrap: an error stays one line
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
EngineFlag = Annotated[str, typer.Option("--engine", help="Where PDF extraction and matching run: local or ray.")]
RayAddressFlag = Annotated[
    str | None,
    typer.Option(
        "--ray-address", help="Ray cluster (ray://host:10001 or host:6379); default RAY_ADDRESS, else a local Ray."
    ),
]


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
    config: Annotated[
        Path | None, typer.Option(help="repage.toml to read (default: ./repage.toml if present).")
    ] = None,
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
    settings = load_settings(os.environ, toml_path=toml_path, flags=ctx.obj["flags"])
    redact.install(redact.Redactor.from_settings(settings))  # toml and flag secrets too, from here on
    return settings


def run_command(action: Callable[[], Any]) -> Any:
    """Run a command body, turning repage errors into one line and an exit code.

    Every line it prints goes through the process's redactor (repage.redact): the environment's
    secrets from the start, the settings' once they loaded (docs/design.md §6.1).
    """
    redact.install(environ_redactor(os.environ))
    try:
        return action()
    except ConfigError as exc:
        err.print(f"repage: error: {redact.active()(exc)}", markup=False)
        raise typer.Exit(Exit.USAGE) from None
    except RepageError as exc:
        err.print(f"repage: failed: {redact.active()(exc)}", markup=False)
        raise typer.Exit(Exit.FAILURES) from None
    except (typer.Exit, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a bug (a native library's panic too): one line, the traceback only when asked for
        shown = redact.active()
        debug = bool(os.environ.get("REPAGE_DEBUG"))
        if debug:  # printed here, redacted: a raw one (and Typer's, with locals) would show secrets
            err.print(shown.exception(exc).rstrip("\n"), markup=False, highlight=False)
        hint = "" if debug else " (set REPAGE_DEBUG=1 for the traceback)"
        err.print(f"repage: internal error: {type(exc).__name__}: {shown(exc)}{hint}", markup=False)
        raise typer.Exit(Exit.FAILURES) from None


def emit(data: dict, as_json: bool, render: Callable[[dict], None]) -> None:
    """A command's report, redacted, as one JSON document or rendered for people."""
    shown = redact.active()
    data = shown.value(data)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=lambda value: shown(str(value))) + "\n")
    else:
        render(data)


def emit_line(data: dict) -> None:
    """A report, redacted, as one line of JSON Lines (`status --watch --json`), flushed at once so a
    reader sees each report as it is made (docs/design.md §6.4)."""
    shown = redact.active()
    line = json.dumps(shown.value(data), separators=(",", ":"), default=lambda value: shown(str(value)))
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@overload
def parse_duration(text: str) -> float: ...
@overload
def parse_duration(text: None) -> None: ...
@overload
def parse_duration(text: str | None) -> float | None: ...
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

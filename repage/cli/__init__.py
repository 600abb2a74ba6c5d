"""The `repage` command line: Typer commands, each thin (docs/design.md §6).

Exit codes: 0 done, 1 finished with failures, 2 bad usage or configuration
(one line on stderr, no traceback).
"""

from __future__ import annotations

import os
import sys

from repage import redact
from repage.cli import commands, review, service  # noqa: F401 — each registers its commands on `app`
from repage.cli.common import app


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
    redact.redact_uncaught_in_threads()
    try:
        app(prog_name="repage")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # outside run_command: a traceback still, but redacted (docs/design.md §6.1)
        redact.print_exception(exc)
        sys.exit(1)

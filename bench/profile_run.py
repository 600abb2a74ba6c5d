"""Profile `repage run` on a fresh copy of a cached bench store (docs/performance.md, profiles).

    .venv/bin/python -m bench.profile_run [--documents 1000] [--out bench/out/profile] [run flags...]

Copies the store built by `make bench` (bench/out/stores), starts its own `milvus-lite server`,
runs `repage scan`, then `repage run --json` under pyinstrument, and writes the text profile
(the run's main thread, inclusive seconds) to OUT/run.txt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.scan_memory import COLLECTION, LiteServer, free_port
from bench.stores import OUT, clean_env, fresh_copy

BIN = Path(sys.executable).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=1000, help="the cached store's size")
    parser.add_argument("--out", type=Path, default=OUT / "profile")
    args, run_flags = parser.parse_known_args(argv)
    master = OUT / "stores" / f"d{args.documents}-s0-auto"
    if not master.exists():
        print(f"no cached store at {master}: run `make bench` (or bench.run --sizes {args.documents}) first")
        return 2
    dest = fresh_copy(master, args.out)
    with LiteServer(dest / "lite", free_port(), dest / "server.log") as server:
        env = clean_env(
            {
                "REPAGE_MILVUS_URI": server.uri,
                "REPAGE_COLLECTION": COLLECTION,
                "REPAGE_LEDGER_URL": f"sqlite:///{dest / 'ledger.db'}",
                "REPAGE_STORE_URL": (dest / "bucket").as_uri(),
            }
        )
        subprocess.run([str(BIN / "repage"), "scan", "--json"], env=env, cwd=dest, check=True, capture_output=True)
        profiled = [str(BIN / "pyinstrument"), "-o", str(dest / "run.txt"), "-r", "text", str(BIN / "repage")]
        done = subprocess.run(
            [*profiled, "run", "--json", *run_flags], env=env, cwd=dest, capture_output=True, text=True
        )
    if done.returncode != 0:
        print(done.stderr[-2000:])
        return 1
    summary = json.loads(done.stdout)
    print(f"run {summary['seconds']:.2f} s, {summary['migrated']} migrated; profile in {dest / 'run.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

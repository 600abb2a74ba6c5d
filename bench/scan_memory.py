"""Peak memory of `repage scan` on a 5,000-document FLTR-shaped store (100k chunks, dim 1536).

Milvus Lite runs as its own process (`milvus-lite server`): it holds 2-3 GB at 100k
rows, and that memory is not repage's (docs/design.md §7.1). The store is built once by
bench.synthetic and reused while its manifest and row counts match. Then
`repage scan --json` runs as a subprocess against it, and this script samples the
RSS of that process and its children with psutil every 50 ms.

    .venv/bin/python -m bench.scan_memory [--documents 5000] [--limit-mb 300]

Exit 0 when the peak is under the limit, 1 when it is not, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.synthetic import CHUNKS_PER_DOC, IMAGE_CHUNKS, build_store, drop_if_exists
from repage.errors import ConfigError, RepageError, StoreError
from repage.stores.milvus import AFFECTED_FILTER, MilvusVectors, connect

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent
COLLECTION = "fltr_documents"
# Inherited settings that would point the scan elsewhere (docs/design.md §6.1: names and the app's fallbacks).
FOREIGN_ENV = (
    "MILVUS_URI",
    "MILVUS_TOKEN",
    "R2_ACCOUNT_ID",
    "R2_ACCESS_KEY_ID",
    "R2_SECRET_ACCESS_KEY",
    "R2_BUCKET_NAME",
)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LiteServer:
    """`milvus-lite server` on 127.0.0.1 as a child process; stopped on exit."""

    def __init__(self, data_dir: Path, port: int, log_path: Path):
        self.data_dir, self.port, self.log_path = data_dir, port, log_path
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LiteServer:
        self._log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [
                str(BIN / "milvus-lite"),
                "server",
                "--data-dir",
                str(self.data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait(120.0)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StoreError(f"milvus-lite server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                connect(self.uri, None, timeout=1.0).close()
                return
            except StoreError:
                time.sleep(0.1)
        raise StoreError(f"milvus-lite server at {self.uri} did not answer within {deadline_s:.0f}s")

    def rss_mb(self) -> float:
        try:
            return psutil.Process(self.proc.pid).memory_info().rss / 2**20
        except psutil.Error:
            return 0.0

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc, timeout=30)
        self._log.close()


# ---------------------------------------------------------------- the store


def ensure_store(uri: str, run_dir: Path, *, documents: int, pk: str, seed: int, images: bool, rebuild: bool) -> dict:
    """Reuse the store when its manifest and counts match, else build it again."""
    manifest_path = run_dir / "store.json"
    want = {
        "documents": documents,
        "pk": pk,
        "seed": seed,
        "images": images,
        "chunks": documents * CHUNKS_PER_DOC,
        "affected_chunks": documents * IMAGE_CHUNKS,
    }
    bucket = run_dir / "bucket"
    if not rebuild and manifest_path.exists():
        have = json.loads(manifest_path.read_text())
        if {k: have.get(k) for k in want} == want and _counts(uri) == (want["chunks"], want["affected_chunks"]):
            log(f"reusing the store in {run_dir} ({documents} documents)")
            return have
        log("the stored manifest or counts differ: rebuilding")
    manifest_path.unlink(missing_ok=True)
    shutil.rmtree(bucket, ignore_errors=True)
    bucket.mkdir(parents=True)
    drop_if_exists(uri, COLLECTION)
    log(f"building {documents} documents ({documents * CHUNKS_PER_DOC} chunks) at ~1.1k rows/s")
    summary = build_store(
        documents, uri, bucket.as_uri(), collection=COLLECTION, pk=pk, seed=seed, images=images, log=log
    ).as_dict()
    manifest = {**want, "build": summary}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def _counts(uri: str) -> tuple[int, int] | None:
    try:
        with MilvusVectors(uri, COLLECTION, timeout=600.0) as vectors:  # also loads a released collection
            return vectors.count(""), vectors.count(AFFECTED_FILTER)
    except ConfigError:
        return None


def preload(uri: str) -> float:
    """Load the collection before the scan so its time is the scan's, not Lite's load."""
    started = time.perf_counter()
    MilvusVectors(uri, COLLECTION, timeout=600.0).close()
    return time.perf_counter() - started


# ---------------------------------------------------------------- measuring


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(RSS of the process, RSS of it and all its descendants), bytes; 0 for what is gone."""
    try:
        own = proc.memory_info().rss
        children = proc.children(recursive=True)
    except psutil.Error:
        return 0, 0
    total = own
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return own, total


def scan_env(uri: str, run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPAGE_") and k not in FOREIGN_ENV}
    env.update(
        REPAGE_MILVUS_URI=uri,
        REPAGE_COLLECTION=COLLECTION,
        REPAGE_STORE_URL=(run_dir / "bucket").as_uri(),
        REPAGE_LEDGER_URL=f"sqlite:///{run_dir / 'ledger.db'}",
    )
    return env


def run_scan(uri: str, run_dir: Path, interval: float, server: LiteServer) -> dict:
    for suffix in ("", "-wal", "-shm", "-journal"):  # a fresh ledger: every document is scanned
        (run_dir / f"ledger.db{suffix}").unlink(missing_ok=True)
    out_path, err_path = run_dir / "scan.json", run_dir / "scan.stderr"
    command = [str(BIN / "repage"), "scan", "--json"]
    peak_own = peak_tree = 0
    samples: list[tuple[float, int, int]] = []
    server_peak = server.rss_mb()
    with out_path.open("w") as out, err_path.open("w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=scan_env(uri, run_dir), cwd=run_dir)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            own, tree = tree_rss(watched)
            peak_own, peak_tree = max(peak_own, own), max(peak_tree, tree)
            server_peak = max(server_peak, server.rss_mb())
            samples.append((time.perf_counter() - started, own, tree))
            time.sleep(interval)
        wall = time.perf_counter() - started
    with (run_dir / "rss.csv").open("w") as timeline:  # seconds since start, MB: where the peak is
        timeline.write("seconds,rss_mb,tree_rss_mb\n")
        timeline.writelines(f"{t:.2f},{o / 2**20:.1f},{r / 2**20:.1f}\n" for t, o, r in samples)
    if proc.returncode != 0:
        raise RepageError(f"`{' '.join(command)}` exited {proc.returncode}: {err_path.read_text().strip()[-2000:]}")
    report = json.loads(out_path.read_text())
    return {
        "command": " ".join(["repage", "scan", "--json"]),
        "wall_seconds": round(wall, 2),
        "scan_seconds": report.get("seconds"),
        "peak_rss_mb": round(peak_tree / 2**20, 1),
        "peak_rss_main_mb": round(peak_own / 2**20, 1),
        "samples": len(samples),
        "interval_s": interval,
        "server_peak_rss_mb": round(server_peak, 1),
        "documents": len(report["documents"]),
        "totals": report["totals"],
        "affected_chunks": report["affected_chunks"],
        "object_requests": report["object_requests"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scan_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=5000)
    parser.add_argument("--dir", type=Path, help="bench folder (default bench/out/scan-N)")
    parser.add_argument("--pk", choices=("auto", "chunk_id"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--images",
        action="store_true",
        help="also write the images (the scan does not read them: chunks carry page-bearing keys)",
    )
    parser.add_argument("--rebuild", action="store_true", help="build the store again even if it matches")
    parser.add_argument("--port", type=int, help="milvus-lite server port (default: a free one)")
    parser.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval, seconds")
    parser.add_argument("--limit-mb", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document")
    args = parser.parse_args(argv)
    run_dir = (args.dir or ROOT / "out" / f"scan-{args.documents}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with LiteServer(run_dir / "milvus.db", args.port or free_port(), run_dir / "server.log") as server:
            log(f"milvus-lite server at {server.uri} (data {server.data_dir})")
            store = ensure_store(
                server.uri,
                run_dir,
                documents=args.documents,
                pk=args.pk,
                seed=args.seed,
                images=args.images,
                rebuild=args.rebuild,
            )
            load_s = preload(server.uri)
            log(f"collection loaded in {load_s:.1f}s; scanning")
            result = run_scan(server.uri, run_dir, args.interval, server)
    except RepageError as exc:
        print(f"bench.scan_memory: {exc}", file=sys.stderr)
        return 2
    result.update(
        store_documents=store["documents"],
        store_chunks=store["chunks"],
        store_affected_chunks=store["affected_chunks"],
        pk=store["pk"],
        limit_mb=args.limit_mb,
        under_limit=result["peak_rss_mb"] < args.limit_mb,
        dir=str(run_dir),
    )
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        verdict = "yes" if result["under_limit"] else "NO"
        print(
            f"documents        {result['documents']:>10,} (store: {store['documents']:,})\n"
            f"chunks           {store['chunks']:>10,}\n"
            f"affected chunks  {result['affected_chunks']:>10,}\n"
            f"scan seconds     {result['scan_seconds']:>10} (process wall {result['wall_seconds']} s)\n"
            f"peak RSS MB      {result['peak_rss_mb']:>10} (process and children; main {result['peak_rss_main_mb']})\n"
            f"under {args.limit_mb:.0f} MB     {verdict:>10}\n"
            f"lite server RSS  {result['server_peak_rss_mb']:>10} MB (not repage's)"
        )
    return 0 if result["under_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""`make bench`: repage against the naive loop, the floor and floor + verify, on copies of the same store.

For each store (1,000 and 5,000 FLTR-shaped documents, images in a local folder; the
1,000-document store with its images in a moto_server bucket; and the same behind a proxy
adding 30 ms to every request, bench/latency.py) every contender gets a fresh copy of the
store and its own `milvus-lite server`, then runs as its own process while psutil samples
its RSS (and, separately, the Lite server's):

- naive: bench/contenders.py, the product's per-document loop (docs/design.md §8.3);
- floor: bench/contenders.py, one query, one COPY per image, partial updates of 1,000;
- floor_verify: floor plus the checks repage promises (bench/contenders.py);
- repage: `repage scan`, `repage estimate`, then `repage run` with its defaults.

After each one the store is checked: every image/OCR chunk's page and key, and the
canonical object behind it; every contender must leave the same store. Also measured: the
lazy-repair overhead (bench/lazy_overhead.py). The report and its target table
(bench/report.py) are printed and written to bench/out/report.json.

    .venv/bin/python -m bench.run [--sizes 1000,5000] [--moto-size 1000] [--no-moto]
        [--no-plain-moto] [--latency-ms 30] [--contenders naive,floor,floor_verify,repage]
        [--naive-max-seconds 600] [--rebuild]

Exit 0 when every run finished and left the expected store (targets missed or not: the
report says which), 1 when a contender failed or left a wrong store, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.latency import LatencyProxy
from bench.report import TARGETS, latency_bucket, ratios, render, verdicts
from bench.scan_memory import COLLECTION, LiteServer, free_port, tree_rss
from bench.stores import OUT, MotoServer, StoreSpec, clean_env, ensure_master, fresh_copy, load_and_count, log
from repage.errors import RepageError
from repage.stores.milvus import MilvusVectors

BIN = Path(sys.executable).parent
PY = sys.executable
INTERVAL = 0.05  # RSS sampling, seconds
CHECK_FIELDS = ["chunk_id", "document_id", "dataset_id", "chunk_type", "page", "image_index", "image_r2_key"]


# ---------------------------------------------------------------- processes


def measure(command: list[str], env: dict, cwd: Path, server: LiteServer, name: str, timeout: float = 3600.0) -> dict:
    """Run `command`, sampling its RSS (with children) and the Lite server's; parse its JSON stdout."""
    out_path, err_path = cwd / f"{name}.json", cwd / f"{name}.stderr"
    peak = peak_server = 0.0
    with out_path.open("w") as out, err_path.open("w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=cwd)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            _own, tree = tree_rss(watched)
            peak = max(peak, tree / 2**20)
            peak_server = max(peak_server, server.rss_mb())
            if time.perf_counter() - started > timeout:
                proc.kill()
            time.sleep(INTERVAL)
        wall = time.perf_counter() - started
    result = {
        "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)),
        "exit": proc.returncode,
        "wall_seconds": round(wall, 2),
        "peak_rss_mb": round(peak, 1),
        "lite_peak_rss_mb": round(peak_server, 1),
    }
    try:
        result["output"] = json.loads(out_path.read_text())
    except ValueError:
        result["output"] = None
    if proc.returncode not in (0, 1) or result["output"] is None:
        result["stderr"] = err_path.read_text()[-2000:]
    return result


# ---------------------------------------------------------------- the store after a run


def check_store(uri: str, bucket_dir: Path | None, objects=None) -> dict:
    """Every image/OCR chunk: page equals the page in its canonical key, and the object exists."""
    with MilvusVectors(uri, COLLECTION, timeout=900.0) as vectors:
        rows = [
            r
            for page in vectors.iter_documents(fields=CHECK_FIELDS)
            for r in page
            if r["chunk_type"] in ("image", "ocr")
        ]
    wrong, missing, digest = 0, 0, hashlib.sha256()
    for row in sorted(rows, key=lambda r: r["chunk_id"]):
        key = row["image_r2_key"] or ""
        folder, _, name = key.rpartition("/")
        stem = name.rsplit(".", 1)[0]
        page, _, index = stem.partition("_")
        ok = (
            folder == f"{row['dataset_id']}/{row['document_id']}/images"
            and page.isdigit()
            and index.isdigit()
            and int(page) == row["page"]
            and int(index) == row["image_index"]
        )
        wrong += not ok
        digest.update(f"{row['chunk_id']}\t{row['page']}\t{key}\n".encode())
    keys = sorted({r["image_r2_key"] for r in rows if r["image_r2_key"]})
    if bucket_dir is not None:
        missing = sum(1 for k in keys if not (bucket_dir / k).is_file())
    elif objects is not None:  # an S3 bucket: one listing per dataset is cheaper than a HEAD per key
        present = set()
        for dataset in {k.split("/", 1)[0] for k in keys}:
            present.update(info.key for page in objects.list(dataset) for info in page)
        missing = sum(1 for k in keys if k not in present)
    return {
        "image_chunks": len(rows),
        "wrong": wrong,
        "objects_missing": missing,
        "digest": digest.hexdigest()[:16],
        "correct": wrong == 0 and missing == 0,
    }


# ---------------------------------------------------------------- contenders


@dataclass
class Buckets:
    """Where a store's objects live: a local folder, or moto_server (behind the latency proxy when set)."""

    kind: str  # "local", "s3" or latency_bucket(ms)
    moto: MotoServer | None = None
    proxy: LatencyProxy | None = None

    @property
    def local(self) -> bool:
        return self.kind == "local"


def run_one(contender: str, spec: StoreSpec, master: Path, buckets: Buckets, args) -> dict:
    dest = OUT / "run" / f"{spec.name}-{buckets.kind}-{contender}"
    started = time.perf_counter()
    fresh_copy(master, dest, bucket=buckets.local)
    copy_s = time.perf_counter() - started
    entry = {
        "contender": contender,
        "documents": spec.documents,
        "chunks": spec.documents * 20,
        "bucket": buckets.kind,
        "dir": str(dest),
    }
    with LiteServer(dest / "lite", free_port(), dest / "server.log") as server:
        load_s, rows, affected = load_and_count(server.uri)
        if (rows, affected) != (spec.documents * 20, spec.documents * 6):
            raise RepageError(f"{dest}: the copy holds {rows} rows ({affected} affected)")
        env, store_url, objects = contender_env(contender, spec, master, buckets, server, dest, entry)
        entry["setup"] = {"copy_seconds": round(copy_s, 1), "load_seconds": round(load_s, 1)}
        log(f"{contender} on {spec.documents:,} documents, {buckets.kind} bucket")
        if buckets.proxy:
            buckets.proxy.take_count()  # count this contender's requests only
        if contender == "repage":
            entry.update(run_repage(env, dest, server))
            if entry.get("scan_seconds") is not None:
                entry["scan_seconds_per_100k_chunks"] = round(entry["scan_seconds"] * 100_000 / entry["chunks"], 1)
        else:
            entry.update(run_reference(contender, spec, buckets, args, env, store_url, dest, server))
        if buckets.proxy:
            entry["proxy_requests"] = buckets.proxy.take_count()
        if entry.get("complete"):
            entry["check"] = check_store(server.uri, dest / "bucket" if buckets.local else None, objects)
            if contender == "repage":  # after the check: rollback undoes the run
                entry["after_run"] = verify_and_rollback(env, dest, server, entry)
        if objects is not None:
            objects.close()
    shutil.rmtree(dest / "lite", ignore_errors=True)  # GBs at 5,000 documents; logs and JSON stay
    shutil.rmtree(dest / "bucket", ignore_errors=True)
    return entry


def contender_env(contender, spec, master, buckets: Buckets, server, dest, entry) -> tuple[dict, str, object]:
    """The contender's environment, its store URL, and an ObjectStore on the S3 bucket for the check."""
    env = {
        "REPAGE_MILVUS_URI": server.uri,
        "REPAGE_COLLECTION": COLLECTION,
        "REPAGE_LEDGER_URL": f"sqlite:///{dest / 'ledger.db'}",
    }
    objects = None
    if buckets.local:
        store_url = (dest / "bucket").as_uri()
    else:
        moto = buckets.moto
        # S3 bucket names allow no "_" nor "+"; one moto_server holds every row's buckets
        bucket = f"bench-{contender}-{spec.documents}-{buckets.kind}".replace("_", "-").replace("+", "-")
        uploaded, upload_s = moto.fill_bucket(bucket, master / "bucket")  # straight to moto: setup pays no delay
        entry["bucket_fill"] = {"objects": uploaded, "seconds": round(upload_s, 1)}
        store_url = f"s3://{bucket}"
        env.update(moto.env())
        if buckets.proxy:
            env["REPAGE_S3_ENDPOINT"] = buckets.proxy.endpoint
        objects = moto.store(bucket)
    env["REPAGE_STORE_URL"] = store_url
    return clean_env(env), store_url, objects


def run_reference(contender, spec, buckets: Buckets, args, env, store_url, dest, server) -> dict:
    """naive, floor or floor_verify (bench/contenders.py) as its own process."""
    command = [PY, "-m", "bench.contenders", contender, "--milvus-uri", server.uri, "--store-url", store_url]
    env["PYTHONPATH"] = str(OUT.parent.parent)
    if not buckets.local:
        command += ["--s3-endpoint", env["REPAGE_S3_ENDPOINT"]]
    cap = None
    if contender == "naive":  # the naive loop on a large Lite store takes hours: sample its rate
        full = buckets.local and spec.documents <= args.naive_full_up_to
        cap = args.naive_max_seconds if full else args.naive_sample_seconds
        command += ["--max-seconds", str(cap)]
    proc = measure(command, env, dest, server, contender)
    return {"time_cap_seconds": cap, **contender_figures(proc)}


def contender_figures(proc: dict) -> dict:
    out = proc["output"] or {}
    if proc["exit"] != 0 or not out:
        return {"error": proc.get("stderr") or f"exit {proc['exit']}", "complete": False}
    seconds = out["seconds"]
    return {
        "complete": out["complete"],
        "documents_done": out["documents"],
        "chunks_done": out["chunks"],
        "seconds": round(seconds, 2),
        "documents_per_s": round(out["documents"] / seconds, 2),
        "chunks_per_s": round(out["chunks"] / seconds, 1),
        "requests": {
            "class_a": out["objects"]["class_a"],
            "class_b": out["objects"]["class_b"],
            "by_kind": out["objects"]["by_kind"],
        },
        "milvus_calls": out["milvus_calls"],
        **({"steps_seconds": out["steps"]} if "steps" in out else {}),
        "peak_rss_mb": proc["peak_rss_mb"],
        "lite_peak_rss_mb": proc["lite_peak_rss_mb"],
        "wall_seconds": proc["wall_seconds"],
    }


def run_repage(env: dict, dest: Path, server: LiteServer) -> dict:
    repage = str(BIN / "repage")
    for suffix in ("", "-wal", "-shm"):
        (dest / f"ledger.db{suffix}").unlink(missing_ok=True)
    steps = {}
    for step, command in (
        ("scan", [repage, "scan", "--json"]),
        ("estimate", [repage, "estimate", "--json"]),
        ("run", [repage, "run", "--json"]),
    ):
        steps[step] = measure(command, env, dest, server, step)
        if steps[step]["exit"] != 0 or steps[step]["output"] is None:
            return {
                "error": f"repage {step}: " + (steps[step].get("stderr") or f"exit {steps[step]['exit']}"),
                "complete": False,
                "processes": steps,
            }
    scan, est, run = (steps[s]["output"] for s in ("scan", "estimate", "run"))
    seconds = scan["seconds"] + run["seconds"]
    predicted = est["total_seconds"]
    return {
        "complete": run["failed"] == 0 and run["migrated"] == run["documents"],
        "documents_done": run["migrated"],
        "chunks_done": run["chunks_written"],
        "seconds": round(seconds, 2),
        "scan_seconds": round(scan["seconds"], 2),
        "run_seconds": round(run["seconds"], 2),
        "documents_per_s": round(run["migrated"] / seconds, 2),
        "chunks_per_s": round(run["chunks_written"] / seconds, 1),
        "requests": {
            "class_a": run["class_a"],
            "class_b": run["class_b"],
            # per moved image: GET to hash it, COPY, GET of the copy (docs/design.md §5.1, §5.2)
            "by_kind": {
                "get": run["objects_copied"] * 2,
                "copy": run["objects_copied"],
                "head": run["class_b"] - 2 * run["objects_copied"],
                "list": run["class_a"] - run["objects_copied"],
            },
        },
        "batches": run["batches"],
        "failed": run["failed"],
        "peak_rss_mb": max(steps[s]["peak_rss_mb"] for s in steps),
        "peak_rss_mb_by_process": {s: steps[s]["peak_rss_mb"] for s in steps},
        "lite_peak_rss_mb": max(steps[s]["lite_peak_rss_mb"] for s in steps),
        "wall_seconds": round(sum(steps[s]["wall_seconds"] for s in steps), 2),
        "estimate": {
            "predicted_seconds": round(predicted, 2),
            "measured_run_seconds": round(run["seconds"], 2),
            "error": round(predicted / run["seconds"] - 1, 3) if run["seconds"] else None,
            "dollars": est["total_dollars"],
            "measured_dollars": run["dollars"],
            "latencies": est.get("latencies"),
        },
        "scan_seconds_per_100k_chunks": None,
    }


def verify_and_rollback(env: dict, dest: Path, server: LiteServer, entry: dict) -> dict:
    """`repage verify` and `repage rollback --all` on the repaired store: documents/s against the run's."""
    repage = str(BIN / "repage")
    run_rate = entry["documents_done"] / entry["run_seconds"] if entry.get("run_seconds") else None
    out = {}
    for step, command in (
        ("verify", [repage, "verify", "--json"]),
        ("rollback", [repage, "rollback", "--all", "--json"]),
    ):
        proc = measure(command, env, dest, server, step)
        report = proc["output"] or {}
        if proc["exit"] != 0 or not report.get("seconds"):
            out[step] = {"error": proc.get("stderr") or f"exit {proc['exit']}"}
            continue
        rate = report["passed"] / report["seconds"]
        out[step] = {
            "documents": report["passed"],
            "failed": len(report["failed"]),
            "seconds": report["seconds"],
            "documents_per_s": round(rate, 2),
            "ratio_to_run": round(rate / run_rate, 3) if run_rate else None,
            "peak_rss_mb": proc["peak_rss_mb"],
        }
    return out


# ---------------------------------------------------------------- report


def lazy_overhead(rounds: int = 3) -> dict:
    """bench/lazy_overhead.py, `rounds` times; the round with the median cold p99 is reported.

    Its percentiles are wall time on a shared 2-core machine: one round can catch another
    process's burst. Every round is kept in the report.
    """
    runs = []
    for _ in range(rounds):
        proc = subprocess.run(
            [PY, "-m", "bench.lazy_overhead", "--json"], capture_output=True, text=True, cwd=OUT.parent.parent
        )
        if not proc.stdout.strip():
            return {"error": proc.stderr[-2000:]}
        runs.append(json.loads(proc.stdout))
    runs.sort(key=lambda r: r["cold"]["p99_us"])
    chosen = dict(runs[len(runs) // 2])
    chosen["rounds"] = [{"warm": r["warm"], "cold": r["cold"]} for r in runs]
    chosen["load_average"] = os.getloadavg()
    return chosen


LOG_KEYS = ("contender", "documents", "bucket", "documents_per_s", "seconds", "peak_rss_mb", "complete", "error")
# Behind the added latency only floor and repage run: that row asks for repage / floor and
# repage's minutes, and each contender there takes minutes.
LATENCY_CONTENDERS = ("floor", "repage")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000", help="documents per local-bucket store ('' for none)")
    parser.add_argument("--moto-size", type=int, default=1000, help="documents of the moto_server stores (0: none)")
    parser.add_argument("--no-moto", action="store_true", help="no moto_server row, with or without latency")
    parser.add_argument(
        "--plain-moto",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the moto_server row without added latency (--no-plain-moto: only the latency row)",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=float(TARGETS["latency_ms"]),
        help="the moto_server row behind a proxy adding this much to every request, floor and repage only (0: none)",
    )
    parser.add_argument("--contenders", default="naive,floor,floor_verify,repage")
    parser.add_argument(
        "--naive-max-seconds",
        type=float,
        default=600.0,
        help="stop naive after this long and report its rate on the documents done",
    )
    parser.add_argument(
        "--naive-full-up-to",
        type=int,
        default=1000,
        help="run naive to the end on local-bucket stores up to this many documents; "
        "sample larger ones and the moto_server store",
    )
    parser.add_argument(
        "--naive-sample-seconds",
        type=float,
        default=60.0,
        help="how long naive runs on larger stores (its rate over the documents done)",
    )
    parser.add_argument("--rebuild", action="store_true", help="build the cached stores again")
    parser.add_argument("--report", type=Path, default=OUT / "report.json")
    return parser.parse_args(argv)


def plan_rows(args: argparse.Namespace) -> list[tuple[int, str, list[str]]]:
    """(documents, bucket kind, contenders) for each store row, in the order they run."""
    contenders = [c for c in args.contenders.split(",") if c]
    plan = [(int(n), "local", contenders) for n in args.sizes.split(",") if n]
    if args.moto_size and not args.no_moto:
        if args.plain_moto:
            plan.append((args.moto_size, "s3", contenders))
        slow = [c for c in contenders if c in LATENCY_CONTENDERS]
        if args.latency_ms > 0 and slow:
            plan.append((args.moto_size, latency_bucket(args.latency_ms), slow))
    return plan


def run_plan(plan: list[tuple[int, str, list[str]]], args: argparse.Namespace, results: list[dict]) -> bool:
    """Every contender of every row, appended to results; True when one failed or left a wrong store."""
    masters = {n: ensure_master(StoreSpec(n), rebuild=args.rebuild) for n in sorted({n for n, _, _ in plan})}
    kinds = {kind for _, kind, _ in plan}
    failed = False
    with ExitStack() as stack:
        moto = stack.enter_context(MotoServer(OUT / "moto_server.log")) if kinds - {"local"} else None
        proxy = None
        if kinds - {"local", "s3"}:
            proxy = stack.enter_context(LatencyProxy(moto.endpoint, args.latency_ms))
        for n, kind, contenders in plan:
            buckets = Buckets(kind, moto if kind != "local" else None, proxy if kind not in ("local", "s3") else None)
            for contender in contenders:
                entry = run_one(contender, StoreSpec(n), masters[n], buckets, args)
                failed |= bool(entry.get("error")) or (entry.get("check") is not None and not entry["check"]["correct"])
                results.append(entry)
                log(json.dumps({k: entry.get(k) for k in LOG_KEYS}))
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "milvus_lite": _version("milvus-lite"),
            "pymilvus": _version("pymilvus"),
            "obstore": _version("obstore"),
            "load_average_at_start": os.getloadavg(),
        },
        "targets_config": TARGETS,
        "naive_max_seconds": args.naive_max_seconds,
        "latency_ms": args.latency_ms,
        "results": [],
    }
    log("lazy-repair overhead (3 rounds)")
    report["lazy"] = lazy_overhead()  # first, while no Lite server of ours competes for the CPUs
    try:
        failed = run_plan(plan_rows(args), args, report["results"])
    except RepageError as exc:
        print(f"bench.run: {exc}", file=sys.stderr)
        return 2
    ratios(report["results"])
    report["targets"] = verdicts(report["results"], report["lazy"])
    digests = {}
    for r in report["results"]:
        if r.get("check"):
            digests.setdefault((r["documents"], r["bucket"]), set()).add(r["check"]["digest"])
    report["same_result"] = {f"{n} {b}": len(d) == 1 for (n, b), d in digests.items()}
    failed |= not all(report["same_result"].values())
    report["minutes"] = round((time.perf_counter() - started) / 60, 1)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2, default=str))
    print(render(report))
    print(f"\nsame store left by every contender: {report['same_result']}; report: {args.report}")
    return 1 if failed else 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())

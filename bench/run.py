"""`make bench`: repage against the naive loop and the floor, on copies of the same store.

For each store (1,000 and 5,000 FLTR-shaped documents, images in a local folder; and the
1,000-document store with its images in a moto_server bucket) every contender gets a fresh
copy of the store and its own `milvus-lite server`, then runs as its own process while
psutil samples its RSS (and, separately, the Lite server's):

- naive: bench/contenders.py, the product's per-document loop (docs/design.md §8.3);
- floor: bench/contenders.py, one query, one COPY per image, partial updates of 1,000;
- repage: `repage scan`, `repage estimate`, then `repage run` with its defaults.

After each one the store is checked: every image/OCR chunk's page and key, and the
canonical object behind it; naive, floor and repage must leave the same store.
Also measured: the lazy-repair overhead (bench/lazy_overhead.py). The report is printed
and written to bench/out/report.json.

    .venv/bin/python -m bench.run [--sizes 1000,5000] [--moto-size 1000] [--no-moto]
        [--contenders naive,floor,repage] [--naive-max-seconds 600] [--rebuild]

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
from pathlib import Path

import psutil

from bench.scan_memory import COLLECTION, LiteServer, free_port, tree_rss
from bench.stores import OUT, MotoServer, StoreSpec, clean_env, ensure_master, fresh_copy, load_and_count, log
from repage.errors import RepageError
from repage.stores.milvus import MilvusVectors

BIN = Path(sys.executable).parent
PY = sys.executable
INTERVAL = 0.05  # RSS sampling, seconds
TARGETS = {"floor_ratio": 0.8, "naive_ratio": 30.0, "rss_mb": 300.0, "estimate_error": 0.25, "lazy_p99_us": 1000.0}
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


def run_one(contender: str, spec: StoreSpec, master: Path, kind: str, args, moto: MotoServer | None) -> dict:
    dest = OUT / "run" / f"{spec.name}-{kind}-{contender}"
    started = time.perf_counter()
    fresh_copy(master, dest, bucket=kind == "local")
    copy_s = time.perf_counter() - started
    entry = {
        "contender": contender,
        "documents": spec.documents,
        "chunks": spec.documents * 20,
        "bucket": kind,
        "dir": str(dest),
    }
    with LiteServer(dest / "lite", free_port(), dest / "server.log") as server:
        load_s, rows, affected = load_and_count(server.uri)
        if (rows, affected) != (spec.documents * 20, spec.documents * 6):
            raise RepageError(f"{dest}: the copy holds {rows} rows ({affected} affected)")
        env = {
            "REPAGE_MILVUS_URI": server.uri,
            "REPAGE_COLLECTION": COLLECTION,
            "REPAGE_LEDGER_URL": f"sqlite:///{dest / 'ledger.db'}",
        }
        objects = None
        if kind == "local":
            store_url = (dest / "bucket").as_uri()
        else:
            bucket = f"bench-{contender}-{spec.documents}"
            uploaded, upload_s = moto.fill_bucket(bucket, master / "bucket")
            entry["bucket_fill"] = {"objects": uploaded, "seconds": round(upload_s, 1)}
            store_url = f"s3://{bucket}"
            env.update(moto.env())
            objects = moto.store(bucket)
        env["REPAGE_STORE_URL"] = store_url
        env = clean_env(env)
        entry["setup"] = {"copy_seconds": round(copy_s, 1), "load_seconds": round(load_s, 1)}
        log(f"{contender} on {spec.documents:,} documents, {kind} bucket")
        if contender == "repage":
            entry.update(run_repage(env, dest, server))
        else:
            command = [PY, "-m", "bench.contenders", contender, "--milvus-uri", server.uri, "--store-url", store_url]
            env["PYTHONPATH"] = str(OUT.parent.parent)
            if kind == "s3":
                command += ["--s3-endpoint", moto.endpoint]
            cap = None
            if contender == "naive":  # the naive loop on a large Lite store takes hours: sample its rate
                full = kind == "local" and spec.documents <= args.naive_full_up_to
                cap = args.naive_max_seconds if full else args.naive_sample_seconds
                command += ["--max-seconds", str(cap)]
            entry["time_cap_seconds"] = cap
            proc = measure(command, env, dest, server, contender)
            entry.update(contender_figures(proc))
        if entry.get("complete"):
            entry["check"] = check_store(server.uri, dest / "bucket" if kind == "local" else None, objects)
            if contender == "repage":  # after the check: rollback undoes the run
                entry["after_run"] = verify_and_rollback(env, dest, server, entry)
        if objects is not None:
            objects.close()
    shutil.rmtree(dest / "lite", ignore_errors=True)  # GBs at 5,000 documents; logs and JSON stay
    shutil.rmtree(dest / "bucket", ignore_errors=True)
    return entry


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


def ratios(results: list[dict]) -> None:
    """repage/naive and repage/floor in documents per second, per store."""
    by_store: dict[tuple, dict] = {}
    for r in results:
        by_store.setdefault((r["documents"], r["bucket"]), {})[r["contender"]] = r
    for group in by_store.values():
        rep = group.get("repage")
        if not rep or not rep.get("documents_per_s"):
            continue
        for other in ("naive", "floor"):
            o = group.get(other)
            if o and o.get("documents_per_s"):
                rep[f"ratio_to_{other}"] = round(rep["documents_per_s"] / o["documents_per_s"], 3)


def verdicts(results: list[dict], lazy: dict) -> dict:
    out = {}
    rep1k = next(
        (r for r in results if r["contender"] == "repage" and r["documents"] == 1000 and r["bucket"] == "local"), None
    )
    if rep1k:
        if "ratio_to_floor" in rep1k:
            out["repage >= 0.8x floor (1,000 docs, local)"] = (rep1k["ratio_to_floor"], rep1k["ratio_to_floor"] >= 0.8)
        if "ratio_to_naive" in rep1k:
            out["repage >= 30x naive (1,000 docs, local)"] = (rep1k["ratio_to_naive"], rep1k["ratio_to_naive"] >= 30)
        for step in ("verify", "rollback"):
            ratio = rep1k.get("after_run", {}).get(step, {}).get("ratio_to_run")
            if ratio is not None:
                out[f"{step} >= run, documents/s (1,000 docs, local)"] = (ratio, ratio >= 1.0)
    rep5k = next((r for r in results if r["contender"] == "repage" and r["documents"] == 5000), None)
    if rep5k and rep5k.get("peak_rss_mb"):
        out["repage RSS <= 300 MB (5,000 docs)"] = (rep5k["peak_rss_mb"], rep5k["peak_rss_mb"] <= 300)
    for r in results:
        est = r.get("estimate")
        if est and est.get("error") is not None:
            key = f"estimate within 25% ({r['documents']:,} docs, {r['bucket']})"
            out[key] = (est["error"], abs(est["error"]) <= 0.25)
    if "cold" in lazy:
        for case in ("cold", "warm"):
            out[f"lazy p99 < 1 ms ({case}, wall clock)"] = (lazy[case]["p99_us"], lazy[case]["p99_us"] < 1000)
            cpu = lazy.get(f"{case}_cpu")
            if cpu:
                out[f"lazy p99 < 1 ms ({case}, CPU time)"] = (cpu["p99_us"], cpu["p99_us"] < 1000)
    return {k: {"value": v, "met": ok} for k, (v, ok) in out.items()}


def render(report: dict) -> str:
    lines = [
        "",
        f"repage bench: {report['machine']['cpus']} CPUs, Milvus Lite {report['machine']['milvus_lite']}, "
        f"{report['minutes']} min",
        "",
    ]
    head = (
        f"{'store':<18}{'contender':<10}{'docs/s':>9}{'chunks/s':>10}{'seconds':>9}{'class A':>9}"
        f"{'class B':>9}{'RSS MB':>8}{'Lite MB':>9}{'x naive':>9}{'x floor':>9}  check"
    )
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        store = f"{r['documents']:,} {r['bucket']}"
        if r.get("error"):
            lines.append(f"{store:<18}{r['contender']:<10}  FAILED: {r['error'][:200]}")
            continue
        req = r.get("requests", {})
        note = "" if r.get("complete") else f" (sample: {r.get('documents_done')} docs)"
        check = r.get("check")
        check_s = ("ok " + check["digest"]) if check and check["correct"] else (f"WRONG {check}" if check else "-")
        lines.append(
            f"{store:<18}{r['contender']:<10}{r['documents_per_s']:>9.1f}{r['chunks_per_s']:>10.0f}"
            f"{r['seconds']:>9.1f}{req.get('class_a', 0):>9}{req.get('class_b', 0):>9}"
            f"{r['peak_rss_mb']:>8.0f}{r['lite_peak_rss_mb']:>9.0f}"
            f"{r.get('ratio_to_naive', float('nan')):>9.2f}{r.get('ratio_to_floor', float('nan')):>9.2f}"
            f"  {check_s}{note}"
        )
    lines.append("")
    for r in report["results"]:
        if r["contender"] == "repage" and r.get("estimate"):
            e = r["estimate"]
            lines.append(
                f"estimate {r['documents']:,} {r['bucket']}: predicted {e['predicted_seconds']:.1f} s, "
                f"measured run {e['measured_run_seconds']:.1f} s ({e['error']:+.0%}); "
                f"scan {r['scan_seconds']:.1f} s = {r['scan_seconds_per_100k_chunks']:.1f} s per 100k chunks; "
                f"RSS scan/estimate/run {r['peak_rss_mb_by_process']}"
            )
        for step, a in (r.get("after_run") or {}).items():
            if "error" in a:
                lines.append(f"{step} {r['documents']:,} {r['bucket']}: FAILED: {a['error'][:200]}")
                continue
            lines.append(
                f"{step} {r['documents']:,} {r['bucket']}: {a['documents']} documents in {a['seconds']:.1f} s = "
                f"{a['documents_per_s']:.1f} documents/s, {a['ratio_to_run']}x the run's; RSS {a['peak_rss_mb']:.0f} MB"
            )
    lazy = report.get("lazy", {})
    if "cold" in lazy:
        lines.append(
            f"lazy repair, 200-chunk response: warm p50 {lazy['warm']['p50_us']} µs, p99 {lazy['warm']['p99_us']} µs;"
            f" cold p50 {lazy['cold']['p50_us']} µs, p99 {lazy['cold']['p99_us']} µs (wall clock)"
        )
        if "cold_cpu" in lazy:
            lines.append(
                f"  CPU time: warm p50 {lazy['warm_cpu']['p50_us']} µs, p99 {lazy['warm_cpu']['p99_us']} µs;"
                f" cold p50 {lazy['cold_cpu']['p50_us']} µs, p99 {lazy['cold_cpu']['p99_us']} µs;"
                f" load average {lazy['load_average'][0]:.1f}"
            )
    lines += ["", "targets:"]
    for name, v in report["targets"].items():
        lines.append(f"  {'met   ' if v['met'] else 'MISSED'}  {name}: {v['value']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000", help="documents per local-bucket store")
    parser.add_argument("--moto-size", type=int, default=1000, help="documents of the moto_server store (0: none)")
    parser.add_argument("--no-moto", action="store_true")
    parser.add_argument("--contenders", default="naive,floor,repage")
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
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    contenders = [c for c in args.contenders.split(",") if c]
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
        "results": [],
    }
    failed = False
    log("lazy-repair overhead (3 rounds)")
    report["lazy"] = lazy_overhead()  # first, while no Lite server of ours competes for the CPUs
    try:
        masters = {
            n: ensure_master(StoreSpec(n), rebuild=args.rebuild) for n in sorted(set(sizes + [args.moto_size]) - {0})
        }
        plan = [(n, "local") for n in sizes]
        if args.moto_size and not args.no_moto:
            plan.append((args.moto_size, "s3"))
        moto_log = OUT / "moto_server.log"
        moto = MotoServer(moto_log) if any(kind == "s3" for _, kind in plan) else None
        if moto:
            moto.__enter__()
        try:
            for n, kind in plan:
                for contender in contenders:
                    entry = run_one(contender, StoreSpec(n), masters[n], kind, args, moto)
                    if entry.get("scan_seconds") is not None:
                        entry["scan_seconds_per_100k_chunks"] = round(
                            entry["scan_seconds"] * 100_000 / entry["chunks"], 1
                        )
                    failed |= bool(entry.get("error")) or (
                        entry.get("check") is not None and not entry["check"]["correct"]
                    )
                    report["results"].append(entry)
                    log(
                        json.dumps(
                            {
                                k: entry.get(k)
                                for k in (
                                    "contender",
                                    "documents",
                                    "bucket",
                                    "documents_per_s",
                                    "seconds",
                                    "peak_rss_mb",
                                    "complete",
                                    "error",
                                )
                            }
                        )
                    )
        finally:
            if moto:
                moto.__exit__()
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

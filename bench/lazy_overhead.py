"""Cost of LazyRepair.repair on the request path: one 200-chunk response, no I/O.

The response is FLTR-shaped (bench/synthetic.py proportions: 6 of every 20 chunks are
image/OCR with page 0 and a legacy key carrying the page; the rest is text with its page).
Two cases:
- warm: the same document read again (its keys are in the parse cache), the common case
  for the documents that are read at all;
- cold: every call brings keys never seen before (parse cost included), the worst case.
Each sample is one repair() call on fresh row dicts (copying them is not timed), timed
twice: wall clock (what a request waits) and the thread's CPU time (what repair costs; on
a loaded machine the wall-clock tail is the scheduler's, not repair's).

    .venv/bin/python -m bench.lazy_overhead [--samples 20000] [--json]

Exit 0 when the cold p99 is under --limit-us (default 1000 µs), else 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

from repage.migration.lazy import LazyRepair

CHUNKS = 200
IMAGE_EVERY = (2, 5, 8, 11, 14, 17)  # 6 of every 20 chunks, as bench/synthetic.py builds them


class NullSink:
    def record(self, accesses, enqueue) -> None:
        pass


def response(doc: str) -> list[dict]:
    rows = []
    for i in range(CHUNKS):
        image = i % 20 in IMAGE_EVERY
        rows.append(
            {
                "chunk_id": f"{doc}_{i}",
                "document_id": doc,
                "dataset_id": "ds-7f3a",
                "filename": "Field manual - rev_3.pdf",
                "chunk_index": i,
                "chunk_type": ("image" if i % 2 else "ocr") if image else "text",
                "page": 0 if image else i // 8,
                "image_index": i if image else None,
                "ocr_confidence": 0.93 if image else None,
                "text": "x" * 64,
                "image_r2_key": f"ds-7f3a/{doc}/images/{i}_Field manual - rev_3.pdf-{i // 8}-{i % 3}.png"
                if image
                else None,
            }
        )
    return rows


def measure(samples: int, cold: bool) -> tuple[list[float], list[float]]:
    lazy = LazyRepair(NullSink(), max_buffered=1_000_000)
    template = response("doc-warm")
    lazy.repair([dict(r) for r in template])
    times, cpu = [], []
    gc.disable()  # a collection pause is the process's, not repair's; report it separately if wanted
    try:
        for n in range(samples):
            rows = response(f"doc-{n}") if cold else [dict(r) for r in template]
            started, started_cpu = time.perf_counter_ns(), time.thread_time_ns()
            lazy.repair(rows)
            cpu.append((time.thread_time_ns() - started_cpu) / 1000.0)
            times.append((time.perf_counter_ns() - started) / 1000.0)
    finally:
        gc.enable()
    return times, cpu


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)  # noqa: E731
    return {
        "p50_us": pick(0.50),
        "p99_us": pick(0.99),
        "max_us": round(ordered[-1], 1),
        "mean_us": round(statistics.fmean(ordered), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--limit-us", type=float, default=1000.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warm, warm_cpu = measure(args.samples, cold=False)
    cold, cold_cpu = measure(min(args.samples, 5000), cold=True)
    report = {
        "chunks": CHUNKS,
        "affected_per_response": sum(1 for r in response("x") if r["page"] == 0 and r["image_r2_key"]),
        "samples": args.samples,
        "warm": summary(warm),
        "cold": summary(cold),
        "warm_cpu": summary(warm_cpu),
        "cold_cpu": summary(cold_cpu),
        "limit_us": args.limit_us,
    }
    report["ok"] = report["cold"]["p99_us"] < args.limit_us
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for case in ("warm", "cold"):
            r, c = report[case], report[f"{case}_cpu"]
            print(
                f"{case}: p50 {r['p50_us']} µs, p99 {r['p99_us']} µs, max {r['max_us']} µs "
                f"(CPU time p50 {c['p50_us']} µs, p99 {c['p99_us']} µs; "
                f"{CHUNKS} chunks, {report['affected_per_response']} affected)"
            )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

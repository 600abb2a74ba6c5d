"""What repage's flush after each batch costs on Milvus Lite (docs/milvus-lite-durability.md).

Builds a synthetic store (bench/synthetic.py, 20 chunks per document, dim 1536) in a fresh
`milvus-lite server`, then for each batch size: partial-updates the image/OCR chunks of that many
documents (6 per document: the batch's write), times the read-back of the written rows by primary
key (as `find_written` does) before the flush, the flush itself, and the same read-back after it.

    .venv/bin/python -m bench.lite_flush [--documents 1000] [--batches 200,1] [--rounds 3]

Prints one JSON document: per batch size, the median seconds of each step over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.scan_memory import LiteServer, free_port
from bench.synthetic import build_store
from repage.stores.milvus import AFFECTED_FILTER, MilvusVectors, in_filter

COLLECTION = "fltr_documents"


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def measure(vectors: MilvusVectors, pks: list[int], rounds: int, page: int) -> dict:
    steps: dict[str, list[float]] = {
        "write": [],
        "read_back_before_flush": [],
        "flush": [],
        "read_back_after_flush": [],
    }
    info = vectors.info()
    for r in range(rounds):
        batch = pks[r * len(pks) // rounds : (r + 1) * len(pks) // rounds]
        rows = [{info.pk_field: pk, "page": page} for pk in batch]
        expr = in_filter(info.pk_field, batch)

        def read(expr: str = expr) -> list[dict]:
            return vectors._query(expr, ["*"])  # noqa: SLF001 (the read-back's query)

        steps["write"].append(_timed(lambda rows=rows: vectors._upsert(rows, True))[0])  # noqa: SLF001
        steps["read_back_before_flush"].append(_timed(read)[0])
        steps["flush"].append(_timed(vectors.flush)[0])
        steps["read_back_after_flush"].append(_timed(read)[0])
    return {name: round(statistics.median(values), 4) for name, values in steps.items()}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lite_flush", description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--batches", default="200,1", help="documents per batch, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    report: dict = {"documents": args.documents, "rows": args.documents * 20, "batches": {}}
    with tempfile.TemporaryDirectory(prefix="bench-lite-flush-") as tmp:
        with LiteServer(Path(tmp) / "lite", free_port(), Path(tmp) / "server.log") as server:
            build_store(args.documents, server.uri, None, collection=COLLECTION, images=False)
            with MilvusVectors(server.uri, COLLECTION, timeout=600.0) as vectors:
                pk = vectors.info().pk_field
                affected = [r[pk] for page in vectors.iter_affected(page_rows=10_000, fields=[pk]) for r in page]
                start = 0
                for docs in (int(b) for b in args.batches.split(",")):
                    size = docs * 6 * args.rounds
                    pks, start = affected[start : start + size], start + size
                    report["batches"][f"{docs} documents ({docs * 6} rows)"] = measure(vectors, pks, args.rounds, 7)
                report["affected_left"] = vectors.count(AFFECTED_FILTER)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

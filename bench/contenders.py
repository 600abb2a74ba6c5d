"""The two reference contenders, written with pymilvus and obstore directly (no repage engine).

- naive: exactly the product's per-document loop (docs/design.md §8.3). Query the affected chunks'
  document_ids once; then for
  each document in turn: list its image prefix, parse each legacy name, copy each image to
  its canonical key, query all fields of the document's chunks (`document_id == "..."`),
  upsert the changed rows (full rows) with their new page and key; next document.
- floor: the least work for the same result. One filtered query returning the primary key
  and image_r2_key of the affected chunks, key parsing in memory, one COPY per image (on
  CONCURRENCY threads, repage's default), partial updates of page and image_r2_key in
  batches of 1,000.

Neither journals, verifies a copy or reads anything back: they are what repage is measured
against, not something to run on a real store. Each runs as its own process, so its peak
RSS is measured the same way as repage's:

    python -m bench.contenders naive|floor --milvus-uri http://127.0.0.1:P --store-url file:///abs/bucket
        [--s3-endpoint http://127.0.0.1:Q] [--max-seconds S]

and prints one JSON document: documents, chunks, seconds (work only: after connecting),
object requests by kind and R2 class, Milvus calls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import obstore
from obstore.store import LocalStore, S3Store
from pymilvus import MilvusClient

COLLECTION = "fltr_documents"
AFFECTED = 'page == 0 && (chunk_type == "ocr" || chunk_type == "image" || ocr_confidence > 0.0)'
QUERY_CAP = 16_384  # Milvus' cap on rows per query
FLOOR_BATCH = 1_000
CONCURRENCY = 4  # repage's default concurrency for object requests
LEGACY = re.compile(
    r"(?P<index>[0-9]+)_(?P<base>.+)-(?P<page>[0-9]+)-(?P<sub>full|[0-9]+)"
    r"\.(?P<ext>png|jpe?g|gif|bmp|webp)",
    re.IGNORECASE | re.DOTALL,
)
CLASS = {"list": "A", "copy": "A", "put": "A", "get": "B", "head": "B"}


class Objects:
    """obstore with request counting (R2 classes)."""

    def __init__(self, store_url: str, endpoint: str | None):
        parts = urlsplit(store_url)
        if parts.scheme == "file":
            self.store = LocalStore(parts.path)
        elif parts.scheme == "s3":
            self.store = S3Store(
                parts.netloc,
                endpoint=endpoint,
                region="us-east-1",
                access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                virtual_hosted_style_request=False,
                client_options={"allow_http": True},
            )
        else:
            raise SystemExit(f"unsupported store URL {store_url!r}")
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def _count(self, op: str, n: int = 1) -> None:
        with self._lock:
            self.counts[op] += n

    def list(self, prefix: str) -> list[str]:
        keys, pages = [], 0
        for page in obstore.list(self.store, prefix, chunk_size=1000):
            pages += 1
            keys.extend(meta["path"] for meta in page)
        self._count("list", max(pages, 1))
        return keys

    def copy(self, src: str, dst: str) -> None:
        obstore.copy(self.store, src, dst, overwrite=True)
        self._count("copy")

    def classes(self) -> dict:
        a = sum(n for op, n in self.counts.items() if CLASS[op] == "A")
        b = sum(n for op, n in self.counts.items() if CLASS[op] == "B")
        return {"by_kind": dict(self.counts), "class_a": a, "class_b": b}


def canonical(old_key: str, index: int | None = None) -> tuple[int, str] | None:
    """(page, canonical key) for a legacy key; None for any other key."""
    folder, _, name = old_key.rpartition("/")
    m = LEGACY.fullmatch(name)
    if not m:
        return None
    page = int(m["page"])
    idx = int(m["index"]) if index is None else index
    return page, f"{folder}/{page}_{idx}.{m['ext'].lower()}"


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Milvus:
    def __init__(self, uri: str):
        self.client = MilvusClient(uri)
        self.calls: Counter = Counter()
        desc = self.client.describe_collection(COLLECTION)
        self.pk = next(f["name"] for f in desc["fields"] if f.get("is_primary"))

    def query_all(self, expr: str, fields: list[str]) -> list[dict]:
        """Every matching row, pages of QUERY_CAP by a cursor on the (int64) primary key."""
        rows, cursor = [], None
        while True:
            bound = f"{self.pk} > {cursor} && ({expr})" if cursor is not None else expr
            page = self.client.query(
                COLLECTION, filter=bound, output_fields=fields, limit=QUERY_CAP, consistency_level="Strong"
            )
            self.calls["query"] += 1
            rows.extend(dict(r) for r in page)
            if len(page) < QUERY_CAP:
                return rows
            cursor = max(r[self.pk] for r in page)


def naive(milvus: Milvus, objects: Objects, max_seconds: float | None) -> dict:
    started = time.perf_counter()
    affected = milvus.query_all(AFFECTED, ["document_id", "dataset_id"])
    documents = list(dict.fromkeys((r["dataset_id"], r["document_id"]) for r in affected))
    done = chunks = 0
    for dataset_id, document_id in documents:
        if max_seconds is not None and time.perf_counter() - started >= max_seconds:
            break
        moved = {}
        for key in objects.list(f"{dataset_id}/{document_id}/images/"):
            target = canonical(key)
            if target is None:
                continue
            objects.copy(key, target[1])
            moved[key] = target
        rows = milvus.client.query(
            COLLECTION, filter=f"document_id == {quote(document_id)}", output_fields=["*"], consistency_level="Strong"
        )
        milvus.calls["query"] += 1
        changed = []
        for row in rows:
            row = dict(row)
            target = moved.get(row.get("image_r2_key"))
            if target is None or row.get("page") != 0 or row.get("chunk_type") not in ("image", "ocr"):
                continue
            row["page"], row["image_r2_key"] = target
            changed.append(row)
        if changed:
            milvus.client.upsert(COLLECTION, changed)
            milvus.calls["upsert"] += 1
        done += 1
        chunks += len(changed)
    return {
        "documents": done,
        "documents_total": len(documents),
        "chunks": chunks,
        "seconds": time.perf_counter() - started,
        "complete": done == len(documents),
    }


def floor(milvus: Milvus, objects: Objects, max_seconds: float | None) -> dict:
    started = time.perf_counter()
    rows = milvus.query_all(AFFECTED, [milvus.pk, "image_r2_key"])
    updates, copies = [], {}
    for row in rows:
        target = canonical(row["image_r2_key"] or "")
        if target is None:
            continue
        copies[row["image_r2_key"]] = target[1]
        updates.append({milvus.pk: row[milvus.pk], "page": target[0], "image_r2_key": target[1]})
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda kv: objects.copy(*kv), copies.items()))
    for start in range(0, len(updates), FLOOR_BATCH):
        milvus.client.upsert(COLLECTION, updates[start : start + FLOOR_BATCH], partial_update=True)
        milvus.calls["upsert"] += 1
    documents = len({key.split("/")[1] for key in copies})
    return {
        "documents": documents,
        "documents_total": documents,
        "chunks": len(updates),
        "seconds": time.perf_counter() - started,
        "complete": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.contenders", description=__doc__.split("\n\n")[0])
    parser.add_argument("contender", choices=("naive", "floor"))
    parser.add_argument("--milvus-uri", required=True)
    parser.add_argument("--store-url", required=True)
    parser.add_argument("--s3-endpoint")
    parser.add_argument("--max-seconds", type=float, help="stop after this long (naive on large stores: a sample)")
    args = parser.parse_args(argv)
    milvus = Milvus(args.milvus_uri)
    objects = Objects(args.store_url, args.s3_endpoint)
    work = naive if args.contender == "naive" else floor
    result = work(milvus, objects, args.max_seconds)
    result.update(contender=args.contender, objects=objects.classes(), milvus_calls=dict(milvus.calls))
    milvus.client.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

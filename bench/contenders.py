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
- floor_verify ("floor + verify"): floor plus the checks repage promises and nothing else.
  The affected rows are fetched with all fields (vectors too) and each row's checksum taken
  with repage's own `row_checksum`; per image a GET + SHA-256 of the original, the COPY, a
  GET + SHA-256 of the copy (size and hash compared), CONCURRENCY at a time; floor's partial
  updates; then every written row read back by primary key with all fields, its checksum,
  page and key compared. No ledger, no journal. Any mismatch: exit 1.

naive and floor neither journal, verify a copy nor read anything back; none of the three
journals: they are what repage is measured against, not something to run on a real store.
Each runs as its own process, so its peak RSS is measured the same way as repage's:

    python -m bench.contenders naive|floor|floor_verify --milvus-uri http://127.0.0.1:P
        --store-url file:///abs/bucket [--s3-endpoint http://127.0.0.1:Q] [--max-seconds S]

and prints one JSON document: documents, chunks, seconds (work only: after connecting),
object requests by kind and R2 class, Milvus calls.
"""

from __future__ import annotations

import argparse
import hashlib
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
from pymilvus import DataType, MilvusClient

from repage.config import Settings
from repage.stores.milvus import row_checksum

COLLECTION = "fltr_documents"
AFFECTED = 'page == 0 && (chunk_type == "ocr" || chunk_type == "image" || ocr_confidence > 0.0)'
QUERY_CAP = 16_384  # Milvus' cap on rows per query
FLOOR_BATCH = 1_000
# Rows per query when vectors come along (~7 KB a row): under Milvus' 64 MB reply cap, and
# few queries, since each Lite query pays for every unsealed row (docs/performance.md,
# "Milvus Lite: every query pays for the rows written since the last flush").
VECTOR_ROWS = 5_000
CONCURRENCY = Settings.model_fields["concurrency"].default  # repage's default: object requests in flight
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

    def fingerprint(self, key: str) -> tuple[int, str]:
        """GET the object: its size and SHA-256."""
        data = obstore.get(self.store, key).bytes()
        self._count("get")
        return len(data), hashlib.sha256(data).hexdigest()

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


def pk_literal(value: int | str) -> str:
    return quote(value) if isinstance(value, str) else str(int(value))


class Milvus:
    def __init__(self, uri: str):
        self.client = MilvusClient(uri)
        self.calls: Counter = Counter()
        desc = self.client.describe_collection(COLLECTION)
        pk = next(f for f in desc["fields"] if f.get("is_primary"))
        self.pk = pk["name"]
        self.vector = next(f["name"] for f in desc["fields"] if f["type"] == DataType.FLOAT_VECTOR)
        # what repage's adapter leaves out of a row's checksum (MilvusVectors.row_checksum)
        auto_id = bool(pk.get("auto_id") or desc.get("auto_id"))
        self.exclude = ("page", "image_r2_key") + ((self.pk,) if auto_id else ())

    def query(self, expr: str, fields: list[str], **params) -> list[dict]:
        rows = self.client.query(COLLECTION, filter=expr, output_fields=fields, consistency_level="Strong", **params)
        self.calls["query"] += 1
        return [dict(r) for r in rows]

    def pages(self, expr: str, fields: list[str], limit: int = QUERY_CAP, **params):
        """Every matching row, pages of `limit` by a cursor on the primary key."""
        cursor = None
        while True:
            bound = f"{self.pk} > {pk_literal(cursor)} && ({expr})" if cursor is not None else expr
            page = self.query(bound, fields, limit=limit, **params)
            yield page
            if len(page) < limit:
                return
            cursor = max(r[self.pk] for r in page)

    def query_all(self, expr: str, fields: list[str]) -> list[dict]:
        return [row for page in self.pages(expr, fields) for row in page]

    def checksum(self, row: dict) -> str:
        return row_checksum(row, self.exclude, vector_fields=(self.vector,))


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


class Mismatch(Exception):
    """floor_verify found a copy or a row that is not what it wrote."""


def floor_verify(milvus: Milvus, objects: Objects, max_seconds: float | None) -> dict:
    started = time.perf_counter()
    steps = {}  # seconds per step, where floor + verify spends its time
    expected, copies = {}, {}  # pk -> (checksum before, page, key); legacy key -> canonical key
    for page in milvus.pages(AFFECTED, ["*"], VECTOR_ROWS, strict_float32=True):
        for row in page:
            target = canonical(row["image_r2_key"] or "")
            if target is not None:
                copies[row["image_r2_key"]] = target[1]
                expected[row[milvus.pk]] = (milvus.checksum(row), *target)
    steps["fetch_and_checksum"] = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda kv: verified_copy(objects, *kv), copies.items()))
    steps["objects"] = time.perf_counter()
    updates = [{milvus.pk: pk, "page": page, "image_r2_key": key} for pk, (_, page, key) in expected.items()]
    for start in range(0, len(updates), FLOOR_BATCH):
        milvus.client.upsert(COLLECTION, updates[start : start + FLOOR_BATCH], partial_update=True)
        milvus.calls["upsert"] += 1
    steps["write"] = time.perf_counter()
    read_back(milvus, expected)
    steps["read_back"] = time.perf_counter()
    documents = len({key.split("/")[1] for key in copies})
    return {
        "documents": documents,
        "documents_total": documents,
        "chunks": len(updates),
        "rows_verified": len(expected),
        "objects_verified": len(copies),
        "seconds": steps["read_back"] - started,
        "steps": laps(started, steps),
        "complete": True,
    }


def laps(started: float, marks: dict[str, float]) -> dict[str, float]:
    """Seconds between consecutive marks (time.perf_counter() taken at each step's end)."""
    out, previous = {}, started
    for name, mark in marks.items():
        out[name], previous = round(mark - previous, 3), mark
    return out


def verified_copy(objects: Objects, src: str, dst: str) -> None:
    """GET + hash the original, COPY, GET + hash the copy: same size and SHA-256 or Mismatch."""
    before = objects.fingerprint(src)
    objects.copy(src, dst)
    after = objects.fingerprint(dst)
    if after != before:
        raise Mismatch(f"copy {src} -> {dst}: {after} differs from the original's {before}")


def read_back(milvus: Milvus, expected: dict) -> None:
    """Every written row by primary key, all fields: checksum as before, page and key as written."""
    pks = list(expected)
    for start in range(0, len(pks), VECTOR_ROWS):
        batch = pks[start : start + VECTOR_ROWS]
        expr = f"{milvus.pk} in [{','.join(pk_literal(pk) for pk in batch)}]"
        rows = milvus.query(expr, ["*"], strict_float32=True)
        if len(rows) != len(batch):
            raise Mismatch(f"read-back: {len(rows)} rows for {len(batch)} primary keys")
        for row in rows:
            got = (milvus.checksum(row), row["page"], row["image_r2_key"])
            if got != expected[row[milvus.pk]]:
                raise Mismatch(f"read-back: row {row[milvus.pk]} is {got[1:]}, checksum {got[0][:12]}")


WORK = {"naive": naive, "floor": floor, "floor_verify": floor_verify}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.contenders", description=__doc__.split("\n\n")[0])
    parser.add_argument("contender", choices=tuple(WORK))
    parser.add_argument("--milvus-uri", required=True)
    parser.add_argument("--store-url", required=True)
    parser.add_argument("--s3-endpoint")
    parser.add_argument("--max-seconds", type=float, help="stop after this long (naive on large stores: a sample)")
    args = parser.parse_args(argv)
    milvus = Milvus(args.milvus_uri)
    objects = Objects(args.store_url, args.s3_endpoint)
    try:
        result = WORK[args.contender](milvus, objects, args.max_seconds)
    except Mismatch as exc:
        print(f"bench.contenders {args.contender}: {exc}", file=sys.stderr)
        return 1
    result.update(contender=args.contender, objects=objects.classes(), milvus_calls=dict(milvus.calls))
    milvus.client.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

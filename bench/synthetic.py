"""Synthetic FLTR-shaped stores (docs/design.md §1), built fast for benchmarks.

Every document has CHUNKS_PER_DOC chunks: TEXT_CHUNKS text chunks carrying their real
page, then IMAGE_CHUNKS image/OCR chunks with `page = 0` (the bug) and a legacy
PyMuPDF4LLM key on the chunk, `{ds}/{doc}/images/{index}_{basename}-{page}-{n}.png`,
whose `image_index` comes from `enumerate(sorted(names))`: lexicographic, so
`x.pdf-10-0.png` gets a lower index than `x.pdf-2-0.png`. Documents have 12-40 pages,
so most of them show the wrong order.

Vectors are seeded random float32 (dim 1536), written through repage's own adapter
(`MilvusVectors.create_collection` + `insert`) a few hundred documents at a time, so
the builder's memory stays bounded whatever the size. Images are tiny PNGs written
to an `ObjectStore` at the chunks' keys; `--no-images` skips them (a scan needs no
object reads when every affected chunk carries a page-bearing key).

    python -m bench.synthetic --documents 5000 --milvus-uri http://127.0.0.1:19530 \\
        --store-url file:///abs/bucket [--no-images]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from repage.domain.keys import legacy_image_key, legacy_image_name, legacy_sort_index
from repage.errors import ConfigError, RepageError
from repage.stores.milvus import AFFECTED_FILTER, MilvusVectors
from repage.stores.objects import ObjectStore

CHUNKS_PER_DOC = 20
IMAGE_CHUNKS = 6  # of them: page 0, legacy key on the chunk
OCR_CHUNKS = 2  # of the image chunks: chunk_type 'ocr' with an ocr_confidence
TEXT_CHUNKS = CHUNKS_PER_DOC - IMAGE_CHUNKS
DIM = 1536
PAGES = (12, 40)  # pages per document, inclusive: >= 10 so the sort bug shows
TEXT_CHARS = 600  # per text chunk; the scan never reads text, the writes carry it
DOCS_PER_INSERT = 250  # 5,000 rows of ~7 KB per insert call (the adapter splits by 64 MB)
PNG_POOL = 64  # distinct tiny images, reused
PUT_THREADS = 16
WORDS = (
    "pump valve pressure flow sensor cable housing bracket torque seal gasket rotor "
    "stator bearing shaft coupling manual section figure table revision warning note "
    "install remove inspect replace tighten measure calibrate voltage current circuit"
).split()


@dataclass(frozen=True)
class Png:
    data: bytes
    width: int
    height: int


@dataclass
class BuildSummary:
    documents: int = 0
    chunks: int = 0
    affected_chunks: int = 0
    images_written: int = 0
    collection: str = ""
    pk: str = ""
    seed: int = 0
    milvus: str = ""
    store: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- pure generation


def png_pool(seed: int, size: int = PNG_POOL) -> list[Png]:
    """Small distinct PNGs (a coloured block with a stripe), sizes like figures' aspect ratios."""
    rng = random.Random(seed)
    pool = []
    for _ in range(size):
        w, h = rng.randint(24, 64), rng.randint(16, 48)
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        stripe = Image.new("RGB", (w, max(2, h // 4)), tuple(rng.randrange(256) for _ in range(3)))
        img.paste(stripe, (0, rng.randrange(h - stripe.height + 1)))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        pool.append(Png(buf.getvalue(), w, h))
    return pool


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _basename(rng: random.Random, filename: str) -> str:
    """What PyMuPDF4LLM was given: the upload's name or a temp file (both seen in FLTR keys)."""
    if rng.random() < 0.5:
        return filename
    return "tmp" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789_") for _ in range(8)) + ".pdf"


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:chars]


def document_rows(
    rng: random.Random, index: int, dataset_id: str, pool: Sequence[Png]
) -> tuple[list[dict], list[tuple[str, bytes]]]:
    """One document's rows (without vectors) and its image uploads (key, bytes)."""
    document_id = _uuid(rng)
    filename = f"{rng.choice(('22-1426', 'Q3', 'spec'))}_Documents_part{index % 97:02d}of97-{index}.pdf"
    pages = rng.randint(*PAGES)
    title = filename.rsplit(".", 1)[0]
    base = dict(dataset_id=dataset_id, document_id=document_id, filename=filename, document_type="pdf", title=title)

    def row(chunk_index: int, **fields) -> dict:
        return {
            "chunk_id": f"{document_id}_{chunk_index}",
            "chunk_index": chunk_index,
            **base,
            "page": 0,
            "image_index": None,
            "ocr_confidence": 0.0,
            "image_r2_key": None,
            "image_size": None,
            **fields,
        }

    rows = [
        row(i, chunk_type="text", page=i * pages // TEXT_CHUNKS, text=_text(rng, TEXT_CHARS))
        for i in range(TEXT_CHUNKS)
    ]

    # The images, page by page with n counting per page, named and indexed as the old pipeline did.
    basename = _basename(rng, filename)
    on_pages = sorted(rng.randrange(pages) for _ in range(IMAGE_CHUNKS))
    names, seen = [], {}
    for page in on_pages:
        n = seen[page] = seen.get(page, -1) + 1
        names.append(legacy_image_name(basename, page, n, "png"))
    index_of = legacy_sort_index(names)
    ocr = set(rng.sample(range(IMAGE_CHUNKS), OCR_CHUNKS))
    uploads = []
    for slot, name in enumerate(sorted(names, key=index_of.__getitem__)):  # emitted by image_index
        image_index = index_of[name]
        key = legacy_image_key(dataset_id, document_id, image_index, name)
        png = pool[rng.randrange(len(pool))]
        is_ocr = slot in ocr
        rows.append(
            row(
                TEXT_CHUNKS + slot,
                chunk_type="ocr" if is_ocr else "image",
                text=_text(rng, 300) if is_ocr else f"Figure ({png.width}x{png.height}) in {filename}.",
                image_index=image_index,
                ocr_confidence=round(rng.uniform(0.6, 0.98), 3) if is_ocr else 0.0,
                image_r2_key=key,
                image_size=f"{png.width}x{png.height}",
            )
        )
        uploads.append((key, png.data))
    return rows, uploads


def generate(
    documents: int, *, seed: int = 0, datasets: int = 4, docs_per_batch: int = DOCS_PER_INSERT
) -> Iterator[tuple[list[dict], list[tuple[str, bytes]]]]:
    """Batches of (rows with vectors, uploads), docs_per_batch documents each."""
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed)
    pool = png_pool(seed)
    dataset_ids = [_uuid(rng) for _ in range(max(1, datasets))]
    for start in range(0, documents, docs_per_batch):
        rows: list[dict] = []
        uploads: list[tuple[str, bytes]] = []
        for i in range(start, min(documents, start + docs_per_batch)):
            r, u = document_rows(rng, i, dataset_ids[i % len(dataset_ids)], pool)
            rows.extend(r)
            uploads.extend(u)
        block = vectors.random((len(rows), DIM), dtype=np.float32)
        for r, v in zip(rows, block):
            r["vector"] = v
        yield rows, uploads


# ---------------------------------------------------------------- writing


def open_objects(store_url: str, *, endpoint: str | None = None, region: str = "auto") -> ObjectStore:
    return ObjectStore.from_url(
        store_url,
        endpoint=endpoint,
        region=region,
        access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
    )


def drop_if_exists(uri: str, collection: str, *, timeout: float = 300.0) -> bool:
    try:
        store = MilvusVectors(uri, collection, timeout=timeout)
    except ConfigError:  # no such collection
        return False
    with store:
        store.drop_collection()
    return True


def build_store(
    documents: int,
    milvus_uri: str,
    store_url: str | None,
    *,
    collection: str = "fltr_documents",
    pk: str = "auto",
    seed: int = 0,
    datasets: int = 4,
    images: bool = True,
    replace: bool = False,
    endpoint: str | None = None,
    region: str = "auto",
    timeout: float = 300.0,
    log: Callable[[str], None] = lambda _m: None,
) -> BuildSummary:
    """Create `collection` and fill it with `documents` synthetic documents (and their images)."""
    if documents < 1:
        raise ConfigError(f"--documents must be at least 1, not {documents}")
    if images and not store_url:
        raise ConfigError("images need --store-url (or pass --no-images)")
    summary = BuildSummary(collection=collection, pk=pk, seed=seed)
    started = time.perf_counter()
    if replace and drop_if_exists(milvus_uri, collection, timeout=timeout):
        log(f"dropped the existing collection {collection!r}")
    vectors = MilvusVectors.create_collection(milvus_uri, collection, pk=pk, dim=DIM, timeout=timeout)
    objects = open_objects(store_url, endpoint=endpoint, region=region) if images else None
    insert_s = put_s = 0.0
    try:
        summary.milvus = vectors.describe()
        summary.store = objects.describe() if objects else None
        with ThreadPoolExecutor(PUT_THREADS) as pool:
            for rows, uploads in generate(documents, seed=seed, datasets=datasets):
                t0 = time.perf_counter()
                if objects is not None:  # uploads run while Milvus inserts
                    puts = [pool.submit(objects.put, key, data) for key, data in uploads]
                vectors.insert(rows)
                t1 = time.perf_counter()
                if objects is not None:
                    for fut in puts:
                        fut.result()
                    summary.images_written += len(uploads)
                put_s += time.perf_counter() - t1
                insert_s += t1 - t0
                summary.chunks += len(rows)
                summary.documents += len(rows) // CHUNKS_PER_DOC
                rate = summary.chunks / max(time.perf_counter() - started, 1e-9)
                log(f"{summary.documents}/{documents} documents, {summary.chunks} chunks ({rate:,.0f} rows/s)")
        t0 = time.perf_counter()
        vectors.flush()  # a store in production is sealed; Lite queries an unsealed one row by row
        summary.seconds["flush"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        total, affected = vectors.count(""), vectors.count(AFFECTED_FILTER)
        summary.seconds["count"] = round(time.perf_counter() - t0, 1)
        if total != summary.chunks or affected != documents * IMAGE_CHUNKS:
            raise RepageError(
                f"collection holds {total} rows ({affected} affected); "
                f"built {summary.chunks} ({documents * IMAGE_CHUNKS} affected)"
            )
        summary.affected_chunks = affected
    finally:
        vectors.close()
        if objects is not None:
            objects.close()
    summary.seconds.update(
        insert=round(insert_s, 1), images_wait=round(put_s, 1), total=round(time.perf_counter() - started, 1)
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--documents", type=int, required=True, help=f"documents to build ({CHUNKS_PER_DOC} chunks each)"
    )
    parser.add_argument(
        "--milvus-uri", required=True, help="http://127.0.0.1:PORT (milvus-lite server) or a Lite .db path"
    )
    parser.add_argument("--store-url", help="file:///abs/dir, s3://BUCKET or memory:// for the images")
    parser.add_argument("--collection", default="fltr_documents")
    parser.add_argument("--pk", choices=("auto", "chunk_id"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", type=int, default=4)
    parser.add_argument("--no-images", action="store_true", help="write no images (scan-only stores)")
    parser.add_argument("--replace", action="store_true", help="drop the collection first if it exists")
    parser.add_argument(
        "--s3-endpoint", help="S3/R2 endpoint (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
    )
    parser.add_argument("--s3-region", default="auto")
    args = parser.parse_args(argv)
    try:
        summary = build_store(
            args.documents,
            args.milvus_uri,
            args.store_url,
            collection=args.collection,
            pk=args.pk,
            seed=args.seed,
            datasets=args.datasets,
            images=not args.no_images,
            replace=args.replace,
            endpoint=args.s3_endpoint,
            region=args.s3_region,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except RepageError as exc:
        print(f"bench.synthetic: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small FLTR-shaped broken store for the worker and service tests: every image/OCR
chunk has page 0 and a legacy key that tells its true page (the keys path)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from repage.config import Settings, load_settings
from repage.stores.milvus import MilvusVectors

DIM = 8


def true_page(doc_index: int, image: int) -> int:
    return 1 + image * 3 + doc_index % 2  # never 0: a repaired page is visibly different


def fltr_rows(doc_ids: list[str], *, dataset: str = "ds", images: int = 2) -> list[dict]:
    """Per document: one text chunk (page 0, not affected), then `images` image/OCR chunks."""
    rows = []
    for d, doc in enumerate(doc_ids):
        rows.append(_row(doc, dataset, 0, "text", None))
        for i in range(images):
            key = f"{dataset}/{doc}/images/{i}_{doc}-scan.pdf-{true_page(d, i)}-0.png"
            rows.append(_row(doc, dataset, i + 1, "image" if i % 2 == 0 else "ocr", key, image_index=i))
    return rows


def _row(doc: str, dataset: str, index: int, kind: str, key: str | None, image_index: int | None = None) -> dict:
    return {
        "chunk_id": f"{doc}_{index}",
        "vector": [0.1 * (index + 1)] * DIM,
        "text": f"{doc} chunk {index}",
        "dataset_id": dataset,
        "document_id": doc,
        "filename": f"{doc}-scan.pdf",
        "chunk_index": index,
        "document_type": "pdf",
        "title": doc,
        "chunk_type": kind,
        "page": 0,
        "image_index": image_index,
        "ocr_confidence": 0.9 if kind == "ocr" else None,
        "image_r2_key": key,
        "image_size": "10x10" if key else None,
    }


def expected_pages(rows: list[dict]) -> dict[str, int]:
    """chunk_id -> the page a correct migration (or read-repair) shows."""
    out = {}
    for row in rows:
        key = row["image_r2_key"]
        out[row["chunk_id"]] = int(key.rsplit("-", 2)[1]) if key else 0
    return out


def create_store(uri: str, collection: str, rows: list[dict]) -> None:
    vectors = MilvusVectors.create_collection(uri, collection, pk="chunk_id", dim=DIM)
    try:
        vectors.insert(rows)
    finally:
        vectors.close()


def write_images(bucket: Path, rows: list[dict]) -> None:
    for row in rows:
        if row["image_r2_key"]:
            path = bucket / row["image_r2_key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\x89PNG fake " + row["chunk_id"].encode())


def settings_for(uri: str, collection: str, bucket_url: str, ledger_url: str, **extra) -> Settings:
    flags = {"milvus_uri": uri, "collection": collection, "store_url": bucket_url, "ledger_url": ledger_url, **extra}
    return load_settings({}, flags=flags, app_fallbacks=False)


def env_for(uri: str, collection: str, bucket_url: str, ledger_url: str) -> dict[str, str]:
    return {
        "REPAGE_MILVUS_URI": uri,
        "REPAGE_COLLECTION": collection,
        "REPAGE_STORE_URL": bucket_url,
        "REPAGE_LEDGER_URL": ledger_url,
    }


def server_answers(base: str, proc: subprocess.Popen, log: Path) -> bool:
    """Whether `repage serve` at `base` answers /healthz (it must still be running: else its log)."""
    assert proc.poll() is None, log.read_text()
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False

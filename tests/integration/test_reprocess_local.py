"""Acceptance: the local reference pipeline (docs/design.md §2.4) on real PDFs (Debian's refcard, from the demo cache).

- a PDF source: text and images per page, pages correct, old chunks replaced, images at canonical keys;
- an image source (a page of the PDF rendered as a scan): tesseract's text contains words that
  are on that page;
- a reader thread polls the document's chunk count during each replace: never zero, never the
  old and new chunks together;
- the stale checkpoints are gone, verify passes, rollback restores the original rows exactly;
- a collection configured with another embedding model is refused.
"""

from __future__ import annotations

import io
import re
import shutil
import threading

import pypdfium2 as pdfium
import pytest

from repage.config import load_settings
from repage.demo.corpus import DEFAULT_CACHE, fetch_sources
from repage.domain.records import ScanRecord
from repage.domain.states import RepairPath, State
from repage.errors import ConfigError
from repage.migration.rollback import rollback_documents
from repage.migration.runner import RunLimits, Runner, Selection
from repage.migration.verify import verify_documents
from repage.migration.work import RunOptions
from repage.reprocess.backup import backup_key
from repage.reprocess.local import LocalReprocessor
from repage.stores.ledger import Ledger
from repage.stores.milvus import MilvusVectors, eq_filter
from repage.stores.objects import ObjectStore
from repage.stores.open import Stores
from repage.stores.throttle import FakeClock
from tests.fixtures.milvus import unique_name

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tesseract") is None, reason="needs Debian's tesseract-ocr"),
]
DS = "ds-local"


@pytest.fixture(scope="module")
def pdf_bytes():
    return fetch_sources(DEFAULT_CACHE, ["refcard-en"])["refcard-en"]


def page_texts(data: bytes) -> list[str]:
    pdf = pdfium.PdfDocument(data)
    try:
        return [pdf[i].get_textpage().get_text_range() for i in range(len(pdf))]
    finally:
        pdf.close()


def render(data: bytes, page: int) -> bytes:
    pdf = pdfium.PdfDocument(data)
    try:
        image = pdf[page].render(scale=200 / 72).to_pil().convert("L")
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()
    finally:
        pdf.close()


def words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z]{5,}", text)}


def broken_rows(doc: str, filename: str, n: int) -> list[dict]:
    """What the buggy ingestion left: image/OCR chunks with page 0, no key."""
    return [
        dict(
            chunk_id=f"{doc}_{i}",
            vector=[1.0] + [0.0] * 1535,
            text=f"old chunk {i}",
            dataset_id=DS,
            document_id=doc,
            filename=filename,
            chunk_index=i,
            document_type="image",
            title=filename,
            chunk_type="ocr",
            page=0,
            image_index=i,
            ocr_confidence=0.7,
            image_r2_key="",
            image_size="10x10",
        )
        for i in range(n)
    ]


@pytest.fixture
def stores(tmp_path, pdf_bytes):
    uri = str(tmp_path / "milvus.db")
    name = unique_name("local")
    vectors = MilvusVectors.create_collection(uri, name, pk="chunk_id", dim=1536)
    settings = load_settings(
        {},
        app_fallbacks=False,
        flags={
            "milvus_uri": uri,
            "collection": name,
            "store_url": f"file://{tmp_path / 'bucket'}",
            "ledger_url": f"sqlite:///{tmp_path}/ledger.db",
            "reprocess_backend": "local",
            "embedding_model": "repage-demo-hash-1536",
        },
    )
    (tmp_path / "bucket").mkdir()
    objects = ObjectStore.from_url(settings.store_url)
    ledger = Ledger(settings.ledger_url)
    yield Stores(settings, vectors, objects, ledger, _opened=[])
    for store in (ledger, objects, vectors):
        store.close()


def add_document(stores, doc: str, filename: str, data: bytes, old_chunks: int) -> None:
    stores.objects.put(f"{DS}/{filename}", data)
    stores.objects.put(f"{DS}/{doc}/checkpoints/parsed.json.gz", b"stale")
    stores.vectors.insert(broken_rows(doc, filename, old_chunks))
    stores.ledger.upsert_scan(
        [ScanRecord(doc, DS, filename, RepairPath.REPROCESS, State.PENDING, "not a PDF", old_chunks)]
    )


class Reader(threading.Thread):
    """Counts the document's chunks as search would see them, as fast as it can."""

    def __init__(self, vectors, doc: str):
        super().__init__(daemon=True)
        self.vectors, self.doc, self.counts, self.stop = vectors, doc, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.counts.append(self.vectors.count(eq_filter("document_id", self.doc)))


def reprocess(stores, doc: str, old: int) -> Reader:
    reader = Reader(stores.vectors, doc)
    reader.start()
    selection = Selection(paths=frozenset({RepairPath.REPROCESS}), document_ids=(doc,), allow_reprocess=True)
    summary = Runner(stores, RunOptions(), RunLimits(), selection, clock=FakeClock()).run()
    reader.stop.set()
    reader.join()
    assert (summary.migrated, summary.failed, summary.errors) == (1, 0, {}), summary
    new = stores.ledger.get(doc).total_chunks
    assert reader.counts and min(reader.counts) > 0, "the document had no chunks at some moment"
    assert max(reader.counts) <= max(old, new), f"old and new chunks seen together: {max(reader.counts)}"
    assert summary.reprocess_dollars > 0 and stores.ledger.get(doc).dollars == pytest.approx(summary.reprocess_dollars)
    return reader


def test_pdf_source_pages_images_and_replace(stores, pdf_bytes):
    doc = "doc-pdf"
    add_document(stores, doc, "refcard.pdf", pdf_bytes, old_chunks=3)
    original = stores.vectors.fetch_documents([doc])
    reprocess(stores, doc, old=3)

    rows = stores.vectors.fetch_documents([doc], with_vectors=False)
    texts = page_texts(pdf_bytes)
    assert {r["page"] for r in rows} == set(range(len(texts)))  # every page, none stuck at 0
    assert not any(r["text"].startswith("old chunk") for r in rows)  # old chunks replaced
    assert len({r["chunk_id"] for r in rows}) == len(rows)
    flat = [" ".join(t.split()) for t in texts]
    for row in rows:
        if row["chunk_type"] == "text":  # the chunk's text is on the page it says
            assert " ".join(row["text"].split())[:200] in flat[row["page"]], row["page"]
        if row["image_r2_key"]:
            assert row["image_r2_key"].startswith(f"{DS}/{doc}/images/{row['page']}_{row['image_index']}.")
            assert stores.objects.exists(row["image_r2_key"])
    assert not stores.objects.exists(f"{DS}/{doc}/checkpoints/parsed.json.gz")  # stale checkpoint gone
    assert stores.objects.exists(backup_key(DS, doc))
    assert verify_documents(stores, [doc]).as_dict()["ok"]

    report = rollback_documents(stores, [doc]).as_dict()  # the original rows, exactly
    assert report["failed"] == {} and report["passed"] == 1
    back = {r["chunk_id"]: r for r in stores.vectors.fetch_documents([doc])}
    assert back.keys() == {r["chunk_id"] for r in original}
    assert all(
        stores.vectors.row_checksum(back[r["chunk_id"]]) == stores.vectors.row_checksum(r)
        and back[r["chunk_id"]]["page"] == r["page"]
        for r in original
    )


def test_scanned_image_source_is_ocred_and_fewer_chunks_replace_more(stores, pdf_bytes):
    doc = "doc-scan"
    add_document(stores, doc, "scan page 1.png", render(pdf_bytes, 0), old_chunks=4)
    reprocess(stores, doc, old=4)

    rows = stores.vectors.fetch_documents([doc], with_vectors=False)
    assert len(rows) == 1  # the image is one page, one OCR chunk; the 3 other old chunks are gone
    (row,) = rows
    assert row["chunk_type"] == "ocr" and row["page"] == 0 and row["ocr_confidence"] > 0.5
    assert row["image_r2_key"] == f"{DS}/{doc}/images/0_0.png" and stores.objects.exists(row["image_r2_key"])
    on_page = words(page_texts(pdf_bytes)[0])
    seen = words(row["text"]) & on_page
    assert len(seen) >= 0.6 * len(words(row["text"])) and len(seen) >= 40, sorted(seen)[:20]
    assert {"debian", "reference", "packages"} <= seen


def test_refuses_a_collection_of_another_model(stores):
    settings = stores.settings.model_copy(update={"embedding_model": "text-embedding-3-small"})
    with pytest.raises(ConfigError, match="refuses to write vectors from another model"):
        LocalReprocessor(Stores(settings, stores.vectors, stores.objects, stores.ledger), settings)
    unset = stores.settings.model_copy(update={"embedding_model": None})
    with pytest.raises(ConfigError):
        LocalReprocessor(Stores(unset, stores.vectors, stores.objects, stores.ledger), unset)

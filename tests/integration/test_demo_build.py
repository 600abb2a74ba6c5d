"""The demo store: built from real Debian PDFs, broken the way FLTR's pipeline broke it.

Builds once per module (Milvus Lite in-process, a local-folder bucket): pk=auto into
one data dir; pk=auto then pk=chunk_id into another, which also proves a rebuild
wipes the previous demo. Checks are made against the stores themselves and the
ground-truth file, never through repage's own planning code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from repage.demo import build_demo
from repage.demo.embed import MODEL_NAME, embed
from repage.stores.milvus import MilvusVectors
from repage.stores.objects import ObjectStore

pytestmark = pytest.mark.slow

# docs/design.md §1.3, written out here rather than imported: the test checks the adapter's filter too.
AFFECTED = 'page == 0 && (chunk_type == "ocr" || chunk_type == "image" || ocr_confidence > 0.0)'
SCENARIOS = {
    "legacy",
    "legacy-unlinked",
    "canonical",
    "docling",
    "missing-images",
    "legacy-no-source",
    "unrecoverable",
    "non-pdf-source",
    "text-only",
}
EXPECTED_PATH = {
    "legacy": "keys",
    "legacy-unlinked": "keys",
    "canonical": "keys",
    "legacy-no-source": "keys",
    "docling": "pdf",
    "missing-images": "pdf",
    "non-pdf-source": "reprocess",
    "unrecoverable": "none",
    "text-only": "none",
}
DOC_FIELDS = {
    "document_id",
    "dataset_id",
    "filename",
    "scenario",
    "expected_path",
    "expected_state",
    "page_count",
    "source_key",
    "affected_chunks",
}
CHUNK_FIELDS = {
    "chunk_id",
    "chunk_index",
    "true_page",
    "image_index",
    "current_key",
    "canonical_key",
    "image_in_bucket",
}


class Built:
    def __init__(self, data_dir: Path, summary):
        self.dir, self.summary = data_dir, summary
        self.truth = json.loads((data_dir / "ground-truth.json").read_text(encoding="utf-8"))
        self.docs = self.truth["documents"]
        self.objects = ObjectStore.from_url((data_dir / "bucket").as_uri())

    def doc(self, filename: str) -> dict:
        return next(d for d in self.docs if d["filename"] == filename)


@pytest.fixture(scope="module")
def auto(tmp_path_factory) -> Built:
    data_dir = tmp_path_factory.mktemp("demo-auto")
    return Built(data_dir, build_demo(data_dir, pk="auto"))


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> tuple[Built, dict]:
    """pk=auto, then a stale ledger, then rebuilt as pk=chunk_id into the same dir."""
    data_dir = tmp_path_factory.mktemp("demo-rebuilt")
    first = build_demo(data_dir, pk="auto")
    (data_dir / "ledger.db").write_bytes(b"stale")
    (data_dir / "ledger.db-wal").write_bytes(b"stale")
    return Built(data_dir, build_demo(data_dir, pk="chunk_id")), first.to_dict()


@pytest.fixture(scope="module")
def milvus(auto) -> MilvusVectors:
    store = MilvusVectors(str(auto.dir / "milvus.db"), "fltr_documents")
    yield store
    store.close()


def affected(docs):
    return [c for d in docs for c in d["affected_chunks"]]


def test_corpus_shape(auto):
    pages = [d["page_count"] for d in auto.docs]
    assert 300 <= sum(pages) <= 1500, sum(pages)
    assert min(pages) == 1 and max(pages) >= 60
    assert {d["scenario"] for d in auto.docs} == SCENARIOS
    datasets = {d["dataset_id"] for d in auto.docs}
    assert len(datasets) in (3, 4) and datasets == set(auto.truth["datasets"].values())
    assert auto.summary.pages == sum(pages) and auto.summary.documents == len(auto.docs)
    image_docs = [d for d in auto.docs if d["affected_chunks"]]
    assert any(len(d["affected_chunks"]) >= 30 for d in image_docs)  # image-heavy
    assert sum(1 for d in auto.docs if d["scenario"] == "text-only") >= 2
    assert auto.summary.bytes_uploaded < 60_000_000


def test_long_documents_with_late_images_take_the_pdf_path(auto):
    for scenario in ("docling", "missing-images"):
        late = [
            d
            for d in auto.docs
            if d["scenario"] == scenario
            and d["page_count"] >= 11
            and any(c["true_page"] >= 10 for c in d["affected_chunks"])
        ]
        assert late, f"no {scenario} document with 11+ pages and an image on page >= 10"


def test_image_index_is_lexicographic(auto):
    guide = auto.doc("ubuntu-packaging-guide.pdf")
    index = {c["true_page"]: c["image_index"] for c in guide["affected_chunks"]}
    assert index[12] < index[6] < index[7]  # "-12-0.png" sorts before "-6-0.png"
    crossed = 0
    for d in auto.docs:
        chunks = d["affected_chunks"]
        names = [c["legacy_name"] for c in chunks]
        assert [c["image_index"] for c in chunks] == [sorted(names).index(n) for n in names]
        crossed += any(
            a["true_page"] >= 10 and 2 <= b["true_page"] <= 9 and a["image_index"] < b["image_index"]
            for a in chunks
            for b in chunks
        )
    assert crossed >= 4


def test_expected_paths_follow_scenarios(auto):
    for d in auto.docs:
        assert d["expected_path"] == EXPECTED_PATH[d["scenario"]], d["filename"]
        chunks = d["affected_chunks"]
        if d["scenario"] == "text-only":
            assert not chunks and d["expected_state"] == "skipped"
        elif d["scenario"] == "unrecoverable":
            assert d["source_key"] is None and not any(c["image_in_bucket"] for c in chunks)
            assert d["expected_state"] == "unrecoverable"
        else:
            assert chunks and d["expected_state"] == "pending"
    unlinked = [c for d in auto.docs if d["scenario"] == "legacy-unlinked" for c in d["affected_chunks"]]
    assert any(c["current_key"] == "" for c in unlinked) and any(c["current_key"] for c in unlinked)
    assert all(c["image_in_bucket"] for c in unlinked)


def test_ground_truth_complete(auto):
    assert auto.truth["embedding_model"] == MODEL_NAME
    for d in auto.docs:
        assert DOC_FIELDS <= d.keys(), d["filename"]
        for c in d["affected_chunks"]:
            assert CHUNK_FIELDS <= c.keys()
            assert c["chunk_id"] == f"{d['document_id']}_{c['chunk_index']}"
            assert 0 <= c["true_page"] < d["page_count"]
            assert c["canonical_key"] == (
                f"{d['dataset_id']}/{d['document_id']}/images/{c['true_page']}_{c['image_index']}.png"
            )
    assert auto.truth["totals"]["affected_chunks"] == len(affected(auto.docs))


def test_milvus_affected_count_matches_truth(auto, milvus):
    assert milvus.count(AFFECTED) == len(affected(auto.docs)) == auto.summary.affected_chunks
    assert milvus.count("") == auto.summary.chunks
    fields = ["chunk_id", "image_index", "image_r2_key", "page"]
    rows = [r for page in milvus.iter_affected(fields=fields) for r in page]
    truth = {c["chunk_id"]: c for c in affected(auto.docs)}
    assert {r["chunk_id"] for r in rows} == set(truth)
    for r in rows:
        c = truth[r["chunk_id"]]
        assert (r["image_index"], r["image_r2_key"] or "", r["page"]) == (c["image_index"], c["current_key"], 0)


def test_both_pk_variants(milvus, rebuilt):
    info = milvus.info()
    assert (info.pk_field, info.auto_id, info.dim) == ("id", True, 1536)
    assert "chunk_id" in info.fields
    built, _ = rebuilt
    with MilvusVectors(str(built.dir / "milvus.db"), "fltr_documents") as store:
        info = store.info()
        assert (info.pk_field, info.auto_id) == ("chunk_id", False)
        assert store.count("") == built.summary.chunks  # the pk=auto rows are gone


def test_rebuild_wipes_and_is_deterministic(auto, rebuilt):
    built, first = rebuilt
    assert not (built.dir / "ledger.db").exists() and not (built.dir / "ledger.db-wal").exists()
    files = [p for p in (built.dir / "bucket").rglob("*") if p.is_file()]
    assert len(files) == built.summary.objects == first["objects"]
    assert [d["document_id"] for d in built.docs] == [d["document_id"] for d in auto.docs]
    assert affected(built.docs) == affected(auto.docs)


def test_pdf_path_extraction_sees_the_same_images(auto):
    """The pdf path can only map image_index -> page if it extracts what the pipeline did."""
    from repage.migration import pdfpages

    for d in (d for d in auto.docs if d["expected_path"] == "pdf"):
        data = auto.objects.get(d["source_key"])
        got = [(im.page, f"{im.width}x{im.height}") for im in pdfpages.iter_page_images(data, d["filename"])]
        order = sorted(d["affected_chunks"], key=lambda c: (c["true_page"], 0 if c["n"] == "full" else c["n"]))
        assert got == [(c["true_page"], c["image_size"]) for c in order], d["filename"]


def test_filenames_have_spaces_dashes_underscores(auto):
    names = [d["filename"] for d in auto.docs]
    for char in " -_":
        assert sum(char in n for n in names) >= 3, char
    assert any(not n.lower().endswith(".pdf") for n in names)


def test_sources_at_their_keys(auto):
    quoted = 0
    for d in auto.docs:
        plain = f"{d['dataset_id']}/{d['filename']}"
        if d["source_key"] is None:
            assert not auto.objects.exists(plain) and not auto.objects.exists(quote(plain))
            continue
        assert d["source_key"] in (plain, f"{d['dataset_id']}/{quote(d['filename'])}")
        quoted += d["source_key"] != plain
        head = auto.objects.get_range(d["source_key"], 0, 8)
        if d["filename"].endswith(".pdf"):
            assert head.startswith(b"%PDF-")
    assert quoted >= 2


def test_images_in_bucket_as_truth_says(auto):
    for c in affected(auto.docs):
        if c["image_in_bucket"]:
            assert auto.objects.get_range(c["bucket_key"], 0, 8) == b"\x89PNG\r\n\x1a\n"
        else:
            assert not auto.objects.exists(c["canonical_key"])
            if c["current_key"]:
                assert not auto.objects.exists(c["current_key"])
    listed = {o.key for page in auto.objects.list("") for o in page}
    assert len(listed) == auto.summary.objects


def test_text_is_real(auto, milvus):
    def texts(filename: str, chunk_type: str) -> str:
        doc = auto.doc(filename)
        rows = milvus.fetch_documents([doc["document_id"]], fields=["text", "chunk_type"], with_vectors=False)
        return "\n".join(r["text"] for r in rows if r["chunk_type"] == chunk_type)

    assert "reportbug" in texts("Debian Reference Card-en.pdf", "text")
    assert re.search(r"\bnetgen\b", texts("Netgen 4 Manual.pdf", "text"), re.I)
    assert "debugger" in texts("DDD - Debugging with DDD (ch 5-8).pdf", "text").lower()
    assert re.search(r"\bIDL\b", texts("scan camlidl manual.pdf", "ocr"))  # OCR text of real pages
    scan = auto.doc("scan camlidl manual.pdf")
    rows = milvus.fetch_documents([scan["document_id"]], fields=["ocr_confidence"], with_vectors=False)
    assert len(rows) == len(scan["affected_chunks"]) == scan["page_count"]
    assert all(0.6 - 1e-6 <= r["ocr_confidence"] <= 0.98 + 1e-6 for r in rows)  # FLOAT is float32


def test_embedding_is_deterministic_and_normalised():
    a, b = embed("Debian reference card: apt-get install"), embed("Debian reference card: apt-get install")
    assert a.dtype == np.float32 and a.shape == (1536,)
    assert np.array_equal(a, b) and abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    near, far = embed("apt-get install a Debian package"), embed("perceptual hash of a scanned page")
    assert float(a @ near) > float(a @ far)
    assert abs(float(np.linalg.norm(embed(""))) - 1.0) < 1e-5


def test_build_is_fast(auto):
    assert auto.summary.timings["total"] < 120, auto.summary.timings


def test_the_demo_records_its_settings_for_later_commands(auto):
    """data_dir/repage.toml: the stores and the embedding model the local reprocess needs (docs/design.md §2.4)."""
    from repage.config import load_settings

    config = auto.dir / "repage.toml"
    assert auto.summary.config == str(config) and oct(config.stat().st_mode & 0o777) == "0o600"
    settings = load_settings({}, toml_path=config, app_fallbacks=False)
    assert (settings.embedding_model, settings.reprocess_backend) == (MODEL_NAME, "local")
    assert settings.milvus_uri == str(auto.dir / "milvus.db") and settings.collection == "fltr_documents"
    assert settings.store_url == f"file://{auto.dir / 'bucket'}"
    assert settings.ledger_url == f"sqlite:///{auto.dir / 'ledger.db'}"

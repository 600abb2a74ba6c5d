"""The buggy ingestion, replayed: chunks, image keys and ground truth for each demo document.

What FLTR's pipeline did (docs/design.md §1.2) and this module does on purpose:
- PyMuPDF4LLM wrote every page image to `{basename}-{page}-{n}.png` (0-based page;
  `-full` for a whole scanned page), where basename is the file it was given, often
  a temp file (`tmplg9eqtl2.pdf`);
- the pipeline enumerated `sorted(image_files)`: lexicographic, so `x.pdf-10-0.png`
  gets a lower `image_index` than `x.pdf-2-0.png`;
- image and OCR chunks got `image_index` but never `page`, which stayed 0.

Pure: bytes in, rows/uploads/ground truth out; the stores are written by build.py.
The ground truth comes from construction (we know each image's page because we cut
it from that page), never from repage's own parsing or planning code; its expected
path applies the rules of docs/design.md §2.1 to what was built.
"""

from __future__ import annotations

import io
import random
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_raw
from PIL import Image

from repage.demo.corpus import CorpusDoc
from repage.domain.keys import (
    canonical_image_key,
    docling_image_key,
    legacy_image_key,
    legacy_image_name,
    legacy_sort_index,
)

# Junk filter, as the pipeline had one: tracking pixels, hairlines and rules. The pdf
# path must rebuild the same image list, so these equal repage.migration.pdfpages' values (a
# test compares the two extractions); they are not imported, the demo stays the
# independent reference.
MIN_IMAGE_SIDE = 8  # px: a 1x1 pixel or a hairline is layout junk
MAX_ASPECT = 20.0  # a 600x8 strip is a rule or a border
FORM_DEPTH = 2  # images nested in form XObjects up to this depth count too
CHUNK_CHARS = 1000  # text chunk target length
SNIPPET_CHARS = 240  # nearby page text quoted in an image chunk's description
DATASETS = ("manuals", "engineering", "scans", "archive")

Sub = int | Literal["full"]


@dataclass(frozen=True)
class PageImage:
    """One image as extracted from a page: PNG bytes and pixel size."""

    page: int
    n: Sub
    png: bytes
    width: int
    height: int


@dataclass
class Placed:
    """An image after naming, indexing and (maybe) uploading."""

    image: PageImage
    legacy_name: str
    index: int
    bucket_key: str | None  # where the image is in the bucket; None = never uploaded
    bucket_key_has_page: bool  # construction knowledge: a listing would find its page
    chunk_key: str  # the chunk's image_r2_key ('' = lost)
    chunk_key_has_page: bool  # construction knowledge: the chunk key names the page
    canonical_key: str


@dataclass
class IngestedDoc:
    """Everything one document contributes to the demo."""

    corpus: CorpusDoc
    dataset_id: str
    document_id: str
    rows: list[dict]  # Milvus rows without the vector
    uploads: list[tuple[str, bytes]]  # (key, bytes): images and the source
    truth: dict
    images_total: int = 0
    affected: int = 0


# ---------------------------------------------------------------- extraction


def is_junk(width: int, height: int) -> bool:
    """1x1 pixels, icons and strips are not figures (the pipeline skipped them too)."""
    if min(width, height) < MIN_IMAGE_SIDE:
        return True
    return max(width, height) / min(width, height) > MAX_ASPECT


def _png(obj: pdfium.PdfImage) -> tuple[bytes, int, int] | None:
    try:
        pil = obj.get_bitmap(render=False).to_pil()
    except (pdfium.PdfiumError, ValueError, OSError):  # undecodable colour space: skipped, as the pipeline did
        return None
    if pil.mode not in ("L", "RGB", "RGBA"):
        pil = pil.convert("RGB")
    buf = io.BytesIO()
    pil.save(buf, "PNG", compress_level=3)  # fast enough; level 9 saves little on screenshots
    return buf.getvalue(), pil.width, pil.height


def extract_images(pdf_bytes: bytes, *, full_pages: bool = False) -> list[PageImage]:
    """Every non-junk image, page by page in content-stream order; n counts kept images.

    full_pages: a scan's one image per page is named `-full` (a whole-page render).
    """
    pdf = pdfium.PdfDocument(pdf_bytes)
    found: list[PageImage] = []
    try:
        for page_no, page in enumerate(pdf):
            n = 0
            for obj in page.get_objects(filter=(pdfium_raw.FPDF_PAGEOBJ_IMAGE,), max_depth=FORM_DEPTH):
                if is_junk(*obj.get_px_size()) or (got := _png(obj)) is None:
                    continue
                found.append(PageImage(page_no, "full" if full_pages else n, *got))
                n += 1
    finally:
        pdf.close()
    return found


# ---------------------------------------------------------------- chunks


def split_text(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """~limit-char chunks on line boundaries (a longer line is cut hard)."""
    chunks: list[str]
    chunks, current = [], ""
    for line in text.splitlines():
        while len(line) > limit:
            chunks, current = _flush(chunks, current), ""
            chunks.append(line[:limit])
            line = line[limit:]
        if current and len(current) + 1 + len(line) > limit:
            chunks, current = _flush(chunks, current), ""
        current = f"{current}\n{line}" if current else line
    return _flush(chunks, current)


def _flush(chunks: list[str], current: str) -> list[str]:
    return chunks + [current] if current.strip() else chunks


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat[:SNIPPET_CHARS]


def _base_row(doc: IngestedDoc, chunk_type: str, text: str) -> dict:
    spec = doc.corpus.spec
    index = len(doc.rows)
    return {
        "chunk_id": f"{doc.document_id}_{index}",
        "text": text,
        "dataset_id": doc.dataset_id,
        "document_id": doc.document_id,
        "filename": spec.filename,
        "chunk_index": index,
        "document_type": "pdf" if spec.filename.lower().endswith(".pdf") else "image",
        "title": spec.filename.rsplit(".", 1)[0],
        "chunk_type": chunk_type,
        "page": 0,
        "image_index": None,
        "ocr_confidence": 0.0,
        "image_r2_key": None,
        "image_size": None,
    }


def add_text_chunks(doc: IngestedDoc) -> None:
    """Text chunks carry their real page: the bug only hit image and OCR chunks."""
    for page, text in enumerate(doc.corpus.page_texts):
        for piece in split_text(text):
            row = _base_row(doc, "text", piece)
            row["page"] = page
            doc.rows.append(row)


def _image_row(doc: IngestedDoc, placed: Placed, ocr: bool, rng: random.Random) -> dict:
    img = placed.image
    page_text = doc.corpus.page_texts[img.page]
    if ocr:  # the OCR of a scanned page is that page's real text
        row = _base_row(doc, "ocr", page_text or "(no text recognised)")
        row["ocr_confidence"] = round(rng.uniform(0.6, 0.98), 3)
    else:
        text = f"Figure ({img.width}x{img.height}) in {doc.corpus.spec.filename}. Nearby text: {_snippet(page_text)}"
        row = _base_row(doc, "image", text)
    row.update(image_index=placed.index, image_r2_key=placed.chunk_key, image_size=f"{img.width}x{img.height}")
    return row


# ---------------------------------------------------------------- scenarios


def _tmp_basename(rng: random.Random) -> str:
    # tempfile.NamedTemporaryFile names: 'tmp' + 8 of [a-z0-9_]
    return "tmp" + "".join(rng.choice(string.ascii_lowercase + string.digits + "_") for _ in range(8)) + ".pdf"


def _lost_keys(count: int, rng: random.Random) -> list[bool]:
    """Which chunks lost their key: about half, at least one, never all when avoidable."""
    lost = [rng.random() < 0.5 for _ in range(count)]
    if count and not any(lost):
        lost[rng.randrange(count)] = True
    if count > 1 and all(lost):
        lost[rng.randrange(count)] = False
    return lost


def place_images(doc: IngestedDoc, images: Sequence[PageImage], rng: random.Random) -> list[Placed]:
    """Name, index (lexicographically) and key each image as the scenario wants."""
    spec = doc.corpus.spec
    basename = spec.filename if spec.basename == "filename" else _tmp_basename(rng)
    names = [legacy_image_name(basename, im.page, im.n, "png") for im in images]
    index_of = legacy_sort_index(names)
    lost = _lost_keys(len(images), rng)
    placed = []
    for im, name, gone in zip(images, names, lost):
        idx = index_of[name]
        keys = _scenario_keys(doc, spec, idx, im.page, name, gone)
        canonical = canonical_image_key(doc.dataset_id, doc.document_id, im.page, idx, "png")
        placed.append(Placed(im, name, idx, *keys, canonical_key=canonical))
    return sorted(placed, key=lambda p: p.index)


def _scenario_keys(
    doc: IngestedDoc, spec, idx: int, page: int, name: str, gone: bool
) -> tuple[str | None, bool, str, bool]:
    """(bucket key or None, it names the page, chunk key, it names the page) for one image."""
    ds, d = doc.dataset_id, doc.document_id
    legacy = legacy_image_key(ds, d, idx, name)
    docling = docling_image_key(ds, d, idx)
    s = spec.scenario
    if s in ("legacy", "legacy-no-source"):
        return legacy, True, legacy, True
    if s == "legacy-unlinked":
        return legacy, True, ("" if gone else legacy), not gone
    if s == "canonical":
        canonical = canonical_image_key(ds, d, page, idx, "png")
        return canonical, True, canonical, True
    if s == "docling":
        return docling, False, docling, False
    if s == "missing-images":
        # Some chunks kept a legacy key naming a page, others lost it: still not all resolvable.
        if spec.chunk_keys == "mixed" and not gone:
            return None, False, legacy, True
        return None, False, "", False
    if s == "unrecoverable":
        return None, False, ("" if spec.kind == "scan" else docling), False
    if s == "non-pdf-source":
        return None, False, "", False
    raise ValueError(f"{spec.filename!r}: scenario {s!r} has no images")


# ---------------------------------------------------------------- documents and truth

# The path each scenario is built to take; a spec whose construction disagrees is a bug.
SCENARIO_PATH = {
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
FINAL_STATE = {"keys": "migrated", "pdf": "migrated", "reprocess": "deferred"}


def uuid4(rng: random.Random) -> str:
    """A version-4 UUID from a seeded RNG: the same demo for the same seed."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def source_key(dataset_id: str, spec) -> str:
    """`{dataset_id}/{filename}`, URL-encoded for the specs that say so (the app did both)."""
    return f"{dataset_id}/{quote(spec.filename) if spec.quoted_source else spec.filename}"


def has_source(spec) -> bool:
    return spec.scenario not in ("legacy-no-source", "unrecoverable")


def doc_images(corpus: CorpusDoc) -> list[PageImage]:
    """The images the pipeline would have cut out of this document."""
    spec = corpus.spec
    if spec.scenario == "text-only":
        return []
    if spec.kind in ("native", "scan"):
        return extract_images(corpus.data, full_pages=spec.kind == "scan")
    # png/jpg source: the file itself is the one page image
    with Image.open(io.BytesIO(corpus.data)) as im:
        return [PageImage(0, "full", corpus.data, im.width, im.height)]


def expected_plan(placed: Sequence[Placed], source: bool, filename: str) -> tuple[str, str]:
    """(path, scan state) by the rules of docs/design.md §2.1, from what we know we built."""
    if not placed:
        return "none", "skipped"
    if all(p.chunk_key_has_page or p.bucket_key_has_page for p in placed):
        return "keys", "pending"
    if source:
        return ("pdf" if filename.lower().endswith(".pdf") else "reprocess"), "pending"
    return "none", "unrecoverable"


def _chunk_truth(row: dict, p: Placed) -> dict:
    page_from = "key" if p.chunk_key_has_page else "listing" if p.bucket_key_has_page else None
    return {
        "chunk_id": row["chunk_id"],
        "chunk_index": row["chunk_index"],
        "chunk_type": row["chunk_type"],
        "true_page": p.image.page,
        "n": p.image.n,  # position among the page's kept images ('full': a scanned page)
        "image_index": p.index,
        "current_key": p.chunk_key,
        "canonical_key": p.canonical_key,
        "image_in_bucket": p.bucket_key is not None,
        "bucket_key": p.bucket_key,
        "legacy_name": p.legacy_name,
        "image_size": row["image_size"],
        "page_from_keys": page_from,
    }


def _doc_truth(doc: IngestedDoc, placed: Sequence[Placed], chunks: list[dict], src: str | None) -> dict:
    spec = doc.corpus.spec
    path, state = expected_plan(placed, src is not None, spec.filename)
    if path != SCENARIO_PATH[spec.scenario]:
        raise ValueError(f"demo spec {spec.filename!r}: scenario {spec.scenario!r} built as path {path!r}")
    return {
        "document_id": doc.document_id,
        "dataset_id": doc.dataset_id,
        "dataset": spec.dataset,
        "filename": spec.filename,
        "scenario": spec.scenario,
        "kind": spec.kind,
        "expected_path": path,
        "expected_state": state,
        "expected_final_state": FINAL_STATE.get(path, state),
        "page_count": doc.corpus.page_count,
        "source_key": src,
        "source": {"name": spec.source, "pages": list(spec.pages) if spec.pages else None},
        "chunk_count": len(doc.rows),
        "text_chunks": sum(1 for r in doc.rows if r["chunk_type"] == "text"),
        "images_total": len(placed),
        "images_in_bucket": sum(1 for p in placed if p.bucket_key is not None),
        "affected_chunks": chunks,
    }


def ingest_document(corpus: CorpusDoc, dataset_id: str, rng: random.Random) -> IngestedDoc:
    """One document through the buggy pipeline: rows, uploads and its ground truth."""
    spec = corpus.spec
    doc = IngestedDoc(corpus, dataset_id, uuid4(rng), rows=[], uploads=[], truth={})
    if spec.kind == "native":
        add_text_chunks(doc)
    placed = place_images(doc, doc_images(corpus), rng)
    chunks = []
    for p in placed:
        row = _image_row(doc, p, ocr=spec.kind != "native", rng=rng)
        doc.rows.append(row)
        chunks.append(_chunk_truth(row, p))
        if p.bucket_key is not None:
            doc.uploads.append((p.bucket_key, p.image.png))
    src = source_key(dataset_id, spec) if has_source(spec) else None
    if src is not None:
        doc.uploads.append((src, corpus.data))
    doc.truth = _doc_truth(doc, placed, chunks, src)
    doc.images_total, doc.affected = len(placed), len(chunks)
    return doc


def ingest_corpus(corpus: Sequence[CorpusDoc], seed: int = 7) -> list[IngestedDoc]:
    """Every document, with dataset and document ids drawn from one seeded RNG."""
    rng = random.Random(seed)
    datasets = {name: uuid4(rng) for name in DATASETS}
    return [ingest_document(c, datasets[c.spec.dataset], rng) for c in corpus]

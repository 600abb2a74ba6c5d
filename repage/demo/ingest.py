"""The buggy ingestion, replayed: chunks, image keys and ground truth for each demo document.

What FLTR's pipeline did (DESIGN §1) and this module does on purpose:
- PyMuPDF4LLM wrote every page image to `{basename}-{page}-{n}.png` (0-based page;
  `-full` for a whole scanned page), where basename is the file it was given, often
  a temp file (`tmplg9eqtl2.pdf`);
- the pipeline enumerated `sorted(image_files)`: lexicographic, so `x.pdf-10-0.png`
  gets a lower `image_index` than `x.pdf-2-0.png`;
- image and OCR chunks got `image_index` but never `page`, which stayed 0.

Pure: bytes in, rows/uploads/ground truth out; the stores are written by build.py.
The ground truth comes from construction (we know each image's page because we cut
it from that page), never from repage's own parsing or planning code; its expected
path applies the rules of DESIGN §2 to what was built.
"""

from __future__ import annotations

import io
import random
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_raw

from repage.demo.corpus import CorpusDoc
from repage.keys import (
    canonical_image_key,
    docling_image_key,
    legacy_image_key,
    legacy_image_name,
    legacy_sort_index,
)

# Junk filter, as the pipeline had one: tracking pixels, bullets, icons and rules.
MIN_IMAGE_SIDE = 32  # px: smaller is an icon or a bullet, not a figure
MAX_ASPECT = 20.0  # a 600x8 strip is a rule or a border
CHUNK_CHARS = 1000  # text chunk target length
SNIPPET_CHARS = 240  # nearby page text quoted in an image chunk's description
IMAGE_SCENARIOS_WITH_SOURCE = {"legacy", "legacy-unlinked", "canonical", "docling", "missing-images"}
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
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- extraction


def is_junk(width: int, height: int) -> bool:
    """1x1 pixels, icons and strips are not figures (the pipeline skipped them too)."""
    if min(width, height) < MIN_IMAGE_SIDE:
        return True
    return max(width, height) / min(width, height) > MAX_ASPECT


def _png(obj: pdfium.PdfImage) -> tuple[bytes, int, int] | None:
    try:
        pil = obj.get_bitmap(render=False).to_pil()
    except Exception:  # pdfium cannot decode some colour spaces; the pipeline skipped those too
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
            for obj in page.get_objects(filter=(pdfium_raw.FPDF_PAGEOBJ_IMAGE,), max_depth=3):
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


def _scenario_keys(doc: IngestedDoc, spec, idx: int, page: int, name: str, gone: bool) -> tuple[str | None, str, bool]:
    """(bucket key or None, chunk key, chunk key names the page) for one image."""
    ds, d = doc.dataset_id, doc.document_id
    legacy = legacy_image_key(ds, d, idx, name)
    docling = docling_image_key(ds, d, idx)
    s = spec.scenario
    if s in ("legacy", "legacy-no-source"):
        return legacy, legacy, True
    if s == "legacy-unlinked":
        return legacy, ("" if gone else legacy), not gone
    if s == "canonical":
        canonical = canonical_image_key(ds, d, page, idx, "png")
        return canonical, canonical, True
    if s == "docling":
        return docling, docling, False
    if s == "missing-images":
        # Some chunks kept a legacy key naming a page, others lost it: still not all resolvable.
        if spec.chunk_keys == "mixed" and not gone:
            return None, legacy, True
        return None, "", False
    if s == "unrecoverable":
        return None, ("" if spec.kind == "scan" else docling), False
    if s == "non-pdf-source":
        return None, "", False
    raise ValueError(f"{spec.filename!r}: scenario {s!r} has no images")

"""PDF -> (page, n, image) with pypdfium2, and matching bucket images to them. Pure: no store I/O.

The old pipeline named each extracted image `{basename}-{page}-{n}.{ext}` (0-based page,
n-th image on the page) and numbered them `enumerate(sorted(names))`: lexicographic, so
`x.pdf-10-0.png` comes before `x.pdf-2-0.png` (docs/design.md §1.2). `index_map` rebuilds that
numbering to map `image_index` -> page; `match_images` confirms it by content (perceptual
hash of the image in the bucket, and its shape) with the thresholds of docs/design.md §2.2, and says
"review" instead of guessing whenever the evidence is weak.

A source is PDF bytes or the path of a PDF file: a large PDF is streamed to a temporary
file by the caller and opened from there, so it never sits in memory whole.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections.abc import Collection, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import imagehash
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from repage.domain.keys import legacy_image_name, legacy_sort_index
from repage.errors import BadInput

MIN_SIDE = 8  # a 1x1 pixel or a hairline is layout junk, not an image a chunk was made from
MAX_ASPECT = 20.0  # strips (rules, borders) have extreme aspect ratios
FORM_DEPTH = 2  # images nested in form XObjects count too, as the pipeline's extraction saw them
HASH_BITS = 64  # imagehash.phash with hash_size 8
# Two renderings of one image keep their shape; 10% absorbs rounding of small images and a
# renderer's clip, while a landscape figure never passes for a portrait one.
ASPECT_TOLERANCE = 0.10
MAX_CANDIDATES = 5  # candidate pages kept as review evidence
# Any basename gives the same order: all names of one document share it as a prefix, so
# the comparison is decided in `-{page}-{n}`. (`-full` or `-N` does not matter either: the
# page digits differ first, and a `-full` page has a single image.)
BASENAME = "source.pdf"
PNG_LEVEL = 3  # fixed, so re-extracting an image after a crash gives the same bytes
# Bounds on hostile sources (docs/design.md §6.6), checked before PDFium decodes anything: the
# page count, and an image's pixels from its dictionary (PDFium gives width and height without
# decoding). Pillow's own bomb limit (2 x Image.MAX_IMAGE_PIXELS, ~179 Mpx) is the same size.
MAX_PAGES = 5000
MAX_IMAGE_PIXELS = 2 * 89_478_485

# PDFium is not thread-safe, not even across documents: every call into it holds this lock.
_PDFIUM = threading.Lock()

Source = bytes | str | os.PathLike


@dataclass(frozen=True)
class PageImage:
    page: int  # 0-based
    n: int  # position among the kept images of its page
    width: int
    height: int
    image: Image.Image


@dataclass(frozen=True)
class Fingerprint:
    """An extracted image without its pixels: what matching needs."""

    page: int
    n: int
    width: int
    height: int
    phash: int | None  # 64-bit perceptual hash; None when not asked for


@dataclass(frozen=True)
class Reference:
    """What the document says about one image_index: its bucket image's hash and its size."""

    index: int
    phash: int | None = None  # of the image in the bucket; None: not in the bucket
    size: tuple[int, int] | None = None  # (width, height) from the image or the chunk's image_size


@dataclass(frozen=True)
class Match:
    """The page of one image_index, or (page None) why not, with the evidence either way."""

    index: int
    page: int | None  # None: below the threshold, goes to review
    n: int | None
    method: str  # hash | index+hash | index | none
    distance: int | None = None  # hash distance to the best candidate (bits of 64)
    margin: int | None = None  # distance of the best other page minus `distance`
    candidates: tuple[tuple[int, int | None], ...] = ()  # (page, distance), best first
    index_page: int | None = None  # the page the lexicographic index says, when allowed
    proposed: tuple[int, int] | None = None  # (page, n) a reviewer would accept
    reason: str = ""

    @property
    def confident(self) -> bool:
        return self.page is not None

    def evidence(self) -> dict:
        return {
            "image_index": self.index,
            "page": self.page,
            "method": self.method,
            "distance": self.distance,
            "margin": self.margin,
            "candidate_pages": [{"page": p, "distance": d} for p, d in self.candidates],
            "index_page": self.index_page,
            "proposed": list(self.proposed) if self.proposed else None,
            "reason": self.reason,
        }


def is_junk(width: int, height: int) -> bool:
    if min(width, height) < MIN_SIDE:
        return True
    return max(width, height) / max(min(width, height), 1) > MAX_ASPECT


# ---------------------------------------------------------------- extraction


def open_pdf(source: Source, name: str) -> pdfium.PdfDocument:
    """Open a PDF (bytes or a file path); corrupt or encrypted input is BadInput naming the document."""
    try:
        with _PDFIUM:
            return pdfium.PdfDocument(source)
    except pdfium.PdfiumError as exc:
        # PDFium's last error is process-wide and some failed loads (a PDF with no pages) leave it
        # unset: a "password" left by an earlier encrypted PDF must not call this one encrypted.
        if exc.err_code == pdfium_c.FPDF_ERR_PASSWORD and _mentions_encrypt(source):
            raise BadInput(
                f"{name}: the source PDF is encrypted (it needs a password): "
                "decrypt the source object or reprocess the document"
            ) from exc
        detail = f" ({exc})" if exc.err_code not in (pdfium_c.FPDF_ERR_SUCCESS, pdfium_c.FPDF_ERR_PASSWORD) else ""
        raise BadInput(
            f"{name}: the source PDF is corrupt, has no pages or is not a PDF{detail}: "
            "check the source object or reprocess the document"
        ) from exc


def _mentions_encrypt(source: Source, chunk: int = 1 << 20) -> bool:
    """Whether the PDF has an /Encrypt entry (read in chunks: a big file never sits in memory)."""
    if isinstance(source, bytes):
        return b"/Encrypt" in source
    tail = b""
    with open(source, "rb") as f:
        while block := f.read(chunk):
            if b"/Encrypt" in tail + block:
                return True
            tail = block[-16:]
    return False


def _pages(source: Source, name: str, pages: Collection[int] | None = None) -> Generator[list[PageImage], None, None]:
    """The kept images of each page (of `pages` only, if given), one page at a time."""
    pdf = open_pdf(source, name)
    try:
        count = checked_page_count(pdf, name)
        for page_no in range(count):
            if pages is None or page_no in pages:
                yield _page_images(pdf, page_no, name)
    finally:
        with _PDFIUM:
            pdf.close()


def checked_page_count(pdf: pdfium.PdfDocument, name: str) -> int:
    with _PDFIUM:
        count = len(pdf)
    if count > MAX_PAGES:
        raise BadInput(
            f"{name}: the source PDF has {count:,} pages, over the limit of {MAX_PAGES:,}: reprocess it by hand"
        )
    return count


def check_pixels(width: int, height: int, name: str, where: str) -> None:
    """An image too large to decode is bad input of its document, refused before decoding."""
    if width * height > MAX_IMAGE_PIXELS:
        raise BadInput(
            f"{name}: {where} is {width:,}x{height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,}: "
            "handle the document by hand"
        )


def _page_images(pdf: pdfium.PdfDocument, page_no: int, name: str) -> list[PageImage]:
    found: list[PageImage] = []
    with _PDFIUM:  # a page's images are copied out whole, so no PDFium memory outlives the lock
        try:
            page = pdf[page_no]
            try:
                for obj in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE], max_depth=FORM_DEPTH):
                    width, height = obj.get_px_size()
                    check_pixels(width, height, name, f"an image on page {page_no}")
                    if is_junk(width, height) or (image := _pixels(obj)) is None:
                        continue
                    found.append(PageImage(page_no, len(found), width, height, image))
            finally:
                page.close()
        except pdfium.PdfiumError as exc:
            raise BadInput(
                f"{name}: page {page_no} of the source PDF cannot be read ({exc}): "
                "the PDF is damaged; reprocess the document"
            ) from exc
    return found


def _pixels(obj) -> Image.Image | None:
    """The image's own pixels (not rendered), or None when PDFium cannot decode them.

    An undecodable image is skipped without taking a number, as the pipeline skipped it.
    """
    try:
        bitmap = obj.get_bitmap(render=False)
    except (pdfium.PdfiumError, ValueError, OSError):
        return None
    image = bitmap.to_pil()
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    # to_pil may share PDFium's buffer: copy it, and drop the bitmap here, under the lock
    # (closing a bitmap PDFium handed out is unsafe; CPython frees it when the last reference goes).
    pixels = image.copy()
    del image, bitmap
    return pixels


def page_count(source: Source, name: str) -> int:
    pdf = open_pdf(source, name)
    try:
        return checked_page_count(pdf, name)
    finally:
        with _PDFIUM:
            pdf.close()


def images_by_page(source: Source, name: str) -> Generator[list[PageImage], None, None]:
    """The kept images of every page, one page at a time, in page order."""
    return _pages(source, name)


def iter_page_images(source: Source, name: str) -> Iterator[PageImage]:
    """Every non-junk image of every page, in page order then content order."""
    for images in _pages(source, name):
        yield from images


def image_phash(image: Image.Image) -> int:
    return int(str(imagehash.phash(image)), 16)


def fingerprints(source: Source, name: str, *, hashes: bool = True) -> list[Fingerprint]:
    """Page, n, size (and perceptual hash) of every kept image; pixels are dropped page by page."""
    return [
        Fingerprint(im.page, im.n, im.width, im.height, image_phash(im.image) if hashes else None)
        for images in _pages(source, name)
        for im in images
    ]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def extract_png(source: Source, name: str, wanted: Collection[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """PNG bytes of the wanted (page, n) images; only their pages are read."""
    wanted = set(wanted)
    out: dict[tuple[int, int], bytes] = {}
    for images in _pages(source, name, {page for page, _ in wanted}):
        out.update({(im.page, im.n): png_bytes(im.image) for im in images if (im.page, im.n) in wanted})
    missing = wanted - set(out)
    if missing:
        raise BadInput(f"{name}: the source PDF has no image {sorted(missing)[:3]} (page, n) any more")
    return out


def reference_of(data: bytes, index: int, key: str) -> Reference | None:
    """A bucket image's hash and size; None when the bytes are no image PIL can read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return Reference(index, image_phash(image), image.size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def legacy_names(images: Sequence[PageImage | Fingerprint], basename: str, ext: str = "png") -> list[str]:
    """The names the old pipeline gave these images, in extraction order."""
    return [legacy_image_name(basename, img.page, img.n, ext) for img in images]


# ---------------------------------------------------------------- matching


def index_map(prints: Sequence[Fingerprint]) -> dict[int, Fingerprint]:
    """image_index -> extracted image, numbered as the pipeline did: enumerate(sorted(names))."""
    order = legacy_sort_index(legacy_names(prints, BASENAME))
    return {order[name]: fp for name, fp in zip(legacy_names(prints, BASENAME), prints, strict=True)}


def index_allowed(prints: Sequence[Fingerprint], indexes: Collection[int]) -> bool:
    """A page by index alone only when the PDF yields exactly as many images as the document has
    distinct image_index values (docs/design.md §2.2), and those are 0..N-1 (the numbering they came from)."""
    distinct = set(indexes)
    return len(prints) == len(distinct) and distinct == set(range(len(prints)))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def aspect_ok(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    """Shapes agree within ASPECT_TOLERANCE; an unknown shape does not object."""
    if not a or not b or min(*a, *b) <= 0:
        return True
    return abs(math.log((a[0] / a[1]) / (b[0] / b[1]))) <= math.log1p(ASPECT_TOLERANCE)


def _by_page(ref: int, prints: Sequence[Fingerprint]) -> list[tuple[int, Fingerprint]]:
    """(distance, best image) per page, best page first."""
    best: dict[int, tuple[int, Fingerprint]] = {}
    for fp in prints:
        if fp.phash is None:
            continue
        d = hamming(ref, fp.phash)
        if fp.page not in best or d < best[fp.page][0]:
            best[fp.page] = (d, fp)
    return sorted(best.values(), key=lambda item: (item[0], item[1].page))


def match_images(
    prints: Sequence[Fingerprint],
    refs: Mapping[int, Reference],
    indexes: Collection[int],
    *,
    max_distance: int,
    min_margin: int,
) -> dict[int, Match]:
    """The page of each referenced image_index: confident matches, and the rest with evidence.

    `indexes`: every distinct image_index of the document (for the index-alone rule).
    """
    by_index = index_map(prints) if index_allowed(prints, indexes) else {}
    return {
        i: _match(ref, prints, by_index.get(i), bool(by_index), max_distance, min_margin) for i, ref in refs.items()
    }


def _match(
    ref: Reference,
    prints: Sequence[Fingerprint],
    at_index: Fingerprint | None,
    indexed: bool,
    max_distance: int,
    min_margin: int,
) -> Match:
    index_page = at_index.page if at_index else None
    if indexed and at_index is None:  # an index outside 0..N-1 cannot come from this PDF's numbering
        return Match(
            ref.index, None, None, "none", reason=f"image_index {ref.index} is not among the PDF's {len(prints)} images"
        )
    if ref.phash is not None:
        return _by_hash(ref, prints, at_index, max_distance, min_margin)
    if at_index is not None and aspect_ok(ref.size, (at_index.width, at_index.height)):
        return Match(
            ref.index,
            at_index.page,
            at_index.n,
            "index",
            index_page=index_page,
            proposed=(at_index.page, at_index.n),
            reason="image not in the bucket; index alone",
        )
    return _no_image(ref, prints, at_index)


def _by_hash(
    ref: Reference, prints: Sequence[Fingerprint], at_index: Fingerprint | None, max_distance: int, min_margin: int
) -> Match:
    assert ref.phash is not None  # the only caller checks it
    ranked = _by_page(ref.phash, prints)
    if not ranked:
        return Match(ref.index, None, None, "none", reason="the source PDF yields no images")
    (d1, best), rest = ranked[0], ranked[1:]
    margin = (rest[0][0] - d1) if rest else HASH_BITS - d1
    evidence: dict[str, Any] = dict(
        distance=d1,
        margin=margin,
        candidates=tuple((fp.page, d) for d, fp in ranked[:MAX_CANDIDATES]),
        index_page=at_index.page if at_index else None,
        proposed=(best.page, best.n),
    )
    shape = aspect_ok(ref.size, (best.width, best.height))
    if d1 <= max_distance and margin >= min_margin and shape:
        return Match(ref.index, best.page, best.n, "hash", **evidence, reason="perceptual hash")
    if (
        at_index is not None
        and d1 <= max_distance
        and hamming(ref.phash, at_index.phash or 0) == d1
        and aspect_ok(ref.size, (at_index.width, at_index.height))
    ):
        # The same picture on several pages (a logo, a repeated screenshot): the index picks among
        # the equally close ones, and the content agrees with it.
        evidence["proposed"] = (at_index.page, at_index.n)
        return Match(
            ref.index,
            at_index.page,
            at_index.n,
            "index+hash",
            **evidence,
            reason="hash ties between pages; the index picks one of them",
        )
    why = (
        f"distance {d1} > {max_distance}"
        if d1 > max_distance
        else f"margin {margin} < {min_margin}"
        if margin < min_margin
        else "image shapes differ"
    )
    return Match(ref.index, None, None, "none", **evidence, reason=f"below the match threshold: {why}")


def _no_image(ref: Reference, prints: Sequence[Fingerprint], at_index: Fingerprint | None) -> Match:
    """No image to compare and no index match allowed: propose the only image of that size, if one."""
    if at_index is not None:
        return Match(
            ref.index,
            None,
            None,
            "none",
            index_page=at_index.page,
            proposed=(at_index.page, at_index.n),
            reason=f"the index says page {at_index.page}, but the image's shape {ref.size} differs",
        )
    same = [fp for fp in prints if ref.size and (fp.width, fp.height) == tuple(ref.size)]
    proposed = (same[0].page, same[0].n) if len(same) == 1 else None
    return Match(
        ref.index,
        None,
        None,
        "none",
        candidates=tuple((fp.page, None) for fp in same[:MAX_CANDIDATES]),
        proposed=proposed,
        reason=f"no image to compare, and the PDF yields {len(prints)} images for the "
        "document's image_index values: index alone is not allowed",
    )

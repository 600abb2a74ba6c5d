"""PDF -> (page, n, image) with pypdfium2. Pure: bytes in, values out, no I/O.

The old pipeline named each extracted image `{filename}-{page}-{n}.{ext}` (0-based
page, n-th image on the page); `legacy_names` rebuilds those names so the
lexicographic `image_index` of DESIGN §1 can be reproduced.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from repage.errors import BadInput
from repage.keys import legacy_image_name

MIN_SIDE = 8  # a 1x1 pixel or a hairline is layout junk, not an image a chunk was made from
MAX_ASPECT = 20.0  # strips (rules, borders) have extreme aspect ratios


@dataclass(frozen=True)
class PageImage:
    page: int  # 0-based
    n: int  # position among the kept images of its page
    width: int
    height: int
    image: object  # PIL.Image.Image


def is_junk(width: int, height: int) -> bool:
    if min(width, height) < MIN_SIDE:
        return True
    return max(width, height) / max(min(width, height), 1) > MAX_ASPECT


def open_pdf(data: bytes, name: str) -> pdfium.PdfDocument:
    """Open PDF bytes; corrupt or encrypted input is BadInput naming the document."""
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        raise BadInput(f"{name}: cannot open the PDF ({exc}); check the source object or reprocess it") from exc


def iter_page_images(data: bytes, name: str) -> Iterator[PageImage]:
    """Every non-junk image of every page, in page order then content order."""
    pdf = open_pdf(data, name)
    try:
        for page_no in range(len(pdf)):
            yield from _page_images(pdf[page_no], page_no)
    finally:
        pdf.close()


def _page_images(page: pdfium.PdfPage, page_no: int) -> Iterator[PageImage]:
    n = 0
    for obj in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE], max_depth=2):
        width, height = obj.get_px_size()
        if is_junk(width, height):
            continue
        yield PageImage(page_no, n, width, height, obj.get_bitmap(render=False).to_pil())
        n += 1


def legacy_names(images: list[PageImage], basename: str, ext: str = "png") -> list[str]:
    """The names the old pipeline gave these images, in extraction order."""
    return [legacy_image_name(basename, img.page, img.n, ext) for img in images]

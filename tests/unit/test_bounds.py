"""Bounded input (docs/design.md §6.6): hostile PDFs and images are bad input of their one
document, refused from sizes known in advance (page count, an image's width and height,
an object's size), before anything is decoded or read whole."""

from __future__ import annotations

import gc
import json
import os
import resource
import struct
import subprocess
import sys
import weakref
import zlib

import pytest

from repage.config import load_settings
from repage.errors import BadInput
from repage.migration import pdfpages
from repage.reprocess import local
from repage.stores.open import open_objects
from tests.unit.test_pdfpages import make_pdf, picture, raw_pdf

SIDE = 60_000  # 3.6 Gpx: 3.6 GB as 8-bit grey, 14 GB as PDFium's BGRA bitmap


def bomb_pdf(side: int = SIDE) -> bytes:
    """One page holding a side x side 1-bit image of zeros: ~450 KB compressed."""
    packer, row = zlib.compressobj(6), bytes((side + 7) // 8)
    stream = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    image = (
        b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceGray "
        b"/BitsPerComponent 1 /Filter /FlateDecode /Length %d >>\nstream\n%s\nendstream"
        % (side, side, len(stream), stream)
    )
    content = b"q 612 0 0 792 0 0 cm /Im0 Do Q"
    return raw_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /XObject << /Im0 4 0 R >> >> /Contents 5 0 R >>",
            image,
            b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
        ]
    )


PROBE = """
import json, sys
from repage.errors import BadInput
from repage.migration import pdfpages
from repage.reprocess import local
outcome = {}
for step in ("fingerprints", "extract_png"):
    try:
        if step == "fingerprints":
            pdfpages.fingerprints(sys.argv[1], "ds/bomb.pdf")
        else:
            pdfpages.extract_png(sys.argv[1], "ds/bomb.pdf", {(0, 0)})
        outcome[step] = "no error"
    except BadInput as exc:
        outcome[step] = str(exc)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would count the forking
# pytest worker's own memory; VmHWM is this program's peak alone
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
outcome["max_rss_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(outcome))
"""


def limit_memory() -> None:
    """The child may not take the machine down if the cap is gone: 3 GB of address space."""
    resource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, 3 * 1024**3))


def test_a_60000_pixel_square_image_is_refused_before_pdfium_decodes_it(tmp_path):
    path = tmp_path / "bomb.pdf"
    path.write_bytes(bomb_pdf())
    assert path.stat().st_size < 2 * 1024**2
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=limit_memory,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome = json.loads(proc.stdout)
    want = "ds/bomb.pdf: an image on page 0 is 60,000x60,000 pixels, over the limit of 178,956,970"
    assert outcome["fingerprints"].startswith(want) and outcome["extract_png"].startswith(want)
    assert "\n" not in outcome["fingerprints"]
    assert outcome["max_rss_mb"] < 400, outcome  # bounded: nothing of the image was decoded


def test_an_image_just_under_the_cap_is_still_read(monkeypatch):
    monkeypatch.setattr(pdfpages, "MAX_IMAGE_PIXELS", 96 * 64)
    prints = pdfpages.fingerprints(make_pdf([[picture(1, 96, 64)]]), "ok.pdf")
    assert [(p.width, p.height) for p in prints] == [(96, 64)]
    with pytest.raises(BadInput, match="97x64 pixels"):
        pdfpages.fingerprints(make_pdf([[picture(1, 97, 64)]]), "big.pdf")


def test_a_pdf_over_the_page_cap_is_refused_before_its_pages_are_read(monkeypatch):
    monkeypatch.setattr(pdfpages, "MAX_PAGES", 2)
    pdf = make_pdf([[picture(1)], [], []])
    for read in (
        lambda: pdfpages.page_count(pdf, "ds/long.pdf"),
        lambda: pdfpages.fingerprints(pdf, "ds/long.pdf"),
        lambda: pdfpages.extract_png(pdf, "ds/long.pdf", {(0, 0)}),
    ):
        with pytest.raises(BadInput, match="ds/long.pdf: the source PDF has 3 pages, over the limit of 2"):
            read()
    assert pdfpages.page_count(make_pdf([[], []]), "ds/short.pdf") == 2


def test_open_objects_caps_whole_object_reads_from_the_settings(tmp_path):
    settings = load_settings(
        {"REPAGE_STORE_URL": (tmp_path / "bucket").as_uri()}, toml_path=None, app_fallbacks=False
    ).model_copy(update={"max_object_bytes": 2048})
    with open_objects(settings) as objects:
        objects.put("ds/doc/source.pdf", bytes(4096))
        with pytest.raises(BadInput, match="'ds/doc/source.pdf' is 4,096 bytes, over the limit of 2,048"):
            objects.get("ds/doc/source.pdf")
    assert load_settings({}, app_fallbacks=False).max_object_bytes == 256 * 1024**2


def bomb_png(side: int = SIDE) -> bytes:
    """A valid 1-bit greyscale PNG of side x side zeros: ~450 KB, 3.6 Gpx once decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(6), b"\0" + bytes((side + 7) // 8)  # filter byte, then the row
    data = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_the_local_pipeline_refuses_an_image_bomb_as_bad_input_of_its_document():
    with pytest.raises(BadInput, match=r"^scan\.png: the source image is") as caught:
        list(local.extract_pages(bomb_png(), "scan.png"))
    assert "\n" not in str(caught.value)
    with pytest.raises(BadInput, match="60,000x60,000 pixels"):  # a PDF source: the same cap as the pdf path
        list(local.extract_pages(bomb_pdf(), "ds/bomb.pdf"))


def test_the_local_pipeline_refuses_a_page_too_large_to_render(monkeypatch):
    monkeypatch.setattr(pdfpages, "MAX_IMAGE_PIXELS", 1000 * 1000)  # a letter page at 200 dpi is 1700x2200
    with pytest.raises(BadInput, match="page 0 at 200 dpi is 1,700x2,200 pixels"):
        list(local.extract_pages(make_pdf([[]]), "ds/scan.pdf"))


def test_the_local_pipeline_holds_one_rendered_page_at_a_time():
    """Scanned pages (no text layer) are rendered at 200 dpi: the previous page's pixels are gone
    by the time the next page is rendered."""
    pages = iter(local.extract_pages(make_pdf([[picture(n)] for n in range(4)]), "ds/scan.pdf"))
    seen = []
    for number in range(4):
        page = next(pages)
        assert page.page == number and page.scan is not None and page.scan.size == (1700, 2200)
        seen.append(weakref.ref(page.scan))
        del page
        gc.collect()
        assert [ref() is None for ref in seen[:-1]] == [True] * number, f"page {number}: earlier renders kept"
    assert next(pages, None) is None

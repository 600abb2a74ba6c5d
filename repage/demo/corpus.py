"""The demo corpus: real PDFs from Debian documentation packages, cut and scanned.

Nobody on the team wrote these documents: they are manuals shipped by Debian
(`apt-get download` + `dpkg-deb -x`, cached under `~/.cache/repage/demo`). From them
we cut page ranges into documents of 1 to 70 pages, and render some pages into
scan-like, image-only PDFs (low DPI, grayscale, noise, JPEG) so OCR chunks exist.

Why these packages: together they give image-heavy manuals (xfig's reference has
hundreds of figures, ddd's manual has screenshots on pages past 10, netgen/why3/prawn
have figures on pages >= 10, which the lexicographic-sort bug needs) and text-only
ones (refcards, camlidl, freefem), all a few MB.

No apt-get update here: library code must not change the machine's package lists;
the error says to run it when a download fails.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pypdfium2 as pdfium
from PIL import Image

from repage.errors import ConfigError

DEFAULT_CACHE = Path.home() / ".cache" / "repage" / "demo"

# name -> (Debian package, path of the PDF inside it, without a trailing .gz)
SOURCES: dict[str, tuple[str, str]] = {
    "refcard-en": ("debian-refcard", "usr/share/doc/debian-refcard/refcard-en-a4.pdf"),
    "refcard-de": ("debian-refcard", "usr/share/doc/debian-refcard/refcard-de-a4.pdf"),
    "refcard-fr": ("debian-refcard", "usr/share/doc/debian-refcard/refcard-fr-a4.pdf"),
    "refcard-es": ("debian-refcard", "usr/share/doc/debian-refcard/refcard-es-a4.pdf"),
    "netgen": ("netgen-doc", "usr/share/doc/netgen/examples/doc/ng4.pdf"),
    "xfig-ref": ("xfig-doc", "usr/share/doc/xfig/xfig_ref_en.pdf"),
    "xfig-howto": ("xfig-doc", "usr/share/doc/xfig/xfig-howto.pdf"),
    "ddd": ("ddd-doc", "usr/share/doc/ddd/ddd.pdf"),
    "ddd-themes": ("ddd-doc", "usr/share/doc/ddd/ddd-themes.pdf"),
    "why3": ("why3-doc-pdf", "usr/share/doc/why3-doc-pdf/manual.pdf"),
    "packaging-guide": (
        "ubuntu-packaging-guide-pdf",
        "usr/share/doc/ubuntu-packaging-guide-pdf/ubuntu-packaging-guide.pdf",
    ),
    "prawn": ("ruby-prawn-doc", "usr/share/doc/ruby-prawn/manual.pdf"),
    "reportlab": ("python-reportlab-doc", "usr/share/doc/python-reportlab-doc/reportlab-userguide.pdf"),
    "camlidl": ("camlidl-doc", "usr/share/doc/camlidl/camlidl-1.04.doc.pdf"),
    "freefem": ("freefem-doc", "usr/share/doc/freefem-doc/freefem.pdf"),
}

# Scan look: a copier at ~80 DPI, grayscale, paper tone, a slight skew, sensor noise,
# JPEG q60. Noise is kept slight: it survives into the PNGs the pipeline stored and
# makes them big (sigma 9 tripled the bucket).
SCAN_DPI = 80
SCAN_QUALITY = 60
SCAN_NOISE_SIGMA = 3.0
SCAN_MAX_SKEW_DEG = 0.4
SCAN_TONE = (0.94, 8.0)  # pixel * a + b: white paper reads light grey, black ink dark grey


@dataclass(frozen=True)
class DocSpec:
    """One demo document: which real pages, how it looks, what went wrong with it.

    kind: 'native' (a page range of the real PDF), 'scan' (the same pages rendered
    into an image-only PDF), 'png' / 'jpg' (one page as a scanned image file).
    basename: the file name the old pipeline gave PyMuPDF4LLM: 'tmp' for a temp
    file (`tmpab12cd3.pdf`), 'filename' for the real name.
    """

    filename: str
    source: str
    pages: tuple[int, int] | None  # [start, stop) of the source; None = all
    kind: str
    scenario: str
    dataset: str
    basename: str = "tmp"
    quoted_source: bool = False  # source uploaded at the URL-encoded key
    chunk_keys: str = "default"  # missing-images: 'mixed' = some chunks keep a legacy key


# The demo's documents. Scenario semantics and their ground truth: ingest.py.
SPECS: tuple[DocSpec, ...] = (
    # keys path: legacy keys on every chunk. Page 12's image sorts before page 6's.
    DocSpec("ubuntu-packaging-guide.pdf", "packaging-guide", None, "native", "legacy", "manuals", "filename"),
    DocSpec("Netgen 4 Manual.pdf", "netgen", None, "native", "legacy", "engineering", "filename", True),
    DocSpec("DDD - Debugging with DDD (ch 5-8).pdf", "ddd", (100, 170), "native", "legacy", "engineering"),
    DocSpec("DDD_Themes.pdf", "ddd-themes", None, "native", "legacy", "engineering"),
    DocSpec("scan_ubuntu-packaging-guide part 2.pdf", "packaging-guide", (13, 27), "scan", "legacy", "scans"),
    # keys path through one listing: some chunks lost their key.
    DocSpec("xfig_ref_en part 1.pdf", "xfig-ref", (0, 30), "native", "legacy-unlinked", "engineering"),
    # keys path, already canonical keys, page still 0.
    DocSpec("DDD Manual - Getting Started.pdf", "ddd", (15, 46), "native", "canonical", "engineering"),
    DocSpec("scan_refcard-en.pdf", "refcard-en", None, "scan", "canonical", "scans"),
    # pdf path: Docling keys carry no page.
    DocSpec("why3 manual - intro.pdf", "why3", (0, 40), "native", "docling", "manuals", quoted_source=True),
    DocSpec("Prawn_Manual-images.pdf", "prawn", (80, 95), "native", "docling", "manuals"),
    DocSpec("scan camlidl manual.pdf", "camlidl", (0, 12), "scan", "docling", "scans"),
    # pdf path: images never reached the bucket.
    DocSpec("ddd-manual part 2.pdf", "ddd", (60, 100), "native", "missing-images", "engineering"),
    DocSpec(
        "xfig_ref_en part 3 (objects).pdf",
        "xfig-ref",
        (60, 80),
        "native",
        "missing-images",
        "engineering",
        chunk_keys="mixed",
    ),
    DocSpec("Scanned-FreeFem_excerpt.pdf", "freefem", (0, 12), "scan", "missing-images", "scans"),
    # keys path although the source is gone.
    DocSpec("ReportLab User Guide - Graphics.pdf", "reportlab", (85, 101), "native", "legacy-no-source", "archive"),
    # nothing left: no usable key, no image, no source.
    DocSpec("xfig-howto.pdf", "xfig-howto", None, "native", "unrecoverable", "archive"),
    DocSpec("scan_ddd-themes notes.pdf", "ddd-themes", (10, 22), "scan", "unrecoverable", "archive"),
    # reprocess path: the source is an image file, its OCR chunks have no image key.
    DocSpec("scan_refcard-fr page 1.png", "refcard-fr", (0, 1), "png", "non-pdf-source", "scans"),
    DocSpec("photo refcard-es_back.jpg", "refcard-es", (1, 2), "jpg", "non-pdf-source", "scans"),
    # skipped: text only.
    DocSpec("Debian Reference Card-en.pdf", "refcard-en", None, "native", "text-only", "manuals", quoted_source=True),
    DocSpec("refcard-de_page-1.pdf", "refcard-de", (0, 1), "native", "text-only", "manuals"),
    DocSpec("camlidl-1.04 doc.pdf", "camlidl", None, "native", "text-only", "manuals"),
    DocSpec("freefem_manual.pdf", "freefem", None, "native", "text-only", "manuals"),
)


@dataclass
class CorpusDoc:
    """A demo document made: its bytes and, per page, the real text of the original."""

    spec: DocSpec
    data: bytes  # the file as uploaded (PDF, PNG or JPEG)
    page_texts: list[str]

    @property
    def page_count(self) -> int:
        return len(self.page_texts)


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    # Two builds (pytest-xdist, two terminals) must not unpack into the same folder at once.
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], cwd: Path, hint: str) -> None:
    try:
        done = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:
        raise ConfigError(f"{cmd[0]} not found: the demo needs Debian's apt-get and dpkg-deb") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"{' '.join(cmd)} failed ({last}); {hint}")


def _fetch_package(package: str, cache_dir: Path) -> Path:
    """The package unpacked under cache_dir/root/{package}; downloaded once."""
    root = cache_dir / "root" / package
    if (root / ".done").exists():
        return root
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    hint = "run `apt-get update` (as root) so apt knows the package, then build the demo again"
    if not list(debs.glob(f"{package}_*.deb")):
        _run(["apt-get", "download", package], debs, hint)
    deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(root)], debs, f"the file {deb} may be corrupt: delete it")
    (root / ".done").touch()
    return root


def source_pdf(name: str, cache_dir: Path) -> bytes:
    """The bytes of one source PDF of SOURCES (gunzipped: Debian compresses some docs)."""
    package, inner = SOURCES[name]
    root = _fetch_package(package, cache_dir)
    plain, packed = root / inner, root / f"{inner}.gz"
    if plain.exists():
        return plain.read_bytes()
    if packed.exists():
        return gzip.decompress(packed.read_bytes())
    raise ConfigError(f"package {package} has no {inner}[.gz]: its layout changed; update repage/demo/corpus.py")


def fetch_sources(cache_dir: Path, names: Sequence[str] | None = None) -> dict[str, bytes]:
    """All source PDFs the specs need, downloading missing packages (locked, cached)."""
    wanted = sorted(set(names or (s.source for s in SPECS)))
    with _locked(cache_dir):
        return {name: source_pdf(name, cache_dir) for name in wanted}


def page_texts(pdf: pdfium.PdfDocument) -> list[str]:
    """Every page's text; CRLF from pdfium becomes LF so chunks read like the page."""
    texts = []
    for page in pdf:
        text = page.get_textpage().get_text_bounded()
        texts.append(text.replace("\r\n", "\n").replace("\r", "\n").strip())
    return texts


def _slice(src: pdfium.PdfDocument, pages: tuple[int, int] | None) -> pdfium.PdfDocument:
    start, stop = pages or (0, len(src))
    if not 0 <= start < stop <= len(src):
        raise ValueError(f"page range {pages} outside a {len(src)}-page PDF")
    out = pdfium.PdfDocument.new()
    out.import_pages(src, list(range(start, stop)))
    return out


def _save(pdf: pdfium.PdfDocument) -> bytes:
    buf = io.BytesIO()
    pdf.save(buf)
    return buf.getvalue()


def scan_page(page: pdfium.PdfPage, rng: np.random.Generator) -> Image.Image:
    """A page as a cheap scanner sees it: 80 DPI grayscale, skewed, toned, noisy."""
    gray = page.render(scale=SCAN_DPI / 72, grayscale=True).to_pil().convert("L")
    skew = float(rng.uniform(-SCAN_MAX_SKEW_DEG, SCAN_MAX_SKEW_DEG))
    gray = gray.rotate(skew, resample=Image.Resampling.BILINEAR, fillcolor=255)
    pixels = np.asarray(gray, dtype=np.float32) * SCAN_TONE[0] + SCAN_TONE[1]
    noisy = pixels + rng.normal(0.0, SCAN_NOISE_SIGMA, pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="L")


def image_only_pdf(images: Sequence[Image.Image]) -> bytes:
    """Assemble page images into an image-only PDF (Pillow embeds each as a JPEG)."""
    buf = io.BytesIO()
    first, rest = images[0], list(images[1:])
    first.save(buf, "PDF", save_all=True, append_images=rest, resolution=SCAN_DPI, quality=SCAN_QUALITY)
    return buf.getvalue()


def _image_file(image: Image.Image, kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "png":
        image.save(buf, "PNG")
    else:
        image.save(buf, "JPEG", quality=SCAN_QUALITY)
    return buf.getvalue()


def make_document(spec: DocSpec, source: bytes, rng: np.random.Generator) -> CorpusDoc:
    """Cut the spec's pages out of the real PDF and give them the spec's look."""
    pdf = _slice(pdfium.PdfDocument(source), spec.pages)
    try:
        texts = page_texts(pdf)
        if spec.kind == "native":
            return CorpusDoc(spec, _save(pdf), texts)
        scans = [scan_page(page, rng) for page in pdf]
    finally:
        pdf.close()
    # A scan PDF's page images are later extracted from the PDF itself (ingest.py), so
    # the bucket holds exactly the pixels a pdf-path extraction will see.
    if spec.kind == "scan":
        return CorpusDoc(spec, image_only_pdf(scans), texts)
    if spec.kind in ("png", "jpg"):
        return CorpusDoc(spec, _image_file(scans[0], spec.kind), texts[:1])
    raise ValueError(f"unknown document kind {spec.kind!r} for {spec.filename!r}")


def build_corpus(cache_dir: Path | None = None, *, seed: int = 7, specs: Sequence[DocSpec] = SPECS) -> list[CorpusDoc]:
    """Every demo document, in spec order; deterministic for a seed."""
    sources = fetch_sources(cache_dir or DEFAULT_CACHE, [s.source for s in specs])
    rng = np.random.default_rng(seed)
    return [make_document(spec, sources[spec.source], rng) for spec in specs]


def packages(specs: Sequence[DocSpec] = SPECS) -> list[str]:
    """The Debian packages the specs download."""
    return sorted({SOURCES[s.source][0] for s in specs})

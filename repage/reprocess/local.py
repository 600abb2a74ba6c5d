"""The local reference pipeline: ingest one document again, with the right pages.

For the demo store and stores built with a model repage can compute. Per document:
1. refuse unless the collection's configured `embedding_model` is one this pipeline computes
   (only `repage-demo-hash-1536`): vectors from another model must never enter a collection
   (docs/design.md §7.4), so a production collection configured with e.g. text-embedding-3-small is refused;
2. GET the source (REPAGE_SOURCE_KEY_TEMPLATE); a PDF gives per page its text (pypdfium2), its
   images, and for a page with no text layer a render that tesseract OCRs; an image source is
   one page, OCRed;
3. journal first: the document's current rows (every field, vectors included) are kept in
   `{ds}/{doc}/repage-backup/reprocess-original.json.gz` (written once: a retried reprocess
   never overwrites the original) and the intended chunks go to the ledger's chunk journal;
4. delete stale checkpoints `{ds}/{doc}/checkpoints/*.json.gz` (a reprocess resuming from a stale
   `parsed` checkpoint would carry page 0 forward); their keys are listed in the backup;
5. upload each image to its canonical key `{ds}/{doc}/images/{page}_{index}.png`;
6. replace the chunks without ever showing the document with zero or doubled chunks: the
   first min(old, new) new chunks take the identities (chunk_id / chunk_index) and primary keys
   of old ones and are written over them in one upsert (each row replaced whole); extra new
   chunks are inserted; all are read back by identity and checked; only then are the old
   chunks left over deleted. The journal then records each chunk's read-back checksum and key.
The backup and the row replacement are repage/reprocess/backup.py's, shared with the HTTP backend;
`backup.restore` (used by `repage rollback`) puts the backup's rows back the same way.
"""

from __future__ import annotations

import csv
import io
import math
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from repage.domain.identity import ChunkIdentity
from repage.domain.keys import canonical_image_key, check_document_id, source_key_candidates
from repage.domain.records import ChunkJournalEntry
from repage.errors import BadInput, ConfigError, ObjectNotFound, StoreError
from repage.reprocess import backup
from repage.reprocess.backup import replace_rows
from repage.reprocess.base import Job, JobStatus, ReprocessDocument, chunk_counts

SUPPORTED_MODELS = ("repage-demo-hash-1536",)  # repage.demo.embed.MODEL_NAME
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
CHUNK_CHARS = 1000
MIN_TEXT_CHARS = 20  # a page with less text than this is a scan: render and OCR it
RENDER_SCALE = 200 / 72  # 200 dpi for OCR
TESSERACT_TIMEOUT = 120


def checkpoint_prefix(dataset_id: str, document_id: str) -> str:
    return f"{dataset_id}/{check_document_id(document_id)}/checkpoints/"


# ---------------------------------------------------------------- OCR (tesseract, Debian's tesseract-ocr)


def ocr(image: Image.Image, lang: str = "eng") -> tuple[str, float]:
    """(text, mean word confidence 0..1) of an image, by `tesseract - - tsv` on its PNG."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    try:
        done = subprocess.run(
            ["tesseract", "-", "-", "-l", lang, "tsv"],
            input=buf.getvalue(),
            capture_output=True,
            timeout=TESSERACT_TIMEOUT,
        )
    except FileNotFoundError:
        raise ConfigError(
            "tesseract not found: install Debian's tesseract-ocr (apt-get install tesseract-ocr)"
        ) from None
    except subprocess.TimeoutExpired:
        raise BadInput(f"tesseract took longer than {TESSERACT_TIMEOUT}s on one page") from None
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise BadInput(f"tesseract failed: {last}")
    lines: dict[tuple, list[str]] = {}
    confs: list[float] = []
    reader = csv.DictReader(
        io.StringIO(done.stdout.decode("utf-8", errors="replace")), delimiter="\t", quoting=csv.QUOTE_NONE
    )
    for row in reader:
        word = (row.get("text") or "").strip()
        try:
            conf = float(row.get("conf") or -1)
        except ValueError:
            conf = -1
        if row.get("level") != "5" or not word or conf < 0:
            continue
        lines.setdefault((int(row["block_num"]), int(row["par_num"]), int(row["line_num"])), []).append(word)
        confs.append(conf)
    text = "\n".join(" ".join(words) for _, words in sorted(lines.items()))
    return text, (sum(confs) / len(confs) / 100.0) if confs else 0.0


# ---------------------------------------------------------------- extraction


@dataclass
class SourcePage:
    page: int
    text: str = ""
    images: list[Image.Image] = field(default_factory=list)
    scan: Image.Image | None = None  # whole page to OCR (no text layer, or an image source)


def extract_pages(data: bytes, name: str) -> Iterator[SourcePage]:
    """The source's pages one at a time: a page's render and images are dropped once the caller
    moves on (docs/design.md §6.6: a long scanned PDF never sits in memory as pixels)."""
    if name.lower().endswith(IMAGE_EXTS) or not data.startswith(b"%PDF"):
        yield _image_page(data, name)
        return
    yield from _pdf_pages(data, name)


def _image_page(data: bytes, name: str) -> SourcePage:
    from repage.migration import pdfpages

    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only: the size is known before decoding
            pdfpages.check_pixels(im.width, im.height, name, "the source image")
            im.load()
            return SourcePage(0, scan=im.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise BadInput(f"{name}: the source image is too large to decode ({exc})") from exc
    except OSError as exc:
        raise BadInput(f"{name}: the source is neither a PDF nor an image this pipeline reads ({exc})") from exc


def _pdf_pages(data: bytes, name: str) -> Iterator[SourcePage]:
    from repage.migration import pdfpages

    pdf = pdfpages.open_pdf(data, name)
    images = pdfpages.images_by_page(data, name)  # in step with the pages, one page at a time
    try:
        for number in range(pdfpages.checked_page_count(pdf, name)):
            text, scan = _text_or_scan(pdf, number, name)
            found = next(images)
            # a scanned page is OCRed whole, not per image
            yield SourcePage(number, text=text, scan=scan, images=[] if scan is not None else [i.image for i in found])
    finally:
        images.close()
        with pdfpages._PDFIUM:
            pdf.close()


def _text_or_scan(pdf, number: int, name: str) -> tuple[str, Image.Image | None]:
    """The page's text layer, and its 200 dpi render when the text is too short (a scan)."""
    from repage.migration import pdfpages

    with pdfpages._PDFIUM:  # PDFium is not thread-safe: every call holds the module's lock
        page = pdf[number]
        try:
            textpage = page.get_textpage()
            text = textpage.get_text_range().replace("\r\n", "\n")
            textpage.close()
            if len(text.strip()) >= MIN_TEXT_CHARS:
                return text, None
            width, height = (math.ceil(side * RENDER_SCALE) for side in page.get_size())
            pdfpages.check_pixels(width, height, name, f"page {number} at 200 dpi")
            return text, page.render(scale=RENDER_SCALE).to_pil().convert("RGB").copy()
        finally:
            page.close()


def split_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    chunks, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if current and len(current) + len(para) + 2 > size:
            chunks.append(current)
            current = ""
        while len(para) > size:
            chunks.append(para[:size])
            para = para[size:]
        current = f"{current}\n\n{para}" if current else para
    return chunks + ([current] if current.strip() else [])


class _Counted:
    """Pages as they go by, counted (the report's `pages`): a generator has no len()."""

    def __init__(self, pages: Iterable[SourcePage]):
        self._pages, self.count = pages, 0

    def __iter__(self) -> Iterator[SourcePage]:
        for page in self._pages:
            self.count += 1
            yield page


def _spooled(spool: Path, n: int, image: Image.Image) -> Path:
    path = spool / f"{n}.png"
    path.write_bytes(png(image))
    return path


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=3)
    return buf.getvalue()


# ---------------------------------------------------------------- the pipeline


class LocalReprocessor:
    name = "local"

    def __init__(self, stores, settings, *, embed=None):
        model = settings.embedding_model
        if model not in SUPPORTED_MODELS:
            raise ConfigError(
                f"the local reprocess pipeline computes only {', '.join(SUPPORTED_MODELS)}; the collection is "
                f"configured with embedding_model={model!r}: it refuses to write vectors from another model "
                '(set reprocess_backend = "http" and REPAGE_REPROCESS_URL to use the app\'s own pipeline)'
            )
        self.stores, self.settings, self.model = stores, settings, model
        self.vectors, self.objects, self.ledger = stores.vectors, stores.objects, stores.ledger
        self.info = self.vectors.info()
        if embed is None:
            from repage.demo.embed import embed as embed
        self._embed = embed

    def close(self) -> None:
        pass

    def poll(self, job: Job) -> JobStatus:
        return job.status  # synchronous: the job ended in submit

    def cost(self, job: Job) -> float | None:
        return None  # nothing metered: the run charges the price table's figure

    def submit(self, document: ReprocessDocument) -> Job:
        job = Job(document, self.name)
        try:
            job.detail.update(self.reprocess(document))
            job.status = JobStatus.READY
        except BadInput as exc:
            job.status, job.error = JobStatus.FAILED, str(exc)
        return job

    # ---- steps

    def reprocess(self, doc: ReprocessDocument) -> dict:
        old = self.vectors.fetch_documents([doc.document_id], with_vectors=True)
        source_key, data = self._source(doc, old)
        # rendered pages and images become PNG files in a spool folder, one page at a time (§6.6)
        with tempfile.TemporaryDirectory(prefix="repage-reprocess-") as spool:
            pages = _Counted(extract_pages(data, doc.filename))
            new, uploads = self._chunks(doc, pages, old, Path(spool))
            deleted = self._backup_and_clean(doc, old)
            for key, path in uploads:
                self._upload(key, path)
        targets = assign_identities(self.info, doc.document_id, old, new)
        self._journal(doc, old, targets)
        found = replace_rows(self.vectors, old, targets)
        self._journal_applied(doc, targets, found)
        return {
            "source_key": source_key,
            "pages": pages.count,
            "chunks": len(targets),
            "by_type": chunk_counts(targets),
            "checkpoints_deleted": deleted,
            "images_uploaded": len(uploads),
        }

    def _upload(self, key: str, path: Path) -> None:
        blob = path.read_bytes()
        self.objects.put(key, blob)
        if self.objects.head(key).size != len(blob):
            raise StoreError(f"upload of {key} reads back with another size")

    def _source(self, doc: ReprocessDocument, old: Sequence[Mapping]) -> tuple[str, bytes]:
        row = old[0] if old else {}
        fields = {k: str(v) for k, v in row.items() if isinstance(v, (str, int)) and not isinstance(v, bool)}
        fields.update(dataset_id=doc.dataset_id, filename=doc.filename, document_id=doc.document_id)
        for key in source_key_candidates(self.settings.source_key_template, fields):
            try:
                return key, self.objects.get(key)
            except ObjectNotFound:
                continue
        raise BadInput(
            f"document {doc.document_id}: no source object for {doc.filename!r} ({self.settings.source_key_template})"
        )

    def _backup_and_clean(self, doc: ReprocessDocument, old: Sequence[Mapping]) -> list[str]:
        prefix = checkpoint_prefix(doc.dataset_id, doc.document_id)
        stale = [info.key for page in self.objects.list(prefix) for info in page if info.key.endswith(".json.gz")]
        backup.keep(self.stores, doc.dataset_id, doc.document_id, old, checkpoints_deleted=stale)
        for stale_key in stale:
            self.objects.delete(stale_key)
        return stale

    def _chunks(
        self, doc: ReprocessDocument, pages: Iterable[SourcePage], old: Sequence[Mapping], spool: Path
    ) -> tuple[list[dict], list[tuple[str, Path]]]:
        fields = set(self.info.fields)
        template = dict(old[0]) if old else {}
        base = {
            k: v
            for k, v in template.items()
            if k in fields
            and k
            not in (
                self.info.pk_field,
                self.info.vector_field,
                "chunk_id",
                "chunk_index",
                "text",
                "chunk_type",
                "page",
                "image_index",
                "ocr_confidence",
                "image_r2_key",
                "image_size",
            )
        }
        base.update(dataset_id=doc.dataset_id, document_id=doc.document_id, filename=doc.filename)
        rows: list[dict] = []
        uploads: list[tuple[str, Path]] = []
        index = 0

        def add(kind: str, page: int, text: str, **extra) -> None:
            row = {
                **base,
                "chunk_type": kind,
                "page": page,
                "text": text[:60000],
                "image_index": None,
                "ocr_confidence": 0.0,
                "image_r2_key": None,
                "image_size": None,
                **extra,
            }
            row[self.info.vector_field] = np.asarray(self._embed(text, self.info.dim), dtype=np.float32).tolist()
            rows.append({k: v for k, v in row.items() if k in fields})

        for page in pages:
            for piece in split_text(page.text):
                add("text", page.page, piece)
            for image in page.images:
                key = canonical_image_key(doc.dataset_id, doc.document_id, page.page, index, "png")
                uploads.append((key, _spooled(spool, len(uploads), image)))
                snippet = " ".join(page.text.split())[:240]
                add(
                    "image",
                    page.page,
                    f"Figure ({image.width}x{image.height}) on page {page.page + 1} of "
                    f"{doc.filename}. Nearby text: {snippet}",
                    image_index=index,
                    image_r2_key=key,
                    image_size=f"{image.width}x{image.height}",
                )
                index += 1
            if page.scan is not None:
                text, confidence = ocr(page.scan)
                key = canonical_image_key(doc.dataset_id, doc.document_id, page.page, index, "png")
                uploads.append((key, _spooled(spool, len(uploads), page.scan)))
                add(
                    "ocr",
                    page.page,
                    text or "(no text recognised)",
                    image_index=index,
                    image_r2_key=key,
                    ocr_confidence=round(max(confidence, 0.001), 3),
                    image_size=f"{page.scan.width}x{page.scan.height}",
                )
                index += 1
        if not rows:
            raise BadInput(f"document {doc.document_id}: the source yields no text and no image")
        return rows, uploads

    def _journal(self, doc: ReprocessDocument, old: Sequence[Mapping], targets: Sequence[dict]) -> None:
        identity = self.info.identity
        by_identity = {identity.key(r): r for r in old}
        entries = []
        for row in targets:
            before = by_identity.get(identity.key(row), {})
            entries.append(
                ChunkJournalEntry(
                    identity=identity.text(row),
                    old_pk=str(before[self.info.pk_field]) if before else None,
                    old_page=int(before.get("page") or 0) if before else None,
                    new_page=int(row["page"]),
                    old_key=(before.get("image_r2_key") or None) if before else None,
                    new_key=row.get("image_r2_key") or "",
                )
            )
        self.ledger.add_chunk_journal(doc.document_id, doc.fencing_token, entries)

    def _journal_applied(self, doc: ReprocessDocument, targets: Sequence[dict], found: Mapping[tuple, dict]) -> None:
        """The journal's final word per chunk: its read-back checksum and key (verify compares them)."""
        entries, new_pks = [], {}
        for row in targets:
            identity = self.info.identity.key(row)
            back = found[identity]
            text = ChunkIdentity.as_text(identity)
            entries.append(
                ChunkJournalEntry(
                    identity=text,
                    new_pk=str(back[self.info.pk_field]),
                    new_page=int(back["page"]),
                    new_key=back.get("image_r2_key") or "",
                    row_checksum=self.vectors.row_checksum(back),
                )
            )
            new_pks[text] = str(back[self.info.pk_field])
        previous = {c.identity: c for c in self.ledger.chunk_journal(doc.document_id)}
        entries = [
            ChunkJournalEntry(
                **{
                    **e.__dict__,
                    "old_pk": previous[e.identity].old_pk,
                    "old_page": previous[e.identity].old_page,
                    "old_key": previous[e.identity].old_key,
                }
            )
            if e.identity in previous
            else e
            for e in entries
        ]
        self.ledger.add_chunk_journal(doc.document_id, doc.fencing_token, entries)
        self.ledger.mark_chunks_applied(doc.document_id, doc.fencing_token, list(new_pks), new_pks=new_pks)


def assign_identities(info, document_id: str, old: Sequence[Mapping], new: Sequence[dict]) -> list[dict]:
    """New rows with identities: the first ones take old chunks' identities (in chunk_index order)."""
    ordered = sorted(
        old, key=lambda r: (r.get("chunk_index") is None, r.get("chunk_index") or 0, str(r.get("chunk_id")))
    )
    top = max((int(r.get("chunk_index") or 0) for r in old), default=-1)
    out = []
    for i, row in enumerate(new):
        row = dict(row)
        if i < len(ordered):
            for name in ("chunk_index", "chunk_id"):
                if name in info.fields:
                    row[name] = ordered[i].get(name)
        else:
            top += 1
            if "chunk_index" in info.fields:
                row["chunk_index"] = top
            if "chunk_id" in info.fields:
                row["chunk_id"] = f"{document_id}_{top}"
        out.append(row)
    return out

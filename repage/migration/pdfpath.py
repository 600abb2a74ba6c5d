"""The pdf path (DESIGN §2): pages from the source PDF where no image key tells them.

BatchMigrator._fresh_plan hands a document claimed on the pdf path to `PdfPlanner` when its
keys leave chunks without a page. Per document:
1. GET the source PDF by REPAGE_SOURCE_KEY_TEMPLATE (raw, quoted, unquoted key forms),
   streamed to a temporary file so a 200 MB PDF never sits in memory; none -> unrecoverable;
2. GET the document's images that are in the bucket (Docling keys) and hash them;
3. extract the PDF's images (repage.migration.pdfpages), map image_index -> page, confirm by content;
4. a match below the threshold -> review with its evidence, nothing written (unless a person
   accepted the proposed pages: `repage review accept`);
5. else a plan the migrator journals and applies like the keys path: bucket images are copied
   to canonical keys, and images missing from the bucket are extracted from the PDF and
   uploaded to canonical keys, journalled as moves from `pdf:{source_key}#p{page}-{n}` with
   the uploaded bytes' size and SHA-256 (so verify, rollback and gc treat them exactly).
Every GET is counted in the document's usage (requests and bytes), which the ledger keeps.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from repage.domain.identity import ChunkIdentity
from repage.domain.keys import (
    canonical_image_key,
    parse_image_key,
    parse_pdf_image_ref,
    pdf_image_ref,
    source_key_candidates,
)
from repage.domain.plan import ChunkPage, DocumentPlan, index_listing
from repage.domain.records import ObjectJournalEntry, ObjectState
from repage.domain.states import RepairPath, State
from repage.errors import BadInput, ObjectNotFound, StaleLease
from repage.migration import pdfpages

if TYPE_CHECKING:
    from repage.config import Settings
    from repage.migration.work import DocumentWork, RunOptions

# Far above any real document; it only keeps a broken or hostile object off the temp disk.
MAX_SOURCE_BYTES = 2 * 1024**3


def parse_size(text: object) -> tuple[int, int] | None:
    """`image_size` "1161x171" -> (1161, 171); anything else -> None (an unknown size objects to nothing)."""
    try:
        w, h = str(text).lower().split("x")
        return (int(w), int(h)) if int(w) > 0 and int(h) > 0 else None
    except ValueError:
        return None


@dataclass
class _Image:
    """One chunk's image as the bucket has it: the key it is at, or None when it is missing."""

    key: str | None
    index: int | None


class Migrator(Protocol):
    """What the pdf path uses of the BatchMigrator that runs it (repage/migration/migrate.py):
    the run's settings and options, and lease and bucket calls under the run's limits."""

    settings: Any  # repage.config.Settings (`matching` thresholds, `source_key_template`)
    options: RunOptions  # `dry_run`, `move_images`
    engine: object | None  # where the CPU-heavy steps run (repage/migration/compute.py); None: here
    patterns: Sequence[re.Pattern]
    identity: ChunkIdentity
    ledger: Any  # reviews: `get_review`, `save_review`

    def renew_lease(self, work: DocumentWork) -> bool: ...

    def get_object(self, key: str) -> bytes: ...

    def download_object(self, key: str, dest: Path, *, max_bytes: int) -> int: ...


class PdfPlanner:
    """Plans one pdf-path document for a BatchMigrator (its settings, limits, options, usage)."""

    def __init__(self, migrator: Migrator, work: DocumentWork):
        self.m, self.work = migrator, work
        self.source_key: str | None = None
        self.images: dict[tuple, _Image] = {}  # per chunk identity: its image in the bucket, its image_index
        # chunk identity (JSON) -> (page, n) of its image in the PDF, and its image_index: to upload
        self.uploads: dict[str, tuple[int, int, int]] = {}

    # ---- the plan

    def resolve(self, plan: DocumentPlan, listed: Collection[str] | None) -> DocumentPlan | None:
        """The plan with every page filled in, or None: the document ends here (its outcome is set)."""
        with tempfile.TemporaryDirectory(prefix="repage-pdf-") as tmp:
            pdf = Path(tmp) / "source.pdf"
            self.source_key = self._fetch_source(pdf)
            if self.source_key is None:
                return None
            self._keep_lease()
            self.images = self._images(plan, set(listed or ()))
            refs = self._references(plan)
            indexes = {r["image_index"] for r in self.work.rows if r.get("image_index") is not None}
            matching = self.m.settings.matching
            prints, matches = self._on_engine(
                pdf,
                PdfJob(
                    "match",
                    self._name(),
                    hashes=any(r.phash is not None for r in refs.values()),
                    refs=refs,
                    indexes=frozenset(indexes),
                    max_distance=matching.max_hash_distance,
                    min_margin=matching.min_hash_margin,
                ),
            )
            matches = self._accepted(matches)
            self._keep_lease()
            if not self._all_confident(plan, matches, prints, indexes):
                return None
            resolved = self._resolved(plan, matches, prints, indexes)
            self._check_pages(resolved, pdf)
            if self.uploads:
                self._extract(pdf)
        return resolved

    def restore(self, keys: Sequence[str]) -> list[ObjectJournalEntry]:
        """Uploads that bring back these canonical images from the source PDF (docs/design.md §5.8):
        each key's image_index found among the PDF's images as the pipeline numbered them, on
        the key's page. Sets the work's error when the source or an image cannot be found."""
        work = self.work
        with tempfile.TemporaryDirectory(prefix="repage-pdf-") as tmp:
            pdf = Path(tmp) / "source.pdf"
            self.source_key = self._fetch_source(pdf)
            if self.source_key is None:
                work.outcome, work.reason = None, None  # a drift repair fails; it is not unrecoverable
                raise BadInput(f"images {', '.join(keys)} are missing and no source PDF can restore them")
            by_index = pdfpages.index_map(pdfpages.fingerprints(pdf, self._name(), hashes=False))
            wanted = {key: self._pdf_image(key, by_index) for key in keys}
            pngs = pdfpages.extract_png(pdf, self._name(), set(wanted.values()))
        restored = []
        for key, (page, n) in wanted.items():
            ref = pdf_image_ref(self.source_key, page, n)
            data = work.blobs[ref] = pngs[(page, n)]
            restored.append(ObjectJournalEntry(ref, key, len(data), hashlib.sha256(data).hexdigest()))
        return restored

    def _pdf_image(self, key: str, by_index: Mapping[int, pdfpages.Fingerprint]) -> tuple[int, int]:
        parsed = parse_image_key(key, patterns=self.m.patterns)
        found = by_index.get(parsed.index) if parsed.index is not None else None
        if found is None or found.page != parsed.page:
            raise BadInput(f"image {key} is missing and the source PDF has no image {parsed.index} on its page")
        return found.page, found.n

    def _check_pages(self, plan: DocumentPlan, pdf: Path) -> None:
        """A page (from a key) past the source PDF's last page is bad input, never written."""
        pages = pdfpages.page_count(pdf, self._name())
        beyond = [c for c in plan.chunks if c.page is not None and c.page >= pages]
        if beyond:
            c = beyond[0]
            raise BadInput(
                f"{self._name()}: chunk {list(c.identity)} gets page {c.page} (0-based, from "
                f"{c.found_key or c.current_key!r}), but the source PDF has {pages} pages: "
                "fix the key or reprocess the document"
            )

    def _on_engine(self, pdf: Path, job: PdfJob):
        """Run a CPU-heavy step on the run's engine (repage/engine.py): here on the downloaded
        file, or as a Ray task that fetches the source itself with its own bucket client."""
        engine = getattr(self.m, "engine", None)
        if engine is None or not engine.remote:
            return run_pdf_job(replace(job, path=str(pdf)))[0]
        result, size = engine.map(run_pdf_job, [replace(job, settings=self.m.settings, source_key=self.source_key)])[0]
        self.work.usage.class_b += 1  # the task's own GET of the source
        self.work.usage.bytes_read += size
        return result

    def _keep_lease(self) -> None:
        """A big PDF takes a while: renew the lease between the long steps, as the copy step does."""
        if not self.m.options.dry_run and not self.m.renew_lease(self.work):
            raise StaleLease(self.work.error or f"lease on document {self.work.document_id} lost")

    def _name(self) -> str:
        return str(self.source_key)  # errors read "document ID: SOURCE_KEY: what is wrong with the PDF"

    def _fetch_source(self, dest: Path) -> str | None:
        """Stream the first source key form that exists to `dest`; None (and unrecoverable) if none does."""
        work = self.work
        row = work.rows[0] if work.rows else {}
        fields = {k: str(v) for k, v in row.items() if isinstance(v, (str, int)) and not isinstance(v, bool)}
        fields.update(dataset_id=work.claim.dataset_id, filename=work.claim.filename, document_id=work.document_id)
        candidates = source_key_candidates(self.m.settings.source_key_template, fields)
        for key in candidates:
            try:
                size = self.m.download_object(key, dest, max_bytes=MAX_SOURCE_BYTES)
            except ObjectNotFound:
                continue
            finally:
                work.usage.class_b += 1
            work.usage.bytes_read += size
            return key
        work.outcome = State.UNRECOVERABLE
        work.reason = f"no key tells the pages and the source PDF is missing (tried {', '.join(candidates)})"
        return None

    def _images(self, plan: DocumentPlan, listed: set[str]) -> dict[tuple, _Image]:
        """Per chunk: where its image is in the bucket (None: missing) and its image_index."""
        by_index = index_listing(listed, self.m.patterns)
        out = {}
        for c in plan.chunks:
            own = parse_image_key(c.current_key or "", patterns=self.m.patterns)
            index = c.image_index if c.image_index is not None else own.index
            key = next((k for k in (c.found_key, c.current_key) if k and k in listed), None)
            if key is None and c.page is None and index is not None and index in by_index:
                key = by_index[index][0]  # the chunk lost its key; the listing has its image
            out[c.identity] = _Image(key, index)
        return out

    def _references(self, plan: DocumentPlan) -> dict[int, pdfpages.Reference]:
        """What each page-less image_index offers to compare: its bucket image's hash, else its size."""
        rows = self._rows()
        refs: dict[int, pdfpages.Reference] = {}
        for c in plan.chunks:
            image = self.images[c.identity]
            if c.page is not None or image.index is None:
                continue
            size = parse_size(rows.get(c.identity, {}).get("image_size"))
            known = refs.get(image.index)
            if known is not None and known.phash is not None:
                continue
            ref = self._bucket_reference(image) if image.key else None
            refs[image.index] = ref or pdfpages.Reference(image.index, None, size)
        return refs

    def _bucket_reference(self, image: _Image) -> pdfpages.Reference | None:
        assert image.key is not None  # the only caller checks it
        try:
            data = self.m.get_object(image.key)
        except ObjectNotFound:  # listed a moment ago, gone now: treated as missing
            image.key = None
            return None
        finally:
            self.work.usage.class_b += 1
        self.work.usage.bytes_read += len(data)
        self.work.blobs[image.key] = data  # the copy step hashes these bytes instead of a second GET
        # mypy: a None here is not ruled out by the types (left as it was)
        return pdfpages.reference_of(data, image.index, image.key)  # type: ignore[arg-type]

    def _rows(self) -> dict[tuple, dict]:
        return {self.m.identity.key(r): r for r in self.work.rows}

    # ---- reviews

    def _accepted(self, matches: dict[int, pdfpages.Match]) -> dict[int, pdfpages.Match]:
        """A reviewer's accepted proposals replace the matches that were below the threshold."""
        review = self.m.ledger.get_review(self.work.document_id) if self.m.ledger is not None else None
        if review is None or review.status != "accepted":
            return matches
        proposed = {c["image_index"]: c["proposed"] for c in json.loads(review.evidence)["chunks"] if c["proposed"]}
        return {
            i: m
            if m.confident or i not in proposed
            else replace(m, page=proposed[i][0], n=proposed[i][1], method="accepted", reason="accepted in review")
            for i, m in matches.items()
        }

    def _all_confident(
        self,
        plan: DocumentPlan,
        matches: Mapping[int, pdfpages.Match],
        prints: Sequence[pdfpages.Fingerprint],
        indexes: Collection[int],
    ) -> bool:
        """True when every page-less chunk has a confident match; else record the review and say so."""
        weak = []
        for c in plan.chunks:
            if c.page is not None:
                continue
            index = self.images[c.identity].index
            match = matches.get(index) if index is not None else None
            if match is None or not match.confident:
                evidence = (
                    match.evidence()
                    if match
                    else {
                        "image_index": index,
                        "page": None,
                        "proposed": None,
                        "reason": "the chunk has no image_index and no image",
                    }
                )
                weak.append({"chunk": list(c.identity), **evidence})
        if not weak:
            return True
        self._to_review(plan, weak, prints, indexes)
        return False

    def _to_review(self, plan: DocumentPlan, weak: list[dict], prints, indexes) -> None:
        settings = self.m.settings.matching
        evidence = {
            "source_key": self.source_key,
            "images_in_pdf": len(prints),
            "distinct_image_indexes": len(set(indexes)),
            "index_allowed": pdfpages.index_allowed(prints, indexes),
            "thresholds": {
                "max_hash_distance": settings.max_hash_distance,
                "min_hash_margin": settings.min_hash_margin,
            },
            "confident": plan.affected - len(weak),
            "chunks": weak,
        }
        if not self.m.options.dry_run:
            self.m.ledger.save_review(self.work.document_id, self.work.claim.fencing_token, json.dumps(evidence))
        self.work.outcome = State.REVIEW
        self.work.reason = (
            f"{len(weak)} of {plan.affected} chunks matched below the threshold "
            f"(distance <= {settings.max_hash_distance}, margin >= {settings.min_hash_margin}): "
            "see `repage review`"
        )

    # ---- the resolved plan and its uploads

    def _resolved(
        self,
        plan: DocumentPlan,
        matches: Mapping[int, pdfpages.Match],
        prints: Sequence[pdfpages.Fingerprint],
        indexes: Collection[int],
    ) -> DocumentPlan:
        at = {(fp.page, fp.n): fp for fp in prints}
        by_index = pdfpages.index_map(prints) if pdfpages.index_allowed(prints, indexes) else {}
        sizes = {identity: parse_size(row.get("image_size")) for identity, row in self._rows().items()}
        chunks = []
        for c in plan.chunks:
            image = self.images[c.identity]
            # mypy: a None here is not ruled out by the types (left as it was)
            match = matches.get(image.index) if c.page is None else None  # type: ignore[arg-type]
            page = c.page if match is None else match.page
            if image.key is None and self.m.options.move_images:  # not in the bucket: from the PDF
                source = self._source_image(c, match, by_index, at, sizes.get(c.identity))
                if source is not None and source[0] == page and image.index is not None:
                    self.uploads[ChunkIdentity.as_text(c.identity)] = (*source, image.index)
            chunks.append(
                replace(
                    c,
                    page=page,
                    found_key=image.key,
                    image_index=image.index,
                    evidence=c.evidence if match is None else f"pdf:{match.method}",
                )
            )
        return replace(plan, path=RepairPath.PDF, chunks=tuple(chunks))

    def _source_image(self, c: ChunkPage, match: pdfpages.Match | None, by_index, at, size) -> tuple[int, int] | None:
        """(page, n) in the PDF of a chunk's missing image, when it is certain."""
        if match is not None:
            # mypy: a None here is not ruled out by the types (left as it was)
            return (match.page, match.n) if match.n is not None else None  # type: ignore[return-value]
        parsed = parse_image_key(c.current_key or "", patterns=self.m.patterns)  # the key named the page
        n = 0 if parsed.sub == "full" else parsed.sub if isinstance(parsed.sub, int) else None
        index = self.images[c.identity].index
        if n is None and index in by_index and by_index[index].page == c.page:
            n = by_index[index].n
        fp = at.get((c.page, n))
        # mypy: a None here is not ruled out by the types (left as it was)
        return (c.page, n) if fp is not None and pdfpages.aspect_ok(size, (fp.width, fp.height)) else None  # type: ignore[return-value]

    def _extract(self, pdf: Path) -> None:
        wanted = {(page, n) for page, n, _ in self.uploads.values()}
        pngs = self._on_engine(pdf, PdfJob("extract", self._name(), wanted=frozenset(wanted)))
        assert self.source_key is not None  # resolve() found the source before extracting
        for page, n in wanted:
            self.work.blobs[pdf_image_ref(self.source_key, page, n)] = pngs[(page, n)]

    def add_uploads(self) -> None:
        """After the migrator journalled its plan: link the chunks with missing images to uploads."""
        moves: dict[str, ObjectJournalEntry]
        work, moves, chunks = self.work, {}, []
        for entry in work.chunks:
            if entry.identity not in self.uploads:
                chunks.append(entry)
                continue
            page, n, index = self.uploads[entry.identity]
            assert self.source_key is not None  # uploads exist only once resolve() found the source
            old = pdf_image_ref(self.source_key, page, n)
            # mypy: a None here is not ruled out by the types (left as it was)
            new = canonical_image_key(work.claim.dataset_id, work.document_id, entry.new_page, index, "png")  # type: ignore[arg-type]
            data = work.blobs[old]
            moves.setdefault(
                new, ObjectJournalEntry(old, new, len(data), hashlib.sha256(data).hexdigest(), ObjectState.INTENDED)
            )
            chunks.append(replace(entry, new_key=new if new != entry.old_key else None))
        work.chunks = chunks
        work.moves = [*work.moves, *sorted(moves.values(), key=lambda m: (m.old_key, m.new_key))]


@dataclass(frozen=True)
class PdfJob:
    """One CPU-heavy step on a source PDF, picklable for a Ray task (repage/engine.py).

    `path`: the PDF already downloaded by this process (local engine); else `settings` and
    `source_key`: the task opens its own bucket client and downloads it (DESIGN §7).
    """

    op: str  # "match": fingerprints + matching -> (prints, matches); "extract": {(page, n): png}
    name: str
    hashes: bool = True
    refs: Mapping[int, pdfpages.Reference] | None = None
    indexes: frozenset[int] = frozenset()
    max_distance: int = 10
    min_margin: int = 8
    wanted: frozenset[tuple[int, int]] = frozenset()
    path: str | None = None
    settings: Settings | None = None
    source_key: str | None = None


def run_pdf_job(job: PdfJob) -> tuple[object, int]:
    """The step's result and the bytes this call downloaded (0 on a local file)."""
    if job.path is not None:
        return _pdf_step(job, job.path), 0
    from repage.stores.open import open_objects

    # no path: _on_engine gave the task the settings and the source key
    assert job.settings is not None and job.source_key is not None
    objects = open_objects(job.settings, check=False)  # created here, in the task's process
    try:
        with tempfile.TemporaryDirectory(prefix="repage-pdf-task-") as tmp:
            pdf = Path(tmp) / "source.pdf"
            with open(pdf, "wb") as out:
                size = objects.download(job.source_key, out, max_bytes=MAX_SOURCE_BYTES)
            return _pdf_step(job, pdf), size
    finally:
        objects.close()


def _pdf_step(job: PdfJob, pdf) -> object:
    if job.op == "extract":
        return pdfpages.extract_png(pdf, job.name, job.wanted)
    if job.op != "match":
        raise ValueError(f"unknown pdf job {job.op!r}")
    prints = pdfpages.fingerprints(pdf, job.name, hashes=job.hashes)
    matches = pdfpages.match_images(
        prints, job.refs or {}, job.indexes, max_distance=job.max_distance, min_margin=job.min_margin
    )
    return prints, matches


# ---- applying an upload (BatchMigrator._copy_one PUTs what this returns)


def extracted_image(migrator: Migrator, work: DocumentWork, move: ObjectJournalEntry) -> bytes:
    """The image extracted from the source PDF to PUT at its canonical key.

    The bytes come from the plan; a run resumed from the journal (the plan died with its
    process) extracts them again. Either way they are checked against the journalled hash.
    """
    data = work.blobs.get(move.old_key)
    if data is None:
        data = _extract_again(migrator, work, move)
    if hashlib.sha256(data).hexdigest() != move.content_hash:
        raise BadInput(
            f"image {move.old_key} extracted again differs from the journal's (content hash): "
            "the source PDF changed; roll the document back and run it again"
        )
    return data


def _extract_again(migrator: Migrator, work: DocumentWork, move: ObjectJournalEntry) -> bytes:
    parsed = parse_pdf_image_ref(move.old_key)
    if parsed is None:
        raise BadInput(f"journal entry {move.old_key!r} is no pdf image reference")
    source_key, page, n = parsed
    with tempfile.TemporaryDirectory(prefix="repage-pdf-") as tmp:
        pdf = Path(tmp) / "source.pdf"
        try:
            size = migrator.download_object(source_key, pdf, max_bytes=MAX_SOURCE_BYTES)
        finally:
            work.usage.class_b += 1
        work.usage.bytes_read += size
        data = pdfpages.extract_png(pdf, source_key, {(page, n)})[(page, n)]
    work.blobs[move.old_key] = data  # other chunks of the document may share the image
    return data


__all__ = ["MAX_SOURCE_BYTES", "Migrator", "PdfJob", "PdfPlanner", "extracted_image", "run_pdf_job"]

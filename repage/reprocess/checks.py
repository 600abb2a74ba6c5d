"""A reprocessed document's rows, checked before it becomes `migrated` (docs/design.md §2.4).

"ready" is the backend's word, not proof: a pipeline resuming from a stale checkpoint carries
page 0 forward and still says ready. `check_result` reads what the rows say:
- a chunk whose canonical image key names another page than its own: `failed`, naming the chunk;
- image/OCR chunks all still at page 0 while the source has more than one page (or is a PDF
  that cannot be found to count): `review`, with the chunks as evidence (`repage review reject`
  sends it back to the reprocess path).
The source is fetched only in the second case, so a good result costs no bucket request.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from repage.domain.keys import source_key_candidates
from repage.domain.reprocessed import is_image_chunk, key_page_problem, stuck_at_zero
from repage.domain.states import State
from repage.errors import ObjectNotFound

MAX_SOURCE_BYTES = 2 * 1024**3  # as the pdf path (docs/design.md §2.2)


@dataclass(frozen=True)
class Verdict:
    """Why a reprocessed document is not `migrated`: `failed` or `review`, and a review's evidence."""

    state: State
    reason: str
    evidence: dict | None = None


def check_result(stores, claim, rows: Sequence[Mapping]) -> Verdict | None:
    """None when the rows are a plausible result, else the verdict (docs/design.md §2.4)."""
    identity = stores.vectors.info().identity
    for row in rows:
        why = key_page_problem(row)
        if why:
            return Verdict(
                State.FAILED, f"document {claim.document_id}: reprocess result: chunk {identity.text(row)}: {why}"
            )
    if not stuck_at_zero(rows):
        return None
    pages, tried = source_pages(stores, claim, rows)
    if pages == 1 or (pages is None and not claim.filename.lower().endswith(".pdf")):
        return None  # one page (an image source): page 0 is right
    return _review(identity, claim, rows, pages, tried)


def _review(identity, claim, rows: Sequence[Mapping], pages: int | None, tried: list[str]) -> Verdict:
    images = [r for r in rows if is_image_chunk(r)]
    source = f"its source has {pages} pages" if pages else f"its source PDF was not found to count (tried {tried})"
    reason = (
        f"document {claim.document_id}: the backend reports it ready but all {len(images)} image/OCR chunks "
        f"are still at page 0 and {source}: see `repage review`"
    )
    chunks = [
        {
            "chunk": list(identity.key(r)),
            "image_index": r.get("image_index"),
            "page": r.get("page"),
            "image_r2_key": r.get("image_r2_key") or None,
            "reason": "still at page 0 after the reprocess",
        }
        for r in images
    ]
    evidence = {"check": "reprocess-result", "source_key": tried[-1] if pages else None, "source_pages": pages}
    return Verdict(State.REVIEW, reason, {**evidence, "chunks": chunks})


def source_pages(stores, claim, rows: Sequence[Mapping]) -> tuple[int | None, list[str]]:
    """(pages of the source, the keys tried): 1 for a source that is not a PDF, None if none exists."""
    from repage.migration import pdfpages

    row = rows[0] if rows else {}
    fields = {k: str(v) for k, v in row.items() if isinstance(v, (str, int)) and not isinstance(v, bool)}
    fields.update(dataset_id=claim.dataset_id, filename=claim.filename, document_id=claim.document_id)
    tried: list[str] = []
    for key in source_key_candidates(stores.settings.source_key_template, fields):
        tried.append(key)
        with tempfile.TemporaryDirectory(prefix="repage-source-") as folder:
            path = Path(folder) / "source"
            try:
                with path.open("wb") as dest:
                    stores.objects.download(key, dest, max_bytes=MAX_SOURCE_BYTES)
            except ObjectNotFound:
                continue
            with path.open("rb") as src:
                if src.read(5) != b"%PDF-":
                    return 1, tried
            return pdfpages.page_count(path, key), tried
    return None, tried

"""Checks on a reprocessed document's rows before it is `migrated` (docs/design.md §2.4). Pure.

A backend that answers "ready" is not trusted on its word:
- every image/OCR chunk whose image key is canonical (`{ds}/{doc}/images/{page}_{index}.ext`)
  must carry the page that key names (`key_page_problem`);
- image/OCR chunks all still at page 0 are the stale-checkpoint failure when the source has more
  than one page (`stuck_at_zero`): the caller counts the source's pages only then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from repage.domain.keys import parse_image_key
from repage.domain.plan import AFFECTED_TYPES


def is_image_chunk(row: Mapping[str, Any]) -> bool:
    """An image or OCR chunk: the kind the bug left at page 0 (docs/design.md §1.3), whatever its page now."""
    return row.get("chunk_type") in AFFECTED_TYPES or float(row.get("ocr_confidence") or 0.0) > 0.0


def key_page_problem(row: Mapping[str, Any]) -> str | None:
    """Why the chunk's page contradicts its canonical image key, or None."""
    key = row.get("image_r2_key") or ""
    if not key or not is_image_chunk(row):
        return None
    parsed = parse_image_key(key)
    if parsed.fmt != "canonical" or parsed.page == row.get("page"):
        return None
    return f"page {row.get('page')} but its image key {key!r} says page {parsed.page}"


def stuck_at_zero(rows: Sequence[Mapping[str, Any]]) -> bool:
    """True when the document has image/OCR chunks and every one is still at page 0."""
    images = [r for r in rows if is_image_chunk(r)]
    return bool(images) and all(int(r.get("page") or 0) == 0 for r in images)


__all__ = ["is_image_chunk", "key_page_problem", "stuck_at_zero"]

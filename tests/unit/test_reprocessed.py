"""The pure checks on a reprocessed document's rows (repage/domain/reprocessed.py, docs/design.md §2.4)."""

from __future__ import annotations

from repage.domain.reprocessed import is_image_chunk, key_page_problem, stuck_at_zero

KEY = "ds/doc/images/{}_4.png"


def row(kind: str = "image", page: int = 0, key: str | None = None, conf: float | None = None) -> dict:
    return {"chunk_type": kind, "page": page, "image_r2_key": key, "ocr_confidence": conf}


def test_image_chunks_are_image_ocr_or_ocr_text_at_any_page():
    assert is_image_chunk(row("image", 3)) and is_image_chunk(row("ocr")) and is_image_chunk(row("text", conf=0.4))
    assert not is_image_chunk(row("text")) and not is_image_chunk(row("text", conf=0.0))


def test_a_canonical_key_must_name_the_chunks_page():
    assert key_page_problem(row(page=2, key=KEY.format(2))) is None
    assert key_page_problem(row(page=2, key=KEY.format(5))) == (
        "page 2 but its image key 'ds/doc/images/5_4.png' says page 5"
    )
    # only canonical keys are held to it; no key, a text chunk or another format: nothing to compare
    assert key_page_problem(row(page=2, key="ds/doc/images/4_tmp.pdf-5-0.png")) is None
    assert key_page_problem(row(page=2)) is None
    assert key_page_problem(row("text", page=2, key=KEY.format(5))) is None


def test_stuck_at_zero_only_when_every_image_chunk_is():
    assert stuck_at_zero([row(), row("ocr"), row("text", page=4)])
    assert not stuck_at_zero([row(), row("ocr", page=1)])
    assert not stuck_at_zero([row("text")])  # no image/OCR chunk: nothing stuck
    assert not stuck_at_zero([])

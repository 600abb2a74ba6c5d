import re

from repage.domain.plan import classify, index_listing, is_affected, needs_listing
from repage.domain.states import RepairPath, State

DS, DOC = "ds1", "doc1"
LEGACY = f"{DS}/{DOC}/images/3_report.pdf-10-0.png"  # index 3, page 10


def row(key="", index=None, chunk_type="image", page=0, conf=0.0):
    return {"image_r2_key": key, "image_index": index, "chunk_type": chunk_type, "page": page, "ocr_confidence": conf}


def plan(rows, **kw):
    return classify(DOC, rows, [(i,) for i in range(len(rows))], dataset_id=DS, filename="report.pdf", **kw)


def test_affected_predicate():
    assert is_affected(row())
    assert is_affected(row(chunk_type="ocr"))
    assert is_affected(row(chunk_type="text", conf=0.7))
    assert not is_affected(row(chunk_type="text"))
    assert not is_affected(row(page=3))


def test_no_affected_chunks_is_skipped():
    p = plan([])
    assert (p.path, p.state) == (RepairPath.NONE, State.SKIPPED)


def test_page_from_chunk_key_needs_no_listing():
    rows = [row(LEGACY, 3), row(f"{DS}/{DOC}/images/0_1.png", 1)]
    assert not needs_listing(rows)
    p = plan(rows)
    assert (p.path, p.state) == (RepairPath.KEYS, State.PENDING)
    assert [c.page for c in p.chunks] == [10, 0]
    assert [c.evidence for c in p.chunks] == ["key", "key"]


def test_unlinked_chunk_resolved_by_listing_its_index():
    rows = [row("", 3)]
    assert needs_listing(rows)
    p = plan(rows, listed_keys=[LEGACY, f"{DS}/{DOC}/images/4_report.pdf-2-0.png"])
    assert p.path == RepairPath.KEYS
    assert p.chunks[0].page == 10 and p.chunks[0].found_key == LEGACY and p.chunks[0].evidence == "listing"


def test_docling_with_source_is_pdf_path():
    rows = [row(f"{DS}/{DOC}/images/0_docling_image.png", 0)]
    p = plan(rows, listed_keys=[f"{DS}/{DOC}/images/0_docling_image.png"], source_exists=True)
    assert (p.path, p.state) == (RepairPath.PDF, State.PENDING)
    assert p.chunks[0].page is None and p.chunks[0].found_key is not None


def test_non_pdf_source_is_reprocess():
    p = classify(
        DOC,
        [row("", None, "ocr", conf=0.9)],
        [(0,)],
        dataset_id=DS,
        filename="scan.png",
        listed_keys=[],
        source_exists=True,
    )
    assert p.path == RepairPath.REPROCESS


def test_nothing_left_is_unrecoverable_with_reason():
    p = plan([row("", 2)], listed_keys=[], source_exists=False)
    assert (p.path, p.state) == (RepairPath.NONE, State.UNRECOVERABLE)
    assert "source object is missing" in p.reason


def test_partial_keys_without_source_is_unrecoverable_never_a_guess():
    p = plan([row(LEGACY, 3), row("", 9)], listed_keys=[LEGACY], source_exists=False)
    assert p.state == State.UNRECOVERABLE
    assert p.chunks[1].page is None


def test_listing_prefers_page_bearing_key_for_an_index():
    listing = index_listing([f"{DS}/{DOC}/images/3_docling_image.png", LEGACY])
    assert listing[3][0] == LEGACY


def test_user_pattern():
    pattern = re.compile(r"^(?P<dataset_id>[^/]+)/(?P<document_id>[^/]+)/img/p(?P<page>[0-9]+)-(?P<index>[0-9]+)\.png$")
    p = plan([row(f"{DS}/{DOC}/img/p7-2.png", 2)], patterns=[pattern])
    assert p.path == RepairPath.KEYS and p.chunks[0].page == 7

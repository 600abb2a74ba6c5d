"""repage.migration.pdfpages: extraction, the lexicographic index, matching thresholds, bad PDFs.

The PDFs are made here with pypdfium2 (several images per page, junk included) and with a
hand-written encrypted trailer; the images are blocky random pictures, far apart in hash.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pypdfium2 as pdfium
import pytest
from PIL import Image

from repage.domain.keys import is_pdf_image_ref, parse_pdf_image_ref, pdf_image_ref
from repage.errors import BadInput
from repage.migration import pdfpages
from repage.migration.pdfpages import Fingerprint, Reference, index_allowed, index_map, match_images

DEFAULTS = {"max_distance": 10, "min_margin": 8}  # settings.matching defaults (docs/design.md §2.2, §6.2)


def picture(seed: int, w: int = 96, h: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((w, h), Image.NEAREST)


def make_pdf(pages: list[list[Image.Image]]) -> bytes:
    """A PDF with these images on each page, placed one under the other."""
    pdf = pdfium.PdfDocument.new()
    for images in pages:
        page = pdf.new_page(612, 792)
        y = 20
        for im in images:
            obj = pdfium.PdfImage.new(pdf)
            obj.set_bitmap(pdfium.PdfBitmap.from_pil(im))
            obj.set_matrix(pdfium.PdfMatrix().scale(im.width, im.height).translate(20, y))
            page.insert_obj(obj)
            y += min(im.height, 60) + 5
        page.gen_content()
    buf = io.BytesIO()
    pdf.save(buf)
    pdf.close()
    return buf.getvalue()


def raw_pdf(objs: list[bytes], trailer: bytes = b"") -> bytes:
    """A PDF written object by object: `objs` numbered from 1 (1 is the catalog), with its xref."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (i, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % o for o in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, trailer, xref))
    return out.getvalue()


def encrypted_pdf() -> bytes:
    """A one-page PDF behind the standard security handler with an unknown user password."""
    return raw_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 100 100] >>",
            b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>",
        ],
        trailer=b" /Encrypt 4 0 R /ID [<%s> <%s>]" % (b"ab" * 16, b"ab" * 16),
    )


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def fp(page: int, n: int = 0, phash: int | None = 0, size: tuple[int, int] = (100, 100)) -> Fingerprint:
    return Fingerprint(page, n, size[0], size[1], phash)


def bits(n: int) -> int:
    """A hash n bits away from 0."""
    return (1 << n) - 1


# ---------------------------------------------------------------- extraction


def test_extraction_keeps_real_images_in_order_and_drops_junk():
    a, b, c = picture(1), picture(2), picture(3, 64, 128)
    junk = [Image.new("RGB", (1, 1)), Image.new("RGB", (600, 8))]  # a tracking pixel, a rule
    data = make_pdf([[a, *junk, b], [], [c]])
    got = list(pdfpages.iter_page_images(data, "doc.pdf"))
    assert [(im.page, im.n, im.width, im.height) for im in got] == [(0, 0, 96, 64), (0, 1, 96, 64), (2, 0, 64, 128)]
    for im, want in zip(got, (a, b, c)):
        assert np.array_equal(np.asarray(im.image.convert("RGB")), np.asarray(want))


def test_a_pdf_file_path_gives_what_its_bytes_give(tmp_path):
    data = make_pdf([[picture(1)], [picture(2), picture(3)]])
    path = tmp_path / "big.pdf"
    path.write_bytes(data)
    assert pdfpages.fingerprints(path, "x") == pdfpages.fingerprints(data, "x")


def test_extract_png_reads_only_the_wanted_images_and_they_are_the_pdfs():
    images = [[picture(1)], [picture(2), picture(3)], [picture(4)]]
    out = pdfpages.extract_png(make_pdf(images), "doc.pdf", {(1, 1), (2, 0)})
    assert set(out) == {(1, 1), (2, 0)}
    for (page, n), data in out.items():
        with Image.open(io.BytesIO(data)) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(images[page][n]))
    assert out == pdfpages.extract_png(make_pdf(images), "doc.pdf", {(1, 1), (2, 0)})  # same bytes again
    with pytest.raises(BadInput, match="no image"):
        pdfpages.extract_png(make_pdf(images), "doc.pdf", {(0, 5)})


def test_threads_extract_safely_in_parallel():
    data = make_pdf([[picture(i), picture(i + 50)] for i in range(6)])
    want = pdfpages.fingerprints(data, "x")
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(pdfpages.fingerprints(data, "x"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 6


@pytest.mark.parametrize(
    "data,words",
    [
        (b"%PDF-1.4 this is no PDF at all", "corrupt"),
        (b"", "corrupt"),
        (encrypted_pdf(), "encrypted"),
    ],
)
def test_corrupt_or_encrypted_pdf_is_bad_input_naming_the_document(data, words):
    for call in (
        lambda: pdfpages.fingerprints(data, "ds/Field manual.pdf"),
        lambda: list(pdfpages.iter_page_images(data, "ds/Field manual.pdf")),
    ):
        with pytest.raises(BadInput, match=words) as info:
            call()
        assert "ds/Field manual.pdf" in str(info.value)


def test_a_truncated_pdf_is_bad_input():
    data = make_pdf([[picture(i)] for i in range(3)])
    with pytest.raises(BadInput, match="Field.pdf"):
        pdfpages.fingerprints(data[: len(data) // 3], "Field.pdf")


# ---------------------------------------------------------------- the lexicographic index


def test_index_map_is_lexicographic_past_ten_pages():
    prints = [fp(page) for page in range(12)]  # one image per page, pages 0..11
    pages = [index_map(prints)[i].page for i in range(12)]
    # enumerate(sorted(["x-0-0.png", "x-1-0.png", "x-10-0.png", "x-11-0.png", "x-2-0.png", ...]))
    assert pages == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]


def test_index_map_with_several_images_per_page():
    prints = [fp(1, 0), fp(1, 1), fp(10, 0), fp(2, 0), fp(2, 1), fp(2, 2)]
    got = [(index_map(prints)[i].page, index_map(prints)[i].n) for i in range(6)]
    assert got == [(1, 0), (1, 1), (10, 0), (2, 0), (2, 1), (2, 2)]


def test_index_map_on_a_real_pdf_of_12_pages():
    data = make_pdf([[picture(p)] for p in range(12)])
    prints = pdfpages.fingerprints(data, "x", hashes=False)
    refs = {i: Reference(i) for i in range(12)}  # no image in the bucket: index alone
    got = match_images(prints, refs, range(12), **DEFAULTS)
    assert [got[i].page for i in range(12)] == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert {m.method for m in got.values()} == {"index"}


# ---------------------------------------------------------------- the index-alone rule


def test_index_alone_only_when_the_pdf_has_as_many_images_as_the_document_has_indexes():
    prints = [fp(p, phash=None) for p in range(4)]
    refs = {1: Reference(1)}
    assert match_images(prints, refs, {0, 1, 2, 3}, **DEFAULTS)[1].page == 1
    fewer = match_images(prints, refs, {0, 1, 2}, **DEFAULTS)[1]  # a chunk's image was dropped somewhere
    more = match_images(prints, refs, {0, 1, 2, 3, 4}, **DEFAULTS)[1]
    gaps = match_images(prints, refs, {0, 1, 2, 9}, **DEFAULTS)[1]  # as many, but not 0..N-1
    for m in (fewer, more, gaps):
        assert (m.page, m.method) == (None, "none") and "index alone is not allowed" in m.reason
    assert index_allowed(prints, [0, 1, 1, 2, 3])  # distinct values count, not chunks


def test_index_alone_must_agree_with_the_chunks_image_size():
    prints = [fp(0, size=(200, 100)), fp(1, size=(100, 200))]
    ok = match_images(prints, {1: Reference(1, None, (50, 100))}, {0, 1}, **DEFAULTS)[1]
    bad = match_images(prints, {1: Reference(1, None, (100, 50))}, {0, 1}, **DEFAULTS)[1]
    assert ok.page == 1
    assert bad.page is None and bad.proposed == (1, 0) and "shape" in bad.reason


def test_without_index_an_image_size_seen_once_is_proposed_not_written():
    prints = [fp(0, size=(10, 20)), fp(3, size=(30, 40)), fp(5, size=(10, 20))]
    m = match_images(prints, {7: Reference(7, None, (30, 40))}, {7}, **DEFAULTS)[7]
    assert m.page is None and m.proposed == (3, 0) and m.candidates == ((3, None),)


# ---------------------------------------------------------------- hash thresholds


@pytest.mark.parametrize(
    "d1,d2,confident",
    [
        (0, 64, True),
        (10, 18, True),  # at the limits: distance <= 10, margin >= 8
        (11, 30, False),  # too far
        (10, 17, False),
        (0, 7, False),  # margin too small
    ],
)
def test_hash_thresholds(d1, d2, confident):
    prints = [fp(4, phash=bits(d1)), fp(9, phash=bits(d2))]
    m = match_images(prints, {0: Reference(0, 0)}, {0, 1, 2}, **DEFAULTS)[0]  # 3 indexes, 2 images: no index
    assert (m.page == 4) is confident and (m.page is None) is (not confident)
    assert (m.distance, m.margin) == (d1, d2 - d1)
    assert m.candidates == ((4, d1), (9, d2))
    assert m.proposed == (4, 0)
    if not confident:
        assert "below the match threshold" in m.reason


def test_thresholds_come_from_the_caller():
    prints = [fp(4, phash=bits(12)), fp(9, phash=bits(30))]
    assert match_images(prints, {0: Reference(0, 0)}, {0}, **DEFAULTS)[0].page is None
    assert match_images(prints, {0: Reference(0, 0)}, {0}, max_distance=12, min_margin=8)[0].page == 4


def test_the_margin_is_to_the_next_page_not_the_next_image():
    prints = [fp(4, 0, phash=0), fp(4, 1, phash=bits(1)), fp(9, phash=bits(40))]  # two near images, one page
    m = match_images(prints, {0: Reference(0, 0)}, {5, 6, 7, 8}, **DEFAULTS)[0]
    assert (m.page, m.margin) == (4, 40)


def test_a_shape_mismatch_blocks_a_hash_match():
    prints = [fp(4, phash=0, size=(300, 100)), fp(9, phash=bits(40))]
    m = match_images(prints, {0: Reference(0, 0, (100, 300))}, {0, 1, 2}, **DEFAULTS)[0]
    assert m.page is None and "shapes differ" in m.reason


def test_the_same_picture_on_two_pages_needs_the_index():
    prints = [fp(2, phash=0), fp(7, phash=0), fp(8, phash=bits(30))]
    with_index = match_images(prints, {1: Reference(1, 0)}, {0, 1, 2}, **DEFAULTS)[1]
    # names x-2-0, x-7-0, x-8-0 sort as they are: index 1 is page 7, one of the two closest
    assert (with_index.page, with_index.method, with_index.margin) == (7, "index+hash", 0)
    without = match_images(prints, {1: Reference(1, 0)}, {0, 1}, **DEFAULTS)[1]
    assert without.page is None and without.margin == 0 and {p for p, _ in without.candidates[:2]} == {2, 7}


def test_the_index_does_not_override_a_far_image():
    prints = [fp(2, phash=bits(20)), fp(7, phash=bits(40))]
    m = match_images(prints, {0: Reference(0, 0)}, {0, 1}, **DEFAULTS)[0]
    assert m.page is None and m.index_page == 2 and "distance 20 > 10" in m.reason


def test_real_images_match_their_pages_and_a_stranger_goes_to_review():
    pages = [[picture(p)] for p in range(12)]
    prints = pdfpages.fingerprints(make_pdf(pages), "x")
    refs = {i: pdfpages.reference_of(png(pages[p][0]), i, f"k{i}") for i, p in ((2, 10), (4, 2), (11, 9))}
    refs[5] = pdfpages.reference_of(png(picture(999)), 5, "stranger")
    got = match_images(prints, refs, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, **DEFAULTS)  # 11 indexes, 12 images
    assert (got[2].page, got[4].page, got[11].page) == (10, 2, 9)
    assert all(got[i].method == "hash" and got[i].distance == 0 for i in (2, 4, 11))
    assert got[5].page is None and got[5].distance > 10
    evidence = got[5].evidence()
    assert evidence["candidate_pages"] and {"distance", "margin", "proposed", "reason"} <= set(evidence)


def test_reference_of_an_undecodable_image_is_none():
    assert pdfpages.reference_of(b"not an image", 0, "k") is None


# ---------------------------------------------------------------- journal pseudo-keys


def test_pdf_image_refs_round_trip_and_never_look_like_bucket_keys():
    ref = pdf_image_ref("ds/My #p1-2 file.pdf", 10, 3)
    assert ref == "pdf:ds/My #p1-2 file.pdf#p10-3"
    assert parse_pdf_image_ref(ref) == ("ds/My #p1-2 file.pdf", 10, 3)
    assert is_pdf_image_ref(ref) and not is_pdf_image_ref("ds/doc/images/3_1.png")
    assert parse_pdf_image_ref("ds/doc/images/3_1.png") is None


# ---------------------------------------------------------------- the source PDF, streamed


def test_a_200_mb_source_streams_to_a_file_in_bounded_memory(tmp_path):
    import tracemalloc

    from repage.stores.objects import ObjectStore

    bucket = tmp_path / "bucket"
    (bucket / "ds").mkdir(parents=True)
    size = 200 * 1024 * 1024
    with open(bucket / "ds" / "big.pdf", "wb") as f:
        f.truncate(size)  # sparse: 200 MB to read, nothing much to write
    store = ObjectStore.from_url(f"file://{bucket}")
    tracemalloc.start()
    try:
        with open(tmp_path / "copy.pdf", "wb") as out:
            written = store.download("ds/big.pdf", out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written == size == (tmp_path / "copy.pdf").stat().st_size
    assert peak < 32 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB while streaming {size / 1e6:.0f} MB"
    with pytest.raises(BadInput, match="over the limit"):
        store.download("ds/big.pdf", io.BytesIO(), max_bytes=size - 1)
    assert store.request_counts()["B"] == 2

"""The bad-input corpus of the reliability suite (docs/design.md §11, §13): one FLTR collection and
one moto bucket holding well-formed control documents next to documents built to break things.

Every document is a `Case`: its rows (primary key left to Milvus), its objects, and what a run
must do with it: `migrated` (the exact pages and keys it ends with), or a recorded outcome
(`failed` naming the document and the culprit, `unrecoverable` / `review` / `skipped` with a
reason), in which case its rows must stay exactly as they were.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

from PIL import Image

from repage.domain.keys import canonical_image_key, docling_image_key, legacy_image_key, legacy_image_name
from tests.unit.test_bounds import bomb_pdf
from tests.unit.test_pdfpages import encrypted_pdf, make_pdf, picture, raw_pdf

DIM = 8
DS = "5a1d3c9e-7f2b-4e61-9a0c-2b8d4f6e1a37"


@dataclass
class Case:
    name: str
    document_id: str
    filename: str
    expect: str  # migrated | failed | unrecoverable | review | skipped
    words: tuple[str, ...] = ()  # must appear in last_error / reason (besides the document id)
    dataset_id: str = DS
    rows: list[dict] = field(default_factory=list)
    objects: dict[str, bytes] = field(default_factory=dict)
    final: dict[int, tuple[int, str | None]] = field(default_factory=dict)  # chunk_index -> (page, key)
    after_scan: str | None = None  # "delete-chunks" | "delete-images": done between scan and run

    def row(self, kind: str, page: int = 0, **extra) -> dict:
        rng = random.Random(f"{self.document_id}-{len(self.rows)}")
        row = dict(
            chunk_id=f"{self.document_id}_{len(self.rows)}",
            text=f"{kind} chunk of {self.filename}",
            dataset_id=self.dataset_id,
            document_id=self.document_id,
            filename=self.filename,
            chunk_index=len(self.rows),
            document_type="pdf",
            title=self.filename[:100],
            chunk_type=kind,
            page=page,
            image_index=None,
            ocr_confidence=None,
            image_r2_key=None,
            image_size=None,
            vector=[rng.uniform(-1, 1) for _ in range(DIM)],
        )
        row.update(extra)
        self.rows.append(row)
        return row

    def legacy(
        self,
        index: int,
        page: int,
        basename: str = "scan.pdf",
        *,
        present: bool = True,
        on_chunk: bool = True,
        kind: str = "image",
    ) -> dict:
        """An image chunk with a legacy key telling `page`; migrated to the canonical key."""
        key = legacy_image_key(self.dataset_id, self.document_id, index, legacy_image_name(basename, page, 0, "png"))
        if present:
            self.objects[key] = png_bytes(picture(hash((self.document_id, index)) % 10_000, 40, 30))
        row = self.row(
            kind,
            image_index=index,
            image_size="40x30",
            image_r2_key=key if on_chunk else "",
            ocr_confidence=0.9 if kind == "ocr" else None,
        )
        canonical = canonical_image_key(self.dataset_id, self.document_id, page, index, "png") if present else key
        self.final[row["chunk_index"]] = (page, canonical)
        return row


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def zero_page_pdf() -> bytes:
    """A well-formed PDF whose page tree is empty."""
    return raw_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"])


def docling_case(
    name: str,
    doc: str,
    source: bytes | None,
    expect: str,
    words: tuple[str, ...] = (),
    images: dict[int, bytes] | None = None,
) -> Case:
    """A pdf-path document: Docling keys (no page) in the bucket, and `source` as its PDF."""
    case = Case(name, doc, f"{name}.pdf", expect, words)
    if source is not None:
        case.objects[f"{DS}/{case.filename}"] = source
    for index, data in (images or {0: png_bytes(picture(7, 40, 30))}).items():
        key = docling_image_key(DS, doc, index)
        case.objects[key] = data
        case.row("image", image_index=index, image_size="40x30", image_r2_key=key)
    return case


def build_corpus() -> list[Case]:
    cases: list[Case] = []

    # ---- control documents: well formed, keys path
    for n in range(4):
        c = Case(f"good-{n}", f"good-{n}-4f1b2c3d", "Field manual - rev_3.pdf", "migrated")
        c.row("text", page=0)
        for i, page in enumerate((1, 10, 2 + n)):
            c.legacy(i, page, "Field manual - rev_3.pdf", kind="image" if i % 2 == 0 else "ocr")
        c.row("text", page=4)
        cases.append(c)

    # ---- chunks with missing fields or values of the wrong kind
    c = Case("missing-fields", "missing-fields-77a1", "lost.pdf", "unrecoverable", ("source",))
    c.row("image")  # no key, no index, no size
    c.row("ocr", ocr_confidence=0.8, image_r2_key="")
    cases.append(c)

    c = Case("empty-dataset", "empty-dataset-19c2", "x.pdf", "failed", ("dataset_id",), dataset_id="")
    c.row("image", image_index=0, image_r2_key="/empty-dataset-19c2/images/0_x.pdf-3-0.png")
    cases.append(c)

    c = Case("empty-dataset-docling", "empty-dataset-docling-5e", "y.pdf", "failed", ("dataset_id",), dataset_id="")
    c.row("image", image_index=0, image_r2_key="/empty-dataset-docling-5e/images/0_docling_image.png")
    cases.append(c)

    # an absurd image_index and image_size on the chunk: the key's own index and page are used
    c = Case("index-out-of-range", "index-range-0b7d", "big.pdf", "migrated")
    key = legacy_image_key(DS, c.document_id, 0, legacy_image_name("big.pdf", 3, 0, "png"))
    c.objects[key] = png_bytes(picture(3, 40, 30))
    c.row("image", image_index=2**40, image_r2_key=key, image_size="garbage")
    c.final = {0: (3, canonical_image_key(DS, c.document_id, 3, 0, "png"))}
    cases.append(c)

    c = Case("odd-values", "odd-values-2c4e", "odd.pdf", "skipped")
    c.row("IMAGE", image_index=0, image_r2_key="nonsense")  # not an affected chunk type
    c.row("text", page=-1, ocr_confidence=float("nan"))  # not page 0
    cases.append(c)

    # ---- keys: '..', unicode, 1,024 bytes, '%'
    c = Case("dotdot-key", "dotdot-key-6a0f", "dd.pdf", "failed", ("..",))
    c.row("image", image_index=0, image_r2_key=f"{DS}/../../{c.document_id}/images/0_dd.pdf-3-0.png")
    cases.append(c)

    c = Case("dotdot-document-id", "../../etc", "passwd.pdf", "failed", ("document_id",))
    c.row("image", image_index=0, image_r2_key=f"{DS}/../../etc/images/0_passwd.pdf-3-0.png")
    cases.append(c)

    c = Case("unicode", "unicode-Δοκ-文件-📄", "Документ é 📄 report.pdf", "migrated")
    c.legacy(0, 5, "Документ é 📄 report.pdf")
    c.legacy(1, 12, "Документ é 📄 report.pdf", kind="ocr")
    cases.append(c)

    c = Case("long-key", "long-key-3d9a", "long.pdf", "migrated")
    head = f"{DS}/{c.document_id}/images/0_"
    tail = "-7-0.png"
    basename = "l" * (1024 - len(head.encode()) - len(tail))
    c.legacy(0, 7, basename, on_chunk=False)  # the chunk lost its key: found by listing
    assert max(len(k.encode()) for k in c.objects) == 1024
    cases.append(c)

    c = Case("percent", "percent-8b2f", "100%25 done% v2.pdf", "migrated")
    c.legacy(0, 3, "100%25 done% v2.pdf")
    c.legacy(1, 0, "100% a%2Fb.pdf")  # a true page 0; '%2F' must stay three characters
    cases.append(c)

    # ---- objects that claim to be images and are not (the keys path moves bytes, never decodes them)
    c = Case("not-an-image", "not-an-image-4c1e", "fake.pdf", "migrated")
    row = c.legacy(0, 6, "fake.pdf")
    c.objects[row["image_r2_key"]] = b"<html>this is no PNG</html>"
    c.legacy(1, 2, "fake.pdf")
    c.objects[c.rows[-1]["image_r2_key"]] = b""  # zero bytes
    cases.append(c)

    # ---- source PDFs on the pdf path: encrypted, corrupt, zero-byte, zero-page; an image that is no image
    cases.append(docling_case("encrypted-pdf", "encrypted-pdf-1f", encrypted_pdf(), "failed", ("encrypted",)))
    cases.append(
        docling_case(
            "corrupt-pdf", "corrupt-pdf-2e", b"%PDF-1.4\n" + random.Random(5).randbytes(900), "failed", ("corrupt",)
        )
    )
    cases.append(docling_case("zero-byte-pdf", "zero-byte-pdf-3d", b"", "failed", ("corrupt",)))
    cases.append(docling_case("zero-page-pdf", "zero-page-pdf-4c", zero_page_pdf(), "failed", ("no pages",)))
    # a 60000x60000 image (~450 KB compressed, 3.6 Gpx decoded): refused before PDFium decodes it (§6.6)
    cases.append(docling_case("pixel-bomb-pdf", "pixel-bomb-pdf-5d", bomb_pdf(), "failed", ("60,000x60,000 pixels",)))
    # the bucket's image 0 cannot be decoded: nothing to compare, so the index alone decides (docs/design.md §2.2:
    # the PDF has as many images as the document has indexes); image 1 matches by its hash
    pdf = make_pdf([[], [picture(11, 80, 60)], [], [picture(12, 60, 80)]])
    c = docling_case(
        "docling-not-an-image",
        "docling-fake-5b",
        pdf,
        "migrated",
        images={0: b"GIF89a but not really", 1: png_bytes(picture(12, 60, 80))},
    )
    c.final = {
        0: (1, canonical_image_key(DS, c.document_id, 1, 0, "png")),
        1: (3, canonical_image_key(DS, c.document_id, 3, 1, "png")),
    }
    cases.append(c)

    # ---- recovered pages beyond the PDF's page count
    c = docling_case(
        "page-beyond-pdf",
        "page-beyond-6a",
        make_pdf([[picture(21, 80, 60)], [], []]),
        "failed",
        ("page 57", "3 pages"),
        images={0: png_bytes(picture(21, 80, 60))},
    )
    c.legacy(1, 57, "page-beyond-pdf.pdf")
    cases.append(c)

    # ---- documents deleted mid-run (between the scan and the run)
    c = Case("deleted-chunks", "deleted-chunks-7e", "gone.pdf", "migrated")  # nothing left to fix
    c.legacy(0, 4, "gone.pdf")
    c.after_scan, c.final = "delete-chunks", {}
    cases.append(c)
    c = Case("deleted-images", "deleted-images-8f", "gone2.pdf", "migrated")  # page fixed, key kept
    c.legacy(0, 4, "gone2.pdf")
    c.after_scan = "delete-images"
    c.final = {0: (4, c.rows[0]["image_r2_key"])}
    cases.append(c)

    # ---- document ids built to break a filter expression or a SQL statement
    for n, doc in enumerate(
        ['q"uote-0', 'inj" || true || "x', 'bs\\" || true || \\"y', "'; DROP TABLE documents; --", '"" ) or (1 == 1']
    ):
        c = Case(f"injection-{n}", doc, "inj.pdf", "migrated")
        c.legacy(0, 2 + n, "inj.pdf")
        cases.append(c)
    # a control character cannot go into a filter (nor into an object key): refused, named
    c = Case("control-character-id", 'tab\tand "" ) or (1 == 1', "inj.pdf", "failed", ("control character",))
    # its legacy key by hand: the key builders refuse such an id (check_document_id, §6.6)
    c.row("image", image_index=0, image_size="40x30", image_r2_key=f"{DS}/{c.document_id}/images/0_inj.pdf-9-0.png")
    c.final = {}
    cases.append(c)
    return cases

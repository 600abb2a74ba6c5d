"""Bounded input on the reprocess path (docs/design.md §6.6), through the run: a source image that
would decode to 3.6 Gpx and a PDF holding a 60000x60000 image each fail alone, in one line naming
their document, with their rows, bucket objects and checkpoints as they were; the run's other
document is reprocessed. Milvus Lite (in process), a folder bucket, a SQLite ledger and tesseract."""

from __future__ import annotations

import shutil

import pytest

from repage.domain.states import RepairPath, State
from repage.migration.runner import RunLimits, Runner, Selection
from repage.migration.work import RunOptions
from repage.reprocess.backup import backup_key
from repage.stores.throttle import FakeClock
from tests.integration.test_reprocess_local import DS, add_document, render
from tests.integration.test_reprocess_local import pdf_bytes as pdf_bytes  # noqa: F401 (fixture)
from tests.integration.test_reprocess_local import stores as stores  # noqa: F401 (fixture)
from tests.unit.test_bounds import bomb_pdf, bomb_png

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tesseract") is None, reason="needs Debian's tesseract-ocr"),
]


def test_bombs_fail_alone_and_the_rest_of_the_run_completes(stores, pdf_bytes):  # noqa: F811
    add_document(stores, "doc-png-bomb", "bomb.png", bomb_png(), old_chunks=2)
    add_document(stores, "doc-pdf-bomb", "bomb.pdf", bomb_pdf(), old_chunks=2)
    add_document(stores, "doc-ok", "scan page 1.png", render(pdf_bytes, 0), old_chunks=2)
    before = {d: stores.vectors.fetch_documents([d]) for d in ("doc-png-bomb", "doc-pdf-bomb")}
    keys_before = sorted(info.key for page in stores.objects.list("") for info in page)

    selection = Selection(paths=frozenset({RepairPath.REPROCESS}), allow_reprocess=True)
    summary = Runner(stores, RunOptions(), RunLimits(), selection, clock=FakeClock()).run()

    assert (summary.migrated, summary.failed) == (1, 2), summary
    assert stores.ledger.get("doc-ok").state == State.MIGRATED
    for doc, words in (("doc-png-bomb", "bomb.png: the source image is"), ("doc-pdf-bomb", "60,000x60,000 pixels")):
        record = stores.ledger.get(doc)
        assert record.state == State.FAILED and doc in record.last_error and words in record.last_error
        assert "\n" not in record.last_error
        after = stores.vectors.fetch_documents([doc])
        assert {r["chunk_id"]: stores.vectors.row_checksum(r) for r in after} == {
            r["chunk_id"]: stores.vectors.row_checksum(r) for r in before[doc]
        }
        assert not stores.objects.exists(backup_key(DS, doc))
        assert stores.objects.exists(f"{DS}/{doc}/checkpoints/parsed.json.gz")  # nothing cleaned up
    keys_after = sorted(info.key for page in stores.objects.list("") for info in page)
    assert [k for k in keys_after if k not in keys_before and "/doc-ok/" not in k] == []

"""Acceptance: a reprocess result is checked before `migrated`, and an HTTP reprocess rolls back exactly
(docs/design.md §2.4).

The app is a stand-in admin API over real HTTP (an http.server on 127.0.0.1 in a thread). When
asked for a document's status it first rewrites that document's rows in Milvus the way its
script says (as the app's pipeline would: old rows deleted, new ones inserted), then answers
`ready`. Milvus Lite (in process), a memory bucket holding the source PDFs and a SQLite ledger
are real; the run's clock is a FakeClock (no wall-time waits).
"""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pypdfium2 as pdfium
import pytest
from rich.console import Console

from repage.cli.render import render_review
from repage.config import load_settings
from repage.domain.records import ScanRecord
from repage.domain.states import RepairPath, State
from repage.errors import ConfigError
from repage.migration import review
from repage.migration.rollback import rollback_documents
from repage.migration.runner import RunLimits, Runner, Selection
from repage.migration.work import RunOptions
from repage.reprocess.backup import backup_key
from repage.stores.ledger import Ledger
from repage.stores.milvus import MilvusVectors
from repage.stores.objects import ObjectStore
from repage.stores.open import Stores
from repage.stores.throttle import FakeClock
from tests.fixtures.milvus import SMALL_DIM, insert_sample, unique_name

TOKEN = "checks-admin-token"
DS = "ds1"
Rewrite = Callable[[list[dict]], list[dict]]


class App:
    """The app's admin API: on the first status request of a document, its rewrite runs, then `ready`."""

    def __init__(self, vectors: MilvusVectors):
        self.vectors, self.scripts, self.done = vectors, {}, set()
        self._lock = threading.Lock()
        app = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                app.send(self, 202, {"status": "processing"})

            def do_GET(self):
                m = re.fullmatch(r"/api/v1/admin/documents/([^/]+)", self.path)
                app.send(self, 200, app.status(m.group(1)) if m else {"detail": "no route"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def status(self, doc: str) -> dict:
        with self._lock:
            if doc not in self.done:
                self.done.add(doc)
                rewrite_rows(self.vectors, doc, self.scripts[doc])
        return {"status": "ready", "cost_dollars": 0.3}

    @staticmethod
    def send(handler, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def rewrite_rows(vectors: MilvusVectors, doc: str, script: Rewrite) -> None:
    """What the app's pipeline does: the document's rows deleted, the script's rows inserted."""
    info = vectors.info()
    old = vectors.fetch_documents([doc], with_vectors=True)
    new = [{k: v for k, v in r.items() if not (info.auto_id and k == info.pk_field)} for r in script(old)]
    vectors.delete_by_pks([r[info.pk_field] for r in old])
    vectors.insert(new)


def is_image(row: dict) -> bool:
    return row["chunk_type"] in ("ocr", "image") or (row.get("ocr_confidence") or 0.0) > 0.0


def renewed(row: dict, page: int, key: str | None = None) -> dict:
    """A chunk as a new pipeline run writes it: new text and vector, the given page and key."""
    rng = np.random.default_rng(abs(hash(row["chunk_id"])) % 2**32)
    out = dict(row, text=f"reprocessed {row['text']}", page=page, vector=rng.random(SMALL_DIM).tolist())
    if is_image(row):
        out["image_r2_key"] = key if key is not None else row.get("image_r2_key")
    return out


def canonical(doc: str, page: int, index: int) -> str:
    return f"{DS}/{doc}/images/{page}_{index}.png"


def stale_checkpoint(old: list[dict]) -> list[dict]:
    """Resumed from a stale checkpoint: every chunk carries page 0 forward."""
    return [renewed(r, 0) for r in old]


def right_pages(old: list[dict]) -> list[dict]:
    """A good result: image chunks on pages 1 and 2 with canonical keys, and one chunk more."""
    rows = []
    for r in old:
        page = 1 + r["chunk_index"] % 2
        rows.append(renewed(r, page, canonical(r["document_id"], page, r["chunk_index"])) if is_image(r) else r)
    extra = dict(renewed(old[0], 2), chunk_id=f"{old[0]['document_id']}_99", chunk_index=99)
    return rows + [extra]


def key_contradicts_page(old: list[dict]) -> list[dict]:
    rows = right_pages(old)
    first = next(r for r in rows if is_image(r))
    first["image_r2_key"] = canonical(first["document_id"], first["page"] + 1, first["chunk_index"])
    return rows


def pdf(pages: int) -> bytes:
    document = pdfium.PdfDocument.new()
    for _ in range(pages):
        document.new_page(200, 200)
    buf = io.BytesIO()
    document.save(buf)
    document.close()
    return buf.getvalue()


@pytest.fixture(params=["chunk_id", "auto"])
def stores(request, milvus_lite_uri, tmp_path):
    name = unique_name("checks")
    vectors = MilvusVectors.create_collection(milvus_lite_uri, name, pk=request.param, dim=SMALL_DIM, dynamic=True)
    app = App(MilvusVectors(milvus_lite_uri, name))
    settings = load_settings(
        {},
        app_fallbacks=False,
        flags={
            "milvus_uri": milvus_lite_uri,
            "collection": name,
            "store_url": "memory://",
            "ledger_url": f"sqlite:///{tmp_path}/l.db",
            "reprocess_url": app.url,
            "reprocess_token": TOKEN,
        },
    )
    ledger, objects = Ledger(settings.ledger_url), ObjectStore.from_url("memory://")
    stores = Stores(settings, vectors, objects, ledger, _opened=[])
    stores.app = app
    yield stores
    app.close()
    app.vectors.close()
    vectors.drop_collection()
    for store in (ledger, objects, vectors):
        store.close()


def add(stores, doc: str, script: Rewrite, *, pages: int = 3) -> list[dict]:
    """A document to reprocess: sample rows, a source PDF of `pages` pages, the app's script."""
    original = insert_sample(stores.vectors, [doc], dataset_id=DS)
    stores.objects.put(f"{DS}/{doc}.pdf", pdf(pages))
    stores.ledger.upsert_scan(
        [ScanRecord(doc, DS, f"{doc}.pdf", RepairPath.REPROCESS, State.PENDING, "review rejected", 4)]
    )
    stores.app.scripts[doc] = script
    return original


def run(stores, *docs: str):
    selection = Selection(paths=frozenset({RepairPath.REPROCESS}), document_ids=docs, allow_reprocess=True)
    return Runner(stores, RunOptions(), RunLimits(batch_size=8), selection, clock=FakeClock()).run()


def test_ready_with_pages_left_at_zero_goes_to_review_not_migrated(stores):
    add(stores, "stale", stale_checkpoint)
    add(stores, "good", right_pages)
    add(stores, "bad-key", key_contradicts_page)
    summary = run(stores, "stale", "good", "bad-key")

    stale = stores.ledger.get("stale")
    assert stale.state == State.REVIEW, stale.reason
    assert "all 5 image/OCR chunks are still at page 0" in stale.reason and "3 pages" in stale.reason
    assert stale.dollars == pytest.approx(0.3)  # the job ran: its cost is charged all the same
    listed = review.list_reviews(stores.ledger)["reviews"]
    assert [(r["document_id"], r["check"], r["source_pages"], len(r["chunks"])) for r in listed] == [
        ("stale", "reprocess-result", 3, 5)
    ]
    printed = io.StringIO()
    render_review(Console(file=printed, width=400))(review.list_reviews(stores.ledger))
    assert "stale  stale.pdf: document stale: the backend reports it ready" in printed.getvalue()
    with pytest.raises(ConfigError, match="reject it instead"):  # no page to accept
        review.accept(stores.ledger, "stale")
    assert review.reject(stores.ledger, "stale")["path"] == RepairPath.REPROCESS.value

    assert stores.ledger.get("good").state == State.MIGRATED  # right pages: no false alarm
    bad = stores.ledger.get("bad-key")
    assert bad.state == State.FAILED
    assert bad.last_error == (
        'document bad-key: reprocess result: chunk ["bad-key_1"]: '
        "page 2 but its image key 'ds1/bad-key/images/3_1.png' says page 3"
    )
    assert (summary.migrated, summary.failed) == (1, 1)


def test_a_single_page_source_at_page_zero_is_migrated(stores):
    add(stores, "one-page", stale_checkpoint, pages=1)
    run(stores, "one-page")
    assert stores.ledger.get("one-page").state == State.MIGRATED


def test_http_reprocess_then_rollback_restores_every_row_exactly(stores):
    original = add(stores, "redo", right_pages)
    run(stores, "redo")
    assert stores.ledger.get("redo").state == State.MIGRATED
    assert stores.objects.exists(backup_key(DS, "redo"))
    after = stores.vectors.fetch_documents(["redo"])
    assert len(after) == len(original) + 1 and any(r["text"].startswith("reprocessed") for r in after)

    report = rollback_documents(stores, ["redo"]).as_dict()
    assert report["failed"] == {} and report["passed"] == 1
    assert stores.ledger.get("redo").state == State.ROLLED_BACK
    info = stores.vectors.info()
    generated = {info.pk_field} if info.auto_id else set()  # Milvus assigns an auto_id key: not the app's
    back = {r["chunk_id"]: r for r in stores.vectors.fetch_documents(["redo"])}
    assert back.keys() == {r["chunk_id"] for r in original}  # the chunk the reprocess added is gone
    for row in original:
        got = back[row["chunk_id"]]
        assert set(got) == set(row)
        for field in set(row) - generated:
            if field == info.vector_field:
                assert np.array_equal(np.asarray(got[field], np.float32), np.asarray(row[field], np.float32))
            else:
                assert got[field] == row[field], field

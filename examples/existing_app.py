"""Adding repage's lazy repair to an existing FastAPI app's document endpoint.

The app keeps its own Milvus query. One call, `lazy.repair(chunks)`, corrects the page of
every affected chunk whose image key tells it (in the response, at once) and notes the
read; a background thread writes those notes to repage's ledger, and `repage worker`
(or `repage serve --with-worker`) migrates the stored chunks. The request itself does
no ledger or network I/O, and a ledger outage never fails it.

Optionally, repage's own endpoints (status, metrics, enqueue, pause/resume) mount under
/repage with the same bearer tokens as `repage serve`.

    REPAGE_LEDGER_URL=postgresql://... REPAGE_READ_TOKEN=... REPAGE_ADMIN_TOKEN=... \\
        python examples/existing_app.py
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pymilvus import MilvusClient

from repage.config import Settings, load_settings
from repage.domain.keys import compile_patterns
from repage.migration.lazy import LazyRepair, LedgerSink
from repage.stores.open import open_ledger, open_vectors
from repage.web.service import create_router, make_parts


def create_existing_app(settings: Settings) -> FastAPI:
    milvus = MilvusClient(settings.milvus_uri)  # the app's own client, as it has always been
    ledger = open_ledger(settings)
    lazy = LazyRepair(
        LedgerSink(ledger, settings.access_half_life_hours), patterns=compile_patterns(settings.key_patterns)
    )
    vectors = open_vectors(settings)  # only for the optional /repage endpoints below
    parts = make_parts(settings, vectors, ledger, lazy=lazy)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        lazy.start()  # the background flusher
        yield
        lazy.close()  # flush what is left
        vectors.close()
        ledger.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/documents/{document_id}/chunks")
    def document_chunks(document_id: str) -> dict:
        if not document_id.replace("-", "").isalnum():  # the app's own validation: ids go into a filter
            raise HTTPException(422, "bad document id")
        chunks = milvus.query(
            settings.collection,
            filter=f'document_id == "{document_id}"',
            output_fields=[
                "chunk_id",
                "document_id",
                "dataset_id",
                "chunk_index",
                "chunk_type",
                "page",
                "ocr_confidence",
                "image_r2_key",
                "text",
            ],
        )
        chunks = [dict(c) for c in chunks]
        lazy.repair(chunks, document_id=document_id)  # <- the one added line
        return {"document_id": document_id, "chunks": sorted(chunks, key=lambda c: c["chunk_index"])}

    app.include_router(create_router(parts), prefix="/repage")  # optional
    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(create_existing_app(load_settings(os.environ)), host="127.0.0.1", port=8000)

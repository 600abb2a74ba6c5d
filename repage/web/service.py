"""The HTTP service (`repage serve`): a FastAPI app factory and a router for existing apps.

Endpoints (docs/design.md §6.5): every one but /healthz needs `Authorization: Bearer`; read
endpoints take the read or the admin token, admin endpoints only the admin token.
Missing or wrong token: 401; the read token on an admin endpoint: 403. Tokens are
compared in constant time and never logged (uvicorn's access log prints the request
line, never headers; a test checks the captured logs).

  GET  /healthz                          no auth
  GET  /documents/{document_id}/chunks   read   chunks from Milvus, pages lazily repaired
  GET  /migration/status                 read   `repage status --json` figures (+ service)
  GET  /metrics                          read   Prometheus text
  POST /migration/documents/{id}         admin  enqueue now (a failed document is retried)
  POST /migration/pause | /resume        admin  every worker (any process) stops/starts between batches
  GET  /  (+ /login, /dashboard/...)     read   the dashboard: repage/dashboard.py (a session cookie
                                                 also authorizes read endpoints)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response

from repage import redact
from repage.config import Settings
from repage.errors import ConfigError, InvalidFilterValue, RepageError
from repage.web.auth import check_exposure, is_loopback
from repage.web.guard import LoopbackHostOnly
from repage.web.parts import ServiceParts, make_parts

log = logging.getLogger("repage.web.service")

# Conservative on purpose: FLTR ids are UUIDs; the id is also inlined into a Milvus filter.
DOCUMENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,255}$"
DocumentId = PathParam(pattern=DOCUMENT_ID_PATTERN, description="The document's id (as in Milvus).")
# --------------------------------------------------------------------------- the router


def create_router(parts: ServiceParts) -> APIRouter:
    """The endpoints, to mount in any FastAPI app (`app.include_router(router, prefix=...)`)."""
    router = APIRouter()
    read, admin = Depends(parts.auth.read), Depends(parts.auth.admin)

    @router.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @router.get("/documents/{document_id}/chunks", dependencies=[read])
    def chunks(document_id: str = DocumentId) -> Response:
        return _read_chunks(parts, document_id)

    @router.get("/migration/status", dependencies=[read])
    def status() -> dict:
        return _guard(lambda: _status(parts))

    @router.get("/metrics", dependencies=[read])
    def metrics() -> Response:
        return Response(parts.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.post("/migration/documents/{document_id}", dependencies=[admin], status_code=202)
    def enqueue(document_id: str = DocumentId) -> dict:
        outcome = _guard(lambda: parts.ledger.enqueue([document_id], retry_failed=True))
        return {"document_id": document_id, "outcome": outcome[document_id]}

    @router.post("/migration/pause", dependencies=[admin])
    def pause() -> dict:
        return _set_paused(parts, True)

    @router.post("/migration/resume", dependencies=[admin])
    def resume() -> dict:
        return _set_paused(parts, False)

    return router


def _read_chunks(parts: ServiceParts, document_id: str) -> Response:
    started = time.perf_counter()
    try:
        rows = parts.vectors.fetch_documents([document_id], with_vectors=False)
    except InvalidFilterValue as exc:
        parts.metrics.observe_read(time.perf_counter() - started, "rejected")
        raise HTTPException(422, redact.active()(exc)) from None
    except RepageError as exc:
        parts.metrics.observe_read(time.perf_counter() - started, "error")
        raise HTTPException(503, f"Milvus: {redact.active()(exc)}") from None
    parts.metrics.observe_read(time.perf_counter() - started, "ok" if rows else "not_found")
    if not rows:
        raise HTTPException(404, f"document {document_id} has no chunks")
    rows.sort(key=lambda r: (r.get("chunk_index") is None, r.get("chunk_index") or 0))
    corrected = parts.lazy.repair(rows, document_id=document_id)
    body = {"document_id": document_id, "chunks": rows, "pages_corrected": corrected}
    return Response(json.dumps(body, default=_json_default), media_type="application/json")


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars from the Milvus client
    return item() if callable(item) else str(value)


def _status(parts: ServiceParts) -> dict:
    from repage.migration.status import migration_status
    from repage.migration.worker import is_paused

    report = migration_status(parts.ledger, parts.settings.prices)
    report["service"] = {
        "paused": is_paused(parts.ledger),
        "lazy": parts.lazy.stats.as_dict(),
        "worker": parts.worker.state() if parts.worker is not None else None,
    }
    return report


def _set_paused(parts: ServiceParts, paused: bool) -> dict:
    from repage.migration.worker import set_paused

    _guard(lambda: set_paused(parts.ledger, paused))
    return {"paused": paused}


def _guard(action: Callable[[], Any]) -> Any:
    """Ledger calls of an endpoint: an unavailable store is a 503 with one line, not a 500."""
    try:
        return action()
    except RepageError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HTTPException(503, redact.active()(first)) from None


# --------------------------------------------------------------------------- the app


def create_app(
    settings: Settings,
    *,
    stores=None,
    clock=None,
    with_worker: bool = False,
    insecure_local: bool = False,
    worker_config=None,
    worker_limits=None,
    worker_options=None,
    flush_seconds: float = 1.0,
    secure_cookie: bool = False,
) -> FastAPI:
    """The service app. `stores` (vectors + ledger) are opened here unless given (then the
    caller closes them). `clock.now()` (epoch seconds) stamps accesses and drives the auth
    throttle and session expiry; tests inject one. `secure_cookie`: the session cookie is
    Secure even when the request is plain http (a TLS proxy in front, docs/design.md §6.6)."""
    # replies and log records go through the process's redactor (docs/design.md §6.1)
    redact.install(redact.Redactor.from_settings(settings))
    if not (settings.read_token and settings.admin_token) and not insecure_local:
        raise ConfigError("the service needs REPAGE_READ_TOKEN and REPAGE_ADMIN_TOKEN (or insecure_local)")
    owned = stores is None
    if owned:
        from repage.stores.open import open_stores

        stores = open_stores(settings, objects=False)
    parts = make_parts(
        settings,
        stores.vectors,
        stores.ledger,
        insecure_local=insecure_local,
        now=clock.now if clock is not None else time.time,
        flush_seconds=flush_seconds,
        secure_cookie=secure_cookie,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        redact.attach_log_filter()  # uvicorn's handlers exist by now
        parts.lazy.start()
        if with_worker:
            parts.worker = _start_worker(settings, stores, worker_config, worker_limits, worker_options)
        try:
            yield
        finally:  # blocking waits off the event loop
            if parts.worker is not None:
                await asyncio.to_thread(parts.worker.stop)  # finishes the current batch
            await asyncio.to_thread(parts.lazy.close)  # the last flush
            if owned:
                stores.close()

    app = FastAPI(title="repage", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(create_router(parts))
    from repage.web.dashboard import mount_dashboard

    mount_dashboard(app, parts)  # GET / and its assets (repage/dashboard.py)
    app.state.repage = parts
    app.add_exception_handler(ConfigError, _config_error)
    if parts.auth.open:  # no tokens: a rebound DNS name must not reach it (docs/design.md §6.6)
        app.add_middleware(LoopbackHostOnly)
    return app


async def _config_error(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": redact.active()(exc)}, status_code=400)


def _start_worker(settings: Settings, stores, config, limits, options=None):
    """The worker thread shares the service's Milvus client and ledger, opens its own bucket."""
    from repage.migration.runner import RunLimits
    from repage.migration.work import RunOptions
    from repage.migration.worker import WorkerConfig, WorkerThread

    limits = limits or RunLimits(batch_size=settings.batch_size, concurrency=settings.concurrency)
    config, options = config or WorkerConfig(), options or RunOptions()
    return WorkerThread(settings, config=config, limits=limits, options=options, shared=stores).start()


def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    insecure_local: bool = False,
    with_worker: bool = False,
    worker_config=None,
    worker_limits=None,
    worker_options=None,
    log_level: str = "info",
    secure_cookie: bool | None = None,
    forwarded_allow_ips: str | None = None,
) -> None:
    """`repage serve`: check the exposure rule and the tokens, then run uvicorn until SIGTERM/SIGINT.

    The session cookie is Secure unless bound to loopback (`secure_cookie` overrides);
    `forwarded_allow_ips` names the TLS proxy whose X-Forwarded-For/-Proto uvicorn trusts, so the
    auth throttle sees the real client (docs/design.md §6.6)."""
    import uvicorn

    check_exposure(settings, host, insecure_local)
    app = create_app(
        settings,
        with_worker=with_worker,
        insecure_local=insecure_local,
        worker_config=worker_config,
        worker_limits=worker_limits,
        worker_options=worker_options,
        secure_cookie=not is_loopback(host) if secure_cookie is None else secure_cookie,
    )
    proxy: dict[str, Any] = {"forwarded_allow_ips": forwarded_allow_ips} if forwarded_allow_ips else {}
    # uvicorn's access log line is `client - "METHOD /path HTTP/1.1" status`: no headers, so no token.
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=True, **proxy)

"""The dashboard: `GET /` on `repage serve` shows where the migration stands, at a glance.

Routes (create_app mounts them; an existing app calls `mount_dashboard(app, parts)`):

  GET  /                         read   the page: every number rendered on the server (works without
                                        JavaScript), then refreshed from the JSON endpoints every few
                                        seconds; without a session, a login form (401)
  POST /login                    -      form field `token` -> session cookie, 303 back to the page
  POST /logout                   -      clears the cookie
  GET  /dashboard/data           read   throughput and latency series, reviews, hot documents, budget
  POST /dashboard/pause|resume   admin  what the page's buttons post (303 back, or JSON for fetch)
  GET  /static/{digest}/{name}   read   the page's script and styles, vendored uPlot included

Sessions (repage/web/sessions.py, docs/design.md §6.6): the cookie (`repage_session`: HttpOnly,
SameSite=Strict, Secure behind TLS) holds a signed, expiring session id, never the token; it
grants what the token granted on read endpoints (`auth.BearerAuth.read`) until its 12 h run out
or logout revokes it. Failed logins count against the address like wrong bearer tokens (429
with Retry-After past the limit). Admin endpoints never take the cookie: the buttons post to
/dashboard/pause|resume, which take the admin bearer token, or the cookie plus a CSRF token
(HMAC of the session id, under the sessions' key) in the form field `csrf_token` or the
`X-CSRF-Token` header, from a same-origin page (`Sec-Fetch-Site` and `Origin` checked when the
browser sends them).

Caching: assets are served under their content digest with `immutable`; every other
response of the app (the page, its data, the JSON endpoints) gets `no-store` unless it set
its own Cache-Control. The page's JavaScript and styles come from the package (no build step).

HTML: Jinja2 templates in templates/, autoescaped; this module hands them plain data (numbers,
strings, rows) and the templates own the markup.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined

from repage import redact
from repage.domain.estimate import human_seconds, reprocess_dollars
from repage.domain.states import RepairPath, State
from repage.errors import RepageError
from repage.migration.status import RECENT_SECONDS, TODO
from repage.web.auth import read_form, same_origin
from repage.web.parts import ServiceParts
from repage.web.sessions import SESSION_COOKIE, Sessions

REFRESH_SECONDS = 5
WINDOWS = (300, 900, 3600, 6 * 3600, 24 * 3600)  # chart windows (s); "auto" is the smallest covering the run
BIN_SIZES = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
BINS = 60
LATENCY_RECENT_S = 60.0  # as the worker: the worst p95 any service published in the last minute
TABLE_ROWS = 10
MIGRATED, OBJECT_REQUESTS, READ_LATENCY = "migrated", "object-requests", "read-latency"

# Display order: done first, then work in flight, then what waits, then what needs a person.
STATE_ORDER = (
    "verified",
    "migrated",
    "skipped",
    "unrecoverable",
    "running",
    "pending",
    "deferred",
    "review",
    "failed",
    "rolled_back",
)
PATH_ORDER = ("keys", "pdf", "reprocess", "none")
DONE_STATES = (State.MIGRATED, State.VERIFIED, State.SKIPPED, State.UNRECOVERABLE)  # as `done` in repage status
UPLOT = "vendor/uPlot-1.6.32"  # vendored from npm, see static/vendor/README.md
ASSETS = ("dashboard.js", "dashboard.css", f"{UPLOT}.iife.min.js", f"{UPLOT}.min.css")
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
IMMUTABLE = "private, max-age=31536000, immutable"  # private: assets need a session like the rest
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",  # the pause button must not be clickjacked
    "Referrer-Policy": "same-origin",  # no-referrer would make the browser send `Origin: null` on our own forms
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------- assets


class Assets:
    """The page's static files, read from the package once, served under their digest."""

    def __init__(self) -> None:
        root = resources.files("repage.web") / "static"
        self.files = {name: (root / name).read_bytes() for name in ASSETS}
        self.digests = {name: hashlib.sha256(body).hexdigest()[:16] for name, body in self.files.items()}

    def url(self, name: str) -> str:
        return f"static/{self.digests[name]}/{name}"  # relative: the page is the router's root

    def response(self, digest: str, name: str) -> Response:
        if name not in self.files:
            raise HTTPException(404, "no such asset")
        current = digest == self.digests[name]  # an old page asking for an old digest gets today's file
        headers = {
            "Cache-Control": IMMUTABLE if current else "no-cache",
            "X-Content-Type-Options": "nosniff",
            "ETag": f'"{self.digests[name]}"',
        }
        suffix = name[name.rindex(".") :]
        return Response(self.files[name], media_type=CONTENT_TYPES[suffix], headers=headers)


# --------------------------------------------------------------------------- figures


def choose_window(first_event_at: float | None, now: float) -> int:
    """The smallest chart window that covers the migration's activity (at most a day)."""
    if first_event_at is None:
        return WINDOWS[1]
    span = now - first_event_at
    return next((w for w in WINDOWS if w >= span), WINDOWS[-1])


def bin_size(window: float) -> int:
    return next((b for b in BIN_SIZES if b * BINS >= window), BIN_SIZES[-1])


def series(events: dict[str, list], now: float, window: float) -> dict:
    """Per-bin rates over the window from ledger events; the current (partial) bin is left out.

    documents/s and chunks/s from `migrated` events (count, detail = chunks written), object
    requests/s from `object-requests` events, read p95 (ms, worst service) from `read-latency`.
    """
    size = bin_size(window)
    end = math.floor(now / size) * size  # start of the partial bin
    n = max(1, math.ceil(window / size))
    start = end - n * size
    docs, chunks, requests = [0.0] * n, [0.0] * n, [0.0] * n
    latency: list[float | None] = [None] * n

    def slot(at: float) -> int | None:
        i = math.floor((at - start) / size)
        return i if 0 <= i < n else None

    for e in events.get(MIGRATED, ()):
        if (i := slot(e.at)) is not None:
            docs[i] += e.count
            chunks[i] += _int(e.detail)
    for e in events.get(OBJECT_REQUESTS, ()):
        if (i := slot(e.at)) is not None:
            requests[i] += e.count
    for e in events.get(READ_LATENCY, ()):
        if (i := slot(e.at)) is not None and (p95 := _p95(e.detail)) is not None:
            latency[i] = max(latency[i] or 0.0, p95 * 1000.0)
    return {
        "window_seconds": window,
        "bin_seconds": size,
        "t": [start + i * size for i in range(n)],
        "documents_per_s": [v / size for v in docs],
        "chunks_per_s": [v / size for v in chunks],
        "object_requests_per_s": [v / size for v in requests],
        "read_p95_ms": latency,
    }


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _latency_report(detail: str | None) -> tuple[str, float] | None:
    """(source, p95 seconds) of a `read-latency` event (repage/worker.py publish_read_latency)."""
    try:
        data = json.loads(detail or "{}")
        return str(data.get("source")), float(data["p95"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _p95(detail: str | None) -> float | None:
    report = _latency_report(detail)
    return None if report is None else report[1]


def status_report(parts: ServiceParts) -> dict:
    """Exactly `repage status --json` (and /migration/status without its service part)."""
    from repage.migration.status import migration_status

    return migration_status(parts.ledger, parts.settings.prices)


def dashboard_data(parts: ServiceParts, window: float | None = None) -> dict:
    """Everything on the page that `repage status` does not have."""
    from repage.migration.status import pause_reason, top_documents

    ledger = parts.ledger
    now = ledger.db_now()
    since = now - (window or WINDOWS[-1])
    events = {kind: ledger.events(since=since, kinds=[kind]) for kind in (MIGRATED, OBJECT_REQUESTS, READ_LATENCY)}
    migrated = events[MIGRATED]
    if window is None:
        window = choose_window(migrated[0].at if migrated else None, now)
    reviews = [
        {"document_id": r.document_id, "dataset_id": r.dataset_id, "reason": r.reason, "since": r.updated_at}
        for r in ledger.documents(states={State.REVIEW}, limit=TABLE_ROWS)
    ]
    return {
        "now": now,
        "paused": (why := pause_reason(ledger)) is not None,
        "paused_because": why,  # who paused it and why: an admin, or a worker that stopped itself
        "worker": parts.worker.state() if parts.worker is not None else None,
        "budget_dollars": parts.settings.budget_dollars,
        "reprocess_dollars": reprocess_to_do(ledger, parts.settings.prices),
        "series": series(events, now, window),
        "last_migrated_at": migrated[-1].at if migrated else None,
        "read_latency": read_latency(parts, events[READ_LATENCY], now),
        "reviews": reviews,
        "hot": top_documents(ledger, parts.settings.access_half_life_hours, TABLE_ROWS, now=time.time())["documents"],
    }


def reprocess_to_do(ledger, prices) -> dict:
    """What the reprocess documents still to do would cost: a range, as the brief prices it (docs/design.md §8.1)."""
    documents, images = ledger.load_of(RepairPath.REPROCESS, TODO)
    low, high = reprocess_dollars(documents, images, prices)
    return {"documents": documents, "images": images, "low": low, "high": high}


def read_latency(parts: ServiceParts, events: list, now: float) -> dict:
    """The read path's Milvus p95: the worst any service published in the last minute (what the
    worker backs off on), else this process's own window."""
    latest: dict[str, float] = {}
    for event in events:
        if event.at >= now - LATENCY_RECENT_S and (report := _latency_report(event.detail)) is not None:
            latest[report[0]] = report[1]  # events come in time order: the last report per service wins
    local, samples = parts.metrics.window.p95()
    worker = parts.worker
    limit = worker.config.max_read_latency_s if worker is not None else None
    return {
        "p95_seconds": max(latest.values()) if latest else local,
        "services": len(latest),
        "local_p95_seconds": local,
        "local_samples": samples,
        "max_read_latency_s": limit,
    }


# --------------------------------------------------------------------------- formatting (as dashboard.js)


def fmt_count(n: int | float) -> str:
    return f"{int(n):,}"


def fmt_rate(x: float) -> str:
    return f"{x:.2f}/s"


def fmt_dollars(x: float | None) -> str:
    if x is None:
        return "none"
    return f"${x:,.2f}" if x >= 100 else f"${x:.4f}"


def fmt_eta(seconds: float | None, todo: int) -> str:
    if not todo:
        return "done"
    return "unknown" if seconds is None else human_seconds(seconds)


def fmt_ms(seconds: float | None) -> str:
    return "no reads" if seconds is None else f"{seconds * 1000:.1f} ms"


def fmt_pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "0.0%"


def fmt_time(epoch: float | None) -> str:
    return "never" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


# --------------------------------------------------------------------------- the page (templates/)


def data_value(value: Any) -> str:
    """A number's raw value for data-value (the tests and dashboard.js read it back as JSON)."""
    return "" if value is None else json.dumps(value)


def environment() -> Environment:
    """Jinja2 over the package's templates/. Autoescaped: document ids, errors and reasons come from
    the ledger and reach the page as text. StrictUndefined: a misspelt name fails the render rather
    than leaving a hole in the page."""
    env = Environment(
        loader=PackageLoader("repage.web", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        count=fmt_count,
        rate=fmt_rate,
        dollars=fmt_dollars,
        eta=fmt_eta,
        ms=fmt_ms,
        pct=fmt_pct,
        time=fmt_time,
        human=human_seconds,
        data_value=data_value,
    )
    env.policies["json.dumps_kwargs"] = {"separators": (",", ":")}  # |tojson: the initial data, compact
    return env


TEMPLATES = environment()


def ordered(keys: Iterable[str], order: Sequence[str]) -> list[str]:
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def progress_bars(status: dict[str, Any]) -> list[dict[str, Any]]:
    """One stacked bar for everything, one per path; segments by state (widths in %)."""
    rows = [("all documents", status["by_state"], status["documents"])]
    per_path: dict[str, dict[str, int]] = {}
    for row in status["by_state_and_path"]:
        per_path.setdefault(row["path"], {})[row["state"]] = row["documents"]
    rows += [(f"path {p}", per_path[p], sum(per_path[p].values())) for p in ordered(per_path, PATH_ORDER)]
    return [
        {
            "label": label,
            "total": total,
            "done": sum(counts.get(s.value, 0) for s in DONE_STATES),
            "segments": [
                {"state": s, "count": counts[s], "width": 100.0 * counts[s] / total}
                for s in ordered(counts, STATE_ORDER)
                if counts[s] and total
            ],
        }
        for label, counts, total in rows
    ]


def state_matrix(status: dict[str, Any], states: list[str]) -> dict[str, Any]:
    """The state x path counts, as `repage status` prints them: (path, count) per cell."""
    paths = ordered(status["by_path"], PATH_ORDER)
    cells = {(r["state"], r["path"]): r["documents"] for r in status["by_state_and_path"]}
    return {"paths": paths, "rows": [{"state": s, "cells": [(p, cells.get((s, p), 0)) for p in paths]} for s in states]}


def failure_rows(status: dict[str, Any]) -> list[list[str]]:
    return [[f["document_id"], f["state"], f["error"] or ""] for f in status["last_errors"]]


def review_rows(data: dict[str, Any]) -> list[list[str]]:
    return [[r["document_id"], r["dataset_id"], r["reason"], fmt_time(r["since"])] for r in data["reviews"]]


def hot_rows(data: dict[str, Any]) -> list[list[str]]:
    return [
        [
            h["document_id"],
            h["dataset_id"] or "",
            f"{h['accesses']:.2f}",
            h["state"] or "not scanned",
            "yes" if h["enqueued"] else "",
        ]
        for h in data["hot"]
    ]


def static_chart(t: list[float], lines: list[tuple[str, list[float | None], str]], unit: str) -> dict[str, Any]:
    """A static line chart (the page without JavaScript); each line scaled to the chart's maximum."""
    width, height, pad = 640, 140, 4
    peak = max([v for _, values, _ in lines for v in values if v is not None] + [0.0])
    scale = (height - 2 * pad) / peak if peak else 0.0
    step = (width - 2 * pad) / max(len(t) - 1, 1)

    def points(values: list[float | None]) -> str:
        return " ".join(
            f"{pad + i * step:.1f},{height - pad - (v or 0.0) * scale:.1f}"
            for i, v in enumerate(values)
            if v is not None
        )

    return {
        "width": width,
        "height": height,
        "pad": pad,
        "peak": peak,
        "unit": unit,
        "t": t,
        "lines": [{"name": name, "color": color, "points": points(values)} for name, values, color in lines],
    }


def static_charts(series_: dict[str, Any]) -> dict[str, Any]:
    """The colours are dashboard.js's, so the page keeps its look when uPlot takes over."""
    t = series_["t"]
    return {
        "throughput": static_chart(
            t,
            [
                ("documents/s", series_["documents_per_s"], "#2f7d32"),
                ("chunks/s", series_["chunks_per_s"], "#1f5fbf"),
                ("object requests/s", series_["object_requests_per_s"], "#b3541e"),
            ],
            "/s",
        ),
        "latency": static_chart(t, [("read p95", series_["read_p95_ms"], "#7b3fb0")], "ms"),
    }


def worker_text(data: dict[str, Any]) -> tuple[str, str]:
    """(css class, words) for the worker badge."""
    if data["paused"]:
        why = data.get("paused_because")
        return "paused", f"paused: {why}" if why and why not in ("admin", "dashboard") else "paused"
    worker = data["worker"]
    if worker is None:
        return "idle", "not paused"  # the worker runs elsewhere (repage worker), if at all
    if worker.get("error") or worker.get("alive") is False:
        return "failed", f"worker stopped: {worker.get('error') or 'not running'}"
    last = worker.get("last_cycle") or {}
    if last.get("backed_off"):
        return "backoff", f"backing off (read p95 {fmt_ms(last.get('read_latency_p95'))})"
    return "running", "running"


def spend(spent: float, projected: float, budget: float | None) -> dict[str, Any]:
    """The budget bar: widths in % of the largest of budget, projection and spend."""
    top = max(budget or 0.0, projected, spent) or 1.0
    return {
        "projected": 100.0 * projected / top,
        "spent": 100.0 * spent / top,
        "mark": None if budget is None else 100.0 * budget / top,
        "over": budget is not None and projected > budget,
    }


def render_page(
    parts: ServiceParts,
    assets: Assets,
    sessions: Sessions,
    request: Request,
    role: str,
    status: dict[str, Any],
    data: dict[str, Any],
) -> str:
    admin = role == "admin"
    badge_class, badge = worker_text(data)
    states = ordered(status["by_state"], STATE_ORDER)
    return TEMPLATES.get_template("dashboard.html").render(
        s=status,
        d=data,
        collection=parts.settings.collection,
        role=role,
        admin=admin,
        csrf=sessions.csrf_token(request) if admin else "",
        logout=not parts.auth.open,
        asset=assets.url,
        uplot=UPLOT,
        refresh_ms=REFRESH_SECONDS * 1000,
        recent_seconds=RECENT_SECONDS,
        badge_class=badge_class,
        badge=badge,
        spend=spend(status["dollars_spent"], status["dollars_projected"], data["budget_dollars"]),
        progress=progress_bars(status),
        states=states,
        matrix=state_matrix(status, states),
        charts=static_charts(data["series"]),
        failures=failure_rows(status),
        reviews=review_rows(data),
        hot=hot_rows(data),
    )


def render_login(error: str = "") -> str:
    return TEMPLATES.get_template("login.html").render(error=error)


# --------------------------------------------------------------------------- the router


def create_dashboard_router(parts: ServiceParts) -> APIRouter:
    router = APIRouter()
    assets, sessions, auth = Assets(), parts.auth.sessions, parts.auth
    read = Depends(auth.read)

    @router.get("/", response_class=HTMLResponse, name="dashboard")
    def page(request: Request, window: int | None = Query(None, ge=60, le=7 * 86400)) -> Response:
        role = auth.session_role(request)
        if role is None:
            response = login_page("")
            if SESSION_COOKIE in request.cookies:  # expired, revoked or from rotated tokens: drop it
                sessions.clear_cookie(response, request)
            return response
        status, data = _guard(lambda: (status_report(parts), dashboard_data(parts, window)))
        return HTMLResponse(render_page(parts, assets, sessions, request, role, status, data), headers=PAGE_HEADERS)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await read_form(request)  # bounded, before anything else (§6.6)
        if not same_origin(request):
            raise HTTPException(403, "cross-site request refused")
        token = form.get("token", "").strip()
        try:
            role = auth.checked_role(request, token, "login") if token else None
        except HTTPException as exc:  # 429 past the limit: the form again, saying so (§6.6)
            wait = (exc.headers or {}).get("Retry-After", "60")
            return login_page(f"Too many failed attempts: retry in {wait} s.", exc.status_code, exc.headers)
        if role is None:
            return login_page("That token is not valid here.")
        response = RedirectResponse(request.url_for("dashboard"), status_code=303)
        sessions.set_cookie(response, request, sessions.issue(role))
        return response

    @router.post("/logout")
    def logout(request: Request) -> Response:
        if (cookie := sessions.cookie(request)) is not None:
            sessions.revoke(cookie)
        response = RedirectResponse(request.url_for("dashboard"), status_code=303)
        sessions.clear_cookie(response, request)
        return response

    @router.get("/dashboard/data", dependencies=[read])
    def data(window: int | None = Query(None, ge=60, le=7 * 86400)) -> Response:
        return JSONResponse(_guard(lambda: dashboard_data(parts, window)), headers={"Cache-Control": "no-store"})

    async def set_paused(request: Request, paused: bool) -> Response:
        from repage.migration.worker import set_paused as write_pause

        auth.require_admin_action(request, await read_form(request))
        _guard(lambda: write_pause(parts.ledger, paused, who="dashboard"))
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"paused": paused}, headers={"Cache-Control": "no-store"})
        return RedirectResponse(request.url_for("dashboard"), status_code=303)

    @router.post("/dashboard/pause")
    async def pause(request: Request) -> Response:
        return await set_paused(request, True)

    @router.post("/dashboard/resume")
    async def resume(request: Request) -> Response:
        return await set_paused(request, False)

    @router.get("/static/{digest}/{name:path}", dependencies=[read])
    def static(digest: str, name: str) -> Response:
        return assets.response(digest, name)

    return router


def login_page(error: str, status: int = 401, headers: Mapping[str, str] | None = None) -> HTMLResponse:
    extra = headers or {"WWW-Authenticate": "Bearer"}
    return HTMLResponse(render_login(error), status_code=status, headers={**PAGE_HEADERS, **extra})


def _guard(action):
    try:
        return action()
    except RepageError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HTTPException(503, redact.active()(first)) from None


@dataclass
class NoStoreByDefault:
    """ASGI middleware: `Cache-Control: no-store` on every response that did not set its own."""

    app: Any

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_default(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_with_default)


def mount_dashboard(app: FastAPI, parts: ServiceParts) -> None:
    """The dashboard's routes on `app`, and no-store as the app's default for data."""
    app.include_router(create_dashboard_router(parts))
    app.add_middleware(NoStoreByDefault)

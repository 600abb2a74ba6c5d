"""The dashboard in-process (FastAPI TestClient, a real SQLite ledger): login cookie, what the
cookie may and may not do, CSRF on the buttons, cache headers, the server-rendered numbers,
escaping, and the throughput series. The real browser test is tests/integration/test_dashboard.py."""

from __future__ import annotations

import json
import re
from html import unescape
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from repage.config import load_settings
from repage.domain.access import Decayed
from repage.domain.records import Event, ScanRecord
from repage.domain.states import RepairPath, State
from repage.errors import ConfigError
from repage.migration.status import migration_status
from repage.migration.worker import is_paused
from repage.stores.ledger import Ledger
from repage.web import dashboard as dash
from repage.web.service import create_app
from repage.web.sessions import SESSION_COOKIE, Sessions
from tests.support.service_store import settings_for

READ, ADMIN = "read-tok/+=9c-4b7e2d1a0f9c8e3b6a5d", "admin-tok-5e11-9a3c7b0e2d4f1a8c6e5b"  # / + =: odd characters


def settings(tmp_path, **extra):
    return settings_for(
        str(tmp_path / "m.db"), "fltr_documents", "memory://", f"sqlite:///{tmp_path}/ledger.db", **extra
    )


def populate(ledger: Ledger) -> None:
    """Mid-migration: 2 migrated, 1 failed (with markup in its error), 1 review, 2 pending."""
    docs = ["a", "b", "c", "f", "r"]
    ledger.upsert_scan(
        [ScanRecord(d, "ds", f"{d}.pdf", RepairPath.KEYS, State.PENDING, "page 0", 2) for d in docs]
        + [ScanRecord("p", "ds", "p.pdf", RepairPath.PDF, State.PENDING, "source", 2)]
    )
    claims = {c.document_id: c for c in ledger.claim_batch("t", 10, 60, document_ids=["a", "b", "f", "r"])}
    for doc in ("a", "b"):
        ledger.transition(
            doc, State.MIGRATED, token=claims[doc].fencing_token, object_requests_a=3, object_requests_b=5
        )
    ledger.transition("f", State.FAILED, token=claims["f"].fencing_token, error="copy failed: <script>x</script>")
    ledger.save_review("r", claims["r"].fencing_token, json.dumps({"chunks": []}))
    ledger.transition(
        "r",
        State.REVIEW,
        token=claims["r"].fencing_token,
        path=RepairPath.PDF,
        reason="1 of 2 chunks below the threshold",
    )
    ledger.add_event("migrated", count=2, detail="4")
    ledger.add_event("object-requests", count=16, detail="6 10")
    ledger.record_accesses({"c": ("ds", Decayed(3.0, 1.7e9))}, 72 * 3600.0)


@pytest.fixture
def service(tmp_path):
    s = settings(tmp_path, read_token=READ, admin_token=ADMIN, budget_dollars=2.5)
    ledger = Ledger(s.ledger_url)
    populate(ledger)
    app = create_app(s, stores=SimpleNamespace(vectors=None, ledger=ledger), flush_seconds=0.05)
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        yield SimpleNamespace(client=client, ledger=ledger, settings=s)
    ledger.close()


def login(client, token: str):
    return client.post("/login", data={"token": token}, follow_redirects=False)


def fields(html: str) -> dict[str, tuple[str, str]]:
    pattern = r'<span data-field="([^"]+)" data-value="([^"]*)"[^>]*>([^<]*)</span>'
    return {f: (unescape(v), unescape(t)) for f, v, t in re.findall(pattern, html)}


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)[1]


# ---------------------------------------------------------------- login and the cookie


def test_without_a_session_the_page_is_a_login_form(service):
    reply = service.client.get("/")
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    assert 'name="token"' in reply.text and "data-field" not in reply.text
    assert reply.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]


def test_login_sets_an_httponly_strict_cookie_that_reads_like_the_token(service):
    client = service.client
    assert login(client, "wrong").status_code == 401 and SESSION_COOKIE not in client.cookies
    reply = login(client, READ)
    assert reply.status_code == 303 and reply.headers["location"] == "http://127.0.0.1:8080/"
    cookie = reply.headers["set-cookie"]
    assert all(flag in cookie for flag in ("HttpOnly", "SameSite=strict", "Path=/", "Max-Age=43200"))
    assert "Secure" not in cookie  # plain http on loopback; https gets Secure
    for url in ("/", "/migration/status", "/metrics", "/dashboard/data"):
        assert client.get(url).status_code == 200, url
    # admin endpoints never take the cookie (a browser sends it on its own: CSRF)
    assert client.post("/migration/pause").status_code == 401
    assert not is_paused(service.ledger)


def test_a_stale_cookie_means_log_in_again(service):
    service.client.cookies.set(SESSION_COOKIE, "rotated-away")
    assert service.client.get("/migration/status").status_code == 401
    reply = service.client.get("/")
    assert reply.status_code == 401 and 'name="token"' in reply.text
    assert SESSION_COOKIE in reply.headers["set-cookie"] and "Max-Age=0" in reply.headers["set-cookie"]


def test_logout_clears_the_cookie(service):
    login(service.client, READ)
    reply = service.client.post("/logout", follow_redirects=False)
    assert reply.status_code == 303 and "Max-Age=0" in reply.headers["set-cookie"]


def test_the_login_form_refuses_cross_site_posts(service):
    reply = service.client.post(
        "/login", data={"token": ADMIN}, headers={"Sec-Fetch-Site": "cross-site"}, follow_redirects=False
    )
    assert reply.status_code == 403 and "set-cookie" not in reply.headers


# ---------------------------------------------------------------- the buttons: admin + CSRF


def test_read_sessions_get_no_buttons_and_cannot_pause(service):
    login(service.client, READ)
    page = service.client.get("/").text
    assert "pause-button" not in page and 'name="csrf-token" content=""' in page
    forged = service.client.post("/dashboard/pause", data={"csrf_token": "0" * 64}, follow_redirects=False)
    assert forged.status_code == 403 and not is_paused(service.ledger)


@pytest.mark.parametrize(
    "headers,form",
    [
        ({}, {}),  # no CSRF token
        ({}, {"csrf_token": "f" * 64}),  # a wrong one
        ({"Sec-Fetch-Site": "cross-site"}, None),  # the right one, from another site
        ({"Sec-Fetch-Site": "same-site"}, None),  # a sibling subdomain is not us either
        ({"Origin": "https://evil.example"}, None),  # an older browser: Origin decides
        ({"Origin": "null"}, None),  # sandboxed frame / file: page
    ],
)
def test_admin_cookie_without_a_valid_same_origin_csrf_token_is_refused(service, headers, form):
    login(service.client, ADMIN)
    token = csrf_of(service.client.get("/").text)
    reply = service.client.post(
        "/dashboard/pause",
        data={"csrf_token": token} if form is None else form,
        headers=headers,
        follow_redirects=False,
    )
    assert reply.status_code == 403 and not is_paused(service.ledger)


def test_admin_cookie_with_csrf_pauses_and_resumes(service):
    client = service.client
    login(client, ADMIN)
    page = client.get("/").text
    assert 'id="pause-button"' in page and re.search(r'id="resume-form"\s*hidden', page)
    token = csrf_of(page)
    # a form post without JavaScript: 303 back to the page
    reply = client.post(
        "/dashboard/pause",
        data={"csrf_token": token},
        headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:8080"},
        follow_redirects=False,
    )
    assert reply.status_code == 303 and is_paused(service.ledger)
    assert service.ledger.events(kinds=["pause"])[-1].detail == "dashboard"
    assert re.search(r'id="pause-form"\s*hidden', client.get("/").text)
    # what dashboard.js sends: the header, JSON back
    reply = client.post("/dashboard/resume", headers={"X-CSRF-Token": token, "Accept": "application/json"})
    assert reply.json() == {"paused": False} and reply.headers["cache-control"] == "no-store"
    assert not is_paused(service.ledger)


def test_bearer_admin_needs_no_csrf_and_bearer_read_is_refused(service):
    c = service.client
    assert c.post("/dashboard/pause", headers={"Authorization": f"Bearer {READ}"}).status_code == 403
    assert c.post(
        "/dashboard/pause", headers={"Authorization": f"Bearer {ADMIN}", "Accept": "application/json"}
    ).json() == {"paused": True}
    assert c.post("/dashboard/pause").status_code == 401


def test_sessions_and_csrf_tokens_agree_across_processes_and_differ_per_session(tmp_path):
    s = settings(tmp_path, read_token=READ, admin_token=ADMIN)
    one, two = (Sessions(s.read_token, s.admin_token) for _ in range(2))
    session, other_session = one.issue("admin"), one.issue("admin")
    assert two.role_of(session) == "admin"  # another service process accepts it
    request = SimpleNamespace(cookies={SESSION_COOKIE: session})
    assert one.csrf_token(request) == two.csrf_token(request)  # two service processes, one key
    assert one.csrf_token(request) != one.csrf_token(SimpleNamespace(cookies={SESSION_COOKIE: other_session}))
    rotated = Sessions(s.read_token, settings(tmp_path, admin_token="y" * 40).admin_token)
    assert rotated.csrf_token(request) != one.csrf_token(request) and rotated.role_of(session) is None


# ---------------------------------------------------------------- assets and cache headers


def test_assets_are_immutable_under_their_digest_and_need_a_session(service):
    client = service.client
    login(client, READ)
    page = client.get("/").text
    urls = re.findall(r'(?:href|src)="(static/[^"]+)"', page)
    assert len(urls) == 4 and any("uPlot" in u for u in urls)
    for url in urls:
        reply = client.get(f"/{url}")
        assert reply.status_code == 200 and reply.headers["cache-control"] == dash.IMMUTABLE
        assert reply.headers["content-type"].startswith(("text/javascript", "text/css"))
        assert reply.headers["x-content-type-options"] == "nosniff"
    name = urls[0].split("/", 2)[2]
    assert client.get(f"/static/0000000000000000/{name}").headers["cache-control"] == "no-cache"
    assert client.get("/static/0000000000000000/../service.py").status_code == 404
    assert client.get("/static/x/dashboard.py").status_code == 404
    client.cookies.clear()
    assert client.get(f"/{urls[0]}").status_code == 401


def test_data_is_never_cached(service):
    h = {"Authorization": f"Bearer {READ}"}
    for url in ("/", "/dashboard/data", "/migration/status", "/metrics"):
        assert service.client.get(url, headers=h).headers["cache-control"] == "no-store", url


def test_package_data_lists_every_asset_and_template():
    import tomllib
    from fnmatch import fnmatch
    from importlib import resources
    from pathlib import Path

    with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["repage.web"]
    root = resources.files("repage.web")
    shipped = list(dash.ASSETS) + ["vendor/LICENSE.uPlot"]
    needed = [f"static/{a}" for a in shipped] + ["templates/dashboard.html", "templates/login.html"]
    for name in needed:
        assert root.joinpath(name).is_file(), name
        assert any(fnmatch(name, g) for g in globs), name


# ---------------------------------------------------------------- what the page shows


def test_the_page_without_javascript_shows_the_status_figures(service):
    reply = service.client.get("/", headers={"Authorization": f"Bearer {ADMIN}"})
    shown = fields(reply.text)
    status = migration_status(service.ledger, service.settings.prices)
    assert shown["status.documents"] == ("6", "6") and shown["status.done"] == ("2", "2")
    assert shown["status.by_state.failed"] == ("1", "1") and shown["status.by_state.review"] == ("1", "1")
    assert shown["status.by_path.pdf"] == ("2", "2")  # p pending and r in review
    assert shown["status.found_since_last_scan"] == ("0", "0")  # discovery's count (docs/design.md §5.9)
    assert shown["status.by_state_and_path.migrated.keys"] == ("2", "2")
    assert json.loads(shown["status.dollars_spent"][0]) == status["dollars_spent"]
    assert shown["status.dollars_spent"][1] == dash.fmt_dollars(status["dollars_spent"])
    assert shown["data.budget_dollars"] == ("2.5", "$2.5000")
    html = reply.text
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html  # escaped in the table
    initial = re.search(r'<script id="initial-data" type="application/json">(.*?)</script>', html, re.S)[1]
    assert "<" not in initial and json.loads(initial)["status"]["last_errors"][0]["error"].startswith("copy failed")
    assert "1 of 2 chunks below the threshold" in html and ">c</td>" in html  # review reason, hot document
    assert '<svg class="static-chart"' in html


MARKUP = "<script>alert(1)</script>\"'&"  # a tag, both quotes and an ampersand: all must arrive as text


def cells(html: str, table_id: str) -> list[str]:
    """The text of every <td> of one table (markup in a cell would break the match)."""
    table = re.search(rf'<table id="{table_id}" class="list">(.*?)</table>', html, re.S)[1]
    return [unescape(c) for c in re.findall(r"<td>([^<]*)</td>", table)]


def test_ledger_text_reaches_the_page_as_text(tmp_path):
    s = settings(tmp_path, read_token=READ, admin_token=ADMIN)
    ledger = Ledger(s.ledger_url)
    failed, review = f"f{MARKUP}", f"r{MARKUP}"
    ledger.upsert_scan(
        [ScanRecord(d, "ds", "d.pdf", RepairPath.KEYS, State.PENDING, "page 0", 2) for d in (failed, review)]
    )
    claims = {c.document_id: c for c in ledger.claim_batch("t", 10, 60, document_ids=[failed, review])}
    ledger.transition(failed, State.FAILED, token=claims[failed].fencing_token, error=f"copy failed: {MARKUP}")
    ledger.save_review(review, claims[review].fencing_token, json.dumps({"chunks": []}))
    ledger.transition(review, State.REVIEW, token=claims[review].fencing_token, reason=f"weak: {MARKUP}")
    ledger.record_accesses({failed: ("ds", Decayed(3.0, 1.7e9))}, 72 * 3600.0)
    app = create_app(s, stores=SimpleNamespace(vectors=None, ledger=ledger))
    try:
        with TestClient(app) as client:
            html = client.get("/", headers={"Authorization": f"Bearer {READ}"}).text
    finally:
        ledger.close()
    assert "<script>alert" not in html and html.count("<script") == 3  # the two assets and the initial data
    assert cells(html, "failures") == [failed, "failed", f"copy failed: {MARKUP}"]
    assert cells(html, "reviews")[:3] == [review, "ds", f"weak: {MARKUP}"]
    assert cells(html, "hot")[0] == failed
    initial = re.search(r'<script id="initial-data" type="application/json">(.*?)</script>', html, re.S)[1]
    assert not set("<>&'") & set(initial)  # no way out of the script block, yet the same JSON
    assert json.loads(initial)["status"]["last_errors"][0]["document_id"] == failed
    login_page = dash.render_login(MARKUP)
    assert "<script>alert" not in login_page and unescape(login_page).count(MARKUP) == 1


def test_data_endpoint(service):
    data = service.client.get("/dashboard/data?window=900", headers={"Authorization": f"Bearer {READ}"}).json()
    assert data["budget_dollars"] == 2.5 and data["paused"] is False and data["worker"] is None
    assert [r["document_id"] for r in data["reviews"]] == ["r"]
    assert [h["document_id"] for h in data["hot"]] == ["c"]
    s = data["series"]
    assert s["window_seconds"] == 900 and s["bin_seconds"] == 15 and len(s["t"]) == 60
    assert (
        service.client.get("/dashboard/data?window=5", headers={"Authorization": f"Bearer {READ}"}).status_code == 422
    )


def test_series_bins_rates_and_leaves_the_partial_bin_out():
    def ev(at, kind, count, detail=None):
        return Event(0, at, kind, None, count, detail)

    now = 1000.0 + 2.5  # bins of 5 s (window 300): the bin [1000, 1005) is partial, not shown
    events = {
        "migrated": [
            ev(990.0, "migrated", 10, "40"),
            ev(994.9, "migrated", 5, "5"),
            ev(1001.0, "migrated", 99, "99"),
            ev(600.0, "migrated", 7, "7"),
        ],
        "object-requests": [ev(996.0, "object-requests", 50, "20 30")],
        "read-latency": [
            ev(991.0, "read-latency", 3, json.dumps({"p95": 0.02, "source": "a"})),
            ev(992.0, "read-latency", 3, json.dumps({"p95": 0.05, "source": "b"})),
            ev(993.0, "read-latency", 3, "not json"),
        ],
    }
    s = dash.series(events, now, 300)
    assert s["bin_seconds"] == 5 and len(s["t"]) == 60 and s["t"][-1] == 995
    by_t = dict(zip(s["t"], zip(s["documents_per_s"], s["chunks_per_s"], s["object_requests_per_s"], s["read_p95_ms"])))
    assert by_t[990] == (3.0, 9.0, 0.0, 50.0)  # 15 docs, 45 chunks in 5 s; worst p95 of the bin
    assert by_t[995] == (0.0, 0.0, 10.0, None)
    assert sum(s["documents_per_s"]) * 5 == 15  # the event before the window and the partial bin: out


def test_auto_window_covers_the_run():
    assert dash.choose_window(None, 1e6) == 900
    assert dash.choose_window(1e6 - 200, 1e6) == 300
    assert dash.choose_window(1e6 - 4000, 1e6) == 6 * 3600
    assert dash.choose_window(1e6 - 9e6, 1e6) == 24 * 3600


def test_formatting():
    assert dash.fmt_count(12345) == "12,345"
    assert dash.fmt_dollars(0.00021) == "$0.0002" and dash.fmt_dollars(1234.5) == "$1,234.50"
    assert dash.fmt_eta(None, 3) == "unknown" and dash.fmt_eta(90.0, 3) == "1.5 min" and dash.fmt_eta(0.0, 0) == "done"
    assert dash.fmt_ms(0.0034) == "3.4 ms" and dash.fmt_ms(None) == "no reads"


def test_budget_dollars_setting(tmp_path):
    toml = tmp_path / "repage.toml"
    toml.write_text("[repage]\nbudget_dollars = 12.5\n")
    assert load_settings({}, toml_path=toml, app_fallbacks=False).budget_dollars == 12.5
    assert load_settings({}, app_fallbacks=False).budget_dollars is None
    toml.write_text("[repage]\nbudget_dollars = 0\n")
    with pytest.raises(ConfigError, match="budget_dollars"):
        load_settings({}, toml_path=toml, app_fallbacks=False)


def test_insecure_local_has_no_login_but_still_checks_csrf(tmp_path):
    s = settings(tmp_path)
    ledger = Ledger(s.ledger_url)
    app = create_app(s, stores=SimpleNamespace(vectors=None, ledger=ledger), insecure_local=True)
    try:
        with TestClient(app, base_url="http://127.0.0.1:8080") as client:
            page = client.get("/").text
            assert 'id="pause-button"' in page and "Log out" not in page
            assert client.post("/dashboard/pause", follow_redirects=False).status_code == 403  # a forged post
            reply = client.post("/dashboard/pause", data={"csrf_token": csrf_of(page)}, follow_redirects=False)
            assert reply.status_code == 303 and is_paused(ledger)
    finally:
        ledger.close()


def test_the_worker_badge_says_why_the_migration_is_paused():
    stopped = {"paused": True, "paused_because": "worker stopped itself: --max-failures 3 exceeded (4 failed)"}
    assert dash.worker_text({**stopped, "worker": None}) == ("paused", f"paused: {stopped['paused_because']}")
    assert dash.worker_text({"paused": True, "paused_because": "dashboard", "worker": None}) == ("paused", "paused")

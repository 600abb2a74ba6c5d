"""The service's security model (docs/design.md §6.6) against a real uvicorn server over HTTP on
127.0.0.1, in a thread, with an injected clock (no sleeps): weak tokens refused by `repage serve`,
failed authentication throttled per client address, signed expiring sessions that logout
revokes, the open mode's Host allow-list and cross-site refusal, and bounded request bodies."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from repage.migration.worker import is_paused
from repage.stores.ledger import Ledger
from repage.web import service as service_module
from repage.web.auth import MAX_FORM_BYTES, MIN_TOKEN_CHARS
from repage.web.guard import FAILURES_PER_WINDOW, WINDOW_SECONDS
from repage.web.service import create_app
from repage.web.sessions import SESSION_COOKIE, SESSION_SECONDS
from tests.fixtures.milvus import _free_port
from tests.support import wait_for
from tests.support.service_store import fltr_rows, settings_for

READ, ADMIN = "read-Wq8vN3xT-5pL0sK7dR2mH9cJ4fB6gY1z", "admin-Zr4tE9uQ-2kX7nV5aM0wP3hL8jD6sC1b"
WRONG = "wrong-Ht6yU1iO-9pA4sD7fG2hJ5kL8zX3cV0b"


class Clock:
    """Epoch seconds that move only when the test says so."""

    def __init__(self, at: float = 1.8e9):
        self.at = at

    def now(self) -> float:
        return self.at


class StandInVectors:
    def __init__(self, rows):
        self.rows = rows

    def fetch_documents(self, ids, *, fields=None, with_vectors=True):
        return [{k: v for k, v in r.items() if k != "vector"} for r in self.rows if r["document_id"] in ids]


class Server:
    """create_app under uvicorn in a thread; `url` is its base."""

    def __init__(self, app):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.server.started, "uvicorn to start")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def settings(tmp_path, **extra):
    return settings_for(
        str(tmp_path / "m.db"), "fltr_documents", "memory://", f"sqlite:///{tmp_path}/ledger.db", **extra
    )


def start(tmp_path, clock, ledger, **options):
    tokens = {} if options.get("insecure_local") else {"read_token": READ, "admin_token": ADMIN}
    app = create_app(
        settings(tmp_path, **tokens),
        stores=SimpleNamespace(vectors=StandInVectors(fltr_rows(["doc-1"])), ledger=ledger),
        clock=clock,
        flush_seconds=0.05,
        **options,
    )
    return Server(app)


@pytest.fixture
def ledger(tmp_path):
    with Ledger(f"sqlite:///{tmp_path}/ledger.db") as ledger:
        yield ledger


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def server(tmp_path, clock, ledger):
    with start(tmp_path, clock, ledger) as running:
        yield running


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------- item: weak tokens


def serve(tmp_path, read: str, admin: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "REPAGE_LEDGER_URL": f"sqlite:///{tmp_path}/l.db",
        "REPAGE_MILVUS_URI": str(tmp_path / "m.db"),
        "REPAGE_STORE_URL": "memory://",
        "REPAGE_READ_TOKEN": read,
        "REPAGE_ADMIN_TOKEN": admin,
    }
    return subprocess.run(
        [sys.executable, "-m", "repage.cli", "serve", "--port", str(_free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "read,admin,named",
    [
        ("abc", ADMIN, "REPAGE_READ_TOKEN is shorter than 32"),
        (READ, "x" * (MIN_TOKEN_CHARS - 1), "REPAGE_ADMIN_TOKEN is shorter than 32"),
        (ADMIN, ADMIN, "REPAGE_READ_TOKEN equals REPAGE_ADMIN_TOKEN"),
    ],
)
def test_serve_refuses_short_or_shared_tokens_in_one_line(tmp_path, read, admin, named):
    proc = serve(tmp_path, read, admin)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("repage: error: ") and named in lines[0]
    assert read not in proc.stderr + proc.stdout and admin not in proc.stderr + proc.stdout
    assert not (tmp_path / "l.db").exists()  # refused before anything was opened


def test_serve_starts_with_strong_tokens_and_marks_cookies_secure_off_loopback(tmp_path, monkeypatch):
    apps, runs = [], []
    monkeypatch.setattr(service_module, "create_app", lambda settings, **kw: apps.append(kw) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append(kw))
    s = settings(tmp_path, read_token=READ, admin_token=ADMIN)
    service_module.serve(s, host="0.0.0.0", port=1, forwarded_allow_ips="10.0.0.1")
    service_module.serve(s, host="127.0.0.1", port=1)
    service_module.serve(s, host="127.0.0.1", port=1, secure_cookie=True)  # --secure-cookie: a TLS proxy on loopback
    assert [kw["secure_cookie"] for kw in apps] == [True, False, True]
    assert runs[0]["forwarded_allow_ips"] == "10.0.0.1" and "forwarded_allow_ips" not in runs[1]


# ---------------------------------------------------------------- item: throttled guessing


def test_wrong_bearer_tokens_are_throttled_per_address(server, clock, caplog):
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(FAILURES_PER_WINDOW):
            assert client.get("/migration/status", headers=bearer(WRONG)).status_code == 401
        refused = client.post("/migration/pause", headers=bearer(WRONG))
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= WINDOW_SECONDS
        # the right token from that address waits too: a 200 would tell a guesser it was right
        assert client.get("/migration/status", headers=bearer(READ)).status_code == 429
        # another client (through a trusted proxy: uvicorn trusts 127.0.0.1 by default) is not held up
        other = {"X-Forwarded-For": "10.0.0.7"}
        assert client.get("/migration/status", headers={**bearer(READ), **other}).status_code == 200
        clock.at += WINDOW_SECONDS + 1
        assert client.get("/migration/status", headers=bearer(READ)).status_code == 200
        metrics = client.get("/metrics", headers=bearer(READ)).text
    assert f'repage_auth_failures_total{{kind="bearer"}} {float(FAILURES_PER_WINDOW)}' in metrics
    assert "repage_auth_throttled_total 2.0" in metrics
    assert "failed bearer authentication from 127.0.0.1" in caplog.text and WRONG not in caplog.text


def test_failed_logins_are_throttled(server, clock):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(FAILURES_PER_WINDOW):
            assert client.post("/login", data={"token": WRONG}).status_code == 401
        refused = client.post("/login", data={"token": ADMIN}, follow_redirects=False)
        assert refused.status_code == 429 and "retry-after" in refused.headers and SESSION_COOKIE not in client.cookies
        assert "Too many failed attempts: retry in" in refused.text and 'name="token"' in refused.text
        # wrong logins and wrong bearer tokens share the address's budget
        assert client.get("/migration/status", headers=bearer(READ)).status_code == 429
        clock.at += WINDOW_SECONDS + 1
        assert client.post("/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303
        assert 'repage_auth_failures_total{kind="login"} 10.0' in client.get("/metrics").text


# ---------------------------------------------------------------- item: real sessions


def login(client: httpx.Client, token: str) -> str:
    reply = client.post("/login", data={"token": token}, follow_redirects=False)
    assert reply.status_code == 303, reply.text
    return client.cookies[SESSION_COOKIE]


def test_the_cookie_holds_a_signed_session_not_the_token(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        cookie = login(client, ADMIN)
        assert ADMIN not in cookie and READ not in cookie
        assert re.fullmatch(r"[A-Za-z0-9_-]+\.admin\.\d+\.[0-9a-f]{64}", cookie)
        assert client.get("/migration/status").status_code == 200
        forged = cookie.replace(".admin.", ".read.")  # any change breaks the signature
        client.cookies.set(SESSION_COOKIE, forged)
        assert client.get("/migration/status").status_code == 401
        client.cookies.set(SESSION_COOKIE, ADMIN)  # the old cookie format: the token itself
        assert client.get("/migration/status").status_code == 401


def test_sessions_expire_on_the_server_after_12_hours(server, clock):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        cookie = login(client, READ)
        clock.at += SESSION_SECONDS - 1
        assert client.get("/dashboard/data").status_code == 200
        clock.at += 2
        assert client.get("/dashboard/data").status_code == 401  # the browser would still send it
        reply = client.get("/")
        assert reply.status_code == 401 and "Max-Age=0" in reply.headers["set-cookie"]
    assert cookie


def test_logout_revokes_the_session_here_and_in_other_processes(tmp_path, server, clock, ledger):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        cookie = login(client, ADMIN)
        with start(tmp_path, clock, ledger) as other:  # a second service process on the same ledger
            with httpx.Client(base_url=other.url, timeout=30, cookies={SESSION_COOKIE: cookie}) as elsewhere:
                assert elsewhere.get("/migration/status").status_code == 200
                reply = client.post("/logout", follow_redirects=False)
                assert reply.status_code == 303 and "Max-Age=0" in reply.headers["set-cookie"]
                client.cookies.set(SESSION_COOKIE, cookie)  # a copy of the cookie, kept by someone
                assert client.get("/migration/status").status_code == 401
                clock.at += 5  # the other process reads revocations every few seconds
                assert elsewhere.get("/migration/status").status_code == 401


def test_secure_cookie_setting_and_https(tmp_path, clock, ledger):
    with start(tmp_path, clock, ledger, secure_cookie=True) as behind_proxy:
        with httpx.Client(base_url=behind_proxy.url, timeout=30) as client:
            reply = client.post("/login", data={"token": READ}, follow_redirects=False)
            assert "Secure" in reply.headers["set-cookie"]
    with start(tmp_path, clock, ledger) as plain:
        with httpx.Client(base_url=plain.url, timeout=30) as client:
            reply = client.post("/login", data={"token": READ}, follow_redirects=False)
            assert "Secure" not in reply.headers["set-cookie"]
            # a TLS proxy says https (uvicorn trusts X-Forwarded-Proto from 127.0.0.1): Secure
            reply = client.post(
                "/login", data={"token": READ}, headers={"X-Forwarded-Proto": "https"}, follow_redirects=False
            )
            assert "Secure" in reply.headers["set-cookie"]


# ---------------------------------------------------------------- item: the open mode


@pytest.fixture
def open_server(tmp_path, clock, ledger):
    with start(tmp_path, clock, ledger, insecure_local=True) as running:
        yield running


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "10.0.0.1"])
def test_open_mode_refuses_a_foreign_host_on_every_route(open_server, ledger, host):
    with httpx.Client(base_url=open_server.url, timeout=30, headers={"Host": host}) as client:
        for method, url in [
            ("get", "/"),
            ("get", "/healthz"),
            ("get", "/migration/status"),
            ("post", "/migration/pause"),
        ]:
            assert getattr(client, method)(url).status_code == 421, (method, url)
    assert not is_paused(ledger)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:8080", "[::1]:8080", "LOCALHOST:1"])
def test_open_mode_answers_loopback_hosts(open_server, host):
    with httpx.Client(base_url=open_server.url, timeout=30, headers={"Host": host}) as client:
        assert client.get("/migration/status").status_code == 200


def test_with_tokens_insecure_local_changes_nothing(tmp_path, clock, ledger):
    """--insecure-local only matters without tokens: with both, the tokens guard every route."""
    app = create_app(
        settings(tmp_path, read_token=READ, admin_token=ADMIN),
        stores=SimpleNamespace(vectors=StandInVectors(fltr_rows(["doc-1"])), ledger=ledger),
        clock=clock,
        insecure_local=True,
    )
    with Server(app) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        assert client.post("/migration/pause").status_code == 401
        assert client.get("/migration/status", headers={**bearer(READ), "Host": "repage.example"}).status_code == 200


CROSS_SITE = [
    ({"Content-Type": "application/x-www-form-urlencoded"}, "a=1"),  # a <form> on any page
    ({"Content-Type": "text/plain"}, "x"),
    ({"Content-Type": "multipart/form-data; boundary=x"}, "--x--"),
    ({"Sec-Fetch-Site": "cross-site"}, None),  # a no-cors fetch: no body, but the browser tells
    ({"Origin": "http://evil.example"}, None),
    ({"Origin": "null"}, None),
]


@pytest.mark.parametrize("url", ["/migration/pause", "/migration/resume", "/migration/documents/doc-1"])
@pytest.mark.parametrize("headers,body", CROSS_SITE)
def test_open_mode_refuses_cross_site_posts_to_admin_routes(open_server, ledger, url, headers, body):
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        reply = client.post(url, headers=headers, content=body)
    assert reply.status_code in (403, 415), reply.text
    assert not is_paused(ledger) and ledger.enqueued() == []


def test_open_mode_admin_routes_take_curl_and_same_origin_json(open_server, ledger):
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        assert client.post("/migration/pause").json() == {"paused": True}  # curl -X POST
        assert is_paused(ledger)
        same = {"Origin": open_server.url, "Sec-Fetch-Site": "same-origin"}
        assert client.post("/migration/resume", json={}, headers=same).json() == {"paused": False}
        assert client.post("/migration/documents/doc-1", json={}).status_code == 202


# ---------------------------------------------------------------- item: bounded bodies


def raw_request(port: int, head: str, body: bytes = b"") -> str:
    """Send a request by hand (httpx will not lie about Content-Length); the reply's status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head.encode() + body)
        reply = sock.recv(4096).decode("latin-1")
    return reply.splitlines()[0] if reply else ""


def test_a_large_declared_body_is_refused_before_it_is_read(server):
    # 1 GB announced, nothing sent: a server that read the body first would wait, and the recv time out
    head = (
        f"POST /login HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000000000\r\n\r\n"
    )
    assert " 413 " in raw_request(server.port, head)


def test_a_streamed_body_is_cut_off_at_the_cap(server):
    head = (
        f"POST /dashboard/pause HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"a" * 1024
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_FORM_BYTES // 1024 + 4))
    assert " 413 " in raw_request(server.port, head, body)  # the stream never ends: no 0-chunk sent


def test_a_small_form_still_logs_in(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/login", data={"token": READ, "pad": "p" * 3000}, follow_redirects=False).status_code == 303

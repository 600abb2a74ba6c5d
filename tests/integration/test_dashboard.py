"""The dashboard in a real browser: Debian's headless chromium (driven by Playwright's Python
client, never its own browser download) against `repage serve --with-worker` over HTTP, on a
store in the middle of its migration (milvus-lite server, a folder bucket, a SQLite ledger).

Set up like an operator's afternoon: a scan, a first `repage run --limit 8` (one document fails:
a folder stands where its images must go), a pdf-path review waiting for a person, then the service's
worker trickling the rest slowly while users read documents (hot documents, read latency).
The test logs in through the form, takes screenshots, checks that every number the page shows
equals `repage status --json` (the CLI, run as a process), clicks pause and sees the worker stop
(ledger pause state, no further `migrated` events, status frozen), clicks resume and sees it go
on, and reads the server-rendered summary with a plain HTTP GET (no JavaScript).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from html import unescape
from pathlib import Path

import httpx
import pytest

from repage.domain.keys import canonical_image_key
from repage.domain.states import RepairPath, State
from repage.migration.worker import is_paused
from repage.stores.ledger import Ledger
from repage.web import dashboard as dash
from tests.fixtures.milvus import _free_port, unique_name
from tests.support import wait_for
from tests.support.service_store import create_store, env_for, fltr_rows, server_answers, write_images

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
READ, ADMIN = "read-5b0e1c9d77-0c4a8e2f6b1d9e3a7c5b", "admin-e24f8a3c61-7b2d5f9e0a3c8e1b4d6a"
DOCS = [f"d{i:02d}" for i in range(40)]  # at ~2 s a document, the worker is still busy when paused
BROKEN, REVIEW = "d01", "r0"  # BROKEN cannot be copied (fails); REVIEW waits for a person
HOT = {"d20": 5, "d21": 2}  # reads per document
BUDGET = 0.002  # dollars: the projection of this small store is a visible part of it


def cli(env: dict, cwd: Path, *args: str, ok=(0,)) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "repage.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode in ok, f"repage {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def migration(milvus_server_uri, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run installs it)")
    root = tmp_path_factory.mktemp("dashboard")
    collection = unique_name("dash")
    rows = fltr_rows(DOCS, images=2) + fltr_rows([REVIEW], dataset="ds-review", images=2)
    create_store(milvus_server_uri, collection, rows)
    bucket = root / "bucket"
    bucket.mkdir()
    write_images(bucket, rows)
    ledger_url = f"sqlite:///{root}/ledger.db"
    (root / "repage.toml").write_text(f"[repage]\nbudget_dollars = {BUDGET}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPAGE_")}
    env.update(
        env_for(milvus_server_uri, collection, f"file://{bucket}", ledger_url),
        REPAGE_READ_TOKEN=READ,
        REPAGE_ADMIN_TOKEN=ADMIN,
        PYTHONUNBUFFERED="1",
    )

    cli(env, root, "scan", "--json")
    with Ledger(ledger_url) as ledger:
        _put_in_review(ledger, REVIEW)
    for page in range(12):  # a folder where BROKEN's images must go: the bucket refuses the copies
        for index in range(2):
            (bucket / canonical_image_key("ds", BROKEN, page, index, "png")).mkdir()
    first = json.loads(cli(env, root, "run", "--limit", "8", "--json", ok=(0, 1)).stdout)
    assert first["migrated"] == 7 and first["failed"] == 1

    port = _free_port()
    log_path = root / "server.log"
    with log_path.open("w") as log:
        # One document per batch, few bucket requests per second: the worker is still busy when
        # the browser looks, and a pause lands between two small batches.
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "repage.cli",
                "serve",
                "--port",
                str(port),
                "--with-worker",
                "--poll",
                "0.2",
                "--batch-size",
                "1",
                "--object-ops-per-second",
                "4",
            ],
            env=env,
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server_answers(base, proc, log_path), "the server to answer")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {READ}"}, timeout=30) as client:
            for doc, reads in HOT.items():  # users read: accesses, lazy requests, read latency
                for _ in range(reads):
                    assert client.get(f"/documents/{doc}/chunks").status_code == 200
        with Ledger(ledger_url) as ledger:
            wait_for(lambda: ledger.events(kinds=["read-latency"], limit=1), "a read-latency report", timeout=30)
        yield {"base": base, "env": env, "root": root, "ledger_url": ledger_url, "proc": proc, "log": log_path}
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def _put_in_review(ledger: Ledger, doc: str) -> None:
    """What the pdf path does with a weak match (repage/pdfpath.py): evidence, then running -> review."""
    (claim,) = ledger.claim_batch("pdf-path", 1, 300, document_ids=[doc])
    evidence = {
        "threshold": {"max_hash_distance": 10, "min_hash_margin": 8},
        "confident": 0,
        "chunks": [{"image_index": 0, "distance": 17, "margin": 2, "candidates": [3, 4], "proposed": 3}],
    }
    ledger.save_review(doc, claim.fencing_token, json.dumps(evidence))
    ledger.transition(
        doc,
        State.REVIEW,
        token=claim.fencing_token,
        path=RepairPath.PDF,
        reason="1 of 2 chunks matched below the threshold (distance <= 10, margin >= 8): see `repage review`",
    )


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def page_fields(page) -> dict[str, tuple[str, str]]:
    """data-field -> (data-value, text) of every number the page shows."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('[data-field]')]
        .map(n => [n.dataset.field, [n.dataset.value, n.textContent]]))""")


def html_fields(html: str) -> dict[str, tuple[str, str]]:
    pattern = r'<span data-field="([^"]+)" data-value="([^"]*)"[^>]*>([^<]*)</span>'
    return {f: (unescape(v), unescape(t)) for f, v, t in re.findall(pattern, html)}


def status_value(status: dict, path: str):
    keys = path.split(".")[1:]
    if keys[0] == "by_state_and_path":
        cells = {(r["state"], r["path"]): r["documents"] for r in status["by_state_and_path"]}
        return cells.get((keys[1], keys[2]), 0)
    value = status
    for key in keys:
        value = value.get(key, 0) if isinstance(value, dict) else value
    return value


def formatted(path: str, value, status: dict) -> str:
    if path == "status.eta_seconds":
        return dash.fmt_eta(value, status["todo"])
    if path.startswith("status.throughput."):
        return dash.fmt_rate(value)
    if path.startswith("status.dollars_"):
        return dash.fmt_dollars(value)
    return dash.fmt_count(value)


TIME_DEPENDENT = ("status.throughput.", "status.eta_seconds")  # recomputed against the clock on every call


def assert_shows_status(fields: dict[str, tuple[str, str]], status: dict) -> None:
    """Every status figure on the page equals `repage status --json`: the raw value, and the text."""
    shown = {f: v for f, v in fields.items() if f.startswith("status.")}
    expected_paths = (
        {
            "status.documents",
            "status.done",
            "status.todo",
            "status.dollars_spent",
            "status.dollars_projected",
            "status.eta_seconds",
        }
        | {f"status.by_state.{s}" for s in status["by_state"]}
        | {f"status.by_path.{p}" for p in status["by_path"]}
        | {f"status.by_state_and_path.{r['state']}.{r['path']}" for r in status["by_state_and_path"]}
        | {f"status.throughput.{k}" for k in status["throughput"]}
    )
    assert expected_paths <= set(shown), sorted(expected_paths - set(shown))
    for path, (raw, text) in shown.items():
        want = status_value(status, path)
        got = json.loads(raw) if raw else None
        if path.startswith(TIME_DEPENDENT):  # the page asked a moment before the CLI did
            assert (got is None) == (want is None), path
            if want is not None:
                assert math.isclose(got, want, rel_tol=0.25, abs_tol=1e-9), (path, got, want)
            continue
        assert got == want, (path, got, want)
        assert text == formatted(path, want, status), (path, text)


def test_the_dashboard_in_chromium(migration, browser, tmp_path):
    base, ledger_url = migration["base"], migration["ledger_url"]
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text)  # the login form's own 401 is no error
        if msg.type == "error" and not msg.text.startswith("Failed to load resource")
        else None,
    )

    # ---- log in through the form: an HttpOnly, SameSite=Strict cookie holds the session
    reply = page.goto(f"{base}/")
    assert reply.status == 401 and page.locator("input[name=token]").is_visible()
    page.fill("input[name=token]", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_selector("#progress")
    (cookie,) = context.cookies()
    assert cookie["name"] == "repage_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # ---- the running migration: charts drawn by uPlot, JSON refreshes arriving
    page.wait_for_selector("#chart-throughput .uplot canvas")
    page.wait_for_function("() => Number(document.body.dataset.refreshes) >= 1", timeout=30_000)
    assert page.inner_text("#run-state") == "running"
    with Ledger(ledger_url) as ledger:
        wait_for(lambda: ledger.events(kinds=["migrated"])[-1].at > ledger.db_now() - 10, "the worker to migrate")
    page.wait_for_function("() => Number(document.body.dataset.refreshes) >= 2", timeout=30_000)
    running_shot = tmp_path / "dashboard-running.png"
    page.screenshot(path=str(running_shot), full_page=True)
    assert page.locator("#failures tbody tr").first.inner_text().startswith(BROKEN)
    assert page.locator("#reviews tbody tr").first.inner_text().startswith(REVIEW)
    assert "below the threshold" in page.inner_text("#reviews")
    assert page.locator("#hot tbody tr").first.inner_text().startswith("d20")
    assert page.inner_text("[data-field='data.read_latency.p95_seconds']").endswith(" ms")

    # ---- pause: the button posts with the cookie and the CSRF token; the worker stops
    page.click("#pause-button")
    page.wait_for_function("() => document.getElementById('run-state').textContent === 'paused'", timeout=30_000)
    assert page.locator("#resume-button").is_visible() and not page.locator("#pause-button").is_visible()
    with Ledger(ledger_url) as ledger:
        assert is_paused(ledger)
        pause_event = ledger.events(kinds=["pause"])[-1]
        assert pause_event.detail == "dashboard"
        worker = lambda: httpx.get(  # noqa: E731
            f"{base}/migration/status",
            headers={"Authorization": f"Bearer {READ}"},
            timeout=10,
        ).json()["service"]["worker"]
        wait_for(lambda: (worker()["last_cycle"] or {}).get("paused"), "the worker to see the pause")
        cycles, migrated = worker()["cycles"], len(ledger.events(kinds=["migrated"]))
        counts = ledger.counts()
        wait_for(lambda: worker()["cycles"] >= cycles + 5, "five paused cycles")  # alive, and idle
        assert len(ledger.events(kinds=["migrated"])) == migrated  # no batch since
        assert ledger.counts() == counts

    # ---- the numbers on the page are `repage status --json`, exactly (the ledger is still now)
    seen = int(page.evaluate("() => document.body.dataset.refreshes"))
    page.wait_for_function(f"() => Number(document.body.dataset.refreshes) > {seen}", timeout=30_000)
    fields = page_fields(page)
    status = json.loads(cli(migration["env"], migration["root"], "status", "--json").stdout)
    assert status["by_state"]["migrated"] >= 7 and status["by_state"]["pending"] > 0  # mid-migration
    assert status["by_state"]["failed"] == 1 and status["by_state"]["review"] == 1
    assert_shows_status(fields, status)
    assert page.locator("#failures tbody tr td:first-child").all_inner_texts() == [
        e["document_id"] for e in status["last_errors"]
    ]
    assert fields["data.budget_dollars"] == [json.dumps(BUDGET), dash.fmt_dollars(BUDGET)]
    paused_shot = tmp_path / "dashboard-paused.png"
    page.screenshot(path=str(paused_shot), full_page=True)

    # ---- without JavaScript: the server-rendered summary carries the same numbers
    plain = httpx.get(f"{base}/", headers={"Authorization": f"Bearer {READ}"}, timeout=30)
    assert plain.status_code == 200 and plain.headers["cache-control"] == "no-store"
    assert "pause-button" not in plain.text  # the read token sees no admin controls
    assert '<svg class="static-chart"' in plain.text and f">{BROKEN}</td>" in plain.text
    assert_shows_status(html_fields(plain.text), status)
    nojs = browser.new_context(
        java_script_enabled=False,
        viewport={"width": 1400, "height": 1000},
        extra_http_headers={"Authorization": f"Bearer {READ}"},
    )
    static_page = nojs.new_page()
    static_page.goto(f"{base}/")
    static_shot = tmp_path / "dashboard-no-js.png"
    static_page.screenshot(path=str(static_shot), full_page=True)
    assert static_page.inner_text("[data-field='status.documents']") == dash.fmt_count(status["documents"])
    nojs.close()

    # ---- resume: the worker goes on
    page.click("#resume-button")
    page.wait_for_function("() => document.getElementById('run-state').textContent !== 'paused'", timeout=30_000)
    with Ledger(ledger_url) as ledger:
        assert not is_paused(ledger)
        wait_for(lambda: len(ledger.events(kinds=["migrated"])) > migrated, "a batch after resume", timeout=60)
    assert not errors, errors
    context.close()
    print(f"\nscreenshots: {running_shot} {paused_shot} {static_shot}")

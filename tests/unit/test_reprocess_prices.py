"""Reprocess dollars are the brief's ranges (docs/design.md §8.1): $0.10-1.00 per document, $0.01-0.10
per image for vision, $0.001 per image for OCR. The estimate, its rendering and the dashboard (in
process, a real SQLite ledger) show the low and the high end."""

from __future__ import annotations

import re
from html import unescape
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from rich.console import Console

from repage.cli.render import render_estimate
from repage.config import Prices, load_settings
from repage.domain.estimate import Latencies, PathLoad, estimate, reprocess_dollars
from repage.domain.records import ScanRecord
from repage.domain.states import RepairPath, State
from repage.errors import ConfigError
from repage.stores.ledger import Ledger
from repage.web.service import create_app
from tests.support.service_store import settings_for

ADMIN = "admin-tok-5e11-9a3c7b0e2d4f1a8c6e5b-prices"
READ = "read-tok-77c1-0b9d2e4f6a8c1e3b5d7f-prices"
LOAD = {RepairPath.REPROCESS: PathLoad(documents=2, chunks=5), RepairPath.KEYS: PathLoad(documents=1)}
LOW, HIGH = 2 * 0.10 + 5 * (0.01 + 0.001), 2 * 1.00 + 5 * (0.10 + 0.001)


def test_the_reprocess_estimate_is_a_range():
    assert reprocess_dollars(2, 5, Prices()) == (pytest.approx(LOW), pytest.approx(HIGH))
    result = estimate(LOAD, Latencies(0.1, 0.1, 0.01, 0.01, 0.01, 1e6, 0.1), Prices(), concurrency=4, batch_size=10)
    path = {p.path: p for p in result.paths}
    assert (path["reprocess"].dollars, path["reprocess"].dollars_high) == (pytest.approx(LOW), pytest.approx(HIGH))
    assert path["keys"].dollars_high is None  # requests have one price
    report = result.as_dict()
    assert report["total_dollars_high"] == pytest.approx(report["total_dollars"] - LOW + HIGH)


def test_estimate_output_shows_the_range():
    report = estimate(LOAD, Latencies(0.1, 0.1, 0.01, 0.01, 0.01, 1e6, 0.1), Prices(), concurrency=4, batch_size=10)
    latencies = {"sample_size": 1, **vars(Latencies(0.1, 0.1, 0.01, 0.01, 0.01, 1e6, 0.1))}
    data = report.as_dict() | {"latencies": latencies, "assumptions": "none"}
    console = Console(record=True, width=200)
    render_estimate(console)(data)
    text = console.export_text()
    assert f"${LOW:.4f}-${HIGH:.4f}" in text
    assert f"${report.dollars:.4f}-${report.dollars_high:.4f}" in text  # the total too


def test_a_range_goes_low_to_high(tmp_path):
    toml = tmp_path / "repage.toml"
    toml.write_text("[repage.prices]\nvision_per_image = 0.2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="vision_per_image_high is below vision_per_image"):
        load_settings({}, toml_path=toml, app_fallbacks=False)
    toml.write_text("[repage.prices]\nvision_per_image = 0.2\nvision_per_image_high = 0.3\n", encoding="utf-8")
    assert load_settings({}, toml_path=toml, app_fallbacks=False).prices.vision_per_image_high == 0.3


def test_the_dashboard_shows_the_reprocess_documents_to_do_as_a_range(tmp_path):
    s = settings_for(
        str(tmp_path / "m.db"),
        "fltr_documents",
        "memory://",
        f"sqlite:///{tmp_path}/l.db",
        read_token=READ,
        admin_token=ADMIN,
    )
    ledger = Ledger(s.ledger_url)
    ledger.upsert_scan(
        [ScanRecord("r1", "ds", "r1.png", RepairPath.REPROCESS, State.PENDING, "not a PDF", 2)]
        + [ScanRecord("r2", "ds", "r2.png", RepairPath.REPROCESS, State.PENDING, "not a PDF", 3)]
        + [ScanRecord("k1", "ds", "k1.pdf", RepairPath.KEYS, State.PENDING, "legacy keys", 40)]
    )
    app = create_app(s, stores=SimpleNamespace(vectors=None, ledger=ledger))
    try:
        with TestClient(app, base_url="http://127.0.0.1:8080") as client:
            html = client.get("/", headers={"Authorization": f"Bearer {READ}"}).text
            data = client.get("/dashboard/data", headers={"Authorization": f"Bearer {READ}"}).json()
    finally:
        ledger.close()
    assert data["reprocess_dollars"]["documents"] == 2 and data["reprocess_dollars"]["images"] == 5
    pattern = r'<span data-field="(data\.reprocess_dollars\.\w+)" data-value="([^"]*)"[^>]*>([^<]*)</span>'
    shown = {f: (float(v), unescape(t)) for f, v, t in re.findall(pattern, html)}
    assert shown["data.reprocess_dollars.low"] == (pytest.approx(LOW), f"${LOW:.4f}")
    assert shown["data.reprocess_dollars.high"] == (pytest.approx(HIGH), f"${HIGH:.4f}")

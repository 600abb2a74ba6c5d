"""Acceptance: after `make demo` (the real `repage demo`, defaults, in a fresh folder), the README's
reprocess command fixes the demo's reprocess documents with the local pipeline (docs/design.md §2.4):
no setting but the ones the demo recorded in repage-data/repage.toml. `repage estimate` prices them
first as the brief's range (§8.1)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from repage.config import Prices
from repage.domain.estimate import reprocess_dollars
from tests.support import DATA, run_cli

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_reprocess_command() -> list[str]:
    """The README's `repage ... run --path reprocess` line for the demo, its comment cut off."""
    for line in README.read_text(encoding="utf-8").splitlines():
        command = line.split("#", 1)[0].strip()
        if command.startswith("repage --config repage-data/") and "run --path reprocess" in command:
            return shlex.split(command)[1:]
    raise AssertionError("README.md shows no `repage --config repage-data/... run --path reprocess` command")


def cli_json(root: Path, *args: str) -> dict:
    proc = run_cli(*args, "--json", cwd=root, timeout=600)
    assert proc.returncode == 0, f"repage {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def test_the_readme_command_reprocesses_the_demo_documents(tmp_path):
    demo = cli_json(tmp_path, "demo")  # what `make demo` runs, in the folder it runs in
    truth = json.loads((tmp_path / DATA / "ground-truth.json").read_text(encoding="utf-8"))
    slow = sorted(d["document_id"] for d in truth["documents"] if d["expected_path"] == "reprocess")
    assert len(slow) == 2 and demo["build"]["config"] == str(tmp_path / DATA / "repage.toml")

    shown = run_cli("--config", f"{DATA}/repage.toml", "estimate", cwd=tmp_path, timeout=600)  # priced as a range
    path = next(
        p
        for p in cli_json(tmp_path, "--config", f"{DATA}/repage.toml", "estimate")["paths"]
        if p["path"] == "reprocess"
    )
    low, high = reprocess_dollars(2, path["chunks"], Prices())
    assert path["documents"] == 2 and (path["dollars"], path["dollars_high"]) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    assert shown.returncode == 0 and f"${low:.4f}-${high:.4f}" in shown.stdout, shown.stdout

    report = cli_json(tmp_path, *readme_reprocess_command())

    assert (report["migrated"], report["failed"], report["errors"]) == (2, 0, {}), report
    status = cli_json(tmp_path, "--config", f"{DATA}/repage.toml", "status")
    assert status["by_state"].get("failed", 0) == 0 and status["todo"] == 0, status
    reprocess = {row["state"]: row["documents"] for row in status["by_state_and_path"] if row["path"] == "reprocess"}
    assert reprocess == {"migrated": 2}
    verify = cli_json(tmp_path, "--config", f"{DATA}/repage.toml", "verify", *[f"--document-id={d}" for d in slow])
    assert verify["checked"] == verify["passed"] == 2, verify

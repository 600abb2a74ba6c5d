"""tests/conftest.py's skip hooks, on a tiny test file run by a pytest subprocess that loads the
real conftest (`-p tests.conftest`): with CI set every kind of skip fails, under xdist too, and
an xfail stays an xfail; without CI the run's last line sums the skips up by reason."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # three pytest subprocesses, each importing the fixture plugins
REPO = Path(__file__).resolve().parents[2]

SKIPPING = textwrap.dedent("""
    import pytest

    def test_passes():
        pass

    @pytest.mark.skipif(True, reason="needs a tool")
    def test_marked():
        pass

    def test_skips_inside():
        pytest.skip("decided at run time")

    @pytest.fixture
    def server():
        pytest.skip("no server")

    def test_needs_server(server):
        pass

    @pytest.mark.xfail(reason="a known bug", strict=True)
    def test_known_bug():
        assert False
""")

MODULE_SKIP = 'import pytest\n\npytest.skip("the whole file", allow_module_level=True)\n'


def run_pytest(folder: Path, *args: str, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(REPO)
    if ci:
        env["CI"] = "true"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "tests.conftest",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(folder),
        "--junitxml",
        str(folder / "junit.xml"),
        *args,
    ]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def outcomes(folder: Path) -> dict[str, str]:
    """{test name: passed | failed | skipped | xfailed} from the run's JUnit XML (error = failed)."""
    out = {}
    for case in ET.parse(folder / "junit.xml").getroot().iter("testcase"):
        found = [c for c in case if c.tag in ("failure", "error", "skipped")]
        kind = found[0].tag if found else "passed"
        if kind == "skipped" and found[0].get("type") == "pytest.xfail":
            kind = "xfailed"
        out[case.get("name")] = {"error": "failed", "failure": "failed"}.get(kind, kind)
    return out


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    return tmp_path


def test_in_ci_every_skip_fails_under_xdist(folder):
    done = run_pytest(folder, "-n", "2", ci=True)
    assert done.returncode == 1, done.stdout[-3000:]
    assert outcomes(folder) == {
        "test_passes": "passed",
        "test_known_bug": "xfailed",
        "test_marked": "failed",
        "test_skips_inside": "failed",
        "test_needs_server": "failed",
    }
    report = (folder / "junit.xml").read_text()
    for reason in ("needs a tool", "decided at run time", "no server"):
        assert f"skipped, but CI must run every test: {reason}" in report


def test_in_ci_a_skipped_module_fails(tmp_path):
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    done = run_pytest(tmp_path, ci=True)
    assert done.returncode != 0, done.stdout[-3000:]
    assert "skipped, but CI must run every test: the whole file" in done.stdout


def test_outside_ci_the_last_line_sums_up_the_skips(folder):
    (folder / "test_module_skip.py").write_text(MODULE_SKIP)
    done = run_pytest(folder, "-q", "-n", "2", ci=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert done.stdout.strip().splitlines()[-1] == (
        "4 skipped (CI=true would fail them): 1 x decided at run time; 1 x needs a tool; "
        "1 x no server; 1 x the whole file"
    )

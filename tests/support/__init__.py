"""Helpers for the acceptance tests on the demo store: build once, copy per test, drive the CLI.

A demo store is built once per process and primary-key variant (Milvus Lite in-process,
a `file://` bucket, a SQLite ledger, all under `<root>/repage-data`, the layout the CLI's
defaults expect), released, and then only ever copied: every test works on its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from repage.config import Settings, demo_settings
from tests.support.snapshot import release_lite, snapshot

DATA = "repage-data"  # the CLI's default data folder, relative to its cwd
APP_ENV = (
    "MILVUS_URI",
    "MILVUS_TOKEN",
    "R2_ACCOUNT_ID",
    "R2_ACCESS_KEY_ID",
    "R2_SECRET_ACCESS_KEY",
    "R2_BUCKET_NAME",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


@dataclass
class Demo:
    """One demo store: where it is, its settings and its ground truth."""

    root: Path  # the CLI runs here; the stores are under root/repage-data
    pk: str
    truth: dict
    pristine: dict | None = None  # snapshot right after the build (set on the built original)
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.root / DATA

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = demo_settings(self.data_dir)
        return self._settings

    @property
    def docs(self) -> list[dict]:
        return self.truth["documents"]

    def doc(self, document_id: str) -> dict:
        return next(d for d in self.docs if d["document_id"] == document_id)

    def by_path(self, *paths: str) -> list[dict]:
        return [d for d in self.docs if d["expected_path"] in paths]

    def copy(self, dest: Path) -> Demo:
        """A private copy of this (released) store under dest/repage-data."""
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.data_dir, dest / DATA, ignore=shutil.ignore_patterns("LOCK"))
        return Demo(dest, self.pk, self.truth, self.pristine)

    def release(self) -> None:
        """Let another process open the Lite folder (closing the stores is not enough)."""
        release_lite(self.settings.milvus_uri)

    def snapshot(self, **parts: bool) -> dict:
        self.release()
        return snapshot(self.settings, **parts)

    def cli(self, *args: str, check: int | None = 0, timeout: float = 180) -> subprocess.CompletedProcess:
        """Run the real `repage` in root with no flags and no REPAGE_* env: the CLI's defaults."""
        self.release()
        proc = run_cli(*args, cwd=self.root, timeout=timeout)
        if check is not None:
            assert proc.returncode == check, (
                f"repage {' '.join(args)} exited {proc.returncode}, expected {check}\n"
                f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
            )
        return proc

    def cli_json(self, *args: str, check: int | None = 0) -> dict:
        proc = self.cli(*args, "--json", check=check)
        try:
            return json.loads(proc.stdout)
        except ValueError as exc:
            raise AssertionError(
                f"repage {' '.join(args)} --json printed no JSON document: {proc.stdout[:500]!r}"
                f"\nstderr: {proc.stderr[-1000:]}"
            ) from exc


def repage_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m repage.cli`."""
    script = Path(sys.executable).with_name("repage")
    return [str(script)] if script.exists() else [sys.executable, "-m", "repage.cli"]


def run_cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPAGE_") and k not in APP_ENV}
    return subprocess.run([*repage_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


_BUILT: dict[str, Demo] = {}


def built_demo(tmp_path_factory, pk: str) -> Demo:
    """The demo of this pk variant, built once per process (corpus cache ~/.cache/repage/demo), released.

    Never use it directly: `.copy()` it. Its `pristine` snapshot is the store right after the
    build (no ledger yet).
    """
    if pk not in _BUILT:
        from repage.demo import build_demo

        root = tmp_path_factory.mktemp(f"demo-{pk}")
        settings = demo_settings(root / DATA)
        build_demo(root / DATA, pk=pk, settings=settings)
        truth = json.loads((root / DATA / "ground-truth.json").read_text(encoding="utf-8"))
        demo = Demo(root, pk, truth, _settings=settings)
        demo.pristine = demo.snapshot()
        demo.release()
        _BUILT[pk] = demo
    return _BUILT[pk]


def wait_for(predicate, what: str, timeout: float = 60.0, every: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")

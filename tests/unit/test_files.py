"""Owner-only folders at every level repage creates, and `doctor`'s warning about local files that
others can read (docs/design.md §6.6)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from repage.stores.files import make_private_dirs, permission_warnings
from repage.stores.ledger import Ledger
from repage.stores.milvus import normalize_uri
from repage.stores.objects import ObjectStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    """The common umask 022: a plain mkdir would leave group- and world-readable folders."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_every_level_created_is_0700_and_existing_ones_are_left_alone(tmp_path, open_umask):
    tmp_path.chmod(0o755)
    make_private_dirs(tmp_path / "a" / "b" / "c")
    assert [mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3
    assert mode(tmp_path) == 0o755  # not created by repage: its owner chose that
    make_private_dirs(tmp_path / "a" / "b" / "c")  # again: nothing to do, no error


def test_ledger_bucket_and_lite_folders_are_0700_at_every_level(tmp_path, open_umask):
    Ledger(f"sqlite:///{tmp_path}/l1/l2/ledger.db").close()
    ObjectStore.from_url((tmp_path / "b1" / "b2").as_uri()).close()
    normalize_uri(str(tmp_path / "m1" / "m2" / "milvus.db"))
    for folder in ("l1", "l1/l2", "b1", "b1/b2", "m1", "m1/m2"):
        assert mode(tmp_path / folder) == 0o700, folder
    assert mode(tmp_path / "l1" / "l2" / "ledger.db") == 0o600


def test_permission_warnings_name_each_readable_file_and_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "ledger.db").write_bytes(b"")
    (data / "ledger.db").chmod(0o600)
    (data / "bucket").mkdir(mode=0o700)
    urls = (f"sqlite:///{data}/ledger.db", (data / "bucket").as_uri(), str(data / "milvus.db"))
    assert permission_warnings(*urls) == []
    (data / "ledger.db").chmod(0o644)
    (data / "bucket").chmod(0o750)
    warnings = permission_warnings(*urls)
    assert warnings == [
        f"ledger file {data / 'ledger.db'} is 0o644, readable by others: chmod 600 it",
        f"bucket folder {data / 'bucket'} is 0o750, readable by others: chmod 700 it",
    ]
    data.chmod(0o755)  # the ledger's folder, which is also the Milvus Lite folder: one warning
    assert len(permission_warnings(*urls)) == 3


def test_doctor_warns_one_line_each(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    Ledger(f"sqlite:///{data}/ledger.db").close()
    (data / "ledger.db").chmod(0o640)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "REPAGE_LEDGER_URL": f"sqlite:///{data}/ledger.db",
        "REPAGE_MILVUS_URI": str(tmp_path / "none" / "milvus.db"),
        "REPAGE_STORE_URL": "memory://",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "repage.cli", "doctor"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("repage: warning: ")]
    assert warnings == [
        f"repage: warning: ledger file {data / 'ledger.db'} is 0o640, readable by others: chmod 600 it",
        f"repage: warning: ledger folder {data} is 0o755, readable by others: chmod 700 it",
    ], proc.stderr
    assert not (tmp_path / "none").exists()  # doctor still creates nothing

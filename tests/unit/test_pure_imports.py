"""The pure modules must not pull in a vendor SDK (DESIGN §3)."""

import subprocess
import sys

import pytest

VENDORS = ("pymilvus", "obstore", "sqlalchemy")


@pytest.mark.parametrize("module", ["repage.domain.keys", "repage.domain.plan", "repage.domain.estimate", "repage.domain.states",
                                    "repage.config", "repage.errors"])
def test_pure_module_imports_no_vendor_sdk(module):
    code = f"import sys, {module}; print([m for m in {VENDORS!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("vendor,home", [("pymilvus", "repage/stores/milvus.py"),
                                         ("obstore", "repage/stores/objects.py"),
                                         ("sqlalchemy", "repage/stores/ledger.py")])
def test_vendor_imported_in_its_adapter_only(vendor, home):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    users = [str(p.relative_to(root)) for p in (root / "repage").rglob("*.py")
             if f"import {vendor}" in p.read_text() or f"from {vendor}" in p.read_text()]
    assert users == [home]

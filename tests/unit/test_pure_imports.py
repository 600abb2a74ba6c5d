"""The layers of the house (docs/design.md §3), read off the source: every import counts,
function-level ones included, so a lazy import cannot hide a wrong-way dependency."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "repage"
VENDORS = ("pymilvus", "obstore", "sqlalchemy")
# Third-party libraries the pure domain may use: none. (The standard library is fine.)
STDLIB = sys.stdlib_module_names


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, anywhere in the file."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def sources(under: str) -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py")) if under else sorted(PACKAGE.rglob("*.py"))


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "repage" else None


def test_the_domain_imports_nothing_of_the_package_but_errors_and_no_third_party_library():
    problems = []
    for path in sources("domain"):
        for name in imported_modules(path):
            top = name.split(".")[0]
            inside = name.startswith(("repage.domain", "repage.errors")) or name == "repage"
            if top == "repage" and not inside:
                problems.append(f"{path.name} imports {name}")
            elif top not in ("repage", "__future__") and top not in STDLIB:
                problems.append(f"{path.name} imports third-party {name}")
    assert problems == []


@pytest.mark.parametrize(
    "lower,forbidden",
    [
        ("stores", ("migration", "reprocess", "cli", "web", "demo", "api")),
        ("migration", ("cli", "web", "api")),
        ("reprocess", ("cli", "web", "api")),
        ("demo", ("cli", "web")),
        ("domain", ("stores", "migration", "reprocess", "cli", "web", "demo", "api", "config")),
    ],
)
def test_no_layer_imports_one_above_it(lower, forbidden):
    wrong = sorted(
        f"{module_name(p)} imports {n}" for p in sources(lower) for n in imported_modules(p) if layer_of(n) in forbidden
    )
    assert wrong == []


@pytest.mark.parametrize("top_module", ["config.py", "errors.py", "api.py"])
def test_nothing_outside_the_faces_imports_the_cli_or_the_web(top_module):
    names = imported_modules(PACKAGE / top_module)
    assert not [n for n in names if layer_of(n) in ("cli", "web")]


def test_the_redactor_imports_the_standard_library_only():
    """Every layer prints through it (docs/design.md §6.1): it may depend on none of them."""
    names = imported_modules(PACKAGE / "redact.py")
    assert [n for n in names if n.split(".")[0] not in (*STDLIB, "__future__")] == []


def test_at_most_eight_modules_sit_at_the_top():
    assert len(list(PACKAGE.glob("*.py"))) <= 8


@pytest.mark.parametrize(
    "module",
    [
        "repage.domain.keys",
        "repage.domain.plan",
        "repage.domain.estimate",
        "repage.domain.states",
        "repage.domain.access",
        "repage.domain.records",
        "repage.config",
        "repage.errors",
        "repage.redact",
    ],
)
def test_pure_module_imports_no_vendor_sdk(module):
    code = f"import sys, {module}; print([m for m in {VENDORS!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "vendor,home",
    [
        ("pymilvus", "repage/stores/milvus"),
        ("obstore", "repage/stores/objects"),
        ("sqlalchemy", "repage/stores/ledger"),
    ],
)
def test_vendor_imported_in_its_adapter_only(vendor, home):
    """`home` is the adapter: one module, or a package whose modules all may import the vendor."""
    users = {
        str(p.relative_to(ROOT)) for p in sources("") if any(n.split(".")[0] == vendor for n in imported_modules(p))
    }
    assert users and all(u.removesuffix(".py") == home or u.startswith(home + "/") for u in users), users

"""Local files repage owns (docs/design.md §6.6): folders it creates are owner-only at every level
it creates, and the permission check `doctor` reports on."""

from __future__ import annotations

import stat
from pathlib import Path

PRIVATE_DIR = 0o700


def make_private_dirs(path: Path | str) -> Path:
    """Create `path` and any missing parent, each 0700 (`mkdir(parents=True)` gives the parents
    the umask's mode); existing folders are left as they are (their owner chose). Returns the path."""
    path = Path(path)
    missing = []
    for level in (path, *path.parents):
        if level.exists():
            break
        missing.append(level)
    for level in reversed(missing):
        try:
            level.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:  # another process made it in between
            continue
    return path


def readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def permission_warnings(ledger_url: str, store_url: str, milvus_uri: str) -> list[str]:
    """One line per existing local ledger file or data folder that its group or others can read."""
    paths: list[tuple[str, Path]] = []
    if ledger_url.startswith("sqlite:///"):
        db = Path(ledger_url.removeprefix("sqlite:///").split("?")[0])
        paths += [("ledger file", db), ("ledger folder", db.parent)]
    if store_url.startswith("file://"):
        paths.append(("bucket folder", Path(store_url.removeprefix("file://"))))
    if milvus_uri.endswith(".db") and "://" not in milvus_uri:
        paths += [("Milvus Lite file", Path(milvus_uri)), ("Milvus Lite folder", Path(milvus_uri).parent)]
    seen: set[Path] = set()
    warnings = []
    for what, path in paths:
        path = path.expanduser().resolve()
        if path in seen or not path.exists() or not readable_by_others(path):
            continue
        seen.add(path)
        mode = oct(stat.S_IMODE(path.stat().st_mode))
        fix = "chmod 600" if path.is_file() else "chmod 700"
        warnings.append(f"{what} {path} is {mode}, readable by others: {fix} it")
    return warnings

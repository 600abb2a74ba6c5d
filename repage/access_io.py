"""`repage access import` and `repage access top`: the I/O side of repage/access.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from repage.domain.access import AccessImportError, aggregate, format_of, half_life_seconds, parse_access_log, spread_datasets
from repage.stores.open import open_stores
from repage.config import Settings
from repage.errors import ConfigError


def import_access_file(settings: Settings, path: Path, fmt: str | None = None) -> dict:
    """Read a CSV/JSONL access log (all or nothing), then add its decayed hits to the ledger.

    A dataset hit counts for each document the ledger knows in that dataset: scan first.
    """
    fmt = format_of(path.name, fmt)
    half_life = half_life_seconds(settings.access_half_life_hours)
    try:
        with path.open(newline="", encoding="utf-8") as lines:
            agg = aggregate(parse_access_log(lines, fmt, str(path), now=time.time()), half_life)
    except UnicodeDecodeError as exc:
        raise AccessImportError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    with open_stores(settings, vectors=False, objects=False) as stores:
        members = stores.ledger.document_ids_by_dataset(agg.datasets)
        documents = spread_datasets(agg, members, half_life)
        stores.ledger.record_accesses({d: (agg.dataset_of.get(d), hits) for d, hits in documents.items()},
                                      half_life)
    unmatched = sorted(ds for ds in agg.datasets if ds not in members)
    return {"file": str(path), "format": fmt, "rows": agg.rows, "documents": len(agg.documents),
            "datasets": len(agg.datasets), "documents_updated": len(documents),
            "unmatched_datasets": unmatched[:20], "unmatched_dataset_count": len(unmatched)}


def access_top(settings: Settings, limit: int = 20) -> dict:
    """The most used documents by decayed access count, now."""
    with open_stores(settings, vectors=False, objects=False) as stores:
        return top_documents(stores.ledger, settings.access_half_life_hours, limit)


def top_documents(ledger, half_life_hours: float, limit: int = 20, now: float | None = None) -> dict:
    """`repage access top` of an open ledger (the dashboard's hot documents too)."""
    from repage.domain.access import Decayed

    half_life = half_life_seconds(half_life_hours)
    now = time.time() if now is None else now
    return {"half_life_hours": half_life_hours, "documents": [{
        "document_id": r.document_id, "dataset_id": r.dataset_id,
        "accesses": round(Decayed(r.score, r.scored_at).value(now, half_life), 3),
        "last_access": datetime.fromtimestamp(r.scored_at, tz=timezone.utc).isoformat(timespec="seconds"),
        "enqueued": r.enqueued_at is not None,
        "state": r.state.value if r.state else None, "path": r.path.value if r.path else None,
    } for r in ledger.top_accesses(limit)]}


def render_import(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        console.print(f"{report['rows']} rows from {report['file']} ({report['format']}): "
                      f"{report['documents']} documents, {report['datasets']} datasets; "
                      f"{report['documents_updated']} documents updated", markup=False)
        if report["unmatched_dataset_count"]:
            console.print(f"{report['unmatched_dataset_count']} datasets have no scanned documents "
                          f"(run `repage scan` first): {', '.join(report['unmatched_datasets'])}", markup=False)
    return render


def render_top(console: Console) -> Callable[[dict], None]:
    def render(report: dict) -> None:
        table = Table("document", "dataset", "accesses", "last access (UTC)", "state", "enqueued",
                      title=f"most used documents (half-life {report['half_life_hours']:g} h)")
        for d in report["documents"]:
            table.add_row(d["document_id"], d["dataset_id"] or "-", f"{d['accesses']:.2f}", d["last_access"],
                          d["state"] or "not scanned", "yes" if d["enqueued"] else "")
        console.print(table)
    return render

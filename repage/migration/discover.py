"""Incremental discovery (docs/design.md §5.9): the ingestion bug may still be live and documents
get re-ingested, so every run and the worker look for affected chunks the ledger does not expect.

One pass over the affected chunks (page 0 image/OCR chunks: few once most documents are fixed),
document ids and identities only. A document the ledger has never seen is scanned and queued. A
migrated or verified document with an affected chunk its journal does not explain (a chunk it
never wrote, or one it wrote a page other than 0 to) goes back to pending: its next claim plans it
afresh from its rows, keeping the journal's original values. A chunk whose true page is 0 is
journalled with new page 0 and is not news. Reprocessed documents have no chunk journal and are
left to verify.
"""

from __future__ import annotations

from collections import defaultdict

from repage.domain.states import RepairPath, State
from repage.errors import IllegalTransition, StaleLease
from repage.migration.scan import scan_documents
from repage.migration.status import DISCOVERED

AGAIN = frozenset({State.MIGRATED, State.VERIFIED})


def discover(stores, dataset_id: str | None = None) -> dict:
    """Queue what arrived or broke again since the last scan; {"new": n, "again": m}."""
    ledger, vectors = stores.ledger, stores.vectors
    identity = vectors.info().identity
    # Only documents settled before the pass began count as broken again: a run working beside
    # this one may have written a document's pages after the pass read them at page 0.
    started = ledger.db_now()
    affected: defaultdict[str, set[str]] = defaultdict(set)
    for page in vectors.iter_affected(dataset_id, fields=["document_id", *identity.fields]):
        for row in page:
            affected[row["document_id"]].add(identity.text(row))
    known = ledger.states_of(sorted(affected))
    new = sorted(d for d in affected if d not in known)
    done = [
        d
        for d, (state, path, changed) in known.items()
        if state in AGAIN and path != RepairPath.REPROCESS and changed is not None and changed < started
    ]
    again = [d for d in _broken_again(ledger, done, affected) if _requeue(ledger, d)]
    if new:
        scan_documents(stores, new)
    if new or again:
        ledger.add_event(DISCOVERED, count=len(new) + len(again))
    return {"new": len(new), "again": len(again)}


def _requeue(ledger, document_id: str) -> bool:
    """Back to pending; False when another process moved it first (claimed it, requeued it)."""
    try:
        ledger.transition(document_id, State.PENDING, reason="affected chunks found again after its migration")
    except (IllegalTransition, StaleLease):
        return False
    return True


def _broken_again(ledger, documents: list[str], affected: dict[str, set[str]]) -> list[str]:
    journals = ledger.chunk_journals(documents)
    fine = {d: {c.identity for c in journals[d] if c.new_page == 0} for d in documents}
    return sorted(d for d in documents if affected[d] - fine[d])

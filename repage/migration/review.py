"""`repage review`: page matches below the confidence threshold, and a person's decision on them.

The pdf path puts a document it cannot match with confidence in `review`, with its evidence
(repage/pdfpath.py): per chunk the hash distance, the margin to the next page, the candidate
pages and the page it proposes. Nothing of it is written until a person decides:
- accept: review -> pending on the pdf path; the next run writes the proposed pages;
- reject: review -> pending on the reprocess path (marked so): only the full pipeline can
  recover it, and a run takes it only with reprocessing enabled.
"""

from __future__ import annotations

import json

from repage.domain.states import RepairPath, State
from repage.errors import ConfigError


def list_reviews(ledger) -> dict:
    """Pending reviews with their evidence, oldest first."""
    items = []
    for review in ledger.reviews("pending"):
        record = ledger.get(review.document_id)
        evidence = json.loads(review.evidence)
        items.append(
            {
                "document_id": review.document_id,
                "dataset_id": record.dataset_id if record else None,
                "filename": record.filename if record else None,
                "state": str(record.state) if record else None,
                "reason": record.reason if record else None,
                "since": review.created_at,
                **evidence,
            }
        )
    return {"pending": len(items), "reviews": items}


def _pending_evidence(ledger, document_id: str) -> dict:
    review = ledger.get_review(document_id)
    record = ledger.get(document_id)
    if review is None or review.status != "pending" or record is None or record.state != State.REVIEW:
        raise ConfigError(f"document {document_id} has no pending review: `repage review` lists them")
    return json.loads(review.evidence)


def accept(ledger, document_id: str) -> dict:
    """Accept the proposed pages: the next run writes them."""
    chunks = _pending_evidence(ledger, document_id)["chunks"]
    open_ = [c for c in chunks if not c.get("proposed")]
    if open_:
        raise ConfigError(
            f"document {document_id}: {len(open_)} chunks have no proposed page "
            f"(e.g. image_index {open_[0].get('image_index')}: {open_[0].get('reason')}); "
            f"reject it instead: repage review reject {document_id}"
        )
    ledger.resolve_review(
        document_id, "accepted", reason=f"review accepted: the next run writes {len(chunks)} proposed pages"
    )
    return {
        "document_id": document_id,
        "decision": "accepted",
        "state": State.PENDING.value,
        "path": RepairPath.PDF.value,
        "chunks": len(chunks),
    }


def reject(ledger, document_id: str) -> dict:
    """Reject the match: the document is left to the reprocess path."""
    chunks = _pending_evidence(ledger, document_id)["chunks"]
    ledger.resolve_review(
        document_id,
        "rejected",
        path=RepairPath.REPROCESS,
        reason="review rejected: left to the reprocess path (run with reprocessing enabled)",
    )
    return {
        "document_id": document_id,
        "decision": "rejected",
        "state": State.PENDING.value,
        "path": RepairPath.REPROCESS.value,
        "chunks": len(chunks),
    }


# ---- one entry point per command (the CLI and the service call these)

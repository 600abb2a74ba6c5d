"""Reviews: the ledger keeps the evidence; accept and reject move review -> pending (SQLite ledger)."""

from __future__ import annotations

import json

import pytest

from repage.domain.records import ScanRecord
from repage.domain.states import RepairPath, State
from repage.errors import ConfigError, IllegalTransition, StaleLease
from repage.migration.review import accept, list_reviews, reject
from repage.stores.ledger import Ledger


def evidence(proposed=(3, 0)) -> dict:
    chunk = {
        "chunk": ["d_5"],
        "image_index": 2,
        "page": None,
        "method": "none",
        "distance": 14,
        "margin": 10,
        "candidate_pages": [{"page": 3, "distance": 14}, {"page": 7, "distance": 24}],
        "index_page": None,
        "proposed": list(proposed) if proposed else None,
        "reason": "below the match threshold: distance 14 > 10",
    }
    return {
        "source_key": "ds/d.pdf",
        "images_in_pdf": 4,
        "distinct_image_indexes": 3,
        "index_allowed": False,
        "thresholds": {"max_hash_distance": 10, "min_hash_margin": 8},
        "confident": 2,
        "chunks": [chunk],
    }


@pytest.fixture
def ledger(tmp_path):
    with Ledger(f"sqlite:///{tmp_path}/ledger.db") as led:
        yield led


def in_review(ledger: Ledger, doc: str, ev: dict) -> None:
    ledger.upsert_scan([ScanRecord(doc, "ds", f"{doc}.pdf", RepairPath.PDF, State.PENDING, "no page in keys", 3)])
    (claim,) = ledger.claim_batch("me", 1, 60, document_ids=[doc])
    ledger.save_review(doc, claim.fencing_token, json.dumps(ev))
    ledger.transition(doc, State.REVIEW, token=claim.fencing_token, reason="1 of 3 chunks below the threshold")


def test_a_review_lists_its_evidence(ledger):
    in_review(ledger, "d", evidence())
    report = list_reviews(ledger)
    assert report["pending"] == 1
    (item,) = report["reviews"]
    assert (item["document_id"], item["state"], item["filename"]) == ("d", "review", "d.pdf")
    chunk = item["chunks"][0]
    assert (chunk["distance"], chunk["margin"], chunk["proposed"]) == (14, 10, [3, 0])
    assert [c["page"] for c in chunk["candidate_pages"]] == [3, 7]


def test_accept_sends_the_document_back_to_the_pdf_path(ledger):
    in_review(ledger, "d", evidence())
    assert accept(ledger, "d")["path"] == "pdf"
    record = ledger.get("d")
    assert (record.state, record.path) == (State.PENDING, RepairPath.PDF) and "accepted" in record.reason
    assert ledger.get_review("d").status == "accepted"
    assert list_reviews(ledger)["pending"] == 0
    with pytest.raises(ConfigError, match="no pending review"):
        accept(ledger, "d")


def test_reject_leaves_the_document_to_reprocess(ledger):
    in_review(ledger, "d", evidence())
    reject(ledger, "d")
    record = ledger.get("d")
    assert (record.state, record.path) == (State.PENDING, RepairPath.REPROCESS) and "reprocess" in record.reason
    assert ledger.get_review("d").status == "rejected"


def test_accept_needs_a_proposal_for_every_chunk(ledger):
    in_review(ledger, "d", evidence(proposed=None))
    with pytest.raises(ConfigError, match="reject it instead"):
        accept(ledger, "d")
    assert ledger.get("d").state == State.REVIEW


def test_unknown_documents_and_stale_tokens_are_refused(ledger):
    with pytest.raises(ConfigError):
        reject(ledger, "nobody")
    ledger.upsert_scan([ScanRecord("e", "ds", "e.pdf", RepairPath.PDF, State.PENDING, "r", 1)])
    (claim,) = ledger.claim_batch("me", 1, 60)
    with pytest.raises(StaleLease):
        ledger.save_review("e", claim.fencing_token + 1, "{}")
    with pytest.raises(IllegalTransition):
        ledger.resolve_review("e", "accepted", reason="x")  # running, no review


def test_usage_by_path_sums_requests_and_bytes(ledger):
    ledger.upsert_scan([ScanRecord(d, "ds", f"{d}.pdf", RepairPath.PDF, State.PENDING, "r", 1) for d in ("a", "b")])
    for claim in ledger.claim_batch("me", 2, 60):
        ledger.transition(
            claim.document_id,
            State.MIGRATED,
            token=claim.fencing_token,
            object_requests_a=2,
            object_requests_b=3,
            bytes_read=1000,
        )
    assert ledger.usage_by_path()["pdf"] == {
        "documents": 2,
        "object_requests_a": 4,
        "object_requests_b": 6,
        "bytes_read": 2000,
        "dollars": 0.0,
    }

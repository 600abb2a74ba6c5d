"""Budgets hold (docs/design.md §12): a run reserves each document's worst-case cost before it
claims it, so it never spends more than its budget; `budget_dollars` in repage.toml is the whole
migration's, `--budget` this run's."""

from __future__ import annotations

import pytest

from repage.domain.estimate import worst_case_document_dollars
from tests.integration.test_run_demo import KEYS, keys_docs
from tests.support import Demo

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("pristine", ["chunk_id"], indirect=True)]


def pending(demo: Demo) -> int:
    return demo.cli_json("status")["by_state"].get("pending", 0)


def test_a_migration_budget_in_repage_toml_stops_the_run_before_any_batch(demo):
    toml = demo.root / "budget.toml"
    toml.write_text("[repage]\nbudget_dollars = 0.0000001\n")
    report = demo.cli_json("--config", str(toml), "run", *KEYS)
    assert (report["migrated"], report["documents"], report["dollars"]) == (0, 0, 0.0), report
    assert "budget" in report["stopped_because"], report
    assert pending(demo) >= len(keys_docs(demo))  # every keys document left pending


def test_budget_flag_buys_what_it_can_afford_and_not_a_cent_more(demo):
    demo.cli_json("scan")
    ledger = demo.snapshot(milvus=False, objects=False)["ledger"]["documents"]
    keys = [r for r in ledger.values() if r["state"] == "pending" and r["path"] == "keys"]
    first = min(keys, key=lambda r: (r["created_at"], r["document_id"]))  # the order a run claims in
    budget = worst_case_document_dollars(first["affected_chunks"], demo.settings.prices)
    report = demo.cli_json("run", *KEYS, "--batch-size", "1", "--budget", repr(budget))
    # the first document's worst case fits exactly; what it left cannot pay for any other's
    assert (report["migrated"], report["failed"]) == (1, 0), report
    assert report["dollars"] <= budget and "budget" in report["stopped_because"], report
    after = demo.snapshot(milvus=False, objects=False)["ledger"]["documents"]
    left = {r["document_id"]: r["state"] for r in after.values() if r["path"] == "keys" and r["state"] != "migrated"}
    assert set(left.values()) == {"pending"} and len(left) == len(keys) - 1, left  # given back, not stuck

"""Acceptance: `scan` (docs/design.md §2.1) on the demo store, both primary-key variants.

The ground truth says, from construction, which path and state every document must get
and which documents can be classified from their chunks' keys alone. Checks read the
stores directly (tests.support.snapshot), never through repage's planning code.
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import unquote

import pytest

from repage.migration.rollback import rollback_documents
from repage.migration.runner import RunLimits, Selection, run_migration
from repage.migration.scan import scan_store
from repage.migration.verify import verify_documents
from repage.migration.work import RunOptions
from repage.stores.open import open_stores
from tests.support import Demo
from tests.support.snapshot import diff

pytestmark = pytest.mark.slow

DONE_STATES = {"migrated", "verified", "skipped", "unrecoverable"}


class Spy:
    """An ObjectStore that records every request (op, key or prefix) before passing it on."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    def list(self, prefix):
        self.calls.append(("list", prefix))
        return self.inner.list(prefix)

    def head(self, key):
        self.calls.append(("head", key))
        return self.inner.head(key)

    def exists(self, key):
        self.calls.append(("head", key))
        return self.inner.exists(key)

    def get(self, key):
        self.calls.append(("get", key))
        return self.inner.get(key)

    def get_range(self, key, start, end):
        self.calls.append(("get", key))
        return self.inner.get_range(key, start, end)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Scanned:
    def __init__(self, demo: Demo, report: dict, calls: list, counted: int):
        self.demo, self.report, self.calls, self.counted = demo, report, calls, counted


def library_scan(demo: Demo, spy: bool = False):
    """scan_store through open_stores; returns (report dict, calls, requests counted by the store)."""
    with open_stores(demo.settings) as stores:
        before = sum(stores.objects.request_counts().values())
        target = replace(stores, objects=Spy(stores.objects), _opened=[]) if spy else stores
        report = scan_store(target).as_dict()
        counted = sum(stores.objects.request_counts().values()) - before
    demo.release()
    return report, (target.objects.calls if spy else None), counted


@pytest.fixture(scope="module")
def scanned(pristine, tmp_path_factory) -> Scanned:
    demo = pristine.copy(tmp_path_factory.mktemp(f"scanned-{pristine.pk}"))
    report, calls, counted = library_scan(demo, spy=True)
    return Scanned(demo, report, calls, counted)


def records_by_doc(report: dict) -> dict[str, dict]:
    ids = [r["document_id"] for r in report["documents"]]
    assert len(ids) == len(set(ids)), "a document reported twice"
    return {r["document_id"]: r for r in report["documents"]}


def ledger_docs(demo: Demo) -> dict[str, dict]:
    return demo.snapshot(milvus=False, objects=False)["ledger"]["documents"]


def test_scan_classifies_every_document_as_the_ground_truth(scanned):
    demo, report = scanned.demo, scanned.report
    records = records_by_doc(report)
    assert set(records) == {d["document_id"] for d in demo.docs}
    rows = ledger_docs(demo)
    assert set(rows) == set(records)
    wrong = []
    for d in demo.docs:
        rec, row = records[d["document_id"]], rows[d["document_id"]]
        got = (rec["path"], rec["state"], row["path"], row["state"], rec["affected_chunks"], row["affected_chunks"])
        want = (d["expected_path"], d["expected_state"]) * 2 + (len(d["affected_chunks"]),) * 2
        if got != want:
            wrong.append(f"{d['filename']} ({d['scenario']}): got {got}, want {want}")
        assert rec["reason"] and row["reason"] == rec["reason"]
    assert not wrong, "\n".join(wrong)
    assert {d["expected_path"] for d in demo.docs} == {"keys", "pdf", "reprocess", "none"}
    assert report["affected_chunks"] == sum(len(d["affected_chunks"]) for d in demo.docs)
    # a scan journals nothing
    ledger = demo.snapshot(milvus=False, objects=False)["ledger"]
    assert not ledger["chunk_journal"] and not ledger["object_journal"]


def _owner(demo: Demo, key: str) -> str | None:
    """The document an object key or listing prefix belongs to (image prefix or source key)."""
    for d in demo.docs:
        if key.startswith(f"{d['dataset_id']}/{d['document_id']}/"):
            return d["document_id"]
        if unquote(key) == f"{d['dataset_id']}/{d['filename']}" or key == f"{d['dataset_id']}/{d['filename']}":
            return d["document_id"]
    return None


def test_scan_calls_the_bucket_only_where_keys_leave_pages_open(scanned):
    demo = scanned.demo
    by_doc: dict[str, list[tuple[str, str]]] = {}
    for op, key in scanned.calls:
        owner = _owner(demo, key)
        assert owner is not None, f"scan made a request for {key!r}, which belongs to no document"
        by_doc.setdefault(owner, []).append((op, key))
    # Construction knowledge: which chunk keys name their page.
    needs_listing = {
        d["document_id"] for d in demo.docs if any(c["page_from_keys"] != "key" for c in d["affected_chunks"])
    }
    needs_source = {d["document_id"] for d in demo.docs if d["affected_chunks"] and d["expected_path"] != "keys"}
    self_sufficient = [d for d in demo.docs if d["document_id"] not in needs_listing | needs_source]
    assert any(d["affected_chunks"] for d in self_sufficient) and needs_listing - needs_source  # both kinds exist
    for d in self_sufficient:
        assert d["document_id"] not in by_doc, f"{d['filename']}: {by_doc[d['document_id']]}"
    for d in demo.docs:
        calls = by_doc.get(d["document_id"], [])
        lists = [k for op, k in calls if op == "list"]
        heads = [k for op, k in calls if op == "head"]
        assert not [c for c in calls if c[0] not in ("list", "head")], f"{d['filename']}: {calls}"
        if d["document_id"] in needs_listing:
            assert lists == [f"{d['dataset_id']}/{d['document_id']}/images/"], d["filename"]
        else:
            assert not lists, d["filename"]
        if d["document_id"] in needs_source:
            assert 1 <= len(heads) <= 3, (d["filename"], heads)
            if d["source_key"] is not None:
                assert heads[-1] == d["source_key"], (d["filename"], heads)  # stops at the first hit
        else:
            assert not heads, d["filename"]
    # the report's figure is the number of requests the store counted (one page per listing here)
    assert scanned.report["object_requests"] == scanned.counted == len(scanned.calls)


def test_second_scan_changes_nothing_and_duplicates_nothing(scanned, tmp_path):
    demo = scanned.demo.copy(tmp_path)
    before = demo.snapshot()
    report, _, _ = library_scan(demo)
    after = demo.snapshot()
    assert after == before, "a second scan changed the stores:\n" + diff(before, after)
    assert len(after["ledger"]["documents"]) == len(demo.docs)
    assert records_by_doc(report).keys() == records_by_doc(scanned.report).keys()
    for rec in report["documents"]:
        first = records_by_doc(scanned.report)[rec["document_id"]]
        assert rec["state"] == first["state"] and rec["reason"], (rec, first)
        if first["state"] in DONE_STATES:  # reported as already done, not classified again
            assert rec["path"] in (None, first["path"]) and rec["affected_chunks"] == 0, rec
        else:
            assert (rec["path"], rec["reason"], rec["affected_chunks"]) == (
                first["path"],
                first["reason"],
                first["affected_chunks"],
            )


def test_rescan_after_migration_never_counts_done_documents(pristine, tmp_path):
    demo = pristine.copy(tmp_path)
    keys_docs = {d["document_id"] for d in demo.by_path("keys")}
    # The point of the test: keys-path chunks whose true page is 0 still match the affected filter.
    zero = [c["chunk_id"] for d in demo.by_path("keys") for c in d["affected_chunks"] if c["true_page"] == 0]
    assert zero, "the demo has no keys-path chunk on page 0"
    library_scan(demo)
    with open_stores(demo.settings) as stores:
        summary = run_migration(stores, RunOptions(), RunLimits(), Selection())
    assert (summary.migrated, summary.failed) == (len(keys_docs), 0), summary.errors
    rows = demo.snapshot(objects=False, ledger=False)["milvus"]["rows"]
    assert all(rows[c]["page"] == 0 and rows[c]["chunk_type"] in ("ocr", "image") for c in zero)

    todo = [d for d in demo.docs if d["expected_state"] == "pending" and d["expected_path"] != "keys"]
    for stage in ("migrated", "verified"):
        before = demo.snapshot(milvus=False, objects=False)["ledger"]
        report, _, _ = library_scan(demo)
        after = demo.snapshot(milvus=False, objects=False)["ledger"]
        assert after == before, f"a rescan after {stage} changed the ledger:\n" + diff(before, after)
        records = records_by_doc(report)
        for doc in keys_docs:
            assert records[doc]["state"] == stage and records[doc]["affected_chunks"] == 0, records[doc]
            assert records[doc]["path"] is None
        assert report["affected_chunks"] == sum(len(d["affected_chunks"]) for d in todo)
        done = sum(1 for d in demo.docs if d["document_id"] in keys_docs or d["expected_state"] in DONE_STATES)
        assert report["totals"]["done"] == done and "keys" not in report["totals"], report["totals"]
        if stage == "migrated":
            with open_stores(demo.settings) as stores:
                assert verify_documents(stores).as_dict()["ok"]
            demo.release()

    # rolled back -> scanned again -> pending on the keys path (the one way back in)
    with open_stores(demo.settings) as stores:
        assert rollback_documents(stores).as_dict()["ok"]
    demo.release()
    report, _, _ = library_scan(demo)
    records, rows = records_by_doc(report), ledger_docs(demo)
    for doc in keys_docs:
        assert (records[doc]["path"], records[doc]["state"]) == ("keys", "pending")
        assert (rows[doc]["path"], rows[doc]["state"]) == ("keys", "pending")


def test_scan_json_has_one_record_per_document(pristine, tmp_path):
    demo = pristine.copy(tmp_path)
    for attempt in (1, 2):
        report = demo.cli_json("scan")
        records = records_by_doc(report)
        assert set(records) == {d["document_id"] for d in demo.docs}, attempt
        for d in demo.docs:
            rec = records[d["document_id"]]
            assert isinstance(rec["reason"], str) and rec["reason"], rec
            if attempt == 1:
                assert (rec["path"], rec["state"]) == (d["expected_path"], d["expected_state"]), d["filename"]
        assert len(ledger_docs(demo)) == len(demo.docs)

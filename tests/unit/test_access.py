"""Usage-based priority: decay math, access-log parsing (bad rows name their line), and the
ledger side (accesses, enqueue, priority claims) on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from repage.domain.access import (
    AccessImportError,
    Decayed,
    aggregate,
    format_of,
    parse_access_log,
    parse_timestamp,
    rank_threshold,
    spread_datasets,
)
from repage.domain.records import ScanRecord
from repage.domain.states import RepairPath, State

H = 3600.0  # one-hour half-life keeps the numbers readable
T0 = 1_700_000_000.0


# --------------------------------------------------------------------------- decay


def test_a_hit_halves_every_half_life():
    d = Decayed(8.0, T0)
    assert d.value(T0, H) == 8.0
    assert d.value(T0 + H, H) == pytest.approx(4.0)
    assert d.value(T0 + 3 * H, H) == pytest.approx(1.0)


def test_adding_hits_is_order_independent():
    hits = [(1.0, T0), (2.0, T0 + 1800), (5.0, T0 + 7200), (1.0, T0 - 3600)]
    forward = Decayed(0.0, 0.0)
    for w, at in hits:
        forward = forward.add(w, at, H)
    backward = Decayed(0.0, 0.0)
    for w, at in reversed(hits):
        backward = backward.add(w, at, H)
    now = T0 + 10_000
    expected = sum(w * 2 ** (-(now - at) / H) for w, at in hits)
    assert forward.value(now, H) == pytest.approx(expected)
    assert backward.value(now, H) == pytest.approx(expected)


def test_rank_orders_by_decayed_count_at_any_moment():
    old_popular = Decayed(100.0, T0)  # 100 hits, long ago
    recent = Decayed(3.0, T0 + 6 * H)  # 3 hits, 6 half-lives later: 100/64 < 3
    assert recent.rank(H) > old_popular.rank(H)
    for now in (T0 + 6 * H, T0 + 50 * H):
        assert (recent.value(now, H) > old_popular.value(now, H)) == (recent.rank(H) > old_popular.rank(H))


def test_min_accesses_threshold_matches_the_decayed_value():
    d = Decayed(4.0, T0)
    for now in (T0, T0 + H, T0 + 2 * H, T0 + 3 * H):
        for n in (1, 2, 3, 4, 5):
            assert (d.rank(H) >= rank_threshold(n, now, H)) == (d.value(now, H) >= n - 1e-9)
    with pytest.raises(ValueError):
        rank_threshold(0, T0, H)


def test_extreme_times_do_not_overflow():
    assert Decayed(1.0, T0).value(T0 + 1e9, H) == 0.0
    assert math.isfinite(Decayed(1.0, T0).add(1.0, T0 + 1e9, H).score)
    assert Decayed(0.0, 0.0).rank(H) == -math.inf


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1700000000", T0),
        ("1700000000.5", T0 + 0.5),
        ("1700000000000", T0),
        (T0, T0),
        ("2023-11-14T22:13:20Z", T0),
        ("2023-11-14T22:13:20+00:00", T0),
        ("2023-11-14 22:13:20", T0),
        ("2023-11-14T23:13:20+01:00", T0),
    ],
)
def test_timestamps(text, expected):
    assert parse_timestamp(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["yesterday", "", "-5", True, None, "2023-13-01"])
def test_bad_timestamps(text):
    with pytest.raises(ValueError):
        parse_timestamp(text)


def rows(text: str, fmt: str, now: float | None = None):
    return list(parse_access_log(text.splitlines(keepends=True), fmt, "log." + fmt, now=now))


def test_csv_rows():
    got = rows("document_id,dataset_id,timestamp,count\nd1,ds,1700000000,\n,ds,2023-11-14T22:13:20Z,3\n", "csv")
    assert [(r.line, r.document_id, r.dataset_id, r.at, r.weight) for r in got] == [
        (2, "d1", "ds", T0, 1.0),
        (3, None, "ds", T0, 3.0),
    ]


def test_jsonl_rows_skip_blank_lines_and_accept_aliases():
    text = (
        '{"document_id": "d1", "at": 1700000000}\n\n'
        '{"dataset_id": "ds", "created_at": "2023-11-14T22:13:20Z", "weight": 2}\n'
    )
    got = rows(text, "jsonl")
    assert [(r.line, r.document_id, r.dataset_id, r.weight) for r in got] == [
        (1, "d1", None, 1.0),
        (3, None, "ds", 2.0),
    ]


@pytest.mark.parametrize(
    "fmt,text,where,needle",
    [
        ("csv", "document_id,timestamp\nd1,1700000000\nd2,soon\n", "log.csv:3:", "timestamp 'soon'"),
        ("csv", "document_id,timestamp\n,1700000000\n", "log.csv:2:", "document_id or a dataset_id"),
        ("csv", "document_id\nd1\n", "log.csv:2:", "needs a timestamp"),
        ("csv", "user,timestamp\nu,1\n", "log.csv:1:", "header needs a document_id"),
        ("csv", "document_id,timestamp\nd1,1700000000,extra\n", "log.csv:2:", "more cells"),
        ("csv", "document_id,timestamp,count\nd1,1700000000,-2\n", "log.csv:2:", "positive"),
        ("jsonl", '{"document_id": "d1", "timestamp": 1700000000}\n{"document_id": \n', "log.jsonl:2:", "not JSON"),
        ("jsonl", '["d1", 1700000000]\n', "log.jsonl:1:", "JSON object"),
        ("jsonl", '{"document_id": 5.5, "timestamp": 1700000000}\n', "log.jsonl:1:", "document_id must be a string"),
        ("jsonl", '{"document_id": "a\\u0000b", "timestamp": 1700000000}\n', "log.jsonl:1:", "control"),
        ("jsonl", '{"document_id": "d", "timestamp": 4000000000}\n', "log.jsonl:1:", "future"),
    ],
)
def test_bad_rows_give_one_line_naming_the_line(fmt, text, where, needle):
    with pytest.raises(AccessImportError) as info:
        rows(text, fmt, now=T0)
    message = str(info.value)
    assert message.startswith(where) and needle in message and "\n" not in message


def test_format_of():
    assert format_of("x.CSV") == "csv" and format_of("q.ndjson") == "jsonl" and format_of("x.log", "jsonl") == "jsonl"
    with pytest.raises(AccessImportError):
        format_of("x.log")


def test_aggregate_and_dataset_spread():
    text = (
        '{"document_id": "a", "dataset_id": "ds", "timestamp": 1700000000}\n'
        '{"document_id": "a", "timestamp": 1700003600}\n'
        '{"dataset_id": "ds", "timestamp": 1700003600, "count": 2}\n'
        '{"dataset_id": "empty", "timestamp": 1700003600}\n'
    )
    agg = aggregate(rows(text, "jsonl"), H)
    assert agg.rows == 4 and agg.dataset_of == {"a": "ds"}
    assert agg.documents["a"].value(T0 + H, H) == pytest.approx(1.5)
    docs = spread_datasets(agg, {"ds": ["a", "b"]}, H)
    assert docs["a"].value(T0 + H, H) == pytest.approx(3.5)
    assert docs["b"].value(T0 + H, H) == pytest.approx(2.0)
    assert set(docs) == {"a", "b"}


def test_access_and_lazy_modules_import_no_vendor_sdk():
    code = (
        "import sys, repage.domain.access, repage.migration.lazy; "
        "print([m for m in ('pymilvus', 'obstore', 'sqlalchemy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the ledger side


def scanned(ledger, *docs: str, path: RepairPath = RepairPath.KEYS) -> None:
    ledger.upsert_scan([ScanRecord(d, "ds", f"{d}.pdf", path, State.PENDING, "page 0", 2) for d in docs])


def claim_order(ledger, **kwargs) -> list[str]:
    return [c.document_id for c in ledger.claim_batch("t", 100, 60, **kwargs)]


def test_record_accesses_adds_up_and_orders_priority_claims(ledger):
    scanned(ledger, "a", "b", "c", "d")
    ledger.record_accesses({"b": ("ds", Decayed(5.0, T0)), "c": (None, Decayed(2.0, T0))}, H)
    ledger.record_accesses({"c": (None, Decayed(4.0, T0 + H))}, H)  # c: 2/2 + 4 = 5 at T0+H, b: 2.5
    top = {r.document_id: r for r in ledger.top_accesses()}
    assert Decayed(top["c"].score, top["c"].scored_at).value(T0 + H, H) == pytest.approx(5.0)
    assert top["c"].dataset_id == "ds" and top["c"].state == State.PENDING
    ledger.set_priority({"d": 1.0})  # a manual priority still goes before accesses
    assert claim_order(ledger, order="priority") == ["d", "c", "b", "a"]


def test_min_access_rank_filters_claims(ledger):
    scanned(ledger, "a", "b", "c")
    ledger.record_accesses({"a": (None, Decayed(1.0, T0)), "b": (None, Decayed(8.0, T0))}, H)
    assert claim_order(ledger, min_access_rank=rank_threshold(3, T0 + H, H)) == ["b"]  # b: 4 left, a: 0.5
    assert claim_order(ledger, order="oldest") == ["a", "c"]


def test_enqueue_once_claims_first_and_clears(ledger):
    scanned(ledger, "a", "b", "c")
    ledger.record_accesses({"a": (None, Decayed(50.0, T0))}, H)
    assert ledger.enqueue(["c", "new"]) == {"c": "enqueued", "new": "enqueued"}
    assert ledger.enqueue(["c", "c", "new"]) == {"c": "queued", "new": "queued"}
    assert [e.document_id for e in ledger.events(kinds=["enqueued"])] == ["c", "new"]
    assert ledger.enqueued(unscanned_only=True) == ["new"]
    assert claim_order(ledger, enqueued_only=True) == ["c"]
    assert ledger.clear_enqueued(keep_paths={RepairPath.KEYS}) == 0  # c is running: its request stays
    assert claim_order(ledger, order="priority") == ["a", "b"]  # enqueued before accesses, shown above


def test_priority_order_takes_enqueued_documents_before_used_ones(ledger):
    scanned(ledger, "a", "b", "c")
    ledger.record_accesses({"a": (None, Decayed(50.0, T0))}, H)
    ledger.set_priority({"c": 9.0})
    ledger.enqueue(["b"])
    assert claim_order(ledger, order="priority") == ["b", "c", "a"]


def test_enqueue_respects_states_and_retries_failed_on_request(ledger):
    scanned(ledger, "f", "m", "p")
    scanned(ledger, "pdf", path=RepairPath.PDF)
    claims = {c.document_id: c for c in ledger.claim_batch("t", 10, 60, document_ids=["f", "m"])}
    ledger.transition("f", State.FAILED, token=claims["f"].fencing_token, error="boom")
    ledger.transition("m", State.MIGRATED, token=claims["m"].fencing_token)
    assert ledger.enqueue(["f", "m", "pdf"]) == {"f": "failed", "m": "migrated", "pdf": "enqueued"}
    assert ledger.enqueue(["f"], retry_failed=True) == {"f": "enqueued"}
    assert ledger.get("f").state == State.PENDING
    assert ledger.clear_enqueued(keep_paths={RepairPath.KEYS}) == 1  # pdf: a keys-only worker cannot take it
    assert ledger.enqueued() == ["f"]
    assert ledger.clear_enqueued(["f"]) == 1 and ledger.enqueued() == []


def test_documents_by_dataset_and_event_pruning_by_kind(ledger):
    scanned(ledger, "a", "b")
    assert ledger.document_ids_by_dataset(["ds", "nope"]) == {"ds": ["a", "b"]}
    ledger.add_event("read-latency", detail=json.dumps({"p95": 1}))
    ledger.add_event("migrated")
    assert ledger.prune_events(ledger.db_now() + 1, kinds=["read-latency"]) == 1
    assert [e.kind for e in ledger.events()] == ["migrated"]

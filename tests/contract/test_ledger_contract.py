"""The ledger contract (docs/design.md §4), run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import multiprocessing
import queue
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from repage.domain.records import ChunkJournalEntry, Claim, JournalIntent, ObjectJournalEntry, ObjectState, ScanRecord
from repage.domain.states import TRANSITIONS, RepairPath, State
from repage.errors import ConfigError, IllegalTransition, StaleLease, StoreError, StoreUnavailable
from repage.stores.ledger import SCHEMA_VERSION, Ledger

N_CONCURRENT = 200


def rec(
    doc: str,
    state: State = State.PENDING,
    *,
    path: RepairPath = RepairPath.KEYS,
    reason: str = "page 0",
    affected: int = 3,
    total: int | None = None,
    dataset: str = "ds1",
    chunk_keys: tuple[tuple[str, str], ...] = (),
) -> ScanRecord:
    return ScanRecord(doc, dataset, f"{doc}.pdf", path, state, reason, affected, total, chunk_keys=chunk_keys)


def claim_one(ledger: Ledger, doc: str, lease: float = 60.0) -> Claim:
    (claim,) = ledger.claim_batch("tester", 1, lease, document_ids=[doc])
    return claim


def wait_for_db_clock(ledger: Ledger, moment: float) -> None:
    """Poll the database clock (not ours) until it has passed `moment`."""
    for _ in range(100_000):
        if ledger.db_now() > moment:
            return
    raise AssertionError("database clock did not advance")


# Legal routes from a fresh pending document to each state (None = claim).
ROUTES: dict[State, list[State | None]] = {
    State.PENDING: [],
    State.RUNNING: [None],
    State.MIGRATED: [None, State.MIGRATED],
    State.VERIFIED: [None, State.MIGRATED, State.VERIFIED],
    State.ROLLED_BACK: [None, State.MIGRATED, State.ROLLED_BACK],
    State.REVIEW: [None, State.REVIEW],
    State.DEFERRED: [None, State.DEFERRED],
    State.FAILED: [None, State.FAILED],
    State.UNRECOVERABLE: [None, State.UNRECOVERABLE],
    State.SKIPPED: [],  # scanned as skipped
    State.DRIFTED: [None, State.MIGRATED, State.DRIFTED],
}


def put_in(ledger: Ledger, doc: str, state: State) -> int | None:
    """Drive `doc` (already scanned) into `state` along legal edges; its live token if running."""
    token = None
    for step in ROUTES[state]:
        if step is None:
            token = claim_one(ledger, doc).fencing_token
        else:
            ledger.transition(doc, step, token=token)
            token = None
    return token


# --------------------------------------------------------------------------- schema and URLs


def test_schema_creation_is_idempotent_and_versioned(ledger_url):
    with Ledger(ledger_url) as first:
        first.upsert_scan([rec("d1")])
    with Ledger(ledger_url) as second:  # existing tables: nothing recreated, nothing lost
        assert second.get("d1").state == State.PENDING
        with second._engine.begin() as conn:
            assert conn.scalar(sa.text("SELECT value FROM repage_meta WHERE key = 'schema_version'")) == str(
                SCHEMA_VERSION
            )
            conn.execute(
                sa.text("UPDATE repage_meta SET value = :v WHERE key = 'schema_version'"),
                {"v": str(SCHEMA_VERSION + 1)},
            )
    with pytest.raises(ConfigError, match="newer"):
        Ledger(ledger_url)


def test_a_version_1_ledger_is_upgraded_in_place(ledger_url):
    with Ledger(ledger_url) as first:
        first.upsert_scan([rec("d1")])
        with first._engine.begin() as conn:  # back to version 1: no documents.chunk_keys
            conn.execute(sa.text("ALTER TABLE documents DROP COLUMN chunk_keys"))
            conn.execute(sa.text("UPDATE repage_meta SET value = '1' WHERE key = 'schema_version'"))
    with Ledger(ledger_url) as upgraded:
        assert upgraded.get("d1").state == State.PENDING
        upgraded.upsert_scan([rec("d2", chunk_keys=(("7", "d2\t0"),))])
        assert upgraded.chunk_keys(["d1", "d2"]) == {"d2": [("7", "d2\t0")]}
        with upgraded._engine.begin() as conn:
            assert conn.scalar(sa.text("SELECT value FROM repage_meta WHERE key = 'schema_version'")) == "2"


def test_sqlite_creates_its_folder_and_uses_wal(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'a' / 'b' / 'ledger.db'}") as led:
        assert (tmp_path / "a" / "b" / "ledger.db").exists()
        with led._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


@pytest.mark.parametrize(
    "url, error",
    [
        ("postgresql://user:s3cret@127.0.0.1:1/nodb", StoreUnavailable),
        ("mysql://user:s3cret@localhost/db", ConfigError),
        ("://user:s3cret@nowhere", ConfigError),
        ("sqlite://", ConfigError),
    ],
)
def test_bad_urls_give_one_redacted_line(url, error):
    with pytest.raises(error) as info:
        Ledger(url)
    message = str(info.value)
    assert "s3cret" not in message and "\n" not in message


def test_postgres_urls_use_psycopg3():
    for raw in ("postgres://u@h/db", "postgresql://u@h/db", "postgresql+psycopg2://u@h/db"):
        assert Ledger._parse_url(raw).drivername == "postgresql+psycopg"


def test_describe_redacts_password(ledger_url):
    url = ledger_url.replace("postgresql://postgres@", "postgresql://postgres:pw@")
    with Ledger(url) as led:  # trust auth: the password is ignored by the server
        assert "pw@" not in led.describe()


def test_db_now_is_epoch_seconds_from_the_database(ledger):
    first, second = ledger.db_now(), ledger.db_now()
    assert first <= second
    assert abs(first - time.time()) < 300  # same host here; epoch seconds, not days


# --------------------------------------------------------------------------- scan


def test_upsert_scan_is_idempotent_and_batched(ledger):
    records = [rec(f"d{i:04d}") for i in range(1100)] + [rec(f"s{i}", State.SKIPPED, affected=0) for i in range(3)]
    ledger.upsert_scan(iter(records))  # an iterator: the scan streams
    ledger.upsert_scan(records)
    assert ledger.counts() == {("pending", "keys"): 1100, ("skipped", "keys"): 3}
    assert len(list(ledger.documents())) == 1103


def test_rescan_updates_open_documents_and_leaves_done_and_running_alone(ledger):
    ledger.upsert_scan(
        [rec(d, total=10) for d in ("open", "failed", "done", "running", "rolled")]
        + [rec("skip", State.SKIPPED, affected=0)]
    )
    put_in(ledger, "failed", State.FAILED)
    put_in(ledger, "done", State.MIGRATED)
    put_in(ledger, "rolled", State.ROLLED_BACK)
    token = put_in(ledger, "running", State.RUNNING)

    ledger.upsert_scan(
        [
            rec(d, path=RepairPath.PDF, reason="rescan", affected=7)
            for d in ("open", "failed", "done", "running", "rolled", "skip")
        ]
    )

    for doc, state in (("open", State.PENDING), ("failed", State.FAILED)):
        got = ledger.get(doc)
        assert (got.state, got.path, got.reason, got.affected_chunks, got.total_chunks) == (
            state,
            RepairPath.PDF,
            "rescan",
            7,
            10,
        )  # total_chunks None keeps the known count
    for doc, state, affected in (
        ("done", State.MIGRATED, 3),
        ("running", State.RUNNING, 3),
        ("skip", State.SKIPPED, 0),
    ):
        got = ledger.get(doc)
        expected = (state, RepairPath.KEYS, "page 0", affected)
        assert (got.state, got.path, got.reason, got.affected_chunks) == expected, doc
    assert ledger.get("running").fencing_token == token
    assert ledger.get("rolled").state == State.PENDING  # rolled_back -> pending: scanned again


def test_scan_only_creates_new_documents_on_edges_from_new(ledger):
    for state in State:
        if state not in TRANSITIONS[None]:
            with pytest.raises(IllegalTransition):
                ledger.upsert_scan([rec("x", state)])
    assert ledger.get("x") is None


# --------------------------------------------------------------------------- transitions


def test_every_transition_follows_the_table(ledger):
    pairs = [(src, dst) for src in State for dst in State]
    ledger.upsert_scan([rec(f"{s}>{d}", State.SKIPPED if s == State.SKIPPED else State.PENDING) for s, d in pairs])
    for src, dst in pairs:
        doc = f"{src}>{dst}"
        token = put_in(ledger, doc, src)
        assert ledger.get(doc).state == src
        if dst in TRANSITIONS.get(src, frozenset()) and dst != State.RUNNING:
            ledger.transition(doc, dst, token=token)
            assert ledger.get(doc).state == dst, doc
        else:  # entering running is claim_batch's job, never transition's
            with pytest.raises(IllegalTransition):
                ledger.transition(doc, dst, token=token)
            assert ledger.get(doc).state == src, doc
    for dst in State:  # (new) -> anything: documents enter only through a scan
        with pytest.raises(IllegalTransition):
            ledger.transition("never-scanned", dst)


def test_transition_bookkeeping(ledger):
    ledger.upsert_scan([rec("d")])
    token = claim_one(ledger, "d").fencing_token
    ledger.transition("d", State.FAILED, token=token, error="boom", dollars=0.25, object_requests_a=2)
    got = ledger.get("d")
    assert (got.attempts, got.last_error, got.lease_owner, got.lease_expires) == (1, "boom", None, None)
    assert got.finished_at is not None
    ledger.transition("d", State.PENDING, reason="retry")
    token = claim_one(ledger, "d").fencing_token
    ledger.transition(
        "d", State.MIGRATED, token=token, dollars=0.5, object_requests_a=3, bytes_read=100, total_chunks=12
    )
    got = ledger.get("d")
    assert (got.attempts, got.dollars, got.object_requests_a, got.bytes_read, got.total_chunks) == (
        1,
        0.75,
        5,
        100,
        12,
    )  # spend and requests add up; counts are set
    assert ledger.totals()["dollars"] == pytest.approx(0.75)
    assert [r.document_id for r in ledger.last_errors(5)] == ["d"]
    with pytest.raises(TypeError):
        ledger.transition("d", State.VERIFIED, state="pending")


# --------------------------------------------------------------------------- claims and leases


def test_claims_give_increasing_fencing_tokens(ledger):
    ledger.upsert_scan([rec("d")])
    tokens = []
    for _ in range(4):
        claim = claim_one(ledger, "d")
        tokens.append(claim.fencing_token)
        ledger.transition("d", State.PENDING, token=claim.fencing_token)  # a clean stop
    assert tokens == sorted(set(tokens)) and len(tokens) == 4
    assert ledger.get("d").attempts == 0  # a claim is not an attempt that failed


def test_claim_filters_and_orders(ledger):
    ledger.upsert_scan([rec("a"), rec("b", path=RepairPath.PDF), rec("c", dataset="ds2"), rec("d")])
    ledger.set_priority({"d": 5.0, "c": 1.0})
    assert [c.document_id for c in ledger.claim_batch("o", 1, 60, order="priority")] == ["d"]
    assert [c.document_id for c in ledger.claim_batch("o", 9, 60, paths={RepairPath.PDF})] == ["b"]
    assert [c.document_id for c in ledger.claim_batch("o", 9, 60, dataset_id="ds2")] == ["c"]
    assert ledger.claim_batch("o", 9, 60, paths=set()) == []
    assert [c.document_id for c in ledger.claim_batch("o", 9, 60, order="random")] == ["a"]
    assert ledger.claim_batch("o", 9, 60) == []
    with pytest.raises(ValueError):
        ledger.claim_batch("o", 1, 60, order="newest")


def _claim_until_empty(ledger: Ledger, owner: str) -> list[str]:
    got: list[str] = []
    while claims := ledger.claim_batch(owner, 3, 60.0):
        got += [c.document_id for c in claims]
    return got


def _assert_disjoint_and_complete(results: list[list[str]]) -> None:
    claimed = [d for ids in results for d in ids]
    assert len(claimed) == len(set(claimed)), "a document was claimed twice"
    assert set(claimed) == {f"c{i:03d}" for i in range(N_CONCURRENT)}


def test_concurrent_threads_never_claim_the_same_document(ledger_url):
    with Ledger(ledger_url) as led:
        led.upsert_scan([rec(f"c{i:03d}") for i in range(N_CONCURRENT)])
    n = 6
    start, results, errors = threading.Barrier(n), [[] for _ in range(n)], []

    def work(i: int) -> None:
        try:
            with Ledger(ledger_url) as own:
                start.wait(timeout=30)
                results[i] = _claim_until_empty(own, f"thread-{i}")
        except Exception as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    _assert_disjoint_and_complete(results)


def _process_claimer(url: str, owner: str, start, out) -> None:
    try:
        with Ledger(url) as own:
            start.wait(timeout=60)
            out.put((owner, _claim_until_empty(own, owner)))
    except Exception as exc:
        out.put((owner, exc))


def test_concurrent_processes_never_claim_the_same_document(ledger_url):
    with Ledger(ledger_url) as led:
        led.upsert_scan([rec(f"c{i:03d}") for i in range(N_CONCURRENT)])
    ctx = multiprocessing.get_context("spawn")  # each process builds its own engine
    n = 3
    start, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_process_claimer, args=(ledger_url, f"proc-{i}", start, out)) for i in range(n)]
    for p in procs:
        p.start()
    results, deadline = [], time.monotonic() + 90
    try:
        while len(results) < n:
            try:
                results.append(out.get(timeout=1))
            except queue.Empty:  # fail fast if a claimer died instead of reporting
                assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]
                assert time.monotonic() < deadline, "claimer processes did not finish"
    finally:
        for p in procs:
            p.join(timeout=30)
    failures = [r for _, r in results if isinstance(r, Exception)]
    assert not failures, failures
    _assert_disjoint_and_complete([ids for _, ids in results])


def test_stale_token_is_refused_everywhere(ledger):
    ledger.upsert_scan([rec("d")])
    old = claim_one(ledger, "d").fencing_token
    ledger.add_object_journal("d", old, [ObjectJournalEntry("a/0_x.pdf-1-0.png", "a/1_0.png")])
    ledger.transition("d", State.PENDING, token=old)
    new = claim_one(ledger, "d").fencing_token
    assert new > old
    stale_writes = [
        lambda: ledger.transition("d", State.MIGRATED, token=old),
        lambda: ledger.add_chunk_journal("d", old, [ChunkJournalEntry('{"chunk_id":"d_0"}')]),
        lambda: ledger.add_object_journal("d", old, [ObjectJournalEntry("k1", "k2")]),
        lambda: ledger.mark_chunks_applied("d", old, ['{"chunk_id":"d_0"}']),
        lambda: ledger.set_object_state("d", old, "a/0_x.pdf-1-0.png", "a/1_0.png", ObjectState.COPIED),
        lambda: ledger.renew_lease("d", old, 60),
        lambda: ledger.transition("d", State.MIGRATED),  # running: a token is required
        lambda: ledger.add_chunk_journal("d", None, [ChunkJournalEntry("x")]),  # no maintenance on a leased doc
    ]
    for write in stale_writes:
        with pytest.raises(StaleLease):
            write()
    bulk_writes = [  # the batch forms report a stale token instead of raising
        lambda: ledger.set_objects_state({"d": (old, [("a/0_x.pdf-1-0.png", "a/1_0.png")])}, ObjectState.COPIED),
        lambda: ledger.add_journals([JournalIntent("d", old, chunks=[ChunkJournalEntry('{"chunk_id":"d_0"}')])]),
        lambda: ledger.mark_chunks_applied_many({"d": (old, {'{"chunk_id":"d_0"}': None})}),
        lambda: {d: "lost" for d in ledger.renew_leases({"d": old}, 60)},
    ]
    for write in bulk_writes:
        assert set(write()) == {"d"}
    assert ledger.chunk_journal("d") == []
    assert [e.state for e in ledger.object_journal("d")] == [ObjectState.INTENDED]
    ledger.transition("d", State.MIGRATED, token=new)
    with pytest.raises(StaleLease):  # the document is no longer running: every token is stale
        ledger.transition("d", State.VERIFIED, token=new)
    ledger.transition("d", State.VERIFIED)


def test_transition_many_moves_the_live_and_refuses_a_stale_token_alone(ledger):
    ledger.upsert_scan([rec(f"t{i}") for i in range(4)])
    tokens = {c.document_id: c.fencing_token for c in ledger.claim_batch("w", 4, lease_seconds=60)}
    ledger.transition("t1", State.PENDING, token=tokens["t1"])  # t1's lease is gone...
    tokens["t1"] = claim_one(ledger, "t1").fencing_token - 1  # ...and another worker holds it now
    ledger.transition("t3", State.PENDING, token=tokens["t3"])  # t3: claimed again with a short lease
    short = claim_one(ledger, "t3", lease=0.05)
    tokens["t3"] = short.fencing_token
    wait_for_db_clock(ledger, short.lease_expires)
    fields = lambda n: {  # noqa: E731
        "reason": f"{n} chunks",
        "total_chunks": n,
        "images_to_move": 0,
        "object_requests_a": n,
        "object_requests_b": 2 * n,
        "bytes_read": 10 * n,
    }
    items = {d: (t, fields(i + 1)) for i, (d, t) in enumerate(sorted(tokens.items()))}
    items["t2"] = (tokens["t2"], {"total_chunks": 5})  # another set of fields: its own statement
    refused = ledger.transition_many(State.MIGRATED, items)
    assert set(refused) == {"t1", "t3"}  # the stale token and the expired lease, each alone
    moved = ledger.get("t0")
    assert (moved.state, moved.reason, moved.total_chunks, moved.lease_owner, moved.lease_expires) == (
        State.MIGRATED,
        "1 chunks",
        1,
        None,
        None,
    )
    assert (moved.object_requests_a, moved.object_requests_b, moved.bytes_read) == (1, 2, 10)
    assert (ledger.get("t2").state, ledger.get("t2").total_chunks) == (State.MIGRATED, 5)
    other = ledger.get("t1")
    assert (other.state, other.fencing_token) == (State.RUNNING, tokens["t1"] + 1)  # untouched
    assert ledger.get("t3").state == State.RUNNING  # expired, not yet released: untouched
    assert set(ledger.transition_many(State.MIGRATED, {"t0": (tokens["t0"], {})})) == {"t0"}  # not running
    assert set(ledger.transition_many(State.MIGRATED, {"t1": (None, {})})) == {"t1"}  # a token is required
    with pytest.raises(IllegalTransition):
        ledger.transition_many(State.VERIFIED, {"t1": (tokens["t1"] + 1, {})})  # running -> verified


def test_lease_expires_by_the_database_clock(ledger):
    ledger.upsert_scan([rec("short"), rec("long")])
    short = claim_one(ledger, "short", lease=0.05)
    long = claim_one(ledger, "long", lease=600)
    assert ledger.renew_lease("long", long.fencing_token, 900) > long.lease_expires
    wait_for_db_clock(ledger, short.lease_expires)
    # expired but not yet released: the conditional writes already refuse the token
    with pytest.raises(StaleLease):
        ledger.transition("short", State.MIGRATED, token=short.fencing_token)
    with pytest.raises(StaleLease):
        ledger.add_chunk_journal("short", short.fencing_token, [ChunkJournalEntry("x")])
    with pytest.raises(StaleLease):
        ledger.renew_lease("short", short.fencing_token, 60)
    assert ledger.release_expired() == 1
    assert ledger.release_expired() == 0
    got = ledger.get("short")
    assert (got.state, got.lease_owner, got.lease_expires) == (State.PENDING, None, None)
    assert ledger.get("long").state == State.RUNNING
    with pytest.raises(StaleLease):
        ledger.transition("short", State.MIGRATED, token=short.fencing_token)
    again = claim_one(ledger, "short")
    assert again.fencing_token == short.fencing_token + 1
    with pytest.raises(StaleLease):
        ledger.transition("short", State.MIGRATED, token=short.fencing_token)
    ledger.transition("short", State.MIGRATED, token=again.fencing_token)


# --------------------------------------------------------------------------- journals and reports


def test_journal_round_trip(ledger):
    ledger.upsert_scan([rec("d")])
    token = claim_one(ledger, "d").fencing_token
    a, b = '{"chunk_id":"d_0"}', '{"chunk_id":"d_1"}'
    ledger.add_chunk_journal(
        "d",
        token,
        [
            ChunkJournalEntry(
                a,
                old_pk="1",
                old_page=0,
                new_page=9,
                old_key="k/0_x.pdf-9-0.png",
                new_key="k/9_0.png",
                row_checksum="c0",
            ),
            ChunkJournalEntry(b, old_pk="2", old_page=0, new_page=0, row_checksum="c1"),
        ],
    )
    ledger.add_chunk_journal("d", token, [ChunkJournalEntry(a, old_pk="1", old_page=0, new_page=4)])  # supersedes
    ledger.mark_chunks_applied("d", token, [a], new_pks={a: "77"})
    entries = {e.identity: e for e in ledger.chunk_journal("d")}
    assert set(entries) == {a, b}
    assert (entries[a].new_page, entries[a].applied, entries[a].new_pk, entries[a].fencing_token) == (
        4,
        True,
        "77",
        token,
    )
    assert (entries[b].row_checksum, entries[b].applied, entries[b].document_id) == ("c1", False, "d")

    ledger.add_object_journal("d", token, [ObjectJournalEntry("k/0_x.pdf-9-0.png", "k/9_0.png", 123, "h")])
    ledger.set_object_state("d", token, "k/0_x.pdf-9-0.png", "k/9_0.png", ObjectState.COPIED)
    ledger.set_object_state("d", token, "k/0_x.pdf-9-0.png", "k/9_0.png", "verified", size=124)
    with pytest.raises(StoreError):
        ledger.set_object_state("d", token, "nope", "k/9_0.png", ObjectState.COPIED)
    (obj,) = ledger.object_journal("d")
    assert (obj.old_key, obj.new_key, obj.size, obj.content_hash, obj.state) == (
        "k/0_x.pdf-9-0.png",
        "k/9_0.png",
        124,
        "h",
        ObjectState.VERIFIED,
    )
    moves = [("k/0_x.pdf-9-1.png", "k/9_1.png"), ("k/0_x.pdf-9-2.png", "k/9_2.png")]
    ledger.add_object_journal("d", token, [ObjectJournalEntry(o, n, 1, "h") for o, n in moves])
    ledger.add_object_journal("d", token, [ObjectJournalEntry(*moves[0], 2, "h2")])  # supersedes
    assert ledger.set_objects_state({"d": (token, moves)}, ObjectState.VERIFIED) == {}
    by_key = {m.old_key: m for m in ledger.object_journal("d")}
    assert [(by_key[o].state, by_key[o].size) for o, _ in moves] == [
        (ObjectState.VERIFIED, 2),
        (ObjectState.VERIFIED, 1),
    ]
    refused = ledger.set_objects_state({"d": (token, [moves[0], ("nope", "k/9_1.png")])}, ObjectState.COPIED)
    assert "nope -> k/9_1.png" in refused["d"]  # all or nothing for the document
    assert by_key == {m.old_key: m for m in ledger.object_journal("d")}
    ledger.transition("d", State.MIGRATED, token=token)
    ledger.set_object_state("d", None, "k/0_x.pdf-9-0.png", "k/9_0.png", ObjectState.DELETED)  # gc
    assert ledger.object_journal("d")[0].state == ObjectState.DELETED


def test_batch_journal_calls_write_live_documents_and_name_the_lost(ledger):
    ledger.upsert_scan([rec(f"b{i}") for i in range(3)])
    tokens = {c.document_id: c.fencing_token for c in ledger.claim_batch("w", 3, lease_seconds=60)}
    ledger.transition("b1", State.PENDING, token=tokens["b1"])  # b1's lease is gone
    ident = lambda d: f'{{"chunk_id":"{d}_0"}}'  # noqa: E731
    intents = [
        JournalIntent(
            d,
            tokens[d],
            [ObjectJournalEntry(f"{d}/0_x.pdf-2-0.png", f"{d}/2_0.png", 1, "h")],
            [ChunkJournalEntry(ident(d), old_pk="1", old_page=0, new_page=2)],
        )
        for d in sorted(tokens)
    ]
    assert set(ledger.add_journals(intents)) == {"b1"}
    assert [len(ledger.chunk_journal(d)) for d in ("b0", "b1", "b2")] == [1, 0, 1]
    assert ledger.renew_leases(tokens, 120) == {"b1"}
    moves = {d: (tokens[d], [(f"{d}/0_x.pdf-2-0.png", f"{d}/2_0.png")]) for d in tokens}
    assert set(ledger.set_objects_state(moves, ObjectState.VERIFIED)) == {"b1"}
    assert [ledger.object_journal(d)[0].state for d in ("b0", "b2")] == [ObjectState.VERIFIED] * 2
    applied = ledger.mark_chunks_applied_many({d: (tokens[d], {ident(d): "9"}) for d in tokens})
    assert set(applied) == {"b1"}
    assert [(e.applied, e.new_pk, e.fencing_token) for d in ("b0", "b2") for e in ledger.chunk_journal(d)] == [
        (True, "9", tokens["b0"]),
        (True, "9", tokens["b2"]),
    ]


def test_reports(ledger):
    ledger.upsert_scan([rec(f"d{i:04d}", dataset="ds1" if i % 2 else "ds2") for i in range(1203)])
    docs = list(ledger.documents())
    assert [d.document_id for d in docs] == sorted(d.document_id for d in docs) and len(docs) == 1203
    assert len(list(ledger.documents(limit=1001))) == 1001
    assert len(list(ledger.documents(dataset_id="ds1"))) == 601
    assert list(ledger.documents(states={State.FAILED})) == []
    before = ledger.db_now()
    ledger.add_event("migrated", "d0001", count=2, detail="ok")
    ledger.add_event("error", "d0002", detail="boom")
    ledger.add_event("migrated", "d0003")
    assert [e.document_id for e in ledger.events(since=before, kinds=["migrated"])] == ["d0001", "d0003"]
    assert [e.kind for e in ledger.events(limit=2)] == ["error", "migrated"]
    assert ledger.events(kinds=["migrated"])[0].count == 2
    assert ledger.prune_events(ledger.db_now() + 1) == 3
    assert ledger.totals()["documents"] == 1203


def test_no_transaction_stays_open_between_calls(tmp_path):
    """Checked with a second SQLite writer that refuses to wait (PostgreSQL locks rows only)."""
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(ledger_url)
    ledger.upsert_scan([rec(f"d{i:04d}") for i in range(1500)])
    pages = ledger.documents()
    next(pages)  # a paged iterator suspended mid-way holds no transaction
    ledger.claim_batch("o", 1, 60)
    other = sqlite3.connect(ledger_url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # would raise "database is locked" if a writer were open
    other.execute("ROLLBACK")
    other.close()
    assert sum(1 for _ in pages) == 1499
    ledger.close()


def test_transaction_groups_writes_and_undoes_a_failed_one_alone(ledger):
    ledger.upsert_scan([rec("a"), rec("b"), rec("c")])
    a, b = claim_one(ledger, "a").fencing_token, claim_one(ledger, "b").fencing_token
    with ledger.transaction():
        ledger.add_chunk_journal("a", a, [ChunkJournalEntry('{"chunk_id":"a_0"}', new_page=3)])
        with pytest.raises(StaleLease):  # c is not running: refused, undone alone
            ledger.add_chunk_journal("c", 1, [ChunkJournalEntry('{"chunk_id":"c_0"}')])
        with pytest.raises(StaleLease):
            ledger.transition("b", State.MIGRATED, token=b + 1)
        ledger.transition("b", State.MIGRATED, token=b)
        with ledger.transaction():  # nested: joins the outer one
            ledger.renew_lease("a", a, 60)
    assert [c.new_page for c in ledger.chunk_journal("a")] == [3]
    assert ledger.chunk_journal("c") == []
    assert ledger.get("b").state == State.MIGRATED

    with pytest.raises(RuntimeError):  # an error leaving the block undoes all of it
        with ledger.transaction():
            ledger.transition("a", State.MIGRATED, token=a)
            raise RuntimeError("boom")
    assert ledger.get("a").state == State.RUNNING

"""Crash safety of the migration protocol (docs/design.md §5, §5.6).

A child process runs the migration and SIGKILLs itself at a step of the protocol: at
every named failpoint, at random step counts (`hit:N`, N drawn by a seeded RNG over the
steps an uninterrupted run hits), and, with the renumbering adapter, inside a write
(after the insert of a server-style upsert, before its delete). Once the dead worker's
leases expire, the next run must finish the work and leave the store equal to the
uninterrupted run's: every row by stable identity with all fields and its vector, no
row lost or duplicated, every object with its bytes and no orphaned copy; `verify`
passes and the journal records the primary keys the rows have now.

Two variants: the plain adapter through `python -m repage.cli run` (Milvus Lite via
`milvus-lite server`, a `later FLTR` collection: auto_id pk + chunk_id), and the
renumbering adapter (a real server's auto_id upsert: new primary keys, no partial
update) in a spawned process, on an `early FLTR` collection (identity document_id +
chunk_index) with dynamic fields.
"""

from __future__ import annotations

import random
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from repage.domain.states import State
from repage.migration.migrate import FAILPOINTS
from repage.migration.verify import verify_documents
from repage.stores.open import open_ledger
from tests.support.crash import (
    REFERENCE_LEASE_SECONDS,
    CleanRun,
    Schema,
    Snapshot,
    Template,
    build_synthetic,
    counted_run,
    diff_objects,
    diff_rows,
    diff_snapshots,
    drop_collection,
    object_hashes,
    open_for,
    resume,
    run_cli_child,
    run_renumbering_child,
    run_scan_killing_child,
    snapshot,
    wait_for_expired_leases,
)

pytestmark = pytest.mark.slow

SEED = 20_240_604
PLAIN_RANDOM_KILLS = 20
RENUMBERING_RANDOM_KILLS = 6
KILLED_TWICE = 3
SIGKILLED = -signal.SIGKILL


@dataclass
class Variant:
    name: str
    template: Template
    renumbering: bool
    clean: CleanRun
    reference: Snapshot
    kills: list[int]  # hit:N values for the random kills
    twice: list[tuple[int, int]]  # (N, M): killed at hit:N, then again at hit:M while resuming


def make_variant(name: str, uri: str, root: Path, schema: Schema, renumbering: bool, kills: int) -> Variant:
    synthetic = build_synthetic()
    template = Template(uri, root, synthetic, schema)
    workdir = root / "reference"
    workdir.mkdir()
    settings = template.clone(workdir, lease_seconds=REFERENCE_LEASE_SECONDS)
    try:
        with open_for(settings, renumbering) as stores:
            clean = counted_run(stores)
            report = verify_documents(stores)
            reference = snapshot(stores, synthetic.doc_ids)
    finally:
        drop_collection(settings)
    # The reference must itself be right, or equality with it proves nothing.
    assert clean.summary.failed == 0, clean.summary.errors
    assert not report.failed and len(report.passed) == clean.summary.migrated == len(synthetic.doc_ids) - 2
    problems = diff_rows(reference.rows, template.expected_logical()) + diff_objects(
        reference.objects, object_hashes(synthetic.expected_objects())
    )
    assert not problems, "\n".join(problems)
    assert reference.states == synthetic.states
    assert reference.row_count == len(synthetic.rows)
    rng = random.Random(f"{SEED}-{name}")
    random_kills = sorted(rng.sample(range(1, clean.hits + 1), kills))
    # the first kill in the first half, so the resumed run has well over M steps left
    twice = [(rng.randrange(1, clean.hits // 2), rng.randrange(1, 13)) for _ in range(KILLED_TWICE)]
    return Variant(name, template, renumbering, clean, reference, random_kills, twice)


@pytest.fixture(scope="module")
def plain(milvus_server_uri, tmp_path_factory) -> Variant:
    return make_variant(
        "plain",
        milvus_server_uri,
        tmp_path_factory.mktemp("crash-plain"),
        Schema(pk="auto", chunk_id_field=True, dynamic=False),
        False,
        PLAIN_RANDOM_KILLS,
    )


@pytest.fixture(scope="module")
def renumbering(milvus_server_uri, tmp_path_factory) -> Variant:
    return make_variant(
        "renumbering",
        milvus_server_uri,
        tmp_path_factory.mktemp("crash-renumbering"),
        Schema(pk="auto", chunk_id_field=False, dynamic=True),
        True,
        RENUMBERING_RANDOM_KILLS,
    )


Kill = str | int  # a failpoint spec, or (renumbering) the upsert to die inside


def crash_and_recover(variant: Variant, workdir: Path, *kills: Kill) -> dict[str, int]:
    """Kill a child at each of `kills` in turn (each next child once the leases of the last
    expired), then resume and compare with the reference.

    Returns the ledger's documents per state (and the duplicated chunks) as the last kill left them."""
    settings = variant.template.clone(workdir)
    doc_ids = variant.template.synthetic.doc_ids
    try:
        for i, kill in enumerate(kills):
            if i:  # the next run starts once the dead one's leases expired
                with open_ledger(settings) as ledger:
                    wait_for_expired_leases(ledger)
            if variant.renumbering:
                child = run_renumbering_child(
                    settings,
                    None if isinstance(kill, int) else kill,
                    kill_on_upsert=kill if isinstance(kill, int) else None,
                )
            else:
                child = run_cli_child(settings, workdir, kill)
            assert child.returncode == SIGKILLED, (
                f"kill {kill!r} of {kills}: child exited {child.returncode}, not by SIGKILL\n"
                f"{child.stdout[-2000:]}\n{child.stderr[-2000:]}"
            )
        with open_for(settings, variant.renumbering) as stores:
            crashed = snapshot(stores, doc_ids)
            left = dict(Counter(crashed.states.values()))
            left["duplicated_chunks"] = sum(len(rows) > 1 for rows in crashed.rows.values())

            summary = resume(stores)
            assert summary.failed == 0, summary.errors
            assert summary.stopped_because == "no more pending documents"
            report = verify_documents(stores)
            assert not report.failed, report.failed
            got = snapshot(stores, doc_ids)
            journal_problems = check_journal(stores, got, plain_keys=not variant.renumbering)
        problems = diff_snapshots(got, variant.reference) + journal_problems
        assert not problems, f"after kills {kills}:\n" + "\n".join(problems)
        assert len(report.passed) == variant.clean.summary.migrated
        return left
    finally:
        drop_collection(settings)


def check_journal(stores, got: Snapshot, *, plain_keys: bool) -> list[str]:
    """Every journalled chunk applied, with the primary key its one row has now (§5.4)."""
    problems = []
    for record in stores.ledger.documents(states={State.VERIFIED}):
        for entry in stores.ledger.chunk_journal(record.document_id):
            current = got.pks.get(entry.identity, [])
            if not entry.applied:
                problems.append(f"journal entry {entry.identity} not marked applied")
            if current != [entry.new_pk]:
                problems.append(f"journal entry {entry.identity}: new_pk {entry.new_pk}, rows now have {current}")
            if plain_keys and entry.old_pk != entry.new_pk:
                problems.append(f"journal entry {entry.identity}: Lite renumbered {entry.old_pk} -> {entry.new_pk}")
    return problems[:12]


# ---------------------------------------------------------------- the uninterrupted runs


@pytest.mark.parametrize("variant_name", ["plain", "renumbering"])
def test_uninterrupted_run_hits_every_step(request, variant_name):
    variant: Variant = request.getfixturevalue(variant_name)
    by_name = variant.clean.by_name
    assert set(by_name) == set(FAILPOINTS), by_name
    assert variant.clean.hits == sum(by_name.values())
    assert by_name["after-journal"] == by_name["after-transition"] >= 3  # several batches
    assert by_name["after-object-copy"] == len(variant.template.synthetic.moves)
    assert len(set(variant.kills)) == len(variant.kills) and max(variant.kills) <= variant.clean.hits


# ---------------------------------------------------------------- plain adapter, CLI child


@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_plain_kill_at_each_step(plain, tmp_path, failpoint):
    left = crash_and_recover(plain, tmp_path, failpoint)
    if failpoint == "after-transition":  # the first batch is done, the rest is not
        assert left.get(State.MIGRATED, 0) > 0 and left.get(State.PENDING, 0) > 0, left
    else:  # died holding leases
        assert left.get(State.RUNNING, 0) > 0, left


@pytest.mark.parametrize("kill", range(PLAIN_RANDOM_KILLS))
def test_plain_random_kill(plain, tmp_path, kill):
    crash_and_recover(plain, tmp_path, f"hit:{plain.kills[kill]}")


@pytest.mark.parametrize("kill", range(KILLED_TWICE))
def test_plain_killed_again_while_resuming(plain, tmp_path, kill):
    first, second = plain.twice[kill]
    crash_and_recover(plain, tmp_path, f"hit:{first}", f"hit:{second}")


# ---------------------------------------------------------------- renumbering adapter, spawned child


@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_renumbering_kill_at_each_step(renumbering, tmp_path, failpoint):
    left = crash_and_recover(renumbering, tmp_path, failpoint)
    if failpoint == "after-transition":
        assert left.get(State.MIGRATED, 0) > 0 and left.get(State.PENDING, 0) > 0, left
    else:
        assert left.get(State.RUNNING, 0) > 0, left


@pytest.mark.parametrize("kill", range(RENUMBERING_RANDOM_KILLS))
def test_renumbering_random_kill(renumbering, tmp_path, kill):
    crash_and_recover(renumbering, tmp_path, f"hit:{renumbering.kills[kill]}")


@pytest.mark.parametrize("upsert", [1, 2])
def test_renumbering_kill_inside_the_write(renumbering, tmp_path, upsert):
    """Killed between a server upsert's insert and its delete: the retried write must
    keep one row per chunk, not two."""
    left = crash_and_recover(renumbering, tmp_path, upsert)
    assert left["duplicated_chunks"] > 0, left  # the crash really left old and new rows side by side


def test_renumbering_killed_inside_the_write_twice(renumbering, tmp_path):
    """The resumed run dies inside its own first write, before it deleted the first crash's duplicates."""
    left = crash_and_recover(renumbering, tmp_path, 1, 1)
    assert left["duplicated_chunks"] > 0, left


def test_renumbering_killed_again_while_resuming(renumbering, tmp_path):
    first, second = renumbering.twice[0]
    crash_and_recover(renumbering, tmp_path, f"hit:{first}", f"hit:{second}", "after-write")


# ---------------------------------------------------------------- a kill during the first scan


def test_kill_during_the_first_scan(plain, tmp_path):
    """`run` on an empty ledger scans first and records documents in flushes (500 at a time);
    killed after the first flush, the next run must not take the partial ledger for a
    finished scan, or the documents of the later flushes are never migrated."""
    settings = plain.template.clone(tmp_path)
    doc_ids = plain.template.synthetic.doc_ids
    try:
        child = run_scan_killing_child(settings, flush_every=4)
        assert child.returncode == SIGKILLED, child
        with open_for(settings, False) as stores:
            recorded = len(list(stores.ledger.documents()))
            assert 0 < recorded < len(doc_ids)  # the kill left a partial scan behind
            summary = resume(stores)
            assert summary.failed == 0, summary.errors
            report = verify_documents(stores)
            assert not report.failed, report.failed
            got = snapshot(stores, doc_ids)
        problems = diff_snapshots(got, plain.reference)
        assert not problems, "after a kill during the scan:\n" + "\n".join(problems)
    finally:
        drop_collection(settings)


def test_a_batch_longer_than_its_lease_keeps_the_lease(plain, tmp_path):
    """A slow batch (throttled copies) renews its lease: claimed once, never redone by another claim."""
    from dataclasses import replace as dc_replace

    from repage.migration.runner import Runner, Selection
    from repage.migration.scan import scan_store
    from repage.migration.work import RunOptions
    from tests.support.crash import limits_for

    # 1.5 s: the heartbeat beats every 0.5 s, slack enough for a loaded 2-core CI machine
    settings = plain.template.clone(tmp_path, lease_seconds=1.5)
    try:
        with open_for(settings, False) as stores:
            scan_store(stores)
            limits = dc_replace(limits_for(settings), object_ops_per_second=30.0)
            summary = Runner(stores, RunOptions(), limits, Selection()).run()
            assert summary.failed == 0 and summary.other == {}, summary.errors
            assert summary.seconds > 3 * settings.lease_seconds  # the run really outlived the lease
            migrated = [r for r in stores.ledger.documents(states={State.MIGRATED})]
            assert len(migrated) == plain.clean.summary.migrated
            assert {r.fencing_token for r in migrated} == {1}  # each claimed once
            assert not verify_documents(stores).failed
    finally:
        drop_collection(settings)

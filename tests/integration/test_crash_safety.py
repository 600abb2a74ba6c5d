"""Crash safety of the migration protocol (DESIGN §5, issue 4).

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
from dataclasses import dataclass
from pathlib import Path

import pytest

from repage.migrate import FAILPOINTS
from repage.states import State
from repage.verify import verify_documents
from tests.support.crash import (
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
    snapshot,
)

pytestmark = pytest.mark.slow

SEED = 20_240_604
PLAIN_RANDOM_KILLS = 20
RENUMBERING_RANDOM_KILLS = 6
SIGKILLED = -signal.SIGKILL


@dataclass
class Variant:
    name: str
    template: Template
    renumbering: bool
    clean: CleanRun
    reference: Snapshot
    kills: list[int]  # hit:N values for the random kills


def make_variant(name: str, uri: str, root: Path, schema: Schema, renumbering: bool, kills: int) -> Variant:
    synthetic = build_synthetic()
    template = Template(uri, root, synthetic, schema)
    workdir = root / "reference"
    workdir.mkdir()
    settings = template.clone(workdir)
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
    problems = (diff_rows(reference.rows, template.expected_logical())
                + diff_objects(reference.objects, object_hashes(synthetic.expected_objects())))
    assert not problems, "\n".join(problems)
    assert reference.states == synthetic.states
    assert reference.row_count == len(synthetic.rows)
    rng = random.Random(f"{SEED}-{name}")
    return Variant(name, template, renumbering, clean, reference, sorted(rng.sample(range(1, clean.hits + 1), kills)))


@pytest.fixture(scope="module")
def plain(milvus_server_uri, tmp_path_factory) -> Variant:
    return make_variant("plain", milvus_server_uri, tmp_path_factory.mktemp("crash-plain"),
                        Schema(pk="auto", chunk_id_field=True, dynamic=False), False, PLAIN_RANDOM_KILLS)


@pytest.fixture(scope="module")
def renumbering(milvus_server_uri, tmp_path_factory) -> Variant:
    return make_variant("renumbering", milvus_server_uri, tmp_path_factory.mktemp("crash-renumbering"),
                        Schema(pk="auto", chunk_id_field=False, dynamic=True), True, RENUMBERING_RANDOM_KILLS)


def crash_and_recover(variant: Variant, workdir: Path, failpoint: str | None = None, *,
                      kill_on_upsert: int | None = None) -> dict[str, int]:
    """Kill a child at the failpoint, resume after the leases expire, compare with the reference.

    Returns the ledger's documents per state as the crash left them."""
    settings = variant.template.clone(workdir)
    doc_ids = variant.template.synthetic.doc_ids
    try:
        if variant.renumbering:
            child = run_renumbering_child(settings, failpoint, kill_on_upsert=kill_on_upsert)
        else:
            child = run_cli_child(settings, workdir, failpoint)
        assert child.returncode == SIGKILLED, (
            f"{failpoint or f'kill in upsert {kill_on_upsert}'}: child exited {child.returncode}, "
            f"not by SIGKILL\n{child.stdout[-2000:]}\n{child.stderr[-2000:]}")
        with open_for(settings, variant.renumbering) as stores:
            crashed = snapshot(stores, doc_ids)
            left: dict[str, int] = {}
            for state in crashed.states.values():
                left[state] = left.get(state, 0) + 1
            left["duplicated_chunks"] = sum(len(rows) > 1 for rows in crashed.rows.values())

            summary = resume(stores)
            assert summary.failed == 0, summary.errors
            assert summary.stopped_because == "no more pending documents"
            report = verify_documents(stores)
            assert not report.failed, report.failed
            got = snapshot(stores, doc_ids)
            journal_problems = check_journal(stores, got, plain_keys=not variant.renumbering)
        problems = diff_snapshots(got, variant.reference) + journal_problems
        assert not problems, f"after a kill at {failpoint or kill_on_upsert}:\n" + "\n".join(problems)
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
    left = crash_and_recover(renumbering, tmp_path, kill_on_upsert=upsert)
    assert left["duplicated_chunks"] > 0, left  # the crash really left old and new rows side by side

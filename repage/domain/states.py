"""The document state machine of docs/design.md §4.3: one table, every edge commented. Pure."""

from __future__ import annotations

from enum import StrEnum

from repage.errors import IllegalTransition


class State(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    MIGRATED = "migrated"
    VERIFIED = "verified"
    REVIEW = "review"
    DEFERRED = "deferred"
    SKIPPED = "skipped"
    UNRECOVERABLE = "unrecoverable"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    DRIFTED = "drifted"  # verify found the store no longer as journalled: queued for repair from the journal


class RepairPath(StrEnum):
    """Where a document's pages come from (docs/design.md §2), cheapest first."""

    KEYS = "keys"
    PDF = "pdf"
    REPROCESS = "reprocess"
    NONE = "none"


NEW = None  # the "from" of a document the ledger has never seen

TRANSITIONS: dict[State | None, frozenset[State]] = {
    # scan: affected chunks found -> pending; nothing to fix -> skipped;
    # no key, no listed image and no source at all -> unrecoverable (scan already knows).
    NEW: frozenset({State.PENDING, State.SKIPPED, State.UNRECOVERABLE}),
    # a worker claims it (lease + fencing token)
    State.PENDING: frozenset({State.RUNNING}),
    State.RUNNING: frozenset(
        {
            State.PENDING,  # lease expired (worker died) or run stopped cleanly mid-batch
            State.MIGRATED,  # all chunks written and read back
            State.REVIEW,  # a page match below the confidence threshold
            State.DEFERRED,  # only reprocess can fix it and reprocessing is off for this run
            State.UNRECOVERABLE,  # no key, no images, no source
            State.FAILED,  # an error; attempts counts them
        }
    ),
    State.FAILED: frozenset({State.PENDING}),  # retry
    State.DEFERRED: frozenset({State.PENDING}),  # reprocess enabled
    State.REVIEW: frozenset({State.PENDING}),  # review accepted or rejected
    # verify passed / rollback / images still to move after a pages-only run (--no-move-images), or
    # affected chunks found again by discovery (docs/design.md §5.9) / verify found the store changed (§5.8)
    State.MIGRATED: frozenset({State.VERIFIED, State.ROLLED_BACK, State.PENDING, State.DRIFTED}),
    # rollback after verify / images still to move, or affected again / drift found by verify
    State.VERIFIED: frozenset({State.ROLLED_BACK, State.PENDING, State.DRIFTED}),
    State.DRIFTED: frozenset(
        {
            State.RUNNING,  # claimed like pending: the run replays its journal (docs/design.md §4.4)
            State.VERIFIED,  # verify passes again (the store was put right by other means)
            State.ROLLED_BACK,  # rollback works from the journal as for a migrated document
        }
    ),
    State.ROLLED_BACK: frozenset({State.PENDING}),  # scanned again
    # skipped and unrecoverable are final: a scan never counts a done document as affected.
}

# the states a run claims: new work, and documents to repair from their journal
CLAIMABLE = frozenset({State.PENDING, State.DRIFTED})

DONE = frozenset({State.MIGRATED, State.VERIFIED, State.SKIPPED, State.UNRECOVERABLE})


def check_transition(src: State | None, dst: State) -> None:
    """Raise IllegalTransition unless the table allows src -> dst."""
    if dst not in TRANSITIONS.get(src, frozenset()):
        raise IllegalTransition(f"illegal ledger transition {src or '(new)'} -> {dst}")

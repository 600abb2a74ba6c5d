import itertools

import pytest

from repage.domain.states import DONE, NEW, TRANSITIONS, State, check_transition
from repage.errors import IllegalTransition

EDGES = {  # the table of docs/design.md §4.3
    (NEW, State.PENDING),
    (NEW, State.SKIPPED),
    (NEW, State.UNRECOVERABLE),
    (State.PENDING, State.RUNNING),
    (State.RUNNING, State.PENDING),
    (State.RUNNING, State.MIGRATED),
    (State.RUNNING, State.REVIEW),
    (State.RUNNING, State.DEFERRED),
    (State.RUNNING, State.UNRECOVERABLE),
    (State.RUNNING, State.FAILED),
    (State.FAILED, State.PENDING),
    (State.DEFERRED, State.PENDING),
    (State.REVIEW, State.PENDING),
    (State.MIGRATED, State.VERIFIED),
    (State.MIGRATED, State.ROLLED_BACK),
    (State.VERIFIED, State.ROLLED_BACK),
    (State.ROLLED_BACK, State.PENDING),
    # docs/design.md §5.7 makes moving images separable from fixing pages,
    # so a pages-only document goes back to pending when a later run moves its images
    (State.MIGRATED, State.PENDING),
    (State.VERIFIED, State.PENDING),
    # docs/design.md §5.8: drift found by verify goes back to work, repaired from the journal
    (State.MIGRATED, State.DRIFTED),
    (State.VERIFIED, State.DRIFTED),
    (State.DRIFTED, State.RUNNING),
    (State.DRIFTED, State.VERIFIED),
    (State.DRIFTED, State.ROLLED_BACK),
}


def test_table_is_exactly_the_design_edges():
    edges = {(src, dst) for src, dsts in TRANSITIONS.items() for dst in dsts}
    assert edges == EDGES


@pytest.mark.parametrize("src,dst", list(itertools.product([NEW, *State], State)))
def test_every_other_edge_is_refused(src, dst):
    if (src, dst) in EDGES:
        check_transition(src, dst)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(src, dst)


def test_done_states():
    assert DONE == {State.MIGRATED, State.VERIFIED, State.SKIPPED, State.UNRECOVERABLE}

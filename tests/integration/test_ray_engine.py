"""`--engine ray` (docs/design.md §9.4): the pdf path's CPU-heavy steps as Ray tasks give the same store.

Two copies of the demo store (real PDFs from Debian's packages); the pdf path runs on one with
the local engine and on the other with a Ray local cluster (`ray.init(num_cpus=2)`), where the
PDF fingerprinting, matching and image extraction run in Ray worker processes that open their
own bucket client (docs/design.md §9.4). Milvus rows, bucket objects and ledger states must be equal,
and the Ray run must have actually used Ray tasks.
"""

from __future__ import annotations

import os

import pytest

from repage.domain.states import RepairPath
from repage.migration.runner import RunLimits, Selection, run_migration
from repage.migration.work import RunOptions
from repage.stores.open import open_stores
from tests.support import built_demo
from tests.support.snapshot import diff

pytestmark = [pytest.mark.slow, pytest.mark.ray]

try:
    import ray
except ImportError:  # the optional extra repage[ray]
    ray = None
    if os.environ.get("CI"):
        raise
    pytestmark = [*pytestmark, pytest.mark.skip(reason="ray is not installed (pip install 'repage[ray]')")]


class CountingRay:
    """The RayEngine, counting the tasks it submitted."""

    def __init__(self):
        from repage.migration.compute import RayEngine

        self.engine = RayEngine(init=False)  # the cluster the test started
        self.remote, self.name, self.tasks = True, "ray", 0

    def map(self, fn, items):
        items = list(items)
        self.tasks += len(items)
        return self.engine.map(fn, items)

    def close(self):
        self.engine.close()


def migrate(demo, engine) -> dict:
    with open_stores(demo.settings) as stores:
        summary = run_migration(
            stores,
            RunOptions(engine=engine),
            RunLimits(batch_size=4, concurrency=2),
            Selection(paths=frozenset({RepairPath.PDF})),
        )
    assert summary.failed == 0, summary.errors
    assert summary.migrated > 0
    snap = demo.snapshot()
    return {
        "milvus": snap["milvus"],
        "objects": snap["objects"],
        "states": {d: r["state"] for d, r in snap["ledger"]["documents"].items()},
    }


def test_ray_engine_gives_the_same_store_as_the_local_engine(tmp_path_factory, tmp_path):
    from repage.migration.compute import LocalEngine

    # A Ray local cluster, started first: ray.init forks, which must not happen while gRPC
    # threads run (the demo's in-process Milvus Lite).
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        engine = CountingRay()
        pristine = built_demo(tmp_path_factory, "auto")
        local = migrate(pristine.copy(tmp_path / "local"), LocalEngine())
        on_ray = migrate(pristine.copy(tmp_path / "ray"), engine)
    finally:
        if started:
            ray.shutdown()
    assert engine.tasks > 0, "no step ran as a Ray task"
    assert on_ray == local, diff(local, on_ray)

"""The copy step's two ways (docs/design.md §5.2), against a double of the bucket adapter: a
checked PUT of the bytes read while planning where the bucket checks SHA-256, within a batch's
budget of held bytes; COPY and a GET of the copy otherwise. The real adapter and a real run are
tested against moto in tests/contract/test_objects_contract.py and tests/integration/test_checked_put.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from repage.domain.records import Claim
from repage.domain.states import RepairPath
from repage.errors import BadInput, ObjectNotFound
from repage.migration.migrate import BatchMigrator
from repage.migration.work import ByteBudget, DocumentWork, RunOptions


class Bucket:
    """What a move asks of the adapter, in memory, with every call recorded."""

    def __init__(self, checks: bool):
        self.checks, self.objects, self.calls = checks, {}, []

    @property
    def verifies_sha256(self) -> bool:
        self.calls.append(("probe",))
        return self.checks

    def get(self, key: str) -> bytes:
        self.calls.append(("get", key))
        if key not in self.objects:
            raise ObjectNotFound(key)
        return self.objects[key]

    def copy(self, src: str, dst: str) -> None:
        self.calls.append(("copy", src, dst))
        self.objects[dst] = self.objects[src]

    def put(self, key: str, data: bytes) -> None:
        self.calls.append(("put", key))
        self.objects[key] = data

    def put_checked(self, key: str, data: bytes) -> None:
        self.calls.append(("put_checked", key))
        self.objects[key] = data


def migrator(bucket: Bucket, **options) -> BatchMigrator:
    vectors = SimpleNamespace(info=lambda: SimpleNamespace(identity=None))
    return BatchMigrator(SimpleNamespace(vectors=vectors, objects=bucket, ledger=None), RunOptions(**options))


def work(budget: int | None) -> DocumentWork:
    claim = Claim("doc", "ds", "doc.pdf", RepairPath.KEYS, 1, 3)
    return DocumentWork(claim, [], budget=None if budget is None else ByteBudget(budget))


def planned(m: BatchMigrator, w: DocumentWork, bucket: Bucket, sizes: list[int]) -> list:
    for i, size in enumerate(sizes):
        bucket.objects[f"old/{i}"] = bytes([i]) * size
    return [m._describe_move(w, f"old/{i}", f"new/{i}") for i in range(len(sizes))]


def test_where_the_bucket_checks_a_batch_keeps_originals_up_to_its_budget_and_puts_them():
    bucket = Bucket(checks=True)
    m, w = migrator(bucket), work(budget=250)
    moves = planned(m, w, bucket, [100, 100, 100])
    assert sorted(w.blobs) == ["old/0", "old/1"]  # the third would pass the budget
    assert bucket.calls.count(("probe",)) == 1  # asked once, the answer kept
    bucket.calls.clear()
    for move in moves:
        m._copy_one(w, move)
    assert bucket.calls == [
        ("put_checked", "new/0"),
        ("put_checked", "new/1"),
        ("copy", "old/2", "new/2"),
        ("get", "new/2"),  # the one not kept is read back
    ]
    assert w.blobs == {} and [v.new_key for v in w.verified] == ["new/0", "new/1", "new/2"]
    assert (w.usage.class_a, w.usage.class_b) == (3, 3 + 1)  # 3 planning GETs, 1 read-back


@pytest.mark.parametrize("options", [{}, {"dry_run": True}])
def test_where_nothing_checks_or_in_a_dry_run_nothing_is_kept_and_a_move_is_copy_and_get(options):
    bucket = Bucket(checks=bool(options))  # a dry run never asks, even a bucket that checks: the probe writes
    m, w = migrator(bucket, **options), work(budget=10_000)
    moves = planned(m, w, bucket, [100])
    assert w.blobs == {}
    assert bucket.calls.count(("probe",)) == (0 if options else 1)
    if not options:
        bucket.calls.clear()
        m._copy_one(w, moves[0])
        assert bucket.calls == [("copy", "old/0", "new/0"), ("get", "new/0")]


def test_a_kept_original_that_no_longer_matches_its_journal_is_not_put():
    bucket = Bucket(checks=True)
    m, w = migrator(bucket), work(budget=10_000)
    (move,) = planned(m, w, bucket, [100])
    w.blobs["old/0"] = b"x" * 100
    with pytest.raises(BadInput, match="old/0 kept since planning differs from the journal"):
        m._copy_one(w, move)
    assert "new/0" not in bucket.objects


def test_a_byte_budget_is_shared_and_never_given_back():
    budget = ByteBudget(10)
    assert budget.take(6) and not budget.take(5) and budget.take(4) and not budget.take(1)

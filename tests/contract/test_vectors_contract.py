"""One contract for the Milvus adapter, run on every backend (Lite in-process, Lite as a
gRPC server, auto_id and chunk_id primary keys, and a server-like renumbering double)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pymilvus.exceptions import ErrorCode, MilvusException
from pymilvus.grpc_gen import common_pb2, milvus_pb2

from repage.domain.records import ChunkChange
from repage.errors import ConfigError, InvalidFilterValue, StoreError, StoreUnavailable, Throttled
from repage.redact import redact_url
from repage.stores.milvus import (
    AFFECTED_FILTER,
    MilvusVectors,
    affected_filter,
    eq_filter,
    in_filter,
    quote_string,
    row_checksum,
    supports_partial_update_version,
)
from tests.fixtures.milvus import (
    BACKENDS,
    RenumberingVectors,
    SimulatedCrash,
    _free_port,
    backend_uri,
    identity_of,
    insert_sample,
    is_affected,
    sample_rows,
    unique_name,
)

EVIL_IDS = [
    'a" || page >= 0 || document_id == "',
    "back\\slash",
    'tail\\" || true || "',
    "it's 'single' quoted",
]


def _by_identity(store, rows):
    info = store.info()
    return {identity_of(info, r): r for r in rows}


def _changes(store, rows, page=5, key=True):
    info = store.info()
    return [
        ChunkChange(
            identity_of(info, r),
            r[info.pk_field],
            page,
            f"{r['dataset_id']}/{r['document_id']}/images/{page}_{r['chunk_index']}.png" if key else None,
        )
        for r in rows
    ]


# ------------------------------------------------------------------ schema


def test_schema_detection(vectors):
    spec, info = BACKENDS[vectors.backend_id], vectors.info()
    assert info.name == vectors.collection
    assert info.dim == 8 and info.vector_field == "vector"
    assert info.dynamic is spec["dynamic"]
    assert info.fields[0] == info.pk_field and "page" in info.fields
    if spec["pk"] == "chunk_id":
        assert (info.pk_field, info.pk_type, info.auto_id) == ("chunk_id", "varchar", False)
        assert info.identity_fields == ("chunk_id",)
    else:
        assert (info.pk_field, info.pk_type, info.auto_id) == ("id", "int64", True)
        expected = ("chunk_id",) if spec["chunk_id_field"] else ("document_id", "chunk_index")
        assert info.identity_fields == expected
    assert info.server_version.startswith("milvus_lite-3.")
    assert vectors.supports_partial_update() is (spec.get("cls") is not RenumberingVectors)
    assert info.as_dict()["identity_fields"] == info.identity_fields


def test_affected_filter_uses_only_existing_fields():
    assert AFFECTED_FILTER == 'page == 0 && (chunk_type == "ocr" || chunk_type == "image" || ocr_confidence > 0.0)'
    assert affected_filter(["page", "ocr_confidence"]) == "page == 0 && (ocr_confidence > 0.0)"
    with pytest.raises(ConfigError, match="chunk_type"):
        affected_filter(["page", "document_id"])


# ------------------------------------------------------------------ reads


def test_iter_affected_exact_and_paged(vectors):
    rows = insert_sample(vectors, ["d1", "d2", "d3"]) + insert_sample(vectors, ["e1"], dataset_id="ds2")
    info = vectors.info()
    expected = {identity_of(info, r) for r in rows if is_affected(r)}
    assert len(expected) == 16
    pages = list(vectors.iter_affected(page_rows=5))
    assert [len(p) for p in pages] == [5, 5, 5, 1]
    got = [identity_of(info, r) for page in pages for r in page]
    assert sorted(got) == sorted(expected)
    assert "vector" not in pages[0][0] and "text" not in pages[0][0]  # light fields only
    assert {"page", "chunk_type", "image_r2_key", info.pk_field} <= set(pages[0][0])
    only_ds2 = [r for page in vectors.iter_affected("ds2") for r in page]
    assert {r["document_id"] for r in only_ds2} == {"e1"} and len(only_ds2) == 4


def test_iter_documents_sees_every_chunk(vectors):
    insert_sample(vectors, ["d1", "d2"], chunks=3)
    insert_sample(vectors, ["e1"], chunks=3, dataset_id="ds2")
    pages = list(vectors.iter_documents(page_rows=4))
    assert [len(p) for p in pages] == [4, 4, 1]
    assert Counter(r["document_id"] for p in pages for r in p) == {"d1": 3, "d2": 3, "e1": 3}
    assert set(pages[0][0]) == {vectors.info().pk_field, "document_id", "dataset_id", "filename"}
    assert {r["document_id"] for p in vectors.iter_documents("ds2") for r in p} == {"e1"}
    with pytest.raises(ConfigError):
        vectors.iter_documents(page_rows=0)


def test_fetch_documents_returns_every_chunk(vectors):
    docs = [f"doc{i:02d}" for i in range(12)]
    rows = insert_sample(vectors, docs)
    got = vectors.fetch_documents(docs, with_vectors=False)
    assert Counter(r["document_id"] for r in got) == Counter(r["document_id"] for r in rows)
    assert "vector" not in got[0]
    if vectors.info().dynamic:
        assert got[0]["lang"] == "en"  # $meta fields come back with the row


def test_fetch_for_repair_carries_vectors_only_on_image_chunks(vectors):
    docs = [f"doc{i:02d}" for i in range(5)]
    rows = insert_sample(vectors, docs)
    got = vectors.fetch_for_repair(docs + ["absent"])
    assert sorted(identity_of(vectors.info(), r) for r in got) == sorted(identity_of(vectors.info(), r) for r in rows)
    is_image = lambda r: r["chunk_type"] in ("ocr", "image") or (r["ocr_confidence"] or 0) > 0  # noqa: E731
    assert {("vector" in r) for r in got if is_image(r)} == {True}
    assert {("vector" in r) for r in got if not is_image(r)} == {False}
    assert any(not is_image(r) for r in got)  # the sample holds both kinds
    before = {identity_of(vectors.info(), r): r for r in rows}
    for r in got:
        if is_image(r):  # the rest-of-row checksum (vector included) is the one a full fetch gives
            assert vectors.row_checksum(r) == vectors.row_checksum(before[identity_of(vectors.info(), r)])


def test_find_written_reads_rows_back_by_identity_whatever_the_path(vectors):
    rows = insert_sample(vectors, ["w1", "w2"])
    info = vectors.info()
    image = [r for r in rows if r["chunk_type"] in ("ocr", "image")]
    vectors.write_changes(
        [ChunkChange(identity_of(info, r), r[info.pk_field], 7, "ds1/w/images/7_0.png") for r in image],
        rows_before={identity_of(info, r): r for r in image},
    )
    written = {identity_of(info, r): str(r[info.pk_field]) for r in image}
    found = vectors.find_written(
        {**written, ("w9", 99) if "chunk_index" in info.identity_fields else ("w9_99",): "12345"}
    )
    assert {i: len(found[i]) for i in written} == {i: 1 for i in written}
    assert {r["page"] for i in written for r in found[i]} == {7}
    for i in written:  # vectors and every other field come back unchanged
        assert vectors.row_checksum(found[i][0]) == vectors.row_checksum(
            next(r for r in image if identity_of(info, r) == i)
        )
    assert [len(v) for i, v in found.items() if i not in written] == [0]  # a key with no row: none found


def test_fetch_documents_splits_at_the_row_cap(vectors):
    small = [f"s{i}" for i in range(8)]
    medium = [f"m{i}" for i in range(4)]
    insert_sample(vectors, small, chunks=2)
    insert_sample(vectors, medium, chunks=7)
    insert_sample(vectors, ["big"], chunks=25)
    vectors.max_query_rows = 20  # stands in for Milvus' 16,384
    vectors.ops.clear()
    got = vectors.fetch_documents(small + medium + ["big"])
    counts = Counter(r["document_id"] for r in got)
    assert counts == Counter({**{d: 2 for d in small}, **{d: 7 for d in medium}, "big": 25})
    assert len({identity_of(vectors.info(), r) for r in got}) == len(got)  # no row twice
    assert vectors.ops["split"] >= 1 and vectors.ops["split_iterate"] == 1
    assert all(len(r["vector"]) == 8 for r in got)


def test_find_by_identity(vectors):
    rows = insert_sample(vectors, ["d1", "d2"])
    info = vectors.info()
    wanted = [identity_of(info, r) for r in rows[:3]] + [identity_of(info, rows[-1])]
    missing = ("nope_1",) if info.identity_fields == ("chunk_id",) else ("nope", 1)
    found = vectors.find_by_identity(wanted + [missing], with_vectors=True)
    assert all(len(found[i]) == 1 for i in wanted) and found[missing] == []
    assert len(found[wanted[0]][0]["vector"]) == 8


# ------------------------------------------------------------------ writes


def _write_and_check(store, rows, *, rows_before):
    info = store.info()
    affected = [r for r in rows if is_affected(r)]
    untouched = [r for r in rows if not is_affected(r)]
    before = {identity_of(info, r): store.row_checksum(r) for r in rows}
    store.write_changes(_changes(store, affected), rows_before=rows_before)
    after = store.find_by_identity(list(before), with_vectors=True)
    assert all(len(v) == 1 for v in after.values())
    for ident, checksum in before.items():
        assert store.row_checksum(after[ident][0]) == checksum, ident
    for r in affected:
        new = after[identity_of(info, r)][0]
        assert new["page"] == 5 and new["image_r2_key"].endswith(f"/5_{r['chunk_index']}.png")
        assert np.array_equal(
            np.asarray(new["vector"], np.float32).view(np.uint32), np.asarray(r["vector"], np.float32).view(np.uint32)
        )
    for r in untouched:
        same = after[identity_of(info, r)][0]
        assert (same["page"], same["image_r2_key"]) == (r["page"], r["image_r2_key"])
    assert store.count() == len(rows)
    return after


def test_write_changes_natural_path(vectors):
    rows = insert_sample(vectors, ["d1", "d2"])
    _write_and_check(vectors, rows, rows_before=None)


@pytest.mark.parametrize("with_rows_before", [True, False])
def test_write_changes_full_row_path(vectors, monkeypatch, with_rows_before):
    monkeypatch.setattr(vectors, "supports_partial_update", lambda: False)
    rows = insert_sample(vectors, ["d1", "d2"])
    rows_before = _by_identity(vectors, rows) if with_rows_before else None
    vectors.ops.clear()
    _write_and_check(vectors, rows, rows_before=rows_before)
    assert vectors.ops["upsert"] + vectors.ops["insert"] >= 1  # the double upserts by insert


def test_write_changes_is_idempotent(vectors):
    rows = insert_sample(vectors, ["d1"])
    changes = _changes(vectors, [r for r in rows if is_affected(r)])
    rows_before = _by_identity(vectors, rows)
    vectors.write_changes(changes, rows_before=rows_before)
    vectors.write_changes(changes, rows_before=rows_before)  # same stale pks again
    found = vectors.find_by_identity([c.identity for c in changes])
    assert all(len(v) == 1 and v[0]["page"] == 5 for v in found.values())
    assert vectors.count() == len(rows)


def test_write_changes_page_only_keeps_image_key(vectors):
    rows = [r for r in insert_sample(vectors, ["d1"]) if is_affected(r)]
    vectors.write_changes(_changes(vectors, rows, page=2, key=False))
    found = vectors.find_by_identity([identity_of(vectors.info(), r) for r in rows])
    for r in rows:
        (new,) = found[identity_of(vectors.info(), r)]
        assert (new["page"], new["image_r2_key"]) == (2, r["image_r2_key"])


@pytest.fixture
def renumbering(request):
    uri = backend_uri(request, "lite")
    name = unique_name("renum")
    MilvusVectors.create_collection(uri, name, dim=8, pk="auto", chunk_id_field=False, dynamic=True).close()
    store = RenumberingVectors(uri, name)
    yield store
    store.drop_collection()
    store.close()


def test_renumbering_server_assigns_new_keys(renumbering):
    rows = insert_sample(renumbering, ["d1"])
    affected = [r for r in rows if is_affected(r)]
    renumbering.write_changes(_changes(renumbering, affected), rows_before=_by_identity(renumbering, rows))
    found = renumbering.find_by_identity([identity_of(renumbering.info(), r) for r in affected])
    old_pks = {r["id"] for r in affected}
    assert all(len(v) == 1 and v[0]["id"] not in old_pks for v in found.values())


def test_crash_retry_leaves_one_row_per_identity(renumbering):
    rows = insert_sample(renumbering, ["d1", "d2"])
    info = renumbering.info()
    before = {identity_of(info, r): renumbering.row_checksum(r) for r in rows}
    changes = _changes(renumbering, [r for r in rows if is_affected(r)])
    rows_before = _by_identity(renumbering, rows)
    renumbering.crash_after_insert = True
    with pytest.raises(SimulatedCrash):
        renumbering.write_changes(changes, rows_before=rows_before)
    assert renumbering.count() > len(rows)  # the crash left old and new rows side by side
    for _ in range(2):  # the retry, then a retry of the retry: stale pks both times
        renumbering.write_changes(changes, rows_before=rows_before)
        found = renumbering.find_by_identity(list(before), with_vectors=True)
        assert all(len(v) == 1 for v in found.values())
        assert {i: renumbering.row_checksum(v[0]) for i, v in found.items()} == before
        assert renumbering.count() == len(rows)
    assert all(found[c.identity][0]["page"] == 5 for c in changes)


def test_differing_duplicates_are_not_deleted(renumbering):
    rows = insert_sample(renumbering, ["d1"])
    target = next(r for r in rows if is_affected(r))
    clone = {k: v for k, v in target.items() if k != "id"} | {"text": "a different chunk"}
    renumbering.insert([clone])
    with pytest.raises(StoreError, match="differ"):
        renumbering.write_changes(_changes(renumbering, [target]))
    assert renumbering.count() == len(rows) + 1


# ------------------------------------------------------------------ injection and bad values


def test_injection_values_match_literally(vectors):
    insert_sample(vectors, ["plain"])
    insert_sample(vectors, EVIL_IDS, chunks=2, dataset_id='ds" || page >= 0 || "x')
    for evil in EVIL_IDS:
        got = vectors.fetch_documents([evil], with_vectors=False)
        assert {r["document_id"] for r in got} == {evil} and len(got) == 2
        assert vectors.count(eq_filter("document_id", evil)) == 2
    # page_rows=1 moves the pk cursor past every row: on chunk_id backends the cursor is an evil id
    pages = list(vectors.iter_affected('ds" || page >= 0 || "x', page_rows=1))
    assert [len(p) for p in pages] == [1] * len(EVIL_IDS)
    assert {r["document_id"] for p in pages for r in p} == set(EVIL_IDS)
    assert all(is_affected(r) for p in pages for r in p)
    assert list(vectors.iter_affected('nothing" || page == 0 || dataset_id == "')) == []
    info = vectors.info()
    found = vectors.find_by_identity(
        [identity_of(info, {"chunk_id": f"{EVIL_IDS[0]}_1", "document_id": EVIL_IDS[0], "chunk_index": 1})]
    )
    assert [len(v) for v in found.values()] == [1]


def test_delete_by_pks_is_literal(vectors):
    rows = insert_sample(vectors, EVIL_IDS[:2], chunks=2)
    pk = vectors.info().pk_field
    vectors.delete_by_pks([rows[0][pk]])
    assert vectors.count() == len(rows) - 1


@pytest.mark.parametrize("bad", ["nul\x00byte", "new\nline", "x" * 65536, 3.5, None, True, object()])
def test_bad_filter_values_are_refused(bad):
    with pytest.raises(InvalidFilterValue, match="document_id"):
        in_filter("document_id", ["fine", bad] if isinstance(bad, str) else [bad])


def test_filter_quoting():
    assert quote_string('a"b\\c') == '"a\\"b\\\\c"'
    assert in_filter("chunk_index", [1, np.int64(2)]) == "chunk_index in [1, 2]"
    with pytest.raises(InvalidFilterValue):
        in_filter("page; drop", [1])
    with pytest.raises(InvalidFilterValue, match="chunk_index"):
        in_filter("chunk_index", [1, "2"])
    with pytest.raises(InvalidFilterValue, match="page"):
        eq_filter("page", 2**63)


def test_bad_ids_fail_before_any_io(vectors):
    vectors.ops.clear()
    with pytest.raises(InvalidFilterValue, match="document_id"):
        vectors.fetch_documents(["ok", "bad\x00"])
    assert sum(vectors.ops.values()) == 0


# ------------------------------------------------------------------ errors and versions


@pytest.mark.parametrize("backend", ["lite", "server"])
def test_unknown_collection_is_a_config_error(request, backend):
    with pytest.raises(ConfigError, match="no_such_collection"):
        MilvusVectors(backend_uri(request, backend), "no_such_collection")


def test_released_collection_is_loaded_on_open(vectors):
    insert_sample(vectors, ["d1"], chunks=2)
    vectors._client.release_collection(vectors.collection)  # as a reopened Lite DB comes back
    with MilvusVectors(vectors.uri, vectors.collection) as reopened:
        assert reopened.count() == 2


def test_locked_lite_folder_is_unavailable(milvus_lite_uri):
    """Lite locks its folder per process: a second process gets a one-line StoreUnavailable."""
    code = (
        "import sys; from repage.stores.milvus import MilvusVectors; from repage.errors import StoreUnavailable\n"
        "try: MilvusVectors(sys.argv[1], 'x', timeout=5)\n"
        "except StoreUnavailable as e: print(e); sys.exit(3)"
    )
    MilvusVectors.create_collection(milvus_lite_uri, unique_name("lock"), dim=8).close()  # folder in use here
    done = subprocess.run(
        [sys.executable, "-c", code, milvus_lite_uri],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "milvus-lite server" in done.stdout and done.stdout.count("\n") == 1


def test_unreachable_server_is_unavailable_fast():
    uri = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        MilvusVectors(uri, "fltr_documents", token="s3cret-token", timeout=1.0)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "s3cret" not in message and "\n" not in message and "127.0.0.1" in message


def test_redaction():
    assert redact_url("https://user:pw@host.example:19530/db") == "https://***@host.example:19530/db"
    assert redact_url("/data/milvus.db") == "/data/milvus.db"


def test_rate_limit_is_not_retried_by_pymilvus(vectors):
    """pymilvus would retry this 75 times; repage must see it once, as Throttled."""
    handler = vectors._client._get_connection()
    calls = []

    class RateLimitedStub:
        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            return getattr(self._real, name)

        def Query(self, *args, **kwargs):
            calls.append(1)
            status = common_pb2.Status(
                code=ErrorCode.RATE_LIMIT, error_code=common_pb2.RateLimit, reason="rate limit exceeded"
            )
            return milvus_pb2.QueryResults(status=status)

    real = handler._stub
    handler._stub = RateLimitedStub(real)
    try:
        with pytest.raises(Throttled):
            vectors.count()
    finally:
        handler._stub = real
    assert len(calls) == 1


def test_vendor_errors_are_translated(vectors, monkeypatch):
    def boom(*args, **kwargs):
        raise MilvusException(code=65535, message="disk full")

    monkeypatch.setattr(vectors._client, "query", boom)
    with pytest.raises(StoreError, match="disk full"):
        vectors.count()


@pytest.mark.parametrize(
    "version, expected",
    [
        ("milvus_lite-3.2.2", True),
        ("milvus_lite-2.5.1", False),
        ("v2.6.0", True),
        ("v2.5.14", False),
        ("2.6.3", True),
        ("Zilliz Cloud Vector Database(Compatible with Milvus 2.5)", False),
        ("", False),
    ],
)
def test_partial_update_support_by_version(version, expected):
    assert supports_partial_update_version(version) is expected


def test_row_checksum():
    row = {"id": 1, "page": 0, "image_r2_key": None, "vector": [0.1, 0.2], "text": "x", "$meta": {"a": 1}}
    same = {"id": 1, "page": 9, "image_r2_key": "k", "vector": np.float32([0.1, 0.2]), "text": "x", "a": 1}
    assert row_checksum(row, vector_fields=("vector",)) == row_checksum(same, vector_fields=("vector",))
    nudged = dict(same, vector=np.nextafter(np.float32([0.1, 0.2]), np.float32(1)))
    assert row_checksum(nudged, vector_fields=("vector",)) != row_checksum(same, vector_fields=("vector",))


def test_describe_has_no_token(vectors):
    assert vectors.collection in vectors.describe()


def test_sample_rows_shape(vectors):
    rows = sample_rows(vectors.info(), ["d"])
    assert sum(is_affected(r) for r in rows) == 4

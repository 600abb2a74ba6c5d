"""One process, two collections of the same name at the same host:port, one after the other.

pymilvus 3.0.2 caches collection schemas for the whole process by (host:port, database,
collection name). An in-process Milvus Lite server binds a free port, and a released one's
port can be handed to the next: a snapshot then iterated a `chunk_id` collection with the
primary key `id` of an earlier auto_id one (`KeyError: 'id'` in QueryIterator). Here the
reuse is made certain: `milvus-lite server` processes take turns on one port, each on a
Lite folder with a `fltr_documents` of the other primary-key variant; a server's process
has exited before the next starts, so its port is free.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from repage.stores.milvus import MilvusVectors, connect
from tests.fixtures.milvus import MILVUS_LITE, SMALL_DIM, _free_port, sample_rows
from tests.support.snapshot import milvus_rows, release_lite

pytestmark = pytest.mark.slow
NAME = "fltr_documents"
DOCS = ["doc-a", "doc-b"]
ROWS = 14  # sample_rows: 7 chunks per document


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A released Lite folder per primary-key variant, each with a `fltr_documents` of ROWS rows."""
    out = {}
    for pk in ("auto", "chunk_id"):
        path = tmp_path_factory.mktemp(f"lite-{pk}") / "milvus.db"
        with MilvusVectors.create_collection(str(path), NAME, pk=pk, dim=SMALL_DIM) as store:
            store.insert(sample_rows(store.info(), DOCS))
            store.flush()
        release_lite(str(path))  # unlock the folder for the server process
        out[pk] = path
    return out


@pytest.fixture(scope="module")
def port() -> int:
    return _free_port()


def _wait_until_answers(uri: str, proc: subprocess.Popen, deadline_s: float = 60.0) -> None:
    """Poll with a bare MilvusClient: repage's connect() would reset the cache under test."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"milvus-lite server exited with {proc.returncode}")
        try:
            MilvusClient(uri, timeout=1.0, dedicated=True).close()
            return
        except MilvusException:
            time.sleep(0.05)  # a refused connection fails at once: don't spin
    raise RuntimeError(f"milvus-lite server at {uri} did not answer within {deadline_s}s")


@contextmanager
def lite_server(folder: Path, port: int) -> Iterator[str]:
    """`milvus-lite server` on this folder and port; on exit its process is gone, the port free."""
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(MILVUS_LITE), "server", "--data-dir", str(folder), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_until_answers(uri, proc)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def iterate(client: MilvusClient) -> list[dict]:
    """Every row through pymilvus' own QueryIterator, the code that raised KeyError: 'id'."""
    client.load_collection(NAME)  # a reopened Lite folder comes back released
    iterator = client.query_iterator(NAME, batch_size=5, output_fields=["*"], consistency_level="Strong")
    rows: list[dict] = []
    try:
        while page := iterator.next():
            rows.extend(page)
    finally:
        iterator.close()
    return rows


def test_snapshot_reads_the_collection_a_reused_port_serves_now(folders, port):
    seen = []
    for pk in ("auto", "chunk_id"):
        with lite_server(folders[pk], port) as uri:
            settings = SimpleNamespace(milvus_uri=uri, milvus_token=None, collection=NAME)
            seen.append(milvus_rows(settings))
    assert [s["schema"]["pk"] for s in seen] == ["id", "chunk_id"]
    assert [len(s["rows"]) for s in seen] == [ROWS, ROWS]


def test_a_client_repage_connects_forgets_a_former_collection_of_that_name(folders, port):
    for pk, pk_field in (("chunk_id", "chunk_id"), ("auto", "id")):
        with lite_server(folders[pk], port) as uri, closing(connect(uri, None, 10.0)) as client:
            rows = iterate(client)
        assert len(rows) == ROWS and all(pk_field in row for row in rows), pk

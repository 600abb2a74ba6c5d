"""A move is 2 requests where the bucket checks a PUT's SHA-256, 3 elsewhere (docs/design.md §5.2).

The real CLI on a synthetic store (Milvus Lite, legacy image keys that carry the true page, the
images in a bucket). Behind a proxy that checks `x-amz-checksum-sha256` as S3 and R2 do, the
adapter's probe says yes and each image costs its planning GET and one PUT of those bytes, checked
by the server; on plain moto (which stores whatever the header says: §7.4) and on a local folder,
COPY and a GET of the copy as before. Requests are counted at the proxy and in the ledger, and
`repage estimate` prices what the run then does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from milvus_lite.server_manager import server_manager_instance

from repage.domain.keys import canonical_image_key, legacy_image_key, legacy_image_name
from repage.stores.milvus import MilvusVectors
from repage.stores.objects import PROBE_PREFIX, ObjectStore
from tests.fixtures.s3 import FAKE_KEY_ID, FAKE_SECRET, create_bucket, s3_store, unique_bucket_name
from tests.integration.test_run_rate import COLLECTION, DIM, Store

pytestmark = pytest.mark.slow

REPAGE = Path(sys.executable).with_name("repage")
DOCUMENTS = 4
IMAGES = 3  # per document


class Synthetic:
    """DOCUMENTS documents of IMAGES image chunks each on page 0, their legacy keys telling the page."""

    def __init__(self, tmp_path: Path, store_url: str, endpoint: str | None, objects: ObjectStore):
        self.milvus_uri = str(tmp_path / "milvus.db")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("REPAGE_", "MILVUS_", "R2_", "AWS_"))},
            "REPAGE_STORE_URL": store_url,
            "REPAGE_MILVUS_URI": self.milvus_uri,
            "REPAGE_COLLECTION": COLLECTION,
            "REPAGE_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        }
        if endpoint is not None:
            credentials = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
            self.env.update(REPAGE_S3_ENDPOINT=endpoint, **credentials)
        self.originals: dict[str, bytes] = {}  # legacy key -> bytes
        self.canonical: dict[str, str] = {}  # legacy key -> where the run must put it
        rows, rng = [], np.random.default_rng(7)
        for d in range(DOCUMENTS):
            doc = f"doc{d:03d}"
            rows.append(Store._row(rng, doc, 0, "text", None, None))
            for i in range(IMAGES):
                page = 1 + (d + i) % 5
                key = legacy_image_key("ds1", doc, i, legacy_image_name(f"tmp{doc}.pdf", page, 0, "png"))
                self.originals[key] = f"png {doc} {i} ".encode() * (40 + i)
                self.canonical[key] = canonical_image_key("ds1", doc, page, i, "png")
                objects.put(key, self.originals[key])
                rows.append(Store._row(rng, doc, 1 + i, "image", i, key))
        vectors = MilvusVectors.create_collection(self.milvus_uri, COLLECTION, dim=DIM, pk="auto")
        try:
            vectors.insert(rows)
        finally:
            vectors.close()
            server_manager_instance.release_server(self.milvus_uri)  # the CLI opens the Lite folder next

    @property
    def images(self) -> int:
        return len(self.originals)

    def repage(self, *args: str) -> dict:
        done = subprocess.run([str(REPAGE), *args, "--json"], env=self.env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0 and done.stdout.strip(), f"repage {args}: {done.returncode} {done.stderr[-2000:]}"
        return json.loads(done.stdout)

    def migrate(self, proxy=None) -> dict:
        """scan, estimate, run, verify: {"estimate", "run", "usage" (the ledger's), "seen" (the
        proxy's requests during the run alone)}."""
        scanned = self.repage("scan")
        assert scanned["totals"] == {"keys": DOCUMENTS}, scanned
        estimated = self.repage("estimate", "--sample", str(DOCUMENTS))
        if proxy is not None:
            proxy.reset()
        summary = self.repage("run")
        seen = proxy.seen() if proxy is not None else []
        assert summary["migrated"] == DOCUMENTS and summary["failed"] == 0, summary
        assert summary["objects_copied"] == self.images, summary
        verified = self.repage("verify")
        assert verified["ok"] and verified["passed"] == DOCUMENTS, verified
        usage = self.repage("status")["usage_by_path"]["keys"]
        return {"estimate": estimated, "run": summary, "usage": usage, "seen": seen}

    def check_copies(self, objects: ObjectStore) -> None:
        """Every copy byte for byte the original, every original still there, no probe object left."""
        for old, new in self.canonical.items():
            assert objects.get(new) == self.originals[old], new
            assert objects.get(old) == self.originals[old], old
        assert [i.key for page in objects.list(PROBE_PREFIX.rstrip("/")) for i in page] == []


def keys_path_requests(estimate: dict) -> tuple[int, int]:
    keys = next(p for p in estimate["paths"] if p["path"] == "keys")
    return keys["class_a"], keys["class_b"]


def requests_by_kind(seen, bucket: str) -> Counter:
    """The run's requests at the proxy, by method and what they touched."""

    def kind(path: str) -> str:
        key = path.split("?")[0].removeprefix(f"/{bucket}").lstrip("/")
        if key.startswith(PROBE_PREFIX):
            return "probe"
        if not key:
            return "bucket"  # a LIST, or obstore's DELETE (a POST of ?delete)
        return "legacy" if ".pdf-" in key else "canonical"

    return Counter((s.method, kind(s.path), s.status) for s in seen)


def test_where_the_bucket_checks_sha256_a_move_is_the_planning_get_and_one_checked_put(
    tmp_path, moto_endpoint, verifying_proxy
):
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    with s3_store(moto_endpoint, bucket) as direct:  # straight to moto: the setup is not counted
        store = Synthetic(tmp_path, f"s3://{bucket}", verifying_proxy.endpoint, direct)
        migrated = store.migrate(verifying_proxy)
        store.check_copies(direct)
    n = store.images
    assert migrated["estimate"]["requests_per_moved_image"] == 2, migrated["estimate"]
    assert keys_path_requests(migrated["estimate"]) == (n, n)
    assert (migrated["usage"]["class_a"], migrated["usage"]["class_b"]) == (n, n)
    # the run: the LIST that checks the bucket, the probe (a PUT refused, a HEAD that finds
    # nothing), then per image the planning GET and one PUT; no COPY, no GET of a copy
    assert requests_by_kind(migrated["seen"], bucket) == {
        ("GET", "bucket", 200): 1,
        ("PUT", "probe", 400): 1,
        ("HEAD", "probe", 404): 1,
        ("GET", "legacy", 200): n,
        ("PUT", "canonical", 200): n,
    }
    # every move's PUT carried its SHA-256 and the server checked it; the run's probe was refused
    assert verifying_proxy.checksums == Counter({"ok": n, "bad": 1})


@pytest.mark.parametrize("backend", ["moto", "folder"])
def test_where_nothing_checks_sha256_a_move_is_still_copy_and_a_get_of_the_copy(
    tmp_path, moto_endpoint, counting_proxy, backend
):
    if backend == "moto":
        bucket = unique_bucket_name()
        create_bucket(moto_endpoint, bucket)
        objects, url, endpoint = s3_store(moto_endpoint, bucket), f"s3://{bucket}", counting_proxy.endpoint
    else:
        folder = tmp_path / "bucket"
        objects, url, endpoint = ObjectStore.from_url(folder.as_uri()), folder.as_uri(), None
    with objects:
        store = Synthetic(tmp_path, url, endpoint, objects)
        migrated = store.migrate(counting_proxy if backend == "moto" else None)
        store.check_copies(objects)
    n = store.images
    assert migrated["estimate"]["requests_per_moved_image"] == 3, migrated["estimate"]
    assert keys_path_requests(migrated["estimate"]) == (n, 2 * n)
    assert (migrated["usage"]["class_a"], migrated["usage"]["class_b"]) == (n, 2 * n)
    if backend == "moto":
        # moto stores the probe's wrong checksum: the probe deletes it (obstore's DELETE is a POST
        # of ?delete) and says no; per image the planning GET, a COPY (a PUT with
        # x-amz-copy-source) and a GET of the copy
        assert requests_by_kind(migrated["seen"], bucket) == {
            ("GET", "bucket", 200): 1,
            ("PUT", "probe", 200): 1,
            ("POST", "bucket", 200): 1,
            ("GET", "legacy", 200): n,
            ("PUT", "canonical", 200): n,
            ("GET", "canonical", 200): n,
        }
        assert counting_proxy.checksums == Counter()  # this proxy checks nothing

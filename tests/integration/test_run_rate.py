"""`repage run --object-ops-per-second R` honours R at the bucket, and backs off on 503 SlowDown.

Issue 4's acceptance: a counting proxy on 127.0.0.1 in front of moto_server shows the
rate honoured within 10% per 5-second window. The real CLI runs as a subprocess against
a synthetic FLTR-shaped store: a Milvus Lite file with chunks on page 0 whose legacy
image keys carry the true page, and those images in a moto bucket. Requests are counted
at the proxy (DESIGN §7), never in moto or in repage.

The store is pre-scanned with `repage scan` (scan is not rate limited), so every request
the proxy sees while `repage run` runs is one the run's limiter allowed: the planning
GET of each legacy image, COPY + HEAD + GET of each copy, and the listing of a document
whose chunks lost their keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from milvus_lite.server_manager import server_manager_instance

from repage.keys import legacy_image_key, legacy_image_name
from repage.stores.vectors import MilvusVectors
from tests.fixtures.s3 import FAKE_KEY_ID, FAKE_SECRET, create_bucket, s3_store, unique_bucket_name

pytestmark = pytest.mark.slow

REPAGE = Path(sys.executable).with_name("repage")
COLLECTION = "fltr_documents"
DIM = 8
RATE = 40.0  # object requests per second
WINDOW_S = 5.0
TOLERANCE = 0.10
STEP_S = 0.25  # sliding windows start every STEP_S seconds
# A pause longer than this (10 slots at RATE) is the run doing something else (journal,
# Milvus write, next claim): it ends one busy stretch of the object phase.
IDLE_GAP_S = 10 / RATE


class Store:
    """A synthetic broken store: `linked` documents whose image chunks carry legacy keys,
    `unlinked` ones whose image chunks lost their key (found by listing the prefix)."""

    def __init__(self, tmp_path: Path, endpoint: str, moto_endpoint: str, *, linked: int, unlinked: int,
                 images: int):
        self.bucket = unique_bucket_name()
        create_bucket(moto_endpoint, self.bucket)
        self.milvus_uri = str(tmp_path / "milvus.db")
        self.documents = linked + unlinked
        self.images = self.documents * images
        self.env = {
            **os.environ,
            "REPAGE_STORE_URL": f"s3://{self.bucket}",
            "REPAGE_S3_ENDPOINT": endpoint,
            "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "REPAGE_MILVUS_URI": self.milvus_uri,
            "REPAGE_COLLECTION": COLLECTION,
            "REPAGE_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        }
        for name in ("MILVUS_URI", "MILVUS_TOKEN", "R2_ACCOUNT_ID", "R2_BUCKET_NAME", "R2_ACCESS_KEY_ID",
                     "R2_SECRET_ACCESS_KEY"):
            self.env.pop(name, None)  # never the app's own stores
        rows = []
        rng = np.random.default_rng(4)
        objects = s3_store(moto_endpoint, self.bucket)  # straight to moto: uploads are not counted
        try:
            for d in range(self.documents):
                doc, unlinked_doc = f"doc{d:03d}", d >= linked
                rows.append(self._row(rng, doc, 0, "text", None, None))
                for i in range(images):
                    page = 1 + (d + i) % 5
                    key = legacy_image_key("ds1", doc, i, legacy_image_name(f"tmp{doc}.pdf", page, 0, "png"))
                    objects.put(key, f"png {doc} {i} ".encode() * (20 + i))
                    rows.append(self._row(rng, doc, 1 + i, "image", i, None if unlinked_doc else key))
        finally:
            objects.close()
        vectors = MilvusVectors.create_collection(self.milvus_uri, COLLECTION, dim=DIM, pk="auto")
        try:
            vectors.insert(rows)
        finally:
            vectors.close()
            # Lite runs in this process and locks its folder until its server stops; the CLI opens it next.
            server_manager_instance.release_server(self.milvus_uri)

    @staticmethod
    def _row(rng, doc: str, index: int, kind: str, image_index: int | None, key: str | None) -> dict:
        return dict(vector=rng.random(DIM, dtype=np.float32).tolist(), chunk_id=f"{doc}_{index}",
                    text=f"text {doc} #{index}", dataset_id="ds1", document_id=doc, filename=f"{doc}.pdf",
                    chunk_index=index, document_type="pdf", title=f"Title {doc}", chunk_type=kind, page=0,
                    image_index=image_index, ocr_confidence=0.9 if kind == "image" else None,
                    image_r2_key=key, image_size="640x480" if kind == "image" else None)

    def repage(self, *args: str, timeout: float = 120.0) -> tuple[int, dict]:
        done = subprocess.run([str(REPAGE), *args, "--json"], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.stdout.strip(), f"repage {' '.join(args)} printed nothing (rc {done.returncode}): {done.stderr}"
        return done.returncode, json.loads(done.stdout)


def busy_stretches(times: list[float]) -> list[tuple[float, float]]:
    """[start, end] of the runs of requests no more than IDLE_GAP_S apart."""
    stretches, start = [], times[0]
    for before, after in zip(times, times[1:]):
        if after - before > IDLE_GAP_S:
            stretches.append((start, before))
            start = after
    stretches.append((start, times[-1]))
    return stretches


def window_counts(times: list[float], start: float, end: float) -> list[tuple[float, int]]:
    """(offset, requests) of every WINDOW_S window starting in steps of STEP_S inside [start, end]."""
    counts, t = [], start
    stamps = np.asarray(times)
    while t + WINDOW_S <= end:
        counts.append((t, int(((stamps >= t) & (stamps < t + WINDOW_S)).sum())))
        t += STEP_S
    return counts


def test_object_ops_per_second_is_honoured_per_5s_window(tmp_path, moto_endpoint, counting_proxy):
    # 40 documents x 4 images: 160 planning GETs + 480 COPY/HEAD/GET + 10 listings = 650
    # requests, ~16 s at 40/s.
    store = Store(tmp_path, counting_proxy.endpoint, moto_endpoint, linked=30, unlinked=10, images=4)
    rc, scan = store.repage("scan")
    assert rc == 0 and scan["totals"] == {"keys": store.documents}, scan

    counting_proxy.reset()
    started = time.monotonic()
    rc, summary = store.repage("run", "--object-ops-per-second", f"{RATE:g}")
    finished = time.monotonic()
    seen = counting_proxy.seen()

    assert rc == 0, summary
    assert summary["migrated"] == store.documents and summary["failed"] == 0, summary
    assert summary["objects_copied"] == store.images and summary["throttled"] == 0, summary
    times = sorted(s.at for s in seen)
    import collections
    print("DEBUG", collections.Counter((s.method, s.path.split('?')[1][:30] if '?' in s.path else s.path.count('/')) for s in seen))
    print("DEBUG first", [(round(s.at-started,3), s.method, s.path[:80]) for s in seen[:5]], "last", [(round(s.at-started,3), s.method, s.path[:80]) for s in seen[-3:]], "finished", finished-started)
    gaps = [(round(b.at-started,2), round(b.at-a.at,3), b.method) for a, b in zip(seen, seen[1:]) if b.at-a.at > 0.05]
    print("DEBUG gaps", gaps)
    assert len(times) == 4 * store.images + 10, (len(times), sorted({s.method for s in seen}))
    assert all(started <= t <= finished for t in times)

    stretches = busy_stretches(times)
    windows = [w for start, end in stretches for w in window_counts(times, start, end)]
    per_window = [n for _, n in windows]
    expected = RATE * WINDOW_S
    report = (f"{len(times)} requests in {times[-1] - times[0]:.2f} s; busy stretches "
              f"{[(round(a - times[0], 2), round(b - times[0], 2)) for a, b in stretches]}; "
              f"{len(windows)} windows, counts min {min(per_window, default=None)} "
              f"max {max(per_window, default=None)}: {per_window}")
    print(report)
    # The object phase lasts ~16 s: at least two disjoint 5-second windows are measured.
    assert windows and windows[-1][0] - windows[0][0] >= WINDOW_S, report
    assert all(abs(n - expected) <= TOLERANCE * expected for n in per_window), report
    # The whole run never exceeds the rate either (one slot of burst, and a little arrival jitter).
    span = times[-1] - times[0]
    assert len(times) <= RATE * span + 3, report

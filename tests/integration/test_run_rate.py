"""`repage run --object-ops-per-second R` honours R at the bucket, and backs off on 503 SlowDown.

Acceptance (docs/design.md §11): a counting proxy on 127.0.0.1 in front of moto_server shows the
rate honoured within 10% per 5-second window. The real CLI runs as a subprocess against
a synthetic FLTR-shaped store: a Milvus Lite file with chunks on page 0 whose legacy
image keys carry the true page, and those images in a moto bucket. Requests are counted
at the proxy (docs/design.md §7.4), never in moto or in repage.

The store is pre-scanned with `repage scan` (scan is not rate limited), so every request
the proxy sees while `repage run` runs, but the one LIST that checks the bucket as the
stores open and the adapter's checksum probe, is one the run's limiter allowed: the listing
of a document whose chunks lost their keys, the planning GET of each legacy image, then COPY
+ GET of each copy (moto does not check a PUT's SHA-256: docs/design.md §5.2, §7.4). Windows
are taken inside the busy stretches of that object phase: the pause between planning and
copying (journal writes to the ledger) is not the limiter's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from bisect import bisect_left, bisect_right
from pathlib import Path

import numpy as np
import pytest
from milvus_lite.server_manager import server_manager_instance

from repage.domain.keys import legacy_image_key, legacy_image_name
from repage.stores.milvus import MilvusVectors
from tests.fixtures.s3 import FAKE_KEY_ID, FAKE_SECRET, create_bucket, s3_store, unique_bucket_name

pytestmark = pytest.mark.slow

REPAGE = Path(sys.executable).with_name("repage")
COLLECTION = "fltr_documents"
DIM = 8
RATE = 40.0  # object requests per second
CONCURRENCY = 4  # object requests in flight (repage's default)
WINDOW_S = 5.0
TOLERANCE = 0.10
STEP_S = 0.25  # sliding windows start every STEP_S seconds
# A pause longer than this (10 slots at RATE) is the run doing something else (journal,
# Milvus write, next claim): it ends one busy stretch of the object phase.
IDLE_GAP_S = 10 / RATE


class Store:
    """A synthetic broken store: `linked` documents whose image chunks carry legacy keys,
    `unlinked` ones whose image chunks lost their key (found by listing the prefix)."""

    def __init__(self, tmp_path: Path, endpoint: str, moto_endpoint: str, *, linked: int, unlinked: int, images: int):
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
        for name in (
            "MILVUS_URI",
            "MILVUS_TOKEN",
            "R2_ACCOUNT_ID",
            "R2_BUCKET_NAME",
            "R2_ACCESS_KEY_ID",
            "R2_SECRET_ACCESS_KEY",
        ):
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
        return dict(
            vector=rng.random(DIM, dtype=np.float32).tolist(),
            chunk_id=f"{doc}_{index}",
            text=f"text {doc} #{index}",
            dataset_id="ds1",
            document_id=doc,
            filename=f"{doc}.pdf",
            chunk_index=index,
            document_type="pdf",
            title=f"Title {doc}",
            chunk_type=kind,
            page=0,
            image_index=image_index,
            ocr_confidence=0.9 if kind == "image" else None,
            image_r2_key=key,
            image_size="640x480" if kind == "image" else None,
        )

    def repage(self, *args: str, timeout: float = 120.0) -> tuple[int, dict]:
        done = subprocess.run(
            [str(REPAGE), *args, "--json"], env=self.env, capture_output=True, text=True, timeout=timeout
        )
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


def window_counts(times: list[float], start: float, end: float) -> list[int]:
    """Requests in every WINDOW_S window [t, t + WINDOW_S) inside [start, end], t in steps of STEP_S."""
    counts, t = [], start
    while t + WINDOW_S <= end:
        counts.append(bisect_left(times, t + WINDOW_S) - bisect_left(times, t))
        t += STEP_S
    return counts


def max_excess(times: list[float], rate: float) -> float:
    """The most requests any span [t_i, t_j] holds beyond its 1 + rate * (t_j - t_i), the
    ceiling of a token bucket of burst 1. O(n): max over j of (j - rate t_j) minus the
    smallest (i - rate t_i) before it."""
    worst, lowest = -math.inf, math.inf
    for j, t in enumerate(times):
        lowest = min(lowest, j - rate * t)
        worst = max(worst, j - rate * t - lowest)
    return worst


def run_requests(seen) -> list:
    """The requests of the run's moves: all but the one LIST that checks the bucket when the
    stores open, before the run (and its limiter) exists, and the bucket adapter's checksum
    probe (docs/design.md §5.2): on moto, which stores a wrong checksum, its PUT and the DELETE
    of what it stored (obstore's DELETE is a POST of ?delete). The probe counts as one slot of
    the limiter however many requests it makes."""
    checks = [s for s in seen if "prefix=__repage_check__" in s.path]
    assert len(checks) <= 1, checks
    probe = [s for s in seen if "/.repage/probe/" in s.path or (s.method == "POST" and "delete" in s.path)]
    assert [s.method for s in probe if not s.injected] == ["PUT", "POST"], probe
    return [s for s in seen if s not in checks and s not in probe]


def test_object_ops_per_second_is_honoured_per_5s_window(tmp_path, moto_endpoint, counting_proxy):
    # 50 documents (one batch) x 4 images: 200 planning GETs + 12 listings (~5.3 s at 40/s),
    # then 600 COPY/HEAD/GET (~15 s).
    store = Store(tmp_path, counting_proxy.endpoint, moto_endpoint, linked=38, unlinked=12, images=4)
    rc, scan = store.repage("scan")  # scan is not rate limited: it runs before the measurement
    assert rc == 0 and scan["totals"] == {"keys": store.documents}, scan

    counting_proxy.reset()
    started = time.monotonic()
    rc, summary = store.repage("run", "--object-ops-per-second", f"{RATE:g}", "--concurrency", str(CONCURRENCY))
    finished = time.monotonic()

    assert rc == 0, summary
    assert summary["migrated"] == store.documents and summary["failed"] == 0, summary
    assert summary["objects_copied"] == store.images and summary["throttled"] == 0, summary
    seen = run_requests(counting_proxy.seen())
    assert all(s.status in (200, 204) and not s.injected for s in seen), {s.status for s in seen}
    assert len(seen) == 3 * store.images + 12  # per image: GET to hash, COPY, GET of the copy
    times = sorted(s.at for s in seen)
    assert started <= times[0] and times[-1] <= finished

    stretches = busy_stretches(times)
    counts = [window_counts(times, a, b) for a, b in stretches]
    expected = RATE * WINDOW_S
    shown = [
        (round(a - times[0], 2), round(b - times[0], 2), bisect_right(times, b) - bisect_left(times, a))
        for a, b in stretches
    ]
    report = (
        f"{len(times)} requests in {times[-1] - times[0]:.2f} s, run {finished - started:.1f} s; "
        f"busy stretches (from, to, requests) {shown}; 5 s windows every {STEP_S} s: {counts}"
    )
    print(report)
    flat = [n for c in counts for n in c]
    # Both phases hold a full window, and the copy phase two disjoint ones.
    assert all(counts) and len(counts[-1]) > WINDOW_S / STEP_S, report
    assert all(abs(n - expected) <= TOLERANCE * expected for n in flat), report
    # No span of the run, however short, goes over the rate: a request that skips the
    # limiter (a listing, say) shows up here. Allowed: the requests in flight, which a
    # stall of the client or the server delays after their slots and then lets arrive together.
    assert max_excess(times, RATE) <= CONCURRENCY, (max_excess(times, RATE), report)


def test_injected_slowdowns_back_off_retry_and_migrate_everything(tmp_path, moto_endpoint, counting_proxy):
    store = Store(tmp_path, counting_proxy.endpoint, moto_endpoint, linked=9, unlinked=3, images=3)
    rc, scan = store.repage("scan")
    assert rc == 0 and scan["totals"] == {"keys": store.documents}, scan
    counting_proxy.reset()

    injected = 5
    stop = threading.Event()

    def probed() -> bool:
        """The adapter's checksum probe is over: it deleted what moto stored (a POST of ?delete)."""
        return any(s.method == "POST" and "delete" in s.path for s in counting_proxy.seen())

    def inject_once_running() -> None:  # mid-run: after the stores opened and planning began
        # and after the probe, whose requests run_requests sets apart: the slowdowns hit moves
        while not stop.is_set() and (len(counting_proxy.seen()) < 12 or not probed()):
            time.sleep(0.005)
        counting_proxy.inject_throttle(injected, status=503)

    injector = threading.Thread(target=inject_once_running, daemon=True)
    injector.start()
    try:
        rc, summary = store.repage("run", "--object-ops-per-second", "100")
    finally:
        stop.set()
        injector.join()

    seen = run_requests(counting_proxy.seen())
    slowed = [s for s in seen if s.injected]
    assert rc == 0, summary
    assert [s.status for s in slowed] == [503] * injected, slowed
    assert summary["throttled"] == injected, summary  # the limiter heard every SlowDown
    assert summary["migrated"] == store.documents and summary["failed"] == 0, summary
    assert summary["objects_copied"] == store.images, summary
    for s in slowed:  # each refused request was sent again, after a backoff, and succeeded
        retry = next(
            (r for r in seen if r.at > s.at and not r.injected and (r.method, r.path) == (s.method, s.path)), None
        )
        assert retry is not None and retry.status == 200, (s, retry)
        assert retry.at - s.at >= 0.04, (s, retry)  # >= half the first backoff step (0.1 s)
    # Nothing but the retries was added: 3 requests per image, 1 listing per unlinked document.
    assert len(seen) == 3 * store.images + 3 + injected

    rc, verified = store.repage("verify")
    assert rc == 0 and verified["ok"] and verified["passed"] == store.documents, verified

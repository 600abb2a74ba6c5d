"""Built stores for the benchmark: cached masters and fresh copies for each contender.

A master store is a stopped Milvus Lite data folder plus a local bucket folder, built
once by bench.synthetic and kept under bench/out/stores/, keyed by its parameters (and a
hash of the generator's source, so a changed generator builds again). Every contender
gets its own copy of both folders (`copytree` of a stopped Lite folder and of the
bucket), so naive, floor and repage each start from the same broken store.

For the S3 variant, a `moto_server` is started on 127.0.0.1 and each contender gets a
fresh bucket filled from the master's bucket folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.scan_memory import COLLECTION, LiteServer, free_port, stop_process
from bench.synthetic import CHUNKS_PER_DOC, IMAGE_CHUNKS, build_store
from repage.errors import RepageError, StoreError
from repage.stores.milvus import AFFECTED_FILTER, MilvusVectors
from repage.stores.objects import ObjectStore

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
MOTO_KEY = MOTO_SECRET = "testing"  # moto accepts any; nothing here reads real credentials
UPLOAD_THREADS = 16


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def generator_hash() -> str:
    source = (ROOT / "synthetic.py").read_bytes()
    return hashlib.sha256(source).hexdigest()[:12]


@dataclass(frozen=True)
class StoreSpec:
    documents: int
    seed: int = 0
    pk: str = "auto"

    @property
    def name(self) -> str:
        return f"d{self.documents}-s{self.seed}-{self.pk}"

    def manifest(self) -> dict:
        return {
            "documents": self.documents,
            "seed": self.seed,
            "pk": self.pk,
            "chunks": self.documents * CHUNKS_PER_DOC,
            "affected_chunks": self.documents * IMAGE_CHUNKS,
            "images": self.documents * IMAGE_CHUNKS,
            "generator": generator_hash(),
        }


def ensure_master(spec: StoreSpec, *, rebuild: bool = False) -> Path:
    """The master store folder (lite/, bucket/, store.json), built if missing or stale."""
    folder = OUT / "stores" / spec.name
    manifest_path = folder / "store.json"
    want = spec.manifest()
    if not rebuild and manifest_path.exists():
        have = json.loads(manifest_path.read_text())
        if {k: have.get(k) for k in want} == want and (folder / "lite").is_dir():
            log(f"reusing the {spec.documents:,}-document store in {folder}")
            return folder
        log(f"{folder}: parameters or generator changed: building again")
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "bucket").mkdir(parents=True)
    log(
        f"building {spec.documents:,} documents ({spec.documents * CHUNKS_PER_DOC:,} chunks, "
        f"{spec.documents * IMAGE_CHUNKS:,} images) at ~1.1k rows/s into {folder}"
    )
    started = time.perf_counter()
    with LiteServer(folder / "lite", free_port(), folder / "build-server.log") as server:
        summary = build_store(
            spec.documents,
            server.uri,
            (folder / "bucket").as_uri(),
            collection=COLLECTION,
            pk=spec.pk,
            seed=spec.seed,
            images=True,
            log=log,
        ).as_dict()
    manifest_path.write_text(
        json.dumps({**want, "build": summary, "build_seconds": round(time.perf_counter() - started, 1)}, indent=2)
    )
    return folder


def fresh_copy(master: Path, dest: Path, *, bucket: bool = True) -> Path:
    """A private copy of the master's Lite folder (and bucket folder) at dest."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copytree(master / "lite", dest / "lite")
    (dest / "lite" / "LOCK").unlink(missing_ok=True)
    if bucket:
        shutil.copytree(master / "bucket", dest / "bucket")
    return dest


def load_and_count(uri: str) -> tuple[float, int, int]:
    """Load the (released) collection; seconds it took, rows, affected rows."""
    started = time.perf_counter()
    with MilvusVectors(uri, COLLECTION, timeout=900.0) as vectors:
        loaded = time.perf_counter() - started
        return loaded, vectors.count(""), vectors.count(AFFECTED_FILTER)


# ---------------------------------------------------------------- moto


class MotoServer:
    """`moto_server` on 127.0.0.1 as a child process; stopped on exit."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> MotoServer:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StoreError(f"moto_server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                httpx.get(self.endpoint, timeout=1.0)
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        self.__exit__()
        raise StoreError(f"moto_server did not answer at {self.endpoint} within 30 s")

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc, timeout=10)
        self._log.close()

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": MOTO_KEY,
            "AWS_SECRET_ACCESS_KEY": MOTO_SECRET,
            "REPAGE_S3_ENDPOINT": self.endpoint,
            "REPAGE_S3_REGION": "us-east-1",
        }

    def store(self, bucket: str) -> ObjectStore:
        return ObjectStore.from_url(
            f"s3://{bucket}",
            endpoint=self.endpoint,
            region="us-east-1",
            access_key_id=MOTO_KEY,
            secret_access_key=MOTO_SECRET,
        )

    def fill_bucket(self, bucket: str, folder: Path) -> tuple[int, float]:
        """Create `bucket` and upload every file under `folder` at its relative key."""
        started = time.perf_counter()
        httpx.put(f"{self.endpoint}/{bucket}", timeout=10.0).raise_for_status()
        files = [p for p in folder.rglob("*") if p.is_file()]
        store = self.store(bucket)
        try:
            with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
                list(pool.map(lambda p: store.put(p.relative_to(folder).as_posix(), p.read_bytes()), files))
        finally:
            store.close()
        return len(files), time.perf_counter() - started


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without inherited REPAGE_* and app fallback variables, plus extra."""
    from bench.scan_memory import FOREIGN_ENV

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REPAGE_") and k not in FOREIGN_ENV and not k.startswith("AWS_")
    }
    env.update(extra)
    return env


__all__ = [
    "StoreSpec",
    "ensure_master",
    "fresh_copy",
    "load_and_count",
    "MotoServer",
    "LiteServer",
    "clean_env",
    "RepageError",
    "log",
]

"""Measure real latencies on a sample of documents, then apply the estimate model.

Read-only: queries, HEADs, LISTs and GETs. Writes are never made to measure them:
a batch write is taken to cost what a batch read of the same rows costs, and a
server-side COPY or a PUT what a GET of the same object costs (stated in the report).
The one write is the bucket adapter's checksum probe (docs/design.md §5.2), made as a run
makes it, to know whether a move takes 2 requests or 3; it leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import TypeVar

from repage.domain.estimate import Estimate, Latencies, PathLoad, estimate
from repage.domain.keys import image_prefix, source_key_candidates
from repage.domain.plan import is_affected
from repage.domain.states import RepairPath, State
from repage.errors import BadInput, ObjectNotFound, StoreError
from repage.migration.pdfpages import iter_page_images

T = TypeVar("T")

ASSUMPTIONS = (
    "batch query time = measured fetch of a full batch of documents, on the store as it is now "
    "(a Milvus Lite store slows as a run writes unsealed rows); batch write time = measured read-back of "
    "that batch's affected chunks; a COPY or a PUT costs a GET; on Milvus Lite the flush after each batch "
    "costs a read-back; row checksums (2 per affected chunk) as timed on the sample; ledger: 3 round trips "
    "per document; "
    "reprocess time = the product's published 30 s - 5 min per document"
)


@dataclass
class EstimateReport:
    result: Estimate
    latencies: Latencies
    loads: dict

    def as_report(self) -> dict:
        report = self.result.as_dict()
        report["latencies"] = asdict(self.latencies)
        report["loads"] = self.loads
        report["assumptions"] = ASSUMPTIONS
        return report


def timed(call: Callable[..., T]) -> tuple[float, T]:  # `...`: lambdas that bind loop values as defaults
    started = time.perf_counter()
    value = call()
    return time.perf_counter() - started, value


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def path_loads(ledger) -> dict[RepairPath, PathLoad]:
    """Documents and chunks per path still to do, from the ledger."""
    docs: dict[RepairPath, int] = defaultdict(int)
    chunks: dict[RepairPath, int] = defaultdict(int)
    moves: dict[RepairPath, int] = defaultdict(int)
    for record in ledger.documents(states={State.PENDING, State.FAILED, State.DEFERRED, State.REVIEW}):
        path = RepairPath(record.path)
        docs[path] += 1
        chunks[path] += record.affected_chunks or 0
        moves[path] += record.images_to_move or 0
    return {p: PathLoad(documents=docs[p], chunks=chunks[p], images_to_move=moves[p]) for p in docs}


def sample_documents(ledger, sample: int) -> dict[RepairPath, list]:
    picked: dict[RepairPath, list] = defaultdict(list)
    for record in ledger.documents(states={State.PENDING}):
        if len(picked[RepairPath(record.path)]) < sample:
            picked[RepairPath(record.path)].append(record)
    return picked


def measure(
    stores, picked: dict[RepairPath, list], batch_size: int, concurrency: int = 1, sample: int | None = None
) -> Latencies:
    """The run's own calls on one batch of the sample: its Milvus fetch and read-back, the bucket
    requests at the run's concurrency, and ledger round trips."""
    docs = (picked[RepairPath.KEYS] + picked[RepairPath.PDF])[:sample]
    query_s, rows = _time_batches(stores.vectors, stores.ledger, [d.document_id for d in docs], batch_size)
    readback_s = _time_readback(stores.vectors, rows, len(docs), batch_size)
    keys = [r["image_r2_key"] for r in rows if r.get("image_r2_key")][:batch_size]
    heads, gets = _time_objects(stores.objects, keys[: len(docs) or 1])
    lists = [
        timed(lambda d=d: next(iter(stores.objects.list(image_prefix(d.dataset_id, d.document_id))), None))[0]
        for d in docs[:5]
    ]
    get_rate, pdf_s_per_mb, mean_size = _time_sources(stores, picked[RepairPath.PDF][:3])
    ledger_s = median([timed(stores.ledger.db_now)[0] for _ in range(9)])
    affected = [r for r in rows if is_affected(r)]
    checksum_s = timed(lambda: [stores.vectors.row_checksum(r) for r in affected])[0] / max(len(affected), 1)
    return Latencies(
        milvus_query_s=query_s,
        milvus_write_s=readback_s,
        milvus_readback_s=readback_s,
        object_head_s=median(heads),
        object_list_s=median(lists),
        object_copy_s=median(gets),
        get_bytes_per_s=get_rate,
        pdf_seconds_per_mb=pdf_s_per_mb,
        mean_source_bytes=mean_size,
        sample_size=len(docs),
        ledger_round_trip_s=ledger_s,
        object_request_s=_time_concurrent_gets(stores.objects, keys, concurrency),
        # Lite flushes after each batch's write (docs/milvus-lite-durability.md); a flush cannot
        # be timed without writing, so it is taken to cost one more read-back: it seals the rows
        # the write changed, vectors included (docs/design.md §12).
        milvus_flush_s=readback_s if getattr(stores.vectors, "is_lite", False) else 0.0,
        checksum_s=checksum_s,
    )


def _time_batches(vectors, ledger, document_ids: list[str], batch_size: int) -> tuple[float, list[dict]]:
    """Seconds per full batch of the run's fetch, timed on every sampled document in batches of
    `batch_size`; a smaller sample is scaled up to a full batch (rows per document stay alike).
    As the run reads: the scan's affected chunks by primary key, other documents by filter."""
    if not document_ids:
        return 0.0, []
    rows: list[dict] = []
    seconds = 0.0
    for start in range(0, len(document_ids), batch_size):
        took, got = timed(lambda ids=document_ids[start : start + batch_size]: _fetch_as_run(vectors, ledger, ids))
        seconds, rows = seconds + took, rows + got
    per_document = seconds / len(document_ids)
    return per_document * batch_size, rows


def _fetch_as_run(vectors, ledger, document_ids: list[str]) -> list[dict]:
    recorded = ledger.chunk_keys(document_ids)
    rest = [d for d in document_ids if d not in recorded]
    keyed = vectors.fetch_by_pks([pk for pairs in recorded.values() for pk, _ in pairs]) if recorded else []
    return keyed + (vectors.fetch_for_repair(rest) if rest else [])


def _time_readback(vectors, rows: Sequence[dict], documents: int = 0, batch_size: int = 0) -> float:
    """The run's read-back (docs/design.md §5.4): the sample's affected chunks, with vectors, in
    one read as the run makes it, scaled like the fetch from the sample's `documents` to a full
    batch (before, a sample of 20 documents priced the read-back of 200 as that of 20)."""
    info = vectors.info()
    written = {info.identity.key(r): str(r[info.pk_field]) for r in rows if is_affected(r)}
    if not written:
        return 0.0
    seconds = timed(lambda: vectors.find_written(written))[0]
    return seconds * batch_size / documents if 0 < documents < batch_size else seconds


def _time_objects(objects, keys: Sequence[str]) -> tuple[list[float], list[float]]:
    heads, gets = [], []
    for key in keys:
        try:
            heads.append(timed(lambda k=key: objects.head(k))[0])
            gets.append(timed(lambda k=key: objects.get(k))[0])
        except ObjectNotFound:
            continue
    return heads, gets


def _time_concurrent_gets(objects, keys: Sequence[str], concurrency: int, rounds: int = 3) -> float | None:
    """Wall seconds per GET with `concurrency` in flight, hashed as a run hashes what it reads:
    what one request costs in a run, where latency overlaps and client-side CPU does not.

    The threads are started before the clock, and the median of `rounds` passes is taken: a
    small sample (--sample 20: ~120 keys, ~15 ms on a local folder) is otherwise priced by one
    pass's thread start-up or one hiccup of a shared machine, times every request of the run.
    """
    if not keys:
        return None

    def get(key: str) -> None:
        with contextlib.suppress(ObjectNotFound):
            hashlib.sha256(objects.get(key)).hexdigest()

    passes = []
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        list(pool.map(lambda _: None, range(max(1, concurrency))))  # start the threads
        for _ in range(rounds):
            started = time.perf_counter()
            list(pool.map(get, keys))
            passes.append((time.perf_counter() - started) / len(keys))
    return median(passes)


def _time_sources(stores, records: Sequence) -> tuple[float, float, float]:
    """GET throughput of source PDFs, local extraction seconds per MB, mean PDF size."""
    total_bytes, get_s, cpu_s, count = 0, 0.0, 0.0, 0
    for record in records:
        fetched = _get_source(stores, record)
        if fetched is None:
            continue
        seconds, data = fetched
        total_bytes, get_s, count = total_bytes + len(data), get_s + seconds, count + 1
        try:
            cpu_s += timed(lambda d=data, name=record.filename: sum(1 for _ in iter_page_images(d, name)))[0]
        except BadInput:
            continue
    if not total_bytes:
        return 0.0, 0.0, 0.0
    return total_bytes / max(get_s, 1e-9), cpu_s / (total_bytes / 1e6), total_bytes / count


def _get_source(stores, record) -> tuple[float, bytes] | None:
    fields = {"dataset_id": record.dataset_id, "filename": record.filename, "document_id": record.document_id}
    for key in source_key_candidates(stores.settings.source_key_template, fields):
        try:
            return timed(lambda k=key: stores.objects.get(k))
        except ObjectNotFound:
            continue
    return None


def checks_sha256(objects) -> bool:
    """Whether a run's moves will be checked PUTs (2 requests an image) rather than COPY + GET (3):
    the adapter's probe (docs/design.md §5.2). A probe that gets no answer prices the 3."""
    try:
        return bool(objects.verifies_sha256)
    except StoreError:
        return False


def estimate_store(stores, *, sample: int = 20) -> EstimateReport:
    settings = stores.settings
    loads = path_loads(stores.ledger)
    # the batch query is timed on the sample's documents and priced per full batch (_time_batches)
    latencies = measure(
        stores,
        sample_documents(stores.ledger, sample),
        settings.batch_size,
        settings.concurrency,
        sample,
    )
    if RepairPath.PDF in loads:  # the scan does not read sources: size them from the sample
        pdf = loads[RepairPath.PDF]
        loads[RepairPath.PDF] = replace(pdf, source_bytes=int(latencies.mean_source_bytes * pdf.documents))
    result = estimate(
        loads,
        latencies,
        settings.prices,
        concurrency=settings.concurrency,
        batch_size=settings.batch_size,
        checked_puts=checks_sha256(stores.objects),
    )
    return EstimateReport(result, latencies, {p.value: asdict(load) for p, load in loads.items()})

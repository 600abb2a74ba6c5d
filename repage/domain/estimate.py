"""Time and cost model (docs/design.md §12; costs per path §2, figures §8).

Pure: measured latencies and counts in, figures out.

The latencies come from a probe of real calls against the configured stores
(`repage.migration.probe`); nothing here is a constant for time except the product's own (quoted in docs/design.md §8.1)
published ranges, shown beside our figures for comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from repage.domain.states import RepairPath

# Object requests per moved image, by the safety protocol (docs/design.md §5.1, §5.2): GET the
# legacy object to hash it, COPY it, GET the copy to compare size and hash. Where the bucket
# checks a PUT's SHA-256 (the adapter's probe), a PUT of the bytes that GET read replaces the
# COPY and the GET of the copy: 1 class A + 1 class B.
MOVE_CLASS_A = 1
MOVE_CLASS_B = 2
MOVE_CLASS_B_CHECKED = 1


def move_class_b(checked_puts: bool) -> int:
    """Class B requests per moved image: with checked PUTs only the planning GET."""
    return MOVE_CLASS_B_CHECKED if checked_puts else MOVE_CLASS_B


# Ledger round trips per migrated document, on the batch's one thread: its share of the
# batch-wide steps (claim, journal, verified copies, lease renewal, chunks applied, the
# transition to migrated: a few statements each, one row per document or chunk in each).
# Measured on SQLite, 1,000 documents: ~0.8 ms per document at ~0.24 ms per round trip, 3.5
# round trips (6 while each document's transition was a statement of its own).
LEDGER_ROUND_TRIPS_PER_DOCUMENT = 3
# Row checksums per affected chunk, each on the run's CPU (under the GIL the planning and
# checking threads do not overlap): one when the change is planned, one on the read-back.
CHECKSUMS_PER_CHUNK = 2
# The product's published per-document ranges (seconds, docs/design.md §8.1), quoted beside ours.
SEED_FAST_PATH_S = (5.0, 30.0)
SEED_REPROCESS_S = (30.0, 300.0)


class Prices(Protocol):
    """The price table the model reads (`repage.config.Prices` is one)."""

    class_a_per_million: float
    class_b_per_million: float
    reprocess_compute_per_document: float
    reprocess_compute_per_document_high: float
    vision_per_image: float
    vision_per_image_high: float
    ocr_per_image: float
    ocr_per_image_high: float


@dataclass(frozen=True)
class Latencies:
    """Seconds per operation as measured by the probe (medians)."""

    milvus_query_s: float  # one batch query of all chunks of `batch_size` documents
    milvus_write_s: float  # one batch write (estimated from a read of the same size)
    object_head_s: float
    object_list_s: float
    object_copy_s: float
    get_bytes_per_s: float  # source PDF download throughput
    pdf_seconds_per_mb: float  # local PDF image extraction + matching
    mean_source_bytes: float = 0.0  # mean size of the sampled source PDFs
    sample_size: int = 0
    milvus_readback_s: float | None = (
        None  # the batch's affected chunks, as the run reads them back (None: = the query)
    )
    ledger_round_trip_s: float = 0.0  # one short ledger transaction
    object_request_s: float | None = None  # wall seconds per GET with the run's concurrency in flight
    milvus_flush_s: float = 0.0  # the flush after each batch's write (Milvus Lite only; 0 elsewhere)
    checksum_s: float = 0.0  # CPU seconds for one affected row's rest-of-row checksum


@dataclass(frozen=True)
class PathLoad:
    """What one path has to do, from the scan."""

    documents: int = 0
    chunks: int = 0
    images_to_move: int = 0  # images whose key is not canonical
    listings: int = 0  # listing requests the run will repeat for unlinked chunks
    source_bytes: int = 0  # pdf path: bytes of the source PDFs to read


@dataclass(frozen=True)
class PathEstimate:
    path: str
    documents: int
    chunks: int
    class_a: int
    class_b: int
    seconds: float
    dollars: float  # the low end where the price is a range (reprocess)
    seed_seconds: tuple[float, float] | None = None
    dollars_high: float | None = None  # the high end of a price range; None: `dollars` is exact


@dataclass(frozen=True)
class Estimate:
    concurrency: int
    batch_size: int
    paths: list[PathEstimate] = field(default_factory=list)
    checked_puts: bool = False  # moves priced as a checked PUT + the planning GET, not COPY + 2 GETs

    @property
    def requests_per_moved_image(self) -> int:
        return MOVE_CLASS_A + move_class_b(self.checked_puts)

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.paths)

    @property
    def dollars(self) -> float:
        return sum(p.dollars for p in self.paths)

    @property
    def dollars_high(self) -> float:
        """The total at the high end of every price range."""
        return sum(p.dollars if p.dollars_high is None else p.dollars_high for p in self.paths)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            total_seconds=self.seconds,
            total_dollars=self.dollars,
            total_dollars_high=self.dollars_high,
            requests_per_moved_image=self.requests_per_moved_image,
        )
        return data


def request_dollars(class_a: int, class_b: int, prices: Prices) -> float:
    return class_a * prices.class_a_per_million / 1e6 + class_b * prices.class_b_per_million / 1e6


def reprocess_dollars(documents: int, images: int, prices: Prices) -> tuple[float, float]:
    """(low, high) dollars to reprocess documents holding `images` image/OCR chunks: the pipeline per
    document, vision and OCR per image, at both ends of the brief's ranges (docs/design.md §8.1)."""
    low = documents * prices.reprocess_compute_per_document + images * (prices.vision_per_image + prices.ocr_per_image)
    high = documents * prices.reprocess_compute_per_document_high + images * (
        prices.vision_per_image_high + prices.ocr_per_image_high
    )
    return low, high


def worst_case_document_dollars(affected_chunks: int, prices: Prices) -> float:
    """The most one keys/pdf-path document costs in bucket requests (a run reserves it against its
    budget, docs/design.md §12): per affected chunk a GET of the original, a COPY or PUT and a GET
    of the copy (a checked PUT saves that GET, but a move may still fall back to it: §5.2); plus a
    listing and the source PDF's GET."""
    return request_dollars(affected_chunks + 1, 2 * affected_chunks + 1, prices)


def _store_seconds(documents: int, batch_size: int, lat: Latencies) -> float:
    """Milvus (per batch: query, write, read back, and on Lite the flush) and the ledger (per document)."""
    batches = -(-documents // batch_size)  # ceil
    readback = lat.milvus_query_s if lat.milvus_readback_s is None else lat.milvus_readback_s
    ledger = documents * LEDGER_ROUND_TRIPS_PER_DOCUMENT * lat.ledger_round_trip_s
    return batches * (lat.milvus_query_s + lat.milvus_write_s + readback + lat.milvus_flush_s) + ledger


def keys_estimate(
    load: PathLoad,
    lat: Latencies,
    prices: Prices,
    concurrency: int,
    batch_size: int,
    checked_puts: bool = False,
) -> PathEstimate:
    move_b = move_class_b(checked_puts)
    class_a = load.images_to_move * MOVE_CLASS_A + load.listings
    class_b = load.images_to_move * move_b
    requests = load.images_to_move * (MOVE_CLASS_A + move_b)
    if lat.object_request_s is not None:  # measured at the run's concurrency: overlap included
        object_s = requests * lat.object_request_s + load.listings * lat.object_list_s / concurrency
    else:  # one request at a time, divided by the concurrency (a GET costs about a HEAD)
        object_s = (
            load.images_to_move * (lat.object_copy_s + move_b * lat.object_head_s) + load.listings * lat.object_list_s
        ) / concurrency
    checksum_s = load.chunks * CHECKSUMS_PER_CHUNK * lat.checksum_s
    seconds = _store_seconds(load.documents, batch_size, lat) + object_s + checksum_s
    return PathEstimate(
        "keys",
        load.documents,
        load.chunks,
        class_a,
        class_b,
        seconds,
        request_dollars(class_a, class_b, prices),
        _seed_range(SEED_FAST_PATH_S, load.documents),
    )


def pdf_estimate(
    load: PathLoad,
    lat: Latencies,
    prices: Prices,
    concurrency: int,
    batch_size: int,
    checked_puts: bool = False,
) -> PathEstimate:
    # Per document one listing and one GET of the source PDF; per image chunk one copy or upload
    # checked by a GET, or a PUT the bucket checks (docs/design.md §5.2); one GET per bucket image
    # compared by its hash.
    class_a = load.documents + load.chunks
    class_b = load.documents + load.images_to_move + (move_class_b(checked_puts) - 1) * load.chunks
    mb = load.source_bytes / 1e6
    transfer_s = load.source_bytes / max(lat.get_bytes_per_s, 1.0)
    work_s = transfer_s + mb * lat.pdf_seconds_per_mb + load.chunks * lat.object_copy_s
    seconds = _store_seconds(load.documents, batch_size, lat) + work_s / concurrency
    return PathEstimate(
        "pdf",
        load.documents,
        load.chunks,
        class_a,
        class_b,
        seconds,
        request_dollars(class_a, class_b, prices),
        _seed_range(SEED_FAST_PATH_S, load.documents),
    )


def reprocess_estimate(load: PathLoad, prices: Prices, concurrency: int) -> PathEstimate:
    """The slow path runs the app's pipeline: its time is the product's published range
    (docs/design.md §8.1), not measured here."""
    dollars, dollars_high = reprocess_dollars(load.documents, load.chunks, prices)
    low, high = SEED_REPROCESS_S
    seconds = load.documents * (low + high) / 2 / concurrency
    return PathEstimate(
        "reprocess",
        load.documents,
        load.chunks,
        0,
        load.documents,
        seconds,
        dollars,
        _seed_range(SEED_REPROCESS_S, load.documents),
        dollars_high,
    )


def _seed_range(per_doc: tuple[float, float], documents: int) -> tuple[float, float]:
    return (per_doc[0] * documents, per_doc[1] * documents)


def estimate(
    loads: Mapping[RepairPath, PathLoad],
    lat: Latencies,
    prices: Prices,
    *,
    concurrency: int,
    batch_size: int,
    checked_puts: bool = False,
) -> Estimate:
    """Time (at `concurrency`) and dollars for every path with work to do. `checked_puts`: the
    bucket checks a PUT's SHA-256, so a move takes 2 requests, not 3 (docs/design.md §5.2)."""
    result = Estimate(concurrency=concurrency, batch_size=batch_size, checked_puts=checked_puts)
    sizes = (concurrency, batch_size, checked_puts)
    if RepairPath.KEYS in loads:
        result.paths.append(keys_estimate(loads[RepairPath.KEYS], lat, prices, *sizes))
    if RepairPath.PDF in loads:
        result.paths.append(pdf_estimate(loads[RepairPath.PDF], lat, prices, *sizes))
    if RepairPath.REPROCESS in loads:
        result.paths.append(reprocess_estimate(loads[RepairPath.REPROCESS], prices, concurrency))
    return result


def human_seconds(seconds: float) -> str:
    """3.2 s, 4.5 min, 2.1 h, 3.0 d."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"

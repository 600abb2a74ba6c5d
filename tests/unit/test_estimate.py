import pytest

from repage.config import Prices
from repage.domain.estimate import Latencies, PathLoad, estimate, human_seconds, request_dollars
from repage.domain.states import RepairPath

LAT = Latencies(
    milvus_query_s=0.5,
    milvus_write_s=0.5,
    object_head_s=0.01,
    object_list_s=0.05,
    object_copy_s=0.02,
    get_bytes_per_s=10e6,
    pdf_seconds_per_mb=0.2,
    mean_source_bytes=2e6,
    sample_size=10,
)


def test_r2_prices():
    assert request_dollars(1_000_000, 0, Prices()) == 4.5
    assert round(request_dollars(0, 1_000_000, Prices()), 6) == 0.36


def test_keys_path_counts_requests_and_scales_with_concurrency():
    loads = {RepairPath.KEYS: PathLoad(documents=100, chunks=600, images_to_move=600)}
    one = estimate(loads, LAT, Prices(), concurrency=1, batch_size=50)
    eight = estimate(loads, LAT, Prices(), concurrency=8, batch_size=50)
    keys = one.paths[0]
    assert (keys.class_a, keys.class_b) == (600, 1200)  # COPY; GET to hash, GET of the copy
    assert eight.seconds < one.seconds
    assert keys.seed_seconds == (500.0, 3000.0)  # the product's published 5-30 s per document (docs/design.md §8.1)


def test_ledger_round_trips_cost_per_document_whatever_the_concurrency():
    loads = {RepairPath.KEYS: PathLoad(documents=1000, chunks=6000, images_to_move=0)}
    slow = Latencies(**{**LAT.__dict__, "ledger_round_trip_s": 0.001})
    base = estimate(loads, LAT, Prices(), concurrency=8, batch_size=200).seconds
    assert estimate(loads, slow, Prices(), concurrency=8, batch_size=200).seconds - base == pytest.approx(3.0)


def test_object_time_measured_at_the_runs_concurrency_is_not_divided_again():
    loads = {RepairPath.KEYS: PathLoad(documents=100, chunks=600, images_to_move=600)}
    measured = Latencies(**{**LAT.__dict__, "object_request_s": 0.001})
    keys = estimate(loads, measured, Prices(), concurrency=8, batch_size=50).paths[0]
    assert keys.seconds == pytest.approx(2 * (0.5 + 0.5 + 0.5) + 600 * 3 * 0.001)


def test_no_moves_no_object_cost():
    loads = {RepairPath.KEYS: PathLoad(documents=10, chunks=60, images_to_move=0)}
    assert estimate(loads, LAT, Prices(), concurrency=4, batch_size=50).dollars == 0


def test_reprocess_dollars_from_price_table():
    loads = {RepairPath.REPROCESS: PathLoad(documents=10, chunks=50)}
    est = estimate(loads, LAT, Prices(), concurrency=1, batch_size=50)
    assert round(est.dollars, 4) == round(10 * 0.10 + 50 * (0.01 + 0.001), 4)


def test_pdf_path_uses_measured_throughput():
    fast = estimate(
        {RepairPath.PDF: PathLoad(documents=10, chunks=60, source_bytes=20_000_000)},
        LAT,
        Prices(),
        concurrency=1,
        batch_size=50,
    )
    slow_lat = Latencies(**{**LAT.__dict__, "get_bytes_per_s": 1e6})
    slow = estimate(
        {RepairPath.PDF: PathLoad(documents=10, chunks=60, source_bytes=20_000_000)},
        slow_lat,
        Prices(),
        concurrency=1,
        batch_size=50,
    )
    assert slow.seconds > fast.seconds


def test_human_seconds():
    assert human_seconds(5) == "5.0 s"
    assert human_seconds(90) == "1.5 min"
    assert human_seconds(7200) == "2.0 h"


def test_lite_flush_and_row_checksums_are_counted():
    """On Milvus Lite each batch's write is flushed; every affected chunk is checksummed twice
    (planned, read back) on the run's CPU: both add to the time, not to the requests."""
    loads = {RepairPath.KEYS: PathLoad(documents=400, chunks=2400, images_to_move=2400)}
    base = estimate(loads, LAT, Prices(), concurrency=4, batch_size=200).paths[0]
    lite = Latencies(**{**LAT.__dict__, "milvus_flush_s": 0.25, "checksum_s": 0.0001})
    keys = estimate(loads, lite, Prices(), concurrency=4, batch_size=200).paths[0]
    assert keys.seconds - base.seconds == pytest.approx(2 * 0.25 + 2400 * 2 * 0.0001)
    assert (keys.class_a, keys.class_b) == (base.class_a, base.class_b)


def test_where_the_bucket_checks_sha256_a_move_is_two_requests_not_three():
    """docs/design.md §5.2: the planning GET and a checked PUT, no COPY and no GET of the copy."""
    loads = {
        RepairPath.KEYS: PathLoad(documents=100, chunks=600, images_to_move=600),
        RepairPath.PDF: PathLoad(documents=10, chunks=60, images_to_move=20, source_bytes=20_000_000),
    }
    measured = Latencies(**{**LAT.__dict__, "object_request_s": 0.001})
    copied = estimate(loads, measured, Prices(), concurrency=8, batch_size=50)
    checked = estimate(loads, measured, Prices(), concurrency=8, batch_size=50, checked_puts=True)
    (keys_copied, pdf_copied), (keys_checked, pdf_checked) = copied.paths, checked.paths
    assert (keys_copied.class_a, keys_copied.class_b) == (600, 1200)
    assert (keys_checked.class_a, keys_checked.class_b) == (600, 600)
    assert keys_copied.seconds - keys_checked.seconds == pytest.approx(600 * 0.001)
    # pdf: per document a listing and the source's GET; per image chunk a PUT (or COPY), checked by a
    # GET unless the bucket checks it; a GET per bucket image compared by its hash
    assert (pdf_copied.class_a, pdf_copied.class_b) == (70, 10 + 20 + 60)
    assert (pdf_checked.class_a, pdf_checked.class_b) == (70, 10 + 20)
    assert (copied.requests_per_moved_image, checked.requests_per_moved_image) == (3, 2)
    assert checked.as_dict()["requests_per_moved_image"] == 2 and checked.as_dict()["checked_puts"] is True

"""The bench report: ratios between contenders, the target table with its verdicts, the printout.

The targets are docs/performance.md's ("Against the targets"). A row whose figure was not
measured in this invocation (say `--sizes 1000 --no-moto`) is printed as "not measured"; its
verdict in the JSON report is null.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

TARGETS = {
    "floor_ratio_1k": 0.5,
    "floor_verify_ratio_1k": 0.8,
    "naive_ratio_1k": 60.0,
    "floor_ratio_5k": 0.4,
    "moto_floor_ratio": 0.6,
    "latency_floor_ratio": 0.6,
    "latency_minutes": 2.0,
    "latency_ms": 30,
    "after_run_ratio": 1.0,
    "estimate_error": 0.25,
    "scan_seconds_per_100k": 8.0,
    "rss_mb": 300.0,
    "lazy_p99_us": 1000.0,
}
OTHERS = ("naive", "floor", "floor_verify")  # repage's rate is divided by each of these, per store


def latency_bucket(ms: float) -> str:
    """The bucket label of the moto_server row behind `ms` of added latency per request."""
    return f"s3+{ms:g}ms"


def store_name(r: dict) -> str:
    return f"{r['documents']:,} {r['bucket']}"


def ratios(results: list[dict]) -> None:
    """repage / naive, floor and floor_verify in documents per second, per store."""
    by_store: dict[tuple, dict] = {}
    for r in results:
        by_store.setdefault((r["documents"], r["bucket"]), {})[r["contender"]] = r
    for group in by_store.values():
        rep = group.get("repage")
        if not rep or not rep.get("documents_per_s"):
            continue
        for other in OTHERS:
            o = group.get(other)
            if o and o.get("documents_per_s"):
                rep[f"ratio_to_{other}"] = round(rep["documents_per_s"] / o["documents_per_s"], 3)


# ---------------------------------------------------------------- the target table

Measured = tuple[str, bool, object] | None  # (shown value, met, value for the JSON) or not measured


@dataclass(frozen=True)
class Target:
    figure: str
    target: str
    measure: Callable[[list[dict]], Measured]


def repage_rows(results: list[dict]) -> list[dict]:
    return [r for r in results if r["contender"] == "repage" and not r.get("error")]


def repage_row(results: list[dict], documents: int, bucket: str) -> dict | None:
    return next((r for r in repage_rows(results) if (r["documents"], r["bucket"]) == (documents, bucket)), None)


def ratio(documents: int, bucket: str, other: str, minimum: float) -> Callable[[list[dict]], Measured]:
    def measure(results: list[dict]) -> Measured:
        value = (repage_row(results, documents, bucket) or {}).get(f"ratio_to_{other}")
        return None if value is None else (f"{value:.2f}x", value >= minimum, value)

    return measure


def latency_row(results: list[dict]) -> Measured:
    rep = repage_row(results, 1000, latency_bucket(TARGETS["latency_ms"]))
    if not rep or rep.get("ratio_to_floor") is None:
        return None
    value, minutes = rep["ratio_to_floor"], rep["seconds"] / 60
    met = value >= TARGETS["latency_floor_ratio"] and minutes <= TARGETS["latency_minutes"]
    return f"{value:.2f}x, {minutes:.1f} min", met, {"ratio_to_floor": value, "minutes": round(minutes, 2)}


def after_run_row(results: list[dict]) -> Measured:
    shown, values, met = [], {}, True
    for r in repage_rows(results):
        for step, a in (r.get("after_run") or {}).items():
            value = a.get("ratio_to_run")
            met &= value is not None and value >= TARGETS["after_run_ratio"]
            shown.append(f"{step} {store_name(r)} " + ("FAILED" if value is None else f"{value:.2f}x"))
            values[f"{step} {store_name(r)}"] = value
    return ("; ".join(shown), met, values) if shown else None


def estimate_row(results: list[dict]) -> Measured:
    errors = {store_name(r): r["estimate"]["error"] for r in repage_rows(results) if r.get("estimate")}
    if not errors:
        return None
    met = all(e is not None and abs(e) <= TARGETS["estimate_error"] for e in errors.values())
    shown = "; ".join(f"{k} " + ("?" if e is None else f"{e:+.0%}") for k, e in errors.items())
    return shown, met, errors


def scan_row(results: list[dict]) -> Measured:
    per = {store_name(r): r["scan_seconds_per_100k_chunks"] for r in repage_rows(results)}
    per = {k: v for k, v in per.items() if v is not None}
    if not per:
        return None
    shown = "; ".join(f"{k} {v:.1f} s" for k, v in per.items())
    return shown, max(per.values()) <= TARGETS["scan_seconds_per_100k"], per


def rss_row(results: list[dict]) -> Measured:
    rep = repage_row(results, 5000, "local")
    if not rep:
        return None
    by_process = dict(rep.get("peak_rss_mb_by_process") or {})
    by_process.update(
        {step: a["peak_rss_mb"] for step, a in (rep.get("after_run") or {}).items() if "peak_rss_mb" in a}
    )
    if not by_process:
        return None
    worst = max(by_process, key=by_process.get)
    peak = by_process[worst]
    return f"{peak:.0f} MB ({worst})", peak <= TARGETS["rss_mb"], by_process


T = TARGETS
TABLE = (
    Target(
        "1,000 docs, local bucket: repage (scan + run) / floor",
        f">= {T['floor_ratio_1k']}x",
        ratio(1000, "local", "floor", T["floor_ratio_1k"]),
    ),
    Target(
        "1,000 docs, local bucket: repage / floor + verify",
        f">= {T['floor_verify_ratio_1k']}x",
        ratio(1000, "local", "floor_verify", T["floor_verify_ratio_1k"]),
    ),
    Target(
        "1,000 docs: repage / naive", f">= {T['naive_ratio_1k']:g}x", ratio(1000, "local", "naive", T["naive_ratio_1k"])
    ),
    Target(
        "5,000 docs, local bucket: repage / floor",
        f">= {T['floor_ratio_5k']}x",
        ratio(5000, "local", "floor", T["floor_ratio_5k"]),
    ),
    Target(
        "1,000 docs, moto_server: repage / floor",
        f">= {T['moto_floor_ratio']}x",
        ratio(1000, "s3", "floor", T["moto_floor_ratio"]),
    ),
    Target(
        f"1,000 docs, moto_server + {T['latency_ms']} ms a request, defaults: repage / floor, minutes",
        f">= {T['latency_floor_ratio']}x, <= {T['latency_minutes']:g} min",
        latency_row,
    ),
    Target("verify, rollback --all: documents/s against the run's", f">= {T['after_run_ratio']:g}x", after_run_row),
    Target("estimate against the measured run, every row", f"within +-{T['estimate_error']:.0%}", estimate_row),
    Target("scan, seconds per 100k chunks", f"<= {T['scan_seconds_per_100k']:g}", scan_row),
    Target("peak RSS of any repage process at 5,000 docs", f"<= {T['rss_mb']:g} MB", rss_row),
)


def lazy_targets(lazy: dict) -> list[dict]:
    """The lazy-repair overhead (not in the table above, kept beside it)."""
    rows = []
    for case in ("cold", "warm"):
        for clock, figures in (("wall clock", lazy.get(case)), ("CPU time", lazy.get(f"{case}_cpu"))):
            if figures:
                p99 = figures["p99_us"]
                rows.append(
                    {
                        "figure": f"lazy repair p99, {case}, {clock}",
                        "target": "< 1 ms",
                        "measured": f"{p99} µs",
                        "value": p99,
                        "met": p99 < TARGETS["lazy_p99_us"],
                    }
                )
    return rows


def verdicts(results: list[dict], lazy: dict) -> list[dict]:
    """Every row of the target table in its order, then the lazy-repair rows; met is None when not measured."""
    rows = []
    for t in TABLE:
        got = t.measure(results)
        shown, met, value = got if got is not None else ("not measured", None, None)
        rows.append({"figure": t.figure, "target": t.target, "measured": shown, "value": value, "met": met})
    return rows + lazy_targets(lazy)


# ---------------------------------------------------------------- printout


def render(report: dict) -> str:
    lines = [
        "",
        f"repage bench: {report['machine']['cpus']} CPUs, Milvus Lite {report['machine']['milvus_lite']}, "
        f"{report['minutes']} min",
        "",
    ]
    lines += contender_table(report["results"])
    lines.append("")
    for r in report["results"]:
        if r["contender"] == "repage":
            lines += repage_lines(r)
    lines += lazy_lines(report.get("lazy", {}))
    lines += ["", "targets:"] + target_table(report["targets"])
    return "\n".join(lines)


def contender_table(results: list[dict]) -> list[str]:
    head = (
        f"{'store':<16}{'contender':<13}{'docs/s':>9}{'chunks/s':>10}{'seconds':>9}{'class A':>9}"
        f"{'class B':>9}{'RSS MB':>8}{'Lite MB':>9}{'x naive':>9}{'x floor':>9}{'x fl+v':>8}  check"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        store = store_name(r)
        if r.get("error"):
            lines.append(f"{store:<16}{r['contender']:<13}  FAILED: {r['error'][:200]}")
            continue
        req = r.get("requests", {})
        note = "" if r.get("complete") else f" (sample: {r.get('documents_done')} docs)"
        check = r.get("check")
        check_s = ("ok " + check["digest"]) if check and check["correct"] else (f"WRONG {check}" if check else "-")
        lines.append(
            f"{store:<16}{r['contender']:<13}{r['documents_per_s']:>9.1f}{r['chunks_per_s']:>10.0f}"
            f"{r['seconds']:>9.1f}{req.get('class_a', 0):>9}{req.get('class_b', 0):>9}"
            f"{r['peak_rss_mb']:>8.0f}{r['lite_peak_rss_mb']:>9.0f}"
            f"{_ratio(r, 'naive'):>9}{_ratio(r, 'floor'):>9}{_ratio(r, 'floor_verify'):>8}  {check_s}{note}"
        )
    return lines


def _ratio(r: dict, other: str) -> str:
    value = r.get(f"ratio_to_{other}")
    return "" if value is None else f"{value:.2f}"


def repage_lines(r: dict) -> list[str]:
    """The estimate against the run, the scan, and verify/rollback, for one repage row."""
    store = store_name(r)
    if r.get("error") or not r.get("estimate"):
        return [f"estimate {store}: not measured (repage did not finish)"]
    e = r["estimate"]
    error = "?" if e["error"] is None else f"{e['error']:+.0%}"
    per_100k = r.get("scan_seconds_per_100k_chunks")
    lines = [
        f"estimate {store}: predicted {e['predicted_seconds']:.1f} s, measured run {e['measured_run_seconds']:.1f} s "
        f"({error}); scan + run {r['seconds']:.1f} s = {r['seconds'] / 60:.2f} min",
        f"  scan {r['scan_seconds']:.1f} s = {per_100k if per_100k is not None else '?'} s per 100k chunks; "
        f"RSS scan/estimate/run {r['peak_rss_mb_by_process']}"
        + (f"; requests through the proxy {r['proxy_requests']:,}" if r.get("proxy_requests") is not None else ""),
    ]
    for step, a in (r.get("after_run") or {}).items():
        if "error" in a:
            lines.append(f"  {step} {store}: FAILED: {a['error'][:200]}")
            continue
        lines.append(
            f"  {step} {store}: {a['documents']} documents in {a['seconds']:.1f} s = "
            f"{a['documents_per_s']:.1f} documents/s, {a['ratio_to_run']}x the run's; RSS {a['peak_rss_mb']:.0f} MB"
        )
    return lines


def lazy_lines(lazy: dict) -> list[str]:
    if "cold" not in lazy:
        return []
    lines = [
        f"lazy repair, 200-chunk response: warm p50 {lazy['warm']['p50_us']} µs, p99 {lazy['warm']['p99_us']} µs;"
        f" cold p50 {lazy['cold']['p50_us']} µs, p99 {lazy['cold']['p99_us']} µs (wall clock)"
    ]
    if "cold_cpu" in lazy:
        lines.append(
            f"  CPU time: warm p50 {lazy['warm_cpu']['p50_us']} µs, p99 {lazy['warm_cpu']['p99_us']} µs;"
            f" cold p50 {lazy['cold_cpu']['p50_us']} µs, p99 {lazy['cold_cpu']['p99_us']} µs;"
            f" load average {lazy['load_average'][0]:.1f}"
        )
    return lines


def target_table(rows: list[dict]) -> list[str]:
    width = max(len(r["figure"]) for r in rows)
    lines = [f"  {'figure':<{width}}  {'target':<20}  {'verdict':<12}  measured"]
    for r in rows:
        verdict = "not measured" if r["met"] is None else ("met" if r["met"] else "MISSED")
        measured = "" if r["met"] is None else r["measured"]
        lines.append(f"  {r['figure']:<{width}}  {r['target']:<20}  {verdict:<12}  {measured}".rstrip())
    return lines

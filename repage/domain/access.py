"""Usage-based priority, the pure part: decayed access counts, their ordering key, and
the parsing of access logs (CSV or JSONL). No I/O here; `repage/access_io.py` reads
files and writes the ledger.

Decay: a hit of weight w at time t is worth w * 2^-((now - t) / H) at `now`, H the
half-life (`access_half_life_hours`). A document keeps one pair (score, at): the decayed
sum of its hits as of `at`. Adding a hit never needs the hits before it, and the result
does not depend on the order hits arrive in (a log imported after newer live reads
decays the older hits to `at` and adds them).

Ordering key: rank = log2(score) + at / H. Since decayed(now) = 2^(rank - now / H),
ordering by rank orders by the decayed count at every moment, and "at least N accesses
now" is rank >= log2(N) + now / H: one indexed comparison in the ledger, no exp() in
SQL (SQLite has none). A rank is written under the half-life of its time; changing the
half-life re-ranks a document at its next hit.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from repage.errors import ConfigError

HOUR = 3600.0
MAX_EXPONENT = 1000.0  # 2**1000 is finite; anything further out is a clock error, not data
TIMESTAMP_FIELDS = ("timestamp", "at", "time", "accessed_at", "created_at")
WEIGHT_FIELDS = ("count", "weight")
FUTURE_SLACK_S = 86_400.0  # clocks disagree; a day ahead is still a plausible log line
_EPOCH = re.compile(r"[0-9]+(\.[0-9]+)?")
_MAX_ID = 512


class AccessImportError(ConfigError):
    """A row of an access log cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Decayed:
    """A decayed count: `score` accesses as of `at` (epoch seconds)."""

    score: float
    at: float

    def value(self, now: float, half_life_s: float) -> float:
        """The count at `now` (a moment before `at` gives the undecayed-back value)."""
        factor: float = 2.0 ** min(-(now - self.at) / half_life_s, MAX_EXPONENT)
        return self.score * factor

    def add(self, weight: float, at: float, half_life_s: float) -> Decayed:
        """This count plus a hit of `weight` at `at`, kept as of the later of the two times."""
        if at >= self.at:
            return Decayed(self.score * 2.0 ** (-(at - self.at) / half_life_s) + weight, at)
        return Decayed(self.score + weight * 2.0 ** (-(self.at - at) / half_life_s), self.at)

    def merge(self, other: Decayed, half_life_s: float) -> Decayed:
        return self.add(other.score, other.at, half_life_s)

    def rank(self, half_life_s: float) -> float:
        """The time-invariant ordering key log2(score) + at/H (see the module docstring)."""
        if self.score <= 0:
            return -math.inf
        return math.log2(self.score) + self.at / half_life_s


def rank_threshold(min_accesses: float, now: float, half_life_s: float) -> float:
    """The smallest rank whose decayed count at `now` is at least `min_accesses`."""
    if not min_accesses > 0:
        raise ValueError(f"min_accesses must be positive, not {min_accesses!r}")
    return math.log2(min_accesses) + now / half_life_s


def half_life_seconds(hours: float) -> float:
    if not hours > 0:
        raise ValueError(f"access half-life must be positive, not {hours!r} hours")
    return hours * HOUR


# --------------------------------------------------------------------------- access logs


@dataclass(frozen=True)
class AccessRow:
    """One hit of an access log: a document, or a whole dataset (each of its documents)."""

    line: int
    at: float
    weight: float = 1.0
    document_id: str | None = None
    dataset_id: str | None = None


def parse_timestamp(text: object) -> float:
    """Epoch seconds (or milliseconds) or ISO 8601; a time without offset is UTC."""
    if isinstance(text, bool):
        raise ValueError(f"timestamp {text!r} is not a time")
    if isinstance(text, (int, float)):
        value = float(text)
    elif isinstance(text, str) and _EPOCH.fullmatch(text.strip()):
        value = float(text.strip())
    elif isinstance(text, str) and text.strip():
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"timestamp {text[:40]!r} is neither epoch seconds nor ISO 8601") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    else:
        raise ValueError(f"timestamp {str(text)[:40]!r} is neither epoch seconds nor ISO 8601")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"timestamp {text!r} is not a time")
    return value / 1000.0 if value > 1e11 else value  # 1e11 s is year 5138: those are milliseconds


def _first(record: dict[str, Any], names: Iterable[str]) -> object:
    for name in names:
        value = record.get(name)
        if value not in (None, ""):
            return value
    return None


def _identifier(value: object, name: str) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a string, not {type(value).__name__}")
    text = str(value).strip()
    if not text or len(text) > _MAX_ID or any(ord(ch) < 32 for ch in text):
        raise ValueError(f"{name} {text[:40]!r} is empty, longer than {_MAX_ID} or has control characters")
    return text


def _weight(value: object) -> float:
    if value in (None, ""):
        return 1.0
    try:
        weight = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"count {value!r} is not a number") from None
    if isinstance(value, bool) or not (weight > 0 and math.isfinite(weight)):
        raise ValueError(f"count {value!r} must be a positive number")
    return weight


def row_from_record(record: dict[str, Any], line: int, now: float | None = None) -> AccessRow:
    """One parsed log record -> AccessRow; ValueError says what is wrong with it."""
    document_id = _identifier(record.get("document_id"), "document_id")
    dataset_id = _identifier(record.get("dataset_id"), "dataset_id")
    if document_id is None and dataset_id is None:
        raise ValueError("needs a document_id or a dataset_id")
    stamp = _first(record, TIMESTAMP_FIELDS)
    if stamp is None:
        raise ValueError(f"needs a timestamp (one of {', '.join(TIMESTAMP_FIELDS)})")
    at = parse_timestamp(stamp)
    if now is not None and at > now + FUTURE_SLACK_S:
        raise ValueError(f"timestamp {stamp!r} is more than a day in the future")
    return AccessRow(line, at, _weight(_first(record, WEIGHT_FIELDS)), document_id, dataset_id)


def parse_access_log(lines: Iterable[str], fmt: str, source: str, *, now: float | None = None) -> Iterator[AccessRow]:
    """Rows of a CSV (with a header) or JSONL access log. The first bad row raises
    AccessImportError naming `source:line`: an import is all or nothing."""
    if fmt == "csv":
        yield from _parse_csv(lines, source, now)
    elif fmt == "jsonl":
        yield from _parse_jsonl(lines, source, now)
    else:
        raise AccessImportError(f"{source}: unknown format {fmt!r}: use csv or jsonl")


def _parse_csv(lines: Iterable[str], source: str, now: float | None) -> Iterator[AccessRow]:
    reader = csv.DictReader(lines)
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise AccessImportError(f"{source}:1: unreadable CSV header ({exc})") from None
    if not {"document_id", "dataset_id"} & set(header):
        raise AccessImportError(
            f"{source}:1: CSV header needs a document_id or dataset_id column, found {', '.join(header) or 'nothing'}"
        )
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise AccessImportError(f"{source}:{reader.line_num}: unreadable CSV ({exc})") from None
        if None in record:  # DictReader puts surplus cells under the key None
            raise AccessImportError(f"{source}:{reader.line_num}: more cells than header columns")
        try:
            yield row_from_record(record, reader.line_num, now)
        except ValueError as exc:
            raise AccessImportError(f"{source}:{reader.line_num}: {exc}") from None


def _parse_jsonl(lines: Iterable[str], source: str, now: float | None) -> Iterator[AccessRow]:
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AccessImportError(f"{source}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise AccessImportError(f"{source}:{number}: expected a JSON object, got {type(record).__name__}")
        try:
            yield row_from_record(record, number, now)
        except ValueError as exc:
            raise AccessImportError(f"{source}:{number}: {exc}") from None


def format_of(name: str, fmt: str | None = None) -> str:
    """csv or jsonl, from --format or the file name."""
    if fmt:
        return fmt.lower()
    lowered = name.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise AccessImportError(f"{name}: cannot tell the format from the name: pass --format csv or jsonl")


@dataclass
class Aggregate:
    """Hits of one log, decayed and summed per document and per dataset."""

    documents: dict[str, Decayed]
    datasets: dict[str, Decayed]
    dataset_of: dict[str, str]  # document -> dataset, where the log names both
    rows: int = 0


def aggregate(rows: Iterable[AccessRow], half_life_s: float) -> Aggregate:
    """Fold rows into one Decayed per document and per dataset (memory: distinct ids)."""
    out = Aggregate({}, {}, {})
    for row in rows:
        out.rows += 1
        if row.document_id is not None:
            target, key = out.documents, row.document_id
            if row.dataset_id is not None:
                out.dataset_of[row.document_id] = row.dataset_id
        else:
            assert row.dataset_id is not None  # row_from_record: a document_id or a dataset_id
            target, key = out.datasets, row.dataset_id
        known = target.get(key)
        target[key] = Decayed(row.weight, row.at) if known is None else known.add(row.weight, row.at, half_life_s)
    return out


def spread_datasets(agg: Aggregate, members: dict[str, list[str]], half_life_s: float) -> dict[str, Decayed]:
    """Per-document counts: each dataset hit counts for every document of the dataset."""
    documents = dict(agg.documents)
    for dataset, hits in agg.datasets.items():
        for document in members.get(dataset, ()):
            known = documents.get(document)
            documents[document] = hits if known is None else known.merge(hits, half_life_s)
    return documents

"""Lazy repair on the read path (docs/design.md §10.2).

`LazyRepair.repair(rows)` takes the chunk rows a request is about to return and:
1. corrects `page` in those rows where the chunk is affected (page 0 and image/OCR,
   docs/design.md §1.3) and its own image key already tells the page (read-repair: the response
   is right before the migration has written anything);
2. notes one access per document and, for documents with affected chunks, an enqueue
   request, in an in-memory buffer: deduplicated per document between flushes and
   bounded (when full, the oldest document is dropped and counted).
A background thread flushes the buffer to the ledger every `flush_seconds`. The request
path does no ledger, Milvus or bucket I/O and never fails because the ledger is down:
a failed flush puts its entries back into the (bounded) buffer and is retried.

Pure of vendor SDKs: the ledger is reached through the small `AccessSink` protocol.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Protocol

from repage.domain.access import Decayed, half_life_seconds
from repage.domain.keys import MAX_INT, MAX_KEY_CHARS, parse_image_key

log = logging.getLogger("repage.migration.lazy")

AFFECTED_TYPES = frozenset({"ocr", "image"})
PARSE_CACHE = 65_536  # distinct image keys remembered: a hot document is parsed once

# The two page-bearing built-in formats of keys.py (canonical, legacy), on the whole key in
# one precompiled match: the hot path's parser. The same regexes as keys.py on the same
# split (the name after the last '/images/', no '/' in it); a test checks it gives the same
# page as parse_image_key on generated keys. Anything else (user patterns, %-encoded keys,
# out-of-range numbers) goes to parse_image_key itself.
_NUM = r"(?:0|[1-9][0-9]*)"
_EXT = r"\.(?i:png|jpe?g|gif|bmp|webp)"
_FAST_KEY = re.compile(
    rf".+/[^/]+/images/(?:(?P<cp>{_NUM})_(?P<ci>{_NUM}){_EXT}"
    rf"|(?P<li>{_NUM})_[^/]+-(?P<lp>{_NUM})-(?:full|(?P<ls>{_NUM})){_EXT})",
    re.DOTALL,
)


def _small(number: str | None) -> bool:
    """keys.py's range check (0..MAX_INT, at most 7 digits) on a matched digit string."""
    return number is None or len(number) < 7 or (len(number) == 7 and int(number) <= MAX_INT)


def page_from_key(key: str, patterns: Sequence = ()) -> int | None:
    """The 0-based page an image key tells, or None: parse_image_key's answer, faster."""
    if not patterns and len(key) <= MAX_KEY_CHARS and (m := _FAST_KEY.fullmatch(key)):
        canonical_page, canonical_index, legacy_index, legacy_page, legacy_sub = m.groups()
        if canonical_page is not None:
            if _small(canonical_page) and _small(canonical_index):
                return int(canonical_page)
        elif _small(legacy_page) and _small(legacy_index) and _small(legacy_sub):
            return int(legacy_page)
    return parse_image_key(key, patterns=patterns).page


class AccessSink(Protocol):
    """Where flushed accesses and enqueue requests go (the ledger, via LedgerSink)."""

    def record(self, accesses: Mapping[str, tuple[str | None, Decayed]], enqueue: Sequence[str]) -> None: ...


class LedgerSink:
    """Writes a flush to the ledger: enqueue requests first (they matter more), then accesses."""

    def __init__(self, ledger: Any, half_life_hours: float):
        self.ledger = ledger
        self.half_life_s = half_life_seconds(half_life_hours)

    def record(self, accesses: Mapping[str, tuple[str | None, Decayed]], enqueue: Sequence[str]) -> None:
        if enqueue:
            self.ledger.enqueue(list(enqueue))
        if accesses:
            self.ledger.record_accesses(accesses, self.half_life_s)


@dataclass
class LazyStats:
    """Counters since start; the service exports them as Prometheus counters."""

    reads: int = 0  # repair() calls
    chunks_seen: int = 0
    affected_chunks: int = 0
    corrected_chunks: int = 0  # pages corrected in responses
    enqueue_requests: int = 0  # documents newly marked for enqueue in the buffer
    dropped: int = 0  # buffered documents dropped because the buffer was full
    flushes: int = 0
    flush_errors: int = 0
    flushed_documents: int = 0
    flushed_enqueues: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Pending:
    dataset_id: str | None
    hits: int
    at: float
    enqueue: bool


class LazyRepair:
    """Read-repair plus buffered access/enqueue notes. Thread-safe; one per process."""

    def __init__(
        self,
        sink: AccessSink | None = None,
        *,
        patterns: Sequence = (),
        flush_seconds: float = 1.0,
        max_buffered: int = 10_000,
        now: Callable[[], float] = time.time,
        periodic: Iterable[Callable[[], None]] = (),
    ):
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be at least 1, not {max_buffered}")
        self.sink = sink
        self.flush_seconds = flush_seconds
        self.max_buffered = max_buffered
        self.stats = LazyStats()
        self._now = now
        self._periodic = list(periodic)
        self._lock = threading.Lock()
        self._buffer: OrderedDict[str, _Pending] = OrderedDict()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error_log = 0.0
        patterns = tuple(patterns)
        # Cached per instance (the patterns are): a key is parsed once, then a dict lookup.
        self._page_of = lru_cache(maxsize=PARSE_CACHE)(lambda key: page_from_key(key, patterns))

    # ---- the request path: no I/O, one lock acquisition per call

    def repair(self, rows: Sequence[MutableMapping[str, Any]], *, document_id: str | None = None) -> int:
        """Correct pages in `rows` (in place) and note the access; returns chunks corrected.

        Rows may come from several documents (a search result); each is noted once.
        `document_id` names the document when rows lack that field.
        """
        corrected = affected = 0
        docs: dict[str, list] = {}  # document -> [dataset_id, needs migration]
        for row in rows:
            doc = row.get("document_id") or document_id
            note = docs.get(doc) if doc is not None else None
            if note is None and doc is not None:
                note = docs[doc] = [row.get("dataset_id"), False]
            if row.get("page") != 0 or not _affected_kind(row):
                continue
            affected += 1
            if note is not None:
                note[1] = True
            key = row.get("image_r2_key")
            page = self._page_of(key) if key and isinstance(key, str) else None
            if page:  # None: the key does not tell; 0: already right
                row["page"] = page
                corrected += 1
        self._note(docs, len(rows), affected, corrected)
        return corrected

    def _note(self, docs: Mapping[str, list], seen: int, affected: int, corrected: int) -> None:
        now = self._now()
        with self._lock:
            s = self.stats
            s.reads += 1
            s.chunks_seen += seen
            s.affected_chunks += affected
            s.corrected_chunks += corrected
            for doc, (dataset_id, needs) in docs.items():
                entry = self._buffer.get(doc)
                if entry is None:
                    self._make_room()
                    self._buffer[doc] = _Pending(dataset_id, 1, now, needs)
                    s.enqueue_requests += needs
                    continue
                entry.hits += 1
                entry.at = now
                if needs and not entry.enqueue:
                    entry.enqueue = True
                    s.enqueue_requests += 1

    def _make_room(self) -> None:
        while len(self._buffer) >= self.max_buffered:  # caller holds the lock
            self._buffer.popitem(last=False)
            self.stats.dropped += 1

    def add_periodic(self, task: Callable[[], None]) -> None:
        """Run `task` in the flusher thread after every flush (e.g. publishing latency)."""
        self._periodic.append(task)

    def buffered(self) -> int:
        with self._lock:
            return len(self._buffer)

    # ---- the background side

    def flush(self) -> bool:
        """Write the buffer to the sink; on failure keep it for the next flush. True if written."""
        with self._lock:
            batch, self._buffer = self._buffer, OrderedDict()
        ok = True
        if batch and self.sink is not None:
            ok = self._write(batch)
        for task in self._periodic:  # e.g. publishing read latency: same thread, same cadence
            try:
                task()
            except Exception:  # noqa: BLE001 - a background task must not kill the flusher
                log.warning("repage lazy: periodic task failed", exc_info=True)
        return ok

    def _write(self, batch: OrderedDict[str, _Pending]) -> bool:
        accesses = {doc: (p.dataset_id, Decayed(float(p.hits), p.at)) for doc, p in batch.items()}
        enqueue = [doc for doc, p in batch.items() if p.enqueue]
        assert self.sink is not None  # flush() writes only when there is a sink
        try:
            self.sink.record(accesses, enqueue)
        except Exception as exc:  # noqa: BLE001 - the ledger may be down: keep the notes, never raise
            self._put_back(batch)
            self._log_failure(exc)
            return False
        with self._lock:
            self.stats.flushes += 1
            self.stats.flushed_documents += len(accesses)
            self.stats.flushed_enqueues += len(enqueue)
        return True

    def _put_back(self, batch: OrderedDict[str, _Pending]) -> None:
        """Merge a failed batch under newer notes, oldest first, within the bound."""
        with self._lock:
            self.stats.flush_errors += 1
            newer, self._buffer = self._buffer, OrderedDict()
            old: _Pending | None
            for doc, old in batch.items():
                self._make_room()
                self._buffer[doc] = old
            for doc, new in newer.items():
                old = self._buffer.pop(doc, None)
                if old is not None:
                    new = _Pending(
                        new.dataset_id or old.dataset_id, old.hits + new.hits, new.at, old.enqueue or new.enqueue
                    )
                self._make_room()
                self._buffer[doc] = new

    def _log_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 60.0:  # one line a minute while the ledger is down
            self._last_error_log = now
            log.warning(
                "repage lazy: flush to the ledger failed, keeping %d documents buffered: %s",
                self.buffered(),
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )

    def start(self) -> LazyRepair:
        """Start the background flusher (idempotent)."""
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="repage-lazy-flush", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stopping.wait(self.flush_seconds):
            self.flush()

    def close(self) -> None:
        """Stop the flusher and flush what is left (best effort)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()

    def __enter__(self) -> LazyRepair:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _affected_kind(row: Mapping[str, Any]) -> bool:
    """The chunk-type half of the predicate of docs/design.md §1.3 (page == 0 is checked by the caller)."""
    if row.get("chunk_type") in AFFECTED_TYPES:
        return True
    confidence = row.get("ocr_confidence")
    return confidence is not None and confidence > 0.0

"""`repage scan`: find affected documents, classify each into a path, record it in the ledger.

Object-store calls are only made for documents that need them: none when every
affected chunk carries a page-bearing key; one listing of the document's image
prefix (one request per 1,000 keys) when some do not; HEADs of the source key
forms only when the keys still leave chunks without a page.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from repage.domain.identity import ChunkIdentity
from repage.domain.keys import compile_patterns, image_prefix, source_key_candidates
from repage.domain.plan import DocumentPlan, classify, is_affected, needs_listing
from repage.domain.records import ScanRecord
from repage.domain.states import DONE, RepairPath, State
from repage.errors import ObjectNotFound
from repage.migration.status import SCAN_COMPLETE
from repage.stores.milvus import LIGHT_FIELDS
from repage.stores.throttle import AdaptiveLimiter, call_with_backoff

T = TypeVar("T")

# Light fields the scan needs per affected chunk (those the collection has): the adapter's, and the identity.
SCAN_FIELDS = (*LIGHT_FIELDS, "chunk_id")
FLUSH_EVERY = 500  # ledger rows per upsert


@dataclass
class DocumentSummary:
    dataset_id: str
    filename: str
    affected: list[dict] = field(default_factory=list)
    total: int = 0  # chunks counted by the census (0: not counted)


@dataclass
class ScanReport:
    by_path: Counter = field(default_factory=Counter)  # "keys" / "pdf" / ... / "skipped" / "unrecoverable" / "done"
    by_dataset: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    affected_chunks: int = 0
    documents: list[dict] = field(default_factory=list)
    object_requests: int = 0

    def add(self, plan: DocumentPlan) -> None:
        label = plan.path.value if plan.state == State.PENDING else plan.state.value
        self.by_path[label] += 1
        self.by_dataset[plan.dataset_id][label] += 1
        self.affected_chunks += plan.affected
        self.documents.append(
            {
                "document_id": plan.document_id,
                "dataset_id": plan.dataset_id,
                "path": plan.path.value,
                "state": plan.state.value,
                "affected_chunks": plan.affected,
                "reason": plan.reason,
            }
        )

    def add_done(self, document_id: str, dataset_id: str, state: str) -> None:
        self.by_path["done"] += 1
        self.by_dataset[dataset_id]["done"] += 1
        self.documents.append(
            {
                "document_id": document_id,
                "dataset_id": dataset_id,
                "path": None,
                "state": state,
                "affected_chunks": 0,
                "reason": "already done in the ledger",
            }
        )

    def as_dict(self) -> dict:
        return {
            "totals": dict(self.by_path),
            "affected_chunks": self.affected_chunks,
            "datasets": {k: dict(v) for k, v in sorted(self.by_dataset.items())},
            "object_requests": self.object_requests,
            "documents": self.documents,
        }


def collect_documents(vectors, dataset_id: str | None) -> dict[str, DocumentSummary]:
    """Every document of the collection (or dataset) with its affected chunks.

    Two streams with bounded pages: the affected chunks (server-side filter), then
    a light pass over document ids so text-only documents are recorded as skipped.
    """
    documents: dict[str, DocumentSummary] = {}
    for page in vectors.iter_affected(dataset_id):
        for row in page:
            summary = _summary(documents, row)
            summary.affected.append(row)
    for page in vectors.iter_documents(dataset_id):
        for row in page:
            _summary(documents, row).total += 1
    return documents


def _summary(documents: dict[str, DocumentSummary], row: Mapping) -> DocumentSummary:
    doc = row["document_id"]
    summary = documents.get(doc)
    if summary is None:
        summary = documents[doc] = DocumentSummary(str(row.get("dataset_id") or ""), str(row.get("filename") or ""))
    return summary


class Classifier:
    """Classifies one document, calling the bucket only when the keys leave pages open."""

    def __init__(self, objects, identity: ChunkIdentity, source_template: str, patterns: Sequence[re.Pattern]):
        self.objects = objects
        self.identity = identity
        self.source_template = source_template
        self.patterns = patterns
        self.requests = 0
        # A throttle or a transient error (a 500, a reset) is retried with backoff, as in a run:
        # one flaky request among a big store's thousands must not abort the whole scan.
        self.limiter = AdaptiveLimiter(None)

    def _call(self, fn: Callable[[], T]) -> T:
        return call_with_backoff(fn, self.limiter)

    def __call__(self, document_id: str, summary: DocumentSummary) -> DocumentPlan:
        try:
            return self._classify(document_id, summary)
        except ValueError as exc:  # the document's own data (an empty dataset_id, an id or key no store takes)
            # recorded, never fatal to the scan: pending, so the run records the error on the document
            return DocumentPlan(
                document_id,
                summary.dataset_id,
                summary.filename,
                RepairPath.KEYS,
                State.PENDING,
                f"cannot classify: {exc}",
                (),
            )

    def _classify(self, document_id: str, summary: DocumentSummary) -> DocumentPlan:
        rows = summary.affected
        identities = [self.identity.key(r) for r in rows]
        args: dict[str, Any] = dict(dataset_id=summary.dataset_id, filename=summary.filename, patterns=self.patterns)
        listed = None
        if rows and needs_listing(rows, self.patterns):
            listed = self.list_images(summary.dataset_id, document_id)
        plan = classify(document_id, rows, identities, listed_keys=listed, **args)
        if plan.resolved < plan.affected:
            exists = self.source_exists(rows[0], summary)
            plan = classify(document_id, rows, identities, listed_keys=listed, source_exists=exists, **args)
        return plan

    def list_images(self, dataset_id: str, document_id: str) -> list[str]:
        prefix = image_prefix(dataset_id, document_id)
        pages = self._call(lambda: list(self.objects.list(prefix)))  # a retry lists from the start
        self.requests += max(len(pages), 1)  # an empty listing is still one (billed) request
        return [info.key for page in pages for info in page]

    def source_exists(self, row: Mapping, summary: DocumentSummary) -> bool:
        fields = {k: str(v) for k, v in row.items() if v is not None}
        fields.update(dataset_id=summary.dataset_id, filename=summary.filename)
        for key in source_key_candidates(self.source_template, fields):
            self.requests += 1
            try:
                self._call(lambda: self.objects.head(key))  # noqa: B023 (called at once)
                return True
            except ObjectNotFound:
                continue
        return False


def scan_store(
    stores, *, dataset_id: str | None = None, progress: Callable[[int, int], None] | None = None
) -> ScanReport:
    """Scan the collection, record every document in the ledger, return the report."""
    settings, ledger = stores.settings, stores.ledger
    info = stores.vectors.info()
    classifier = Classifier(
        stores.objects, info.identity, settings.source_key_template, compile_patterns(settings.key_patterns)
    )
    documents = collect_documents(stores.vectors, dataset_id)
    # Done (and running) documents are never re-counted as affected, even when a true page is 0.
    settled = {r.document_id: r.state for r in ledger.documents(states=DONE | {State.RUNNING}, dataset_id=dataset_id)}
    report, pending = ScanReport(), []
    for done, (document_id, summary) in enumerate(sorted(documents.items()), start=1):
        if document_id in settled:
            report.add_done(document_id, summary.dataset_id, str(settled[document_id]))
        else:
            plan = classifier(document_id, summary)
            report.add(plan)
            pending.append(_scan_record(plan, summary, info))
        if len(pending) >= FLUSH_EVERY:
            ledger.upsert_scan(pending)
            pending.clear()
        if progress:
            progress(done, len(documents))
    ledger.upsert_scan(pending)
    # Last: a scan killed between two flushes leaves a partial ledger that must not pass for a
    # scan. Once only: a rescan of an unchanged store changes nothing in the ledger.
    if not scan_completed(ledger):
        ledger.add_event(SCAN_COMPLETE, count=len(documents), detail=dataset_id)
    report.object_requests = classifier.requests
    return report


def scan_documents(stores, document_ids) -> list[str]:
    """Scan just these documents (enqueued before any scan saw them); the ones found in Milvus."""
    settings, info = stores.settings, stores.vectors.info()
    fields = [f for f in dict.fromkeys((*info.identity_fields, *SCAN_FIELDS)) if f in info.fields]
    rows = stores.vectors.fetch_documents(list(document_ids), fields=fields, with_vectors=False)
    documents: dict[str, DocumentSummary] = {}
    for row in rows:
        summary = documents.setdefault(
            row["document_id"], DocumentSummary(str(row.get("dataset_id") or ""), str(row.get("filename") or ""))
        )
        summary.total += 1
        if is_affected(row):
            summary.affected.append(row)
    classify = Classifier(
        stores.objects, info.identity, settings.source_key_template, compile_patterns(settings.key_patterns)
    )
    stores.ledger.upsert_scan([_scan_record(classify(doc, s), s, info) for doc, s in sorted(documents.items())])
    return list(documents)


def scan_completed(ledger) -> bool:
    """Whether a scan ever finished on this ledger (documents alone may be a killed scan's part)."""
    return bool(ledger.events(kinds=[SCAN_COMPLETE], limit=1))


def _scan_record(plan: DocumentPlan, summary: DocumentSummary, info) -> ScanRecord:
    moves = {c.found_key for c in plan.chunks if c.found_key and c.fmt not in ("canonical", "unknown")}
    pk = info.pk_field
    keys = tuple((str(r[pk]), info.identity.text(r)) for r in summary.affected if r.get(pk) is not None)
    return ScanRecord(
        document_id=plan.document_id,
        dataset_id=plan.dataset_id,
        filename=plan.filename,
        path=plan.path,
        state=plan.state,
        reason=plan.reason,
        affected_chunks=plan.affected,
        total_chunks=summary.total or None,
        images_to_move=len(moves),
        chunk_keys=keys if len(keys) == len(summary.affected) else (),
    )

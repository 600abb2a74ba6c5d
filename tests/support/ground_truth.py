"""The one comparison of a store with its ground truth, used by every reliability trial to
count what was lost.

A `Truth` says, for every chunk (by its stable identity, document id and chunk index), the
row(s) it may be: all its fields, the vector included, so a page, an image key or anything
else that is wrong shows. And for the bucket: the objects that must be there with their
bytes (sha256), and the ones that may be there (a copy made before a run stopped), checked
for content when they are. Every object belongs to a document.

`compare_store` reads the stores directly (pymilvus and the bucket, through
tests/support/snapshot.py, never repage's adapters, so a bug there cannot hide itself) and
returns a `Comparison`: the documents and the chunks that differ from the truth. A document
is lost when any of its chunks is missing, doubled or different, when an object one of its
chunks points at is missing or holds other bytes, or when one of its required objects is.
`lost` is the number of such documents, not the length of a problem list.

REPAGE_TEST_INJECT_LOSS=1 (read here, never by the repage package) corrupts one chunk's page
in Milvus right before each final comparison, so the suite can prove that a loss is counted,
recorded and fails `make reliability`.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

Ident = tuple[str, int]  # (document_id, chunk_index)
INJECT_ENV = "REPAGE_TEST_INJECT_LOSS"
T = TypeVar("T")


def normal(value: Any) -> Any:
    """One comparable form for a field read back from Milvus: plain Python, vectors as the hex of
    their float32 bytes, NaN as a word (NaN != NaN would make every row with one differ)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, np.ndarray):
        return normal(value.tolist())
    if isinstance(value, np.generic):
        return normal(value.item())
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, Mapping):
        return {k: normal(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [normal(v) for v in value]
    return value


VECTOR_FIELD = "vector"  # the FLTR schema's one vector field (DESIGN §1)


def normal_row(row: Mapping[str, Any]) -> dict:
    """`normal` on every field; the vector as float32 bytes whatever form it was read in
    (tests/support/snapshot.milvus_rows hands it over as bytes or as a list of floats)."""
    out = {k: normal(v) for k, v in sorted(row.items()) if k != VECTOR_FIELD}
    if VECTOR_FIELD in row:
        vector = row[VECTOR_FIELD]
        out[VECTOR_FIELD] = (
            vector
            if isinstance(vector, str)
            else normal(vector if isinstance(vector, bytes) else np.asarray(vector, dtype=np.float32).tobytes())
        )
    return out


@dataclass
class Truth:
    """What the store must hold. `rows`: every chunk and the rows it may be (one for a final
    state; untouched or migrated for a run that stopped part-way)."""

    rows: dict[Ident, list[dict]]
    objects: dict[str, str]  # key -> sha256: must be in the bucket with these bytes
    owners: dict[str, str]  # object key -> its document
    optional: dict[str, str] = field(default_factory=dict)  # key -> sha256: may be there; if so, these bytes
    documents: set[str] = field(default_factory=set)  # also documents whose chunks are all gone

    def __post_init__(self) -> None:
        self.rows = {ident: [normal_row(r) for r in rows] for ident, rows in self.rows.items()}
        self.documents = set(self.documents) | {d for d, _ in self.rows} | set(self.owners.values())

    def known(self, key: str) -> str | None:
        """The sha256 the object at `key` must have, when the truth knows it."""
        return self.objects.get(key) or self.optional.get(key)


@dataclass
class StoreContent:
    rows: dict[Ident, list[dict]]  # every row of the collection, by identity
    objects: dict[str, str]  # every object of the bucket: key -> sha256


@dataclass
class Comparison:
    documents: int  # documents compared
    chunks: int  # chunks compared
    lost_documents: dict[str, list[str]]  # document -> what differs
    lost_chunks: set[Ident]
    other: list[str] = field(default_factory=list)  # differences that lose nothing (orphan objects, ledger)

    @property
    def lost(self) -> int:
        return len(self.lost_documents)

    @property
    def ok(self) -> bool:
        return not self.lost_documents and not self.other

    def add(self, problems: Iterable[str]) -> Comparison:
        self.other += list(problems)
        return self

    def report(self, limit: int = 25) -> str:
        lines = [f"lost = {self.lost} of {self.documents} documents, {len(self.lost_chunks)} of {self.chunks} chunks"]
        details = [f"{doc!r}: {what}" for doc, whats in sorted(self.lost_documents.items()) for what in whats]
        details += self.other
        lines += details[:limit] + ([f"... {len(details) - limit} more"] if len(details) > limit else [])
        return "\n".join(lines)


def _differs(got: dict, want: dict) -> str:
    fields = sorted(k for k in got.keys() | want.keys() if got.get(k, "<absent>") != want.get(k, "<absent>"))
    shown = {k: (got.get(k), want.get(k)) for k in fields if k != "vector"}
    return f"fields {fields} differ (got, want) {shown}"


def compare(got: StoreContent, truth: Truth) -> Comparison:
    lost: dict[str, list[str]] = {}
    lost_chunks: set[Ident] = set()
    other: list[str] = []

    def lose(doc: str, what: str, ident: Ident | None = None) -> None:
        lost.setdefault(doc, []).append(what)
        if ident is not None:
            lost_chunks.add(ident)

    def check_object(doc: str, key: str, why: str, ident: Ident | None = None) -> None:
        want = truth.known(key)
        if want is None:
            return
        if key not in got.objects:
            lose(doc, f"object {key!r} ({why}) is missing", ident)
        elif got.objects[key] != want:
            lose(doc, f"object {key!r} ({why}) holds other bytes", ident)

    for ident in sorted(truth.rows.keys() | got.rows.keys(), key=repr):
        doc, index = ident
        rows, accepted = got.rows.get(ident, []), truth.rows.get(ident)
        if accepted is None:
            if doc in truth.documents:
                lose(doc, f"unexpected chunk {index} ({len(rows)} rows)", ident)
            else:
                other.append(f"{len(rows)} rows of a document the truth does not know: {ident!r}")
        elif not rows:
            lose(doc, f"chunk {index} is missing", ident)
        elif len(rows) > 1:
            lose(doc, f"chunk {index} has {len(rows)} rows", ident)
        elif rows[0] not in accepted:
            lose(doc, f"chunk {index}: {_differs(rows[0], accepted[-1])}", ident)
        elif key := rows[0].get("image_r2_key"):
            check_object(doc, key, f"the image of chunk {index}", ident)
    for key in sorted(truth.objects):
        check_object(truth.owners.get(key, "?"), key, "required")
    for key in sorted(truth.optional.keys() & got.objects.keys()):
        check_object(truth.owners.get(key, "?"), key, "a copy")
    known = truth.objects.keys() | truth.optional.keys()
    other += [f"object {k!r} is in no truth (orphan)" for k in sorted(got.objects.keys() - known)]
    return Comparison(len(truth.documents), len(truth.rows), lost, lost_chunks, other)


# ---------------------------------------------------------------- reading the stores


def with_retries(fn: Callable[[], T], attempts: int = 5) -> T:
    """This process's own Milvus calls, retried when the channel is refused for a moment.

    A long-lived test process keeps gRPC subchannels to the session's `milvus-lite server` idle
    between tests; the server answers their keepalive pings with GOAWAY "too_many_pings", and a
    new channel sharing such a subchannel can fail its first RPC with UNAVAILABLE. (A repage
    process is fresh, and a run retries an unavailable Milvus: runner.UNAVAILABLE_WAITS.)"""
    from pymilvus.exceptions import MilvusException

    from repage.errors import StoreUnavailable

    for attempt in range(attempts):
        try:
            return fn()
        except (StoreUnavailable, MilvusException):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))  # a back-off before a retry, not a synchronisation
    raise AssertionError("unreachable")


def read_store(settings) -> StoreContent:
    """Every row of the settings' collection (by identity) and every object of its bucket."""
    from tests.support.snapshot import milvus_rows, object_hashes

    rows: dict[Ident, list[dict]] = {}
    for row in with_retries(lambda: milvus_rows(settings))["rows"].values():
        rows.setdefault((row["document_id"], row["chunk_index"]), []).append(normal_row(row))
    return StoreContent(rows, object_hashes(settings))


def compare_store(settings, truth: Truth, *, final: bool) -> Comparison:
    """The settings' stores against `truth`. `final`: after the last run of a trial, where the
    loss switch strikes."""
    if final and os.environ.get(INJECT_ENV) == "1":
        inject_loss(settings, truth)
    return compare(read_store(settings), truth)


_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]+")


def inject_loss(settings, truth: Truth) -> Ident:
    """Test-only: one image chunk's page, moved one on in Milvus, as a migration that wrote the
    wrong page would leave it. Returns the chunk's identity."""
    candidates = [
        ident
        for ident, rows in sorted(truth.rows.items(), key=repr)
        if rows[-1].get("image_r2_key") and _SAFE_ID.fullmatch(ident[0])
    ]
    if not candidates:
        raise AssertionError("no chunk to corrupt for the injected loss")
    doc, index = candidates[0]

    def corrupt() -> None:
        from tests.support.snapshot import milvus_client

        with milvus_client(settings) as client:
            name = settings.collection
            desc = client.describe_collection(name)
            pk = next(f for f in desc["fields"] if f.get("is_primary"))
            found = client.query(
                name,
                filter=f'document_id == "{doc}" and chunk_index == {index}',
                output_fields=["*"],
                consistency_level="Strong",
            )
            if not found:
                raise AssertionError(f"the chunk to corrupt, {(doc, index)!r}, is not in the collection")
            row = dict(found[0])
            row["page"] = int(row["page"]) + 1
            if desc.get("auto_id") or pk.get("auto_id"):
                client.delete(name, ids=[row.pop(pk["name"])])
                client.insert(name, [row])
            else:
                client.upsert(name, [row])

    with_retries(corrupt)
    return doc, index


# ---------------------------------------------------------------- the synthetic store's truth


def _sha(objects: Mapping[str, bytes]) -> dict[str, str]:
    import hashlib

    return {k: hashlib.sha256(v).hexdigest() for k, v in objects.items()}


def _owner(key: str) -> str:
    """The document of a synthetic key, `{dataset}/{document}/images/...` (ids are UUIDs)."""
    return key.split("/")[1]


def template_truth(template, *, leave_out: str | None = None) -> Truth:
    """A complete migration of the crash suite's synthetic store (tests/support/crash.py).
    `leave_out`: a document whose chunks were deleted; its copies may or may not be there."""
    syn = template.synthetic
    rows = {ident: rows for ident, rows in template.expected_logical().items() if ident[0] != leave_out}
    objects = _sha(syn.expected_objects())
    copies = {new for old, new in syn.moves.items() if _owner(old) == leave_out}
    return Truth(
        rows,
        {k: v for k, v in objects.items() if k not in copies},
        {k: _owner(k) for k in objects},
        optional={k: v for k, v in objects.items() if k in copies},
        documents=set(syn.doc_ids),
    )


def template_partial_truth(template) -> Truth:
    """The synthetic store after a run that stopped part-way: every chunk untouched or fully
    migrated, every original object there, a copy either absent or right."""
    syn = template.synthetic
    after = template.expected_logical()
    rows = {
        ident: [before[0]] if before == after[ident] else [before[0], after[ident][0]]
        for ident, before in template.logical.items()
    }
    originals, everything = _sha(syn.objects), _sha(syn.expected_objects())
    return Truth(
        rows,
        originals,
        {k: _owner(k) for k in everything},
        optional={k: v for k, v in everything.items() if k not in originals},
        documents=set(syn.doc_ids),
    )

"""A reprocessed document's rows as they were before, and putting them back (docs/design.md §2.4).

Both backends keep, before they let a pipeline rewrite a document, every one of its rows
(every field, vectors included) in the bucket at `{ds}/{doc}/repage-backup/reprocess-original.json.gz`:
the local pipeline before it replaces the chunks, the HTTP backend before its POST. The backup
is written once: a retried reprocess must not back up half-new rows.

`restore` (used by `repage rollback`) makes the document's rows exactly the backup's again: the
rows the reprocess added are deleted, and every row is read back and compared field by field
(vector, page and key included; an auto_id primary key excepted: Milvus assigns it).
`replace_rows` is the write both the local pipeline and the restore use.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence

from repage.domain.keys import check_document_id
from repage.errors import ObjectNotFound, RepageError, StoreError
from repage.stores.milvus import row_checksum


def backup_key(dataset_id: str, document_id: str) -> str:
    return f"{dataset_id}/{check_document_id(document_id)}/repage-backup/reprocess-original.json.gz"


def _plain(row: Mapping) -> dict:
    return json.loads(json.dumps(dict(row), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def keep(stores, dataset_id: str, document_id: str, rows: Sequence[Mapping] | None = None, **extra) -> bool:
    """Back up the document's rows unless a backup exists; True if this call wrote it.

    `rows`: the document's rows with vectors, when the caller has them; else they are fetched.
    """
    key = backup_key(dataset_id, document_id)
    if stores.objects.exists(key):  # the original only: a retry must not back up half-new rows
        return False
    vectors = stores.vectors
    info = vectors.info()
    if rows is None:
        rows = vectors.fetch_documents([document_id], with_vectors=True)
    blob = {
        "document_id": document_id,
        "pk_field": info.pk_field,
        "identity_fields": list(info.identity_fields),
        "rows": [_plain(r) for r in rows],
        "checksums": {info.identity.backup_text(r): vectors.row_checksum(r) for r in rows},
        **extra,
    }
    stores.objects.put(key, gzip.compress(json.dumps(blob).encode("utf-8")))
    return True


def exact_checksum(info, row: Mapping) -> str:
    """Every field, page and key included; not an auto_id primary key (Milvus assigns it)."""
    return row_checksum(row, (info.pk_field,) if info.auto_id else (), vector_fields=(info.vector_field,))


def restore(stores, record) -> int:
    """`repage rollback` of a reprocessed document: its rows as they were before, exactly."""
    key = backup_key(record.dataset_id, record.document_id)
    try:
        blob = json.loads(gzip.decompress(stores.objects.get(key)))
    except ObjectNotFound:
        raise RepageError(
            f"document {record.document_id} was reprocessed without a backup "
            f"({key}): the app's pipeline rewrote it; repage cannot restore it"
        ) from None
    rows = blob["rows"]
    if not rows:
        raise RepageError(f"document {record.document_id}: the backup holds no rows; restore by hand")
    vectors = stores.vectors
    current = vectors.fetch_documents([record.document_id], with_vectors=True)
    replace_rows(vectors, current, rows)
    _check_restored(vectors, record.document_id, rows)
    vectors.persist()  # on Milvus Lite, durable before the ledger says rolled back (docs/design.md §7.1)
    return len(rows)


def _check_restored(vectors, document_id: str, rows: Sequence[Mapping]) -> None:
    """The document holds exactly the backup's rows: no more, none different."""
    info = vectors.info()
    after = vectors.fetch_documents([document_id], with_vectors=True)
    if len(after) != len(rows):
        raise RepageError(f"document {document_id}: {len(after)} rows after the restore, the backup has {len(rows)}")
    got = {info.identity.key(r): exact_checksum(info, r) for r in after}
    for row in rows:
        if got.get(info.identity.key(row)) != exact_checksum(info, row):
            raise RepageError(
                f"document {document_id}: chunk {info.identity.key(row)} differs from the backup after the restore"
            )


def replace_rows(vectors, current: Sequence[Mapping], targets: Sequence[dict]) -> dict[tuple, dict]:
    """Make the document's rows exactly `targets` (by identity) with no moment of zero or doubled chunks.

    1. targets whose identity exists: one upsert over the existing row's primary key;
    2. the other targets: inserted;  3. all read back by identity and checked;
    4. only then, current rows whose identity is not a target: deleted.
    Returns the read-back rows by identity.
    """
    info = vectors.info()
    existing: dict[tuple, list[Mapping]] = {}
    for row in current:
        existing.setdefault(info.identity.key(row), []).append(row)
    overwrite, insert = [], []
    for row in targets:
        here = existing.get(info.identity.key(row))
        out = {k: v for k, v in row.items() if k in info.fields or info.dynamic}
        if here:
            out[info.pk_field] = here[0][info.pk_field]
            overwrite.append(out)
        else:
            if info.auto_id:
                out.pop(info.pk_field, None)
            elif info.pk_field not in out or out[info.pk_field] is None:
                raise RepageError(f"chunk {info.identity.key(row)}: no primary key to insert it under")
            insert.append(out)
    if overwrite:
        vectors.upsert_rows(overwrite)
    if insert:
        vectors.insert(insert)
    wanted = [info.identity.key(r) for r in targets]
    found = vectors.find_by_identity(wanted, with_vectors=True)
    checked: dict[tuple, dict] = {}
    for row, identity in zip(targets, wanted, strict=True):
        rows = found.get(identity, [])
        if len(rows) != 1:
            raise StoreError(
                f"chunk {identity}: {len(rows)} rows after the write (expected 1); the old chunks are kept: run again"
            )
        back = rows[0]
        if back.get("page") != row.get("page") or back.get("text") != row.get("text"):
            raise StoreError(f"chunk {identity}: reads back with another page or text; the old chunks are kept")
        checked[identity] = back
    keep = set(wanted)
    leftovers = [r[info.pk_field] for ident, rows in existing.items() if ident not in keep for r in rows]
    leftovers += [r[info.pk_field] for ident, rows in existing.items() if ident in keep for r in rows[1:]]
    # rows[1:]: duplicates a crash left behind; the upsert wrote over rows[0]'s key
    if leftovers:
        vectors.delete_by_pks(leftovers)
    return checked

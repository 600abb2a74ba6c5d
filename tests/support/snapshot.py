"""A logical snapshot of the three stores, to prove that something changed nothing (or only X).

`snapshot(settings)` reads:
- milvus: every row of the collection with all its fields, the vector as float32 bytes,
  keyed by stable identity (`chunk_id`, else `document_id` + `chunk_index`); the primary
  key is left out only for an auto_id collection, whose keys a real server may renumber;
- objects: every key of the bucket and the sha256 of its bytes;
- ledger: every row of every table, timestamps included, read with plain sqlite3
  (None when the ledger file does not exist).

It reads pymilvus and the bucket directly, not through repage's adapters' query logic,
so a bug there cannot hide itself. A Lite folder the snapshot had to open in this process
is released again afterwards, so a subprocess can open it next.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

LEDGER_TABLES = ("documents", "chunk_journal", "object_journal", "events", "repage_meta")
PAGE_ROWS = 1000


# ---------------------------------------------------------------- Milvus


def lite_path(milvus_uri: str) -> str | None:
    """The absolute Lite folder of a URI, or None for a server URI."""
    if "://" in milvus_uri:
        return None
    return str(Path(milvus_uri).expanduser().resolve())


def release_lite(milvus_uri: str) -> None:
    """Stop the in-process Milvus Lite server of this folder, releasing its LOCK.

    pymilvus starts one Lite server per folder and process and never stops it: closing a
    MilvusClient (or repage's Stores) leaves the folder locked until the process exits.
    """
    path = lite_path(milvus_uri)
    if path is None:
        return
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(path)


def lite_running(milvus_uri: str) -> bool:
    path = lite_path(milvus_uri)
    if path is None:
        return False
    from milvus_lite.server_manager import server_manager_instance

    return path in server_manager_instance._servers  # noqa: SLF001 (no public accessor)


@contextmanager
def milvus_client(settings) -> Iterator[Any]:
    """A pymilvus client on the settings' Milvus; a Lite folder opened here is released after.

    pymilvus' schema cache is reset for it: keyed by host:port and collection name, it may
    still hold the schema of a same-named collection of an earlier Lite server that had the
    port (see repage.stores.milvus.forget_schemas), and query_iterator trusts it.
    """
    from pymilvus import MilvusClient

    from repage.stores.milvus import forget_schemas

    started_here = lite_path(settings.milvus_uri) is not None and not lite_running(settings.milvus_uri)
    uri = lite_path(settings.milvus_uri) or settings.milvus_uri
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else ""
    client = MilvusClient(uri, token=token)
    try:
        forget_schemas(client)
        yield client
    finally:
        client.close()
        if started_here:
            release_lite(settings.milvus_uri)


def _plain(value: Any, vector: bool) -> Any:
    if vector:
        return np.asarray(value, dtype=np.float32).tobytes()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v, False) for k, v in sorted(value.items())}
    return value


def milvus_rows(settings) -> dict:
    """{'schema': ..., 'rows': {identity: row}} for the settings' collection."""
    with milvus_client(settings) as client:
        name = settings.collection
        if not client.has_collection(name):
            return {"schema": None, "rows": {}}
        client.load_collection(name)  # a reopened Lite folder comes back released
        desc = client.describe_collection(name)
        fields = {f["name"]: f for f in desc["fields"]}
        pk = next(f["name"] for f in desc["fields"] if f.get("is_primary"))
        auto_id = bool(desc.get("auto_id") or fields[pk].get("auto_id"))
        vectors = {n for n, f in fields.items() if "VECTOR" in str(f["type"]).upper()}
        identity = ("chunk_id",) if "chunk_id" in fields else ("document_id", "chunk_index")
        total = int(
            client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"]
        )
        rows: dict = {}
        iterator = client.query_iterator(name, batch_size=PAGE_ROWS, output_fields=["*"], consistency_level="Strong")
        read = 0
        try:
            while page := iterator.next():
                for row in page:
                    read += 1
                    key = row[identity[0]] if len(identity) == 1 else tuple(row[f] for f in identity)
                    clean = {k: _plain(v, k in vectors) for k, v in sorted(row.items()) if not (auto_id and k == pk)}
                    n = 1
                    while (dup := key if n == 1 else (key, f"duplicate {n}")) in rows:
                        n += 1
                    rows[dup] = clean
        finally:
            iterator.close()
        if read != total:
            raise AssertionError(f"snapshot read {read} rows of {name!r}, count(*) says {total}")
        schema = {
            "pk": pk,
            "auto_id": auto_id,
            "dynamic": bool(desc.get("enable_dynamic_field")),
            "fields": sorted(fields),
            "identity": identity,
        }
        return {"schema": schema, "rows": rows}


# ---------------------------------------------------------------- bucket


def object_hashes(settings) -> dict[str, str]:
    """{key: sha256 of its bytes} for every object of the settings' bucket."""
    from repage.stores.objects import ObjectStore

    def secret(value):
        return value.get_secret_value() if value else None

    store = ObjectStore.from_url(
        settings.store_url,
        endpoint=settings.s3_endpoint,
        region=settings.s3_region,
        access_key_id=secret(settings.aws_access_key_id),
        secret_access_key=secret(settings.aws_secret_access_key),
    )
    try:
        keys = sorted(info.key for page in store.list("") for info in page)
        return {key: hashlib.sha256(store.get(key)).hexdigest() for key in keys}
    finally:
        store.close()


# ---------------------------------------------------------------- ledger


def ledger_path(settings) -> Path:
    url = settings.ledger_url
    if not url.startswith("sqlite:///"):
        raise NotImplementedError(f"snapshot reads SQLite ledgers only, not {url.split(':', 1)[0]}")
    return Path(url.removeprefix("sqlite:///"))


def ledger_rows(settings) -> dict | None:
    """{table: {row key: row}} for every table, or None when the ledger file does not exist."""
    path = ledger_path(settings)
    if not path.exists():
        return None
    conn = sqlite3.connect(path)  # read-only use; opening must not create anything: it exists
    try:
        conn.row_factory = sqlite3.Row
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        out: dict = {}
        for table in tables:
            pk_cols = [
                r["name"]
                for r in sorted(conn.execute(f'PRAGMA table_info("{table}")'), key=lambda r: r["pk"])
                if r["pk"]
            ]
            out[table] = {}
            for row in conn.execute(f'SELECT rowid AS __rowid__, * FROM "{table}" ORDER BY rowid'):
                data = dict(row)
                rowid = data.pop("__rowid__")
                key = data[pk_cols[0]] if len(pk_cols) == 1 else tuple(data[c] for c in pk_cols) if pk_cols else rowid
                out[table][key] = data
        return out
    finally:
        conn.close()


# ---------------------------------------------------------------- the whole


def snapshot(settings, *, milvus: bool = True, objects: bool = True, ledger: bool = True) -> dict:
    """The logical content of the stores of `settings` (see the module docstring)."""
    snap: dict = {}
    if milvus:
        snap["milvus"] = milvus_rows(settings)
    if objects:
        snap["objects"] = object_hashes(settings)
    if ledger:
        snap["ledger"] = ledger_rows(settings)
    return snap


def _short(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes sha256:{hashlib.sha256(value).hexdigest()[:12]}>"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{k}: {_short(v)}" for k, v in list(value.items())[:6])
            + (", ..." if len(value) > 6 else "")
            + "}"
        )
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _walk(a: Any, b: Any, path: str, out: list[str], depth: int) -> None:
    if a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict) and depth < 4:
        for key in sorted(set(a) | set(b), key=repr):
            where = f"{path}[{key!r}]"
            if key not in b:
                out.append(f"- {where}: {_short(a[key])}")
            elif key not in a:
                out.append(f"+ {where}: {_short(b[key])}")
            else:
                _walk(a[key], b[key], where, out, depth + 1)
        return
    out.append(f"~ {path}: {_short(a)} -> {_short(b)}")


def diff(before: Any, after: Any, *, limit: int = 40) -> str:
    """Readable differences ('' when equal): '-' removed, '+' added, '~' changed."""
    lines: list[str] = []
    _walk(before, after, "", lines, 0)
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more differences"]
    return "\n".join(lines)


def changed(before: Mapping, after: Mapping) -> set:
    """Keys whose value differs between two mappings (added and removed keys included)."""
    return {k for k in set(before) | set(after) if before.get(k, _MISSING) != after.get(k, _MISSING)}


_MISSING = object()

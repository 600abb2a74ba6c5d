"""Build the three stores from Settings. The CLI and the service both call `open_stores`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from repage.config import Settings

if TYPE_CHECKING:  # the adapters import their SDKs; load them only when a store is opened
    from repage.stores.ledger import Ledger
    from repage.stores.milvus import MilvusVectors
    from repage.stores.objects import ObjectStore


@dataclass
class Stores:
    """The open stores of one process; `close()` releases them in reverse order."""

    settings: Settings
    vectors: MilvusVectors | None = None
    objects: ObjectStore | None = None
    ledger: Ledger | None = None
    _opened: list = field(default_factory=list)

    def close(self) -> None:
        for store in reversed(self._opened):
            store.close()
        self._opened.clear()

    def __enter__(self) -> Stores:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_vectors(settings: Settings) -> MilvusVectors:
    from repage.stores.ledger.locks import SharedLock
    from repage.stores.milvus import MilvusVectors

    token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
    # On Milvus Lite the processes of one migration take turns at the store through a lock in
    # their shared ledger (repage/stores/ledger/locks.py says why there); it connects on first use,
    # so a real Milvus never opens it.
    lock = SharedLock(settings.ledger_url, f"milvus-lite:{settings.collection}")
    return MilvusVectors(settings.milvus_uri, settings.collection, token=token, lite_lock=lock)


def open_objects(settings: Settings, *, check: bool = True) -> ObjectStore:
    """The bucket; with `check`, one cheap LIST so a missing bucket fails now, in one line."""
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
    store.max_get_bytes = settings.max_object_bytes  # docs/design.md §6.6
    if check:
        from repage.stores.throttle import AdaptiveLimiter, call_with_backoff

        try:  # a throttled or flaky first request is retried; a missing bucket fails at once
            call_with_backoff(store.check, AdaptiveLimiter(None))
        except BaseException:
            store.close()
            raise
    return store


def open_ledger(settings: Settings) -> Ledger:
    from repage.stores.ledger import Ledger

    return Ledger(settings.ledger_url)


def open_stores(settings: Settings, *, vectors: bool = True, objects: bool = True, ledger: bool = True) -> Stores:
    """Open the requested stores; on failure close what was opened and re-raise."""
    stores = Stores(settings)
    # the ledger last: a run that fails on Milvus or bucket configuration leaves no ledger file behind
    openers = (("vectors", vectors, open_vectors), ("objects", objects, open_objects), ("ledger", ledger, open_ledger))
    try:
        for name, wanted, opener in openers:
            if wanted:
                store = opener(settings)
                setattr(stores, name, store)
                stores._opened.append(store)
    except BaseException:
        stores.close()
        raise
    return stores

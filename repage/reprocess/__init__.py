"""The slow path: re-run the ingestion pipeline for documents nothing cheaper can fix.

`open_reprocessor(settings, stores)` picks the backend from configuration: `http` (the app's
admin API, REPAGE_REPROCESS_URL) or `local` (this package's own pipeline); the interface is
`repage.reprocess.base.Reprocessor`, the run's stage is `repage.reprocess.stage`.
"""

from __future__ import annotations

from repage.errors import ConfigError
from repage.reprocess.base import Reprocessor
from repage.reprocess.http import HttpReprocessor
from repage.reprocess.local import LocalReprocessor


def backend_name(settings) -> str:
    if settings.reprocess_backend is not None:
        return settings.reprocess_backend
    return "http" if settings.reprocess_url else "local"


def open_reprocessor(settings, stores=None, *, clock=None) -> Reprocessor:
    """The configured backend. http needs REPAGE_REPROCESS_URL; local needs the stores."""
    name = backend_name(settings)
    if name == "http":
        if not settings.reprocess_url:
            raise ConfigError('reprocess_backend = "http" needs REPAGE_REPROCESS_URL (the app\'s admin API)')
        token = settings.reprocess_token.get_secret_value() if settings.reprocess_token else None
        return HttpReprocessor(
            settings.reprocess_url,
            token,
            concurrency=settings.reprocess_concurrency,
            clock=clock,
            stores=stores,
            api=settings.reprocess_api,
        )
    if name == "local":
        if stores is None:
            raise ConfigError("the local reprocess pipeline needs the stores (Milvus and the bucket)")
        return LocalReprocessor(stores, settings)
    raise ConfigError(f"reprocess_backend {name!r}: use http or local")

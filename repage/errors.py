"""One exception tree. Adapters translate vendor errors into these with `raise ... from exc`.

The CLI maps `ConfigError` to exit 2 and prints `str(exc)` as one line; every message
names the thing (document, key, field, URL) and says what to do.
"""


class RepageError(Exception):
    """Base of every error repage raises on purpose."""


class ConfigError(RepageError):
    """Bad configuration or usage: a malformed URL, a missing field, an unreachable store."""


class StoreError(RepageError):
    """A store (Milvus, bucket, ledger) failed in a way that is not the caller's input."""


class StoreUnavailable(StoreError, ConfigError):
    """A store does not answer at all (wrong URI, server down, missing bucket)."""


class Throttled(StoreError):
    """The store asked us to slow down (HTTP 429, 503 SlowDown, Milvus rate limit)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Transient(StoreError):
    """A request failed in a way a retry may fix (HTTP 500/502/504, a reset connection, a reply
    cut short); repage's backoff retries it, as it does `Throttled`, without cutting the rate."""


class ObjectNotFound(StoreError):
    """The object key does not exist in the bucket."""


class ChecksumMismatch(StoreError):
    """The bucket refused a PUT because the body it received does not hash to the SHA-256 sent
    with it (S3's 400 BadDigest): nothing was stored (docs/design.md §5.2)."""


class SchemaError(ConfigError):
    """The collection lacks a field repage needs, or has an unsupported shape."""


class InvalidFilterValue(RepageError, ValueError):
    """A value that would be inlined into a Milvus filter expression is not acceptable."""


class IllegalTransition(RepageError):
    """A ledger state change that the transition table does not allow."""


class StaleLease(RepageError):
    """A write carried a fencing token that is no longer current: another worker owns the document."""


class BadInput(RepageError):
    """A document's data cannot be processed (corrupt PDF, unparseable row); recorded in the ledger."""


class InvalidDocumentId(BadInput, ValueError):
    """A document id that cannot become an object key, a URL path segment or a file name
    (`.`, `..`, a `/`, a control character); bad input of that one document."""

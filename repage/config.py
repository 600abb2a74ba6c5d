"""Settings: read from the environment, `repage.toml` and flags at the edges only.

Precedence: flags > REPAGE_* environment > the app's own env names (fallback) >
repage.toml > defaults. The CLI and the service call `load_settings` once and pass
the resulting object down; library code never reads the environment itself.
`demo` and the tests pass `app_fallbacks=False`: a demo must never touch production.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from repage.domain.templates import body_placeholders, check_path_template, placeholders
from repage.errors import ConfigError
from repage.redact import Redactor, redact_text, redact_url

DEFAULT_DATA_DIR = "./repage-data"


class Prices(BaseModel):
    """Dollar prices (defaults: docs/design.md §8); override under [prices] in repage.toml.
    Reprocessing is priced as the product's ranges: each `*_high` is the range's top (§8.1)."""

    model_config = ConfigDict(extra="forbid")
    class_a_per_million: float = 4.50  # R2 List, Put, Copy
    class_b_per_million: float = 0.36  # R2 Get, Head
    reprocess_compute_per_document: float = Field(default=0.10, ge=0)  # $0.10-1.00
    reprocess_compute_per_document_high: float = Field(default=1.00, ge=0)
    vision_per_image: float = Field(default=0.01, ge=0)  # $0.01-0.10
    vision_per_image_high: float = Field(default=0.10, ge=0)
    ocr_per_image: float = Field(default=0.001, ge=0)  # $0.001
    ocr_per_image_high: float = Field(default=0.001, ge=0)

    @model_validator(mode="after")
    def _ranges(self) -> Prices:
        for low in ("reprocess_compute_per_document", "vision_per_image", "ocr_per_image"):
            if getattr(self, f"{low}_high") < getattr(self, low):
                raise ValueError(f"prices: {low}_high is below {low}: a range goes low to high")
        return self


SUBMIT_FIELDS = frozenset({"document_id", "dataset_id", "filename"})  # what a submit path or body may name
POLL_FIELDS = SUBMIT_FIELDS | {"job_id"}  # a poll path may also name the job the submit reply gave


class ReprocessApi(BaseModel):
    """The reprocess HTTP API's shape (docs/design.md §6.2), [reprocess_api] in repage.toml; the
    default is the app's admin API. Paths are templates on `reprocess_url` (repage.domain.templates)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    submit_method: Literal["POST", "PUT"] = "POST"
    submit_path: str = "/api/v1/admin/documents/{document_id}/reprocess"
    submit_body: dict[str, Any] | None = None  # JSON sent with the submit; its strings may hold placeholders
    poll_path: str = "/api/v1/admin/documents/{document_id}"
    job_id_field: str | None = None  # the submit reply's field naming the job, for {job_id} in poll_path
    status_field: str = "status"  # dotted fields of the poll reply (and the submit reply)
    ready_values: tuple[str, ...] = ("ready",)
    failed_values: tuple[str, ...] = ("failed", "error")
    cost_fields: tuple[str, ...] = ("cost_dollars", "cost")  # the first number found is the job's dollars
    error_fields: tuple[str, ...] = ("error", "detail")

    @field_validator("submit_path")
    @classmethod
    def _submit_path(cls, value: str) -> str:
        return check_path_template(value, SUBMIT_FIELDS, ())

    @field_validator("poll_path")
    @classmethod
    def _poll_path(cls, value: str) -> str:
        return check_path_template(value, POLL_FIELDS, {"document_id", "job_id"})

    @field_validator("submit_body")
    @classmethod
    def _submit_body(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and (unknown := sorted(body_placeholders(value) - SUBMIT_FIELDS)):
            raise ValueError(f"submit_body: unknown placeholder {{{unknown[0]}}}")
        return value

    @field_validator("ready_values", "failed_values")
    @classmethod
    def _values(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.lower() for v in value)

    @model_validator(mode="after")
    def _job_id(self) -> ReprocessApi:
        if "document_id" not in {*placeholders(self.submit_path), *body_placeholders(self.submit_body)}:
            raise ValueError("the submit must name the document: put {document_id} in submit_path or submit_body")
        if "job_id" in placeholders(self.poll_path) and not self.job_id_field:
            raise ValueError("poll_path names {job_id}: set job_id_field, the submit reply's field holding it")
        if set(self.ready_values) & set(self.failed_values):
            raise ValueError("a status value cannot be both ready and failed")
        return self


class Matching(BaseModel):
    """pdf-path confidence threshold (docs/design.md §2.2); [matching] in repage.toml."""

    model_config = ConfigDict(extra="forbid")
    max_hash_distance: int = Field(default=10, ge=0, le=64)
    min_hash_margin: int = Field(default=8, ge=0, le=64)


class WorkerSettings(BaseModel):
    """The worker's schedule and limits (docs/design.md §9.5); [worker] in repage.toml, flags override."""

    model_config = ConfigDict(extra="forbid")
    daily_quota: int | None = Field(default=None, ge=0)  # trickle documents per day
    quiet_hours: str | None = None  # HH:MM-HH:MM, local time
    min_accesses: float | None = Field(default=None, ge=0)
    max_failures: int | None = Field(default=None, ge=0)  # pause the migration after more failures than this
    max_error_rate: float | None = Field(default=None, ge=0, le=1)  # ... or above this ratio over the last 100
    daily_budget_dollars: float | None = Field(default=None, gt=0)
    audit_every: str | None = None  # verify a random sample this often (6h, 1d)
    audit_sample: int = Field(default=100, ge=1)
    allow_reprocess: bool = False  # the worker reprocesses what only the slow path fixes, under the budgets


class Settings(BaseModel):
    """Everything repage needs, validated once. Secrets are SecretStr: never printed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    milvus_uri: str = f"{DEFAULT_DATA_DIR}/milvus.db"
    milvus_token: SecretStr | None = None
    collection: str = "fltr_documents"
    store_url: str = f"file://{DEFAULT_DATA_DIR}/bucket"
    s3_endpoint: str | None = None
    s3_region: str = "auto"
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    ledger_url: str = f"sqlite:///{DEFAULT_DATA_DIR}/ledger.db"
    source_key_template: str = "{dataset_id}/{filename}"
    read_token: SecretStr | None = None
    admin_token: SecretStr | None = None
    reprocess_url: str | None = None
    reprocess_token: SecretStr | None = None
    # the slow path's backend (repage/reprocess): None = "http" when reprocess_url is set, else "local"
    reprocess_backend: Literal["http", "local"] | None = None
    reprocess_concurrency: int = Field(2, ge=1, le=64)  # documents reprocessing at once
    reprocess_timeout_seconds: float = Field(1800.0, gt=0)  # one document's job, submit to ready/failed
    reprocess_poll_seconds: float = Field(5.0, gt=0)
    reprocess_api: ReprocessApi = ReprocessApi()  # the HTTP backend's paths and payloads (docs/design.md §6.2)
    # the model the collection's vectors come from (docs/design.md §7.4): the local pipeline writes vectors
    # only when it can compute this exact model, and refuses otherwise
    embedding_model: str | None = None
    key_patterns: tuple[str, ...] = ()
    # bucket requests in flight: a bucket seen from outside its cloud answers in ~30 ms, so 16
    # keep ~500 requests/s going (4 managed ~130); a local folder is as fast at 16 (docs/performance.md)
    concurrency: int = Field(16, ge=1, le=256)
    # 200 documents (~4,000 rows): few round trips (each Milvus query pays a fixed cost that
    # grows with unsealed rows), a bounded RSS (bench: 295 MB at 200, 304 MB at 250)
    batch_size: int = Field(200, ge=1, le=10_000)
    access_half_life_hours: float = Field(72.0, gt=0)
    lease_seconds: float = Field(300.0, gt=0)  # a dead worker's documents return to pending after this
    # the largest object read whole into memory (a source for the local reprocess, an image to hash);
    # a larger one is bad input of its document (docs/design.md §6.6)
    max_object_bytes: int = Field(256 * 1024**2, ge=1024)
    budget_dollars: float | None = Field(None, gt=0)  # the whole migration's budget: the dashboard compares against it
    prices: Prices = Prices()
    matching: Matching = Matching()
    worker: WorkerSettings = WorkerSettings()

    @field_validator("milvus_uri")
    @classmethod
    def _milvus_uri(cls, value: str) -> str:
        if value.startswith(("http://", "https://", "tcp://")):
            parts = urlsplit(value)
            if not parts.hostname:
                raise ValueError(f"REPAGE_MILVUS_URI {redact_url(value)!r} has no host: use http://host:19530")
            return value
        if "://" in value or not value.endswith(".db"):
            raise ValueError(
                f"REPAGE_MILVUS_URI {redact_url(value)!r} is neither a Milvus Lite file (*.db) nor http(s)://host:port"
            )
        return value

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, value: str) -> str:
        # never echo a raw value (docs/design.md §6.1): a URL may carry user info or a token
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in {"file", "s3", "memory"}:
            raise ValueError(f"REPAGE_STORE_URL {redact_url(value)!r} must start with file://, s3:// or memory://")
        if scheme == "s3" and not urlsplit(value).netloc:
            raise ValueError(f"REPAGE_STORE_URL {redact_url(value)!r} names no bucket: use s3://BUCKET")
        return value

    @field_validator("ledger_url")
    @classmethod
    def _ledger_url(cls, value: str) -> str:
        if not re.match(r"^(sqlite:///.+|postgres(ql)?(\+psycopg)?://.+)$", value):
            raise ValueError(f"REPAGE_LEDGER_URL {redact_url(value)!r} must be sqlite:///PATH or postgresql://...")
        return value

    @field_validator("collection")
    @classmethod
    def _collection(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", value):
            raise ValueError(f"REPAGE_COLLECTION {redact_text(value)!r} is not a valid Milvus collection name")
        return value

    def __repr_args__(self):
        # repr/str must never show a URL password (a ledger URL may carry one)
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if isinstance(value, str) else value

    def redacted(self) -> dict[str, Any]:
        """The settings as a plain dict with every secret and URL password masked (repage.redact)."""
        return Redactor.from_settings(self).settings(self)


# REPAGE_* variable -> Settings field
ENV_NAMES: dict[str, str] = {
    "REPAGE_MILVUS_URI": "milvus_uri",
    "REPAGE_MILVUS_TOKEN": "milvus_token",
    "REPAGE_COLLECTION": "collection",
    "REPAGE_STORE_URL": "store_url",
    "REPAGE_S3_ENDPOINT": "s3_endpoint",
    "REPAGE_S3_REGION": "s3_region",
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "REPAGE_LEDGER_URL": "ledger_url",
    "REPAGE_SOURCE_KEY_TEMPLATE": "source_key_template",
    "REPAGE_READ_TOKEN": "read_token",
    "REPAGE_ADMIN_TOKEN": "admin_token",
    "REPAGE_REPROCESS_URL": "reprocess_url",
    "REPAGE_REPROCESS_TOKEN": "reprocess_token",
    "REPAGE_REPROCESS_BACKEND": "reprocess_backend",
    "REPAGE_EMBEDDING_MODEL": "embedding_model",
}


def environ_redactor(environ: Mapping[str, str]) -> Redactor:
    """A redactor for the secrets in the environment, before (or without) valid Settings: the
    CLI's error lines use it when loading the settings is what failed."""
    values: dict[str, Any] = app_fallback_values(environ)
    values.update({field: environ[name] for name, field in ENV_NAMES.items() if environ.get(name)})
    return Redactor.from_values(values)


def app_fallback_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings taken from the app's own variable names (FLTR): MILVUS_*, R2_*."""
    values: dict[str, Any] = {}
    if environ.get("MILVUS_URI"):
        values["milvus_uri"] = environ["MILVUS_URI"]
    if environ.get("MILVUS_TOKEN"):
        values["milvus_token"] = environ["MILVUS_TOKEN"]
    if environ.get("R2_ACCOUNT_ID"):
        values["s3_endpoint"] = f"https://{environ['R2_ACCOUNT_ID']}.r2.cloudflarestorage.com"
    if environ.get("R2_BUCKET_NAME"):
        values["store_url"] = f"s3://{environ['R2_BUCKET_NAME']}"
    if environ.get("R2_ACCESS_KEY_ID"):
        values["aws_access_key_id"] = environ["R2_ACCESS_KEY_ID"]
    if environ.get("R2_SECRET_ACCESS_KEY"):
        values["aws_secret_access_key"] = environ["R2_SECRET_ACCESS_KEY"]
    return values


def read_toml(path: Path | None) -> dict[str, Any]:
    """The [repage] table (or top level) of repage.toml; {} when there is no file."""
    if path is None or not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read TOML ({exc}); fix the file or pass --config") from exc
    return dict(data.get("repage", data))


def load_settings(
    environ: Mapping[str, str],
    *,
    toml_path: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    app_fallbacks: bool = True,
) -> Settings:
    """Merge defaults < toml < app fallbacks < REPAGE_* env < flags, then validate."""
    values: dict[str, Any] = read_toml(toml_path)
    if app_fallbacks:
        values.update(app_fallback_values(environ))
    values.update({field: environ[name] for name, field in ENV_NAMES.items() if environ.get(name)})
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as exc:  # the message may quote a value: redact with every value given
        raise ConfigError(Redactor.from_values(values)(_one_line(exc))) from None


def demo_settings(data_dir: Path) -> Settings:
    """Settings for `repage demo`: everything under data_dir, never the app's env names."""
    data_dir = data_dir.resolve()
    flags = {
        "milvus_uri": str(data_dir / "milvus.db"),
        "store_url": f"file://{data_dir / 'bucket'}",
        "ledger_url": f"sqlite:///{data_dir / 'ledger.db'}",
        "collection": "fltr_documents",
        "embedding_model": "repage-demo-hash-1536",  # repage.demo.embed.MODEL_NAME: the demo's vectors
    }
    return load_settings({}, flags=flags, app_fallbacks=False)  # no environ: never production


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "settings"
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown setting {where!r}: check the spelling in repage.toml"
    return f"configuration error in {where}: {message}"

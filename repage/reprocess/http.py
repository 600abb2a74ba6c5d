"""The app's admin API as a reprocess backend (REPAGE_REPROCESS_URL, REPAGE_REPROCESS_TOKEN).

Default shape (FLTR): `POST {url}/api/v1/admin/documents/{document_id}/reprocess` starts the
pipeline; `GET {url}/api/v1/admin/documents/{document_id}` answers the document, whose
`status` is `ready` or `failed` when the job ended (anything else: still running). A reply
may report what the job cost in `cost_dollars` (or `cost`); `error` explains a failure.
Another app's API: `[reprocess_api]` in repage.toml sets the method, both path templates, a JSON
body, the job id to poll by and the reply's fields (docs/design.md §6.2, `repage.config.ReprocessApi`).

- every request has a connect/read timeout (httpx);
- connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter
  (tenacity; the clock's sleep is injectable so tests wait no wall time); other 4xx are not;
- at most `concurrency` requests are in flight at once (a semaphore), whatever the callers do;
- the token goes only in the Authorization header: never in a message, a repr or a log line;
- before the POST, given the stores, the document's rows (vectors included) are backed up in the
  bucket (repage/reprocess/backup.py) so `repage rollback` restores them exactly (docs/design.md §2.4).
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
import tenacity

from repage.config import ReprocessApi
from repage.domain.keys import check_document_id
from repage.domain.templates import render_body, render_path, reply_field
from repage.errors import BadInput, ConfigError, Transient
from repage.redact import Redactor, redact_url, url_secrets
from repage.reprocess import backup
from repage.reprocess.base import Job, JobStatus, ReprocessDocument
from repage.stores.throttle import Clock, SystemClock


def _values(document, job_id: str | None = None) -> dict[str, str]:
    """What the templates may name. The document id passes the one id check (`quote` keeps `.` and
    `..`, which would climb the app's API); render_path quotes every value as one segment."""
    values = {
        "document_id": check_document_id(document.document_id),
        "dataset_id": document.dataset_id,
        "filename": document.filename,
    }
    if job_id is not None:
        values["job_id"] = job_id
    return values


def _job_id(reply: dict[str, Any], field: str) -> str:
    """The job id the submit reply gave, checked like a document id: it becomes a path segment."""
    value = reply_field(reply, field)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise BadInput(f"reprocess API: the submit reply has no job id in {field!r}")
    try:
        return check_document_id(str(value))
    except ValueError as exc:
        raise BadInput(f"reprocess API: the job id in {field!r} cannot be used in a URL ({exc})") from None


class _Retryable(Exception):
    """A reply or a transport error worth another try."""


class HttpReprocessor:
    name = "http"

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        concurrency: int = 4,
        attempts: int = 5,
        timeout: httpx.Timeout | float = httpx.Timeout(30.0, connect=5.0),
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        clock: Clock | None = None,
        transport: httpx.BaseTransport | None = None,
        stores=None,
        api: ReprocessApi | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"REPAGE_REPROCESS_URL {redact_url(base_url)!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self._token = token or ""
        self._redact = Redactor(self._token, *url_secrets(base_url))
        self.clock = clock or SystemClock()
        self.stores = stores  # None: no backup, and `repage rollback` refuses the document
        self.api = api or ReprocessApi()
        self.attempts = attempts
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self._slots = threading.BoundedSemaphore(concurrency)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._client = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport, follow_redirects=False
        )
        self.requests = 0  # sent, retries included (tests, and the cost of a run)

    def __repr__(self) -> str:
        return f"HttpReprocessor({redact_url(self.base_url)!r}, token={'***' if self._token else None})"

    def close(self) -> None:
        self._client.close()

    # ---- the protocol

    def submit(self, document: ReprocessDocument) -> Job:
        if self.stores is not None:  # the rows as they were, before the app's pipeline rewrites them
            backup.keep(self.stores, document.dataset_id, document.document_id)
        values = _values(document)
        path = render_path(self.api.submit_path, values)
        body = None if self.api.submit_body is None else render_body(self.api.submit_body, values)
        reply = self._call(self.api.submit_method, path, body)
        job = Job(document, self.name, detail={"submitted": reply})
        if self.api.job_id_field:
            job.detail["job_id"] = _job_id(reply, self.api.job_id_field)
        self._read(job, reply)
        return job

    def poll(self, job: Job) -> JobStatus:
        if job.status != JobStatus.RUNNING:
            return job.status
        reply = self._call("GET", render_path(self.api.poll_path, _values(job.document, job.detail.get("job_id"))))
        self._read(job, reply)
        return job.status

    def cost(self, job: Job) -> float | None:
        return job.dollars

    # ---- plumbing

    def _read(self, job: Job, reply: dict[str, Any]) -> None:
        """Status, dollars and error from a reply, at the fields `[reprocess_api]` names."""
        api = self.api
        status = str(reply_field(reply, api.status_field) or "").lower()
        costs = [reply_field(reply, name) for name in api.cost_fields]
        if numbers := [c for c in costs if isinstance(c, (int, float)) and not isinstance(c, bool)]:
            job.dollars = float(numbers[0])
        names = (api.status_field, *api.cost_fields, *api.error_fields)
        job.detail["last"] = {n: v for n in names if (v := reply_field(reply, n)) is not None}
        if status in api.ready_values:
            job.status = JobStatus.READY
        elif status in api.failed_values:
            job.status = JobStatus.FAILED
            errors = [reply_field(reply, name) for name in api.error_fields]
            job.error = str(next((e for e in errors if e), "the app reports the job failed"))

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One request with retries; repage errors out, the token in none of them."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential_jitter(initial=self.backoff_initial, max=self.backoff_max),
            retry=tenacity.retry_if_exception_type(_Retryable),
            sleep=self.clock.sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._once(method, path, body)
        except _Retryable as exc:
            raise Transient(f"reprocess API {method} {path}: {exc} (gave up after {self.attempts} tries)") from None
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        with self._slots:
            self.requests += 1
            try:
                response = self._client.request(method, path, json=body)
            except httpx.TransportError as exc:  # connect error, read timeout, reset
                raise _Retryable(f"{type(exc).__name__}: {self._clean(str(exc))}") from None
        code = response.status_code
        if code == 429 or code >= 500:
            raise _Retryable(f"HTTP {code}")
        if code in (401, 403):
            raise ConfigError(f"reprocess API {method} {path}: HTTP {code}: REPAGE_REPROCESS_TOKEN was refused")
        if code == 404:
            raise BadInput(f"reprocess API {method} {path}: HTTP 404: the app does not know this document")
        if code >= 400:
            raise BadInput(f"reprocess API {method} {path}: HTTP {code}: {self._clean(response.text[:200])}")
        if not response.content:
            return {}
        try:
            data = response.json()
        except ValueError:
            raise BadInput(f"reprocess API {method} {path}: the reply is not JSON") from None
        return data if isinstance(data, dict) else {"value": data}

    def _clean(self, text: str) -> str:
        return self._redact(" ".join(text.split()))

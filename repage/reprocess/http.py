"""The app's admin API as a reprocess backend (REPAGE_REPROCESS_URL, REPAGE_REPROCESS_TOKEN).

Default shape (FLTR): `POST {url}/api/v1/admin/documents/{document_id}/reprocess` starts the
pipeline; `GET {url}/api/v1/admin/documents/{document_id}` answers the document, whose
`status` is `ready` or `failed` when the job ended (anything else: still running). A reply
may report what the job cost in `cost_dollars` (or `cost`); `error` explains a failure.

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
from urllib.parse import quote

import httpx
import tenacity

from repage.domain.keys import check_document_id
from repage.errors import BadInput, ConfigError, Transient
from repage.redact import Redactor, redact_url, url_secrets
from repage.reprocess import backup
from repage.reprocess.base import Job, JobStatus, ReprocessDocument
from repage.stores.throttle import Clock, SystemClock

SUBMIT_PATH = "/api/v1/admin/documents/{document_id}/reprocess"
STATUS_PATH = "/api/v1/admin/documents/{document_id}"
READY, FAILED = frozenset({"ready"}), frozenset({"failed", "error"})


def _segment(document_id: str) -> str:
    """The id as one URL path segment: `quote` keeps `.` and `..`, which would climb the app's API."""
    return quote(check_document_id(document_id), safe="")


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
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"REPAGE_REPROCESS_URL {redact_url(base_url)!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self._token = token or ""
        self._redact = Redactor(self._token, *url_secrets(base_url))
        self.clock = clock or SystemClock()
        self.stores = stores  # None: no backup, and `repage rollback` refuses the document
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
        reply = self._call("POST", SUBMIT_PATH.format(document_id=_segment(document.document_id)))
        job = Job(document, self.name, detail={"submitted": reply})
        self._read(job, reply)
        return job

    def poll(self, job: Job) -> JobStatus:
        if job.status != JobStatus.RUNNING:
            return job.status
        reply = self._call("GET", STATUS_PATH.format(document_id=_segment(job.document_id)))
        self._read(job, reply)
        return job.status

    def cost(self, job: Job) -> float | None:
        return job.dollars

    # ---- plumbing

    @staticmethod
    def _read(job: Job, reply: dict[str, Any]) -> None:
        status = str(reply.get("status") or "").lower()
        for name in ("cost_dollars", "cost"):
            if isinstance(reply.get(name), (int, float)) and not isinstance(reply.get(name), bool):
                job.dollars = float(reply[name])
                break
        job.detail["last"] = {k: v for k, v in reply.items() if k in ("status", "cost_dollars", "cost", "error")}
        if status in READY:
            job.status = JobStatus.READY
        elif status in FAILED:
            job.status = JobStatus.FAILED
            job.error = str(reply.get("error") or reply.get("detail") or "the app reports the job failed")

    def _call(self, method: str, path: str) -> dict[str, Any]:
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
                    return self._once(method, path)
        except _Retryable as exc:
            raise Transient(f"reprocess API {method} {path}: {exc} (gave up after {self.attempts} tries)") from None
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str) -> dict[str, Any]:
        with self._slots:
            self.requests += 1
            try:
                response = self._client.request(method, path)
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

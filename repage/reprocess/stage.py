"""The reprocess path inside a run: claimed documents on path `reprocess`, one job each.

The runner hands this stage the claims of a batch whose path is `reprocess`:
- reprocessing not enabled for the run (`--path auto` without `--allow-reprocess`): each goes
  running -> deferred with its reason, nothing else happens;
- enabled: up to `reprocess_concurrency` documents at once go to the configured backend
  (repage/reprocess/base.py), each polled until ready or failed (or the job timeout), while
  the batch's leases are renewed. Before a document is submitted its estimated cost (price
  table) is reserved against `--budget`: a document whose estimate does not fit in what is
  left goes back to pending and the run stops cleanly after the batch.
- dollars per document: what the backend reports for the job, else the price table's figure
  (for a job that was submitted and failed too: it ran); recorded on the ledger transition.
- ready: the document's chunks are read back from Milvus (it must have some) and checked
  (repage/reprocess/checks.py): a page that contradicts its canonical image key fails the
  document; image/OCR chunks all still at page 0 in a source of several pages send it to
  `review`. Otherwise it becomes migrated with its chunk count, so `verify` checks that count later.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from repage.domain.states import State
from repage.errors import IllegalTransition, RepageError, StaleLease
from repage.reprocess import backend_name, open_reprocessor
from repage.reprocess.base import JobStatus, ReprocessDocument, estimated_dollar_range, estimated_dollars
from repage.reprocess.checks import check_result

DEFER_REASON = (
    "only the reprocess path can fix it and reprocessing is not enabled for this run: "
    "run with --allow-reprocess (or --path reprocess)"
)


class ReprocessStage:
    def __init__(
        self,
        stores,
        *,
        enabled: bool,
        budget_dollars: float | None,
        concurrency: int,
        clock,
        spent: Callable[[], float],
        reprocessor=None,
    ):
        self.stores, self.enabled, self.budget = stores, enabled, budget_dollars
        self.concurrency, self.clock = concurrency, clock
        self.spent = spent  # dollars the run's bucket requests cost so far
        self.total_dollars = 0.0  # dollars of the reprocess jobs this stage settled
        self._reprocessor = reprocessor
        self._lock = threading.Lock()
        self._reserved = 0.0
        self.stopped_because: str | None = None

    @property
    def reprocessor(self):
        if self._reprocessor is None:
            self._reprocessor = open_reprocessor(self.stores.settings, self.stores, clock=self.clock)
        return self._reprocessor

    def close(self) -> None:
        if self._reprocessor is not None:
            self._reprocessor.close()

    # ---- a batch

    def process(self, claims: Sequence, migrator, dry_run: bool = False):
        from repage.migration.work import BatchResult, DocumentWork

        result = BatchResult()
        if dry_run:
            for claim in claims:
                estimate = estimated_dollars(self.stores.settings.prices, claim.affected_chunks)
                result.changes.append(
                    {
                        "document_id": claim.document_id,
                        "chunks": [],
                        "copies": [],
                        "reprocess": {
                            "enabled": self.enabled,
                            "backend": backend_name(self.stores.settings),
                            "estimated_dollars": round(estimate, 6),
                        },
                    }
                )
            return result
        works = [DocumentWork(claim, []) for claim in claims]
        if not self.enabled:
            for work in works:
                self._settle(work, State.DEFERRED, result, reason=DEFER_REASON)
            return result
        with migrator.keeping_leases(works):
            if self.concurrency <= 1 or len(works) <= 1:
                for work in works:
                    self._one(work, result)
            else:
                with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                    list(pool.map(lambda w: self._one(w, result), works))
        return result

    def _reserve(self, estimate: float) -> bool:
        with self._lock:
            if self.stopped_because is not None:
                return False
            if self.budget is None:
                self._reserved += estimate
                return True
            left = self.budget - self.spent() - self.total_dollars - self._reserved
            if estimate > left + 1e-12:
                self.stopped_because = (
                    f"--budget ${self.budget}: the next reprocess may cost up to "
                    f"${estimate:.4f}, ${max(left, 0.0):.4f} left"
                )
                return False
            self._reserved += estimate
            return True

    def _one(self, work, result) -> None:
        claim = work.claim
        settings = self.stores.settings
        # reserved at the top of the price range, so a budget holds whatever the job turns out to
        # cost; a job whose backend reports no cost is charged the low end (the price table's figure)
        estimate, reserve = estimated_dollar_range(settings.prices, claim.affected_chunks)
        if not self._reserve(reserve):
            self._settle(work, State.PENDING, result, reason=f"not started: {self.stopped_because}")
            return
        submitted, dollars = False, 0.0
        try:
            doc = ReprocessDocument(
                claim.document_id, claim.dataset_id, claim.filename, claim.fencing_token, claim.affected_chunks
            )
            job = self.reprocessor.submit(doc)
            submitted = True
            status = self._wait(work, job)
            reported = self.reprocessor.cost(job)
            dollars = reported if reported is not None else estimate
            if status == JobStatus.READY:
                self._finish(work, job, dollars, result)
            else:
                self._settle(
                    work,
                    State.FAILED,
                    result,
                    dollars=dollars,
                    error=f"document {claim.document_id}: reprocess failed: {job.error}",
                )
        except StaleLease as exc:
            result.other[claim.document_id] = State.PENDING
            work.error = str(exc)
        except RepageError as exc:
            if submitted and not dollars:
                dollars = estimate
            self._settle(
                work, State.FAILED, result, dollars=dollars, error=f"document {claim.document_id}: reprocess: {exc}"
            )
        finally:
            with self._lock:
                self._reserved -= reserve

    def _wait(self, work, job) -> JobStatus:
        settings = self.stores.settings
        started = self.clock.now()
        status = self.reprocessor.poll(job)
        while status == JobStatus.RUNNING:
            if work.error is not None:  # the lease keeper lost the lease: another worker owns it
                raise StaleLease(work.error)
            waited = self.clock.now() - started
            if waited >= settings.reprocess_timeout_seconds:
                job.status, job.error = (
                    JobStatus.FAILED,
                    (
                        f"timed out after {waited:.0f}s "
                        f"(reprocess_timeout_seconds = {settings.reprocess_timeout_seconds:g}); "
                        "the app may still finish it: run again with --retry-failed"
                    ),
                )
                return job.status
            self.clock.sleep(settings.reprocess_poll_seconds)
            status = self.reprocessor.poll(job)
        return status

    def _finish(self, work, job, dollars: float, result) -> None:
        vectors = self.stores.vectors
        rows = vectors.fetch_documents([work.document_id], with_vectors=False)
        if not rows:
            self._settle(
                work,
                State.FAILED,
                result,
                dollars=dollars,
                error=f"document {work.document_id}: the backend reports it ready but it has no chunks",
            )
            return
        verdict = check_result(self.stores, work.claim, rows)  # "ready" is not proof: docs/design.md §2.4
        if verdict is not None:
            self._refuse(work, verdict, dollars, result)
            return
        vectors.persist()  # what this process wrote (the local reprocessor) survives a Lite stop first
        self._settle(
            work,
            State.MIGRATED,
            result,
            dollars=dollars,
            total_chunks=len(rows),
            reason=f"reprocessed ({job.backend}): {len(rows)} chunks",
        )
        result.chunks_written += len(rows)

    def _refuse(self, work, verdict, dollars: float, result) -> None:
        """A result the checks refused: `review` with its evidence, or `failed` naming the chunk."""
        if verdict.state == State.REVIEW:
            evidence = json.dumps(verdict.evidence)
            self.stores.ledger.save_review(work.document_id, work.claim.fencing_token, evidence)
            self._settle(work, State.REVIEW, result, dollars=dollars, reason=verdict.reason)
        else:
            self._settle(work, verdict.state, result, dollars=dollars, error=verdict.reason)

    def _settle(
        self,
        work,
        state: State,
        result,
        *,
        dollars: float = 0.0,
        reason: str | None = None,
        error: str | None = None,
        **fields,
    ) -> None:
        """One ledger transition under the document's token; the batch result follows it."""
        doc = work.document_id
        extra = {"dollars": dollars} if dollars else {}
        try:
            self.stores.ledger.transition(
                doc, state, token=work.claim.fencing_token, reason=reason, error=error, **extra, **fields
            )
        except (StaleLease, IllegalTransition) as exc:
            result.other[doc] = State.PENDING
            work.error = str(exc)
            return
        with self._lock:
            result.dollars += dollars
            self.total_dollars += dollars
            if state == State.MIGRATED:
                result.migrated.append(doc)
            elif state == State.FAILED:
                result.failed[doc] = error or "failed"
            else:
                result.other[doc] = state

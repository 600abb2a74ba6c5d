"""One batch of the keys path: compute the changes, apply them by the protocol of DESIGN §5.

1. journal the intended chunk changes and object moves (with the legacy object's
   size and content hash) under the document's fencing token;
2. copy each legacy image to its canonical key, GET it back, compare size and hash; where
   the bucket checks a PUT's SHA-256, PUT the bytes read in step 1 instead (no read-back);
3. write the batch's chunks in one call (partial update, or full-row upsert);
4. read them back by stable identity and check page, key and the rest-of-row checksum;
5. mark the document migrated. Old objects stay until `gc`.
A document that already has a journal (an earlier attempt died) is finished from its
journal, never re-planned from rows that may be half-written.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import cast

from repage.domain.identity import ChunkIdentity
from repage.domain.keys import canonical_image_key, image_prefix, is_pdf_image_ref, parse_image_key
from repage.domain.plan import DocumentPlan, classify, is_affected, needs_listing
from repage.domain.records import ChunkChange, ChunkJournalEntry, Claim, JournalIntent, ObjectJournalEntry, ObjectState
from repage.domain.states import RepairPath, State
from repage.errors import (
    BadInput,
    ConfigError,
    InvalidFilterValue,
    ObjectNotFound,
    RepageError,
    StaleLease,
    StoreUnavailable,
)
from repage.migration.work import BatchResult, ByteBudget, DocumentWork, RunOptions
from repage.stores.milvus import quote_string

# Protocol steps where a crash test can kill the process (REPAGE_FAILPOINT=NAME, or
# hit:N for the N-th step reached whatever its name: random kills without timing).
FAILPOINTS = ("after-journal", "after-object-copy", "after-copy", "after-write", "after-readback", "after-transition")
# Originals a batch keeps from planning to their checked PUT (docs/design.md §5.2): past this,
# its other moves are copied and read back instead. The size of the largest object a run reads
# whole by default (max_object_bytes), so a batch holds no more than one such object would.
MAX_HELD_BYTES = 256 * 1024**2


class Failpoints:
    """Die like a crash (SIGKILL: no cleanup, no flush) at a named step, or at the N-th step.

    `stop:NAME` SIGSTOPs the process instead, once (a stalled worker: scale-out tests resume it
    with SIGCONT after its lease expired, and its next ledger write must be refused).
    """

    def __init__(self, spec: str | None):
        self.name, self.nth, self.count = None, None, 0
        self.signal = signal.SIGKILL
        self._lock = threading.Lock()
        if spec and spec.startswith("stop:"):
            spec, self.signal = spec.removeprefix("stop:"), signal.SIGSTOP
        if spec and spec.startswith("hit:"):
            self.nth = int(spec.removeprefix("hit:"))
        elif spec:
            if spec not in FAILPOINTS:
                raise ConfigError(f"REPAGE_FAILPOINT={spec!r}: use one of {', '.join(FAILPOINTS)} or hit:N")
            self.name = spec

    def hit(self, name: str) -> None:
        with self._lock:
            self.count += 1
            if name == self.name or self.count == self.nth:
                if self.signal == signal.SIGSTOP:
                    self.name = self.nth = None  # once: after SIGCONT the worker goes on
                os.kill(os.getpid(), self.signal)


def _as_journalled(data: bytes, move: ObjectJournalEntry) -> bool:
    """The bytes have the size and SHA-256 the journal recorded for the move."""
    return len(data) == move.size and hashlib.sha256(data).hexdigest() == move.content_hash


class BatchMigrator:
    """Applies the protocol to one claimed batch. Stateless between batches."""

    def __init__(
        self,
        stores,
        options: RunOptions,
        *,
        object_limiter=None,
        write_limiter=None,
        concurrency: int = 4,
        patterns: Sequence = (),
        lease_seconds: float = 300.0,
    ):
        self.vectors, self.objects, self.ledger = stores.vectors, stores.objects, stores.ledger
        self.settings = getattr(stores, "settings", None)  # the pdf path's thresholds and source key template
        self.lease_seconds = lease_seconds
        self.info = self.vectors.info()
        self.identity = self.info.identity
        self.options = options
        self.object_limiter = object_limiter
        self.write_limiter = write_limiter
        self.concurrency = concurrency
        self.patterns = patterns
        self.failpoints = Failpoints(options.failpoint)
        self.engine = options.engine  # the pdf path's fingerprinting/matching/extraction (repage/engine.py)
        self._checks_sha256: bool | None = None  # the bucket's answer to the adapter's probe, once asked

    # ---- planning

    def plan(self, claims: Sequence[Claim]) -> list[DocumentWork]:
        works = self.prepare(claims)
        self.plan_works(works)
        return works

    def prepare(self, claims: Sequence[Claim]) -> list[DocumentWork]:
        """The batch's rows: the scan's affected chunks read by primary key where they still are
        what the scan saw, else every chunk by document filter (docs/design.md §5.1); an id no
        filter can carry fails alone."""
        bad: dict[str, str] = {}
        for claim in claims:
            try:
                quote_string(claim.document_id, field="document_id")
            except InvalidFilterValue as exc:
                bad[claim.document_id] = f"document {claim.document_id!r}: {exc}"
        ids = [c.document_id for c in claims if c.document_id not in bad]
        journals = {} if self.options.dry_run else self.ledger.chunk_journals(ids)
        by_doc = self._read_scanned([d for d in ids if not journals.get(d)])
        keyed = set(by_doc)
        rest = [d for d in ids if d not in keyed]
        for row in self.vectors.fetch_for_repair(rest) if rest else []:
            by_doc.setdefault(row["document_id"], []).append(row)
        works = [DocumentWork(c, by_doc.get(c.document_id, []), all_rows=c.document_id not in keyed) for c in claims]
        for work in works:
            work.error = bad.get(work.document_id)
            work.journal = journals.get(work.document_id, [])
        return works

    def _read_scanned(self, document_ids: Sequence[str]) -> dict[str, list[dict]]:
        """Documents whose scanned affected chunks all read back, by primary key, as one row each
        of that document, with the identity the scan recorded and still affected."""
        recorded = self.ledger.chunk_keys(document_ids) if document_ids else {}
        try:
            rows = self.vectors.fetch_by_pks([pk for pairs in recorded.values() for pk, _ in pairs])
        except (ValueError, InvalidFilterValue):  # a key the collection's type does not take: by filter
            return {}
        by_pk: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            by_pk[str(row[self.info.pk_field])].append(row)
        found = {}
        for doc, pairs in recorded.items():
            got = [by_pk.get(pk, []) for pk, _ in pairs]
            if all(self._as_scanned(doc, ident, rows) for (_, ident), rows in zip(pairs, got)):
                found[doc] = [rows[0] for rows in got]
        return found

    def _as_scanned(self, document_id: str, identity: str, rows: list[dict]) -> bool:
        return (
            len(rows) == 1
            and rows[0].get("document_id") == document_id
            and self.identity.text(rows[0]) == identity
            and is_affected(rows[0])
        )

    def plan_works(self, works: list[DocumentWork]) -> None:
        budget = ByteBudget(MAX_HELD_BYTES)  # one per batch: its documents plan on several threads
        for work in works:
            work.budget = budget
        self._parallel(self._plan_document, works)

    def _plan_document(self, work: DocumentWork) -> None:
        if work.error is not None:  # refused by prepare
            return
        try:
            journal = work.journal
            if journal and not all(c.applied for c in journal):  # resume: the journal is the plan
                work.chunks = journal
                work.moves = self.ledger.object_journal(work.document_id)
                self._restore_kept(work)
                work.unplanned = self._unjournalled(work) if work.all_rows else 0
            else:  # first run, or again after a pages-only run or a rollback
                self._fresh_plan(work, {c.identity: c for c in journal})
        except (RepageError, ValueError) as exc:
            work.error = f"document {work.document_id}: {exc}"

    def _fresh_plan(self, work: DocumentWork, journal: Mapping[str, ChunkJournalEntry]) -> None:
        identity = self.identity
        # Chunks journalled before read page 0 again for planning: their pages are re-derived
        # from the keys and must agree with the journal; their old values stay the originals.
        affected = [dict(r, page=0) if identity.text(r) in journal else r for r in work.rows]
        affected = [r for r in affected if is_affected(r)]
        listed = self._list_images(work) if affected and needs_listing(affected, self.patterns) else None
        plan: DocumentPlan | None  # None: the pdf path sent the document to review
        plan = classify(
            work.document_id,
            affected,
            [identity.key(r) for r in affected],
            dataset_id=work.claim.dataset_id,
            filename=work.claim.filename,
            listed_keys=listed,
            source_exists=None,
            patterns=self.patterns,
        )
        if not affected:
            work.outcome = State.MIGRATED  # nothing left to fix (fixed by another tool meanwhile)
            if not work.rows:
                work.reason = "no chunks in the collection any more (the document was deleted): nothing to fix"
            return
        pdf = None
        if plan.path != RepairPath.KEYS and work.claim.path == RepairPath.PDF:  # pages from the source PDF
            from repage.migration.pdfpath import PdfPlanner

            pdf = PdfPlanner(self, work)
            plan = pdf.resolve(plan, listed)
            if plan is None:  # review or unrecoverable: work.outcome says which
                return
        elif plan.path != RepairPath.KEYS:
            work.error = (
                f"document {work.document_id}: keys no longer tell every page "
                f"({plan.resolved}/{plan.affected}); run `repage scan` again"
            )
            return
        self._intend(work, plan, {identity.key(r): r for r in affected})
        if pdf is not None:
            pdf.add_uploads()
        if journal:
            work.chunks = [self._keep_originals(work, c, journal.get(c.identity)) for c in work.chunks]

    def _unjournalled(self, work: DocumentWork) -> int:
        """Affected chunks the journal does not name: they arrived after it was written."""
        journalled = {c.identity for c in work.chunks}
        return sum(1 for r in work.rows if is_affected(r) and self.identity.text(r) not in journalled)

    def _restore_kept(self, work: DocumentWork) -> None:
        """A resumed (or drifted) document's kept canonical images that are gone come back from
        the source PDF, as the pdf path restores missing images (docs/design.md §5.8)."""
        from repage.migration.verify import kept_canonical_keys

        kept = kept_canonical_keys(work.chunks, work.moves)
        missing = [k for k in kept if not self._object_call(self.objects.exists, k)]
        work.usage.class_b += len(kept)
        if missing:
            from repage.migration.pdfpath import PdfPlanner

            work.restored = PdfPlanner(self, work).restore(missing)
            work.moves = [*work.moves, *work.restored]

    def _keep_originals(
        self, work: DocumentWork, entry: ChunkJournalEntry, before: ChunkJournalEntry | None
    ) -> ChunkJournalEntry:
        """A re-planned chunk keeps the journal's original old values (rollback restores the store as built)."""
        if before is None:
            return entry
        if before.new_page != entry.new_page:
            raise BadInput(
                f"chunk {entry.identity}: keys now say page {entry.new_page}, the journal "
                f"recorded {before.new_page}; resolve by hand"
            )
        new_key = entry.new_key if entry.new_key is not None else before.new_key
        return replace(
            entry,
            old_page=before.old_page,
            old_key=before.old_key,
            new_key=new_key if new_key != before.old_key else None,
        )

    def _list_images(self, work: DocumentWork) -> list[str]:
        prefix = image_prefix(work.claim.dataset_id, work.document_id)
        # Through the limiter like every bucket call of a run (a throttled listing starts over);
        # pages after the first were requests too, so they take their slots afterwards.
        pages = self._object_call(lambda: list(self.objects.list(prefix)))
        if len(pages) > 1 and self.object_limiter is not None:
            self.object_limiter.acquire(len(pages) - 1)
        work.usage.class_a += max(len(pages), 1)  # an empty listing is still one (billed) request
        return [info.key for page in pages for info in page]

    def _intend(self, work: DocumentWork, plan: DocumentPlan, rows: Mapping[tuple, dict]) -> None:
        targets = {c.identity: self._target_key(work, c) for c in plan.chunks}
        # a target is None whenever found_key is (_target_key): both are str here
        wanted = cast(
            "dict[str, str]",
            {
                c.found_key: targets[c.identity]
                for c in plan.chunks
                if targets[c.identity] is not None and targets[c.identity] != c.found_key
            },
        )
        work.moves = [m for m in (self._describe_move(work, old, new) for old, new in sorted(wanted.items())) if m]
        moved = {m.old_key for m in work.moves}
        for chunk in plan.chunks:
            target = targets[chunk.identity]
            if chunk.found_key in wanted and chunk.found_key not in moved:
                target = None  # its image is missing: fix the page, leave the key as it is
            row = rows[chunk.identity]
            work.chunks.append(
                ChunkJournalEntry(
                    identity=ChunkIdentity.as_text(chunk.identity),
                    old_pk=str(row[self.info.pk_field]),
                    old_page=int(row.get("page") or 0),
                    new_page=chunk.page,
                    old_key=chunk.current_key,
                    new_key=target if target != chunk.current_key else None,
                    row_checksum=self.vectors.row_checksum(row),
                )
            )

    def _target_key(self, work: DocumentWork, chunk) -> str | None:
        """The key the chunk's image should end at (None: the chunk knows no image)."""
        found = chunk.found_key
        if found is None:
            return None
        if not self.options.move_images:  # pages only: every key stays as it is (DESIGN §5)
            return chunk.current_key
        parsed = parse_image_key(found, patterns=self.patterns)
        if parsed.fmt == "canonical":
            return found
        index = chunk.image_index if chunk.image_index is not None else parsed.index
        return canonical_image_key(
            work.claim.dataset_id,
            work.document_id,
            chunk.page,
            index,  # type: ignore[arg-type]  # a None here is not ruled out by the types (left as it was)
            (parsed.ext or "png").lower(),
        )

    def _describe_move(self, work: DocumentWork, old: str, new: str) -> ObjectJournalEntry | None:
        """Size and content hash of the legacy object, read before anything is written."""
        if work.error is not None:  # the lease keeper lost the lease: read nothing more
            raise StaleLease(work.error)
        data = work.blobs.pop(old, None)  # the pdf path read it already to compare it
        if data is None:
            try:
                data = self.get_object(old)
            except ObjectNotFound:
                return None
            finally:
                work.usage.class_b += 1
            work.usage.bytes_read += len(data)
        self._hold(work, old, data)
        return ObjectJournalEntry(old, new, len(data), hashlib.sha256(data).hexdigest(), ObjectState.INTENDED)

    def _hold(self, work: DocumentWork, key: str, data: bytes) -> None:
        """Keep an original's bytes for its checked PUT (docs/design.md §5.2) while the batch's
        budget lasts, where the bucket checks SHA-256; otherwise the copy step copies and reads back."""
        if work.budget is not None and self._sha256_checked() and work.budget.take(len(data)):
            work.blobs[key] = data

    def _sha256_checked(self) -> bool:
        """Whether the bucket refuses a PUT whose body does not match its SHA-256: the adapter's
        probe, asked once, under the run's limiter and backoff. Never in a dry run (the probe writes)."""
        if self.options.dry_run:
            return False
        if self._checks_sha256 is None:
            self._checks_sha256 = bool(self._object_call(lambda: self.objects.verifies_sha256))
        return self._checks_sha256

    # ---- applying

    def apply(self, works: list[DocumentWork]) -> BatchResult:
        result = BatchResult()
        # Ledger steps of the whole batch share one transaction each (one commit, not one per
        # document or per image); no Milvus or bucket call runs inside one.
        with self.ledger.transaction():
            live = [w for w in works if self._settle_early(w, result)]
        if self.options.dry_run:
            result.changes = [self._change_record(w) for w in live]
            return result
        live = self._journal(live, result)
        self.failpoints.hit("after-journal")
        self._parallel(self._copy_objects, live)
        with self.ledger.transaction():
            self._record_verified(live)
            live = [w for w in live if self._keep(w, result)]
        self.failpoints.hit("after-copy")
        live = self._renew_leases(live, result)  # the write starts with a full lease
        # On Milvus Lite the write, its read-back and a flush run as one turn at the store: no other
        # process writes or flushes in between, and the rows are sealed before the ledger records
        # anything as applied or migrated (a Lite server stopped by SIGTERM keeps only flushed rows
        # for sure: docs/milvus-lite-durability.md). Elsewhere both are no-ops (docs/design.md §7).
        with self.vectors.exclusive():
            live = self._write_or_isolate(live, result)
            self.failpoints.hit("after-write")
            written = self._fetch_written(live)  # one read-back query per batch, not one per document
            self.vectors.persist()
        with self.ledger.transaction():
            live = self._read_back(live, result, written)
        self.failpoints.hit("after-readback")
        self._finish(live, result)  # one statement for the batch, each document under its token
        self.failpoints.hit("after-transition")
        return result

    def _settle_early(self, work: DocumentWork, result: BatchResult) -> bool:
        """Documents that end before any write: errors and nothing-to-do."""
        if work.error is None and work.outcome is None:
            return True
        if self.options.dry_run:
            if work.error:
                result.failed[work.document_id] = work.error
            return False
        if work.error:
            self._fail(work, result, work.error)
        else:
            # read by document filter: the count verify compares with (0 for a document deleted since the scan)
            census = {"total_chunks": self._chunk_count(work)} if work.all_rows else {}
            # mypy: a None here is not ruled out by the types (left as it was)
            self._transition(work, work.outcome, result, reason=work.reason or "nothing left to fix", **census)  # type: ignore[arg-type]
        return False

    def _chunk_count(self, work: DocumentWork) -> int:
        """Distinct identities, not rows: rows fetched on a resume may include the duplicate a crash
        mid-upsert left behind (the write deletes it); verify compares with this."""
        return len({self.identity.key(r) for r in work.rows})

    def _journal(self, works: list[DocumentWork], result: BatchResult) -> list[DocumentWork]:
        """Record the intents of the fresh plans (a resumed plan is its journal already)."""
        fresh = [w for w in works if w.chunks and w.chunks[0].id is None]
        intents = [JournalIntent(w.document_id, w.claim.fencing_token, w.moves, w.chunks) for w in fresh]
        restoring = [w for w in works if w.restored and w.chunks[0].id is not None]
        intents += [JournalIntent(w.document_id, w.claim.fencing_token, moves=w.restored) for w in restoring]
        refused = self.ledger.add_journals(intents)
        return self._drop_lost(works, refused, result)

    @staticmethod
    def _drop_lost(
        works: list[DocumentWork], refused: Mapping[str, str], result: BatchResult | None
    ) -> list[DocumentWork]:
        """The works whose lease still holds; the others go back to pending, untouched."""
        for work in works:
            if work.document_id in refused:
                if result is not None:
                    result.other[work.document_id] = State.PENDING
                work.error, work.lease_lost = refused[work.document_id], True
        return [w for w in works if w.document_id not in refused]

    def _renew_leases(self, works: list[DocumentWork], result: BatchResult | None = None) -> list[DocumentWork]:
        """Extend the leases from now; a document whose lease was lost writes nothing more."""
        if not works:
            return []
        lost = self.ledger.renew_leases({w.document_id: w.claim.fencing_token for w in works}, self.lease_seconds)
        why = {d: f"lease on document {d} is no longer current" for d in lost}
        return self._drop_lost(works, why, result)

    @contextmanager
    def keeping_leases(self, works: Sequence[DocumentWork]):
        """A heartbeat that renews the batch's leases every third of a lease while it works.

        Wall-clock waits on purpose: the lease runs out in real time on the database clock.
        """
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease_seconds / 3):
                # an errored document keeps its lease too, until the batch records its error
                self._renew_leases([w for w in works if w.outcome is None and not w.lease_lost])

        keeper = threading.Thread(target=beat, name="repage-lease-keeper", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join()

    def _copy_objects(self, work: DocumentWork) -> None:
        try:
            for move in work.moves:
                if move.state != ObjectState.VERIFIED:
                    self._copy_one(work, move)
        except (RepageError, ValueError) as exc:
            work.error = f"document {work.document_id}: {exc}"

    def _copy_one(self, work: DocumentWork, move: ObjectJournalEntry) -> None:
        data = self._body(work, move)
        checked = data is not None and self._sha256_checked()
        if checked:  # the bucket stores it only if its own SHA-256 of it matches: no read-back (§5.2)
            self._object_call(self.objects.put_checked, move.new_key, data)
        elif data is not None:
            self.put_object(move.new_key, data)
        else:
            self._object_call(self.objects.copy, move.old_key, move.new_key)
        work.usage.class_a += 1
        self.failpoints.hit("after-object-copy")
        if not checked:
            self._check_copy(work, move)
        work.verified.append(move)  # journalled by _record_verified, for the batch at once

    def _body(self, work: DocumentWork, move: ObjectJournalEntry) -> bytes | None:
        """The bytes to PUT, equal to the journal's size and SHA-256: an image extracted from the
        PDF, or an original kept since planning (`_hold`); None: copy it server-side."""
        if is_pdf_image_ref(move.old_key):  # not in the bucket
            from repage.migration.pdfpath import extracted_image

            return extracted_image(self, work, move)
        data = work.blobs.pop(move.old_key, None)  # dropped once sent: the batch holds it no longer
        if data is not None and not _as_journalled(data, move):
            raise BadInput(f"original {move.old_key} kept since planning differs from the journal (size or hash)")
        return data

    def _check_copy(self, work: DocumentWork, move: ObjectJournalEntry) -> None:
        # One GET, not HEAD + GET: its reply carries the size a HEAD would, and the bytes to hash.
        copied = self.get_object(move.new_key)
        work.usage.class_b += 1
        if not _as_journalled(copied, move):
            raise BadInput(f"copy of {move.old_key} to {move.new_key} does not match (size or content hash)")

    def _record_verified(self, works: list[DocumentWork]) -> None:
        """Journal the verified copies (a crash before this only costs copying them again)."""
        done = [w for w in works if w.verified]
        refused = self.ledger.set_objects_state(
            {w.document_id: (w.claim.fencing_token, [(m.old_key, m.new_key) for m in w.verified]) for w in done},
            ObjectState.VERIFIED,
        )
        for work in done:
            if work.document_id in refused:
                work.error = work.error or refused[work.document_id]
            work.verified = []

    def _keep(self, work: DocumentWork, result: BatchResult) -> bool:
        if work.error is None:
            return True
        self._fail(work, result, work.error)
        return False

    def _write(self, works: list[DocumentWork], result: BatchResult) -> None:
        """All chunks of the batch in one write (one field set, so one request per size cap)."""
        changes, before = [], {}
        has_key = "image_r2_key" in self.info.fields
        for work in works:
            rows = {self.identity.text(r): r for r in work.rows}
            for chunk in work.chunks:
                row = rows.get(chunk.identity)
                identity = ChunkIdentity.from_text(chunk.identity)
                key = chunk.new_key if chunk.new_key is not None else (chunk.old_key or "") if has_key else None
                # mypy: a None here is not ruled out by the types (left as it was)
                changes.append(ChunkChange(identity, row[self.info.pk_field] if row else None, chunk.new_page, key))  # type: ignore[arg-type]
                if row is not None:
                    before[identity] = row
        call = lambda: self.vectors.write_changes(changes, rows_before=before)  # noqa: E731
        if self.write_limiter is None:
            call()
        else:
            from repage.stores.throttle import call_with_backoff

            call_with_backoff(call, self.write_limiter)
        result.chunks_written += len(changes)

    def _write_or_isolate(self, works: list[DocumentWork], result: BatchResult) -> list[DocumentWork]:
        """The batch's one write. If it fails (not an outage), each document is written alone, so a
        bad one (its chunks deleted meanwhile) fails alone, named, and the others go on."""
        try:
            self._write(works, result)
            return works
        except StoreUnavailable:
            raise
        except RepageError as exc:
            error = exc
        if len(works) > 1:
            return [w for w in works if self._write_or_isolate([w], result)]
        work = works[0]
        self._fail(work, result, f"document {work.document_id}: writing its chunks failed: {self._gone(work) or error}")
        return []

    def _gone(self, work: DocumentWork) -> str | None:
        identities = [ChunkIdentity.from_text(c.identity) for c in work.chunks]
        try:
            found = self.vectors.find_by_identity(identities)
        except RepageError:
            return None
        missing = [i for i in identities if not found.get(i)]
        return (
            (
                f"{len(missing)} of its {len(identities)} chunks are no longer in the collection "
                f"(deleted during the run), e.g. {list(missing[0])}"
            )
            if missing
            else None
        )

    def _fetch_written(self, works: Sequence[DocumentWork]) -> dict[tuple, list[dict]]:
        """The batch's written rows by stable identity, read back in as few queries as limits allow."""
        written = {ChunkIdentity.from_text(c.identity): c.old_pk for w in works for c in w.chunks}
        return self.vectors.find_written(written) if written else {}

    def _read_back(
        self, works: list[DocumentWork], result: BatchResult, found: Mapping[tuple, list[dict]]
    ) -> list[DocumentWork]:
        """Check every written row; mark the chunks of the documents that pass applied."""
        passed: dict[str, DocumentWork] = {}
        for work in works:
            if (problem := self._first_problem(work, found)) is not None:
                self._fail(work, result, f"document {work.document_id}: {problem}")
            else:
                passed[work.document_id] = work
        pk = self.info.pk_field  # the key each row has now: a server may have renumbered it (§5.4)
        applied = {
            d: (
                w.claim.fencing_token,
                {c.identity: str(found[ChunkIdentity.from_text(c.identity)][0][pk]) for c in w.chunks},
            )
            for d, w in passed.items()
        }
        # a lost lease mid-batch: that document only goes back to pending, the others go on
        return self._drop_lost(list(passed.values()), self.ledger.mark_chunks_applied_many(applied), result)

    def _first_problem(self, work: DocumentWork, found: Mapping[tuple, list[dict]]) -> str | None:
        for chunk in work.chunks:
            if (problem := self._check_row(chunk, found.get(ChunkIdentity.from_text(chunk.identity), []))) is not None:
                return f"chunk {chunk.identity}: {problem}"
        return None

    def _check_row(self, chunk: ChunkJournalEntry, rows: list[dict]) -> str | None:
        if len(rows) != 1:
            return f"{len(rows)} rows after the write (expected exactly 1)"
        row = rows[0]
        if row.get("page") != chunk.new_page:
            return f"page reads {row.get('page')} after the write, expected {chunk.new_page}"
        expected_key = chunk.new_key if chunk.new_key is not None else chunk.old_key
        if (row.get("image_r2_key") or None) != (expected_key or None):
            return f"image_r2_key reads {row.get('image_r2_key')!r}, expected {expected_key!r}"
        if self.vectors.row_checksum(row) != chunk.row_checksum:
            return "fields other than page/image_r2_key changed (checksum differs)"
        return None

    def _finish(self, works: Sequence[DocumentWork], result: BatchResult) -> None:
        """The batch's checked documents become migrated in one ledger call; one whose lease was
        lost goes back to pending alone (another worker owns it now)."""
        items, again = {}, {}
        for work in works:
            result.objects_copied += len(work.moves)
            usage = work.usage
            fields = {
                "reason": f"{len(work.chunks)} chunks, {len(work.moves)} images moved",
                "images_to_move": self._images_left(work),
                "object_requests_a": usage.class_a,
                "object_requests_b": usage.class_b,
                "bytes_read": usage.bytes_read,
            }
            if work.all_rows:  # else the scan's census stands (rows read by primary key are the affected ones)
                fields["total_chunks"] = self._chunk_count(work)
            if work.unplanned:  # its journal is done; the next claim plans it afresh, arrivals included
                fields["reason"] = f"{work.unplanned} affected chunks arrived after its journal: planned again"
                again[work.document_id] = (work.claim.fencing_token, fields)
            else:
                items[work.document_id] = (work.claim.fencing_token, fields)
        refused = self.ledger.transition_many(State.MIGRATED, items) if items else {}
        refused.update(self.ledger.transition_many(State.PENDING, again) if again else {})
        for work in works:
            if work.document_id in refused:
                self._lost(work, result, refused[work.document_id])
            else:
                self._count(work, State.PENDING if work.unplanned else State.MIGRATED, result)

    def _images_left(self, work: DocumentWork) -> int:
        """Images still at a legacy key after this write (a pages-only run leaves them).

        A run that moves images leaves only those it could not find: 0, so they are not
        re-queued for ever; a resumed journal may be a pages-only plan, so it is counted.
        """
        resumed = bool(work.chunks) and work.chunks[0].id is not None
        if self.options.move_images and not resumed:
            return 0
        finals = {c.new_key if c.new_key is not None else c.old_key for c in work.chunks}
        return sum(
            1
            for key in finals
            if key and parse_image_key(key, patterns=self.patterns).fmt in ("legacy", "docling", "custom")
        )

    # ---- ledger helpers

    def _fail(self, work: DocumentWork, result: BatchResult, message: str) -> None:
        result.failed[work.document_id] = message
        self._transition(work, State.FAILED, result, error=message)

    def _transition(self, work: DocumentWork, state: State, result: BatchResult, **fields) -> None:
        usage = work.usage
        try:
            self.ledger.transition(
                work.document_id,
                state,
                token=work.claim.fencing_token,
                object_requests_a=usage.class_a,
                object_requests_b=usage.class_b,
                bytes_read=usage.bytes_read,
                **fields,
            )
        except StaleLease as exc:  # another worker owns it now: write nothing more
            self._lost(work, result, str(exc))
            return
        self._count(work, state, result)

    @staticmethod
    def _lost(work: DocumentWork, result: BatchResult, why: str) -> None:
        result.other[work.document_id] = State.PENDING
        result.failed.pop(work.document_id, None)
        work.error = why

    @staticmethod
    def _count(work: DocumentWork, state: State, result: BatchResult) -> None:
        """A document's transition landed: its outcome and requests count in the batch's result."""
        if state == State.MIGRATED:
            result.migrated.append(work.document_id)
        elif state != State.FAILED:
            result.other[work.document_id] = state
        usage = work.usage
        result.usage.class_a += usage.class_a
        result.usage.class_b += usage.class_b
        result.usage.bytes_read += usage.bytes_read

    # ---- for the pdf path (repage/migration/pdfpath.py): lease and bucket calls under the run's limits

    def renew_lease(self, work: DocumentWork) -> bool:
        """Extend one document's lease from now; False when it was lost (its work says why)."""
        return bool(self._renew_leases([work]))

    def get_object(self, key: str) -> bytes:
        """GET through the run's object limiter, with backoff when throttled."""
        return self._object_call(self.objects.get, key)

    def put_object(self, key: str, data: bytes) -> None:
        self._object_call(self.objects.put, key, data)

    def download_object(self, key: str, dest: Path, *, max_bytes: int) -> int:
        """GET `key` into the file `dest`, as get_object does; bytes written."""

        def once() -> int:
            with open(dest, "wb") as out:  # "wb" again on a retry: never half of two attempts
                return self.objects.download(key, out, max_bytes=max_bytes)

        return self._object_call(once)

    # ---- plumbing

    def _object_call(self, fn: Callable, *args):
        if self.object_limiter is None:
            return fn(*args)
        from repage.stores.throttle import call_with_backoff

        return call_with_backoff(lambda: fn(*args), self.object_limiter)

    def _parallel(self, fn: Callable[[DocumentWork], None], works: Iterable[DocumentWork]) -> None:
        works = list(works)
        if self.concurrency <= 1 or len(works) <= 1:
            for work in works:
                fn(work)
            return
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            list(pool.map(fn, works))

    @staticmethod
    def _change_record(work: DocumentWork) -> dict:
        """One document's exact changes, as `run --dry-run` prints them."""
        chunks = [
            {
                "chunk": list(ChunkIdentity.from_text(c.identity)),
                "page": [c.old_page, c.new_page],
                "image_r2_key": [c.old_key, c.new_key if c.new_key is not None else c.old_key],
            }
            for c in work.chunks
        ]
        return {
            "document_id": work.document_id,
            "chunks": chunks,
            "copies": [[m.old_key, m.new_key] for m in work.moves],
        }

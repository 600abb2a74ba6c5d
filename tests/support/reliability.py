"""Shared parts of the reliability suite (docs/design.md §13): the figures every test records, the test
secrets and the CLI runner that checks each output for them, and a summariser.

Figures: each test appends one JSON line to the file named by REPAGE_RELIABILITY_RESULTS
(`make reliability` and `make test` set it; without it nothing is written), also when it
failed (see `Trial`). Lines are appended with one `write` on an O_APPEND descriptor, so
pytest-xdist workers never interleave them.

    python -m tests.support.reliability FILE

prints the failed tests (stderr) and the one summary line: trials (tests, failed), faults
injected, documents `verify` passed, and lost: documents (and chunks) whose store differs
from the ground truth. It exits non-zero when the file is empty, a test failed, or anything
was lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import repage_command

RESULTS_ENV = "REPAGE_RELIABILITY_RESULTS"

# Every credential the suite hands repage. None of them may appear in any output of repage:
# stdout, stderr, JSON documents, log records, exception text.
S3_KEY_ID = "RELKEYID7Q4M2ZP9X1"
S3_SECRET = "rel-s3-secret-9Qx7Lw2Vb8Nc"
MILVUS_TOKEN = "rel-milvus-token-Hk4Tz0Pa3"
READ_TOKEN = "rel-read-token-Vb61Nq0s-Xk4Lp9Tw2Hd7"
ADMIN_TOKEN = "rel-admin-token-Jm28Ry5u-Qe3Zc8Vn1Fg6"
REPROCESS_TOKEN = "rel-reprocess-token-Ls93Kd7w"
LEDGER_PASSWORD = "rel-ledger-pw-Tx52Bn8e"
SECRETS = (S3_KEY_ID, S3_SECRET, MILVUS_TOKEN, READ_TOKEN, ADMIN_TOKEN, REPROCESS_TOKEN, LEDGER_PASSWORD)
# Variables a child must never inherit from the machine (a test never touches production).
FOREIGN_ENV = (
    "MILVUS_URI",
    "MILVUS_TOKEN",
    "R2_ACCOUNT_ID",
    "R2_ACCESS_KEY_ID",
    "R2_SECRET_ACCESS_KEY",
    "R2_BUCKET_NAME",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "REPAGE_FAILPOINT",
    "REPAGE_DEBUG",
)


def leaked(text: str, secrets: Iterable[str] = SECRETS) -> list[str]:
    """The secrets found in `text` (also URL-quoted forms), shown by a short prefix only."""
    from urllib.parse import quote

    return [s[:8] + "..." for s in secrets if s in text or quote(s, safe="") in text]


def assert_no_secret(text: str, where: str) -> None:
    found = leaked(text)
    assert not found, f"{where} shows secrets {found}"


# ---------------------------------------------------------------- the CLI


@dataclass
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float = 0.0

    def json(self) -> dict:
        try:
            return json.loads(self.stdout)
        except ValueError as exc:
            raise AssertionError(
                f"repage {' '.join(self.args)} printed no JSON document: {self.stdout[:400]!r}\n"
                f"stderr: {self.stderr[-1500:]}"
            ) from exc

    def __str__(self) -> str:
        return (
            f"repage {' '.join(self.args)} exited {self.returncode} after {self.seconds:.1f}s\n"
            f"stdout: {self.stdout[-1500:]}\nstderr: {self.stderr[-1500:]}"
        )


@dataclass
class CliLog:
    """Every CLI call of one test, each output checked for the test secrets as it arrives."""

    calls: list[CliResult] = field(default_factory=list)

    def run(self, *args: str, env: Mapping[str, str], cwd: Path, timeout: float = 180.0) -> CliResult:
        return self.finish(self.start(*args, env=env, cwd=cwd), timeout=timeout)

    def start(self, *args: str, env: Mapping[str, str], cwd: Path) -> subprocess.Popen:
        """The CLI in the background; `finish` collects and checks its output."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("REPAGE_") and k not in FOREIGN_ENV}
        base.update(env)
        base.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen(
            [*repage_command(), *args], cwd=cwd, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        proc.repage_args, proc.repage_started = tuple(args), time.monotonic()
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = 180.0) -> CliResult:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise AssertionError(
                f"repage {' '.join(proc.repage_args)} still running after {timeout}s\n"
                f"stdout: {stdout[-1500:]}\nstderr: {stderr[-1500:]}"
            ) from None
        args = proc.repage_args
        result = CliResult(args, proc.returncode, stdout, stderr, time.monotonic() - proc.repage_started)
        self.calls.append(result)
        assert_no_secret(stdout, f"stdout of repage {' '.join(args)}")
        assert_no_secret(stderr, f"stderr of repage {' '.join(args)}")
        if result.returncode and not stdout.strip():  # no JSON report: a one-line error says why
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert lines and lines[-1].startswith(("repage: ", "Error: ")), f"no one-line error:\n{result}"
        assert "Traceback" not in stderr, f"a traceback:\n{result}"
        return result


# ---------------------------------------------------------------- figures


@dataclass
class Trial:
    """One test's figures, written as one line when the test ends, whatever happened: a test
    that failed (an assert, an error, a timeout) still adds its line, flagged `failed` with the
    error, so the sum counts it. tests/reliability/conftest.py makes one per test (the `trial`
    fixture) and writes it in its teardown.

    Set the figures as they are measured, before asserting on them: `compared` with each
    comparison against the ground truth (tests/support/ground_truth.py), `verified` with each
    `verify` report."""

    name: str
    trials: int = 1
    faults: int = 0
    documents_verified: int = 0
    documents_compared: int = 0
    chunks_compared: int = 0
    lost_documents: set[str] = field(default_factory=set)
    lost_chunks: set[tuple] = field(default_factory=set)
    comparisons: int = 0
    detail: dict = field(default_factory=dict)

    def compared(self, comparison):
        """Count what a comparison found lost (a document lost at any point of the trial stays lost)."""
        self.comparisons += 1
        self.documents_compared = max(self.documents_compared, comparison.documents)
        self.chunks_compared = max(self.chunks_compared, comparison.chunks)
        self.lost_documents |= set(comparison.lost_documents)
        self.lost_chunks |= set(comparison.lost_chunks)
        return comparison

    def verified(self, report) -> dict | None:
        """The documents `verify` passed, from its report: a `repage verify --json` CliResult, its
        JSON document, or verify_documents' CheckReport. A report that cannot be read counts none."""
        if isinstance(report, CliResult):
            try:
                report = report.json()
            except AssertionError:
                self.documents_verified = 0
                return None
        if isinstance(report, Mapping):
            self.documents_verified = int(report.get("passed") or 0)
            return dict(report)
        self.documents_verified = len(report.passed)
        return report.as_dict()

    def line(self, *, failed: bool = False, error: str | None = None, skipped: bool = False) -> dict:
        return {
            "test": self.name,
            "trials": self.trials,
            "faults": self.faults,
            "documents_verified": self.documents_verified,
            "documents_compared": self.documents_compared,
            "chunks_compared": self.chunks_compared,
            "comparisons": self.comparisons,
            "lost": len(self.lost_documents),
            "lost_chunks": len(self.lost_chunks),
            "lost_examples": sorted(self.lost_documents, key=repr)[:5],
            "failed": failed,
            "skipped": skipped,
            "error": error,
            **self.detail,
        }

    def write(self, **outcome) -> None:
        write_line(self.line(**outcome))


def write_line(row: Mapping) -> None:
    """Append one line to the results file (when `make reliability` or `make test` asked for one)."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    line = json.dumps(row, default=str, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


FIGURES = ("trials", "faults", "documents_verified", "documents_compared", "chunks_compared", "lost", "lost_chunks")


def summarise(lines: Iterable[str]) -> dict:
    totals: dict = {"tests": 0, "failed": 0, **dict.fromkeys(FIGURES, 0), "failures": []}
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        totals["tests"] += 1
        for name in FIGURES:
            totals[name] += int(row.get(name) or 0)
        if row.get("failed"):
            totals["failed"] += 1
            totals["failures"].append((row.get("test"), row.get("error") or ""))
    return totals


def summary_line(totals: Mapping) -> str:
    return (
        f"reliability: {totals['trials']} trials run ({totals['tests']} tests, {totals['failed']} failed), "
        f"{totals['faults']} faults injected, {totals['documents_verified']} documents verified, "
        f"lost = {totals['lost']} of {totals['documents_compared']} documents compared "
        f"({totals['lost_chunks']} of {totals['chunks_compared']} chunks)"
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.support.reliability RESULTS.jsonl", file=sys.stderr)
        return 2
    path = Path(argv[0])
    totals = summarise(path.read_text(encoding="utf-8").splitlines() if path.exists() else [])
    for test, error in totals["failures"]:
        head = " / ".join([line.strip() for line in error.splitlines() if line.strip()][:2])  # with "lost = ..."
        print(f"reliability: FAILED {test}: {head[:300]}", file=sys.stderr)
    print(summary_line(totals))
    if not totals["tests"]:
        print("reliability: no test recorded any figures", file=sys.stderr)
        return 1
    return 1 if totals["lost"] or totals["lost_chunks"] or totals["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

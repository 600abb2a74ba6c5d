"""The worker's own stop rule (docs/design.md §9.5). Pure.

An unattended worker must not burn its quota on a broken store (a revoked bucket key fails every
document): it pauses itself once more than `max_failures` documents failed, or once the failure
ratio over the last `window` documents exceeds `max_error_rate`, counted since it last resumed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

MIN_DOCUMENTS = 10  # a ratio over fewer documents says little


@dataclass
class FailureWatch:
    max_failures: int | None = None
    max_error_rate: float | None = None
    window: int = 100
    failed: int = 0
    recent: deque[bool] = field(default_factory=deque)  # True: that document failed

    def add(self, documents: int, failed: int) -> None:
        """Count a batch: `documents` settled, `failed` of them failed."""
        self.failed += failed
        self.recent.extend([True] * failed + [False] * max(documents - failed, 0))
        while len(self.recent) > self.window:
            self.recent.popleft()

    def reason(self) -> str | None:
        """Why the worker must stop, or None."""
        if self.max_failures is not None and self.failed > self.max_failures:
            return f"--max-failures {self.max_failures} exceeded ({self.failed} failed)"
        if self.max_error_rate is None or len(self.recent) < min(MIN_DOCUMENTS, self.window):
            return None
        failed, seen = sum(self.recent), len(self.recent)
        if failed / seen > self.max_error_rate:
            return f"--max-error-rate {self.max_error_rate:g} exceeded ({failed} of the last {seen} failed)"
        return None

    def reset(self) -> None:
        """Resumed: a fresh count."""
        self.failed = 0
        self.recent.clear()

"""The `concurrency` setting reaches verify, rollback and gc (their bucket requests in flight), as it
reaches a run: each command builds the stores and calls its library function with it."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from repage import api
from repage.config import Settings
from repage.migration import rollback, verify


class Report:
    def as_dict(self) -> dict:
        return {}


@pytest.mark.parametrize(
    "command, module, function",
    [
        (lambda s: api.verify(s), verify, "verify_documents"),
        (lambda s: api.rollback(s), rollback, "rollback_documents"),
        (lambda s: api.gc(s, 0.0), rollback, "gc_objects"),
    ],
)
def test_the_concurrency_setting_reaches_the_checks(command, module, function, monkeypatch):
    seen = {}

    def record(*args, concurrency, **kwargs):
        seen["concurrency"] = concurrency
        return Report()

    @contextmanager
    def no_stores(settings):
        yield object()

    monkeypatch.setattr(module, function, record)
    monkeypatch.setattr(api, "open_stores", no_stores)
    command(Settings(concurrency=7))
    assert seen == {"concurrency": 7}

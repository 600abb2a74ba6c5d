"""The reprocess API's shape in repage.toml (docs/design.md §6.2): path templates are checked when the
settings load, every value goes into a path as one quoted segment, and the document id passes the one
id check whatever the shape. The API is a stand-in http.server on 127.0.0.1 (real HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from repage.config import ReprocessApi, load_settings
from repage.domain.templates import render_body, render_path, reply_field
from repage.errors import BadInput, ConfigError, InvalidDocumentId
from repage.reprocess.base import ReprocessDocument
from repage.reprocess.http import HttpReprocessor
from tests.unit.test_document_ids import api as api  # noqa: F401 (fixture)

SHAPE = ReprocessApi(submit_path="/v2/{dataset_id}/docs/{document_id}:reprocess", poll_path="/v2/jobs/{document_id}")


def toml_settings(tmp_path: Path, table: str):
    toml = tmp_path / "repage.toml"
    toml.write_text(f"[repage.reprocess_api]\n{table}\n", encoding="utf-8")
    return load_settings({}, toml_path=toml, app_fallbacks=False)


def test_the_default_is_the_admin_api(tmp_path):
    shape = toml_settings(tmp_path, "").reprocess_api
    assert shape.submit_method == "POST" and shape.submit_body is None
    assert shape.submit_path == "/api/v1/admin/documents/{document_id}/reprocess"
    assert shape.poll_path == "/api/v1/admin/documents/{document_id}"


@pytest.mark.parametrize(
    "table,complaint",
    [
        ('submit_path = "/jobs"', "put {document_id} in submit_path or submit_body"),
        ('submit_path = "jobs/{document_id}"', "must start with a single '/'"),
        ('submit_path = "//evil.example/{document_id}"', "must start with a single '/'"),
        ('submit_path = "https://evil.example/{document_id}"', "must start with a single '/'"),
        ('submit_path = "/a/../admin/{document_id}"', "'..' step"),
        ('submit_path = "/a/{document_id.__class__}"', "not a plain {name} placeholder"),
        ('submit_path = "/a/{document_id!r}"', "not a plain {name} placeholder"),
        ('submit_path = "/a/{document_id"', "unmatched"),
        ('submit_path = "/a/{doc}"', "unknown placeholder {doc}"),
        ('submit_path = "/a/{job_id}"', "unknown placeholder {job_id}"),
        ('poll_path = "/jobs"', "must hold {document_id} or {job_id}"),
        ('poll_path = "/jobs/{job_id}"', "set job_id_field"),
        ('submit_body = { doc = "{secret}" }', "unknown placeholder {secret}"),
        ('submit_method = "DELETE"', "submit_method"),
        ('ready_values = ["done"]\nfailed_values = ["DONE"]', "both ready and failed"),
        ("surprise = 1", "unknown setting"),
    ],
)
def test_a_bad_shape_is_a_one_line_configuration_error(tmp_path, table, complaint):
    with pytest.raises(ConfigError) as caught:
        toml_settings(tmp_path, table)
    assert complaint in str(caught.value) and "reprocess_api" in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


def test_a_document_named_in_the_body_only_is_enough(tmp_path):
    shape = toml_settings(tmp_path, 'submit_path = "/jobs"\nsubmit_body = { doc = "{document_id}" }').reprocess_api
    assert render_body(shape.submit_body, {"document_id": "a/b"}) == {"doc": "a/b"}  # JSON, not a path: raw


@pytest.mark.parametrize("step", ["", ".", ".."])
def test_no_value_becomes_a_path_step(step):
    with pytest.raises(BadInput, match="dataset_id"):
        render_path(SHAPE.submit_path, {"document_id": "d", "dataset_id": step})


def test_values_are_quoted_as_one_segment_each():
    values = {"document_id": "a.b c", "dataset_id": "x/../y?z#w%"}
    assert render_path(SHAPE.submit_path, values) == "/v2/x%2F..%2Fy%3Fz%23w%25/docs/a.b%20c:reprocess"
    assert reply_field({"job": {"billing": {"usd": 0.4}}}, "job.billing.usd") == 0.4
    assert reply_field({"job": "DONE"}, "job.billing.usd") is None


@pytest.mark.parametrize("bad", [".", "..", "a/b", "a\nb"])
def test_a_configured_shape_never_gets_a_path_step_as_an_id(api, bad):  # noqa: F811 (fixture)
    backend = HttpReprocessor(api.url, "t" * 40, attempts=1, api=SHAPE)
    try:
        with pytest.raises(InvalidDocumentId):
            backend.submit(ReprocessDocument(bad, "ds", "f.pdf"))
    finally:
        backend.close()
    assert api.paths == []


def test_a_configured_shape_sends_its_own_paths(api):  # noqa: F811 (fixture)
    backend = HttpReprocessor(api.url, "t" * 40, attempts=1, api=SHAPE)
    try:
        job = backend.submit(ReprocessDocument("a.b c", "d s", "f.pdf"))
        backend.poll(job)
    finally:
        backend.close()
    assert api.paths == ["/v2/d%20s/docs/a.b%20c:reprocess", "/v2/jobs/a.b%20c"]

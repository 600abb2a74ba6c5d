"""One document-id rule for every id that becomes a key, a URL path segment or a file name
(docs/design.md §6.6): `.`, `..`, `/` and control characters are refused, as bad input of
that one document. The reprocess API is a stand-in http.server on 127.0.0.1 (real HTTP)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from repage.domain.keys import canonical_image_key, check_document_id, image_prefix
from repage.errors import BadInput, InvalidDocumentId
from repage.reprocess.backup import backup_key
from repage.reprocess.base import ReprocessDocument
from repage.reprocess.http import HttpReprocessor
from repage.reprocess.local import checkpoint_prefix

BAD = [".", "..", "", "a/b", "../admin", "a\x00b", "line\nbreak", "tab\there", "del\x7f"]
# a backslash is no path step on a bucket or in a URL (quoted as %5C): the injection corpus keeps one
GOOD = ["doc-1", "a.b", "...", ".hidden", "x..y", "3f2a-uuid", "é-ü", "a b", "a%2Fb", 'bs\\" || true']


@pytest.mark.parametrize("bad", BAD)
def test_bad_ids_are_refused_everywhere_they_become_keys(bad):
    for build in (
        lambda: check_document_id(bad),
        lambda: image_prefix("ds", bad),
        lambda: canonical_image_key("ds", bad, 1, 0, "png"),
        lambda: backup_key("ds", bad),
        lambda: checkpoint_prefix("ds", bad),
    ):
        with pytest.raises(InvalidDocumentId) as caught:
            build()
        assert isinstance(caught.value, BadInput) and isinstance(caught.value, ValueError)
        assert len(str(caught.value).splitlines()) == 1 and repr(bad) in str(caught.value)


@pytest.mark.parametrize("good", GOOD)
def test_good_ids_pass(good):
    assert check_document_id(good) == good
    assert image_prefix("ds", good) == f"ds/{good}/images/"


class StandInApi:
    """Answers every request `running`; records the raw request paths."""

    def __init__(self):
        self.paths: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                api.paths.append(self.path)
                body = json.dumps({"status": "running"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def api():
    stand_in = StandInApi()
    yield stand_in
    stand_in.server.shutdown()


@pytest.mark.parametrize("bad", [".", "..", "a/b", "a\nb"])
def test_the_reprocess_api_never_gets_a_path_step_as_an_id(api, bad):
    backend = HttpReprocessor(api.url, "t" * 40, attempts=1)
    try:
        with pytest.raises(InvalidDocumentId):
            backend.submit(ReprocessDocument(bad, "ds", "f.pdf"))
    finally:
        backend.close()
    assert api.paths == []  # nothing sent: `..` would have been POST /api/v1/admin/reprocess


def test_the_reprocess_api_gets_a_dotted_id_as_one_segment(api):
    backend = HttpReprocessor(api.url, "t" * 40, attempts=1)
    try:
        job = backend.submit(ReprocessDocument("a.b c", "ds", "f.pdf"))
        backend.poll(job)
    finally:
        backend.close()
    assert api.paths == ["/api/v1/admin/documents/a.b%20c/reprocess", "/api/v1/admin/documents/a.b%20c"]

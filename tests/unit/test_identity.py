"""ChunkIdentity: which fields name a chunk, and the exact text journals and backups hold."""

import pytest

from repage.domain.identity import BY_CHUNK_ID, BY_DOCUMENT_AND_INDEX, ChunkIdentity
from repage.errors import SchemaError

COMMON = ("vector", "text", "dataset_id", "document_id", "page", "image_r2_key")


def test_a_varchar_chunk_id_primary_key_is_the_identity():
    identity = ChunkIdentity.of_collection("c", ("chunk_id", *COMMON), varchar_fields={"chunk_id", "text"})
    assert identity.fields == BY_CHUNK_ID and identity.by_chunk_id


def test_an_auto_id_collection_with_a_chunk_id_field_is_named_by_chunk_id():
    fields = ("id", "chunk_id", "chunk_index", *COMMON)
    identity = ChunkIdentity.of_collection("c", fields, varchar_fields={"chunk_id", "text"})
    assert identity.fields == ("chunk_id",)


def test_an_auto_id_collection_without_chunk_id_is_named_by_document_and_index():
    identity = ChunkIdentity.of_collection("c", ("id", "chunk_index", *COMMON), varchar_fields={"text"})
    assert identity.fields == BY_DOCUMENT_AND_INDEX == ("document_id", "chunk_index")
    assert not identity.by_chunk_id


def test_a_chunk_id_that_is_no_varchar_does_not_count():
    fields = ("id", "chunk_id", "chunk_index", *COMMON)
    assert ChunkIdentity.of_collection("c", fields, varchar_fields={"text"}).fields == BY_DOCUMENT_AND_INDEX


def test_a_collection_with_neither_has_no_identity():
    with pytest.raises(SchemaError, match="'docs' has neither 'chunk_id' nor 'chunk_index'"):
        ChunkIdentity.of_collection("docs", ("id", *COMMON), varchar_fields={"text"})


def test_key_is_the_fields_values_in_order_never_the_primary_key():
    row = {"id": 7, "chunk_id": "d1_3", "document_id": "d1", "chunk_index": 3, "page": 0}
    assert ChunkIdentity(BY_CHUNK_ID).key(row) == ("d1_3",)
    assert ChunkIdentity(BY_DOCUMENT_AND_INDEX).key(row) == ("d1", 3)
    renumbered = dict(row, id=99)  # a server's upsert gave it another primary key
    assert ChunkIdentity(BY_DOCUMENT_AND_INDEX).key(renumbered) == ("d1", 3)
    assert len({ChunkIdentity(BY_CHUNK_ID).key(r) for r in (row, renumbered)}) == 1  # hashable, equal


def test_a_missing_field_reads_none():
    assert ChunkIdentity(BY_DOCUMENT_AND_INDEX).key({"document_id": "d1"}) == ("d1", None)


@pytest.mark.parametrize(
    "fields,row,text",
    [
        (BY_CHUNK_ID, {"chunk_id": "d1_3"}, '["d1_3"]'),
        (BY_DOCUMENT_AND_INDEX, {"document_id": "d1", "chunk_index": 3}, '["d1",3]'),
        (BY_DOCUMENT_AND_INDEX, {"document_id": 'dé "x"', "chunk_index": 0}, '["d\\u00e9 \\"x\\"",0]'),
        (BY_DOCUMENT_AND_INDEX, {"document_id": "d1"}, '["d1",null]'),
    ],
)
def test_text_is_the_form_journals_already_hold(fields, row, text):
    identity = ChunkIdentity(fields)
    assert identity.text(row) == text == ChunkIdentity.as_text(identity.key(row))
    assert ChunkIdentity.from_text(text) == identity.key(row)


def test_backup_text_is_the_form_backups_already_hold():
    identity = ChunkIdentity(BY_DOCUMENT_AND_INDEX)
    assert identity.backup_text({"document_id": "d1", "chunk_index": 3}) == '["d1", 3]'
    assert ChunkIdentity(BY_CHUNK_ID).backup_text({"chunk_id": "d1_3"}) == '["d1_3"]'

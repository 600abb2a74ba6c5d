"""The ledger's tables (docs/design.md §4), its schema version, and creating or upgrading them."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from repage.errors import ConfigError

SCHEMA_VERSION = 2  # 2: documents.chunk_keys
_PG_INIT_LOCK = 0x7265_7061_6765  # advisory lock id ("repage") serializing schema creation
# Spend and I/O counters of a document: transition() adds to them, the reports sum them.
ADDITIVE = ("dollars", "object_requests_a", "object_requests_b", "bytes_read")

metadata = sa.MetaData()
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only


def _counter(name: str, type_: Any = sa.BigInteger) -> sa.Column[Any]:
    return sa.Column(name, type_, nullable=False, server_default=sa.text("0"))


def _doc_fk() -> sa.ForeignKey:
    return sa.ForeignKey("documents.document_id", ondelete="CASCADE")


meta_t = sa.Table(
    "repage_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

docs_t = sa.Table(
    "documents",
    metadata,
    sa.Column("document_id", sa.String, primary_key=True),
    sa.Column("dataset_id", sa.String, nullable=False),
    sa.Column("filename", sa.Text, nullable=False, server_default=""),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("path", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    _counter("priority", sa.Double),
    _counter("attempts", sa.Integer),
    _counter("affected_chunks", sa.Integer),
    sa.Column("total_chunks", sa.Integer),
    _counter("images_to_move", sa.Integer),  # from the scan: non-canonical images (for estimate)
    # from the scan: JSON [[primary key, identity], ...] of the affected chunks, so a run reads
    # exactly those rows by primary key (docs/design.md §5.1); NULL: read by document filter
    sa.Column("chunk_keys", sa.Text),
    # lease: owner, token (monotonic per document) and expiry, all from the DB clock
    sa.Column("lease_owner", sa.String),
    _counter("fencing_token"),
    sa.Column("lease_expires", sa.Double),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double),
    sa.Column("finished_at", sa.Double),
    _counter("dollars", sa.Double),
    _counter("object_requests_a"),
    _counter("object_requests_b"),
    _counter("bytes_read"),
    sa.Column("last_error", sa.Text),
    sa.Index("ix_documents_state_path", "state", "path"),
    sa.Index("ix_documents_state_priority", "state", "priority"),
    sa.Index("ix_documents_state_created", "state", "created_at", "document_id"),
    sa.Index("ix_documents_state_lease", "state", "lease_expires"),
    sa.Index("ix_documents_dataset", "dataset_id"),
    sa.Index("ix_documents_updated", "updated_at"),
)

chunks_t = sa.Table(
    "chunk_journal",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("document_id", sa.String, _doc_fk(), nullable=False),
    sa.Column("fencing_token", sa.BigInteger, nullable=False),
    sa.Column("identity", sa.Text, nullable=False),
    sa.Column("old_pk", sa.Text),
    sa.Column("new_pk", sa.Text),
    sa.Column("old_page", sa.Integer),
    sa.Column("new_page", sa.Integer),
    sa.Column("old_key", sa.Text),
    sa.Column("new_key", sa.Text),
    sa.Column("row_checksum", sa.Text),
    sa.Column("applied", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_chunk_journal_doc_identity", "document_id", "identity"),
)

objects_t = sa.Table(
    "object_journal",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("document_id", sa.String, _doc_fk(), nullable=False),
    sa.Column("fencing_token", sa.BigInteger, nullable=False),
    sa.Column("old_key", sa.Text, nullable=False),
    sa.Column("new_key", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger),
    sa.Column("content_hash", sa.Text),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_object_journal_doc_keys", "document_id", "old_key", "new_key"),
    sa.Index("ix_object_journal_state", "state"),
)

events_t = sa.Table(
    "events",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("document_id", sa.String),
    sa.Column("count", sa.Integer, nullable=False, server_default=sa.text("1")),
    sa.Column("detail", sa.Text),
    sa.Index("ix_events_at", "at"),
    sa.Index("ix_events_kind_at", "kind", "at"),
)

# Usage and lazy requests (repage/domain/access.py, repage/migration/lazy.py). No foreign key on
# purpose: the read path sees documents that no scan has recorded yet, and their accesses count too.
accesses_t = sa.Table(
    "accesses",
    metadata,
    sa.Column("document_id", sa.String, primary_key=True),
    sa.Column("dataset_id", sa.String),
    _counter("score", sa.Double),  # decayed access count as of scored_at
    sa.Column("scored_at", sa.Double, nullable=False),  # epoch seconds of the hits (app clock)
    sa.Column("access_rank", sa.Double),  # log2(score) + scored_at/half-life: orders by decayed count
    sa.Column("enqueued_at", sa.Double),  # lazy repair or an admin asked for it: claimed first
    sa.Index("ix_accesses_rank", "access_rank"),
    sa.Index("ix_accesses_enqueued", "enqueued_at"),
)

# Page matches below the confidence threshold (docs/design.md §2), with the evidence a person
# decides on; one row per document, the latest review (created within schema version 1, like accesses).
reviews_t = sa.Table(
    "reviews",
    metadata,
    sa.Column("document_id", sa.String, _doc_fk(), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # pending | accepted | rejected
    sa.Column("evidence", sa.Text, nullable=False),  # JSON written by repage/migration/pdfpath.py
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Index("ix_reviews_status", "status"),
)


def stored_version(conn: sa.Connection) -> str | None:
    """The schema version the database records (None: not a ledger yet)."""
    if not sa.inspect(conn).has_table(meta_t.name):
        return None
    return conn.scalar(sa.select(meta_t.c.value).where(meta_t.c.key == "schema_version"))


def create_or_upgrade(conn: sa.Connection, *, postgresql: bool, name: str) -> None:
    """Create a new ledger's tables, or check an existing one's version, in `conn`'s transaction.

    `name` (the redacted URL) is for the message when the ledger is newer than this repage.
    """
    if postgresql:  # concurrent first starts would race on CREATE TABLE
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_INIT_LOCK)))
    found = stored_version(conn)
    if found is not None and int(found) > SCHEMA_VERSION:
        raise ConfigError(
            f"ledger {name} has schema version {found}, newer than this repage knows ({SCHEMA_VERSION}): upgrade repage"
        )
    # checkfirst: on an existing ledger this adds the tables created since (accesses, reviews)
    metadata.create_all(conn)
    if found is not None and int(found) < 2:  # version 1 -> 2: the scan's primary keys per document
        conn.execute(sa.text("ALTER TABLE documents ADD COLUMN chunk_keys TEXT"))
    if found is None or int(found) < SCHEMA_VERSION:
        conn.execute(sa.delete(meta_t).where(meta_t.c.key == "schema_version"))
        conn.execute(sa.insert(meta_t).values(key="schema_version", value=str(SCHEMA_VERSION)))

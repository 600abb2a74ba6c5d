"""The ledger (docs/design.md §4): progress, leases and journals in SQLite (WAL) or PostgreSQL.

SQLAlchemy Core only; this package is the only place that imports sqlalchemy. Every public
method runs in its own short transaction and closes it before returning, because callers make
Milvus and bucket calls between ledger calls (never hold a lock across the network).

Times (lease expiry, created/updated/started/finished, events) are epoch seconds from the
DATABASE clock, so workers on machines with skewed clocks agree on when a lease expired.

`Ledger` is composed of one part per concern, all sharing one connection (connection.py):
scans, claims and leases, transitions, journals, reviews, events, reports and the access
queue; fencing.py holds the lease checks the writing parts share, schema.py the tables.
"""

from __future__ import annotations

from repage.stores.ledger.accesses import Accesses
from repage.stores.ledger.claims import ORDERS, Claims
from repage.stores.ledger.events import Events
from repage.stores.ledger.journals import Journals
from repage.stores.ledger.reports import Reports
from repage.stores.ledger.reviews import Reviews
from repage.stores.ledger.scans import Scans
from repage.stores.ledger.schema import SCHEMA_VERSION
from repage.stores.ledger.transitions import Transitions


class Ledger(Scans, Claims, Transitions, Journals, Reviews, Events, Reports, Accesses):
    """Progress, leases and journals. Safe to share between threads; one per process."""


__all__ = ["Ledger", "SCHEMA_VERSION", "ORDERS"]

"""The service's parts: settings, stores, lazy repair, metrics and auth, built once and shared by
the JSON endpoints and the dashboard (an existing app can build them around its own stores)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from repage.config import Settings
from repage.domain.keys import compile_patterns
from repage.migration.lazy import LazyRepair, LedgerSink
from repage.migration.monitor import monitor_figures
from repage.web.auth import BearerAuth
from repage.web.guard import AuthThrottle
from repage.web.metrics import LatencyPublisher, ServiceMetrics
from repage.web.sessions import Sessions


@dataclass
class ServiceParts:
    """What the endpoints use; an existing app can build these around its own stores."""

    settings: Settings
    vectors: Any
    ledger: Any
    lazy: LazyRepair
    metrics: ServiceMetrics
    auth: BearerAuth
    worker: Any = None  # WorkerThread when --with-worker


def make_parts(
    settings: Settings,
    vectors,
    ledger,
    *,
    insecure_local: bool = False,
    lazy: LazyRepair | None = None,
    now: Callable[[], float] = time.time,
    flush_seconds: float = 1.0,
    secure_cookie: bool = False,
) -> ServiceParts:
    """LazyRepair (yours, or a new one), metrics and auth over open stores. Start the lazy
    flusher (`parts.lazy.start()`) when the app starts, close it when it stops. `now` (epoch
    seconds) also drives the auth throttle and session expiry (docs/design.md §6.6)."""
    lazy = lazy or LazyRepair(
        LedgerSink(ledger, settings.access_half_life_hours),
        patterns=compile_patterns(settings.key_patterns),
        now=now,
        flush_seconds=flush_seconds,
    )
    throttle = AuthThrottle(now=now)
    metrics = ServiceMetrics(lazy, lambda: monitor_figures(ledger, settings.prices), throttle=throttle)
    lazy.add_periodic(LatencyPublisher(ledger, metrics.window))
    sessions = Sessions(settings.read_token, settings.admin_token, now=now, ledger=ledger, secure=secure_cookie)
    auth = BearerAuth(
        settings.read_token, settings.admin_token, open_access=insecure_local, throttle=throttle, sessions=sessions
    )
    return ServiceParts(settings, vectors, ledger, lazy, metrics, auth)

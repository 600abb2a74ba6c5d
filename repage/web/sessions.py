"""The dashboard's login sessions (docs/design.md §6.6): the cookie holds a random session id,
its role and its expiry, signed with HMAC-SHA256 under a key derived from both tokens, never a
token. Every service process derives the same key, so any of them accepts a session another
issued; a token rotation ends every session. The server checks the signature and the expiry;
logout revokes the id: in this process at once, in the others through a ledger event they read
every few seconds. CSRF tokens are an HMAC of the session id under the same key."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable

from fastapi import Request, Response
from pydantic import SecretStr

from repage.errors import RepageError

log = logging.getLogger("repage.web.sessions")

SESSION_COOKIE = "repage_session"  # HttpOnly, SameSite=Strict; Secure behind TLS (§6.6)
SESSION_SECONDS = 12 * 3600
REVOKED_EVENT = "session-revoked"
REVOKED_REFRESH_S = 2.0
ROLES = ("read", "admin")


class Sessions:
    def __init__(
        self,
        read_token: SecretStr | None,
        admin_token: SecretStr | None,
        *,
        now: Callable[[], float] = time.time,
        ledger=None,
        secure: bool = False,
        lifetime_s: float = SESSION_SECONDS,
    ):
        tokens = [t.get_secret_value().encode() if t else b"" for t in (admin_token, read_token)]
        self._key = (
            hashlib.sha256(b"repage-dashboard-session\0" + b"\0".join(tokens)).digest()
            if any(tokens)
            else secrets.token_bytes(32)  # a local trial without tokens: a key of its own
        )
        self._now, self.secure, self.lifetime_s = now, secure, lifetime_s
        self._revoked = RevokedSessions(ledger, now)

    # ------------------------------------------------------------------ the cookie's value

    def issue(self, role: str) -> str:
        """A new session for `role`: `id.role.expires.signature`."""
        payload = f"{secrets.token_urlsafe(18)}.{role}.{int(self._now() + self.lifetime_s)}"
        return f"{payload}.{self._sign(payload)}"

    def role_of(self, value: str) -> str | None:
        """The session's role; None when forged, expired or revoked."""
        session_id = self._verified_id(value)
        if session_id is None or self._revoked.contains(session_id):
            return None
        return value.split(".")[1]

    def revoke(self, value: str) -> None:
        session_id = self._verified_id(value, allow_expired=True)
        if session_id is not None:
            self._revoked.add(session_id)

    def _verified_id(self, value: str, allow_expired: bool = False) -> str | None:
        parts = value.split(".")
        if len(parts) != 4 or parts[1] not in ROLES or not parts[2].isdigit():
            return None
        if not hmac.compare_digest(parts[3].encode(), self._sign(".".join(parts[:3])).encode()):
            return None
        if not allow_expired and int(parts[2]) <= self._now():
            return None
        return parts[0]

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, b"session\0" + payload.encode(), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------ requests and responses

    def cookie(self, request: Request) -> str | None:
        return request.cookies.get(SESSION_COOKIE)

    def csrf_token(self, request: Request) -> str:
        """Per session (per process key without one: the open mode has no login)."""
        session_id = (self.cookie(request) or "").split(".")[0]
        return hmac.new(self._key, b"csrf\0" + session_id.encode(), hashlib.sha256).hexdigest()

    def set_cookie(self, response: Response, request: Request, value: str) -> None:
        response.set_cookie(
            SESSION_COOKIE, value, max_age=int(self.lifetime_s), path=cookie_path(request), **self._flags(request)
        )

    def clear_cookie(self, response: Response, request: Request) -> None:
        response.delete_cookie(SESSION_COOKIE, path=cookie_path(request), **self._flags(request))

    def _flags(self, request: Request) -> dict:
        secure = self.secure or request.url.scheme == "https"
        return {"secure": secure, "httponly": True, "samesite": "strict"}


def cookie_path(request: Request) -> str:
    return request.scope.get("root_path") or "/"


class RevokedSessions:
    """Revoked session ids: this process's at once, other processes' from `session-revoked` ledger
    events, read at most every REVOKED_REFRESH_S; events older than a session's lifetime are pruned."""

    def __init__(self, ledger, now: Callable[[], float]):
        self._ledger, self._now = ledger, now
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._read_at: float | None = None

    def add(self, session_id: str) -> None:
        with self._lock:
            self._ids.add(session_id)
        if self._ledger is None:
            return
        try:
            self._ledger.add_event(REVOKED_EVENT, detail=session_id)
            self._ledger.prune_events(self._ledger.db_now() - SESSION_SECONDS, kinds=[REVOKED_EVENT])
        except RepageError as exc:  # revoked here; the other processes learn it when the ledger is back
            log.warning("session revocation not shared: %s", exc)

    def contains(self, session_id: str) -> bool:
        self._refresh()
        with self._lock:
            return session_id in self._ids

    def _refresh(self) -> None:
        now = self._now()
        if self._ledger is None or (self._read_at is not None and now - self._read_at < REVOKED_REFRESH_S):
            return
        self._read_at = now
        try:
            events = self._ledger.events(kinds=[REVOKED_EVENT])
        except RepageError:
            return  # the ids this process revoked still hold
        with self._lock:
            self._ids.update(e.detail for e in events if e.detail)

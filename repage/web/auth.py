"""Who may call what: bearer tokens (read, admin), the dashboard's login cookie and its CSRF
guard, and the rule that an unauthenticated service binds to loopback only (docs/design.md §6)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from urllib.parse import parse_qs, urlsplit

from fastapi import HTTPException, Request
from pydantic import SecretStr

from repage.config import Settings
from repage.errors import ConfigError

MAX_FORM_BYTES = 4096
LOOPBACK_NAMES = frozenset({"localhost"})
SESSION_COOKIE = "repage_session"  # the dashboard's login cookie: HttpOnly, SameSite=Strict, holds the token


# --------------------------------------------------------------------------- auth


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, host: str, insecure_local: bool) -> None:
    """Refuse to serve without both tokens unless bound to loopback with --insecure-local."""
    if settings.read_token and settings.admin_token:
        return
    if not insecure_local:
        raise ConfigError(
            "repage serve needs REPAGE_READ_TOKEN and REPAGE_ADMIN_TOKEN "
            "(or --insecure-local on 127.0.0.1 for a local trial)"
        )
    if not is_loopback(host):
        raise ConfigError(f"--insecure-local serves without tokens, so only on loopback: --host {host} is not")


class BearerAuth:
    """Read vs admin bearer tokens, compared in constant time."""

    def __init__(self, read_token: SecretStr | None, admin_token: SecretStr | None, *, open_access: bool = False):
        self._read = read_token.get_secret_value().encode() if read_token else None
        self._admin = admin_token.get_secret_value().encode() if admin_token else None
        self.open = open_access and not (self._read or self._admin)

    def role(self, request: Request) -> str:
        if self.open:
            return "admin"
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        role = self.role_of(token.strip())
        if role is None:
            raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
        return role

    def role_of(self, token: str) -> str | None:
        """The role a token grants (a bearer token or the dashboard's session cookie): admin, read or None."""
        given = token.encode()
        # Both comparisons always run: the time taken does not tell which token was close.
        is_admin = self._admin is not None and secrets.compare_digest(given, self._admin)
        is_read = self._read is not None and secrets.compare_digest(given, self._read)
        return "admin" if is_admin else "read" if is_read else None

    def read(self, request: Request) -> str:
        """Read endpoints also take the dashboard's session cookie (repage/dashboard.py); admin
        endpoints do not: a cookie is sent by the browser on its own, so it needs a CSRF check."""
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie and not self.open and "authorization" not in request.headers:
            role = self.role_of(cookie)
            if role is None:
                raise HTTPException(401, "invalid session: log in again", headers={"WWW-Authenticate": "Bearer"})
            return role
        return self.role(request)

    def admin(self, request: Request) -> str:
        if self.role(request) != "admin":
            raise HTTPException(403, "this endpoint needs the admin token")
        return "admin"


class Sessions:
    """Login cookie and CSRF tokens on top of the service's BearerAuth."""

    def __init__(self, auth: BearerAuth, admin: SecretStr | None):
        self.auth = auth
        # Derived from the admin token so that every service process issues and accepts the same
        # tokens; a local trial without tokens gets a key of its own.
        self._key = (
            hashlib.sha256(b"repage-dashboard-csrf\0" + admin.get_secret_value().encode()).digest()
            if admin
            else secrets.token_bytes(32)
        )

    def role(self, request: Request) -> str | None:
        """The caller's role (bearer token or cookie), None when it has neither."""
        try:
            return self.auth.read(request)
        except HTTPException as exc:
            if exc.status_code == 401:
                return None
            raise

    def csrf_token(self, request: Request) -> str:
        session = request.cookies.get(SESSION_COOKIE, "")
        return hmac.new(self._key, b"csrf\0" + session.encode(), hashlib.sha256).hexdigest()

    def require_admin_action(self, request: Request, form: dict[str, str]) -> None:
        """Admin bearer token (not sent by a browser on its own: no CSRF), or the cookie + CSRF token."""
        if "authorization" in request.headers:
            self.auth.admin(request)
            return
        role = self.role(request)
        if role is None:
            raise HTTPException(401, "log in first", headers={"WWW-Authenticate": "Bearer"})
        if role != "admin":
            raise HTTPException(403, "pause and resume need the admin token")
        if not same_origin(request):
            raise HTTPException(403, "cross-site request refused")
        supplied = request.headers.get("x-csrf-token") or form.get("csrf_token", "")
        if not hmac.compare_digest(supplied.encode(), self.csrf_token(request).encode()):
            raise HTTPException(403, "missing or wrong CSRF token: reload the dashboard")


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another origin. Sec-Fetch-Site (sent by
    current browsers, not settable by a page) decides; else Origin, when present, must be ours."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    # "null" (sandboxed frames, file: pages) has no netloc and is refused too
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


async def read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form (login, buttons): first value per field; no multipart."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, "form too large")
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    try:
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
    except UnicodeDecodeError:
        raise HTTPException(400, "form is not UTF-8") from None

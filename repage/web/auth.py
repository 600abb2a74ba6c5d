"""Who may call what: bearer tokens (read, admin), throttled guessing, the dashboard's admin
actions and their CSRF guard, the open mode's guards, and the rule that an unauthenticated
service binds to loopback only (docs/design.md §6.5, §6.6)."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
from urllib.parse import parse_qs, urlsplit

from fastapi import HTTPException, Request
from pydantic import SecretStr

from repage.config import Settings
from repage.errors import ConfigError
from repage.web.guard import AuthThrottle, client_address
from repage.web.sessions import Sessions

log = logging.getLogger("repage.web.auth")

MAX_FORM_BYTES = 4096
MIN_TOKEN_CHARS = 32  # docs/design.md §6.6: a token is a key, not a password
LOOPBACK_NAMES = frozenset({"localhost"})
# What a cross-site <form> (or a no-cors fetch) can send without a CORS preflight.
SIMPLE_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
TOKEN_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


# --------------------------------------------------------------------------- exposure and token strength


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, host: str, insecure_local: bool) -> None:
    """Refuse to serve without both tokens unless bound to loopback with --insecure-local, and
    refuse weak tokens whenever tokens are given (docs/design.md §6.6)."""
    check_token_strength(settings.read_token, settings.admin_token)
    if settings.read_token and settings.admin_token:
        return
    if not insecure_local:
        raise ConfigError(
            "repage serve needs REPAGE_READ_TOKEN and REPAGE_ADMIN_TOKEN "
            "(or --insecure-local on 127.0.0.1 for a local trial)"
        )
    if not is_loopback(host):
        raise ConfigError(f"--insecure-local serves without tokens, so only on loopback: --host {host} is not")


def check_token_strength(read: SecretStr | None, admin: SecretStr | None) -> None:
    """At least MIN_TOKEN_CHARS characters each, and two different tokens (else every reader is an admin)."""
    for name, token in (("REPAGE_READ_TOKEN", read), ("REPAGE_ADMIN_TOKEN", admin)):
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ConfigError(f"{name} is shorter than {MIN_TOKEN_CHARS} characters: {TOKEN_HINT}")
    if read is not None and admin is not None:
        if secrets.compare_digest(read.get_secret_value().encode(), admin.get_secret_value().encode()):
            raise ConfigError(
                f"REPAGE_READ_TOKEN equals REPAGE_ADMIN_TOKEN: every reader would be an admin; {TOKEN_HINT}"
            )


# --------------------------------------------------------------------------- bearer tokens


class BearerAuth:
    """Read vs admin bearer tokens, compared in constant time; failures throttled per address."""

    def __init__(
        self,
        read_token: SecretStr | None,
        admin_token: SecretStr | None,
        *,
        open_access: bool = False,
        throttle: AuthThrottle | None = None,
        sessions: Sessions | None = None,
    ):
        self._read = read_token.get_secret_value().encode() if read_token else None
        self._admin = admin_token.get_secret_value().encode() if admin_token else None
        self.open = open_access and not (self._read or self._admin)
        self.throttle = throttle or AuthThrottle()
        self.sessions = sessions or Sessions(read_token, admin_token)

    def role(self, request: Request) -> str:
        if self.open:
            return "admin"
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        role = self.checked_role(request, token.strip(), "bearer")
        if role is None:
            raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
        return role

    def checked_role(self, request: Request, token: str, kind: str) -> str | None:
        """role_of behind the per-address throttle: 429 once an address failed too often, and a
        failure recorded (never the token) when the token is wrong."""
        address = client_address(request)
        self.throttle.check(address)
        role = self.role_of(token)
        if role is None:
            self.throttle.failed(address, kind)
            log.warning("failed %s authentication from %s", kind, address)
        return role

    def role_of(self, token: str) -> str | None:
        """The role a token grants: admin, read or None."""
        given = token.encode()
        # Both comparisons always run: the time taken does not tell which token was close.
        is_admin = self._admin is not None and secrets.compare_digest(given, self._admin)
        is_read = self._read is not None and secrets.compare_digest(given, self._read)
        return "admin" if is_admin else "read" if is_read else None

    def read(self, request: Request) -> str:
        """Read endpoints also take the dashboard's session cookie (repage/web/sessions.py); admin
        endpoints do not: a cookie is sent by the browser on its own, so it needs a CSRF check."""
        cookie = self.sessions.cookie(request)
        if cookie and not self.open and "authorization" not in request.headers:
            role = self.sessions.role_of(cookie)
            if role is None:
                raise HTTPException(
                    401, "session expired or ended: log in again", headers={"WWW-Authenticate": "Bearer"}
                )
            return role
        return self.role(request)

    def admin(self, request: Request) -> str:
        if self.open:
            refuse_cross_site(request)
            return "admin"
        if self.role(request) != "admin":
            raise HTTPException(403, "this endpoint needs the admin token")
        return "admin"

    def session_role(self, request: Request) -> str | None:
        """The caller's role (bearer token or cookie), None when it has neither."""
        try:
            return self.read(request)
        except HTTPException as exc:
            if exc.status_code == 401:
                return None
            raise

    def require_admin_action(self, request: Request, form: dict[str, str]) -> None:
        """Admin bearer token (not sent by a browser on its own: no CSRF), or the cookie + CSRF token."""
        if "authorization" in request.headers:
            self.admin(request)
            return
        role = self.session_role(request)
        if role is None:
            raise HTTPException(401, "log in first", headers={"WWW-Authenticate": "Bearer"})
        if role != "admin":
            raise HTTPException(403, "pause and resume need the admin token")
        if not same_origin(request):
            raise HTTPException(403, "cross-site request refused")
        supplied = request.headers.get("x-csrf-token") or form.get("csrf_token", "")
        if not hmac.compare_digest(supplied.encode(), self.sessions.csrf_token(request).encode()):
            raise HTTPException(403, "missing or wrong CSRF token: reload the dashboard")


def refuse_cross_site(request: Request) -> None:
    """Open mode's admin JSON routes: no cross-site request, and no body type a cross-site form can
    send (JSON or no body forces a CORS preflight, which this app never grants; docs/design.md §6.6)."""
    if not same_origin(request):
        raise HTTPException(403, "cross-site request refused")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in SIMPLE_TYPES:
        raise HTTPException(415, "send no body or application/json: form posts are refused")


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another origin. Sec-Fetch-Site (sent by
    current browsers, not settable by a page) decides; else Origin, when present, must be ours."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    # "null" (sandboxed frames, file: pages) has no netloc and is refused too
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


# --------------------------------------------------------------------------- bounded forms


async def read_form(request: Request, limit: int = MAX_FORM_BYTES) -> dict[str, str]:
    """A small urlencoded form (login, buttons): first value per field; no multipart. The body is
    refused by its Content-Length, else cut off while streaming, before it is all read (§6.6)."""
    body = await read_body(request, limit)
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    try:
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
    except UnicodeDecodeError:
        raise HTTPException(400, "form is not UTF-8") from None


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"request body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body over {limit} bytes")
    return bytes(body)

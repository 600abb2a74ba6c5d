"""The one redactor: every output of repage passes through it (docs/design.md §6.1: secrets and
URL passwords show as `***`).

Standard library only, so every layer may use it (the pure domain excepted: it prints nothing).

- `redact_url(url)`: one URL with its user info masked (`scheme://***@host:port/path`) and the
  values of secret-looking query parameters (`token=`, `key=`, `X-Amz-Signature=`, ...) masked.
  A password may hold `/`, `@`, `:` unencoded (SQLAlchemy and people write them so): the user
  info runs to the LAST `@`, not to the first `/`. A URL whose host part cannot be read is masked
  whole (`scheme://***`).
- `redact_text(text)`: every URL in free text as above, plus `password=...`-style pairs.
- `Redactor`: also replaces known secret values anywhere in a text (and their URL-quoted,
  unquoted and JSON-escaped forms, and the fragments a parser makes of them at `/ @ :`).
  `Redactor.from_settings(settings)` knows every secret setting and URL password.
- `install(redactor)` makes it the process's redactor (`active()`) and puts `LOG_FILTER` on the
  repage loggers and on the handlers that print (root's, `logging.lastResort`, uvicorn's).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import traceback
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus

MASK = "***"
# Shorter strings are no credential, and replacing them would mangle every message.
MIN_SECRET = 4

# Settings whose whole value is a secret (also when they come as plain strings: env, toml).
SECRET_FIELDS = frozenset(
    {"milvus_token", "aws_access_key_id", "aws_secret_access_key", "read_token", "admin_token", "reprocess_token"}
)
SECRET_NAME = re.compile(r"(?i)token|secret|passw|pwd|credential|signature|access_key|api_?key|private_?key")
# Query parameters whose values are masked: `key=`, `sig=`, `X-Amz-Credential=`, `X-Amz-Security-Token=`...
SECRET_PARAM = re.compile(r"(?i)token|secret|passw|pwd|credential|sig|key|auth")

_URL_START = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)?://(?P<rest>.*)\Z", re.S)
# A URL in free text: up to whitespace, a quote or an angle bracket.
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])(?:[A-Za-z][A-Za-z0-9+.-]*)?://[^\s'\"<>`]*")
# host[:port]: a name or an IPv6 literal, an optional numeric port.
_HOST_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.%\w]*\]|[^\s/?#@\[\]:]*)(?::\d*)?\Z")
# `password=secret`, `X-Amz-Signature=...` outside URLs (driver messages, conninfo). Only `=`:
# a colon ends many a plain sentence ("check the credentials: set ...").
_PAIR = re.compile(
    r"(?i)(?P<name>\b[\w.-]*(?:token|secret|passw(?:or)?d|pwd|signature|credential|api_?key"
    r"|access_?key|private_?key)[\w-]*)(?P<sep>\s*=\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s&,;)'\"]+)"
)
_QUERY_PAIR = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#?]*)=(?P<value>[^&;#]*)")
_FRAGMENT_SPLIT = re.compile(r"[/@:?#&=\s]+")
# A user name, not a token: masked in its URL, but not looked for everywhere ("repage" would go).
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


# ---------------------------------------------------------------- URLs


def _split(rest: str) -> tuple[str | None, str, str]:
    """`rest` (what follows `scheme://`) as (user info or None, host[:port], path+query+fragment).

    Raises ValueError when the host part cannot be read.
    """
    if rest.startswith("/") or not rest:  # file:///..., sqlite:///...: no authority, so no user info
        return None, "", rest
    at = rest.rfind("@")
    userinfo, after = (rest[:at], rest[at + 1 :]) if at >= 0 else (None, rest)
    end = min((i for i in (after.find(c) for c in "/?#") if i >= 0), default=len(after))
    host, tail = after[:end], after[end:]
    if not _HOST_PORT.match(host):
        raise ValueError("unreadable host part")
    return userinfo, host, tail


def _mask_query(tail: str) -> str:
    def one(m: re.Match) -> str:
        secret = SECRET_PARAM.search(unquote(m["name"])) and m["value"]
        return f"{m['lead']}{m['name']}={MASK}" if secret else m.group(0)

    return _QUERY_PAIR.sub(one, tail)


def redact_url(url: str) -> str:
    """`url` with its user info and secret query values masked; a URL whose host part cannot
    be read is masked whole. Text that is no URL is returned as `redact_text` gives it."""
    m = _URL_START.match(url)
    if not m:
        return redact_text(url)
    scheme = m["scheme"] or ""
    try:
        userinfo, host, tail = _split(m["rest"])
    except ValueError:
        return f"{scheme}://{MASK}"
    return f"{scheme}://" + (f"{MASK}@" if userinfo is not None else "") + host + _mask_query(tail)


def url_secrets(url: str) -> list[str]:
    """The secrets a URL carries: its password (or a user-only token), secret query values,
    and what a parser that stops at the first `/` would take for a password or port."""
    m = _URL_START.match(url)
    if not m:
        return []
    rest, found = m["rest"], []
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    port = authority.rsplit(":", 1)[1] if ":" in authority and "@" not in authority else ""
    if port and not port.isdigit() and not authority.startswith("["):  # `user:pa/ss@host`: host `user`, port `pa`
        found.append(port)
    try:
        userinfo, _, tail = _split(rest)
    except ValueError:
        userinfo, tail = (rest[: rest.rfind("@")] if "@" in rest else None), rest
    if userinfo and ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    elif userinfo and not _USER_NAME.fullmatch(userinfo):  # `https://TOKEN@host`; `repage@host` is a user
        found.append(userinfo)
    query = "?" + tail.split("?", 1)[1] if "?" in tail else ""  # raw values: `_forms` adds the decoded ones
    found += [m["value"] for m in _QUERY_PAIR.finditer(query) if m["value"] and SECRET_PARAM.search(unquote(m["name"]))]
    return found


def _url_in_text(m: re.Match) -> str:
    token = m.group(0)
    core = token.rstrip(".,;:!?)]}")  # the sentence's punctuation, not the URL's
    if core.startswith("://") and "@" not in core:  # `http(s)://host:port` in a help text: no URL
        return token
    return redact_url(core) + token[len(core) :]


def redact_text(text: str) -> str:
    """Every URL in `text` through `redact_url`, and `password=...`-style pairs masked."""
    text = _URL_IN_TEXT.sub(_url_in_text, text)
    return _PAIR.sub(_pair, text)


def _pair(m: re.Match) -> str:
    value = m["value"]
    end = value[len(value.rstrip(".:!?")) :] if value[:1] not in "'\"" else ""  # the sentence's full stop
    return f"{m['name']}{m['sep']}{MASK}{end}"


# ---------------------------------------------------------------- known secrets


def _plain(value: Any) -> Any:
    """A pydantic SecretStr's value (duck-typed: this module imports no third-party library)."""
    get = getattr(value, "get_secret_value", None)
    return get() if callable(get) else value


def _forms(secret: str) -> set[str]:
    """The ways a secret can show up in a message: as given, URL-quoted or unquoted, JSON-escaped,
    and in pieces where a URL parser cut it (`s3cr/et@x` -> `s3cr`, `et@x`)."""
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        unquote(secret),
        unquote_plus(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    for form in list(forms):
        pieces = [p for p in _FRAGMENT_SPLIT.split(form) if p]
        forms.update(pieces)
        forms.update(form[m.end() :] for m in _FRAGMENT_SPLIT.finditer(form))  # what follows a `/`, `@`, `:`
        forms.update(form[: m.start()] for m in _FRAGMENT_SPLIT.finditer(form))
    return {f.strip() for f in forms if len(f.strip()) >= MIN_SECRET}


class Redactor:
    """Masks every known secret (in all its forms) and every URL's credentials in a text.

    Callable on text; `value()` walks a JSON-like document; its repr never shows a secret.
    """

    def __init__(self, *secrets: str | None):
        self._secrets = tuple(dict.fromkeys(s for s in secrets if isinstance(s, str) and s))
        forms = set().union(*(_forms(s) for s in self._secrets)) if self._secrets else set()
        # longest first: a secret's piece must not cut a longer form in two before it is matched
        ordered = sorted(forms, key=lambda f: (-len(f), f))
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Redactor:
        """From setting name -> value (SecretStr or str): secret settings whole, URLs' passwords."""
        secrets: list[str] = []
        for name, raw in values.items():
            value = _plain(raw)
            if not isinstance(value, str) or not value:
                continue
            if name in SECRET_FIELDS or value is not raw or SECRET_NAME.search(name):
                secrets.append(value)
            elif "://" in value:
                secrets += url_secrets(value)
        return cls(*secrets)

    @classmethod
    def from_settings(cls, settings: Any) -> Redactor:
        """Every secret of a `repage.config.Settings` (read off its fields, SecretStr or URL)."""
        return cls.from_values(dict(vars(settings)))

    def merged(self, other: Redactor) -> Redactor:
        return Redactor(*self._secrets, *other._secrets)

    def __call__(self, text: Any) -> str:
        text = text if isinstance(text, str) else str(text)
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return redact_text(text)

    def value(self, data: Any) -> Any:
        """A JSON-like document (dicts, lists, strings) with every string value redacted. Keys are
        repage's own names (settings, stores, document ids): a secret's piece that happens to be a
        word (`.../secret@...`) must not turn `aws_secret_access_key` into `aws_***_access_key`."""
        if isinstance(data, str):
            return self(data)
        if isinstance(data, Mapping):
            return {k: self.value(v) for k, v in data.items()}
        if isinstance(data, list):
            return [self.value(v) for v in data]
        if isinstance(data, tuple):
            return tuple(self.value(v) for v in data)
        return data

    def settings(self, settings: Any) -> dict[str, Any]:
        """`settings` as a plain dict for `doctor` and `--json`: secret settings `***` (None when
        unset), every other value redacted."""
        shown = settings.model_dump(mode="json")
        for name, value in vars(settings).items():
            if _plain(value) is not value or name in SECRET_FIELDS:
                shown[name] = MASK if value is not None else None
        return self.value(shown)

    def exception(self, exc: BaseException) -> str:
        """The traceback of `exc` with its chained causes, redacted (for REPAGE_DEBUG)."""
        return self("".join(traceback.format_exception(exc)))

    def __repr__(self) -> str:
        return f"Redactor({len(self._secrets)} secrets)"


# ---------------------------------------------------------------- the process's redactor and logging

_active = Redactor()


def active() -> Redactor:
    """The process's redactor: what `install` was given, merged."""
    return _active


class RedactingFilter(logging.Filter):
    """Redacts a record's message, arguments, traceback and stack before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact = active()
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(redact, a) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: _redact_arg(redact, v) for k, v in record.args.items()}
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the format: logging reports it
            return True
        # The arguments one by one first: a formatter may need them (uvicorn's access log unpacks
        # them); the whole line too, for a secret in the format or split across arguments.
        if (shown := redact(message)) != message:
            record.msg, record.args = shown, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _redact_arg(redact: Redactor, arg: Any) -> Any:
    """An argument whose text shows a secret becomes that text redacted (an exception, a URL);
    any other stays as it is, for its format (`%d`, `%.2f`)."""
    if arg is None or isinstance(arg, (bool, int, float)):
        return arg
    try:
        text = arg if isinstance(arg, str) else str(arg)
    except Exception:  # noqa: BLE001 (a broken __str__: logging reports it as it would)
        return arg
    shown = redact(text)
    return arg if shown == text else shown


LOG_FILTER = RedactingFilter()


def attach_log_filter() -> None:
    """Put `LOG_FILTER` on root and the repage loggers, and on every handler configured so far
    (root's, uvicorn's, `logging.lastResort` which prints when nothing is configured). Handler
    filters see the records every logger propagates; logger filters only their own."""
    loggers: list[logging.Logger] = [logging.getLogger(), logging.getLogger("repage")]
    loggers += [lg for name, lg in list(logging.Logger.manager.loggerDict.items()) if isinstance(lg, logging.Logger)]
    targets: list[logging.Filterer] = [lg for lg in loggers if lg.name == "root" or lg.name.startswith("repage")]
    targets += [h for lg in loggers for h in lg.handlers]
    if logging.lastResort is not None:
        targets.append(logging.lastResort)
    for target in targets:
        if LOG_FILTER not in target.filters:
            target.addFilter(LOG_FILTER)


def install(redactor: Redactor) -> Redactor:
    """Make `redactor` (merged with the one installed before: a secret once known stays masked)
    the process's redactor, and redact logging with it. Returns the installed redactor."""
    global _active
    _active = _active.merged(redactor)
    attach_log_filter()
    return _active


def print_exception(exc: BaseException) -> None:
    """The traceback of an exception nothing else handled, redacted, on stderr."""
    sys.stderr.write(active().exception(exc))
    sys.stderr.flush()


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    sys.stderr.write(f"Exception in thread {name}:\n")
    print_exception(args.exc_value)


def redact_uncaught_in_threads() -> None:
    """A thread's uncaught exception prints its traceback redacted (the default prints it raw)."""
    threading.excepthook = _thread_excepthook

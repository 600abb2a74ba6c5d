"""Request templates of the reprocess HTTP API (docs/design.md §6.2): URL path templates with
`{name}` placeholders, a JSON body whose strings may hold them, and dotted fields of a JSON reply.
Pure: strings in, strings out.

A path template is a relative path on the app's base URL: it starts with one `/`, names no scheme or
host, takes no `..` step, and holds only plain `{name}` placeholders from a fixed set. Every value
substituted into a path is quoted as one path segment (`/`, `?`, `#` and `%` escaped), so an id
cannot add a step, a query or a fragment; the document id also passes `check_document_id` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from repage.errors import BadInput

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_BRACES = re.compile(r"[{}]")


def placeholders(template: str) -> list[str]:
    """The `{name}` fields of a template, in order; ValueError for a stray brace or a field that is
    not a plain name (no `{a.b}`, `{a[0]}`, `{a!r}`, `{a:>5}`)."""
    if _BRACES.search(_PLACEHOLDER.sub("", template)):
        raise ValueError(f"template {template!r} has an unmatched '{{' or '}}'")
    names = _PLACEHOLDER.findall(template)
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"template {template!r}: {{{name}}} is not a plain {{name}} placeholder")
    return names


def check_path_template(template: str, allowed: Iterable[str], required: Iterable[str]) -> str:
    """The template, or ValueError saying what is wrong with it (`required`: at least one of them, if any)."""
    if not template.startswith("/") or template.startswith("//") or "://" in template:
        raise ValueError(f"path {template!r} must start with a single '/': a path on the reprocess URL, no host")
    if any(c.isspace() or ord(c) < 32 or c == "\\" for c in template):
        raise ValueError(f"path {template!r} holds whitespace, a control character or a backslash")
    if any(step in ("..", ".") for step in template.split("?", 1)[0].split("/")):
        raise ValueError(f"path {template!r} takes a '.' or '..' step")
    names, allowed = placeholders(template), set(allowed)
    if unknown := sorted(set(names) - allowed):
        raise ValueError(f"path {template!r}: unknown placeholder {{{unknown[0]}}}; use {_listed(allowed)}")
    required = set(required)
    if required and not required & set(names):
        raise ValueError(f"path {template!r} must hold {_listed(required, ' or ')}")
    return template


def render_path(template: str, values: Mapping[str, str]) -> str:
    """The template with every placeholder replaced by its value, quoted as one path segment.
    A value that is empty, `.` or `..` (a path step `quote` keeps) is bad input of its document."""
    return _PLACEHOLDER.sub(lambda m: quote(_segment(m.group(1), str(values[m.group(1)])), safe=""), template)


def _segment(name: str, value: str) -> str:
    if value in ("", ".", ".."):
        raise BadInput(f"{name} {value!r} cannot be a URL path segment: it is empty, '.' or '..'")
    return value


def render_body(body: Any, values: Mapping[str, str]) -> Any:
    """A JSON body template with its strings' placeholders filled (raw, JSON encodes them)."""
    if isinstance(body, str):
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), body)
    if isinstance(body, Mapping):
        return {key: render_body(value, values) for key, value in body.items()}
    if isinstance(body, list | tuple):
        return [render_body(value, values) for value in body]
    return body


def body_placeholders(body: Any) -> set[str]:
    """Every placeholder in a JSON body template's strings (ValueError as `placeholders`)."""
    if isinstance(body, str):
        return set(placeholders(body))
    if isinstance(body, Mapping):
        return set().union(*(body_placeholders(v) for v in body.values()))
    if isinstance(body, list | tuple):
        return set().union(*(body_placeholders(v) for v in body))
    return set()


def reply_field(reply: Mapping[str, Any], dotted: str) -> Any:
    """`a.b.c` of a JSON reply; None where a step is missing or not an object."""
    value: Any = reply
    for key in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _listed(names: Iterable[str], sep: str = ", ") -> str:
    return sep.join(f"{{{n}}}" for n in sorted(names))

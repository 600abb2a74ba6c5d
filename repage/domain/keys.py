"""Image-key formats of docs/design.md §1.4: parse a bucket key into (page, index), build canonical keys.

Pure: no I/O, standard library only. `parse_image_key` never raises and never guesses:
anything it cannot read with certainty comes back as fmt='unknown', page=None and a
reason, so the caller falls back to the `pdf` path instead of writing a wrong page.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote

from repage.errors import InvalidDocumentId

__all__ = [
    "EXTENSIONS",
    "MAX_INT",
    "ParsedKey",
    "canonical_image_key",
    "compile_patterns",
    "docling_image_key",
    "image_prefix",
    "legacy_image_key",
    "legacy_image_name",
    "legacy_sort_index",
    "parse_image_key",
    "source_key_candidates",
    "PDF_IMAGE_PREFIX",
    "pdf_image_ref",
    "is_pdf_image_ref",
    "parse_pdf_image_ref",
]

EXTENSIONS = ("png", "jpg", "jpeg", "gif", "bmp", "webp")
# No document has a million pages or images; a bigger number is garbage, not a page.
MAX_INT = 1_000_000
# S3 keys are at most 1024 bytes; allow room for URL-encoding, refuse absurd input early.
MAX_KEY_CHARS = 4096

Fmt = Literal["canonical", "legacy", "docling", "custom", "unknown"]

# ASCII digits only (\d also matches e.g. Arabic-Indic digits, which int() accepts) and
# no leading zeros: nothing ever wrote "05", and rejecting it keeps parse/build exact.
_NUM = r"(?:0|[1-9][0-9]*)"
_EXT = r"(?P<ext>(?i:png|jpe?g|gif|bmp|webp))"
_CANONICAL = re.compile(rf"(?P<page>{_NUM})_(?P<index>{_NUM})\.{_EXT}")
# Greedy basename: page and sub cannot contain '-' or '.', so the match is anchored on
# the last two '-' fields, i.e. parsed from the right whatever the basename contains.
_LEGACY = re.compile(
    rf"(?P<index>{_NUM})_(?P<basename>.+)-(?P<page>{_NUM})-(?P<sub>full|{_NUM})\.{_EXT}",
    re.DOTALL,
)
_DOCLING = re.compile(rf"(?P<index>{_NUM})_docling_image\.{_EXT}")
# User patterns may zero-pad (`page_007.png`): there leading zeros are allowed.
_PADDED = re.compile(r"[0-9]+")
_NUM_RE = re.compile(_NUM)
_IMAGES = "/images/"


@dataclass(frozen=True)
class ParsedKey:
    """What an image key says. `page` is 0-based; None means the key does not tell."""

    fmt: Fmt
    dataset_id: str = ""
    document_id: str = ""
    index: int | None = None
    page: int | None = None
    ext: str = ""
    basename: str | None = None  # legacy only: the source file name the pipeline used
    sub: int | Literal["full"] | None = None  # legacy only: the n of `-{page}-{n}`
    reason: str = ""  # set whenever page is None: why the key gives no page

    @property
    def has_page(self) -> bool:
        return self.page is not None


def _unknown(reason: str) -> ParsedKey:
    return ParsedKey(fmt="unknown", reason=reason)


def _int(text: str | None, padded: bool = False) -> int | None:
    """A page/index group as an int, or None if absent, not a plain number or too big."""
    if text is None or not (_PADDED if padded else _NUM_RE).fullmatch(text):
        return None
    text = text.lstrip("0") or "0"
    # Length first: int() of a huge digit string is slow and, past 4300 digits, raises.
    return int(text) if len(text) <= 7 and int(text) <= MAX_INT else None


def _split(key: str) -> tuple[str, str, str] | str:
    """(dataset_id, document_id, name) from the right, or the reason it is no image key."""
    head, sep, name = key.rpartition(_IMAGES)
    if not sep:
        return f"key {key!r} is not under '{_IMAGES}'"
    if not name or "/" in name:
        return f"key {key!r} has no plain file name after '{_IMAGES}'"
    dataset_id, _, document_id = head.rpartition("/")
    if not dataset_id or not document_id:
        return f"key {key!r} lacks a dataset_id/document_id before '{_IMAGES}'"
    try:
        check_document_id(document_id)  # a key no builder makes is no image key (docs/design.md §6.6)
    except InvalidDocumentId as exc:
        return f"key {key!r}: {exc}"
    return dataset_id, document_id, name


def _from_custom(m: re.Match[str], key: str) -> ParsedKey | str:
    groups, where = m.groupdict(), f"pattern {m.re.pattern!r}"
    ints = {g: _int(groups.get(g), padded=True) for g in ("page", "index")}
    for g, value in ints.items():
        if value is None and groups.get(g) is not None:
            return f"{where}: {g} {groups[g][:20]!r} is not an integer 0..{MAX_INT}"
    if ints["page"] is None and ints["index"] is None:
        return f"{where} matched without a page or index"
    split = _split(key)
    ds, doc = (split[0], split[1]) if isinstance(split, tuple) else ("", "")
    return ParsedKey(
        fmt="custom",
        dataset_id=groups.get("dataset_id") or ds,
        document_id=groups.get("document_id") or doc,
        index=ints["index"],
        page=ints["page"],
        ext=groups.get("ext") or "",
        reason="" if ints["page"] is not None else f"{where} gives no page",
    )


def _ints(m: re.Match[str], *names: str) -> dict[str, int | None] | str:
    """The named integer groups of a match, or the reason one is out of range."""
    values = {name: _int(m[name]) for name in names}
    for name, value in values.items():
        if value is None:
            return f"{name} {m[name][:20]!r} in {m.string!r} is not an integer 0..{MAX_INT}"
    return values


def _from_builtin(ds: str, doc: str, name: str) -> ParsedKey | str | None:
    """Built-in formats are disjoint: legacy needs two '-', the others have none."""
    if m := _CANONICAL.fullmatch(name):
        v = _ints(m, "page", "index")
        if isinstance(v, str):
            return v
        return ParsedKey("canonical", ds, doc, v["index"], v["page"], m["ext"])
    if m := _LEGACY.fullmatch(name):
        v = _ints(m, "page", "index", *(() if m["sub"] == "full" else ("sub",)))
        if isinstance(v, str):
            return v
        sub: int | Literal["full"] | None = v.get("sub", "full")
        return ParsedKey("legacy", ds, doc, v["index"], v["page"], m["ext"], m["basename"], sub)
    if m := _DOCLING.fullmatch(name):
        v = _ints(m, "index")
        if isinstance(v, str):
            return v
        why = "Docling image keys carry no page"
        return ParsedKey("docling", ds, doc, v["index"], None, m["ext"], reason=why)
    return None


def _parse_form(key: str, patterns: Sequence[re.Pattern[str]]) -> ParsedKey:
    reasons = []
    for pattern in patterns:
        if m := pattern.fullmatch(key):
            result = _from_custom(m, key)
            if isinstance(result, ParsedKey):
                return result
            reasons.append(result)
    split = _split(key)
    if isinstance(split, str):
        return _unknown("; ".join([*reasons, split]))
    parsed = _from_builtin(*split)
    if isinstance(parsed, ParsedKey):
        return parsed
    if isinstance(parsed, str):
        return _unknown("; ".join([*reasons, parsed]))
    why = (
        f"image name {split[2]!r} matches no known format ({{page}}_{{index}}.ext, "
        f"{{index}}_{{basename}}-{{page}}-{{n|full}}.ext, {{index}}_docling_image.ext; "
        f"integers 0..{MAX_INT} without leading zeros; ext one of {', '.join(EXTENSIONS)})"
    )
    return _unknown("; ".join([*reasons, why]))


def parse_image_key(key: str, *, patterns: Sequence[re.Pattern[str]] = ()) -> ParsedKey:
    """Read page and index from an image key; never raises.

    User `patterns` (from compile_patterns) are matched with fullmatch against the whole
    key before the built-in formats. The raw key is tried first, then its URL-decoded form
    once (a key may be stored with %20); it is never decoded twice.
    """
    if not isinstance(key, str):
        return _unknown(f"key is a {type(key).__name__}, not a string")
    if not key:
        return _unknown("empty key")
    if len(key) > MAX_KEY_CHARS:
        return _unknown(f"key is {len(key)} characters long: not an object key")
    raw = _parse_form(key, patterns)
    decoded = unquote(key)
    if raw.fmt != "unknown" or decoded == key:
        return raw
    second = _parse_form(decoded, patterns)
    if second.fmt != "unknown":
        return second
    return _unknown(f"{raw.reason}; URL-decoded: {second.reason}")


def compile_patterns(strings: Sequence[str]) -> tuple[re.Pattern[str], ...]:
    """Compile user key patterns (repage.toml); ValueError names the first bad one."""
    compiled = []
    for text in strings:
        try:
            pattern = re.compile(text)
        except (re.error, TypeError) as exc:
            raise ValueError(f"image key pattern {text!r} is not a valid regex: {exc}") from exc
        if not {"page", "index"} & set(pattern.groupindex):
            raise ValueError(f"image key pattern {text!r} needs a named group (?P<page>...) or (?P<index>...)")
        compiled.append(pattern)
    return tuple(compiled)


def _check_int(name: str, value: object) -> int:
    # bool is an int subclass; True as a page is a bug upstream, not page 1.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise ValueError(f"{name} must be an integer 0..{MAX_INT}, got {value!r}")
    return value


def _check_ext(ext: str) -> str:
    if not isinstance(ext, str) or ext.lower() not in EXTENSIONS:
        raise ValueError(f"image extension must be one of {', '.join(EXTENSIONS)}, got {ext!r}")
    return ext


def _check_name(what: str, value: str) -> str:
    # A '/' would move the split point parse_image_key relies on.
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"{what} must be a non-empty string without '/', got {value!r}")
    return value


def check_document_id(value: object) -> str:
    """The one rule for a document id that becomes an object key, a URL path segment or a file name
    (docs/design.md §6.6): not empty, not `.` or `..` (a path step, kept by `quote`), no `/`, no
    control character. Raises InvalidDocumentId (a BadInput and a ValueError)."""
    if not isinstance(value, str) or not value or value in (".", ".."):
        raise InvalidDocumentId(f"document_id {value!r} cannot be used in a key or URL: it is empty, '.' or '..'")
    if "/" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidDocumentId(
            f"document_id {value!r} cannot be used in a key or URL: it holds '/' or a control character"
        )
    return value


def image_prefix(dataset_id: str, document_id: str) -> str:
    """The folder holding a document's images: `{dataset_id}/{document_id}/images/`."""
    if not isinstance(dataset_id, str) or not dataset_id:
        raise ValueError(f"dataset_id must be a non-empty string, got {dataset_id!r}")
    return f"{dataset_id}/{check_document_id(document_id)}{_IMAGES}"


def canonical_image_key(dataset_id: str, document_id: str, page: int, index: int, ext: str) -> str:
    """`{dataset_id}/{document_id}/images/{page}_{index}.{ext}`, page 0-based."""
    name = f"{_check_int('page', page)}_{_check_int('index', index)}.{_check_ext(ext)}"
    return image_prefix(dataset_id, document_id) + name


def legacy_image_name(basename: str, page: int, n: int | Literal["full"], ext: str) -> str:
    """The name PyMuPDF4LLM gave an extracted image: `{basename}-{page}-{n}.{ext}`."""
    sub = n if n == "full" else _check_int("n", n)
    return f"{_check_name('basename', basename)}-{_check_int('page', page)}-{sub}.{_check_ext(ext)}"


def legacy_image_key(dataset_id: str, document_id: str, index: int, legacy_name: str) -> str:
    """`{dataset_id}/{document_id}/images/{index}_{legacy_name}` as the old pipeline wrote it."""
    name = f"{_check_int('index', index)}_{_check_name('legacy_name', legacy_name)}"
    return image_prefix(dataset_id, document_id) + name


def docling_image_key(dataset_id: str, document_id: str, index: int) -> str:
    """`{dataset_id}/{document_id}/images/{index}_docling_image.png` (Docling: no page)."""
    return image_prefix(dataset_id, document_id) + f"{_check_int('index', index)}_docling_image.png"


def legacy_sort_index(names: Iterable[str]) -> dict[str, int]:
    """name -> image_index exactly as the old pipeline assigned it: enumerate(sorted(names)).

    The sort is lexicographic on purpose (the bug being reproduced): `doc.pdf-10-0.png`
    gets a lower index than `doc.pdf-2-0.png`. Duplicate names cannot come from one
    extraction directory, so they raise ValueError instead of silently sharing an index.
    """
    ordered = sorted(names)
    dupes = sorted({a for a, b in zip(ordered, ordered[1:]) if a == b})
    if dupes:
        raise ValueError(f"duplicate image names: {dupes[:5]!r}")
    return {name: i for i, name in enumerate(ordered)}


_FIELD = re.compile(r"\{([^{}]*)\}")


def source_key_candidates(template: str, fields: Mapping[str, str]) -> list[str]:
    """Keys to try for a source PDF: the rendered template raw, quoted, unquoted (distinct).

    Only plain `{name}` fields are substituted (no format specs or attribute access,
    so a template from config cannot reach into objects).
    """

    def field(m: re.Match[str]) -> str:
        name = m[1]
        if name not in fields:
            raise ValueError(f"source key template {template!r} needs field {name!r}")
        return str(fields[name])

    raw = _FIELD.sub(field, template)
    candidates = [raw, quote(raw, safe="/"), unquote(raw)]
    return list(dict.fromkeys(candidates))


# An image the pdf path extracted from the source PDF has no bucket key of its own: the
# journal records it as the old_key `pdf:{source_key}#p{page}-{n}`, which no object store
# key starts with in this layout (keys start with a dataset id). verify/rollback/gc must
# never treat it as an object: rollback deletes the upload, gc has nothing to delete.
PDF_IMAGE_PREFIX = "pdf:"


def pdf_image_ref(source_key: str, page: int, n: int) -> str:
    """The journal's old_key for image n of page `page` (0-based) of the source PDF."""
    return f"{PDF_IMAGE_PREFIX}{source_key}#p{_check_int('page', page)}-{_check_int('n', n)}"


def is_pdf_image_ref(key: str | None) -> bool:
    return isinstance(key, str) and key.startswith(PDF_IMAGE_PREFIX)


def parse_pdf_image_ref(key: str) -> tuple[str, int, int] | None:
    """(source_key, page, n) of a `pdf:` old_key, or None when it is not one."""
    if not is_pdf_image_ref(key):
        return None
    source, sep, where = key[len(PDF_IMAGE_PREFIX) :].rpartition("#p")
    page, dash, n = where.partition("-")
    if not sep or not dash or not source:
        return None
    page_no, n_no = _int(page), _int(n)
    return None if page_no is None or n_no is None else (source, page_no, n_no)

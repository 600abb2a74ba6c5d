"""repage.domain.keys: the image-key formats of docs/design.md §1.4, by example and by property."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from repage.domain.keys import (
    EXTENSIONS,
    MAX_INT,
    ParsedKey,
    canonical_image_key,
    compile_patterns,
    docling_image_key,
    image_prefix,
    legacy_image_key,
    legacy_image_name,
    legacy_sort_index,
    parse_image_key,
    source_key_candidates,
)

# --- examples: one per format ---------------------------------------------------------


def test_canonical_example():
    p = parse_image_key("ds1/doc9/images/5_0.png")
    assert p == ParsedKey("canonical", "ds1", "doc9", index=0, page=5, ext="png")
    assert p.has_page


@pytest.mark.parametrize(
    ("name", "index", "page", "basename", "sub"),
    [
        ("0_tmplg9eqtl2.pdf-0-full.png", 0, 0, "tmplg9eqtl2.pdf", "full"),
        ("1_22-1426_Documents_part08of19.pdf-4-1.png", 1, 4, "22-1426_Documents_part08of19.pdf", 1),
        # basenames that themselves end in -N-N: only the last two fields count
        ("3_my file-3-2.pdf-7-0.png", 3, 7, "my file-3-2.pdf", 0),
        ("2_a_b-1-2-3.pdf-11-full.png", 2, 11, "a_b-1-2-3.pdf", "full"),
        ("4_report-2-1-9-2.png", 4, 9, "report-2-1", 2),
        ("5_7_x.pdf-0-0.png", 5, 0, "7_x.pdf", 0),  # index is the leftmost number only
        ("12_docling_image-3-1.png", 12, 3, "docling_image", 1),
        ("0_-1-2-3.png", 0, 2, "-1", 3),
    ],
)
def test_legacy_examples(name, index, page, basename, sub):
    p = parse_image_key(f"ds/doc/images/{name}")
    assert (p.fmt, p.index, p.page, p.basename, p.sub) == ("legacy", index, page, basename, sub)
    assert (p.dataset_id, p.document_id, p.ext) == ("ds", "doc", "png")


def test_docling_has_index_but_no_page():
    p = parse_image_key("ds/doc/images/3_docling_image.png")
    assert (p.fmt, p.index, p.page, p.has_page) == ("docling", 3, None, False)
    assert "no page" in p.reason


@pytest.mark.parametrize("ext", ["PNG", "Jpg", "JPEG", "gif", "BMP", "webp"])
def test_extensions_case_insensitive_and_kept(ext):
    assert parse_image_key(f"d/x/images/1_2.{ext}").ext == ext
    assert parse_image_key(f"d/x/images/0_f.pdf-1-full.{ext}").page == 1


def test_url_encoded_keys():
    # the raw form parses: the encoded basename is kept as stored
    p = parse_image_key("ds/doc/images/1_my%20file.pdf-4-1.png")
    assert (p.page, p.basename) == (4, "my%20file.pdf")
    # only the decoded form parses
    p = parse_image_key("ds%2Fdoc%2Fimages%2F5_1.png")
    assert (p.fmt, p.dataset_id, p.document_id, p.page, p.index) == ("canonical", "ds", "doc", 5, 1)
    # never decoded twice: %252F -> %2F, still no '/images/'
    assert parse_image_key("ds%252Fdoc%252Fimages%252F5_1.png").fmt == "unknown"


def test_document_path_parsed_from_the_right():
    p = parse_image_key("ds/doc/images/x/images/5_0.png")
    assert (p.dataset_id, p.document_id, p.page) == ("ds/doc/images", "x", 5)
    p = parse_image_key("ds/images/images/2_1.png")
    assert (p.dataset_id, p.document_id, p.page, p.index) == ("ds", "images", 2, 1)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "empty"),
        ("5_0.png", "not under"),
        ("images/5_0.png", "not under"),
        ("/images/5_0.png", "dataset_id/document_id"),
        ("doc/images/5_0.png", "dataset_id/document_id"),
        ("ds/doc/images/", "file name"),
        ("ds/doc/images/sub/5_0.png", "file name"),
        ("ds/doc/images/5_0.tiff", "no known format"),
        ("ds/doc/images/5_0.png.bak", "no known format"),
        ("ds/doc/images/-1_0.png", "no known format"),
        ("ds/doc/images/05_0.png", "no known format"),
        ("ds/doc/images/5_-0.png", "no known format"),
        ("ds/doc/images/٣_0.png", "no known format"),  # Arabic-Indic digit
        ("ds/doc/images/1000001_0.png", "not an integer"),
        ("ds/doc/images/0_a-99999999999999999999999-1.png", "not an integer"),
        ("ds/doc/images/0_a-" + "9" * 4000 + "-1.png", "not an integer"),
        ("ds/doc/images/0_f.pdf-3-FULL.png", "no known format"),
        ("ds/doc/images/0_f.pdf-3.png", "no known format"),
        ("ds/doc/images/f.pdf-3-1.png", "no known format"),
        ("ds/doc/images/0_-3-1.png", "no known format"),  # empty basename
        ("ds/doc/images/x" * 2000, "characters long"),
    ],
)
def test_unknown_with_reason(key, why):
    p = parse_image_key(key)
    assert (p.fmt, p.page, p.has_page) == ("unknown", None, False)
    assert why in p.reason


def test_not_a_string_is_unknown():
    assert parse_image_key(None).fmt == "unknown"  # type: ignore[arg-type]
    assert parse_image_key(b"ds/d/images/1_2.png").fmt == "unknown"  # type: ignore[arg-type]


def test_page_limit_is_inclusive():
    assert parse_image_key(f"d/x/images/{MAX_INT}_0.png").page == MAX_INT


# --- user patterns --------------------------------------------------------------------


def test_user_patterns_first():
    pats = compile_patterns(
        [
            r"(?P<dataset_id>[^/]+)/(?P<document_id>[^/]+)/pics/p(?P<page>\d+)\.(?P<ext>png)",
            r"[^/]+/[^/]+/images/(?P<index>\d+)_(?P<page>\d+)\.png",  # swaps the canonical order
        ]
    )
    p = parse_image_key("ds/doc/pics/p007.png", patterns=pats)
    assert (p.fmt, p.dataset_id, p.document_id, p.page, p.ext) == ("custom", "ds", "doc", 7, "png")
    p = parse_image_key("ds/doc/images/5_0.png", patterns=pats)
    assert (p.fmt, p.page, p.index, p.dataset_id) == ("custom", 0, 5, "ds")
    # no user pattern matches: built-ins still apply
    assert parse_image_key("ds/doc/images/0_f-2-1.png", patterns=pats).page == 2


def test_user_pattern_index_only_and_bad_ints():
    (idx,) = compile_patterns([r".*/img(?P<index>\d+)\.png"])
    p = parse_image_key("ds/doc/other/img4.png", patterns=[idx])
    assert (p.fmt, p.index, p.page, p.has_page) == ("custom", 4, None, False)
    assert p.reason
    (bad,) = compile_patterns([r".*/p(?P<page>.+)\.png"])
    p = parse_image_key("ds/doc/other/pxy.png", patterns=[bad])
    assert p.fmt == "unknown" and "'xy'" in p.reason
    # a pattern whose page is garbage falls through to the built-in formats
    greedy = compile_patterns([r"(?P<page>.*)"])
    assert parse_image_key("ds/doc/images/3_1.png", patterns=greedy).page == 3


@pytest.mark.parametrize("bad", [r"(?P<pg>\d+)", r"(\d+)", r"(?P<page>", "[a-"])
def test_compile_patterns_rejects_and_names(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        compile_patterns([r"(?P<page>\d+)", bad])


# --- builders -------------------------------------------------------------------------


def test_builders():
    assert image_prefix("ds", "doc") == "ds/doc/images/"
    assert canonical_image_key("ds1", "doc9", 5, 0, "png") == "ds1/doc9/images/5_0.png"
    assert legacy_image_name("22-1426_Documents_part08of19.pdf", 4, 1, "png") == (
        "22-1426_Documents_part08of19.pdf-4-1.png"
    )
    assert legacy_image_name("tmplg9eqtl2.pdf", 0, "full", "png") == "tmplg9eqtl2.pdf-0-full.png"
    assert legacy_image_key("ds", "doc", 0, "tmplg9eqtl2.pdf-0-full.png") == (
        "ds/doc/images/0_tmplg9eqtl2.pdf-0-full.png"
    )
    assert docling_image_key("ds", "doc", 3) == "ds/doc/images/3_docling_image.png"


@pytest.mark.parametrize(
    "call",
    [
        lambda: canonical_image_key("ds", "doc", -1, 0, "png"),
        lambda: canonical_image_key("ds", "doc", MAX_INT + 1, 0, "png"),
        lambda: canonical_image_key("ds", "doc", True, 0, "png"),
        lambda: canonical_image_key("ds", "doc", 1, 0, "tiff"),
        lambda: canonical_image_key("ds", "doc", 1, 0, ".png"),
        lambda: canonical_image_key("", "doc", 1, 0, "png"),
        lambda: canonical_image_key("ds", "a/b", 1, 0, "png"),
        lambda: legacy_image_name("", 1, 0, "png"),
        lambda: legacy_image_name("a/b.pdf", 1, 0, "png"),
        lambda: legacy_image_name("a.pdf", 1, "all", "png"),
        lambda: legacy_image_key("ds", "doc", 0, ""),
        lambda: docling_image_key("ds", "doc", -3),
    ],
)
def test_builders_reject_what_parse_would_not_read_back(call):
    with pytest.raises(ValueError):
        call()


# --- legacy_sort_index: the bug, reproduced -------------------------------------------


def test_legacy_sort_index_is_lexicographic():
    names = ["doc.pdf-2-0.png", "doc.pdf-10-0.png", "doc.pdf-1-0.png", "doc.pdf-0-full.png"]
    assert legacy_sort_index(names) == {
        "doc.pdf-0-full.png": 0,
        "doc.pdf-1-0.png": 1,
        "doc.pdf-10-0.png": 2,  # 10 before 2
        "doc.pdf-2-0.png": 3,
    }
    assert legacy_sort_index(iter([])) == {}
    with pytest.raises(ValueError, match="duplicate"):
        legacy_sort_index(["a.png", "a.png"])


# --- source keys ----------------------------------------------------------------------


def test_source_key_candidates():
    fields = {"dataset_id": "ds", "filename": "my file.pdf"}
    assert source_key_candidates("{dataset_id}/{filename}", fields) == [
        "ds/my file.pdf",
        "ds/my%20file.pdf",
    ]
    enc = {"dataset_id": "ds", "filename": "my%20file.pdf"}
    assert source_key_candidates("{dataset_id}/{filename}", enc) == [
        "ds/my%20file.pdf",
        "ds/my%2520file.pdf",
        "ds/my file.pdf",
    ]
    assert source_key_candidates("{dataset_id}/a.pdf", {"dataset_id": "d"}) == ["d/a.pdf"]
    with pytest.raises(ValueError, match="'filename'"):
        source_key_candidates("{dataset_id}/{filename}", {"dataset_id": "ds"})
    with pytest.raises(ValueError, match="__class__"):
        source_key_candidates("{dataset_id.__class__}", {"dataset_id": "ds"})


# --- properties -----------------------------------------------------------------------

no_slash = st.characters(exclude_characters="/", exclude_categories=("Cs",))
ids = st.text(no_slash, min_size=1, max_size=12)
# a document id that can be a key at all (check_document_id, docs/design.md §6.6): no path step,
# no control character
doc_ids = ids.filter(lambda s: s not in (".", "..") and all(ord(c) >= 32 and ord(c) != 127 for c in s))
ints = st.integers(0, MAX_INT)
exts = st.sampled_from(EXTENSIONS).flatmap(lambda e: st.sampled_from([e, e.upper()]))
basenames = st.lists(
    st.one_of(
        st.sampled_from(list("-_. %0123456789")),
        st.sampled_from(["-full", "-1-2", ".pdf", "%20", "%2F", "_docling_image", ".png", "é"]),
        no_slash,
    ),
    min_size=1,
    max_size=12,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(ids, doc_ids, ints, ints, exts)
def test_canonical_round_trip(ds, doc, page, index, ext):
    p = parse_image_key(canonical_image_key(ds, doc, page, index, ext))
    assert (p.fmt, p.dataset_id, p.document_id, p.page, p.index, p.ext) == (
        "canonical",
        ds,
        doc,
        page,
        index,
        ext,
    )


@settings(max_examples=500, deadline=None)
@given(ids, doc_ids, ints, basenames, ints, st.one_of(st.just("full"), ints), exts)
@example("ds", "doc", 1, "my file-3-2.pdf", 4, 1, "png")
@example("ds", "doc", 1, "a_b-1-2-3.pdf", 4, "full", "png")
@example("ds", "doc", 1, "-", 0, 0, "png")
def test_legacy_round_trip(ds, doc, index, basename, page, n, ext):
    key = legacy_image_key(ds, doc, index, legacy_image_name(basename, page, n, ext))
    p = parse_image_key(key)
    assert (p.fmt, p.dataset_id, p.document_id) == ("legacy", ds, doc)
    assert (p.index, p.basename, p.page, p.sub, p.ext) == (index, basename, page, n, ext)


def rebuild(p: ParsedKey) -> str:
    """The key a parse describes, built with the module's own builders."""
    if p.fmt == "canonical":
        return canonical_image_key(p.dataset_id, p.document_id, p.page, p.index, p.ext)
    assert p.fmt == "legacy"
    name = legacy_image_name(p.basename, p.page, p.sub, p.ext)
    return legacy_image_key(p.dataset_id, p.document_id, p.index, name)


# Near-miss keys: the grammar of every format, each part drawn from valid and broken
# tokens, so a good share parse and the rest fail just next to a valid key.
nums = st.one_of(
    st.integers(0, 12).map(str),
    st.sampled_from(["00", "07", "-1", "1000000", "1000001", "9" * 30, "٣", "1.0", ""]),
)
prefixes = st.sampled_from(
    ["ds/doc/images/"] * 4
    + [
        "ds/a/b/images/",
        "ds%2Fdoc%2Fimages%2F",
        "ds/doc%2Fimages/",
        "doc/images/",
        "/images/",
        "ds/doc/image/",
        "ds/doc/images/sub/",
        "ds/images/images/",
        "",
    ]
)
maybe = lambda strategy: st.one_of(st.just(""), strategy)  # noqa: E731
legacy_tail = st.tuples(
    st.sampled_from(["-"] * 4 + ["_", "--"]),
    nums,
    st.sampled_from(["-"] * 4 + ["_"]),
    st.one_of(nums, st.sampled_from(["full", "FULL"])),
).map("".join)
names = st.tuples(
    nums,
    st.sampled_from(["_"] * 4 + ["-", ""]),
    st.one_of(nums, basenames, st.just("docling_image")),
    maybe(legacy_tail),
    st.sampled_from(["."] * 4 + ["", ".."]),
    st.sampled_from(["png", "PNG", "jpeg", "Jpg", "webp", "tiff", "png.bak", ""]),
    maybe(st.text(st.sampled_from("-_.%/ 0123456789aéF"), max_size=3)),
).map("".join)
valid_keys = st.one_of(
    st.builds(canonical_image_key, ids, doc_ids, ints, ints, exts),
    st.builds(
        lambda ds, doc, i, b, p, n, e: legacy_image_key(ds, doc, i, legacy_image_name(b, p, n, e)),
        ids,
        doc_ids,
        ints,
        basenames,
        st.integers(0, 20),
        st.one_of(st.just("full"), ints),
        exts,
    ),
    st.builds(docling_image_key, ids, doc_ids, ints),
)


@st.composite
def mutated(draw):
    """A valid key with a few characters inserted, deleted or replaced."""
    key = draw(valid_keys)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(key)))
        new = draw(st.sampled_from(list("-_./%0159٣ ") + ["", "full", "%2D", "10"]))
        key = key[:i] + new + key[i + draw(st.integers(0, 1)) :]
    return key


near_keys = st.one_of(
    st.text(max_size=60),
    mutated(),
    st.tuples(prefixes, names).map("".join),
    st.tuples(prefixes, names).map("".join).map(lambda k: k.replace("%", "%25", 1)),
)


@settings(max_examples=1500, deadline=None)
@given(near_keys)
@example("ds/doc/images/05_0.png")
@example("ds%2Fdoc%2Fimages%2F1_a-3-2.png")
def test_any_text_never_raises_and_never_invents_a_page(key):
    p = parse_image_key(key)
    assert p.fmt in {"canonical", "legacy", "docling", "unknown"}
    if p.has_page:
        assert 0 <= p.page <= MAX_INT
        # The page is literally where the format says: rebuilding gives the key back.
        assert rebuild(p) in {key, unquote(key)}
    else:
        assert p.reason
    if p.fmt == "docling":
        prefix = image_prefix(p.dataset_id, p.document_id)
        assert f"{prefix}{p.index}_docling_image.{p.ext}" in {key, unquote(key)}

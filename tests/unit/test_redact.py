"""repage.redact: the one redactor every output goes through (docs/design.md §6.1)."""

from __future__ import annotations

import io
import json
import logging
import re
from urllib.parse import quote

import pytest

from repage.config import ENV_NAMES, environ_redactor, load_settings
from repage.errors import ConfigError
from repage.redact import LOG_FILTER, MASK, Redactor, redact_text, redact_url, url_secrets

# Passwords as people paste them: unencoded `/`, `@`, `:`, a `%`, spaces, non-ASCII.
HARD = ["s3cr/et@x", "p:w%20d é", "Pw-Zq9/secret", "Ab:cd@ef/gh ij", "ключ/пароль@42"]


def pieces(secret: str) -> list[str]:
    """The secret and its non-trivial fragments (what a parser cutting at `/ @ :` would show)."""
    parts = [p for p in re.split(r"[/@:\s]+", secret) if len(p) >= 4]
    return [secret, quote(secret, safe=""), *parts]


def shows(text: str, secret: str) -> list[str]:
    return [p for p in pieces(secret) if p in text]


@pytest.mark.parametrize(
    "url, expected",
    [
        ("postgresql://repage:s3cr/et@x@127.0.0.1:9/db", "postgresql://***@127.0.0.1:9/db"),
        ("https://AKIDX:SK-9q/secret@127.0.0.1:9", "https://***@127.0.0.1:9"),
        ("https://root:Pw-Zq9/secret@127.0.0.1:9", "https://***@127.0.0.1:9"),
        ("grpc://root:PW@h:1", "grpc://***@h:1"),
        ("https://user:pw@host.example:19530/db", "https://***@host.example:19530/db"),
        ("https://TOKEN@host/x", "https://***@host/x"),
        ("postgresql://u:p:w%20d é@h/db?sslmode=require", "postgresql://***@h/db?sslmode=require"),
        (
            "https://h/x?token=abc&b=1&X-Amz-Signature=ff&sig=s&key=k&password=p",
            "https://h/x?token=***&b=1&X-Amz-Signature=***&sig=***&key=***&password=***",
        ),
        (
            "https://h/x?X-Amz-Credential=AKID%2F2024&X-Amz-Security-Token=t#frag",
            "https://h/x?X-Amz-Credential=***&X-Amz-Security-Token=***#frag",
        ),
        ("http://[::1]:9/x", "http://[::1]:9/x"),
        ("s3://bucket", "s3://bucket"),
        ("memory://", "memory://"),
        ("sqlite:///./repage-data/ledger.db", "sqlite:///./repage-data/ledger.db"),
        ("file:///data/a@b.pdf", "file:///data/a@b.pdf"),  # no authority: the `@` is the path's
        ("https://h/api?mail=a@b.c", "https://***@b.c"),  # an `@` may end a password: masking too much is safe
        ("./repage-data/milvus.db", "./repage-data/milvus.db"),
        ("://user:s3cret@nowhere", "://***@nowhere"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["postgresql://repage:pw@[::1", "https://root:Pw-Zq9", "https://ro ot:pw x/y", "mysql://u:s3cr/et@x@h:port/db"],
)
def test_an_unreadable_url_is_masked_whole(url):
    scheme = url.split("://")[0]
    assert redact_url(url) == f"{scheme}://{MASK}"


def test_url_secrets_finds_password_token_user_only_and_query_values():
    assert "s3cr/et@x" in url_secrets("postgresql://repage:s3cr/et@x@h/db")
    assert "Pw-Zq9" in url_secrets("https://root:Pw-Zq9/secret@h:9")  # what urllib takes for the port
    assert url_secrets("https://ghp_Tok9/x%2Fy@h") == ["ghp_Tok9/x%2Fy"]  # a user-only token
    assert url_secrets("postgresql://repage@h/db") == []  # a user name: masked in the URL, not looked for
    assert url_secrets("http://[fe80::abcd]:9/x") == []
    assert url_secrets("https://h/x?token=a%2Fb&page=2") == ["a%2Fb"]
    assert url_secrets("https://host:19530") == []  # a port is no secret
    assert url_secrets("./milvus.db") == []


def test_redact_text_masks_urls_and_pairs_and_keeps_plain_text():
    text = (
        "ledger postgresql://u:s3cr/et@x@127.0.0.1:9/db does not answer, "
        "conninfo host=h password=hunter22 user=u; see https://h/p?token=t0k."
    )
    shown = redact_text(text)
    assert "s3cr" not in shown and "et@x" not in shown and "hunter22" not in shown and "t0k" not in shown
    assert "postgresql://***@127.0.0.1:9/db does not answer," in shown and "https://h/p?token=***." in shown
    plain = (
        "Milvus http://127.0.0.1:9, collection 'c'; use http(s)://host:port, file:///abs/path, "
        "file://./relative, memory:// or s3://BUCKET; check the credentials: set AWS_SECRET_ACCESS_KEY"
    )
    assert redact_text(plain) == plain


@pytest.mark.parametrize("secret", HARD)
def test_redactor_masks_a_secret_its_quoted_forms_and_its_fragments(secret):
    redact = Redactor(secret)
    text = " | ".join([*pieces(secret), quote(secret), json.dumps(secret)[1:-1], f"https://u:{secret}@h:1/x"])
    shown = redact(text)
    assert shows(shown, secret) == [], shown
    assert secret not in repr(redact) and "1 secrets" in repr(redact)


def test_short_strings_are_no_secret():
    assert Redactor("ab", "", None)("ab cd") == "ab cd"


def hostile_settings_env() -> dict[str, str]:
    return {
        "REPAGE_LEDGER_URL": "postgresql://repage:s3cr/et@x@127.0.0.1:9/db",
        "REPAGE_S3_ENDPOINT": "https://AKIDX:SK-9q/s3ep@127.0.0.1:9",
        "REPAGE_MILVUS_URI": "https://root:Mv-Zq9/pw@127.0.0.1:9",
        "REPAGE_MILVUS_TOKEN": "tok:Mv/9q@x é",
        "AWS_ACCESS_KEY_ID": "AKIDREL8Q3",
        "AWS_SECRET_ACCESS_KEY": "Aws/Sk@Ey9:bb%2B ñ",
        "REPAGE_REPROCESS_URL": "https://rp.example:9/api?token=QsTk/n9:x%2F&page=2",
        "REPAGE_REPROCESS_TOKEN": "Rpr/Tk@n9:zz% ø",
        "REPAGE_READ_TOKEN": "Rd/Tok@n:9%7e ü",
        "REPAGE_ADMIN_TOKEN": "Adm/Tok@n:9% é",
    }


SETTING_SECRETS = [
    "s3cr/et@x",
    "SK-9q/s3ep",
    "Mv-Zq9/pw",
    "tok:Mv/9q@x é",
    "AKIDREL8Q3",
    "Aws/Sk@Ey9:bb%2B ñ",
    "QsTk/n9:x%2F",
    "Rpr/Tk@n9:zz% ø",
    "Rd/Tok@n:9%7e ü",
    "Adm/Tok@n:9% é",
]


def test_redactor_from_settings_knows_every_secret_setting():
    env = hostile_settings_env()
    settings = load_settings(env, app_fallbacks=False)
    redact = Redactor.from_settings(settings)
    shown_settings = json.dumps(redact.settings(settings), ensure_ascii=False) + repr(settings) + str(settings)
    text = redact(" ".join(SETTING_SECRETS) + " " + " ".join(env.values()))
    for secret in SETTING_SECRETS:
        assert shows(text, secret) == [], (secret, text)
        assert shows(shown_settings, secret) == [], (secret, shown_settings)
    shown = redact.settings(settings)
    assert shown["milvus_token"] == shown["aws_secret_access_key"] == shown["admin_token"] == MASK
    assert shown["ledger_url"] == "postgresql://***@127.0.0.1:9/db"
    assert shown["reprocess_url"] == "https://rp.example:9/api?token=***&page=2"
    assert settings.redacted() == shown
    assert "aws_secret_access_key" in shown  # keys are repage's names, never redacted
    # the same secrets, known from the environment alone (before the settings validate)
    from_env = environ_redactor(env)(" ".join(SETTING_SECRETS))
    assert [s for s in SETTING_SECRETS if shows(from_env, s)] == []
    assert set(hostile_settings_env()) <= set(ENV_NAMES)


@pytest.mark.parametrize(
    "name, value",
    [
        ("REPAGE_MILVUS_URI", "grpc://root:PWq9/zz@h:1"),
        ("REPAGE_STORE_URL", "ftp://u:PWq9/zz@h/x"),
        ("REPAGE_LEDGER_URL", "mysql://u:PWq9/zz@h/db"),
        ("REPAGE_COLLECTION", "password=PWq9/zz"),
    ],
)
def test_config_errors_never_echo_a_secret(name, value):
    with pytest.raises(ConfigError) as info:
        load_settings({name: value}, app_fallbacks=False)
    message = str(info.value)
    assert shows(message, "PWq9/zz") == [] and "zz@" not in message, message
    assert name.removeprefix("REPAGE_").lower() in message


def test_log_filter_redacts_message_arguments_and_traceback():
    redact = Redactor("Lg/s3cr@et9")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(LOG_FILTER)
    logger = logging.getLogger("repage.test_redact")
    logger.addHandler(handler)
    logger.propagate = False
    from repage import redact as redact_module

    before = redact_module._active  # noqa: SLF001 (the test restores the process's redactor)
    redact_module.install(redact)
    try:
        logger.warning("opening %s with %r", "postgresql://u:Lg/s3cr@et9@h/db", ValueError("pw Lg/s3cr@et9"))
        logger.warning("token=abc123 in the format")
        try:
            raise RuntimeError("failed for https://u:Lg/s3cr@et9@h:1/x")
        except RuntimeError:
            logger.exception("boom %s", "Lg/s3cr@et9")
    finally:
        redact_module._active = before  # noqa: SLF001
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert shows(out, "Lg/s3cr@et9") == [] and "abc123" not in out, out
    assert "Traceback" in out and "RuntimeError" in out and "opening postgresql://***@h/db" in out


def test_exception_traceback_is_redacted_with_its_causes():
    redact = Redactor("Ex/s3cr@et9")
    try:
        try:
            raise ValueError("inner Ex/s3cr@et9")
        except ValueError as inner:
            raise RuntimeError("outer https://u:Ex/s3cr@et9@h/x") from inner
    except RuntimeError as exc:
        text = redact.exception(exc)
    assert "Traceback" in text and "inner ***" in text and shows(text, "Ex/s3cr@et9") == []

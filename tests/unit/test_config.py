from pathlib import Path

import pytest

from repage.config import demo_settings, load_settings
from repage.errors import ConfigError
from repage.redact import redact_url


def test_defaults_run_locally():
    s = load_settings({})
    assert s.milvus_uri == "./repage-data/milvus.db"
    assert s.store_url == "file://./repage-data/bucket"
    assert s.ledger_url.startswith("sqlite:///")
    assert s.collection == "fltr_documents"


def test_precedence_flags_env_fallback_toml(tmp_path: Path):
    toml = tmp_path / "repage.toml"
    toml.write_text('[repage]\ncollection = "from_toml"\nbatch_size = 7\nstore_url = "memory://"\n')
    env = {"MILVUS_URI": "http://app:19530", "REPAGE_COLLECTION": "from_env"}
    s = load_settings(env, toml_path=toml, flags={"collection": "from_flag"})
    assert s.collection == "from_flag"
    assert s.milvus_uri == "http://app:19530"  # app fallback beats toml default
    assert s.batch_size == 7 and s.store_url == "memory://"
    assert load_settings(env, toml_path=toml).collection == "from_env"


def test_repage_env_beats_app_fallback():
    env = {"MILVUS_URI": "http://app:19530", "REPAGE_MILVUS_URI": "http://repage:19530"}
    assert load_settings(env).milvus_uri == "http://repage:19530"


def test_r2_fallbacks():
    env = {
        "R2_ACCOUNT_ID": "acc",
        "R2_BUCKET_NAME": "fltr-datasets",
        "R2_ACCESS_KEY_ID": "AK",
        "R2_SECRET_ACCESS_KEY": "SK",
    }
    s = load_settings(env)
    assert s.store_url == "s3://fltr-datasets"
    assert s.s3_endpoint == "https://acc.r2.cloudflarestorage.com"
    assert s.aws_secret_access_key.get_secret_value() == "SK"
    assert load_settings(env, app_fallbacks=False).store_url.startswith("file://")


def test_demo_never_reads_app_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MILVUS_URI", "http://production:19530")
    monkeypatch.setenv("REPAGE_MILVUS_URI", "http://production:19530")
    s = demo_settings(tmp_path)
    assert s.milvus_uri == str(tmp_path / "milvus.db")
    assert s.store_url == f"file://{tmp_path / 'bucket'}"


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"REPAGE_MILVUS_URI": "ftp://x"}, "REPAGE_MILVUS_URI"),
        ({"REPAGE_MILVUS_URI": "http://"}, "no host"),
        ({"REPAGE_STORE_URL": "gs://bucket"}, "REPAGE_STORE_URL"),
        ({"REPAGE_STORE_URL": "s3://"}, "names no bucket"),
        ({"REPAGE_LEDGER_URL": "mysql://x"}, "REPAGE_LEDGER_URL"),
        ({"REPAGE_COLLECTION": "bad name;drop"}, "REPAGE_COLLECTION"),
    ],
)
def test_bad_values_give_one_line(env, needle):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_unknown_toml_key_is_named(tmp_path):
    toml = tmp_path / "repage.toml"
    toml.write_text("[repage]\nbatch_sise = 3\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_settings({}, toml_path=toml)


def test_broken_toml(tmp_path):
    toml = tmp_path / "repage.toml"
    toml.write_text("[repage\n")
    with pytest.raises(ConfigError, match="repage.toml"):
        load_settings({}, toml_path=toml)


def test_secrets_redacted():
    env = {
        "REPAGE_MILVUS_TOKEN": "tok-SECRET",
        "AWS_SECRET_ACCESS_KEY": "SK-SECRET",
        "REPAGE_LEDGER_URL": "postgresql://u:pw-SECRET@db/x",
        "REPAGE_ADMIN_TOKEN": "adm-SECRET",
    }
    s = load_settings(env)
    shown = str(s.redacted()) + repr(s) + str(s)
    assert "SECRET" not in shown


def test_redact_url():
    assert redact_url("postgresql://u:pw@h/db") == "postgresql://***@h/db"
    assert "abc" not in redact_url("https://h/x?token=abc")

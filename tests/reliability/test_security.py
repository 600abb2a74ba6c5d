"""Security (docs/design.md §6.1, §6.5, §13): service auth, secrets kept out of every output, owner-only
files, and a local bucket that keys cannot escape.

- Auth: every endpoint but /healthz needs a bearer token; missing, wrong, near-miss (prefix,
  suffix, case) tokens get 401, the read token on an admin endpoint 403; tokens are compared
  with `secrets.compare_digest`, both tokens every time (checked in the code and by counting).
- Secrets: the test secrets go in through every door (env, URLs with userinfo, tokens), the
  stores fail in every way, and no stdout, stderr, JSON document, log record or exception
  text (with its chained causes) shows any of them. Every CLI call of this suite is also
  checked by tests.support.reliability.CliLog as it returns.
- Files: the SQLite ledger (and its -wal/-shm), the folders repage creates for it, the demo's
  data folder, a new bucket folder and the Milvus Lite folder are owner-only (0600 / 0700).
- Confinement: a `file://` bucket's keys cannot read, write, copy, list or delete outside it.
"""

from __future__ import annotations

import ast
import inspect
import logging
import stat
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from repage.errors import RepageError
from repage.stores.ledger import Ledger
from repage.stores.objects import ObjectStore
from repage.web import auth as auth_module
from repage.web.service import create_app
from tests.support.reliability import (
    ADMIN_TOKEN,
    LEDGER_PASSWORD,
    MILVUS_TOKEN,
    READ_TOKEN,
    REPROCESS_TOKEN,
    S3_KEY_ID,
    S3_SECRET,
    CliLog,
    assert_no_secret,
    leaked,
)
from tests.support.service_store import fltr_rows, settings_for

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

READ_ENDPOINTS = [("get", "/documents/doc-1/chunks"), ("get", "/migration/status"), ("get", "/metrics")]
ADMIN_ENDPOINTS = [("post", "/migration/documents/doc-1"), ("post", "/migration/pause"), ("post", "/migration/resume")]


class StandInVectors:
    def __init__(self, rows):
        self.rows = rows

    def fetch_documents(self, ids, *, fields=None, with_vectors=True):
        return [{k: v for k, v in r.items() if k != "vector"} for r in self.rows if r["document_id"] in ids]


@pytest.fixture
def client(tmp_path):
    settings = settings_for(
        str(tmp_path / "m.db"),
        "fltr_documents",
        "memory://",
        f"sqlite:///{tmp_path}/l.db",
        read_token=READ_TOKEN,
        admin_token=ADMIN_TOKEN,
    )
    ledger = Ledger(settings.ledger_url)
    app = create_app(
        settings,
        stores=SimpleNamespace(vectors=StandInVectors(fltr_rows(["doc-1"])), ledger=ledger),
        flush_seconds=0.05,
    )
    # these tests try a hundred wrong tokens for their status codes; the throttle that would
    # answer 429 after ten is tested in tests/unit/test_web_security.py
    app.state.repage.auth.throttle.limit = 10**6
    with TestClient(app) as test_client:
        yield test_client
    ledger.close()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def near_misses(token: str) -> list[str]:
    return [token[:-1], token + "x", token.upper(), token[1:], " " + token + "x", token.replace("-", "_")]


def test_service_auth_missing_wrong_read_and_admin(trial, client, caplog):
    trial.name = "security-auth"
    caplog.set_level(logging.DEBUG)
    attempts, problems = 0, []
    assert client.get("/healthz").status_code == 200
    wrong = [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
        bearer("nope"),
        *(bearer(t) for t in near_misses(READ_TOKEN)),
        *(bearer(t) for t in near_misses(ADMIN_TOKEN)),
        bearer(READ_TOKEN + ADMIN_TOKEN),
    ]
    for method, url in READ_ENDPOINTS + ADMIN_ENDPOINTS:
        for headers in wrong:
            attempts += 1
            reply = getattr(client, method)(url, headers=headers)
            if reply.status_code != 401 or reply.headers.get("www-authenticate") != "Bearer":
                problems.append(f"{method} {url} with {headers}: {reply.status_code}")
            problems += [f"{method} {url}: reply shows {s}" for s in leaked(reply.text)]
    for method, url in READ_ENDPOINTS:
        for token in (READ_TOKEN, ADMIN_TOKEN):
            attempts += 1
            status = getattr(client, method)(url, headers=bearer(token)).status_code
            if status != 200:
                problems.append(f"{method} {url} with a valid token: {status}")
    for method, url in ADMIN_ENDPOINTS:
        attempts += 2
        if (status := getattr(client, method)(url, headers=bearer(READ_TOKEN)).status_code) != 403:
            problems.append(f"{method} {url} with the read token: {status}, expected 403")
        if (status := getattr(client, method)(url, headers=bearer(ADMIN_TOKEN)).status_code) not in (200, 202):
            problems.append(f"{method} {url} with the admin token: {status}")
    problems += [f"log records show {s}" for s in leaked(caplog.text)]
    trial.trials = trial.faults = attempts
    assert not problems, "\n".join(problems)


def test_tokens_are_compared_in_constant_time_both_every_time(trial, client, monkeypatch):
    """`secrets.compare_digest` on both tokens for every request, and no `==` on a token anywhere."""
    trial.name, trial.trials = "security-constant-time", 4
    source = inspect.getsource(auth_module.BearerAuth)
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
                n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
            }
            assert not names & {"given", "token", "_read", "_admin"}, f"== on a token: {ast.unparse(node)}"
    assert "compare_digest" in source
    calls = []
    real = auth_module.secrets.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth_module.secrets, "compare_digest", counting)
    for token in ("wrong", READ_TOKEN, ADMIN_TOKEN, READ_TOKEN[:-1]):
        calls.clear()
        client.get("/migration/status", headers=bearer(token))
        trial.faults += 1
        assert len(calls) == 2, f"token {token[:4]}...: {len(calls)} comparisons, expected both tokens compared"


# ---------------------------------------------------------------- secrets in outputs


def hostile_env(tmp_path: Path, **extra) -> dict[str, str]:
    """Every secret in: credentials, tokens, and URLs carrying passwords; every store unreachable."""
    env = {
        "REPAGE_MILVUS_URI": f"http://root:{MILVUS_TOKEN}@127.0.0.1:9",
        "REPAGE_MILVUS_TOKEN": MILVUS_TOKEN,
        "REPAGE_STORE_URL": "s3://rel-bucket",
        "REPAGE_S3_ENDPOINT": f"http://{S3_KEY_ID}:{S3_SECRET}@127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "REPAGE_LEDGER_URL": f"postgresql://repage:{LEDGER_PASSWORD}@127.0.0.1:9/repage?connect_timeout=2",
        "REPAGE_READ_TOKEN": READ_TOKEN,
        "REPAGE_ADMIN_TOKEN": ADMIN_TOKEN,
        "REPAGE_REPROCESS_URL": f"http://admin:{REPROCESS_TOKEN}@127.0.0.1:9/reprocess",
        "REPAGE_REPROCESS_TOKEN": REPROCESS_TOKEN,
    }
    env.update(extra)
    return env


# Which store is down decides which error each command meets first: every command runs once,
# against the set of stores that lets it get furthest.
COMMANDS = {
    "everything down": [
        ("doctor", "--json"),
        ("doctor",),
        ("run", "--json"),
        ("status",),
        ("serve", "--host", "0.0.0.0", "--port", "9"),
    ],
    "bucket up": [("scan", "--json"), ("estimate", "--json"), ("verify", "--json"), ("rollback", "--all", "--json")],
    "ledger down": [("run", "--dry-run", "--json"), ("status", "--json"), ("gc", "--json"), ("review", "--json")],
}


def test_no_secret_in_any_output_of_failing_commands(trial, tmp_path, moto_endpoint):
    """CliLog checks stdout and stderr of each call; here every store is unreachable in turn."""
    trial.name = "security-outputs"
    cli = CliLog()
    envs = {
        "everything down": hostile_env(tmp_path),
        # the bucket answers (moto) but Milvus and the ledger do not
        "bucket up": hostile_env(tmp_path, REPAGE_S3_ENDPOINT=moto_endpoint),
        # Milvus and the bucket local, the ledger a PostgreSQL URL with a password that does not answer
        "ledger down": hostile_env(
            tmp_path,
            REPAGE_MILVUS_URI=str(tmp_path / "nothing" / "milvus.db"),
            REPAGE_STORE_URL=(tmp_path / "bucket").as_uri(),
        ),
    }
    (tmp_path / "toml").mkdir()  # secrets from repage.toml too
    (tmp_path / "toml" / "repage.toml").write_text(f'[repage]\nread_token = "{READ_TOKEN}"\n', encoding="utf-8")
    calls = [(command, env, tmp_path) for name, env in envs.items() for command in COMMANDS[name]]
    calls.append(
        (
            ("doctor", "--json"),
            {k: v for k, v in envs["everything down"].items() if k != "REPAGE_READ_TOKEN"},
            tmp_path / "toml",
        )
    )
    for start in range(0, len(calls), 4):  # four at a time: most of each call is waiting on a refused store
        running = [cli.start(*command, env=env, cwd=cwd) for command, env, cwd in calls[start : start + 4]]
        for proc in running:
            result = cli.finish(proc, timeout=60)
            trial.trials = trial.faults = len(cli.calls)
            assert result.returncode != 0, str(result)


def chain_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


def test_no_secret_in_exception_text_or_log_records(trial, tmp_path, moto_endpoint, caplog):
    """Every error repage raises while opening or using stores with secrets: its text, repr and the
    whole chain of causes (what REPAGE_DEBUG=1 would print); and every log record meanwhile."""
    trial.name = "security-exceptions"
    from repage.config import load_settings
    from repage.stores.milvus import MilvusVectors
    from repage.stores.open import open_stores

    caplog.set_level(logging.DEBUG)
    texts: list[tuple[str, str]] = []

    def attempt(what: str, fn) -> None:
        try:
            fn()
        except RepageError as exc:
            texts.append((what, chain_text(exc)))
        else:
            texts.append((what, ""))

    creds = dict(access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET)
    attempt(
        "bucket, unreachable endpoint",
        lambda: ObjectStore.from_url("s3://rel-bucket", endpoint="http://127.0.0.1:9", **creds).check(),
    )
    attempt(
        "bucket, endpoint with userinfo",
        lambda: ObjectStore.from_url("s3://rel-bucket", endpoint=f"http://u:{S3_SECRET}@127.0.0.1:9", **creds).check(),
    )
    attempt(
        "bucket, no such bucket",
        lambda: ObjectStore.from_url("s3://rel-missing-bucket", endpoint=moto_endpoint, **creds).get("k"),
    )
    attempt("bucket, bad URL", lambda: ObjectStore.from_url(f"s3://{S3_SECRET}/x", **creds))
    attempt(
        "milvus, unreachable",
        lambda: MilvusVectors(f"http://root:{MILVUS_TOKEN}@127.0.0.1:9", "c", token=MILVUS_TOKEN, timeout=2),
    )
    attempt(
        "ledger, unreachable",
        lambda: Ledger(f"postgresql://repage:{LEDGER_PASSWORD}@127.0.0.1:9/repage?connect_timeout=2"),
    )
    attempt("ledger, malformed", lambda: Ledger(f"postgresql://repage:{LEDGER_PASSWORD}@[::1"))
    attempt(
        "settings, bad ledger URL",
        lambda: load_settings({"REPAGE_LEDGER_URL": f"mysql://u:{LEDGER_PASSWORD}@h/db"}, app_fallbacks=False),
    )
    settings = load_settings(
        {},
        flags=dict(
            milvus_uri=f"http://root:{MILVUS_TOKEN}@127.0.0.1:9",
            milvus_token=MILVUS_TOKEN,
            store_url="s3://rel-bucket",
            s3_endpoint=moto_endpoint,
            aws_access_key_id=S3_KEY_ID,
            aws_secret_access_key=S3_SECRET,
            ledger_url=f"sqlite:///{tmp_path}/l.db",
            read_token=READ_TOKEN,
            admin_token=ADMIN_TOKEN,
            reprocess_token=REPROCESS_TOKEN,
        ),
        app_fallbacks=False,
    )
    attempt("open_stores", lambda: open_stores(settings).close())
    texts.append(("settings repr", repr(settings) + str(settings) + str(settings.redacted())))
    problems = [f"{what}: {s}" for what, text in texts for s in leaked(text)]
    problems += [f"log records: {s}" for s in leaked(caplog.text)]
    trial.trials = trial.faults = len(texts)
    assert sum(1 for _, text in texts if text) >= 9, texts
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- secrets as people paste them

# Unencoded `/`, `@`, `:`, a `%`, spaces and non-ASCII, in every setting that holds a secret. Each
# piece a parser may cut out at `/ @ :` or a space is long enough to be recognised in the output.
HARD_SECRETS = {
    "ledger_password": "Ldgr4/s3cr@etX9:pw%20d é",
    "s3_endpoint_user": "akidhard7q",
    "s3_endpoint_password": "S3ep/Zq9s@ecr7:k%2Fy ü",
    "milvus_uri_password": "Mlv7@PwQ:Zq9%20 ßxy",  # no `/`: pymilvus reads the URI, doctor gets to its report
    "milvus_token": "Mtk9/Tok@en:x%41 çw",
    "aws_secret": "Aws4/Sk@Ey9:bb%2B ñq",
    "reprocess_token": "Rpr5/Tk@n9:zz%21 øq",
    "read_token": "Rdt6/Tok@n:9%7e üx",
    "admin_token": "Adm8/Tok@n:9%25 éq",
    "query_token": "Qtk3/n9:x%2Fyy",
    "store_url_password": "Cfg2/St@re:x%20 ñq",
    "bad_milvus_uri_password": "Pw-Zq9/sEcr3tQ",  # urllib takes `Pw-Zq9` for the port: pymilvus raises ValueError
}


def hard_env(tmp_path: Path, **extra) -> dict[str, str]:
    s = HARD_SECRETS
    hard = {
        "REPAGE_MILVUS_URI": f"http://root:{s['milvus_uri_password']}@127.0.0.1:9",
        "REPAGE_MILVUS_TOKEN": s["milvus_token"],
        "REPAGE_S3_ENDPOINT": f"https://{s['s3_endpoint_user']}:{s['s3_endpoint_password']}@127.0.0.1:9",
        "AWS_SECRET_ACCESS_KEY": s["aws_secret"],
        "REPAGE_LEDGER_URL": f"postgresql://repage:{s['ledger_password']}@127.0.0.1:9/repage",
        "REPAGE_READ_TOKEN": s["read_token"],
        "REPAGE_ADMIN_TOKEN": s["admin_token"],
        "REPAGE_REPROCESS_URL": f"https://rp.invalid:9/api?token={s['query_token']}&page=2",
        "REPAGE_REPROCESS_TOKEN": s["reprocess_token"],
    }
    return hostile_env(tmp_path, **{**hard, **extra})


def secret_pieces(secret: str) -> list[str]:
    """The secret, its URL-quoted forms and its non-trivial fragments (4+ characters)."""
    import re
    from urllib.parse import quote, quote_plus

    fragments = [p for p in re.split(r"[/@:\s]+", secret) if len(p) >= 4]
    return list(dict.fromkeys([secret, quote(secret, safe=""), quote(secret), quote_plus(secret), *fragments]))


HARD_RUNS = {  # name: (command, extra env, expected exit code, what the output must show)
    "doctor": (("doctor",), {}, 2, "ledger"),
    "doctor --json": (("doctor", "--json"), {}, 2, '"settings"'),
    # the endpoint without user info: the bucket check runs too, and a report gets printed
    "doctor, plain endpoint": (("doctor",), {"REPAGE_S3_ENDPOINT": "https://127.0.0.1:9"}, 2, "ledger_url"),
    "config error": (
        ("scan", "--json"),
        {"REPAGE_STORE_URL": f"ftp://u:{HARD_SECRETS['store_url_password']}@h/x"},
        2,
        "repage: error: configuration error in store_url",
    ),
    "internal error": (
        ("doctor",),
        {"REPAGE_MILVUS_URI": f"https://root:{HARD_SECRETS['bad_milvus_uri_password']}@127.0.0.1:9"},
        1,
        "repage: internal error: ValueError",
    ),
}


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "REPAGE_DEBUG"])
def test_hard_secrets_never_show_in_doctor_json_config_or_internal_errors(tmp_path, debug):
    """Every secret setting at once, each pasted unencoded; every piece of every secret is looked
    for in all of stdout and stderr, with and without REPAGE_DEBUG (a traceback, redacted)."""
    import json

    cli, problems, started = CliLog(), [], []
    for name, (command, extra, code, expect) in HARD_RUNS.items():
        env = hard_env(tmp_path, **extra, **({"REPAGE_DEBUG": "1"} if debug else {}))
        started.append((name, code, expect, cli.start(*command, env=env, cwd=tmp_path)))
    for name, code, expect, proc in started:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except Exception:
            proc.kill()
            raise
        output = stdout + stderr
        for what, secret in HARD_SECRETS.items():
            shown = [piece for piece in secret_pieces(secret) if piece in output]
            problems += [f"{name}: {what} shows as {piece[:4]}..." for piece in shown]
        if proc.returncode != code or expect not in output:
            problems.append(f"{name}: exit {proc.returncode} (expected {code}), {expect!r} missing:\n{output[-1500:]}")
        if ("Traceback" in output) != (debug and name == "internal error"):
            problems.append(f"{name}: a traceback {'shown' if 'Traceback' in output else 'missing'}:\n{output[-1500:]}")
        if name == "doctor --json":
            shown = json.loads(stdout)["settings"] if stdout.strip() else {}
            if not shown.get("milvus_token") == shown.get("aws_secret_access_key") == shown.get("read_token") == "***":
                problems.append(f"doctor --json: secret settings not ***: {shown}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ledger_and_data_files_are_owner_only(trial, tmp_path, monkeypatch):
    from repage.stores.milvus import normalize_uri

    trial.name, trial.trials = "security-permissions", 6

    problems = []
    ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'ledger.db'}")
    ledger.add_event("permissions-check")  # a write: WAL and SHM files exist now
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
        path = tmp_path / "data" / name
        if path.exists() and mode(path) != 0o600:
            problems.append(f"{name}: {oct(mode(path))}, expected 0o600")
    ledger.close()
    if mode(tmp_path / "data") != 0o700:
        problems.append(f"the ledger's folder: {oct(mode(tmp_path / 'data'))}, expected 0o700")
    ObjectStore.from_url((tmp_path / "bucket").as_uri()).close()
    normalize_uri(str(tmp_path / "lite" / "milvus.db"))
    for folder in ("bucket", "lite"):
        if mode(tmp_path / folder) != 0o700:
            problems.append(f"the {folder} folder repage created: {oct(mode(tmp_path / folder))}, expected 0o700")

    # the demo's data folder: stop the build right after it made the folder
    from repage.demo import build as demo_build

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(demo_build, "_make_documents", stop)
    with pytest.raises(Stop):
        demo_build.build_demo(tmp_path / "demo" / "repage-data")
    if mode(tmp_path / "demo" / "repage-data") != 0o700:
        problems.append(f"the demo data folder: {oct(mode(tmp_path / 'demo' / 'repage-data'))}, expected 0o700")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- a local bucket keeps its keys inside


ESCAPES = [
    "../outside.txt",
    "a/../../outside.txt",
    "./../outside.txt",
    "..",
    "a/b/../../../outside.txt",
    "/outside.txt",
    "a//../../outside.txt",
    "..\\outside.txt",
    "%2e%2e/outside.txt",
    "a/%2E%2E/%2E%2E/outside.txt",
]


def test_local_bucket_keys_cannot_escape_the_bucket(trial, tmp_path):
    trial.name = "security-confinement"
    root = tmp_path / "root"
    bucket = root / "bucket"
    outside = root / "outside.txt"
    root.mkdir()
    outside.write_bytes(b"do not touch")
    store = ObjectStore.from_url(bucket.as_uri())
    store.put("inside.txt", b"inside")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.is_relative_to(bucket))
    problems, attempts = [], 0

    def attack(what: str, fn) -> object:
        nonlocal attempts
        attempts += 1
        trial.trials = trial.faults = attempts
        try:
            return fn()
        except RepageError as exc:
            assert_no_secret(str(exc), what)
            return exc

    absolute = str(root / "absolute.txt")  # an absolute key names a file outside the bucket
    for key in [*ESCAPES, absolute]:
        got = attack(f"get {key}", lambda: store.get(key))  # noqa: B023
        if got == b"do not touch":
            problems.append(f"get {key!r} read a file outside the bucket")
        head = attack(f"head {key}", lambda: store.head(key))  # noqa: B023
        if not isinstance(head, Exception) and head.size == len(b"do not touch"):
            problems.append(f"head {key!r} saw a file outside the bucket")
        attack(f"put {key}", lambda: store.put(key, b"escaped"))  # noqa: B023
        attack(f"copy to {key}", lambda: store.copy("inside.txt", key))  # noqa: B023
        attack(f"copy from {key}", lambda: store.copy(key, "copied.txt"))  # noqa: B023
        attack(f"delete {key}", lambda: store.delete(key))  # noqa: B023
        listed = attack(f"list {key}", lambda: [i.key for page in store.list(key) for i in page])  # noqa: B023
        if isinstance(listed, list) and any("outside" in k for k in listed):
            problems.append(f"list {key!r} listed outside the bucket: {listed}")
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.is_relative_to(bucket))
    if outside.read_bytes() != b"do not touch":
        problems.append("the file outside the bucket was changed")
    if after != before:
        problems.append(f"files appeared or vanished outside the bucket: {sorted(set(after) ^ set(before))}")
    if (bucket / "copied.txt").exists() and (bucket / "copied.txt").read_bytes() == b"do not touch":
        problems.append("a copy brought a file from outside into the bucket")
    if Path(absolute).exists():
        problems.append(f"the absolute key {absolute!r} wrote outside the bucket")
    store.close()
    assert not problems, "\n".join(problems)

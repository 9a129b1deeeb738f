"""The admin CLI (`nilai db|accounts|keys|prices`) against SQLite and this machine's PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nilai.auth.api_keys import key_digest
from nilai.auth.base import Principal
from nilai.auth.stored_keys import StoredApiKeys
from nilai.billing.prices import Price, PriceBook
from nilai.errors import AuthenticationFailed
from nilai.store.migrate import head_revision
from nilai.store.sql import SqlStore, make_engine
from tests.support.cli import Result
from tests.support.records import query_log
from tests.support.stores import (
    PG_HOST,
    PG_PORT,
    create_pg_database,
    drop_pg_database,
    pg_execute,
    pg_url,
    run_sync,
)

pytestmark = pytest.mark.integration

KEY_SHAPE = re.compile(r"^nilai_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$", re.MULTILINE)
# What every command that reaches for the database prints first, on stderr.
DATABASE_LINE = re.compile(r"using the (SQLite )?database \S+ \(NILAI_DATABASE_URL\)\n")


@dataclass(frozen=True)
class AdminDatabase:
    name: str
    url: str
    data_dir: Path


@pytest.fixture(scope="module")
def module_pg_database() -> Iterator[str]:
    """A throwaway PostgreSQL database for the whole module (each test empties its schema)."""
    name = run_sync(create_pg_database("nilai_admin_cli"))
    try:
        yield name
    finally:
        run_sync(drop_pg_database(name))


@pytest.fixture(params=["sqlite", "postgresql"])
def admin_db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AdminDatabase:
    """An empty database of each kind, named by NILAI_DATABASE_URL."""
    data_dir = tmp_path / "data"
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'admin.db'}"
    else:
        database = request.getfixturevalue("module_pg_database")
        # Each test starts from an empty schema, as it would with a fresh SQLite file.
        asyncio.run(pg_execute(database, "DROP SCHEMA public CASCADE", "CREATE SCHEMA public"))
        url = pg_url(database)
    monkeypatch.delenv("NILAI_CONFIG_FILE", raising=False)
    monkeypatch.setenv("NILAI_DATABASE_URL", url)
    monkeypatch.setenv("NILAI_DATA_DIR", str(data_dir))
    monkeypatch.setenv("NILAI_DB_AUTO_MIGRATE", "true")
    return AdminDatabase(request.param, url, data_dir)


def assert_fails(result: Result, status: int, *fragments: str) -> None:
    """A failure: the given status, one plain line on stderr, nothing on stdout."""
    assert result.status == status, result
    assert result.out == ""
    assert "Traceback" not in result.err
    lines = DATABASE_LINE.sub("", result.err, count=1).strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("nilai ")
    for fragment in fragments:
        assert fragment in lines[0]


def ok(result: Result) -> str:
    assert result.status == 0, result
    assert DATABASE_LINE.fullmatch(result.err), result.err
    return result.out


def created_key(out: str) -> str:
    match = KEY_SHAPE.search(out)
    assert match is not None, out
    assert out.count(match.group(0)) == 1
    assert "will not be shown again" in out
    return match.group(0)


def account_id(out: str) -> str:
    match = re.search(r"\b(acct_[0-9a-f]{16})\b", out)
    assert match is not None, out
    return match.group(1)


async def _authenticate(url: str, credential: str) -> Principal:
    """A fresh authenticator (no cache carried over) on its own store."""
    store = SqlStore(make_engine(url))
    try:
        return await StoredApiKeys(store, ttl_s=5.0).authenticate(credential)
    finally:
        await store.aclose()


def authenticate(url: str, credential: str) -> Principal:
    return asyncio.run(_authenticate(url, credential))


def rejection(url: str, credential: str) -> str | None:
    with pytest.raises(AuthenticationFailed) as caught:
        authenticate(url, credential)
    return caught.value.code


async def _write_logs(url: str, account: str, tokens: list[tuple[int, int]]) -> None:
    store = SqlStore(make_engine(url))
    logs = [query_log(account, prompt, completion) for prompt, completion in tokens]
    try:
        await store.write_logs(logs)
    finally:
        await store.aclose()


# db


def test_db_upgrade_current_downgrade_and_upgrade_again(admin_db: AdminDatabase, cli):
    head = head_revision()
    previous = f"{int(head) - 1:04d}"  # revisions are numbered 0001, 0002, ...
    assert ok(cli("db", "current")).strip() == "none"
    assert f"at revision {head} (was none)" in ok(cli("db", "upgrade"))
    assert ok(cli("db", "current")).strip() == head
    assert f"already at revision {head}" in ok(cli("db", "upgrade"))
    assert f"at revision none (was {head})" in ok(cli("db", "downgrade", "base"))
    assert ok(cli("db", "current")).strip() == "none"
    assert_fails(cli("db", "downgrade", "-1"), 2, "cannot migrate")
    assert f"at revision {head} (was none)" in ok(cli("db", "upgrade", head))
    assert f"at revision {previous} (was {head})" in ok(cli("db", "downgrade", "-1"))
    assert f"at revision {head} (was {previous})" in ok(cli("db", "upgrade", "head"))
    # the schema is usable again
    assert "created account" in ok(cli("accounts", "add", "after-migrations"))


def test_db_downgrade_base_removes_the_data(admin_db: AdminDatabase, cli):
    ok(cli("accounts", "add", "gone"))
    ok(cli("db", "downgrade", "base"))
    assert "no accounts" in ok(cli("accounts", "list"))  # auto-migrated to an empty schema


def test_db_bad_revisions(admin_db: AdminDatabase, cli):
    assert_fails(cli("db", "upgrade", "nope"), 2, "nope")
    assert_fails(cli("db", "downgrade", "0999"), 2, "0999")
    with pytest.raises(SystemExit) as exited:
        cli("db", "downgrade")
    assert exited.value.code == 2


def test_db_upgrade_creates_the_sqlite_data_dir(tmp_path: Path, monkeypatch, cli):
    data_dir = tmp_path / "not" / "yet"
    monkeypatch.delenv("NILAI_CONFIG_FILE", raising=False)
    monkeypatch.delenv("NILAI_DATABASE_URL", raising=False)
    monkeypatch.setenv("NILAI_DATA_DIR", str(data_dir))
    assert f"{data_dir / 'nilai.db'} at revision" in ok(cli("db", "upgrade"))
    assert (data_dir / "nilai.db").is_file()


def test_commands_refuse_an_old_schema_without_auto_migrate(
    admin_db: AdminDatabase, monkeypatch, cli
):
    monkeypatch.setenv("NILAI_DB_AUTO_MIGRATE", "false")
    assert_fails(cli("accounts", "list"), 1, "nilai db upgrade")
    ok(cli("db", "upgrade"))
    assert "no accounts" in ok(cli("accounts", "list"))


# accounts


def test_accounts_add_list_show_disable_enable(admin_db: AdminDatabase, cli):
    assert ok(cli("accounts", "list")).strip() == "no accounts"
    out = ok(cli("accounts", "add", "acme", "--rate-limit-minute", "10", "--rate-limit-day", "500"))
    assert "created account acme" in out
    assert "minute=10, day=500" in out
    acme = account_id(out)
    other = account_id(ok(cli("accounts", "add", "other", "--rate-limit-lifetime", "7")))

    listing = ok(cli("accounts", "list")).splitlines()
    assert listing[0].split() == ["ID", "NAME", "ACTIVE", "CREATED", "LIMITS", "QUERIES", "TOKENS"]
    assert listing[1].startswith(acme)
    assert "minute=10, day=500" in listing[1]
    assert listing[2].startswith(other)
    assert "lifetime=7" in listing[2]

    show = ok(cli("accounts", "show", "acme"))
    assert f"id:       {acme}" in show
    assert "active:   yes" in show
    assert "0 queries" in show
    assert "keys:     0" in show
    assert ok(cli("accounts", "show", acme)) == show

    assert "disabled" in ok(cli("accounts", "disable", "acme"))
    assert "already disabled" in ok(cli("accounts", "disable", acme))
    assert "active:   no" in ok(cli("accounts", "show", "acme"))
    assert re.search(rf"{acme}\s+acme\s+no\s", ok(cli("accounts", "list")))
    assert "enabled" in ok(cli("accounts", "enable", "acme"))
    assert "already enabled" in ok(cli("accounts", "enable", "acme"))
    assert "active:   yes" in ok(cli("accounts", "show", "acme"))


def test_accounts_show_usage_totals(admin_db: AdminDatabase, cli):
    acme = account_id(ok(cli("accounts", "add", "acme")))
    asyncio.run(_write_logs(admin_db.url, acme, [(10, 5), (20, 7)]))
    show = ok(cli("accounts", "show", "acme"))
    assert "2 queries, 30 prompt + 12 completion = 42 tokens" in show
    row = ok(cli("accounts", "list")).splitlines()[1]
    assert row.split()[-2:] == ["2", "42"]


def test_accounts_errors(admin_db: AdminDatabase, cli):
    ok(cli("accounts", "add", "acme"))
    assert_fails(cli("accounts", "add", "acme"), 1, "already exists")
    for bad in ("0", "-1", "abc", "1.5", str(2**31)):
        assert_fails(cli("accounts", "add", "x", "--rate-limit-hour", bad), 2, "--rate-limit-hour")
    assert_fails(cli("accounts", "add", "   "), 2, "name")
    assert_fails(cli("accounts", "add", "n" * 201), 2, "name")
    assert_fails(cli("accounts", "add", "acct_0123456789abcdef"), 2, "account id")
    for action in ("show", "disable", "enable"):
        assert_fails(cli("accounts", action, "nobody"), 1, "no account", "nobody")
    assert ok(cli("accounts", "list")).count("\n") == 2  # header and acme only


def test_accounts_update_changes_and_clears_limits(admin_db: AdminDatabase, cli):
    acme = account_id(ok(cli("accounts", "add", "acme", "--rate-limit-minute", "10")))
    out = ok(cli("accounts", "update", "acme", "--rate-limit-hour", "100", "--rate-limit-day", "9"))
    assert f"updated account acme ({acme}); limits: minute=10, hour=100, day=9" in out
    assert "within 3 s" in out  # the gateways' account cache (NILAI_KEY_CACHE_TTL_S)
    out = ok(cli("accounts", "update", acme, "--rate-limit-minute", "default"))
    assert "limits: hour=100, day=9" in out
    assert "limits:   hour=100, day=9" in ok(cli("accounts", "show", "acme"))
    out = ok(
        cli(
            "accounts",
            "update",
            "acme",
            "--rate-limit-hour",
            "default",
            "--rate-limit-day",
            "default",
        )
    )
    assert "limits: defaults" in out

    assert_fails(cli("accounts", "update", "acme"), 2, "nothing to change")
    assert_fails(cli("accounts", "update", "acme", "--rate-limit-day", "0"), 2, "--rate-limit-day")
    assert_fails(cli("accounts", "update", "nobody", "--rate-limit-day", "5"), 1, "no account")


def test_admin_commands_name_their_database_on_stderr_with_the_password_masked(
    admin_db: AdminDatabase, monkeypatch, cli
):
    url = admin_db.url.replace("postgres@", "postgres:s3cret@")  # trust auth ignores it
    monkeypatch.setenv("NILAI_DATABASE_URL", url)
    if admin_db.name == "sqlite":
        shown = f"using the SQLite database {url.removeprefix('sqlite+aiosqlite:///')} "
    else:
        shown = f"using the database {url.replace(':s3cret@', ':***@')} "
    ok(cli("accounts", "add", "acme"))
    created = cli("keys", "create", "acme")
    for result in (created, cli("db", "current"), cli("keys", "list"), cli("accounts", "list")):
        assert result.err.startswith(shown), result.err
        assert "s3cret" not in result.err + result.out
    # stdout carries only the result, so a script can read the key from it
    assert created_key(created.out) == created.out.splitlines()[1]
    assert "database" not in created.out


# keys


def test_keys_create_prints_a_key_that_authenticates(admin_db: AdminDatabase, cli):
    acme = account_id(ok(cli("accounts", "add", "acme")))
    out = ok(cli("keys", "create", "acme", "--name", "ci"))
    key = created_key(out)
    principal = authenticate(admin_db.url, key)
    assert principal.account_id == acme
    assert principal.key_id is not None
    assert principal.key_id in out
    # created by id too, without a label
    second = created_key(ok(cli("keys", "create", acme)))
    assert second != key
    assert authenticate(admin_db.url, second).account_id == acme


def test_keys_list_never_prints_keys_or_hashes(admin_db: AdminDatabase, cli):
    ok(cli("accounts", "add", "acme"))
    ok(cli("accounts", "add", "other"))
    first = created_key(ok(cli("keys", "create", "acme", "--name", "laptop")))
    second = created_key(ok(cli("keys", "create", "other")))
    assert ok(cli("keys", "list", "--account", "other")).count("\n") == 2
    outputs = [
        ok(cli("keys", "list")),
        ok(cli("keys", "list", "--account", "acme")),
        ok(cli("accounts", "show", "acme")),
        ok(cli("accounts", "list")),
    ]
    for key in (first, second):
        secret = key.split("_", 2)[2]
        for out in outputs:
            assert key not in out
            assert secret not in out
            assert key_digest(key).hex() not in out
    listing = outputs[0].splitlines()
    assert listing[0].split() == [
        "ID", "PREFIX", "ACCOUNT", "NAME", "CREATED", "LAST", "USED", "REVOKED"
    ]  # fmt: skip
    assert len(listing) == 3
    assert first.split("_")[1] in listing[1]
    assert "acme" in listing[1]
    assert "laptop" in listing[1]
    assert second.split("_")[1] in listing[2]
    assert "other" in listing[2]
    assert len(outputs[1].splitlines()) == 2
    assert first.split("_")[1] in outputs[1]
    assert second.split("_")[1] not in outputs[1]
    assert "keys:     1" in outputs[2]


def test_keys_revoke(admin_db: AdminDatabase, cli):
    ok(cli("accounts", "add", "acme"))
    out = ok(cli("keys", "create", "acme"))
    key = created_key(out)
    kept = created_key(ok(cli("keys", "create", "acme")))
    prefix = key.split("_")[1]
    key_id = authenticate(admin_db.url, key).key_id
    assert key_id is not None

    revoked = ok(cli("keys", "revoke", prefix))
    assert revoked.startswith(f"revoked API key {key_id}")
    assert rejection(admin_db.url, key) == "revoked_api_key"
    assert authenticate(admin_db.url, kept).key_id != key_id
    assert "already revoked" in ok(cli("keys", "revoke", key_id))
    assert "already revoked" in ok(cli("keys", "revoke", prefix))
    row = next(line for line in ok(cli("keys", "list")).splitlines() if key_id in line)
    assert not row.rstrip().endswith("-")  # the REVOKED column holds a time
    assert_fails(cli("keys", "revoke", "key_0000000000000000"), 1, "no API key")


def test_keys_for_disabled_and_unknown_accounts(admin_db: AdminDatabase, cli):
    ok(cli("accounts", "add", "acme"))
    key = created_key(ok(cli("keys", "create", "acme")))
    ok(cli("accounts", "disable", "acme"))
    assert_fails(cli("keys", "create", "acme"), 1, "disabled")
    assert rejection(admin_db.url, key) == "account_disabled"
    ok(cli("accounts", "enable", "acme"))
    assert authenticate(admin_db.url, key).account_id
    assert_fails(cli("keys", "create", "nobody"), 1, "no account", "nobody")
    assert_fails(cli("keys", "list", "--account", "nobody"), 1, "no account")
    assert_fails(cli("keys", "create", "acme", "--name", "n" * 201), 2, "--name")
    assert ok(cli("keys", "list")).count("\n") == 2  # header and the one key


# failures that do not depend on the database


@pytest.fixture
def plain_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("NILAI_CONFIG_FILE", raising=False)
    monkeypatch.delenv("NILAI_DATABASE_URL", raising=False)
    monkeypatch.setenv("NILAI_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


COMMANDS = [
    ("db", "current"),
    ("db", "upgrade"),
    ("accounts", "list"),
    ("accounts", "add", "x"),
    ("keys", "create", "x"),
    ("keys", "list"),
    ("keys", "revoke", "x"),
    ("prices", "list"),
    ("prices", "set", "x", "--prompt", "1"),
    ("prices", "delete", "x"),
]


@pytest.mark.parametrize("argv", COMMANDS)
def test_unreachable_database(plain_env: Path, monkeypatch, cli, argv):
    monkeypatch.setenv("NILAI_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:1/nilai")
    assert_fails(cli(*argv), 1, "cannot reach the database")


def test_missing_postgres_database(plain_env: Path, monkeypatch, cli):
    url = f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/nilai_missing_{uuid.uuid4().hex}"
    monkeypatch.setenv("NILAI_DATABASE_URL", url)
    assert_fails(cli("accounts", "list"), 1, "does not exist")


@pytest.mark.parametrize("url", ["not a url", "mysql://root@127.0.0.1/nilai"])
def test_invalid_database_url(plain_env: Path, monkeypatch, cli, url):
    monkeypatch.setenv("NILAI_DATABASE_URL", url)
    assert_fails(cli("db", "upgrade"), 2, "invalid database URL")
    assert_fails(cli("accounts", "list"), 2, "invalid database URL")


def test_invalid_settings(plain_env: Path, monkeypatch, cli):
    monkeypatch.setenv("NILAI_KEY_CACHE_TTL_S", "-1")
    assert_fails(cli("keys", "list"), 2, "invalid settings", "NILAI_KEY_CACHE_TTL_S")
    monkeypatch.setenv("NILAI_CONFIG_FILE", str(plain_env / "missing.yaml"))
    assert_fails(cli("db", "current"), 2, "invalid settings")


# the installed entry point


@pytest.mark.parametrize("admin_db", ["sqlite"], indirect=True)  # the CLI is tested on both above
def test_entry_point_adds_an_account_and_creates_a_key(admin_db: AdminDatabase):
    nilai = Path(sys.executable).parent / "nilai"
    env = dict(os.environ)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(nilai), *argv], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    added = run("accounts", "add", "from-shell")
    assert added.returncode == 0, added.stderr
    acme = account_id(added.stdout)
    created = run("keys", "create", "from-shell", "--name", "shell")
    assert created.returncode == 0, created.stderr
    key = created_key(created.stdout)
    assert authenticate(admin_db.url, key).account_id == acme
    refused = run("keys", "create", "nobody")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr == (
        f"using the SQLite database {admin_db.url.removeprefix('sqlite+aiosqlite:///')} "
        "(NILAI_DATABASE_URL)\nnilai keys create: no account with id or name 'nobody'\n"
    )


# prices


async def _read_prices(url: str) -> dict[str, Price]:
    """What a gateway's price book reads from the database."""
    store = SqlStore(make_engine(url))
    try:
        return await PriceBook(store, Price(0, 0, 0)).all()
    finally:
        await store.aclose()


def _price_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "PROMPT/1M", "COMPLETION/1M", "WEB", "SEARCH", "UPDATED"]
    return [line.split()[:4] for line in lines[1:]]


def test_prices_set_list_and_delete(admin_db: AdminDatabase, cli):
    assert _price_rows(ok(cli("prices", "list"))) == [["(default)", "2", "2", "0.05"]]
    argv = ("--prompt", "0.5", "--completion", "1.25", "--web-search", "0")
    out = ok(cli("prices", "set", "org/model-7b", *argv))
    assert (
        "price of org/model-7b: prompt 0.5, completion 1.25 per million tokens; web search 0" in out
    )
    assert "NILAI_PRICE_REFRESH_S" in out
    # An amount left out keeps the model's own, or for a new model the default.
    out = ok(cli("prices", "set", "org/model-7b", "--web-search", "0.01"))
    assert "prompt 0.5, completion 1.25 per million tokens; web search 0.01" in out
    out = ok(cli("prices", "set", "cheap", "--prompt", "0.000001"))
    assert "prompt 0.000001, completion 2 per million tokens; web search 0.05" in out

    assert _price_rows(ok(cli("prices", "list"))) == [
        ["(default)", "2", "2", "0.05"],
        ["cheap", "0.000001", "2", "0.05"],
        ["org/model-7b", "0.5", "1.25", "0.01"],
    ]
    assert asyncio.run(_read_prices(admin_db.url)) == {
        "cheap": Price(1, 2_000_000, 50_000),
        "org/model-7b": Price(500_000, 1_250_000, 10_000),
    }

    out = ok(cli("prices", "delete", "cheap"))
    assert "price of cheap deleted: it pays the default, prompt 2, completion 2" in out
    assert_fails(cli("prices", "delete", "cheap"), 1, "has no price of its own")
    assert [row[0] for row in _price_rows(ok(cli("prices", "list")))] == [
        "(default)",
        "org/model-7b",
    ]


def test_prices_default_comes_from_the_settings(admin_db: AdminDatabase, monkeypatch, cli):
    monkeypatch.setenv("NILAI_PRICE_WEB_SEARCH", "0.2")
    monkeypatch.setenv("NILAI_PRICE_PROMPT_PER_MILLION", "1.5")
    assert _price_rows(ok(cli("prices", "list"))) == [["(default)", "1.5", "2", "0.2"]]
    assert "completion 2 per million tokens; web search 0.2" in ok(
        cli("prices", "set", "m", "--prompt", "3")
    )
    monkeypatch.setenv("NILAI_PRICE_WEB_SEARCH", "-1")
    assert_fails(cli("prices", "list"), 2, "invalid settings", "NILAI_PRICE_WEB_SEARCH")


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (("set", "m", "--prompt", "-1"), ("--prompt", "must not be negative")),
        (("set", "m", "--completion", "0.0000001"), ("--completion", "at most 6 decimal")),
        (("set", "m", "--web-search", "abc"), ("--web-search", "decimal number")),
        (("set", "m", "--web-search", "1e12"), ("--web-search", "at most 1000000000")),
        (("set", "m"), ("nothing to change", "--prompt")),
        (("set", " ", "--prompt", "1"), ("1 to 200 characters",)),
        (("set", "a\x00b", "--prompt", "1"), ("control characters",)),
        (("delete", "m" * 201), ("1 to 200 characters",)),
    ],
)
def test_prices_bad_input(plain_env: Path, cli, argv: tuple[str, ...], fragments: tuple[str, ...]):
    assert_fails(cli("prices", *argv), 2, *fragments)

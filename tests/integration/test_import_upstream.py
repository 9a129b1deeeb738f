"""`nilai import-upstream` from a PostgreSQL database laid out as upstream nilAI's.

The upstream database is made from tests/fixtures/upstream_nilai_schema.sql (upstream's
migrations at their head) and seeded by ``seed_upstream`` with 50 user ids; the gateway's own
database is a second throwaway PostgreSQL database.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import select

from nilai.auth import credit_keys
from nilai.auth.stored_keys import StoredApiKeys
from nilai.cli import build_parser
from nilai.cli.import_upstream import (
    ACCOUNT_PREFIX,
    LIMIT_COLUMNS,
    UPSTREAM_REVISION,
    upstream_account_name,
)
from nilai.store.base import Account, Usage
from nilai.store.sql import SqlStore
from nilai.store.tables import QueryLogRow
from tests.support.cli import Result
from tests.support.records import query_log
from tests.support.servers import free_port
from tests.support.stores import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    create_pg_database,
    drop_pg_database,
    dump_database,
    pg_execute,
    pg_url,
    run_sync,
    with_store,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "tests" / "fixtures" / "upstream_nilai_schema.sql"
DATABASE_LINE = re.compile(r"using the (SQLite )?database \S+ \(NILAI_DATABASE_URL\)\n")
USERS = 50
USERS_WITHOUT_ROW = 10  # upstream writes a users row only for users given their own limits
DUPLICATED = "user-dup"  # two users rows: upstream's lookup fails and applies its defaults


Rows = list[tuple[Any, ...]]


@dataclass
class Expected:
    """What the import must produce for one upstream user id."""

    limits: dict[str, int | None] = field(default_factory=dict[str, int | None])
    usage: Usage = field(default_factory=Usage)
    not_carried: list[str] = field(default_factory=list[str])


@dataclass(frozen=True)
class Seeded:
    url: str  # as an operator would give it: postgresql://...
    name: str
    users: dict[str, Expected]
    logs: int
    log_rows: Rows  # as inserted: upstream's serial ids are 1, 2, ... in this order


# the upstream database


def _rate_limits(rng: random.Random, expected: Expected) -> dict[str, Any] | None:
    """A user's upstream ``rate_limits``, recording what the import makes of it."""
    shape = rng.randrange(6)
    if shape == 0:
        return None
    limits: dict[str, Any] = dict.fromkeys((*LIMIT_COLUMNS, "web_search_rate_limit"))
    if shape in (1, 2, 3):
        for name, column in LIMIT_COLUMNS.items():
            value = rng.choice([None, 0, rng.randrange(1, 5000)])
            limits[name] = value
            if value:
                expected.limits[column] = value
    if shape == 2:
        limits["web_search_rate_limit_day"] = 7
        expected.not_carried.append("web_search_rate_limit_day=7")
    if shape == 4:
        limits["user_rate_limit_hour"] = -3  # not a limit: reported, the default applies
        expected.not_carried.append("user_rate_limit_hour=-3")
    return limits


def seed_upstream(rng: random.Random) -> tuple[Rows, Rows, dict[str, Expected]]:
    """Rows for upstream's ``users`` and ``query_logs``, and what the import must make of them."""
    expected: dict[str, Expected] = {}
    users: Rows = []
    logs: Rows = []
    start = datetime(2025, 11, 3, tzinfo=UTC)
    for index in range(USERS):
        user_id = DUPLICATED if index == 0 else f"user-{index:03d}-{rng.randrange(16**8):08x}"
        want = expected[user_id] = Expected()
        if index == 0:
            users += [(json.dumps({"user_rate_limit_minute": 5}), user_id)] * 2
            want.not_carried.append("2 rows in users")
        elif index > USERS_WITHOUT_ROW:
            limits = _rate_limits(rng, want)
            users.append((None if limits is None else json.dumps(limits), user_id))
        prompt = completion = 0
        # Upstream knows a user without a users row only from its logs.
        count = rng.randrange(1 if 0 < index <= USERS_WITHOUT_ROW else 0, 9)
        for _ in range(count):
            p, c = rng.randrange(1, 4000), rng.randrange(0, 2000)
            searches = rng.choice([0, 0, 1, 3])
            logs.append(
                (
                    user_id,
                    f"lock-{rng.randrange(16**12):012x}",
                    start + timedelta(seconds=rng.randrange(86_400 * 30)),
                    rng.choice(["meta-llama/Llama-3.1-8B-Instruct", "openai/gpt-oss-20b"]),
                    p,
                    c,
                    p + c,
                    searches,
                    rng.choice([0, 1]),
                    rng.choice([-1, 120, 2500]),
                    rng.random() < 0.3,
                    rng.choice([0, 0, 200, 429, 500]),
                    # upstream's column can hold an error text; the import never reads it
                    rng.choice(["", "OK", "secret prompt text in an error"]),
                )
            )
            prompt, completion = prompt + p, completion + c
        want.usage = Usage(prompt, completion, count)
    return users, logs, expected


async def _load_upstream(name: str, users: Rows, logs: Rows) -> None:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=name)
    try:
        await conn.execute(SCHEMA.read_text())
        await conn.executemany("INSERT INTO users (rate_limits, user_id) VALUES ($1, $2)", users)
        await conn.executemany(
            "INSERT INTO query_logs (user_id, lockid, query_timestamp, model, prompt_tokens, "
            "completion_tokens, total_tokens, web_search_calls, tool_calls, response_time_ms, "
            "was_streamed, error_code, error_message) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            logs,
        )
    finally:
        await conn.close()


async def _log_upstream(name: str, rows: Rows) -> None:
    """Requests upstream served after an import: (user_id, lockid, model, prompt, completion,
    total), the other columns at their defaults."""
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=name)
    try:
        await conn.executemany(
            "INSERT INTO query_logs (user_id, lockid, model, prompt_tokens, completion_tokens, "
            "total_tokens) VALUES ($1, $2, $3, $4, $5, $6)",
            rows,
        )
    finally:
        await conn.close()


@pytest.fixture
def upstream() -> Iterator[Seeded]:
    """A seeded database laid out as upstream nilAI's."""
    users, logs, expected = seed_upstream(random.Random(22))
    name = run_sync(create_pg_database("nilai_upstream"))
    try:
        run_sync(_load_upstream(name, users, logs))
        url = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
        yield Seeded(url, name, expected, len(logs), logs)
    finally:
        run_sync(drop_pg_database(name))


@pytest.fixture
def gateway_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The gateway's own (empty) database, named by NILAI_DATABASE_URL."""
    name = run_sync(create_pg_database("nilai_import_target"))
    url = pg_url(name)
    monkeypatch.delenv("NILAI_CONFIG_FILE", raising=False)
    monkeypatch.setenv("NILAI_DATABASE_URL", url)
    monkeypatch.setenv("NILAI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NILAI_DB_AUTO_MIGRATE", "true")
    try:
        yield url
    finally:
        run_sync(drop_pg_database(name))


def ok(result: Result) -> str:
    assert result.status == 0, result
    assert DATABASE_LINE.fullmatch(result.err), result.err
    return result.out


def assert_fails(result: Result, status: int, *fragments: str) -> str:
    """A failure: the status, one plain line on stderr (after the database line), no stdout."""
    assert result.status == status, result
    assert result.out == ""
    lines = DATABASE_LINE.sub("", result.err, count=1).strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("nilai import-upstream: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def accounts_and_usage(url: str) -> dict[str, tuple[Account, Usage]]:
    async def read(store: SqlStore) -> dict[str, tuple[Account, Usage]]:
        return {a.name: (a, await store.usage(a.id)) for a in await store.list_accounts()}

    return with_store(url, read)


def imported_logs(url: str) -> dict[str, tuple[Any, ...]]:
    """The gateway's query logs by id: the fields an upstream row maps to."""

    async def read(store: SqlStore) -> dict[str, tuple[Any, ...]]:
        row = QueryLogRow
        query = select(
            row.id,
            row.model,
            row.started_at,
            row.prompt_tokens,
            row.completion_tokens,
            row.searches,
            row.tool_calls,
            row.latency_ms,
            row.streamed,
            row.status_code,
        )
        async with store.session() as session:
            return {found[0]: tuple(found[1:]) for found in await session.execute(query)}

    return with_store(url, read)


def full_limits(limits: dict[str, int | None]) -> dict[str, int | None]:
    return {column: limits.get(column) for column in LIMIT_COLUMNS.values()}


# the tests


def test_dry_run_prints_the_plan_and_writes_nothing(upstream: Seeded, gateway_db: str, cli):
    ok(cli("db", "upgrade"))
    before, upstream_before = dump_database(gateway_db), dump_database(pg_url(upstream.name))

    out = ok(cli("import-upstream", "--from-db", upstream.url, "--dry-run"))

    assert f"(revision {UPSTREAM_REVISION}): {USERS} user ids" in out
    assert f"would import: {USERS} new accounts, {upstream.logs} new query logs" in out
    assert "dry run: nothing was written" in out
    for user_id, want in upstream.users.items():
        for fragment in want.not_carried:
            assert f"{upstream_account_name(user_id)}: {fragment}" in out
    assert "NILAI_WEB_SEARCH_RATE_LIMIT_DAY applies to every account" in out
    assert "secret prompt text" not in out
    assert dump_database(gateway_db) == before
    assert dump_database(pg_url(upstream.name)) == upstream_before


def test_dry_run_never_migrates_the_gateway_database(upstream: Seeded, gateway_db: str, cli):
    before = dump_database(gateway_db)
    assert_fails(
        cli("import-upstream", "--from-db", upstream.url, "--dry-run"), 1, "nilai db upgrade"
    )
    assert dump_database(gateway_db) == before == {}


def test_import_matches_upstream_and_a_second_run_adds_nothing(
    upstream: Seeded, gateway_db: str, cli
):
    upstream_before = dump_database(pg_url(upstream.name))
    out = ok(cli("import-upstream", "--from-db", upstream.url))
    assert f"imported: {USERS} new accounts, {upstream.logs} new query logs" in out

    imported = accounts_and_usage(gateway_db)
    assert set(imported) == {upstream_account_name(user_id) for user_id in upstream.users}
    for user_id, want in upstream.users.items():
        account, usage = imported[upstream_account_name(user_id)]
        assert account.active
        assert full_limits(want.limits) == {
            column: getattr(account, column) for column in LIMIT_COLUMNS.values()
        }, user_id
        assert usage == want.usage, user_id
    assert imported[upstream_account_name(DUPLICATED)][0].rate_limit_minute is None
    logs = imported_logs(gateway_db)
    assert len(logs) == upstream.logs
    for number, seeded in enumerate(upstream.log_rows, 1):
        _, _, at, model, prompt, completion, _, searches, tools, took, streamed, code, _ = seeded
        status = 200 if code == 0 else code
        want = (model, at, prompt, completion, searches, tools, max(took, 0), streamed, status)
        assert logs[f"upstream_{number}"] == want
    dump = dump_database(gateway_db)
    assert "secret prompt text" not in repr(dump)
    assert dump["api_keys"] == []

    again = ok(cli("import-upstream", "--from-db", upstream.url))
    assert "imported: 0 new accounts, 0 new query logs" in again
    assert f"{USERS} already imported" in again
    assert dump_database(gateway_db) == dump
    assert dump_database(pg_url(upstream.name)) == upstream_before


def test_a_later_run_adds_only_what_upstream_logged_since(upstream: Seeded, gateway_db: str, cli):
    ok(cli("import-upstream", "--from-db", upstream.url))
    user_id = next(iter(upstream.users))
    name = upstream_account_name(user_id)
    account, first = accounts_and_usage(gateway_db)[name]
    # The gateway served the account meanwhile, and an operator changed its limits.
    with_store(gateway_db, lambda store: store.write_logs([query_log(account.id, 11, 13)]))
    ok(cli("accounts", "update", name, "--rate-limit-day", "99"))
    new_logs = [(user_id, "l1", "m", 100, 50, 150), ("upstream-newcomer", "l2", "m", 7, 3, 10)]
    run_sync(_log_upstream(upstream.name, new_logs))

    plan = ok(cli("import-upstream", "--from-db", upstream.url, "--dry-run"))
    assert "would import: 1 new accounts, 2 new query logs" in plan
    assert f"{name}: kept this gateway's limits" in plan
    out = ok(cli("import-upstream", "--from-db", upstream.url))
    assert "imported: 1 new accounts, 2 new query logs" in out

    after = accounts_and_usage(gateway_db)
    assert after[name][1] == first + Usage(11, 13, 1) + Usage(100, 50, 1)
    assert after[name][0].rate_limit_day == 99
    assert after[upstream_account_name("upstream-newcomer")][1] == Usage(7, 3, 1)


def test_an_imported_account_keeps_its_usage_behind_a_gateway(
    upstream: Seeded, gateway_db: str, cli, start_fake, start_gateway
):
    ok(cli("import-upstream", "--from-db", upstream.url))
    user_id, want = max(upstream.users.items(), key=lambda item: item[1].usage.queries)
    name = upstream_account_name(user_id)
    # Upstream keeps no keys (its credit service does); an operator can give one here.
    key = ok(cli("keys", "create", name, "--name", "migrated")).splitlines()[1]

    async def authenticate(store: SqlStore) -> str:
        return (await StoredApiKeys(store, ttl_s=1.0).authenticate(key)).account_id

    account, _ = accounts_and_usage(gateway_db)[name]
    assert with_store(gateway_db, authenticate) == account.id

    model_server = start_fake()
    gateway = start_gateway(database_url=gateway_db, upstream_urls=[model_server.url])
    answer = httpx.get(f"{gateway.url}/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    usage = answer.json()
    assert usage["prompt_tokens"] == want.usage.prompt_tokens
    assert usage["completion_tokens"] == want.usage.completion_tokens
    assert usage["total_tokens"] == want.usage.total_tokens
    assert usage["queries"] == want.usage.queries > 0


def test_a_database_not_laid_out_as_upstream_is_refused_naming_what_is_missing(
    upstream: Seeded, gateway_db: str, cli
):
    run_sync(pg_execute(upstream.name, "ALTER TABLE query_logs DROP COLUMN user_id"))
    line = assert_fails(cli("import-upstream", "--from-db", upstream.url), 2, "query_logs.user_id")
    assert UPSTREAM_REVISION in line
    run_sync(pg_execute(upstream.name, "DROP TABLE users"))
    assert_fails(cli("import-upstream", "--from-db", upstream.url), 2, "no table 'users'")
    assert accounts_and_usage(gateway_db) == {}


def test_an_unreachable_upstream_database_is_one_line_and_status_2(gateway_db: str, cli):
    password = "hunter2"  # pragma: allowlist secret
    url = f"postgresql://{PG_USER}:{password}@127.0.0.1:{free_port()}/nilai"
    line = assert_fails(
        cli("import-upstream", "--from-db", url), 2, "cannot reach the upstream database"
    )
    assert password not in line
    assert_fails(cli("import-upstream", "--from-db", "sqlite:///x.db"), 2, "PostgreSQL")


def test_the_documented_commands_parse():
    """MIGRATION.md's import steps are commands this `nilai` accepts."""
    text = (ROOT / "MIGRATION.md").read_text()
    section = text.split("## Moving from upstream nilAI", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    assert all(command.startswith("nilai ") for command in commands), commands
    assert any("import-upstream" in command and "--dry-run" in command for command in commands)
    for command in commands:
        argv = re.sub(r'"[^"]*"|\$\S+', "VALUE", command).split()[1:]
        build_parser().parse_args(argv)  # exits (fails the test) on an unknown command or flag


def test_imported_accounts_are_those_the_credit_strategy_uses():
    """An upstream key, validated by the credit service, lands on its imported account."""
    assert ACCOUNT_PREFIX == credit_keys.ACCOUNT_PREFIX
    assert upstream_account_name("u-1") == "credit:u-1"

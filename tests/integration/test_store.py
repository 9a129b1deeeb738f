"""The SQL store on SQLite and PostgreSQL: the same tests, the same expectations."""

from __future__ import annotations

import asyncio
import uuid
import warnings
from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Connection

from nilai.auth.stored_keys import generate_key
from nilai.store.base import ApiKey, QueryLog, Usage
from nilai.store.migrate import current_revision, downgrade, head_revision, upgrade
from nilai.store.sql import SqlStore, make_engine, new_id, now
from nilai.store.tables import ApiKeyRow, Base, QueryLogRow, UsageTotalRow
from tests.support.records import query_log

pytestmark = pytest.mark.integration

TABLES = {"accounts", "api_keys", "query_logs", "usage_totals"}
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def _table_names(sync: Connection) -> set[str]:
    return set(inspect(sync).get_table_names())


def _schema_diff(sync: Connection) -> list[object]:
    return compare_metadata(MigrationContext.configure(sync), Base.metadata)


def _log(
    account_id: str,
    prompt: int,
    completion: int,
    *,
    key_id: str | None = None,
    started_at: datetime = T0,
    status: int = 200,
) -> QueryLog:
    return query_log(
        account_id,
        prompt,
        completion,
        api_key_id=key_id,
        started_at=started_at,
        latency_ms=12.5,
        ttft_ms=3.0,
        status_code=status,
        error_kind=None if status == 200 else "Failure",
    )


def _expected(logs: list[QueryLog]) -> dict[str, Usage]:
    totals: dict[str, Usage] = {}
    for log in logs:
        totals[log.account_id] = totals.get(log.account_id, Usage()) + Usage(
            log.prompt_tokens, log.completion_tokens, 1
        )
    return totals


def _aware(value: datetime | None) -> bool:
    return value is not None and value.utcoffset() is not None


async def _new_key(store: SqlStore, account_id: str, name: str | None = None) -> ApiKey:
    made = generate_key()
    key = ApiKey(
        id=new_id("key"),
        account_id=account_id,
        prefix=made.prefix,
        hash=made.hash,
        name=name,
        created_at=now(),
        last_used_at=None,
        revoked_at=None,
    )
    await store.add_key(key)
    return key


async def _count_logs(store: SqlStore) -> int:
    async with store.session() as session:
        return (await session.execute(select(func.count()).select_from(QueryLogRow))).scalar_one()


# migrations


async def test_migrations_up_down_up(db_url: str):
    engine = make_engine(db_url)
    try:
        assert await current_revision(engine) is None

        await upgrade(engine)
        assert await current_revision(engine) == head_revision()
        async with engine.connect() as conn:
            assert await conn.run_sync(_table_names) >= TABLES

        await downgrade(engine, "base")
        assert await current_revision(engine) is None
        async with engine.connect() as conn:
            assert not TABLES & await conn.run_sync(_table_names)

        await upgrade(engine)
        assert await current_revision(engine) == head_revision()
        await upgrade(engine)  # already current: nothing to do
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()


async def test_migrated_schema_matches_the_models(store: SqlStore):
    async with store.engine.connect() as conn:
        diff = await conn.run_sync(_schema_diff)
    assert diff == []


async def test_store_works_after_down_and_up_again(store: SqlStore):
    account = await store.create_account("before", {})
    await store.write_logs([_log(account.id, 1, 1)])
    await downgrade(store.engine, "base")
    await upgrade(store.engine)
    assert await store.list_accounts() == []
    assert await store.usage(account.id) == Usage()
    again = await store.create_account("before", {})
    assert await store.get_account("before") == again


# accounts


async def test_accounts(store: SqlStore):
    alice = await store.create_account("alice", {})
    bob = await store.create_account("bob", {"rate_limit_minute": 5, "rate_limit_lifetime": 1000})

    assert alice.id.startswith("acct_")
    assert alice.id != bob.id
    assert alice.active
    assert _aware(alice.created_at)
    assert alice.rate_limit_minute is None
    assert (bob.rate_limit_minute, bob.rate_limit_hour, bob.rate_limit_lifetime) == (5, None, 1000)

    assert await store.get_account(alice.id) == alice
    assert await store.get_account("alice") == alice
    assert await store.get_account("bob") == bob
    assert await store.get_account("carol") is None
    fetched = await store.get_account(bob.id)
    assert fetched is not None
    assert _aware(fetched.created_at)
    assert fetched.created_at == bob.created_at

    assert [a.name for a in await store.list_accounts()] == ["alice", "bob"]

    await store.set_active(alice.id, False)
    disabled = await store.get_account("alice")
    assert disabled is not None
    assert not disabled.active
    assert (await store.get_account("bob")) == bob  # untouched
    await store.set_active(alice.id, True)
    enabled = await store.get_account(alice.id)
    assert enabled is not None
    assert enabled.active


async def test_duplicate_account_name_is_a_value_error(store: SqlStore):
    await store.create_account("alice", {})
    with pytest.raises(ValueError, match="alice"):
        await store.create_account("alice", {"rate_limit_day": 3})
    assert [a.name for a in await store.list_accounts()] == ["alice"]
    await store.create_account("alice2", {})  # the store is still usable afterwards


# keys


async def test_keys_add_find_list(store: SqlStore):
    alice = await store.create_account("alice", {})
    bob = await store.create_account("bob", {})
    k1 = await _new_key(store, alice.id, "laptop")
    k2 = await _new_key(store, alice.id)
    k3 = await _new_key(store, bob.id, "ci")

    found = await store.key_by_prefix(k1.prefix)
    assert found is not None
    key, account = found
    assert key == k1
    assert account == alice
    assert _aware(key.created_at)
    assert key.last_used_at is None
    assert key.revoked_at is None
    assert await store.key_by_prefix("0" * 12) is None

    assert await store.list_keys(alice.id) == [k1, k2]
    assert await store.list_keys(bob.id) == [k3]
    assert await store.list_keys() == [k1, k2, k3]
    assert await store.list_keys("acct_nobody") == []

    # the account comes with the key, current at lookup time
    await store.set_active(bob.id, False)
    found = await store.key_by_prefix(k3.prefix)
    assert found is not None
    assert not found[1].active


async def test_key_lookup_uses_no_deprecated_api(store: SqlStore):
    # Row.tuple() (deprecated in SQLAlchemy 2.1) once made every stored-key login fail here
    alice = await store.create_account("alice", {})
    key = await _new_key(store, alice.id)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert await store.key_by_prefix(key.prefix) is not None


async def test_revoke_by_id_and_by_prefix(store: SqlStore):
    alice = await store.create_account("alice", {})
    by_id = await _new_key(store, alice.id)
    by_prefix = await _new_key(store, alice.id)
    kept = await _new_key(store, alice.id)

    before = now()
    revoked = await store.revoke_key(by_id.id)
    assert revoked is not None
    assert revoked.id == by_id.id
    assert revoked.revoked_at is not None
    assert _aware(revoked.revoked_at)
    assert before <= revoked.revoked_at <= now()

    revoked2 = await store.revoke_key(by_prefix.prefix)
    assert revoked2 is not None
    assert revoked2.id == by_prefix.id
    assert revoked2.revoked_at is not None

    await asyncio.sleep(0.01)
    again = await store.revoke_key(by_id.prefix)  # twice, and by the other handle
    assert again is not None
    assert again.revoked_at == revoked.revoked_at
    again2 = await store.revoke_key(by_prefix.id)
    assert again2 is not None
    assert again2.revoked_at == revoked2.revoked_at

    found = await store.key_by_prefix(by_id.prefix)
    assert found is not None
    assert found[0].revoked_at == revoked.revoked_at
    assert _aware(found[0].revoked_at)
    assert await store.revoke_key("key_does_not_exist") is None

    states = {k.id: k.revoked_at for k in await store.list_keys(alice.id)}
    assert states == {
        by_id.id: revoked.revoked_at,
        by_prefix.id: revoked2.revoked_at,
        kept.id: None,
    }


async def test_key_times_round_trip_as_the_same_instant(store: SqlStore, db_url: str):
    alice = await store.create_account("alice", {})
    made = generate_key()
    created = datetime(2025, 6, 1, 8, 30, 15, 123456, tzinfo=UTC)
    key = ApiKey(new_id("key"), alice.id, made.prefix, made.hash, None, created, None, None)
    await store.add_key(key)
    found = await store.key_by_prefix(made.prefix)
    assert found is not None
    assert found[0].created_at == created
    assert found[0].created_at.utcoffset() == timedelta(0)


async def test_non_utc_times_keep_their_instant(store: SqlStore):
    alice = await store.create_account("alice", {})
    made = generate_key()
    plus_five = timezone(timedelta(hours=5))
    created = datetime(2025, 6, 1, 13, 30, tzinfo=plus_five)  # 08:30 UTC
    key = ApiKey(new_id("key"), alice.id, made.prefix, made.hash, None, created, None, None)
    await store.add_key(key)
    found = await store.key_by_prefix(made.prefix)
    assert found is not None
    assert found[0].created_at == created


# logs and totals


async def test_write_logs_totals_add_up_across_batches_and_accounts(store: SqlStore):
    alice = await store.create_account("alice", {})
    bob = await store.create_account("bob", {})
    accounts = [alice.id, bob.id, "key:0123456789abcdef"]  # settings keys have no account row
    written: list[QueryLog] = []
    for batch_number in range(5):
        batch = [
            _log(accounts[i % 3], prompt=i + batch_number, completion=2 * i + 1, status=200)
            for i in range(7 + batch_number)
        ]
        batch.append(_log(alice.id, 0, 0, status=422))  # failures are queries too
        assert await store.write_logs(batch) == len(batch)
        written += batch

    expected = _expected(written)
    for account_id in accounts:
        assert await store.usage(account_id) == expected[account_id]
    assert await store.usage("acct_unknown") == Usage()
    assert sum([(await store.usage(a)).queries for a in accounts]) == len(written)
    assert await _count_logs(store) == len(written)
    assert await store.write_logs([]) == 0


async def test_write_logs_is_idempotent_by_id(store: SqlStore):
    alice = await store.create_account("alice", {})
    first = [_log(alice.id, 10, 20) for _ in range(4)]
    assert await store.write_logs(first) == 4
    after_first = await store.usage(alice.id)
    assert after_first == Usage(40, 80, 4)

    assert await store.write_logs(first) == 0  # the same batch again adds nothing
    assert await store.usage(alice.id) == after_first

    fresh = [_log(alice.id, 1, 2) for _ in range(3)]
    mixed = [first[0], fresh[0], first[2], fresh[1], fresh[2]]
    assert await store.write_logs(mixed) == 3  # only the new rows count
    assert await store.usage(alice.id) == Usage(43, 86, 7)
    assert await _count_logs(store) == 7


async def test_a_row_repeated_within_one_batch_counts_once(store: SqlStore):
    alice = await store.create_account("alice", {})
    duplicated = _log(alice.id, 5, 5)
    added = await store.write_logs([duplicated, duplicated])
    assert await _count_logs(store) == 1
    assert await store.usage(alice.id) == Usage(5, 5, 1)
    assert added == 1


async def test_concurrent_retries_of_one_batch_count_once(store: SqlStore):
    alice = await store.create_account("alice", {})
    batch = [_log(alice.id, 3, 4) for _ in range(50)]
    added = await asyncio.gather(*(store.write_logs(batch) for _ in range(3)))
    assert sum(added) == 50
    assert await store.usage(alice.id) == Usage(150, 200, 50)
    assert await _count_logs(store) == 50


async def test_large_batch(store: SqlStore):
    alice = await store.create_account("alice", {})
    batch = [_log(alice.id, 1, i % 7) for i in range(2500)]
    assert await store.write_logs(batch) == 2500
    assert await store.usage(alice.id) == _expected(batch)[alice.id]
    assert await store.write_logs(batch) == 0


async def test_write_logs_sets_last_used_at_to_the_newest_start(store: SqlStore):
    alice = await store.create_account("alice", {})
    used = await _new_key(store, alice.id)
    other = await _new_key(store, alice.id)
    idle = await _new_key(store, alice.id)

    starts = [T0 + timedelta(minutes=m) for m in (3, 9, 1, 5)]
    batch = [_log(alice.id, 1, 1, key_id=used.id, started_at=s) for s in starts]
    batch.append(_log(alice.id, 1, 1, key_id=other.id, started_at=T0))
    batch.append(_log(alice.id, 1, 1, key_id=None, started_at=T0 + timedelta(hours=1)))
    await store.write_logs(batch)

    keys = {k.id: k for k in await store.list_keys(alice.id)}
    assert keys[used.id].last_used_at == T0 + timedelta(minutes=9)
    assert _aware(keys[used.id].last_used_at)
    assert keys[other.id].last_used_at == T0
    assert keys[idle.id].last_used_at is None

    # an older row written later does not move it back; a newer one moves it forward
    await store.write_logs([_log(alice.id, 1, 1, key_id=used.id, started_at=T0)])
    found = await store.key_by_prefix(used.prefix)
    assert found is not None
    assert found[0].last_used_at == T0 + timedelta(minutes=9)
    newest = T0 + timedelta(days=1, microseconds=7)
    await store.write_logs([_log(alice.id, 1, 1, key_id=used.id, started_at=newest)])
    found = await store.key_by_prefix(used.prefix)
    assert found is not None
    assert found[0].last_used_at == newest


async def test_rows_are_stored_as_given(store: SqlStore):
    alice = await store.create_account("alice", {})
    log = QueryLog(
        id=uuid.uuid4().hex,
        request_id="req-1",
        account_id=alice.id,
        api_key_id=None,
        model="m" * 200,
        started_at=T0,
        latency_ms=1234.5,
        ttft_ms=None,
        prompt_tokens=7,
        completion_tokens=0,
        status_code=499,
        error_kind="ClientDisconnected",
        streamed=True,
        tools=True,
        web_search=False,
        nilrag=True,
        multimodal=True,
    )
    await store.write_logs([log])
    async with store.session() as session:
        row = (await session.execute(select(QueryLogRow))).scalar_one()
        total = await session.get(UsageTotalRow, alice.id)
        key_rows = (await session.execute(select(ApiKeyRow))).scalars().all()
    assert (row.id, row.request_id, row.model, row.status_code, row.error_kind) == (
        log.id,
        "req-1",
        "m" * 200,
        499,
        "ClientDisconnected",
    )
    assert (row.streamed, row.tools, row.web_search, row.nilrag, row.multimodal) == (
        True,
        True,
        False,
        True,
        True,
    )
    assert row.ttft_ms is None
    assert row.latency_ms == 1234.5
    assert row.started_at.replace(tzinfo=UTC) == T0
    assert total is not None
    assert (total.prompt_tokens, total.completion_tokens, total.queries) == (7, 0, 1)
    assert key_rows == []

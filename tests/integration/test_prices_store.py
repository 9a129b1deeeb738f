"""Prices and costs in the SQL store, on SQLite and PostgreSQL alike (migration 0006 too)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from nilai.billing.prices import Price, PriceBook
from nilai.store.base import StoredPrice, Usage
from nilai.store.migrate import current_revision, downgrade, upgrade
from nilai.store.sql import SqlStore, make_engine
from nilai.usage.sink import UsageSink
from tests.support.records import query_log
from tests.support.servers import wait_until_async

pytestmark = pytest.mark.integration

DEFAULT = Price(2_000_000, 2_000_000, 50_000)


def _columns(sync: Connection, table: str) -> set[str]:
    return {column["name"] for column in inspect(sync).get_columns(table)}


def _tables(sync: Connection) -> set[str]:
    return set(inspect(sync).get_table_names())


# prices


async def test_set_list_replace_and_delete_prices(store: SqlStore):
    assert await store.list_prices() == []
    before = datetime.now(UTC)
    await store.set_price(StoredPrice("org/b-model", 1, 2, 3))
    await store.set_price(StoredPrice("a-model", 10**15, 0, 10**15))

    listed = await store.list_prices()
    assert [row.model for row in listed] == ["a-model", "org/b-model"]  # by model id
    assert (listed[0].prompt_per_million, listed[0].web_search) == (10**15, 10**15)
    assert all(row.updated_at is not None and row.updated_at >= before for row in listed)
    assert all(row.updated_at and row.updated_at.utcoffset() is not None for row in listed)

    await store.set_price(StoredPrice("org/b-model", 4, 5, 6))  # replaces, no duplicate
    replaced = {row.model: row for row in await store.list_prices()}
    assert len(replaced) == 2
    b = replaced["org/b-model"]
    assert (b.prompt_per_million, b.completion_per_million, b.web_search) == (4, 5, 6)
    assert b.updated_at is not None
    assert listed[1].updated_at is not None
    assert b.updated_at >= listed[1].updated_at

    assert await store.delete_price("org/b-model")
    assert not await store.delete_price("org/b-model")
    assert not await store.delete_price("never-priced")
    assert [row.model for row in await store.list_prices()] == ["a-model"]


async def test_a_model_id_of_200_characters_is_stored(store: SqlStore):
    model = "m" * 199 + "é"
    await store.set_price(StoredPrice(model, 1, 1, 1))
    assert [row.model for row in await store.list_prices()] == [model]


async def test_price_book_reads_what_another_process_wrote(store: SqlStore, db_url: str):
    book = PriceBook(store, DEFAULT)
    await book.refresh()
    assert book.price("m") == DEFAULT

    other = SqlStore(make_engine(db_url))  # another replica, or `nilai prices`, on its own pool
    try:
        await other.set_price(StoredPrice("m", 7, 8, 9))
        assert book.price("m") == DEFAULT  # not until the next refresh
        await book.refresh()
        assert book.price("m") == Price(7, 8, 9)
        assert await book.all() == {"m": Price(7, 8, 9)}

        await book.set("n", Price(1, 1, 1))
        assert {row.model for row in await other.list_prices()} == {"m", "n"}
        assert await book.delete("m")
        assert [row.model for row in await other.list_prices()] == ["n"]
        assert book.price("m") == DEFAULT
    finally:
        await other.aclose()


# costs


async def test_costs_are_added_to_the_totals_once(store: SqlStore):
    logs = [query_log("acct_a", 10, 5, cost_micro=1_500), query_log("acct_a", 1, 1, cost_micro=7)]
    logs.append(query_log("acct_b", 3, 3))  # no cost recorded: 0
    assert await store.write_logs(logs) == 3
    assert await store.usage("acct_a") == Usage(11, 6, 2, 1_507)
    assert await store.usage("acct_b") == Usage(3, 3, 1, 0)

    assert await store.write_logs(logs[:1]) == 0  # a retried row is not counted again
    assert await store.usage("acct_a") == Usage(11, 6, 2, 1_507)
    big = query_log("acct_a", 0, 0, cost_micro=2**62)  # BIGINT, not INTEGER
    await store.write_logs([big])
    assert (await store.usage("acct_a")).cost_micro == 2**62 + 1_507

    async with store.engine.connect() as conn:
        costs = await conn.execute(text("SELECT SUM(cost_micro) FROM query_logs"))
        assert costs.scalar_one() == 2**62 + 1_507


async def test_the_usage_sink_counts_costs_not_yet_written(store: SqlStore):
    sink = UsageSink(store, interval_s=0.05)
    sink.put(query_log("acct_a", 1, 2, cost_micro=300))
    sink.put(query_log("acct_a", 1, 2, cost_micro=200))
    assert sink.pending("acct_a") == Usage(2, 4, 2, 500)
    await sink.start()
    try:

        async def written() -> bool:
            return sink.depth == 0

        await wait_until_async(written, what="the rows to be written")
        assert sink.pending("acct_a") == Usage()
        assert await store.usage("acct_a") == Usage(2, 4, 2, 500)
    finally:
        await sink.aclose()


def test_usage_arithmetic_carries_the_cost():
    assert Usage(1, 2, 3, 4) + Usage(10, 20, 30, 40) == Usage(11, 22, 33, 44)
    assert Usage(11, 22, 33, 44) - Usage(10, 20, 30, 40) == Usage(1, 2, 3, 4)
    assert Usage(1, 1, 1).cost_micro == 0


# migration 0006


async def test_migration_0006_keeps_earlier_rows_at_cost_zero_and_goes_down_again(db_url: str):
    engine = make_engine(db_url)
    store = SqlStore(engine)
    try:
        await upgrade(engine, "0005")
        async with engine.begin() as conn:
            # A row as revision 0005 wrote it: no cost column yet.
            await conn.execute(
                text(
                    "INSERT INTO query_logs (id, request_id, account_id, model, started_at, "
                    "latency_ms, prompt_tokens, completion_tokens, status_code, streamed, tools, "
                    "web_search, nilrag, multimodal) VALUES ('old', 'r', 'acct_a', 'm', "
                    "'2025-01-01 00:00:00', 1.0, 3, 4, 200, false, false, false, false, false)"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO usage_totals (account_id, prompt_tokens, completion_tokens, "
                    "queries) VALUES ('acct_a', 3, 4, 1)"
                )
            )
        await upgrade(engine)
        assert await current_revision(engine) == "0006"
        assert await store.usage("acct_a") == Usage(3, 4, 1, 0)
        await store.write_logs([query_log("acct_a", 1, 1, cost_micro=9)])
        assert await store.usage("acct_a") == Usage(4, 5, 2, 9)
        await store.set_price(StoredPrice("m", 1, 1, 1))

        await downgrade(engine, "0005")
        async with engine.connect() as conn:
            assert "model_prices" not in await conn.run_sync(_tables)
            for table in ("query_logs", "usage_totals"):
                columns = await conn.run_sync(_columns, table)
                assert "cost_micro" not in columns
                assert "prompt_tokens" in columns
            totals = await conn.execute(text("SELECT queries FROM usage_totals"))
            assert totals.scalar_one() == 2  # the rest of the data stays

        await upgrade(engine)
        assert await store.list_prices() == []
        assert await store.usage("acct_a") == Usage(4, 5, 2, 0)
    finally:
        await engine.dispose()

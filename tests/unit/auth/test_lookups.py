"""``CachedLookup`` on its own, with a clock the test moves; which errors are outages."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from sqlalchemy import exc as sa_exc

from nilai.auth.lookups import CachedLookup, database_unavailable
from nilai.errors import AccountsUnavailable
from tests.support.timing import FakeClock

TTL_S = 3.0


class Source:
    """What the database holds, and every lookup made of it."""

    def __init__(self, **values: str) -> None:
        self.values = dict(values)
        self.asked: list[str] = []
        self.failure: BaseException | None = None
        self.hang = False

    async def fetch(self, key: str) -> str | None:
        self.asked.append(key)
        if self.hang:
            await asyncio.Event().wait()
        if self.failure is not None:
            raise self.failure
        return self.values.get(key)


class PgError(Exception):
    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


async def test_an_entry_is_served_for_the_ttl_and_looked_up_again_after_it():
    clock, source = FakeClock(), Source(k="v1")
    cache = CachedLookup(source.fetch, ttl_s=TTL_S, clock=clock)
    assert await cache.get("k") == "v1"
    source.values["k"] = "v2"  # e.g. revoked
    clock.now += TTL_S - 0.01
    assert await cache.get("k") == "v1"
    clock.now += 0.02
    assert await cache.get("k") == "v2"
    assert source.asked == ["k", "k"]


async def test_the_miss_budget_refills_so_a_new_key_gets_through_after_a_flood():
    clock, source = FakeClock(), Source(new="account")
    cache = CachedLookup(source.fetch, ttl_s=TTL_S, clock=clock, misses_per_s=10, miss_burst=5)
    for n in range(5):
        assert await cache.get(f"random-{n}") is None
    with pytest.raises(AccountsUnavailable) as info:
        await cache.get("new")  # a real new key, during the flood: retryable, not 401
    assert info.value.headers["Retry-After"] == "1"
    assert cache.shed == 1
    clock.now += 0.1  # one token back
    assert await cache.get("new") == "account"
    assert await cache.get("random-0") is None  # cached miss: free
    assert len(source.asked) == 6


async def test_keys_seen_before_are_never_charged_to_the_miss_budget():
    clock, source = FakeClock(), Source(known="account")
    cache = CachedLookup(source.fetch, ttl_s=TTL_S, clock=clock, misses_per_s=1, miss_burst=1)
    assert await cache.get("known") == "account"
    assert await cache.get("random") is None  # the only token
    for _ in range(5):
        clock.now += TTL_S + 1  # expired every time: a refresh, not a new key
        assert await cache.get("known") == "account"


async def test_negative_entries_are_bounded_oldest_evicted_first():
    clock, source = FakeClock(), Source()
    cache = CachedLookup(source.fetch, ttl_s=TTL_S, clock=clock, max_missing=3)
    for key in ["a", "b", "c", "d"]:
        assert await cache.get(key) is None
    assert await cache.get("d") is None
    assert await cache.get("a") is None  # evicted: asked again
    assert source.asked == ["a", "b", "c", "d", "a"]


async def test_found_entries_are_bounded_least_recently_used_evicted_first():
    clock, source = FakeClock(), Source(a="1", b="2", c="3")
    cache = CachedLookup(source.fetch, ttl_s=TTL_S, clock=clock, max_known=2)
    await cache.get("a")
    await cache.get("b")
    await cache.get("a")  # a is now the most recently used
    await cache.get("c")  # evicts b
    await cache.get("a")
    await cache.get("b")
    assert source.asked == ["a", "b", "c", "b"]


async def test_without_negative_caching_every_miss_asks_again():
    clock, source = FakeClock(), Source()
    cache = CachedLookup(source.fetch, ttl_s=TTL_S, clock=clock, cache_missing=False)
    assert await cache.get("holder") is None
    source.values["holder"] = "account"  # an operator created it
    assert await cache.get("holder") == "account"


async def test_a_lookup_that_hangs_is_answered_503_after_the_timeout():
    source = Source(k="v")
    source.hang = True
    cache = CachedLookup(source.fetch, ttl_s=TTL_S, timeout_s=0.01)
    with pytest.raises(AccountsUnavailable):
        await cache.get("k")
    assert cache.outages.down


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (TimeoutError(), True),
        (
            sa_exc.OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked")),
            True,
        ),
        (sa_exc.TimeoutError("QueuePool limit"), True),
        (sa_exc.DBAPIError("SELECT", {}, PgError("shutting down", "57P01")), True),
        (sa_exc.DBAPIError("SELECT", {}, PgError("canceling statement", "57014")), True),
        (sa_exc.DBAPIError("SELECT", {}, PgError("does not exist", "3D000")), False),
        (sa_exc.ProgrammingError("SELECT", {}, PgError("no such column", "42703")), False),
        (sa_exc.IntegrityError("INSERT", {}, PgError("duplicate key", "23505")), False),
        (ValueError("bad"), False),
    ],
)
def test_which_errors_mean_the_database_is_unavailable(error: BaseException, unavailable: bool):
    assert database_unavailable(error) is unavailable


def test_a_driver_error_chained_under_the_wrapper_counts():
    wrapper = RuntimeError("wrapped")
    wrapper.__cause__ = PgError("the database system is starting up", "57P03")
    assert database_unavailable(wrapper)

"""The limiters and the admission policy, on process memory and on this machine's real Redis.

Every behavioural test runs on both backends (the in-memory ones must behave like the Redis
ones); the lease-expiry, ``aclose`` and NOSCRIPT cases exist only for Redis. Redis keys live
under a unique prefix and are deleted afterwards; a case that must flush scripts or stop Redis
uses a private ``redis-server`` of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from nilai.auth.base import Principal, TokenLimit
from nilai.errors import LimitsUnavailable, RateLimited
from nilai.limits.base import ConcurrencyLimiter, Decision, Limit, RateLimiter
from nilai.limits.memory import MemoryConcurrencyLimiter, MemoryRateLimiter
from nilai.limits.policy import Admission, LimitDefaults
from nilai.limits.redis import RedisConcurrencyLimiter, RedisRateLimiter
from nilai.store.base import Account
from tests.conftest import REDIS_URL
from tests.support.private_redis import PrivateRedis
from tests.support.servers import free_port, wait_until_async
from tests.support.timing import finishes_within

pytestmark = pytest.mark.integration

LEASE_TTL_S = 1.5
OFF = LimitDefaults(
    minute=None,
    hour=None,
    day=None,
    lifetime=None,
    model_concurrency=50,
    web_search_rps=None,
    web_search_minute=None,
    web_search_hour=None,
    web_search_day=None,
)
"""Every request limit switched off; each test switches on the ones it is about."""


@dataclass
class LimitBackend:
    name: str
    rate: RateLimiter
    concurrency: ConcurrencyLimiter
    redis: Redis | None
    prefix: str

    def another_concurrency(self) -> ConcurrencyLimiter:
        """A second limiter on the same store, as another replica would hold."""
        if self.redis is None:
            raise ValueError("process memory is not shared")
        return RedisConcurrencyLimiter(self.redis, self.prefix, ttl_s=LEASE_TTL_S)

    def admission(self, defaults: LimitDefaults = OFF, *, fail_open: bool = False) -> Admission:
        return Admission(self.rate, self.concurrency, defaults, fail_open=fail_open)


@asynccontextmanager
async def redis_backend() -> AsyncIterator[LimitBackend]:
    """Limiters on this machine's Redis under a fresh prefix, deleted afterwards."""
    prefix = f"nilai-test-limits-{uuid.uuid4().hex[:12]}:"
    client = Redis.from_url(REDIS_URL)
    concurrency = RedisConcurrencyLimiter(client, prefix, ttl_s=LEASE_TTL_S)
    try:
        yield LimitBackend("redis", RedisRateLimiter(client, prefix), concurrency, client, prefix)
    finally:
        await concurrency.aclose()
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def limit_backend(request: pytest.FixtureRequest) -> AsyncIterator[LimitBackend]:
    if request.param == "memory":
        rate = MemoryRateLimiter()
        limiter = MemoryConcurrencyLimiter(rate)
        yield LimitBackend("memory", rate, limiter, None, "")
        await limiter.aclose()
        return
    async with redis_backend() as shared:
        yield shared


@pytest.fixture
async def shared_redis() -> AsyncIterator[LimitBackend]:
    """The Redis backend alone, for what only a shared store does (leases outliving a holder)."""
    async with redis_backend() as shared:
        yield shared


def _key() -> str:
    return f"k-{uuid.uuid4().hex[:8]}"


def _member() -> str:
    return uuid.uuid4().hex


async def _hits(rate: RateLimiter, limits: list[Limit], n: int) -> list[Decision]:
    return [await rate.hit(limits, _member()) for _ in range(n)]


# --- sliding windows ----------------------------------------------------------------------


async def test_window_admits_exactly_n_then_names_the_refusing_limit(limit_backend: LimitBackend):
    minute = Limit(_key(), "requests per minute", 5, 60)
    decisions = await _hits(limit_backend.rate, [minute], 5)
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0]
    assert all(d.limit == minute for d in decisions)
    assert all(0 < d.reset_s <= 60 for d in decisions)

    refused = await limit_backend.rate.hit([minute], _member())
    assert not refused.allowed
    assert refused.limit == minute
    assert refused.remaining == 0
    assert 0 < refused.reset_s <= 60
    assert 1 <= refused.retry_after_s <= 60
    # Refused requests are not counted: the window stays full at exactly five.
    again = await limit_backend.rate.hit([minute], _member())
    assert not again.allowed
    assert again.reset_s <= refused.reset_s


async def test_several_limits_are_all_or_nothing(limit_backend: LimitBackend):
    small = Limit(_key(), "requests per minute", 3, 60)
    large = Limit(_key(), "requests per hour", 10, 3600)
    admitted = await _hits(limit_backend.rate, [large, small], 3)
    # An admitted request names the limit with the least room left.
    assert [(d.limit, d.remaining) for d in admitted] == [(small, 2), (small, 1), (small, 0)]

    for _ in range(5):
        refused = await limit_backend.rate.hit([large, small], _member())
        assert not refused.allowed
        assert refused.limit == small

    # The five refusals took nothing from the hour: 3 used, so 7 are left.
    left = await _hits(limit_backend.rate, [large], 7)
    assert [d.remaining for d in left] == [6, 5, 4, 3, 2, 1, 0]
    refused = await limit_backend.rate.hit([large], _member())
    assert (refused.allowed, refused.limit) == (False, large)


async def test_a_full_later_limit_refuses_without_counting_the_earlier_ones(
    limit_backend: LimitBackend,
):
    first = Limit(_key(), "requests per minute", 10, 60)
    full = Limit(_key(), "requests in total", 1, None)
    assert (await limit_backend.rate.hit([full], _member())).allowed
    for _ in range(3):
        refused = await limit_backend.rate.hit([first, full], _member())
        assert (refused.allowed, refused.limit) == (False, full)
    assert (await limit_backend.rate.hit([first], _member())).remaining == 9


async def test_window_slides_and_lifetime_never_resets(limit_backend: LimitBackend):
    second = Limit(_key(), "requests per second", 2, 1)
    total = Limit(_key(), "requests in total", 4, None)
    assert (await limit_backend.rate.hit([second, total], _member())).allowed
    await asyncio.sleep(0.5)
    assert (await limit_backend.rate.hit([second, total], _member())).allowed
    refused = await limit_backend.rate.hit([second, total], _member())
    assert (refused.allowed, refused.limit) == (False, second)
    # Sliding, not fixed: room returns when the oldest request, at least 0.5 s old by now,
    # leaves the window (a few ms of slack for the store's rounding).
    assert 0 < refused.reset_s <= 0.5 + 0.01
    await asyncio.sleep(refused.reset_s + 0.05)
    assert (await limit_backend.rate.hit([second, total], _member())).allowed
    still = await limit_backend.rate.hit([second, total], _member())
    assert (still.allowed, still.limit) == (False, second)  # the 0.5 s one is still inside

    await asyncio.sleep(1.05)
    assert (await limit_backend.rate.hit([second, total], _member())).allowed  # 4th in total
    await asyncio.sleep(1.05)
    spent = await limit_backend.rate.hit([second, total], _member())
    assert (spent.allowed, spent.limit, spent.remaining) == (False, total, 0)
    assert spent.reset_s == 0
    assert spent.retry_after_s == 1


async def test_windows_of_different_keys_are_independent(limit_backend: LimitBackend):
    one, two = Limit(_key(), "a", 1, 60), Limit(_key(), "b", 1, 60)
    assert (await limit_backend.rate.hit([one], _member())).allowed
    assert (await limit_backend.rate.hit([two], _member())).allowed
    assert not (await limit_backend.rate.hit([one], _member())).allowed


async def test_concurrent_hits_admit_exactly_n(limit_backend: LimitBackend):
    limit = Limit(_key(), "requests per minute", 7, 60)
    decisions = await asyncio.gather(
        *(limit_backend.rate.hit([limit], _member()) for _ in range(30))
    )
    assert sum(d.allowed for d in decisions) == 7


# --- concurrency leases -------------------------------------------------------------------


async def test_leases_hold_k_slots_and_release_them(limit_backend: LimitBackend):
    key = _key()
    async with AsyncExitStack() as stack:
        held = [
            await stack.enter_async_context(limit_backend.concurrency.lease(key, 3)) for _ in "abc"
        ]
        assert all(d.allowed for d in held)
        assert [d.remaining for d in held] == [2, 1, 0]

        with pytest.raises(RateLimited) as refused:
            async with limit_backend.concurrency.lease(key, 3):
                pytest.fail("a fourth slot was granted")
        error = refused.value
        assert error.status == 429
        assert error.decision.retry_after_s >= 1
        assert error.decision.limit is not None
        assert error.decision.limit.count == 3
        assert "concurrent requests for this model" in error.message
        assert int(error.headers["Retry-After"]) >= 1
        assert error.headers["X-RateLimit-Remaining"] == "0"

        async with limit_backend.concurrency.lease(_key(), 3) as other:  # other keys are separate
            assert other.allowed
    # All three returned on leaving the block: three fit again.
    async with AsyncExitStack() as stack:
        for _ in range(3):
            await stack.enter_async_context(limit_backend.concurrency.lease(key, 3))


async def test_releasing_one_lease_admits_the_next(limit_backend: LimitBackend):
    key = _key()
    async with AsyncExitStack() as stack:
        first = AsyncExitStack()
        await first.enter_async_context(limit_backend.concurrency.lease(key, 2))
        await stack.enter_async_context(limit_backend.concurrency.lease(key, 2))
        with pytest.raises(RateLimited):
            await stack.enter_async_context(limit_backend.concurrency.lease(key, 2))
        await first.aclose()
        await stack.enter_async_context(limit_backend.concurrency.lease(key, 2))
        with pytest.raises(RateLimited):
            await stack.enter_async_context(limit_backend.concurrency.lease(key, 2))


async def test_a_lease_is_released_when_its_block_raises(limit_backend: LimitBackend):
    key = _key()
    for _ in range(3):
        with pytest.raises(RuntimeError, match="boom"):
            async with limit_backend.concurrency.lease(key, 1):
                raise RuntimeError("boom")
    task_started = asyncio.Event()

    async def hold() -> None:
        async with limit_backend.concurrency.lease(key, 1):
            task_started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(hold())
    await task_started.wait()
    with pytest.raises(RateLimited):
        async with limit_backend.concurrency.lease(key, 1):
            pass
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    async with limit_backend.concurrency.lease(key, 1) as decision:  # cancellation released it
        assert decision.allowed


async def test_redis_lease_expires_when_its_holder_stops_renewing(shared_redis: LimitBackend):
    limit_backend = shared_redis
    dead = limit_backend.another_concurrency()
    alive = limit_backend.another_concurrency()
    other = limit_backend.another_concurrency()
    abandoned_key, renewed_key = _key(), _key()
    abandoned = dead.lease(abandoned_key, 1)
    await abandoned.__aenter__()
    # The replica "dies": its renewals stop and it never releases.
    keeper = dead._keeper  # the renewing task: what a dead replica loses
    assert keeper is not None
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper
    redis = limit_backend.redis
    assert redis is not None

    async def redis_ms() -> int:
        seconds, micros = await redis.time()
        return seconds * 1000 + micros // 1000

    async def expiry_ms(key: str) -> float:
        [(_, score)] = await redis.zrange(limit_backend.prefix + key, 0, -1, withscores=True)
        return score

    try:
        async with alive.lease(renewed_key, 1):
            with pytest.raises(RateLimited) as refused:
                async with other.lease(abandoned_key, 1):
                    pass
            assert 1 <= refused.value.decision.retry_after_s <= 2  # until the lease expires
            # The abandoned lease ends one lifetime after it was last renewed, by Redis's clock.
            assert await expiry_ms(abandoned_key) - await redis_ms() <= LEASE_TTL_S * 1000
            first_expiry = await expiry_ms(renewed_key)

            async def abandoned_freed() -> bool:
                # Meanwhile the held one is renewed in the background: never free.
                with pytest.raises(RateLimited):
                    async with other.lease(renewed_key, 1):
                        pass
                try:
                    async with other.lease(abandoned_key, 1):
                        return True
                except RateLimited:
                    return False

            await wait_until_async(abandoned_freed, timeout_s=10 * LEASE_TTL_S, interval_s=0.1)

            async def renewed_for_three_lifetimes() -> bool:
                with pytest.raises(RateLimited):
                    async with other.lease(renewed_key, 1):
                        pass
                return await redis_ms() > first_expiry + 2 * LEASE_TTL_S * 1000

            # Past its first expiry by two more lifetimes, by Redis's clock, and still held.
            await wait_until_async(
                renewed_for_three_lifetimes, timeout_s=10 * LEASE_TTL_S, interval_s=0.1
            )
    finally:
        await abandoned.__aexit__(None, None, None)
        await dead.aclose()
        await alive.aclose()
        await other.aclose()
    async with other.lease(renewed_key, 1):
        pass


async def test_redis_aclose_releases_every_held_slot(shared_redis: LimitBackend):
    limit_backend = shared_redis
    replica, other = limit_backend.another_concurrency(), limit_backend.another_concurrency()
    key = _key()
    held = [replica.lease(key, 2) for _ in range(2)]
    for lease in held:
        await lease.__aenter__()
    with pytest.raises(RateLimited):
        async with other.lease(key, 2):
            pass
    await replica.aclose()
    async with other.lease(key, 2), other.lease(key, 2):
        pass
    for lease in held:
        await lease.__aexit__(None, None, None)
    await other.aclose()


async def test_redis_scripts_are_reloaded_after_a_script_flush(private_redis: PrivateRedis):
    client = Redis.from_url(private_redis.url)
    rate = RedisRateLimiter(client, "p:")
    concurrency = RedisConcurrencyLimiter(client, "p:", ttl_s=LEASE_TTL_S)
    limit = Limit("k", "requests per minute", 3, 60)
    try:
        assert (await rate.hit([limit], _member())).allowed
        async with concurrency.lease("slots", 1):
            pass
        await client.script_flush()  # this server is private to the test
        assert (await rate.hit([limit], _member())).remaining == 1
        async with concurrency.lease("slots", 1):
            await client.script_flush()
            await asyncio.sleep(LEASE_TTL_S / 3 + 0.2)  # one renewal after the flush
            assert await client.zcard("p:slots") == 1
    finally:
        await concurrency.aclose()
        await client.aclose()


# --- the admission policy -----------------------------------------------------------------


def _account(**limits: int | None) -> Account:
    return Account(
        id=f"acct-{uuid.uuid4().hex[:8]}",
        name="test",
        created_at=datetime.now(UTC),
        active=True,
        **limits,
    )


def _principal(
    account: Account | None = None, *, token_limits: tuple[TokenLimit, ...] = ()
) -> Principal:
    account_id = account.id if account else f"acct-{uuid.uuid4().hex[:8]}"
    return Principal(account_id, "api_key", account=account, token_limits=token_limits)


async def _admit_until_refused(admission: Admission, principal: Principal, **kwargs: bool) -> int:
    for admitted in range(100):
        try:
            await admission.admit(principal, **kwargs)
        except RateLimited:
            return admitted
    raise AssertionError("never refused")


async def test_account_overrides_beat_the_defaults(limit_backend: LimitBackend):
    defaults = replace(OFF, minute=5, hour=4, lifetime=10)
    admission = limit_backend.admission(defaults)

    plain = _principal()
    assert await _admit_until_refused(admission, plain) == 4  # the hour default decides

    roomy = _account(rate_limit_minute=3, rate_limit_hour=100)
    assert await _admit_until_refused(admission, _principal(roomy)) == 3
    with pytest.raises(RateLimited) as refused:
        await admission.admit(_principal(roomy))
    assert "3 requests per minute for this account" in refused.value.message
    assert refused.value.status == 429

    lifetime = _account(rate_limit_lifetime=2, rate_limit_minute=50)
    assert await _admit_until_refused(admission, _principal(lifetime)) == 2
    with pytest.raises(RateLimited) as spent:
        await admission.admit(_principal(lifetime))
    assert "2 requests in total for this account" in spent.value.message


async def test_a_switched_off_default_can_be_set_per_account(limit_backend: LimitBackend):
    admission = limit_backend.admission(OFF)
    unlimited = _principal()
    for _ in range(20):
        decision = await admission.admit(unlimited)
        assert decision.allowed
        assert decision.limit is None
    limited = _account(rate_limit_day=2)
    assert await _admit_until_refused(admission, _principal(limited)) == 2


async def test_token_uses_admit_n_then_refuse(limit_backend: LimitBackend):
    admission = limit_backend.admission(OFF)
    account = _account()
    token = _principal(account, token_limits=(TokenLimit("tok-1", 3),))
    decisions = [await admission.admit(token) for _ in range(3)]
    assert [d.remaining for d in decisions] == [2, 1, 0]
    with pytest.raises(RateLimited) as refused:
        await admission.admit(token)
    assert "3 uses of this token" in refused.value.message
    assert refused.value.decision.retry_after_s >= 1
    # Another token of the same account has its own count; the account itself is not limited.
    assert (
        await admission.admit(_principal(account, token_limits=(TokenLimit("tok-2", 1),)))
    ).allowed
    assert (await admission.admit(_principal(account))).allowed


async def test_token_use_count_is_dropped_with_its_token(limit_backend: LimitBackend):
    """A counter for a token lives until the token expires (plus a skew margin), no longer."""
    gone = datetime.fromtimestamp(time.time() - 3600, UTC)
    expired = Limit(f"{{acct:x}}:token:{uuid.uuid4().hex}", "uses", 1, None, expires_at=1.0)
    assert (await limit_backend.rate.hit([expired], "m1")).allowed
    # The count is dropped at once: a second use is admitted rather than refused forever.
    assert (await limit_backend.rate.hit([expired], "m2")).allowed
    if limit_backend.redis is not None:
        assert await limit_backend.redis.exists(limit_backend.prefix + expired.key) == 0
        live = _principal(_account(), token_limits=(TokenLimit("tok-live", 1, gone),))
        key = (
            limit_backend.prefix
            + limit_backend.admission(OFF).account_limits(live, web_search=False)[0].key
        )
        assert (await limit_backend.admission(OFF).admit(live)).allowed
        ttl_ms = await limit_backend.redis.pttl(key)
        # Expired an hour ago plus a 300 s margin: still gone at once. A live token keeps it.
        assert ttl_ms == -2
        future = datetime.fromtimestamp(time.time() + 60, UTC)
        live = _principal(_account(), token_limits=(TokenLimit("tok-future", 1, future),))
        key = (
            limit_backend.prefix
            + limit_backend.admission(OFF).account_limits(live, web_search=False)[0].key
        )
        assert (await limit_backend.admission(OFF).admit(live)).allowed
        assert 350_000 <= await limit_backend.redis.pttl(key) <= 361_000


async def test_web_search_limits_count_only_web_search_requests(limit_backend: LimitBackend):
    defaults = replace(OFF, minute=6, web_search_minute=2)
    admission = limit_backend.admission(defaults)
    principal = _principal()
    for _ in range(2):
        assert (await admission.admit(principal)).allowed
    for _ in range(2):
        assert (await admission.admit(principal, web_search=True)).allowed
    with pytest.raises(RateLimited) as refused:
        await admission.admit(principal, web_search=True)
    assert "2 web searches per minute" in refused.value.message
    # Plain requests still pass until the account's own minute (6) is spent.
    assert await _admit_until_refused(admission, principal) == 2


async def test_web_search_per_second_counts_searches_of_all_accounts(
    limit_backend: LimitBackend,
):
    defaults = replace(OFF, web_search_rps=3)
    admission = limit_backend.admission(defaults)
    # A web search request is admitted on its account's limits only ...
    for _ in range(5):
        assert (await admission.admit(_principal(), web_search=True)).allowed
    # ... and each search it makes at the provider counts against all accounts' second.
    for _ in range(3):
        assert (await admission.admit_search()).allowed
    with pytest.raises(RateLimited) as refused:
        await admission.admit_search()
    assert "3 web searches per second (all accounts)" in refused.value.message
    assert refused.value.decision.retry_after_s == 1
    assert refused.value.decision.limit is not None
    assert refused.value.decision.limit.kind == "web_search_all_accounts"
    assert (await admission.admit(_principal(), web_search=True)).allowed  # not a search
    await asyncio.sleep(refused.value.decision.reset_s + 0.05)
    assert (await admission.admit_search()).allowed


async def test_searches_per_second_off_asks_nothing(limit_backend: LimitBackend):
    admission = limit_backend.admission(replace(OFF, web_search_rps=None))
    for _ in range(50):
        assert (await admission.admit_search()).allowed


async def test_model_slots_use_the_per_model_override(limit_backend: LimitBackend):
    defaults = replace(OFF, model_concurrency=2, model_concurrency_overrides=(("big", 1),))
    admission = limit_backend.admission(defaults)
    async with admission.model_slot("big") as decision:
        assert (decision.allowed, decision.remaining) == (True, 0)
        with pytest.raises(RateLimited) as refused:
            async with admission.model_slot("big"):
                pass
        assert "1 concurrent requests for this model" in refused.value.message
        async with admission.model_slot("small"), admission.model_slot("small"):
            with pytest.raises(RateLimited):
                async with admission.model_slot("small"):
                    pass
    with pytest.raises(ValueError, match="inside"):
        async with admission.model_slot("big"):
            raise ValueError("inside")
    async with admission.model_slot("big"):
        pass


async def test_admitting_to_a_model_counts_and_takes_a_slot_both_or_neither(
    limit_backend: LimitBackend,
):
    admission = limit_backend.admission(replace(OFF, minute=2, model_concurrency=1))
    principal = _principal()
    async with admission.admit_to_model(principal, "m") as decision:
        # The decision is the request limits' (the rate-limit headers), not the slot's.
        assert decision.limit is not None
        assert (decision.limit.kind, decision.remaining) == ("minute", 1)
        with pytest.raises(RateLimited) as full_slot:
            async with admission.admit_to_model(principal, "m"):
                pytest.fail("a second slot of a model capped at one")
        assert full_slot.value.decision.limit is not None
        assert full_slot.value.decision.limit.kind == "model_concurrency"
    # The request refused for its slot was not counted: one request of the minute is left.
    async with admission.admit_to_model(principal, "m") as decision:
        assert decision.remaining == 0
    with pytest.raises(RateLimited) as full_window:
        async with admission.admit_to_model(principal, "m"):
            pytest.fail("a third request in a minute of two")
    assert full_window.value.decision.limit is not None
    assert full_window.value.decision.limit.kind == "minute"
    # ... and the request refused for its window took no slot.
    async with admission.model_slot("m") as slot:
        assert slot.allowed


async def test_admitting_to_a_model_is_one_round_trip_and_releasing_one_more(
    shared_redis: LimitBackend,
):
    assert shared_redis.redis is not None
    sent: list[str] = []
    send = shared_redis.redis.execute_command

    async def counted(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return await send(*args, **options)

    shared_redis.redis.execute_command = counted  # type: ignore[method-assign]
    admission = shared_redis.admission(replace(OFF, minute=5, hour=50, model_concurrency=3))
    async with admission.admit_to_model(_principal(), "m", web_search=False):
        assert sent == ["EVALSHA"]
    assert sent == ["EVALSHA", "ZREM"]


@pytest.fixture
async def unreachable() -> AsyncIterator[Redis]:
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    yield client
    await client.aclose()


def _redis_admission(client: Redis, *, fail_open: bool) -> Admission:
    defaults = replace(OFF, minute=5, web_search_rps=2)
    return Admission(
        RedisRateLimiter(client, "p:"),
        RedisConcurrencyLimiter(client, "p:", ttl_s=LEASE_TTL_S),
        defaults,
        fail_open=fail_open,
    )


async def test_unreachable_redis_fails_closed(unreachable: Redis):
    admission = _redis_admission(unreachable, fail_open=False)
    for web_search in (False, True):
        with (
            finishes_within(10, "refusing without Redis"),
            pytest.raises(LimitsUnavailable) as refused,
        ):
            await admission.admit(_principal(), web_search=web_search)
        error = refused.value
        assert error.status == 503
        assert "Redis" in error.message
        assert "Rate limiting" in error.message
        assert error.headers["Retry-After"] == "1"
    with pytest.raises(LimitsUnavailable):
        await admission.admit_search()
    with pytest.raises(LimitsUnavailable):
        async with admission.model_slot("m"):
            pytest.fail("a slot was granted without Redis")
    await admission.aclose()


async def test_unreachable_redis_fails_open_when_configured(unreachable: Redis):
    admission = _redis_admission(unreachable, fail_open=True)
    for _ in range(10):  # more than the minute allows: nothing is counted
        decision = await admission.admit(_principal(), web_search=True)
        assert decision.allowed
        assert decision.limit is None
        assert (await admission.admit_search()).allowed
    async with admission.model_slot("m") as slot:
        assert slot.allowed
    await admission.aclose()


async def test_admission_recovers_when_redis_comes_back(tmp_path: Path):
    server = PrivateRedis(tmp_path / "redis").start()
    client = Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=1)
    admission = _redis_admission(client, fail_open=False)
    try:
        assert (await admission.admit(_principal())).allowed
        server.stop()
        with pytest.raises(LimitsUnavailable):
            await admission.admit(_principal())
        server.start()  # the same port, a new process with nothing in it
        # A fresh server has no scripts loaded: EVALSHA's NOSCRIPT is answered by a reload.
        assert (await admission.admit(_principal())).allowed
        async with admission.model_slot("m") as slot:
            assert slot.allowed
    finally:
        await admission.aclose()
        await client.aclose()
        server.stop()

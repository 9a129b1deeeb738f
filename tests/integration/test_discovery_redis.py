import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from nilai.discovery.base import EndpointRecord
from nilai.discovery.redis import RedisDiscovery
from nilai.protocol.models import ModelCard

REDIS_URL = "redis://127.0.0.1:6379/0"

pytestmark = pytest.mark.integration


@dataclass
class Registry:
    """This test's discovery in Redis: the client, its key prefix and the discovery over them."""

    redis: Redis
    prefix: str
    discovery: RedisDiscovery

    @property
    def index(self) -> str:
        return f"{self.prefix}discovery:index"

    def key(self, endpoint: str) -> str:
        return f"{self.prefix}discovery:endpoint:{endpoint}"

    async def members(self) -> set[str]:
        return {m.decode() for m in await self.redis.smembers(self.index)}


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    prefix = f"test-{uuid.uuid4().hex}:"
    redis = Redis.from_url(REDIS_URL)
    try:
        yield Registry(redis, prefix, RedisDiscovery(redis, prefix))
    finally:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=100)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


def _record(url: str, *models: str, registered_at: float = 1.0) -> EndpointRecord:
    cards = tuple(ModelCard(id=m, max_model_len=4096) for m in models or ("m",))
    return EndpointRecord(url=url, models=cards, registered_at=registered_at)


def _by_url(records: list[EndpointRecord]) -> dict[str, EndpointRecord]:
    return {record.url: record for record in records}


async def test_ping(registry: Registry):
    await registry.discovery.ping()
    await registry.discovery.aclose()  # the client stays usable: it belongs to the caller
    await registry.discovery.ping()


async def test_register_and_list(registry: Registry):
    assert await registry.discovery.list() == []
    record = _record("http://a:8000", "m1", "m2")
    await registry.discovery.register(record, 10)
    assert await registry.discovery.list() == [record]
    assert await registry.members() == {record.id}
    ttl_ms = await registry.redis.pttl(registry.key(record.id))
    assert 0 < ttl_ms <= 10_000


async def test_register_replaces_the_record(registry: Registry):
    await registry.discovery.register(_record("http://a", "old"), 10)
    newer = _record("http://a", "new", registered_at=2.0)
    await registry.discovery.register(newer, 10)
    assert await registry.discovery.list() == [newer]


async def test_several_endpoints_for_one_model(registry: Registry):
    records = [_record(f"http://node-{i}:8000", "shared", "m") for i in range(3)]
    for record in records:
        await registry.discovery.register(record, 10)
    listed = await registry.discovery.list()
    assert _by_url(listed) == _by_url(records)
    assert len(listed) == 3
    for record in listed:
        assert [card.id for card in record.models] == ["shared", "m"]


async def test_heartbeat_renews_lease(registry: Registry):
    record = _record("http://a")
    await registry.discovery.register(record, 0.2)
    assert await registry.discovery.heartbeat(record.id, 30) is True
    ttl_ms = await registry.redis.pttl(registry.key(record.id))
    assert 20_000 < ttl_ms <= 30_000


async def test_heartbeat_of_unknown_endpoint_is_false(registry: Registry):
    assert await registry.discovery.heartbeat("0123456789abcdef", 10) is False
    assert await registry.redis.exists(registry.key("0123456789abcdef")) == 0


async def test_deregister(registry: Registry):
    first, second = _record("http://a"), _record("http://b")
    await registry.discovery.register(first, 10)
    await registry.discovery.register(second, 10)
    await registry.discovery.deregister(first.id)
    assert await registry.discovery.list() == [second]
    assert await registry.members() == {second.id}
    assert await registry.redis.exists(registry.key(first.id)) == 0
    assert await registry.discovery.heartbeat(first.id, 10) is False
    await registry.discovery.deregister(first.id)  # absent: no error


async def test_lease_expiry_removes_record_and_index_entry(registry: Registry):
    short, long = _record("http://short"), _record("http://long")
    await registry.discovery.register(short, 0.2)
    await registry.discovery.register(long, 10)
    assert len(await registry.discovery.list()) == 2
    await asyncio.sleep(0.4)
    assert await registry.members() == {short.id, long.id}  # until list() cleans up
    assert await registry.discovery.list() == [long]
    assert await registry.members() == {long.id}
    assert await registry.discovery.heartbeat(short.id, 10) is False


async def test_prefixes_are_isolated(registry: Registry):
    other = RedisDiscovery(registry.redis, registry.prefix + "other:")
    await registry.discovery.register(_record("http://a"), 10)
    assert await other.list() == []
    await other.register(_record("http://b"), 10)
    assert [r.url for r in await registry.discovery.list()] == ["http://a"]
    assert [r.url for r in await other.list()] == ["http://b"]


class _RegisterBeforeSrem:
    """A Redis client whose next SREM is preceded by another client's registration."""

    def __init__(self, redis: Redis, register: Callable[[], Awaitable[None]]) -> None:
        self._redis = redis
        self._register: Callable[[], Awaitable[None]] | None = register

    def __getattr__(self, name: str) -> object:
        return getattr(self._redis, name)

    async def srem(self, *args: object) -> object:
        register, self._register = self._register, None
        if register is not None:
            await register()
        return await self._redis.srem(*args)  # type: ignore[arg-type]


async def test_registration_racing_with_expiry_cleanup_stays_listed(registry: Registry):
    record = _record("http://racer")
    announcer_side = RedisDiscovery(registry.redis, registry.prefix)
    await announcer_side.register(record, 0.05)
    await asyncio.sleep(0.1)  # the lease runs out

    async def reregister() -> None:
        await announcer_side.register(record, 10)

    gateway_side = RedisDiscovery(
        _RegisterBeforeSrem(registry.redis, reregister),  # type: ignore[arg-type]
        registry.prefix,
    )
    assert await gateway_side.list() == []  # it saw the lease expired: fine
    # The announcer's lease is alive again, and its heartbeats succeed ...
    assert await announcer_side.heartbeat(record.id, 10) is True
    # ... so it must be listed.
    assert await registry.discovery.list() == [record]


async def test_generation_survives_servers_coming_and_going_but_not_lost_data(registry: Registry):
    first = await registry.discovery.generation()
    assert first == await registry.discovery.generation()
    await registry.discovery.register(_record("http://a:1"), 10)
    await registry.discovery.heartbeat(_record("http://a:1").id, 10)
    await registry.discovery.deregister(_record("http://a:1").id)
    assert await registry.discovery.list() == []
    assert await registry.discovery.generation() == first  # the last server left: nothing lost

    # What a Redis restart without persistence or a flush does (to this test's keys only).
    keys = [key async for key in registry.redis.scan_iter(match=f"{registry.prefix}*", count=100)]
    await registry.redis.delete(*keys)
    second = await registry.discovery.generation()
    assert second != first
    other_gateway = RedisDiscovery(registry.redis, registry.prefix)
    assert await other_gateway.generation() == second  # every reader sees the same new one

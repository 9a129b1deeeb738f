"""Discovery outage lines name the Redis they could not reach, its password masked."""

import asyncio
import logging
from typing import override

import httpx
import pytest
from redis.asyncio import Redis

from nilai.discovery.announcer import Announcer
from nilai.discovery.base import EndpointRecord
from nilai.discovery.redis import RedisDiscovery
from nilai.discovery.snapshot import DiscoverySnapshot
from nilai.state.redis import redis_location

SECRET = "hunter2-redis"
# Nothing listens on port 1: every command fails at once with "connection refused".
UNREACHABLE = f"redis://:{SECRET}@127.0.0.1:1/3"
SHOWN = "redis://:***@127.0.0.1:1/3"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (UNREACHABLE, SHOWN),
        (
            f"redis://nilai:{SECRET}@redis.internal:6380/0",
            "redis://nilai:***@redis.internal:6380/0",
        ),
        ("rediss://redis.internal", "rediss://redis.internal:6379/0"),
        ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
    ],
)
def test_a_redis_location_is_its_url_with_the_password_masked(url: str, shown: str):
    assert redis_location(Redis.from_url(url)) == shown


async def test_a_discovery_refresh_outage_names_the_masked_redis_url(
    caplog: pytest.LogCaptureFixture,
):
    redis = Redis.from_url(UNREACHABLE, socket_connect_timeout=1)
    async with httpx.AsyncClient() as http:
        snapshot = DiscoverySnapshot(RedisDiscovery(redis, "test:"), http, refresh_s=60, eject_s=30)
        with caplog.at_level(logging.WARNING):
            await snapshot.refresh()
            await snapshot.refresh()
    await redis.aclose()
    down = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(down) == 1, down  # once per outage, not once per refresh
    assert down[0].startswith(f"discovery ({SHOWN}) unavailable")
    assert SECRET not in caplog.text


class StopsAfterThreeAttempts(RedisDiscovery):
    """Redis discovery that ends the announcer's run once it has failed three times."""

    def __init__(self, redis: Redis, stop: asyncio.Event) -> None:
        super().__init__(redis, "test:")
        self.stop = stop
        self.attempts = 0

    def _attempt(self) -> None:
        self.attempts += 1
        if self.attempts >= 3:
            self.stop.set()

    @override
    async def register(self, record: EndpointRecord, ttl_s: float) -> None:
        self._attempt()
        await super().register(record, ttl_s)

    @override
    async def heartbeat(self, endpoint: str, ttl_s: float) -> bool:
        self._attempt()
        return await super().heartbeat(endpoint, ttl_s)


def models(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "object": "model"}]})


async def test_an_announcer_outage_names_the_masked_redis_url(caplog: pytest.LogCaptureFixture):
    redis = Redis.from_url(UNREACHABLE, socket_connect_timeout=1)
    stop = asyncio.Event()
    discovery = StopsAfterThreeAttempts(redis, stop)
    async with httpx.AsyncClient(transport=httpx.MockTransport(models)) as http:
        announcer = Announcer(discovery, http, "http://vllm:8000", ttl_s=30, retry_s=0.01)
        with caplog.at_level(logging.WARNING):
            await announcer.run(stop)
    await redis.aclose()
    down = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert discovery.attempts == 3
    assert len(down) == 1, down  # once per outage, not once per attempt
    assert down[0].startswith(f"discovery ({SHOWN}) for http://vllm:8000 unavailable")
    assert SECRET not in caplog.text

"""Discovery in Redis, shared by every gateway replica and announcer.

Each server is one key holding its JSON record with a TTL (Redis expires it; no clocks are
compared across hosts), plus membership in an index set so listing never scans the keyspace.
A generation key, created by the first reader and never expiring, tells gateways when Redis lost
everything (a restart without persistence, a flush): it is then missing, and is created anew
with another value.
"""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

from nilai.discovery.base import EndpointRecord
from nilai.state.redis import redis_location


class RedisDiscovery:
    """Discovery on a shared Redis."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self.location = redis_location(redis)
        self._index = f"{prefix}discovery:index"
        self._prefix = f"{prefix}discovery:endpoint:"
        self._generation = f"{prefix}discovery:generation"

    def _key(self, endpoint: str) -> str:
        return self._prefix + endpoint

    async def register(self, record: EndpointRecord, ttl_s: float) -> None:
        """Add or replace a server's record and (re)start its lease."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(record.id), record.model_dump_json(), px=_ms(ttl_s))
            pipe.sadd(self._index, record.id)
            await pipe.execute()

    async def heartbeat(self, endpoint: str, ttl_s: float) -> bool:
        """Renew a lease; False if it had already expired.

        The id is re-added to the index too: a gateway pruning expired ids may have removed it
        in the instant between an expiry and a re-registration.
        """
        if not await self._redis.pexpire(self._key(endpoint), _ms(ttl_s)):
            return False
        await self._redis.sadd(self._index, endpoint)  # pyright: ignore[reportUnknownMemberType, reportGeneralTypeIssues]
        return True

    async def deregister(self, endpoint: str) -> None:
        """Remove a server now."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(endpoint))
            pipe.srem(self._index, endpoint)
            await pipe.execute()

    async def list(self) -> list[EndpointRecord]:
        """Every server whose lease is alive; expired ids are dropped from the index."""
        ids = sorted(
            member.decode() if isinstance(member, bytes) else str(member)
            for member in await self._redis.smembers(self._index)  # pyright: ignore[reportUnknownVariableType, reportGeneralTypeIssues]
        )
        if not ids:
            return []
        values: list[bytes | str | None] = await self._redis.mget([self._key(i) for i in ids])
        expired = [i for i, value in zip(ids, values, strict=True) if value is None]
        if expired:
            await self._redis.srem(self._index, *expired)  # pyright: ignore[reportUnknownMemberType, reportGeneralTypeIssues]
        return [EndpointRecord.model_validate_json(value) for value in values if value is not None]

    async def generation(self) -> str:
        """The generation key's value, created first if Redis has none (it lost its data)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._generation, uuid.uuid4().hex, nx=True)
            pipe.get(self._generation)
            _, value = await pipe.execute()
        return value.decode() if isinstance(value, bytes) else str(value)

    async def ping(self) -> None:
        """Raise if Redis cannot be reached."""
        await self._redis.ping()  # pyright: ignore[reportUnknownMemberType, reportGeneralTypeIssues]

    async def aclose(self) -> None:
        """The Redis client is owned by the caller; nothing to release here."""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))

"""Spent NUC invocations: each may authenticate one request, once.

An invocation is a bearer token: whoever sees one (a proxy's log, a leaked trace) could send it
again until its chain expires. The replay cache remembers each invocation used, by its SHA-256,
until then (plus ``TOKEN_CLOCK_SKEW_S``) and refuses it a second time. Clients make a fresh
invocation per request (nilai-py does: each has a random nonce), so they never notice.

In Redis when configured, one ``SET NX PX`` per request, so replicas share it; otherwise in this
process, bounded. With Redis unreachable the check fails closed: 503 with ``Retry-After``, the
outage logged once (``OutageLog``), never an unchecked request.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from datetime import datetime
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from nilai.auth.base import TOKEN_CLOCK_SKEW_S
from nilai.errors import AuthenticationFailed, LimitsUnavailable
from nilai.outages import OutageLog
from nilai.state.redis import redis_location

logger = logging.getLogger(__name__)

MEMORY_CAPACITY = 250_000
"""Invocations the in-process cache holds: about 200 bytes each, some 50 MB when full. That is
70 requests a second for an hour (nilai-py's chains last an hour at most)."""


class ReplayCache(Protocol):
    """Where spent invocations are remembered."""

    location: str
    """Where, for log lines (a Redis URL with its password masked)."""

    async def first_use(self, invocation_id: str, keep_until: float) -> bool:
        """Record ``invocation_id`` (hex) as spent until ``keep_until`` (Unix time).

        True if it was not spent before; False if it was (and is still remembered).
        """
        ...


class RedisReplayCache:
    """Spent invocations as Redis keys that expire with their chains; shared by replicas."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self.location = redis_location(redis)

    async def first_use(self, invocation_id: str, keep_until: float) -> bool:
        """One ``SET NX PX``: atomic, so of two replicas seeing the same invocation one wins."""
        ttl_ms = max(1, math.ceil((keep_until - time.time()) * 1000))
        key = f"{self._prefix}nuc:spent:{invocation_id}"
        return bool(await self._redis.set(key, b"1", nx=True, px=ttl_ms))


class MemoryReplayCache:
    """Spent invocations in this process (the event loop makes each check atomic).

    At ``capacity`` the invocation closest to being forgotten anyway makes room, and a warning
    says the cache is full (once until it has room again): a flood of fresh invocations must
    not lock every client out, and a deployment that meets this needs Redis.
    """

    location = "in-process"

    def __init__(self, capacity: int = MEMORY_CAPACITY) -> None:
        self._capacity = capacity
        self._until: dict[bytes, float] = {}
        self._expiries: list[tuple[float, bytes]] = []  # a heap, one entry per remembered id
        self._full = False
        self.evicted = 0
        """Invocations forgotten before their time because the cache was full."""

    def __len__(self) -> int:
        return len(self._until)

    async def first_use(self, invocation_id: str, keep_until: float) -> bool:
        """Remember ``invocation_id`` unless it is remembered already."""
        self._forget_expired(time.time())
        digest = bytes.fromhex(invocation_id)
        if digest in self._until:
            return False
        if len(self._until) >= self._capacity:
            _, oldest = heapq.heappop(self._expiries)
            del self._until[oldest]
            self.evicted += 1
            if not self._full:
                self._full = True
                logger.warning(
                    "NUC replay cache full (%d invocations): the ones closest to expiry are "
                    "forgotten early; share a Redis (NILAI_REDIS_URL) for a larger one",
                    self._capacity,
                )
        self._until[digest] = keep_until
        heapq.heappush(self._expiries, (keep_until, digest))
        return True

    def _forget_expired(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, digest = heapq.heappop(self._expiries)
            del self._until[digest]
        if self._full and len(self._until) < self._capacity * 9 // 10:
            self._full = False


class ReplayGuard:
    """Spends invocations in a ``ReplayCache``: a second use is a 401, an outage a 503."""

    def __init__(self, cache: ReplayCache) -> None:
        self._cache = cache
        self._outage = OutageLog(
            logger,
            "NUC replay cache",
            "requests with NUC tokens are refused with 503 until it answers",
            where=cache.location,
        )

    async def spend(self, invocation_id: str, expires_at: datetime) -> None:
        """Mark the invocation spent until its chain's expiry; refuse it if it was already."""
        started = time.monotonic()
        try:
            first = await self._cache.first_use(
                invocation_id, expires_at.timestamp() + TOKEN_CLOCK_SKEW_S
            )
        except (RedisError, OSError) as exc:
            self._outage.failed(exc, started=started)
            raise LimitsUnavailable(
                "NUC tokens cannot be checked for reuse right now (the replay cache's Redis "
                "cannot be reached), so they are refused; try again shortly.",
                code="nuc_replay_check_unavailable",
                headers={"Retry-After": "1"},
            ) from exc
        self._outage.answered(started=started)
        if not first:
            raise AuthenticationFailed(
                "NUC token rejected: this invocation has been used already; make a fresh "
                "invocation for every request (nilai-py does).",
                code="nuc_replayed",
            )

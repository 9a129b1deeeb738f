"""Limits on a shared Redis: each check is one Lua script, so replicas never race.

Scripts are registered once and run with EVALSHA (redis-py reloads them after a NOSCRIPT).
Concurrency slots are leases in a sorted set scored by expiry: a process renews the leases it
holds every third of their lifetime, so the slots of a replica that dies free themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from nilai.errors import RateLimited
from nilai.limits.base import Decision, Limit, LimitStoreUnavailable, model_slot_limit
from nilai.outages import OutageLog
from nilai.state.redis import redis_location

logger = logging.getLogger(__name__)


def _script(name: str) -> str:
    return resources.files("nilai.limits").joinpath("lua", name).read_text()


@contextlib.asynccontextmanager
async def _store_errors() -> AsyncGenerator[None]:
    """Say a failure to reach Redis as the backend-neutral ``LimitStoreUnavailable``.

    The original error is chained as the cause: the outage log names it.
    """
    try:
        yield
    except (RedisError, OSError) as exc:
        raise LimitStoreUnavailable("the limit store (Redis) cannot be reached") from exc


class _AdmitScript:
    """``admit.lua``: count a request against limits and take a model slot in one round trip."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._prefix = prefix
        # Any: redis-py's Script objects are untyped.
        self._run: Any = redis.register_script(_script("admit.lua"))  # pyright: ignore[reportUnknownMemberType]

    async def __call__(
        self,
        limits: Sequence[Limit],
        member: str,
        slot: tuple[str, int, str, int] | None = None,
    ) -> Decision:
        """Run it; ``slot`` is (key, limit, lease id, ttl ms). The deciding limit is named."""
        keys = [self._prefix + limit.key for limit in limits]
        lease_id, slot_count, ttl_ms = "", 0, 0
        deciders = list(limits)
        if slot is not None:
            slot_key, slot_count, lease_id, ttl_ms = slot
            keys.append(self._prefix + slot_key)
            deciders.append(model_slot_limit(slot_key, slot_count))
        args: list[str | int] = [member, lease_id, slot_count, ttl_ms]
        for limit in limits:
            drop_at_ms = int(limit.expires_at * 1000) if limit.expires_at else 0
            args += [limit.count, (limit.window_s or 0) * 1000, drop_at_ms]
        async with _store_errors():
            allowed, index, remaining, reset_ms = await self._run(keys=keys, args=args)
        decider = deciders[int(index) - 1] if int(index) else None
        reset_s = int(reset_ms) / 1000
        if decider is not None and decider.concurrent:
            # Held slots are renewed, so their expiry says little about when one frees.
            reset_s = 1.0
        return Decision(bool(allowed), decider, int(remaining), reset_s)


class RedisRateLimiter:
    """Sliding-window counters in Redis."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.location = redis_location(redis)
        self._admit = _AdmitScript(redis, prefix)

    async def hit(self, limits: Sequence[Limit], member: str) -> Decision:
        """Admit one request if every limit has room, atomically."""
        if not limits:
            return Decision(allowed=True)
        return await self._admit(limits, member)


class RedisConcurrencyLimiter:
    """Concurrency leases in Redis, renewed in the background while held."""

    def __init__(self, redis: Redis, prefix: str, *, ttl_s: float) -> None:
        self._prefix = prefix
        self._ttl_ms = int(ttl_s * 1000)
        self._admit = _AdmitScript(redis, prefix)
        self._renew: Any = redis.register_script(_script("lease_renew.lua"))  # pyright: ignore[reportUnknownMemberType]
        self._redis = redis
        self.location = redis_location(redis)
        self._held: dict[str, str] = {}  # lease id -> key
        self._keeper: asyncio.Task[None] | None = None
        self._outage = OutageLog(
            logger,
            "concurrency slot store",
            "slots that cannot be released or renewed free themselves when their leases expire",
            where=self.location,
        )

    @contextlib.asynccontextmanager
    async def lease(
        self, key: str, limit: int, *, counting: Sequence[Limit] = (), member: str = ""
    ) -> AsyncGenerator[Decision]:
        """Hold one slot of ``key`` while the block runs (see ``ConcurrencyLimiter.lease``)."""
        full_key = self._prefix + key
        lease_id = uuid.uuid4().hex
        decision = await self._admit(
            counting, member or lease_id, (key, limit, lease_id, self._ttl_ms)
        )
        if not decision.allowed:
            raise RateLimited(decision)
        self._held[lease_id] = full_key
        self._ensure_keeper()
        try:
            yield decision
        finally:
            self._held.pop(lease_id, None)
            await self._quietly(self._redis.zrem(full_key, lease_id))  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]

    def _ensure_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep(), name="lease-keeper")

    async def _keep(self) -> None:
        while self._held:
            await asyncio.sleep(self._ttl_ms / 3000)
            held = list(self._held.items())
            if held:
                keys = [key for _, key in held]
                args = [self._ttl_ms, *(lease for lease, _ in held)]
                await self._quietly(self._renew(keys=keys, args=args))

    async def _quietly(self, call: Any) -> None:
        """Await a Redis call whose failure only delays a slot's return (its lease expires)."""
        started = time.monotonic()
        try:
            await call
        except Exception as exc:  # noqa: BLE001 - best effort; the lease expiry is the backstop
            self._outage.failed(exc, started=started)
        else:
            self._outage.answered(started=started)

    async def aclose(self) -> None:
        """Stop renewing; release what is still held."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        for lease_id, key in list(self._held.items()):
            await self._quietly(self._redis.zrem(key, lease_id))  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
        self._held.clear()

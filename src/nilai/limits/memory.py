"""Limits in process memory, with the same behaviour as the Redis ones, for one process."""

from __future__ import annotations

import contextlib
import heapq
import time
from collections import defaultdict, deque
from collections.abc import AsyncGenerator, Sequence

from nilai.errors import RateLimited
from nilai.limits.base import Decision, Limit, model_slot_limit


class MemoryRateLimiter:
    """Sliding windows as deques of timestamps (the event loop makes each check atomic).

    Counts that expire (token uses) are dropped when they do, whether or not their token is
    seen again, as Redis drops its keys: a stream of tokens used once each cannot pile up.
    """

    location = "in-process"

    def __init__(self) -> None:
        self._windows: dict[str, deque[float]] = defaultdict(deque)
        self._totals: dict[str, int] = defaultdict(int)
        self._drop_at: dict[str, float] = {}
        self._drops: list[tuple[float, str]] = []  # a heap: one entry per key in _drop_at

    async def hit(self, limits: Sequence[Limit], member: str) -> Decision:
        """Admit one request if every limit has room."""
        del member  # Redis needs a unique member per request; a deque does not
        self._drop_expired(time.time())
        now = time.monotonic()
        best: Decision | None = None
        for limit in limits:
            used, reset = self._usage(limit, now)
            if used >= limit.count:
                return Decision(False, limit, 0, reset)
            remaining = limit.count - used - 1
            if best is None or remaining < best.remaining:
                best = Decision(
                    True, limit, remaining, reset if used else float(limit.window_s or 0)
                )
        for limit in limits:
            if limit.window_s is None:
                self._totals[limit.key] += 1
                if limit.expires_at is not None:
                    scheduled = self._drop_at.get(limit.key)
                    if scheduled is None:
                        heapq.heappush(self._drops, (limit.expires_at, limit.key))
                    # A later use may move the time later (a count kept for a while after its
                    # last use), never earlier: the key's heap entry is never after its time.
                    self._drop_at[limit.key] = max(scheduled or 0.0, limit.expires_at)
            else:
                self._windows[limit.key].append(now)
        return best or Decision(True)

    def _drop_expired(self, now: float) -> None:
        """Drop the counts whose time has come (Unix time ``now``)."""
        while self._drops and self._drops[0][0] <= now:
            _, key = heapq.heappop(self._drops)
            drop_at = self._drop_at[key]
            if drop_at > now:
                heapq.heappush(self._drops, (drop_at, key))  # a later use moved it
                continue
            del self._drop_at[key], self._totals[key]

    def __len__(self) -> int:
        """How many counters this limiter holds (totals and windows)."""
        return len(self._totals) + len(self._windows)

    def _usage(self, limit: Limit, now: float) -> tuple[int, float]:
        if limit.window_s is None:
            # .get: reading a defaultdict would add the key for every refused request.
            return self._totals.get(limit.key, 0), 0.0
        window = self._windows[limit.key]
        while window and window[0] <= now - limit.window_s:
            window.popleft()
        reset = window[0] + limit.window_s - now if window else 0.0
        return len(window), reset


class MemoryConcurrencyLimiter:
    """Counters of requests in flight; released when the block ends, whatever happens.

    A lease that also counts the request (``counting``) counts it in ``rate``: the process's
    rate limiter, the one its ``Admission`` checks.
    """

    location = "in-process"

    def __init__(self, rate: MemoryRateLimiter) -> None:
        self._in_flight: dict[str, int] = defaultdict(int)
        self._rate = rate

    @contextlib.asynccontextmanager
    async def lease(
        self, key: str, limit: int, *, counting: Sequence[Limit] = (), member: str = ""
    ) -> AsyncGenerator[Decision]:
        """Hold one slot of ``key`` while the block runs (see ``ConcurrencyLimiter.lease``)."""
        used = self._in_flight[key]
        if used >= limit:
            raise RateLimited(Decision(False, model_slot_limit(key, limit), 0, 1.0))
        # ``hit`` never suspends, so nothing runs between the checks and taking the slot.
        counted = await self._rate.hit(counting, member) if counting else None
        if counted is not None and not counted.allowed:
            raise RateLimited(counted)
        self._in_flight[key] = used + 1
        try:
            yield counted or Decision(True, model_slot_limit(key, limit), limit - used - 1, 0.0)
        finally:
            self._in_flight[key] -= 1

    async def aclose(self) -> None:
        """Nothing outlives the process."""

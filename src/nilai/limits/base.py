"""What a limiter checks and decides, independent of where the counters live."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``count`` requests per ``window_s`` seconds (None: ever) under ``key``."""

    key: str
    name: str
    count: int
    window_s: int | None
    concurrent: bool = False
    """A cap on requests in flight rather than a count over time."""
    expires_at: float | None = None
    """For a count without a window: when (Unix time) the counter can be forgotten, because
    whatever it limits (a token) is no longer accepted then."""
    kind: str = "other"
    """A bounded name for metrics (minute, lifetime, token, web_search_hour, ...): never the
    key, which holds account and token ids."""

    @property
    def resets(self) -> bool:
        """Whether waiting can help (False for lifetime and token-use counts)."""
        return self.concurrent or self.window_s is not None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a check: the limit that decides it, and what is left of it."""

    allowed: bool
    limit: Limit | None = None
    remaining: int = 0
    reset_s: float = 0.0

    @property
    def retry_after_s(self) -> int:
        """Whole seconds to wait before a retry can succeed (at least 1)."""
        return max(1, math.ceil(self.reset_s))


ALLOWED = Decision(allowed=True)


def model_slot_limit(key: str, count: int) -> Limit:
    """The cap on one model's requests in flight, as every backend names it."""
    return Limit(
        key,
        "concurrent requests for this model",
        count,
        None,
        concurrent=True,
        kind="model_concurrency",
    )


class LimitStoreUnavailable(Exception):
    """The store that keeps the counters cannot be reached; ``__cause__`` says why.

    Raised by every limiter backend in place of its client's own errors, so the policy decides
    fail-open or fail-closed without knowing which store is configured.
    """


class RateLimiter(Protocol):
    """Counts requests against several limits at once."""

    location: str
    """Where the counts live, for log lines (a Redis URL with its password masked)."""

    async def hit(self, limits: Sequence[Limit], member: str) -> Decision:
        """Admit one request if every limit has room (then count it in all), else refuse.

        The decision names the refusing limit, or when admitted the one with least room.
        """
        ...


class ConcurrencyLimiter(Protocol):
    """Slots for requests in flight, held as leases that expire unless renewed."""

    location: str
    """Where the slots live, for log lines (a Redis URL with its password masked)."""

    def lease(
        self, key: str, limit: int, *, counting: Sequence[Limit] = (), member: str = ""
    ) -> AbstractAsyncContextManager[Decision]:
        """Hold one of ``limit`` slots for the duration; raises ``RateLimited`` when full.

        With ``counting``, the request is also counted against those limits (as
        ``RateLimiter.hit`` would, ``member`` unique per request) in the same atomic step: both
        happen or neither, and a refusal names the full limit. The decision is then that of
        the limit with the least room, as ``hit`` returns it.
        """
        ...

    async def aclose(self) -> None:
        """Stop renewing and release every slot this process holds."""
        ...

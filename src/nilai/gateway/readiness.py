"""The shared-state checks behind ``/readyz``: run at most once a second, whoever asks.

``/readyz`` needs no credentials, so its cost must not grow with how often it is called: a
thousand anonymous calls a second would otherwise be a thousand database queries and Redis
round trips a second, taking pooled connections from the requests that need them. The checks
run in one task at a time (callers that arrive meanwhile wait for that same run) and their
result is reused for ``max_age_s`` after it finished. A load balancer asks every few seconds,
so a result a second old tells it nothing staler than its own interval does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping

CHECK_TIMEOUT_S = 1.5
"""How long one ping may take before its dependency reads as unreachable."""
MAX_AGE_S = 1.0
"""How long a result is reused."""

Ping = Callable[[], Awaitable[None]]


class SharedChecks:
    """Named pings, run together, at most one run at a time, each result reused briefly."""

    def __init__(
        self,
        pings: Mapping[str, Ping],
        *,
        max_age_s: float = MAX_AGE_S,
        timeout_s: float = CHECK_TIMEOUT_S,
    ) -> None:
        self._pings = dict(pings)
        self._max_age_s = max_age_s
        self._timeout_s = timeout_s
        self._result: dict[str, str] | None = None
        self._finished_at = 0.0
        self._running: asyncio.Task[dict[str, str]] | None = None
        self.runs = 0
        """How many times the pings ran (each ping once per run)."""

    async def results(self) -> dict[str, str]:
        """``{name: "ok" | "unreachable (ErrorType)"}``, at most ``max_age_s`` old."""
        if self._result is not None and time.monotonic() - self._finished_at < self._max_age_s:
            return dict(self._result)
        if self._running is None:
            self._running = asyncio.create_task(self._run(), name="readiness-checks")
        # Shielded: a caller that goes away must not cancel the run the others wait for.
        return dict(await asyncio.shield(self._running))

    async def aclose(self) -> None:
        """Stop a run in progress (at shutdown, before the database and Redis close)."""
        running = self._running
        if running is not None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running

    async def _run(self) -> dict[str, str]:
        try:
            self.runs += 1
            names = list(self._pings)
            outcomes = await asyncio.gather(*(self._check(self._pings[name]) for name in names))
            self._result = dict(zip(names, outcomes, strict=True))
            self._finished_at = time.monotonic()
            return self._result
        finally:
            self._running = None

    async def _check(self, ping: Ping) -> str:
        try:
            async with asyncio.timeout(self._timeout_s):
                await ping()
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return f"unreachable ({type(exc).__name__})"
        return "ok"

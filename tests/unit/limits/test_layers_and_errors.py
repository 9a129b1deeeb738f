"""The limits layer stands on its own: a backend-neutral outage error, and explicit limit kinds."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager

import pytest

from nilai.auth.base import Principal, TokenLimit
from nilai.errors import LimitsUnavailable
from nilai.gateway.metrics import limit_kind
from nilai.limits.base import Decision, Limit, LimitStoreUnavailable
from nilai.limits.memory import MemoryConcurrencyLimiter, MemoryRateLimiter
from nilai.limits.policy import Admission, LimitDefaults


def _unreachable() -> LimitStoreUnavailable:
    try:
        raise LimitStoreUnavailable(
            "the limit store cannot be reached"
        ) from ConnectionRefusedError(111, "Connection refused")
    except LimitStoreUnavailable as exc:
        return exc


class DownRateLimiter:
    """A backend whose store is unreachable: it says so with the neutral error only."""

    location = "redis://:***@limits.example:6379/0"

    async def hit(self, limits: Sequence[Limit], member: str) -> Decision:
        raise _unreachable()


class DownConcurrencyLimiter:
    """A slot store that cannot be reached."""

    @asynccontextmanager
    async def lease(
        self, key: str, limit: int, *, counting: Sequence[Limit] = (), member: str = ""
    ) -> AsyncGenerator[Decision]:
        raise _unreachable()
        yield Decision(allowed=True)  # pragma: no cover - makes this a generator

    async def aclose(self) -> None:
        return None


DEFAULTS = LimitDefaults(minute=5, hour=None, day=None, lifetime=None)


def _principal() -> Principal:
    return Principal("acct-1", "api_key", token_limits=(TokenLimit("tok-1", 3),))


async def test_a_backend_neutral_store_error_fails_closed_and_logs_the_original_cause(
    caplog: pytest.LogCaptureFixture,
):
    admission = Admission(DownRateLimiter(), DownConcurrencyLimiter(), DEFAULTS, fail_open=False)
    with caplog.at_level(logging.WARNING, logger="nilai.limits.policy"):
        with pytest.raises(LimitsUnavailable) as refused:
            await admission.admit(_principal())
        with pytest.raises(LimitsUnavailable):
            async with admission.model_slot("m"):
                pytest.fail("a slot was granted without its store")
    assert isinstance(refused.value.__cause__, LimitStoreUnavailable)
    outage_lines = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_lines) == 1, outage_lines
    assert "Connection refused" in outage_lines[0]
    assert outage_lines[0].startswith(
        "rate limiter unavailable at redis://:***@limits.example:6379/0 ("
    )


async def test_a_backend_neutral_store_error_fails_open_when_configured():
    admission = Admission(DownRateLimiter(), DownConcurrencyLimiter(), DEFAULTS, fail_open=True)
    assert (await admission.admit(_principal())).allowed
    async with admission.model_slot("m") as slot:
        assert slot.allowed


async def test_a_failure_inside_a_held_slot_propagates_and_frees_the_slot():
    concurrency = MemoryConcurrencyLimiter(MemoryRateLimiter())
    admission = Admission(DownRateLimiter(), concurrency, DEFAULTS, fail_open=True)
    with pytest.raises(ValueError, match="the block failed"):
        async with admission.model_slot("m"):
            raise ValueError("the block failed")
    # The slot came back: every one of the model's slots can be held again.
    async with admission.model_slot("m") as slot:
        assert slot.remaining == DEFAULTS.model_concurrency - 1


def test_every_limit_names_its_kind_without_its_key_being_parsed():
    admission = Admission(
        DownRateLimiter(),
        DownConcurrencyLimiter(),
        LimitDefaults(
            minute=1,
            hour=2,
            day=3,
            lifetime=4,
            web_search_minute=5,
            web_search_hour=None,
            web_search_day=None,
            web_search_lifetime=6,
        ),
        fail_open=False,
    )
    kinds = [limit.kind for limit in admission.account_limits(_principal(), web_search=True)]
    assert kinds == [
        "minute",
        "hour",
        "day",
        "lifetime",
        "token",
        "web_search_minute",
        "web_search_lifetime",
    ]
    lifetime = admission.account_limits(_principal(), web_search=True)[-1]
    assert (lifetime.count, lifetime.window_s) == (6, None)
    assert admission.account_limits(_principal(), web_search=False)[-1].kind == "token"


def test_metrics_label_a_refusal_by_the_limits_kind_not_its_key():
    limit = Limit("{acct:a}:whatever:key:shape", "requests per minute", 5, 60, kind="minute")
    assert limit_kind(limit) == "minute"

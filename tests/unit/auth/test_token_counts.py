"""NUC usage-limit counters expire (issue 14, item 3): in memory and in the limits they make."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from nilai.auth.base import TOKEN_CLOCK_SKEW_S, Principal, TokenLimit
from nilai.limits.base import Limit
from nilai.limits.memory import MemoryConcurrencyLimiter, MemoryRateLimiter
from nilai.limits.policy import Admission, LimitDefaults


def token_limit(key: str, expires_at: float) -> Limit:
    return Limit(f"{{token:{key}}}:uses", "uses of this token", 5, None, expires_at=expires_at)


async def test_expired_token_counts_are_dropped_though_their_tokens_never_come_back():
    limiter = MemoryRateLimiter()
    gone = time.time() - 1
    for i in range(50):
        assert (await limiter.hit([token_limit(f"once-{i}", gone)], "m")).allowed
    assert len(limiter) == 1  # only the latest, dropped by the next request
    live = time.time() + 60
    assert (await limiter.hit([token_limit("live", live)], "m")).allowed
    assert len(limiter) == 1


async def test_a_live_token_count_is_kept_and_enforced():
    limiter = MemoryRateLimiter()
    live = token_limit("live", time.time() + 60)
    for _ in range(5):
        assert (await limiter.hit([live], "m")).allowed
    assert not (await limiter.hit([live], "m")).allowed
    # A later use that keeps the count longer does not make it forget what was counted.
    later = token_limit("live", time.time() + 120)
    assert not (await limiter.hit([later], "m")).allowed


def admission(max_s: int = 3600) -> Admission:
    defaults = LimitDefaults(
        minute=None,
        hour=None,
        day=None,
        web_search_minute=None,
        web_search_rps=None,
        token_uses_max_s=max_s,
    )
    rate = MemoryRateLimiter()
    return Admission(rate, MemoryConcurrencyLimiter(rate), defaults, fail_open=False)


def test_a_token_count_lasts_until_its_token_expires_plus_the_skew():
    ends = datetime.now(UTC) + timedelta(minutes=5)
    principal = Principal("acct", "nuc", token_limits=(TokenLimit("t", 3, ends),))
    (limit,) = admission().account_limits(principal, web_search=False)
    assert limit.expires_at == ends.timestamp() + TOKEN_CLOCK_SKEW_S


def test_a_token_count_without_an_expiry_is_still_bounded():
    before = time.time()
    principal = Principal("acct", "nuc", token_limits=(TokenLimit("t", 3),))
    (limit,) = admission(max_s=3600).account_limits(principal, web_search=False)
    assert limit.expires_at is not None
    assert before + 3600 + TOKEN_CLOCK_SKEW_S <= limit.expires_at
    assert limit.expires_at <= time.time() + 3600 + TOKEN_CLOCK_SKEW_S
    far = datetime.now(UTC) + timedelta(days=30)
    principal = Principal("acct", "nuc", token_limits=(TokenLimit("t", 3, far),))
    (limit,) = admission(max_s=3600).account_limits(principal, web_search=False)
    assert limit.expires_at is not None
    assert limit.expires_at <= time.time() + 3600 + TOKEN_CLOCK_SKEW_S

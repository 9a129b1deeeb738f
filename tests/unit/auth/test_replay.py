"""Spent NUC invocations (issue 14, item 4): once each, bounded, fail closed."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from secp256k1 import PrivateKey

from nilai.auth.nuc_accounts import NucAuthenticator
from nilai.auth.nuc_tokens import NucVerifier
from nilai.auth.replay import MemoryReplayCache, ReplayGuard
from nilai.errors import AuthenticationFailed, LimitsUnavailable
from nilai.store.base import Account
from tests.support.nuc import Holder, did_of, invoke

GATEWAY = PrivateKey()


def digest() -> str:
    return uuid.uuid4().hex * 2


async def test_an_invocation_is_spent_once():
    cache = MemoryReplayCache()
    later = time.time() + 60
    first = digest()
    assert await cache.first_use(first, later)
    assert not await cache.first_use(first, later)
    assert await cache.first_use(digest(), later)
    assert len(cache) == 2


async def test_a_spent_invocation_is_forgotten_when_its_chain_has_expired():
    cache = MemoryReplayCache()
    gone = digest()
    assert await cache.first_use(gone, time.time() - 1)
    # Forgotten without being looked up again: a stream of one-off ids cannot pile up.
    assert await cache.first_use(digest(), time.time() + 60)
    assert len(cache) == 1
    assert await cache.first_use(gone, time.time() + 60)


async def test_a_full_memory_cache_forgets_the_soonest_to_expire_and_says_so(
    caplog: pytest.LogCaptureFixture,
):
    cache = MemoryReplayCache(capacity=3)
    now = time.time()
    ids = [digest() for _ in range(5)]
    with caplog.at_level(logging.WARNING, logger="nilai.auth.replay"):
        for offset, invocation in zip([30, 10, 20, 40, 50], ids, strict=True):
            assert await cache.first_use(invocation, now + offset)
    assert len(cache) == 3
    assert cache.evicted == 2
    # The two closest to expiry (10 s and 20 s) made room; the others are still spent.
    assert not await cache.first_use(ids[0], now + 60)
    assert await cache.first_use(ids[1], now + 60)
    full = [r for r in caplog.records if "replay cache full" in r.getMessage()]
    assert len(full) == 1


class FailingCache:
    location = "redis://:***@replay.example:6379/0"

    def __init__(self) -> None:
        self.failure: Exception | None = RedisConnectionError("Error 111 connecting")
        self.seen: set[str] = set()

    async def first_use(self, invocation_id: str, keep_until: float) -> bool:
        del keep_until
        if self.failure is not None:
            raise self.failure
        if invocation_id in self.seen:
            return False
        self.seen.add(invocation_id)
        return True


async def test_the_guard_fails_closed_with_503_and_logs_an_outage_once(
    caplog: pytest.LogCaptureFixture,
):
    cache = FailingCache()
    guard = ReplayGuard(cache)
    expires = datetime.now(UTC) + timedelta(minutes=1)
    with caplog.at_level(logging.INFO, logger="nilai.auth.replay"):
        for _ in range(3):
            with pytest.raises(LimitsUnavailable) as refused:
                await guard.spend(digest(), expires)
            assert refused.value.status == 503
            assert refused.value.code == "nuc_replay_check_unavailable"
            assert refused.value.headers == {"Retry-After": "1"}
        cache.failure = None
        token = digest()
        await guard.spend(token, expires)
        with pytest.raises(AuthenticationFailed) as replayed:
            await guard.spend(token, expires)
    assert replayed.value.code == "nuc_replayed"
    lines = [r.getMessage() for r in caplog.records]
    assert (
        len(
            [
                line
                for line in lines
                if "NUC replay cache unavailable at redis://:***@replay.example:6379/0" in line
            ]
        )
        == 1
    )
    assert len([line for line in lines if "available again" in line]) == 1


class OneAccount:
    """An ``AccountRepo`` that knows every holder."""

    async def get_account(self, id_or_name: str) -> Account | None:
        return Account("acct-1", id_or_name, datetime.now(UTC), True)

    async def create_account(self, name: str, limits: dict[str, int | None]) -> Account:
        raise AssertionError("not needed")

    async def list_accounts(self) -> list[Account]:
        return []

    async def set_active(self, account_id: str, active: bool) -> None:
        raise AssertionError("not needed")


async def test_the_authenticator_spends_each_invocation():
    verifier = NucVerifier(GATEWAY.pubkey.serialize())
    auth = NucAuthenticator(
        verifier,
        OneAccount(),
        auto_accounts=False,
        ttl_s=1,
        replay=ReplayGuard(MemoryReplayCache()),
    )
    holder = Holder()
    token = invoke(holder.root(), holder.key, did_of(GATEWAY))
    assert (await auth.authenticate(token)).method == "nuc"
    with pytest.raises(AuthenticationFailed) as replayed:
        await auth.authenticate(token)
    assert replayed.value.code == "nuc_replayed"
    assert token not in replayed.value.message
    assert (await auth.authenticate(invoke(holder.root(), holder.key, did_of(GATEWAY)))).account

"""Stored API keys under database outages and floods of random keys (issue 13, items 4 and 7).

The repository is an in-memory fake that counts lookups, can hold them at a gate (to see how
many run at once) and can fail them the way a database that is away fails.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import sqlite3
import uuid
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import exc as sa_exc

from nilai.auth import stored_keys
from nilai.auth.base import Principal
from nilai.auth.lookups import CachedLookup
from nilai.auth.stored_keys import KEY_MARK, StoredApiKeys, key_prefix
from nilai.errors import AuthenticationFailed, NilaiError
from nilai.store.base import Account, ApiKey
from tests.support.records import stored_key
from tests.support.timing import FakeClock

TTL_S = 60.0
SHORT_TTL_S = 0.05
SAFETY_S = 5.0  # a bound against hangs, never a performance claim
UNKNOWN_LOOKUP_SLOTS = 4  # nilai.auth.lookups.MAX_UNKNOWN_LOOKUPS
UNKNOWN_WAITING = 32  # nilai.auth.lookups.MAX_UNKNOWN_WAITING
MISSES_PER_S = 50  # nilai.auth.lookups.MISSES_PER_S
MISS_BURST = 50  # nilai.auth.lookups.MISS_BURST
OUTAGE_LINE = "accounts database unavailable"
RECOVERY_LINE = "accounts database available again"


class PgError(Exception):
    """What asyncpg raises, as SQLAlchemy's adapter carries it: a message and a SQLSTATE."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class FakeKeys:
    """An in-memory ``ApiKeyRepo``: counts lookups, can hold them at a gate or fail them."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[ApiKey, Account]] = {}
        self.lookups: list[str] = []
        self.running = 0
        self.most_running = 0
        self.failure: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.ungated: set[str] = set()
        self._changed = asyncio.Condition()

    def add(self) -> str:
        """A new key of a new active account; returns the key's value."""
        account = Account(uuid.uuid4().hex, f"acct-{uuid.uuid4().hex[:6]}", datetime.now(UTC), True)
        record, value = stored_key(account)
        self.records[record.prefix] = (record, account)
        return value

    def revoke(self, value: str) -> None:
        key, account = self.records[prefix_of(value)]
        self.records[key.prefix] = (replace(key, revoked_at=datetime.now(UTC)), account)

    def lookups_of(self, value: str) -> int:
        return self.lookups.count(prefix_of(value))

    async def key_by_prefix(self, prefix: str) -> tuple[ApiKey, Account] | None:
        self.lookups.append(prefix)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        async with self._changed:
            self._changed.notify_all()
        try:
            if self.gate is not None and prefix not in self.ungated:
                await self.gate.wait()
            if self.failure is not None:
                raise self.failure
            return self.records.get(prefix)
        finally:
            self.running -= 1

    async def wait_running(self, count: int) -> None:
        """Wait until ``count`` lookups are in progress at once."""
        async with asyncio.timeout(SAFETY_S), self._changed:
            await self._changed.wait_for(lambda: self.running >= count)


def prefix_of(value: str) -> str:
    return value[len(KEY_MARK) : len(KEY_MARK) + 12]


def random_stored_shape_key() -> str:
    """What an attacker sends: the stored-key shape with a random prefix and secret."""
    return f"{KEY_MARK}{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


async def outcome(auth: StoredApiKeys, credential: str) -> Principal | NilaiError:
    """The principal, or the error a client would see (any other exception propagates)."""
    try:
        return await auth.authenticate(credential)
    except NilaiError as error:
        return error


def statuses(results: Iterable[Principal | NilaiError]) -> list[int]:
    return [200 if isinstance(result, Principal) else result.status for result in results]


def assert_retryable_503(error: Principal | NilaiError) -> None:
    assert isinstance(error, NilaiError), error
    assert error.status == 503
    assert error.type == "service_unavailable"
    assert error.code == "accounts_unavailable"
    assert error.headers["Retry-After"].isdigit()
    assert int(error.headers["Retry-After"]) >= 1


def log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if text in record.getMessage()]


# database outages (item 4)

DATABASE_AWAY = [
    pytest.param(ConnectionRefusedError(111, "Connect call failed"), id="connection-refused"),
    pytest.param(ConnectionResetError(104, "Connection reset by peer"), id="connection-reset"),
    pytest.param(TimeoutError(), id="timeout"),
    pytest.param(
        sa_exc.OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked")),
        id="sqlite-locked",
    ),
    pytest.param(
        sa_exc.InterfaceError("SELECT", {}, Exception("connection is closed")),
        id="connection-closed",
    ),
    pytest.param(sa_exc.TimeoutError("QueuePool limit reached"), id="pool-exhausted"),
    pytest.param(
        sa_exc.DBAPIError("SELECT", {}, PgError("the database system is starting up", "57P03")),
        id="pg-starting-up",
    ),
    pytest.param(
        sa_exc.DBAPIError("SELECT", {}, PgError("sorry, too many clients already", "53300")),
        id="pg-too-many-connections",
    ),
    pytest.param(
        sa_exc.DBAPIError("SELECT", {}, Exception("gone"), connection_invalidated=True),
        id="connection-invalidated",
    ),
]


@pytest.mark.parametrize("failure", DATABASE_AWAY)
async def test_a_database_outage_answers_503_with_retry_after(failure: BaseException):
    repo = FakeKeys()
    key = repo.add()
    repo.failure = failure
    error = await outcome(StoredApiKeys(repo, ttl_s=TTL_S), key)
    assert_retryable_503(error)
    assert isinstance(error, NilaiError)
    for detail in ("Connect call", "reset", "locked", "QueuePool", "starting up", "clients"):
        assert detail not in error.message  # no internal detail reaches the client


@pytest.mark.parametrize(
    "bug",
    [
        sa_exc.ProgrammingError("SELECT", {}, PgError('column "prefix" does not exist', "42703")),
        KeyError("prefix"),
    ],
    ids=["undefined-column", "key-error"],
)
async def test_a_bug_in_the_lookup_is_not_passed_off_as_an_outage(bug: Exception):
    repo = FakeKeys()
    key = repo.add()
    repo.failure = bug
    with pytest.raises(type(bug)):
        await StoredApiKeys(repo, ttl_s=TTL_S).authenticate(key)


async def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO)
    repo = FakeKeys()
    auth = StoredApiKeys(repo, ttl_s=TTL_S)
    keys = [repo.add() for _ in range(30)]
    repo.failure = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")

    concurrent = await asyncio.gather(*(outcome(auth, key) for key in keys))
    one_by_one = [await outcome(auth, key) for key in keys]
    for result in concurrent + one_by_one:
        assert_retryable_503(result)
    assert len(repo.lookups) > 1  # every lookup tried the database, and failed
    (started,) = log_lines(caplog, OUTAGE_LINE)
    assert "ConnectionRefusedError" in started
    assert log_lines(caplog, RECOVERY_LINE) == []

    repo.failure = None
    for result in [await outcome(auth, key) for key in keys]:
        assert isinstance(result, Principal)
    assert len(log_lines(caplog, OUTAGE_LINE)) == 1
    (ended,) = log_lines(caplog, RECOVERY_LINE)
    assert "failed attempts" in ended

    # the next outage is a new one, logged again, once
    other = repo.add()
    repo.failure = TimeoutError()
    for _ in range(5):
        assert_retryable_503(await outcome(auth, other))
    assert len(log_lines(caplog, OUTAGE_LINE)) == 2
    # no key, prefix or secret, ever lands in the log
    for record in caplog.records:
        for key in [*keys, other]:
            assert prefix_of(key) not in record.getMessage()


async def test_a_cached_key_keeps_working_during_an_outage():
    repo = FakeKeys()
    key = repo.add()
    auth = StoredApiKeys(repo, ttl_s=TTL_S)
    assert isinstance(await outcome(auth, key), Principal)
    repo.failure = ConnectionRefusedError(111, "Connect call failed")
    for _ in range(10):
        assert isinstance(await outcome(auth, key), Principal)
    assert repo.lookups_of(key) == 1


async def test_an_expired_entry_is_not_served_while_the_database_is_down():
    # The strict choice: past the TTL a revocation could not be checked, so 503, not the key.
    repo = FakeKeys()
    key = repo.add()
    auth = StoredApiKeys(repo, ttl_s=SHORT_TTL_S)
    assert isinstance(await outcome(auth, key), Principal)
    repo.failure = OSError("Network is unreachable")
    await asyncio.sleep(SHORT_TTL_S * 2)  # let the entry expire
    assert_retryable_503(await outcome(auth, key))
    repo.failure = None
    assert isinstance(await outcome(auth, key), Principal)


async def test_revocation_applies_within_the_ttl():
    repo = FakeKeys()
    key = repo.add()
    auth = StoredApiKeys(repo, ttl_s=SHORT_TTL_S)
    assert isinstance(await outcome(auth, key), Principal)
    repo.revoke(key)
    await asyncio.sleep(SHORT_TTL_S * 2)  # one TTL later
    refused = await outcome(auth, key)
    assert isinstance(refused, AuthenticationFailed)
    assert refused.code == "revoked_api_key"


# floods of unknown keys (item 7)


async def test_concurrent_requests_with_one_unknown_key_share_one_lookup():
    repo = FakeKeys()
    key = repo.add()  # valid, but never seen by this gateway
    auth = StoredApiKeys(repo, ttl_s=TTL_S)
    repo.gate = asyncio.Event()
    callers = [asyncio.create_task(outcome(auth, key)) for _ in range(20)]
    await repo.wait_running(1)
    repo.gate.set()
    results = await asyncio.gather(*callers)
    assert statuses(results) == [200] * 20
    assert repo.lookups_of(key) == 1


async def test_repeating_an_unknown_key_costs_one_lookup_per_ttl():
    repo = FakeKeys()
    auth = StoredApiKeys(repo, ttl_s=TTL_S)
    unknown = random_stored_shape_key()
    for _ in range(50):
        refused = await outcome(auth, unknown)
        assert isinstance(refused, AuthenticationFailed)
    assert len(repo.lookups) == 1


async def test_a_flood_of_random_keys_is_bounded_and_a_known_key_is_not_queued_behind_it():
    repo = FakeKeys()
    known = repo.add()
    auth = StoredApiKeys(repo, ttl_s=SHORT_TTL_S)
    assert isinstance(await outcome(auth, known), Principal)
    await asyncio.sleep(SHORT_TTL_S * 2)  # its entry has expired: the next use is a refresh

    repo.gate = asyncio.Event()  # the database holds every lookup of an unknown prefix...
    repo.ungated = {prefix_of(known)}  # ...and answers the known one at once
    flood = [asyncio.create_task(outcome(auth, random_stored_shape_key())) for _ in range(200)]
    await repo.wait_running(UNKNOWN_LOOKUP_SLOTS)

    # At most a few unknown prefixes are looked up at once; a bounded number wait; the rest
    # are answered at once with a retryable 503 (they might be a client's brand-new key).
    assert repo.running == UNKNOWN_LOOKUP_SLOTS
    shed = [task.result() for task in flood if task.done()]
    assert len(shed) == 200 - UNKNOWN_LOOKUP_SLOTS - UNKNOWN_WAITING
    for error in shed:
        assert_retryable_503(error)

    # the known key's refresh does not wait for any of them
    async with asyncio.timeout(SAFETY_S):
        refreshed = await outcome(auth, known)
    assert isinstance(refreshed, Principal)
    assert repo.lookups_of(known) == 2

    repo.gate.set()
    results = await asyncio.gather(*flood)
    assert statuses(results).count(401) == UNKNOWN_LOOKUP_SLOTS + UNKNOWN_WAITING
    assert statuses(results).count(503) == len(shed)
    assert repo.most_running <= UNKNOWN_LOOKUP_SLOTS + 1  # the flood's slots + the refresh
    assert len(repo.lookups) == 2 + UNKNOWN_LOOKUP_SLOTS + UNKNOWN_WAITING

    from nilai.auth import lookups  # imported here: the bounds the numbers above restate

    assert lookups.MAX_UNKNOWN_LOOKUPS == UNKNOWN_LOOKUP_SLOTS
    assert lookups.MAX_UNKNOWN_WAITING == UNKNOWN_WAITING
    assert (lookups.MISSES_PER_S, lookups.MISS_BURST) == (MISSES_PER_S, MISS_BURST)


async def test_a_sustained_flood_of_misses_is_held_to_the_miss_budget(
    monkeypatch: pytest.MonkeyPatch,
):
    clock = FakeClock()
    monkeypatch.setattr(stored_keys, "CachedLookup", functools.partial(CachedLookup, clock=clock))
    repo = FakeKeys()
    auth = StoredApiKeys(repo, ttl_s=TTL_S)
    # However fast the database answers, misses cost at most the burst plus the sustained rate:
    # the burst at once, then MISSES_PER_S for each second that passes.
    results = [await outcome(auth, random_stored_shape_key()) for _ in range(500)]
    assert len(repo.lookups) == MISS_BURST
    clock.advance(0.5)  # half a second refills less than the burst
    results += [await outcome(auth, random_stored_shape_key()) for _ in range(500)]
    assert len(repo.lookups) == MISS_BURST + MISSES_PER_S * 0.5
    assert statuses(results).count(401) == len(repo.lookups)
    for result in results:
        if not isinstance(result, AuthenticationFailed):
            assert_retryable_503(result)


async def test_lookups_that_find_their_key_do_not_spend_the_miss_budget():
    # A cold start: many keys this process has not seen yet, all of them real.
    repo = FakeKeys()
    keys = [repo.add() for _ in range(500)]
    auth = StoredApiKeys(repo, ttl_s=TTL_S)
    assert statuses([await outcome(auth, key) for key in keys]) == [200] * 500
    assert isinstance(await outcome(auth, random_stored_shape_key()), AuthenticationFailed)


async def test_a_flood_of_random_keys_does_not_evict_known_keys_from_the_cache():
    repo = FakeKeys()
    known = repo.add()
    auth = StoredApiKeys(repo, ttl_s=TTL_S)
    assert isinstance(await outcome(auth, known), Principal)
    for _ in range(10_050):  # more unknown prefixes than the cache holds entries
        refused = await outcome(auth, random_stored_shape_key())
        assert isinstance(refused, NilaiError)
        assert refused.status in {401, 503}
    assert isinstance(await outcome(auth, known), Principal)
    assert repo.lookups_of(known) == 1


async def test_a_caller_that_gives_up_does_not_cancel_the_shared_lookup():
    repo = FakeKeys()
    key = repo.add()
    auth = StoredApiKeys(repo, ttl_s=TTL_S)
    repo.gate = asyncio.Event()
    impatient = asyncio.create_task(outcome(auth, key))
    patient = asyncio.create_task(outcome(auth, key))
    await repo.wait_running(1)
    impatient.cancel()
    repo.gate.set()
    assert isinstance(await patient, Principal)
    assert impatient.cancelled()
    assert isinstance(await outcome(auth, key), Principal)
    assert repo.lookups_of(key) == 1


@pytest.mark.parametrize("prefix", ["ABCDEF012345", "abcdef01234\x00", "abcdef01234g", "é" * 12])
def test_a_credential_whose_prefix_is_not_lowercase_hex_is_not_looked_up(prefix: str):
    assert key_prefix(f"nilai_{prefix}_{'s' * 40}") is None

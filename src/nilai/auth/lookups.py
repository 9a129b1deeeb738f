"""Cached account lookups: cheap under floods of unknown credentials, honest in outages.

Stored API keys and NUC subscription holders are looked up in the accounts database and cached
for ``ttl_s`` (at most a few seconds, so a revocation takes effect within it). ``CachedLookup``
adds what a gateway facing the internet needs on top of that cache:

- **One query per key at a time.** Concurrent requests for a key that is not cached share one
  database lookup (single flight), so a burst of one client's requests costs one query.
- **Known keys never wait behind unknown ones.** A key found before (its entry may have
  expired) is refreshed at once. A key never seen (a brand-new key, or a random one sent by an
  attacker) waits for one of ``max_unknown_lookups`` slots; when ``max_unknown_waiting`` more
  are already waiting, it is answered 503 with ``Retry-After`` at once instead of queueing, a
  bound on what a flood of random keys costs the database and the event loop. 503 rather than
  401: the key may be valid (a client's brand-new key must not be told it is wrong) and the
  client can try again in a second. Unknown keys that the database does not know are cached
  (negatively) for ``ttl_s`` too, so a client repeating a wrong key costs one query per TTL.
- **Misses have a budget.** Random keys defeat any negative cache, and the slots above bound
  how many lookups run at once, not how many run per second: a fast database answers a flood
  as fast as it comes, a query and about a millisecond of the gateway's CPU per request. So
  lookups of unseen keys draw on a token bucket (``misses_per_s``, ``miss_burst``), and a
  lookup that finds its key (or fails for an outage) gives its token back: only misses spend
  it. A gateway that is not attacked never runs out (a cold start after a restart looks up
  many keys, but finds them); during a flood of random keys the lookups beyond the budget get
  the same retryable 503, so a brand-new key may need a retry or two. Known keys are never
  charged.
- **Database outages are a 503, logged once.** A lookup that fails because the database cannot
  answer (connection refused or reset, timeout, pool exhausted, SQLite locked, a PostgreSQL
  connection, resource or shutdown SQLSTATE) raises ``AccountsUnavailable`` (503,
  ``Retry-After``). The shared ``OutageLog`` (``nilai.outages``) logs the cause when the first
  lookup fails and one line when a lookup succeeds again, not one per request. Any other
  error (a bug, a broken schema on PostgreSQL) is not caught: it stays a 500 with its
  traceback in the log.
- **No stale answers.** A cached entry is never served past ``ttl_s``, not even while the
  database is down: serving it would keep a key working whose revocation (or its account's
  suspension) cannot be checked, for as long as the outage lasts, and an attacker who can
  make the database unreachable (e.g. by exhausting its connections) would choose how long.
  DESIGN §4 promises keys are "cached in-process for a few seconds at most"; callers get an
  honest, retryable 503 instead.

Memory stays bounded: at most ``max_known`` found entries (least recently used evicted first;
expired ones are kept as "known" until evicted) and ``max_missing`` negative entries (oldest
evicted first). Every lookup runs under ``timeout_s``. A caller for whom "not found" must not
be cached (an operator's new account should work on the next request) passes
``cache_missing=False``: its misses are then bounded by the slots and the budget alone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from sqlalchemy import exc as sa_exc

from nilai.errors import AccountsUnavailable
from nilai.outages import OutageLog
from nilai.store.base import Account, AccountRepo
from nilai.store.errors import error_kind

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
LOOKUP_TIMEOUT_S = 5.0
MAX_KNOWN = 10_000
MAX_MISSING = 10_000
MAX_UNKNOWN_LOOKUPS = 4
"""Concurrent lookups of keys not seen before: a small share of the database pool (10 + 10)."""
MAX_UNKNOWN_WAITING = 32
"""Unknown keys that may wait for a lookup slot; beyond this they are answered 503 at once."""
MISSES_PER_S = 50.0
"""Sustained lookups of unseen keys that find nothing, per second and process."""
MISS_BURST = 50


def database_unavailable(error: BaseException) -> bool:
    """Whether ``error`` means the database cannot answer now, rather than a bug in the query."""
    return error_kind(error) == "transient"


def unavailable_error() -> AccountsUnavailable:
    """The 503 for a lookup the database could not answer."""
    return AccountsUnavailable(
        "API keys and accounts cannot be checked right now (the accounts database is "
        "unreachable); try again shortly.",
        retry_after_s=RETRY_AFTER_S,
    )


def busy_error() -> AccountsUnavailable:
    """The 503 for an unknown key that found every lookup slot and the queue taken."""
    return AccountsUnavailable(
        "Too many unrecognised credentials are being checked right now; try again shortly.",
        retry_after_s=RETRY_AFTER_S,
    )


async def find_or_create_account(accounts: AccountRepo, name: str) -> tuple[Account, bool]:
    """The account named ``name``, made with the default limits if there is none; True if made.

    Replicas may make the same account at once: the one that loses the race finds the winner's.
    """
    account = await accounts.get_account(name)
    if account is not None:
        return account, False
    try:
        return await accounts.create_account(name, {}), True
    except ValueError:
        found = await accounts.get_account(name)
        if found is None:
            raise
        return found, False


def accounts_outage_log(where: str | None = None) -> OutageLog:
    """The outage log of the accounts database at ``where`` (masked); one for all its lookups."""
    return OutageLog(
        logger,
        "accounts database",
        "stored API keys and NUC accounts that are not cached get 503 until it answers",
        where=where,
    )


class _MissBudget:
    """A token bucket charged for each lookup of an unseen key, refunded unless it missed."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        """Spend a token if there is one."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def refund(self) -> None:
        """Give back a token: the lookup found its key, or failed for another reason."""
        self._tokens = min(self._burst, self._tokens + 1)


@dataclass(slots=True)
class _Known[V]:
    value: V
    expires: float


class CachedLookup[K: Hashable, V]:
    """A bounded read-through cache in front of one database lookup (see the module doc)."""

    def __init__(
        self,
        fetch: Callable[[K], Awaitable[V | None]],
        *,
        ttl_s: float,
        outages: OutageLog | None = None,
        timeout_s: float = LOOKUP_TIMEOUT_S,
        max_known: int = MAX_KNOWN,
        max_missing: int = MAX_MISSING,
        max_unknown_lookups: int = MAX_UNKNOWN_LOOKUPS,
        max_unknown_waiting: int = MAX_UNKNOWN_WAITING,
        misses_per_s: float = MISSES_PER_S,
        miss_burst: int = MISS_BURST,
        cache_missing: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._misses = _MissBudget(misses_per_s, miss_burst, clock)
        self._cache_missing = cache_missing
        self._ttl_s = ttl_s
        self.outages = outages or accounts_outage_log()
        self._timeout_s = timeout_s
        self._max_known = max_known
        self._max_missing = max_missing
        self._unknown_slots = asyncio.Semaphore(max_unknown_lookups)
        self._max_unknown_pending = max_unknown_lookups + max_unknown_waiting
        self._known: OrderedDict[K, _Known[V]] = OrderedDict()
        # Insertion order is expiry order (one TTL for all), so the oldest is always first.
        self._missing: dict[K, float] = {}
        self._inflight: dict[K, asyncio.Task[V | None]] = {}
        self._unknown_pending = 0
        self.shed = 0
        """Unknown keys answered 503 because the lookup queue or the miss budget was spent."""

    async def get(self, key: K) -> V | None:
        """The value for ``key`` (None if the database has none), from the cache if fresh.

        Raises ``AccountsUnavailable`` when the database cannot answer or, for a key not seen
        before, when too many such lookups are already running and waiting or the budget of
        misses is spent.
        """
        now = self._clock()
        known = self._known.get(key)
        if known is not None and known.expires > now:
            self._known.move_to_end(key)
            return known.value
        missing_until = self._missing.get(key)
        if missing_until is not None and missing_until > now:
            return None
        task = self._inflight.get(key) or self._start(key, unknown=known is None)
        # Shielded: a caller that gives up (client gone) does not cancel the lookup that
        # other callers of the same key wait for, and its answer is still cached.
        return await asyncio.shield(task)

    def _start(self, key: K, *, unknown: bool) -> asyncio.Task[V | None]:
        if unknown:
            if self._unknown_pending >= self._max_unknown_pending or not self._misses.take():
                self.shed += 1
                raise busy_error()
            self._unknown_pending += 1
        task = asyncio.create_task(self._refresh(key, unknown=unknown))
        self._inflight[key] = task
        task.add_done_callback(functools.partial(self._finished, key, unknown))
        return task

    def _finished(self, key: K, unknown: bool, task: asyncio.Task[V | None]) -> None:
        # A done callback runs even for a task cancelled before it started, so the count of
        # pending unknown lookups cannot leak.
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if unknown:
            self._unknown_pending -= 1
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have given up

    async def _refresh(self, key: K, *, unknown: bool) -> V | None:
        if unknown:
            missed = False
            try:
                async with self._unknown_slots:
                    started, value = await self._fetch_guarded(key)
                missed = value is None
            finally:
                if not missed:
                    self._misses.refund()
        else:
            started, value = await self._fetch_guarded(key)
        # Expiry counts from when the query started: a revocation committed after that is
        # seen by the next lookup, at most ``ttl_s`` later.
        expires = started + self._ttl_s
        if value is None:
            self._known.pop(key, None)
            if self._cache_missing:
                self._remember_missing(key, expires)
        else:
            self._missing.pop(key, None)
            self._remember_known(key, _Known(value, expires))
        return value

    async def _fetch_guarded(self, key: K) -> tuple[float, V | None]:
        started = self._clock()
        attempt = time.monotonic()  # the outage log's clock, whatever ``clock`` is
        try:
            async with asyncio.timeout(self._timeout_s):
                value = await self._fetch(key)
        except (OSError, sa_exc.SQLAlchemyError) as exc:
            if not database_unavailable(exc):
                raise
            self.outages.failed(exc, started=attempt)
            raise unavailable_error() from None
        self.outages.answered(started=attempt)
        return started, value

    def _remember_known(self, key: K, entry: _Known[V]) -> None:
        self._known[key] = entry
        self._known.move_to_end(key)
        while len(self._known) > self._max_known:
            self._known.popitem(last=False)

    def _remember_missing(self, key: K, expires: float) -> None:
        self._missing.pop(key, None)
        self._missing[key] = expires
        now = self._clock()
        while self._missing:
            oldest, until = next(iter(self._missing.items()))
            if until > now and len(self._missing) <= self._max_missing:
                break
            del self._missing[oldest]

"""API keys validated by Nillion's credit service (``NILAI_AUTH_STRATEGIES=credit``).

An upstream nilAI deployment's keys live at the credit service, not in this gateway's
database: the service says whether a key is valid and whose it is. Each credit user gets an
account here named ``credit:<user id>`` (made on first use), the unit of rate limits and usage
like any other; its requests are metered (``nilai.billing.meter``).

Validations go through ``CachedLookup`` like stored keys: cached for ``ttl_s``, one call per key
at a time, unknown keys bounded and budgeted so a flood of random keys cannot flood the credit
service. The service down is a 503 with ``Retry-After`` (``BillingUnavailable``), never a 401 or
500. With ``fail_open_s`` a key the service validated within that many seconds is still
accepted while it is down (its requests then go unmetered, or are refused at the lock, as the
meter is configured): an outage does not stop paying users, and a key never seen is never let in.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from nilai.auth.base import CreditCredential, Principal
from nilai.auth.lookups import MAX_KNOWN, CachedLookup, find_or_create_account
from nilai.billing.credit import CredentialRejected, CreditService, CreditUnavailable
from nilai.billing.meter import CreditMeter
from nilai.errors import AuthenticationFailed, BillingUnavailable
from nilai.outages import OutageLog
from nilai.store.base import Account, AccountRepo

logger = logging.getLogger(__name__)

ACCOUNT_PREFIX = "credit:"
"""Accounts of credit users are named ``credit:<user id>``."""


@dataclass(frozen=True, slots=True)
class _Key:
    """A credential as a cache key: compared and hashed by its digest."""

    digest: bytes
    credential: str = field(compare=False, repr=False)


class CreditApiKeys:
    """Authenticates API keys that the credit service knows."""

    def __init__(
        self,
        service: CreditService,
        accounts: AccountRepo,
        meter: CreditMeter,
        *,
        ttl_s: float,
        fail_open_s: float = 0.0,
        outages: OutageLog | None = None,
    ) -> None:
        self._service = service
        self._accounts = accounts
        self._meter = meter
        self._fail_open_s = fail_open_s
        self.lookups: CachedLookup[_Key, Account] = CachedLookup(
            self._validate, ttl_s=ttl_s, outages=outages, max_known=MAX_KNOWN
        )
        # The last good validation of each key, for ``fail_open_s``.
        self._validated: OrderedDict[bytes, tuple[Account, float]] = OrderedDict()

    async def authenticate(self, credential: str) -> Principal:
        """Accept a key the credit service says is valid, of an active account.

        Raises ``AuthenticationFailed`` (401) for a key the service does not know or calls
        inactive, ``BillingUnavailable`` (503) when the service cannot answer, and
        ``AccountsUnavailable`` (503) when the account cannot be looked up now.
        """
        key = _Key(hashlib.sha256(credential.encode()).digest(), credential)
        try:
            account = await self.lookups.get(key)
        except BillingUnavailable:
            account = self._recently_valid(key.digest)
            if account is None:
                raise
        if account is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if not account.active:
            raise AuthenticationFailed("This account is disabled.", code="account_disabled")
        self._remember(key.digest, account)
        return Principal(
            account_id=account.id,
            method="credit",
            account=account,
            credit=CreditCredential(credential, public=False),
        )

    async def _validate(self, key: _Key) -> Account | None:
        started = time.monotonic()
        try:
            holder = await self._service.validate(key.credential, public=False)
        except CredentialRejected:
            self._meter.outage.answered(started=started)
            return None
        except CreditUnavailable as exc:
            self._meter.outage.failed(exc, started=started)
            raise self._meter.unavailable() from None
        self._meter.outage.answered(started=started)
        return await self._account(ACCOUNT_PREFIX + holder.user_id)

    async def _account(self, name: str) -> Account:
        account, made = await find_or_create_account(self._accounts, name)
        if made:
            logger.info("created account %s for a new credit service user", account.id)
        return account

    def _recently_valid(self, digest: bytes) -> Account | None:
        if self._fail_open_s <= 0:
            return None
        found = self._validated.get(digest)
        if found is None or time.monotonic() - found[1] > self._fail_open_s:
            return None
        return found[0]

    def _remember(self, digest: bytes, account: Account) -> None:
        if self._fail_open_s <= 0:
            return
        self._validated[digest] = (account, time.monotonic())
        self._validated.move_to_end(digest)
        while len(self._validated) > MAX_KNOWN:
            self._validated.popitem(last=False)

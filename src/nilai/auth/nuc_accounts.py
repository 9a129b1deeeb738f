"""NUC authentication: a valid envelope's subject (the subscription holder) is the account.

Accounts of subscription holders are named by their DID. An unknown holder is either given an
account with the default limits on first use or refused, by ``NILAI_NUC_AUTO_ACCOUNTS``.
Lookups are cached for a few seconds, like API keys, so disabling an account takes effect
within ``ttl_s``.
"""

from __future__ import annotations

import logging
import time

from nilai.auth.base import Principal
from nilai.auth.nuc_tokens import NucVerifier
from nilai.errors import AuthenticationFailed
from nilai.store.base import Account, AccountRepo

logger = logging.getLogger(__name__)

MAX_CACHED = 10_000


class NucAuthenticator:
    """Accepts NUC envelopes addressed to this gateway."""

    def __init__(
        self,
        verifier: NucVerifier,
        accounts: AccountRepo,
        *,
        auto_accounts: bool,
        ttl_s: float,
    ) -> None:
        self._verifier = verifier
        self._accounts = accounts
        self._auto_accounts = auto_accounts
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Account]] = {}

    async def authenticate(self, credential: str) -> Principal:
        """Validate the envelope, then find (or make) the subscription holder's account."""
        granted = self._verifier.verify(credential)
        account = await self._account(granted.subject)
        if not account.active:
            raise AuthenticationFailed("This account is disabled.", code="account_disabled")
        return Principal(
            account_id=account.id,
            method="nuc",
            account=account,
            caller=granted.issuer,
            token_limits=granted.limits,
            prompt_document=granted.prompt_document,
        )

    async def _account(self, subject: str) -> Account:
        now = time.monotonic()
        cached = self._cache.get(subject)
        if cached is not None and cached[0] > now:
            return cached[1]
        account = await self._accounts.get_account(subject)
        if account is None:
            account = await self._create(subject)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[subject] = (now + self._ttl_s, account)
        return account

    async def _create(self, subject: str) -> Account:
        if not self._auto_accounts:
            raise AuthenticationFailed(
                f"NUC token rejected: the subscription holder {subject} has no account on this "
                "gateway (an operator can create one named by that DID: "
                "nilai accounts add <DID>).",
                code="unknown_account",
            )
        try:
            account = await self._accounts.create_account(subject, {})
        except ValueError:
            # Another replica (or request) created it first.
            found = await self._accounts.get_account(subject)
            if found is None:
                raise
            return found
        logger.info("created account %s for a new NUC subscription holder", account.id)
        return account

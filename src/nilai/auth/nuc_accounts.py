"""NUC authentication: a valid envelope's subject (the subscription holder) is the account.

Accounts of subscription holders are named by their DID. An unknown holder is either given an
account with the default limits on first use or refused, by ``NILAI_NUC_AUTO_ACCOUNTS``.
Lookups go through ``CachedLookup`` like API keys: cached for ``ttl_s`` (disabling an account
takes effect within it), one lookup (or creation) per holder at a time, holders not seen before
bounded so a flood of fresh tokens cannot crowd out known holders, and a database outage
answered 503 with ``Retry-After`` (``AccountsUnavailable``).

An invocation that passes every check is then spent (``ReplayGuard``): the same invocation is
refused the next time, on every replica sharing the replay cache.
"""

from __future__ import annotations

import logging

from nilai.auth.base import CreditCredential, Principal
from nilai.auth.lookups import MAX_KNOWN, CachedLookup, find_or_create_account
from nilai.auth.nuc_tokens import NucVerifier
from nilai.auth.replay import ReplayGuard
from nilai.errors import AuthenticationFailed
from nilai.outages import OutageLog
from nilai.store.base import Account, AccountRepo

logger = logging.getLogger(__name__)

MAX_CACHED = MAX_KNOWN


class NucAuthenticator:
    """Accepts NUC envelopes addressed to this gateway."""

    def __init__(
        self,
        verifier: NucVerifier,
        accounts: AccountRepo,
        *,
        auto_accounts: bool,
        ttl_s: float,
        outages: OutageLog | None = None,
        replay: ReplayGuard | None = None,
        metered: bool = False,
    ) -> None:
        self._verifier = verifier
        # With the credit service on, a subscription holder's requests are metered by its DID.
        self._metered = metered
        self._replay = replay
        self._accounts = accounts
        self._auto_accounts = auto_accounts
        # Misses are not cached: a holder refused as unknown is accepted on the next request
        # once an operator has created the account.
        self.lookups: CachedLookup[str, Account] = CachedLookup(
            self._find_or_create,
            ttl_s=ttl_s,
            outages=outages,
            max_known=MAX_CACHED,
            cache_missing=False,
        )

    async def authenticate(self, credential: str) -> Principal:
        """Validate the envelope, then find (or make) the subscription holder's account.

        Raises ``AuthenticationFailed`` (401) for a bad token, an unknown holder (without auto
        accounts), a disabled account or an invocation used before, ``AccountsUnavailable``
        (503) when the account cannot be looked up now, and ``LimitsUnavailable`` (503) when
        the replay cache cannot be reached.
        """
        granted = self._verifier.verify(credential)
        account = await self.lookups.get(granted.subject)
        if account is None:
            raise AuthenticationFailed(
                f"NUC token rejected: the subscription holder {granted.subject} has no account "
                "on this gateway (an operator can create one named by that DID: "
                "nilai accounts add <DID>).",
                code="unknown_account",
            )
        if not account.active:
            raise AuthenticationFailed("This account is disabled.", code="account_disabled")
        if self._replay is not None:
            # Last, so an invocation refused for another reason (or met by an outage) is not
            # spent: the client may send it again.
            await self._replay.spend(granted.invocation_id, granted.expires_at)
        return Principal(
            account_id=account.id,
            method="nuc",
            account=account,
            caller=granted.issuer,
            token_limits=granted.limits,
            prompt_document=granted.prompt_document,
            request_policies=granted.policies,
            credit=CreditCredential(granted.subject, public=True) if self._metered else None,
        )

    async def _find_or_create(self, subject: str) -> Account | None:
        if not self._auto_accounts:
            return await self._accounts.get_account(subject)
        account, made = await find_or_create_account(self._accounts, subject)
        if made:
            logger.info("created account %s for a new NUC subscription holder", account.id)
        return account

"""The enabled authentication strategies, and which one a credential belongs to.

With several strategies on, one gateway serves API-key and NUC clients: a NUC envelope is
recognisable by its shape (base64url JWT segments), anything else is an API key. API keys are
this gateway's own (stored, or from the settings) or, with ``credit``, the credit service's: a
key of the stored shape (``nilai_…``) or one the settings list is checked here only, any other
goes to the credit service.
"""

from __future__ import annotations

import logging
import re

from redis.asyncio import Redis

from nilai.auth.api_keys import StaticApiKeys
from nilai.auth.base import Authenticator, Principal
from nilai.auth.credit_keys import CreditApiKeys
from nilai.auth.lookups import accounts_outage_log
from nilai.auth.nuc_accounts import NucAuthenticator
from nilai.auth.nuc_tokens import NucVerifier, looks_like_nuc
from nilai.auth.replay import MemoryReplayCache, RedisReplayCache, ReplayCache, ReplayGuard
from nilai.auth.stored_keys import StoredApiKeys, StoredOrStatic, key_prefix
from nilai.billing.credit import CreditService
from nilai.billing.meter import CreditMeter
from nilai.errors import AuthenticationFailed
from nilai.outages import mask_url
from nilai.settings import NilaiSettings
from nilai.store.base import Store

logger = logging.getLogger(__name__)

_PRIVATE_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")
PRIVATE_KEY_SENT = (
    "The bearer credential is a raw 64-hex-character private key, which must never leave the "
    "client. Send a NUC invocation token derived from it instead (nilai-py does this; "
    "nilai-py 0.3 with openai >= 2.34 sends the key itself: pin openai < 2.34)."
)


class ByShape:
    """Sends each credential to the strategy its shape belongs to."""

    def __init__(self, *, api_keys: Authenticator | None, nuc: Authenticator | None) -> None:
        self._api_keys = api_keys
        self._nuc = nuc

    async def authenticate(self, credential: str) -> Principal:
        """Authenticate with the matching strategy; explain a credential no strategy takes."""
        if looks_like_nuc(credential):
            if self._nuc is None:
                raise AuthenticationFailed(
                    "This gateway does not accept NUC tokens; send an API key.",
                    code="nuc_not_accepted",
                )
            return await self._nuc.authenticate(credential)
        if _PRIVATE_KEY.fullmatch(credential):
            return await self._maybe_private_key(credential)
        if self._api_keys is None:
            raise AuthenticationFailed(
                "This gateway accepts NUC tokens only: send 'Authorization: Bearer <NUC "
                "invocation>' addressed to the DID of GET /v1/public_key.",
                code="invalid_nuc_token",
            )
        return await self._api_keys.authenticate(credential)

    async def _maybe_private_key(self, credential: str) -> Principal:
        # Operators often make API keys with `openssl rand -hex 32`: a configured key wins.
        if self._api_keys is not None:
            try:
                return await self._api_keys.authenticate(credential)
            except AuthenticationFailed:
                pass
        raise AuthenticationFailed(PRIVATE_KEY_SENT, code="private_key_sent")


class LocalOrCredit:
    """This gateway's own keys first; any other key goes to the credit service."""

    def __init__(self, local: Authenticator | None, credit: Authenticator) -> None:
        self._local = local
        self._credit = credit

    async def authenticate(self, credential: str) -> Principal:
        """A stored-shape key is checked here only; a settings key wins; else the service."""
        if self._local is not None:
            if key_prefix(credential) is not None:
                return await self._local.authenticate(credential)
            try:
                return await self._local.authenticate(credential)
            except AuthenticationFailed:
                pass
        return await self._credit.authenticate(credential)


def make_authenticator(
    settings: NilaiSettings,
    store: Store,
    public_key: bytes,
    *,
    redis: Redis | None = None,
    credit: tuple[CreditService, CreditMeter] | None = None,
) -> Authenticator:
    """The authenticator for the configured strategies.

    Spent NUC invocations are kept in ``redis`` when given (shared by replicas), else in this
    process; ``NILAI_NUC_REPLAY_PROTECTION=false`` keeps none. ``credit`` (the credit service
    and its meter, when ``NILAI_CREDIT_URL`` is set) validates keys for the ``credit`` strategy
    and meters NUC subscription holders when ``NILAI_CREDIT_METER_NUC`` is on.
    """
    api_keys: Authenticator | None = None
    nuc: Authenticator | None = None
    # One database: one outage, logged once for both.
    outages = accounts_outage_log(mask_url(settings.db_url))
    if "api_key" in settings.auth_strategies:
        static = StaticApiKeys(settings.static_api_keys, settings.api_key_hashes)
        stored = StoredApiKeys(store, ttl_s=settings.key_cache_ttl_s, outages=outages)
        api_keys = StoredOrStatic(stored, static)
    if "credit" in settings.auth_strategies:
        if credit is None:
            raise ValueError("the credit strategy needs NILAI_CREDIT_URL and its API token")
        service, meter = credit
        credit_keys = CreditApiKeys(
            service,
            store,
            meter,
            ttl_s=settings.key_cache_ttl_s,
            fail_open_s=settings.credit_fail_open_s if settings.credit_fail_open else 0.0,
            outages=outages,
        )
        api_keys = LocalOrCredit(api_keys, credit_keys)
    if "nuc" in settings.auth_strategies:
        verifier = NucVerifier(
            public_key,
            tuple(settings.nuc_root_issuers),
            max_lifetime_s=settings.nuc_max_lifetime_s,
        )
        replay: ReplayGuard | None = None
        if settings.nuc_replay_protection:
            cache: ReplayCache = (
                MemoryReplayCache()
                if redis is None
                else RedisReplayCache(redis, settings.redis_prefix)
            )
            replay = ReplayGuard(cache)
        nuc = NucAuthenticator(
            verifier,
            store,
            auto_accounts=settings.nuc_auto_accounts,
            ttl_s=settings.key_cache_ttl_s,
            outages=outages,
            replay=replay,
            metered=credit is not None and settings.credit_meter_nuc,
        )
        if settings.nuc_auto_accounts and not settings.nuc_root_issuers:
            logger.warning(
                "NUC tokens are accepted from any root issuer and unknown subscription holders "
                "get accounts: anyone with a secp256k1 key can use this gateway within the "
                "default limits (set NILAI_NUC_ROOT_ISSUERS or NILAI_NUC_AUTO_ACCOUNTS=false)"
            )
    return ByShape(api_keys=api_keys, nuc=nuc)

"""API keys kept in the database: ``nilai_<prefix>_<secret>``, stored as SHA-256 only.

The prefix finds the record; the hash of the whole key is compared in constant time. Lookups
go through ``CachedLookup`` (``nilai.auth.lookups``): cached for ``ttl_s`` (a revoked key stops
working within it, and no longer, even while the database is down), one query per prefix at a
time, unknown prefixes bounded so a flood of random keys cannot crowd out known ones, and a
database outage answered 503 with ``Retry-After`` (``AccountsUnavailable``).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from nilai.auth.api_keys import key_digest
from nilai.auth.base import Authenticator, Principal
from nilai.auth.lookups import MAX_KNOWN, CachedLookup
from nilai.errors import AuthenticationFailed
from nilai.outages import OutageLog
from nilai.store.base import Account, ApiKey, ApiKeyRepo

KEY_MARK = "nilai_"
PREFIX_LENGTH = 12
MAX_CACHED = MAX_KNOWN
MIN_SECRET = 32
_HEX_DIGITS = frozenset("0123456789abcdef")
_DUMMY_HASH = key_digest("nilai-dummy-key").hex()


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly made key: ``value`` is shown once, the rest is stored."""

    value: str
    prefix: str
    hash: str


def generate_key() -> NewKey:
    """Make a random key with 256 bits of secret."""
    prefix = secrets.token_hex(PREFIX_LENGTH // 2)
    value = f"{KEY_MARK}{prefix}_{secrets.token_urlsafe(32)}"
    return NewKey(value, prefix, key_digest(value).hex())


def key_prefix(credential: str) -> str | None:
    """The lookup prefix if ``credential`` has the stored-key shape, else None."""
    if not credential.startswith(KEY_MARK):
        return None
    prefix = credential[len(KEY_MARK) : len(KEY_MARK) + PREFIX_LENGTH]
    rest = credential[len(KEY_MARK) + PREFIX_LENGTH :]
    if len(prefix) != PREFIX_LENGTH or not rest.startswith("_") or len(rest) <= MIN_SECRET:
        return None
    # Generated prefixes are lowercase hex; anything else cannot be a key, and never reaches
    # the database (a NUL, say, would be refused there as bad data).
    if not set(prefix) <= _HEX_DIGITS:
        return None
    return prefix


class StoredApiKeys:
    """Authenticates keys created with ``nilai keys create``."""

    def __init__(self, repo: ApiKeyRepo, *, ttl_s: float, outages: OutageLog | None = None) -> None:
        self._repo = repo
        self.lookups: CachedLookup[str, tuple[ApiKey, Account]] = CachedLookup(
            self._key_by_prefix, ttl_s=ttl_s, outages=outages, max_known=MAX_CACHED
        )

    async def _key_by_prefix(self, prefix: str) -> tuple[ApiKey, Account] | None:
        return await self._repo.key_by_prefix(prefix)

    async def authenticate(self, credential: str) -> Principal:
        """Accept a live key of an active account.

        Raises ``AuthenticationFailed`` (401) for a wrong, revoked or disabled key and
        ``AccountsUnavailable`` (503) when the key cannot be checked now.
        """
        prefix = key_prefix(credential)
        found = await self.lookups.get(prefix) if prefix else None
        stored_hash = found[0].hash if found else _DUMMY_HASH
        matches = hmac.compare_digest(key_digest(credential).hex(), stored_hash)
        if found is None or not matches:
            raise AuthenticationFailed("Incorrect API key provided.")
        key, account = found
        if key.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.", code="revoked_api_key")
        if not account.active:
            raise AuthenticationFailed("This account is disabled.", code="account_disabled")
        return Principal(account_id=account.id, method="api_key", key_id=key.id, account=account)


class StoredOrStatic:
    """Stored keys for credentials of their shape, the settings' keys for the rest."""

    def __init__(self, stored: StoredApiKeys, static: Authenticator) -> None:
        self._stored = stored
        self._static = static

    async def authenticate(self, credential: str) -> Principal:
        """Route the credential to the authenticator that can know it."""
        if key_prefix(credential) is not None:
            return await self._stored.authenticate(credential)
        return await self._static.authenticate(credential)

"""API keys kept in the database: ``nilai_<prefix>_<secret>``, stored as SHA-256 only.

The prefix finds the record; the hash of the whole key is compared in constant time. Lookups
are cached for a few seconds, so a revoked key stops working within ``ttl_s``.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

from nilai.auth.api_keys import key_digest
from nilai.auth.base import Authenticator, Principal
from nilai.errors import AuthenticationFailed
from nilai.store.base import Account, ApiKey, ApiKeyRepo

KEY_MARK = "nilai_"
PREFIX_LENGTH = 12
MAX_CACHED = 10_000
MIN_SECRET = 32
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
    return prefix


@dataclass(frozen=True, slots=True)
class _Cached:
    expires: float
    found: tuple[ApiKey, Account] | None


class StoredApiKeys:
    """Authenticates keys created with ``nilai keys create``."""

    def __init__(self, repo: ApiKeyRepo, *, ttl_s: float) -> None:
        self._repo = repo
        self._ttl_s = ttl_s
        self._cache: dict[str, _Cached] = {}

    async def authenticate(self, credential: str) -> Principal:
        """Accept a live key of an active account."""
        prefix = key_prefix(credential)
        found = await self._lookup(prefix) if prefix else None
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

    async def _lookup(self, prefix: str) -> tuple[ApiKey, Account] | None:
        now = time.monotonic()
        cached = self._cache.get(prefix)
        if cached is not None and cached.expires > now:
            return cached.found
        found = await self._repo.key_by_prefix(prefix)
        if len(self._cache) >= MAX_CACHED:
            self._cache = {p: c for p, c in self._cache.items() if c.expires > now}
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
        self._cache[prefix] = _Cached(now + self._ttl_s, found)
        return found


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

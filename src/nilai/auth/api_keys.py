"""API keys given in the settings, held only as hashes."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from nilai.auth.base import Principal
from nilai.errors import AuthenticationFailed


def key_digest(key: str) -> bytes:
    """SHA-256 of a key; keys are high-entropy, so a fast hash is the right tool."""
    return hashlib.sha256(key.encode()).digest()


class StaticApiKeys:
    """Accepts keys from ``NILAI_API_KEY(S)`` or whose SHA-256 is in ``NILAI_API_KEY_HASHES``."""

    def __init__(self, keys: Iterable[str], hashes: Iterable[str] = ()) -> None:
        self._digests = [key_digest(key) for key in keys]
        self._digests += [bytes.fromhex(digest) for digest in hashes]

    def __len__(self) -> int:
        return len(self._digests)

    async def authenticate(self, credential: str) -> Principal:
        """Accept ``credential`` if it hashes to a configured key."""
        digest = key_digest(credential)
        matched = False
        # Compare against every key so the time taken does not depend on which one matched.
        for candidate in self._digests:
            matched |= hmac.compare_digest(digest, candidate)
        if not matched:
            raise AuthenticationFailed("Incorrect API key provided.")
        return Principal(account_id="key:" + digest.hex()[:16], method="api_key")

"""The authenticator interface and the principal it produces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from nilai.store.base import Account


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the account that pays, and how it proved itself."""

    account_id: str
    method: str
    key_id: str | None = None
    account: Account | None = None
    token_uses: tuple[str, int] | None = None
    """A usage limit carried by a token: (token id, uses allowed)."""


class Authenticator(Protocol):
    """Turns a bearer credential into a ``Principal`` or raises ``AuthenticationFailed``."""

    async def authenticate(self, credential: str) -> Principal:
        """Check ``credential``; never log or echo it."""
        ...

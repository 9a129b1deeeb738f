"""The authenticator interface and the principal it produces."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from nilai.store.base import Account


@dataclass(frozen=True, slots=True)
class TokenLimit:
    """A usage limit carried by a token; shared by every request made with that token."""

    token_id: str
    """A stable id of the token that carries the limit (e.g. the hex SHA-256 of a NUC)."""
    uses: int
    expires_at: datetime | None = None
    """When that token expires: past it the counter is useless and may be dropped."""


@dataclass(frozen=True, slots=True)
class PromptDocument:
    """A nilDB document holding a system prompt that the caller may use but not read."""

    document_id: str
    owner_did: str


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the account that pays, and how it proved itself."""

    account_id: str
    method: str
    key_id: str | None = None
    account: Account | None = None
    caller: str | None = None
    """Who made the request when it is not the account itself (a NUC invocation's issuer)."""
    token_limits: tuple[TokenLimit, ...] = ()
    prompt_document: PromptDocument | None = None


class Authenticator(Protocol):
    """Turns a bearer credential into a ``Principal`` or raises ``AuthenticationFailed``."""

    async def authenticate(self, credential: str) -> Principal:
        """Check ``credential``; never log or echo it."""
        ...

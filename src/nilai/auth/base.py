"""The authenticator interface and the principal it produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from nilai.store.base import Account

if TYPE_CHECKING:
    from nilai.auth.nuc_policies import RequestPolicy

TOKEN_CLOCK_SKEW_S = 300
"""What a token has spent (its use count, a spent invocation) is kept this long past the token's
expiry, so clocks a little apart between replicas and Redis cannot forget it while some replica
still accepts the token."""


@dataclass(frozen=True, slots=True)
class TokenLimit:
    """A usage limit carried by a token; shared by every request made with that token."""

    token_id: str
    """A stable id of the token that carries the limit (e.g. the hex SHA-256 of a NUC)."""
    uses: int
    expires_at: datetime | None = None
    """When that token can no longer be used (its own ``exp`` or an earlier one of the tokens
    above it): past it (and ``TOKEN_CLOCK_SKEW_S``) the counter is useless and is dropped. None:
    the counter is kept for the longest time a limiter allows, counted from its last use."""


@dataclass(frozen=True, slots=True)
class PromptDocument:
    """A nilDB document holding a system prompt that the caller may use but not read."""

    document_id: str
    owner_did: str


@dataclass(frozen=True, slots=True)
class CreditCredential:
    """What the credit service meters a principal's requests by (``nilai.billing``).

    An API key the credit service validated (``public`` False), or a NUC subscription holder's
    DID (``public`` True). The key is kept in memory for the request's lock only: it is not
    part of the repr, and never logged.
    """

    credential: str = field(repr=False)
    public: bool


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
    request_policies: tuple[RequestPolicy, ...] = ()
    """What the caller's delegations allow it to ask (``check_request_policies``)."""
    credit: CreditCredential | None = None
    """Set when the credit service meters this caller's requests (lock, then unlock)."""


class Authenticator(Protocol):
    """Turns a bearer credential into a ``Principal`` or raises ``AuthenticationFailed``."""

    async def authenticate(self, credential: str) -> Principal:
        """Check ``credential``; never log or echo it."""
        ...

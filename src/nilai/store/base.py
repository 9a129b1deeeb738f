"""What the rest of nilai needs from storage, as plain records and small Protocols."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Account:
    """An account and its rate-limit overrides (None: the configured default)."""

    id: str
    name: str
    created_at: datetime
    active: bool
    rate_limit_minute: int | None = None
    rate_limit_hour: int | None = None
    rate_limit_day: int | None = None
    rate_limit_lifetime: int | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key's record; never the key itself."""

    id: str
    account_id: str
    prefix: str
    hash: str
    name: str | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class QueryLog:
    """One request's accounting row."""

    id: str
    request_id: str
    account_id: str
    api_key_id: str | None
    model: str
    started_at: datetime
    latency_ms: float
    ttft_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    status_code: int
    error_kind: str | None
    streamed: bool
    tools: bool = False
    web_search: bool = False
    nilrag: bool = False
    multimodal: bool = False
    prompt_document: bool = False
    """A private prompt from nilDB was put first (which one, or what it said, is never kept)."""
    searches: int = 0
    """Searches a web search made at the provider (its queries and results are never kept)."""
    tool_calls: int = 0
    """Server-side tool calls the gateway ran (the code and its output are never kept)."""
    nilrag_chunks: int = 0
    """Chunks NilRAG added to the prompt (the question and the chunks are never kept)."""
    cost_micro: int = 0
    """What the request cost, in micro-units of the credit service's currency."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token and query totals."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    queries: int = 0
    cost_micro: int = 0
    """What the queries cost, in micro-units."""

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.queries + other.queries,
            self.cost_micro + other.cost_micro,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
            self.queries - other.queries,
            self.cost_micro - other.cost_micro,
        )


class AccountRepo(Protocol):
    """Accounts."""

    async def create_account(self, name: str, limits: dict[str, int | None]) -> Account:
        """Create an account; ``ValueError`` if the name is taken."""
        ...

    async def get_account(self, id_or_name: str) -> Account | None:
        """Find an account by id or name."""
        ...

    async def list_accounts(self) -> list[Account]:
        """Every account, oldest first."""
        ...

    async def set_active(self, account_id: str, active: bool) -> None:
        """Enable or disable an account (and so all its keys)."""
        ...

    async def update_limits(self, account_id: str, limits: dict[str, int | None]) -> Account:
        """Set the given ``rate_limit_*`` columns (None: the gateway's default); the account."""
        ...


class ApiKeyRepo(Protocol):
    """API keys."""

    async def add_key(self, key: ApiKey) -> None:
        """Store a new key record."""
        ...

    async def key_by_prefix(self, prefix: str) -> tuple[ApiKey, Account] | None:
        """The key with this prefix and its account, if any."""
        ...

    async def list_keys(self, account_id: str | None = None) -> list[ApiKey]:
        """Keys, of one account or of all."""
        ...

    async def revoke_key(self, id_or_prefix: str) -> ApiKey | None:
        """Revoke a key now; None if there is no such key."""
        ...


class RowsRejected(Exception):
    """The database refused a value in the rows written: the same rows would fail again.

    The message names the error class and SQLSTATE only, never the offending value.
    """


class StoreUnavailable(Exception):
    """The database could not take the write now (unreachable, timed out, overloaded).

    The same rows may well be written later. The message names the error class only.
    """


class QueryLogRepo(Protocol):
    """Query logs and the usage totals kept with them."""

    async def write_logs(self, logs: Sequence[QueryLog]) -> int:
        """Write a batch atomically (rows already written are skipped); return rows added.

        Raises ``RowsRejected`` when a row holds a value the database cannot store and
        ``StoreUnavailable`` when the database cannot be reached; other errors are unclassified.
        """
        ...

    async def usage(self, account_id: str) -> Usage:
        """Totals for an account."""
        ...


@dataclass(frozen=True, slots=True)
class StoredPrice:
    """A model's own price, every amount in micro-units (``nilai.billing.prices``)."""

    model: str
    prompt_per_million: int
    completion_per_million: int
    web_search: int
    updated_at: datetime | None = None
    """When it was last set; the store fills it in."""


class PriceRepo(Protocol):
    """Models' own prices (a model without one is charged the default from the settings)."""

    async def list_prices(self) -> list[StoredPrice]:
        """Every model's own price, by model id."""
        ...

    async def set_price(self, price: StoredPrice) -> None:
        """Create or replace the model's own price."""
        ...

    async def delete_price(self, model: str) -> bool:
        """Remove the model's own price; False if it had none."""
        ...


class Store(AccountRepo, ApiKeyRepo, QueryLogRepo, PriceRepo, Protocol):
    """All repositories over one database."""

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...

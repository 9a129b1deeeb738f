"""The SQLAlchemy implementation of the store; the URL picks PostgreSQL or SQLite."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from nilai.store.base import (
    Account,
    ApiKey,
    QueryLog,
    RowsRejected,
    StoredPrice,
    StoreUnavailable,
    Usage,
)
from nilai.store.errors import describe_error, error_kind
from nilai.store.tables import AccountRow, ApiKeyRow, ModelPriceRow, QueryLogRow, UsageTotalRow

_LIMIT_COLUMNS = frozenset(
    {"rate_limit_minute", "rate_limit_hour", "rate_limit_day", "rate_limit_lifetime"}
)


def new_id(kind: str) -> str:
    """A random id with a readable kind, e.g. ``acct_3f9a0c12d4e5b6a7``."""
    return f"{kind}_{secrets.token_hex(8)}"


def now() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)


def make_engine(url: str) -> AsyncEngine:
    """An async engine with a pool sized for a gateway process."""
    if url.startswith("sqlite"):
        create_private_sqlite_file(url)
        return create_async_engine(url, connect_args={"timeout": 15})
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def create_private_sqlite_file(url: str) -> None:
    """Create a SQLite URL's file readable by its owner only (0600), in a 0700 directory.

    sqlite3 would create it with the umask's mode (0644 as a rule), and the file holds key
    hashes, accounts and usage (SECURITY.md). SQLite gives its journal and WAL files the
    database file's mode. An existing file, or directory, keeps the mode it has.
    """
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class SqlStore:
    """Accounts, keys, logs and totals in one SQL database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._dialect = engine.dialect.name

    def session(self) -> AsyncSession:
        """A new session (use as ``async with``)."""
        return self._sessions()

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()

    # accounts

    async def create_account(self, name: str, limits: dict[str, int | None]) -> Account:
        """Create an account; ``ValueError`` if the name is taken."""
        row = AccountRow(id=new_id("acct"), name=name, created_at=now(), active=True, **limits)
        async with self.session() as session:
            session.add(row)
            try:
                await session.commit()
            except IntegrityError as exc:
                raise ValueError(f"an account named {name!r} already exists") from exc
        return _account(row)

    async def get_account(self, id_or_name: str) -> Account | None:
        """Find an account by id or name."""
        query = select(AccountRow).where(
            or_(AccountRow.id == id_or_name, AccountRow.name == id_or_name)
        )
        async with self.session() as session:
            row = (await session.execute(query)).scalars().first()
        return _account(row) if row else None

    async def list_accounts(self) -> list[Account]:
        """Every account, oldest first."""
        async with self.session() as session:
            rows = (
                await session.execute(select(AccountRow).order_by(AccountRow.created_at))
            ).scalars()
            return [_account(row) for row in rows]

    async def set_active(self, account_id: str, active: bool) -> None:
        """Enable or disable an account."""
        async with self.session() as session:
            await session.execute(
                update(AccountRow).where(AccountRow.id == account_id).values(active=active)
            )
            await session.commit()

    async def update_limits(self, account_id: str, limits: dict[str, int | None]) -> Account:
        """Set the given ``rate_limit_*`` columns (None: the gateway's default); the account.

        ``KeyError`` if there is no such account; ``ValueError`` for another column name.
        """
        unknown = set(limits) - _LIMIT_COLUMNS
        if unknown:
            raise ValueError(f"not rate-limit columns: {', '.join(sorted(unknown))}")
        async with self.session() as session:
            row = await session.get(AccountRow, account_id)
            if row is None:
                raise KeyError(account_id)
            for column, value in limits.items():
                setattr(row, column, value)
            await session.commit()
        return _account(row)

    # keys

    async def add_key(self, key: ApiKey) -> None:
        """Store a new key record."""
        async with self.session() as session:
            session.add(ApiKeyRow(**_fields(key)))
            await session.commit()

    async def key_by_prefix(self, prefix: str) -> tuple[ApiKey, Account] | None:
        """The key with this prefix and its account, if any."""
        query = (
            select(ApiKeyRow, AccountRow)
            .join(AccountRow, AccountRow.id == ApiKeyRow.account_id)
            .where(ApiKeyRow.prefix == prefix)
        )
        async with self.session() as session:
            found = (await session.execute(query)).first()
        if found is None:
            return None
        key_row, account_row = found
        return _key(key_row), _account(account_row)

    async def list_keys(self, account_id: str | None = None) -> list[ApiKey]:
        """Keys, of one account or of all."""
        query = select(ApiKeyRow).order_by(ApiKeyRow.created_at)
        if account_id is not None:
            query = query.where(ApiKeyRow.account_id == account_id)
        async with self.session() as session:
            return [_key(row) for row in (await session.execute(query)).scalars()]

    async def revoke_key(self, id_or_prefix: str) -> ApiKey | None:
        """Revoke a key now; None if there is no such key."""
        match = or_(ApiKeyRow.id == id_or_prefix, ApiKeyRow.prefix == id_or_prefix)
        async with self.session() as session:
            row = (await session.execute(select(ApiKeyRow).where(match))).scalars().first()
            if row is None:
                return None
            if row.revoked_at is None:
                row.revoked_at = now()
            await session.commit()
            return _key(row)

    # logs and usage

    async def write_logs(self, logs: Sequence[QueryLog]) -> int:
        """Insert a batch and add it to the totals in one transaction.

        Rows whose id is already stored are skipped and not counted again, so a batch retried
        after an ambiguous failure (the commit may have landed) is never double-counted.
        Raises ``RowsRejected`` when the database refuses a value in the rows and
        ``StoreUnavailable`` when it cannot be reached; anything else is left as it is.
        """
        try:
            return await self._write_logs(logs)
        except Exception as exc:
            kind = error_kind(exc)
            if kind == "data":
                raise RowsRejected(describe_error(exc)) from exc
            if kind == "transient":
                raise StoreUnavailable(describe_error(exc)) from exc
            raise

    async def _write_logs(self, logs: Sequence[QueryLog]) -> int:
        logs = list({log.id: log for log in logs}.values())  # a row counts once per batch
        if not logs:
            return 0
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        rows = [_fields(log) for log in logs]
        async with self.session() as session, session.begin():
            statement = (
                insert(QueryLogRow)
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(QueryLogRow.id)
            )
            added = set((await session.execute(statement, rows)).scalars())
            fresh = [log for log in logs if log.id in added]
            await self._add_totals(session, insert, fresh)
            await self._touch_keys(session, fresh)
        return len(fresh)

    async def _add_totals(
        self, session: AsyncSession, insert: Any, logs: Sequence[QueryLog]
    ) -> None:
        # Any: the dialect-specific insert constructs share no public type.
        sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for log in logs:
            total = sums[log.account_id]
            total[0] += log.prompt_tokens
            total[1] += log.completion_tokens
            total[2] += 1
            total[3] += log.cost_micro
        for account_id, (prompt, completion, queries, cost) in sorted(sums.items()):
            statement = insert(UsageTotalRow).values(
                account_id=account_id,
                prompt_tokens=prompt,
                completion_tokens=completion,
                queries=queries,
                cost_micro=cost,
            )
            table = UsageTotalRow.__table__
            statement = statement.on_conflict_do_update(
                index_elements=["account_id"],
                set_={
                    "prompt_tokens": table.c.prompt_tokens + prompt,
                    "completion_tokens": table.c.completion_tokens + completion,
                    "queries": table.c.queries + queries,
                    "cost_micro": table.c.cost_micro + cost,
                },
            )
            await session.execute(statement)

    async def _touch_keys(self, session: AsyncSession, logs: Sequence[QueryLog]) -> None:
        latest: dict[str, datetime] = {}
        for log in logs:
            if log.api_key_id is not None:
                latest[log.api_key_id] = max(
                    latest.get(log.api_key_id, log.started_at), log.started_at
                )
        for key_id, used in sorted(latest.items()):
            await session.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.id == key_id)
                .where(or_(ApiKeyRow.last_used_at.is_(None), ApiKeyRow.last_used_at < used))
                .values(last_used_at=used)
            )

    async def usage(self, account_id: str) -> Usage:
        """Totals for an account: one primary-key lookup, however many logs there are."""
        async with self.session() as session:
            row = await session.get(UsageTotalRow, account_id)
        if row is None:
            return Usage()
        return Usage(row.prompt_tokens, row.completion_tokens, row.queries, row.cost_micro)

    # prices

    async def list_prices(self) -> list[StoredPrice]:
        """Every model's own price, by model id."""
        async with self.session() as session:
            rows = (
                await session.execute(select(ModelPriceRow).order_by(ModelPriceRow.model))
            ).scalars()
            return [_price(row) for row in rows]

    async def set_price(self, price: StoredPrice) -> None:
        """Create or replace the model's own price.

        One upsert statement, so two admins setting one model at once never collide.
        """
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        values = {
            "model": price.model,
            "prompt_per_million": price.prompt_per_million,
            "completion_per_million": price.completion_per_million,
            "web_search": price.web_search,
            "updated_at": now(),
        }
        statement = insert(ModelPriceRow).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=["model"], set_={k: v for k, v in values.items() if k != "model"}
        )
        async with self.session() as session, session.begin():
            await session.execute(statement)

    async def delete_price(self, model: str) -> bool:
        """Remove the model's own price; False if it had none."""
        statement = (
            delete(ModelPriceRow).where(ModelPriceRow.model == model).returning(ModelPriceRow.model)
        )
        async with self.session() as session, session.begin():
            return (await session.execute(statement)).first() is not None


def _fields(record: Any) -> dict[str, Any]:
    """A slotted dataclass as a dict of its fields, times in UTC (SQLite drops offsets)."""
    # Any: any of the record dataclasses.
    fields = {name: getattr(record, name) for name in record.__dataclass_fields__}
    for name, value in fields.items():
        if isinstance(value, datetime) and value.tzinfo is not None:
            fields[name] = value.astimezone(UTC)
    return fields


def _utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything stored is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _account(row: AccountRow) -> Account:
    return Account(
        id=row.id,
        name=row.name,
        created_at=_utc(row.created_at) or row.created_at,
        active=row.active,
        rate_limit_minute=row.rate_limit_minute,
        rate_limit_hour=row.rate_limit_hour,
        rate_limit_day=row.rate_limit_day,
        rate_limit_lifetime=row.rate_limit_lifetime,
    )


def _price(row: ModelPriceRow) -> StoredPrice:
    return StoredPrice(
        model=row.model,
        prompt_per_million=row.prompt_per_million,
        completion_per_million=row.completion_per_million,
        web_search=row.web_search,
        updated_at=_utc(row.updated_at),
    )


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        account_id=row.account_id,
        prefix=row.prefix,
        hash=row.hash,
        name=row.name,
        created_at=_utc(row.created_at) or row.created_at,
        last_used_at=_utc(row.last_used_at),
        revoked_at=_utc(row.revoked_at),
    )

"""Databases for tests: a SQLite file, or a throwaway database on this machine's PostgreSQL.

Plain helpers (``database``, ``with_store``, ``create_tenant``, ``run_sync``, ...) that any test
module may import, and the ``db_url`` fixture, registered once in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Connection, inspect, select, table, text

from nilai.auth.stored_keys import generate_key
from nilai.store.base import Account, ApiKey
from nilai.store.migrate import upgrade
from nilai.store.sql import SqlStore, make_engine, new_id, now

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
BACKENDS = ["sqlite", "postgresql"]


def pg_url(name: str, *, host: str = PG_HOST, port: int = PG_PORT) -> str:
    """The SQLAlchemy URL of database ``name`` on this machine's PostgreSQL."""
    return f"postgresql+asyncpg://{PG_USER}@{host}:{port}/{name}"


def sqlite_url(directory: Path) -> str:
    """The SQLAlchemy URL of a SQLite file in ``directory``."""
    return f"sqlite+aiosqlite:///{directory}/nilai.db"


async def _admin() -> asyncpg.Connection:
    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")


async def create_pg_database(prefix: str = "nilai_test") -> str:
    """Create an empty database with a unique name and return the name."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_pg_database(name: str) -> None:
    """Drop a database, ending any session still connected to it."""
    conn = await _admin()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def pg_execute(database: str, *statements: str) -> None:
    """Run ``statements`` in order on database ``database`` of this machine's PostgreSQL."""
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def run_sync[T](coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a private loop in another thread.

    Safe to call from sync fixtures and tests whatever loop the caller's thread has.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def with_store[T](url: str, action: Callable[[SqlStore], Awaitable[T]]) -> T:
    """Run ``action`` on a short-lived store over ``url``, from sync code."""

    async def run() -> T:
        engine = make_engine(url)
        try:
            return await action(SqlStore(engine))
        finally:
            await engine.dispose()

    return run_sync(run())


def _all_rows(sync: Connection) -> dict[str, list[tuple[Any, ...]]]:
    dump: dict[str, list[tuple[Any, ...]]] = {}
    for name in inspect(sync).get_table_names():
        columns = [column["name"] for column in inspect(sync).get_columns(name)]
        query = select(*(text(f'"{c}"') for c in columns)).select_from(table(name))
        dump[name] = [tuple(row) for row in sync.execute(query)]
    return dump


def dump_database(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, for tests that search the database for what it must not hold."""

    async def dump() -> dict[str, list[tuple[Any, ...]]]:
        engine = make_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(_all_rows)
        finally:
            await engine.dispose()

    return run_sync(dump())


async def create_tenant(store: SqlStore, name: str) -> tuple[Account, ApiKey, str]:
    """Migrate, then create an account with one key; returns the key's value too."""
    await upgrade(store.engine)
    account = await store.create_account(name, {})
    made = generate_key()
    key = ApiKey(
        id=new_id("key"),
        account_id=account.id,
        prefix=made.prefix,
        hash=made.hash,
        name="test",
        created_at=now(),
        last_used_at=None,
        revoked_at=None,
    )
    await store.add_key(key)
    return account, key, made.value


@contextmanager
def database(backend: str, directory: Path) -> Iterator[str]:
    """A fresh, empty database of ``backend`` for as long as the block runs; yields its URL."""
    if backend == "sqlite":
        yield sqlite_url(directory)
        return
    if backend != "postgresql":
        raise ValueError(f"unknown backend {backend!r}")
    name = run_sync(create_pg_database())
    try:
        yield pg_url(name)
    finally:
        run_sync(drop_pg_database(name))


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database, once on each backend (SQLite, PostgreSQL)."""
    with database(request.param, tmp_path) as url:
        yield url

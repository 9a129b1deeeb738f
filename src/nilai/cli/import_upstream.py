"""``nilai import-upstream``: bring an upstream nilAI deployment's users and usage over.

Upstream keeps two tables in PostgreSQL (its Alembic head ``43b23c73035b``): ``users`` (a user
id and a JSON ``rate_limits``; only users given their own limits have a row) and
``query_logs`` (one row per request: user id, model, token counts, ...). It keeps no API keys:
the credit service (nilauth-credit) holds them and names each key's user.

Each upstream user id (from ``users`` or from ``query_logs``) becomes an account named
``credit:<user id>`` with the limits that have a counterpart here: upstream's user ids are the
credit service's, and the credit strategy (``nilai.auth.credit_keys``) finds a key's account by
that name, so an upstream key keeps its limits and usage here. Each upstream query log
becomes a query log here (id ``upstream_<id>``), added to the account's usage totals by the
store as the gateway's own logs are, so ``/v1/usage`` goes on from upstream's numbers. Both
are found again on a second run, which therefore adds nothing. ``--dry-run`` reads and
prints the same plan and writes nothing.

The upstream database is read in one read-only, repeatable-read transaction, so the import
sees one consistent moment of it and cannot change it. Nothing upstream holds of a request's
content (``error_message`` included) is read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from nilai.cli import admin
from nilai.cli.admin import MAX_LIMIT, AdminError
from nilai.settings import POSTGRESQL_SCHEMES
from nilai.store.base import Account, QueryLog, RowsRejected, StoreUnavailable
from nilai.store.sql import SqlStore
from nilai.store.tables import QueryLogRow

UPSTREAM_REVISION = "43b23c73035b"
"""Upstream's Alembic head: the layout read (tests/fixtures/upstream_nilai_schema.sql)."""
ACCOUNT_PREFIX = "credit:"
"""As ``nilai.auth.credit_keys.ACCOUNT_PREFIX``: the accounts the credit strategy uses."""
LOG_ID_PREFIX = "upstream_"
BATCH = 1000
CONNECT_TIMEOUT_S = 10.0

# Upstream's RateLimits fields with a counterpart here. Upstream reads each as `value or
# default`, so 0 and null both mean its configured default: here, the gateway's setting.
LIMIT_COLUMNS: Mapping[str, str] = {
    "user_rate_limit_minute": "rate_limit_minute",
    "user_rate_limit_hour": "rate_limit_hour",
    "user_rate_limit_day": "rate_limit_day",
    # Upstream's "for good" limit: requests in total, never reset. Its count is in upstream's
    # Redis, not in the database, so here the count starts again from zero.
    "user_rate_limit": "rate_limit_lifetime",
}
# Upstream's per-user web search limits: this gateway has the same windows, but for every
# account alike (these settings), none per account.
NO_COUNTERPART: Mapping[str, str] = {
    "web_search_rate_limit_minute": "NILAI_WEB_SEARCH_RATE_LIMIT_MINUTE",
    "web_search_rate_limit_hour": "NILAI_WEB_SEARCH_RATE_LIMIT_HOUR",
    "web_search_rate_limit_day": "NILAI_WEB_SEARCH_RATE_LIMIT_DAY",
    "web_search_rate_limit": "NILAI_WEB_SEARCH_RATE_LIMIT_LIFETIME",
}

# The columns read, per table: a database without one of them is not laid out as upstream's
# head revision, and is refused naming what is missing.
REQUIRED_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "users": ("user_id", "rate_limits"),
    "query_logs": (
        "id",
        "user_id",
        "query_timestamp",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "web_search_calls",
        "tool_calls",
        "response_time_ms",
        "was_streamed",
        "was_multimodal",
        "was_nilrag",
        "error_code",
    ),
}
_LOG_QUERY = text(
    "SELECT id, user_id, query_timestamp, model, prompt_tokens, completion_tokens, "
    "web_search_calls, tool_calls, response_time_ms, was_streamed, was_multimodal, "
    "was_nilrag, error_code FROM query_logs ORDER BY id"
)
_MODEL_LENGTH = 200  # query_logs.model here
_ACCOUNT_NAME_LENGTH = 200
_OK = 200
_FIRST_ERROR = 400
_STATUSES = range(100, 600)
_UNKNOWN_ERROR = 500


def upstream_account_name(user_id: str) -> str:
    """The name of the account an upstream user id is imported as (stable across runs)."""
    return f"{ACCOUNT_PREFIX}{user_id}"


def upstream_log_id(upstream_id: int) -> str:
    """The id here of upstream's query log ``upstream_id`` (stable across runs)."""
    return f"{LOG_ID_PREFIX}{upstream_id}"


@dataclass(frozen=True, slots=True)
class UpstreamUser:
    """One upstream user id: the limits it maps to here and what it had without counterpart."""

    user_id: str
    limits: dict[str, int | None]
    not_carried: tuple[str, ...] = ()


@dataclass(slots=True)
class Plan:
    """What an import does (or did): counts per table and what could not be carried over."""

    revision: str | None
    users: dict[str, UpstreamUser] = field(default_factory=dict[str, UpstreamUser])
    new_accounts: int = 0
    existing_accounts: int = 0
    limits_kept: list[str] = field(default_factory=list[str])
    logs_read: int = 0
    logs_new: int = 0
    skipped_users: list[str] = field(default_factory=list[str])


# registration


def register(commands: Any) -> None:
    """Add the ``import-upstream`` subcommand."""
    # Any: argparse's subparsers action type is private.
    summary = "import an upstream nilAI database's users, rate limits and usage"
    parser: argparse.ArgumentParser = commands.add_parser(
        "import-upstream", help=summary, description=summary
    )
    parser.add_argument(
        "--from-db",
        required=True,
        metavar="URL",
        help="upstream's PostgreSQL, e.g. postgresql://user@host:5432/nilai (only read)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would be imported; write nothing"
    )
    parser.set_defaults(handler=admin.run, body=_import_command)


def _import_command(args: argparse.Namespace) -> None:
    """``nilai import-upstream --from-db URL [--dry-run]``."""
    url = _upstream_url(str(args.from_db))
    dry_run = bool(args.dry_run)

    async def action(store: SqlStore) -> None:
        plan = await import_upstream(store, url, dry_run=dry_run)
        print_plan(plan, url, dry_run=dry_run)

    admin.with_store(action, migrate=not dry_run)


def _upstream_url(value: str) -> URL:
    """The upstream URL for the asyncpg driver; 2 for anything but PostgreSQL."""
    for scheme in POSTGRESQL_SCHEMES:
        if value.startswith(scheme):
            value = "postgresql+asyncpg://" + value.removeprefix(scheme)
    try:
        url = make_url(value)
    except ArgumentError as exc:
        raise AdminError(f"invalid --from-db URL: {_one_line(exc)}", 2) from exc
    if url.drivername != "postgresql+asyncpg":
        raise AdminError(
            "--from-db must be upstream's PostgreSQL database "
            f"(postgresql://...), not {url.drivername}://",
            2,
        )
    return url


def _shown(url: URL) -> str:
    return url.set(query={}).render_as_string(hide_password=True)


@contextlib.contextmanager
def _gateway_database(then: str = "") -> Generator[None]:
    """Report a failure of this gateway's database in one line (not as upstream's, status 1)."""
    try:
        yield
    except (ValueError, RowsRejected, StoreUnavailable, SQLAlchemyError) as exc:
        after = f" ({then})" if then else ""
        raise AdminError(f"this gateway's database failed: {_one_line(exc)}{after}") from exc


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# the import


async def import_upstream(store: SqlStore, url: URL, *, dry_run: bool) -> Plan:
    """Import (or, with ``dry_run``, only plan) upstream's users and query logs into ``store``.

    Raises ``AdminError``: status 2 when the upstream database cannot be reached or is not laid
    out as upstream's, 1 when reading it fails midway (what was written stays: a second run
    carries on from there).
    """
    engine = create_async_engine(
        url, poolclass=NullPool, connect_args={"timeout": CONNECT_TIMEOUT_S}
    )
    try:
        try:
            connection = await engine.connect()
        except (OSError, TimeoutError, SQLAlchemyError) as exc:
            raise AdminError(
                f"cannot reach the upstream database {_shown(url)}: {_one_line(exc)}", 2
            ) from exc
        try:
            return await _import(connection, store, dry_run=dry_run)
        except DBAPIError as exc:
            raise AdminError(f"upstream database error: {_one_line(exc.orig or exc)}") from exc
        finally:
            await connection.close()
    finally:
        await engine.dispose()


async def _import(upstream: AsyncConnection, store: SqlStore, *, dry_run: bool) -> Plan:
    upstream = await upstream.execution_options(
        isolation_level="REPEATABLE READ", postgresql_readonly=True
    )
    async with upstream.begin():
        revision = await _revision(upstream)
        await _check_layout(upstream, revision)
        plan = Plan(revision, await _read_users(upstream))
        accounts = await _ensure_accounts(store, plan, dry_run=dry_run)
        await _copy_logs(upstream, store, accounts, plan, dry_run=dry_run)
    return plan


async def _revision(upstream: AsyncConnection) -> str | None:
    exists = await upstream.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL"))
    if not exists:
        return None
    return await upstream.scalar(text("SELECT version_num FROM alembic_version LIMIT 1"))


async def _check_layout(upstream: AsyncConnection, revision: str | None) -> None:
    """Refuse a database without the tables and columns read, naming the first missing."""
    rows = await upstream.execute(
        text(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name IN ('users', 'query_logs')"
        )
    )
    present = {(str(table), str(column)) for table, column in rows}
    tables = {table for table, _ in present}
    at = f"revision {revision}" if revision else "no alembic_version"
    expected = f"upstream nilAI's layout at revision {UPSTREAM_REVISION}"
    for table, columns in REQUIRED_COLUMNS.items():
        if table not in tables:
            raise AdminError(
                f"the upstream database has no table {table!r} ({at}): expected {expected}", 2
            )
        missing = [column for column in columns if (table, column) not in present]
        if missing:
            names = ", ".join(f"{table}.{column}" for column in missing)
            raise AdminError(
                f"the upstream database has no column {names} ({at}): expected {expected} "
                "(upgrade upstream to it first)",
                2,
            )


async def _read_users(upstream: AsyncConnection) -> dict[str, UpstreamUser]:
    """Every upstream user id: those with a ``users`` row, then those only in the logs."""
    rows = (await upstream.execute(text("SELECT user_id, rate_limits FROM users"))).all()
    rows_per_user = Counter(str(user_id) for user_id, _ in rows)
    users: dict[str, UpstreamUser] = {}
    for raw_id, raw_limits in rows:
        user_id = str(raw_id)
        if rows_per_user[user_id] > 1:
            # users.user_id is not unique upstream; its lookup (scalar_one_or_none) then
            # fails and it applies its defaults, so the import does the same.
            note = f"{rows_per_user[user_id]} rows in users: upstream applied its defaults"
            users[user_id] = UpstreamUser(user_id, {}, (note,))
        else:
            users[user_id] = _map_limits(user_id, raw_limits)
    logged = await upstream.execute(text("SELECT DISTINCT user_id FROM query_logs"))
    for (raw_id,) in logged:
        users.setdefault(str(raw_id), UpstreamUser(str(raw_id), {}))
    return users


def _map_limits(user_id: str, raw: object) -> UpstreamUser:
    """Upstream's ``rate_limits`` JSON as this gateway's limit columns, and what has none."""
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except ValueError:
            return UpstreamUser(user_id, {}, ("rate_limits is not JSON: the defaults apply",))
    if raw is None:
        return UpstreamUser(user_id, {})
    if not isinstance(raw, dict):
        return UpstreamUser(user_id, {}, ("rate_limits is not an object: the defaults apply",))
    limits: dict[str, int | None] = {}
    not_carried: list[str] = []
    fields = cast("dict[str, object]", raw)  # a JSON object's keys are strings
    for name, value in sorted(fields.items(), key=lambda item: str(item[0])):
        if value is None or value == 0:
            continue  # upstream's `value or default`: the default
        if name in LIMIT_COLUMNS:
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_LIMIT:
                limits[LIMIT_COLUMNS[name]] = value
            else:
                not_carried.append(
                    f"{name}={value!r} (a limit here is a count from 1 to {MAX_LIMIT}; "
                    "the default applies)"
                )
        elif name in NO_COUNTERPART:
            not_carried.append(
                f"{name}={value!r} (no per-account web search limit here; "
                f"{NO_COUNTERPART[name]} applies to every account)"
            )
        else:
            not_carried.append(f"{name}={value!r} (unknown to this import)")
    return UpstreamUser(user_id, limits, tuple(not_carried))


async def _ensure_accounts(store: SqlStore, plan: Plan, *, dry_run: bool) -> dict[str, str]:
    """Upstream user id -> account id here, creating the missing accounts unless ``dry_run``.

    An account found again keeps the limits it has: an operator may have changed them since
    the first import. Those that differ from upstream's are listed.
    """
    with _gateway_database():
        existing = {account.name: account for account in await store.list_accounts()}
    accounts: dict[str, str] = {}
    for user in plan.users.values():
        name = upstream_account_name(user.user_id)
        if len(name) > _ACCOUNT_NAME_LENGTH:
            plan.skipped_users.append(user.user_id[:40] + "...")
            continue
        account = existing.get(name)
        if account is not None:
            plan.existing_accounts += 1
            accounts[user.user_id] = account.id
            if _limits_of(account) != _full(user.limits):
                plan.limits_kept.append(name)
            continue
        plan.new_accounts += 1
        if not dry_run:
            accounts[user.user_id] = (await _create_account(store, name, user.limits)).id
    return accounts


async def _create_account(store: SqlStore, name: str, limits: dict[str, int | None]) -> Account:
    """Create the account, or take the one made meanwhile (the credit strategy makes them too)."""
    with _gateway_database():
        try:
            return await store.create_account(name, limits)
        except ValueError:
            found = await store.get_account(name)
            if found is None:
                raise
            return found


def _limits_of(account: Account) -> dict[str, int | None]:
    return {column: getattr(account, column) for column in LIMIT_COLUMNS.values()}


def _full(limits: Mapping[str, int | None]) -> dict[str, int | None]:
    return {column: limits.get(column) for column in LIMIT_COLUMNS.values()}


async def _copy_logs(
    upstream: AsyncConnection,
    store: SqlStore,
    accounts: Mapping[str, str],
    plan: Plan,
    *,
    dry_run: bool,
) -> None:
    """Copy the query logs in batches; the store skips (and does not count) those it has."""
    result = await upstream.stream(_LOG_QUERY)
    async for batch in result.partitions(BATCH):
        plan.logs_read += len(batch)
        if dry_run:
            ids = [upstream_log_id(int(row[0])) for row in batch]
            plan.logs_new += len(ids) - len(await _stored_log_ids(store, ids))
            continue
        logs = [_query_log(tuple(row), accounts) for row in batch]
        # What was written stays when a batch fails, and the next run skips it.
        with _gateway_database(f"{plan.logs_new} new query logs written; run the import again"):
            plan.logs_new += await store.write_logs([log for log in logs if log is not None])


async def _stored_log_ids(store: SqlStore, ids: Sequence[str]) -> set[str]:
    query = select(QueryLogRow.id).where(QueryLogRow.id.in_(ids))
    with _gateway_database():
        async with store.session() as session:
            return set((await session.execute(query)).scalars())


def _query_log(row: tuple[Any, ...], accounts: Mapping[str, str]) -> QueryLog | None:
    """An upstream ``query_logs`` row as a query log here (None: its user was skipped)."""
    (
        upstream_id,
        user_id,
        started_at,
        model,
        prompt_tokens,
        completion_tokens,
        searches,
        tool_calls,
        response_time_ms,
        streamed,
        multimodal,
        nilrag,
        error_code,
    ) = row
    account_id = accounts.get(str(user_id))
    if account_id is None:
        return None
    status = _status(int(error_code))
    assert isinstance(started_at, datetime)  # noqa: S101 - a NOT NULL timestamptz column
    return QueryLog(
        id=upstream_log_id(int(upstream_id)),
        request_id=upstream_log_id(int(upstream_id)),
        account_id=account_id,
        api_key_id=None,
        model=str(model)[:_MODEL_LENGTH],
        started_at=started_at,
        # Rows written before upstream measured it hold -1.
        latency_ms=float(max(int(response_time_ms), 0)),
        ttft_ms=None,
        prompt_tokens=int(prompt_tokens),
        completion_tokens=int(completion_tokens),
        status_code=status,
        error_kind=None if status < _FIRST_ERROR else "UpstreamNilaiError",
        streamed=bool(streamed),
        tools=int(tool_calls) > 0,
        web_search=int(searches) > 0,
        nilrag=bool(nilrag),
        multimodal=bool(multimodal),
        searches=int(searches),
        tool_calls=int(tool_calls),
    )


def _status(error_code: int) -> int:
    """Upstream's ``error_code`` as an HTTP status: 0 (its "no error") and backfilled 200 -> 200."""
    if error_code == 0:
        return _OK
    return error_code if error_code in _STATUSES else _UNKNOWN_ERROR


# the report


def print_plan(plan: Plan, url: URL, *, dry_run: bool) -> None:
    """The plan, or what was done: counts per table, then what was not carried over."""
    at = f"revision {plan.revision}" if plan.revision else "no alembic_version"
    with_limits = sum(1 for user in plan.users.values() if user.limits)
    print(f"upstream database {_shown(url)} ({at}): {len(plan.users)} user ids")
    verb = "would import" if dry_run else "imported"
    print(f"{verb}: {plan.new_accounts} new accounts, {plan.logs_new} new query logs")
    print(
        f"  accounts:    {plan.new_accounts} new, {plan.existing_accounts} already imported; "
        f"{with_limits} with their own rate limits"
    )
    print(
        f"  query logs:  {plan.logs_new} new, {plan.logs_read - plan.logs_new} already imported "
        "(the usage totals follow them)"
    )
    print("  api keys:    0 (upstream keeps none: its credit service holds them)")
    notes = _notes(plan)
    if notes:
        print("not carried over:")
        for note in notes:
            print(f"  {note}")
    if dry_run:
        print("dry run: nothing was written")


def _notes(plan: Plan) -> Iterable[str]:
    for user in plan.users.values():
        for note in user.not_carried:
            yield f"{upstream_account_name(user.user_id)}: {note}"
    for name in plan.limits_kept:
        yield f"{name}: kept this gateway's limits, which differ from upstream's"
    for user_id in plan.skipped_users:
        yield f"user id {user_id}: too long for an account name; its logs are not imported"
    if any(user.limits.get("rate_limit_lifetime") for user in plan.users.values()):
        yield (
            "lifetime limits (upstream's user_rate_limit): the requests already counted are "
            "in upstream's Redis, not its database; here they count from zero"
        )

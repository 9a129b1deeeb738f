"""``nilai db``, ``accounts``, ``keys`` and ``prices``: the schema, accounts, keys and prices.

Each command says on stderr which database it uses (password masked): run with other settings
than the gateway's, it would read and write another database. Stdout stays for the result, so
scripts can read it (the key from ``nilai keys create``).

Every failure is one line on stderr and a non-zero status: 2 for bad input (arguments,
settings, database URL, revision), 1 for the rest (not found, conflicts, database errors).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic.util import CommandError
from pydantic import ValidationError
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from nilai.auth.stored_keys import generate_key
from nilai.billing.prices import (
    Price,
    amount_text,
    from_stored,
    parse_amount,
    priced_model_id,
    stored,
)
from nilai.cli.common import fail
from nilai.settings import NilaiSettings, settings_problems, unknown_variables
from nilai.store import migrate
from nilai.store.base import Account, ApiKey, Usage
from nilai.store.open import open_store
from nilai.store.sql import SqlStore, make_engine, new_id, now

DEFAULT = "default"  # `accounts update --rate-limit-PERIOD default` removes the override
MAX_LIMIT = 2**31 - 1  # the rate-limit columns are 32-bit integers
MAX_NAME = 200  # the name columns' length
PERIODS = ("minute", "hour", "day", "lifetime")
_ACCOUNT_ID = re.compile(r"acct_[0-9a-f]{16}")
_DBAPI_TAG = re.compile(r"^\([\w.]+\)\s*")
# What opening or using the database raises; reported in one line instead of a traceback.
# RuntimeError: open_store's "schema is not current"; ImportError: a URL naming a missing driver.
_DATABASE_ERRORS = (SQLAlchemyError, OSError, ImportError, CommandError, RuntimeError)

StoreAction = Callable[[SqlStore], Awaitable[None]]
EngineAction = Callable[[AsyncEngine, str], Awaitable[None]]


class AdminError(Exception):
    """A failure to report in one line, with the exit status to return."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# registration


def register(commands: Any) -> None:
    """Add the ``db``, ``accounts``, ``keys`` and ``prices`` subcommands."""
    # Any: argparse's subparsers action type is private.
    _register_db(_group(commands, "db", "database schema migrations"))
    _register_accounts(_group(commands, "accounts", "accounts and their rate limits"))
    _register_keys(_group(commands, "keys", "API keys (shown once, stored as hashes)"))
    _register_prices(_group(commands, "prices", "per-model prices (others pay the default)"))


def _group(commands: Any, name: str, summary: str) -> Any:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=summary, description=summary)
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")


def _action(
    actions: Any, name: str, summary: str, body: Callable[[argparse.Namespace], None]
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(name, help=summary, description=summary)
    parser.set_defaults(handler=run, body=body)
    return parser


def _register_db(actions: Any) -> None:
    upgrade = _action(actions, "upgrade", "migrate the schema up", _db_upgrade)
    upgrade.add_argument("revision", nargs="?", default="head", help="target (default: head)")
    downgrade = _action(actions, "downgrade", "migrate the schema down", _db_downgrade)
    downgrade.add_argument(
        "revision", help="target: a revision id, -1 for one step, or base (drops every table)"
    )
    _action(actions, "current", "print the schema revision, or none", _db_current)


def _register_accounts(actions: Any) -> None:
    add = _action(actions, "add", "create an account", _accounts_add)
    add.add_argument("name", help=f"unique name, 1 to {MAX_NAME} characters")
    for period in PERIODS:
        add.add_argument(
            f"--rate-limit-{period}",
            metavar="N",
            help=f"requests per {period} (default: the gateway's setting)",
        )
    _action(actions, "list", "list accounts with their usage", _accounts_list)
    for name, summary, body in (
        ("show", "show an account, its usage and its keys", _accounts_show),
        ("disable", "disable an account and so all its keys", _accounts_disable),
        ("enable", "enable a disabled account", _accounts_enable),
    ):
        _action(actions, name, summary, body).add_argument(
            "account", metavar="ID_OR_NAME", help="account id or name"
        )
    update = _action(actions, "update", "change an account's rate limits", _accounts_update)
    update.add_argument("account", metavar="ID_OR_NAME", help="account id or name")
    for period in PERIODS:
        update.add_argument(
            f"--rate-limit-{period}",
            metavar="N",
            help=f"requests per {period}, or '{DEFAULT}' for the gateway's setting "
            "(default: unchanged)",
        )


def _register_keys(actions: Any) -> None:
    create = _action(actions, "create", "create an API key; it is shown once", _keys_create)
    create.add_argument("account", metavar="ACCOUNT", help="account id or name")
    create.add_argument("--name", metavar="LABEL", help="a label to recognise the key by")
    listing = _action(actions, "list", "list API keys (never the keys themselves)", _keys_list)
    listing.add_argument("--account", metavar="ID_OR_NAME", help="only this account's keys")
    revoke = _action(actions, "revoke", "revoke an API key", _keys_revoke)
    revoke.add_argument(
        "key", metavar="KEY_ID_OR_PREFIX", help="the key's id, or its prefix as `keys list` shows"
    )


PRICE_OPTIONS = (
    ("prompt", "prompt_per_million", "per million prompt tokens"),
    ("completion", "completion_per_million", "per million completion tokens"),
    ("web-search", "web_search", "per web search"),
)
"""(option, ``Price`` field, what it prices) for ``prices set``."""


def _register_prices(actions: Any) -> None:
    _action(actions, "list", "list the models' own prices and the default", _prices_list)
    change = _action(actions, "set", "give a model a price of its own", _prices_set)
    change.add_argument("model", metavar="MODEL", help="the model id, as in /v1/models")
    for option, _field, what in PRICE_OPTIONS:
        change.add_argument(
            f"--{option}",
            metavar="AMOUNT",
            help=f"{what}, in currency units such as 2.5 (default: the model's current price)",
        )
    delete = _action(actions, "delete", "put a model back on the default price", _prices_delete)
    delete.add_argument("model", metavar="MODEL", help="the model id")


def run(args: argparse.Namespace) -> int:
    """Run one admin action; report a failure in one line on stderr and return its status."""
    # Commands without actions (``import-upstream``) share this handler too.
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    try:
        args.body(args)
    except AdminError as exc:
        return fail(command, str(exc), exc.status)
    except _DATABASE_ERRORS as exc:
        message, status = _describe(exc)
        return fail(command, message, status)
    return 0


# plumbing


def _settings() -> NilaiSettings:
    # A mistyped NILAI_DATABASE_URL would otherwise send the command to the default database.
    for line in unknown_variables(os.environ):
        print(f"warning: {line}", file=sys.stderr)
    try:
        return NilaiSettings()
    except ValidationError as exc:
        problems = "; ".join(settings_problems(exc))
        raise AdminError(f"invalid settings: {problems}", 2) from exc
    except ValueError as exc:
        raise AdminError(f"invalid settings: {_first_line(exc)}", 2) from exc


def _with_store(action: StoreAction, settings: NilaiSettings | None = None) -> None:
    """Open the store (migrating it when NILAI_DB_AUTO_MIGRATE), run ``action``, close it."""
    settings = settings or _settings()
    _say_database(make_url(settings.db_url))

    async def session() -> None:
        store = await open_store(settings)
        try:
            await action(store)
        finally:
            await store.aclose()

    asyncio.run(session())


def with_store(action: StoreAction, *, migrate: bool = True) -> None:
    """Run ``action`` on the configured store, as the admin commands do (for other commands).

    ``migrate=False`` never migrates, whatever NILAI_DB_AUTO_MIGRATE says, for commands that
    promise to write nothing (an old schema is then refused in one line).
    """
    settings = _settings()
    if not migrate:
        settings = settings.model_copy(update={"db_auto_migrate": False})
    _with_store(action, settings)


def _with_engine(action: EngineAction) -> None:
    """Run ``action`` on an engine for the configured database and its printable URL."""
    url = _settings().db_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shown = parsed.render_as_string(hide_password=True)
    _say_database(parsed)

    async def session() -> None:
        engine = make_engine(url)
        try:
            await action(engine, shown)
        finally:
            await engine.dispose()

    asyncio.run(session())


def _say_database(url: URL) -> None:
    """Name the database on stderr: the SQLite file, or the URL without password or query."""
    if url.get_backend_name() == "sqlite":
        where = f"the SQLite database {url.database or ':memory:'}"
    else:
        where = f"the database {url.set(query={}).render_as_string(hide_password=True)}"
    print(f"using {where} (NILAI_DATABASE_URL)", file=sys.stderr)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return _DBAPI_TAG.sub("", lines[0]) if lines else type(exc).__name__


def _describe(exc: Exception) -> tuple[str, int]:
    """A database failure as one line and an exit status."""
    if isinstance(exc, ArgumentError | ImportError):
        return f"invalid database URL (NILAI_DATABASE_URL): {_first_line(exc)}", 2
    if isinstance(exc, OSError):
        return f"cannot reach the database: {_first_line(exc)}", 1
    if isinstance(exc, RuntimeError | CommandError):
        return _first_line(exc), 1
    return f"database error: {_first_line(exc)}", 1


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [
        max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)
    ]
    for line in (headers, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


# db


def _db_upgrade(args: argparse.Namespace) -> None:
    """``nilai db upgrade [REVISION]``."""
    revision = str(args.revision)
    _with_engine(lambda engine, url: _migrate(engine, url, migrate.upgrade, revision))


def _db_downgrade(args: argparse.Namespace) -> None:
    """``nilai db downgrade REVISION``."""
    revision = str(args.revision)
    _with_engine(lambda engine, url: _migrate(engine, url, migrate.downgrade, revision))


def _db_current(args: argparse.Namespace) -> None:
    """``nilai db current``: the bare revision, so scripts can compare it."""

    async def show(engine: AsyncEngine, _url: str) -> None:
        print(await migrate.current_revision(engine) or "none")

    _with_engine(show)


async def _migrate(engine: AsyncEngine, url: str, step: EngineAction, revision: str) -> None:
    before = await migrate.current_revision(engine)
    try:
        await step(engine, revision)
    except CommandError as exc:
        raise AdminError(f"cannot migrate: {_first_line(exc)}", 2) from exc
    after = await migrate.current_revision(engine)
    if after == before:
        print(f"database {url} already at revision {after or 'none'}")
    else:
        print(f"database {url} at revision {after or 'none'} (was {before or 'none'})")


# accounts


def _account_name(name: str) -> str:
    if not name.strip() or len(name) > MAX_NAME:
        raise AdminError(f"an account name must be 1 to {MAX_NAME} characters, not blank", 2)
    if _ACCOUNT_ID.fullmatch(name):
        raise AdminError(f"{name!r} looks like an account id; choose another name", 2)
    return name


def _limit(value: str | None, period: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 0 < number <= MAX_LIMIT:
        raise AdminError(
            f"--rate-limit-{period} must be a whole number from 1 to {MAX_LIMIT}, got {value!r}",
            2,
        )
    return number


def _limits_text(account: Account) -> str:
    limits = {
        "minute": account.rate_limit_minute,
        "hour": account.rate_limit_hour,
        "day": account.rate_limit_day,
        "lifetime": account.rate_limit_lifetime,
    }
    text = ", ".join(f"{period}={value}" for period, value in limits.items() if value is not None)
    return text or "defaults"


def _label(account: Account) -> str:
    return f"{account.name} ({account.id})"


async def _find_account(store: SqlStore, id_or_name: str) -> Account:
    account = await store.get_account(id_or_name)
    if account is None:
        raise AdminError(f"no account with id or name {id_or_name!r}")
    return account


def _accounts_add(args: argparse.Namespace) -> None:
    """``nilai accounts add NAME [--rate-limit-PERIOD N ...]``."""
    name = _account_name(str(args.name))
    limits = {
        f"rate_limit_{period}": _limit(getattr(args, f"rate_limit_{period}"), period)
        for period in PERIODS
    }

    async def add(store: SqlStore) -> None:
        try:
            account = await store.create_account(name, limits)
        except ValueError as exc:
            raise AdminError(str(exc)) from exc
        print(f"created account {_label(account)}; limits: {_limits_text(account)}")

    _with_store(add)


def _accounts_update(args: argparse.Namespace) -> None:
    """``nilai accounts update ID_OR_NAME [--rate-limit-PERIOD N|default ...]``."""
    id_or_name = str(args.account)
    changes: dict[str, int | None] = {}
    for period in PERIODS:
        value: str | None = getattr(args, f"rate_limit_{period}")
        if value is not None:
            number = None if value == DEFAULT else _limit(value, period)
            changes[f"rate_limit_{period}"] = number
    if not changes:
        options = ", ".join(f"--rate-limit-{period}" for period in PERIODS)
        raise AdminError(f"nothing to change: give one or more of {options}", 2)
    settings = _settings()

    async def update(store: SqlStore) -> None:
        account = await _find_account(store, id_or_name)
        updated = await store.update_limits(account.id, changes)
        print(f"updated account {_label(updated)}; limits: {_limits_text(updated)}")
        print(
            f"Running gateways apply it within {settings.key_cache_ttl_s:g} s "
            "(they cache accounts for NILAI_KEY_CACHE_TTL_S)."
        )

    _with_store(update, settings)


def _accounts_list(args: argparse.Namespace) -> None:
    """``nilai accounts list``."""

    async def listing(store: SqlStore) -> None:
        accounts = await store.list_accounts()
        if not accounts:
            print("no accounts")
            return
        rows = [_account_row(account, await store.usage(account.id)) for account in accounts]
        headers = ["ID", "NAME", "ACTIVE", "CREATED", "LIMITS", "QUERIES", "TOKENS"]
        _table(headers, rows)

    _with_store(listing)


def _account_row(account: Account, usage: Usage) -> list[str]:
    active = "yes" if account.active else "no"
    created = _when(account.created_at)
    limits = _limits_text(account)
    totals = [str(usage.queries), str(usage.total_tokens)]
    return [account.id, account.name, active, created, limits, *totals]


def _accounts_show(args: argparse.Namespace) -> None:
    """``nilai accounts show ID_OR_NAME``: details, usage totals and keys."""
    id_or_name = str(args.account)

    async def show(store: SqlStore) -> None:
        account = await _find_account(store, id_or_name)
        usage = await store.usage(account.id)
        print(f"id:       {account.id}")
        print(f"name:     {account.name}")
        print(f"active:   {'yes' if account.active else 'no'}")
        print(f"created:  {_when(account.created_at)}")
        print(f"limits:   {_limits_text(account)}")
        print(
            f"usage:    {usage.queries} queries, {usage.prompt_tokens} prompt + "
            f"{usage.completion_tokens} completion = {usage.total_tokens} tokens"
        )
        keys = await store.list_keys(account.id)
        print(f"keys:     {len(keys)}")
        if keys:
            _key_table(keys, {account.id: account.name})

    _with_store(show)


def _accounts_disable(args: argparse.Namespace) -> None:
    """``nilai accounts disable ID_OR_NAME``."""
    _set_active(str(args.account), active=False)


def _accounts_enable(args: argparse.Namespace) -> None:
    """``nilai accounts enable ID_OR_NAME``."""
    _set_active(str(args.account), active=True)


def _set_active(id_or_name: str, *, active: bool) -> None:
    state = "enabled" if active else "disabled"

    async def change(store: SqlStore) -> None:
        account = await _find_account(store, id_or_name)
        if account.active == active:
            print(f"account {_label(account)} was already {state}")
            return
        await store.set_active(account.id, active)
        print(f"account {_label(account)} {state}")

    _with_store(change)


# keys


def _key_table(keys: Sequence[ApiKey], names: dict[str, str]) -> None:
    rows = [
        [
            *(key.id, key.prefix, names.get(key.account_id, key.account_id), key.name or "-"),
            *(_when(key.created_at), _when(key.last_used_at), _when(key.revoked_at)),
        ]
        for key in keys
    ]
    _table(["ID", "PREFIX", "ACCOUNT", "NAME", "CREATED", "LAST USED", "REVOKED"], rows)


def _keys_create(args: argparse.Namespace) -> None:
    """``nilai keys create ACCOUNT [--name LABEL]``: print the new key once."""
    id_or_name = str(args.account)
    label: str | None = args.name
    if label is not None and not 0 < len(label) <= MAX_NAME:
        raise AdminError(f"--name must be 1 to {MAX_NAME} characters", 2)

    async def create(store: SqlStore) -> None:
        account = await _find_account(store, id_or_name)
        if not account.active:
            raise AdminError(f"account {_label(account)} is disabled; enable it first")
        new = generate_key()
        key = ApiKey(new_id("key"), account.id, new.prefix, new.hash, label, now(), None, None)
        await store.add_key(key)
        print(f"created API key {key.id} (prefix {key.prefix}) for account {_label(account)}:")
        print(new.value)
        print("Store it now: this key will not be shown again.")

    _with_store(create)


def _keys_list(args: argparse.Namespace) -> None:
    """``nilai keys list [--account ID_OR_NAME]``: records only, never a key or its hash."""
    id_or_name: str | None = args.account

    async def listing(store: SqlStore) -> None:
        account = await _find_account(store, id_or_name) if id_or_name is not None else None
        keys = await store.list_keys(account.id if account else None)
        if not keys:
            print("no API keys")
            return
        _key_table(keys, {a.id: a.name for a in await store.list_accounts()})

    _with_store(listing)


def _keys_revoke(args: argparse.Namespace) -> None:
    """``nilai keys revoke KEY_ID_OR_PREFIX``."""
    target = str(args.key)

    async def revoke(store: SqlStore) -> None:
        started = now()
        key = await store.revoke_key(target)
        if key is None:
            raise AdminError(f"no API key with id or prefix {target!r}")
        shown = f"API key {key.id} (prefix {key.prefix})"
        if key.revoked_at is not None and key.revoked_at < started:
            print(f"{shown} was already revoked at {_when(key.revoked_at)}")
        else:
            print(f"revoked {shown}")

    _with_store(revoke)


# prices


def _price_cells(price: Price) -> list[str]:
    return [
        amount_text(price.prompt_per_million),
        amount_text(price.completion_per_million),
        amount_text(price.web_search),
    ]


def _price_text(price: Price) -> str:
    prompt, completion, search = _price_cells(price)
    return f"prompt {prompt}, completion {completion} per million tokens; web search {search}"


def _prices_list(args: argparse.Namespace) -> None:
    """``nilai prices list``: the default (from the settings), then each model's own price."""
    settings = _settings()

    async def listing(store: SqlStore) -> None:
        rows = [["(default)", *_price_cells(settings.default_price), "-"]]
        rows += [
            [ascii(row.model)[1:-1], *_price_cells(from_stored(row)), _when(row.updated_at)]
            for row in await store.list_prices()
        ]
        _table(["MODEL", "PROMPT/1M", "COMPLETION/1M", "WEB SEARCH", "UPDATED"], rows)

    _with_store(listing, settings)


def _prices_set(args: argparse.Namespace) -> None:
    """``nilai prices set MODEL [--prompt X] [--completion Y] [--web-search Z]``.

    An amount left out keeps the model's current one (its own, or the default).
    """
    model = _priced_model(str(args.model))
    changes: dict[str, int] = {}
    for option, field, _what in PRICE_OPTIONS:
        value: str | None = getattr(args, option.replace("-", "_"))
        if value is not None:
            try:
                changes[field] = parse_amount(value)
            except ValueError as exc:
                raise AdminError(f"--{option} {exc}", 2) from exc
    if not changes:
        options = ", ".join(f"--{option}" for option, _field, _what in PRICE_OPTIONS)
        raise AdminError(f"nothing to change: give one or more of {options}", 2)
    settings = _settings()

    async def change(store: SqlStore) -> None:
        own = {row.model: row for row in await store.list_prices()}.get(model)
        current = from_stored(own) if own else settings.default_price
        price = dataclasses.replace(current, **changes)
        await store.set_price(stored(model, price))
        print(f"price of {ascii(model)[1:-1]}: {_price_text(price)}")
        print(
            f"Running gateways apply it within {settings.price_refresh_s:g} s "
            "(they read prices every NILAI_PRICE_REFRESH_S)."
        )

    _with_store(change, settings)


def _prices_delete(args: argparse.Namespace) -> None:
    """``nilai prices delete MODEL``: the model pays the default price again."""
    model = _priced_model(str(args.model))
    settings = _settings()

    async def delete(store: SqlStore) -> None:
        if not await store.delete_price(model):
            raise AdminError(f"model {ascii(model)[1:-1]} has no price of its own")
        print(
            f"price of {ascii(model)[1:-1]} deleted: it pays the default, "
            f"{_price_text(settings.default_price)}"
        )
        print(f"Running gateways apply it within {settings.price_refresh_s:g} s.")

    _with_store(delete, settings)


def _priced_model(model: str) -> str:
    try:
        return priced_model_id(model)
    except ValueError as exc:
        raise AdminError(str(exc), 2) from exc

"""What a database error means for the caller: the values were refused, or the database is away.

One classification for every caller (the query-log writer drops a refused row but retries an
outage; key lookups answer an outage with 503 and let a bug be a 500): SQLAlchemy wraps the
driver's error (``orig``) and asyncpg chains its own (``__cause__``), so the whole chain is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from sqlalchemy import exc as sa_exc

# SQLSTATE classes (the first two characters) of errors that do not depend on the rows:
# connection exception, insufficient resources, operator intervention (e.g. admin shutdown),
# system error, transaction rollback (serialization failure, deadlock).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "58", "40"})
# Lock not available; read-only transaction (a replica during failover, a database set
# read-only for maintenance): the server's state, not the rows.
_TRANSIENT_SQLSTATES = frozenset({"55P03", "25006"})
# Data exception (bad value: NUL byte, too long, out of range) and integrity constraint violation
# (NOT NULL, CHECK; duplicate ids never get here: ON CONFLICT handles them).
_DATA_SQLSTATE_CLASSES = frozenset({"22", "23"})
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # connection refused or reset, and TimeoutError
    sa_exc.OperationalError,  # includes SQLite's "database is locked"
    sa_exc.InterfaceError,  # asyncpg: connection closed or not usable
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # no pooled connection free in time
)
# Drivers convert values before anything is sent and raise these unwrapped when one cannot be
# stored: a lone surrogate (UnicodeEncodeError), an integer beyond the column's range.
_DATA_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.DataError,
    sa_exc.IntegrityError,
    ValueError,
    OverflowError,
)


def error_kind(error: BaseException) -> Literal["data", "transient"] | None:
    """Why a database call failed: its values (``data``), for now (``transient``), or neither.

    Neither is a bug or a broken schema: leave it alone. The whole chain of wrapped errors is
    looked at and a transient sign anywhere wins, so a row is never called bad when the
    connection was the problem.
    """
    kinds = {_link_kind(link) for link in _chain(error)}
    if "transient" in kinds:
        return "transient"
    if "data" in kinds:
        return "data"
    return None


def describe_error(error: BaseException) -> str:
    """The innermost error's class and SQLSTATE: never its message, which may quote values."""
    links = list(_chain(error))
    state = next((state for link in links if (state := _sqlstate(link))), None)
    name = type(links[-1]).__name__
    return f"{name}, SQLSTATE {state}" if state else name


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it wraps (``orig``) or was raised from (``__cause__``)."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        wrapped = getattr(link, "orig", None)
        link = wrapped if isinstance(wrapped, BaseException) else link.__cause__


def _sqlstate(error: BaseException) -> str | None:
    state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    # A SQLSTATE is five characters; the first two are its class.
    return state if isinstance(state, str) and len(state) == len("00000") else None


def _link_kind(error: BaseException) -> Literal["data", "transient"] | None:
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return "transient"
    state = _sqlstate(error)
    if state is not None:
        if state in _TRANSIENT_SQLSTATES or state[:2] in _TRANSIENT_SQLSTATE_CLASSES:
            return "transient"
        if state[:2] in _DATA_SQLSTATE_CLASSES:
            return "data"
    if isinstance(error, _TRANSIENT_ERRORS):
        return "transient"
    if isinstance(error, _DATA_ERRORS):
        return "data"
    return None

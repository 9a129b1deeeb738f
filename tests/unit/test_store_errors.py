"""How a failed query-log write is classified: the rows' fault, the moment's, or unknown."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc

from nilai.store.errors import describe_error, error_kind


class CharacterNotInRepertoireError(Exception):
    """Stands in for a driver error carrying a SQLSTATE, as asyncpg's do."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _wrapped(sqlstate: str, message: str = "boom") -> sa_exc.DBAPIError:
    """A driver error with ``sqlstate`` as SQLAlchemy raises it (the driver's in ``orig``)."""
    return sa_exc.DBAPIError("INSERT ...", {}, CharacterNotInRepertoireError(message, sqlstate))


def _caused_by(cause: BaseException) -> Exception:
    try:
        raise RuntimeError("outer") from cause
    except RuntimeError as outer:
        return outer


TRANSIENT = {
    "connection refused": ConnectionRefusedError(111, "Connect call failed"),
    "connection reset": ConnectionResetError(),
    "timeout": TimeoutError(),
    "operational": sa_exc.OperationalError("SELECT 1", {}, Exception("database is locked")),
    "interface": sa_exc.InterfaceError("INSERT ...", {}, Exception("connection is closed")),
    "pool timeout": sa_exc.TimeoutError("QueuePool limit reached"),
    "disconnect": sa_exc.DBAPIError("INSERT ...", {}, Exception(), connection_invalidated=True),
    "connection failure 08006": _wrapped("08006"),
    "admin shutdown 57P01": _wrapped("57P01"),
    "too many connections 53300": _wrapped("53300"),
    "serialization failure 40001": _wrapped("40001"),
    "lock not available 55P03": _wrapped("55P03"),
    "read-only transaction 25006": _wrapped("25006"),
    "refused, chained": _caused_by(ConnectionRefusedError()),
    # a data error on a connection that died meanwhile: the connection is what failed
    "invalidated with a data SQLSTATE": sa_exc.DBAPIError(
        "INSERT ...",
        {},
        CharacterNotInRepertoireError("x", "22021"),
        connection_invalidated=True,
    ),
}
DATA = {
    "NUL byte 22021": _wrapped("22021", 'invalid byte sequence for encoding "UTF8": 0x00'),
    "too long 22001": _wrapped("22001"),
    "out of range 22003": _wrapped("22003"),
    "not null 23502": _wrapped("23502"),
    "check 23514": _wrapped("23514"),
    "integrity": sa_exc.IntegrityError("INSERT ...", {}, Exception("NOT NULL constraint")),
    "data": sa_exc.DataError("INSERT ...", {}, Exception("bad value")),
    "lone surrogate": UnicodeEncodeError("utf-8", "bad\ud800", 3, 4, "surrogates not allowed"),
    "integer overflow": OverflowError("Python int too large to convert to SQLite INTEGER"),
    "driver conversion, chained": _caused_by(OverflowError("value out of int32 range")),
}
UNKNOWN = {
    "undefined column 42703": _wrapped("42703"),
    "internal error XX000": _wrapped("XX000"),
    "runtime": RuntimeError("surprise"),
    "attribute": AttributeError("a bug"),
    "programming": sa_exc.ProgrammingError("INSERT ...", {}, Exception("no such table")),
}


@pytest.mark.parametrize("error", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_errors_of_the_moment_are_transient(error: BaseException):
    assert error_kind(error) == "transient"


@pytest.mark.parametrize("error", DATA.values(), ids=DATA.keys())
def test_values_the_database_cannot_store_are_data_errors(error: BaseException):
    assert error_kind(error) == "data"


@pytest.mark.parametrize("error", UNKNOWN.values(), ids=UNKNOWN.keys())
def test_errors_of_neither_kind_are_left_unclassified(error: BaseException):
    assert error_kind(error) is None


def test_the_description_names_the_driver_error_and_sqlstate_but_never_the_value():
    error = _wrapped("22021", "invalid input: 'bad\x00model'")
    assert describe_error(error) == "CharacterNotInRepertoireError, SQLSTATE 22021"
    assert describe_error(ConnectionRefusedError(111, "to 10.0.0.1")) == "ConnectionRefusedError"

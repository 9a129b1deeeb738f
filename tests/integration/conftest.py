"""Store fixtures for integration tests; the helpers live in ``tests/support/stores.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from nilai.cli import main
from nilai.store.migrate import upgrade
from nilai.store.sql import SqlStore, make_engine
from tests.support.cli import Result


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlStore]:
    """A store over a database migrated to the newest revision (``db_url``: each backend)."""
    engine = make_engine(db_url)
    try:
        await upgrade(engine)
        yield SqlStore(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run `nilai ARGS...` in-process and capture what it printed."""

    def run(*argv: str) -> Result:
        status = main(list(argv))
        out, err = capsys.readouterr()
        return Result(status, out, err)

    return run

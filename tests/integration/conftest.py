"""Store fixtures for integration tests; the helpers live in ``tests/support/stores.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nilai.store.migrate import upgrade
from nilai.store.sql import SqlStore, make_engine


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlStore]:
    """A store over a database migrated to the newest revision (``db_url``: each backend)."""
    engine = make_engine(db_url)
    try:
        await upgrade(engine)
        yield SqlStore(engine)
    finally:
        await engine.dispose()

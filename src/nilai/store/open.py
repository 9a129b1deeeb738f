"""Open the configured database, making sure its schema is current."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from nilai.settings import NilaiSettings
from nilai.startup import StartupError
from nilai.store.migrate import current_revision, head_revision, upgrade
from nilai.store.sql import SqlStore, make_engine


async def open_store(settings: NilaiSettings) -> SqlStore:
    """Connect to the database and make sure its schema is current."""
    url = settings.db_url
    database = make_url(url).database
    if url.startswith("sqlite") and database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = make_engine(url)
    try:
        if settings.db_auto_migrate:
            await upgrade(engine)
        else:
            await _require_current_schema(engine)
    except BaseException:
        await engine.dispose()
        raise
    return SqlStore(engine)


async def _require_current_schema(engine: AsyncEngine) -> None:
    if await current_revision(engine) != head_revision():
        raise StartupError(
            "the database schema is not current: run `nilai db upgrade` "
            "(or set NILAI_DB_AUTO_MIGRATE=true)"
        )

"""Alembic environment: runs on the connection handed over by ``nilai.store.migrate``."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from nilai.store.tables import Base

connection: Connection | None = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `nilai db upgrade` (nilai.store.migrate)")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()

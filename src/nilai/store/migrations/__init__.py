"""Alembic migrations of the nilai schema."""

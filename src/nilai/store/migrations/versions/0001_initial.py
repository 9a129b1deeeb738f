"""Accounts, API keys, query logs and usage totals.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the tables."""
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("rate_limit_minute", sa.Integer()),
        sa.Column("rate_limit_hour", sa.Integer()),
        sa.Column("rate_limit_day", sa.Integer()),
        sa.Column("rate_limit_lifetime", sa.Integer()),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("account_id", sa.String(32), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False, unique=True),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id"])
    op.create_table(
        "query_logs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("api_key_id", sa.String(32)),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float()),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("error_kind", sa.String(64)),
        sa.Column("streamed", sa.Boolean(), nullable=False),
        sa.Column("tools", sa.Boolean(), nullable=False),
        sa.Column("web_search", sa.Boolean(), nullable=False),
        sa.Column("nilrag", sa.Boolean(), nullable=False),
        sa.Column("multimodal", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_query_logs_account_started", "query_logs", ["account_id", "started_at"])
    op.create_table(
        "usage_totals",
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("queries", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    """Drop the tables."""
    op.drop_table("usage_totals")
    op.drop_index("ix_query_logs_account_started", table_name="query_logs")
    op.drop_table("query_logs")
    op.drop_index("ix_api_keys_account_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("accounts")

"""Query logs count the server-side tool calls the gateway ran (never the code or its output).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``query_logs.tool_calls`` (0 for every earlier row)."""
    op.add_column(
        "query_logs",
        sa.Column("tool_calls", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    """Drop the column."""
    op.drop_column("query_logs", "tool_calls")

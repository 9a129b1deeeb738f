"""Query logs count the searches a web search made (never what was searched or found).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``query_logs.searches`` (0 for every earlier row)."""
    op.add_column(
        "query_logs",
        sa.Column("searches", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    """Drop the column."""
    op.drop_column("query_logs", "searches")

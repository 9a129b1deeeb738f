"""Query logs count the chunks NilRAG added to a prompt (never the chunks or the question).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``query_logs.nilrag_chunks`` (0 for every earlier row)."""
    op.add_column(
        "query_logs",
        sa.Column("nilrag_chunks", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    """Drop the column."""
    op.drop_column("query_logs", "nilrag_chunks")

"""Query logs say whether a private prompt document was used (never which, or what it held).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``query_logs.prompt_document`` (false for every earlier row)."""
    op.add_column(
        "query_logs",
        sa.Column("prompt_document", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    """Drop the column."""
    op.drop_column("query_logs", "prompt_document")

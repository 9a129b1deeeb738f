"""Models' own prices, and what each request cost (in the query log and the usage totals).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``model_prices``; add ``cost_micro`` to ``query_logs`` and ``usage_totals`` (0)."""
    op.create_table(
        "model_prices",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("prompt_per_million", sa.BigInteger(), nullable=False),
        sa.Column("completion_per_million", sa.BigInteger(), nullable=False),
        sa.Column("web_search", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    for table in ("query_logs", "usage_totals"):
        op.add_column(
            table,
            sa.Column("cost_micro", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        )


def downgrade() -> None:
    """Drop the columns and the table."""
    for table in ("usage_totals", "query_logs"):
        op.drop_column(table, "cost_micro")
    op.drop_table("model_prices")

"""Teams: usage per client key and UTC day (admissions, tokens, cost, refusals by reason).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_COUNTERS = ("admitted", "requests", "input_tokens", "cached_tokens", "output_tokens", "total_tokens")
_REFUSALS = ("refused_model", "refused_nodes", "refused_rate", "refused_concurrency", "refused_budget")


def upgrade() -> None:
    op.create_table(
        "client_key_usage",
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("client_key", sa.String(64), primary_key=True),
        *[sa.Column(n, sa.BigInteger, nullable=False, server_default="0") for n in _COUNTERS],
        sa.Column("cost", sa.Double, nullable=False, server_default="0"),
        *[sa.Column(n, sa.BigInteger, nullable=False, server_default="0") for n in _REFUSALS],
    )


def downgrade() -> None:
    op.drop_table("client_key_usage")

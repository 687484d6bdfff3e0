"""Plan-shaped budgets, expiry and warnings per client key; fleet-wide rpm and concurrency.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07

Branch wt-budgets (issue 29 items 3 and 4): three columns on ``client_keys``, ``client_key_usage.refused_expired``,
and three new tables (``client_key_spans``, ``client_key_gate``, ``client_key_calls``) no other revision touches.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.schema import TIMESTAMP

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.BigInteger, nullable=False, server_default="0")


def upgrade() -> None:
    with op.batch_alter_table("client_keys") as batch:
        batch.add_column(sa.Column("budgets", sa.Text))
        batch.add_column(sa.Column("expires_at", TIMESTAMP))
        batch.add_column(sa.Column("warn_at", sa.Double))
    with op.batch_alter_table("client_key_usage") as batch:
        batch.add_column(_counter("refused_expired"))
    op.create_table(
        "client_key_spans",
        sa.Column("client_key", sa.String(64), primary_key=True),
        sa.Column("width", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("start", sa.DateTime, primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        _counter("admitted"),
        _counter("total_tokens"),
        sa.Column("cost", sa.Double, nullable=False, server_default="0"),
    )
    op.create_table(
        "client_key_gate",
        sa.Column("client_key", sa.String(64), primary_key=True),
        _counter("admissions"),
    )
    op.create_table(
        "client_key_calls",
        sa.Column("holder", sa.String(64), primary_key=True),
        sa.Column("client_key", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("lease_until", sa.DateTime),
    )
    op.create_index("idx_client_key_calls_key", "client_key_calls", ["client_key", "started_at"])


def downgrade() -> None:
    op.drop_index("idx_client_key_calls_key", "client_key_calls")
    op.drop_table("client_key_calls")
    op.drop_table("client_key_gate")
    op.drop_table("client_key_spans")
    with op.batch_alter_table("client_key_usage") as batch:
        batch.drop_column("refused_expired")
    with op.batch_alter_table("client_keys") as batch:
        batch.drop_column("warn_at")
        batch.drop_column("expires_at")
        batch.drop_column("budgets")

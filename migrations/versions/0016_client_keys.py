"""Client keys in the database (``client_keys``) and their change counter (``client_key_state``).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07

Branch wt-keys29 (issue 29 item 1). Another branch may add its own 0016: renumber this one (file name,
``revision``, ``down_revision``, the head test in tests/test_migrations.py) to follow it; it only adds
tables no other revision touches.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.schema import TIMESTAMP

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "client_keys",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("key_sha256", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("nodes", sa.Text),
        sa.Column("models", sa.Text),
        sa.Column("endpoints", sa.Text),
        sa.Column("daily_requests", sa.BigInteger),
        sa.Column("daily_tokens", sa.BigInteger),
        sa.Column("monthly_cost", sa.Double),
        sa.Column("rpm", sa.Integer),
        sa.Column("concurrency", sa.Integer),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("revoked_at", TIMESTAMP),
    )
    op.create_table(
        "client_key_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("client_key_state")
    op.drop_table("client_keys")

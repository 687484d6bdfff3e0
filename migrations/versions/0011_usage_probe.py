"""Nodes say whether the relay may ask them for usage in chat streams (``usage_probe``, default on);
invocations keep the cache-write share of their cost (``cost_cache_write``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("usage_probe", sa.Boolean, nullable=False, server_default=sa.true()))
    with op.batch_alter_table("codex_invocations") as batch:
        batch.add_column(sa.Column("cost_cache_write", sa.Double))


def downgrade() -> None:
    with op.batch_alter_table("codex_invocations") as batch:
        batch.drop_column("cost_cache_write")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("usage_probe")

"""Nodes may name the header their key goes in (``auth_header``; NULL: derived from the node, addon.egress).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("auth_header", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("auth_header")

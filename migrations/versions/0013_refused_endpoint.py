"""Client keys' refusals of an endpoint outside their ``endpoints`` allowlist, counted per day.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("client_key_usage") as batch:
        batch.add_column(sa.Column("refused_endpoint", sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("client_key_usage") as batch:
        batch.drop_column("refused_endpoint")

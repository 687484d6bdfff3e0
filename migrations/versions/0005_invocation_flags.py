"""Notes about an invocation row (trimmed fields, unreadable usage, …) in a flags column.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("codex_invocations") as batch:
        batch.add_column(sa.Column("flags", sa.String(255)))


def downgrade() -> None:
    with op.batch_alter_table("codex_invocations") as batch:
        batch.drop_column("flags")

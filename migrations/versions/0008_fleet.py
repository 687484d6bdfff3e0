"""Fleet: what each node serves (formats, model globs, model map), the model a call asked for, and the
node state version relays on one database poll to see each other's node changes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("formats", sa.String(128)))
        batch.add_column(sa.Column("models", sa.Text))
        batch.add_column(sa.Column("model_map", sa.Text))
    with op.batch_alter_table("codex_invocations") as batch:
        batch.add_column(sa.Column("requested_model", sa.String(128)))
    table = op.create_table(
        "node_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.bulk_insert(table, [{"id": 1, "version": 0}])


def downgrade() -> None:
    op.drop_table("node_state")
    with op.batch_alter_table("codex_invocations") as batch:
        batch.drop_column("requested_model")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("model_map")
        batch.drop_column("models")
        batch.drop_column("formats")

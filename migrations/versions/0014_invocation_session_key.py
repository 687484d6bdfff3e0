"""Each invocation's session (``session_key``; NULL: the call named none): the cache-hit rate per session.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-08

Branch wt-sessions (issue 28 item 4). Another branch may add its own 0014: renumber this one (file name,
``revision``, ``down_revision``, the head test in tests/test_migrations.py) to follow it; it only adds a
nullable column, so it runs after any other revision.
No index: ``stats sessions`` reads a time range (``idx_codex_invocations_occurred_at``) and groups it,
and an index on the session would cost every insert.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("codex_invocations") as batch:
        batch.add_column(sa.Column("session_key", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("codex_invocations") as batch:
        batch.drop_column("session_key")

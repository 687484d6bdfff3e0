"""The fleet's alert ledger (``alert_state``): one alert per event across relays, none repeated by a restart.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-09

Branch wt-alerts29 (issue 29 item 6). Another branch may add its own 0015: renumber this one (file name,
``revision``, ``down_revision``, the head test in tests/test_migrations.py) to follow it; it only adds a
table no other revision touches, so it runs after any other revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.schema import TIMESTAMP

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_state",
        sa.Column("subject", sa.String(200), primary_key=True),
        sa.Column("down", sa.Boolean, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("announced_at", TIMESTAMP, nullable=False),
        sa.Column("good_at", TIMESTAMP),
        sa.Column("relay", sa.String(128), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("alert_state")

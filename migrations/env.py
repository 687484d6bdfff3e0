"""Alembic environment: online migrations only, on a connection the store hands over or on CODEX_DB."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context

from store.engine import DEFAULT_DB, make_engine
from store.schema import metadata

config = context.config


def _migrate(connection) -> None:
    # Batch mode: SQLite cannot drop or alter columns in place; Alembic copies the table instead.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    if context.is_offline_mode():
        raise SystemExit("codex-relay migrations run online only (alembic upgrade head, without --sql)")
    connection = config.attributes.get("connection")
    if connection is not None:  # called by store.engine.upgrade_to_head: leave logging to the host
        _migrate(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name)
    url = os.environ.get("CODEX_DB") or config.get_main_option("sqlalchemy.url") or DEFAULT_DB
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _migrate(conn)
    finally:
        engine.dispose()


run()

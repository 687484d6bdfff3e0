"""Scratch databases: the benchmarks never write to a database the user already has."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from store.engine import make_engine, upgrade_to_head

DEFAULT_MYSQL_URL = "mysql+pymysql://root@127.0.0.1:3306/test"


def mysql_unavailable(server_url: str) -> str | None:
    """Why the MySQL server at ``server_url`` cannot be used, or None."""
    try:
        engine = sa.create_engine(make_url(server_url).set(database=None), connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as e:  # any failure means: no usable server
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


@contextmanager
def scratch_mysql(server_url: str) -> Iterator[str]:
    """A new database ``codex_bench_<hex>`` on the server of ``server_url`` (its own database is
    never used), dropped afterwards; yields its URL."""
    base = make_url(server_url)
    name = f"codex_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base.set(database=None))
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


def sqlite_url(directory: Path, name: str) -> str:
    return f"sqlite:///{directory / name}"


def migrated_engine(url: str) -> sa.Engine:
    """An engine on ``url`` with the product's schema (Alembic head: the real indexes)."""
    engine = make_engine(url)
    upgrade_to_head(engine)
    return engine

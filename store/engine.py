"""Engines from a URL, tuned per dialect, and the schema upgrade the relay runs at start."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

import migrations
from store.locks import named_lock

log = logging.getLogger("codex.store")

DEFAULT_DB = "sqlite:///data/codex.db"
MIGRATIONS = Path(migrations.__file__).resolve().parent  # an installed package, not a path beside store/
SUPPORTED = ("sqlite", "mysql")
_MIGRATION_LOCK_S = 60


def make_engine(url: str) -> sa.Engine:
    """An engine for a SQLite or MySQL/MariaDB URL; raises ValueError with a readable reason."""
    try:
        parsed = make_url(url)
    except Exception as e:
        raise ValueError(f"not a database URL: {url!r} ({e})") from None
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED:
        raise ValueError(f"unsupported database {backend!r}: use sqlite:///file.db or mysql+pymysql://user@host/db")
    if backend == "sqlite":
        return _sqlite_engine(parsed)
    query = dict(parsed.query)
    # Fail fast on a dead server instead of hanging the writer for the OS TCP timeout.
    for key, value in (("connect_timeout", "5"), ("read_timeout", "30"), ("write_timeout", "30"),
                       ("charset", "utf8mb4")):
        query.setdefault(key, value)
    # READ COMMITTED: the writer's increments need no gap locks, which keeps two relays from deadlocking.
    # hide_parameters: a failed statement's error text must not carry node API keys into logs.
    return sa.create_engine(parsed.set(query=query), pool_pre_ping=True, pool_recycle=3600,
                            isolation_level="READ COMMITTED", hide_parameters=True)


def _sqlite_engine(url: sa.URL) -> sa.Engine:
    database = url.database or ""
    memory = database in ("", ":memory:") or url.query.get("mode") == "memory"
    if memory:
        # One shared connection, or every connection would see its own empty database.
        engine = sa.create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False},
                                  hide_parameters=True)
    else:
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI objects have no types
        cur = dbapi_conn.cursor()
        if not memory:
            # WAL lets the stats CLI and admin page read while the writer writes.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return engine


def error_line(error: BaseException) -> str:
    """The first line of the driver's message: no SQL statement, no parameters (keys), no stack."""
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def upgrade_to_head(engine: sa.Engine) -> None:
    """Bring the database to the latest schema revision (no-op when it is there already)."""
    with engine.connect() as conn, named_lock(conn, "migrations", _MIGRATION_LOCK_S):
        current, head = current_revision(conn), head_revision()
        if current == head:
            return
        # Rewriting a large table can take minutes: say so before, and how long it took after.
        log.info("upgrading the database schema from revision %s to %s", current or "(empty)", head)
        started = time.monotonic()
        command.upgrade(alembic_config(conn), "head")
        conn.commit()
        log.info("database schema at revision %s (%.1f s)", head, time.monotonic() - started)


def downgrade_to(engine: sa.Engine, revision: str) -> None:
    """Step the schema back to ``revision`` (tests and operators undoing an upgrade)."""
    with engine.connect() as conn, named_lock(conn, "migrations", _MIGRATION_LOCK_S):
        command.downgrade(alembic_config(conn), revision)
        conn.commit()


def current_revision(conn: sa.Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def alembic_config(conn: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if conn is not None:  # env.py migrates on this connection and leaves logging alone
        cfg.attributes["connection"] = conn
    return cfg

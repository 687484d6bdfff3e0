"""Engines from a URL, tuned per dialect, and the schema upgrade the relay runs at start."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from store.locks import named_lock

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("codex.store")

DEFAULT_DB = "sqlite:///data/codex.db"
SUPPORTED = ("sqlite", "mysql")
_MIGRATION_LOCK_S = 60
# A frozen server (connection accepted, nothing answers) is noticed after two read timeouts: the
# pool's pre-ping, then the handshake of its reconnect (pymysql bounds both by read_timeout). Four
# seconds each sends the writer's records to its journal in under 10 s; every statement of the
# relay is far shorter. URL query parameters of the same names override them.
_MYSQL_DEFAULTS = (("connect_timeout", "4"), ("read_timeout", "4"), ("write_timeout", "4"), ("charset", "utf8mb4"))
# Rewriting a large table can take many minutes, and a start waits for another relay's migration.
_MIGRATION_TIMEOUTS = {"read_timeout": "3600", "write_timeout": "3600"}


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
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError:  # SQLAlchemy's default MySQL driver (mysqlclient) is not a dependency: pymysql is
        safe = parsed.set(drivername="mysql+pymysql").render_as_string(hide_password=True)
        raise ValueError(f"the {parsed.get_driver_name()} driver of {parsed.drivername}:// is not installed: "
                         f"use {safe}") from None
    query = dict(parsed.query)
    for key, value in _MYSQL_DEFAULTS:
        query.setdefault(key, value)
    # READ COMMITTED: the writer's increments need no gap locks, which keeps two relays from deadlocking.
    # hide_parameters: a failed statement's error text must not carry node API keys into logs.
    return sa.create_engine(parsed.set(query=query), pool_pre_ping=True, pool_recycle=3600,
                            isolation_level="READ COMMITTED", hide_parameters=True)


def in_memory(url: str | sa.URL) -> bool:
    """Whether ``url`` is a SQLite database in this process's memory, which no other process can open."""
    url = make_url(url)
    return url.get_backend_name() == "sqlite" and (
        (url.database or "") in ("", ":memory:") or url.query.get("mode") == "memory")


def _sqlite_engine(url: sa.URL) -> sa.Engine:
    memory = in_memory(url)
    if memory:
        # One shared connection, or every connection would see its own empty database.
        engine = sa.create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False},
                                  hide_parameters=True)
    else:
        assert url.database  # not in memory
        path = Path(url.database).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        if "mode" not in url.query:  # mode=ro / rw: SQLite does not create it
            create_private(path)
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


def create_private(path: str | os.PathLike[str]) -> None:
    """Create ``path`` empty, readable and writable by its owner only, unless it exists.

    For the SQLite files that hold node keys: SQLite creates a database 0644 (less the umask), and gives
    its -wal, -shm and -journal files the database file's mode, so a database it finds 0600 stays private.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def error_line(error: BaseException) -> str:
    """The first line of the driver's message: no SQL statement, no parameters (keys), no stack."""
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def error_summary(error: BaseException) -> str:
    """``error_line`` after the exception's type, as the command lines and the poller report a database error."""
    return f"{type(error).__name__}: {error_line(error)}"


def upgrade_to_head(engine: sa.Engine) -> None:
    """Bring the database to the latest schema revision (no-op when it is there already)."""
    with _migration_connection(engine) as conn, named_lock(conn, "migrations", _MIGRATION_LOCK_S):
        current, head = current_revision(conn), head_revision()
        if current == head:
            return
        # Rewriting a large table can take minutes: say so before, and how long it took after.
        log.info("upgrading the database schema from revision %s to %s", current or "(empty)", head)
        started = time.monotonic()
        _alembic_command().upgrade(alembic_config(conn), "head")
        conn.commit()
        log.info("database schema at revision %s (%.1f s)", head, time.monotonic() - started)


def downgrade_to(engine: sa.Engine, revision: str) -> None:
    """Step the schema back to ``revision`` (tests and operators undoing an upgrade)."""
    with _migration_connection(engine) as conn, named_lock(conn, "migrations", _MIGRATION_LOCK_S):
        _alembic_command().downgrade(alembic_config(conn), revision)
        conn.commit()


@contextlib.contextmanager
def _migration_connection(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection of ``engine``, on MySQL with read and write timeouts long enough for a migration."""
    if engine.dialect.name != "mysql":
        with engine.connect() as conn:
            yield conn
        return
    patient = make_engine(engine.url.update_query_dict(_MIGRATION_TIMEOUTS).render_as_string(hide_password=False))
    try:
        with patient.connect() as conn:
            yield conn
    finally:
        patient.dispose()


# Alembic is imported where a migration needs it: the writer process only writes rows, and alembic (with
# its dialect modules and mako) was a quarter of that process's start.
def _alembic_command():  # noqa: ANN202 - a module
    from alembic import command

    return command


def current_revision(conn: sa.Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def alembic_config(conn: sa.Connection | None = None) -> Config:
    from alembic.config import Config

    import migrations

    cfg = Config()
    # An installed package, not a path beside store/.
    cfg.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    if conn is not None:  # env.py migrates on this connection and leaves logging alone
        cfg.attributes["connection"] = conn
    return cfg

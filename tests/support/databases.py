"""Databases for the tests: the MariaDB server (``CODEX_TEST_MYSQL``), fresh databases on it and on SQLite,
and reading back what the relay stored.

MariaDB is expected on 127.0.0.1:3306 (root, no password). Locally a missing server skips the tests that
need it, with the reason; under CI=true it fails them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import shutil
import sqlite3
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from store.engine import create_private, make_engine, upgrade_to_head
from store.nodes import upsert_nodes
from store.records import InvocationRecord, NodeConfig, Usage
from store.schema import codex_invocations, nodes
from tests.support.ci import unavailable

MYSQL_SERVER_URL = os.environ.get("CODEX_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")


@functools.cache
def mysql_unavailable() -> str | None:
    """The reason the MySQL server cannot be used, or None (asked once per process)."""
    try:
        eng = sa.create_engine(MYSQL_SERVER_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        eng.dispose()
    except Exception as e:  # any failure means: no usable server
        return f"MariaDB/MySQL at {MYSQL_SERVER_URL} unreachable: {e.__class__.__name__}: {e}"
    return None


def require_mysql() -> None:
    if reason := mysql_unavailable():
        unavailable("the MySQL server", reason)


def _create_mariadb() -> str:
    require_mysql()
    name = f"codex_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(MYSQL_SERVER_URL)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    finally:
        admin.dispose()
    return sa.engine.make_url(MYSQL_SERVER_URL).set(database=name).render_as_string(hide_password=False)


def _drop_mariadb(url: str) -> None:
    admin = sa.create_engine(MYSQL_SERVER_URL)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{sa.engine.make_url(url).database}`"))
    finally:
        admin.dispose()


@contextlib.contextmanager
def fresh_mariadb() -> Iterator[str]:
    """A URL of a new, empty database on the MariaDB server, dropped afterwards."""
    url = _create_mariadb()
    try:
        yield url
    finally:
        _drop_mariadb(url)


# One database per backend that Alembic upgraded to head in this process (each xdist worker has its own),
# copied into a test's empty database by at_head: on MariaDB a full upgrade is seconds of DDL, a copy ~0.2 s.
_templates: dict[str, str] = {}


def _template(backend: str) -> str:
    if backend not in _templates:
        url = (f"sqlite:///{tempfile.mkdtemp(prefix='codex-template-')}/head.db" if backend == "sqlite"
               else _create_mariadb())
        engine = make_engine(url)
        try:
            upgrade_to_head(engine)
        finally:
            engine.dispose()
        _templates[backend] = url
    return _templates[backend]


def drop_templates() -> None:
    """Remove the template databases ``at_head`` made (the session's end)."""
    for url in _templates.values():
        if url.startswith("sqlite"):
            shutil.rmtree(os.path.dirname(sa.engine.make_url(url).database or ""), ignore_errors=True)
        else:
            _drop_mariadb(url)
    _templates.clear()


def at_head(db_url: str) -> str:
    """Give the empty database at ``db_url`` the latest schema, and return ``db_url``: a copy of this session's
    template (tables, indexes and the rows the migrations insert), which tests/test_migrations.py checks
    equals what upgrade_to_head makes. For tests about what the schema holds, not how it got there."""
    url = sa.engine.make_url(db_url)
    template = sa.engine.make_url(_template(url.get_backend_name()))
    if url.get_backend_name() == "sqlite":
        assert url.database and template.database
        create_private(url.database)  # 0600, as the store creates its files
        with contextlib.closing(sqlite3.connect(template.database)) as src, \
                contextlib.closing(sqlite3.connect(url.database)) as dst:
            src.backup(dst)
        return db_url
    engine = sa.create_engine(MYSQL_SERVER_URL)
    try:
        with engine.begin() as conn:
            tables = conn.execute(sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                                  {"s": template.database}).scalars().all()
            for table in tables:
                conn.execute(sa.text(f"CREATE TABLE `{url.database}`.`{table}` LIKE `{template.database}`.`{table}`"))
                conn.execute(sa.text(f"INSERT INTO `{url.database}`.`{table}` "
                                     f"SELECT * FROM `{template.database}`.`{table}`"))
    finally:
        engine.dispose()
    return db_url


@contextlib.contextmanager
def fresh_engine(db_url: str) -> Iterator[sa.Engine]:
    """The store's engine on the empty database at ``db_url``, given the latest schema (``at_head``)."""
    engine = make_engine(at_head(db_url))
    try:
        yield engine
    finally:
        engine.dispose()


def rows(db_url: str, sql: str, **params) -> list[sa.Row]:
    """What ``sql`` reads from ``db_url``'s database, on a connection of its own."""
    eng = sa.create_engine(db_url)
    try:
        with eng.connect() as conn:
            return list(conn.execute(sa.text(sql), params))
    finally:
        eng.dispose()


def nodes_row(db_url: str) -> dict:
    """Each node's row, by id."""
    return {r.id: r for r in rows(db_url, "SELECT * FROM nodes")}


def record(node_id: str | None = "a", status: str = "success", *, usage: Usage | None = None,
           node_failure: bool = False, error: str | None = None, **kw) -> InvocationRecord:
    return InvocationRecord(invoke_id=uuid.uuid4().hex, occurred_at=dt.datetime(2026, 11, 24, 12, 0, 0, 123456),
                            source="relay", endpoint="/v1/responses", status=status, node_id=node_id,
                            usage=usage or Usage(), node_failure=node_failure, error_message=error, **kw)


def engine_with_node(url: str) -> sa.Engine:
    """An engine on ``url``'s database, upgraded, with node "a" (the one ``record()`` names)."""
    eng = make_engine(url)
    upgrade_to_head(eng)
    with eng.begin() as conn:
        upsert_nodes(conn, [NodeConfig("a", "https://a.example/v1")])
    return eng


def counts(engine) -> tuple[int, int, int]:
    """Rows stored, distinct invoke ids among them, and node "a"'s request count."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(sa.func.count(), sa.func.count(sa.distinct(codex_invocations.c.invoke_id)))
                            .select_from(codex_invocations)).one()
        requests = conn.execute(sa.select(nodes.c.requests).where(nodes.c.id == "a")).scalar()
    return rows[0], rows[1], requests


def modes(folder: Path, prefix: str) -> dict[str, int]:
    """The permission bits of every file in ``folder`` whose name starts with ``prefix``."""
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.name.startswith(prefix)}

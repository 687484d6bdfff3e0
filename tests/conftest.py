"""Shared fixtures: a fresh database per test on SQLite and on the real MariaDB (``db_url``), or on SQLite
alone (``sqlite_url``) where the database plays no part.

MariaDB is expected on 127.0.0.1:3306 (root, no password). Locally a missing server skips the
MySQL variants with the reason; under CI=true it fails them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow

from bench import relayproc
from bench.relayproc import ROOT
from bench.warm import Zygote
from store.engine import create_private, make_engine, upgrade_to_head

MYSQL_SERVER_URL = os.environ.get("CODEX_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_mysql_error: str | None = None
_mysql_checked = False


def mysql_unavailable() -> str | None:
    """The reason the MySQL server cannot be used, or None."""
    global _mysql_error, _mysql_checked
    if not _mysql_checked:
        _mysql_checked = True
        try:
            eng = sa.create_engine(MYSQL_SERVER_URL, connect_args={"connect_timeout": 3})
            with eng.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            eng.dispose()
        except Exception as e:  # any failure means: no usable server
            _mysql_error = f"MariaDB/MySQL at {MYSQL_SERVER_URL} unreachable: {e.__class__.__name__}: {e}"
    return _mysql_error


def require_mysql() -> None:
    reason = mysql_unavailable()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true requires the MySQL server: {reason}", pytrace=False)
        pytest.skip(reason)


def _fresh_mysql_db() -> tuple[str, sa.Engine]:
    name = f"codex_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(MYSQL_SERVER_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    base = sa.engine.make_url(MYSQL_SERVER_URL)
    return base.set(database=name).render_as_string(hide_password=False), admin


def _drop(url: str, admin: sa.Engine) -> None:
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{sa.engine.make_url(url).database}`"))
    admin.dispose()


def _mariadb() -> Iterator[str]:
    require_mysql()
    url, admin = _fresh_mysql_db()
    try:
        yield url
    finally:
        _drop(url, admin)


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own, which names the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (a stable sort): the workers take the short ones while the long ones run, rather than
    one worker finishing alone on a long test at the end.

    And the xdist groups: ``--dist loadgroup`` sends the tests of one ``xdist_group`` to one worker (where
    their module's relays start once) by the "@group" pytest-xdist 3.8 appends to their ids. It writes
    ``item._nodeid``, which pytest 9.2 no longer reads (pytest-dev/pytest-xdist#1386): each test went to any
    worker, which set its module's relays up again whenever it came back to the module. The suffix is set
    here where xdist's did not take."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid:
            from _pytest.nodeid import coerce_node_id  # pytest >= 9.2, whose node ids are structured

            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(groups)}")


@pytest.fixture(scope="session", autouse=True)
def warm_relays(request: pytest.FixtureRequest) -> Iterator[None]:
    """Relays started by this session's tests fork from one warm interpreter (bench.warm): a start costs
    ~0.1 CPU-s instead of ~1; each relay is still its own process running mitmdump's main."""
    if not any(item.get_closest_marker("e2e") for item in request.session.items):
        yield
        return
    with Zygote(ROOT) as zygote:
        relayproc.default_zygote = zygote
        try:
            yield
        finally:
            relayproc.default_zygote = None


@pytest.fixture
def mariadb() -> Iterator[str]:
    """A URL of a fresh database on the MariaDB server, for tests that only make sense there."""
    yield from _mariadb()


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A URL of an empty database, once for SQLite (a file) and once for MariaDB (a new database)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'codex.db'}"
        return
    yield from _mariadb()


# One database per backend that Alembic upgraded to head in this session (each xdist worker has its own),
# copied into a test's empty database by at_head: on MariaDB a full upgrade is seconds of DDL, a copy ~0.2 s.
_templates: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def _drop_templates() -> Iterator[None]:
    yield
    for url in _templates.values():
        if url.startswith("sqlite"):
            shutil.rmtree(os.path.dirname(sa.engine.make_url(url).database or ""), ignore_errors=True)
        else:
            _drop(url, sa.create_engine(MYSQL_SERVER_URL))
    _templates.clear()


def _template(backend: str) -> str:
    if backend not in _templates:
        if backend == "sqlite":
            url = f"sqlite:///{tempfile.mkdtemp(prefix='codex-template-')}/head.db"
        else:
            url, admin = _fresh_mysql_db()
            admin.dispose()
        engine = make_engine(url)
        try:
            upgrade_to_head(engine)
        finally:
            engine.dispose()
        _templates[backend] = url
    return _templates[backend]


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


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A URL of an empty SQLite file, for tests where the database plays no part: they run once, not per database."""
    return f"sqlite:///{tmp_path / 'codex.db'}"


def request_flow(path: str = "/v1/responses", headers: dict[str, str] | None = None,
                 mode: str | None = None) -> tflow.HTTPFlow:
    """A test flow whose request goes to ``path`` with only ``headers``; ``mode``: the proxy mode it came in."""
    f = tflow.tflow()
    if mode is not None:
        f.client_conn.proxy_mode = ProxyMode.parse(mode)
    f.request.path = path
    f.request.headers.clear()
    f.request.headers.update(headers or {})
    return f


def wait_for[T](condition: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll ``condition`` until it holds and return its value: synchronisation on an observable state,
    not a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)
    return value

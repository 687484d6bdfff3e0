"""Shared fixtures: a fresh database per test on SQLite and on the real MariaDB (``db_url``), or on SQLite
alone (``sqlite_url``) where the database plays no part.

MariaDB is expected on 127.0.0.1:3306 (root, no password). Locally a missing server skips the
MySQL variants with the reason; under CI=true it fails them.
"""

from __future__ import annotations

import contextlib
import os
import socket
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
from store.engine import make_engine, upgrade_to_head

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (a stable sort): the workers take the short ones while the long ones run, rather than
    one worker finishing alone on a long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@contextlib.contextmanager
def fresh_engine(db_url: str) -> Iterator[sa.Engine]:
    """The store's engine on an empty database upgraded to the latest schema."""
    engine = make_engine(db_url)
    upgrade_to_head(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A URL of an empty SQLite file, for tests where the database plays no part: they run once, not per database."""
    return f"sqlite:///{tmp_path / 'codex.db'}"


@pytest.fixture
def listening() -> Iterator[Callable[[], str]]:
    """Makes base URLs of nodes that accept connections and never answer: a test plays the node (the relay's
    connect probe finds it up)."""
    sockets: list[socket.socket] = []

    def url() -> str:
        s = socket.create_server(("127.0.0.1", 0), backlog=1024)  # never accepted: each probe stays queued
        sockets.append(s)
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"

    yield url
    for s in sockets:
        s.close()


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

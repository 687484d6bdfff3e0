"""Shared fixtures: a fresh database per test on SQLite and on the real MariaDB (``db_url``), or on SQLite
alone (``sqlite_url``) where the database plays no part; the warm interpreter relays fork from.

The helpers behind them, and those the test modules share, are in ``tests.support``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import pytest

from tests.support import relayproc
from tests.support.databases import drop_templates, fresh_mariadb
from tests.support.relayproc import ROOT
from tests.support.runtimes import stop_built
from tests.support.warm import Zygote


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
def _drop_templates() -> Iterator[None]:
    """The template databases of ``tests.support.databases.at_head`` last as long as the session."""
    yield
    drop_templates()


@pytest.fixture(scope="session", autouse=True)
def warm_relays(request: pytest.FixtureRequest) -> Iterator[None]:
    """Relays started by this session's tests fork from one warm interpreter (tests.support.warm): a start
    costs ~0.1 CPU-s instead of ~1; each relay is still its own process running mitmdump's main."""
    if not any(item.get_closest_marker("e2e") for item in request.session.items):
        yield
        return
    with Zygote(ROOT) as zygote:
        relayproc.default_zygote = zygote
        try:
            yield
        finally:
            relayproc.default_zygote = None


@pytest.fixture(autouse=True)
def _stop_runtimes() -> Iterator[None]:
    """In-process tests' runtimes (tests.support.runtimes) stop with their test, their threads with them."""
    yield
    stop_built()


@pytest.fixture
def mariadb() -> Iterator[str]:
    """A URL of a fresh database on the MariaDB server, for tests that only make sense there."""
    with fresh_mariadb() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A URL of an empty database, once for SQLite (a file) and once for MariaDB (a new database)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'codex.db'}"
        return
    with fresh_mariadb() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A URL of an empty SQLite file, for tests where the database plays no part: they run once, not per database."""
    return f"sqlite:///{tmp_path / 'codex.db'}"


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # the usual umask, under which SQLite creates its files 0644
    yield
    os.umask(old)


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

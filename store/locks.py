"""Advisory locks between processes sharing one database: MySQL/MariaDB's ``GET_LOCK``, a lock file beside a
SQLite file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator

import sqlalchemy as sa


@contextlib.contextmanager
def named_lock(conn: sa.Connection, purpose: str, timeout: int) -> Iterator[None]:
    """Hold a lock for ``purpose`` across the processes sharing this connection's database: ``GET_LOCK`` on
    MySQL, a lock file beside a SQLite file (SQLite serialises writes, not a read-then-write such as "which
    schema revision is this?" then "create it"), nothing for a database in memory. The body runs in
    transactions of its own.
    """
    if conn.dialect.name == "sqlite":
        path = conn.engine.url.database
        if not path or path == ":memory:" or conn.engine.url.query.get("mode") == "memory":
            yield
            return
        with _lock_file(f"{path}.lock-{hashlib.sha1(purpose.encode()).hexdigest()[:12]}", purpose, timeout):
            yield
        return
    if conn.dialect.name != "mysql":
        yield
        return
    # Lock names are server-wide: the database's name keeps other databases' relays out of the way.
    name = "codex_relay." + hashlib.sha1(f"{conn.engine.url.database}/{purpose}".encode()).hexdigest()
    got = conn.execute(sa.select(sa.func.get_lock(name, timeout))).scalar()
    conn.commit()
    if got != 1:
        raise TimeoutError(f"another process held the lock for {purpose} for {timeout} s")
    try:
        yield
    finally:
        conn.rollback()
        conn.execute(sa.select(sa.func.release_lock(name)))
        conn.commit()


@contextlib.contextmanager
def _lock_file(path: str, purpose: str, timeout: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process held the lock for {purpose} for {timeout} s") from None
                time.sleep(0.05)  # flock has no timeout of its own
        yield
    finally:
        os.close(fd)  # releases the lock

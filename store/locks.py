"""Advisory locks between processes sharing one MySQL/MariaDB database."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import sqlalchemy as sa


@contextlib.contextmanager
def named_lock(conn: sa.Connection, purpose: str, timeout: int) -> Iterator[None]:
    """Hold ``GET_LOCK`` for ``purpose`` on this connection's session; a no-op on other databases
    (SQLite serialises writers itself). The body runs in transactions of its own.
    """
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

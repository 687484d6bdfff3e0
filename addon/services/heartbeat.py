"""The relay's heartbeat: its row in ``relays`` (``store.relays``) every few seconds, so the admin page of any
relay shows the fleet; marked stopped at a clean shutdown."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import socket
from collections.abc import Callable

import sqlalchemy as sa

from store import relays
from store.engine import error_line
from store.periodic import Periodic
from store.records import utcnow
from store.write.writer import WriterStats

log = logging.getLogger("codex.runtime")


def relay_name(source: str | None, listen_port: int | None) -> str:
    """How alerts and the admin page name this relay: its ``codex_source`` when set, else host and port."""
    return source or host_port(listen_port)


def host_port(listen_port: int | None) -> str:
    host = socket.gethostname()
    return f"{host}:{listen_port}" if listen_port else host


def _version() -> str:
    try:
        return importlib.metadata.version("codex-relay")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class Heartbeat:
    """Beats every ``interval`` seconds on a thread while a database is open."""

    def __init__(self, writer_stats: Callable[[], WriterStats | None]) -> None:
        self._writer_stats = writer_stats
        self.interval = 5.0  # seconds between beats; tests shorten it
        self._started_at = utcnow()
        self._engine: sa.Engine | None = None
        self._beat: relays.Beat | None = None
        self._rounds: Periodic | None = None

    def apply(self, engine: sa.Engine, name: str, listen_port: int | None) -> None:
        """Beat into ``engine`` as ``name`` from now on (the first beat at once)."""
        self.stop(mark=False)
        self._engine = engine
        # Its row: host and port, the same across restarts; with no fixed port (-p 0), host and process.
        row = host_port(listen_port) if listen_port else f"{socket.gethostname()}/{os.getpid()}"
        self._beat = relays.Beat(relay=row, name=name, version=_version(), pid=os.getpid(),
                                 started_at=self._started_at, interval_s=self.interval, writer=None)
        with engine.begin() as conn:
            relays.forget_old(conn)
        self._rounds = Periodic("codex-heartbeat", self.interval, self.beat, _beat_failed, at_start=True,
                                join_timeout=5.0)
        self._rounds.start()

    @property
    def relay(self) -> str | None:
        """This relay's row in ``relays`` (host:port); None before a database is open."""
        return self._beat.relay if self._beat is not None else None

    def beat(self, stopped: bool = False) -> None:
        """One heartbeat now (``stopped``: the last). Blocking: call it from a thread."""
        assert self._engine is not None and self._beat is not None
        writer = self._writer_stats()
        b = dataclasses.replace(self._beat, writer=None if writer is None else dataclasses.asdict(writer))
        with self._engine.begin() as conn:
            relays.beat(conn, b, stopped)

    def stop(self, mark: bool = True) -> None:
        """Stop beating; ``mark``: tell the fleet this relay stopped (a clean shutdown)."""
        if self._rounds is None:
            return
        self._rounds.stop()
        self._rounds = None
        if mark:
            try:
                self.beat(stopped=True)  # with the writer's counts as it is about to flush the last records
            except sa.exc.SQLAlchemyError as e:  # shown as gone instead, after a few missed beats
                log.warning("could not mark this relay stopped in the database: %s", error_line(e))


def _beat_failed(e: Exception) -> None:  # the database away for a while: the next beat tries again
    log.warning("heartbeat failed: %s", error_line(e))



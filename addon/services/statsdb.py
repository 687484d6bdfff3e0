"""The stats database: opened and upgraded at start, written by the writer (a child process or a thread) with
its journal, and pruned (``codex_prune_days``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from addon.services.settings import SettingsError
from store.engine import error_line, make_engine, upgrade_to_head
from store.records import Item
from store.retention import DAY, Pruner
from store.write.journal import default_spool_path
from store.write.process import WriterStartError, start_writer
from store.write.writer import RecordWriter, WriterStats

log = logging.getLogger("codex.runtime")


@dataclass(frozen=True, slots=True)
class DbSettings:
    url: str
    spool: str  # "": the relay's default journal, named for ``listen_port``
    writer_process: bool
    prune_days: int
    listen_port: int | None  # the relay's first listening port


def db_settings(options: Any, listen_port: int | None) -> DbSettings:
    """``codex_db``, ``codex_spool``, ``codex_writer_process`` and ``codex_prune_days``."""
    if options.codex_prune_days < 0:
        raise SettingsError("codex_prune_days must be >= 0")
    return DbSettings(options.codex_db, options.codex_spool, options.codex_writer_process, options.codex_prune_days,
                      listen_port)


class StatsDb:
    """The engine, the writer and the pruner; ``submit`` drops records while no database is open."""

    def __init__(self) -> None:
        self.engine: sa.Engine | None = None
        self.prune_interval = DAY  # tests shorten it
        self._url: str | None = None
        self._writer: RecordWriter | None = None
        self._pruner: Pruner | None = None
        self._pruning: tuple[int, sa.Engine | None] = (0, None)

    def open(self, settings: DbSettings) -> None:
        """Open ``settings.url`` (the journal and the writer's kind are read then), unless it is open already."""
        if settings.url != self._url:
            self._open(settings)

    def prune(self, settings: DbSettings) -> None:
        """Prune the open database as ``settings.prune_days`` says (a new pruner only when that or the database
        changed)."""
        if (settings.prune_days, self.engine) != self._pruning:
            self._stop_pruner()
            self._pruning = (settings.prune_days, self.engine)
            if settings.prune_days and self.engine is not None:
                self._pruner = Pruner(self.engine, settings.prune_days, self.prune_interval)
                self._pruner.start()

    def _open(self, s: DbSettings) -> None:
        try:
            engine = make_engine(s.url)
            upgrade_to_head(engine)
        except Exception as e:
            raise SettingsError(f"codex_db: cannot open {_safe_url(s.url)}: {error_line(e)}") from None
        if self._writer is not None:
            self._writer.close()
        try:
            # Half a second of batching: at relay rates it cuts the writer's CPU per record several-fold;
            # stats lag by at most that much.
            self._writer = start_writer(engine, s.url, s.spool or _default_spool(s.url, s.listen_port), linger=0.5,
                                        process=s.writer_process)
        except WriterStartError as e:
            self._writer = None
            engine.dispose()
            option = "codex_spool" if e.kind == "spool" else "codex_db"
            raise SettingsError(f"{option}: {e}") from None
        self.engine = engine
        self._url = s.url
        log.info("stats database: %s", _safe_url(s.url))

    @property
    def database(self) -> str | None:
        """The stats database's URL without its password, for logs; None before one is open."""
        return _safe_url(self._url) if self._url else None

    def submit(self, item: Item) -> None:
        """Queue a record for the writer (dropped when no database is open)."""
        if self._writer is not None:
            self._writer.submit(item)

    def writer_stats(self) -> WriterStats | None:
        return self._writer.stats() if self._writer is not None else None

    def _stop_pruner(self) -> None:
        if self._pruner is not None:
            self._pruner.stop()
            self._pruner = None

    def stop(self) -> None:
        """Stop the pruner and close the writer (its last flush): later records are dropped."""
        self._stop_pruner()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _default_spool(url: str, port: int | None) -> str | None:
    """The relay's own journal: named for its first listening port."""
    path = default_spool_path(url, port)
    older = default_spool_path(url)
    if path != older and older is not None and os.path.exists(older):
        log.warning("a journal from before journals were per relay is at %s: its records are written by a relay "
                    "started with --set codex_spool=%s", older, older)
    return path


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"

"""A local SQLite journal for records the database could not take yet.

While the database is down the writer appends batches here and keeps relaying; when it is back the
journal is replayed oldest first and each replayed batch is deleted in the same step it is written.
The file survives a crash, so records acknowledged to it are written at the next start; replays are
idempotent on ``invoke_id`` (store.invocations). One process owns a journal at a time (a file lock).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import make_url

from store.engine import in_memory
from store.records import InvocationRecord, NodeStateUpdate, Usage

Item = InvocationRecord | NodeStateUpdate


class SpoolInUse(RuntimeError):
    pass


def default_spool_path(db_url: str) -> str | None:
    """Beside a SQLite database file; per database URL under data/ otherwise; None for memory."""
    url = make_url(db_url)
    if in_memory(url):
        return None
    if url.get_backend_name() == "sqlite":
        return url.database + ".spool"
    # One journal per database: a leftover journal must never replay into another database.
    digest = hashlib.sha1(url.render_as_string(hide_password=True).encode()).hexdigest()[:12]
    return f"data/spool-{digest}.db"


def encode(item: Item) -> str:
    data = dataclasses.asdict(item)
    if isinstance(item, InvocationRecord):
        data["occurred_at"] = item.occurred_at.isoformat() if item.occurred_at else None
        return json.dumps({"invocation": data})
    return json.dumps({"node_state": data})


def decode(text: str) -> Item:
    data = json.loads(text)
    if "invocation" in data:
        fields = data["invocation"]
        if fields["occurred_at"]:
            fields["occurred_at"] = dt.datetime.fromisoformat(fields["occurred_at"])
        fields["usage"] = Usage(**fields["usage"])
        return InvocationRecord(**fields)
    return NodeStateUpdate(**data["node_state"])


class Spool:
    """Append-only journal; ``path`` None keeps it in memory (nothing survives the process)."""

    def __init__(self, path: str | os.PathLike | None, max_items: int = 1_000_000) -> None:
        self.path = str(path) if path else None
        self.max_items = max_items
        self._lock_file = None
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.path + ".lock", "w")  # noqa: SIM115 - held for the spool's life
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                raise SpoolInUse(f"spool {self.path} is in use by another relay: give each instance its own "
                                 f"codex_spool") from None
        # Only the writer thread uses it after construction.
        self._db = sqlite3.connect(self.path or ":memory:", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "added REAL NOT NULL, item TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS rejected (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "added REAL NOT NULL, error TEXT NOT NULL, item TEXT NOT NULL)")
        self.count = self._db.execute("SELECT count(*) FROM spool").fetchone()[0]

    def append(self, items: Sequence[Item]) -> int:
        """Journal ``items``; returns how many did not fit (the journal is full) and were dropped."""
        room = max(0, self.max_items - self.count)
        kept = items[:room]
        now = time.time()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO spool (added, item) VALUES (?, ?)", [(now, encode(i)) for i in kept])
        self.count += len(kept)
        return len(items) - len(kept)

    def peek(self, limit: int) -> tuple[list[int], list[Item]]:
        rows = self._db.execute("SELECT id, item FROM spool ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [r[0] for r in rows], [decode(r[1]) for r in rows]

    def remove(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM spool WHERE id BETWEEN ? AND ?", (min(ids), max(ids)))
        self.count = self._db.execute("SELECT count(*) FROM spool").fetchone()[0]

    def reject(self, item: Item, error: str) -> None:
        """Keep a record the database refuses (not an outage) aside instead of losing it."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO rejected (added, error, item) VALUES (?, ?, ?)",
                             (time.time(), error[:2000], encode(item)))

    def rejected_count(self) -> int:
        return self._db.execute("SELECT count(*) FROM rejected").fetchone()[0]

    def oldest_age(self) -> float | None:
        """Seconds since the oldest journaled record was added, None when empty."""
        row = self._db.execute("SELECT min(added) FROM spool").fetchone()
        return None if row[0] is None else max(0.0, time.time() - row[0])

    def close(self) -> None:
        """Close; an empty journal file is removed (a non-empty one waits for the next start)."""
        empty = self.count == 0 and self.rejected_count() == 0
        self._db.close()
        if self.path and empty:
            for suffix in ("", "-wal", "-shm", ".lock"):
                Path(self.path + suffix).unlink(missing_ok=True)
        if self._lock_file is not None:
            self._lock_file.close()

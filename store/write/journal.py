"""A local SQLite journal for records the database could not take yet.

While the database is down the writer appends batches here and keeps relaying; when it is back the
journal is replayed oldest first and each replayed batch is deleted in the same step it is written.
The file survives a crash, so records acknowledged to it are written at the next start; replays are
idempotent on ``invoke_id`` (store.write.batch). One relay owns a journal at a time: a file lock, held by
the process that writes (the relay's writer process, or the relay itself), and the lock file names the
relay. A relay that died may leave its writer process finishing what it was sent (store.write.process,
``ORPHAN_GRACE_S``): a new relay waits for that one instead of refusing to start.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from sqlalchemy.engine import make_url

from store.engine import create_private, in_memory
from store.records import InvocationRecord, Item, KeyCount, NodeStateUpdate, Usage

log = logging.getLogger("codex.writer")

# A writer process whose relay died ends within this (store.write.process) ...
ORPHAN_GRACE_S = 45.0
# ... so a new relay that finds the lock held for a relay that is gone waits a little longer for it.
ORPHAN_WAIT_S = ORPHAN_GRACE_S + 5.0


class SpoolInUse(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a relay killed and not yet reaped by whoever started it is gone too
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _holder(lock: TextIO) -> int | None:
    lock.seek(0)
    text = lock.read().strip()
    return int(text) if text.isdigit() else None


def _lock(spool: str, relay_pid: int, orphan_wait: float) -> TextIO:
    """``spool``'s lock file, locked and naming ``relay_pid``; raises SpoolInUse while another relay holds it."""
    path = spool + ".lock"
    deadline = None
    while True:
        lock = open(path, "a+")  # noqa: SIM115 - held for the spool's life; "a+": the holder's pid stays readable
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(lock)
            lock.close()
            if holder is None or _alive(holder):
                held_by = f"relay pid {holder}" if holder is not None else "another relay"
                raise SpoolInUse(f"spool {spool} is in use by {held_by}: give each instance its own "
                                 "codex_spool") from None
            if deadline is None:
                deadline = time.monotonic() + orphan_wait
                log.warning("spool %s: relay pid %d is gone and its writer still holds the journal; waiting for "
                            "it to finish (at most %.0f s)", spool, holder, orphan_wait)
            if time.monotonic() >= deadline:
                raise SpoolInUse(f"spool {spool} is still held {orphan_wait:g} s after its relay (pid {holder}) "
                                 "ended: give each instance its own codex_spool") from None
            time.sleep(0.1)  # a lock of another process: nothing tells when it is free
            continue
        try:
            same = os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed (an empty journal's close) after we opened it
            lock.seek(0)
            lock.truncate()
            lock.write(f"{relay_pid}\n")
            lock.flush()
            return lock
        lock.close()


def default_spool_path(db_url: str, port: int | None = None) -> str | None:
    """Beside a SQLite database file; per database URL under data/ otherwise; None for memory. ``port``: the
    relay's listening port, which makes the journal the relay's own (relays of one checkout on one database
    each have theirs); none (or 0, a port the system picks) gives the name of relays before ports counted."""
    url = make_url(db_url)
    if in_memory(url):
        return None
    own = f".{port}" if port else ""
    if url.get_backend_name() == "sqlite":
        assert url.database  # not in memory
        return f"{url.database}{own}.spool"
    # One journal per database: a leftover journal must never replay into another database.
    digest = hashlib.sha1(url.render_as_string(hide_password=True).encode()).hexdigest()[:12]
    return f"data/spool-{digest}{own}.db"


def encode(item: Item) -> str:
    data = dataclasses.asdict(item)
    if isinstance(item, InvocationRecord):
        data["occurred_at"] = item.occurred_at.isoformat() if item.occurred_at else None
        return json.dumps({"invocation": data})
    if isinstance(item, KeyCount):
        data["day"] = item.day.isoformat()
        return json.dumps({"key_count": data})
    return json.dumps({"node_state": data})


def decode(text: str) -> Item:
    data = json.loads(text)
    if "invocation" in data:
        fields = data["invocation"]
        if fields["occurred_at"]:
            fields["occurred_at"] = dt.datetime.fromisoformat(fields["occurred_at"])
        fields["usage"] = Usage(**fields["usage"])
        return InvocationRecord(**fields)
    if "key_count" in data:
        fields = data["key_count"]
        return KeyCount(fields["client_key"], dt.date.fromisoformat(fields["day"]), fields["counter"])
    return NodeStateUpdate(**data["node_state"])


class Spool:
    """Append-only journal; ``path`` None keeps it in memory (nothing survives the process)."""

    def __init__(self, path: str | os.PathLike | None, max_items: int = 1_000_000, *,
                 relay_pid: int | None = None, orphan_wait: float = ORPHAN_WAIT_S) -> None:
        """``relay_pid``: the relay this journal is written for (default: this process)."""
        self.path = str(path) if path else None
        self.max_items = max_items
        self._lock_file = None
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = _lock(self.path, relay_pid or os.getpid(), orphan_wait)
            create_private(self.path)  # the journal holds records of calls, and SQLite would create it 0644
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

    def peek(self, limit: int, after: int = 0) -> tuple[list[int], list[Item]]:
        """The oldest ``limit`` records (with an id above ``after``) and their ids."""
        rows = self._db.execute("SELECT id, item FROM spool WHERE id > ? ORDER BY id LIMIT ?",
                                (after, limit)).fetchall()
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

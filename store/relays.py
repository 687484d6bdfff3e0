"""The ``relays`` table: each relay's heartbeat row (who it is, its writer's state, when it last beat), and the
fleet read from it for the admin page.

A row is its relay's alone (keyed by host and port), so a beat sets the row's columns outright: the writer's
counters are a snapshot of that relay's process, not fleet counters other relays add to.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from store.records import utcnow
from store.schema import relays
from store.upsert import upsert

# A relay that missed this many beats in a row is shown as gone (crashed, killed, or cut off the database).
MISSED_BEATS = 3
# Rows of relays not seen for this long are deleted by the next relay that starts: a host renamed or a port
# changed leaves its old row behind.
FORGET_AFTER = dt.timedelta(days=7)
_BEAT_COLUMNS = tuple(c.name for c in relays.columns if c.name != "relay")


@dataclass(frozen=True, slots=True)
class Beat:
    """What a relay tells the fleet each beat."""

    relay: str  # host:port
    name: str
    version: str
    pid: int
    started_at: dt.datetime
    interval_s: float
    writer: dict[str, Any] | None  # WriterStats as a dict; None: no writer running


def beat(conn: sa.Connection, b: Beat, stopped: bool = False) -> None:
    """Record one heartbeat: one statement. ``stopped``: the last, at a clean shutdown."""
    now = utcnow()
    w = b.writer or {}
    error = w.get("last_error")
    writer = None if b.writer is None else "stalled" if w.get("stalled") else "ok" if w["db_ok"] else "unreachable"
    row = {"relay": b.relay, "name": b.name, "version": b.version, "pid": b.pid, "started_at": b.started_at,
           "seen_at": now, "interval_s": b.interval_s, "stopped_at": now if stopped else None,
           "writer": writer,
           **{k: int(w.get(k) or 0) for k in ("queued", "written", "spooled", "rejected", "lost", "stalls")},
           "last_error": error[:300] if error else None}
    upsert(conn, relays, [row], _BEAT_COLUMNS)


def forget_old(conn: sa.Connection) -> None:
    """Delete the rows of relays not seen for ``FORGET_AFTER``."""
    conn.execute(sa.delete(relays).where(relays.c.seen_at < utcnow() - FORGET_AFTER))


def state(row: sa.Row, now: dt.datetime) -> str:
    """'running', 'stopped' (shut down cleanly) or 'gone' (its beats stopped without a shutdown)."""
    if row.stopped_at is not None:
        return "stopped"
    return "gone" if (now - row.seen_at).total_seconds() > MISSED_BEATS * row.interval_s else "running"


def fleet(conn: sa.Connection) -> list[dict[str, Any]]:
    """Every relay row with its state, uptime and seconds since its last beat; running relays first, by name."""
    now = utcnow()
    out = []
    for r in conn.execute(sa.select(relays)):
        s = state(r, now)
        out.append({**r._mapping, "state": s,
                    "uptime_s": ((r.seen_at if s != "running" else now) - r.started_at).total_seconds(),
                    "seen_s_ago": max(0.0, (now - r.seen_at).total_seconds())})
    return sorted(out, key=lambda r: (r["state"] != "running", r["name"], r["relay"]))

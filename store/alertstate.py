"""The fleet's alert ledger (``alert_state``): what was last announced about each watched subject.

Relays on one database each see every node change; the one whose conditional write (``claim``) lands
sends the alert, the others do not. The ledger outlives the relays, so a restarted relay knows which
failures were already told.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa

from store.schema import alert_state


@dataclass(frozen=True, slots=True)
class Announced:
    """A subject's last announcement: its state, the version it was seen at (the node state version, or a
    time window's number), and when good news of it was last sent (epoch seconds; None: never)."""

    down: bool
    version: int
    good_at: float | None = None


def read_announced(conn: sa.Connection) -> dict[str, Announced]:
    """Every subject's last announcement."""
    return {r.subject: Announced(bool(r.down), r.version, _epoch(r.good_at))
            for r in conn.execute(sa.select(alert_state.c.subject, alert_state.c.down, alert_state.c.version,
                                            alert_state.c.good_at))}


def claim(engine: sa.Engine, subject: str, entry: Announced, relay: str, at: float) -> bool:
    """Record ``entry`` as ``subject``'s announcement; False when some relay already recorded one seen at
    ``entry.version`` or later (then that relay told it, and this one does not).

    Two short transactions, not one: an UPDATE that matches no row would hold a gap lock on MariaDB, and two
    relays inserting the same new subject behind theirs deadlock instead of one losing on the key.
    """
    values = {"down": entry.down, "version": entry.version, "announced_at": _time(at),
              "good_at": _time(entry.good_at) if entry.good_at is not None else None, "relay": relay}
    with engine.begin() as conn:
        updated = conn.execute(sa.update(alert_state).where(alert_state.c.subject == subject,
                                                            alert_state.c.version < entry.version).values(values))
        if updated.rowcount:
            return True
    try:
        with engine.begin() as conn:
            conn.execute(sa.insert(alert_state).values(subject=subject, **values))
    except sa.exc.IntegrityError:  # the subject is recorded, at this version or a later one
        return False
    return True


def _time(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).replace(tzinfo=None)


def _epoch(value: dt.datetime | None) -> float | None:
    return value.replace(tzinfo=dt.UTC).timestamp() if value is not None else None

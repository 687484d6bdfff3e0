"""Fleet-wide rpm and concurrency of client keys, counted in the shared database (``client_key_calls``).

A key's admission is serialised across relays by ``gate``: the transaction's first statement adds 1 to the
key's ``client_key_gate`` row, so on MariaDB it holds that row's lock (InnoDB X lock) and on SQLite the
database's write lock until it commits; a deferred SQLite transaction cannot read first and race, because it
writes first. Under the gate ``figures`` counts the key's calls started in the last ``RPM_WINDOW_S`` and
those in flight (lease still running), and ``start`` adds this call's row. The relay running a call pushes
its lease forward every ``LEASE_S / 4`` (``refresh``) and clears it when the call ends (``end``); a relay
that dies leaves rows whose leases run out within ``LEASE_S``: that is the slack of concurrency after a
crash. Times are the relays' clocks (naive UTC): rpm's slack is their skew.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass

import sqlalchemy as sa

from store.schema import client_key_calls, client_key_gate, client_key_spans
from store.upsert import upsert

RPM_WINDOW_S = 60.0
LEASE_S = 60.0  # a call's slot outlives its relay by at most this long
SPAN_KEEP = dt.timedelta(hours=6)  # minute buckets older than this count in no window (the longest is 5 h)

_c = client_key_calls.c


def gate(conn: sa.Connection, key: str) -> None:
    """Serialise ``key``'s admission with every other relay's until the caller's transaction ends. One
    statement, insert or add: an UPDATE of a missing row then an INSERT would let two relays deadlock on
    MariaDB's gap lock the first time a key is seen."""
    upsert(conn, client_key_gate, [{"client_key": key, "admissions": 1}], increment=("admissions",))


@dataclass(frozen=True, slots=True)
class Calls:
    """A key's calls fleet-wide, as read under its gate."""

    started: int  # in the last minute
    in_flight: int  # whose lease holds
    oldest: dt.datetime | None  # the oldest start in the last minute (when a request is free again: +60 s)


def figures(conn: sa.Connection, key: str, now: dt.datetime) -> Calls:
    """``key``'s calls at ``now``: one read (rows out of both counts are left to ``tidy``)."""
    recent = _c.started_at > now - dt.timedelta(seconds=RPM_WINDOW_S)
    # CASE, not FILTER: MariaDB has no aggregate FILTER clause.
    row = conn.execute(sa.select(
        sa.func.sum(sa.case((recent, 1), else_=0)), sa.func.sum(sa.case((_c.lease_until >= now, 1), else_=0)),
        sa.func.min(sa.case((recent, _c.started_at)))).where(_c.client_key == key)).one()
    return Calls(int(row[0] or 0), int(row[1] or 0), row[2])


def start(conn: sa.Connection, holder: str, key: str, now: dt.datetime) -> None:
    """Count a call admitted now (under the gate) until ``end`` or its lease runs out."""
    conn.execute(sa.insert(client_key_calls).values(holder=holder, client_key=key, started_at=now,
                                                    lease_until=now + dt.timedelta(seconds=LEASE_S)))


def end(engine: sa.Engine, holder: str) -> None:
    """The call ended: its slot is free (its start still counts in the key's rpm for a minute)."""
    with engine.begin() as conn:
        conn.execute(sa.update(client_key_calls).where(_c.holder == holder).values(lease_until=None))


def refresh(engine: sa.Engine, holders: Collection[str], now: dt.datetime) -> None:
    """Push the leases of this relay's running calls forward."""
    if holders:
        with engine.begin() as conn:
            conn.execute(sa.update(client_key_calls)
                         .where(_c.holder.in_(sorted(holders)), _c.lease_until.is_not(None))
                         .values(lease_until=now + dt.timedelta(seconds=LEASE_S)))


def tidy(engine: sa.Engine, now: dt.datetime) -> None:
    """Drop the calls out of both counts (started over a minute ago, ended or their lease run out) and the minute
    buckets no window counts any more (``SPAN_KEEP``)."""
    with engine.begin() as conn:
        conn.execute(sa.delete(client_key_calls).where(
            _c.started_at <= now - dt.timedelta(seconds=RPM_WINDOW_S),
            sa.or_(_c.lease_until.is_(None), _c.lease_until < now)))
        conn.execute(sa.delete(client_key_spans).where(client_key_spans.c.width == 1,
                                                       client_key_spans.c.start < now - SPAN_KEEP))

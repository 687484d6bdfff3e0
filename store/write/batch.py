"""Apply a batch of records in one transaction: invocation rows plus atomic per-node and rollup increments.

Exactly once: an invocation whose ``invoke_id`` is already stored (a spool replay after a crash, a
retried batch whose commit was lost) is skipped together with its increments. Node and rollup columns
only change through ``col = col + ?`` (or a value that does not depend on the old row), so relays
sharing one database never lose a count. What each call adds where is declared in ``store.rollups``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from store import rollups
from store.key_usage import add_counts, add_usage
from store.nodes import bump_version
from store.records import InvocationRecord, Item, KeyCount, NodeStateUpdate
from store.schema import client_key_spans, codex_daily_stats, codex_hourly_stats, codex_invocations, nodes
from store.upsert import upsert

_ID_CHUNK = 500  # ids per IN (…) lookup
# What one row may store: a poisoned answer must not make a row (and its batch) too large for the
# database (MariaDB drops the connection on a statement over max_allowed_packet).
RAW_RESPONSE_MAX = 64 * 1024  # characters
ERROR_MESSAGE_MAX = 2000
FLAGS_MAX = 255  # the column's size

# The writer's statements are built once and run with their values: building and cache-keying them anew
# took the writer thread (and so the proxy's GIL) ~0.4 ms per batch, most of a one-record batch.
_INSERT = sa.insert(codex_invocations)
_STORED = (sa.select(codex_invocations.c.invoke_id)
           .where(codex_invocations.c.invoke_id.in_(sa.bindparam("ids", expanding=True))))


@dataclass(slots=True)
class _NodeChange:
    """The net effect of one batch on one node row, in the order the records happened."""

    calls: list[Sequence[Any]] = field(default_factory=list)  # the values (store.rollups) of its calls
    failed_attempts: int = 0  # retried on another node
    streak_reset: bool = False  # a success (or a recovery) reset the streak within the batch
    streak_add: int = 0  # failures since that reset (or since the batch began)
    values: dict[str, object] = field(default_factory=dict)  # plain assignments: failed, last_error, pings

    def failure(self, error: str | None) -> None:
        """A failure in the streak (its count is one of the increments)."""
        self.streak_add += 1
        if error:
            self.values["last_error"] = error[:ERROR_MESSAGE_MAX]

    def reset_streak(self) -> None:
        self.streak_reset = True
        self.streak_add = 0


@dataclass(slots=True)
class BatchResult:
    inserted: int = 0
    duplicates: int = 0
    node_updates: int = 0


def apply_batch(conn: sa.Connection, items: Sequence[Item]) -> BatchResult:
    """Write ``items`` on ``conn`` (the caller owns the transaction)."""
    result = BatchResult()
    records = [i for i in items if isinstance(i, InvocationRecord)]
    known = _stored_ids(conn, {r.invoke_id for r in records})
    changes: dict[str, _NodeChange] = {}
    rows: list[dict] = []
    sums = rollups.Sums()
    counts: list[KeyCount] = []
    for item in items:
        if isinstance(item, InvocationRecord):
            if item.invoke_id in known:
                result.duplicates += 1
                continue
            known.add(item.invoke_id)
            row = invocation_row(item)
            rows.append(row)
            values = rollups.values(item)
            sums.add(item, row, values)
            if item.node_id:
                _count_invocation(changes.setdefault(item.node_id, _NodeChange()), item, values)
        elif isinstance(item, KeyCount):
            counts.append(item)
        else:
            _apply_state(changes.setdefault(item.node_id, _NodeChange()), item)
    if rows:
        conn.execute(_INSERT, rows)
        result.inserted = len(rows)
        upsert(conn, codex_daily_stats, sums.day(), increment=rollups.DAY_COLUMNS)
        hours, increment = sums.hour()
        upsert(conn, codex_hourly_stats, hours, increment=increment)
        add_usage(conn, sums.key())  # per client key and day: teams' budgets and stats
        upsert(conn, client_key_spans, sums.span(), increment=rollups.SPAN_COLUMNS)  # plan-shaped budgets
    add_counts(conn, counts)
    # A fixed order of row locks: two relays updating the same nodes cannot deadlock each other.
    for node_id in sorted(changes):
        conn.execute(*_node_statement(node_id, changes[node_id]))
        result.node_updates += 1
    if any("failed" in c.values for c in changes.values()):
        bump_version(conn)  # a breaker opened or closed: the other relays follow
    return result


def invocation_row(r: InvocationRecord) -> dict:
    u = r.usage
    flags, raw, error = r.flags, r.raw_response, r.error_message
    if raw is not None and len(raw) > RAW_RESPONSE_MAX:
        raw, flags = raw[:RAW_RESPONSE_MAX], [*flags, "raw_trimmed"]
    if error is not None and len(error) > ERROR_MESSAGE_MAX:
        error, flags = error[:ERROR_MESSAGE_MAX], [*flags, "error_trimmed"]
    return {
        # Clipped to the column sizes: MySQL in strict mode refuses a longer value outright.
        "invoke_id": r.invoke_id, "occurred_at": r.occurred_at, "source": r.source, "model": _clip(r.model, 128),
        "requested_model": _clip(r.requested_model, 128),
        "input_tokens": u.input_tokens, "output_tokens": u.output_tokens, "cache_input_tokens": u.cached_tokens,
        "reasoning_tokens": u.reasoning_tokens, "total_tokens": u.total_tokens,
        "cache_write_tokens": u.cache_write_tokens, "cost": r.cost, "cost_estimated": r.cost is not None,
        "cost_input": r.cost_input, "cost_cached": r.cost_cached, "cost_output": r.cost_output,
        "cost_cache_write": r.cost_cache_write,
        "status": r.status, "error_message": error, "payload": r.payload,
        "raw_response": raw, "node_id": r.node_id, "endpoint": r.endpoint[:255],
        "api_format": r.api_format, "stream": r.stream, "http_status": r.http_status, "ttfb_ms": r.ttfb_ms,
        "stream_ms": r.stream_ms, "duration_ms": r.duration_ms, "request_bytes": r.request_bytes,
        "response_bytes": r.response_bytes, "attempts": r.attempts, "client_key": _clip(r.client_key, 64),
        "session_key": _clip(r.session_key, 128),
        # Most rows have none: skip the set and sort (the writer's hot path).
        "flags": (",".join(sorted(set(flags)))[:FLAGS_MAX] or None) if flags else None,
    }


def _clip(text: str | None, size: int) -> str | None:
    return text[:size] if text else text


def _stored_ids(conn: sa.Connection, ids: Iterable[str]) -> set[str]:
    ids = list(ids)
    found: set[str] = set()
    for start in range(0, len(ids), _ID_CHUNK):
        chunk = ids[start:start + _ID_CHUNK]
        found.update(conn.execute(_STORED, {"ids": chunk}).scalars())
    return found


def _count_invocation(change: _NodeChange, r: InvocationRecord, values: Sequence[Any]) -> None:
    change.calls.append(values)
    end = rollups.outcome(r)
    if end == rollups.FAILURE:
        change.failure(r.error_message or r.status)
    elif end == rollups.SUCCESS:
        change.reset_streak()


def _apply_state(change: _NodeChange, u: NodeStateUpdate) -> None:
    if u.failed_attempt:
        change.failed_attempts += 1
        change.failure(u.last_error)
    elif u.last_error is not None:
        change.values["last_error"] = u.last_error[:ERROR_MESSAGE_MAX]
    if u.failed is not None:
        change.values["failed"] = u.failed
        if not u.failed:  # back in service: it starts a new streak
            change.reset_streak()
    if u.pinged:
        change.values["last_ping_ms"] = u.last_ping_ms
        change.values["last_ping_err"] = u.last_ping_err


def _node_statement(node_id: str, change: _NodeChange) -> tuple[sa.Update, dict[str, object]]:
    """The UPDATE of one node row for ``change``, and its values."""
    add = rollups.node_increments(change.calls, change.failed_attempts)
    added = tuple(name for name, amount in add.items() if amount)
    streak = "reset" if change.streak_reset else "add" if change.streak_add else ""
    params: dict[str, object] = {"node_id": node_id, "streak": change.streak_add}
    params |= {f"add_{name}": add[name] for name in added}
    params |= {f"set_{name}": value for name, value in change.values.items()}
    return _node_update(added, streak, tuple(sorted(change.values))), params


@functools.cache
def _node_update(added: tuple[str, ...], streak: str, assigned: tuple[str, ...]) -> sa.Update:
    """The node UPDATE of one shape (which columns change, and how), built once per shape."""
    c = nodes.c
    # Parameter names differ from the columns': SQLAlchemy keeps those for its own SET values.
    values: dict[str, object] = {name: c[name] + sa.bindparam(f"add_{name}") for name in added}
    if streak == "reset":
        values["fail_streak"] = sa.bindparam("streak", type_=c.fail_streak.type)
    elif streak == "add":
        values["fail_streak"] = c.fail_streak + sa.bindparam("streak")
    values |= {name: sa.bindparam(f"set_{name}", type_=c[name].type) for name in assigned}
    if not values:
        values["fail_streak"] = c.fail_streak  # a no-op keeps the statement valid
    return sa.update(nodes).where(c.id == sa.bindparam("node_id", type_=c.id.type)).values(values)

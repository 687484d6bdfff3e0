"""The one dialect-specific statement: insert rows, or update some columns when the key exists."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.sql.base import ReadOnlyColumnCollection
from sqlalchemy.sql.elements import KeyedColumnElement


def upsert(conn: sa.Connection, table: sa.Table, rows: Sequence[dict], update: Sequence[str] = (),
           increment: Sequence[str] = ()) -> None:
    """Insert ``rows``; where a key exists, set the ``update`` columns to the new values and add the new
    values to the ``increment`` columns (``col = col + new``, atomic). Every other column stays as is.

    Never delete + insert (``REPLACE INTO``): that resets every column not in the row.
    """
    if rows:
        conn.execute(_statement(conn.dialect.name, table, tuple(update), tuple(increment)), list(rows))


@functools.cache
def _statement(dialect: str, table: sa.Table, update: tuple[str, ...], increment: tuple[str, ...]) -> sa.Insert:
    # Built once without values and run with executemany: compiling a multi-row VALUES statement
    # anew for every batch cost the writer more than the database did.
    if dialect == "mysql":
        my = mysql.insert(table)
        return my.on_duplicate_key_update(_changes(table, my.inserted, update, increment))
    if dialect == "sqlite":
        lite = sqlite.insert(table)
        return lite.on_conflict_do_update(index_elements=[c.name for c in table.primary_key],
                                          set_=_changes(table, lite.excluded, update, increment))
    raise NotImplementedError(f"no upsert for dialect {dialect!r}")


def _changes(table: sa.Table, new: ReadOnlyColumnCollection[str, KeyedColumnElement[Any]], update: tuple[str, ...],
             increment: tuple[str, ...]) -> dict[str, sa.ColumnElement[Any]]:
    """The SET clause: ``new`` is the dialect's view of the row being inserted (``inserted``, ``excluded``)."""
    return {c: new[c] for c in update} | {c: table.c[c] + new[c] for c in increment}

"""The one dialect-specific statement: insert rows, or update some columns when the key exists."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite


def upsert(conn: sa.Connection, table: sa.Table, rows: Sequence[dict], update: Sequence[str] = (),
           increment: Sequence[str] = ()) -> None:
    """Insert ``rows``; where a key exists, set the ``update`` columns to the new values and add the new
    values to the ``increment`` columns (``col = col + new``, atomic). Every other column stays as is.

    Never delete + insert (``REPLACE INTO``): that resets every column not in the row.
    """
    if not rows:
        return
    dialect = conn.dialect.name
    if dialect == "mysql":
        stmt = mysql.insert(table).values(list(rows))
        new = stmt.inserted
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).values(list(rows))
        new = stmt.excluded
    else:
        raise NotImplementedError(f"no upsert for dialect {dialect!r}")
    changes = {c: new[c] for c in update} | {c: table.c[c] + new[c] for c in increment}
    if dialect == "mysql":
        stmt = stmt.on_duplicate_key_update(changes)
    else:
        stmt = stmt.on_conflict_do_update(index_elements=[c.name for c in table.primary_key], set_=changes)
    conn.execute(stmt)

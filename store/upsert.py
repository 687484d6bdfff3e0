"""The one dialect-specific statement: insert a row, or update only some columns when its key exists."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite


def upsert(conn: sa.Connection, table: sa.Table, rows: Sequence[dict], update: Sequence[str]) -> None:
    """Insert ``rows``; for keys already present, set only the ``update`` columns and leave all else as is.

    Never delete + insert (``REPLACE INTO``): that resets every column not in the row.
    """
    if not rows:
        return
    key = [c.name for c in table.primary_key]
    dialect = conn.dialect.name
    if dialect == "mysql":
        stmt = mysql.insert(table).values(list(rows))
        stmt = stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in update})
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).values(list(rows))
        stmt = stmt.on_conflict_do_update(index_elements=key, set_={c: stmt.excluded[c] for c in update})
    else:
        raise NotImplementedError(f"no upsert for dialect {dialect!r}")
    conn.execute(stmt)

"""Node rows: the non-destructive config upsert and reads. Stats columns are the writer's alone."""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa

from store.records import NodeConfig, utcnow
from store.schema import node_state, nodes
from store.upsert import upsert

# What a config file or the admin page may set. Stats, health and `disabled` are never in here.
CONFIG_COLUMNS = ("name", "base_url", "api_key", "weight", "updated_at", "formats", "models", "model_map",
                  "usage_probe", "auth_header")


def upsert_nodes(conn: sa.Connection, configs: Sequence[NodeConfig], origin: str = "file") -> None:
    """Insert new nodes and update the config of known ones; their stats stay untouched.

    ``origin`` 'file' (the nodes file) claims existing nodes too; 'admin' (the admin page) only marks
    the nodes it creates, so editing a file node on the page leaves it the file's.
    """
    now = utcnow()
    rows = [{"id": c.id, "name": c.name or c.id, "base_url": c.base_url, "api_key": c.api_key,
             "weight": c.weight, "updated_at": now, "origin": origin, "formats": ",".join(c.formats) or None,
             "models": json.dumps(list(c.models)) if c.models else None,
             "model_map": json.dumps(c.model_map, sort_keys=True) if c.model_map else None,
             "usage_probe": c.usage_probe, "auth_header": c.auth_header or None} for c in configs]
    upsert(conn, nodes, rows, CONFIG_COLUMNS + (("origin",) if origin == "file" else ()))
    if rows:
        bump_version(conn)


def config_of(row: sa.Row) -> NodeConfig:
    return NodeConfig(id=row.id, base_url=row.base_url or "", api_key=row.api_key or "", name=row.name or row.id,
                      weight=row.weight, formats=tuple(row.formats.split(",")) if row.formats else (),
                      models=tuple(json.loads(row.models)) if row.models else (),
                      model_map=json.loads(row.model_map) if row.model_map else {}, usage_probe=row.usage_probe,
                      auth_header=row.auth_header or "")


def bump_version(conn: sa.Connection) -> None:
    """Tell every relay on this database that node config or state changed (in the caller's transaction)."""
    upsert(conn, node_state, [{"id": 1, "version": 1}], increment=("version",))


def read_version(conn: sa.Connection) -> int:
    """The node state version: it moves with every change ``bump_version`` is told of."""
    return conn.execute(sa.select(node_state.c.version).where(node_state.c.id == 1)).scalar() or 0


def set_disabled(conn: sa.Connection, node_id: str, disabled: bool) -> bool:
    """Take a node out of (or back into) routing; False when there is no such node."""
    result = conn.execute(sa.update(nodes).where(nodes.c.id == node_id)
                          .values(disabled=disabled, updated_at=utcnow()))
    if result.rowcount > 0:
        bump_version(conn)
    return result.rowcount > 0


def load_nodes(conn: sa.Connection) -> list[sa.Row]:
    """Every node row, config, health and stats, ordered by id."""
    return list(conn.execute(sa.select(nodes).order_by(nodes.c.id)))

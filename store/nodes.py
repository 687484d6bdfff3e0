"""Node rows: the non-destructive config upsert, deletion and reads. Stats columns are the writer's alone.

The file's rule: the config fields a nodes file sets for a node are the file's (``file_fields``): every start
writes them again, and the admin page refuses to change them. The fields it leaves out, and ``disabled`` (state,
not config), are the page's: no start touches them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa

from store.records import NodeConfig, utcnow
from store.schema import client_keys, node_state, nodes
from store.upsert import upsert

# What a config file or the admin page may set. Stats, health and `disabled` are never in here.
CONFIG_COLUMNS = ("name", "base_url", "api_key", "weight", "updated_at", "formats", "models", "model_map",
                  "usage_probe", "auth_header")


def upsert_nodes(conn: sa.Connection, configs: Sequence[NodeConfig], origin: str = "file") -> None:
    """Insert new nodes and update the config of known ones; their stats stay untouched.

    ``origin`` 'file' (the nodes file) claims existing nodes too and writes only the fields each sets (its
    ``given``), recorded as the node's ``file_fields``; 'admin' (the admin page) writes every config field and
    claims the nodes no file names, so they route on every relay after restarts too.
    """
    now = utcnow()
    groups: dict[tuple[str, ...], list[dict]] = {}
    for c in configs:
        row = _row(c, now, origin)
        if origin == "file":
            row["file_fields"] = ",".join(file_fields(c))
            groups.setdefault((*file_fields(c), "updated_at", "origin", "file_fields"), []).append(row)
        else:
            groups.setdefault(CONFIG_COLUMNS, []).append(row)
    for update, rows in groups.items():
        upsert(conn, nodes, rows, update)
    if origin == "admin" and configs:
        conn.execute(sa.update(nodes).where(nodes.c.id.in_([c.id for c in configs]), nodes.c.file_fields.is_(None))
                     .values(origin="admin"))
    if configs:
        bump_version(conn)


def owned_fields(stored: str | None) -> list[str]:
    """The fields a node's or key's ``file_fields`` column names: its file's (none for one of the page's)."""
    return [f for f in (stored or "").split(",") if f]


def file_fields(config: NodeConfig) -> tuple[str, ...]:
    """The config columns a nodes file sets for this node, in table order."""
    return tuple(name for name in CONFIG_COLUMNS if name in config.given)


def _row(c: NodeConfig, now: object, origin: str) -> dict:
    return {"id": c.id, "name": c.name or c.id, "base_url": c.base_url, "api_key": c.api_key, "weight": c.weight,
            "updated_at": now, "origin": origin, "formats": ",".join(c.formats) or None,
            "models": json.dumps(list(c.models)) if c.models else None,
            "model_map": json.dumps(c.model_map, sort_keys=True) if c.model_map else None,
            "usage_probe": c.usage_probe, "auth_header": c.auth_header or None}


def release_unnamed(conn: sa.Connection, named: Sequence[str]) -> None:
    """The nodes a nodes file no longer names are no file's: their fields become the page's, and it may delete
    them (they keep their stats and get no calls until saved on the page)."""
    conn.execute(sa.update(nodes).where(nodes.c.file_fields.is_not(None), nodes.c.id.not_in(list(named)))
                 .values(file_fields=None))


class NodeInUse(Exception):
    """The node cannot go: a file names it, or a client key may use only it."""


def delete_node(conn: sa.Connection, node_id: str) -> bool:
    """Delete a node's row (its config, state and lifetime counters); its calls and their rollups keep its id.
    False: no such node. NodeInUse: the nodes file names it, or a key's ``nodes`` limit does."""
    row = conn.execute(sa.select(nodes.c.file_fields).where(nodes.c.id == node_id)).first()
    if row is None:
        return False
    if row.file_fields is not None:
        raise NodeInUse(f"node {node_id!r} is in the nodes file (codex_nodes): remove it there first, or the next "
                        "start of a relay adds it again")
    k = client_keys.c
    limited = [r.name for r in conn.execute(sa.select(k.name, k.nodes).where(k.nodes.is_not(None),
                                                                               k.revoked_at.is_(None)))
               if node_id in json.loads(r.nodes)]
    if limited:
        raise NodeInUse(f"node {node_id!r} is named in the nodes limit of key(s) {', '.join(limited)}: "
                        "change those first")
    conn.execute(sa.delete(nodes).where(nodes.c.id == node_id))
    bump_version(conn)
    return True


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

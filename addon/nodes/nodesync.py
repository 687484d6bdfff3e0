"""Node state shared live by every relay on one database.

A thread reads the node state version (``store.nodes.read_version``: one row, bumped in the transaction
of every node config, ``disabled`` or ``failed`` change) every ``interval`` seconds; when it moved, the
node rows are read again and applied to the pool in place: Node objects stay (calls in flight keep
reporting to them), stats columns are only read, never written.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import sqlalchemy as sa

from addon.nodes.health import Health
from addon.nodes.routing import Node, NodePool
from store.nodes import config_of, load_nodes, read_version
from store.periodic import Periodic

log = logging.getLogger("codex.nodesync")


class NodeSync:
    """Keeps ``pool_getter()`` in step with the database's nodes. ``file_ids``: the nodes this relay's
    nodes file names (they route, as do nodes added on an admin page); ``set_keys`` gets every routed
    node's key after a reload."""

    def __init__(self, engine: sa.Engine, pool_getter: Callable[[], NodePool], health: Health,
                 file_ids: Iterable[str], set_keys: Callable[[Iterable[str]], None], *,
                 version: int, rows: Iterable[sa.Row], interval: float = 1.0) -> None:
        self.engine = engine
        self.pool_getter = pool_getter
        self.health = health
        self.file_ids = frozenset(file_ids)
        self.set_keys = set_keys
        self.interval = interval
        self._version = version
        # `failed` as last read: only a change of the stored value moves a breaker, so this relay's own
        # breaker (ahead of its writer) is not overruled by the row it has not written yet.
        self._failed = {r.id: bool(r.failed) for r in rows}
        self._rounds = Periodic("codex-nodesync", interval, self.check, _check_failed)

    def check(self) -> bool:
        """Reload the nodes if the version moved; True when it did. Blocking: call it from a thread."""
        with self.engine.connect() as conn:
            version = read_version(conn)
            if version == self._version:
                return False
            rows = load_nodes(conn)
        self._version = version
        self.apply(rows)
        return True

    def apply(self, rows: Iterable[sa.Row]) -> None:
        pool = self.pool_getter()
        routed = {r.id: r for r in rows if r.id in self.file_ids or r.origin == "admin"}
        for node_id, row in routed.items():
            config, failed = config_of(row), bool(row.failed)
            node = pool.get(node_id)
            if node is None:
                pool.put(Node(config=config, breaker=self.health.restored(failed), disabled=bool(row.disabled)))
                log.info("node %s added by another relay", node_id)
                continue
            # ``websocket`` is the nodes file's alone, not a column: the node keeps what it was given.
            config = dataclasses.replace(config, websocket=node.config.websocket, given=node.config.given)
            if node.config != config:
                node.config = config
            node.disabled = bool(row.disabled)
            if self._failed.get(node_id, failed) != failed:
                if failed and not node.failed:
                    node.breaker.open(self.health.clock(), self.health.policy)
                    log.warning("node %s marked failed by another relay: out of rotation", node_id)
                elif not failed and node.failed:
                    node.breaker.close()
                    log.warning("node %s recovered on another relay: back in rotation", node_id)
        for node in pool:
            if node.id not in routed:
                pool.remove(node.id)
                log.info("node %s removed by another relay", node.id)
        self._failed = {node_id: bool(r.failed) for node_id, r in routed.items()}
        self.set_keys(n.config.api_key for n in pool)

    def start(self) -> None:
        if self.interval > 0:
            self._rounds.start()

    def stop(self) -> None:
        self._rounds.stop()


def _check_failed(e: Exception) -> None:  # the database away for a while: the next round tries again
    log.warning("node state check failed: %s", e)

"""The fleet: the configured nodes in the pool, kept in step with other relays on the database (``NodeSync``),
and edited at run time from the admin page."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from addon.nodes.health import Health
from addon.nodes.nodesync import NodeSync
from addon.nodes.routing import Node, NodePool, StickyMap
from addon.services.settings import SettingsError, seconds
from store.config import ConfigError, base_url_warnings, load_nodes_file, validate_base_url
from store.nodes import config_of, delete_node, load_nodes, read_version, release_unnamed, set_disabled, upsert_nodes
from store.records import NodeConfig

log = logging.getLogger("codex.runtime")


@dataclass(frozen=True, slots=True)
class FleetSettings:
    nodes: tuple[NodeConfig, ...]  # from codex_nodes, or the one codex_upstream node; none: monitor mode
    sticky_ttl: float
    sync_interval: float


def fleet_settings(options: Any) -> FleetSettings:
    """``codex_nodes`` (or ``codex_upstream``, ``codex_upstream_key``, ``codex_upstream_name``),
    ``codex_sticky_ttl`` and ``codex_node_sync``."""
    sticky_ttl = seconds("codex_sticky_ttl", options.codex_sticky_ttl)
    sync_interval = seconds("codex_node_sync", options.codex_node_sync)
    return FleetSettings(_configured_nodes(options), sticky_ttl, sync_interval)


def _configured_nodes(options: Any) -> tuple[NodeConfig, ...]:
    if options.codex_nodes:
        try:
            return tuple(load_nodes_file(options.codex_nodes))
        except ConfigError as e:
            raise SettingsError(f"codex_nodes: {e}") from None
    if options.codex_upstream:
        problem = validate_base_url(options.codex_upstream)
        if problem:
            raise SettingsError(f"codex_upstream: {problem}")
        return (NodeConfig(id="default", name=options.codex_upstream_name or "default",
                           base_url=options.codex_upstream, api_key=options.codex_upstream_key, weight=1),)
    return ()


class Fleet:
    """The node pool; ``set_node_keys`` learns every routed node's key (``KnownSecrets``)."""

    def __init__(self, health: Health, set_node_keys: Callable[[Iterable[str]], None]) -> None:
        self.pool = NodePool()
        self.health = health
        self._set_node_keys = set_node_keys
        self._engine: sa.Engine | None = None
        self._node_sync: NodeSync | None = None

    def apply(self, settings: FleetSettings, engine: sa.Engine) -> None:
        """Upsert the configured nodes into ``engine`` (stats are never touched) and route over them."""
        self._engine = engine
        configs = list(settings.nodes)
        with engine.begin() as conn:
            if configs:
                upsert_nodes(conn, configs)
                release_unnamed(conn, [c.id for c in configs])
            stored = load_nodes(conn)
            version = read_version(conn)
        failed = {r.id: bool(r.failed) for r in stored}
        disabled = {r.id for r in stored if r.disabled}
        # A file node routes as stored: the fields its file leaves out are the page's (store.nodes).
        rows = {r.id: r for r in stored}
        configs = [dataclasses.replace(config_of(rows[c.id]), websocket=c.websocket, given=c.given) for c in configs]
        # The configured nodes route, and those added on the admin page; others in the DB (dropped from
        # the file) keep their stats but get no traffic. A node failed before a restart starts with its
        # first cooldown, then gets its trial call; a disabled one stays out.
        named = {c.id for c in configs}
        configs = configs + [config_of(r) for r in stored if r.origin == "admin" and r.id not in named]
        nodes = [Node(config=c, breaker=self.health.restored(failed.get(c.id, False)), disabled=c.id in disabled)
                 for c in configs]
        for c in configs:
            for warning in base_url_warnings(c.base_url):
                log.warning("node %s: %s", c.id, warning)
        self.pool = NodePool(nodes, sticky=StickyMap.for_ttl(settings.sticky_ttl))
        self._set_node_keys(n.config.api_key for n in nodes)
        if self._node_sync is not None:
            self._node_sync.stop()
        self._node_sync = NodeSync(engine, lambda: self.pool, self.health, named, self._set_node_keys,
                                   version=version, rows=stored, interval=settings.sync_interval)
        self._node_sync.start()
        if nodes:
            log.info("routing over %d node(s): %s", len(nodes), ", ".join(
                f"{n.id} (weight {n.config.weight}{', failed' if n.failed else ''}"
                f"{', disabled' if n.disabled else ''})" for n in nodes))
        else:
            log.info("no upstream node configured: monitor mode (traffic passes through unchanged)")

    def update_node(self, config: NodeConfig) -> None:
        """Add or edit a node at run time (admin page): the same non-destructive upsert as at start.

        Blocking DB work: call it off the event loop.
        """
        assert self._engine is not None
        with self._engine.begin() as conn:
            upsert_nodes(conn, [config], origin="admin")
            disabled = any(r.id == config.id and r.disabled for r in load_nodes(conn))
        current = self.pool.get(config.id)
        if current is None:
            self.pool.put(Node(config=config, disabled=disabled))
        else:  # in place: calls in flight hold this object and report its health to it; websocket is the file's
            current.config = dataclasses.replace(config, websocket=current.config.websocket)
            current.disabled = disabled
        self._set_node_keys(n.config.api_key for n in self.pool)

    def delete_node(self, node_id: str) -> bool:
        """Delete a node (admin page): out of routing here at once, on other relays at their next node sync.
        False: no such node; ``store.nodes.NodeInUse``: it may not go.

        Blocking DB work: call it off the event loop.
        """
        assert self._engine is not None
        with self._engine.begin() as conn:
            if not delete_node(conn, node_id):
                return False
        self.pool.remove(node_id)
        self._set_node_keys(n.config.api_key for n in self.pool)
        return True

    def set_node_disabled(self, node_id: str, disabled: bool) -> bool:
        """Take a node out of routing, or put it back (admin page); its stats stay. False: no such node.

        Blocking DB work: call it off the event loop.
        """
        assert self._engine is not None
        with self._engine.begin() as conn:
            if not set_disabled(conn, node_id, disabled):
                return False
        current = self.pool.get(node_id)
        if current is not None:
            current.disabled = disabled
            if not disabled:  # enable is also the way to clear a failed node at once
                self.health.reset(current)
        return True

    def stop(self) -> None:
        if self._node_sync is not None:
            self._node_sync.stop()

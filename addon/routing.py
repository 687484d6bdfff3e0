"""Node pool: weighted choice among healthy nodes, sticky sessions, URL and key rewriting.

Plain Python (no mitmproxy) so it is tested directly.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass

from store.records import NodeConfig


@dataclass(slots=True)
class Node:
    """A node as the router sees it: its config plus in-memory health."""

    config: NodeConfig
    failed: bool = False
    fail_streak: int = 0
    disabled: bool = False  # switched off on the admin page: still pinged and shown, never chosen

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def eligible(self) -> bool:
        return not self.failed and not self.disabled and self.config.weight > 0


def join_url(base_url: str, client_path: str) -> str:
    """Where a client path goes on a node.

    The client talks to the relay as if it were an OpenAI-style base URL ending in ``/v1``; the node's
    ``base_url`` is what you would give an SDK (it includes its own version prefix). So a leading
    ``/v1`` of the client path is dropped and the rest is appended to the node's base URL:
    ``/v1/responses`` on ``https://h/openai/v1`` → ``https://h/openai/v1/responses``. A path without a
    ``/v1`` prefix is appended whole. The query string is kept.
    """
    path, sep, query = client_path.partition("?")
    if path == "/v1" or path.startswith("/v1/"):
        path = path[3:]
    url = base_url.rstrip("/") + path
    return url + sep + query


def set_upstream_key(headers: MutableMapping[str, str], api_key: str) -> None:
    """Replace the client's credentials with the node's: OpenAI bearer and Anthropic x-api-key."""
    if "x-api-key" in headers:
        headers["x-api-key"] = api_key
    if "authorization" in headers or "x-api-key" not in headers:
        headers["authorization"] = f"Bearer {api_key}"


class StickyMap:
    """A bounded, expiring session → node map (LRU order, oldest evicted first)."""

    def __init__(self, max_entries: int = 10_000, ttl: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._map: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key: str) -> str | None:
        entry = self._map.get(key)
        if entry is None:
            return None
        node_id, expires = entry
        if expires < self._clock():
            del self._map[key]
            return None
        return node_id

    def put(self, key: str, node_id: str) -> None:
        self._map[key] = (node_id, self._clock() + self.ttl)
        self._map.move_to_end(key)
        while len(self._map) > self.max_entries:
            self._map.popitem(last=False)

    def __len__(self) -> int:
        return len(self._map)


class NodePool:
    """The configured nodes and the choice among them."""

    def __init__(self, nodes: Iterable[Node] = (), *, rng: random.Random | None = None,
                 sticky: StickyMap | None = None) -> None:
        self._nodes: dict[str, Node] = {n.id: n for n in nodes}
        self._rng = rng or random.Random()
        self.sticky = sticky or StickyMap()
        # Admin edits and pings run off the event loop; choices must see a consistent set.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self):
        return iter(list(self._nodes.values()))

    def get(self, node_id: str) -> Node | None:
        return self._nodes.get(node_id)

    def put(self, node: Node) -> None:
        with self._lock:
            self._nodes[node.id] = node

    def choose(self, *, exclude: Iterable[str] = (), session_key: str | None = None) -> Node | None:
        """A healthy node with weight > 0, by weight; the session's node while it stays healthy."""
        excluded = set(exclude)
        if session_key:
            sticky_id = self.sticky.get(session_key)
            node = self._nodes.get(sticky_id) if sticky_id else None
            if node is not None and node.eligible and node.id not in excluded:
                return node
        with self._lock:
            candidates = [n for n in self._nodes.values() if n.eligible and n.id not in excluded]
        if not candidates:
            return None
        total = sum(n.config.weight for n in candidates)
        point = self._rng.random() * total
        chosen = candidates[-1]
        for n in candidates:
            point -= n.config.weight
            if point < 0:
                chosen = n
                break
        if session_key:
            self.sticky.put(session_key, chosen.id)
        return chosen

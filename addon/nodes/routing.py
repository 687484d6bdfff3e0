"""Node pool: weighted choice among healthy nodes, breaker trials, sticky sessions, URL and key rewriting.

Plain Python (no mitmproxy) so it is tested directly.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from addon.nodes.breaker import Breaker
from addon.nodes.modelroute import serves
from store.records import NodeConfig


@dataclass(slots=True)
class Node:
    """A node as the router sees it: its config plus in-memory health."""

    config: NodeConfig
    breaker: Breaker = field(default_factory=Breaker)
    disabled: bool = False  # switched off on the admin page: still pinged and shown, never chosen

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def failed(self) -> bool:
        return self.breaker.is_open

    @property
    def routable(self) -> bool:
        """May get calls at all: enabled and with weight."""
        return not self.disabled and self.config.weight > 0

    @property
    def eligible(self) -> bool:
        """In full rotation: routable and its breaker closed."""
        return self.routable and not self.failed


class StickyMap:
    """A bounded, expiring session → node map (LRU order, oldest evicted first)."""

    def __init__(self, max_entries: int = 10_000, ttl: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._map: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @classmethod
    def for_ttl(cls, ttl: float) -> StickyMap:
        """The map of ``codex_sticky_ttl`` = ``ttl`` seconds; 0: one that keeps nothing (no stickiness)."""
        return cls(ttl=ttl) if ttl else cls(max_entries=0)

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
                 sticky: StickyMap | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._nodes: dict[str, Node] = {n.id: n for n in nodes}
        self._rng = rng or random.Random()
        # Not `sticky or …`: an empty map is falsy (it has a length), and codex_sticky_ttl was ignored so.
        self.sticky = sticky if sticky is not None else StickyMap()
        self._clock = clock  # the clock of the breakers' cooldowns (Health's)
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

    def remove(self, node_id: str) -> None:
        with self._lock:
            self._nodes.pop(node_id, None)

    def serves_any(self, api_format: str | None, model: str | None, exclude: Iterable[str] = ()) -> bool:
        """Whether any configured node but ``exclude``, in rotation or not, can serve this format and model."""
        excluded = set(exclude)
        return any(n.id not in excluded and serves(n.config, api_format, model) for n in self)

    def cooldown_left(self, *, exclude: Iterable[str] = (), api_format: str | None = None,
                      model: str | None = None) -> float | None:
        """For a call ``choose`` found no node for: seconds until one of the nodes that may serve it is due for
        a trial (0: one is due, its trial is out); None when none may serve it at all (disabled, weight 0)."""
        excluded = set(exclude)
        now = self._clock()
        with self._lock:
            ends = [n.breaker.until for n in self._nodes.values()
                    if n.routable and n.failed and n.id not in excluded and serves(n.config, api_format, model)]
        return max(0.0, min(ends) - now) if ends else None

    def choose(self, *, exclude: Iterable[str] = (), session_key: str | None = None,
               holder: object | None = None, api_format: str | None = None,
               model: str | None = None) -> Node | None:
        """A node for a call, never a disabled one, one of weight 0 or one that does not serve the
        call's ``api_format`` and ``model`` (addon.nodes.modelroute). In this order:

        the session's node while its breaker is closed; an open node whose cooldown is over, as its
        one trial; a closed node by weight. A trial is held by ``holder`` (the call) until the call reports
        to Health; when every node is open and none is due, a call with a holder gets no node (its refusal is
        no attempt of a node: ``cooldown_left`` says how long), one without a holder (it reports nothing, so
        takes no trial) the node whose cooldown ends first.
        """
        excluded = set(exclude)
        if session_key:
            sticky_id = self.sticky.get(session_key)
            node = self._nodes.get(sticky_id) if sticky_id else None
            if (node is not None and node.eligible and node.id not in excluded
                    and serves(node.config, api_format, model)):
                return node
        now = self._clock()
        with self._lock:
            usable = [n for n in self._nodes.values()
                      if n.routable and n.id not in excluded and serves(n.config, api_format, model)]
        opened = sorted((n for n in usable if n.failed), key=lambda n: n.breaker.until)
        chosen = None
        if holder is not None:
            chosen = next((n for n in opened if n.breaker.claim(holder, now)), None)
        if chosen is None:
            chosen = self._weighted([n for n in usable if not n.failed])
        if chosen is None and opened and holder is None:
            chosen = opened[0]
        if chosen is not None and session_key:
            self.sticky.put(session_key, chosen.id)
        return chosen

    def _weighted(self, candidates: list[Node]) -> Node | None:
        if not candidates:
            return None
        total = sum(n.config.weight for n in candidates)
        point = self._rng.random() * total
        for n in candidates:
            point -= n.config.weight
            if point < 0:
                return n
        return candidates[-1]

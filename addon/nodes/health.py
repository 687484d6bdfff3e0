"""Node health: each node's circuit breaker driven by call outcomes, and health pings.

The in-memory breaker decides routing at once; opening and closing are also queued to the writer so
the database (shared by several relays) keeps `failed` and `last_error`, and pings keep their columns.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from addon.nodes.breaker import Breaker, BreakerPolicy
from addon.nodes.nodeurl import key_header, node_url
from addon.nodes.routing import Node, NodePool
from store.periodic import Periodic
from store.records import NodeStateUpdate

log = logging.getLogger("codex.health")

Submit = Callable[[NodeStateUpdate], None]


class Health:
    """Applies call outcomes to the nodes' breakers (``policy``) and persists opening and closing."""

    def __init__(self, submit: Submit, policy: BreakerPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.submit = submit
        self.policy = policy or BreakerPolicy()
        self.clock = clock

    def failure(self, node: Node, error: str, rest: float = 0.0) -> None:
        """A failed call of ``node``; ``rest``: the seconds its answer asked to be left alone (capped at the
        longest cooldown), see ``Breaker.failure``."""
        b = node.breaker
        now = self.clock()
        if not b.failure(now, self.policy, min(rest, self.policy.cooldown_max)):
            return
        cooldown = b.until - now
        if b.openings == 1:
            log.warning("node %s out of rotation after %d failure(s) in a row (%s%s): one trial call in %g s",
                        node.id, b.streak, error, ", it asked for a pause" if rest > 0 else "", cooldown)
            self.submit(NodeStateUpdate(node.id, failed=True, last_error=error[:1000]))
        else:
            log.warning("node %s failed its trial call (%s): next trial in %g s", node.id, error, cooldown)

    def success(self, node: Node) -> None:
        if node.breaker.close():
            log.warning("node %s: a call succeeded, back in rotation", node.id)
            self.submit(NodeStateUpdate(node.id, failed=False))

    def release(self, node: Node, holder: object) -> None:
        """A call that ended neither way (client abort, client error): its trial, if any, is free again."""
        node.breaker.release(holder)

    def reset(self, node: Node) -> None:
        """Admin enable: closed, streak 0, and `failed` cleared in the database."""
        node.breaker.close()
        self.submit(NodeStateUpdate(node.id, failed=False))

    def restored(self, failed: bool) -> Breaker:
        """The breaker of a node as the database left it: a failed node starts open, first cooldown."""
        breaker = Breaker()
        if failed:
            breaker.open(self.clock(), self.policy)
        return breaker

    def ping_answered(self, node: Node) -> None:
        if node.breaker.ping_answered(self.clock()):
            log.warning("node %s answers its health ping: its next call is a trial", node.id)


def ping(node: Node, path: str, timeout: float) -> tuple[int, str | None]:
    """One health request to the node: (elapsed ms, error or None). Blocking: call it from a thread."""
    url = node_url(node.config.base_url, path)
    name, value = key_header(node.config)
    req = urllib.request.Request(url, headers={name: value, "user-agent": "codex-relay-ping"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - node URLs are http(s)
            resp.read(65536)
            err = None
    except urllib.error.HTTPError as e:
        err = f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        err = f"{e.__class__.__name__}: {getattr(e, 'reason', e)}"
    return round((time.perf_counter() - start) * 1000), err


class Pinger:
    """A thread that pings every node each ``interval`` seconds; an answer may end a node's cooldown
    (so its next call is a trial) but never puts it back into rotation: GET /models can answer while
    calls fail."""

    def __init__(self, pool_getter: Callable[[], NodePool], health: Health, *, interval: float,
                 path: str = "/models", timeout: float = 10.0) -> None:
        self.pool_getter = pool_getter
        self.health = health
        self.interval = interval
        self.path = path
        self.timeout = timeout
        self._rounds = Periodic("codex-pinger", interval, self.ping_once, _ping_round_failed,
                                join_timeout=timeout + 5)

    def ping_once(self) -> None:
        for node in self.pool_getter():
            ms, err = ping(node, self.path, self.timeout)
            if err is None:
                self.health.ping_answered(node)
            self.health.submit(NodeStateUpdate(node.id, pinged=True, last_ping_ms=ms, last_ping_err=err))

    def start(self) -> None:
        if self.interval > 0:
            self._rounds.start()

    def stop(self) -> None:
        self._rounds.stop()


def _ping_round_failed(e: Exception) -> None:  # a ping bug must not end the pinging
    log.error("health ping round failed", exc_info=e)

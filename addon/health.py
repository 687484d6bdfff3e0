"""Node health: failure streaks, the failed flag, and health pings that bring nodes back.

The in-memory state decides routing at once; every change is also queued to the writer so the
database (shared by several relays) keeps `failed`, `last_error` and the ping columns.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from addon.routing import Node, NodePool, join_url
from store.records import NodeStateUpdate

log = logging.getLogger("codex.health")

Submit = Callable[[NodeStateUpdate], None]


class Health:
    """Applies attempt outcomes to nodes: ``threshold`` failures in a row take a node out."""

    def __init__(self, submit: Submit, threshold: int = 3) -> None:
        self.submit = submit
        self.threshold = threshold

    def failure(self, node: Node, error: str) -> None:
        node.fail_streak += 1
        if not node.failed and self.threshold and node.fail_streak >= self.threshold:
            node.failed = True
            log.warning("node %s marked failed after %d failures in a row: %s", node.id, node.fail_streak, error)
            self.submit(NodeStateUpdate(node.id, failed=True, last_error=error[:1000]))

    def success(self, node: Node) -> None:
        node.fail_streak = 0


def ping(node: Node, path: str, timeout: float) -> tuple[int, str | None]:
    """One health request to the node: (elapsed ms, error or None). Blocking: call it from a thread."""
    url = join_url(node.config.base_url, path)
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {node.config.api_key}",
                                               "user-agent": "codex-relay-ping"})
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
    """A thread that pings every node each ``interval`` seconds and restores failed nodes that answer."""

    def __init__(self, pool_getter: Callable[[], NodePool], submit: Submit, *, interval: float,
                 path: str = "/models", timeout: float = 10.0) -> None:
        self.pool_getter = pool_getter
        self.submit = submit
        self.interval = interval
        self.path = path
        self.timeout = timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ping_once(self) -> None:
        for node in self.pool_getter():
            ms, err = ping(node, self.path, self.timeout)
            update = NodeStateUpdate(node.id, pinged=True, last_ping_ms=ms, last_ping_err=err)
            if err is None and node.failed:
                node.failed = False
                node.fail_streak = 0
                update.failed = False
                log.warning("node %s answers its health ping again: back in rotation", node.id)
            self.submit(update)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.ping_once()
            except Exception:  # a ping bug must not end the pinging
                log.exception("health ping round failed")

    def start(self) -> None:
        if self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="codex-pinger", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)
            self._thread = None

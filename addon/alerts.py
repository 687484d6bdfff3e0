"""Alerts: webhooks told when a node fails or recovers, every node is down, the writer journals (the
database is unreachable) or recovers, its process stalls, or records are lost.

A watcher thread compares the live state (the node pool's breakers, the writer's stats) every
``interval`` seconds and queues an alert for each change; a sender thread posts them to the
``[[webhooks]]`` of the nodes file (``url``, ``format = "json" | "slack"``, ``events``), each with a
timeout and a few retries. Neither ever runs on the proxy's event loop; the queue is bounded (an
alert that does not fit is logged and dropped). One event per subject (a node, or the relay) is sent
at most once per ``dedup`` seconds. Payloads name nodes by id and carry no key or upstream text.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from addon.routing import NodePool
from store.config import ConfigError, load_toml
from store.periodic import Periodic
from store.writer import WriterStats

log = logging.getLogger("codex.alerts")

EVENTS = ("node_failed", "node_recovered", "all_nodes_down", "writer_journaling", "writer_recovered",
          "writer_stalled", "records_lost", "key_budget_reached")
FORMATS = ("json", "slack")
RELAY = "relay"  # the subject of events about the relay as a whole


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    format: str = "json"
    events: frozenset[str] = frozenset(EVENTS)


@dataclass(frozen=True, slots=True)
class Alert:
    event: str
    subject: str  # a node id, or RELAY
    message: str
    at: dt.datetime


def webhooks_from_file(path: str) -> list[Webhook]:
    """The ``[[webhooks]]`` of a TOML file (none: an empty list); raises ConfigError."""
    items = load_toml(path).get("webhooks", [])
    if not isinstance(items, list):
        raise ConfigError(f"{path}: webhooks must be an array of tables ([[webhooks]])")
    hooks = []
    for i, item in enumerate(items):
        where = f"{path}: webhooks[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: must be a table")
        unknown = set(item) - {"url", "format", "events"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        url = item.get("url")
        # Not echoed: a Slack webhook's URL is its secret.
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ConfigError(f"{where}: url must be an http:// or https:// URL")
        fmt = item.get("format", "json")
        if fmt not in FORMATS:
            raise ConfigError(f"{where}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        events = item.get("events", list(EVENTS))
        if not isinstance(events, list) or not set(events) <= set(EVENTS) or not events:
            raise ConfigError(f"{where}: events must be a non-empty list of {', '.join(EVENTS)}")
        hooks.append(Webhook(url=url, format=fmt, events=frozenset(events)))
    return hooks


def payload(hook: Webhook, alert: Alert) -> bytes:
    """The body posted to ``hook``: a JSON object, or a Slack incoming-webhook message."""
    if hook.format == "slack":
        return json.dumps({"text": f"codex-relay {alert.event}: {alert.message}"}).encode()
    return json.dumps({"source": "codex-relay", "event": alert.event, "subject": alert.subject,
                       "message": alert.message, "time": alert.at.isoformat() + "Z"}).encode()


class Alerts:
    """The watcher and the sender. ``check`` is one watch round (the watcher thread calls it)."""

    def __init__(self, hooks: Iterable[Webhook], pool: Callable[[], NodePool],
                 writer: Callable[[], WriterStats | None], *, dedup: float = 300.0, interval: float = 1.0,
                 timeout: float = 5.0, retries: int = 3, retry_pause: float = 2.0, max_queued: int = 100,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hooks = list(hooks)
        self._pool, self._writer = pool, writer
        self.dedup, self.interval, self.timeout, self.retries = dedup, interval, timeout, retries
        self.retry_pause = retry_pause  # doubled after each failed attempt
        self._clock = clock
        self._queue: queue.Queue[tuple[Webhook, Alert]] = queue.Queue(max_queued)
        self._sent_at: dict[tuple[str, str], float] = {}
        self._failed: set[str] = set()
        self._all_down = False
        self._db_ok = True
        self._lost = 0
        self._stalls = 0
        self._rounds = Periodic("codex-alert-watch", interval, self.check, _check_failed, join_timeout=timeout + 5)
        self._stop = self._rounds.stopping  # set by stop(): it also ends the sender and its retry waits
        self._sender = threading.Thread(target=self._send_loop, name="codex-alert-send", daemon=True)

    def start(self) -> None:
        self._rounds.start()
        self._sender.start()

    def stop(self) -> None:
        """End both threads; alerts still queued are dropped (at most one post in progress is awaited)."""
        self._rounds.stop()
        self._sender.join(self.timeout + 5)

    # -- the watcher -------------------------------------------------------------------------------
    def check(self) -> None:
        """Compare the state with the last round's and alert each change."""
        nodes = list(self._pool())
        failed = {n.id for n in nodes if n.failed}
        for node_id in sorted(failed - self._failed):
            self.notify("node_failed", node_id, f"node {node_id} is out of rotation after failing")
        for node_id in sorted(self._failed - failed):
            if self._pool().get(node_id) is not None:  # gone from the pool is not a recovery
                self.notify("node_recovered", node_id, f"node {node_id} is back in rotation")
        self._failed = failed
        routable = [n for n in nodes if n.routable]
        all_down = bool(routable) and all(n.failed for n in routable)
        if all_down and not self._all_down:
            self.notify("all_nodes_down", RELAY, f"all {len(routable)} routable nodes are failed")
        self._all_down = all_down
        stats = self._writer()
        if stats is None:
            return
        if self._db_ok and not stats.db_ok:
            self.notify("writer_journaling", RELAY, f"records do not reach the stats database "
                        f"({stats.last_error or 'unreachable'}): {stats.spooled} record(s) journaled")
        elif stats.db_ok and not self._db_ok:
            self.notify("writer_recovered", RELAY, "the stats database is reachable again")
        if stats.lost > self._lost:
            self.notify("records_lost", RELAY, f"{stats.lost - self._lost} record(s) lost, neither written "
                        f"nor journaled ({stats.lost} since start)")
        if stats.stalls > self._stalls:
            self.notify("writer_stalled", RELAY, f"the writer process stalled and was replaced ({stats.stalls} since "
                        "start); the records it had not written went to the relay's journal")
        self._db_ok, self._lost, self._stalls = stats.db_ok, stats.lost, stats.stalls

    def notify(self, event: str, subject: str, message: str) -> None:
        """Queue ``event`` for the webhooks that want it, unless sent for ``subject`` within ``dedup``."""
        now = self._clock()
        last = self._sent_at.get((event, subject))
        if last is not None and now - last < self.dedup:
            log.debug("alert %s for %s suppressed (sent %.0f s ago)", event, subject, now - last)
            return
        self._sent_at[(event, subject)] = now
        alert = Alert(event, subject, message, dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0))
        for hook in self.hooks:
            if event in hook.events:
                try:
                    self._queue.put_nowait((hook, alert))
                except queue.Full:
                    log.error("alert queue full: %s for %s not sent to %s", event, subject, _where(hook))

    # -- the sender --------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._send(*item)

    def _send(self, hook: Webhook, alert: Alert) -> bool:
        body = payload(hook, alert)
        for attempt in range(1, self.retries + 1):
            req = urllib.request.Request(hook.url, data=body, method="POST",
                                         headers={"content-type": "application/json",
                                                  "user-agent": "codex-relay-alerts"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - http(s) only
                    resp.read(65536)
                return True
            except (OSError, ValueError) as e:
                log.warning("alert %s to %s failed (attempt %d of %d): %s", alert.event, _where(hook), attempt,
                            self.retries, e)
            if attempt < self.retries and self._stop.wait(min(self.retry_pause * 2 ** (attempt - 1), 30.0)):
                break
        log.error("alert %s for %s not delivered to %s", alert.event, alert.subject, _where(hook))
        return False


def _check_failed(e: Exception) -> None:  # a bug here must not end the watching
    log.error("alert check failed", exc_info=e)


def _where(hook: Webhook) -> str:
    """The webhook's scheme and host only: a Slack URL's path is its secret."""
    scheme, _, rest = hook.url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"

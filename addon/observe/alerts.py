"""Alerts: webhooks told when a node fails or recovers, no node in rotation can serve a format and model
pattern (or every node is down), the writer journals (the database is unreachable) or recovers, its process
stalls, records are lost, or a client key reaches its budget.

A watcher thread looks at the state every ``interval`` seconds and queues an alert for each change it is
to tell (``addon.observe.alertrules``: bad news always, good news held back while a subject flaps); a sender thread
posts them to the ``[[webhooks]]`` of the nodes file (``url``, ``format = "json" | "slack"``, ``events``),
each with a timeout and a few retries. Neither ever runs on the proxy's event loop; the queue is bounded
(an alert that does not fit is logged and dropped).

With a database (``engine``), the nodes are watched as the database has them, and each change is claimed
in its ``alert_state`` ledger (``store.alertstate``) before it is sent: relays sharing the database send
one alert per event, and a restarted relay does not repeat what the ledger says was told. While the
database does not answer, this relay's own view is told instead (with no claim). The writer's events are
this relay's own; a key's budget is the fleet's (claimed once per ``dedup`` window). Payloads name the
relay that sent them, and nodes and keys by id; they carry no key or upstream text.
"""

from __future__ import annotations

import collections
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

import sqlalchemy as sa

from addon.nodes.routing import NodePool
from addon.observe.alertrules import RELAY, NodeStatus, Watch, all_nodes_watch, changed, due, node_watches, told
from store.alertstate import Announced, claim, read_announced
from store.config import ConfigError, load_toml
from store.nodes import config_of, load_nodes, read_version
from store.periodic import Periodic
from store.write.writer import WriterStats

log = logging.getLogger("codex.alerts")

EVENTS = ("node_failed", "node_recovered", "all_nodes_down", "no_node_serves", "serving_again", "writer_journaling",
          "writer_recovered", "writer_stalled", "records_lost", "key_budget_reached",
          "key_budget_warning")
FORMATS = ("json", "slack")
# Events ``notify`` gets about something the relays share: one relay sends each (claimed in the ledger).
FLEET_EVENTS = frozenset({"key_budget_reached", "key_budget_warning"})


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    format: str = "json"
    events: frozenset[str] = frozenset(EVENTS)


@dataclass(frozen=True, slots=True)
class Alert:
    event: str
    subject: str  # a node id, a format and model pattern, a key name, or RELAY
    message: str
    at: dt.datetime
    relay: str = ""  # the relay that sends it ("": unnamed)


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
        relay = f" {alert.relay}" if alert.relay else ""
        return json.dumps({"text": f"codex-relay{relay} {alert.event}: {alert.message}"}).encode()
    return json.dumps({"source": "codex-relay", "event": alert.event, "subject": alert.subject,
                       "message": alert.message, "time": alert.at.isoformat() + "Z", "relay": alert.relay}).encode()


class Alerts:
    """The watcher and the sender. ``check`` is one watch round (the watcher thread calls it).

    ``engine``: the database the relays share (None: this relay's view alone, told without claims);
    ``relay``: this relay's name in payloads and the ledger; ``dedup``: the seconds good news of one subject
    is held back after the last (``addon.observe.alertrules``), and within which one ``notify`` event is sent once
    per subject."""

    def __init__(self, hooks: Iterable[Webhook], pool: Callable[[], NodePool],
                 writer: Callable[[], WriterStats | None], *, engine: sa.Engine | None = None, relay: str = "",
                 dedup: float = 300.0, interval: float = 1.0, timeout: float = 5.0, retries: int = 3,
                 retry_pause: float = 2.0, max_queued: int = 100, clock: Callable[[], float] = time.time) -> None:
        self.hooks = list(hooks)
        self._pool, self._writer, self._engine, self.relay = pool, writer, engine, relay
        self.dedup, self.interval, self.timeout, self.retries = dedup, interval, timeout, retries
        self.retry_pause = retry_pause  # doubled after each failed attempt
        self._clock = clock  # wall time: the ledger's times are compared across relays
        self._queue: queue.Queue[tuple[Webhook, Alert]] = queue.Queue(max_queued)
        self._sent_at: dict[tuple[str, str], float] = {}
        # What was told, as far as this relay knows: the ledger's last read plus its own announcements (the
        # nodes' while the database is away), and the writer's, which are this relay's alone.
        self._told: dict[str, Announced] = {}
        self._writer_told: dict[str, Announced] = {}
        self._version: int | None = None  # the node state version of the last fleet round
        self._held = False  # good news held back: the next fleet round looks again though nothing moved
        self._db_ok = True  # the last fleet round reached the database
        self._fleet_events: collections.deque[tuple[str, str, str, int | None]] = collections.deque()  # to claim
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
        """Tell what changed since the last round: the nodes, the writer, and claim the fleet events."""
        now = self._clock()
        if self._engine is None or not self._fleet_round(self._engine, now):
            statuses = [NodeStatus(n.config, n.failed, n.routable) for n in self._pool()]
            self._tell(statuses, now, None)
        self._check_writer(now)
        self._claim_fleet_events(now)

    def _fleet_round(self, engine: sa.Engine, now: float) -> bool:
        """The nodes as the database has them, each change claimed before it is told; False when the
        database did not answer (then the caller tells this relay's own view)."""
        try:
            with engine.connect() as conn:
                version = read_version(conn)
                if version == self._version and not self._held:
                    return True
                rows, told_before = load_nodes(conn), read_announced(conn)
        except sa.exc.SQLAlchemyError as e:
            if self._db_ok:
                log.warning("alerts: the database does not answer (%s): this relay's own view of the nodes is "
                            "told, unclaimed, until it does", e.__class__.__name__)
            self._db_ok, self._version = False, None
            return False
        self._db_ok = True
        routed = {n.id for n in self._pool()}  # the nodes this relay routes (its nodes file, admin-added)
        statuses = [NodeStatus(config_of(r), bool(r.failed), not r.disabled and r.weight > 0)
                    for r in rows if r.id in routed]
        self._told = told_before
        self._tell(statuses, now, version)
        self._version = version
        return True

    def _tell(self, statuses: list[NodeStatus], now: float, version: int | None) -> None:
        """Tell each change of the nodes that is due, by what ``_told`` says was told; ``version`` None: no claim."""
        held = False
        for watch in node_watches(statuses):
            held |= self._tell_one(watch, now, version)
        every = all_nodes_watch(statuses, self._told)
        if every is not None:
            self._tell_one(every, now, version)
        self._held = held

    def _tell_one(self, watch: Watch, now: float, version: int | None) -> bool:
        """Send ``watch`` if due; True when it changed but is held back."""
        last = self._told.get(watch.key)
        if not due(watch, last, now, self.dedup):
            return changed(watch, last)
        entry = told(watch, last, version or 0, now)
        # Claimed first: a lost claim is recorded too (another relay told it); a silent one is only recorded.
        if (version is None or self._claim(watch.key, entry, now)) and watch.event is not None:
            self._emit(watch.event, watch.subject, watch.message)
        self._told[watch.key] = entry  # claimed here or by another relay: told either way
        return False

    def _claim(self, subject: str, entry: Announced, now: float) -> bool:
        assert self._engine is not None
        try:
            return claim(self._engine, subject, entry, self.relay, now)
        except sa.exc.SQLAlchemyError as e:  # better told by two relays than by none
            log.warning("alerts: %s not claimed (%s): sent unclaimed", subject, e.__class__.__name__)
            return True

    def _check_writer(self, now: float) -> None:
        stats = self._writer()
        if stats is None:
            return
        if stats.db_ok:
            event, message = "writer_recovered", "the stats database is reachable again"
        else:
            error = stats.last_error or "unreachable"
            event, message = "writer_journaling", (f"records do not reach the stats database ({error}): "
                                                   f"{stats.spooled} record(s) journaled")
        journaling = Watch("writer", RELAY, not stats.db_ok, event, message)
        last = self._writer_told.get("writer")
        if due(journaling, last, now, self.dedup):
            self._writer_told["writer"] = told(journaling, last, 0, now)
            self._emit(event, RELAY, message)
        if stats.lost > self._lost:
            self.notify("records_lost", RELAY, f"{stats.lost - self._lost} record(s) lost, neither written "
                        f"nor journaled ({stats.lost} since start)")
        if stats.stalls > self._stalls:
            self.notify("writer_stalled", RELAY, f"the writer process stalled and was replaced ({stats.stalls} since "
                        "start); the records it had not written went to the relay's journal")
        self._lost, self._stalls = stats.lost, stats.stalls

    def _claim_fleet_events(self, now: float) -> None:
        """Claim each fleet event ``notify`` queued for its window (its own, else the ``dedup`` window): the relay
        that lands it sends it."""
        while self._fleet_events:
            event, subject, message, window = self._fleet_events.popleft()
            if window is None:
                window = int(now // max(self.dedup, 1.0))
            if self._claim(f"{event}:{subject}"[:200], Announced(True, window), now):
                self._emit(event, subject, message)

    def notify(self, event: str, subject: str, message: str, window: int | None = None) -> None:
        """Queue ``event`` for the webhooks that want it, unless sent for ``subject`` within ``dedup``.

        Cheap and non-blocking (the event loop calls it): a fleet event waits for the watcher's next round,
        which claims it in the database, once per ``window`` (a number that grows with each new one, e.g. a
        budget's; None: the ``dedup`` window)."""
        now = self._clock()
        last = self._sent_at.get((event, subject))
        if last is not None and now - last < self.dedup:
            log.debug("alert %s for %s suppressed (sent %.0f s ago)", event, subject, now - last)
            return
        self._sent_at[(event, subject)] = now
        if event in FLEET_EVENTS and self._engine is not None:
            self._fleet_events.append((event, subject, message, window))
        else:
            self._emit(event, subject, message)

    def _emit(self, event: str, subject: str, message: str) -> None:
        """Queue an alert for each webhook that wants ``event``."""
        alert = Alert(event, subject, message, dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0),
                      self.relay)
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

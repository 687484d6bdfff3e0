"""What the relay runs on: the services (``addon.services``), built and wired together once, stopped in one loop.

``Runtime`` declares no option and parses none: each service parses its own (``addon.serviceoptions`` hands
mitmproxy's values to them, in chain order). The addons get the runtime in their constructor and use the
services through it: ``Relay`` routes over ``pool``, reports to ``health``, prices with ``prices`` and
``submit``s records; ``Limits`` reads ``keys``; ``Admin`` reads ``db``, ``providers`` and edits nodes through
``fleet``; ``StartupCheck`` asks whether anything routes.

``stop`` (mitmproxy's ``done``, or interpreter exit after a failed start) stops every service's threads, then
runs the ``on_shutdown`` callbacks (the relay records its calls in flight) before the writer's last flush.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from addon.guard.secrets import KnownSecrets
from addon.nodes.health import Health
from addon.nodes.routing import NodePool
from addon.observe.metrics import Metrics
from addon.services.alerting import Alerting
from addon.services.clientkeys import ClientKeys
from addon.services.fleet import Fleet
from addon.services.healthchecks import HealthChecks
from addon.services.heartbeat import Heartbeat
from addon.services.providers import Providers
from addon.services.statsdb import StatsDb
from store.prices import PriceTable
from store.records import Item


class Runtime:
    """The stats database, the fleet and its health checks, providers, alerts, prices, client keys and the
    heartbeat."""

    def __init__(self) -> None:
        self.keys = ClientKeys()
        self.secrets = KnownSecrets(self.keys)
        self.db = StatsDb()
        self.checks = HealthChecks(self.submit, lambda: self.pool)
        self.fleet = Fleet(self.checks.health, self.secrets.set_node_keys)
        self.providers = Providers()
        self.alerts = Alerting(lambda: self.pool, self.db.writer_stats, lambda: self.db.engine)
        self.prices: PriceTable | None = None  # set by codex_prices; None: calls are not priced
        self.metrics = Metrics(lambda: self.pool, self.db.writer_stats)
        self.heartbeat = Heartbeat(self.db.writer_stats)  # this relay's row in ``relays``, for the admin page
        self._on_shutdown: list[Callable[[], None]] = []
        # In the order they stop: calls in flight are recorded after every thread that reports has stopped and
        # before the writer's last flush (mitmproxy ends their connections only after ``done``).
        # The heartbeat's last beat tells the fleet this relay stopped, with its writer's counts.
        self._stopping = (self.fleet.stop, self.keys.stop, self.checks.stop, self.providers.stop,
                          self.alerts.stop, self._run_shutdown_callbacks, self.heartbeat.stop, self.db.stop)

    # -- for the addons ----------------------------------------------------------------------------
    @property
    def pool(self) -> NodePool:
        return self.fleet.pool

    @property
    def health(self) -> Health:
        return self.checks.health

    @property
    def connect_timeout(self) -> float:
        """Seconds a node has to accept a connection (the relay's probe, the pinger's timeout)."""
        return self.checks.connect_timeout

    @property
    def engine(self) -> sa.Engine | None:
        return self.db.engine

    def submit(self, item: Item) -> None:
        """Queue a record for the writer (dropped when no database is open); counted in ``metrics``."""
        self.metrics.observe(item)
        self.db.submit(item)

    def alert(self, event: str, subject: str, message: str, window: int | None = None) -> None:
        """Send an alert event to the webhooks that want it (de-duplicated; a fleet event once per ``window``,
        ``addon.observe.alerts``); a no-op without webhooks."""
        self.alerts.notify(event, subject, message, window)

    def on_shutdown(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in ``stop`` while records can still be submitted (before the last flush)."""
        self._on_shutdown.append(callback)

    # -- lifecycle ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every service: from mitmproxy's ``done``, or at interpreter exit when start-up failed."""
        for stop in self._stopping:
            stop()

    def _run_shutdown_callbacks(self) -> None:
        for callback in self._on_shutdown:
            callback()

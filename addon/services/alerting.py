"""Alerts: the ``[[webhooks]]`` of the nodes file, told of node and relay events (``addon.observe.alerts``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from addon.nodes.routing import NodePool
from addon.observe.alerts import Alerts, Webhook, webhooks_from_file
from addon.services.heartbeat import relay_name
from addon.services.settings import SettingsError, seconds
from store.config import ConfigError
from store.write.writer import WriterStats

log = logging.getLogger("codex.runtime")


@dataclass(frozen=True, slots=True)
class AlertSettings:
    webhooks: tuple[Webhook, ...]  # none: no alerts
    dedup: float
    relay: str  # this relay in the alerts' payloads


def alert_settings(options: Any, source: str | None, listen_port: int | None) -> AlertSettings:
    """The ``[[webhooks]]`` of ``codex_nodes``, ``codex_alert_dedup``, and the relay's name: its ``source``
    (``codex_source``, when set), else host and the port it listens on."""
    try:
        hooks = tuple(webhooks_from_file(options.codex_nodes)) if options.codex_nodes else ()
    except ConfigError as e:
        raise SettingsError(f"codex_nodes: {e}") from None
    return AlertSettings(hooks, seconds("codex_alert_dedup", options.codex_alert_dedup),
                         relay_name(source, listen_port))


class Alerting:
    """Watches ``pool`` and the writer (``writer_stats``) and sends what changes, and ``notify``'s events."""

    def __init__(self, pool: Callable[[], NodePool], writer_stats: Callable[[], WriterStats | None],
                 engine: Callable[[], sa.Engine | None]) -> None:
        self._pool = pool
        self._writer_stats = writer_stats
        self._engine = engine  # the fleet's announced state (store.alertstate) lives there
        self.interval = 1.0  # seconds between checks; tests shorten it
        self._alerts: Alerts | None = None

    def apply(self, settings: AlertSettings) -> None:
        self.stop()
        if settings.webhooks:
            self._alerts = Alerts(settings.webhooks, self._pool, self._writer_stats, engine=self._engine(),
                                  relay=settings.relay, dedup=settings.dedup, interval=self.interval)
            self._alerts.start()
            log.info("alerts to %d webhook(s)", len(settings.webhooks))

    def notify(self, event: str, subject: str, message: str, window: int | None = None) -> None:
        """Send an alert event to the webhooks that want it (de-duplicated); a no-op without webhooks."""
        if self._alerts is not None:
            self._alerts.notify(event, subject, message, window)

    def stop(self) -> None:
        if self._alerts is not None:
            self._alerts.stop()
            self._alerts = None

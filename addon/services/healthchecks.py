"""The nodes' health: the breakers' policy (``Health``) and the pinger, and how long a node may take to accept
a connection (the pinger's timeout and the relay's probe)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from addon.nodes.breaker import BreakerPolicy
from addon.nodes.health import Health, Pinger, Submit
from addon.nodes.routing import NodePool
from addon.services.settings import SettingsError, seconds


@dataclass(frozen=True, slots=True)
class HealthSettings:
    policy: BreakerPolicy
    connect_timeout: float
    ping_interval: float  # 0: no pings
    ping_path: str


def health_settings(options: Any) -> HealthSettings:
    """``codex_fail_threshold``, ``codex_cooldown``, ``codex_cooldown_max``, ``codex_connect_timeout``,
    ``codex_ping_interval`` and ``codex_ping_path``."""
    if options.codex_fail_threshold < 0:
        raise SettingsError("codex_fail_threshold must be >= 0")
    cooldown = seconds("codex_cooldown", options.codex_cooldown)
    cooldown_max = seconds("codex_cooldown_max", options.codex_cooldown_max)
    if cooldown_max < cooldown:
        raise SettingsError(f"codex_cooldown_max must be >= codex_cooldown ({cooldown:g}), "
                            f"got {options.codex_cooldown_max!r}")
    return HealthSettings(BreakerPolicy(options.codex_fail_threshold, cooldown, cooldown_max),
                          seconds("codex_connect_timeout", options.codex_connect_timeout, allow_zero=False),
                          seconds("codex_ping_interval", options.codex_ping_interval), options.codex_ping_path)


class HealthChecks:
    """``health`` (the breakers, reporting through ``submit``) and the pinger of ``pool``'s nodes."""

    def __init__(self, submit: Submit, pool: Callable[[], NodePool]) -> None:
        self.health = Health(submit)
        self.connect_timeout = 10.0
        self._pool = pool
        self._pinger: Pinger | None = None
        self._pinging: tuple[float, str, float] | None = None

    def apply(self, settings: HealthSettings) -> None:
        self.health.policy = settings.policy
        self.connect_timeout = settings.connect_timeout
        pinging = (settings.ping_interval, settings.ping_path, settings.connect_timeout)
        if pinging != self._pinging:  # a new pinger only when its own settings changed
            self.stop()
            self._pinging = pinging
            self._pinger = Pinger(self._pool, self.health, interval=settings.ping_interval, path=settings.ping_path,
                                  timeout=settings.connect_timeout)
            self._pinger.start()

    def stop(self) -> None:
        if self._pinger is not None:
            self._pinger.stop()
            self._pinger = None
        self._pinging = None

"""The providers' stats endpoints (``[[sources]]``), polled on a thread of their own into the stats database:
a slow provider never touches the event loop or the writer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from addon.services.settings import SettingsError
from store.config import ConfigError
from store.sources import SourceConfig, load_sources_file
from store.sources.poll import Poller, PollResult


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    sources: tuple[SourceConfig, ...]  # none: nothing is polled


def provider_settings(options: Any) -> ProviderSettings:
    """The ``[[sources]]`` of ``codex_stats_sources``, else of ``codex_nodes``."""
    path = options.codex_stats_sources or options.codex_nodes
    try:
        return ProviderSettings(tuple(load_sources_file(path)) if path else ())
    except ConfigError as e:
        raise SettingsError(f"codex_stats_sources: {e}") from None


class Providers:
    def __init__(self) -> None:
        self._poller: Poller | None = None

    def apply(self, settings: ProviderSettings, engine: sa.Engine) -> None:
        """Poll ``settings.sources`` into ``engine`` from now on (the previous poller stops)."""
        self.stop()
        if settings.sources:
            self._poller = Poller(engine, settings.sources)
            self._poller.start()

    @property
    def sources(self) -> list[SourceConfig] | None:
        """The stats sources being polled; None when none are configured."""
        return self._poller.sources if self._poller is not None else None

    def last_polls(self) -> list[PollResult]:
        """The latest poll of each source."""
        return list(self._poller.last_results.values()) if self._poller is not None else []

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.stop()
            self._poller = None

"""The runtime's services as mitmproxy addons: each declares one service's options and hands them, parsed once
into its settings (``addon.services``), to the service; ``LimitOptions`` does so for the client keys' limits.

``RuntimeOptions`` holds them as its ``addons``; configure runs in chain order, so the database opens before
the fleet upserts its nodes into it, and the fleet is configured before the client keys whose ``nodes`` name
its nodes. Its ``done`` stops the runtime; so does interpreter exit when start-up failed: mitmproxy ends such
a start with ``sys.exit`` before any ``done`` hook, and threads still running then (the writer's, the
pinger's, the node sync's…) met the interpreter's finalization mid-call, which can crash the process (exit
139) instead of its exit 1.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Iterator

from mitmproxy import ctx, exceptions
from mitmproxy.proxy.mode_specs import ProxyMode

from addon.limits import Limits, db_down_policy
from addon.services.alerting import alert_settings
from addon.services.clientkeys import key_specs
from addon.services.fleet import fleet_settings
from addon.services.healthchecks import health_settings
from addon.services.heartbeat import relay_name
from addon.services.prices import price_settings
from addon.services.providers import provider_settings
from addon.services.runtime import Runtime
from addon.services.settings import SettingsError, seconds
from addon.services.statsdb import db_settings
from store.engine import DEFAULT_DB


def _listen_port() -> int | None:
    """The relay's first listening port (None without a proxy mode)."""
    options = ctx.options
    return ProxyMode.parse(options.mode[0]).listen_port(options.listen_port) if options.mode else None


class RuntimeOptions:
    """The services' option addons; ``done`` stops every service."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.addons = [StatsDbOptions(runtime), HealthOptions(runtime), FleetOptions(runtime),
                       ProviderOptions(runtime), AlertOptions(runtime), PriceOptions(runtime),
                       ClientKeyOptions(runtime), HeartbeatOptions(runtime)]

    def load(self, loader) -> None:
        atexit.register(self.runtime.stop)

    def done(self) -> None:
        atexit.unregister(self.runtime.stop)
        self.runtime.stop()


@contextlib.contextmanager
def _option_errors() -> Iterator[None]:
    """A service's ``SettingsError`` as the ``OptionsError`` mitmproxy reports (and rolls the options back on)."""
    try:
        yield
    except SettingsError as e:
        raise exceptions.OptionsError(str(e)) from None


class _ServiceOptions:
    """One service's options. Its ``configure`` acts only when one of the options it reads is in ``updated``: an
    addon that sets another option (the gate) configures every addon again, and raising there again makes
    mitmproxy's rollback recurse."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime


class StatsDbOptions(_ServiceOptions):
    def load(self, loader) -> None:
        loader.add_option("codex_db", str, DEFAULT_DB,
                          "SQLAlchemy URL of the stats database (sqlite:///file.db or "
                          "mysql+pymysql://user:pass@host/db). Upgraded to the latest schema at start.")
        loader.add_option("codex_spool", str, "",
                          "Local SQLite journal for records while the stats database is unreachable; "
                          "written at the next start after a crash. Default: next to a SQLite "
                          "database, data/spool-<hash of the URL>.db for MySQL.")
        loader.add_option("codex_writer_process", bool, True,
                          "Write the stats database from a child process. Off: from a thread of the relay's "
                          "own process (no second process), whose event loop then waits for the writer's "
                          "Python work, ~25-70 us a call. Read when the database is opened.")
        loader.add_option("codex_prune_days", int, 0,
                          "Delete recorded calls (codex_invocations rows) older than this many whole UTC days, "
                          "at start and then daily, in short batches; the rollups keep their stats. 0: never.")

    def configure(self, updated: set[str]) -> None:
        if updated & {"codex_db", "codex_prune_days"}:
            options = ctx.options
            with _option_errors():
                settings = db_settings(options, _listen_port())  # the default journal is named for it
                if "codex_db" in updated:  # the journal and the writer's kind are read when it opens
                    self.runtime.db.open(settings)
                self.runtime.db.prune(settings)


class HealthOptions(_ServiceOptions):
    def load(self, loader) -> None:
        loader.add_option("codex_fail_threshold", int, 3,
                          "Failures in a row that mark a node failed: out of rotation for codex_cooldown, "
                          "then one trial call whose success brings it back. 0 never marks nodes failed.")
        loader.add_option("codex_cooldown", str, "30",
                          "Seconds a failed node waits for its trial call; doubled each time its trial "
                          "fails, up to codex_cooldown_max. A health ping that answers ends the wait once.")
        loader.add_option("codex_cooldown_max", str, "600", "Longest cooldown of a failed node, in seconds.")
        loader.add_option("codex_ping_interval", str, "30",
                          "Seconds between health pings of every node. 0 disables pings.")
        loader.add_option("codex_ping_path", str, "/models",
                          "Path of the health ping, joined to each node's base_url like client paths.")
        loader.add_option("codex_connect_timeout", str, "10",
                          "Seconds to wait for a node to accept a connection before trying another.")

    def configure(self, updated: set[str]) -> None:
        if updated & {"codex_fail_threshold", "codex_cooldown", "codex_cooldown_max", "codex_connect_timeout",
                      "codex_ping_interval", "codex_ping_path"}:
            with _option_errors():
                self.runtime.checks.apply(health_settings(ctx.options))


class FleetOptions(_ServiceOptions):
    def load(self, loader) -> None:
        loader.add_option("codex_nodes", str, "",
                          "Path to a TOML file of upstream nodes ([[nodes]] id, name, base_url, api_key, "
                          "weight). Upserted at every start; stats are never touched.")
        loader.add_option("codex_upstream", str, "",
                          "Base URL of a single upstream node (id 'default'), used when codex_nodes is "
                          "not set, e.g. https://relay.example/v1.")
        loader.add_option("codex_upstream_key", str, "", "API key of the codex_upstream node.")
        loader.add_option("codex_upstream_name", str, "default", "Display name of the codex_upstream node.")
        loader.add_option("codex_sticky_ttl", str, "3600",
                          "Seconds a session (Codex's session headers or prompt_cache_key, OpenCode's "
                          "x-session-affinity, Claude Code's metadata.user_id) stays on its node. "
                          "0 disables stickiness.")
        loader.add_option("codex_node_sync", str, "1",
                          "Seconds between checks for node changes made by other relays on the same "
                          "database (admin edits, enable/disable, failed/recovered). 0 disables the check.")

    def configure(self, updated: set[str]) -> None:
        # codex_db: the nodes are upserted into a newly opened database.
        if updated & {"codex_db", "codex_nodes", "codex_upstream", "codex_upstream_key", "codex_upstream_name",
                      "codex_sticky_ttl", "codex_node_sync"}:
            with _option_errors():
                settings = fleet_settings(ctx.options)
            assert self.runtime.engine is not None  # opened by the first configure (codex_db has a default)
            self.runtime.fleet.apply(settings, self.runtime.engine)


class ProviderOptions(_ServiceOptions):
    def load(self, loader) -> None:
        loader.add_option("codex_stats_sources", str, "",
                          "TOML file whose [[sources]] are provider stats endpoints to poll into "
                          "stats_source_snapshots/deltas. Default: the [[sources]] of the codex_nodes file.")

    def configure(self, updated: set[str]) -> None:
        if updated & {"codex_db", "codex_stats_sources", "codex_nodes"}:
            with _option_errors():
                settings = provider_settings(ctx.options)
            assert self.runtime.engine is not None  # opened by the first configure (codex_db has a default)
            self.runtime.providers.apply(settings, self.runtime.engine)


class AlertOptions(_ServiceOptions):
    def load(self, loader) -> None:
        loader.add_option("codex_alert_dedup", str, "300",
                          "Seconds a node's (or a format and model pattern's) recovery alert waits after its last "
                          "one while it flaps ([[webhooks]] of the codex_nodes file; failures are always sent, the "
                          "final state is told); a key's budget, lost records and writer stalls are sent once "
                          "per this many seconds.")

    def configure(self, updated: set[str]) -> None:
        # codex_db: the fleet's announced alerts are claimed there; codex_source names the relay in them.
        if updated & {"codex_db", "codex_nodes", "codex_alert_dedup", "codex_source"}:
            with _option_errors():
                self.runtime.alerts.apply(alert_settings(ctx.options, _source(), _listen_port()))


def _source() -> str | None:
    """``codex_source`` when the user set it (the relay's name then), else None."""
    options = ctx.options
    return options.codex_source if "codex_source" in options and options.has_changed("codex_source") else None


class HeartbeatOptions(_ServiceOptions):
    """No option of its own: the heartbeat goes to ``codex_db`` under the relay's name."""

    def configure(self, updated: set[str]) -> None:
        if updated & {"codex_db", "codex_source"} and self.runtime.engine is not None:
            self.runtime.heartbeat.apply(self.runtime.engine, relay_name(_source(), _listen_port()), _listen_port())


class PriceOptions(_ServiceOptions):
    def load(self, loader) -> None:
        loader.add_option("codex_prices", str, "",
                          "TOML price table (USD per 1M tokens per model) that overrides genai-prices' bundled "
                          "prices for the models it names (custom or private ones). Default: the shipped "
                          "store/prices.toml.")

    def configure(self, updated: set[str]) -> None:
        if "codex_prices" in updated:
            with _option_errors():
                self.runtime.prices = price_settings(ctx.options)


class ClientKeyOptions(_ServiceOptions):
    def load(self, loader) -> None:
        loader.add_option(
            "codex_client_keys", str, "",
            "Keys clients must send (Authorization: Bearer <key> or x-api-key) to use the relay: "
            "comma-separated name=key or bare keys, or @path of a file with one name=key per line "
            "(# comments), or @path of a TOML file of [[keys]] with limits (docs/teams.md). "
            "Upserted into the database at start, where the admin API and './run.sh keys' manage keys too. "
            "Other requests get HTTP 401 and reach no node. The key's name is recorded "
            "as client_key. Empty and no key made through the admin API: no client auth.")
        loader.add_option("codex_key_sync", str, "1",
                          "Seconds between checks for client keys added, changed, rotated or revoked by other "
                          "relays or ./run.sh keys on the same database. 0 disables the check.")

    def configure(self, updated: set[str]) -> None:
        # codex_db: the keys are upserted into, and read from, a newly opened database.
        if updated & {"codex_db", "codex_client_keys", "codex_key_sync"}:
            options = ctx.options
            with _option_errors():
                specs = key_specs(options.codex_client_keys, (n.id for n in self.runtime.pool))
                interval = seconds("codex_key_sync", options.codex_key_sync)
                if self.runtime.engine is None:  # no database: the file's keys only
                    self.runtime.keys.apply(specs)
                else:
                    self.runtime.keys.sync(self.runtime.engine, specs, interval)


class LimitOptions:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def load(self, loader) -> None:
        loader.add_option("codex_limits_when_db_down", str, "admit",
                          "What a call of a client key with a budget, rpm or concurrency gets while the stats "
                          "database is unreachable: 'admit' serves it (its admission is journaled and counted "
                          "once the database is back; rpm and concurrency are counted by this relay alone), "
                          "'refuse' answers 503 limits_unavailable.")

    def configure(self, updated: set[str]) -> None:
        if "codex_limits_when_db_down" in updated:
            with _option_errors():
                self.limits.when_db_down = db_down_policy(ctx.options)

"""The runtime addon: what the relay runs on, opened from options and shared by the other addons.

``Runtime`` owns the stats database (opened and upgraded at start), the writer (a child process) and its spool,
the node pool with each node's breaker (``health``), the health pinger, the stats-source poller, the
price table and the node keys in the shared ``KnownSecrets``; it declares and validates their options.
Its ``NodeSync`` thread (``addon.nodesync``) follows node changes other relays make on the same database.
The addons that use it get it in their constructor and use only its public interface: ``Relay``
routes over ``pool``, reports to ``health`` and ``submit``s records; ``Admin`` reads ``engine``,
``writer_stats()``, ``poll_sources()``/``last_polls()`` and edits nodes through ``update_node`` and
``set_node_disabled``; ``StartupCheck`` asks whether anything routes.

Configure runs in chain order, so ``Runtime`` comes before the addons that use it. ``done`` runs the
``on_shutdown`` callbacks (the relay records its calls in flight) before the writer's last flush.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable

import sqlalchemy as sa
from mitmproxy import ctx, exceptions
from mitmproxy.proxy.mode_specs import ProxyMode

from addon.alerts import Alerts, webhooks_from_file
from addon.breaker import BreakerPolicy
from addon.health import Health, Pinger
from addon.metrics import Metrics
from addon.nodesync import NodeSync
from addon.options import seconds
from addon.routing import Node, NodePool, StickyMap
from addon.secrets import KnownSecrets
from store.config import ConfigError, base_url_warnings, load_nodes_file, validate_base_url
from store.engine import DEFAULT_DB, error_line, make_engine, upgrade_to_head
from store.nodes import config_of, load_nodes, read_version, set_disabled, upsert_nodes
from store.poll import Poller, PollResult, start_poller
from store.prices import PriceTable, load_prices
from store.records import Item, NodeConfig
from store.retention import DAY, Pruner
from store.sources import SourceConfig
from store.spool import default_spool_path
from store.writer import RecordWriter, WriterStats
from store.writerproc import WriterStartError, start_writer

log = logging.getLogger("codex.runtime")

_NODE_OPTIONS = frozenset({"codex_db", "codex_nodes", "codex_upstream", "codex_upstream_key", "codex_upstream_name",
                           "codex_sticky_ttl", "codex_node_sync"})


class Runtime:
    """Database, writer, nodes and their health, pinger, poller and prices, for the addons after it."""

    def __init__(self, secrets: KnownSecrets | None = None) -> None:
        self.secrets = secrets or KnownSecrets()
        self.pool = NodePool()
        self.health = Health(self.submit)
        self.prices: PriceTable | None = None
        self.engine: sa.Engine | None = None
        # Parsed duration options (configure sets them all at start); connect_timeout is also the relay's probe.
        self.connect_timeout = 10.0
        self._ping_interval = 30.0
        self._sticky_ttl = 3600.0
        self._db_url: str | None = None
        self._writer: RecordWriter | None = None
        self._pinger: Pinger | None = None
        self._poller: Poller | None = None
        self._node_sync: NodeSync | None = None
        self._node_sync_interval = 1.0
        self._pruner: Pruner | None = None
        self._alerts: Alerts | None = None
        self.alert_interval = 1.0  # seconds between alert checks; tests shorten it
        self.prune_interval = DAY  # tests shorten it
        self._on_shutdown: list[Callable[[], None]] = []
        self.metrics = Metrics(lambda: self.pool, self.writer_stats)

    # -- options -----------------------------------------------------------------------------------
    def load(self, loader) -> None:
        atexit.register(self._stop)
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
        loader.add_option("codex_nodes", str, "",
                          "Path to a TOML file of upstream nodes ([[nodes]] id, name, base_url, api_key, "
                          "weight). Upserted at every start; stats are never touched.")
        loader.add_option("codex_upstream", str, "",
                          "Base URL of a single upstream node (id 'default'), used when codex_nodes is "
                          "not set, e.g. https://relay.example/v1.")
        loader.add_option("codex_upstream_key", str, "", "API key of the codex_upstream node.")
        loader.add_option("codex_upstream_name", str, "default", "Display name of the codex_upstream node.")
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
        loader.add_option("codex_sticky_ttl", str, "3600",
                          "Seconds a session (Codex's session headers or prompt_cache_key, OpenCode's "
                          "x-session-affinity, Claude Code's metadata.user_id) stays on its node. "
                          "0 disables stickiness.")
        loader.add_option("codex_node_sync", str, "1",
                          "Seconds between checks for node changes made by other relays on the same "
                          "database (admin edits, enable/disable, failed/recovered). 0 disables the check.")
        loader.add_option("codex_prices", str, "",
                          "TOML price table (USD per 1M tokens per model) that overrides genai-prices' bundled "
                          "prices for the models it names (custom or private ones). Default: the shipped "
                          "store/prices.toml.")
        loader.add_option("codex_stats_sources", str, "",
                          "TOML file whose [[sources]] are provider stats endpoints to poll into "
                          "stats_source_snapshots/deltas. Default: the [[sources]] of the codex_nodes file.")
        loader.add_option("codex_alert_dedup", str, "300",
                          "Seconds within which one alert event ([[webhooks]] of the codex_nodes file) is sent "
                          "only once per node (or once for the relay).")
        loader.add_option("codex_prune_days", int, 0,
                          "Delete recorded calls (codex_invocations rows) older than this many whole UTC days, "
                          "at start and then daily, in short batches; the rollups keep their stats. 0: never.")

    def configure(self, updated: set[str]) -> None:
        # Only the options in ``updated`` are checked: an addon that sets another option (the gate)
        # configures every addon again, and raising there again makes mitmproxy's rollback recurse.
        opts = ctx.options
        if updated & {"codex_fail_threshold", "codex_cooldown", "codex_cooldown_max"}:
            if opts.codex_fail_threshold < 0:
                raise exceptions.OptionsError("codex_fail_threshold must be >= 0")
            cooldown = seconds("codex_cooldown", opts.codex_cooldown)
            cooldown_max = seconds("codex_cooldown_max", opts.codex_cooldown_max)
            if cooldown_max < cooldown:
                raise exceptions.OptionsError(f"codex_cooldown_max must be >= codex_cooldown ({cooldown:g}), "
                                              f"got {opts.codex_cooldown_max!r}")
            self.health.policy = BreakerPolicy(opts.codex_fail_threshold, cooldown, cooldown_max)
        if "codex_connect_timeout" in updated:
            self.connect_timeout = seconds("codex_connect_timeout", opts.codex_connect_timeout, allow_zero=False)
        if "codex_ping_interval" in updated:
            self._ping_interval = seconds("codex_ping_interval", opts.codex_ping_interval)
        if "codex_sticky_ttl" in updated:
            self._sticky_ttl = seconds("codex_sticky_ttl", opts.codex_sticky_ttl)
        if "codex_node_sync" in updated:
            self._node_sync_interval = seconds("codex_node_sync", opts.codex_node_sync)
        if "codex_db" in updated and opts.codex_db != self._db_url:
            self._open_db(opts.codex_db, opts.codex_spool)
        if updated & _NODE_OPTIONS:
            self._configure_nodes(self._configured_nodes())
        if "codex_prices" in updated:
            try:
                self.prices = load_prices(opts.codex_prices or None)
            except ConfigError as e:
                raise exceptions.OptionsError(f"codex_prices: {e}") from None
        if updated & {"codex_db", "codex_stats_sources", "codex_nodes"}:
            try:
                # Its own thread: a slow provider endpoint never touches the event loop or the writer.
                assert self.engine is not None  # opened by the first configure (codex_db has a default)
                self._poller = start_poller(self.engine, opts.codex_stats_sources or opts.codex_nodes, self._poller)
            except ConfigError as e:
                raise exceptions.OptionsError(f"codex_stats_sources: {e}") from None
        if updated & {"codex_nodes", "codex_alert_dedup"}:
            self._start_alerts(opts.codex_nodes, seconds("codex_alert_dedup", opts.codex_alert_dedup))
        if updated & {"codex_db", "codex_prune_days"}:
            if opts.codex_prune_days < 0:
                raise exceptions.OptionsError("codex_prune_days must be >= 0")
            self._start_pruner(opts.codex_prune_days)
        if updated & {"codex_ping_interval", "codex_ping_path", "codex_connect_timeout"}:
            if self._pinger is not None:
                self._pinger.stop()
            self._pinger = Pinger(lambda: self.pool, self.health, interval=self._ping_interval,
                                  path=opts.codex_ping_path, timeout=self.connect_timeout)
            self._pinger.start()

    def _open_db(self, url: str, spool_path: str) -> None:
        try:
            engine = make_engine(url)
            upgrade_to_head(engine)
        except Exception as e:
            raise exceptions.OptionsError(f"codex_db: cannot open {_safe_url(url)}: {error_line(e)}") from None
        if self._writer is not None:
            self._writer.close()
        try:
            # Half a second of batching: at relay rates it cuts the writer's CPU per record several-fold;
            # stats lag by at most that much.
            self._writer = start_writer(engine, url, spool_path or self._default_spool(url), linger=0.5,
                                        process=ctx.options.codex_writer_process)
        except WriterStartError as e:
            self._writer = None
            engine.dispose()
            option = "codex_spool" if e.kind == "spool" else "codex_db"
            raise exceptions.OptionsError(f"{option}: {e}") from None
        self.engine = engine
        self._db_url = url
        log.info("stats database: %s", _safe_url(url))

    @staticmethod
    def _default_spool(url: str) -> str | None:
        """The relay's own journal: named for its first listening port."""
        opts = ctx.options
        port = ProxyMode.parse(opts.mode[0]).listen_port(opts.listen_port) if opts.mode else None
        path = default_spool_path(url, port)
        older = default_spool_path(url)
        if path != older and older is not None and os.path.exists(older):
            log.warning("a journal from before journals were per relay is at %s: its records are written by a relay "
                        "started with --set codex_spool=%s", older, older)
        return path

    def _start_alerts(self, nodes_file: str, dedup: float) -> None:
        try:
            hooks = webhooks_from_file(nodes_file) if nodes_file else []
        except ConfigError as e:
            raise exceptions.OptionsError(f"codex_nodes: {e}") from None
        if self._alerts is not None:
            self._alerts.stop()
            self._alerts = None
        if hooks:
            self._alerts = Alerts(hooks, lambda: self.pool, self.writer_stats, dedup=dedup,
                                  interval=self.alert_interval)
            self._alerts.start()
            log.info("alerts to %d webhook(s)", len(hooks))

    def _start_pruner(self, days: int) -> None:
        if self._pruner is not None:
            self._pruner.stop()
            self._pruner = None
        if days and self.engine is not None:
            self._pruner = Pruner(self.engine, days, self.prune_interval)
            self._pruner.start()

    def _configured_nodes(self) -> list[NodeConfig]:
        opts = ctx.options
        if opts.codex_nodes:
            try:
                return load_nodes_file(opts.codex_nodes)
            except ConfigError as e:
                raise exceptions.OptionsError(f"codex_nodes: {e}") from None
        if opts.codex_upstream:
            problem = validate_base_url(opts.codex_upstream)
            if problem:
                raise exceptions.OptionsError(f"codex_upstream: {problem}")
            return [NodeConfig(id="default", name=opts.codex_upstream_name or "default",
                               base_url=opts.codex_upstream, api_key=opts.codex_upstream_key, weight=1)]
        return []

    def _configure_nodes(self, configs: list[NodeConfig]) -> None:
        assert self.engine is not None
        with self.engine.begin() as conn:
            if configs:
                upsert_nodes(conn, configs)
            stored = load_nodes(conn)
            version = read_version(conn)
        failed = {r.id: bool(r.failed) for r in stored}
        disabled = {r.id for r in stored if r.disabled}
        # The configured nodes route, and those added on the admin page; others in the DB (dropped from
        # the file) keep their stats but get no traffic. A node failed before a restart starts with its
        # first cooldown, then gets its trial call; a disabled one stays out.
        named = {c.id for c in configs}
        configs = configs + [config_of(r) for r in stored if r.origin == "admin" and r.id not in named]
        nodes = [Node(config=c, breaker=self.health.restored(failed.get(c.id, False)), disabled=c.id in disabled)
                 for c in configs]
        for c in configs:
            for warning in base_url_warnings(c.base_url):
                log.warning("node %s: %s", c.id, warning)
        self.pool = NodePool(nodes, sticky=StickyMap.for_ttl(self._sticky_ttl))
        self.secrets.set_node_keys(n.config.api_key for n in nodes)
        self._start_node_sync(named, version, stored)
        if nodes:
            log.info("routing over %d node(s): %s", len(nodes), ", ".join(
                f"{n.id} (weight {n.config.weight}{', failed' if n.failed else ''}"
                f"{', disabled' if n.disabled else ''})" for n in nodes))
        else:
            log.info("no upstream node configured: monitor mode (traffic passes through unchanged)")

    def _start_node_sync(self, file_ids: set[str], version: int, stored: list[sa.Row]) -> None:
        assert self.engine is not None
        if self._node_sync is not None:
            self._node_sync.stop()
        self._node_sync = NodeSync(self.engine, lambda: self.pool, self.health, file_ids, self.secrets.set_node_keys,
                                   version=version, rows=stored, interval=self._node_sync_interval)
        self._node_sync.start()

    # -- for the other addons ----------------------------------------------------------------------
    def submit(self, item: Item) -> None:
        """Queue a record for the writer (dropped when no database is open); counted in ``metrics``."""
        self.metrics.observe(item)
        if self._writer is not None:
            self._writer.submit(item)

    def alert(self, event: str, subject: str, message: str) -> None:
        """Send an alert event to the webhooks that want it (de-duplicated); a no-op without webhooks."""
        if self._alerts is not None:
            self._alerts.notify(event, subject, message)

    @property
    def database(self) -> str | None:
        """The stats database's URL without its password, for logs; None before one is open."""
        return _safe_url(self._db_url) if self._db_url else None

    def writer_stats(self) -> WriterStats | None:
        return self._writer.stats() if self._writer is not None else None

    def poll_sources(self) -> list[SourceConfig] | None:
        """The stats sources being polled; None when none are configured."""
        return self._poller.sources if self._poller is not None else None

    def last_polls(self) -> list[PollResult]:
        """The latest poll of each source."""
        return list(self._poller.last_results.values()) if self._poller is not None else []

    def update_node(self, config: NodeConfig) -> None:
        """Add or edit a node at run time (admin page): the same non-destructive upsert as at start.

        Blocking DB work: call it off the event loop.
        """
        assert self.engine is not None
        with self.engine.begin() as conn:
            upsert_nodes(conn, [config], origin="admin")
            disabled = any(r.id == config.id and r.disabled for r in load_nodes(conn))
        current = self.pool.get(config.id)
        if current is None:
            self.pool.put(Node(config=config, disabled=disabled))
        else:  # in place: calls in flight hold this object and report its health to it
            current.config, current.disabled = config, disabled
        self.secrets.set_node_keys(n.config.api_key for n in self.pool)

    def set_node_disabled(self, node_id: str, disabled: bool) -> bool:
        """Take a node out of routing, or put it back (admin page); its stats stay. False: no such node.

        Blocking DB work: call it off the event loop.
        """
        assert self.engine is not None
        with self.engine.begin() as conn:
            if not set_disabled(conn, node_id, disabled):
                return False
        current = self.pool.get(node_id)
        if current is not None:
            current.disabled = disabled
            if not disabled:  # enable is also the way to clear a failed node at once
                self.health.reset(current)
        return True

    def on_shutdown(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in ``done`` while records can still be submitted (before the last flush)."""
        self._on_shutdown.append(callback)

    # -- lifecycle ---------------------------------------------------------------------------------
    def done(self) -> None:
        atexit.unregister(self._stop)
        self._stop()

    def _stop(self) -> None:
        """Stop every thread and the writer: from ``done``, or at interpreter exit when start-up failed.

        mitmproxy ends a start whose configuration failed with ``sys.exit`` before any ``done`` hook; threads
        still running then (the writer's, the pinger's, the node sync's…) met the interpreter's finalization
        mid-call, which can crash the process (exit 139) instead of its exit 1.
        """
        if self._node_sync is not None:
            self._node_sync.stop()
        if self._pinger is not None:
            self._pinger.stop()
        if self._poller is not None:
            self._poller.stop()
        if self._pruner is not None:
            self._pruner.stop()
        if self._alerts is not None:
            self._alerts.stop()
        # Calls still in flight are recorded (the relay's callback) before the writer's last flush:
        # mitmproxy ends their connections only after this hook, when nothing is written any more.
        for callback in self._on_shutdown:
            callback()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"

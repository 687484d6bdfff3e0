"""The tables, as SQLAlchemy Core metadata: those the earlier relay made (migration 0001) plus this relay's.

Alembic (``migrations/``) owns how a database gets here; this module is the target the migrations
are checked against (``tests/test_migrations.py`` compares them), and what queries are written with.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from store.histogram import DURATION_BUCKETS_MS, TTFB_BUCKETS_MS

# SQLite only auto-increments an INTEGER PRIMARY KEY; MySQL wants the 64-bit type.
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# MySQL's DATETIME drops microseconds unless asked; an invocation's time is part of its unique key.
TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")
# MySQL's TEXT stops at 64 KiB: request payloads and usage events can be larger.
LONGTEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql")
COUNTER = sa.BigInteger()

metadata = sa.MetaData()


def _counter(name: str) -> sa.Column:
    return sa.Column(name, COUNTER, nullable=False, server_default="0")


nodes = sa.Table(
    "nodes", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    # config: the only columns a config upsert writes
    sa.Column("name", sa.String(128)),
    sa.Column("base_url", sa.String(512)),
    sa.Column("api_key", sa.String(512)),
    sa.Column("weight", sa.Integer, nullable=False, server_default="1"),
    # health: written by the relay's health tracking, kept across restarts
    sa.Column("failed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", TIMESTAMP, server_default=sa.func.current_timestamp()),
    # cumulative stats: only ever changed by atomic increments
    _counter("requests"),
    _counter("fail_count"),
    sa.Column("fail_streak", sa.Integer, nullable=False, server_default="0"),
    _counter("total_bytes"),
    _counter("total_input"),
    _counter("total_output"),
    _counter("stream_dur_ms"),
    _counter("first_byte_ms"),
    sa.Column("last_ping_ms", sa.Integer),
    sa.Column("last_ping_err", sa.Text),
    # revision 3
    _counter("total_cached"),
    _counter("total_reasoning"),
    # set from the admin page; a config file upsert leaves it alone
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("updated_at", TIMESTAMP),
    # 'file': from codex_nodes / codex_upstream (routes while the file names it); 'admin': added on the
    # admin page (routes after a restart too, until a file takes it over)
    sa.Column("origin", sa.String(16), nullable=False, server_default="file"),
    # revision 8: what the node serves (formats comma-separated, models and model_map JSON text; NULL:
    # everything) and the model names it wants instead
    sa.Column("formats", sa.String(128)),
    sa.Column("models", sa.Text),
    sa.Column("model_map", sa.Text),
    # revision 11: the relay asks this node for usage in chat streams (addon.metering.usageprobe); false for
    # upstreams that reject stream_options
    sa.Column("usage_probe", sa.Boolean, nullable=False, server_default=sa.true()),
    # revision 12: the header the node's key goes in (NULL: derived from the node, addon.egress.key_header)
    sa.Column("auth_header", sa.String(64)),
    # revision 18: the config columns the nodes file sets (comma-separated, as last applied by a relay's start;
    # NULL: no file names the node). They are the file's: the admin page refuses to change them.
    sa.Column("file_fields", sa.String(255)),
)

# Revision 8: one counter row, bumped in the transaction of every change to a node's config, `disabled`
# or `failed`; relays on one database read it every second and reload their nodes when it moves.
node_state = sa.Table(
    "node_state", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),
)

codex_invocations = sa.Table(
    "codex_invocations", metadata,
    sa.Column("id", BIGID, primary_key=True, autoincrement=True),
    sa.Column("invoke_id", sa.String(64), nullable=False),
    sa.Column("occurred_at", TIMESTAMP, nullable=False),
    sa.Column("source", sa.String(32), nullable=False, server_default="xy"),
    sa.Column("model", sa.String(128)),
    sa.Column("input_tokens", COUNTER),
    sa.Column("output_tokens", COUNTER),
    sa.Column("cache_input_tokens", COUNTER),
    sa.Column("reasoning_tokens", COUNTER),
    sa.Column("total_tokens", COUNTER),
    sa.Column("cost", sa.Double),
    sa.Column("status", sa.String(16)),
    sa.Column("error_message", sa.Text),
    sa.Column("payload", LONGTEXT),
    sa.Column("raw_response", LONGTEXT),
    sa.Column("created_at", TIMESTAMP, server_default=sa.func.current_timestamp()),
    # revision 3: what the relay measures
    sa.Column("node_id", sa.String(64)),
    sa.Column("endpoint", sa.String(255)),
    sa.Column("api_format", sa.String(16)),
    sa.Column("stream", sa.Boolean),
    sa.Column("http_status", sa.Integer),
    sa.Column("ttfb_ms", sa.Integer),
    sa.Column("stream_ms", sa.Integer),
    sa.Column("duration_ms", sa.Integer),
    sa.Column("request_bytes", COUNTER),
    sa.Column("response_bytes", COUNTER),
    sa.Column("attempts", sa.Integer),
    sa.Column("client_key", sa.String(64)),
    sa.Column("cache_write_tokens", COUNTER),
    sa.Column("cost_estimated", sa.Boolean),
    sa.Column("cost_input", sa.Double),
    sa.Column("cost_cached", sa.Double),
    sa.Column("cost_output", sa.Double),
    # revision 5: comma-separated sorted notes about the row (raw_trimmed, error_trimmed, no_usage, …)
    sa.Column("flags", sa.String(255)),
    # revision 8: the model the client asked for (``model`` is the one the node reported serving)
    sa.Column("requested_model", sa.String(128)),
    # revision 11: the share of ``cost_input`` spent writing the prompt cache
    sa.Column("cost_cache_write", sa.Double),
    # revision 14: the conversation the call belongs to (addon.nodes.sessions; NULL: none named), clipped to 128
    sa.Column("session_key", sa.String(128)),
    sa.UniqueConstraint("invoke_id", "occurred_at", name="uq_codex_invocations_invoke_id_occurred_at"),
    sa.Index("idx_codex_invocations_source_occurred_at", "source", "occurred_at"),
    sa.Index("idx_codex_invocations_occurred_at", "occurred_at"),
    sa.Index("idx_codex_invocations_node_occurred_at", "node_id", "occurred_at"),
    sa.Index("idx_codex_invocations_model_occurred_at", "model", "occurred_at"),
)

# Per UTC day, source, node and model: what the stats views add up, kept by the writer with atomic
# increments in the same transaction as the invocation rows, so a query over a year reads a few
# thousand rows instead of every invocation. '' stands for "no node" / "unknown model" (a key
# column cannot be NULL).
codex_daily_stats = sa.Table(
    "codex_daily_stats", metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("source", sa.String(32), primary_key=True),
    sa.Column("node_id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(128), primary_key=True),
    _counter("requests"),
    _counter("successes"),
    _counter("input_tokens"),
    _counter("cached_tokens"),
    _counter("output_tokens"),
    _counter("reasoning_tokens"),
    _counter("total_tokens"),
    sa.Column("cost", sa.Double, nullable=False, server_default="0"),
    _counter("bytes"),
    _counter("ttfb_sum"),  # over the calls with a first byte; ttfb_n of them
    _counter("ttfb_n"),
    _counter("stream_ms"),  # over successful streamed calls with output: generation speed
    _counter("stream_tokens"),
    # revision 6: how the calls that did not succeed ended, and which calls had a price
    _counter("failures"),  # the node's fault (InvocationRecord.node_failure): counted in nodes.fail_count too
    _counter("aborted"),  # the client went away: nobody's failure
    _counter("priced"),  # calls with a cost; ``cost`` sums only these
)

# What the stats views sum, in table order (store.rollups declares what the writer adds to each).
DAILY_COUNTERS = tuple(c.name for c in codex_daily_stats.columns if not c.primary_key)

# revision 10: per UTC hour (the hour's start), the daily rollup's sums plus the distributions of TTFB
# and call duration as counts per fixed bucket (store.histogram: ``ttfb_le_<ms>``, then ``_le_inf``),
# from which percentiles are read. Kept by the writer in the same transaction, by atomic increments.
# Revision 19: each bound at most 15% above the one before (it was up to twice), for percentiles within 10%.
TTFB_COLUMNS = (*(f"ttfb_le_{b}" for b in TTFB_BUCKETS_MS), "ttfb_le_inf")
DURATION_COLUMNS = (*(f"dur_le_{b}" for b in DURATION_BUCKETS_MS), "dur_le_inf")
codex_hourly_stats = sa.Table(
    "codex_hourly_stats", metadata,
    sa.Column("hour", sa.DateTime, primary_key=True),
    *[sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable,
                server_default=None if c.primary_key else "0") for c in codex_daily_stats.columns if c.name != "day"],
    _counter("duration_sum"),  # over the calls with a duration; duration_n of them
    _counter("duration_n"),
    *[_counter(name) for name in TTFB_COLUMNS + DURATION_COLUMNS],
)

stats_source_snapshots = sa.Table(
    "stats_source_snapshots", metadata,
    sa.Column("id", BIGID, primary_key=True, autoincrement=True),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("period", sa.String(16), nullable=False),
    sa.Column("stats_date", sa.String(10), nullable=False),  # 'YYYY-MM-DD', the provider's day
    sa.Column("model", sa.String(128)),  # NULL: the aggregate over all models
    sa.Column("requests", COUNTER, nullable=False),
    sa.Column("input_tokens", COUNTER),
    sa.Column("output_tokens", COUNTER),
    sa.Column("cache_create_tokens", COUNTER),
    sa.Column("cache_read_tokens", COUNTER),
    sa.Column("all_tokens", COUNTER),
    sa.Column("cost_input", sa.Double),
    sa.Column("cost_output", sa.Double),
    sa.Column("cost_cache_write", sa.Double),
    sa.Column("cost_cache_read", sa.Double),
    sa.Column("cost_total", sa.Double),
    sa.Column("raw_response", LONGTEXT),
    sa.Column("cost_rated", sa.Double),  # charged after the provider's rate multiplier; NULL: not reported
    sa.Column("captured_at", TIMESTAMP, nullable=False),
    sa.Column("captured_at_epoch", sa.BigInteger, nullable=False),
    sa.Column("created_at", TIMESTAMP, server_default=sa.func.current_timestamp()),
    sa.UniqueConstraint("source", "period", "stats_date", "model", "captured_at_epoch",
                        name="uq_stats_source_snapshots_capture"),
    sa.Index("idx_stats_source_snapshots_date", "source", "period", "stats_date", "captured_at_epoch"),
)

stats_source_deltas = sa.Table(
    "stats_source_deltas", metadata,
    sa.Column("id", BIGID, primary_key=True, autoincrement=True),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("period", sa.String(16), nullable=False),
    sa.Column("stats_date", sa.String(10), nullable=False),
    sa.Column("captured_at", TIMESTAMP, nullable=False),
    sa.Column("captured_at_epoch", sa.BigInteger, nullable=False),
    sa.Column("total_count", COUNTER, nullable=False),
    sa.Column("success_count", COUNTER, nullable=False),
    sa.Column("failure_count", COUNTER, nullable=False),
    sa.Column("total_tokens", COUNTER, nullable=False),
    sa.Column("total_cost", sa.Double, nullable=False),
    sa.Column("created_at", TIMESTAMP, server_default=sa.func.current_timestamp()),
    sa.Column("cost_rated", sa.Double),  # NULL: the provider reports no rated cost
    sa.UniqueConstraint("source", "period", "stats_date", "captured_at_epoch", name="uq_stats_source_deltas_capture"),
    sa.Index("idx_stats_source_deltas_epoch", "source", "period", "captured_at_epoch"),
)

# Per UTC day and client key (codex_invocations.client_key), revision 9. ``admitted`` is counted at
# admission by a conditional increment (the exact ``daily_requests`` limit across relays); the usage
# columns are added by the writer in the transaction of the invocation rows (they sum codex_invocations
# by client_key exactly); ``refused_*`` count the calls the key's limits refused, by reason.
client_key_usage = sa.Table(
    "client_key_usage", metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("client_key", sa.String(64), primary_key=True),
    _counter("admitted"),
    _counter("requests"),
    _counter("input_tokens"),
    _counter("cached_tokens"),
    _counter("output_tokens"),
    _counter("total_tokens"),
    sa.Column("cost", sa.Double, nullable=False, server_default="0"),
    _counter("refused_model"),
    _counter("refused_nodes"),
    _counter("refused_rate"),
    _counter("refused_concurrency"),
    _counter("refused_budget"),
    _counter("refused_endpoint"),  # revision 13
    _counter("refused_expired"),  # revision 17
)

# Revision 15: what the fleet last announced about each watched thing (a node, a format and model pattern,
# every node, a key's budget), so relays on one database send one alert per event and a restarted relay
# does not repeat one (store.alertstate). ``version``: the node state version the announcement was seen at
# (a key's: its time window); a relay claims a change only with a later one.
alert_state = sa.Table(
    "alert_state", metadata,
    sa.Column("subject", sa.String(200), primary_key=True),
    sa.Column("down", sa.Boolean, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("announced_at", TIMESTAMP, nullable=False),
    sa.Column("good_at", TIMESTAMP),  # when good news of it was last sent (flapping holds the next one back)
    sa.Column("relay", sa.String(128), nullable=False),
)

# Revision 16: the client keys (issue 29): those of the codex_client_keys file (``source`` 'file', upserted at
# every start) and those made through the admin API or ``./run.sh keys`` ('admin'). Only the SHA-256 of a
# secret is kept (``key_sha256``, hex); a limit column is NULL when the key has no such limit; ``nodes``,
# ``models`` and ``endpoints`` are JSON lists. A revoked key (``revoked_at``) stays for its usage and name.
client_keys = sa.Table(
    "client_keys", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("key_sha256", sa.String(64), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("nodes", sa.Text),
    sa.Column("models", sa.Text),
    sa.Column("endpoints", sa.Text),
    sa.Column("daily_requests", sa.BigInteger),
    sa.Column("daily_tokens", sa.BigInteger),
    sa.Column("monthly_cost", sa.Double),
    sa.Column("rpm", sa.Integer),
    sa.Column("concurrency", sa.Integer),
    sa.Column("created_at", TIMESTAMP, nullable=False),
    sa.Column("updated_at", TIMESTAMP, nullable=False),
    sa.Column("revoked_at", TIMESTAMP),
    # revision 17: plan-shaped budgets (a JSON list of {window, requests|tokens|cost, models}: store.keys.Budget),
    # when the key stops working, and the share of a budget that raises key_budget_warning
    sa.Column("budgets", sa.Text),
    sa.Column("expires_at", TIMESTAMP),
    sa.Column("warn_at", sa.Double),
    # revision 18: the limits the codex_client_keys file sets (comma-separated, as last applied; NULL: none, or
    # not a file key): the file's, so the admin API refuses to change them.
    sa.Column("file_fields", sa.String(255)),
)

# Revision 16: one counter row, bumped in the transaction of every change to ``client_keys``; relays on one
# database read it every second (``codex_key_sync``) and reload their keys when it moves.
client_key_state = sa.Table(
    "client_key_state", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),
)

# Revision 17: what the plan-shaped budgets count, per client key, bucket and model (``store.budgets``):
# ``width`` 1 (a UTC minute: the 5-hour rolling window) or 1440 (a UTC day: daily, weekly, monthly and total
# windows), ``start`` the bucket's first instant. ``admitted`` is added by the admission transaction (exact
# request budgets); ``total_tokens`` and ``cost`` by the writer with the invocation rows (store.rollups' SPAN).
client_key_spans = sa.Table(
    "client_key_spans", metadata,
    sa.Column("client_key", sa.String(64), primary_key=True),
    sa.Column("width", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("start", sa.DateTime, primary_key=True),
    sa.Column("model", sa.String(128), primary_key=True),
    _counter("admitted"),
    _counter("total_tokens"),
    sa.Column("cost", sa.Double, nullable=False, server_default="0"),
)

# Revision 17: one row per client key whose admission is serialised fleet-wide (fleet rpm and concurrency,
# request budgets): the admission transaction's first statement increments ``admissions``, whose row lock
# (MariaDB) or write lock (SQLite) orders the key's admissions across relays (``store.fleetlimits``).
client_key_gate = sa.Table(
    "client_key_gate", metadata,
    sa.Column("client_key", sa.String(64), primary_key=True),
    _counter("admissions"),
)

# Revision 17: the calls of keys with fleet-wide rpm or concurrency, one row per admitted call: ``started_at``
# (rpm: the calls started in the last 60 s) and ``lease_until``, which the relay running the call pushes
# forward while it runs and clears (NULL) when it ends (concurrency: the rows whose lease holds); a crashed
# relay's calls free their slots when the lease runs out. Rows are deleted once out of both.
client_key_calls = sa.Table(
    "client_key_calls", metadata,
    sa.Column("holder", sa.String(64), primary_key=True),
    sa.Column("client_key", sa.String(64), nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("lease_until", sa.DateTime),
    sa.Index("idx_client_key_calls_key", "client_key", "started_at"),
)

# Revision 18: every relay on the database, one row each, written by its heartbeat (``store.relays``): who it is,
# since when it runs, its writer's counters (this process's, since its start: a snapshot each beat, the row is
# its relay's alone) and when it last beat. A clean shutdown sets ``stopped_at``; a relay whose beats stopped
# without it is gone (the admin page says so after a few missed beats).
relays = sa.Table(
    "relays", metadata,
    sa.Column("relay", sa.String(160), primary_key=True),  # host:port, the same across restarts (-p 0: host/pid)
    sa.Column("name", sa.String(128), nullable=False),  # codex_source when set, else host:port
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", TIMESTAMP, nullable=False),
    sa.Column("seen_at", TIMESTAMP, nullable=False),
    sa.Column("interval_s", sa.Double, nullable=False),  # seconds between its beats
    sa.Column("stopped_at", TIMESTAMP),
    sa.Column("writer", sa.String(16)),  # ok | unreachable (the database) | stalled (the process); NULL: none
    sa.Column("stalls", COUNTER, nullable=False, server_default="0"),  # stalled writer processes replaced
    sa.Column("queued", COUNTER, nullable=False, server_default="0"),
    sa.Column("written", COUNTER, nullable=False, server_default="0"),
    sa.Column("spooled", COUNTER, nullable=False, server_default="0"),
    sa.Column("rejected", COUNTER, nullable=False, server_default="0"),
    sa.Column("lost", COUNTER, nullable=False, server_default="0"),
    sa.Column("last_error", sa.String(300)),
)

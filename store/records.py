"""Plain records passed from the relay to the store: no SQLAlchemy, no mitmproxy.

Token convention (OpenAI's, for every API format): ``input_tokens`` includes
``cached_tokens`` (and Anthropic's cache writes), ``output_tokens`` includes
``reasoning_tokens``; ``total_tokens`` = input + output.
"""

from __future__ import annotations

import datetime as dt
import operator
from dataclasses import dataclass, field, fields


def utcnow() -> dt.datetime:
    """Naive UTC, as every timestamp column is stored."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@dataclass(slots=True)
class Usage:
    """A call's billed tokens: cache reads and writes (OpenAI's and Anthropic's) are inside the input,
    reasoning (Anthropic's thinking) inside the output; with Anthropic ``usage.iterations`` every
    iteration is counted (``addon.metering.usage.iteration_usages`` gives each one from the raw usage).

    ``cached_tokens`` is the code's one name for the cached part of the input; older columns keep
    theirs (``codex_invocations.cache_input_tokens``, ``nodes.total_cached``: ``store.rollups`` maps them)."""

    input_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __reduce__(self) -> tuple:
        return Usage, _USAGE_FIELDS(self)


# What a node's config stores, besides its id (store.nodes: the columns of the same names).
NODE_CONFIG_FIELDS = frozenset({"name", "base_url", "api_key", "weight", "formats", "models", "model_map",
                                "usage_probe", "auth_header"})


@dataclass(slots=True)
class NodeConfig:
    """One upstream node as configured (TOML or admin page); stats are never part of it."""

    id: str
    base_url: str
    api_key: str = field(default="", repr=False)  # never in a repr: flows, logs and tracebacks print those
    name: str = ""
    weight: int = 1
    # What the node serves (addon.nodes.modelroute): API families or formats, model globs; empty: everything.
    formats: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    model_map: dict[str, str] = field(default_factory=dict)  # client's model -> the name this node wants
    # Ask for usage in chat streams that lack it (addon.metering.usageprobe); off for upstreams rejecting
    # stream_options.
    usage_probe: bool = True
    # The header the node's key goes in ("authorization": as a Bearer token); empty: derived (addon.egress).
    auth_header: str = ""
    # Takes Responses over WebSocket (addon.wsrelay); false: upgrades go to other nodes, or are answered 426.
    # From the nodes file only: not a column (a node added on the admin page takes WebSockets).
    websocket: bool = True
    # The config fields its source set (a nodes file's [[nodes]] table may leave some out): those of a file node
    # are the file's (store.nodes). Not part of the node's identity or config.
    given: frozenset[str] = field(default=NODE_CONFIG_FIELDS, compare=False, repr=False)


@dataclass(slots=True)
class InvocationRecord:
    """One metered call through the relay: one `codex_invocations` row plus node increments."""

    invoke_id: str
    occurred_at: dt.datetime
    source: str
    endpoint: str
    status: str  # "success" | "failed" | "truncated" | "aborted" (addon.metering.outcome decides)
    node_id: str | None = None
    api_format: str | None = None  # "responses" | "chat" | "messages" | None
    model: str | None = None
    requested_model: str | None = None  # what the client asked for (``model`` is what the node reported)
    stream: bool = False
    http_status: int | None = None
    error_message: str | None = None
    usage: Usage = field(default_factory=Usage)
    cost: float | None = None  # USD, estimated from the price table; None: model not priced
    cost_input: float | None = None  # the split of ``cost``: uncached input, cached input, output
    cost_cached: float | None = None
    cost_output: float | None = None
    cost_cache_write: float | None = None  # the share of ``cost_input`` spent writing the prompt cache
    ttfb_ms: int | None = None
    stream_ms: int | None = None
    duration_ms: int | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    attempts: int = 1
    client_key: str | None = None
    payload: str | None = None
    raw_response: str | None = None
    # Whether this call counts against the node's health (a client abort does not).
    node_failure: bool = False
    # Short notes about the row (free-form: "raw_trimmed", "no_usage", ...), stored as a sorted set.
    flags: list[str] = field(default_factory=list)
    # The conversation the call belongs to (addon.nodes.sessions): what keeps it on one node; None: none named.
    # A record journaled (store.write.journal) before this field existed decodes without it: None.
    session_key: str | None = None

    def __reduce__(self) -> tuple:
        return InvocationRecord, _RECORD_FIELDS(self)


# Every record is pickled to the writer process: its fields as one tuple (the constructor's order) take
# half the time of a slots dataclass's default state (3.3 vs 6.2 µs a Codex-like record).
_USAGE_FIELDS = operator.attrgetter(*(f.name for f in fields(Usage)))
_RECORD_FIELDS = operator.attrgetter(*(f.name for f in fields(InvocationRecord)))


@dataclass(slots=True)
class NodeStateUpdate:
    """A health change of one node, persisted through the writer like any record."""

    node_id: str
    failed: bool | None = None  # None: leave as is
    # An attempt the client never saw (retried elsewhere): counts as a request and a failure of the node.
    failed_attempt: bool = False
    last_error: str | None = None  # None: leave as is
    pinged: bool = False  # True: write both ping columns (last_ping_err None clears it)
    last_ping_ms: int | None = None
    last_ping_err: str | None = None


@dataclass(slots=True)
class KeyCount:
    """One admission or refusal of a client key's call, added to its day in ``client_key_usage`` by the
    writer like every other record (so it is journaled while the database is away)."""

    client_key: str
    day: dt.date
    counter: str  # "admitted" (a call under a daily_requests limit) or "refused_<reason>"


# What the relay hands to the writer.
Item = InvocationRecord | NodeStateUpdate | KeyCount

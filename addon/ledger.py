"""Finishing a call: its key's slot freed, its node's health told, its record priced, submitted and shown.

The relay's hooks (and ``addon.wsrelay``'s turns) end here; the record itself is the call's own
(``addon.metering.call``). Hooks are cheap and never touch the database: records go to the runtime's writer.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import http
from mitmproxy.utils import human

from addon.errors import CLIENT_KEY_NAME
from addon.guard.endpoints import UNBILLED
from addon.guard.secrets import KnownSecrets
from addon.limits import Limits
from addon.metering.call import Call, Exchange
from addon.metering.meter import MeterResult
from addon.metering.outcome import Outcome, rest_asked
from addon.metering.usage import iteration_usages
from addon.nodes.routing import Node
from addon.observe.loglines import CALL_COMMENT
from addon.services.runtime import Runtime
from store.records import InvocationRecord, NodeStateUpdate

log = logging.getLogger("codex.relay")

DEFAULT_SOURCE = "relay"


class Ledger:
    """Where the relay's calls are accounted for: health, limits, prices and the writer (through ``runtime``)."""

    def __init__(self, runtime: Runtime, secrets: KnownSecrets, limits: Limits | None) -> None:
        self.runtime = runtime
        self.secrets = secrets
        self.limits = limits
        self.source = DEFAULT_SOURCE  # codex_source, set by the relay's configure
        self.call_lines = False  # a line per recorded call in the log (addon.observe.loglines.take_call_lines)

    def finish(self, flow: http.HTTPFlow, call: Call, outcome: Outcome, result: MeterResult | None = None) -> None:
        """Record the call; ``result``: its meter's, when the caller has it already."""
        outcome = call.outcome(self.settle(flow, outcome))
        if result is None and call.meter is not None:
            result = call.meter.result()
        self.report_node(call.node, outcome, call, flow.response)
        self.submit(flow, call.record(outcome, exchange_of(flow), result, self.source))

    def settle(self, flow: http.HTTPFlow, outcome: Outcome, holder: str | None = None) -> Outcome:
        """A call of ``flow`` (``holder``: as ``Limits.admit`` was given it) ended: its key's slot is free, and
        ``outcome`` comes back with its error scrubbed (upstream text: it may echo a key back)."""
        if self.limits is not None:
            self.limits.release(flow, holder)
        if outcome.error:
            return Outcome(outcome.status, outcome.node_failure, self.secrets.scrub(outcome.error[:2000]))
        return outcome

    def report_node(self, node: Node | None, outcome: Outcome, holder: object,
                    answer: http.Response | None = None) -> None:
        """Tell the node's health how a call (``holder``: what ``NodePool.choose`` was given) ended."""
        if node is None:
            return
        if outcome.node_failure:
            self.runtime.health.failure(node, outcome.error or outcome.status, _rest_asked(answer))
        elif outcome.status == "success":
            self.runtime.health.success(node)
        else:  # a client abort or a client error says nothing about the node
            self.runtime.health.release(node, holder)

    def attempt_failed(self, node: Node, error: str, answer: http.Response | None = None) -> None:
        """A failed attempt that the client did not see (``answer``: the node's): it still counts against the node."""
        error = self.secrets.scrub(error[:1000])
        self.runtime.health.failure(node, error, _rest_asked(answer))
        self.runtime.submit(NodeStateUpdate(node.id, last_error=error, failed_attempt=True))

    def submit(self, flow: http.HTTPFlow, record: InvocationRecord) -> None:
        """Price a finished call's record, hand it to the writer and show it on its flow (``record.usage`` set)."""
        prices = self.runtime.prices
        cost = (prices.call_cost(record.model, record.usage, iteration_usages(record.raw_response))
                if prices and record.api_format not in UNBILLED else None)  # token counting is never billed
        if cost is not None:
            record.cost, record.cost_input, record.cost_cached, record.cost_output, record.cost_cache_write = (
                cost.total, cost.input, cost.cached, cost.output, cost.cache_write)
        self.runtime.submit(record)
        _annotate(flow, record)
        if self.call_lines:
            log.info("%s: %s %s << %s %s", human.format_address(flow.client_conn.peername), flow.request.method,
                     record.endpoint, record.http_status or "-", flow.comment)


def exchange_of(flow: http.HTTPFlow) -> Exchange:
    """What mitmproxy measured of ``flow``, now that it ends."""
    resp = flow.response
    return Exchange(path=flow.request.path, client_key=flow.metadata.get(CLIENT_KEY_NAME),
                    request_start=flow.request.timestamp_start, request_end=flow.request.timestamp_end,
                    response_start=resp.timestamp_start if resp is not None else None,
                    http_status=resp.status_code if resp is not None else None,
                    body_bytes=len(resp.raw_content or b"") if resp is not None else 0, ended_at=time.time())


def _annotate(flow: http.HTTPFlow, record: InvocationRecord) -> None:
    """What mitmweb shows in its flow list."""
    u = record.usage
    flow.comment = (
        f"{CALL_COMMENT}{record.node_id or 'direct'} {record.model or '?'} {record.status} "
        f"in {u.input_tokens} (cached {u.cached_tokens}) out {u.output_tokens} "
        f"ttfb {record.ttfb_ms if record.ttfb_ms is not None else '-'} ms"
        + (f" attempts {record.attempts}" if record.attempts > 1 else "")
    )
    if record.status != "success":
        flow.marked = ":warning:"


def _rest_asked(answer: http.Response | None) -> float:
    """Seconds a node's answer asked to be left alone (``addon.metering.outcome.rest_asked``)."""
    return rest_asked(answer.status_code, answer.headers.get("retry-after")) if answer is not None else 0.0

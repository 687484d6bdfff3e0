"""One client call while it is in flight, and the record it becomes.

Plain Python (no mitmproxy): the relay's hooks fill a ``Call`` with what they learn and measure (its node,
attempts, meter, why the relay ended it), and hand what mitmproxy measured of the exchange over as an
``Exchange``; ``Call.record`` turns both into the ``InvocationRecord`` without looking at anything else, so
a record is tested from plain values.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from addon.guard.endpoints import UNBILLED
from addon.metering.meter import MeterResult, StreamMeter
from addon.metering.outcome import Outcome, ms
from addon.metering.usage import RequestInfo
from addon.nodes.routing import Node
from store.records import InvocationRecord, utcnow


@dataclass(frozen=True, slots=True)
class Exchange:
    """What mitmproxy measured of a call's request and answer (timestamps in seconds since the epoch)."""

    path: str  # the request's path as sent (with its query)
    client_key: str | None  # the name of the client's key (never the key)
    request_start: float
    request_end: float | None
    response_start: float | None  # None: no answer came
    http_status: int | None
    body_bytes: int  # the answer's body as held whole (an answer no meter saw)
    ended_at: float


@dataclass(slots=True)
class Call:
    """What the relay knows about one client call while it is in flight."""

    invoke_id: str
    occurred_at: dt.datetime
    api_format: str | None
    model: str | None
    stream: bool
    session_key: str | None
    request_bytes: int
    client_target: str  # the path (and query) the client asked for: every attempt maps this one
    node: Node | None = None
    attempts: int = 1
    tried: list[str] = field(default_factory=list)
    meter: StreamMeter | None = None
    retry: bool = False  # an HTTP failure waits in the response hook for another node
    relay_error: str | None = None  # why the relay itself ended or refused the call (a timeout, no node)
    requested_model: str | None = None  # the client's model; ``model`` becomes the one sent, then reported
    original_body: bytes | None = None  # the client's body, kept once the relay rewrote it for a node
    probed: bool = False  # the body sent asks for usage the client did not ask for (addon.metering.usageprobe)
    model_filter: Callable[[str], bool] | None = None  # a model list answered with only the key's models
    websocket: bool = False  # a Responses WebSocket upgrade: its turns are the invocations (addon.wsrelay)

    @classmethod
    def start(cls, client_target: str, api_format: str | None, info: RequestInfo, *, session_key: str | None,
              request_bytes: int, websocket: bool = False) -> Call:
        """A call that has just come in: a fresh invocation id, now as its time."""
        return cls(invoke_id=os.urandom(16).hex(), occurred_at=utcnow(), api_format=api_format, model=info.model,
                   stream=info.stream, session_key=session_key, request_bytes=request_bytes,
                   client_target=client_target, requested_model=info.model, websocket=websocket)

    def attempt(self, node: Node) -> None:
        """``node`` takes the call from now on (its first node, or the next one)."""
        self.node = node
        self.tried.append(node.id)

    def outcome(self, outcome: Outcome) -> Outcome:
        """How the call ended: ``outcome``, whose error is the relay's own when the relay ended or refused it."""
        if self.relay_error and outcome.status != "success":
            return Outcome(outcome.status, outcome.node_failure, self.relay_error)
        return outcome

    def record(self, outcome: Outcome, exchange: Exchange, result: MeterResult | None,
               source: str) -> InvocationRecord:
        """The call's record: ``outcome`` as ``outcome()`` gave it, ``result`` its meter's, if it had one."""
        ttfb_ms = stream_ms = None
        if exchange.response_start and exchange.request_end:
            ttfb_ms = ms(exchange.response_start - exchange.request_end)
            last = (result.last_chunk_at if result else None) or exchange.response_start
            stream_ms = ms(last - exchange.response_start)
        node = self.node
        record = InvocationRecord(
            invoke_id=self.invoke_id, occurred_at=self.occurred_at, source=source,
            endpoint=exchange.path.split("?", 1)[0][:255], status=outcome.status,
            node_id=node.id if node else None, api_format=self.api_format,
            model=self.model, stream=self.stream, http_status=exchange.http_status,
            error_message=outcome.error, ttfb_ms=ttfb_ms, stream_ms=stream_ms,
            duration_ms=ms(exchange.ended_at - exchange.request_start), request_bytes=self.request_bytes,
            response_bytes=self.meter.bytes if self.meter else exchange.body_bytes,
            attempts=self.attempts, raw_response=result.raw_usage if result else None,
            client_key=exchange.client_key, node_failure=outcome.node_failure,
            requested_model=self.requested_model, session_key=self.session_key,
        )
        if result is not None and self.api_format not in UNBILLED:  # token counting: a row, never tokens or cost
            record.flags = list(result.flags)
            if result.usage is not None:
                record.usage = result.usage
        return record


def is_sse(content_type: str | None) -> bool:
    """Whether a Content-Type value is an event stream's."""
    return (content_type or "").startswith("text/event-stream")

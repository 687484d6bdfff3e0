"""The relay addon: pick a node, rewrite the request, meter the streamed answer, queue the record.

The flow hooks, failover and record building, and nothing else: the nodes, their health, the prices
and the writer belong to the ``Runtime`` it is given (``addon.runtime``). Hooks are cheap and never
touch the database (the runtime's writer process does).

Failover within mitmproxy's flow model (docs/how-it-works.md, "Failover"):
- a node that refuses or does not accept the connection is found by a connect probe in the ``request``
  hook (only when the client has no open connection to it yet) and the call moves to another node
  before anything is sent; when no node accepts one, the client gets a JSON 502;
- an HTTP failure status (5xx, 429, 401, 403) is kept from the client: the ``response`` hook retries
  on other nodes with mitmproxy's own client and hands the first good answer over whole;
- once response bytes have gone to the client nothing is retried (an error event inside a 200 stream
  is recorded as a failure of that node).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import ctx, exceptions, http
from mitmproxy.addons.clientplayback import ReplayHandler
from mitmproxy.proxy import server_hooks
from mitmproxy.utils import human

from addon.callbody import BodyRefused, read_call_body
from addon.egress import Origin, attach, clear_as_is, header_values, origin_of
from addon.endpoints import UNBILLED, detect_format, filter_model_list, is_model_list
from addon.errors import CLIENT_KEY_NAME, error_response, fail_closed, refusal_response
from addon.inject import answer_waiting, can_answer, close_server
from addon.limits import Limits
from addon.loglines import CALL_COMMENT, demote_streaming_line, restore_streaming_line, take_call_lines
from addon.meter import MeterResult, StreamMeter
from addon.modelroute import rewrite_model, serves_model, upstream_model
from addon.nodeconn import Via, open_to, via_of
from addon.options import seconds
from addon.outcome import Outcome, classify_error, classify_response, is_node_failure_status, rest_asked
from addon.outcome import ms as _ms
from addon.refusal import REFUSED_KEY, RefusalSink, answered
from addon.routing import Node
from addon.runtime import Runtime
from addon.secrets import KnownSecrets
from addon.sessions import SESSION_HEADERS, session_key
from addon.target import target_problem
from addon.usage import RequestInfo, iteration_usages
from addon.usageprobe import UsageChunkFilter, add_include_usage
from addon.wsrelay import Sockets, is_upgrade, upgrade_required
from store.records import InvocationRecord, NodeStateUpdate, utcnow

log = logging.getLogger("codex.relay")

RETRY_KEY = "codex_retry"
# An error answer of a node is held back (not streamed) to retry the call elsewhere only up to this size
# and only with a content-length; a larger one streams through to the client and is not retried.
MAX_HELD_ERROR_BYTES = 1 << 20
DEFAULT_SOURCE = "relay"
DEFAULT_MAX_REQUEST_BODY = 32 * 2**20
# A node due for its trial within this many seconds: the refused client is told to retry then.
SHORT_WAIT_S = 5


@dataclass(slots=True)
class CallState:
    """What the relay knows about one client call while it is in flight."""

    flow: http.HTTPFlow
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
    timer: asyncio.TimerHandle | None = None
    relay_error: str | None = None  # why the relay itself ended or refused the call (a timeout, no node)
    requested_model: str | None = None  # the client's model; ``model`` becomes the one sent, then reported
    original_body: bytes | None = None  # the client's body, kept once the relay rewrote it for a node
    probed: bool = False  # the body sent asks for usage the client did not ask for (addon.usageprobe)
    model_filter: Callable[[str], bool] | None = None  # a model list answered with only the key's models
    websocket: bool = False  # a Responses WebSocket upgrade: its turns are the invocations (addon.wsrelay)


class Relay:
    """The flow hooks: routes each call over the runtime's nodes and records it through the runtime."""

    def __init__(self, runtime: Runtime, refusals: RefusalSink | None = None,
                 secrets: KnownSecrets | None = None, limits: Limits | None = None) -> None:
        self.runtime = runtime
        self.limits = limits  # client keys' limits (teams); None: none
        self.refusals = refusals or RefusalSink()
        self.secrets = secrets or KnownSecrets()
        self._first_byte_timeout = 300.0
        # (client connection id, node address) of open upstream connections: no probe needed for those
        self._connected: set[tuple[str, tuple[str, int]]] = set()
        # calls whose answer is streaming: the idle watch looks at them
        self._streaming: dict[str, CallState] = {}
        self._idle_timeout = 300.0
        self._keep_body = 0
        self._call_lines = False  # a line per recorded call in the log (addon.loglines.take_call_lines)
        # Options read for every call, kept here by configure: an option read costs a deep copy.
        self._source = DEFAULT_SOURCE
        self._max_body = DEFAULT_MAX_REQUEST_BODY
        self._idle_watch: asyncio.TimerHandle | None = None
        # flow id -> its call in flight. Not in flow.metadata: -w pickles that, and a call holds timers.
        self._calls: dict[str, CallState] = {}
        runtime.on_shutdown(self._record_calls_in_flight)
        self.sockets = Sockets(self)
        self.addons = [self.sockets]
        runtime.metrics.count_in_flight(lambda: len(self._calls))

    # -- options -----------------------------------------------------------------------------------
    def load(self, loader) -> None:
        demote_streaming_line()  # every answer streams: mitmproxy's line for it would repeat per call
        self._call_lines = take_call_lines(ctx.options, ctx.master.addons.get("dumper"))
        loader.add_option("codex_source", str, DEFAULT_SOURCE,
                          "Tag written to codex_invocations.source for calls this relay records.")
        loader.add_option("codex_keep_body", int, -1,
                          "Keep up to this many bytes of each streamed response body on the flow, for "
                          "mitmweb and -w. 0 keeps none; -1 (default): 256 KiB where something shows or saves "
                          "flows (mitmweb, save_stream_file / -w), none in a plain mitmdump.")
        loader.add_option("codex_retries", int, 2,
                          "Retry a call that failed before its first byte reached the client on up to "
                          "this many other nodes.")
        loader.add_option("codex_idle_timeout", str, "300",
                          "Seconds a streaming answer may go without a byte from its node before the relay "
                          "ends it (recorded truncated, a failure of the node). 0: no limit.")
        loader.add_option("codex_first_byte_timeout", str, "300",
                          "Seconds to wait for a node's response headers before the call is failed.")
        loader.add_option("codex_max_request_body", int, DEFAULT_MAX_REQUEST_BODY,
                          "Largest request body (bytes) the relay forwards; a larger one gets HTTP 413 and "
                          "reaches no node.")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "codex_source" in updated and not (0 < len(opts.codex_source) <= 32):
            raise exceptions.OptionsError("codex_source must be 1 to 32 characters")
        for name in ("codex_retries", "codex_max_request_body"):
            if name in updated and getattr(opts, name) < 0:
                raise exceptions.OptionsError(f"{name} must be >= 0")
        if "codex_source" in updated:
            self._source = opts.codex_source
        if "codex_max_request_body" in updated:
            self._max_body = opts.codex_max_request_body
        if "codex_keep_body" in updated and opts.codex_keep_body < -1:
            raise exceptions.OptionsError("codex_keep_body must be >= 0, or -1 for automatic")
        if updated & {"codex_keep_body", "save_stream_file"}:
            self._keep_body = keep_body_bytes(opts.codex_keep_body, shown=ctx.master.addons.get("view") is not None,
                                              saved="save_stream_file" in opts and bool(opts.save_stream_file))
        # Only options in ``updated``: see Runtime.configure.
        if "codex_idle_timeout" in updated:
            self._idle_timeout = seconds("codex_idle_timeout", opts.codex_idle_timeout)
        if "codex_first_byte_timeout" in updated:
            self._first_byte_timeout = seconds("codex_first_byte_timeout", opts.codex_first_byte_timeout,
                                               allow_zero=False)

    def _record_calls_in_flight(self) -> None:
        """At shutdown (from the runtime's done, before the writer's last flush)."""
        for state in list(self._calls.values()):
            self._finish(state.flow, state, Outcome("aborted", False, "the relay shut down during the call"))
        self._calls.clear()
        self._streaming.clear()
        if self._idle_watch is not None:
            self._idle_watch.cancel()
            self._idle_watch = None

    def done(self) -> None:
        restore_streaming_line()

    # -- hooks -------------------------------------------------------------------------------------
    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if answered(flow) or RETRY_KEY in flow.metadata:
            return
        length = flow.request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._max_body:
            self._too_large(flow)

    def _too_large(self, flow: http.HTTPFlow) -> None:
        limit = self._max_body
        self.refusals.refuse(flow, error_response(
            flow.request.path, 413, f"codex-relay: the request body is larger than {limit} bytes "
            "(codex_max_request_body)", "request_too_large"), "request body too large")

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if answered(flow) or RETRY_KEY in flow.metadata:
            return
        # A chunked body has no length up front: mitmproxy has read it by now.
        if len(flow.request.raw_content or b"") > self._max_body:
            self._too_large(flow)
            return
        target = flow.request.path
        pool = self.runtime.pool
        routed = len(pool) > 0
        problem = target_problem(target) if routed else None
        if problem:  # as a forward proxy: the Gate checks only the relay's own port
            self.refusals.refuse(flow, error_response(target, 400, f"codex-relay: {problem}",
                                                      "invalid_request_target"), problem)
            return
        api_format = detect_format(target)
        state = None
        # Every call to a node is recorded, metered where its endpoint is known; a monitor (no nodes, perhaps a
        # forward proxy for anything) records only API calls.
        if api_format is not None or routed:
            info = RequestInfo(None, False, None)
            if api_format is not None and flow.request.method == "POST":
                try:
                    info = read_call_body(flow.request.raw_content, flow.request.headers.get("content-encoding"),
                                          limit=self._max_body)
                except BodyRefused as e:
                    self.refusals.refuse(flow, error_response(target, e.status, e.message, e.code), e.code)
                    return
            state = CallState(
                flow=flow, invoke_id=os.urandom(16).hex(), occurred_at=utcnow(), api_format=api_format,
                model=info.model, stream=info.stream, session_key=_session_key(flow, info.session_key),
                request_bytes=len(flow.request.raw_content or b""), client_target=target, requested_model=info.model,
            )
            state.websocket = api_format == "responses" and is_upgrade(flow.request)
            self._calls[flow.id] = state
            # A socket is no call: each of its turns is admitted (addon.wsrelay).
            if (self.limits is not None and not state.websocket
                    and (refusal := await self.limits.admit(flow, state.model, api_format=api_format)) is not None):
                del self._calls[flow.id]  # refused: no invocation, no node
                flow.metadata[REFUSED_KEY] = refusal.status_code
                flow.response = refusal
                return
            if self.limits is not None and is_model_list(target):
                state.model_filter = self.limits.model_filter(flow)
        if not routed:
            clear_as_is(flow)  # monitor mode: the request goes where it was sent, unchanged
            return
        barred = self._barred(flow)
        model = state.model if state else None
        if state is not None and not pool.serves_any(api_format, model, exclude=barred):
            whose = (f"none of key {flow.metadata.get(CLIENT_KEY_NAME)!r}'s nodes serves"
                     if pool.serves_any(api_format, model) else "no configured node serves")
            state.relay_error = f"{whose} model {model!r} ({api_format})"
            # 400: the one status every client takes as final and shows with its message (docs/refusals.md).
            flow.response = refusal_response(target, 400, f"codex-relay: {state.relay_error}", "model_not_found")
            return
        node = pool.choose(session_key=state.session_key if state else None, holder=state, exclude=barred,
                           api_format=api_format, model=model)
        if node is None:
            flow.response = self._no_node(target, state, pool.cooldown_left(exclude=barred, api_format=api_format,
                                                                             model=model))
            return
        if state is not None:
            state.node = node
            state.tried.append(node.id)
            node = await self._reachable(flow, state)
            if node is None:  # which node and why (its address) stay in the record and the relay's log
                log.warning("call %s: no node accepted a connection (%s)", state.invoke_id, state.relay_error)
                flow.response = error_response(
                    target, 502, "codex-relay: no upstream node accepted a connection", "upstream_unreachable")
                return
            if state.websocket and (node := await self.sockets.takes_upgrade(flow, state)) is None:
                del self._calls[flow.id]  # no node takes it: no invocation, the client uses HTTP
                flow.response = upgrade_required(target, state.relay_error)
                return
        attach(flow, node.config, target)
        if state is not None:
            _prepare_body(flow.request, state, node)
            state.timer = asyncio.get_running_loop().call_later(
                self._first_byte_timeout, self._first_byte_timed_out, flow)

    @staticmethod
    def _no_node(target: str, state: CallState | None, wait: float | None) -> http.Response:
        """The refusal of a call no node may take now (``wait``: ``NodePool.cooldown_left``); it is no attempt
        of a node. A client is told to retry only when a node is due within seconds."""
        if wait is None:
            reason, retry_after = "every node that serves this call is disabled or has weight 0", None
        else:
            due = max(1, math.ceil(wait))
            reason = f"every node that serves this call is failing; the next is tried again in {due} s"
            retry_after = due if due <= SHORT_WAIT_S else None
        if state is not None:
            state.relay_error = reason
        return refusal_response(target, 429, f"codex-relay: no upstream node is available: {reason}",
                                "no_node_available", retry_after=retry_after)

    async def _reachable(self, flow: http.HTTPFlow, state: CallState) -> Node | None:
        """The call's node, or the next one that accepts a TCP connection, before anything is sent.

        A node this client already has a connection to is taken as reachable: probing costs a
        connection, so it is done only where mitmproxy is about to open one.
        """
        node = state.node
        while node is not None:
            origin = origin_of(node.config.base_url)
            if (flow.client_conn.id, (origin.host, origin.port)) in self._connected:
                return node
            err = await _probe(origin, via_of(flow), self.runtime.connect_timeout)
            if err is None:
                return node
            state.relay_error = err
            nxt = self._next_node(state)
            if nxt is None:
                return None  # the last node's failure is the call's own (state.node names it)
            log.warning("node %s: %s; trying node %s", node.id, err, nxt.id)
            self._attempt_failed(node, err)
            node = state.node = nxt
        return None

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if (address := data.server.address) is not None:
            self._connected.add((data.client.id, (address[0], address[1])))

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if (address := data.server.address) is not None:
            self._connected.discard((data.client.id, (address[0], address[1])))

    def _next_node(self, state: CallState) -> Node | None:
        """Another node for a retry, if the retry budget allows; records the attempt."""
        if state.attempts > ctx.options.codex_retries:
            return None
        pool = self.runtime.pool
        node = pool.choose(exclude=[*state.tried, *self._barred(state.flow)], holder=state,
                           api_format=state.api_format, model=state.requested_model)
        if node is None:
            return None
        state.tried.append(node.id)
        state.attempts += 1
        if state.session_key:
            pool.sticky.put(state.session_key, node.id)
        return node

    def _barred(self, flow: http.HTTPFlow) -> set[str]:
        """Nodes the flow's client key may not use, and for a WebSocket upgrade those that take none."""
        barred = self.limits.barred(flow) if self.limits is not None else set()
        state = self._calls.get(flow.id)
        return barred | self.sockets.barred() if state is not None and state.websocket else barred

    def _attempt_failed(self, node: Node, error: str, answer: http.Response | None = None) -> None:
        """A failed attempt that the client did not see (``answer``: the node's): it still counts against the node."""
        error = self.secrets.scrub(error[:1000])
        self.runtime.health.failure(node, error, _rest_asked(answer))
        self.runtime.submit(NodeStateUpdate(node.id, last_error=error, failed_attempt=True))

    def _first_byte_timed_out(self, flow: http.HTTPFlow) -> None:
        state = self._calls.get(flow.id)
        if state is None or flow.response is not None or flow.error is not None:
            return
        state.relay_error = f"no response headers within {self._first_byte_timeout:g} s"
        if can_answer(flow):
            # The client gets a JSON 504 (retried on another node like any failure status) ...
            answer = error_response(state.client_target, 504, f"codex-relay: the node sent {state.relay_error}",
                                    "upstream_timeout")
            asyncio.get_running_loop().create_task(answer_waiting(flow, answer))
        else:  # ... or, over HTTP/2 to the node, mitmproxy's own 502 when its connection is closed.
            close_server(flow)

    def _watch_idle(self) -> None:
        """End streams, and sockets' turns (addon.wsrelay), whose node has sent nothing for codex_idle_timeout
        (they count against it)."""
        self._idle_watch = None
        now = time.time()
        for state in list(self._streaming.values()):
            resp = state.flow.response
            last = (state.meter.last_chunk_at if state.meter else None) or (resp.timestamp_start if resp else now)
            if now - last >= self._idle_timeout:
                state.relay_error = f"no bytes from the node for {self._idle_timeout:g} s"
                del self._streaming[state.flow.id]
                close_server(state.flow)
        if self.sockets.turns_running:
            self.sockets.watch_idle(now, self._idle_timeout)
        self._arm_idle_watch()

    def _arm_idle_watch(self) -> None:
        if self._idle_watch is None and (self._streaming or self.sockets.turns_running) and self._idle_timeout:
            # Checked a few times per timeout: a stream ends at most a quarter late.
            self._idle_watch = asyncio.get_running_loop().call_later(min(self._idle_timeout / 4, 5.0),
                                                                      self._watch_idle)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = self._calls.get(flow.id)
        if state is None or flow.response is None:
            return
        self._stop_waiting(flow, state)
        if state.websocket:
            return  # a 101 has no body; another answer is held whole, for addon.wsrelay to replace
        resp = flow.response
        found = header_values(resp.headers, _CONTENT_HEADERS)  # one pass over the answer's headers
        length = _folded(found, "content-length") or ""
        if (state.node is not None and resp.status_code >= 400 and length.isdigit()
                and int(length) <= MAX_HELD_ERROR_BYTES):
            # A small error answer is held whole, not streamed: to retry the call elsewhere, and to
            # scrub keys the node echoes back before the client sees them.
            state.retry = (is_node_failure_status(resp.status_code) and state.attempts <= ctx.options.codex_retries
                           and self.runtime.pool.choose(exclude=[*state.tried, *self._barred(flow)],
                                                        api_format=state.api_format,
                                                        model=state.requested_model) is not None)
            return
        if state.model_filter is not None and resp.status_code == 200:
            return  # a model list is small: held whole, to answer only the key's models (response)
        resp.stream = _start_meter(state, resp, self._keep_body, found)
        self._streaming[flow.id] = state
        self._arm_idle_watch()

    async def response(self, flow: http.HTTPFlow) -> None:
        state = self._calls.pop(flow.id, None)
        if state is None or flow.response is None:
            return
        self._stop_waiting(flow, state)
        if state.websocket:
            self.sockets.upgraded(flow, state)
            return
        if state.retry:
            await self._retry(flow, state)
        resp = flow.response
        if state.model_filter is not None and state.node is not None and resp.status_code == 200:
            node, allowed = state.node.config, state.model_filter
            listed = filter_model_list(resp.content or b"", lambda m: serves_model(node, m) and allowed(m))
            if listed is not None:
                resp.content = listed
        if state.meter is None and resp.status_code >= 400:
            text = resp.get_text(strict=False)
            if text and (clean := self.secrets.scrub(text)) != text:
                resp.text = clean
        result = None
        if state.meter is None and state.node is None and len(self.runtime.pool):
            # Our own refusal (no node, no model): no node was tried.
            outcome = Outcome("failed", False, state.relay_error or "no upstream node available")
        else:
            if state.meter is None:  # a whole body: the retry's answer
                feed = _start_meter(state, resp)
                body = [*_chunks(feed(resp.raw_content or b"")), *_chunks(feed(b""))]
                if feed is not state.meter:
                    resp.raw_content = b"".join(body)
            meter = state.meter
            assert meter is not None  # set by responseheaders, or by _start_meter just above
            result = meter.result()
            state.model = result.model or state.model
            outcome = classify_response(resp.status_code, body_error=result.error,
                                        stream=state.stream or _is_sse(resp.headers.get("content-type")),
                                        completed=result.completed)
            if meter.kept:
                resp.raw_content = meter.kept
        self._finish(flow, state, outcome, result)

    async def _retry(self, flow: http.HTTPFlow, state: CallState) -> None:
        """Try other nodes with mitmproxy's replay client; the client gets the first good answer whole.

        ``state.node`` always names the node whose answer is in ``flow.response``: its failure is the
        invocation's own, every superseded attempt is recorded as a failed attempt of its node.
        """
        assert flow.response is not None and state.node is not None
        served = state.node
        while (node := self._next_node(state)) is not None:
            attempt = _copy_for_retry(flow)
            attach(attempt, node.config, state.client_target)
            _prepare_body(attempt.request, state, node)
            await ReplayHandler(attempt, ctx.options).replay()
            resp = attempt.response
            if resp is None:
                self._attempt_failed(node, str(attempt.error or "no response"))
                continue
            self._attempt_failed(served, f"HTTP {flow.response.status_code}", flow.response)
            flow.response, served = resp, node
            if not is_node_failure_status(resp.status_code):
                log.info("call %s served by node %s after %d attempts", state.invoke_id, node.id, state.attempts)
                break
        state.node = served

    def error(self, flow: http.HTTPFlow) -> None:
        state = self._calls.pop(flow.id, None)
        if state is None or flow.error is None:
            return
        self._stop_waiting(flow, state)
        if state.websocket:
            self.sockets.upgrade_failed(flow, state)
            return
        if state.meter is not None and state.meter.kept and flow.response is not None:
            flow.response.raw_content = state.meter.kept  # mitmweb shows what came before the cut
        outcome = classify_error(flow.error.msg, got_response=flow.response is not None)
        if state.relay_error:  # the relay ended it: a timeout of the node
            outcome = Outcome(outcome.status, True, state.relay_error)
        self._finish(flow, state, outcome)

    def _stop_waiting(self, flow: http.HTTPFlow, state: CallState) -> None:
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        self._streaming.pop(flow.id, None)

    # -- records -----------------------------------------------------------------------------------
    def _finish(self, flow: http.HTTPFlow, state: CallState, outcome: Outcome,
                result: MeterResult | None = None) -> None:
        """Record the call; ``result``: its meter's, when the caller has it already."""
        if self.limits is not None:
            self.limits.release(flow)
        if outcome.error:  # upstream text: it may echo a key back
            outcome = Outcome(outcome.status, outcome.node_failure, self.secrets.scrub(outcome.error[:2000]))
        if state.relay_error and outcome.status != "success":
            outcome = Outcome(outcome.status, outcome.node_failure, state.relay_error)
        resp = flow.response
        meter = state.meter
        if result is None and meter is not None:
            result = meter.result()
        ttfb_ms = stream_ms = None
        if resp is not None and resp.timestamp_start and flow.request.timestamp_end:
            ttfb_ms = _ms(resp.timestamp_start - flow.request.timestamp_end)
            last = (result.last_chunk_at if result else None) or resp.timestamp_start
            stream_ms = _ms(last - resp.timestamp_start)
        node = state.node
        self.report_node(node, outcome, state, resp)
        record = InvocationRecord(
            invoke_id=state.invoke_id, occurred_at=state.occurred_at, source=self._source,
            endpoint=flow.request.path.split("?", 1)[0][:255], status=outcome.status,
            node_id=node.id if node else None, api_format=state.api_format,
            model=state.model, stream=state.stream, http_status=resp.status_code if resp else None,
            error_message=outcome.error, ttfb_ms=ttfb_ms, stream_ms=stream_ms,
            duration_ms=_ms(time.time() - flow.request.timestamp_start), request_bytes=state.request_bytes,
            response_bytes=meter.bytes if meter else len(resp.raw_content or b"") if resp else 0,
            attempts=state.attempts, raw_response=result.raw_usage if result else None,
            client_key=flow.metadata.get(CLIENT_KEY_NAME), node_failure=outcome.node_failure,
            requested_model=state.requested_model, session_key=state.session_key,
        )
        billed = state.api_format not in UNBILLED  # token counting: a row, never tokens or cost
        if result is not None and billed:
            record.flags = list(result.flags)
            if result.usage is not None:
                record.usage = result.usage
        self.submit(flow, record)

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
        if self._call_lines:
            log.info("%s: %s %s << %s %s", human.format_address(flow.client_conn.peername), flow.request.method,
                     record.endpoint, record.http_status or "-", flow.comment)


AUTO_KEEP_BODY = 256 * 1024


def keep_body_bytes(option: int, *, shown: bool, saved: bool) -> int:
    """Bytes of each streamed body to keep on its flow: the option, or for -1 (automatic) 256 KiB where
    something shows or saves flows (mitmweb, ``-w``) and none otherwise — kept bodies are most of a
    stream's memory, and a plain mitmdump shows nobody."""
    if option >= 0:
        return option
    return AUTO_KEEP_BODY if shown or saved else 0


def _copy_for_retry(flow: http.HTTPFlow) -> http.HTTPFlow:
    """A copy of the client's request for mitmproxy's replay client."""
    attempt = flow.copy()
    attempt.metadata = {RETRY_KEY: True}
    attempt.is_replay = "request"
    attempt.response = None
    attempt.error = None
    return attempt


async def _probe(origin: Origin, via: Via | None, timeout: float) -> str | None:
    """Why a connection to the node cannot be made as the call's would be (TCP, through the upstream proxy's tunnel
    in upstream mode), or None when it can."""
    where = f"{origin.host}:{origin.port}"
    try:
        _, writer = await asyncio.wait_for(open_to(origin, via, tls=False), timeout)
    except TimeoutError:
        return f"connect to {where} timed out after {timeout:g} s"
    except OSError as e:
        return f"connect to {where} failed: {e.strerror or e}"
    writer.close()
    return None


def _prepare_body(request: http.Request, state: CallState, node: Node) -> None:
    """The body this node gets: the client's, with the model name the node wants (its ``model_map``)
    and, for a streamed chat call without usage, the usage probe unless the node turns it off."""
    model = upstream_model(node.config, state.requested_model)
    mapped = model is not None and model != state.requested_model
    probe = state.api_format == "chat" and state.stream and node.config.usage_probe
    if state.original_body is None:
        if not (mapped or probe):
            return  # nothing to change for this call: the body goes as the client sent it
        if request.content is None:
            return  # a body mitmproxy streams instead of buffering: nothing to rewrite, it goes as sent
        state.original_body = request.content
    body = state.original_body
    if mapped and model is not None and (rewritten := rewrite_model(body, model)) is not None:
        body = rewritten
    probed = add_include_usage(body) if probe else None
    state.probed = probed is not None
    if probed is not None:
        body = probed
    if body != request.content:
        request.content = body  # re-encoded as the client encoded it; content-length follows


def _start_meter(state: CallState, resp: http.Response, keep_body_bytes: int = 0,
                 found: dict[str, list[str]] | None = None) -> Callable[[bytes], bytes | list[bytes]]:
    """Give the call its meter for ``resp`` (``found``: its ``_CONTENT_HEADERS``, if read already); returns what
    the body goes through: the meter, or the filter that takes out the usage chunk the relay asked for and
    passes every chunk to the meter first."""
    found = header_values(resp.headers, _CONTENT_HEADERS) if found is None else found
    state.meter = StreamMeter(state.api_format, _folded(found, "content-type"), _folded(found, "content-encoding"),
                              keep_body_bytes=keep_body_bytes)
    if not _strips_usage(state, resp, found):
        return state.meter
    if "content-length" in found:
        # The length counts the chunk taken out: the client would wait for bytes that never come. HTTP/2
        # frames its end without one; HTTP/1.1 gets the answer chunked.
        del resp.headers["content-length"]
        if not (state.flow.request.is_http2 or state.flow.request.is_http3):
            resp.headers["transfer-encoding"] = "chunked"
    return UsageChunkFilter(state.meter)


def _strips_usage(state: CallState, resp: http.Response, found: dict[str, list[str]]) -> bool:
    """Whether the client gets this answer (``found``: its ``_CONTENT_HEADERS``) without the usage chunk the
    relay asked for: only a successful event stream sent as is (compressed bytes are passed on untouched),
    and not one with a length to an HTTP/1.0 client (which can be sent neither a new length nor chunks)."""
    if not state.probed or resp.status_code != 200:
        return False
    if "content-length" in found and state.flow.request.http_version == "HTTP/1.0":
        return False
    encoding = _folded(found, "content-encoding")
    return (_is_sse(_folded(found, "content-type"))
            and (encoding if encoding is not None else "identity").strip().lower() == "identity")


_CONTENT_HEADERS = ("content-length", "content-type", "content-encoding")


def _folded(found: dict[str, list[str]], name: str) -> str | None:
    """A header's value as mitmproxy's ``headers.get`` gives it: repeated values joined, None when absent."""
    values = found.get(name)
    return ", ".join(values) if values else None


def _chunks(out: bytes | list[bytes]) -> list[bytes]:
    return [out] if isinstance(out, bytes) else out


def _session_key(flow: http.HTTPFlow, body_key: str | None) -> str | None:
    """The conversation this call belongs to (addon.sessions): a session header, else the body's."""
    return session_key(header_values(flow.request.headers, SESSION_HEADERS), body_key)


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
    """Seconds a node's answer asked to be left alone (``addon.outcome.rest_asked``)."""
    return rest_asked(answer.status_code, answer.headers.get("retry-after")) if answer is not None else 0.0


def _is_sse(content_type: str | None) -> bool:
    """Whether a Content-Type value is an event stream's."""
    return (content_type or "").startswith("text/event-stream")

"""The relay addon: pick a node, rewrite the request, meter the streamed answer, record the call.

The flow hooks, and nothing else: each adapts a flow event to the call in flight (``addon.metering.call``), its
node choice and failover (``addon.failover``), its bodies (``addon.bodies``), the idle watch
(``addon.idlewatch``) and its accounting when it ends (``addon.ledger``); the nodes, their health, the
prices and the writer belong to the ``Runtime`` it is given (``addon.services.runtime``). Hooks are cheap and
never touch the database (the runtime's writer process does).
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, exceptions, http

from addon.bodies import CONTENT_HEADERS, folded, meter_whole, prepare_body, start_meter
from addon.egress import attach, clear_as_is, header_values
from addon.errors import error_response, fail_closed
from addon.failover import RETRY_KEY, Failover
from addon.guard.callbody import BodyRefused, read_call_body
from addon.guard.endpoints import detect_format, filter_model_list, is_model_list
from addon.guard.secrets import KnownSecrets
from addon.guard.target import target_problem
from addon.idlewatch import IdleWatch
from addon.inject import answer_waiting, can_answer, close_server
from addon.ledger import DEFAULT_SOURCE, Ledger
from addon.limits import Limits
from addon.metering.call import Call, is_sse
from addon.metering.meter import MeterResult
from addon.metering.outcome import Outcome, classify_error, classify_response, is_node_failure_status
from addon.metering.usage import RequestInfo
from addon.nodes.modelroute import serves_model
from addon.nodes.sessions import SESSION_HEADERS, session_key
from addon.observe.loglines import demote_streaming_line, restore_streaming_line, take_call_lines
from addon.options import seconds
from addon.refusal import REFUSED_KEY, RefusalSink, answered
from addon.services.runtime import Runtime
from addon.wsrelay import Sockets, is_upgrade, upgrade_required

log = logging.getLogger("codex.relay")

# An error answer of a node is held back (not streamed) to retry the call elsewhere only up to this size
# and only with a content-length; a larger one streams through to the client and is not retried.
MAX_HELD_ERROR_BYTES = 1 << 20
DEFAULT_MAX_REQUEST_BODY = 32 * 2**20


class Relay:
    """The flow hooks: routes each call over the runtime's nodes and records it through the runtime."""

    def __init__(self, runtime: Runtime, refusals: RefusalSink | None = None,
                 secrets: KnownSecrets | None = None, limits: Limits | None = None) -> None:
        self.runtime = runtime
        self.limits = limits  # client keys' limits (teams); None: none
        self.refusals = refusals or RefusalSink()
        self.secrets = secrets or KnownSecrets()
        self.ledger = Ledger(runtime, self.secrets, limits)
        self.sockets = Sockets(self)
        self.idle = IdleWatch(self.sockets)
        self.failover = Failover(runtime, self.ledger, limits, self.sockets.barred)
        self.addons = [self.sockets, self.failover]
        # Options read for every call, kept here by configure: an option read costs a deep copy.
        self.first_byte_timeout = 300.0
        self.keep_body = 0  # bytes of a streamed body kept on its flow (codex_keep_body)
        self._max_body = DEFAULT_MAX_REQUEST_BODY
        # flow id -> (flow, its call in flight). Not in flow.metadata: -w pickles that.
        self._calls: dict[str, tuple[http.HTTPFlow, Call]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}  # flow id -> its first-byte timeout
        runtime.on_shutdown(self._record_calls_in_flight)
        runtime.metrics.count_in_flight(lambda: len(self._calls))

    # -- options -----------------------------------------------------------------------------------
    def load(self, loader) -> None:
        demote_streaming_line()  # every answer streams: mitmproxy's line for it would repeat per call
        self.ledger.call_lines = take_call_lines(ctx.options, ctx.master.addons.get("dumper"))
        loader.add_option("codex_source", str, DEFAULT_SOURCE,
                          "Tag written to codex_invocations.source for calls this relay records.")
        loader.add_option("codex_keep_body", int, -1,
                          "Keep up to this many bytes of each streamed response body on the flow, for "
                          "mitmweb and -w. 0 keeps none; -1 (default): 256 KiB where something shows or saves "
                          "flows (mitmweb, save_stream_file / -w), none in a plain mitmdump.")
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
        if "codex_max_request_body" in updated and opts.codex_max_request_body < 0:
            raise exceptions.OptionsError("codex_max_request_body must be >= 0")
        if "codex_source" in updated:
            self.ledger.source = opts.codex_source
        if "codex_max_request_body" in updated:
            self._max_body = opts.codex_max_request_body
        if "codex_keep_body" in updated and opts.codex_keep_body < -1:
            raise exceptions.OptionsError("codex_keep_body must be >= 0, or -1 for automatic")
        if updated & {"codex_keep_body", "save_stream_file"}:
            self.keep_body = keep_body_bytes(opts.codex_keep_body, shown=ctx.master.addons.get("view") is not None,
                                             saved="save_stream_file" in opts and bool(opts.save_stream_file))
        # Only options in ``updated``: see Runtime.configure.
        if "codex_idle_timeout" in updated:
            self.idle.timeout = seconds("codex_idle_timeout", opts.codex_idle_timeout)
        if "codex_first_byte_timeout" in updated:
            self.first_byte_timeout = seconds("codex_first_byte_timeout", opts.codex_first_byte_timeout,
                                              allow_zero=False)

    def _record_calls_in_flight(self) -> None:
        """At shutdown (from the runtime's done, before the writer's last flush)."""
        for flow, call in list(self._calls.values()):
            self.ledger.finish(flow, call, Outcome("aborted", False, "the relay shut down during the call"))
        self._calls.clear()
        self.idle.clear()

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
        routed = len(self.runtime.pool) > 0
        problem = target_problem(target) if routed else None
        if problem:  # as a forward proxy: the Gate checks only the relay's own port
            self.refusals.refuse(flow, error_response(target, 400, f"codex-relay: {problem}",
                                                      "invalid_request_target"), problem)
            return
        api_format = detect_format(target)
        call = None
        # Every call to a node is recorded, metered where its endpoint is known; a monitor (no nodes, perhaps a
        # forward proxy for anything) records only API calls.
        if api_format is not None or routed:
            call = await self._admit(flow, api_format)
            if call is None:
                return
        if not routed:
            clear_as_is(flow)  # monitor mode: the request goes where it was sent, unchanged
            return
        node = await self.failover.first_node(flow, call)
        if node is None:
            return
        if call is not None and call.websocket and (node := await self.sockets.takes_upgrade(flow, call)) is None:
            del self._calls[flow.id]  # no node takes it: no invocation, the client uses HTTP
            flow.response = upgrade_required(target, call.relay_error)
            return
        attach(flow, node.config, target)
        if call is not None:
            prepare_body(flow.request, call, node)
            self._timers[flow.id] = asyncio.get_running_loop().call_later(
                self.first_byte_timeout, self._first_byte_timed_out, flow)

    async def _admit(self, flow: http.HTTPFlow, api_format: str | None) -> Call | None:
        """The call ``flow`` makes, in flight from now on; None when the relay refused it (``flow.response``)."""
        target = flow.request.path
        info = RequestInfo(None, False, None)
        if api_format is not None and flow.request.method == "POST":
            try:
                info = read_call_body(flow.request.raw_content, flow.request.headers.get("content-encoding"),
                                      limit=self._max_body)
            except BodyRefused as e:
                self.refusals.refuse(flow, error_response(target, e.status, e.message, e.code), e.code)
                return None
        call = Call.start(target, api_format, info, session_key=_session_key(flow, info.session_key),
                          request_bytes=len(flow.request.raw_content or b""),
                          websocket=api_format == "responses" and is_upgrade(flow.request))
        self._calls[flow.id] = (flow, call)
        # A socket is no call: each of its turns is admitted (addon.wsrelay).
        if (self.limits is not None and not call.websocket
                and (refusal := await self.limits.admit(flow, call.model, api_format=api_format)) is not None):
            del self._calls[flow.id]  # refused: no invocation, no node
            flow.metadata[REFUSED_KEY] = refusal.status_code
            flow.response = refusal
            return None
        if self.limits is not None and is_model_list(target):
            call.model_filter = self.limits.model_filter(flow)
        return call

    def _first_byte_timed_out(self, flow: http.HTTPFlow) -> None:
        entry = self._calls.get(flow.id)
        if entry is None or flow.response is not None or flow.error is not None:
            return
        call = entry[1]
        call.relay_error = f"no response headers within {self.first_byte_timeout:g} s"
        if can_answer(flow):
            # The client gets a JSON 504 (retried on another node like any failure status) ...
            answer = error_response(call.client_target, 504, f"codex-relay: the node sent {call.relay_error}",
                                    "upstream_timeout")
            asyncio.get_running_loop().create_task(answer_waiting(flow, answer))
        else:  # ... or, over HTTP/2 to the node, mitmproxy's own 502 when its connection is closed.
            close_server(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.limits is not None:  # every answer to a key, the relay's own too (mitmproxy runs this hook for them)
            self.limits.show(flow)
        entry = self._calls.get(flow.id)
        if entry is None or flow.response is None:
            return
        call = entry[1]
        self._stop_waiting(flow)
        if call.websocket:
            return  # a 101 has no body; another answer is held whole, for addon.wsrelay to replace
        resp = flow.response
        found = header_values(resp.headers, CONTENT_HEADERS)  # one pass over the answer's headers
        length = folded(found, "content-length") or ""
        if (call.node is not None and resp.status_code >= 400 and length.isdigit()
                and int(length) <= MAX_HELD_ERROR_BYTES):
            # A small error answer is held whole, not streamed: to retry the call elsewhere, and to
            # scrub keys the node echoes back before the client sees them.
            call.retry = is_node_failure_status(resp.status_code) and self.failover.has_another(flow, call)
            return
        if call.model_filter is not None and resp.status_code == 200:
            return  # a model list is small: held whole, to answer only the key's models (response)
        resp.stream = start_meter(call, flow.request, resp, self.keep_body, found)
        self.idle.watch(flow, call)

    async def response(self, flow: http.HTTPFlow) -> None:
        entry = self._calls.pop(flow.id, None)
        if entry is None or flow.response is None:
            return
        call = entry[1]
        self._stop_waiting(flow)
        if call.websocket:
            self.sockets.upgraded(flow, call)
            return
        if call.retry:
            await self.failover.replay(flow, call)
            if self.limits is not None:  # another node's answer
                self.limits.show(flow)
        resp = flow.response
        if call.model_filter is not None and call.node is not None and resp.status_code == 200:
            node, allowed = call.node.config, call.model_filter
            listed = filter_model_list(resp.content or b"", lambda m: serves_model(node, m) and allowed(m))
            if listed is not None:
                resp.content = listed
        if call.meter is None and resp.status_code >= 400:
            text = resp.get_text(strict=False)
            if text and (clean := self.secrets.scrub(text)) != text:
                resp.text = clean
        outcome, result = self._answered(flow, call, resp)
        self.ledger.finish(flow, call, outcome, result)

    def _answered(self, flow: http.HTTPFlow, call: Call, resp: http.Response) -> tuple[Outcome, MeterResult | None]:
        """How a call that got ``resp`` ended, and what its meter read."""
        if call.meter is None and call.node is None and len(self.runtime.pool):
            # Our own refusal (no node, no model): no node was tried.
            return Outcome("failed", False, call.relay_error or "no upstream node available"), None
        if call.meter is None:  # a whole body: the retry's answer
            meter_whole(call, flow.request, resp)
        meter = call.meter
        assert meter is not None  # set by responseheaders, or by meter_whole just above
        result = meter.result()
        call.model = result.model or call.model
        outcome = classify_response(resp.status_code, body_error=result.error,
                                    stream=call.stream or is_sse(resp.headers.get("content-type")),
                                    completed=result.completed)
        if meter.kept:
            resp.raw_content = meter.kept
        return outcome, result

    def error(self, flow: http.HTTPFlow) -> None:
        entry = self._calls.pop(flow.id, None)
        if entry is None or flow.error is None:
            return
        call = entry[1]
        self._stop_waiting(flow)
        if call.websocket:
            self.sockets.upgrade_failed(flow, call)
            return
        if call.meter is not None and call.meter.kept and flow.response is not None:
            flow.response.raw_content = call.meter.kept  # mitmweb shows what came before the cut
        outcome = classify_error(flow.error.msg, got_response=flow.response is not None)
        if call.relay_error:  # the relay ended it: a timeout of the node
            outcome = Outcome(outcome.status, True, call.relay_error)
        self.ledger.finish(flow, call, outcome)

    def _stop_waiting(self, flow: http.HTTPFlow) -> None:
        if (timer := self._timers.pop(flow.id, None)) is not None:
            timer.cancel()
        self.idle.forget(flow)


AUTO_KEEP_BODY = 256 * 1024


def keep_body_bytes(option: int, *, shown: bool, saved: bool) -> int:
    """Bytes of each streamed body to keep on its flow: the option, or for -1 (automatic) 256 KiB where
    something shows or saves flows (mitmweb, ``-w``) and none otherwise — kept bodies are most of a
    stream's memory, and a plain mitmdump shows nobody."""
    if option >= 0:
        return option
    return AUTO_KEEP_BODY if shown or saved else 0


def _session_key(flow: http.HTTPFlow, body_key: str | None) -> str | None:
    """The conversation this call belongs to (addon.nodes.sessions): a session header, else the body's."""
    return session_key(header_values(flow.request.headers, SESSION_HEADERS), body_key)

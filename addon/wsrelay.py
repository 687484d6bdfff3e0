"""Responses over WebSocket through the relay: the upgrade routed like a call, each turn an invocation.

The upgrade (``GET …/responses`` with ``Upgrade: websocket``) goes through ``Relay.request`` like any call
(weighted choice, sticky session, breaker, format filter, connect probe, the node's key put on the upgrade
request alone by ``addon.egress.attach``), among the nodes that speak WebSocket: not those with
``websocket = false`` in the nodes file, nor those that refused an upgrade in the last ``NO_WEBSOCKET_S``.
The upgrade is no invocation and no limit applies to it. A node not seen taking an upgrade in the last
``NO_WEBSOCKET_S`` is asked first (``takes_upgrade``: the same upgrade request, its status line read, the
connection closed; sent as mitmproxy sends the upgrade, through the upstream proxy in upstream mode:
``addon.nodeconn``); one that refuses or cannot be reached is failed over to the next, within
``codex_retries``, before anything is sent for the client. When no node takes it, or the node answers
anything but 101 all the same, the client gets ``426 Upgrade Required``: Codex then falls back to HTTP at
once (on a 404 it would reconnect five times first). mitmproxy cannot move an upgrade whose request went
out to another node (docs/how-it-works.md, "Responses over WebSocket").

On the open socket every ``response.create`` is one invocation (``addon.metering.wsturns``): the key's limits and
the node's ``models`` are checked per turn, a refused turn is dropped (the node never sees it) and
answered with an ``error`` event, ``model_map`` rewrites the turn's model. Each turn is recorded through
``Ledger.submit`` when its terminal or ``error`` event comes, or ``truncated`` when the socket closes first or
its node sends nothing for ``codex_idle_timeout`` (``watch_idle``, from the relay's idle watch: the socket is cut).
mitmdump prints no line per message of a socket the relay records (``addon.observe.loglines.take_call_lines``).
mitmproxy keeps every message of a socket for its life: messages are dropped once metered, beyond
``codex_keep_body`` bytes where something shows flows (``Relay``'s kept body), beyond the newest otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mitmproxy import ctx, http, websocket
from mitmproxy.net.http import http1

from addon.egress import EgressRefused, attach
from addon.errors import CLIENT_KEY_NAME, error_body, refusal_response
from addon.guard.callbody import BodyRefused, read_socket_message
from addon.inject import close_server
from addon.metering.meter import NO_USAGE
from addon.metering.outcome import Outcome, classify_error, is_node_failure_status
from addon.metering.outcome import ms as _ms
from addon.metering.wsturns import CREATE, KeptMessages, SocketTurns, Turn, error_event
from addon.nodeconn import open_to, via_of
from addon.nodes.modelroute import rewrite_model, serves, upstream_model
from addon.observe.loglines import CALL_COMMENT
from store.records import InvocationRecord, Usage, utcnow

if TYPE_CHECKING:
    from addon.metering.call import Call
    from addon.nodes.routing import Node
    from addon.relay import Relay

log = logging.getLogger("codex.websocket")

# A node that answered an upgrade with something else than 101 gets no upgrade for this long.
NO_WEBSOCKET_S = 600.0
# A client's close frame (masked, code 1000): how ``Sockets._handshake`` ends the socket it opened.
_CLOSE_FRAME = bytes([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8])
WEBSOCKET_FLAG = "websocket"  # in every turn's row: the call came over a socket


def is_upgrade(request: http.Request) -> bool:
    """Whether a request (to a Responses endpoint) asks for a WebSocket."""
    return request.method == "GET" and request.headers.get("upgrade", "").strip().lower() == "websocket"


@dataclass(slots=True)
class _Socket:
    flow: http.HTTPFlow
    state: Call  # the upgrade's: node, session, client target
    turns: SocketTurns
    kept: KeptMessages


class Sockets:
    """The relay's open Responses WebSockets (a sub-addon of ``Relay``)."""

    def __init__(self, relay: Relay, clock=time.monotonic) -> None:
        self.relay = relay
        self._clock = clock
        self._open: dict[str, _Socket] = {}
        self._refused: dict[str, float] = {}  # node id -> until when it gets no upgrade
        self._takes: dict[str, float] = {}  # node id -> until when it is taken to take upgrades unasked
        self.turns_running = False  # whether a turn may run (the relay's idle watch is to go on): set per turn
        relay.runtime.on_shutdown(self._close_all)

    def barred(self) -> set[str]:
        """The nodes an upgrade may not go to."""
        now = self._clock()
        for node_id in [n for n, until in self._refused.items() if until <= now]:
            del self._refused[node_id]
        return {n.id for n in self.relay.runtime.pool if not n.config.websocket} | self._refused.keys()

    # -- the upgrade (called by Relay) ---------------------------------------------------------------
    async def takes_upgrade(self, flow: http.HTTPFlow, state: Call) -> Node | None:
        """The upgrade's node, or the next one that takes a WebSocket, before anything is sent for the client.

        A node seen answering 101 in the last ``NO_WEBSOCKET_S`` is taken as is (a socket lives long: asking
        costs a handshake, once in a while); another is asked with the upgrade request itself, on a connection
        of its own closed once the status line is in. None: no node took it (``state.relay_error`` says why).
        """
        node = state.node
        while node is not None:
            if self._takes.get(node.id, 0.0) > self._clock():
                return node
            status, err = await self._handshake(flow, node, state.client_target)
            if status == 101:
                self._takes[node.id] = self._clock() + NO_WEBSOCKET_S
                return node
            state.relay_error = self._refused_by(node, status, err, state)
            nxt = self.relay.failover.next_node(flow, state)
            log.warning("%s; %s", state.relay_error, f"trying node {nxt.id}" if nxt else "no other node to try")
            node = state.node = nxt
        return None

    async def _handshake(self, flow: http.HTTPFlow, node: Node, target: str) -> tuple[int | None, str | None]:
        """The status a node answers the client's upgrade request with (its key on it), or why there is none."""
        probe = flow.copy()
        try:
            origin = attach(probe, node.config, target)
        except EgressRefused as e:
            return None, str(e)
        # The request as mitmproxy sends it: absolute-form where the client's was (to an upstream proxy, say).
        head = http1.assemble_request_head(probe.request)
        via = via_of(flow)  # upstream mode: through the proxy, as the upgrade itself will go
        relay = self.relay
        where = f"{origin.host}:{origin.port}"
        try:
            reader, writer = await asyncio.wait_for(open_to(origin, via, tls=origin.scheme == "https"),
                                                    relay.runtime.connect_timeout)
        except (OSError, TimeoutError, ValueError) as e:
            return None, f"connect to {where} for the WebSocket upgrade failed: {getattr(e, 'strerror', None) or e}"
        try:
            writer.write(head)
            line = await asyncio.wait_for(reader.readline(), relay.first_byte_timeout)
            if line.split(None, 2)[1:2] == [b"101"]:
                writer.write(_CLOSE_FRAME)  # a socket closed as a client closes one: no error in the node's log
        except (OSError, TimeoutError, ValueError) as e:
            return None, f"no answer from {where} to the WebSocket upgrade: {e or type(e).__name__}"
        finally:
            writer.close()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return None, f"no HTTP answer from {where} to the WebSocket upgrade"
        return int(parts[1]), None

    def _refused_by(self, node: Node, status: int | None, err: str | None, state: Call,
                    answer: http.Response | None = None) -> str:
        """A node did not take an upgrade (``status``: its answer's, None when there was none, ``err`` says why):
        a failure of the node for no answer or a failure status, else no upgrade to it for a while. The reason."""
        self._takes.pop(node.id, None)
        if status is None:
            reason = err or "no answer to the WebSocket upgrade"
            self.relay.ledger.attempt_failed(node, reason)
        elif is_node_failure_status(status):
            reason = f"node {node.id} answered the WebSocket upgrade with HTTP {status}"
            self.relay.ledger.attempt_failed(node, reason, answer)
        else:  # it serves HTTP, not WebSockets: no failure, but no upgrade for a while
            reason = f"node {node.id} does not take WebSockets (HTTP {status} to the upgrade)"
            self._refused[node.id] = self._clock() + NO_WEBSOCKET_S
            self.relay.ledger.report_node(node, Outcome("failed", False, reason), state)
        return reason

    def upgraded(self, flow: http.HTTPFlow, state: Call) -> None:
        """The upgrade's answer is in: the socket opens, or the client is told to use HTTP."""
        resp = flow.response
        assert resp is not None
        relay, node = self.relay, state.node
        if resp.status_code == 101 and flow.websocket is not None:
            self._open[flow.id] = _Socket(flow, state, SocketTurns(), KeptMessages(relay.keep_body))
            relay.ledger.report_node(node, Outcome("success", False, None), state)
            if node is not None:
                self._takes[node.id] = self._clock() + NO_WEBSOCKET_S
            # A recorded call's comment: mitmdump prints no line per message of it (a Codex turn is some hundred
            # messages), the relay a line per turn (addon.observe.loglines.take_call_lines).
            flow.comment = f"{CALL_COMMENT}WebSocket to {node.id if node else '-'}"
            log.debug("socket %s open to node %s", flow.id, node.id if node else "-")
            return
        reason = state.relay_error
        if node is None and not self._any_takes(flow):  # the relay's "serves model None" would say less
            reason = "none of the nodes this client may use takes WebSockets"
        if node is not None:
            if reason is not None:  # unreachable, or no answer in time: the node's failure
                relay.ledger.attempt_failed(node, reason)
            else:
                reason = self._refused_by(node, resp.status_code, None, state, resp)
            log.warning("%s: the client is told to use HTTP (426)", reason)
        flow.response = upgrade_required(state.client_target, reason)

    def _any_takes(self, flow: http.HTTPFlow) -> bool:
        """Whether a node this flow's client may use takes WebSockets and Responses calls (in rotation or not)."""
        limits = self.relay.limits
        barred = self.barred() | (limits.barred(flow) if limits is not None else set())
        return self.relay.runtime.pool.serves_any("responses", None, exclude=barred)

    def upgrade_failed(self, flow: http.HTTPFlow, state: Call) -> None:
        """The upgrade ended in an error (no answer): it counts against the node, and is no invocation."""
        assert flow.error is not None
        outcome = classify_error(flow.error.msg, got_response=False)
        if state.node is not None:
            if outcome.node_failure:
                self.relay.ledger.attempt_failed(state.node, state.relay_error or outcome.error or "upgrade failed")
            else:
                self.relay.ledger.report_node(state.node, outcome, state)

    # -- hooks ---------------------------------------------------------------------------------------
    def websocket_message(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        sock = self._open.get(flow.id)
        if sock is None or flow.websocket is None:
            return None
        messages = flow.websocket.messages
        message = messages[-1]
        sock.kept.added(messages)
        if message.injected:
            return None  # our own error events
        if message.from_client:
            return self._client_message(sock, message)
        turn = sock.turns.server_message(message.content, message.timestamp)
        if turn is not None:
            self._record(sock, turn)
        return None

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        sock = self._open.pop(flow.id, None)
        if sock is None or flow.websocket is None:
            return
        ws = flow.websocket
        by_client = bool(ws.closed_by_client)
        reason = f"the socket was closed by the {'client' if by_client else 'node'} mid-response (code {ws.close_code})"
        for turn in sock.turns.close(by_client=by_client, reason=reason):
            self._record(sock, turn)

    def _close_all(self) -> None:
        """At shutdown: the turns still running are recorded, aborted."""
        for sock in list(self._open.values()):
            for turn in sock.turns.close(by_client=True, reason="the relay shut down during the call"):
                turn.outcome = Outcome("aborted", False, "the relay shut down during the call")
                self._record(sock, turn)
        self._open.clear()

    def watch_idle(self, now: float, timeout: float) -> None:
        """From the relay's idle watch: a socket whose node sent nothing for a running turn in ``timeout`` seconds
        is cut — its turns recorded ``truncated`` (a failure of the node), the client sent an ``error`` event, then
        the node's connection closed (mitmproxy closes the client's)."""
        running = False
        for sock in list(self._open.values()):
            since = sock.turns.quiet_since()
            if since is None:
                continue
            if now - since < timeout:
                running = True
                continue
            reason = f"no message from the node for {timeout:g} s"
            flow = sock.flow
            del self._open[flow.id]
            self.inject(flow, error_event(error_body(sock.state.client_target, 504, f"codex-relay: {reason}",
                                                     "upstream_timeout"), 504))
            for turn in sock.turns.close(by_client=False, reason=reason):
                self._record(sock, turn)
            self.close(flow)
            log.warning("socket %s to node %s cut: %s", flow.id, sock.state.node.id if sock.state.node else "-", reason)
        self.turns_running = running

    def close(self, flow: http.HTTPFlow) -> None:
        """Close a socket's connection to its node, once what was injected before has been sent."""
        asyncio.get_running_loop().call_soon(close_server, flow)

    # -- turns ---------------------------------------------------------------------------------------
    async def _client_message(self, sock: _Socket, message: websocket.WebSocketMessage) -> None:
        flow, state = sock.flow, sock.state
        path = state.client_target
        try:
            kind, info, lane = read_socket_message(message.content)
        except BodyRefused as e:  # a node could read it otherwise than the relay: it reaches none
            self._refuse(flow, message, e.status, error_body(path, e.status, e.message, e.code))
            return
        if kind != CREATE:
            return  # no response of its own (a steer joins the running one): passed on as it is
        node, model = state.node, info.model
        if node is not None and not serves(node.config, "responses", model):
            message_text = f"codex-relay: node {node.id} of this socket does not serve model {model!r}"
            self._refuse(flow, message, 400, error_body(path, 400, message_text, "model_not_found"))
            return
        invoke_id = os.urandom(16).hex()
        limits = self.relay.limits
        if limits is not None and (refusal := await limits.admit(flow, model, invoke_id)) is not None:
            self._refuse(flow, message, refusal.status_code, refusal.content or b"")
            return
        if node is not None and model is not None:
            sent = upstream_model(node.config, model)
            if sent is not None and sent != model and (rewritten := rewrite_model(message.content, sent)) is not None:
                message.content = rewritten
        sock.turns.start(Turn(invoke_id=invoke_id, occurred_at=utcnow(), started_at=message.timestamp,
                              requested_model=model, request_bytes=len(message.content), lane=lane))
        self.turns_running = True
        self.relay.idle.arm()  # codex_idle_timeout applies to the turn (watch_idle)

    def _refuse(self, flow: http.HTTPFlow, message: websocket.WebSocketMessage, status: int, body: bytes) -> None:
        """The turn reaches no node: the client gets the refusal as an ``error`` event."""
        message.drop()
        self.inject(flow, error_event(body, status))

    def inject(self, flow: http.HTTPFlow, content: bytes) -> None:
        """Send a text message to the socket's client."""
        ctx.master.commands.call("inject.websocket", flow, True, content, True)

    def _record(self, sock: _Socket, turn: Turn) -> None:
        relay, flow, state = self.relay, sock.flow, sock.state
        outcome = relay.ledger.settle(flow, turn.outcome or Outcome("aborted", False, None), turn.invoke_id)
        if outcome.error and flow.websocket is not None and flow.websocket.messages and not (
                last := flow.websocket.messages[-1]).from_client:
            # The node's error event (the newest message when it ended the turn), as the client and mitmweb
            # get it: without a key (an HTTP error answer is scrubbed the same way).
            text = last.content.decode("utf-8", "replace")
            if (clean := relay.secrets.scrub(text)) != text:
                last.content = clean.encode()
        node = state.node
        relay.ledger.report_node(node, outcome, state)
        x = turn.extractor
        end = turn.last_event_at if outcome.status in ("success", "failed") and turn.last_event_at else time.time()
        record = InvocationRecord(
            invoke_id=turn.invoke_id, occurred_at=turn.occurred_at, source=relay.ledger.source,
            endpoint=flow.request.path.split("?", 1)[0][:255], status=outcome.status,
            node_id=node.id if node else None, api_format="responses", model=x.model or turn.requested_model,
            requested_model=turn.requested_model, stream=True,
            http_status=flow.response.status_code if flow.response else None, error_message=outcome.error,
            ttfb_ms=_ms(turn.first_event_at - turn.started_at) if turn.first_event_at is not None else None,
            stream_ms=(_ms(turn.last_event_at - turn.first_event_at)
                       if turn.first_event_at is not None and turn.last_event_at is not None else None),
            duration_ms=_ms(end - turn.started_at), request_bytes=turn.request_bytes,
            response_bytes=turn.response_bytes, raw_response=x.raw_usage,
            client_key=flow.metadata.get(CLIENT_KEY_NAME), node_failure=outcome.node_failure,
            usage=x.usage or Usage(), session_key=state.session_key,  # the upgrade's (addon.nodes.sessions)
            flags=sorted({*x.flags, WEBSOCKET_FLAG, *([NO_USAGE] if x.usage is None else [])}),
        )
        relay.ledger.submit(flow, record)


def upgrade_required(path: str, reason: str | None) -> http.Response:
    """The answer to an upgrade no node takes: the client uses HTTP instead."""
    # No Upgrade header naming a protocol: the client is to stay on HTTP, not to switch to another.
    return refusal_response(path, 426, f"codex-relay: no upstream node takes a WebSocket now"
                            f"{f' ({reason})' if reason else ''}; use HTTP", "websocket_unavailable")

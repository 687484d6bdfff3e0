"""The relay in process over stub services, driving its Responses WebSockets (addon.wsrelay) turn by turn."""

from __future__ import annotations

import asyncio
import json

from mitmproxy import http
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from addon.errors import CLIENT_KEY_NAME
from addon.limits import Limits
from addon.metering.call import Call
from addon.metering.usage import RequestInfo
from addon.nodes.routing import Node
from addon.relay import Relay
from store.keys import KeySpec
from store.records import InvocationRecord, NodeConfig
from tests.support.relayharness import StubRuntime


class Env:
    def __init__(self, *configs: NodeConfig, keys: list[KeySpec] | None = None) -> None:
        self.now = 1000.0
        self.runtime = StubRuntime(configs)
        self.submitted = self.runtime.submitted
        self.pool = self.runtime.pool
        self.limits = None
        if keys is not None:
            self.limits = Limits(self.runtime)  # type: ignore[arg-type]
            self.runtime.keys.apply(keys)
        self.relay = Relay(self.runtime, limits=self.limits)  # type: ignore[arg-type]
        self.sockets = self.relay.sockets
        self.sockets._clock = lambda: self.now
        self.injected: list[bytes] = []
        self.sockets.inject = lambda flow, content: self.injected.append(content)  # type: ignore[method-assign]

    def in_flight(self) -> int:
        """The relay's count of calls in flight."""
        return self.runtime.in_flight()

    def records(self) -> list[InvocationRecord]:
        return [r for r in self.submitted if isinstance(r, InvocationRecord)]

    def open(self, node_id: str | None = "a", key: str | None = None) -> http.HTTPFlow:
        flow = tflow.twebsocketflow()
        flow.websocket.messages.clear()
        flow.request.path = "/v1/responses"
        if key is not None:
            flow.metadata[CLIENT_KEY_NAME] = key
        self.sockets.upgraded(flow, upgrade_call(self.pool.get(node_id) if node_id else None))
        return flow

    def client(self, flow: http.HTTPFlow, obj: dict, at: float) -> WebSocketMessage:
        message = WebSocketMessage(Opcode.TEXT, True, json.dumps(obj).encode(), timestamp=at)
        flow.websocket.messages.append(message)
        pending = self.sockets.websocket_message(flow)
        if pending is not None:
            asyncio.run(pending)  # type: ignore[arg-type]
        return message

    def server(self, flow: http.HTTPFlow, obj: dict, at: float) -> None:
        flow.websocket.messages.append(WebSocketMessage(Opcode.TEXT, False, json.dumps(obj).encode(), timestamp=at))
        assert self.sockets.websocket_message(flow) is None


def upgrade_call(node: Node | None) -> Call:
    """A WebSocket upgrade as the relay starts it, gone to ``node``."""
    call = Call.start("/v1/responses", "responses", RequestInfo(None, False, None), session_key=None, request_bytes=0,
                      websocket=True)
    if node is not None:
        call.attempt(node)
    return call


def completed(model: str, i: int, c: int, o: int, r: int) -> dict:
    return {"type": "response.completed", "response": {"id": "resp", "model": model, "usage": {
        "input_tokens": i, "input_tokens_details": {"cached_tokens": c}, "output_tokens": o,
        "output_tokens_details": {"reasoning_tokens": r}, "total_tokens": i + o}}}


def node(node_id: str = "a", **kw) -> NodeConfig:
    return NodeConfig(id=node_id, base_url=f"http://{node_id}.example:80/v1", api_key=f"key-{node_id}", **kw)

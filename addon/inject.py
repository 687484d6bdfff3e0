"""Answering a call that waits for its node's response headers with the relay's own response.

mitmproxy has no API for this: closing the node's connection (the only way to stop waiting) makes it
answer the client with an HTML ``502 Bad Gateway``, which SDKs cannot read. Its HTTP layer does route an
injected message (``events.MessageInjected``, made for WebSocket and TCP messages) straight to the
flow's HTTP stream, and the stream hands any event to the state it is in; an injected event that is
also a ``ResponseHeaders`` / ``ResponseData`` / ``ResponseEndOfMessage`` is taken as the node's
answer, with every hook (``responseheaders``, ``response``) as usual. The node's connection is closed
afterwards; mitmproxy ignores what it says about a stream that has finished.

This leans on the HTTP layer of the pinned mitmproxy 12.2 (``tests/test_timeouts`` shows it still
works); the stream is found through an HTTP/1 server connection only, so a call to a node spoken to
over HTTP/2 keeps mitmproxy's own error.
"""

from __future__ import annotations

from mitmproxy import ctx, http
from mitmproxy.proxy import events
from mitmproxy.proxy.layers.http import ResponseData, ResponseEndOfMessage, ResponseHeaders


class _Headers(ResponseHeaders, events.MessageInjected):
    def __init__(self, flow: http.HTTPFlow, response: http.Response) -> None:
        self.flow, self.message, self.stream_id = flow, None, 0
        self.response, self.end_stream = response, False


class _Data(ResponseData, events.MessageInjected):
    def __init__(self, flow: http.HTTPFlow, data: bytes) -> None:
        self.flow, self.message, self.stream_id, self.data = flow, None, 0, data


class _End(ResponseEndOfMessage, events.MessageInjected):
    def __init__(self, flow: http.HTTPFlow) -> None:
        self.flow, self.message, self.stream_id = flow, None, 0


def can_answer(flow: http.HTTPFlow) -> bool:
    """Whether ``answer_waiting`` works for this flow now."""
    server = flow.server_conn
    return (flow.live and flow.response is None and flow.error is None and server.connected
            and server.alpn in (None, b"", b"http/1.1") and _handler(flow) is not None)


async def answer_waiting(flow: http.HTTPFlow, response: http.Response) -> None:
    """Give ``flow`` ``response`` as if its node had sent it, then close the node's connection."""
    handler = _handler(flow)
    if handler is None or flow.response is not None:
        return
    body = response.raw_content or b""
    for event in (_Headers(flow, response), _Data(flow, body), _End(flow)):
        if flow.error is not None:
            return
        await handler.server_event(event)
    close_server(flow)


def close_server(flow: http.HTTPFlow) -> None:
    """Close the flow's connection to its node (mitmproxy cannot kill a flow in transit)."""
    handler = _handler(flow)
    if handler is not None and flow.server_conn in handler.transports:
        handler.close_connection(flow.server_conn)


def _handler(flow: http.HTTPFlow):  # noqa: ANN202 - mitmproxy's ConnectionHandler, no public type
    proxyserver = ctx.master.addons.get("proxyserver")
    return getattr(proxyserver, "connections", {}).get(flow.client_conn.id)

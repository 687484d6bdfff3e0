"""Refusing a request before its body is read, with a JSON answer, without holding the body.

mitmproxy sends a response an addon sets in ``requestheaders`` only once the whole request body has
arrived, and it buffers that body meanwhile (a 1 GiB upload without a key cost 2 GB of memory). So a
refusal whose body is still on its way is streamed instead, to a small HTTP endpoint of the relay's own
on 127.0.0.1 that reads and drops the body and answers the refusal; mitmproxy hands that answer to the
client like any other. A request without a body gets its answer directly.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections import OrderedDict

import h11
from mitmproxy import http
from mitmproxy.net.http import http1

from addon.egress import CREDENTIAL_HEADERS, EGRESS_KEY

log = logging.getLogger("codex.refusal")

# Metadata: the status of the relay's own refusal; such a flow is no call and reaches no node.
REFUSED_KEY = "codex_refused"
_MAX_WAITING = 10_000  # answers whose request has not reached the sink yet (a flow may die before)
_READ_TIMEOUT_S = 60.0  # a client that stops sending its body mid-way


def answered(flow: http.HTTPFlow) -> bool:
    """Whether a request needs no more handling: answered, failed, over, or refused by the relay."""
    return flow.response is not None or flow.error is not None or not flow.live or REFUSED_KEY in flow.metadata


def body_pending(request: http.Request) -> bool:
    """Whether a body may still follow these request headers."""
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() != "0"
    return "transfer-encoding" in request.headers or request.is_http2 or request.is_http3


class RefusalSink:
    """The addon that owns the local refusal endpoint; other addons call ``refuse``."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._starting: asyncio.Task[None] | None = None
        self.port = 0
        self._answers: OrderedDict[str, http.Response] = OrderedDict()

    def load(self, loader: object) -> None:
        # The endpoint listens from here on: mitmproxy serves clients before the script's ``running`` hooks
        # have run, and a refusal without its endpoint would buffer the body. Connections made before
        # ``running`` wait in the socket's backlog.
        if self._sock is None:
            self._sock = socket.create_server(("127.0.0.1", 0))
            self.port = self._sock.getsockname()[1]

    def running(self) -> None:
        # Not awaited here: mitmproxy's own addons (its TLS addon's certificate store among them) get their
        # ``running`` after this script's, while the proxy already listens; a hook that yields lets requests
        # in before them. Until the task has run, refused connections wait in the socket's backlog.
        if self._server is None and self._sock is not None and self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start(self._sock))

    async def _start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._serve, sock=sock)

    def done(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
            self._starting = None
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def refuse(self, flow: http.HTTPFlow, response: http.Response, reason: str) -> None:
        """Answer ``flow`` with ``response``; it goes to no node and is never metered."""
        flow.metadata[REFUSED_KEY] = response.status_code
        flow.comment = f"refused by codex-relay: {reason}"
        if self._sock is None or not body_pending(flow.request):
            flow.response = response
            return
        token = secrets.token_urlsafe(16)
        self._answers[token] = response
        while len(self._answers) > _MAX_WAITING:
            self._answers.popitem(last=False)
        request = flow.request
        for name in CREDENTIAL_HEADERS:
            request.headers.pop(name, None)
        request.scheme, request.host, request.port, request.path = "http", "127.0.0.1", self.port, "/" + token
        request.stream = True  # mitmproxy passes the body on as it comes instead of buffering it
        if "content-length" not in request.headers and "transfer-encoding" not in request.headers:
            # HTTP/2 and 3 frame a body themselves: over HTTP/1.1 to the endpoint it goes chunked, or the endpoint
            # would read none and answer before the body is through.
            request.headers["transfer-encoding"] = "chunked"
        flow.metadata[EGRESS_KEY] = ("http", "127.0.0.1", self.port)

    def withdraw(self, token: str) -> None:
        """Drop the answer waiting under ``token``: its request will not come (it was answered otherwise)."""
        self._answers.pop(token, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        token = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await asyncio.wait_for(reader.read(2**16), _READ_TIMEOUT_S))
                elif isinstance(event, h11.Request):
                    # The last segment: mitmproxy passes an absolute-form request on as such (http://host:port/token).
                    token = event.target.decode("ascii", "replace").rpartition("/")[2]
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            answer = self._answers.pop(token or "", None)
            if answer is None:  # not one of ours: someone found the port
                answer = http.Response.make(404, b"", {"content-length": "0"})
            writer.write(http1.assemble_response(answer))
            await writer.drain()
        except (h11.RemoteProtocolError, TimeoutError, OSError) as e:
            log.debug("refusal endpoint: %s", e)
        finally:
            writer.close()

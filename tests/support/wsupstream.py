"""A fake node that speaks Responses over WebSocket (``GET /v1/responses``, Upgrade), on 127.0.0.1, for tests.

Each ``response.create`` is answered as OpenAI's server answers it, closely enough for the Codex CLI:
``response.created``, then one assistant message (``response.output_item.added``, ``…content_part.added``,
a text delta, ``…output_text.done``, ``…content_part.done``, ``…output_item.done``) unless the create says
``"generate": false`` (Codex's prewarm), then ``response.completed`` with ``usage``. The usage is the create's
``metadata.fake_usage`` (input, cached, output, reasoning), else the next of ``usages`` (a queue the test
fills), else ``DEFAULT_USAGE``; ``sent`` keeps the usage each create was answered with, in order. A create with
``metadata.fake_error = "echo_key"`` is answered with a 401 ``error`` event that echoes the key it was sent.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection, serve

from tests.support.pipes import ThreadServer, pipe

DEFAULT_USAGE = (207, 0, 47, 0)
Usage4 = tuple[int, int, int, int]


def answer(n: int, msg: dict, usage: Usage4, text: str = "hello") -> list[dict]:
    """The events that answer the ``n``-th create ``msg``, ending with ``response.completed``."""
    i, c, o, r = (int(x) for x in usage)
    resp = {"id": f"resp_{n}", "object": "response", "model": msg.get("model"), "status": "in_progress",
            "output": []}
    item_id = f"msg_{n}"
    events: list[dict] = [{"type": "response.created", "response": resp}]
    output = []
    if msg.get("generate") is not False:
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "completed", "content": [part]}
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}
        events += [
            {"type": "response.output_item.added", "output_index": 0,
             "item": {**item, "status": "in_progress", "content": []}},
            {"type": "response.content_part.added", **at, "part": {**part, "text": ""}},
            {"type": "response.output_text.delta", **at, "delta": text, "logprobs": []},
            {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **at, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
        ]
        output.append(item)
    usage = {"input_tokens": i, "input_tokens_details": {"cached_tokens": c},
             "output_tokens": o, "output_tokens_details": {"reasoning_tokens": r}, "total_tokens": i + o}
    events.append({"type": "response.completed",
                   "response": {**resp, "status": "completed", "output": output, "usage": usage}})
    return [{**e, "sequence_number": k} for k, e in enumerate(events)]


@dataclass
class WsUpstream:
    path: str = "/v1/responses"
    creates: list[dict] = field(default_factory=list)  # every response.create the node got
    headers: list[dict[str, str]] = field(default_factory=list)  # each upgrade's request headers
    usages: list[Usage4] = field(default_factory=list)  # the usage of the next creates, first first
    sent: list[Usage4] = field(default_factory=list)  # the usage each create was answered with
    port: int = 0
    tls: ssl.SSLContext | None = None  # a server context: the node speaks wss

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> WsUpstream:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self):
        server = await serve(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = next(iter(server.sockets)).getsockname()[1]
        return server

    def _usage(self, msg: dict) -> Usage4:
        fake = (msg.get("metadata") or {}).get("fake_usage")
        if fake:
            i, c, o, r = fake
            return int(i), int(c), int(o), int(r)
        return self.usages.pop(0) if self.usages else DEFAULT_USAGE

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        if ws.request.path != self.path:
            await ws.close(1008, "unknown path")
            return
        self.headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        async for raw in ws:
            msg = json.loads(raw)
            if msg.get("type") != "response.create":
                continue
            self.creates.append(msg)
            if (msg.get("metadata") or {}).get("fake_error") == "echo_key":  # as OpenAI answers a wrong key
                key = self.headers[-1].get("authorization", "").removeprefix("Bearer ")
                await ws.send(json.dumps({"type": "error", "status": 401, "error": {
                    "type": "invalid_request_error", "code": "invalid_api_key",
                    "message": f"Incorrect API key provided: {key}."}}))
                continue
            usage = self._usage(msg)
            self.sent.append(usage)
            for event in answer(len(self.creates), msg, usage):
                await ws.send(json.dumps(event))

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class Splitter(ThreadServer):
    """One address for an HTTP node and a WebSocket node (127.0.0.1, for tests): a connection whose first request
    asks for a WebSocket is piped to ``ws``, any other to ``http`` — one node of the relay that speaks both, as
    OpenAI's does. (mitmproxy opens a server connection per client connection: an upgrade never shares one.)"""

    def __init__(self, http_port: int, ws_port: int) -> None:
        super().__init__()
        self.http_port, self.ws_port = http_port, ws_port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        upgrade = b"\r\nupgrade: websocket" in head.lower()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.ws_port if upgrade else self.http_port)
        up_writer.write(head)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

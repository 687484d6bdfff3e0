"""A fake node that speaks Responses over WebSocket (``GET /v1/responses``, Upgrade), on 127.0.0.1, for tests.

Each ``response.create`` is answered with ``response.created``, one text delta and ``response.completed``
whose usage is the create's ``metadata.fake_usage`` (input, cached, output, reasoning) or ``DEFAULT_USAGE``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection, serve

DEFAULT_USAGE = (207, 0, 47, 0)


@dataclass
class WsUpstream:
    path: str = "/v1/responses"
    creates: list[dict] = field(default_factory=list)  # every response.create the node got
    headers: list[dict[str, str]] = field(default_factory=list)  # each upgrade's request headers
    port: int = 0

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
        server = await serve(self._handle, "127.0.0.1", 0)
        self.port = next(iter(server.sockets)).getsockname()[1]
        return server

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
            n = len(self.creates)
            i, c, o, r = (msg.get("metadata") or {}).get("fake_usage") or DEFAULT_USAGE
            model = msg.get("model")
            resp = {"id": f"resp_{n}", "object": "response", "model": model, "status": "in_progress", "output": []}
            await ws.send(json.dumps({"type": "response.created", "sequence_number": 0, "response": resp}))
            await ws.send(json.dumps({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "m",
                                      "output_index": 0, "content_index": 0, "delta": "hello", "logprobs": []}))
            usage = {"input_tokens": int(i), "input_tokens_details": {"cached_tokens": int(c)},
                     "output_tokens": int(o), "output_tokens_details": {"reasoning_tokens": int(r)},
                     "total_tokens": int(i) + int(o)}
            done = {**resp, "status": "completed", "usage": usage}
            await ws.send(json.dumps({"type": "response.completed", "sequence_number": 2, "response": done}))

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

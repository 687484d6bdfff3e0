"""A TCP server on 127.0.0.1 in a thread of its own, for tests, and the byte pipe its subclasses splice
connections with (the CONNECT proxy, the HTTP/WebSocket splitter)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class ThreadServer:
    """Listens on 127.0.0.1 (``port``) from ``start`` to ``stop``; a subclass answers in ``handle``."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def start(self) -> ThreadServer:
        self._thread.start()

        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
               seen: Callable[[bytes], None] | None = None) -> None:
    """Copy ``src`` to ``dst`` until it ends (``seen`` gets every chunk), then close ``dst``."""
    try:
        while data := await src.read(65536):
            if seen is not None:
                seen(data)
            dst.write(data)
            await dst.drain()
    except ConnectionError:
        pass
    finally:
        dst.close()

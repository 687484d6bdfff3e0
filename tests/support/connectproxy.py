"""A corporate proxy for tests, on 127.0.0.1: it answers ``CONNECT host:port`` for the hosts it knows (names no
resolver knows, so that only the proxy reaches them) and pipes the tunnel; it keeps every CONNECT target and every
byte a client sent it, for a test to count and search."""

from __future__ import annotations

import asyncio
import threading


class ConnectProxy:
    def __init__(self, hosts: dict[str, tuple[str, int]]) -> None:
        self.hosts = hosts  # a name clients ask for -> where it really is
        self.connects: list[str] = []  # the target of every CONNECT, in order
        self.received = bytearray()  # everything clients sent, the tunnels' bytes included
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> ConnectProxy:
        self._thread.start()

        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        self.received += head
        method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        host, _, port = target.rpartition(":")
        where = self.hosts.get(host) if method == "CONNECT" else None
        if method == "CONNECT":
            self.connects.append(target)
        if where is None or int(port) != where[1]:
            writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*where)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            try:
                while data := await src.read(65536):
                    if keep:
                        self.received += data
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()
        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

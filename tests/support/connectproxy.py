"""A corporate proxy for tests, on 127.0.0.1: it answers ``CONNECT host:port`` for the hosts it knows (names no
resolver knows, so that only the proxy reaches them) and pipes the tunnel; it keeps every CONNECT target and every
byte a client sent it, for a test to count and search."""

from __future__ import annotations

import asyncio

from tests.support.pipes import ThreadServer, pipe


class ConnectProxy(ThreadServer):
    def __init__(self, hosts: dict[str, tuple[str, int]]) -> None:
        super().__init__()
        self.hosts = hosts  # a name clients ask for -> where it really is
        self.connects: list[str] = []  # the target of every CONNECT, in order
        self.received = bytearray()  # everything clients sent, the tunnels' bytes included

    def __enter__(self) -> ConnectProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        await asyncio.gather(pipe(reader, up_writer, self.received.extend), pipe(up_reader, writer))

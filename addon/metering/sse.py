"""Incremental Server-Sent Events parser (WHATWG "event stream interpretation"), bounded in memory.

Chunks arrive split at arbitrary bytes. Events are framed in bytes: line ends are normalised to
``\\n`` and an event is everything up to the next blank line (``\\n\\n``), found by one C-level
search per event, so a chunk's events cost a few slices each, not a Python step per line. Only
complete events are decoded (a UTF-8 character may straddle two chunks), and only those a ``want``
filter asks for: the others are counted in ``passed`` and never decoded or built. No mitmproxy
imports: tested on its own.

Per-chunk code tests for a substring with ``find``, not ``in``: ``b"x" in data`` first tries its operand
as an integer and clears the TypeError, ~200 ns against ~20 ns (CPython 3.13), per chunk of a stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_MAX_EVENT_BYTES = 4 * 2**20

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str = "message"
    data: str = ""


class SSEParser:
    """Feed raw (already content-decoded) bytes, get back the events each chunk completes.

    An event whose lines (comments included) take more than ``max_event_bytes`` is dropped (counted
    in ``dropped``) and the parser skips to the next blank line, so a stream that never ends an event
    cannot grow memory. ``want(name, data)`` (raw bytes; name ``b"message"`` when the event has none)
    decides whether an event is decoded and returned; events it refuses are counted in ``passed``.
    ``noise(name)``: names ``want`` refuses whatever the data; a chunk that is one whole such event (as
    most chunks of a long stream are) is counted without being framed.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, *,
                 want: Callable[[bytes, bytes], bool] | None = None,
                 noise: Callable[[bytes], bool] | None = None) -> None:
        self.max_event_bytes = max_event_bytes
        self.want = want
        self.noise = noise
        self.dropped = 0
        self.passed = 0
        self._pending = bytearray()  # the event in progress: the bytes since the last blank line
        self._after_cr = False  # the last chunk ended in "\r": a "\n" opening the next one is the same EOL
        self._skipping = False  # the event in progress overflowed: ignore bytes up to a blank line
        self._first = True  # a byte order mark may open the stream
        self._noise_head: bytes | None = None  # "event: <noise name>\ndata: " last seen

    def feed(self, data: bytes) -> list[SSEEvent]:
        if self.skip(data):
            return []
        out: list[SSEEvent] = []
        if not data:
            return out
        if self._after_cr and data[0] == 0x0A:
            data = data[1:]
        self._after_cr = data[-1:] == b"\r"
        if data.find(b"\r") >= 0:  # CRLF and CR become LF; a CRLF split across chunks is handled just above
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        pending = self._pending
        if pending:
            start = len(pending) - 1  # a blank line may begin with the last byte kept
            pending += data
            buf: bytes | bytearray = pending
        else:
            start = 0
            buf = data
        pos = 0
        if self._skipping:
            end = buf.find(b"\n\n", start)
            if end < 0:
                self._keep_newline(pending, buf[-1:] == b"\n")
                return out
            self._skipping = False
            pos = start = end + 2
        while (end := buf.find(b"\n\n", start)) >= 0:
            self._event(buf[pos:end], out)
            pos = start = end + 2
        if buf is pending:
            del pending[:pos]
        elif pos < len(buf):
            pending += buf[pos:]  # it was empty
        if len(pending) > self.max_event_bytes:
            self._overflow()
            self._keep_newline(pending, pending[-1:] == b"\n")
        return out

    def skip(self, data: bytes) -> bool:
        """Count ``data`` and return True when it is exactly one whole event ``event: <noise name>\ndata:
        …\n\n`` arriving with nothing pending (two lines, no CR), which ``_event`` would count in
        ``passed``; else False: ``data`` is still to be fed. The meter's per-chunk fast path: most chunks
        of a long stream. Its deltas share one name: ``event: <name>\ndata: `` is remembered, so the next
        ones cost one compare."""
        if (self.noise is None or self._pending or self._after_cr or self._first
                or len(data) > self.max_event_bytes):
            return False
        head = self._noise_head
        if head is not None and data.startswith(head):
            start = len(head)
        else:
            nl = data.find(b"\n")
            if data[:7] != b"event: " or data[nl + 1:nl + 7] != b"data: " or not self.noise(data[7:nl]):
                return False
            start = nl + 7
            self._noise_head = data[:start]
        if data.endswith(b"\n\n") and data.find(b"\n", start) == len(data) - 2 and data.find(b"\r") < 0:
            self.passed += 1
            return True
        return False

    @staticmethod
    def _keep_newline(pending: bytearray, newline: bool) -> None:
        """While skipping, only a last "\n" is kept: it may be the first half of the blank line."""
        pending.clear()
        if newline:
            pending += b"\n"

    def close(self) -> list[SSEEvent]:
        """End of stream: dispatch a last event that was not followed by a blank line."""
        out: list[SSEEvent] = []
        if self._pending and not self._skipping:
            self._event(bytes(self._pending), out)
        self._pending.clear()
        self._skipping = self._after_cr = False
        return out

    def _overflow(self) -> None:
        self.dropped += 1
        self._skipping = True

    def _event(self, block: bytes | bytearray, out: list[SSEEvent]) -> None:
        """One event's lines (without its blank line): dispatched when it has a data field."""
        if self._first:
            self._first = False
            if block[:3] == _BOM:
                block = block[3:]
        if len(block) > self.max_event_bytes:
            self.dropped += 1
            return
        name = b""
        # The usual shapes, "event: x\ndata: {...}" and "data: {...}", are sliced without a loop.
        if block[:6] == b"data: " and block.find(b"\n") < 0:
            data: bytes | None = bytes(block[6:])
        elif block[:7] == b"event: " and (nl := block.find(b"\n")) > 0 and block[nl + 1:nl + 7] == b"data: " \
                and block.find(b"\n", nl + 1) < 0:
            name, data = bytes(block[7:nl]), bytes(block[nl + 7:])
        else:
            name, data = self._fields(block)
        if data is None:
            return
        if not name:
            name = b"message"
        if self.want is not None and not self.want(name, data):
            self.passed += 1
            return
        out.append(SSEEvent(name.decode("utf-8", "replace"), data.decode("utf-8", "replace")))

    @staticmethod
    def _fields(block: bytes | bytearray) -> tuple[bytes, bytes | None]:
        """The event name and joined data lines (None: no data field) of any event's lines."""
        name = b""
        data: list[bytes] = []
        for line in bytes(block).split(b"\n"):
            field, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value
            # anything else: a comment (empty name: keep-alive), id, retry, an unknown field or the
            # blank line opening a block that followed extra blank lines
        return name, b"\n".join(data) if data else None

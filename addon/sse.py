"""Incremental Server-Sent Events parser (WHATWG "event stream interpretation"), bounded in memory.

Chunks arrive split at arbitrary bytes, so lines are buffered as bytes and decoded only once
complete (a UTF-8 character may straddle two chunks). No mitmproxy imports: tested on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MAX_EVENT_BYTES = 4 * 2**20

_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str = "message"
    data: str = ""


class SSEParser:
    """Feed raw (already content-decoded) bytes, get back the events each chunk completes.

    A line or an event longer than ``max_event_bytes`` is dropped (counted in ``dropped``) and the
    parser skips to the next blank line, so a stream that never ends an event cannot grow memory.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.dropped = 0
        self._partial = bytearray()  # an unterminated line
        self._after_cr = False  # the last chunk ended in "\r": a "\n" opening the next one is the same EOL
        self._skip_line = False  # the current line overflowed: ignore its bytes up to its end
        self._skip_event = False  # the current event overflowed: ignore lines up to a blank line
        self._first_line = True
        self._event = ""
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        if not data:
            return out
        if self._after_cr and data[0] == 0x0A:
            data = data[1:]
        self._after_cr = data[-1:] == b"\r"
        *lines, tail = _EOL.split(data)  # one C-level pass; the tail is an unterminated line
        for line in lines:
            if self._skip_line:
                self._skip_line = False
                continue
            if self._partial:
                self._partial += line
                line = bytes(self._partial)
                self._partial.clear()
            self._line(line, out)
        if tail:
            self._keep_partial(tail)
        return out

    def close(self) -> list[SSEEvent]:
        """End of stream: dispatch a last event that was not followed by a blank line."""
        out: list[SSEEvent] = []
        if self._partial and not self._skip_line:
            self._line(bytes(self._partial), out)
        self._partial.clear()
        self._skip_line = self._after_cr = False
        self._line(b"", out)
        return out

    def _keep_partial(self, tail: bytes) -> None:
        if self._skip_line:
            return
        if len(self._partial) + len(tail) > self.max_event_bytes:
            self._partial.clear()
            self._skip_line = True
            self._overflow()
            return
        self._partial += tail

    def _overflow(self) -> None:
        """Drop the event in progress (once) and wait for the next event boundary."""
        if not self._skip_event:
            self.dropped += 1
            self._skip_event = True
        self._data.clear()
        self._size = 0

    def _line(self, raw: bytes, out: list[SSEEvent]) -> None:
        if not raw:
            if self._data and not self._skip_event:
                # Joined lines are whole, so decoding once here cannot split a character.
                out.append(SSEEvent(self._event or "message", b"\n".join(self._data).decode("utf-8", "replace")))
            self._event = ""
            self._data.clear()
            self._size = 0
            self._skip_event = self._first_line = False
            return
        if self._skip_event:
            return
        if self._first_line:
            self._first_line = False
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte order mark may open the stream
        name, _, value = raw.partition(b":")
        if name != b"data" and name != b"event":
            return  # a comment (empty name: keep-alive), id, retry or an unknown field
        self._size += len(raw)
        if self._size > self.max_event_bytes:
            self._overflow()
            return
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        else:
            self._event = value.decode("utf-8", "replace")

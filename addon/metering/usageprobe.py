"""The usage probe: a streamed chat call whose client did not ask for usage is sent with
``stream_options.include_usage`` all the same, and the usage chunk this adds (``choices: []`` and a
``usage`` object, just before ``data: [DONE]``) is taken out of what the client receives.

Plain Python (no mitmproxy). ``UsageChunkFilter`` is the response's stream callable for such a call,
after the meter: it returns a list of chunks (mitmproxy sends each; an empty list sends nothing, where
``b""`` would end an HTTP/1.1 chunked body early). It holds back only the event in progress at a
chunk's end, up to ``MAX_HELD_BYTES``, and nothing once the usage chunk is gone. It works on the bytes
as sent, so only on identity-encoded bodies: a compressed stream reaches the client with the chunk.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from addon.guard.jsonedit import set_key

# The usage chunk is a few hundred bytes: an event in progress longer than this is not it.
MAX_HELD_BYTES = 64 * 2**10

# An event ends at a blank line; a "\r" ending the buffer may be the first half of a CRLF.
_EOL = rb"(?:\r\n|\n|\r(?!\n|\Z))"
_BLANK_LINE = re.compile(_EOL + _EOL)
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


def add_include_usage(body: bytes) -> bytes | None:
    """The chat request ``body`` with ``stream_options.include_usage`` true, every other byte as sent;
    None when the body already asks for usage (any value but absent, null, false or 0), is no streamed
    request, or is not a JSON object."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    options = obj.get("stream_options")
    if options is None:
        options = {}
    # Only a clear "no" (absent, null, false, 0) is probed: any other value asked for usage (``1`` does at
    # OpenAI), or is the upstream's to judge; either way the client gets the body and the chunk as sent.
    elif not isinstance(options, dict) or options.get("include_usage") not in (None, False):
        return None
    return set_key(body, "stream_options", {**options, "include_usage": True}, add=True)


def is_usage_chunk(event: bytes) -> bool:
    """Whether one SSE event (its lines, without the blank line) is the chat usage chunk."""
    if event.find(b'"usage"') < 0 or not _NO_CHOICES.search(event):
        return False
    data = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    try:
        obj = json.loads(b"\n".join(data))
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


class UsageChunkFilter:
    """Stream callable: ``meter``'s view of every upstream chunk, the client's without the usage chunk."""

    def __init__(self, meter: Callable[[bytes], object]) -> None:
        self._meter = meter
        self._held = bytearray()  # the event in progress (from its first byte), not yet sent
        self._passing = False  # the event in progress is too long to be the usage chunk: sent as it comes
        self.removed = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        self._meter(chunk)
        if not chunk:  # the end (or an empty HTTP/2 frame): nothing more is held back
            out, self._held = bytes(self._held), bytearray()
            return [out] if out else []
        if self.removed:
            return [chunk]
        # A blank line (at most 4 bytes) may begin in the bytes held before this chunk.
        search = max(0, len(self._held) - 3)
        self._held += chunk
        buf, kept, pos = self._held, bytearray(), 0
        while (m := _BLANK_LINE.search(buf, search)) is not None:
            if not self._passing and is_usage_chunk(bytes(buf[pos:m.start()])):
                self.removed = True
                kept += buf[m.end():]
                pos = len(buf)
                break
            kept += buf[pos:m.end()]
            self._passing = False
            pos = search = m.end()
        if len(buf) - pos > MAX_HELD_BYTES:
            self._passing = True
        if self._passing:  # sent on, but for the bytes a blank line may begin with
            keep = max(pos, len(buf) - 3)
            kept += buf[pos:keep]
            pos = keep
        del buf[:pos]
        return [bytes(kept)] if kept else []

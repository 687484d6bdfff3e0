"""The stream meter: mitmproxy's ``flow.response.stream`` callable, metering an answer as it passes.

Plain Python (no mitmproxy import). The bytes a client gets must never depend on this code: the
callable returns each chunk object untouched and never raises (mitmproxy does not catch it and would
empty the client's body), whatever the upstream sends. Parsing works on a content-decoded copy and
simply stops, noting why, when something goes wrong.

It runs on mitmproxy's event loop, so a compression bomb must not buy unbounded work: parsing a
call stops past ``max_decoded_bytes`` decoded bytes, and at a chunk that decodes to more than
``MAX_INFLATE_RATIO`` times its own size and more than ``CHUNK_INFLATE_FLOOR``. Decoded bytes cost
parsing (64 MiB of tiny SSE events take ~20 s), so the per-chunk bound is what keeps one event-loop
step short: mitmproxy reads at most 64 KiB, which may then cost ~2.5 s if it inflates to tiny
events, ~50 ms if to zeros.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from addon.guard.contentcoding import Decoder, decoder_for
from addon.metering.sse import DEFAULT_MAX_EVENT_BYTES, SSEEvent, SSEParser
from addon.metering.usage import UsageExtractor
from store.records import Usage

# Real SSE and JSON compress ~20x (synthetic streams up to ~140x); zeros ~1000x (gzip) and far more
# (br, zstd). The floor lets one chunk hold the largest event the SSE parser takes, however
# compressible (a looping model's final event repeats its whole output).
MAX_INFLATE_RATIO = 100
CHUNK_INFLATE_FLOOR = DEFAULT_MAX_EVENT_BYTES

# Flags beside UsageExtractor's: why a row's usage may be missing.
USAGE_UNREAD = "usage_unread"  # parsing gave up (see parse_error): usage missing or partial
NO_USAGE = "no_usage"  # the body ended and said nothing about usage

# A body sent as something other than text/event-stream that still is one (some relays mislabel it).
_LOOKS_LIKE_SSE = re.compile(rb"\s*(?:data|event)?:")

# A JSON body over this size is not kept whole nor parsed whole (json.loads costs the event loop
# ~2.5 ms per MB): only its first and last bytes are kept, where every API puts what is recorded.
JSON_SCAN_OVER = 2**20
JSON_HEAD_BYTES = JSON_TAIL_BYTES = 2**18


class _Tail:
    """The last ``size`` bytes of a body, held as the chunks that carry them: a chunk is neither copied
    when it comes nor when it goes (a 10 MB body would otherwise be copied about twice over)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._chunks: deque[bytes] = deque()
        self._len = 0

    def add(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._len += len(chunk)
        while self._len - len(self._chunks[0]) >= self.size:
            self._len -= len(self._chunks.popleft())

    def bytes(self) -> bytes:
        extra = self._len - self.size
        if extra <= 0:
            return b"".join(self._chunks)
        first, *rest = self._chunks
        return b"".join([first[extra:], *rest])


def _first_bytes(chunks: list[bytes], size: int) -> bytes:
    """The first ``size`` bytes of ``chunks``, copied once."""
    out, n = [], 0
    for c in chunks:
        if n + len(c) >= size:
            out.append(c[:size - n])
            break
        out.append(c)
        n += len(c)
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class MeterResult:
    usage: Usage | None
    model: str | None
    error: str | None
    completed: bool
    bytes: int
    first_chunk_at: float | None
    last_chunk_at: float | None
    ended: bool
    events: int
    raw_usage: str | None
    parse_error: str | None
    flags: tuple[str, ...]  # sorted, unique: USAGE_UNREAD, NO_USAGE and UsageExtractor's


class StreamMeter:
    """Counts, times and parses one response body while mitmproxy streams it to the client.

    ``text/event-stream`` bodies go through an ``SSEParser`` (memory bounded per event); any other
    body is buffered, decoded, and parsed as JSON at its end: whole up to ``JSON_SCAN_OVER`` bytes,
    beyond that by its head and tail (``UsageExtractor.on_json_ends``), up to ``max_parse_bytes``. The end
    (``b""``) is only acted on in ``result()``: mitmproxy also passes an empty chunk for an empty
    HTTP/2 DATA frame in mid-stream. Why usage could not be read (an unknown encoding, a body over
    the cap, a compression bomb, a decoder error) is in ``parse_error``. ``inflated`` counts the
    bytes the content decoder produced. ``kept`` holds the first ``keep_body_bytes`` raw bytes, for
    mitmweb.
    """

    def __init__(self, api_format: str | None, content_type: str | None, content_encoding: str | None, *,
                 max_parse_bytes: int = 16 * 2**20, max_decoded_bytes: int = 64 * 2**20, keep_body_bytes: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.extractor = UsageExtractor(api_format)
        self.max_parse_bytes = max_parse_bytes
        self.max_decoded_bytes = max_decoded_bytes
        self.keep_body_bytes = keep_body_bytes
        self._clock = clock
        self.bytes = 0
        self.first_chunk_at: float | None = None
        self.last_chunk_at: float | None = None
        self.ended = False
        self.events = 0
        self.inflated = 0
        self.parse_error: str | None = None
        self.truncated_parse = False
        self._kept = bytearray()
        # A JSON body's chunks, as they came: joined once at its end. Not grown into one buffer: a fresh
        # megabyte per call costs a page fault per 4 KiB (~1 ms per big call), the chunks are there anyway.
        self._body: list[bytes] = []
        self._head = b""  # past JSON_SCAN_OVER: the body's first bytes ...
        self._tail: _Tail | None = None  # ... and its last ones
        self._body_size = 0
        media_type = (content_type or "").split(";", 1)[0].strip().lower()
        self._sse = self._sse_parser() if media_type == "text/event-stream" else None
        self._parsing = True
        self._decoder: Decoder | None = None
        try:
            self._decoder = decoder_for(content_encoding)
        except ValueError as e:
            self._give_up(f"{e}: body not parsed")
        # Raw chunks are the parser's own bytes only when nothing decodes them first.
        self._skip = self._sse.skip if self._parsing and self._sse is not None and self._decoder is None else None

    def _sse_parser(self) -> SSEParser:
        # Deltas (most of a long stream) are framed in bytes and passed without being decoded.
        return SSEParser(want=self.extractor.wants, noise=self.extractor.noise)

    @property
    def kept(self) -> bytes:
        return bytes(self._kept)

    def __call__(self, chunk: bytes) -> bytes:
        try:
            if chunk:
                # An empty chunk before this one was an empty HTTP/2 DATA frame, not the end.
                self.ended = False
                self.bytes += len(chunk)
                self.last_chunk_at = now = self._clock()
                if self.first_chunk_at is None:
                    self.first_chunk_at = now
                if self.keep_body_bytes:
                    room = self.keep_body_bytes - len(self._kept)
                    if room > 0:
                        self._kept += chunk[:room]
                # A whole delta event of a plain event stream (most chunks): counted, not parsed.
                skip = self._skip
                if (skip is None or not skip(chunk)) and self._parsing:
                    self._parse(chunk)
            else:
                self.ended = True
        except Exception as e:  # anything: the client's bytes must flow on regardless
            self._failed(e)
        return chunk

    def result(self) -> MeterResult:
        """What was metered; once the body has ended, its last event or its JSON is parsed first."""
        if self.ended and self._parsing:
            try:
                self._finish()
            except Exception as e:
                self._failed(e)
        x = self.extractor
        events = self.events + (self._sse.passed if self._sse is not None else 0)
        flags = set(x.flags)
        # An event over the SSE parser's cap was dropped: it may have been the usage.
        if self.parse_error is not None or (x.usage is None and self._sse is not None and self._sse.dropped):
            flags.add(USAGE_UNREAD)
        elif x.usage is None and self.ended:
            flags.add(NO_USAGE)
        return MeterResult(
            usage=x.usage, model=x.model, error=x.error, completed=x.completed, bytes=self.bytes,
            first_chunk_at=self.first_chunk_at, last_chunk_at=self.last_chunk_at, ended=self.ended,
            events=events, raw_usage=x.raw_usage, parse_error=self.parse_error, flags=tuple(sorted(flags)),
        )

    def _parse(self, chunk: bytes) -> None:
        if self._decoder is None:
            self._take(chunk)
            return
        budget = max(CHUNK_INFLATE_FLOOR, MAX_INFLATE_RATIO * len(chunk))
        limit = min(self.inflated + budget, self.max_decoded_bytes)
        for piece in self._decoder.feed(chunk):
            self.inflated += len(piece)
            if self.inflated > limit:
                cause = (f"over {self.max_decoded_bytes} bytes decoded" if limit == self.max_decoded_bytes
                         else f"a {len(chunk)}-byte chunk decodes to over {budget} bytes")
                self._give_up(f"{cause}: a compression bomb? not parsed further")
                return  # stops pulling from the decoder: the bomb is not expanded further
            self._take(piece)
            if not self._parsing:
                return

    def _take(self, data: bytes) -> None:
        """Parse content-decoded bytes."""
        if self._sse is not None:
            self._dispatch(self._sse.feed(data))
        elif self._body_size + len(data) > self.max_parse_bytes:
            self.truncated_parse = True
            self._give_up(f"body over {self.max_parse_bytes} bytes: not parsed")
        else:
            self._body_size += len(data)
            if self._tail is not None:
                self._tail.add(data)
                return
            self._body.append(data)
            if self._body_size <= JSON_SCAN_OVER:
                return
            chunks, self._body = self._body, []
            head = _first_bytes(chunks, JSON_HEAD_BYTES)
            if _LOOKS_LIKE_SSE.match(head):  # a mislabeled event stream: parsed as it comes from now on
                self._sse = self._sse_parser()
                self._dispatch(self._sse.feed(b"".join(chunks)))
            else:
                self._head, self._tail = head, _Tail(JSON_TAIL_BYTES)
                for c in chunks:
                    self._tail.add(c)

    def _finish(self) -> None:
        self._parsing = False
        self._skip = None
        if self._sse is not None:
            self._dispatch(self._sse.close())
            return
        chunks, head, tail, self._body, self._head, self._tail = self._body, self._head, self._tail, [], b"", None
        if tail is not None:
            unread = self.extractor.on_json_ends(head, tail.bytes())
            if unread is not None and self.parse_error is None:
                self.parse_error = f"a {self._body_size}-byte body: {unread}"
            return
        body = b"".join(chunks)
        if _LOOKS_LIKE_SSE.match(body):
            self._sse = parser = self._sse_parser()  # parsing is over: kept for result()'s counts
            self._dispatch(parser.feed(body) + parser.close())
        else:
            self.extractor.on_json(body)

    def _dispatch(self, events: list[SSEEvent]) -> None:
        for ev in events:
            self.events += 1
            self.extractor.on_event(ev)

    def _give_up(self, reason: str) -> None:
        self._parsing = False
        self._skip = None
        self._body = []
        self._head = b""
        self._tail = None
        self._decoder = None  # its state (a zstd window: up to 8 MiB) is not needed any more
        if self.parse_error is None:
            self.parse_error = reason

    def _failed(self, e: Exception) -> None:
        try:
            reason = f"{type(e).__name__}: {e}"
        except Exception:  # an exception whose str() fails
            reason = type(e).__name__
        self._give_up(reason)

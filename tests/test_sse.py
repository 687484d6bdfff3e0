"""SSE parser: the WHATWG line and field rules, chunk boundaries anywhere, bounded memory."""

from __future__ import annotations

import itertools
import random
import re
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.metering.sse import SSEEvent, SSEParser

STREAM = (
    ": keep-alive\n"
    "event: response.created\n"
    'data: {"type":"response.created","text":"héllo 日本 🚀"}\n'
    "\n"
    "id: 7\n"
    "retry: 1000\n"
    "data: first line\n"
    "data:second line\n"
    "data:  two spaces\n"
    "\n"
    "event: only-a-name\n"
    "\n"
    "data\n"
    "\n"
).encode()

EXPECTED = [
    SSEEvent("response.created", '{"type":"response.created","text":"héllo 日本 🚀"}'),
    SSEEvent("message", "first line\nsecond line\n two spaces"),
    SSEEvent("message", ""),
]


def parse(chunks: list[bytes], **kw: int) -> list[SSEEvent]:
    p = SSEParser(**kw)
    out = [ev for c in chunks for ev in p.feed(c)]
    return out + p.close()


def test_fields_comments_and_dispatch_rules():
    # Comments and id/retry are ignored, one space after the colon is stripped, data lines join with
    # "\n", an event without data is not dispatched, a bare "data" line is an empty data line.
    assert parse([STREAM]) == EXPECTED


def test_every_split_point_gives_the_same_events():
    # Includes splits inside multi-byte UTF-8 characters: no U+FFFD may appear.
    for i in range(len(STREAM) + 1):
        assert parse([STREAM[:i], STREAM[i:]]) == EXPECTED, i


def test_random_chunkings_give_the_same_events():
    rng = random.Random(1)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 40)))
        chunks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
        assert parse(chunks) == EXPECTED


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_endings(eol: bytes):
    body = STREAM.replace(b"\n", eol)
    assert parse([body]) == EXPECTED
    assert parse([body[i:i + 1] for i in range(len(body))]) == EXPECTED


def test_cr_ending_a_chunk_and_lf_opening_the_next_are_one_line_end():
    # Read as two line ends this would be a blank line and dispatch "a" alone.
    assert parse([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [SSEEvent("message", "a\nb")]
    assert parse([b"data: a\r", b"\r", b"\n", b"data: b\n\n"]) == [SSEEvent("message", "a"), SSEEvent("message", "b")]


def test_feed_returns_events_as_soon_as_their_blank_line_arrives():
    p = SSEParser()
    assert p.feed(b"event: x\ndata: 1\n") == []
    assert p.feed(b"\ndata: 2") == [SSEEvent("x", "1")]
    assert p.feed(b"\n") == []
    assert p.feed(b"\n") == [SSEEvent("message", "2")]


def test_close_flushes_a_last_event_without_its_blank_line():
    assert parse([b"data: done\n"]) == [SSEEvent("message", "done")]
    assert parse([b"event: e\ndata: tail"]) == [SSEEvent("e", "tail")]
    assert parse([b"event: e\n"]) == []


def test_invalid_utf8_is_replaced_not_fatal():
    assert parse([b"data: \xff\xfe ok\n\n"]) == [SSEEvent("message", "\ufffd\ufffd ok")]


def test_leading_byte_order_mark_is_ignored():
    assert parse([b"\xef\xbb", b"\xbfdata: x\n\n"]) == [SSEEvent("message", "x")]


def test_overlong_line_is_dropped_and_parser_resyncs_at_next_event():
    p = SSEParser(max_event_bytes=100)
    out = p.feed(b"data: ok\n\nevent: big\ndata: " + b"x" * 60)
    out += p.feed(b"x" * 60 + b"\ndata: more\n\ndata: after\n\n")
    assert out == [SSEEvent("message", "ok"), SSEEvent("message", "after")]
    assert p.dropped == 1


def test_overlong_line_in_a_single_chunk_is_dropped():
    p = SSEParser(max_event_bytes=100)
    assert p.feed(b"data: " + b"y" * 200 + b"\n\ndata: next\n\n") == [SSEEvent("message", "next")]
    assert p.dropped == 1


def test_event_of_many_short_lines_over_the_cap_is_dropped():
    p = SSEParser(max_event_bytes=1000)
    out = p.feed(b"data: 0123456789\n" * 200 + b"\n" + b"data: fine\n\n")
    assert out == [SSEEvent("message", "fine")]
    assert p.dropped == 1


def _peak_while(feed_all) -> int:
    tracemalloc.start()
    try:
        feed_all()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_endless_line_does_not_grow_memory_past_the_cap():
    cap = 64 * 1024
    chunk = b"z" * 16384  # 16 MiB in all, never a line end
    p = SSEParser(max_event_bytes=cap)
    peak = _peak_while(lambda: [p.feed(chunk) for _ in range(1024)])
    assert peak < 4 * cap
    assert p.dropped == 1
    assert p.feed(b"\n\ndata: alive\n\n") == [SSEEvent("message", "alive")]


def test_endless_event_of_short_lines_does_not_grow_memory_past_the_cap():
    cap = 64 * 1024
    chunk = b"data: 0123456789abcdef\n" * 700  # ~16 KB per chunk, no blank line for 2 MB
    p = SSEParser(max_event_bytes=cap)
    peak = _peak_while(lambda: [p.feed(chunk) for _ in range(128)])
    assert peak < 8 * cap
    assert p.dropped == 1
    assert p.feed(b"\ndata: alive\n\n") == [SSEEvent("message", "alive")]


def test_want_refuses_events_without_decoding_them():
    seen: list[tuple[bytes, bytes]] = []

    def want(name: bytes, data: bytes) -> bool:
        seen.append((name, data))
        return not name.endswith(b".delta")

    p = SSEParser(want=want)
    out = p.feed(b"event: a.delta\ndata: 1\n\n: c\ndata: x\ndata: y\n\nevent: b\ndata: \xff\n\n")
    assert out == [SSEEvent("message", "x\ny"), SSEEvent("b", "\ufffd")]
    assert seen == [(b"a.delta", b"1"), (b"message", b"x\ny"), (b"b", b"\xff")] and p.passed == 1


def _reference(stream: bytes) -> list[SSEEvent]:
    """The WHATWG rules written line by line, as plainly as possible (no cap, no chunks)."""
    out, name, data = [], "", []
    lines = re.split(rb"\r\n|\r|\n", stream.removeprefix(b"\xef\xbb\xbf"))
    for line in lines[:-1] + ([lines[-1], b""] if lines[-1] else [b""]):
        if not line:
            if data:
                out.append(SSEEvent(name or "message", b"\n".join(data).decode("utf-8", "replace")))
            name, data = "", []
            continue
        field, _, value = line.partition(b":")
        value = value[1:] if value[:1] == b" " else value
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return out


_lines = st.sampled_from([b"data: x", b"data:y", b"data", b"data: \xe6\x97\xa5", b"event: e", b"event:", b": c",
                          b"id: 1", b"retry: 5", b"", b"\xef\xbb\xbfdata: bom", b"dat", b"data:  z"])


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.tuples(_lines, st.sampled_from([b"\n", b"\r\n", b"\r"])), max_size=25),
       bom=st.booleans(), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_any_stream_any_chunking_follows_the_line_rules(lines, bom, cuts):
    stream = (b"\xef\xbb\xbf" if bom else b"") + b"".join(line + eol for line, eol in lines)
    points = sorted({c for c in cuts if c < len(stream)})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parse(chunks) == _reference(stream)


_event_lines = st.sampled_from([b"event: a.delta", b"event: b", b"data: x", b"data: y.delta", b"data:", b": c",
                                b"id: 1"])
# Events that start like a noise event, and near misses of the shortcut's shape.
_noise_like = st.sampled_from([[b"event: a.delta", b"data: x"], [b"event: a.delta", b"data: x", b"event: b"],
                               [b"event: a.delta", b"data: x", b"data: y"], [b"event: a.delta", b": c", b"data: x"],
                               [b"event: a.delta", b"data:"], [b"event: a.delta"], [b"event: a.delta", b": c"],
                               [b"event: a.delta", b"id: 1"], [b"event: a.delta", b"data: x\revent: b"],
                               [b"event: b", b"data: x"],
                               # a second noise name: the parser remembers the last one's head
                               [b"event: b.delta", b"data: y"], [b"event: b.delta", b"data: y", b"data: z"]])


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_noise_like | st.lists(_event_lines, min_size=1, max_size=4), max_size=12),
       eol=st.sampled_from([b"\n", b"\r\n"]), per_event=st.booleans(), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_noise_events_counted_unframed_exactly_as_framing_counts_them(events, eol, per_event, cuts):
    """The shortcut for a chunk that is one whole noise event gives the events and counts of the full path,
    whether chunks follow event boundaries (as servers send them) or not."""
    blocks = [eol.join(lines) + eol + eol for lines in events]
    stream = b"".join(blocks)
    if per_event:
        points = list(itertools.accumulate(len(b) for b in blocks))[:-1]
    else:
        points = sorted({c for c in cuts if 0 < c < len(stream)})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]

    def run(noise) -> tuple[list[SSEEvent], int, int]:
        p = SSEParser(want=lambda name, data: not name.endswith(b".delta"), noise=noise)
        events = [e for c in chunks for e in p.feed(c)] + p.close()
        return events, p.passed, p.dropped

    assert run(lambda name: name.endswith(b".delta")) == run(None)

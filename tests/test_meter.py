"""Stream meter: the client's bytes pass untouched whatever happens, and usage is read from them
however they are chunked or content-encoded, within bounded memory."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import random
import tracemalloc
import zlib
from collections.abc import Callable

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addon.metering.meter import CHUNK_INFLATE_FLOOR, MAX_INFLATE_RATIO, MeterResult, StreamMeter
from store.records import Usage
from tests.support.apibodies import CASES, CODEX_MODEL, CODEX_USAGE, OVERLOADED_STREAM, events_of

SSE = "text/event-stream"
JSON = "application/json"
CODEX_USAGE_JSON = json.loads(CASES["responses"][1])["usage"]

ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "deflate-raw": lambda b: zlib.compress(b, wbits=-15),
    "br": brotli.compress,
    "zstd": zstandard.compress,
}


def header(encoding: str | None) -> str | None:
    return "deflate" if encoding == "deflate-raw" else encoding


def encode(encoding: str | None, body: bytes) -> bytes:
    return ENCODERS[encoding](body) if encoding else body


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos:pos + n])
        pos, i = pos + n, i + 1
    return out


def run(chunks: list[bytes], fmt: str | None = "responses", content_type: str | None = SSE,
        encoding: str | None = None, **kw) -> StreamMeter:
    """Feeds chunks then the end marker, as mitmproxy does, checking every chunk comes back as is."""
    meter = StreamMeter(fmt, content_type, encoding, **kw)
    for c in [*chunks, b""]:
        assert meter(c) is c
    return meter


def usage_of(m: StreamMeter) -> tuple:
    r = m.result()
    return r.usage, r.model, r.completed, r.error


# -- passthrough and bookkeeping ---------------------------------------------------------------------
def test_chunks_come_back_as_the_same_objects_and_are_counted():
    stream = CASES["responses"][0]
    chunks = chunked(stream, [100, 1, 7])
    m = run(chunks)
    r = m.result()
    assert r.bytes == len(stream) and r.ended
    assert (r.usage, r.model, r.completed) == (CODEX_USAGE, CODEX_MODEL, True)
    assert r.events == len(events_of(stream))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.bytes = 0  # type: ignore[misc]


def test_times_of_first_and_last_chunk_from_the_clock():
    ticks = iter([10.0, 10.5, 12.25])
    m = StreamMeter("chat", SSE, None, clock=lambda: next(ticks))
    assert m.result().first_chunk_at is None
    m(b"data: {}\n\n")
    m(b"")  # an empty chunk is no data: the clock is not read
    assert (m.first_chunk_at, m.last_chunk_at, m.ended) == (10.0, 10.0, True)
    m = StreamMeter("chat", SSE, None, clock=lambda: next(ticks))
    m(b"a")
    m(b"b")
    assert (m.result().first_chunk_at, m.result().last_chunk_at, m.result().ended) == (10.5, 12.25, False)


def test_kept_holds_the_first_raw_bytes_only():
    raw = encode("gzip", CASES["chat"][0])
    m = run(chunked(raw, [5]), "chat", SSE, "gzip", keep_body_bytes=64)
    assert m.kept == raw[:64] and m.result().usage == CASES["chat"][3]
    assert run([raw], "chat", SSE, "gzip").kept == b""


def test_a_second_end_marker_changes_nothing():
    # The relay's retry path feeds a whole body, then b"": an empty body means two end markers.
    body = CASES["chat"][1]
    m = run([body], "chat", JSON)
    assert m(b"") == b"" and usage_of(m) == (CASES["chat"][3], CASES["chat"][2], True, None)
    m = run([], "chat", JSON)
    m(b"")
    assert m.result().usage is None and m.result().ended


def test_empty_chunk_in_mid_stream_is_not_the_end():
    # mitmproxy passes an empty HTTP/2 DATA frame on as b"": only the last b"" ends the body.
    _, body, model, usage = CASES["chat"]
    m = StreamMeter("chat", JSON, None)
    for c in (body[:40], b"", body[40:]):
        m(c)
    assert not m.ended
    m(b"")
    assert usage_of(m) == (usage, model, True, None) and m.result().ended


# -- chunking ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", CASES)
def test_every_split_point_gives_the_same_usage(fmt: str):
    stream, _, model, usage = CASES[fmt]
    for i in range(len(stream) + 1):
        assert usage_of(run([stream[:i], stream[i:]], fmt)) == (usage, model, True, None), i


@pytest.mark.parametrize("fmt", CASES)
def test_random_chunkings_give_the_same_usage(fmt: str):
    stream, _, model, usage = CASES[fmt]
    rng = random.Random(fmt)
    for _ in range(200):
        sizes = [rng.randint(1, 64) for _ in range(rng.randint(1, 8))]
        assert usage_of(run(chunked(stream, sizes), fmt)) == (usage, model, True, None)


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
@pytest.mark.parametrize("fmt", CASES)
def test_crlf_and_cr_streams(fmt: str, eol: bytes):
    stream, _, model, usage = CASES[fmt]
    body = stream.replace(b"\n", eol)
    assert usage_of(run(chunked(body, [3, 1, 17]), fmt)) == (usage, model, True, None)


@pytest.mark.parametrize("fmt", CASES)
def test_keep_alive_comments_and_malformed_lines_are_ignored(fmt: str):
    stream, _, model, usage = CASES[fmt]
    noisy = stream.replace(b"\n\n", b"\n\n: keep-alive\n\n:\ndata: {broken json\n\nretry: 5\n\n")
    assert usage_of(run(chunked(noisy, [11]), fmt)) == (usage, model, True, None)


def test_media_type_parameters_and_case_are_ignored():
    stream, _, model, usage = CASES["responses"]
    assert usage_of(run([stream], "responses", "Text/Event-Stream; charset=utf-8")) == (usage, model, True, None)


def test_error_event_in_a_200_stream_is_reported():
    r = run(chunked(OVERLOADED_STREAM, [9]), "responses").result()
    assert r.error is not None and "overloaded" in r.error
    assert (r.completed, r.model, r.usage) == (False, CODEX_MODEL, None)


# -- JSON bodies -------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", [None, *ENCODERS])
@pytest.mark.parametrize("fmt", CASES)
def test_json_bodies_plain_and_encoded(fmt: str, encoding: str | None):
    _, body, model, usage = CASES[fmt]
    raw = encode(encoding, body)
    m = run(chunked(raw, [13]), fmt, "application/json; charset=utf-8", header(encoding))
    assert usage_of(m) == (usage, model, True, None) and m.bytes == len(raw)


def test_event_stream_sent_with_a_wrong_content_type_is_still_read():
    stream, _, model, usage = CASES["messages"]
    assert usage_of(run([stream], "messages", "text/plain")) == (usage, model, True, None)
    assert usage_of(run([stream], "messages", None)) == (usage, model, True, None)


# -- content encodings -------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ENCODERS)
@pytest.mark.parametrize("fmt", CASES)
def test_encoded_streams_in_small_chunks(fmt: str, encoding: str):
    stream, _, model, usage = CASES[fmt]
    raw = encode(encoding, stream)
    for sizes in ([1], [2, 5, 3], [64]):
        m = run(chunked(raw, sizes), fmt, SSE, header(encoding))
        assert usage_of(m) == (usage, model, True, None)
        assert m.result().parse_error is None


def _flushing(encoding: str) -> Callable[[bytes], bytes]:
    """A compressor that flushes after each piece, as a streaming server does."""
    if encoding == "gzip":
        z = zlib.compressobj(wbits=31)
        return lambda b: z.compress(b) + z.flush(zlib.Z_SYNC_FLUSH)
    if encoding == "br":
        c = brotli.Compressor()
        return lambda b: c.process(b) + c.flush()
    z = zstandard.ZstdCompressor().compressobj()
    return lambda b: z.compress(b) + z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_decoding_is_incremental_not_at_the_end(encoding: str):
    # The model is known as soon as response.created arrives, long before the body ends.
    flush = _flushing(encoding)
    stream = CASES["responses"][0]
    first, rest = stream.split(b"\n\n", 1)
    m = StreamMeter("responses", SSE, encoding)
    m(flush(first + b"\n\n"))
    assert (m.result().model, m.result().events) == (CODEX_MODEL, 1)
    m(flush(rest))
    m(b"")
    assert usage_of(m) == (CODEX_USAGE, CODEX_MODEL, True, None)


def test_unknown_encoding_is_recorded_and_not_parsed():
    stream = CASES["responses"][0]
    m = run([stream], "responses", SSE, "compress")
    r = m.result()
    assert r.usage is None and r.bytes == len(stream) and r.parse_error and "compress" in r.parse_error
    assert r.flags == ("usage_unread",)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_corrupt_encoded_body_stops_parsing_but_not_the_bytes(encoding: str):
    garbage = b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4 if encoding == "gzip" else b"\xff" * 1024
    chunks = chunked(garbage, [100])
    m = run(chunks, "responses", SSE, encoding)
    r = m.result()
    assert r.parse_error is not None and r.usage is None and r.flags == ("usage_unread",)
    assert r.bytes == len(garbage) and r.ended


def test_exception_inside_parsing_does_not_escape_and_is_recorded_once():
    stream = CASES["responses"][0]
    m = StreamMeter("responses", SSE, None)
    calls = []

    def broken(ev):
        calls.append(ev)
        raise RuntimeError("boom")

    m.extractor.on_event = broken  # type: ignore[method-assign]
    chunks = chunked(stream, [50])
    for c in [*chunks, b""]:
        assert m(c) is c
    r = m.result()
    assert r.parse_error == "RuntimeError: boom" and len(calls) == 1  # parsing stopped at the first failure
    assert r.bytes == len(stream) and r.ended and r.last_chunk_at is not None


def test_a_failing_clock_does_not_escape():
    def clock() -> float:
        raise OSError("no time")

    chunk = CASES["chat"][0]
    m = StreamMeter("chat", SSE, None, clock=clock)
    assert m(chunk) is chunk and m(b"") == b""
    assert m.bytes == len(chunk) and m.parse_error == "OSError: no time"


# -- memory caps -------------------------------------------------------------------------------------
def test_json_body_over_the_cap_stops_buffering():
    _, body, _, _ = CASES["responses"]
    huge = body[:-1] + b', "padding": "' + b"x" * 200_000 + b'"}'
    m = run(chunked(huge, [4096]), "responses", JSON, max_parse_bytes=50_000)
    r = m.result()
    assert m.truncated_parse and r.usage is None and r.parse_error and "50000" in r.parse_error
    assert r.flags == ("usage_unread",)
    assert r.bytes == len(huge) and r.ended
    m = run(chunked(huge, [4096]), "responses", JSON, max_parse_bytes=len(huge))
    assert not m.truncated_parse and m.result().usage == CODEX_USAGE  # at the cap it still fits


# The most one decoding step yields before a limit is checked: zlib is asked for 64 KiB at a time,
# brotli too (it rounds up to ~96 KiB); a 128-byte slice of zstd input can hold 32 RLE blocks of 128 KiB.
STEP = {"gzip": 2**16, "deflate": 2**16, "br": 2**17, "zstd": 4 * 2**20}


@functools.cache
def _bomb(encoding: str, content_type: str, mib: int = 256) -> bytes:
    """A real answer's start, then ``mib`` MiB of zeros, then its usage: compressed a MiB at a time."""
    stream = CASES["responses"][0]
    head, tail = ((stream[:stream.index(b"\n\n") + 2], stream) if content_type == SSE
                  else (b'{"model": "gpt-5-codex", "padding": "', b'", "usage": {"input_tokens": 1}}'))
    if encoding in ("gzip", "deflate"):
        z = zlib.compressobj(1, zlib.DEFLATED, 31 if encoding == "gzip" else 15)  # ~230x: fast to make
        compress, finish = z.compress, z.flush
    elif encoding == "br":
        b = brotli.Compressor(quality=1)
        compress, finish = b.process, b.finish
    else:
        zs = zstandard.ZstdCompressor(level=1).compressobj()
        compress, finish = zs.compress, zs.flush
    zeros = bytes(2**20)
    return b"".join([compress(head), *(compress(zeros) for _ in range(mib)), compress(tail), finish()])


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("content_type", [JSON, SSE])
@pytest.mark.parametrize("encoding", STEP)
def test_compression_bomb_stops_parsing_but_not_the_bytes(encoding: str, content_type: str):
    bomb = _bomb(encoding, content_type)
    chunks = chunked(bomb, [65536])
    m = StreamMeter("responses", content_type, encoding, max_parse_bytes=2**20)  # JSON: buffers less
    returned: list[bytes] = []
    peak = _peak(lambda: returned.extend(m(c) for c in [*chunks, b""]))
    assert all(out is c for out, c in zip(returned, [*chunks, b""], strict=True))
    r = m.result()
    # Far less than the bomb is inflated (a JSON body stops at max_parse_bytes); memory stays bounded.
    assert m.inflated <= m.max_decoded_bytes + STEP[encoding] < 256 * 2**20
    assert peak < 12 * 2**20, peak  # the SSE parser may hold up to its 4 MiB event cap
    assert r.bytes == len(bomb) and r.ended and r.usage is None
    assert r.parse_error is not None and r.flags == ("usage_unread",)
    if content_type == SSE:
        assert r.model == CODEX_MODEL  # what came before the bomb was read


@pytest.mark.parametrize("encoding", STEP)
def test_a_whole_bomb_in_one_chunk_costs_at_most_its_chunk_budget_or_the_cap(encoding: str):
    bomb = _bomb(encoding, SSE)
    m = StreamMeter("responses", SSE, encoding, max_decoded_bytes=8 * 2**20)
    assert m(bomb) is bomb
    budget = max(CHUNK_INFLATE_FLOOR, MAX_INFLATE_RATIO * len(bomb))
    assert m.inflated <= min(budget, m.max_decoded_bytes) + STEP[encoding]
    assert m.result().parse_error is not None and "compression bomb" in m.result().parse_error


def _noisy_answer(content_type: str, mib: int = 3) -> bytes:
    """``mib`` MiB of barely compressible text (SSE events or a JSON member), then a real answer's usage."""
    rng = random.Random(mib)
    hexes = [rng.randbytes(3000).hex().encode() for _ in range(mib * 2**20 // 6000)]
    if content_type == SSE:
        return b"".join(b"event: response.output_text.delta\ndata: %s\n\n" % h for h in hexes) + CASES["responses"][0]
    return b'{"padding": "%s", %s' % (b"".join(hexes), CASES["responses"][1][1:])


@pytest.mark.parametrize("content_type", [JSON, SSE])
@pytest.mark.parametrize("encoding", STEP)
def test_decoded_bytes_are_capped_per_call_across_chunks(encoding: str, content_type: str):
    body = _noisy_answer(content_type)
    raw = brotli.compress(body, quality=4) if encoding == "br" else encode(encoding, body)
    cap = 2**20
    m = run(chunked(raw, [4096]), "responses", content_type, encoding, max_decoded_bytes=cap)
    r = m.result()
    assert m.inflated <= cap + STEP[encoding]
    assert r.parse_error == f"over {cap} bytes decoded: a compression bomb? not parsed further"
    assert (r.usage, r.flags, r.bytes) == (None, ("usage_unread",), len(raw))
    # Under the default cap the same answer is read whole: ordinary compression trips nothing.
    r = run(chunked(raw, [4096]), "responses", content_type, encoding).result()
    assert (r.usage, r.parse_error, r.flags) == (CODEX_USAGE, None, ())


def test_zstd_frame_asking_for_a_window_over_8_mib_is_refused():
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=25)
    body = zstandard.ZstdCompressor(compression_params=params).compress(b"data: " + bytes(32 * 2**20))
    m = StreamMeter("responses", SSE, "zstd")
    peak = _peak(lambda: (m(body), m(b"")))
    assert peak < 12 * 2**20 and m.bytes == len(body)
    assert m.result().parse_error is not None and "memory" in m.result().parse_error


# -- flags: why a row's usage is what it is ---------------------------------------------------------
@pytest.mark.parametrize("fmt", CASES)
def test_real_answers_have_no_flags(fmt: str):
    stream, body, _, _ = CASES[fmt]
    assert run([stream], fmt).result().flags == ()
    assert run([encode("gzip", body)], fmt, JSON, "gzip").result().flags == ()


def test_an_ended_body_without_usage_says_so_and_a_cut_one_does_not():
    error = b'{"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}'
    assert run([error], "responses", JSON).result().flags == ("no_usage",)
    assert run([OVERLOADED_STREAM], "responses").result().flags == ("no_usage",)
    m = StreamMeter("responses", SSE, None)
    m(OVERLOADED_STREAM)  # no end marker: the call was cut off, its status says so
    assert m.result().flags == ()


def test_usage_lost_in_an_oversized_event_is_unread_not_absent():
    stream = CASES["responses"][0]
    head, completed = stream.rsplit(b"event: response.completed", 1)
    padded = completed.replace(b'"output": [', b'"output": ["' + b"x" * (4 * 2**20) + b'", ', 1)
    r = run([head, b"event: response.completed" + padded], "responses").result()
    assert (r.usage, r.parse_error, r.flags) == (None, None, ("usage_unread",))
    # An oversized event that held no usage costs nothing: the usage still came.
    big = b"event: response.output_text.delta\ndata: " + b"x" * (4 * 2**20) + b"\n\n"
    r = run([big, stream], "responses").result()
    assert (r.usage, r.flags) == (CODEX_USAGE, ())


def test_usage_flags_of_the_extractor_come_through_sorted():
    usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 50}, "output_tokens": 5}
    completed = CASES["responses"][0].rsplit(b"event: response.completed", 1)[1]
    odd = completed.replace(b'"input_tokens": 5120', b'"input_tokens": 1', 1)
    stream = (b"event: response.completed\ndata: " + json.dumps(
        {"type": "response.completed", "response": {"usage": usage}}).encode() + b"\n\n"
        + b"event: response.completed" + odd)
    r = run([stream], "responses").result()
    assert r.usage == Usage(input_tokens=10, cached_tokens=10, output_tokens=5)
    assert r.flags == ("usage_clamped", "usage_repeated")


# -- properties --------------------------------------------------------------------------------------
_encodings = st.sampled_from([None, "", "identity", "gzip", "x-gzip", "deflate", "br", "zstd", "GZIP ", "gzip, br",
                              "compress", "\x00"]) | st.text(max_size=10)
_content_types = st.sampled_from([None, SSE, JSON, "text/plain", "text/event-stream;charset=utf-8", ""]) | st.text(
    max_size=20)


@st.composite
def _bodies(draw) -> bytes:
    """Random bytes, or a real (possibly encoded) body, possibly corrupted."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=3000))
    fmt = draw(st.sampled_from(sorted(CASES)))
    body = CASES[fmt][draw(st.sampled_from([0, 1]))]
    raw = encode(draw(st.sampled_from([None, *ENCODERS])), body)
    if raw and draw(st.booleans()):
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies(), cuts=st.lists(st.integers(0, 4000), max_size=12), encoding=_encodings,
       content_type=_content_types, fmt=st.sampled_from([None, "responses", "chat", "messages"]),
       keep=st.integers(0, 100))
def test_any_bytes_any_split_any_headers_pass_through(body, cuts, encoding, content_type, fmt, keep):
    points = sorted({c for c in cuts if c < len(body)})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    meter = StreamMeter(fmt, content_type, encoding, keep_body_bytes=keep)
    returned = []
    for c in [*chunks, b""]:
        out = meter(c)
        assert out is c
        returned.append(out)
    assert b"".join(returned) == body
    assert meter.bytes == len(body)
    r = meter.result()
    assert isinstance(r, MeterResult) and meter.kept == body[:keep]
    assert list(r.flags) == sorted(set(r.flags))
    assert set(r.flags) <= {"usage_unread", "no_usage", "usage_clamped", "usage_repeated"}
    assert r.parse_error is None or "usage_unread" in r.flags
    assert "no_usage" not in r.flags or (r.usage is None and r.ended and "usage_unread" not in r.flags)


@settings(max_examples=150, deadline=None)
@given(fmt=st.sampled_from(sorted(CASES)), encoding=st.sampled_from([None, *ENCODERS]),
       sizes=st.lists(st.integers(1, 200), min_size=1, max_size=10))
def test_any_chunking_of_any_encoding_reads_the_same_usage(fmt, encoding, sizes):
    stream, _, model, usage = CASES[fmt]
    m = run(chunked(encode(encoding, stream), sizes), fmt, SSE, header(encoding))
    assert usage_of(m) == (usage, model, True, None)


# -- the fast path and big bodies ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", CASES)
def test_every_event_is_counted_decoded_or_not(fmt: str):
    stream = CASES[fmt][0]
    assert run([stream], fmt).result().events == len(events_of(stream))


def _big_responses_body(mib: int = 10, usage: object = CODEX_USAGE_JSON) -> bytes:
    """A Responses object in the API's member order, its output text ``mib`` MiB long."""
    return json.dumps({"id": "resp_1", "object": "response", "status": "completed", "error": None,
                       "instructions": "You are Codex.", "model": CODEX_MODEL,
                       "output": [{"type": "message", "content": [{"type": "output_text", "text": "y" * mib * 2**20}]}],
                       "tools": [{"type": "function", "name": "shell"}], "usage": usage, "user": None,
                       "metadata": {"usage": "a key of the caller's"}}).encode()


def test_a_10_mb_json_body_is_read_by_its_ends_in_bounded_memory():
    body = _big_responses_body()
    chunks = chunked(body, [65536])
    m = StreamMeter("responses", JSON, None)
    tracemalloc.start()
    try:
        for c in chunks:
            assert m(c) is c
        m(b"")
        r = m.result()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (r.usage, r.model, r.completed, r.error, r.flags) == (CODEX_USAGE, CODEX_MODEL, True, None, ())
    assert json.loads(r.raw_usage) == CODEX_USAGE_JSON
    assert peak < 3 * 2**20  # not the 10 MiB body, nor a copy of it


def test_a_big_body_without_usage_near_its_end_is_unread_not_absent():
    r = run(chunked(_big_responses_body(2, usage=None), [65536]), "responses", JSON).result()
    assert (r.usage, r.model, r.completed, r.flags) == (None, CODEX_MODEL, True, ("usage_unread",))
    assert r.parse_error.startswith(f"a {len(_big_responses_body(2, usage=None))}-byte body: no usage found")


def test_a_big_event_stream_sent_as_json_is_parsed_as_it_comes():
    stream = CASES["responses"][0]
    delta = stream.split(b"event: response.output_text.delta", 2)[1]
    big = stream.replace(b"event: response.completed", (b"event: response.output_text.delta" + delta) * 20_000
                         + b"event: response.completed")
    assert len(big) > 2**21
    m = run(chunked(big, [65536]), "responses", JSON)
    assert usage_of(m) == (CODEX_USAGE, CODEX_MODEL, True, None) and m.result().events == 20_000 + 12


_NO_USAGE = {
    "responses": [(SSE, OVERLOADED_STREAM),
                  (JSON, b'{"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}')],
    # A chat stream asked for without include_usage: no usage chunk.
    "chat": [(SSE, CASES["chat"][0].replace(b"data: " + CASES["chat"][0].split(b"data: ")[-2], b"")),
             (JSON, json.dumps(dict(json.loads(CASES["chat"][1]), usage=None)).encode())],
    "messages": [(SSE, b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
                       b'"message": "Overloaded"}}\n\n'),
                 (JSON, b'{"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}')],
}


@pytest.mark.parametrize("fmt", _NO_USAGE)
def test_a_call_without_usage_says_so_for_every_api_streamed_or_not(fmt: str):
    for content_type, body in _NO_USAGE[fmt]:
        r = run([body], fmt, content_type).result()
        assert (r.usage, r.completed or r.error is not None, r.flags) == (None, True, ("no_usage",)), body

"""Usage extraction: what the store is told a call used, for each API format, streamed and not.

The sample bodies (``tests.support.apibodies``) mirror what the real APIs send; test_meter.py reads them too.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.metering.sse import SSEEvent, SSEParser
from addon.metering.usage import UsageExtractor, iteration_usages
from store.records import Usage
from tests.support.apibodies import (
    ANTHROPIC_JSON,
    ANTHROPIC_MODEL,
    ANTHROPIC_START_USAGE,
    ANTHROPIC_STREAM,
    ANTHROPIC_USAGE,
    CASES,
    CHAT_CHUNK,
    CHAT_MODEL,
    CHAT_STREAM,
    CODEX_CREATED,
    CODEX_DONE,
    CODEX_JSON,
    CODEX_MODEL,
    CODEX_STREAM,
    CODEX_USAGE,
    FAILED_STREAM,
    OVERLOADED_STREAM,
    events_of,
    responses_event,
    sse,
)


def extract(api_format: str | None, body: bytes) -> UsageExtractor:
    x = UsageExtractor(api_format)
    for ev in events_of(body):
        x.on_event(ev)
    return x



# -- streams -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", CASES)
def test_stream_usage_model_and_completion(fmt: str):
    stream, _, model, usage = CASES[fmt]
    x = extract(fmt, stream)
    assert (x.usage, x.model, x.completed, x.error) == (usage, model, True, None)
    assert x.raw_usage is not None and json.loads(x.raw_usage)  # the audited object is valid JSON


@pytest.mark.parametrize("fmt", CASES)
def test_unknown_format_recognises_every_shape(fmt: str):
    stream, body, model, usage = CASES[fmt]
    x = extract(None, stream)
    assert (x.usage, x.model, x.completed) == (usage, model, True)
    x = UsageExtractor(None)
    x.on_json(body)
    assert (x.usage, x.model, x.completed) == (usage, model, True)


@pytest.mark.parametrize("fmt", CASES)
def test_truncated_stream_is_not_completed(fmt: str):
    stream, _, _, _ = CASES[fmt]
    events = events_of(stream)
    x = UsageExtractor(fmt)
    for ev in events[:-2]:
        x.on_event(ev)
    assert not x.completed


def test_codex_usage_sets_total_by_openai_convention():
    x = extract("responses", CODEX_STREAM)
    assert x.usage is not None and x.usage.total_tokens == 5120 + 311
    assert json.loads(x.raw_usage)["total_tokens"] == 5431


def test_codex_model_known_from_response_created_before_completion():
    x = extract("responses", CODEX_STREAM.split(b"event: response.in_progress")[0])
    assert (x.model, x.usage, x.completed) == (CODEX_MODEL, None, False)


def test_anthropic_message_delta_overwrites_cumulative_counts():
    x = UsageExtractor("messages")
    for ev in events_of(ANTHROPIC_STREAM.split(b"event: message_delta")[0]):
        x.on_event(ev)
    assert x.usage == Usage(32012, 30000, 2000, 1, 0)  # message_start alone: output 1 so far
    for out in (10, 250, 503):  # cumulative: the last one counts, they are not added
        x.on_event(SSEEvent("message_delta", json.dumps({"type": "message_delta", "usage": {"output_tokens": out}})))
    assert x.usage == ANTHROPIC_USAGE
    # Newer APIs repeat the input side in message_delta: present figures replace, but a null or a 0
    # over a figure message_start gave leaves it (the API repeats fields it has no news for as 0).
    x.on_event(SSEEvent("message_delta", json.dumps({"type": "message_delta", "usage": {
        "input_tokens": 20, "cache_read_input_tokens": None, "cache_creation_input_tokens": 0, "output_tokens": 600}})))
    assert x.usage == Usage(input_tokens=32020, cached_tokens=30000, cache_write_tokens=2000, output_tokens=600)


def test_chat_done_marker_completes_only_chat_streams():
    done = SSEEvent("message", "[DONE]")
    chat, responses = UsageExtractor("chat"), UsageExtractor("responses")
    chat.on_event(done)
    responses.on_event(done)
    assert chat.completed and not responses.completed


def test_chat_chunks_with_null_usage_are_not_the_usage():
    before_usage = CHAT_STREAM.split(b'"choices": []')[0].rsplit(b"data:", 1)[0]
    x = extract("chat", before_usage)
    assert (x.usage, x.model, x.completed) == (None, CHAT_MODEL, False)


def test_malformed_and_foreign_data_lines_are_skipped():
    noise = b"data: {not json\n\ndata: 42\n\ndata: [1,2]\n\nevent: response.completed\ndata: {\"type\": 3}\n\n"
    stream, _, model, usage = CASES["responses"]
    x = extract("responses", noise + stream + noise)
    assert (x.usage, x.model, x.completed, x.error) == (usage, model, True, None)


# -- one usage per answer (issue 11, item 8) -----------------------------------------------------------
def _completed(inp: int, out: int, kind: str = "response.completed") -> bytes:
    return responses_event(kind, 20, response=dict(CODEX_DONE, usage={"input_tokens": inp, "output_tokens": out}))


def _chat_usage_chunk(prompt: int, completion: int, choices: list | None = None) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return sse(dict(CHAT_CHUNK, choices=choices or [], usage=usage))


def test_responses_first_terminal_event_wins_and_a_different_later_one_is_flagged():
    x = extract("responses", _completed(10, 5) + _completed(1000, 1000))
    assert x.usage == Usage(input_tokens=10, output_tokens=5) and x.flags == {"usage_repeated"}
    assert json.loads(x.raw_usage) == {"input_tokens": 10, "output_tokens": 5}  # the audit matches the row
    x = extract("responses", _completed(10, 5) + _completed(10, 5, "response.incomplete"))
    assert x.usage == Usage(input_tokens=10, output_tokens=5) and x.flags == set()  # the same again: no news


def test_responses_events_after_the_end_change_nothing():
    later = (responses_event("response.created", 30, response=dict(CODEX_CREATED, model="other"))
             + FAILED_STREAM.split(b"\n\n", 1)[1])
    x = extract("responses", CODEX_STREAM + later)
    assert (x.usage, x.model, x.completed, x.error, x.flags) == (CODEX_USAGE, CODEX_MODEL, True, None, set())


def test_chat_first_final_usage_chunk_wins():
    x = extract("chat", _chat_usage_chunk(10, 5) + _chat_usage_chunk(1000, 1000) + sse("[DONE]"))
    assert x.usage == Usage(input_tokens=10, output_tokens=5) and x.flags == {"usage_repeated"}


def test_chat_running_totals_before_the_final_chunk_are_provisional():
    # Servers with continuous usage stats report a running total on every chunk: the last one counts.
    going = [{"index": 0, "delta": {"content": "w"}, "finish_reason": None}]
    done = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    x = extract("chat", _chat_usage_chunk(10, 1, going) + _chat_usage_chunk(10, 2, going)
                + _chat_usage_chunk(10, 3, done) + _chat_usage_chunk(10, 3) + sse("[DONE]"))
    assert (x.usage, x.completed, x.flags) == (Usage(input_tokens=10, output_tokens=3), True, set())


def _anthropic(kind: str, **fields: object) -> bytes:
    return sse({"type": kind, **fields}, kind)


def test_anthropic_second_message_start_does_not_reset_the_counts():
    restart = _anthropic("message_start", message={"model": "other", "usage": ANTHROPIC_START_USAGE})
    stream = ANTHROPIC_STREAM.replace(b"event: message_stop", restart + b"event: message_stop")
    x = extract("messages", stream)
    assert (x.usage, x.model, x.flags) == (ANTHROPIC_USAGE, ANTHROPIC_MODEL, {"usage_repeated"})


def test_anthropic_usage_after_message_stop_is_ignored():
    x = extract("messages", ANTHROPIC_STREAM + _anthropic("message_delta", usage={"output_tokens": 9000}))
    assert (x.usage, x.flags) == (ANTHROPIC_USAGE, {"usage_repeated"})
    x = extract("messages", ANTHROPIC_STREAM + _anthropic("message_delta", usage={"output_tokens": 503}))
    assert (x.usage, x.flags) == (ANTHROPIC_USAGE, set())


_IMPOSSIBLE = {
    "responses": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 50}, "output_tokens": 5,
                  "output_tokens_details": {"reasoning_tokens": 8}},
    "chat": {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 50}, "completion_tokens": 5,
             "completion_tokens_details": {"reasoning_tokens": 8}},
}


@pytest.mark.parametrize("fmt", _IMPOSSIBLE)
def test_impossible_parts_are_clamped_to_their_whole_and_flagged(fmt: str):
    clamped = Usage(input_tokens=10, cached_tokens=10, output_tokens=5, reasoning_tokens=5)
    usage = _IMPOSSIBLE[fmt]
    event = (responses_event("response.completed", 1, response=dict(CODEX_DONE, usage=usage))
             if fmt == "responses" else sse(dict(CHAT_CHUNK, choices=[], usage=usage)))
    for x in (extract(fmt, event), UsageExtractor(fmt)):
        if x.usage is None:
            x.on_json(json.dumps({"usage": usage}).encode())
        assert (x.usage, x.flags) == (clamped, {"usage_clamped"})
        assert json.loads(x.raw_usage) == usage  # the audit keeps what the upstream said


@pytest.mark.parametrize("fmt", CASES)
def test_real_answers_carry_no_flags(fmt: str):
    stream, body, _, _ = CASES[fmt]
    x = UsageExtractor(fmt)
    x.on_json(body)
    assert extract(fmt, stream).flags == set() and x.flags == set()


# -- JSON bodies -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", CASES)
def test_json_body_usage(fmt: str):
    _, body, model, usage = CASES[fmt]
    x = UsageExtractor(fmt)
    x.on_json(body)
    assert (x.usage, x.model, x.completed, x.error) == (usage, model, True, None)


def test_non_json_body_is_not_completed():
    x = UsageExtractor("chat")
    x.on_json(b"<html>502 Bad Gateway</html>")
    assert (x.usage, x.completed, x.error) == (None, False, None)


# -- errors ------------------------------------------------------------------------------------------
def test_error_event_inside_a_200_stream():
    x = extract("responses", OVERLOADED_STREAM)
    assert x.error == "server_is_overloaded: Our servers are currently overloaded. Please try again later."
    assert (x.completed, x.model, x.usage) == (False, CODEX_MODEL, None)


def test_response_failed_is_terminal_and_an_error():
    x = extract("responses", FAILED_STREAM)
    assert (x.completed, x.error) == (True, "server_error: overloaded")


@pytest.mark.parametrize("response", [{"error": None}, None, "gone"])
def test_response_failed_without_details_still_fails(response: object):
    x = UsageExtractor("responses")
    x.on_event(SSEEvent("response.failed", json.dumps({"type": "response.failed", "response": response})))
    assert (x.error, x.completed) == ("response failed", True)


@pytest.mark.parametrize(("fmt", "event", "expected"), [
    ("messages", sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error"),
     "overloaded_error: Overloaded"),
    ("chat", sse({"error": {"message": "upstream timed out", "type": "server_error", "code": None}}),
     "server_error: upstream timed out"),
    ("responses", b"event: error\ndata: upstream went away\n\n", "upstream went away"),
    ("responses", sse({"type": "error", "error": {"type": "server_error", "code": "server_is_overloaded",
                                                  "message": "Our servers are currently overloaded."}}, "error"),
     "server_is_overloaded: Our servers are currently overloaded."),
])
def test_error_shapes_in_streams(fmt: str, event: bytes, expected: str):
    assert extract(fmt, event).error == expected


def test_first_error_is_kept():
    x = extract("messages", sse({"type": "error", "error": {"message": "first"}}, "error")
                + sse({"type": "error", "error": {"message": "second"}}, "error"))
    assert x.error == "first"


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", '
     b'"code": "invalid_api_key"}}', "invalid_api_key: Incorrect API key provided"),
    (b'{"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}',
     "rate_limit_error: slow down"),
    (b'{"error": "quota exceeded"}', "quota exceeded"),
    (b'{"error": {"detail": 1}}', '{"detail":1}'),
])
def test_json_error_bodies(body: bytes, expected: str):
    x = UsageExtractor(None)
    x.on_json(body)
    assert x.error == expected


def test_successful_response_object_has_null_error_and_is_no_error():
    x = UsageExtractor("responses")
    x.on_json(CODEX_JSON)
    assert json.loads(CODEX_JSON)["error"] is None and x.error is None


# -- tolerance ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [None, "12", -5, 1.5, True, [], {}, float("inf"), 2**80])
def test_bad_counts_become_zero(bad: object):
    usage = {"input_tokens": bad, "input_tokens_details": {"cached_tokens": bad}, "output_tokens": 7,
             "output_tokens_details": bad}
    x = UsageExtractor("responses")
    x.on_event(SSEEvent("response.completed", json.dumps(
        {"type": "response.completed", "response": {"model": 5, "usage": usage}})))
    assert x.usage == Usage(output_tokens=7) and x.model is None and x.completed


def test_integral_floats_count():
    x = UsageExtractor("chat")
    x.on_json(b'{"usage": {"prompt_tokens": 10.0, "completion_tokens": 3}}')
    assert x.usage == Usage(input_tokens=10, output_tokens=3)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "response", "usage", "model", "error", "message", "choices", "input_tokens",
                         "output_tokens", "prompt_tokens", "cache_read_input_tokens", "input_tokens_details",
                         "cached_tokens", "finish_reason", "code"]), inner, max_size=6),
    max_leaves=20)
_event_names = st.sampled_from(["message", "error", "response.completed", "response.failed", "message_start",
                                "message_delta", "message_stop", "response.created"])


@settings(max_examples=150, deadline=None)
@given(fmt=st.sampled_from([None, "responses", "chat", "messages"]),
       items=st.lists(st.tuples(_event_names, st.sampled_from(["response.completed", "response.failed",
                                                               "message_start", "message_delta", "error", None]),
                                _json), max_size=6))
def test_any_json_shape_never_raises_and_counts_stay_natural(fmt, items):
    x = UsageExtractor(fmt)
    for name, kind, value in items:
        obj = {"type": kind, "response": value, "message": value, "usage": value} if kind else value
        x.on_event(SSEEvent(name, json.dumps(obj)))
        x.on_json(json.dumps(value).encode())
    if x.usage is not None:
        counts = [x.usage.input_tokens, x.usage.cached_tokens, x.usage.cache_write_tokens, x.usage.output_tokens,
                  x.usage.reasoning_tokens]
        assert all(type(n) is int and n >= 0 for n in counts)
        assert x.usage.cached_tokens + x.usage.cache_write_tokens <= x.usage.input_tokens
        assert x.usage.reasoning_tokens <= x.usage.output_tokens
    assert x.flags <= {"usage_clamped", "usage_repeated"}
    assert x.error is None or isinstance(x.error, str)
    assert x.model is None or isinstance(x.model, str)


# -- the fast path: what the meter does not decode changes nothing -----------------------------------
def _filtered(api_format: str | None, body: bytes) -> UsageExtractor:
    """The meter's way: events ``wants`` refuses are never decoded."""
    x = UsageExtractor(api_format)
    p = SSEParser(want=x.wants)
    for ev in p.feed(body) + p.close():
        x.on_event(ev)
    return x


def _state(x: UsageExtractor) -> tuple:
    return x.usage, x.model, x.error, x.completed, x.raw_usage, x.flags


@pytest.mark.parametrize("fmt", [None, *CASES])
@pytest.mark.parametrize("case", CASES)
def test_deltas_are_not_decoded_and_the_result_is_the_same(fmt: str | None, case: str):
    stream = CASES[case][0]
    x = UsageExtractor(fmt)
    p = SSEParser(want=x.wants)
    decoded = p.feed(stream) + p.close()
    assert _state(_filtered(fmt, stream)) == _state(extract(fmt, stream))
    assert not any(ev.event.endswith("delta") and ev.event != "message_delta" for ev in decoded)
    assert p.passed + len(decoded) == len(events_of(stream))


def test_chat_chunks_holding_only_a_delta_are_passed_once_the_model_is_known():
    x = UsageExtractor("chat")
    first = json.dumps(dict(CHAT_CHUNK, choices=[{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]))
    compact = json.dumps(json.loads(first), separators=(",", ":"))
    assert x.wants(b"message", first.encode())  # the model is not known yet
    x.on_event(SSEEvent("message", first))
    assert not x.wants(b"message", first.encode()) and not x.wants(b"message", compact.encode())
    for other in (first.replace(CHAT_MODEL, "gpt-5"),  # a new model
                  first.replace('"usage": null', '"usage": {"prompt_tokens": 1}'),
                  first[:-1] + ', "error": {"message": "x"}}', first[:-1] + ', "type": "error"}',
                  first.replace('"model"', '"\\u006dodel"'),  # a key spelled with escapes
                  "[DONE]"):
        assert x.wants(b"message", other.encode()), other


_chunk_fields = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from([CHAT_MODEL, "gpt-5", "", None, 7, "é/\"x\\"]),
    "usage": st.none() | st.sampled_from([{"prompt_tokens": 3, "completion_tokens": 2}, {}, "usage"]),
    "error": st.sampled_from([None, "", {"message": "boom"}, "model"]),
    "type": st.sampled_from(["error", "response.completed", "message_stop", "x"]),
    "choices": st.sampled_from([[], [{"delta": {"content": "\"model\": \"gpt-5\""}, "finish_reason": None}],
                                [{"delta": {}, "finish_reason": "stop"}], [{"delta": {"model": "nested"}}]]),
    "meta": st.sampled_from([{"model": CHAT_MODEL}, {"usage": None}, "\"usage\":{"]),
})


@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from([None, "chat", "responses"]),
       chunks=st.lists(st.tuples(_chunk_fields, st.sampled_from([(",", ":"), (", ", ": ")]), st.booleans()),
                       max_size=8))
def test_any_chat_chunks_read_the_same_through_the_fast_path(fmt, chunks):
    body = b"".join(sse(json.dumps(fields, separators=seps, ensure_ascii=ascii_only)) for fields, seps, ascii_only
                    in chunks) + sse("[DONE]")
    assert _state(_filtered(fmt, body)) == _state(extract(fmt, body))


# -- usage fields real APIs send ---------------------------------------------------------------------
def test_openai_cache_writes_are_read():
    responses = {"input_tokens": 3000, "input_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 1500},
                 "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 3020}
    chat = {"prompt_tokens": 3000, "completion_tokens": 20, "total_tokens": 3020,
            "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 1500}}
    expected = Usage(input_tokens=3000, cached_tokens=1000, cache_write_tokens=1500, output_tokens=20)
    streamed = extract("responses", responses_event("response.completed", 1,
                                                    response=dict(CODEX_DONE, usage=responses)))
    assert streamed.usage == expected
    assert extract("chat", sse(dict(CHAT_CHUNK, choices=[], usage=chat))).usage == expected
    for usage in (responses, chat):
        x = UsageExtractor(None)
        x.on_json(json.dumps({"usage": usage}).encode())
        assert x.usage == expected and x.flags == set()


def test_cache_writes_beyond_the_input_are_clamped():
    x = UsageExtractor("responses")
    x.on_json(json.dumps({"usage": {"input_tokens": 100, "output_tokens": 1, "input_tokens_details": {
        "cached_tokens": 60, "cache_write_tokens": 70}}}).encode())
    assert x.usage == Usage(input_tokens=100, cached_tokens=60, cache_write_tokens=40, output_tokens=1)
    assert x.flags == {"usage_clamped"}


_THINKING_USAGE = {"input_tokens": 50, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
                   "output_tokens": 900, "output_tokens_details": {"thinking_tokens": 700}}


def test_anthropic_thinking_tokens_are_reasoning_tokens():
    expected = Usage(input_tokens=50, output_tokens=900, reasoning_tokens=700)
    x = UsageExtractor("messages")
    x.on_json(json.dumps(dict(json.loads(ANTHROPIC_JSON), usage=_THINKING_USAGE)).encode())
    assert x.usage == expected
    stream = ANTHROPIC_STREAM.replace(json.dumps({"output_tokens": 503}).encode(), json.dumps(
        {"output_tokens": 900, "output_tokens_details": {"thinking_tokens": 700}}).encode())
    assert extract("messages", stream).usage == Usage(32012, 30000, 2000, 900, 700)
    # Without cache fields the shape is still recognised as Anthropic's when no format is known.
    x = UsageExtractor(None)
    x.on_json(json.dumps({"usage": {"input_tokens": 50, "output_tokens": 900,
                                    "output_tokens_details": {"thinking_tokens": 700}}}).encode())
    assert x.usage == expected


# Anthropic's documented compaction answer: the top level covers only the "message" iteration.
_COMPACTION_USAGE = {"input_tokens": 23000, "output_tokens": 1000, "cache_read_input_tokens": 0,
                     "cache_creation_input_tokens": 0, "iterations": [
                         {"type": "compaction", "input_tokens": 180000, "output_tokens": 3500},
                         {"type": "message", "input_tokens": 23000, "output_tokens": 1000}]}
# The advisor tool: the advisor's own inference is an iteration by another model.
_ADVISOR_ITERATIONS = [
    {"type": "message", "input_tokens": 800, "cache_read_input_tokens": 55096, "output_tokens": 120},
    {"type": "advisor_message", "model": "claude-opus-4-1", "input_tokens": 9000, "output_tokens": 400},
    {"type": "message", "input_tokens": 1200, "cache_read_input_tokens": 55096, "output_tokens": 300}]


def test_anthropic_iterations_count_every_billed_inference():
    x = UsageExtractor("messages")
    x.on_json(json.dumps(dict(json.loads(ANTHROPIC_JSON), usage=_COMPACTION_USAGE)).encode())
    assert x.usage == Usage(input_tokens=203000, output_tokens=4500)
    raw = json.loads(x.raw_usage)
    assert raw == _COMPACTION_USAGE  # the top-level-only figures stay recoverable
    assert iteration_usages(x.raw_usage) == [(None, Usage(input_tokens=180000, output_tokens=3500)),
                                             (None, Usage(input_tokens=23000, output_tokens=1000))]


def test_anthropic_streamed_iterations_and_zeros_repeated_in_message_delta():
    start = sse({"type": "message_start", "message": {"id": "msg_2", "type": "message", "role": "assistant",
                                                      "model": ANTHROPIC_MODEL, "content": [], "usage": {
                                                          "input_tokens": 800, "cache_read_input_tokens": 55096,
                                                          "cache_creation_input_tokens": 0, "output_tokens": 1}}},
                "message_start")
    delta_usage = {"input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
                   "output_tokens": 420, "iterations": _ADVISOR_ITERATIONS}
    delta = sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage}, "message_delta")
    x = _filtered("messages", start + delta + sse({"type": "message_stop"}, "message_stop"))
    assert x.usage == Usage(input_tokens=2000 + 2 * 55096 + 9000, cached_tokens=2 * 55096, output_tokens=820)
    raw = json.loads(x.raw_usage)
    # message_start's figures survive the 0s message_delta repeats; everything else is the upstream's.
    assert raw == dict(delta_usage, input_tokens=800, cache_read_input_tokens=55096)
    assert [m for m, _ in iteration_usages(x.raw_usage)] == [None, "claude-opus-4-1", None]
    assert iteration_usages(None) == [] and iteration_usages(CASES["chat"][1].decode()) == []


# -- big JSON bodies: read by their ends ---------------------------------------------------------------
@pytest.mark.parametrize("fmt", CASES)
def test_a_body_read_by_its_ends_gives_what_the_whole_gives(fmt: str):
    body = CASES[fmt][1]
    head, tail = body[:len(body) // 2], body[len(body) // 2:]
    whole, ends = UsageExtractor(fmt), UsageExtractor(fmt)
    whole.on_json(body)
    assert ends.on_json_ends(head, tail) is None
    assert _state(ends) == _state(whole)


def test_ends_of_an_error_body_and_of_a_body_without_usage():
    x = UsageExtractor("responses")
    # The Responses object's own member order: error before the output, usage after it.
    body = json.dumps({"id": "resp_1", "status": "failed", "error": {"code": "server_error", "message": "boom"},
                       "model": CODEX_MODEL, "output": CODEX_DONE["output"], "usage": None}).encode()
    assert x.on_json_ends(body[:200], body[200:]) == f"no usage found in its last {len(body) - 200} bytes"
    assert (x.error, x.model, x.completed, x.usage) == ("server_error: boom", CODEX_MODEL, True, None)
    x = UsageExtractor("chat")
    assert x.on_json_ends(b"<html>", b"</html>") is None and not x.completed

"""What the real APIs send, per format: SSE streams and JSON bodies as Codex, the Chat Completions API and
Anthropic's Messages API send them (event names, extra fields, null usage on chat chunks), with the usage each
one reports as the store keeps it; and in-200 failures."""

from __future__ import annotations

import json

from addon.metering.sse import SSEEvent, SSEParser
from store.records import Usage


def sse(data: dict | str, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "").encode() + f"data: {text}\n\n".encode()


def responses_event(kind: str, seq: int, **fields: object) -> bytes:
    return sse({"type": kind, "sequence_number": seq, **fields}, kind)


# -- OpenAI Responses (Codex CLI) --------------------------------------------------------------------
CODEX_MODEL = "gpt-5-codex"
CODEX_USAGE = Usage(input_tokens=5120, cached_tokens=4096, output_tokens=311, reasoning_tokens=192)
CODEX_CREATED = {"id": "resp_68af", "object": "response", "created_at": 1756300000, "status": "in_progress",
                 "model": CODEX_MODEL, "output": [], "usage": None, "error": None, "prompt_cache_key": "conv-1"}
CODEX_DONE = dict(CODEX_CREATED, status="completed", output=[
    {"id": "rs_1", "type": "reasoning", "summary": [], "encrypted_content": "gAAAAB" + "x" * 300},
    {"id": "msg_1", "type": "message", "role": "assistant",
     "content": [{"type": "output_text", "text": "Done: tests pass.", "annotations": []}]}],
    usage={"input_tokens": 5120, "input_tokens_details": {"cached_tokens": 4096}, "output_tokens": 311,
           "output_tokens_details": {"reasoning_tokens": 192}, "total_tokens": 5431})
CODEX_STREAM = b"".join([
    responses_event("response.created", 0, response=CODEX_CREATED),
    responses_event("response.in_progress", 1, response=CODEX_CREATED),
    responses_event("response.output_item.added", 2, output_index=0, item={"id": "rs_1", "type": "reasoning"}),
    responses_event("response.output_item.done", 3, output_index=0, item=CODEX_DONE["output"][0]),
    responses_event("response.output_item.added", 4, output_index=1, item={"id": "msg_1", "type": "message"}),
    *[responses_event("response.output_text.delta", 5 + k, item_id="msg_1", output_index=1, content_index=0,
                      delta=word, logprobs=[]) for k, word in enumerate(["Done", ":", " tests", " pass", "."])],
    responses_event("response.output_text.done", 10, item_id="msg_1", text="Done: tests pass."),
    responses_event("response.completed", 11, response=CODEX_DONE),
])
CODEX_JSON = json.dumps(dict(CODEX_DONE, object="response")).encode()

# -- Chat Completions with stream_options.include_usage ----------------------------------------------
CHAT_MODEL = "gpt-4.1-mini-2025-04-14"
CHAT_USAGE = Usage(input_tokens=1200, cached_tokens=1024, output_tokens=57, reasoning_tokens=12)
_chat_usage = {"prompt_tokens": 1200, "completion_tokens": 57, "total_tokens": 1257,
               "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 12, "audio_tokens": 0}}
CHAT_CHUNK = {"id": "chatcmpl-B9", "object": "chat.completion.chunk", "created": 1756300000, "model": CHAT_MODEL,
              "system_fingerprint": "fp_1", "usage": None}
CHAT_STREAM = b"".join([
    sse(dict(CHAT_CHUNK, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])),
    *[sse(dict(CHAT_CHUNK, choices=[{"index": 0, "delta": {"content": w}, "finish_reason": None}]))
      for w in ["Hello", " there", "!"]],
    sse(dict(CHAT_CHUNK, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])),
    sse(dict(CHAT_CHUNK, choices=[], usage=_chat_usage)),
    sse("[DONE]"),
])
CHAT_JSON = json.dumps({
    "id": "chatcmpl-B9", "object": "chat.completion", "created": 1756300000, "model": CHAT_MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"}, "finish_reason": "stop"}],
    "usage": _chat_usage}).encode()

# -- Anthropic Messages -------------------------------------------------------------------------------
ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"
# Anthropic says input 12, cache read 30000, cache write 2000: stored the OpenAI way.
ANTHROPIC_USAGE = Usage(input_tokens=32012, cached_tokens=30000, cache_write_tokens=2000, output_tokens=503)
ANTHROPIC_START_USAGE = {"input_tokens": 12, "cache_creation_input_tokens": 2000, "cache_read_input_tokens": 30000,
                         "output_tokens": 1, "service_tier": "standard"}
ANTHROPIC_STREAM = b"".join([
    sse({"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "model": ANTHROPIC_MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": ANTHROPIC_START_USAGE}}, "message_start"),
    sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        "content_block_start"),
    sse({"type": "ping"}, "ping"),
    *[sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
          "content_block_delta") for w in ["Hi", ", ", "there"]],
    sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
    sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 503}}, "message_delta"),
    sse({"type": "message_stop"}, "message_stop"),
])
ANTHROPIC_JSON = json.dumps({
    "id": "msg_01", "type": "message", "role": "assistant", "model": ANTHROPIC_MODEL,
    "content": [{"type": "text", "text": "Hi, there"}], "stop_reason": "end_turn",
    "usage": dict(ANTHROPIC_START_USAGE, output_tokens=503)}).encode()

# -- In-200 failures ----------------------------------------------------------------------------------
OVERLOADED_STREAM = (responses_event("response.created", 0, response=CODEX_CREATED)
                     + sse({"type": "error", "code": "server_is_overloaded", "param": None, "sequence_number": 1,
                            "message": "Our servers are currently overloaded. Please try again later."}, "error"))
FAILED_STREAM = (responses_event("response.created", 0, response=CODEX_CREATED)
                 + responses_event("response.failed", 1, response=dict(
                     CODEX_CREATED, status="failed", error={"code": "server_error", "message": "overloaded"})))

# api_format -> (stream, JSON body, model, usage)
CASES = {
    "responses": (CODEX_STREAM, CODEX_JSON, CODEX_MODEL, CODEX_USAGE),
    "chat": (CHAT_STREAM, CHAT_JSON, CHAT_MODEL, CHAT_USAGE),
    "messages": (ANTHROPIC_STREAM, ANTHROPIC_JSON, ANTHROPIC_MODEL, ANTHROPIC_USAGE),
}


def events_of(body: bytes) -> list[SSEEvent]:
    p = SSEParser()
    return p.feed(body) + p.close()

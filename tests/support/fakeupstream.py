"""A fake LLM upstream on 127.0.0.1 for end-to-end tests and benchmarks.

Speaks HTTP/1.1 with keep-alive and serves the three metered APIs (OpenAI Responses, Chat
Completions, Anthropic Messages), streamed (SSE, chunked) or as JSON. The usage it reports is
chosen by the client (``metadata.fake_usage = [input, cached, output, reasoning]`` in the request
body) so tests know the exact numbers to expect. Behaviour can be switched at run time to fail in
the ways real relays fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

DEFAULT_USAGE = (120, 40, 30, 10)


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Behaviour:
    status: int = 200  # non-200: an error JSON body with this status
    error_body: bytes | None = None  # non-200: this body instead (sent with a content-length)
    retry_after: str | None = None  # non-200: sent as the Retry-After header
    content_length: bool = False  # a stream sent whole with a content-length instead of chunked
    error_event: bool = False  # 200 stream that fails after its first event
    first_byte_delay: float = 0.0  # seconds before the response headers
    event_delay: float = 0.0  # seconds between streamed events (benchmarks: a known TTFB)
    hold: threading.Event | None = None  # streams pause after their first event until set
    close_mid_stream: bool = False  # drop the connection after the first event
    deltas: int = 3  # number of text deltas in a stream
    # A node's own prompt cache: the usage reported comes from it instead of ``metadata.fake_usage``.
    prompt_cache: PromptCache | None = None


class PromptCache:
    """One node's prompt cache, as a provider's works: per conversation, a prompt's cached tokens are its
    longest prefix this node has seen before (a prefix seen on another node is no hit here).

    The prompt is the body's ``instructions`` / ``system`` followed by its ``input`` or ``messages`` items,
    each item ``ceil(len(its JSON) / 4)`` tokens. The conversation is the body's ``prompt_cache_key``, else
    ``metadata.user_id`` (Claude Code), else ``metadata.fake_conversation`` (a client the relay cannot tell
    apart). Unlike a real provider's there is no minimum prompt size nor 128-token granularity: the figures
    are exact, so a test can compute them. Thread-safe (a node may be shared by tests' threads).
    """

    OUTPUT_TOKENS = 20

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()  # (conversation, hash of a prefix)
        self._lock = threading.Lock()

    def usage(self, req: dict) -> tuple[int, int, int, int]:
        items = prompt_items(req)
        conversation = conversation_of(req)
        tokens = [(len(json.dumps(item)) + 3) // 4 for item in items]
        prefixes = [hash(json.dumps(items[:k + 1])) for k in range(len(items))]
        with self._lock:
            hit = next((k + 1 for k in reversed(range(len(items))) if (conversation, prefixes[k]) in self._seen), 0)
            self._seen.update((conversation, h) for h in prefixes)
        return sum(tokens), sum(tokens[:hit]), self.OUTPUT_TOKENS, 0


def prompt_items(req: dict) -> list[object]:
    """What a call's prompt is made of, in order (``PromptCache``)."""
    head = [req[k] for k in ("instructions", "system") if k in req]
    body = req.get("input", req.get("messages", []))
    return head + (body if isinstance(body, list) else [body])


def conversation_of(req: dict) -> str:
    meta = req.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return str(req.get("prompt_cache_key") or meta.get("user_id") or meta.get("fake_conversation") or "")


def _usage_from(body: dict) -> tuple[int, int, int, int]:
    meta = body.get("metadata") if isinstance(body, dict) else None
    usage = meta.get("fake_usage") if isinstance(meta, dict) else None
    if isinstance(usage, list) and len(usage) == 4 and all(isinstance(x, int) for x in usage):
        return usage[0], usage[1], usage[2], usage[3]
    return DEFAULT_USAGE


def _sse(event: str | None, data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def responses_events(model: str, u: tuple[int, int, int, int], deltas: int) -> list[bytes]:
    i, c, o, r = u
    resp = {"id": "resp_fake", "object": "response", "model": model, "status": "in_progress"}
    out = [_sse("response.created", {"type": "response.created", "response": resp})]
    out += [_sse("response.output_text.delta", {"type": "response.output_text.delta", "delta": f"w{k} "})
            for k in range(deltas)]
    done = dict(resp, status="completed", usage={
        "input_tokens": i, "input_tokens_details": {"cached_tokens": c},
        "output_tokens": o, "output_tokens_details": {"reasoning_tokens": r}, "total_tokens": i + o})
    out.append(_sse("response.completed", {"type": "response.completed", "response": done}))
    return out


def responses_json(model: str, u: tuple[int, int, int, int]) -> dict:
    i, c, o, r = u
    return {"id": "resp_fake", "object": "response", "model": model, "status": "completed",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
            "usage": {"input_tokens": i, "input_tokens_details": {"cached_tokens": c}, "output_tokens": o,
                      "output_tokens_details": {"reasoning_tokens": r}, "total_tokens": i + o}}


def _chat_usage(u: tuple[int, int, int, int]) -> dict:
    i, c, o, r = u
    return {"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o,
            "prompt_tokens_details": {"cached_tokens": c}, "completion_tokens_details": {"reasoning_tokens": r}}


def chat_events(model: str, u: tuple[int, int, int, int], deltas: int, include_usage: bool = True) -> list[bytes]:
    """As OpenAI streams: the usage chunk (no choices) only when ``stream_options.include_usage`` asks."""
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model}
    out = [_sse(None, dict(base, choices=[{"index": 0, "delta": {"content": f"w{k} "}}])) for k in range(deltas)]
    out.append(_sse(None, dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])))
    if include_usage:
        out.append(_sse(None, dict(base, choices=[], usage=_chat_usage(u))))
    out.append(_sse(None, "[DONE]"))
    return out


def chat_json(model: str, u: tuple[int, int, int, int]) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": _chat_usage(u)}


def _anthropic_start_usage(u: tuple[int, int, int, int]) -> dict:
    i, c, _o, _r = u
    # Anthropic's input_tokens excludes cache reads.
    return {"input_tokens": i - c, "cache_read_input_tokens": c, "cache_creation_input_tokens": 0,
            "output_tokens": 1}


def messages_events(model: str, u: tuple[int, int, int, int], deltas: int) -> list[bytes]:
    msg = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
           "usage": _anthropic_start_usage(u)}
    out = [_sse("message_start", {"type": "message_start", "message": msg}),
           _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}}),
           _sse("ping", {"type": "ping"})]
    out += [_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": f"w{k} "}}) for k in range(deltas)]
    out += [_sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                   "usage": {"output_tokens": u[2]}}),
            _sse("message_stop", {"type": "message_stop"})]
    return out


def messages_json(model: str, u: tuple[int, int, int, int]) -> dict:
    usage = _anthropic_start_usage(u)
    usage["output_tokens"] = u[2]
    return {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "usage": usage}


def compact_json(model: str, u: tuple[int, int, int, int]) -> dict:
    """Codex's remote compaction (POST /responses/compact): a JSON object with Responses usage."""
    return dict(responses_json(model, u), id="cmp_fake", object="response.compaction")


def embeddings_json(model: str, u: tuple[int, int, int, int]) -> dict:
    return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5]}],
            "model": model, "usage": {"prompt_tokens": u[0], "total_tokens": u[0]}}


def completions_json(model: str, u: tuple[int, int, int, int]) -> dict:
    return {"id": "cmpl_fake", "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}], "usage": _chat_usage(u)}


def images_json(model: str, u: tuple[int, int, int, int]) -> dict:
    i, _, o, _ = u
    return {"created": 0, "data": [{"b64_json": "AA=="}], "usage": {
        "input_tokens": i, "output_tokens": o, "total_tokens": i + o,
        "input_tokens_details": {"text_tokens": i, "image_tokens": 0}}}


def count_tokens_json(model: str, u: tuple[int, int, int, int]) -> dict:
    return {"input_tokens": u[0]}


# JSON-only endpoints, by path suffix in the order tried: the first suffix a path ends with decides, and None
# leaves it to FORMATS ("/chat/completions" ends with "/completions", "/responses/compact" is not "/responses").
JSON_ENDPOINTS: tuple[tuple[str, Callable[[str, tuple[int, int, int, int]], dict] | None], ...] = (
    ("/responses/compact", compact_json), ("/messages/count_tokens", count_tokens_json), ("/chat/completions", None),
    ("/completions", completions_json), ("/embeddings", embeddings_json), ("/images/generations", images_json),
)
# What GET /models lists.
MODELS = ("gpt-5-codex", "gpt-5-mini", "o3", "claude-sonnet-4-5")

FORMATS: dict[str, tuple[Callable, Callable]] = {
    "/responses": (responses_events, responses_json),
    "/chat/completions": (chat_events, chat_json),
    "/messages": (messages_events, messages_json),
}


@dataclass
class FakeUpstream:
    """One fake node: ``start()`` binds 127.0.0.1 on a free port; ``base_url`` ends in /v1."""

    name: str = "fake"
    behaviour: Behaviour = field(default_factory=Behaviour)
    seen: list[SeenRequest] = field(default_factory=list)
    record: bool = True

    def __post_init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()
        self._handlers: set[asyncio.Task] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeUpstream:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(self._listen(0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            # A turn of the loop before closing: a connection accepted as the loop stopped joins the server's
            # clients and is closed with them; accepted after close() it is left to the garbage collector, whose
            # clean-up then trips asyncio (Python 3.13.0's Server._wakeup: an "Exception ignored" in a later test).
            self._loop.run_until_complete(asyncio.sleep(0))
            self._server.close()
            # A handler still waiting (first_byte_delay) would hold wait_closed() for its whole delay.
            self._loop.run_until_complete(_cancel(list(self._handlers)))
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self

    async def _listen(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", port, backlog=512)

    @contextlib.contextmanager
    def refusing(self) -> Iterator[None]:
        """Connections to this node are refused (its port is closed) until the block ends."""
        assert self._loop is not None and self._server is not None
        server = self._server
        asyncio.run_coroutine_threadsafe(_close(server), self._loop).result(10)
        try:
            yield
        finally:
            self._server = asyncio.run_coroutine_threadsafe(self._listen(self.port), self._loop).result(10)

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def requests_to(self, suffix: str) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.seen if r.path.split("?")[0].endswith(suffix)]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                if self.record:
                    with self._lock:
                        self.seen.append(SeenRequest(method, path, headers, body))
                keep = await self._respond(writer, method, path, headers, body)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _respond(self, w: asyncio.StreamWriter, method: str, path: str, headers: dict[str, str],
                       body: bytes) -> bool:
        b = self.behaviour
        if b.first_byte_delay:
            await asyncio.sleep(b.first_byte_delay)
        route = path.split("?")[0]
        if route.endswith("/models"):
            return await self._send_json(w, 200, {"object": "list", "data": [{"id": m} for m in MODELS]})
        if route.endswith("/files"):  # an endpoint the relay does not meter
            return await self._send_json(w, 200, {"object": "list", "data": []})
        as_json = next((handler for suffix, handler in JSON_ENDPOINTS if route.endswith(suffix)), None)
        fmt = next((v for k, v in FORMATS.items() if route.endswith(k)), None)
        if fmt is None and as_json is None:
            return await self._send_json(w, 404, {"error": {"message": f"no route {route}"}})
        if b.status != 200:
            body = b.error_body if b.error_body is not None else json.dumps(
                {"error": {"message": f"fake {b.status}", "type": "server_error"}}).encode()
            retry_after = f"retry-after: {b.retry_after}\r\n" if b.retry_after is not None else ""
            w.write(f"HTTP/1.1 {b.status} X\r\ncontent-type: application/json\r\n{retry_after}"
                    f"content-length: {len(body)}\r\n\r\n".encode())
            w.write(body)
            await w.drain()
            return True
        try:
            if headers.get("content-encoding") == "gzip":  # as an API server reads a compressed request
                body = gzip.decompress(body)
            req = json.loads(body or b"{}")
        except (ValueError, OSError):
            return await self._send_json(w, 400, {"error": {"message": "bad json"}})
        model = req.get("model", "gpt-5-codex")
        usage = b.prompt_cache.usage(req) if b.prompt_cache is not None else _usage_from(req)
        if as_json is not None:
            return await self._send_json(w, 200, as_json(model, usage))
        assert fmt is not None
        if not req.get("stream"):
            return await self._send_json(w, 200, fmt[1](model, usage))
        if fmt[0] is chat_events:
            options = req.get("stream_options")
            events = chat_events(model, usage, b.deltas,
                                 isinstance(options, dict) and options.get("include_usage") is True)
        else:
            events = fmt[0](model, usage, b.deltas)
        if b.error_event:
            err = {"type": "error", "error": {"type": "server_error", "code": "server_is_overloaded",
                                              "message": "Our servers are currently overloaded."}}
            events = [events[0], _sse("error", err)]
        if b.content_length:
            data = b"".join(events)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(data), data))
            await w.drain()
            return True
        gz = headers.get("x-fake-encoding") == "gzip"
        head = ("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                "transfer-encoding: chunked\r\n" + ("content-encoding: gzip\r\n" if gz else "") + "\r\n")
        w.write(head.encode())
        z = zlib.compressobj(6, zlib.DEFLATED, 31) if gz else None  # wbits 31: gzip framing
        for n, ev in enumerate(events):
            data = z.compress(ev) + z.flush(zlib.Z_SYNC_FLUSH) if z else ev
            w.write(b"%x\r\n%s\r\n" % (len(data), data))
            await w.drain()
            if n == 0:
                if b.close_mid_stream:
                    return False
                if b.hold is not None:
                    await asyncio.to_thread(b.hold.wait, 30)
            if b.event_delay:
                await asyncio.sleep(b.event_delay)
        if z:
            tail = z.flush()
            w.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        w.write(b"0\r\n\r\n")
        await w.drain()
        return True

    @staticmethod
    async def _send_json(w: asyncio.StreamWriter, status: int, obj: dict) -> bool:
        data = json.dumps(obj).encode()
        w.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
                .encode() + data)
        await w.drain()
        return True


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _close(server: asyncio.Server) -> None:
    """Stop listening; connections already open stay (wait_closed would wait for them)."""
    server.close()


def main() -> None:
    """``python -m tests.support.fakeupstream [--event-delay S] [--first-byte-delay S]``: serve until killed.

    Prints ``listening on PORT`` once ready (benchmarks run it as a separate process).
    """
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--first-byte-delay", type=float, default=0.0)
    p.add_argument("--event-delay", type=float, default=0.0)
    p.add_argument("--deltas", type=int, default=3)
    args = p.parse_args()
    up = FakeUpstream("bench", behaviour=Behaviour(first_byte_delay=args.first_byte_delay,
                                                   event_delay=args.event_delay, deltas=args.deltas),
                      record=False).start()
    print(f"listening on {up.port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()

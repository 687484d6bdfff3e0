"""A mitmproxy content view for Server-Sent Events bodies: the assembled answer, then each event.

mitmweb (and ``mitmdump --flow-detail 3``) picks it for ``text/event-stream`` bodies. It shows the
output text assembled from the deltas of the three metered APIs — Responses
``response.output_text.delta``, Chat Completions ``choices[].delta.content``, Anthropic
``content_block_delta`` / ``text_delta`` — what ``addon.metering.usage`` reads from the stream (model,
usage, error, whether it finished), and then every event with its data as indented JSON. Events are
split by ``addon.metering.sse.SSEParser``, the relay's own parser. A streamed body is only what the relay
kept of it (``codex_keep_body``): a cut-off body shows what it holds and says it did not finish.
"""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import contentviews

from addon.metering.sse import SSEEvent, SSEParser
from addon.metering.usage import UsageExtractor

SSE_CONTENT_TYPE = "text/event-stream"


def assemble_text(obj: Any, texts: dict[int, list[str]]) -> None:
    """Add the output text one event's data carries to ``texts`` (choice index → pieces)."""
    if not isinstance(obj, dict):
        return
    kind = obj.get("type")
    if kind == "response.output_text.delta":  # Responses
        if isinstance(obj.get("delta"), str):
            texts.setdefault(0, []).append(obj["delta"])
    elif kind == "content_block_delta":  # Anthropic Messages
        delta = obj.get("delta")
        if isinstance(delta, dict) and delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
            texts.setdefault(0, []).append(delta["text"])
    elif isinstance(obj.get("choices"), list):  # Chat Completions chunks (one text per choice)
        for n, choice in enumerate(obj["choices"]):
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            index = choice.get("index")
            index = index if isinstance(index, int) and not isinstance(index, bool) else n
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                texts.setdefault(index, []).append(delta["content"])


def render_events(data: bytes) -> str:
    """The readable form of an SSE body; ValueError when it holds no event at all."""
    parser = SSEParser()
    events: list[SSEEvent] = parser.feed(data)
    events += parser.close()
    if not events:
        raise ValueError("no server-sent events in this body")
    extractor = UsageExtractor(None)  # any format: the view does not know the endpoint
    texts: dict[int, list[str]] = {}
    blocks: list[str] = []
    for ev in events:
        extractor.on_event(ev)
        try:
            obj = json.loads(ev.data)
        except (ValueError, RecursionError):
            body = ev.data  # [DONE], plain text, or an event cut off by the kept-bytes limit
        else:
            assemble_text(obj, texts)
            body = json.dumps(obj, indent=2, ensure_ascii=False)
        blocks.append(f"event: {ev.event}\n{body}")

    head: list[str] = []
    if len(texts) > 1:
        for index in sorted(texts):
            head.append(f"output text, choice {index}:\n{''.join(texts[index])}")
    elif texts:
        head.append(f"output text:\n{''.join(next(iter(texts.values())))}")
    facts = [f"{len(events)} events"]
    if extractor.model:
        facts.append(f"model {extractor.model}")
    u = extractor.usage
    if u is not None:
        writes = f", cache writes {u.cache_write_tokens}" if u.cache_write_tokens else ""
        facts.append(f"usage: input {u.input_tokens} (cached {u.cached_tokens}{writes}), "
                     f"output {u.output_tokens} (reasoning {u.reasoning_tokens})")
    if extractor.error:
        facts.append(f"error: {extractor.error}")
    if not extractor.completed:
        facts.append("the stream did not finish (or was cut at the kept-bytes limit)")
    if parser.dropped:
        facts.append(f"{parser.dropped} oversized event(s) not shown")
    head.append("\n".join(facts))
    return "\n\n".join(head) + "\n\n" + "\n\n".join(blocks) + "\n"


class SSEContentview(contentviews.Contentview):
    """Server-Sent Events, with the streamed answer assembled."""

    name = "Server-Sent Events"
    syntax_highlight = "yaml"  # the event blocks are JSON, which the YAML highlighter handles

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        return render_events(data)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        if data and metadata.content_type == SSE_CONTENT_TYPE:
            return 2  # above raw (0.1) and every generic text view
        return -1


sse_view = SSEContentview()


class SSEView:
    """Registers the view when the script is loaded (mitmproxy 12 has no way to remove a view again).

    Registration replaces a view of the same name, so a script reload does not add a second one.
    """

    def load(self, loader) -> None:
        contentviews.add(sse_view)

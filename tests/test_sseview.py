"""The SSE content view: picked for event streams, shows the assembled answer and every event."""

from __future__ import annotations

import json

import pytest
from mitmproxy import contentviews
from mitmproxy.test import taddons, tflow

from addon.sseview import SSEView, render_events, sse_view
from tests.support.fakeupstream import chat_events, messages_events, responses_events

USAGE = (120, 40, 30, 10)


def sse_flow(body: bytes, content_type: str = "text/event-stream") -> tflow.HTTPFlow:
    f = tflow.tflow(resp=True)
    f.response.headers["content-type"] = content_type
    f.response.content = body
    return f


@pytest.mark.parametrize("events", [responses_events, chat_events, messages_events])
def test_each_api_shows_assembled_text_usage_and_events(events):
    text = render_events(b"".join(events("gpt-5-codex", USAGE, 3)))
    head, _, rest = text.partition("\n\n")
    assert head == "output text:\nw0 w1 w2 "
    assert "model gpt-5-codex" in rest
    assert "usage: input 120 (cached 40), output 30" in rest
    assert "did not finish" not in rest


def test_events_are_named_and_their_json_indented():
    body = b"".join(responses_events("m", USAGE, 1))
    text = render_events(body)
    assert "event: response.output_text.delta\n{\n  \"type\": \"response.output_text.delta\",\n" in text
    assert text.count("event: ") == 3


def test_chat_choices_kept_apart_and_done_shown_raw():
    def chunk(index: int, content: str) -> bytes:
        return f"data: {json.dumps({'choices': [{'index': index, 'delta': {'content': content}}]})}\n\n".encode()

    body = chunk(0, "a") + chunk(1, "x") + chunk(0, "b") + chunk(1, "y") + b"data: [DONE]\n\n"
    text = render_events(body)
    assert "output text, choice 0:\nab\n\noutput text, choice 1:\nxy" in text
    assert text.rstrip().endswith("event: message\n[DONE]")


def test_cut_off_body_shows_what_it_holds():
    """A streamed body is only what the relay kept of it (codex_keep_body)."""
    body = b"".join(responses_events("m", USAGE, 3))
    cut = body[: body.index(b"response.completed") + 40]
    text = render_events(cut)
    assert text.startswith("output text:\nw0 w1 w2 ")
    assert "did not finish" in text
    assert text.rstrip().endswith(cut.split(b"data: ")[-1].decode())  # the partial data, as it is


def test_error_event_is_called_out():
    body = responses_events("m", USAGE, 1)[0] + (
        b'event: error\ndata: {"type":"error","error":{"code":"server_is_overloaded","message":"busy"}}\n\n')
    assert "error: server_is_overloaded: busy" in render_events(body)


def test_not_sse_raises_so_mitmproxy_falls_back_to_raw():
    with pytest.raises(ValueError):
        render_events(b"\n\n")


def test_priority_only_for_event_streams():
    meta = contentviews.Metadata(content_type="text/event-stream")
    assert sse_view.render_priority(b"data: 1\n\n", meta) > 1
    assert sse_view.render_priority(b"", meta) < 0
    assert sse_view.render_priority(b'{"a": 1}', contentviews.Metadata(content_type="application/json")) < 0


def test_registered_addon_is_picked_by_mitmproxy_for_event_streams():
    addon = SSEView()
    with taddons.context(addon):
        addon.load(None)
        f = sse_flow(b"".join(messages_events("claude", USAGE, 2)))
        result = contentviews.prettify_message(f.response, f)
        assert result.view_name == "Server-Sent Events"
        assert result.text.startswith("output text:\nw0 w1 ")
        # A JSON answer still gets mitmproxy's JSON view.
        j = sse_flow(b'{"a": 1}', "application/json")
        assert contentviews.prettify_message(j.response, j).view_name == "JSON"

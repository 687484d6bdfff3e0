"""The relay addon's own options, in process (its flow hooks: tests/test_relay_hooks.py)."""

from __future__ import annotations

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.save import Save
from mitmproxy.addons.view import View
from mitmproxy.test import taddons

from addon.relay import AUTO_KEEP_BODY, Relay, _session_key, keep_body_bytes
from addon.services.runtime import Runtime
from tests.support.flows import request_flow


def test_kept_body_only_where_something_shows_or_saves_flows():
    assert keep_body_bytes(-1, shown=False, saved=False) == 0  # plain mitmdump: nobody reads it
    assert keep_body_bytes(-1, shown=True, saved=False) == AUTO_KEEP_BODY  # mitmweb
    assert keep_body_bytes(-1, shown=False, saved=True) == AUTO_KEEP_BODY  # -w / save_stream_file
    assert keep_body_bytes(4096, shown=False, saved=False) == 4096  # an explicit value wins
    assert keep_body_bytes(0, shown=True, saved=True) == 0


def test_relay_configures_the_kept_body_from_its_surroundings(tmp_path):
    relay = Relay(Runtime())
    with taddons.context(relay, Save()) as tctx:
        tctx.configure(relay)
        assert relay.keep_body == 0
        tctx.configure(relay, save_stream_file=str(tmp_path / "flows"))
        assert relay.keep_body == AUTO_KEEP_BODY
        tctx.configure(relay, save_stream_file=None, codex_keep_body=100)
        assert relay.keep_body == 100
        with pytest.raises(exceptions.OptionsError, match="codex_keep_body"):
            tctx.configure(relay, codex_keep_body=-2)
    shown = Relay(Runtime())
    with taddons.context(View(), shown) as tctx:  # mitmweb has a view of the flows (added before scripts)
        tctx.configure(shown, codex_keep_body=-1)
        assert shown.keep_body == AUTO_KEEP_BODY


@pytest.mark.parametrize(("headers", "body_key", "expected"), [
    ({"Session_ID": "s", "conversation_id": "c", "session-id": "h"}, "b", "s"),  # names in any case
    ({"session-id": "h", "conversation_id": "c"}, "b", "c"),
    ({"session-id": "h"}, "b", "h"),
    ({"session_id": "", "session-id": "h"}, "b", "h"),  # an empty header does not name a session
    ({"x-other": "x"}, "b", "b"),
    ({"X-Session-Affinity": "o"}, "b", "o"),  # OpenCode's, before any body key
    ({"session-id": "h", "x-session-affinity": "o"}, "b", "h"),
    ({}, None, None),
])
def test_session_key_headers_in_precedence_then_the_body(headers, body_key, expected):
    assert _session_key(request_flow(headers=headers), body_key) == expected


def test_a_websocket_upgrade_takes_its_session_from_its_headers():
    # Codex's handshake carries session_id (its conversation id) and has no body: the socket sticks by it.
    flow = request_flow(headers={"upgrade": "websocket", "connection": "Upgrade", "session_id": "conv-7"})
    flow.request.method = "GET"
    assert _session_key(flow, None) == "conv-7"

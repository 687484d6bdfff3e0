"""Key hygiene addon: credentials are masked once sent, replays keep theirs until they are sent."""

from __future__ import annotations

from mitmproxy.test import tflow

from addon.egress import attach
from addon.hygiene import KeyHygiene, mask_credential, mask_headers
from store.masking import mask_secret
from store.records import NodeConfig
from tests.support.flows import request_flow

NODE_KEY = "sk-proj-NODEKEY-0123456789abcd"
OTHER_KEY = "sk-ant-OTHERKEY-9876543210wxyz"
NODE = NodeConfig(id="n", base_url="http://127.0.0.1:9/v1", api_key=NODE_KEY)


def test_mask_keeps_type_prefix_and_last_four():
    assert mask_secret(NODE_KEY) == "sk-…abcd"
    assert mask_secret("0123456789abcdefXYZW") == "…XYZW"
    assert mask_secret("short-key") == "…"  # the last 4 would be half of it
    assert mask_credential(f"Bearer {NODE_KEY}") == "Bearer sk-…abcd"
    assert mask_credential(OTHER_KEY) == "sk-…wxyz"
    # Masking twice changes nothing: hooks may run more than once on a flow.
    assert mask_credential(mask_credential(f"Bearer {NODE_KEY}")) == "Bearer sk-…abcd"


def test_mask_headers_covers_bearer_x_api_key_and_repeats():
    f = request_flow(headers={"authorization": f"Bearer {NODE_KEY}", "x-api-key": OTHER_KEY, "user-agent": "codex"})
    f.request.headers.add("authorization", f"Bearer {OTHER_KEY}")
    mask_headers(f.request.headers)
    h = f.request.headers
    assert h.get_all("authorization") == ["Bearer sk-…abcd", "Bearer sk-…wxyz"]
    assert h["x-api-key"] == "sk-…wxyz" and h["user-agent"] == "codex"


def test_key_stays_until_sent_then_is_masked():
    hygiene = KeyHygiene()
    f = request_flow(headers={"authorization": "Bearer client"})
    hygiene.requestheaders(f)
    attach(f, NODE, "/v1/responses")  # the relay's request hook
    hygiene.request(f)
    assert f.request.headers["authorization"] == f"Bearer {NODE_KEY}"  # mitmproxy sends it after this hook
    f.response = tflow.tresp()
    hygiene.responseheaders(f)  # fires only after the request went out
    assert f.request.headers["authorization"] == "Bearer sk-…abcd"
    hygiene.response(f)
    assert f.request.headers["authorization"] == "Bearer sk-…abcd"


def test_a_key_set_after_the_response_headers_is_masked_at_the_response():
    """The response hook masks again only what changed since responseheaders: here a key put back."""
    hygiene = KeyHygiene()
    f = request_flow(headers={"authorization": f"Bearer {NODE_KEY}"})
    hygiene.request(f)
    f.response = tflow.tresp()
    hygiene.responseheaders(f)
    f.request.headers["x-api-key"] = OTHER_KEY  # an addon between the two hooks
    hygiene.response(f)
    assert f.request.headers["x-api-key"] == "sk-…wxyz"
    assert f.request.headers["authorization"] == "Bearer sk-…abcd"
    assert not hygiene._masked  # nothing kept per flow once it ended


def test_error_masks_too():
    hygiene = KeyHygiene()
    f = request_flow(headers={"x-api-key": NODE_KEY})
    hygiene.request(f)
    f.error = tflow.terr()
    hygiene.error(f)
    assert f.request.headers["x-api-key"] == "sk-…abcd"


def test_relay_retry_replay_hidden_from_view_until_request():
    """The relay's retry copy already carries the next node's key when mitmweb first lists it."""
    hygiene = KeyHygiene()
    attempt = request_flow(headers={"authorization": f"Bearer {NODE_KEY}"})
    attempt.is_replay = "request"
    hygiene.requestheaders(attempt)
    assert attempt.request.headers["authorization"] == "Bearer sk-…abcd"  # what mitmweb gets
    hygiene.request(attempt)
    assert attempt.request.headers["authorization"] == f"Bearer {NODE_KEY}"  # what the node gets
    attempt.response = tflow.tresp()
    hygiene.responseheaders(attempt)
    assert attempt.request.headers["authorization"] == "Bearer sk-…abcd"


def test_replay_rerouted_by_the_relay_keeps_the_new_key():
    """A mitmweb replay of a masked flow: the relay's request hook sets a node's key, which must win."""
    hygiene = KeyHygiene()
    replay = request_flow(headers={"authorization": f"Bearer {OTHER_KEY}"})
    replay.is_replay = "request"
    hygiene.requestheaders(replay)
    attach(replay, NODE, "/v1/responses")
    hygiene.request(replay)
    assert replay.request.headers["authorization"] == f"Bearer {NODE_KEY}"


def test_flows_in_flight_at_shutdown_are_masked_before_save():
    hygiene = KeyHygiene()
    waiting = request_flow(headers={"authorization": f"Bearer {NODE_KEY}"})
    hygiene.request(waiting)
    hygiene.done()  # runs before mitmproxy's save addon writes the flows still in flight
    assert waiting.request.headers["authorization"] == "Bearer sk-…abcd"


def test_answered_by_an_addon_is_not_tracked_but_masked():
    hygiene = KeyHygiene()
    f = request_flow(headers={"authorization": "Bearer client-key-that-is-long"})
    f.response = tflow.tresp(status_code=401)
    hygiene.request(f)
    assert not hygiene._unmasked
    hygiene.responseheaders(f)  # mitmproxy emulates it for an addon's response
    assert f.request.headers["authorization"] == "Bearer …long"


def test_proxy_authorization_of_a_connect_is_masked_once_read():
    hygiene = KeyHygiene()
    f = request_flow(headers={"proxy-authorization": f"Bearer {NODE_KEY}"})
    f.request.method = "CONNECT"
    hygiene.http_connect(f)
    assert f.request.headers["proxy-authorization"] == "Bearer sk-…abcd"

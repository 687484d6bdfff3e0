"""Every error the relay makes reaches the official SDKs as their own typed exception, with its code.

One real relay (client keys, one node, a 1 s first-byte timeout, a 1 MiB body limit) and the `openai`
and `anthropic` SDKs as the clients; retries in the SDKs are off so each call is one request. Then the
refusals of docs/refusals.md (``tests.support.refusals``), with the SDKs' default retries on: each stops at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from tests.support.calls import write_nodes
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.refusals import KEYS, ROWS, refusing_relay
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for

if TYPE_CHECKING:  # the SDKs are imported by the tests that run them: ~4 s a collection need not pay
    import anthropic
    import openai

# one xdist worker takes the module, so its relays start once
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("sdk_errors")]

KEY = "ck-sdk-client-0123456789abcdef"


@pytest.fixture(scope="module")
def relay(tmp_path_factory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("sdk")
    with FakeUpstream("n") as up:
        nodes = write_nodes(tmp / "n.toml", [("n", up.base_url, "sk-node-sdk-0000111122223333", 1),
                                             ("off", up.base_url, "sk-node-off-0000111122223333", 0)])
        opts = {"codex_nodes": str(nodes), "codex_client_keys": f"sdk={KEY}", "codex_ping_interval": "0",
                "codex_first_byte_timeout": "1", "codex_max_request_body": str(2**20), "codex_retries": "0"}
        with RelayProcess(db_url=f"sqlite:///{tmp / 'codex.db'}", options=opts) as r:
            yield SimpleNamespace(relay=r, up=up, base=f"{r.url}/v1")


def oai(relay, key: str = KEY) -> openai.OpenAI:
    import openai

    return openai.OpenAI(base_url=relay.base, api_key=key, max_retries=0, timeout=30)


def claude(relay, key: str = KEY) -> anthropic.Anthropic:
    import anthropic

    return anthropic.Anthropic(base_url=relay.relay.url, api_key=key, max_retries=0, timeout=30)


def test_openai_sdk_reads_401_413_504(relay):
    import openai

    with pytest.raises(openai.AuthenticationError) as e:
        oai(relay, "wrong").responses.create(model="gpt-5-codex", input="hi")
    assert e.value.code == "invalid_api_key" and "incorrect API key" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:
        oai(relay).responses.create(model="gpt-5-codex", input="x" * (2**20 + 1))
    assert e.value.status_code == 413 and e.value.code == "request_too_large"
    relay.up.behaviour = Behaviour(first_byte_delay=5)
    try:
        with pytest.raises(openai.APIStatusError) as e:
            oai(relay).chat.completions.create(model="gpt-5-codex", messages=[{"role": "user", "content": "hi"}])
    finally:
        relay.up.behaviour = Behaviour()
    assert e.value.status_code == 504 and e.value.code == "upstream_timeout"
    # And a good call still works through the same relay.
    assert oai(relay).responses.create(model="gpt-5-codex", input="hi").usage.input_tokens > 0


def test_anthropic_sdk_reads_401_413_504(relay):
    import anthropic

    ask = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(anthropic.AuthenticationError) as e:
        claude(relay, "wrong").messages.create(**ask)
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.APIStatusError) as e:
        claude(relay).messages.create(**{**ask, "messages": [{"role": "user", "content": "x" * (2**20 + 1)}]})
    assert e.value.status_code == 413 and e.value.body["error"]["type"] == "request_too_large"
    relay.up.behaviour = Behaviour(first_byte_delay=5)
    try:
        with pytest.raises(anthropic.APIStatusError) as e:
            claude(relay).messages.create(**ask)
    finally:
        relay.up.behaviour = Behaviour()
    assert e.value.status_code == 504 and e.value.body["type"] == "error"
    assert "no response headers within 1 s" in e.value.body["error"]["message"]
    assert claude(relay).messages.create(**ask).usage.output_tokens > 0


# -- refusals: every row of docs/refusals.md, each client stopped at its first request ------------------------


@pytest.fixture(scope="module")
def refusing(tmp_path_factory) -> Iterator[SimpleNamespace]:
    with refusing_relay(tmp_path_factory.mktemp("refusals")) as (relay, _):
        yield SimpleNamespace(relay=relay, db=relay.db_url)


def _counting_client(sdk) -> tuple[object, list[object]]:
    """The SDK's own HTTP client, noting every request it sends: the SDK's retries included."""
    sent: list[object] = []
    return sdk.DefaultHttpxClient(event_hooks={"request": [sent.append]}), sent


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_openai_sdk_stops_at_once_on_each_refusal(refusing, row):
    import openai

    http_client, sent = _counting_client(openai)
    # The SDK's default retries (2) stay on: the refusal itself must stop them.
    client = openai.OpenAI(base_url=f"{refusing.relay.url}/v1", api_key=KEYS[row.key], http_client=http_client)
    for _ in range(2):  # the second time, all nodes down is a refusal too
        with pytest.raises(openai.APIStatusError) as e:
            client.responses.create(model=row.model, input="hi")
        if e.value.status_code != 502:
            break
    assert (e.value.status_code, e.value.code) == (row.status, row.code)
    assert row.reason in e.value.message and len(sent) <= 2
    assert e.value.response.headers["x-should-retry"] == "false"
    assert e.value.response.headers["x-request-id"].startswith(f"codex-relay-{row.code}-")
    if row.code == "budget_exceeded":  # Codex stops on this type, with the reset time
        assert e.value.type == "usage_limit_reached" and e.value.body["resets_at"] > 0
        assert "retry-after" not in e.value.response.headers


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_anthropic_sdk_stops_at_once_on_each_refusal(refusing, row):
    import anthropic

    http_client, sent = _counting_client(anthropic)
    client = anthropic.Anthropic(base_url=refusing.relay.url, api_key=KEYS[row.key], http_client=http_client)
    ask = {"model": row.claude_model(), "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        with pytest.raises(anthropic.APIStatusError) as e:
            client.messages.create(**ask)
        if e.value.status_code != 502:
            break
    assert e.value.status_code == row.status and e.value.body["type"] == "error"
    assert row.reason in e.value.body["error"]["message"] and len(sent) <= 2
    assert e.value.response.headers["x-should-retry"] == "false"


def test_all_nodes_down_is_one_attempt_of_the_node_and_shows_no_address(refusing):
    """The first call finds the node down (its breaker opens); every later call is a refusal, not an attempt."""
    import openai

    client = openai.OpenAI(base_url=f"{refusing.relay.url}/v1", api_key=KEYS["all"], max_retries=0)
    answers = []
    for _ in range(4):
        with pytest.raises(openai.APIStatusError) as e:
            client.responses.create(model="down-2", input="hi")
        answers.append((e.value.status_code, e.value.code, e.value.message))
    assert all("127.0.0.1" not in m and "http" not in m for _, _, m in answers), answers
    assert {(s, c) for s, c, _ in answers} <= {(502, "upstream_unreachable"), (429, "no_node_available")}
    assert answers[-1][:2] == (429, "no_node_available")
    eng = sa.create_engine(refusing.db)
    try:
        def dead_rows() -> list:
            with eng.connect() as conn:
                return conn.execute(sa.text("SELECT node_id, error_message FROM codex_invocations "
                                            "WHERE requested_model IN ('down-1', 'down-2', 'claude-down-1')")).all()
        got = wait_for(lambda: len(dead_rows()) >= 4 and dead_rows(), what="the calls' rows")
    finally:
        eng.dispose()
    # Exactly one of all those calls (here and in the rows above) was an attempt of the node.
    assert len([r for r in got if r.node_id == "dead"]) == 1
    assert "failed" in next(r.error_message for r in got if r.node_id == "dead")  # the address stays in the row

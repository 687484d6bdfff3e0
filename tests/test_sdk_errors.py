"""Every error the relay makes reaches the official SDKs as their own typed exception, with its code.

One real relay (client keys, one node, a 1 s first-byte timeout, a 1 MiB body limit) and the `openai`
and `anthropic` SDKs as the clients; retries in the SDKs are off so each call is one request.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

from bench.fakeupstream import Behaviour, FakeUpstream
from bench.relayproc import RelayProcess
from tests.test_e2e import write_nodes

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

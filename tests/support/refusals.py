"""One relay that makes every refusal of docs/refusals.md, for the tests that drive real clients against it.

Each row is a client key and a model: the key's limits or the nodes that serve the model decide the refusal.
Nodes: ``oa`` (OpenAI formats, ``gpt-*``) and ``an`` (Anthropic, ``claude-*``) are fake upstreams, ``other``
serves ``other-*`` (a node key ``narrow`` may not use), ``dead`` serves ``down-*`` on a port nobody listens on
(its breaker opens at its first failure: ``codex_fail_threshold`` 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.fakeupstream import FakeUpstream
from tests.support.ports import free_port
from tests.support.relayproc import RelayProcess


@dataclass(frozen=True)
class Row:
    name: str
    key: str
    model: str  # an OpenAI model; the Anthropic clients ask for ``claude-`` + it
    status: int
    code: str  # OpenAI's error.code
    reason: str  # part of the relay's message, as a client shows it

    def claude_model(self) -> str:
        return self.model if self.model.startswith("claude-") else f"claude-{self.model}"


KEYS = {"all": "ck-all-0123456789abcdef", "narrow": "ck-narrow-0123456789abcdef",
        "picky": "ck-picky-0123456789abcdef", "spent": "ck-spent-0123456789abcdef",
        "single": "ck-single-0123456789abcdef"}

ROWS = [
    Row("budget used up", "spent", "gpt-5-codex", 429, "budget_exceeded", "daily_requests limit (0)"),
    Row("model not allowed", "picky", "o3-mini", 400, "model_not_allowed", "may not use model"),
    Row("concurrency limit", "single", "gpt-5-codex", 429, "concurrency_limited", "concurrency limit (0"),
    Row("the key's nodes don't serve the model", "narrow", "other-1", 400, "model_not_found",
        "none of key 'narrow''s nodes serves model"),
    Row("all nodes down", "all", "down-1", 429, "no_node_available", "every node that serves this call is failing"),
    Row("no node serves the model", "all", "nobody-1", 400, "model_not_found", "no configured node serves model"),
]


def _node(node_id: str, base_url: str, formats: list[str], models: list[str]) -> str:
    return (f'[[nodes]]\nid = "{node_id}"\nbase_url = "{base_url}"\napi_key = "sk-node-{node_id}-0123456789"\n'
            f"formats = {formats!r}\nmodels = {models!r}\n\n").replace("'", '"')


@contextlib.contextmanager
def refusing_relay(tmp: Path) -> Iterator[tuple[RelayProcess, FakeUpstream]]:
    """The relay (and its OpenAI upstream, which records what it got): every row of ``ROWS`` is refused."""
    with FakeUpstream("oa") as oa, FakeUpstream("an") as an, FakeUpstream("other") as other:
        nodes = tmp / "nodes.toml"
        nodes.write_text(
            _node("oa", oa.base_url, ["openai"], ["gpt-*", "o3-*"])
            + _node("an", an.base_url, ["anthropic"], ["claude-gpt-*", "claude-o3-*"])
            + _node("other", other.base_url, ["openai", "anthropic"], ["other-*", "claude-other-*"])
            + _node("dead", f"http://127.0.0.1:{free_port()}/v1", ["openai", "anthropic"],
                    ["down-*", "claude-down-*"]))
        keys = tmp / "keys.toml"
        keys.write_text(
            f'[[keys]]\nname = "all"\nkey = "{KEYS["all"]}"\n\n'
            f'[[keys]]\nname = "narrow"\nkey = "{KEYS["narrow"]}"\nnodes = ["oa", "an"]\n\n'
            f'[[keys]]\nname = "picky"\nkey = "{KEYS["picky"]}"\nmodels = ["gpt-5*", "claude-gpt-5*"]\n\n'
            f'[[keys]]\nname = "spent"\nkey = "{KEYS["spent"]}"\ndaily_requests = 0\n\n'
            f'[[keys]]\nname = "single"\nkey = "{KEYS["single"]}"\nconcurrency = 0\n')
        opts = {"codex_nodes": str(nodes), "codex_client_keys": f"@{keys}", "codex_ping_interval": "0",
                "codex_fail_threshold": "1", "codex_cooldown": "600", "codex_retries": "0"}
        with RelayProcess(db_url=f"sqlite:///{tmp / 'codex.db'}", options=opts) as relay:
            yield relay, oa

"""The shipped examples (examples/) are what the relay reads: each loads with the project's own readers
(docs/several-relays.md shows the HAProxy configuration the fleet tests run: tests/test_docs.py checks it)."""

from __future__ import annotations

from pathlib import Path

from store.config import load_nodes_file
from store.keys import parse_keys_toml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_example_nodes_file_loads():
    nodes = load_nodes_file(EXAMPLES / "nodes.toml")
    assert [n.id for n in nodes] == ["openai-relay", "anthropic"]
    assert all(n.api_key and n.base_url.startswith("https://") for n in nodes)


def test_the_example_keys_file_loads_and_names_only_example_nodes():
    keys = parse_keys_toml((EXAMPLES / "keys.toml").read_text())
    assert [k.name for k in keys] == ["alice", "ci"]
    node_ids = {n.id for n in load_nodes_file(EXAMPLES / "nodes.toml")}
    assert all(set(k.nodes or ()) <= node_ids for k in keys)


def test_the_files_that_hold_keys_stay_out_of_the_repository_and_the_licence_is_there():
    import subprocess

    root = EXAMPLES.parent
    ignored = subprocess.run(["git", "check-ignore", "nodes.toml", "keys.toml", "sources.toml"], cwd=root,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["nodes.toml", "keys.toml", "sources.toml"], ignored
    assert "MIT License" in (root / "LICENSE").read_text()

"""The nodes file: what loads, and the errors a user sees for what does not."""

from __future__ import annotations

import pytest

from store.config import ConfigError, base_url_warnings, load_nodes_file


def write(tmp_path, text: str):
    p = tmp_path / "nodes.toml"
    p.write_text(text)
    return p


def test_loads_nodes_with_defaults(tmp_path):
    p = write(tmp_path, '[[nodes]]\nid = "a"\nbase_url = "https://a/v1"\napi_key = "k"\nweight = 3\n'
                        '[[nodes]]\nid = "b"\nname = "B"\nbase_url = "http://127.0.0.1:1/v1"\napi_key = "kb"\n'
                        '[[sources]]\n[[webhooks]]\n')  # what else a nodes file holds: read elsewhere
    a, b = load_nodes_file(p)
    assert (a.id, a.name, a.base_url, a.api_key, a.weight) == ("a", "a", "https://a/v1", "k", 3)
    assert (b.name, b.weight, b.api_key) == ("B", 1, "kb")
    named = p.read_text().replace('api_key = "kb"\n', 'api_key = "kb"\nauth_header = "X-Api-Key"\n')
    assert a.auth_header == "" and load_nodes_file(write(tmp_path, named))[1].auth_header == "x-api-key"


@pytest.mark.parametrize("text, message", [
    ("[[nodes]\nid=", "invalid TOML"),
    ('nodes = "x"', "array of tables"),
    ('[[nodes]]\nbase_url = "https://a"', "id must be"),
    ('[[nodes]]\nid = "a"', "base_url is required"),
    ('[[nodes]]\nid = "a"\nbase_url = "a.example"', "http:// or https://"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\nweight = -1', "weight must be an integer >= 0"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\napi_key = "' + "k" * 513 + '"', "limited to 512 characters"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\nweight = 1.5', "weight must be an integer >= 0"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\nwieght = 1', "unknown keys ['wieght']"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\napi_key = "k"\n[[nodes]]\nid = "a"\nbase_url = "https://b"\n'
     'api_key = "k"', "duplicate id"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\napi_key = "k"\n'
     'auth_header = "host"', "auth_header must be the name"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\napi_key = "k"\n'
     'auth_header = "x api key"', "auth_header must be the name"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\napi_key = "k"\n'
     'auth_header = 1', "auth_header must be the name"),
    # Issue 25: both were taken silently (no alerts; a node sent calls without a key).
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"', "api_key is required"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\napi_key = ""', "api_key is required"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\napi_key = "sk-\\u0000"', "printable ASCII without spaces"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\napi_key = "sk key"', "printable ASCII without spaces"),
    ('[[nodes]]\nid = "a"\nbase_url = "https://a"\napi_key = "k"\n[[webhook]]\nurl = "https://hooks.example/x"',
     "unknown top-level 'webhook'; a nodes file has [[nodes]], [[sources]], [[webhooks]]"),
    ('weight = 3\n[[nodes]]\nid = "a"\nbase_url = "https://a"\napi_key = "k"', "unknown top-level 'weight'"),
])
def test_bad_files_give_clear_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_nodes_file(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_nodes_file(tmp_path / "nope.toml")


def test_node_repr_never_shows_the_key(tmp_path):
    p = write(tmp_path, '[[nodes]]\nid = "a"\nbase_url = "https://a/v1"\napi_key = "sk-secret-1234"\n')
    assert "sk-secret-1234" not in repr(load_nodes_file(p))


@pytest.mark.parametrize(("url", "warning"), [
    ("https://api.openai.com/v1", None), ("http://127.0.0.1:9/v1", None), ("http://localhost:8080/v1", None),
    ("https://api.openai.com", "has no path: OpenAI- and Anthropic-style APIs live under /v1"),
    ("http://relay.example/v1", "plain http to another machine"),
    ("https://relay.example/openai/v1/chat/completions", "e.g. https://relay.example/openai/v1"),
    ("https://x.example/v1/responses/", "e.g. https://x.example/v1"),
])
def test_a_base_url_that_starts_but_looks_wrong_is_warned_about(url, warning):
    found = base_url_warnings(url)
    assert (found == []) if warning is None else (len(found) == 1 and warning in found[0]), found

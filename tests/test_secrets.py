"""Known secrets: constant-time comparison and scrubbing keys that upstreams echo back."""

from __future__ import annotations

from addon.guard.secrets import KnownSecrets, secrets_equal
from addon.services.clientkeys import ClientKeys, key_specs

NODE_KEY = "sk-proj-NODEKEY-0123456789abcd"
CLIENT_KEY = "ck-alice-CLIENT-5a6b7c8d9e0f"


def secrets() -> KnownSecrets:
    keys = ClientKeys()
    keys.apply(key_specs(f"alice={CLIENT_KEY}", known_nodes=()))
    s = KnownSecrets(keys)
    s.set_node_keys([NODE_KEY, "short"])
    return s


def test_echoed_node_and_client_keys_are_masked():
    text = (f"Incorrect API key provided: {NODE_KEY}. You can find your API key at https://x/keys; "
            f"client {CLIENT_KEY}, again '{CLIENT_KEY}.'")
    scrubbed = secrets().scrub(text)
    assert NODE_KEY not in scrubbed and CLIENT_KEY not in scrubbed
    assert "sk-…abcd" in scrubbed and "ck-…8d9e0f"[-4:] in scrubbed
    assert scrubbed.startswith("Incorrect API key provided: ") and "https://x/keys" in scrubbed


def test_text_without_keys_is_unchanged_and_short_keys_are_not_hunted():
    text = "upstream overloaded: retry later (code 529), short"
    assert secrets().scrub(text) == text


def test_constant_time_equality():
    assert secrets_equal("token-a", "token-a") and not secrets_equal("token-a", "token-b")

"""The secrets the relay holds, compared in constant time and scrubbed from any text it keeps or shows.

Upstreams echo keys back (``Incorrect API key provided: sk-…``); such text becomes an invocation's
``error_message``, a node's ``last_error``, a log line and an admin page row. ``KnownSecrets.scrub``
replaces every configured node key and every client key in it with its masked form before any of
that happens. Client keys are known only by their SHA-256 (``ClientKeys.digests``: no key is kept), so
candidate tokens of the text are hashed and compared.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable

from addon.services.clientkeys import ClientKeys
from store.masking import digest, mask_secret

# Runs of characters API keys are made of; anything shorter than 8 is no key worth hiding.
_TOKEN = re.compile(r"[A-Za-z0-9_\-.~+/=]{8,}")
_MIN_KEY_CHARS = 8


def secrets_equal(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets (tokens, keys)."""
    return hmac.compare_digest(digest(given), digest(expected))


class KnownSecrets:
    """Node keys (set by the fleet) and the digests of ``client_keys``."""

    def __init__(self, client_keys: ClientKeys | None = None) -> None:
        self.node_keys: frozenset[str] = frozenset()
        self.client_keys = client_keys or ClientKeys()

    def set_node_keys(self, keys: Iterable[str]) -> None:
        self.node_keys = frozenset(k for k in keys if len(k) >= _MIN_KEY_CHARS)

    def scrub(self, text: str) -> str:
        """``text`` with every known key masked (``sk-…abcd``)."""
        # Longest first: a key that contains another is replaced whole.
        for key in sorted(self.node_keys, key=len, reverse=True):
            if key in text:
                text = text.replace(key, mask_secret(key))
        if self.client_keys.digests:
            text = _TOKEN.sub(self._mask_client_key, text)
        return text

    def _mask_client_key(self, m: re.Match[str]) -> str:
        token = m.group(0)
        # A key may be followed by punctuation of the sentence (``key.``): try a few shorter cuts too.
        for end in range(len(token), max(_MIN_KEY_CHARS, len(token) - 3) - 1, -1):
            if digest(token[:end]) in self.client_keys.digests:
                return mask_secret(token[:end]) + token[end:]
        return token

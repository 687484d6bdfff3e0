"""The one rule for showing a secret (an API key, a token): never whole, just enough to tell keys apart;
and the one digest secrets are compared and stored by.

Flows (``addon.hygiene``), the stats CLI and the admin page all mask through ``mask_secret``.
"""

from __future__ import annotations

import hashlib

ELLIPSIS = "…"
MIN_REVEAL_CHARS = 16  # shorter secrets show nothing: 4 characters would be too much of them


def digest(secret: str) -> bytes:
    """A fixed-length digest: comparing digests reveals neither a secret nor its length."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def mask_secret(secret: str) -> str:
    """``sk-proj-…wxyz`` → ``sk-…wxyz``: a short type prefix and the last 4 characters, for telling keys apart.

    Already masked values are returned unchanged.
    """
    if ELLIPSIS in secret:
        return secret
    if len(secret) < MIN_REVEAL_CHARS:
        return ELLIPSIS
    head, sep, _ = secret.partition("-")
    prefix = head + sep if sep and 0 < len(head) <= 3 else ""
    return f"{prefix}{ELLIPSIS}{secret[-4:]}"

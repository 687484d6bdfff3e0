"""Which conversation a call belongs to: the key that keeps a session on one node (sticky sessions).

Plain Python (no mitmproxy). A node's prompt cache is its own: a conversation whose calls move between
nodes pays for its whole prompt again on each move. Each coding client names its conversation in its own
way; the first of these a call carries is its session key:

1. Codex's headers ``session_id``, ``conversation_id``, ``session-id`` (Codex CLI 0.169 and later send
   ``session-id``, older ones one of the others; its WebSocket upgrade carries ``session_id`` too);
2. OpenCode's ``x-session-affinity`` header;
3. the body's ``prompt_cache_key`` (Codex sets it to its conversation id; any OpenAI client may set one);
4. the session part of the body's ``metadata.user_id`` (Claude Code; see ``claude_session``).

Headers first: they name the conversation and nothing else, and a WebSocket upgrade has no body. A
client sending two of them sends the same conversation id in each (Codex: ``session-id`` = its
``prompt_cache_key``), so the order matters only for a client that sends unrelated values.
"""

from __future__ import annotations

import json

SESSION_HEADERS = ("session_id", "conversation_id", "session-id", "x-session-affinity")  # in this order
# The most characters of a session key the relay keeps (the ``codex_invocations.session_key`` column's
# size): a longer client-chosen value is cut, so two keys differing only past this length are one session.
SESSION_KEY_MAX = 128
_CLAUDE_SESSION = "_session_"


def session_key(headers: dict[str, list[str]], body_key: str | None) -> str | None:
    """The session of a call from its ``SESSION_HEADERS`` values (by lower-case name, as
    ``addon.egress.header_values`` finds them) and its body's session key (``body_session``)."""
    for name in SESSION_HEADERS:
        values = headers.get(name)
        if values and (value := ", ".join(values).strip()):  # an empty header names no session
            return value[:SESSION_KEY_MAX]
    return body_key[:SESSION_KEY_MAX] if body_key else None


def body_session(prompt_cache_key: object, metadata: object) -> str | None:
    """A call body's session: its ``prompt_cache_key``, else Claude Code's session in ``metadata.user_id``."""
    if isinstance(prompt_cache_key, str) and prompt_cache_key:
        return prompt_cache_key
    if isinstance(metadata, dict):
        return claude_session(metadata.get("user_id"))
    return None


def claude_session(user_id: object) -> str | None:
    """The session id in Claude Code's ``metadata.user_id``, or None when it carries none.

    Claude Code sends ``user_<device hash>_account_<account uuid>_session_<session uuid>`` (newer versions a
    JSON object as text with a ``session_id``). The session part alone is the key, not the whole value:
    it is what changes per conversation (the rest is the same for every session of a person), it is the
    id Claude Code itself shows (``claude --resume <id>``), so an operator finds a row of ``stats
    sessions`` by it, and it carries no account or device identifier into the database and the stats. A
    ``user_id`` without a session part (another Anthropic client's end-user id) names a person, not a
    conversation: no session.
    """
    if not isinstance(user_id, str) or not user_id:
        return None
    if user_id.startswith("{"):
        try:
            found = json.loads(user_id)
        except ValueError:
            return None
        session = found.get("session_id") if isinstance(found, dict) else None
        return session if isinstance(session, str) and session else None
    _, sep, session = user_id.rpartition(_CLAUDE_SESSION)
    return session if sep and session else None

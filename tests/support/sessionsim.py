"""Coding-client sessions for the sticky-session tests: the calls Codex, Claude Code and OpenCode make
in one conversation, each turn resending the whole conversation so far (as they do), so a node's prompt
cache (``tests.support.fakeupstream.PromptCache``) hits on what it saw of the conversation before."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

SYSTEM = "You are a coding agent working in a repository. Follow the instructions. " * 80  # ~1,500 tokens
CLIENTS = ("codex", "claude", "opencode", "anonymous")
PATHS = {"codex": "/v1/responses", "claude": "/v1/messages", "opencode": "/v1/chat/completions",
         "anonymous": "/v1/responses"}


@dataclass(frozen=True, slots=True)
class Session:
    """One conversation of ``client``; ``sid`` is the id the client sends (the relay's session key)."""

    client: str
    sid: str

    @property
    def path(self) -> str:
        return PATHS[self.client]

    @property
    def user_id(self) -> str:
        """Claude Code's ``metadata.user_id``: the session is its last part."""
        return f"user_{'7f' * 32}_account_{uuid.UUID(int=1)}_session_{self.sid}"

    def call(self, turn: int) -> tuple[dict[str, str], dict]:
        """The headers and body of turn ``turn`` (0-based): the history so far plus a new user message."""
        history: list[dict] = []
        for k in range(turn + 1):
            history.append({"role": "user", "content": f"{self.sid} step {k}: " + "please change it " * 10})
            if k < turn:  # the answers, with the tool output they carried: most of a turn's growth
                history.append({"role": "assistant", "content": f"{self.sid} answer {k}: " + "diff line " * 100})
        if self.client == "codex":
            return ({"session-id": self.sid},
                    {"model": "gpt-5-codex", "stream": True, "instructions": SYSTEM, "input": history,
                     "prompt_cache_key": self.sid})
        if self.client == "claude":
            return ({"anthropic-version": "2023-06-01"},
                    {"model": "claude-sonnet-4-5", "stream": True, "max_tokens": 1024, "system": SYSTEM,
                     "messages": history, "metadata": {"user_id": self.user_id}})
        if self.client == "opencode":
            return ({"x-session-affinity": self.sid},
                    {"model": "gpt-5-mini", "stream": False, "messages": [{"role": "system", "content": SYSTEM},
                                                                           *history],
                     "metadata": {"fake_conversation": self.sid}})
        # A client that names no session the relay reads: its calls spread over the nodes.
        return ({}, {"model": "gpt-5-codex", "stream": True, "instructions": SYSTEM, "input": history,
                     "metadata": {"fake_conversation": self.sid}})


def sessions(clients: tuple[str, ...], n: int) -> list[Session]:
    """``n`` sessions, the clients taken in turn."""
    return [Session(clients[i % len(clients)], f"{clients[i % len(clients)]}-{uuid.UUID(int=i + 100)}")
            for i in range(n)]

"""Responses over WebSocket: the turns of one socket, each ``response.create`` one invocation.

Plain Python (no mitmproxy import). A client sends ``{"type": "response.create", …}`` (the fields of a
``POST /v1/responses`` body) and the server answers with the events of the SSE stream, as one message
each, ending with ``response.completed`` / ``.incomplete`` / ``.failed`` (usage in ``response.usage``) or
an ``error`` event. A socket runs turns one after another; a create may name a ``stream_id`` (a lane) and
then the server's events carry it, so turns of different lanes may overlap. Events are matched to the
oldest open turn of their lane.

Server messages are read as ``addon.metering.usage.UsageExtractor`` reads SSE events: the event type is taken
from the message's head without parsing it, so the deltas (most messages) are counted, never parsed; nor is
an event whose bytes name no ``response`` or ``error`` (all the meter reads of a non-terminal event), and one
whose only say is its response's model (``response.created``) is parsed only when no later event names one.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import deque
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, field
from typing import Any

from addon.metering.outcome import Outcome, classify_response, is_node_failure_status
from addon.metering.sse import SSEEvent
from addon.metering.usage import UsageExtractor

CREATE = "response.create"
_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
# Servers put ``type`` first (OpenAI's, the SDK's models); anything else is parsed to find it.
_TYPE_AT_HEAD = re.compile(rb'\s*\{\s*"type"\s*:\s*"([^"\\]{1,128})"')
_LANE = re.compile(rb'"stream_id"\s*:\s*"([^"\\]*)"')


@dataclass(slots=True)
class Turn:
    """One ``response.create`` and the server's answer to it, while it runs and once it ended."""

    invoke_id: str
    occurred_at: dt.datetime
    started_at: float  # when the client's message came (epoch seconds, as mitmproxy stamps messages)
    requested_model: str | None
    request_bytes: int
    lane: str | None = None
    extractor: UsageExtractor = field(default_factory=lambda: UsageExtractor("responses"))
    first_event_at: float | None = None
    last_event_at: float | None = None
    response_bytes: int = 0
    events: int = 0
    error_status: int | None = None  # the HTTP status an ``error`` event names, if any
    outcome: Outcome | None = None  # set when the turn ended
    # The newest event not yet read whose only say is its ``response.model`` (``_model_only``): its type and bytes.
    # It is read before the next event that is, or at the end when nothing later names a model.
    unread_model: tuple[str, bytes] | None = None

    def read_unread_model(self) -> None:
        """Read the event put aside as ``unread_model``, if any (it comes before any event read after this)."""
        if self.unread_model is not None:
            kind, content = self.unread_model
            self.unread_model = None
            text = content.decode("utf-8", "replace")
            self.extractor.on_parsed(kind, _loads(text), text)

    def result(self) -> Outcome:
        """How the turn ended, by the events seen so far (it must have ended)."""
        x = self.extractor
        if x.error is not None and self.error_status is not None:
            return Outcome("failed", is_node_failure_status(self.error_status), x.error)
        return classify_response(200, body_error=x.error, stream=True, completed=x.completed)


def event_type(content: bytes) -> str | None:
    """A server message's ``type``, read from its head when it starts with it (cheap), else parsed."""
    head = _TYPE_AT_HEAD.match(content)
    if head is not None:
        return head.group(1).decode("utf-8", "replace")
    return _parsed_type(content)


def _unread(content: bytes, start: int) -> bool:
    """Whether the meter would read nothing of a (non-terminal) event after its type at ``start``: it reads only a
    top-level ``response`` (model, usage) or ``error``, so bytes naming neither (nor holding an escape that could
    spell one) change nothing there. Output items, content parts and the like (Codex sends many a turn) are then
    not parsed."""
    return content.find(b'"response', start) < 0 and content.find(b'"error', start) < 0 and content.find(
        b"\\u", start) < 0


def _model_only(content: bytes, start: int) -> bool:
    """Whether all the meter could read of a non-terminal ``response.*`` event after its type at ``start`` is its
    ``response.model`` (for the turn's model): every ``error`` in it null, no escape that could spell one.
    ``response.created`` is such an event (Codex's echoes the turn's instructions: tens of KB); the terminal
    event names the model again, so it is mostly never parsed."""
    if content.find(b"\\u", start) >= 0:
        return False
    errors = content.count(b'"error"', start)
    return not errors or errors == content.count(b'"error":null', start) + content.count(b'"error": null', start)


def _names_model(obj: Any) -> bool:
    """Whether a parsed Responses event names its response's model (then an earlier event's model is moot)."""
    resp = obj.get("response") if isinstance(obj, dict) else None
    return isinstance(resp, dict) and isinstance(model := resp.get("model"), str) and bool(model)


def _parsed_type(content: bytes) -> str | None:
    obj = _loads(content)
    kind = obj.get("type") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else None


class SocketTurns:
    """The open turns of one socket, by lane, in the order they were created."""

    def __init__(self) -> None:
        self._lanes: dict[str | None, deque[Turn]] = {}
        self._named_lanes = 0  # open turns with a stream_id: only then is a server message searched for one

    def __len__(self) -> int:
        return sum(len(q) for q in self._lanes.values())

    def start(self, turn: Turn) -> None:
        self._lanes.setdefault(turn.lane, deque()).append(turn)
        if turn.lane is not None:
            self._named_lanes += 1

    def server_message(self, content: bytes, at: float) -> Turn | None:
        """Meter one server message; returns its turn when this message ended it."""
        lane = None
        if self._named_lanes and (found := _LANE.search(content)) is not None:
            lane = found.group(1).decode("utf-8", "replace")
        queue = self._lanes.get(lane)
        if not queue:
            return None  # nothing asked for it (an event after an error, a steer's answer): no turn's
        turn = queue[0]
        turn.events += 1
        turn.response_bytes += len(content)
        turn.last_event_at = at
        if turn.first_event_at is None:
            turn.first_event_at = at
        head = _TYPE_AT_HEAD.match(content)
        if head is None:  # no type first: parsed (twice) as any SSE event
            kind = _parsed_type(content)
            turn.read_unread_model()
            turn.extractor.on_event(SSEEvent(kind or "message", content.decode("utf-8", "replace")))
            obj = _loads(content) if kind == "error" else None
        elif UsageExtractor.noise(name := head.group(1)):
            return None  # a delta (most messages): the meter skips it by its name, so it is not decoded
        else:
            kind = name.decode("utf-8", "replace")
            ends = kind in _ENDS
            if not ends:
                if _unread(content, head.end()):
                    return None
                if kind.startswith("response.") and _model_only(content, head.end()):
                    turn.read_unread_model()  # only the newest such event is held
                    turn.unread_model = (kind, content)
                    return None
            text = content.decode("utf-8", "replace")
            obj = _loads(text)
            if not ends or not _names_model(obj):
                turn.read_unread_model()
            turn.unread_model = None  # the terminal event's model is the turn's
            turn.extractor.on_parsed(kind, obj, text)
        if kind not in _ENDS:
            return None
        if kind == "error":
            status = obj.get("status") if isinstance(obj, dict) else None
            if isinstance(status, int) and not isinstance(status, bool):
                turn.error_status = status
        turn.outcome = turn.result()
        self._pop(queue)
        return turn

    def close(self, *, by_client: bool, reason: str) -> list[Turn]:
        """The socket closed: its open turns, each ended ``truncated`` (a failure of the node unless the client
        closed it)."""
        ended = [turn for queue in self._lanes.values() for turn in queue]
        for turn in ended:
            turn.read_unread_model()
            turn.outcome = Outcome("truncated", not by_client, reason)
        self._lanes.clear()
        self._named_lanes = 0
        return ended

    def quiet_since(self) -> float | None:
        """When the node last sent anything for a turn it is answering (its start, before the first event): the
        earliest over the lanes; None when no turn runs."""
        since = None
        for queue in self._lanes.values():
            head = queue[0]
            at = head.last_event_at or head.started_at
            if since is None or at < since:
                since = at
        return since

    def _pop(self, queue: deque[Turn]) -> None:
        turn = queue.popleft()
        if turn.lane is not None:
            self._named_lanes -= 1
        if not queue:
            del self._lanes[turn.lane]


def error_event(body: bytes, status: int) -> bytes:
    """A relay-made error (``addon.errors.error_body``'s OpenAI shape) as a Responses WebSocket ``error`` event."""
    obj = _loads(body)
    error = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(error, dict):
        error = {"type": "server_error", "code": "relay_error", "message": body.decode("utf-8", "replace")}
    return json.dumps({"type": "error", "status": status, "error": error}).encode()


class KeptMessages:
    """Bounds what a socket keeps of its messages (mitmproxy keeps each for the socket's life): the newest
    ones within ``budget`` bytes, and always the newest (addons after the relay, mitmdump's output among them,
    read it as ``messages[-1]``)."""

    def __init__(self, budget: int, size: Callable[[Any], int] = lambda m: len(m.content)) -> None:
        self.budget = budget
        self._size = size
        self._kept = 0  # bytes of the messages in the list (the newest's included); only counted with a budget

    def added(self, messages: MutableSequence[Any]) -> None:
        """The newest message was just appended to ``messages``: drop the oldest beyond the budget."""
        if not self.budget:  # the common case: nothing shows flows, nothing is kept but the newest
            if len(messages) > 1:
                del messages[:-1]
            return  # no byte count: the budget is fixed for the socket's life
        size = self._size
        self._kept += size(messages[-1])
        drop = 0
        while self._kept > self.budget and drop < len(messages) - 1:
            self._kept -= size(messages[drop])
            drop += 1
        if drop:
            del messages[:drop]


def _loads(content: bytes | str) -> Any:
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return None

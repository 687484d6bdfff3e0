"""The turns of one Responses WebSocket (addon.metering.wsturns), as plain functions."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from addon.guard.callbody import BodyRefused, read_socket_message
from addon.metering.wsturns import KeptMessages, SocketTurns, Turn, error_event, event_type
from store.records import Usage, utcnow


def turn(invoke_id: str = "t1", at: float = 100.0, model: str | None = "gpt-5", lane: str | None = None) -> Turn:
    return Turn(invoke_id=invoke_id, occurred_at=utcnow(), started_at=at, requested_model=model, request_bytes=50,
                lane=lane)


def ev(kind: str, lane: str | None = None, **fields: object) -> bytes:
    obj: dict[str, object] = {"type": kind, **fields}
    if lane is not None:
        obj["stream_id"] = lane
    return json.dumps(obj).encode()


def completed(model: str = "gpt-5", i: int = 100, c: int = 20, o: int = 30, r: int = 5,
              kind: str = "response.completed",
              lane: str | None = None) -> bytes:
    usage = {"input_tokens": i, "input_tokens_details": {"cached_tokens": c}, "output_tokens": o,
             "output_tokens_details": {"reasoning_tokens": r}, "total_tokens": i + o}
    return ev(kind, lane, response={"id": "resp_1", "model": model, "status": "completed", "usage": usage})


def test_a_turn_is_metered_from_its_first_event_to_its_terminal_one():
    turns = SocketTurns()
    t = turn(at=100.0)
    turns.start(t)
    assert turns.server_message(ev("response.created", response={"model": "gpt-5-2025"}), 100.25) is None
    for k in range(3):
        assert turns.server_message(ev("response.output_text.delta", delta=f"d{k}"), 100.5 + k) is None
    done = turns.server_message(completed("gpt-5-2025"), 104.0)
    assert done is t and len(turns) == 0
    assert t.outcome is not None and t.outcome.status == "success" and not t.outcome.node_failure
    assert t.extractor.usage == Usage(100, 20, 0, 30, 5)
    assert t.extractor.model == "gpt-5-2025"
    assert (t.first_event_at, t.last_event_at, t.events) == (100.25, 104.0, 5)
    assert t.response_bytes > 0


def test_deltas_are_counted_by_their_head_and_never_read_further():
    turns = SocketTurns()
    turns.start(t := turn())
    # The meter ignores a delta by its name: what follows the type is not read (not even decoded).
    odd = b'{"type":"response.output_text.delta","usage":{"input_tokens":7},"error":{"message":"x"},\xff'
    assert turns.server_message(odd, 1.0) is None
    assert turns.server_message(ev("ping"), 1.5) is None
    assert (t.events, t.response_bytes, t.extractor.usage, t.extractor.error) == (2, len(odd) + len(ev("ping")),
                                                                                  None, None)
    # A type that is not first is found by parsing: the message is still metered.
    late = json.dumps({"sequence_number": 9, "type": "response.completed",
                       "response": json.loads(completed())["response"]}).encode()
    assert turns.server_message(late, 2.0) is t and t.extractor.usage == Usage(100, 20, 0, 30, 5)


@pytest.mark.parametrize("extra", [b'', b',"item":{"type":"message","content":[{"text":"an error? a response?"}]}'])
def test_events_the_meter_reads_nothing_of_are_counted_and_change_nothing(extra):
    turns = SocketTurns()
    turns.start(t := turn(model=None))
    done = b'{"type":"response.output_item.done","output_index":0' + extra + b'}'
    assert turns.server_message(done, 1.0) is None
    assert (t.events, t.response_bytes, t.extractor.model, t.extractor.error) == (1, len(done), None, None)


@pytest.mark.parametrize("error_key", [b'"error"', b'"\\u0065rror"'])
def test_a_top_level_error_in_any_event_is_read_even_spelled_with_an_escape(error_key):
    turns = SocketTurns()
    turns.start(t := turn())
    assert turns.server_message(b'{"type":"response.output_item.done",' + error_key + b':{"message":"boom"}}',
                                1.0) is None
    assert turns.server_message(completed(), 2.0) is t
    assert t.extractor.error is not None and "boom" in t.extractor.error
    assert t.outcome is not None and t.outcome.status == "failed"


def test_a_response_object_in_a_non_terminal_event_still_names_the_model():
    # Read once the turn ends (a socket closed mid-turn here): the terminal event mostly names it again.
    turns = SocketTurns()
    turns.start(t := turn(model=None))
    assert turns.server_message(ev("response.in_progress", response={"model": "gpt-5-2025"}), 1.0) is None
    assert turns.close(by_client=True, reason="gone") == [t]
    assert t.extractor.model == "gpt-5-2025"


@pytest.mark.parametrize(("last", "model"), [
    (ev("error", error={"type": "server_error", "message": "overloaded"}), "gpt-5-b"),
    (completed(model=""), "gpt-5-b"),
    (completed(model="gpt-5-c"), "gpt-5-c"),
])
def test_the_newest_event_naming_a_model_names_the_turns(last, model):
    turns = SocketTurns()
    turns.start(t := turn(model=None))
    created = {"model": "gpt-5-a", "error": None, "instructions": "be brief"}
    assert turns.server_message(ev("response.created", response=created), 1.0) is None
    assert turns.server_message(ev("response.in_progress", response={"model": "gpt-5-b", "error": None}), 1.5) is None
    assert turns.server_message(last, 2.0) is t
    assert t.extractor.model == model


def test_an_error_in_an_event_read_only_for_its_model_is_still_read():
    turns = SocketTurns()
    turns.start(t := turn())
    assert turns.server_message(ev("response.created", response={"model": "gpt-5", "error": None},
                                   error={"message": "boom"}), 1.0) is None
    assert turns.server_message(completed(), 2.0) is t
    assert t.extractor.error is not None and "boom" in t.extractor.error


@pytest.mark.parametrize(("kind", "status"), [("response.incomplete", "success"), ("response.failed", "failed")])
def test_incomplete_and_failed_end_a_turn_with_their_usage(kind, status):
    turns = SocketTurns()
    turns.start(t := turn())
    assert turns.server_message(completed(kind=kind), 1.0) is t
    assert t.outcome is not None and t.outcome.status == status
    assert t.extractor.usage is not None and t.extractor.usage.input_tokens == 100


def test_an_error_event_fails_the_turn_and_its_status_says_whose_fault():
    turns = SocketTurns()
    turns.start(t := turn())
    err = ev("error", status=400, error={"type": "invalid_request_error", "code": "bad", "message": "no"})
    assert turns.server_message(err, 1.0) is t
    assert t.outcome is not None and t.outcome.status == "failed" and not t.outcome.node_failure
    assert t.outcome.error == "bad: no"
    turns.start(t2 := turn("t2"))
    assert turns.server_message(ev("error", error={"type": "server_error", "message": "overloaded"}), 2.0) is t2
    assert t2.outcome is not None and t2.outcome.node_failure  # no status: the node's
    assert turns.server_message(completed(), 3.0) is None  # an echo after the error belongs to no turn


def test_turns_follow_one_another_and_lanes_overlap():
    turns = SocketTurns()
    turns.start(a := turn("a"))
    turns.start(b := turn("b"))  # queued behind a on the default lane
    turns.start(x := turn("x", lane="L1"))
    assert turns.server_message(ev("response.created", "L1"), 1.0) is None
    assert turns.server_message(completed(i=7, lane="L1"), 2.0) is x
    assert turns.server_message(completed(i=1), 3.0) is a
    assert turns.server_message(completed(i=2), 4.0) is b
    assert [t.extractor.usage.input_tokens for t in (a, b, x) if t.extractor.usage] == [1, 2, 7]
    assert x.first_event_at == 1.0 and a.first_event_at == 3.0


def test_a_socket_closed_mid_turn_truncates_it():
    turns = SocketTurns()
    turns.start(t := turn())
    turns.server_message(ev("response.created"), 1.0)
    ended = turns.close(by_client=False, reason="socket closed (1006)")
    assert ended == [t] and t.outcome is not None
    assert (t.outcome.status, t.outcome.node_failure) == ("truncated", True)
    turns.start(u := turn("u"))
    assert turns.close(by_client=True, reason="closed by the client")[0].outcome.node_failure is False  # type: ignore[union-attr]
    assert u.outcome is not None and u.outcome.status == "truncated"


def test_event_type_from_the_head_or_parsed():
    assert event_type(b'{"type":"response.output_text.delta","delta":"x"}') == "response.output_text.delta"
    assert event_type(b'{"sequence_number": 1, "type": "response.completed"}') == "response.completed"
    assert event_type(b"not json") is None


def test_error_event_has_the_responses_websocket_shape():
    body = json.dumps({"error": {"message": "m", "type": "rate_limit_error", "code": "budget_exceeded",
                                 "param": None}}).encode()
    obj = json.loads(error_event(body, 429))
    assert obj == {"type": "error", "status": 429, "error": {"message": "m", "type": "rate_limit_error",
                                                            "code": "budget_exceeded", "param": None}}


def test_read_socket_message():
    kind, info, lane = read_socket_message(b'{"type":"response.create","model":"gpt-5","input":"hi","stream_id":"s"}')
    assert (kind, info.model, lane) == ("response.create", "gpt-5", "s")
    with pytest.raises(BodyRefused):
        read_socket_message(b'{"type":"response.create","model":"a","model":"b"}')
    with pytest.raises(BodyRefused):
        read_socket_message(b"[1]")


@dataclass
class Msg:
    content: bytes


def test_kept_messages_keep_only_the_newest_without_a_budget():
    kept = KeptMessages(0)
    messages: list[Msg] = []
    for k in range(100):
        messages.append(Msg(b"x" * 10 + str(k).encode()))
        kept.added(messages)
        assert len(messages) == 1
    assert messages[0].content.endswith(b"99")


def test_kept_messages_stay_within_the_budget_newest_first():
    kept = KeptMessages(100)
    messages: list[Msg] = []
    for k in range(50):
        messages.append(Msg(bytes([65 + k % 26]) * 30))
        kept.added(messages)
        assert sum(len(m.content) for m in messages) <= 100
    assert len(messages) == 3 and messages[-1].content == bytes([65 + 49 % 26]) * 30
    messages.append(Msg(b"y" * 500))  # larger than the budget: still kept, alone
    kept.added(messages)
    assert messages == [Msg(b"y" * 500)]

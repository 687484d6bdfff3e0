"""SIGTERM drains: the relay stops listening at once, lets the calls in flight finish and records them, then
exits 0; a second SIGTERM, or ``codex_drain_timeout``, ends it with the calls still open recorded as aborted.

Real processes: signals, listening sockets and the exit are what is under test.
"""

from __future__ import annotations

import http.client
import signal
import threading

import pytest

from tests.support.calls import call
from tests.support.databases import rows
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.ports import accepts
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

CALLS = 3


def streams_in_flight(relay: RelayProcess, up: FakeUpstream) -> tuple[list[threading.Thread], list]:
    """CALLS streamed calls held by the upstream after their first event."""
    answers: list = []

    def client() -> None:
        try:
            answers.append(call(relay, "responses", stream=True, usage=(100, 0, 20, 0)))
        except (OSError, http.client.HTTPException) as e:  # the stream was cut
            answers.append(e)

    clients = [threading.Thread(target=client) for _ in range(CALLS)]
    for c in clients:
        c.start()
    wait_for(lambda: len(up.requests_to("/responses")) == CALLS, 30, "the calls at the upstream")
    return clients, answers


def test_sigterm_lets_calls_in_flight_finish_and_records_them(db_url):
    hold = threading.Event()
    with FakeUpstream(behaviour=Behaviour(hold=hold)) as up:
        relay = RelayProcess(db_url=db_url, options={"codex_upstream": up.base_url, "codex_upstream_key": "k",
                                                     "codex_ping_interval": "0"}).start()
        try:
            clients, answers = streams_in_flight(relay, up)
            relay.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not accepts(relay.port), 10, "the relay to stop listening")
            assert relay.proc.poll() is None  # still serving the calls in flight
            hold.set()
            for c in clients:
                c.join(30)
            assert relay.proc.wait(30) == 0, relay.output()
        finally:
            hold.set()
            relay.stop()
    assert [status for status, _ in answers] == [200] * CALLS
    assert all(b"response.completed" in body for _, body in answers)
    got = rows(db_url, "SELECT status, input_tokens, output_tokens FROM codex_invocations")
    assert [tuple(r) for r in got] == [("success", 100, 20)] * CALLS
    assert "waiting up to 30 s for 3 call(s) in flight" in relay.output()


@pytest.mark.parametrize("how", ["second SIGTERM", "codex_drain_timeout"])
def test_a_second_sigterm_or_the_drain_timeout_ends_it_and_records_the_open_calls(sqlite_url, how):
    hold = threading.Event()
    with FakeUpstream(behaviour=Behaviour(hold=hold)) as up:
        options = {"codex_upstream": up.base_url, "codex_upstream_key": "k", "codex_ping_interval": "0"}
        if how == "codex_drain_timeout":
            options["codex_drain_timeout"] = "0.5"
        relay = RelayProcess(db_url=sqlite_url, options=options).start()
        try:
            clients, answers = streams_in_flight(relay, up)
            relay.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not accepts(relay.port), 10, "the relay to stop listening")
            if how == "second SIGTERM":
                relay.proc.send_signal(signal.SIGTERM)
            assert relay.proc.wait(30) == 0, relay.output()  # the upstream still holds every stream
            for c in clients:
                c.join(30)
        finally:
            hold.set()
            relay.stop()
    got = rows(sqlite_url, "SELECT status, error_message FROM codex_invocations")
    assert [r.status for r in got] == ["aborted"] * CALLS, [tuple(r) for r in got]
    assert all("shut down" in r.error_message for r in got)
    assert len(answers) == CALLS and not any(isinstance(a, tuple) and b"response.completed" in a[1] for a in answers)


def test_while_draining_answers_close_their_connection_and_the_last_call_ends_the_wait():
    from mitmproxy.test import taddons, tflow

    from addon.drain import Drain

    drain = Drain()
    with taddons.context(drain):
        calls = [tflow.tflow(resp=True) for _ in range(2)]
        for f in calls:
            drain.requestheaders(f)
        drain.responseheaders(calls[0])
        assert "connection" not in calls[0].response.headers  # not draining: keep-alive as usual
        drain.draining = True
        drain.responseheaders(calls[1])
        assert calls[1].response.headers["connection"] == "close"
        assert drain.in_flight == 2
        drain.response(calls[0])
        assert drain.in_flight == 1
        drain.error(calls[1])
        assert drain.in_flight == 0


def test_a_connection_accepted_before_sigterm_gets_its_answer(sqlite_url):
    """A balancer connects, then sends its request; a SIGTERM in between used to end a relay with no call in
    flight at once, closing that connection unanswered (HAProxy's 502 in a rolling restart)."""
    with FakeUpstream() as up:
        relay = RelayProcess(db_url=sqlite_url, options={"codex_upstream": up.base_url, "codex_upstream_key": "k",
                                                         "codex_ping_interval": "0"}).start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
            conn.connect()
            wait_for(lambda: "client connect" in relay.output(), 10, "the relay to accept the connection")
            relay.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not accepts(relay.port), 10, "the relay to stop listening")
            body = b'{"model": "gpt-5-codex", "input": "hi"}'
            conn.request("POST", "/v1/responses", body, {"content-type": "application/json"})
            resp = conn.getresponse()
            assert (resp.status, resp.getheader("connection")) == (200, "close"), resp.read()[:300]
            assert resp.read() and len(up.requests_to("/responses")) == 1  # answered whole, by the node
            conn.close()
            assert relay.proc.wait(30) == 0, relay.output()
        finally:
            relay.stop()
    assert len(rows(sqlite_url, "SELECT id FROM codex_invocations")) == 1

"""Limits clients can see (issue 29 item 2): OpenAI's x-ratelimit-* headers on every answer to a key with limits,
and ``GET /v1/key`` answering a key its limits, use and resets."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest
import sqlalchemy as sa
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from addon.auth import ClientAuth
from addon.guard.secrets import digest
from addon.keyinfo import KeyInfo
from addon.limits import Limits, Window, duration_text, ratelimit_headers
from addon.nodes.routing import Node, NodePool
from addon.services.runtime import Runtime
from store.key_usage import Admission, Budgets, admit
from store.keys import KeySpec
from store.records import InvocationRecord, NodeConfig, Usage
from store.write.batch import apply_batch
from tests.support.databases import fresh_engine
from tests.support.fakeupstream import responses_events, responses_json
from tests.support.relayharness import RelayHarness, in_loop, node
from tests.support.runtimes import built

NOW = dt.datetime(2026, 11, 25, 23, 0, 0)  # one hour before the UTC day's budgets reset
ALICE_KEY, BOB_KEY = "ck-alice-0123456789", "ck-bob-9876543210"
SSE = {"content-type": "text/event-stream"}
# What an OpenAI node says of its own account: never shown as a key's.
NODES_OWN = {"x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999",
             "x-ratelimit-reset-tokens": "6ms"}


def limits_of(response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")}


def seconds(text: str) -> float:
    """A duration as the headers write it, back in seconds."""
    if text.endswith("ms"):
        return int(text[:-2]) / 1000
    total, number = 0, ""
    for c in text:
        if c.isdigit():
            number += c
        else:
            total, number = total + int(number) * {"h": 3600, "m": 60, "s": 1}[c], ""
    return total


@pytest.mark.parametrize(("wait", "text"), [(0, "0s"), (0.2501, "251ms"), (1, "1s"), (59.2, "1m0s"),
                                            (360, "6m0s"), (3 * 3600 + 2 * 60 + 1, "3h2m1s")])
def test_a_reset_is_written_as_openai_writes_it_rounded_up(wait, text):
    assert duration_text(wait) == text and seconds(text) >= wait


def test_the_requests_headers_show_the_limit_that_binds_first():
    rpm, daily = Window("rpm", 60, 10, 30.0), Window("daily_requests", 500, 495, 3600.0)
    assert ratelimit_headers([rpm, daily]) == {
        "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "5",
        "x-ratelimit-reset-requests": "1h0m0s"}
    # Both used up: the call waits for the one that lasts longer.
    assert ratelimit_headers([Window("rpm", 60, 60, 30.0), Window("daily_requests", 500, 500, 3600.0)])[
        "x-ratelimit-reset-requests"] == "1h0m0s"
    assert ratelimit_headers([Window("daily_tokens", 1000, 1500, 10.0)]) == {
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "10s"}


@pytest.fixture
def engine(db_url):
    with fresh_engine(db_url) as eng:
        yield eng


def used(key: str, at: dt.datetime, tokens: int, cost: float, invoke_id: str) -> InvocationRecord:
    return InvocationRecord(invoke_id=invoke_id, occurred_at=at, source="relay", endpoint="/v1/responses",
                            status="success", node_id="a", model="gpt-5", client_key=key,
                            usage=Usage(input_tokens=tokens - 10, output_tokens=10), cost=cost)


@in_loop
async def test_streamed_json_and_refused_answers_carry_the_keys_limits(listening, engine):
    t = [1000.0]
    alice = KeySpec("alice", b"x" * 32, rpm=3, daily_requests=2, daily_tokens=1000)
    async with RelayHarness(node("a", listening()), keys=[alice], clock=lambda: t[0], now=lambda: NOW) as h:
        h.runtime.engine = engine
        streamed = await h.send(body={"model": "gpt-5", "stream": True, "input": "hi"}, client_key="alice")
        await h.answer(streamed, 200, responses_events("gpt-5", (10, 0, 5, 0), 2), headers=SSE | NODES_OWN)
        # Set before the stream's first byte (responseheaders); the node's own are gone. One of 2 daily requests
        # left binds before 2 of 3 per minute; tokens as of the call's admission.
        assert limits_of(streamed.response) == {
            "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1",
            "x-ratelimit-reset-requests": "1h0m0s", "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "1h0m0s"}
        with engine.begin() as conn:  # the first call's usage, as the writer stores it
            apply_batch(conn, [used("alice", NOW, 600, 0.5, "u1")])
        t[0] += 10
        whole = await h.send(body={"model": "gpt-5", "input": "hi"}, client_key="alice")
        await h.answer(whole, 200, [json.dumps(responses_json("gpt-5", (10, 0, 5, 0))).encode()],
                       headers={"content-type": "application/json"}, length=True)
        assert limits_of(whole.response) == {
            "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1h0m0s", "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "400", "x-ratelimit-reset-tokens": "1h0m0s"}
        refused = await h.send(body={"model": "gpt-5", "input": "hi"}, client_key="alice")
        assert (refused.response.status_code, json.loads(refused.response.content)["error"]["code"]) == (
            429, "budget_exceeded")
        assert limits_of(refused.response) == limits_of(whole.response)


@in_loop
async def test_an_rpm_refusal_says_when_the_minute_is_whole_again(listening):
    t = [1000.0]
    async with RelayHarness(node("a", listening()), keys=[KeySpec("bob", b"y" * 32, rpm=2)], clock=lambda: t[0]) as h:
        first = await h.send(body={"model": "gpt-5", "input": "hi"}, client_key="bob")
        await h.answer(first, 200, [b"{}"], headers={"content-type": "application/json"}, length=True)
        assert limits_of(first.response) == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1",
                                             "x-ratelimit-reset-requests": "1m0s"}
        t[0] += 15
        await h.send(body={"model": "gpt-5", "input": "hi"}, client_key="bob")
        t[0] += 5
        refused = await h.send(body={"model": "gpt-5", "input": "hi"}, client_key="bob")
        assert (refused.response.status_code, refused.response.headers["retry-after"]) == (429, "40")
        # retry-after: until one call leaves the minute; the reset: until the newest has (OpenAI's "initial state").
        assert limits_of(refused.response) == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0",
                                               "x-ratelimit-reset-requests": "55s"}
        # A key without the limits the headers describe gets none, and a node's own headers pass as before.
        h.runtime.keys.apply([KeySpec("carol", b"z" * 32, concurrency=2)])
        other = await h.send(body={"model": "gpt-5", "input": "hi"}, client_key="carol")
        await h.answer(other, 200, [b"{}"], headers={"content-type": "application/json"} | NODES_OWN, length=True)
        assert limits_of(other.response) == NODES_OWN


def runtime_with_keys(engine) -> Runtime:
    runtime = Runtime()
    runtime.fleet.pool = NodePool([Node(NodeConfig(id="a", base_url="http://127.0.0.1:9/a"))])
    runtime.db.engine = engine
    runtime.keys.apply([KeySpec("alice", digest(ALICE_KEY), daily_requests=5, monthly_cost=10.0, rpm=60,
                                concurrency=2),
                        KeySpec("bob", digest(BOB_KEY))])
    return built(runtime)


def ask_key(runtime: Runtime, info: KeyInfo, headers: dict[str, str], method: str = "GET") -> tuple[int, dict]:
    """``GET /v1/key`` on the relay's port through client auth and the endpoint, as mitmproxy runs them."""
    f = tflow.tflow()
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9")
    f.request.method, f.request.path, f.request.content = method, "/v1/key", b""
    f.request.headers.clear()
    f.request.headers.update(headers)
    ClientAuth(keys=runtime.keys).requestheaders(f)
    asyncio.run(info.request(f))
    assert f.response is not None  # answered here: never routed to a node
    return f.response.status_code, json.loads(f.response.content)


def test_get_v1_key_answers_a_key_its_limits_use_and_resets(engine):
    runtime = runtime_with_keys(engine)
    t = [980.0]  # the call is admitted 20 s before NOW
    # rpm and concurrency are the fleet's (client_key_calls), on the wall clock: both clocks move together.
    limits = Limits(runtime, clock=lambda: t[0], now=lambda: NOW + dt.timedelta(seconds=t[0] - 1000))
    info = KeyInfo(runtime, limits, now=lambda: NOW)
    call = tflow.tflow()
    call.request.path = "/v1/responses"
    call.metadata["codex_client_key"] = "alice"
    assert asyncio.run(limits.admit(call, "gpt-5")) is None  # in flight, admitted once
    with engine.begin() as conn:
        apply_batch(conn, [used("alice", NOW - dt.timedelta(days=3), 100, 2.0, "p0"),
                           used("alice", NOW - dt.timedelta(hours=1), 50, 1.25, "p1")])
    t[0] += 20
    with taddons.context(info):
        status, answer = ask_key(runtime, info, {"authorization": f"Bearer {ALICE_KEY}"})
        assert status == 200
        assert answer == {
            "name": "alice", "day": "2026-11-25",
            "usage": {"requests": 1, "input_tokens": 40, "cached_tokens": 0, "output_tokens": 10,
                      "total_tokens": 50, "cost": 1.25, "month_cost": 3.25, "refused": 0},
            "limits": {
                "daily_requests": {"limit": 5, "used": 1, "remaining": 4, "resets_at": "2026-11-26T00:00:00Z",
                                   "resets_in": "1h0m0s"},
                "monthly_cost": {"limit": 10.0, "used": 3.25, "remaining": 6.75, "resets_at": "2026-12-01T00:00:00Z",
                                 "resets_in": "121h0m0s"},
                "rpm": {"limit": 60, "used": 1, "remaining": 59, "resets_at": "2026-11-25T23:00:40Z",
                        "resets_in": "40s"},
                "concurrency": {"limit": 2, "used": 1, "remaining": 1, "resets_at": None, "resets_in": None}},
            "expires_at": None, "warn_at": None}
        # Anthropic clients send their key as x-api-key: the same answer. A key without limits: its name and use.
        assert ask_key(runtime, info, {"x-api-key": ALICE_KEY})[1] == answer
        assert ask_key(runtime, info, {"x-api-key": BOB_KEY}) == (200, {
            "name": "bob", "day": "2026-11-25", "limits": {}, "expires_at": None, "warn_at": None,
            "usage": {"requests": 0, "input_tokens": 0, "cached_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                      "cost": 0, "month_cost": 0.0, "refused": 0}})
        # A wrong or missing key: client auth's 401 in OpenAI's shape; a method other than GET: 405.
        status, body = ask_key(runtime, info, {"authorization": "Bearer ck-nobody-000000"})
        assert (status, body["error"]["code"], body["error"]["type"]) == (401, "invalid_api_key",
                                                                          "invalid_request_error")
        assert ask_key(runtime, info, {})[1]["error"]["code"] == "invalid_api_key"
        assert ask_key(runtime, info, {"x-api-key": BOB_KEY}, method="POST")[0] == 405
        # Without a stats database the use is not known: null, rpm and concurrency as this relay counts them.
        runtime.db.engine = None
        status, answer = ask_key(runtime, info, {"x-api-key": ALICE_KEY})
        assert answer["usage"] is None and answer["limits"]["daily_requests"]["used"] is None
        assert answer["limits"]["rpm"]["used"] == 1


def test_get_v1_key_on_a_relay_without_client_keys_is_answered_there():
    runtime = Runtime()
    info = KeyInfo(runtime, Limits(runtime))
    with taddons.context(info):
        status, body = ask_key(runtime, info, {"authorization": "Bearer anything"})
    assert (status, body["error"]["code"]) == (404, "no_client_keys")


def test_the_admission_returns_the_days_figures_without_a_statement_more(engine):
    """The headers' daily figures come from the admission's own reads: the day's row is read once (and written
    only where it is missing), so a key with every budget costs three statements a call (four before: the row was
    upserted every call)."""
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    day = NOW.date()
    budgets = Budgets(daily_requests=3, daily_tokens=1000, monthly_cost=5.0)
    with engine.begin() as conn:
        apply_batch(conn, [used("alice", NOW, 600, 0.5, "u1")])
    with engine.begin() as conn:
        first = admit(conn, "alice", day, budgets)
    statements.clear()
    with engine.begin() as conn:
        second = admit(conn, "alice", day, budgets)
    assert len([s for s in statements if s.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT"))]) == 3
    with engine.begin() as conn:
        admit(conn, "alice", day, budgets)
        fourth = admit(conn, "alice", day, budgets)
    assert (first, second, fourth) == (Admission(None, 1, 600, 0.5), Admission(None, 2, 600, 0.5),
                                       Admission("daily_requests", 3, 600, 0.5))

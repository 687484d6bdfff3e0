"""Plan-shaped budgets, expiry and warnings (issue 29 item 3) and fleet-wide rpm and concurrency (item 4), on
SQLite and MariaDB, with fixed clocks instead of waiting for windows."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from mitmproxy.test import taddons, tflow

from addon.errors import CLIENT_KEY_NAME
from addon.limits import Limits
from addon.nodes.routing import Node, NodePool
from addon.observe.alerts import Alerts
from addon.services.runtime import Runtime
from store import keycalls
from store.budgets import admit_key, read_use, window_start
from store.cli.keys import main as keys_main
from store.cli.stats import main as stats_main
from store.keyrows import describe, load_keys
from store.keys import Budget, KeySpec, parse_keys_toml
from store.records import InvocationRecord, KeyCount, NodeConfig, Usage
from store.schema import client_key_calls, client_key_usage
from store.write.batch import apply_batch
from tests.support.databases import at_head, fresh_engine
from tests.support.runtimes import built
from tests.support.wsenv import Env, completed, node

TUESDAY = dt.datetime(2026, 11, 24, 12, 0)  # ISO week 48: Monday 2026-11-23


@pytest.fixture
def engine(db_url):
    with fresh_engine(db_url) as eng:
        yield eng


def runtime_on(engine: sa.Engine | None, *specs: KeySpec) -> Runtime:
    """A relay's services on ``engine``: one node, the keys ``specs``; records are kept in ``submitted``."""
    runtime = Runtime()
    runtime.fleet.pool = NodePool([Node(NodeConfig(id="alpha", base_url="http://127.0.0.1:9/alpha"))])
    runtime.db.engine = engine
    runtime.submitted = []  # type: ignore[attr-defined]
    runtime.db.submit = runtime.submitted.append  # type: ignore[attr-defined]
    runtime.keys.apply(specs)
    return built(runtime)


def flow_of(key: str, path: str = "/v1/responses"):
    f = tflow.tflow()
    f.request.path = path
    f.metadata[CLIENT_KEY_NAME] = key
    return f


def call(invoke_id: str, key: str, at: dt.datetime, model: str, tokens: int, cost: float) -> InvocationRecord:
    return InvocationRecord(invoke_id=invoke_id, occurred_at=at, source="relay", endpoint="/v1/messages",
                            status="success", node_id="alpha", model=model, requested_model=model, client_key=key,
                            usage=Usage(input_tokens=tokens - 10, output_tokens=10), cost=cost)


def code_of(response) -> tuple[int, str]:
    return response.status_code, json.loads(response.content)["error"]["code"]


# -- the keys file, the CLI, the admin API's rows ------------------------------------------------------------

KEYS_TOML = """
[[keys]]
name = "alice"
key = "ck-alice-0123456789"
daily_requests = 500
expires_at = 2027-01-31T00:00:00Z
warn_at = 0.8

[[keys.budgets]]
window = "5h"
requests = 200

[[keys.budgets]]
window = "weekly"
cost = 20
models = ["claude-opus-*"]
"""


def test_keys_file_gives_budgets_expiry_and_warning_beside_the_shorthands():
    (alice,) = parse_keys_toml(KEYS_TOML)
    assert alice.budgets == (Budget("5h", "requests", 200), Budget("weekly", "cost", 20.0, ("claude-opus-*",)))
    assert (alice.daily_requests, alice.expires_at, alice.warn_at) == (500, dt.datetime(2027, 1, 31), 0.8)
    assert [b.name for b in alice.budgets] == ["5h_requests", "weekly_cost[claude-opus-*]"]


@pytest.mark.parametrize(("budget", "message"), [
    ('window = "fortnight"\nrequests = 1', "budget 1: window must be one of 5h, daily, weekly, monthly, total"),
    ('window = "daily"\nrequests = 1\ntokens = 2', "budget 1: give exactly one of requests, tokens, cost"),
    ('window = "daily"\ntokens = 1.5', "budget 1: tokens must be an integer >= 0"),
    ('window = "daily"\ncost = 1\nmodels = []', "budget 1: models must be a non-empty list"),
])
def test_a_bad_budget_is_named_with_its_key(budget, message):
    with pytest.raises(ValueError, match=rf"entry 1 \('a'\): {message}"):
        parse_keys_toml(f'[[keys]]\nname = "a"\nkey = "k-1234567890"\n[[keys.budgets]]\n{budget}')


def test_run_sh_keys_sets_budgets_expiry_and_warning(db_url, capsys):
    url = at_head(db_url)
    assert keys_main(["--db", url, "add", "dana", "--budget", "5h:requests=100", "--budget",
                      "weekly:cost=20:claude-opus-*,o3", "--expires-at", "2027-01-31T00:00:00Z",
                      "--warn-at", "0.8"]) == 0
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            (dana,) = [describe(r) for r in load_keys(conn)]
        assert dana["budgets"] == [{"window": "5h", "requests": 100},
                                   {"window": "weekly", "cost": 20.0, "models": ["claude-opus-*", "o3"]}]
        assert (dana["expires_at"], dana["warn_at"]) == ("2027-01-31T00:00:00Z", 0.8)
        assert keys_main(["--db", url, "list"]) == 0
        assert "budgets=5h:requests=100,weekly:cost=20.0:claude-opus-* o3" in capsys.readouterr().out
        assert stats_main(["keys", "--db", url, "--json"]) == 0  # no --keys: the keys in the database
        (row,) = json.loads(capsys.readouterr().out)
        assert (row["client_key"], sorted(row["limits"])) == ("dana", ["5h_requests", "weekly_cost[claude-opus-*,o3]"])
        assert keys_main(["--db", url, "set", "dana", "--budget", "none", "--expires-at", "none"]) == 0
        with engine.connect() as conn:
            (dana,) = [describe(r) for r in load_keys(conn)]
        assert (dana["budgets"], dana["expires_at"], dana["warn_at"]) == ([], None, 0.8)
    finally:
        engine.dispose()
    with pytest.raises(SystemExit):
        keys_main(["--db", url, "add", "erin", "--budget", "weekly:cost"])


# -- windows --------------------------------------------------------------------------------------------------

def test_windows_start_at_utc_boundaries_and_the_week_on_monday():
    assert window_start("daily", TUESDAY) == dt.datetime(2026, 11, 24)
    assert window_start("weekly", TUESDAY) == dt.datetime(2026, 11, 23)  # ISO: Monday 00:00 UTC
    assert window_start("weekly", dt.datetime(2026, 11, 23)) == dt.datetime(2026, 11, 23)
    assert window_start("monthly", TUESDAY) == dt.datetime(2026, 11, 1)
    assert window_start("5h", dt.datetime(2026, 11, 24, 12, 0, 30)) == dt.datetime(2026, 11, 24, 7, 1)
    assert window_start("total", TUESDAY) is None


# -- request budgets: exact across relays -----------------------------------------------------------------------

def test_a_5h_request_budget_is_exact_across_relays_and_rolls(engine):
    """Four 'relays' (threads, each its own connection) admit 20 calls against a 5h budget of 7: exactly 7;
    the window rolls per minute: the calls leave it 5 h after their minute."""
    spec = KeySpec("alice", b"x" * 32, budgets=(Budget("5h", "requests", 7),))
    admitted = []

    def relay() -> None:
        for _ in range(5):
            with engine.begin() as conn:
                admitted.append(admit_key(conn, spec, TUESDAY, "gpt-5", None).over is None)

    with ThreadPoolExecutor(4) as pool:  # a worker's error is raised here, not lost with its thread
        list(pool.map(lambda _: relay(), range(4)))
    assert admitted.count(True) == 7 and len(admitted) == 20
    with engine.begin() as conn:
        over = admit_key(conn, spec, TUESDAY + dt.timedelta(hours=4, minutes=59), "gpt-5", None).over
        assert over is not None and over.resets_at == TUESDAY + dt.timedelta(hours=5)  # type: ignore[union-attr]
        assert admit_key(conn, spec, TUESDAY + dt.timedelta(hours=5), "gpt-5", None).over is None


# -- token and cost budgets, per model ---------------------------------------------------------------------------

def test_a_weekly_cost_cap_on_opus_refuses_only_opus_until_monday(engine):
    spec = KeySpec("alice", b"x" * 32, budgets=(Budget("weekly", "cost", 20.0, ("claude-opus-*",)),
                                                Budget("daily", "tokens", 100_000)))
    with engine.begin() as conn:
        apply_batch(conn, [call("o1", "alice", dt.datetime(2026, 11, 22, 23), "claude-opus-4-1", 500, 50.0),  # Sunday
                           call("o2", "alice", dt.datetime(2026, 11, 23, 9), "claude-opus-4-1", 500, 15.0),
                           call("s1", "alice", dt.datetime(2026, 11, 24, 9), "claude-sonnet-4-5", 900, 30.0),
                           call("o3", "alice", dt.datetime(2026, 11, 24, 10), "claude-opus-4-1", 400, 6.0)])
        uses = {u.budget.name: u for u in read_use(conn, "alice", spec.budgets or (), TUESDAY)}
    assert uses["weekly_cost[claude-opus-*]"].used == pytest.approx(21.0)  # last week's 50 and sonnet's 30: not
    assert uses["daily_tokens"].used == 1300
    runtime = runtime_on(engine, spec)
    limits = Limits(runtime, now=lambda: TUESDAY)
    opus = asyncio.run(limits.admit(flow_of("alice"), "claude-opus-4-1"))
    assert code_of(opus) == (429, "budget_exceeded")
    body = json.loads(opus.content)["error"]
    assert "weekly_cost[claude-opus-*] limit (20 USD)" in body["message"] and "2026-11-30T00:00:00Z" in body["message"]
    assert asyncio.run(limits.admit(flow_of("alice", "/v1/messages"), "claude-sonnet-4-5")) is None
    assert KeyCount("alice", TUESDAY.date(), "refused_budget") in runtime.submitted  # type: ignore[attr-defined]
    monday = Limits(runtime, now=lambda: dt.datetime(2026, 11, 30, 0, 0, 1))
    assert asyncio.run(monday.admit(flow_of("alice", "/v1/messages"), "claude-opus-4-1")) is None


def test_budgets_show_in_headers_and_metrics_as_the_admission_read_them(engine):
    spec = KeySpec("alice", b"x" * 32, budgets=(Budget("5h", "requests", 3), Budget("daily", "tokens", 1000),
                                                Budget("total", "cost", 9.0)))
    with engine.begin() as conn:
        apply_batch(conn, [call("a1", "alice", TUESDAY - dt.timedelta(hours=1), "gpt-5", 400, 2.5)])
    limits = Limits(runtime_on(engine, spec), now=lambda: TUESDAY)
    f = flow_of("alice")
    assert asyncio.run(limits.admit(f, "gpt-5")) is None
    f.response = tflow.tresp()
    limits.show(f)
    h = f.response.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"], h["x-ratelimit-reset-requests"]) == (
        "3", "2", "5h0m0s")  # this call leaves the 5-hour window 5 h after its minute
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"], h["x-ratelimit-reset-tokens"]) == (
        "1000", "600", "12h0m0s")
    assert {(b.limit, b.value, b.used) for b in limits.budgets()} == {
        ("5h_requests", 3, 1), ("daily_tokens", 1000, 400), ("total_cost", 9.0, 2.5)}


def test_stats_keys_shows_each_budgets_use_and_reset(engine, capsys, tmp_path):
    with engine.begin() as conn:
        apply_batch(conn, [call("o1", "alice", dt.datetime(2026, 11, 23, 9), "claude-opus-4-1", 500, 7.5),
                           call("s1", "alice", dt.datetime(2026, 11, 24, 9), "claude-sonnet-4-5", 900, 3.0)])
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "alice"\nkey = "ck-alice-0123456789"\n[[keys.budgets]]\nwindow = "weekly"\n'
                    'cost = 20\nmodels = ["claude-opus-*"]\n[[keys.budgets]]\nwindow = "total"\ntokens = 5000\n')
    url = engine.url.render_as_string(hide_password=False)
    assert stats_main(["keys", "--db", url, "--until", "2026-11-24", "--keys", str(keys), "--json"]) == 0
    (alice,) = json.loads(capsys.readouterr().out)
    assert alice["limits"] == {
        "weekly_cost[claude-opus-*]": {"limit": 20.0, "used": 7.5, "resets_at": "2026-11-30T00:00:00Z"},
        "total_tokens": {"limit": 5000, "used": 1400, "resets_at": None}}
    assert stats_main(["keys", "--db", url, "--until", "2026-11-24", "--keys", str(keys)]) == 0
    assert "weekly_cost[claude-opus-*] 7.50/20.00 (2026-11-30T00:00); total_tokens 1400/5000" in capsys.readouterr().out


# -- expiry and the warning --------------------------------------------------------------------------------------

def test_an_expired_key_is_refused_in_the_clients_shape_and_counted():
    spec = KeySpec("alice", b"x" * 32, expires_at=dt.datetime(2026, 11, 24, 12))
    runtime = runtime_on(None, spec)
    before = Limits(runtime, now=lambda: dt.datetime(2026, 11, 24, 11, 59, 59))
    assert asyncio.run(before.admit(flow_of("alice"), "gpt-5")) is None
    limits = Limits(runtime, now=lambda: TUESDAY)
    openai = asyncio.run(limits.admit(flow_of("alice"), "gpt-5"))
    anthropic = asyncio.run(limits.admit(flow_of("alice", "/v1/messages"), "claude-sonnet-4-5"))
    assert code_of(openai) == (400, "key_expired") and openai.headers["x-should-retry"] == "false"
    assert "expired at 2026-11-24T12:00:00Z" in json.loads(openai.content)["error"]["message"]
    assert json.loads(anthropic.content)["error"]["type"] == "invalid_request_error"
    assert runtime.submitted.count(KeyCount("alice", TUESDAY.date(), "refused_expired")) == 2  # type: ignore


def test_the_warning_is_raised_when_a_budget_reaches_warn_at(engine):
    spec = KeySpec("alice", b"x" * 32, warn_at=0.5, budgets=(Budget("daily", "requests", 4),
                                                             Budget("daily", "requests", 1, ("o3",))))
    runtime = runtime_on(engine, spec)
    alerts: list[tuple] = []
    runtime.alerts.notify = lambda *event: alerts.append(event)  # type: ignore[method-assign]
    limits = Limits(runtime, now=lambda: TUESDAY)
    assert asyncio.run(limits.admit(flow_of("alice"), "gpt-5")) is None
    assert alerts == []  # 1 of 4
    assert asyncio.run(limits.admit(flow_of("alice"), "gpt-5")) is None
    assert alerts == [("key_budget_warning", "alice daily_requests",
                       "client key alice used 2 of its daily_requests limit (4, warning at 50%)",
                       TUESDAY.date().toordinal())]  # once per window: the claim's version is the UTC day


def test_a_warning_is_sent_once_per_window_by_the_fleet(engine):
    sent: list[tuple[str, str, str]] = []

    def relay(name: str) -> Alerts:
        alerts = Alerts([], lambda: NodePool([]), lambda: None, engine=engine, relay=name, dedup=0)
        alerts._emit = lambda *event: sent.append((name, *event[:2]))  # type: ignore[method-assign]
        return alerts

    relays = [relay("r1"), relay("r2")]
    for window in (740_000, 740_000, 740_001):
        for r in relays:
            r.notify("key_budget_warning", "alice daily_requests", "used 2 of 4", window)
            r.check()
    assert [s[1:] for s in sent] == [("key_budget_warning", "alice daily_requests")] * 2  # one per window


# -- fleet-wide rpm and concurrency --------------------------------------------------------------------------------

def two_relays(engine: sa.Engine, spec: KeySpec, now) -> list[Limits]:
    return [Limits(runtime_on(engine, spec), now=now) for _ in range(2)]


def test_concurrency_holds_across_two_relays(engine):
    """Calls spread over two relays on one database: never more than 2 in flight fleet-wide."""
    spec = KeySpec("alice", b"x" * 32, concurrency=2)
    relays = two_relays(engine, spec, lambda: TUESDAY)
    in_flight, peak, outcomes = [0], [0], []

    async def client(limits: Limits) -> None:
        for _ in range(4):
            f = flow_of("alice")
            refusal = await limits.admit(f, "gpt-5")
            outcomes.append(refusal is None)
            if refusal is None:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
                await asyncio.sleep(0.005)  # the call runs
                in_flight[0] -= 1
                limits.release(f)
            else:
                assert code_of(refusal) == (429, "concurrency_limited")

    async def run() -> None:
        await asyncio.gather(*(client(relays[i % 2]) for i in range(6)))

    asyncio.run(run())
    assert peak[0] == 2 and outcomes.count(True) >= 2 and outcomes.count(False) >= 1


def test_rpm_holds_across_two_relays_within_the_minute(engine):
    t = [TUESDAY]
    spec = KeySpec("alice", b"x" * 32, rpm=5)
    relays = two_relays(engine, spec, lambda: t[0])

    async def ask(limits: Limits):
        f = flow_of("alice")
        refusal = await limits.admit(f, "gpt-5")
        limits.release(f)
        return refusal

    async def burst() -> list:
        answers = []
        for i in range(8):
            answers.append(await ask(relays[i % 2]))
            t[0] += dt.timedelta(seconds=1)
        return answers

    answers = asyncio.run(burst())
    assert [a is None for a in answers] == [True] * 5 + [False] * 3
    assert code_of(answers[5]) == (429, "rate_limited") and answers[5].headers["retry-after"] == "55"
    t[0] = TUESDAY + dt.timedelta(seconds=60)  # the first call leaves the minute
    assert asyncio.run(ask(relays[1])) is None
    assert asyncio.run(ask(relays[0])) is not None


def test_a_crashed_relays_slots_free_after_the_lease_and_a_live_one_keeps_them(engine):
    t = [TUESDAY]
    spec = KeySpec("alice", b"x" * 32, concurrency=1)
    crashed, alive, other = (Limits(runtime_on(engine, spec), now=lambda: t[0]) for _ in range(3))
    assert asyncio.run(crashed.admit(flow_of("alice"), "gpt-5")) is None  # never released
    assert code_of(asyncio.run(other.admit(flow_of("alice"), "gpt-5"))) == (429, "concurrency_limited")
    t[0] += dt.timedelta(seconds=keycalls.LEASE_S + 1)
    f = flow_of("alice")
    assert asyncio.run(alive.admit(f, "gpt-5")) is None  # the crashed relay's lease ran out
    t[0] += dt.timedelta(seconds=keycalls.LEASE_S - 5)
    alive._lease_round(engine)  # the live relay keeps its call's lease while it runs
    t[0] += dt.timedelta(seconds=10)
    assert code_of(asyncio.run(other.admit(flow_of("alice"), "gpt-5"))) == (429, "concurrency_limited")
    alive.release(f)
    assert asyncio.run(other.admit(flow_of("alice"), "gpt-5")) is None
    keycalls.tidy(engine, t[0])  # a relay's round: the rows out of both counts go, the running call's stays
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(client_key_calls)).scalar() == 1


def test_a_key_without_budgets_or_fleet_limits_pays_no_statement(engine):
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    limits = Limits(runtime_on(engine, KeySpec("bob", b"y" * 32, models=("gpt-5*",))))
    assert asyncio.run(limits.admit(flow_of("bob"), "gpt-5")) is None
    assert statements == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(client_key_usage)).scalar() == 0


def test_websocket_turns_hold_fleet_slots_turn_by_turn(engine):
    """A Responses WebSocket admits each turn (``Limits.admit`` with the turn as holder): with concurrency = 1
    fleet-wide, a turn on another socket waits for the running turn to end."""
    spec = KeySpec("alice", b"x" * 32, concurrency=1)
    env = Env(node(), keys=[spec])
    env.runtime.engine = engine
    with taddons.context(env.relay, env.limits):
        first, second = env.open(key="alice"), env.open(key="alice")
        assert not env.client(first, {"type": "response.create", "model": "gpt-5"}, 1.0).dropped
        assert env.client(second, {"type": "response.create", "model": "gpt-5"}, 1.5).dropped
        assert json.loads(env.injected[-1])["error"]["code"] == "concurrency_limited"
        env.server(first, completed("gpt-5", 10, 0, 1, 0), 2.0)  # the turn ended: its slot is free
        assert not env.client(second, {"type": "response.create", "model": "gpt-5"}, 2.5).dropped
    with engine.connect() as conn:
        leases = conn.execute(sa.select(client_key_calls.c.lease_until)).scalars().all()
    assert sorted(lease is None for lease in leases) == [False, True]  # one ended, one running

"""Teams (issue 13): client keys with nodes, models, rate limits and budgets, counted per key and day."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import sqlalchemy as sa
from mitmproxy import exceptions
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow
from prometheus_client.parser import text_string_to_metric_families

from addon.admin import Admin
from addon.auth import ClientAuth
from addon.errors import CLIENT_KEY_NAME
from addon.guard.secrets import digest
from addon.limits import DB_RETRY_S, Limits
from addon.nodes.routing import Node, NodePool
from addon.serviceoptions import ClientKeyOptions, LimitOptions
from addon.services.runtime import Runtime
from addon.userstats import UserStats
from store.cli.stats import main as stats_main
from store.engine import make_engine
from store.key_usage import Budgets, admit
from store.keys import KeySpec
from store.records import InvocationRecord, KeyCount, NodeConfig, Usage, utcnow
from store.schema import client_key_usage, codex_invocations
from store.sources import crs
from store.write.batch import apply_batch
from store.write.journal import Spool
from store.write.writer import Writer
from tests.support.admin import ask
from tests.support.databases import fresh_engine
from tests.support.runtimes import built
from tests.support.waiting import wait_for

KEYS_TOML = """
# the team's keys
[[keys]]
name = "alice"
key = "ck-alice-0123456789"
nodes = ["alpha"]
models = ["gpt-5*"]
daily_requests = 500
daily_tokens = 2_000_000
monthly_cost = 50.0
rpm = 60
concurrency = 4

[[keys]]
name = "bob"
key_sha256 = "{bob_sha}"
"""
BOB_KEY = "ck-bob-9876543210"
ALICE_KEY = "ck-alice-0123456789"


def runtime_with(*node_ids: str, engine: sa.Engine | None = None, writer: Writer | None = None) -> Runtime:
    """A runtime routing over ``node_ids``; its records go to ``writer`` (and its database is the writer's)."""
    runtime = Runtime()
    runtime.fleet.pool = NodePool([Node(NodeConfig(id=i, base_url=f"http://127.0.0.1:9/{i}")) for i in node_ids])
    runtime.db.engine = writer.engine if writer is not None else engine
    if writer is not None:
        runtime.db.submit = writer.submit
    return built(runtime)


def write_keys(tmp_path, text: str) -> str:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return f"@{path}"


def test_toml_keys_file_gives_names_limits_and_keys_by_hash(tmp_path):
    runtime = runtime_with("alpha", "beta")
    keys = ClientKeyOptions(runtime)
    auth = ClientAuth(keys=runtime.keys)
    spec = write_keys(tmp_path, KEYS_TOML.format(bob_sha=hashlib.sha256(BOB_KEY.encode()).hexdigest()))
    with taddons.context(keys) as tctx:
        tctx.configure(keys, codex_client_keys=spec)
        f = tflow.tflow()
        f.request.headers["authorization"] = f"Bearer {BOB_KEY}"
        assert auth.identify(f.request.headers) == "bob"
        f.request.headers["authorization"] = "Bearer ck-alice-0123456789"
        assert auth.identify(f.request.headers) == "alice"
    alice = runtime.keys.specs["alice"]
    assert (alice.nodes, alice.models, alice.daily_requests, alice.daily_tokens, alice.monthly_cost, alice.rpm,
            alice.concurrency) == (("alpha",), ("gpt-5*",), 500, 2_000_000, 50.0, 60, 4)
    assert runtime.keys.specs["bob"] == KeySpec("bob", digest(BOB_KEY))


@pytest.mark.parametrize(("entry", "message"), [
    ('name = "a"\nkey = "k-1234567890"\ncolour = "red"', r"entry 1 \('a'\): unknown field\(s\) colour"),
    ('name = "a"\nkey = "k-1234567890"\nrpm = -1', r"entry 1 \('a'\): rpm must be an integer >= 0"),
    ('name = "a"\nkey = "k-1234567890"\nnodes = ["gamma"]', r"key 'a': unknown node id\(s\) gamma"),
    ('name = "a"\nkey = "k-1234567890"\n[[keys]]\nname = "a"\nkey = "k-other-123"', r"entry 2 \('a'\).*used twice"),
    ('name = "a"\nkey = "k-1234567890"\n[[keys]]\nname = "b"\nkey = "k-1234567890"', r"entry 2 \('b'\).*key is listed"),
    ('name = "a"\nkey_sha256 = "abc"', r"key_sha256 must be 64 hex digits"),
])
def test_a_bad_entry_stops_the_relay_naming_it(tmp_path, entry, message):
    keys = ClientKeyOptions(runtime_with("alpha"))
    with taddons.context(keys) as tctx, pytest.raises(exceptions.OptionsError, match=message):
        tctx.configure(keys, codex_client_keys=write_keys(tmp_path, "[[keys]]\n" + entry))


@pytest.fixture
def engine(db_url):
    with fresh_engine(db_url) as eng:
        yield eng


@pytest.fixture
def writer(engine):
    """The writer (a thread) the relay's records go through, on ``engine``."""
    w = Writer(engine, linger=0.0)
    w.start()
    yield w
    w.finish()


def refusal(response) -> tuple[int, str | None, str | None]:
    return response.status_code, json.loads(response.content)["error"]["code"], response.headers.get("retry-after")


def flow_of(key: str):
    f = tflow.tflow()
    f.request.path = "/v1/responses"
    f.metadata[CLIENT_KEY_NAME] = key
    return f


def refused_counts(writer: Writer, key: str) -> dict[str, int]:
    """``key``'s refusals, once the writer has written what it was given."""
    assert writer.flush(30)
    with writer.engine.connect() as conn:
        row = conn.execute(sa.select(client_key_usage).where(client_key_usage.c.client_key == key)).one()
    return {k: v for k, v in row._mapping.items() if k.startswith("refused_") and v}


def test_limits_refuse_in_order_and_count_refusals_per_key(writer):
    t = [1000.0]
    # rpm and concurrency are counted in the database (fleet-wide), on the wall clock ``now``.
    limits = Limits(runtime_with("alpha", "beta", writer=writer), clock=lambda: t[0],
                    now=lambda: dt.datetime(2026, 11, 25, 12) + dt.timedelta(seconds=t[0]))
    limits.runtime.keys.apply([KeySpec("alice", b"x" * 32, nodes=("alpha",), models=("gpt-5*",), rpm=4, concurrency=2),
                     KeySpec("bob", b"y" * 32, nodes=("beta",))])

    async def run() -> None:
        assert refusal(await limits.admit(flow_of("alice"), "claude-opus")) == (400, "model_not_allowed", None)
        a, b = flow_of("alice"), flow_of("alice")
        assert await limits.admit(a, "gpt-5") is None and await limits.admit(b, "gpt-5-codex") is None
        assert limits.barred(a) == {"beta"}
        assert refusal(await limits.admit(flow_of("alice"), "gpt-5")) == (429, "concurrency_limited", "1")
        limits.release(a)
        t[0] += 10
        assert await limits.admit(flow_of("alice"), "gpt-5") is None  # the third call of the minute
        assert refusal(await limits.admit(flow_of("alice"), "gpt-5"))[:2] == (429, "concurrency_limited")
        limits.release(b)
        assert await limits.admit(flow_of("alice"), "gpt-5") is None  # the fourth: rpm reached
        assert refusal(await limits.admit(flow_of("alice"), "gpt-5")) == (429, "rate_limited", "50")
        limits.runtime.pool.get("beta").disabled = True
        assert refusal(await limits.admit(flow_of("bob"), "gpt-5"))[:2] == (429, "no_node_available")

    asyncio.run(run())
    assert refused_counts(writer, "alice") == {"refused_model": 1, "refused_concurrency": 2, "refused_rate": 1}
    assert refused_counts(writer, "bob") == {"refused_nodes": 1}


def test_daily_requests_budget_refuses_with_reset_time_and_frees_the_slot(writer):
    now = dt.datetime(2026, 11, 25, 23, 0, 0)
    limits = Limits(runtime_with("alpha", writer=writer), now=lambda: now)
    limits.runtime.keys.apply([KeySpec("alice", b"x" * 32, daily_requests=2, concurrency=5)])
    alerts: list[tuple[str, str, str]] = []
    limits.runtime.alerts.notify = lambda *event: alerts.append(event)  # the webhooks' "key_budget_reached"

    async def run() -> list:
        return [await limits.admit(flow_of("alice"), "gpt-5") for _ in range(3)]

    first, second, third = asyncio.run(run())
    assert first is None and second is None
    # No retry-after (hours away: clients would sleep on it); Codex stops on this type and shows the reset.
    assert refusal(third) == (429, "budget_exceeded", None) and third.headers["x-should-retry"] == "false"
    assert json.loads(third.content)["error"]["type"] == "usage_limit_reached"
    assert json.loads(third.content)["error"]["resets_at"] == dt.datetime(2026, 11, 26, tzinfo=dt.UTC).timestamp()
    assert "daily_requests limit (2)" in third.text and "2026-11-26T00:00:00Z" in third.text
    assert limits.in_flight("alice") == 2  # the refused call holds no slot
    assert refused_counts(writer, "alice") == {"refused_budget": 1}
    assert [(e, k) for e, k, *_ in alerts] == [("key_budget_reached", "alice")] and "daily_requests" in alerts[0][2]


def test_daily_requests_admission_is_exact_under_concurrency(engine):
    day = dt.date(2026, 11, 25)
    admitted = []

    def worker() -> None:
        for _ in range(5):
            with engine.begin() as conn:
                admitted.append(admit(conn, "alice", day, Budgets(daily_requests=7)).over is None)

    with ThreadPoolExecutor(4) as pool:  # a worker's error is raised here, not lost with its thread
        list(pool.map(lambda _: worker(), range(4)))
    assert admitted.count(True) == 7 and len(admitted) == 20
    with engine.begin() as conn:
        assert admit(conn, "alice", day + dt.timedelta(days=1), Budgets(daily_requests=7)).over is None  # a new day


def test_token_and_cost_budgets_read_the_writers_usage(engine):
    day = dt.date(2026, 11, 25)
    with engine.begin() as conn:
        apply_batch(conn, [record("a1", "alice", dt.datetime(2026, 11, 3, 12), 900, 0.75),
                           record("a2", "alice", dt.datetime(2026, 11, 25, 12), 100, 0.30)])
        assert admit(conn, "alice", day, Budgets(daily_tokens=101, monthly_cost=1.1)).over is None
        assert admit(conn, "alice", day, Budgets(daily_tokens=100)).over == "daily_tokens"
        assert admit(conn, "alice", day, Budgets(monthly_cost=1.05)).over == "monthly_cost"
        assert admit(conn, "alice", dt.date(2026, 12, 1), Budgets(monthly_cost=1.05)).over is None


def record(invoke_id: str, key: str | None, at: dt.datetime, tokens: int, cost: float | None) -> InvocationRecord:
    return InvocationRecord(invoke_id=invoke_id, occurred_at=at, source="relay", endpoint="/v1/responses",
                            status="success", node_id="alpha", model="gpt-5", client_key=key,
                            usage=Usage(input_tokens=tokens - 10, cached_tokens=3, output_tokens=10), cost=cost)


def test_key_usage_agrees_with_invocations_summed_by_client_key(engine):
    t0 = dt.datetime(2026, 11, 25, 23, 59, 59)
    batch = [record(f"r{i}", ("alice", "bob", None)[i % 3], t0 + dt.timedelta(seconds=i % 2), 20 + i,
                    None if i % 4 == 0 else 0.01 * i) for i in range(12)]
    with engine.begin() as conn:
        apply_batch(conn, batch[:8])
    with engine.begin() as conn:
        apply_batch(conn, batch[5:])  # a replay of 5..7: counted once
    c, u = codex_invocations.c, client_key_usage.c
    with engine.connect() as conn:
        from_rows = conn.execute(
            sa.select(sa.func.date(c.occurred_at), c.client_key, sa.func.count(), sa.func.sum(c.input_tokens),
                      sa.func.sum(c.cache_input_tokens), sa.func.sum(c.output_tokens), sa.func.sum(c.total_tokens),
                      sa.func.round(sa.func.coalesce(sa.func.sum(c.cost), 0), 9))
            .where(c.client_key.is_not(None)).group_by(sa.func.date(c.occurred_at), c.client_key)
            .order_by(sa.func.date(c.occurred_at), c.client_key)).all()
        kept = conn.execute(sa.select(u.day, u.client_key, u.requests, u.input_tokens, u.cached_tokens,
                                      u.output_tokens, u.total_tokens, sa.func.round(u.cost, 9))
                            .order_by(u.day, u.client_key)).all()
    assert len(kept) == 4
    assert [(str(r[0]), *r[1:]) for r in kept] == [(str(r[0]), *r[1:]) for r in from_rows]


def test_stats_keys_shows_each_keys_day_with_refusals_by_reason(engine, capsys):
    day = dt.date(2026, 11, 25)
    with engine.begin() as conn:
        apply_batch(conn, [record("k1", "alice", dt.datetime(2026, 11, 2, 8), 50, 1.5),
                           record("k2", "alice", dt.datetime(2026, 11, 25, 8), 40, 0.25)])
        admit(conn, "bob", day, Budgets(daily_requests=0))
        apply_batch(conn, [KeyCount("bob", day, "refused_budget")])
    url = engine.url.render_as_string(hide_password=False)
    assert stats_main(["keys", "--db", url, "--until", "2026-11-25", "--json"]) == 0
    got = {r["client_key"]: r for r in json.loads(capsys.readouterr().out)}
    assert (got["alice"]["requests"], got["alice"]["total_tokens"], got["alice"]["cost"],
            got["alice"]["month_cost"]) == (1, 40, 0.25, 1.75)
    assert (got["bob"]["requests"], got["bob"]["refused_budget"], got["bob"]["refused"]) == (0, 1, 1)
    assert (got["alice"]["cache_hit_rate"], got["bob"]["cache_hit_rate"]) == (3 / 30, None)  # cached ÷ input
    assert stats_main(["keys", "--db", url, "--until", "2026-11-25"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["key", "day", "requests", "refused"] and table[2].startswith("bob")
    head = table[0].split()
    assert table[1].split()[head.index("hit")] == "10.0%"


def test_stats_keys_with_the_keys_file_shows_each_limits_use_and_reset(engine, capsys, tmp_path):
    with engine.begin() as conn:
        apply_batch(conn, [record("k1", "alice", dt.datetime(2026, 11, 25, 8), 40, 0.25)])
        assert admit(conn, "alice", dt.date(2026, 11, 25), Budgets(daily_requests=5)).over is None
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "alice"\nkey = "ck-alice-0123456789"\ndaily_requests = 5\n'
                    'monthly_cost = 10.0\nrpm = 60\n\n[[keys]]\nname = "carol"\nkey = "ck-carol-0123456789"\n'
                    'daily_tokens = 1000\n')
    url = engine.url.render_as_string(hide_password=False)
    assert stats_main(["keys", "--db", url, "--until", "2026-11-25", "--keys", str(keys), "--json"]) == 0
    got = {r["client_key"]: r for r in json.loads(capsys.readouterr().out)}
    assert got["alice"]["limits"] == {
        "daily_requests": {"limit": 5, "used": 1, "resets_at": "2026-11-26T00:00:00Z"},
        "monthly_cost": {"limit": 10.0, "used": 0.25, "resets_at": "2026-12-01T00:00:00Z"},
        "rpm": {"limit": 60, "used": None, "resets_at": None}}  # a relay's rolling window: not in the database
    assert got["carol"]["limits"] == {"daily_tokens": {"limit": 1000, "used": 0, "resets_at": "2026-11-26T00:00:00Z"}}
    assert stats_main(["keys", "--db", url, "--until", "2026-11-25", "--keys", str(keys)]) == 0
    table = capsys.readouterr().out
    assert "daily_requests 1/5 (2026-11-26T00:00)" in table and "rpm -/60" in table
    assert stats_main(["keys", "--db", url, "--until", "2026-11-25", "--keys", str(keys), "--csv"]) == 0
    assert "daily_requests_used" in capsys.readouterr().out.splitlines()[0]


def test_usage_endpoint_answers_a_key_holder_its_own_usage_in_crs_shape(engine, tmp_path):
    now = utcnow()
    # A call that wrote the prompt cache: 400 of its 1,000 input tokens, $0.0015 of its $0.0030 input cost.
    written = replace(record("u4", "alice", now, 0, 0.0045), model="claude-sonnet-4-5",
                      usage=Usage(input_tokens=1_000, cached_tokens=100, cache_write_tokens=400, output_tokens=50),
                      cost_input=0.003, cost_cached=0.00003, cost_output=0.00147, cost_cache_write=0.0015)
    with engine.begin() as conn:
        apply_batch(conn, [record("u1", "alice", now, 100, 0.5), record("u2", "alice", now, 60, 0.25),
                           record("u3", "bob", now, 999, 9.0), written])
    runtime = runtime_with("alpha", engine=engine)
    keys = ClientKeyOptions(runtime)
    auth = ClientAuth(keys=runtime.keys)
    stats = UserStats(runtime)
    with taddons.context(keys, stats) as tctx:
        tctx.configure(keys, codex_client_keys=f"alice={ALICE_KEY},bob={BOB_KEY}")

        def ask(body: dict) -> tuple[int, dict]:
            f = tflow.tflow()
            f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9")
            f.request.method, f.request.path = "POST", "/apiStats/api/user-model-stats"
            f.request.content = json.dumps(body).encode()
            auth.requestheaders(f)
            assert f.response is None  # client auth lets it through: the key is in the body
            asyncio.run(stats.request(f))
            return f.response.status_code, json.loads(f.response.content)

        status, answer = ask({"apiKey": ALICE_KEY, "period": "daily"})
        assert status == 200 and answer["success"] is True and answer["period"] == "daily"
        claude, item = answer["data"]
        # CRS counts cache writes apart from input, in tokens and in cost; the parts add up to the total.
        assert (claude["model"], claude["inputTokens"], claude["cacheCreateTokens"], claude["cacheReadTokens"]) == (
            "claude-sonnet-4-5", 500, 400, 100)
        c = claude["costs"]
        assert c["cacheWrite"] == c["cacheCreate"] == 0.0015 and c["input"] == pytest.approx(0.0015)
        assert c["total"] == 0.0045 and c["input"] + c["cacheWrite"] + c["cacheRead"] + c["output"] == pytest.approx(
            c["total"])
        assert (item["model"], item["requests"], item["inputTokens"], item["cacheReadTokens"], item["outputTokens"],
                item["allTokens"], item["costs"]["total"], item["isLegacy"]) == (
                    "gpt-5", 2, 134, 6, 20, 160, 0.75, False)
        parsed = crs.parse(answer, {})  # codex-relay's own crs source reads it
        assert [(m.model, m.requests, m.cache_create_tokens) for m in parsed.models] == [
            ("claude-sonnet-4-5", 1, 400), ("gpt-5", 2, 0)]
        assert ask({"apiKey": "ck-nobody-123456"}) == (401, {"error": "Invalid API key",
                                                             "message": "API key not found"})
        assert ask({})[0] == 400


def test_admin_keys_panel_shows_usage_refusals_and_each_limits_use(engine):
    day = dt.date(2026, 11, 25)
    runtime = runtime_with("alpha", engine=engine)
    limits = Limits(runtime, now=lambda: dt.datetime(2026, 11, 25, 12))
    limits.runtime.keys.apply([KeySpec("alice", b"x" * 32, daily_requests=5, monthly_cost=50.0, concurrency=4),
                     KeySpec("idle", b"y" * 32, rpm=10)])
    admin = Admin(runtime, limits)
    asyncio.run(limits.admit(flow_of("alice"), "gpt-5"))  # in flight, admitted once
    with engine.begin() as conn:
        apply_batch(conn, [record("p1", "alice", dt.datetime(2026, 11, 25, 9), 50, 1.25),
                           KeyCount("alice", day, "refused_model")])
    with taddons.context(admin):
        resp = ask(admin, "GET", "/admin/api/keys?until=2026-11-25")
    alice, idle = json.loads(resp.content)["keys"]
    assert (alice["client_key"], alice["requests"], alice["refused_model"], alice["total_tokens"]) == (
        "alice", 1, 1, 50)
    assert alice["limits"] == {
        "daily_requests": {"limit": 5, "used": 1, "resets_at": "2026-11-26T00:00:00Z"},
        "monthly_cost": {"limit": 50.0, "used": 1.25, "resets_at": "2026-12-01T00:00:00Z"},
        "concurrency": {"limit": 4, "used": 1, "resets_at": None}}
    assert (idle["client_key"], idle["requests"], idle["limits"]) == (
        "idle", 0, {"rpm": {"limit": 10, "used": 0, "resets_at": None}})


def test_usage_endpoint_answers_a_key_no_key_can_be_with_its_401():
    # "\ud800" in the JSON body is a lone surrogate: hashing it raised, and every such request was a 500.
    runtime = runtime_with("alpha")
    keys = ClientKeyOptions(runtime)
    stats = UserStats(runtime)
    with taddons.context(keys, stats) as tctx:
        tctx.configure(keys, codex_client_keys=f"alice={ALICE_KEY}")
        for body in (b'{"apiKey": "\\ud800"}', b'{"apiKey": "ck-alice-\\u0000"}'):
            f = tflow.tflow()
            f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9")
            f.request.method, f.request.path, f.request.content = "POST", "/apiStats/api/user-model-stats", body
            asyncio.run(stats.request(f))
            assert (f.response.status_code, json.loads(f.response.content)) == (
                401, {"error": "Invalid API key", "message": "API key not found"})


# An address where nothing listens: the stats database is unreachable (connection refused at once).
UNREACHABLE_DB = "mysql+pymysql://root@127.0.0.1:1/codex"


def limits_without_database(writer: Writer) -> Limits:
    """Limits for a key with every budget while the database is unreachable; records go to ``writer``."""
    runtime = runtime_with("alpha")
    runtime.db.engine = make_engine(UNREACHABLE_DB)
    runtime.db.submit = writer.submit
    limits = Limits(runtime)
    runtime.keys.apply([KeySpec("alice", b"x" * 32, daily_requests=5, daily_tokens=1000, monthly_cost=5.0, rpm=2)])
    return limits


def test_with_the_database_down_budgeted_calls_are_admitted_and_counted_once_it_is_back(db_url, tmp_path):
    """codex_limits_when_db_down=admit (the default): calls are served, an rpm refusal is still a 429, and
    the admissions and refusal go through the writer's journal, so the day's counts are exact afterwards."""
    journal = str(tmp_path / "spool.db")
    down = Writer(make_engine(UNREACHABLE_DB), Spool(journal), linger=0.0)
    down.start()

    async def calls(limits: Limits) -> list:
        return [await limits.admit(flow_of("alice"), "gpt-5") for _ in range(3)]
    limits = limits_without_database(down)
    assert limits.when_db_down == "admit"  # the default
    first, second, third = asyncio.run(calls(limits))
    assert first is None and second is None  # served: the budgets could not be read
    assert refusal(third)[:2] == (429, "rate_limited")  # not a 500: the refusal is counted by the writer
    wait_for(lambda: down.stats().spooled == 3, what="3 counts journaled")
    down.close()  # the journal keeps them for the next start
    with fresh_engine(db_url) as engine:
        back = Writer(engine, Spool(journal), linger=0.0)
        back.start()
        assert back.flush(30)
        back.finish()
        with engine.connect() as conn:
            row = conn.execute(sa.select(client_key_usage).where(client_key_usage.c.client_key == "alice")).one()
    assert (row.day, row.admitted, row.refused_rate) == (utcnow().date(), 2, 1)


def test_with_the_database_down_refuse_answers_503_in_the_clients_shape(tmp_path):
    down = Writer(make_engine(UNREACHABLE_DB), Spool(None), linger=0.0)
    down.start()
    anthropic = flow_of("alice")
    anthropic.request.path = "/v1/messages"
    limits = limits_without_database(down)
    limits.when_db_down = "refuse"  # as codex_limits_when_db_down=refuse sets it (the test below)
    response = asyncio.run(limits.admit(flow_of("alice"), "gpt-5"))
    body = json.loads(asyncio.run(limits.admit(anthropic, "claude-sonnet-4-5")).content)
    assert limits.in_flight("alice") == 0  # the refused calls hold no slot
    assert refusal(response) == (503, "limits_unavailable", "10")
    assert "stats database is unreachable" in response.text
    assert body["type"] == "error" and "stats database is unreachable" in body["error"]["message"]
    wait_for(lambda: down.stats().spooled == 2, what="the refusals journaled")
    down.finish()


def test_admissions_while_the_database_was_away_count_against_the_budget_once_it_is_back(writer):
    """The database is asked again DB_RETRY_S after a failed check; meanwhile calls are admitted and their
    admissions journaled, so a key cannot spend its daily_requests twice over an outage."""
    t = [0.0]
    runtime = runtime_with("alpha", writer=writer)
    limits = Limits(runtime, clock=lambda: t[0])
    limits.runtime.keys.apply([KeySpec("alice", b"x" * 32, daily_requests=2)])
    runtime.db.engine = make_engine(UNREACHABLE_DB)
    assert asyncio.run(limits.admit(flow_of("alice"), "gpt-5")) is None  # the check failed: admitted
    runtime.db.engine = writer.engine  # back, but not asked before the pause is over
    t[0] += DB_RETRY_S - 1
    assert asyncio.run(limits.admit(flow_of("alice"), "gpt-5")) is None
    assert writer.flush(30)
    t[0] += 1
    assert refusal(asyncio.run(limits.admit(flow_of("alice"), "gpt-5")))[:2] == (429, "budget_exceeded")
    with writer.engine.connect() as conn:
        row = conn.execute(sa.select(client_key_usage).where(client_key_usage.c.client_key == "alice")).one()
    assert row.admitted == 2


def test_the_when_db_down_policy_is_an_option_and_a_bad_one_stops_the_relay():
    limits = Limits(runtime_with("alpha"))
    addon = LimitOptions(limits)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_limits_when_db_down="refuse")
        assert limits.when_db_down == "refuse"
        with pytest.raises(exceptions.OptionsError, match="admit, refuse"):
            tctx.configure(addon, codex_limits_when_db_down="maybe")


def test_metrics_show_each_keys_limits_use_and_refusals(writer):
    """Prometheus' budget panels (examples/grafana-dashboard.json): each limit of a key and its use, and the
    refusals by key and reason."""
    now = dt.datetime(2026, 11, 25, 12, 0, 0)
    limits = Limits(runtime_with("alpha", writer=writer), now=lambda: now)
    limits.runtime.keys.apply([KeySpec("alice", b"x" * 32, models=("gpt-5*",), daily_requests=2, monthly_cost=2.0,
                                       rpm=10, concurrency=5)])

    async def run() -> list:
        return [await limits.admit(flow_of("alice"), model) for model in ("gpt-5", "gpt-5", "gpt-5", "claude-x")]

    answers = asyncio.run(run())
    assert [a is None for a in answers] == [True, True, False, False]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(limits.runtime.metrics.scrape().decode())
               for s in family.samples}

    def gauge(name: str, limit: str) -> float | None:
        return samples.get((name, (("client", "alice"), ("limit", limit))))

    assert {lim: (gauge("codex_key_limit", lim), gauge("codex_key_used", lim))
            for lim in ("daily_requests", "monthly_cost", "rpm", "concurrency", "daily_tokens")} == {
        "daily_requests": (2, 2), "monthly_cost": (2.0, 0), "rpm": (10, 2), "concurrency": (5, 2),
        "daily_tokens": (None, None)}
    refusals = {dict(labels)["reason"]: v for (n, labels), v in samples.items() if n == "codex_client_refusals_total"}
    assert refusals == {"budget": 1, "model": 1}

"""Stats aggregates and the stats CLI against hand-computed numbers, on SQLite and MariaDB."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest

from addon.metering.outcome import is_node_failure_status
from store.cli.stats import main, parse_day
from store.engine import make_engine
from store.nodes import set_disabled, upsert_nodes
from store.records import InvocationRecord, NodeConfig, NodeStateUpdate, Usage
from store.stats import Filters, per_day, per_model, per_node, per_session, per_source, recent_invocations
from store.write.batch import apply_batch
from tests.support.databases import at_head

D20, D21, D22 = dt.date(2026, 11, 20), dt.date(2026, 11, 21), dt.date(2026, 11, 22)
CODEX, MINI = "gpt-5-codex", "gpt-5-mini"


def call(n: int, at: dt.datetime, node: str | None, model: str | None, status: str, usage: tuple[int, int, int, int],
         *, source: str = "relay", stream: bool = True, ttfb: int | None = None, stream_ms: int | None = None,
         nbytes: int = 0, cost: float | None = None, http: int = 200, session: str | None = None) -> InvocationRecord:
    i, c, o, r = usage
    return InvocationRecord(
        invoke_id=f"call-{n}", occurred_at=at, source=source, endpoint="/v1/responses", status=status,
        node_id=node, api_format="responses", model=model, stream=stream, http_status=http,
        error_message=None if status == "success" else f"{status} {n}",
        usage=Usage(input_tokens=i, cached_tokens=c, output_tokens=o, reasoning_tokens=r), cost=cost,
        ttfb_ms=ttfb, stream_ms=stream_ms, duration_ms=(ttfb or 0) + (stream_ms or 0), response_bytes=nbytes,
        node_failure=status == "failed" and node is not None and is_node_failure_status(http), session_key=session)


# Numbered as in the expectations below; times chosen on the day boundaries.
CALLS = [
    call(1, dt.datetime(2026, 11, 20, 8, 0), "alpha", CODEX, "success", (100, 40, 30, 10),
         ttfb=200, stream_ms=300, nbytes=1000, cost=0.01, session="s-1"),
    call(2, dt.datetime(2026, 11, 21, 23, 59, 59, 500000), "alpha", CODEX, "success", (200, 0, 50, 0),
         ttfb=400, stream_ms=700, nbytes=2000, cost=0.02, session="s-1"),
    call(3, dt.datetime(2026, 11, 21, 10, 0), "beta", MINI, "failed", (0, 0, 0, 0),
         ttfb=100, stream_ms=0, nbytes=100, http=500, session="s-1"),
    call(4, dt.datetime(2026, 11, 22, 0, 0), "beta", MINI, "success", (10, 5, 20, 0), source="xy",
         stream=False, ttfb=1000, stream_ms=5, nbytes=500, session="s-2"),
    # The relay's own 503 (no node available): refused, nobody's failure.
    call(5, dt.datetime(2026, 11, 22, 12, 0), None, None, "failed", (0, 0, 0, 0), http=503),
    # Aborted by the client: not a failure of the node, and no speed sample.
    call(6, dt.datetime(2026, 11, 22, 13, 0), "alpha", CODEX, "aborted", (50, 0, 10, 0),
         ttfb=300, stream_ms=100, nbytes=400, session="s-1"),
    # A node id the nodes table does not know (its row was removed).
    call(7, dt.datetime(2026, 11, 20, 9, 0), "ghost", CODEX, "success", (1, 0, 1, 0),
         ttfb=50, stream_ms=10, nbytes=10),
]


@pytest.fixture
def engine(db_url):
    engine = make_engine(at_head(db_url))
    with engine.begin() as conn:
        upsert_nodes(conn, [NodeConfig("alpha", "https://a.example/v1", "sk-alpha-secret-1234", "Alpha", 3),
                            NodeConfig("beta", "https://b.example/v1", "sk-beta-secret-5678", "Beta", 1),
                            NodeConfig("gamma", "https://g.example/v1", "short", "Gamma", 2)])
        apply_batch(conn, CALLS)
        apply_batch(conn, [NodeStateUpdate("beta", failed=True, last_error="3 failures in a row"),
                           NodeStateUpdate("alpha", pinged=True, last_ping_ms=42)])
        set_disabled(conn, "gamma", True)
    yield engine
    engine.dispose()


def query(engine, fn, f: Filters | None = None, *args):
    with engine.connect() as conn:
        return fn(conn, f or Filters(), *args)


def test_per_node_window_stats_node_state_and_lifetime_counters(engine):
    alpha, beta, gamma, ghost, none = query(engine, per_node)
    assert [s.node_id for s in (alpha, beta, gamma, ghost, none)] == ["alpha", "beta", "gamma", "ghost", None]

    assert (alpha.requests, alpha.successes, alpha.failures, alpha.aborted, alpha.refused) == (3, 2, 0, 1, 0)
    assert alpha.health_rate == pytest.approx(2 / 3)
    assert (alpha.input_tokens, alpha.cached_tokens, alpha.output_tokens, alpha.reasoning_tokens,
            alpha.total_tokens, alpha.bytes) == (350, 40, 90, 10, 440, 3400)
    assert alpha.cost == pytest.approx(0.03)
    assert alpha.avg_ttfb_ms == 300.0
    assert alpha.stream_ms_per_token == 12.5  # (300 + 700) ms / (30 + 50) tokens; the aborted call not counted
    assert (alpha.name, alpha.base_url, alpha.weight, alpha.status, alpha.api_key_hint) == \
        ("Alpha", "https://a.example/v1", 3, "active", "sk-…1234")
    assert (alpha.last_ping_ms, alpha.last_ping_err, alpha.last_error) == (42, None, None)
    assert (alpha.lifetime_attempts, alpha.lifetime_failed_attempts, alpha.lifetime_bytes, alpha.lifetime_input_tokens,
            alpha.lifetime_cached_tokens, alpha.lifetime_output_tokens, alpha.lifetime_reasoning_tokens,
            alpha.lifetime_stream_ms, alpha.lifetime_ttfb_ms) == (3, 0, 3400, 350, 40, 90, 10, 1100, 900)

    assert (beta.requests, beta.failures, beta.health_rate, beta.avg_ttfb_ms) == (2, 1, 0.5, 550.0)
    assert beta.stream_ms_per_token is None  # its only success was not streamed
    assert (beta.status, beta.last_error, beta.lifetime_failed_attempts, beta.fail_streak) == \
        ("failed", "3 failures in a row", 1, 0)

    assert (gamma.status, gamma.weight, gamma.requests, gamma.health_rate, gamma.avg_ttfb_ms) == \
        ("disabled", 2, 0, None, None)
    assert gamma.api_key_hint == "…"  # too short to show any of it
    assert (ghost.status, ghost.requests, ghost.stream_ms_per_token) == (None, 1, 10.0)
    assert (none.status, none.requests, none.failures, none.refused, none.avg_ttfb_ms) == (None, 1, 0, 1, None)


def test_cache_hit_rate_is_cached_over_input_in_every_view(engine):
    alpha, beta, _gamma, ghost, none = query(engine, per_node)
    assert (alpha.cache_hit_rate, beta.cache_hit_rate, ghost.cache_hit_rate) == (40 / 350, 0.5, 0.0)
    assert none.cache_hit_rate is None  # no input: no rate, not 0
    assert alpha.as_dict()["cache_hit_rate"] == 40 / 350
    assert [m.cache_hit_rate for m in query(engine, per_model)] == [40 / 351, 0.5, None]


def test_per_session_from_the_invocations(engine):
    s1, s2 = query(engine, per_session, Filters(), 50)
    assert (s1.session_key, s1.requests, s1.nodes, s1.node_id, s1.input_tokens, s1.cached_tokens,
            s1.output_tokens) == ("s-1", 4, 2, "alpha", 350, 40, 90)  # it moved to beta once
    assert s1.cache_hit_rate == 40 / 350 and s1.cost == pytest.approx(0.03)
    assert (s1.first_at, s1.last_at) == (dt.datetime(2026, 11, 20, 8, 0), dt.datetime(2026, 11, 22, 13, 0))
    assert (s2.session_key, s2.requests, s2.nodes, s2.cache_hit_rate, s2.cost) == ("s-2", 1, 1, 0.5, None)
    assert [s.session_key for s in query(engine, per_session, Filters(), 1)] == ["s-1"]  # most input first
    assert [s.session_key for s in query(engine, per_session, Filters(node="beta"), 50)] == ["s-2", "s-1"]
    assert query(engine, per_session, Filters(since=D22, model=MINI), 50)[0].as_dict()["cache_hit_rate"] == 0.5


def test_per_node_filters(engine):
    # since/until are whole inclusive days: 23:59:59.5 is in, midnight of the next day is out.
    alpha, beta, gamma = query(engine, per_node, Filters(since=D21, until=D21))
    assert (alpha.requests, alpha.input_tokens, alpha.avg_ttfb_ms, alpha.stream_ms_per_token) == (1, 200, 400.0, 14.0)
    assert (beta.requests, beta.failures, beta.health_rate) == (1, 1, 0.0)
    assert gamma.requests == 0
    assert alpha.lifetime_attempts == 3  # lifetime counters ignore the window

    (beta,) = query(engine, per_node, Filters(node="beta"))
    assert (beta.node_id, beta.requests, beta.input_tokens) == ("beta", 2, 10)


def test_per_model(engine):
    codex, mini, unknown = query(engine, per_model)
    assert (codex.model, codex.requests, codex.failures, codex.input_tokens, codex.cached_tokens,
            codex.output_tokens, codex.reasoning_tokens, codex.total_tokens, codex.bytes) == \
        (CODEX, 4, 0, 351, 40, 91, 10, 442, 3410)
    assert codex.aborted == 1
    assert codex.avg_ttfb_ms == 237.5
    assert codex.stream_ms_per_token == pytest.approx(1010 / 81)
    assert (mini.model, mini.requests, mini.failures, mini.input_tokens, mini.cached_tokens) == (MINI, 2, 1, 10, 5)
    assert (unknown.model, unknown.requests, unknown.failures, unknown.refused) == (None, 1, 0, 1)

    (only,) = query(engine, per_model, Filters(node="alpha", since=D22))
    assert (only.model, only.requests, only.successes, only.health_rate) == (CODEX, 1, 0, 0.0)


def test_per_source(engine):
    relay, xy = query(engine, per_source)
    assert (relay.source, relay.requests, relay.successes, relay.input_tokens, relay.output_tokens,
            relay.bytes, relay.avg_ttfb_ms) == ("relay", 6, 3, 351, 91, 3510, 210.0)
    assert relay.cost == pytest.approx(0.03)
    assert (xy.source, xy.requests, xy.health_rate, xy.input_tokens, xy.cached_tokens, xy.output_tokens) == \
        ("xy", 1, 1.0, 10, 5, 20)
    assert query(engine, per_source, Filters(source="xy")) == [xy]
    assert query(engine, per_source, Filters(source="nope")) == []


def test_per_day(engine):
    got = [(s.day, s.source, s.requests, s.failures, s.input_tokens, s.cached_tokens, s.output_tokens,
            s.reasoning_tokens, s.total_tokens) for s in query(engine, per_day)]
    assert got == [
        ("2026-11-20", "relay", 2, 0, 101, 40, 31, 10, 132),
        ("2026-11-21", "relay", 2, 1, 200, 0, 50, 0, 250),
        ("2026-11-22", "relay", 2, 0, 50, 0, 10, 0, 60),  # one refused, one aborted
        ("2026-11-22", "xy", 1, 0, 10, 5, 20, 0, 30),
    ]
    mini = [(s.day, s.source, s.requests, s.failures) for s in query(engine, per_day, Filters(model=MINI))]
    assert mini == [("2026-11-21", "relay", 1, 1), ("2026-11-22", "xy", 1, 0)]
    assert [s.day for s in query(engine, per_day, Filters(since=D21, until=D21))] == ["2026-11-21"]


def test_failures_are_the_nodes_fault_aborts_and_refusals_apart(engine, capsys):
    """A client abort and a client error are no failure: a node's failures are its calls that its
    fail_count counts, and every call is a success, a failure, aborted or refused."""
    with engine.begin() as conn:
        apply_batch(conn, [call(8, dt.datetime(2026, 11, 22, 14, 0), "alpha", CODEX, "failed", (5, 0, 0, 0),
                                http=400)])
    alpha, beta, *_ = query(engine, per_node)
    assert (alpha.requests, alpha.successes, alpha.failures, alpha.aborted, alpha.refused) == (4, 2, 0, 1, 1)
    assert (alpha.failures, beta.failures) == (alpha.lifetime_failed_attempts, beta.lifetime_failed_attempts) == (0, 1)
    for fn in (per_node, per_model, per_source, per_day):
        for s in query(engine, fn):
            assert s.requests == s.successes + s.failures + s.aborted + s.refused, s
    code, out, _ = run(engine, capsys, "sources", "--json")
    assert [(d["source"], d["failures"], d["aborted"], d["refused"]) for d in json.loads(out)] == \
        [("relay", 1, 1, 2), ("xy", 0, 0, 0)]
    code, out, _ = run(engine, capsys, "nodes", "--node", "alpha")
    header, row = out.splitlines()
    assert header.split()[4:9] == ["requests", "failures", "aborted", "refused", "health"]
    assert row.split()[4:9] == ["4", "0", "1", "1", "50.0%"]


def test_node_lifetime_counters_count_attempts_while_calls_count_once(engine, capsys):
    """A call retried on another node is one request, of the node that served it; the node it failed on
    counts an attempt and a failed attempt: attempts = calls + failed attempts retried elsewhere."""
    retried = call(8, dt.datetime(2026, 11, 22, 14, 0), "alpha", CODEX, "success", (7, 0, 3, 0), cost=0.01)
    retried.attempts = 2
    with engine.begin() as conn:
        apply_batch(conn, [NodeStateUpdate("beta", failed_attempt=True, last_error="HTTP 502"), retried])
    alpha, beta, gamma, *_ = query(engine, per_node)
    retried_on = {"alpha": 0, "beta": 1, "gamma": 0}
    for node in (alpha, beta, gamma):
        assert node.lifetime_attempts == node.requests + retried_on[node.node_id], node.node_id
        assert node.lifetime_failed_attempts == node.failures + retried_on[node.node_id], node.node_id
    assert (beta.requests, beta.failures, beta.lifetime_attempts, beta.lifetime_failed_attempts) == (2, 1, 3, 2)
    assert query(engine, recent_invocations, Filters(), 1)[0].attempts == 2
    code, out, _ = run(engine, capsys, "nodes", "--json", "--node", "beta")
    (got,) = json.loads(out)
    assert (got["requests"], got["lifetime_attempts"], got["lifetime_failed_attempts"]) == (2, 3, 2)
    assert "lifetime_requests" not in got


def test_cost_is_unknown_without_a_price_and_zero_only_when_priced(engine, capsys):
    """Unpriced calls are left out of cost and counted; no priced call at all is no cost (-, null)."""
    with engine.begin() as conn:
        apply_batch(conn, [call(8, dt.datetime(2026, 11, 22, 14, 0), "alpha", "free-model", "success",
                                (5, 0, 1, 0), cost=0.0)])
    models = {m.model: m for m in query(engine, per_model)}
    assert (models[MINI].cost, models[MINI].unpriced) == (None, 2)
    assert (models["free-model"].cost, models["free-model"].unpriced) == (0.0, 0)
    assert models[CODEX].cost == pytest.approx(0.03) and models[CODEX].unpriced == 2  # calls 6 and 7
    (gamma,) = query(engine, per_node, Filters(node="gamma"))
    assert (gamma.cost, gamma.unpriced) == (None, 0)  # no calls

    code, out, _ = run(engine, capsys, "models")
    rows = {line.split()[0]: line.split()[11:-1] for line in out.splitlines()[1:]}
    assert out.splitlines()[0].split()[11:13] == ["cost", "$"]
    assert rows == {CODEX: ["0.0300", "(2", "unpriced)"], MINI: ["-"], "free-model": ["0.0000"],
                    "(unknown)": ["-"]}
    code, out, _ = run(engine, capsys, "models", "--json")
    got = {m["model"]: (m["cost"], m["unpriced"]) for m in json.loads(out)}
    assert got[MINI] == (None, 2) and got["free-model"] == (0.0, 0) and got[None] == (None, 1)
    code, out, _ = run(engine, capsys, "models", "--csv")
    assert {r["model"]: r["cost"] for r in csv.DictReader(io.StringIO(out))}[MINI] == ""


def test_recent_invocations(engine):
    latest = query(engine, recent_invocations, Filters(), 3)
    assert [r.invoke_id for r in latest] == ["call-6", "call-5", "call-4"]
    six = latest[0]
    assert (six.node_id, six.model, six.status, six.input_tokens, six.output_tokens, six.total_tokens, six.ttfb_ms,
            six.stream_ms, six.bytes, six.stream, six.error_message) == \
        ("alpha", CODEX, "aborted", 50, 10, 60, 300, 100, 400, True, "aborted 6")
    assert six.as_dict()["occurred_at"] == "2026-11-22T13:00:00"

    alpha = query(engine, recent_invocations, Filters(node="alpha"))
    assert [r.invoke_id for r in alpha] == ["call-6", "call-2", "call-1"]
    assert alpha[1].occurred_at == dt.datetime(2026, 11, 21, 23, 59, 59, 500000)  # microseconds kept
    assert query(engine, recent_invocations, Filters(source="xy"))[0].stream is False


def test_key_hint_masks_as_flows_do_and_is_absent_without_a_key(engine):
    # The one rule of store.masking: type prefix and last 4 from 16 characters on, nothing shorter.
    with engine.begin() as conn:
        upsert_nodes(conn, [NodeConfig("delta", "https://d.example/v1", "", "Delta"),
                            NodeConfig("eps", "https://e.example/v1", "1234567890abcdef", "Eps")])
    (delta,) = query(engine, per_node, Filters(node="delta"))
    (eps,) = query(engine, per_node, Filters(node="eps"))
    assert (delta.api_key_hint, eps.api_key_hint) == (None, "…cdef")


def test_relative_days():
    assert (parse_day("today", D22), parse_day("yesterday", D22), parse_day("2026-11-20")) == (D22, D21, D20)


def test_rows_serialise_without_the_api_key(engine):
    for fn in (per_node, per_model, per_source, per_day, recent_invocations):
        text = json.dumps([r.as_dict() for r in query(engine, fn)])
        assert "secret" not in text
    (alpha,) = query(engine, per_node, Filters(node="alpha"))
    d = alpha.as_dict()
    assert d["health_rate"] == pytest.approx(2 / 3) and d["api_key_hint"] == "sk-…1234" and "api_key" not in d


# -- the CLI ---------------------------------------------------------------------------------------
def run(engine, capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--db", engine.url.render_as_string(hide_password=False)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_table(engine, capsys):
    code, out, _ = run(engine, capsys, "sources")
    assert code == 0
    assert out == (
        "source  requests  failures  aborted  refused  health  input  cached    hit  output  reasoning"
        "               cost $  ttfb ms\n"
        "relay          6         1        1        1   50.0%    351      40  11.4%      91         10"
        "  0.0300 (4 unpriced)    210.0\n"
        "xy             1         0        0        0  100.0%     10       5  50.0%      20          0"
        "                    -  1,000.0\n")

    code, out, _ = run(engine, capsys, "--since", "2026-11-21", "--until", "2026-11-21")  # default view: nodes
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:5] == ["node", "name", "status", "weight", "requests"]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["alpha", "Alpha", "active", "3", "1"], ["beta", "Beta", "failed", "1", "1"],
        ["gamma", "Gamma", "disabled", "2", "0"]]
    assert "sk-" not in out

    code, out, _ = run(engine, capsys, "recent", "--limit", "1", "--node", "beta")
    assert code == 0 and out.splitlines()[1].split()[:6] == ["2026-11-22", "00:00:00", "xy", "beta", MINI, "success"]

    code, out, _ = run(engine, capsys, "sessions", "--limit", "5")
    assert code == 0 and [line.split() for line in out.splitlines()] == [
        ["session", "requests", "nodes", "node", "key", "input", "cached", "hit", "output", "cost", "$",
         "last", "(UTC)"],
        ["s-1", "4", "2", "alpha", "-", "350", "40", "11.4%", "90", "0.0300", "2026-11-22", "13:00"],
        ["s-2", "1", "1", "beta", "-", "10", "5", "50.0%", "20", "-", "2026-11-22", "00:00"]]

    code, out, _ = run(engine, capsys, "days", "--source", "nope")
    assert (code, out) == (0, "no calls recorded for these filters\n")


def test_cli_json_and_csv(engine, capsys):
    code, out, _ = run(engine, capsys, "days", "--json", "--model", MINI)
    assert code == 0
    days = json.loads(out)
    assert [(d["day"], d["source"], d["requests"], d["failures"], d["total_tokens"]) for d in days] == \
        [("2026-11-21", "relay", 1, 1, 0), ("2026-11-22", "xy", 1, 0, 30)]

    code, out, _ = run(engine, capsys, "models", "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["model"], r["requests"], r["input_tokens"], r["health_rate"]) for r in rows] == \
        [(CODEX, "4", "351", "0.75"), (MINI, "2", "10", "0.5"), ("", "1", "0", "0.0")]

    code, out, _ = run(engine, capsys, "nodes", "--json")
    nodes = {n["node_id"]: n for n in json.loads(out)}
    assert nodes["alpha"]["api_key_hint"] == "sk-…1234" and "secret" not in out
    assert nodes[None]["requests"] == 1  # the calls no node served: node_id null


def test_cli_errors(tmp_path, capsys, monkeypatch):
    def err(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().err

    missing = tmp_path / "none.db"
    assert err("--db", f"sqlite:///{missing}") == \
        (2, f"stats: no database file {missing} (start the relay once, or pass --db / $CODEX_DB)\n")
    assert not missing.exists()  # reading stats never creates a database

    code, msg = err("--db", "not a url")
    assert code == 2 and msg.startswith("stats: not a database URL: 'not a url'")
    code, msg = err("--db", "postgresql://x@127.0.0.1/db")
    assert code == 2 and msg.startswith("stats: unsupported database 'postgresql'")
    code, msg = err("--db", "mysql+pymysql://u@127.0.0.1:9/x")
    assert code == 2 and msg.startswith("stats: cannot open database mysql+pymysql://u@127.0.0.1:9/x: ")
    assert len(msg.splitlines()) == 1

    empty = tmp_path / "empty.db"
    empty.touch()
    code, msg = err("--db", f"sqlite:///{empty}")
    assert code == 2 and "has no codex-relay tables; start the relay" in msg

    monkeypatch.setenv("CODEX_DB", f"sqlite:///{missing}")
    assert err()[0] == 2  # $CODEX_DB is the default

    for bad, message in [
        (["--since", "2026-13-01"], "stats: argument --since: expected YYYY-MM-DD, today or yesterday, "
                                    "got '2026-13-01' (see --help)\n"),
        (["--since", "2026-11-22", "--until", "2026-11-21"],
         "stats: --since 2026-11-22 is after --until 2026-11-21 (see --help)\n"),
        (["--limit", "0", "recent"], "stats: --limit must be at least 1 (see --help)\n"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert (e.value.code, capsys.readouterr().err) == (2, message)
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("stats: argument view: invalid choice: 'bogus'")

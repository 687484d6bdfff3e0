"""A team's fleet end to end, as docs/several-relays.md and docs/teams.md run it: two real relays on one MariaDB
behind Debian's HAProxy with the shipped configuration, and a real Prometheus scraping both.

What an operator relies on: a key made through one relay's admin API works on the other within 5 s with its
limits in the answer's headers and at ``GET /v1/key``; a changed limit and a revocation apply on the other relay
within 5 s; every query of the shipped Grafana dashboard answers from Prometheus; a key's cost of the day is one
figure in the database, ``stats keys``, ``GET /v1/key`` and Prometheus.

Without /usr/sbin/haproxy or /usr/bin/prometheus this skips locally and fails under CI=true; ``./run.sh test``
installs Debian's packages when it can (as root, with apt-get).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from store.records import utcnow
from tests.support.calls import call, write_nodes
from tests.support.ci import unavailable
from tests.support.databases import fresh_mariadb
from tests.support.fakeupstream import FakeUpstream
from tests.support.haproxy import HAPROXY, start_haproxy
from tests.support.ports import free_port
from tests.support.relayproc import ROOT, RelayProcess
from tests.support.waiting import seconds_until, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.mysql, pytest.mark.slow, pytest.mark.xdist_group("fleet")]

DASHBOARD = ROOT / "examples" / "grafana-dashboard.json"
PROMETHEUS = Path("/usr/bin/prometheus")
# The dashboard test's key (tests.support.calls sends it): its calls go to its own node, so the figures it
# checks are its own whatever else the module's tests did first.
TEAM_KEY = "client-key"


@dataclass
class Fleet:
    db_url: str
    relays: list[RelayProcess]
    front: int  # HAProxy's port
    prometheus: int
    node: FakeUpstream  # serves the keys the tests make
    dash: FakeUpstream  # serves the dashboard test's key alone

    def ask(self, expr: str) -> list[dict]:
        """A Prometheus instant query's result."""
        url = f"http://127.0.0.1:{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            answer = json.load(resp)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    for tool, package in ((HAPROXY, "haproxy"), (PROMETHEUS, "prometheus")):
        if not tool.exists():
            unavailable(f"the fleet test's {package}", f"{tool} not installed (./run.sh test installs Debian's "
                        f"{package} when run as root)")
    tmp = tmp_path_factory.mktemp("fleet")
    with ExitStack() as stack:
        db_url = stack.enter_context(fresh_mariadb())
        node = stack.enter_context(FakeUpstream("team-node"))
        dash = stack.enter_context(FakeUpstream("dash"))
        nodes = write_nodes(tmp / "nodes.toml", [("team-node", node.base_url, "k1", 1),
                                                 ("dash", dash.base_url, "k2", 1)])
        keys = tmp / "keys.toml"
        keys.write_text(f'[[keys]]\nname = "team"\nkey = "{TEAM_KEY}"\nnodes = ["dash"]\nmodels = ["gpt-5*"]\n'
                        "daily_requests = 1000\nmonthly_cost = 100.0\nrpm = 1000\n")
        relays = []
        for name in ("relay1", "relay2"):
            relay = RelayProcess(db_url=db_url, options={
                "codex_nodes": str(nodes), "codex_ping_interval": "0", "codex_source": name,
                "codex_client_keys": f"@{keys}", "codex_spool": str(tmp / f"spool-{name}.db")})
            relays.append(relay.start())
            stack.callback(relay.stop)
        front, _ = start_haproxy(stack, [r.port for r in relays], tmp)
        port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text("global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: codex-relay\n"
                          "    static_configs:\n      - targets: [" + ", ".join(f"'127.0.0.1:{r.port}'" for r in relays)
                          + "]\n")
        log = stack.enter_context((tmp / "prometheus.log").open("w"))
        proc = subprocess.Popen([str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        stack.callback(proc.wait, 10)
        stack.callback(proc.terminate)
        wait_for(lambda: _ready(port) or proc.poll() is not None, 60, "prometheus ready")
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
        fleet = Fleet(db_url, relays, front, port, node, dash)
        # Both relays scraped before any call: rates and increases see every call happen.
        wait_for(lambda: len(fleet.ask("up == 1")) == 2, 30, "both relays scraped")
        yield fleet


def _ready(port: int) -> bool:
    """Whether Prometheus answers queries: it listens before it has opened its database (503 until then)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as resp:
            return resp.status == 200
    except OSError:  # refused, or an HTTPError 503 while it starts
        return False


def request(port: int, method: str, path: str, body: dict | None = None,
            key: str | None = None) -> tuple[int, dict[str, str], dict]:
    """One HTTP request to 127.0.0.1:``port``: status, headers (lower-case names) and the JSON answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw) if raw else {}
    finally:
        conn.close()


def key_call(port: int, key: str, model: str = "gpt-5-codex",
             usage: tuple[int, int, int, int] = (1000, 200, 100, 20)) -> tuple[int, dict[str, str], dict]:
    """A Responses call of ``key`` whose node reports ``usage`` (input, cached, output, reasoning)."""
    return request(port, "POST", "/v1/responses", {"model": model, "input": "hi",
                                                   "metadata": {"fake_usage": list(usage)}}, key)


def make_key(relay: RelayProcess, name: str, **limits: object) -> str:
    """A key made through ``relay``'s admin API, whose calls go to the team's node (the dashboard's node sees
    only its own key's): its secret."""
    status, _, made = request(relay.port, "POST", "/admin/api/keys", {"name": name, "nodes": ["team-node"], **limits})
    assert status == 201, made
    return made["secret"]


def known_on_both(fleet: Fleet, secret: str) -> None:
    """Wait until the relay that did not make the key accepts it (made on the first)."""
    status = lambda: request(fleet.relays[1].port, "GET", "/v1/key", key=secret)[0]  # noqa: E731
    assert seconds_until(lambda: status() == 200, "relay B to know the key") < 5


def test_every_dashboard_query_answers_from_prometheus_scraping_two_relays(fleet):
    queries = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    # Two rounds of calls on each relay: successes, a refusal (its model) and a node's failure. A series is
    # born at its first call, and Prometheus counts its growth from its first sample: the second round is what
    # the rates and increases see.
    for n in (1, 2):
        for relay in fleet.relays:
            for _ in range(3):
                assert call(relay, "responses", stream=True, usage=(100, 20, 10, 2))[0] == 200
            assert call(relay, "responses", stream=False, usage=(1, 0, 1, 0), model="claude-x")[0] == 400
            fleet.dash.behaviour.status = 502
            assert call(relay, "responses", stream=False, usage=(1, 0, 1, 0))[0] == 502
            fleet.dash.behaviour.status = 200
        wait_for(lambda n=n: fleet.ask(f'sum(codex_node_calls_total{{node="dash"}}) == {8 * n}'), 30,
                 f"round {n} scraped")
    for expr in queries:  # every panel shows something other than zero
        wait_for(lambda e=expr: any(float(r["value"][1]) > 0 for r in fleet.ask(e)), 30, f"data for {expr}")
    # What the panels show is what the relays counted: a failure and a refusal on each, each round.
    [refusals] = fleet.ask('sum(codex_client_refusals_total{client="team"})')
    assert float(refusals["value"][1]) == 4
    [failures] = fleet.ask('sum(codex_node_failures_total{node="dash", kind="failed"})')
    assert float(failures["value"][1]) == 4
    limits = {r["metric"]["limit"] for r in fleet.ask('max by (client, limit) (codex_key_limit{client="team"})')}
    assert limits == {"daily_requests", "monthly_cost", "rpm"}


def test_a_key_made_on_one_relay_works_on_the_other_and_a_change_or_revocation_follows_within_5_s(fleet):
    a, b = fleet.relays
    secret = make_key(a, "dana", models=["gpt-5*"], daily_requests=2)
    assert key_call(a.port, secret)[0] == 200  # the relay that made it: at once
    assert seconds_until(lambda: key_call(b.port, secret)[0] == 200, "relay B to accept the new key") < 5
    # Two calls made: the other relay refuses the third, and its answers carry the limit.
    status, headers, body = key_call(b.port, secret)
    assert (status, body["error"]["code"]) == (429, "budget_exceeded")
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("2", "0")
    status, _, info = request(b.port, "GET", "/v1/key", key=secret)
    assert status == 200 and info["limits"]["daily_requests"] | {"resets_at": None, "resets_in": None} == {
        "limit": 2, "used": 2, "remaining": 0, "resets_at": None, "resets_in": None}
    # A raised limit made on A: B admits again within 5 s, and says so.
    status, _, changed = request(a.port, "PATCH", "/admin/api/keys/dana", {"daily_requests": 3})
    assert status == 200, changed
    assert seconds_until(lambda: key_call(b.port, secret)[0] == 200, "relay B to apply the raised limit") < 5
    _, headers, _ = key_call(b.port, secret)
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("3", "0")
    # A revocation made on A: B refuses the key within 5 s.
    assert request(a.port, "POST", "/admin/api/keys/dana/revoke", {})[0] == 200
    assert key_call(a.port, secret)[0] == 401
    assert seconds_until(lambda: key_call(b.port, secret)[0] == 401, "relay B to refuse the revoked key") < 5
    assert secret not in "\n".join(a.lines + b.lines)  # shown once, in the answer: never logged


def test_a_keys_cost_of_the_day_is_one_figure_in_the_database_stats_v1_key_and_prometheus(fleet):
    secret = make_key(fleet.relays[0], "carol")
    known_on_both(fleet, secret)
    for n in range(7):  # through the balancer: both relays serve the key
        assert key_call(fleet.front, secret, usage=(1000 + n, 200, 100 + n, 20))[0] == 200
    engine = sa.create_engine(fleet.db_url)
    try:
        def in_database() -> float | None:
            with engine.connect() as conn:
                calls = conn.execute(sa.text("SELECT count(*), sum(cost) FROM codex_invocations "
                                             "WHERE client_key = 'carol'")).one()
                day = conn.execute(sa.text("SELECT requests, cost FROM client_key_usage WHERE client_key = 'carol' "
                                           "AND day = :day"), {"day": utcnow().date()}).first()
            return float(calls[1]) if calls[0] == 7 and day is not None and day.requests == 7 \
                and float(day.cost) == pytest.approx(float(calls[1]), rel=1e-9) else None

        cost = wait_for(in_database, 30, "the seven calls written")
    finally:
        engine.dispose()
    assert cost > 0  # gpt-5-codex is priced
    done = subprocess.run([sys.executable, "-m", "store.cli.stats", "keys", "--db", fleet.db_url, "--json"],
                          capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    [stats] = [k for k in json.loads(done.stdout) if k["client_key"] == "carol"]
    assert stats["requests"] == 7 and stats["cost"] == pytest.approx(cost, rel=1e-9)
    for relay in fleet.relays:  # either relay answers it from the shared database
        status, _, info = request(relay.port, "GET", "/v1/key", key=secret)
        assert status == 200 and info["usage"]["cost"] == pytest.approx(cost, rel=1e-9)
    served = {r["metric"]["instance"] for r in fleet.ask('codex_client_requests_total{client="carol"}')}
    assert len(served) == 2  # the balancer spread the calls: Prometheus sums the two relays' counters
    wait_for(lambda: (got := fleet.ask('sum(codex_client_cost_usd_total{client="carol"})'))
             and float(got[0]["value"][1]) == pytest.approx(cost, rel=1e-9), 30, "Prometheus to scrape the cost")



def idle(fleet: Fleet, secret: str) -> None:
    """Wait until no call of the key holds a fleet slot: a call's slot is freed just after its answer."""
    wait_for(lambda: request(fleet.relays[1].port, "GET", "/v1/key", key=secret)[2]["limits"]["concurrency"]["used"]
             == 0, 5, "the key's calls to free their slots")


def test_rpm_and_concurrency_hold_for_both_relays_together(fleet):
    a, b = fleet.relays
    secret = make_key(a, "erin", rpm=5, concurrency=2)
    known_on_both(fleet, secret)
    assert key_call(a.port, secret)[0] == 200
    idle(fleet, secret)
    fleet.node.behaviour.first_byte_delay = 1.0  # six calls at once, three on each relay: all overlap
    try:
        with ThreadPoolExecutor(6) as pool:
            burst = list(pool.map(lambda relay: key_call(relay.port, secret), [a, b] * 3))
    finally:
        fleet.node.behaviour.first_byte_delay = 0.0
    assert sorted(status for status, _, _ in burst) == [200, 200, 429, 429, 429, 429]  # 2 in flight, not 2 a relay
    assert {body["error"]["code"] for status, _, body in burst if status == 429} == {"concurrency_limited"}
    idle(fleet, secret)
    # 1 call before and 2 in the burst: 2 more are free in the minute, whichever relay is asked.
    answers = [key_call(relay.port, secret) for relay in (a, b, a, b)]
    assert [status for status, _, _ in answers] == [200, 200, 429, 429]
    assert answers[-1][2]["error"]["code"] == "rate_limited" and int(answers[-1][1]["retry-after"]) <= 60


def test_a_5_hour_window_holds_across_both_relays(fleet):
    a, b = fleet.relays
    secret = make_key(a, "fay", budgets=[{"window": "5h", "requests": 4}])
    known_on_both(fleet, secret)
    # 4 calls in the window on the two relays together, whichever answers.
    answers = [key_call(relay.port, secret) for relay in (a, b) * 3]
    assert [status for status, _, _ in answers] == [200] * 4 + [429] * 2
    assert {body["error"]["code"] for status, _, body in answers if status == 429} == {"budget_exceeded"}
    assert "5h_requests" in answers[-1][2]["error"]["message"]
    status, _, info = request(b.port, "GET", "/v1/key", key=secret)
    assert status == 200 and info["limits"]["5h_requests"]["used"] == 4


def test_a_weekly_cost_cap_of_one_model_holds_across_both_relays(fleet):
    a, b = fleet.relays
    secret = make_key(a, "gus", budgets=[{"window": "weekly", "cost": 0.01, "models": ["gpt-5-codex"]}])
    known_on_both(fleet, secret)
    # One call of the capped model costs more than the cap (1M input tokens): admitted while under, it uses
    # the week up once written, and then both relays refuse that model and serve others.
    assert key_call(a.port, secret, usage=(1_000_000, 0, 1000, 0))[0] == 200
    capped = lambda relay: key_call(relay.port, secret)  # noqa: E731
    wait_for(lambda: capped(b)[0] == 429, 30, "relay B to refuse the capped model once the call is written")
    status, headers, body = capped(a)
    assert (status, body["error"]["code"]) == (429, "budget_exceeded")
    assert "weekly_cost[gpt-5-codex]" in body["error"]["message"]
    assert all(key_call(relay.port, secret, model="gpt-5-mini")[0] == 200 for relay in (a, b))

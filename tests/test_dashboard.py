"""The Grafana dashboard shipped in examples/grafana-dashboard.json: every metric its queries name is one the
relay exports (in process), and every query answers with data from a real Prometheus scraping two relays.

Without /usr/bin/prometheus the second skips locally and fails under CI=true; ``./run.sh test`` installs
Debian's prometheus when it can (as root, with apt-get).
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from addon.nodes.routing import NodePool
from addon.observe.metrics import Budget, Metrics
from tests.support.calls import call, write_nodes
from tests.support.ci import unavailable
from tests.support.fakeupstream import FakeUpstream
from tests.support.ports import free_port
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for

DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana-dashboard.json"
PROMETHEUS = Path("/usr/bin/prometheus")
_NAME = re.compile(r"\bcodex_[a-z_]+\b")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def exported() -> set[str]:
    """The sample names /metrics can carry: each family's (an empty one too) with its type's suffixes."""
    metrics = Metrics(lambda: NodePool([]), lambda: None)
    metrics.count_budgets(lambda: [Budget("ci", "rpm", 60, 1)])
    return {f.name + s for f in text_string_to_metric_families(metrics.scrape().decode())
            for s in _SUFFIXES[f.type]}


def test_every_dashboard_query_names_exported_metrics():
    names = exported()
    assert len(queries()) >= 9
    for expr in queries():
        used = set(_NAME.findall(expr))
        assert used and used <= names, (expr, used - names)


@pytest.mark.e2e
def test_every_dashboard_query_answers_from_prometheus_scraping_two_relays(mariadb, tmp_path):
    if not PROMETHEUS.exists():
        unavailable("the Prometheus test", f"{PROMETHEUS} not installed (./run.sh test installs Debian's "
                    "prometheus when run as root)")
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "team"\nkey = "client-key"\nmodels = ["gpt-5*"]\ndaily_requests = 1000\n'
                    "monthly_cost = 100.0\nrpm = 1000\n")
    with ExitStack() as stack:
        node = stack.enter_context(FakeUpstream("n1"))
        nodes = write_nodes(tmp_path / "nodes.toml", [("n1", node.base_url, "k1", 1)])
        relays = []
        for name in ("relay1", "relay2"):
            relay = RelayProcess(db_url=mariadb, options={
                "codex_nodes": str(nodes), "codex_ping_interval": "0", "codex_source": name,
                "codex_client_keys": f"@{keys}", "codex_spool": str(tmp_path / f"spool-{name}.db")})
            relays.append(relay.start())
            stack.callback(relay.stop)
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text("global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: codex-relay\n"
                          "    static_configs:\n      - targets: [" + ", ".join(f"'127.0.0.1:{r.port}'" for r in relays)
                          + "]\n")
        log = stack.enter_context((tmp_path / "prometheus.log").open("w"))
        proc = subprocess.Popen([str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        stack.callback(proc.wait, 10)
        stack.callback(proc.terminate)
        wait_for(lambda: ready(port) or proc.poll() is not None, 60, "prometheus ready")
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]

        def ask(expr: str) -> list[dict]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            with urllib.request.urlopen(url, timeout=10) as resp:
                answer = json.load(resp)
            assert answer["status"] == "success", (expr, answer)
            return answer["data"]["result"]

        # Both relays scraped before the calls: the rates and increases see them happen.
        wait_for(lambda: len(ask("up == 1")) == 2, 30, "both relays scraped")
        # Two rounds of calls on each relay: successes, a refusal (its model) and a node's failure. A series is
        # born at its first call, and Prometheus counts its growth from its first sample: the second round is
        # what the rates and increases see.
        for n in (1, 2):
            for relay in relays:
                for _ in range(3):
                    assert call(relay, "responses", stream=True, usage=(100, 20, 10, 2))[0] == 200
                assert call(relay, "responses", stream=False, usage=(1, 0, 1, 0), model="claude-x")[0] == 400
                node.behaviour.status = 502
                assert call(relay, "responses", stream=False, usage=(1, 0, 1, 0))[0] == 502
                node.behaviour.status = 200
            wait_for(lambda n=n: ask(f"sum(codex_node_calls_total) == {8 * n}"), 30, f"round {n} scraped")
        for expr in queries():  # every panel shows something other than zero
            wait_for(lambda e=expr: any(float(r["value"][1]) > 0 for r in ask(e)), 30, f"data for {expr}")
        # What the panels show is what the relays counted: a failure and a refusal on each, each round.
        [refusals] = ask("sum(codex_client_refusals_total)")
        assert float(refusals["value"][1]) == 4
        [failures] = ask('sum(codex_node_failures_total{kind="failed"})')
        assert float(failures["value"][1]) == 4
        limits = {r["metric"]["limit"] for r in ask("max by (client, limit) (codex_key_limit)")}
        assert limits == {"daily_requests", "monthly_cost", "rpm"}


def ready(port: int) -> bool:
    """Whether Prometheus answers queries: it listens before it has opened its database (503 until then)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as resp:
            return resp.status == 200
    except OSError:  # refused, or an HTTPError 503 while it starts
        return False

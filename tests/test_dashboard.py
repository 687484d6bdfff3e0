"""The Grafana dashboard shipped in examples/grafana-dashboard.json: every metric its queries name is one the
relay exports (in process). That every query answers with data from a real Prometheus scraping two relays is
tests/test_fleet_e2e.py's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from addon.nodes.routing import NodePool
from addon.observe.metrics import Budget, Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana-dashboard.json"
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


"""The Grafana dashboard: structure, metric names and PromQL syntax."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from relay.metrics import Metrics

from ._util import DEPLOY, METRIC_NAME, require_tool

DASHBOARD = DEPLOY / "grafana" / "dbgrelay.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows included."""
    out = []
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def variable_queries(dashboard: dict) -> list[str]:
    out = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        out.append(query["query"] if isinstance(query, dict) else query)
    return out


def test_dashboard_shape(dashboard):
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "dbgrelay"
    [ds_var] = [v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert ds_var["type"] == "datasource"
    assert ds_var["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_panels_do_not_overlap(dashboard):
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]


def test_every_metric_in_the_dashboard_exists(dashboard):
    known = Metrics(version="test").metric_names()
    used: dict[str, str] = {}
    for title, expr in panel_queries(dashboard):
        for name in METRIC_NAME.findall(expr):
            used.setdefault(name, title)
    for query in variable_queries(dashboard):
        for name in METRIC_NAME.findall(query):
            used.setdefault(name, "variables")
    unknown = {name: title for name, title in used.items() if name not in known}
    assert unknown == {}
    # Histogram suffixes only on histograms: a base name must have a _bucket series.
    for name in used:
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix):
                assert name.removesuffix(suffix) + "_bucket" in known, name


def test_dashboard_covers_the_required_panels(dashboard):
    used = {name for _, expr in panel_queries(dashboard) for name in METRIC_NAME.findall(expr)}
    assert used >= {
        "dbgrelay_sessions_active",
        "dbgrelay_sessions_total",
        "dbgrelay_tunnel_bytes_total",
        "dbgrelay_auth_failures_total",
        "dbgrelay_tls_handshake_seconds_bucket",
        "dbgrelay_idle_kills_total",
        "dbgrelay_managed_servers",
        "dbgrelay_backend_up",
        "dbgrelay_forgotten_servers",
        "dbgrelay_audit_write_errors_total",
    }
    exprs = " ".join(expr for _, expr in panel_queries(dashboard))
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


_GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "$target": ".*",
}


def test_panel_queries_are_valid_promql(dashboard, tmp_path):
    # promtool parses every expression when checking recording rules, so turn
    # each panel query (with Grafana's variables filled in) into one.  JSON is
    # valid YAML, so no YAML library is needed.
    records = []
    for index, (_title, expr) in enumerate(panel_queries(dashboard)):
        for variable, value in _GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unhandled Grafana variable in {expr!r}"
        records.append({"record": f"dashboard:query_{index}", "expr": expr})
    rules = tmp_path / "dashboard.rules.json"
    rules.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": records}]}))
    tool = require_tool("promtool")
    result = subprocess.run(
        [tool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(records)} rules found" in result.stdout


def test_variable_queries_name_real_labels(dashboard):
    metrics = Metrics(version="test", targets=["x"])
    labels: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    queries = variable_queries(dashboard)
    assert queries
    for query in queries:
        match = re.fullmatch(r"label_values\((dbgrelay_[a-z_]+)(\{.*\})?, (\w+)\)", query)
        assert match, query
        metric, _selector, label = match.groups()
        # Prometheus adds instance (and job) to every scraped series.
        assert label in labels[metric] | {"instance", "job"}, query

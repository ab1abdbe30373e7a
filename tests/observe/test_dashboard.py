"""The operator's dashboard (deploy/grafana-dashboard.json): every query parses on a
real Prometheus and names only metrics the reconciler exports or an engine preset
reads, so it cannot drift from the code unnoticed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import requests
from observe_helpers import PrometheusStack

from reconciler.loop.reporting import LoopMetrics
from reconciler.observe.presets import LENGTH_PRESETS, PRESETS

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
# Grafana's variables, as a query reaches Prometheus with "All" selected.
VARIABLES = {"$__rate_interval": "1m", "$service": ".+", "$cluster": ".+"}
# PromQL's own words (functions, aggregations, keywords) the dashboard uses.
PROMQL_WORDS = {
    "by",
    "sum",
    "max",
    "min",
    "rate",
    "increase",
    "histogram_quantile",
    "or",
}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with the variables filled in) for every panel target."""
    out = []
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def _exported_names() -> set[str]:
    """Every series name the reconciler's /metrics can carry (a counter as
    ``_total``, a histogram as its ``_bucket``/``_sum``/``_count``)."""
    names = set()
    for family in LoopMetrics().registry.collect():
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def _preset_names() -> set[str]:
    """Every series name an engine preset reads (histograms by their buckets too)."""
    names = set()
    for preset in [*PRESETS.values(), *LENGTH_PRESETS.values()]:
        for spec in preset.values():
            for metric in (*spec.metrics, *getattr(spec, "minus", ())):
                names.update({metric, f"{metric}_bucket"})
    return names


def _selectors(expr: str) -> tuple[list[str], list[str]]:
    """(the metric names selected as ``name{...}``, any other identifier outside label
    matchers, strings and PromQL's own words: a bare selector the check would miss)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    selected = re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{", without_strings)
    outside = re.sub(r"\{[^}]*\}", "", without_strings)  # label matchers
    outside = re.sub(r"\[[^\]]*\]", "", outside)  # range selectors ([1m])
    outside = re.sub(r"by \([^)]*\)", "", outside)  # grouping labels
    words = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", outside)
    bare = [w for w in words if w not in PROMQL_WORDS and w not in selected]
    return selected, bare


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    text = " ".join(expr for _title, expr in _queries())
    for metric in (
        "heteroscale_current_instances",
        "heteroscale_target_instances",
        "heteroscale_slo_seconds",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "heteroscale_decisions_total",
        "heteroscale_services_held",
        "heteroscale_drift_items",
        "heteroscale_cycle_duration_seconds_bucket",
        "heteroscale_errors_total",
    ):
        assert metric in text, metric


@pytest.mark.parametrize("title,expr", _queries(), ids=[t for t, _e in _queries()])
def test_every_query_names_only_metrics_the_code_defines(title: str, expr: str) -> None:
    selected, bare = _selectors(expr)
    assert selected, f"{title}: no metric selected in {expr}"
    assert not bare, f"{title}: {bare} not written as name{{...}} selectors in {expr}"
    known = _exported_names() | _preset_names()
    unknown = [name for name in selected if name not in known]
    assert not unknown, f"{title}: {unknown} is neither exported nor read by a preset"


def test_every_query_parses_on_a_real_prometheus(prometheus_stack: PrometheusStack) -> None:
    """Each query as Grafana sends it (variables filled in) is accepted; the latency
    panels find the engines' histograms the stack's exporters serve."""
    url = prometheus_stack.prometheus.url + "/api/v1/query"
    answered = {}
    for title, expr in _queries():
        reply = requests.get(url, params={"query": expr}, timeout=10)
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", (title, expr, body)
        answered[expr] = body["data"]["result"]
    latency = [e for e in answered if e.startswith("histogram_quantile(0.9, sum by (service")]
    assert latency and all(answered[e] for e in latency), latency
    for variable in _dashboard()["templating"]["list"][1:]:
        name = re.match(r"label_values\((\w+), (\w+)\)", variable["definition"])
        assert name is not None and name[1] in _exported_names(), variable["definition"]

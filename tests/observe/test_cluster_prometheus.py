"""A Prometheus per cluster (``--cluster-prometheus-url CLUSTER=URL``): each cluster's
services are read from its own Prometheus, a cluster whose Prometheus is down holds
alone, and a cluster with none configured says so by name. East reads the session's
real Prometheus; west's is a loopback port nothing listens on (a Prometheus that is
down)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from loopback import unreachable_kubeconfig
from observe_helpers import (
    RATE_TOLERANCE,
    RATE_WINDOW_S,
    PrometheusStack,
    expected_metrics,
    make_policy,
)
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.commands.reconcile import Settings, cycle_settings, wire
from reconciler.desired import load_desired_state
from reconciler.errors import MetricsUnavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
DOWN_URL = "http://127.0.0.1:1"  # nothing listens on port 1


def _settings(tmp_path: Path, default: str | None, *per_cluster: str) -> Settings:
    return cycle_settings(
        repo=REPO_ROOT,
        kubeconfig=str(unreachable_kubeconfig(tmp_path / "kubeconfig")),
        placer="greedy",
        prometheus_url=default,
        cluster_prometheus_url=list(per_cluster),
        prometheus_scrape_interval=1.0,
        prometheus_rate_window=RATE_WINDOW_S,
        drain_window=0.0,
    )


@pytest.mark.prometheus
@pytest.mark.fault
def test_each_cluster_reads_its_own_prometheus_and_a_down_one_holds_only_its_cluster(
    prometheus_stack: PrometheusStack, tmp_path: Path
) -> None:
    state = load_desired_state(REPO_ROOT)
    east = state.clusters["prod-east"]
    west = east.model_copy(update={"name": "prod-west"})
    north = east.model_copy(update={"name": "prod-north"})
    wiring = wire(
        _settings(tmp_path, None, f"prod-east={prometheus_stack.url}", f"prod-west={DOWN_URL}"),
        state,
    )
    service = "live-tps"
    policy = make_policy(service)
    now_s = prometheus_stack.settled_now(service)

    read = wiring.metrics_for(east).fetch([policy], now_s)[service]
    expected = expected_metrics(prometheus_stack.scenarios[service], 0.9)["decode_tps"]
    assert read.decode_tps is not None
    assert read.decode_tps.value == pytest.approx(expected, rel=RATE_TOLERANCE)

    started = time.monotonic()
    with pytest.raises(MetricsUnavailable):
        wiring.metrics_for(west).fetch([policy], now_s)
    assert time.monotonic() - started < 10.0  # refused connections, not timeouts
    with pytest.raises(MetricsUnavailable, match="for cluster prod-north"):
        wiring.metrics_for(north).fetch([policy], now_s)

    # East still reads while west's Prometheus is down: its own source.
    again = wiring.metrics_for(east).fetch([policy], now_s)[service]
    assert again.decode_tps is not None and again.decode_tps.value == read.decode_tps.value


def test_a_cluster_without_its_own_url_reads_the_default(tmp_path: Path) -> None:
    state = load_desired_state(REPO_ROOT)
    east = state.clusters["prod-east"]
    west = east.model_copy(update={"name": "prod-west"})
    wiring = wire(_settings(tmp_path, DOWN_URL, "prod-west=http://127.0.0.1:2"), state)
    assert wiring.metrics_for(east).settings.url == DOWN_URL
    assert wiring.metrics_for(west).settings.url == "http://127.0.0.1:2"
    assert wiring.metrics_for(east) is wiring.metrics_for(east)


@pytest.mark.parametrize(
    "given, problem",
    [
        ("prod-east", "'prod-east' is not CLUSTER=URL"),
        ("=http://p:9090", "is not CLUSTER=URL"),
        ("prod-east=prometheus:9090", "is not an http:// or https:// URL with a host"),
        ("prod-east=http://p:99999", "is not a URL"),
    ],
)
def test_a_malformed_cluster_prometheus_url_is_a_usage_error(given: str, problem: str) -> None:
    result = CliRunner().invoke(
        app,
        ["plan", "--simulate", "--cluster-prometheus-url", given],
        terminal_width=200,
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "--cluster-prometheus-url" in text and problem in text


def test_a_cluster_given_twice_or_a_malformed_default_url_is_a_usage_error() -> None:
    twice = ["--cluster-prometheus-url", "a=http://p:1", "--cluster-prometheus-url", "a=http://q:1"]
    result = CliRunner().invoke(app, ["plan", "--simulate", *twice], terminal_width=200)
    assert result.exit_code == 2 and "cluster a is given twice" in result.output
    result = CliRunner().invoke(
        app, ["plan", "--simulate", "--prometheus-url", "localhost:9090"], terminal_width=200
    )
    assert result.exit_code == 2 and "--prometheus-url" in result.output


@pytest.mark.parametrize(
    "option, given",
    [
        ("--prometheus-url", "http://user:secretpw@p:99999"),
        ("--prometheus-url", "ftp://user:secretpw@p:9090"),
        ("--cluster-prometheus-url", "=http://user:secretpw@p:9090"),
        ("--cluster-prometheus-url", "prod-east=http://user:secretpw@p:99999"),
    ],
)
def test_a_refused_url_is_named_without_its_password(option: str, given: str) -> None:
    result = CliRunner().invoke(app, ["plan", "--simulate", option, given], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "user:***@p" in result.output and "secretpw" not in result.output, result.output

"""The documented Kubernetes scrape config
(``scripts/prometheus/kubernetes-scrape-config.example.yaml``): valid for Prometheus, and
its relabelling turns the applier's pod labels into the ``service``/``role`` labels the
presets read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests
from observe_helpers import (
    DECODE,
    ENGINE_JOB,
    PREFILL,
    RATE_TOLERANCE,
    RELABEL_SERVICE,
    REPO_ROOT,
    PrometheusStack,
    example_scrape_config,
    make_policy,
    settings_for,
)
from ruamel.yaml import YAML

from reconciler.desired import load_desired_state
from reconciler.observe.local_prometheus import find_binary
from reconciler.observe.presets import recording_rules
from reconciler.observe.prometheus import PrometheusMetricsSource

pytestmark = pytest.mark.prometheus


def test_example_config_passes_promtool(tmp_path: Path) -> None:
    """promtool checks every field and relabel rule. Debian's build lacks Kubernetes
    discovery, so the discovery blocks are swapped for static targets first."""
    promtool = find_binary("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    config = example_scrape_config()
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs"), job["job_name"]
        job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    path = tmp_path / "prometheus.yml"
    with path.open("w") as out:
        YAML(typ="safe").dump(config, out)
    done = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_engine_discovery_is_kept_to_the_namespaces_the_policies_serve_in() -> None:
    """Series are selected by their service and role labels: a pod outside the serving
    namespaces labelled like a service's would be counted as its instance."""
    jobs = {job["job_name"]: job for job in example_scrape_config()["scrape_configs"]}
    (discovery,) = jobs[ENGINE_JOB]["kubernetes_sd_configs"]
    namespaces = {policy.namespace for policy in load_desired_state(REPO_ROOT).policies.values()}
    assert set(discovery["namespaces"]["names"]) == namespaces


def test_kube_state_metrics_passes_only_the_pod_labels_the_join_reads() -> None:
    # honor_labels trusts its series' labels: nothing else of it may pose as an engine's.
    (job,) = (
        j
        for j in example_scrape_config()["scrape_configs"]
        if j["job_name"] == "kube-state-metrics"
    )
    assert job["honor_labels"] is True
    assert job["metric_relabel_configs"] == [
        {"source_labels": ["__name__"], "regex": "kube_pod_labels", "action": "keep"}
    ]


def test_relabelled_engine_pods_are_read_by_the_presets(prometheus_stack: PrometheusStack) -> None:
    now_s = prometheus_stack.settled_now(RELABEL_SERVICE)
    with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as source:
        metrics = source.fetch([make_policy(RELABEL_SERVICE)], now_s)[RELABEL_SERVICE]
    assert metrics.prefill_tps is not None
    assert metrics.prefill_tps.value == pytest.approx(
        PREFILL.prompt_tps - PREFILL.cached_prompt_tps, rel=RATE_TOLERANCE
    )
    assert metrics.decode_tps is not None
    assert metrics.decode_tps.value == pytest.approx(DECODE.generation_tps, rel=RATE_TOLERANCE)
    assert metrics.decode_kv_usage is not None and metrics.decode_kv_usage.value == DECODE.kv_usage
    # One pod per role here: each role's queue is that pod's waiting requests.
    assert metrics.prefill_queue is not None
    assert metrics.prefill_queue.value == PREFILL.waiting_requests
    assert metrics.decode_queue is not None
    assert metrics.decode_queue.value == DECODE.waiting_requests


def test_pods_without_the_service_label_are_not_scraped(prometheus_stack: PrometheusStack) -> None:
    up = requests.get(
        f"{prometheus_stack.url}/api/v1/query",
        params={"query": f'up{{job="{ENGINE_JOB}"}}'},
        timeout=5,
    ).json()["data"]["result"]
    assert sorted(series["metric"]["pod"] for series in up) == ["pod-d", "pod-p"]
    assert {series["metric"]["namespace"] for series in up} == {"serving"}


def test_generated_recording_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = find_binary("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    path = tmp_path / "rules.yml"
    with path.open("w") as out:
        YAML(typ="safe").dump(recording_rules(60, interval_s=30, offset_s=15), out)
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr

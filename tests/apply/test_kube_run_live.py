"""``heteroscale run`` end to end on the real services, as a cluster runs it: the real
API server (nodes, Deployments, the Lease, the state ConfigMap), a real Prometheus
scraping ``FleetExporter`` in vLLM's metric names (token rates, latency histograms,
waiting requests, prompt- and output-length histograms) and the default planner, all
wired by the command line alone. Each part has its own tests; this one checks that
they hold together through the process an operator starts."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import pytest
from kubetestkit import (
    ControlPlane,
    create_nodes,
    ensure_namespace,
    list_deployments,
    make_desired_state,
)
from ruamel.yaml import YAML
from typer.testing import CliRunner

from reconciler.apply.kubeclient import NotFound, leases_path
from reconciler.apply.statestore import (
    ConfigMapStateStore,
    configmap_name,
    configmaps_path,
    memory_shard_names,
)
from reconciler.cli import app
from reconciler.durable import DEFAULT_MEMORY_SHARDS, DurableState
from reconciler.observe.exporter import (
    ONE_TOKEN,
    DiscreteLengths,
    FleetExporter,
    InstanceLoad,
    Lognormal,
)
from reconciler.observe.local_prometheus import LocalPrometheus
from reconciler.policy.planner import PlannerMemory

pytestmark = [pytest.mark.kubernetes, pytest.mark.prometheus]

STATE_NAMESPACE = "run-live-home"
CLUSTER = "run-live"
WINDOW_S = 6.0  # six one-second scrapes
PROMPTS = DiscreteLengths(((300.0, 0.5), (1200.0, 0.4), (6000.0, 0.1)))
OUTPUTS = DiscreteLengths(((60.0, 0.5), (250.0, 0.4), (900.0, 0.1)))


def _engines() -> FleetExporter:
    """One prefill and one decode engine of ``svc``, busy and with requests queued."""
    exporter = FleetExporter()
    exporter.set_load(
        "svc",
        "prefill",
        "p0",
        InstanceLoad(
            prompt_tps=9000.0,
            requests_per_s=8.0,
            ttft=Lognormal.from_median_p90(0.3, 0.6),
            gpus=2,
            prompt_lengths=PROMPTS,
            output_lengths=ONE_TOKEN,
            waiting_requests=6.0,
        ),
    )
    exporter.set_load(
        "svc",
        "decode",
        "d0",
        InstanceLoad(
            generation_tps=9000.0,
            requests_per_s=8.0,
            tbt=Lognormal.from_median_p90(0.025, 0.04),
            kv_usage=0.4,
            prompt_lengths=PROMPTS,
            output_lengths=OUTPUTS,
            waiting_requests=1.0,
        ),
    )
    return exporter


def _run_args(control_plane: ControlPlane, repo: Path, url: str | None) -> list[str]:
    """`run` on ``repo`` against the control plane, as replica-a, with a 1 s interval
    (reading Prometheus at ``url``; None: no Prometheus)."""
    prometheus = (
        [
            "--prometheus-url",
            url,
            "--prometheus-scrape-interval",
            "1",
            "--prometheus-rate-window",
            str(WINDOW_S),
        ]
        if url is not None
        else []
    )
    return [
        "run",
        "--repo",
        str(repo),
        "--kubeconfig",
        str(control_plane.kubeconfig),
        *prometheus,
        "--lease-namespace",
        STATE_NAMESPACE,
        "--identity",
        "replica-a",
        "--placer",
        "greedy",
        "--drain-window",
        "0",
        "--interval",
        "1",
        "--listen",
        "127.0.0.1:0",
    ]


def _run(control_plane: ControlPlane, repo: Path, url: str, *extra: str) -> list[dict]:
    result = CliRunner().invoke(
        app, [*_run_args(control_plane, repo, url), "--log-format", "json", *extra]
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]


def _cluster(control_plane: ControlPlane, repo: Path, cluster: str) -> None:
    """The desired state for ``cluster`` in ``repo``, its nodes and namespaces on the
    API server, and no state object yet."""
    state = make_desired_state(repo, cluster, affinity="cluster")
    client = control_plane.client()
    for namespace in (cluster, STATE_NAMESPACE):
        ensure_namespace(client, namespace)
    create_nodes(client, state.clusters[cluster])
    for name in (configmap_name(cluster), *memory_shard_names(cluster, DEFAULT_MEMORY_SHARDS)):
        with contextlib.suppress(NotFound):
            client.delete(configmaps_path(STATE_NAMESPACE, name))


def _serve(prometheus: LocalPrometheus, exporter: FleetExporter) -> None:
    """Prometheus scraping ``exporter`` (started), with a whole window of samples."""
    exporter.start()
    prometheus.set_targets([exporter.address])
    prometheus.start()
    prometheus.wait_for_targets([exporter.address], timeout_s=30)
    time.sleep(WINDOW_S + 2)  # rate() reads the load


def _stored(control_plane: ControlPlane, cluster: str) -> DurableState:
    """The state a new process reads: the state object and its memory shards."""
    stored = ConfigMapStateStore(control_plane.client(), STATE_NAMESPACE, "reader").load(cluster)
    assert stored is not None
    return stored


def _stored_memory(control_plane: ControlPlane, cluster: str) -> PlannerMemory:
    memory = _stored(control_plane, cluster).histories["svc"].planner
    assert isinstance(memory, PlannerMemory)
    return memory


def test_run_scales_from_engine_metrics_and_keeps_the_planners_memory(
    control_plane: ControlPlane, tmp_path: Path, prometheus: LocalPrometheus
) -> None:
    repo = tmp_path / "repo"
    _cluster(control_plane, repo, CLUSTER)
    client = control_plane.client()
    exporter = _engines()
    try:
        _serve(prometheus, exporter)

        # A wrong scrape interval is named at start (a 1.5 s window at an assumed 0.5 s
        # must hold 3 samples; at the real 1 s it holds 1.5).
        events = _run(
            control_plane,
            repo,
            prometheus.url,
            "--prometheus-scrape-interval",
            "0.5",
            "--prometheus-rate-window",
            "1.5",
            "--dry-run",
            "--cycles",
            "1",
        )
        mismatch = [e for e in events if e.get("event") == "scrape_interval_mismatch"]
        assert mismatch and "the slowest every 1 s" in mismatch[0]["msg"], events

        events = _run(control_plane, repo, prometheus.url, "--cycles", "4")
    finally:
        exporter.stop()
    kinds = [e.get("event") for e in events]
    assert "cycle_crash" not in kinds and "state_write_failed" not in kinds, events
    assert "scrape_interval_mismatch" not in kinds, events
    cycles = [e for e in events if e.get("event") == "cycle"]
    assert len(cycles) == 4, kinds

    # Sized from the engines' load, above the floor a holding loop would create (one
    # group: 2 prefill, 4 decode): 9,000 output tokens/s at the policy's 1,000 per
    # decode instance is 9 or more, and prefill is sized from the model for the
    # exported prompt mix.
    replicas: dict[str, int] = {"prefill": 0, "decode": 0}
    for d in list_deployments(client, CLUSTER).values():
        replicas[d["metadata"]["labels"]["heteroscale.io/role"]] += d["spec"]["replicas"]
    assert replicas["decode"] >= 9 and replicas["prefill"] >= 1, replicas

    # Every cycle's state was written (the windows: a recommendation a cycle); the
    # planner's memory went to its memory shard with the first write and, the later
    # cycles coming within MEMORY_WRITE_INTERVAL_S, again when the process stopped
    # (``flush_memories``): the forecaster has one sample a cycle, the queues were read.
    stored = _stored(control_plane, CLUSTER)
    assert len(stored.histories["svc"].recommendations) == 4
    memory = _stored_memory(control_plane, CLUSTER)
    assert memory.prefill_demand.samples == 4, memory.prefill_demand
    assert memory.prefill_backlog and memory.decode_backlog
    assert memory.mix is not None
    assert math.isclose(memory.mix.prompt_mean_tokens, PROMPTS.mean_tokens, rel_tol=0.5)


def test_run_reads_the_histograms_from_the_rules_the_command_prints(
    control_plane: ControlPlane, tmp_path: Path, prometheus: LocalPrometheus
) -> None:
    """The large-fleet mode end to end: ``heteroscale prometheus-rules`` for the same
    interval and window, loaded into Prometheus, and ``run --prometheus-recording-rules``
    reading the latency and length histograms from the recorded series."""
    repo, cluster = tmp_path / "repo", "run-live-rules"
    _cluster(control_plane, repo, cluster)
    windows = ["--prometheus-scrape-interval", "1", "--prometheus-rate-window", str(WINDOW_S)]
    printed = CliRunner().invoke(app, ["prometheus-rules", "--repo", str(repo), *windows])
    assert printed.exit_code == 0, printed.output
    prometheus.rules = YAML(typ="safe").load(printed.output)
    exporter = _engines()
    try:
        _serve(prometheus, exporter)
        # The memories in the state object (no shards): written every cycle.
        events = _run(
            control_plane,
            repo,
            prometheus.url,
            "--prometheus-recording-rules",
            "--cycles",
            "3",
            "--state-memory-shards",
            "0",
        )
    finally:
        exporter.stop()
    kinds = [e.get("event") for e in events]
    assert "recording_rules_missing" not in kinds and "cycle_crash" not in kinds, events
    memory = _stored_memory(control_plane, cluster)
    assert memory.prefill_demand.samples == 3  # every cycle read usable rates
    assert memory.mix is not None  # the length histograms, from the recorded series
    assert math.isclose(memory.mix.output_mean_tokens, OUTPUTS.mean_tokens, rel_tol=0.5)


def test_a_dry_run_never_takes_the_lease_the_writing_replicas_share(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """`run --dry-run` writes nothing, so it must not hold the Lease: a dry-run replica
    that took it at a rolling update kept the real replicas standby, and nothing was
    applied while /healthz answered 200 on both."""
    repo = tmp_path / "repo"
    _cluster(control_plane, repo, "run-dry")
    result = CliRunner().invoke(
        app,
        [
            *_run_args(control_plane, repo, None),
            "--lease-name",
            "run-dry-lease",
            "--dry-run",
            "--cycles",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    with pytest.raises(NotFound):
        control_plane.client().get(leases_path(STATE_NAMESPACE, "run-dry-lease"))
    assert list_deployments(control_plane.client(), "run-dry") == {}

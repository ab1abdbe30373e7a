"""Faults at loop level, against the real services: a ``ReconcileLoop`` wired as
``heteroscale run`` wires it (Kubernetes backend on the real API server; a real
Prometheus scraping ``FleetExporter``, which plays the engines; the desired state
read from a Git branch) while the fault happens.

- Prometheus stops mid-run: every service holds (no Deployment changes), each
  cycle reports ``MetricsUnavailable`` and the metrics say so, the replica stays
  alive; Prometheus starts again on the same storage: the windows right after the
  gap are only partly covered by samples (``WindowCoverage``), so the loop keeps
  holding instead of scaling in on the low ``rate()``, and acts again once a whole
  window is covered.
- A broken commit lands on the branch the loop follows: it keeps reconciling the
  last known good revision, reports the error (``heteroscale_desired_state_valid
  0``, the state ConfigMap still names the good revision); the fixing commit is
  applied on the next cycle.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from pathlib import Path

import pytest
from kubetestkit import (
    ControlPlane,
    commit_all,
    create_nodes,
    ensure_namespace,
    git,
    list_deployments,
    make_desired_state,
)

from reconciler.apply.backend import ApplyOptions, KubernetesBackend
from reconciler.apply.kubeclient import KubeClient, NotFound
from reconciler.apply.statestore import ConfigMapStateStore, configmap_name, configmaps_path
from reconciler.commands.reconcile import build_loop, cycle_settings
from reconciler.desired import load_desired_state
from reconciler.durable import decode
from reconciler.loop import ClusterOutcome, ReconcileLoop, serve_http
from reconciler.observe import local_prometheus
from reconciler.observe.exporter import FleetExporter, InstanceLoad
from reconciler.observe.local_prometheus import LocalPrometheus
from reconciler.observe.prometheus import PrometheusMetricsSource, PrometheusSettings
from reconciler.placement.greedy import GreedyPlacer
from reconciler.policy import make_autoscaler

pytestmark = [pytest.mark.kubernetes, pytest.mark.fault]

STATE_NAMESPACE = "loop-fault-home"


def _metric(loop: ReconcileLoop, name: str, **labels: str) -> float:
    value = loop.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _replicas(client: KubeClient, namespace: str) -> dict[str, int]:
    return {n: d["spec"]["replicas"] for n, d in list_deployments(client, namespace).items()}


def _by_role(client: KubeClient, namespace: str) -> dict[str, int]:
    """Replicas of our Deployments per role."""
    out = {"prefill": 0, "decode": 0}
    for d in list_deployments(client, namespace).values():
        out[d["metadata"]["labels"]["heteroscale.io/role"]] += d["spec"]["replicas"]
    return out


# ------------------------------------------------------------ Prometheus stops


WINDOW_S = 6.0  # rate window: 6 one-second scrapes; covered from 5 samples on
# No stabilisation at all: a single low reading would scale in at once, so only the
# coverage check stands between a partly covered window and a scale-in.
SCALE_IN_WINDOW_S = 0.0
TARGET_TPS = 1000.0  # decode tokens/s per instance
PROM_POLICY = """\
name: {service}
model: {{name: test-model, params_b: 8, kv_bytes_per_token: 131072}}
cluster: {cluster}
namespace: {cluster}
slo: {{ttft_ms: 1000, tbt_ms: 50}}
prefill: {{gpus_per_instance: 2, gpu_types: {{h800: 1.0}}, template: templates/prefill.yaml, min_instances: 1, max_instances: 8}}
decode: {{gpus_per_instance: 1, gpu_types: {{h20: 1.0}}, template: templates/decode.yaml, min_instances: 1, max_instances: 12}}
pd_ratio: {{target: "1:2", min: "1:8", max: "2:1"}}
deployment_group: {{prefill_instances: 2, decode_instances: 8}}
affinity: cluster
scaling:
  target_per_instance: {target}
  prefill_target_per_instance: {target}
  scale_in_window_s: {scale_in}
  cooldown_s: 0
  metric_max_age_s: 30
"""


def _decode_load(total_tps: float) -> InstanceLoad:
    return InstanceLoad(generation_tps=total_tps, requests_per_s=1.0, kv_usage=0.3)


def _prefill_load(total_tps: float) -> InstanceLoad:
    return InstanceLoad(prompt_tps=total_tps, requests_per_s=1.0)


@pytest.mark.prometheus
def test_prometheus_stopping_mid_run_holds_every_service_and_the_loop_resumes_without_scaling_in(
    control_plane: ControlPlane,
    tmp_path: Path,
    prometheus: LocalPrometheus,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster, service = "loop-prom", "svc"
    make_desired_state(tmp_path, cluster, services=(service,), affinity="cluster")
    (tmp_path / "policies" / f"{service}.yaml").write_text(
        PROM_POLICY.format(
            service=service, cluster=cluster, target=TARGET_TPS, scale_in=SCALE_IN_WINDOW_S
        )
    )
    state = load_desired_state(tmp_path)
    client = control_plane.client()
    ensure_namespace(client, cluster)
    create_nodes(client, state.clusters[cluster])

    # The engines: 3,500 decode tokens/s (4 instances at 1,000 each), 1,500 prompt
    # tokens/s (2 prefill instances).
    exporter = FleetExporter()
    exporter.set_load(service, "decode", "d0", _decode_load(3500.0))
    exporter.set_load(service, "prefill", "p0", _prefill_load(1500.0))
    exporter.start()
    try:
        prometheus.set_targets([exporter.address])
        prometheus.start()
        prometheus.wait_for_targets([exporter.address], timeout_s=30)
        time.sleep(WINDOW_S + 2)  # a whole window of samples: rate() reads the load
        port = prometheus.port
        settings = PrometheusSettings(
            url=prometheus.url,
            rate_window_s=WINDOW_S,
            scrape_interval_s=1.0,
            timeout_s=2.0,
            retries=0,
            lengths=(),
        )
        source = PrometheusMetricsSource(settings)
        loop = ReconcileLoop(
            load_desired=lambda: state,
            backend_for=lambda spec: KubernetesBackend(
                client, state=state, options=ApplyOptions(soft_scale_in_window_s=0)
            ),
            metrics_for=lambda spec: source,
            autoscaler=make_autoscaler("heteroscale"),
            placer=GreedyPlacer(),
            interval_s=1.0,
        )
        server = serve_http(loop, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{server.server_address[1]}"

        def cycle() -> ClusterOutcome:
            (outcome,) = loop.run_cycle().clusters
            assert outcome.outcome == "ok", outcome.error
            return outcome

        try:
            # The loop sizes the service from the load, then has nothing left to do.
            deadline = time.monotonic() + 30
            while True:
                outcome = cycle()
                assert outcome.plan is not None
                decision = outcome.plan.decisions[service]
                if decision.reason != "metrics_missing" and not outcome.plan.has_changes:
                    break
                assert time.monotonic() < deadline, decision
                time.sleep(0.5)
            before = _replicas(client, cluster)
            assert _by_role(client, cluster)["decode"] == 4, (before, decision)
            assert _metric(loop, "heteroscale_metrics_available", cluster=cluster) == 1

            # Prometheus goes away mid-run.
            prometheus.stop()
            down_since = time.monotonic()
            unavailable_before = _metric(
                loop, "heteroscale_errors_total", cluster=cluster, kind="MetricsUnavailable"
            )
            cycles_down = 0
            while time.monotonic() - down_since < WINDOW_S + 2:  # longer than the window
                outcome = cycle()
                cycles_down += 1
                assert outcome.metrics_error is not None
                assert outcome.metrics_error.startswith("MetricsUnavailable"), outcome.metrics_error
                assert outcome.plan is not None and outcome.plan.decisions
                assert {d.reason for d in outcome.plan.decisions.values()} == {"metrics_missing"}
                assert not outcome.plan.has_changes
                assert _replicas(client, cluster) == before, "held while Prometheus is down"
                time.sleep(0.5)
            assert (
                _metric(
                    loop, "heteroscale_errors_total", cluster=cluster, kind="MetricsUnavailable"
                )
                == unavailable_before + cycles_down
            )
            assert _metric(loop, "heteroscale_metrics_available", cluster=cluster) == 0
            text = urllib.request.urlopen(base + "/metrics").read().decode()
            assert f'heteroscale_metrics_available{{cluster="{cluster}"}} 0.0' in text
            assert urllib.request.urlopen(base + "/healthz").status == 200, (
                "a Prometheus outage is no reason to restart the reconciler"
            )

            # Meanwhile the load grew: 5,500 tokens/s want 6 decode instances.
            exporter.set_load(service, "decode", "d0", _decode_load(5500.0))
            # Prometheus comes back on the same storage and address.
            monkeypatch.setattr(local_prometheus, "free_loopback_port", lambda: port)
            prometheus.start()
            back = time.monotonic()
            seen: list[tuple[float, str, str, int]] = []  # (s after, reason, gap, decode)
            deadline = back + 45
            while True:
                outcome = cycle()
                assert outcome.metrics_error is None, outcome.metrics_error
                assert outcome.plan is not None and source.last_report is not None
                gap = next(
                    (
                        g.reason
                        for g in source.last_report.gaps
                        if (g.service, g.signal) == (service, "decode_tps")
                    ),
                    "",
                )
                live = _by_role(client, cluster)
                decision = outcome.plan.decisions[service]
                seen.append(
                    (round(time.monotonic() - back, 1), decision.reason, gap, live["decode"])
                )
                assert live["decode"] >= 4, ("scaled in after the gap", seen)
                if live["decode"] == 6:
                    break
                assert time.monotonic() < deadline, seen
                time.sleep(0.3)
            # The windows right after the gap were read as missing (held), not low.
            assert any(gap.startswith("window not covered") for _, _, gap, _ in seen), seen
            assert all(reason == "metrics_missing" for _, reason, gap, _ in seen if gap), seen
            assert _metric(loop, "heteroscale_metrics_available", cluster=cluster) == 1
        finally:
            server.shutdown()
            server.server_close()
            source.close()
    finally:
        exporter.stop()


# ------------------------------------------------------------ a broken commit


def _images(client: KubeClient, namespace: str) -> dict[str, str]:
    return {
        d["metadata"]["labels"]["heteroscale.io/role"]: d["spec"]["template"]["spec"]["containers"][
            0
        ]["image"]
        for d in list_deployments(client, namespace).values()
    }


def test_the_loop_holds_a_broken_commit_at_the_last_good_one_and_picks_up_the_fix(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    cluster = "loop-git"
    repo = tmp_path / "repo"
    state = make_desired_state(repo, cluster)
    git(repo, "init", "-q", "-b", "main")
    good = commit_all(repo, "good")
    client = control_plane.client()
    ensure_namespace(client, cluster)
    ensure_namespace(client, STATE_NAMESPACE)
    create_nodes(client, state.clusters[cluster])
    with contextlib.suppress(NotFound):
        client.delete(configmaps_path(STATE_NAMESPACE, configmap_name(cluster)))
    # Wired as `heteroscale run --rev main` wires it (no Prometheus: every service
    # holds, which from nothing is its floor), with the state store next to the Lease.
    settings = cycle_settings(
        repo=repo,
        rev="main",
        kubeconfig=str(control_plane.kubeconfig),
        cluster=[cluster],
        placer="greedy",
        drain_window=0.0,
    )
    loop, _wiring = build_loop(settings, dry_run=False, interval_s=0.1)
    store = ConfigMapStateStore(client, STATE_NAMESPACE, "replica-a")
    loop.state_store, loop.identity = store, "replica-a"
    server = serve_http(loop, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def metric(name: str) -> str:
        text = urllib.request.urlopen(base + "/metrics").read().decode()
        (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
        return line.split()[1]

    def stored_revision() -> str:
        obj = client.get(configmaps_path(STATE_NAMESPACE, configmap_name(cluster)))
        stored = decode(obj["data"]["state.json"])
        assert stored.revision is not None and stored.last_plan is not None
        assert stored.last_plan.revision == stored.revision.id
        return stored.revision.id

    try:
        first = loop.run_cycle()
        assert first.desired_error is None and first.clusters[0].applied
        assert _images(client, cluster) == {
            "prefill": "example.invalid/engine:prefill",
            "decode": "example.invalid/engine:decode",
        }
        assert stored_revision() == good and metric("heteroscale_desired_state_valid") == "1.0"

        # A commit that changes the decode image and breaks the policy file.
        template = repo / "templates" / "decode.yaml"
        template.write_text(template.read_text().replace("engine:decode", "engine:decode-v2"))
        policy = repo / "policies" / "svc.yaml"
        valid_policy = policy.read_text()
        policy.write_text(
            valid_policy.replace("target_per_instance: 1000", "target_per_instance: -1")
        )
        broken = commit_all(repo, "broken")
        for _ in range(2):
            result = loop.run_cycle()
            assert result.desired_error is not None and "policies/svc.yaml" in result.desired_error
            (outcome,) = result.clusters
            assert outcome.outcome == "ok" and outcome.applied, outcome.error
            assert not outcome.has_changes, "the last known good revision is still in force"
        assert _images(client, cluster)["decode"] == "example.invalid/engine:decode"
        assert metric("heteroscale_desired_state_valid") == "0.0"
        assert urllib.request.urlopen(base + "/readyz").status == 200
        assert stored_revision() == good, "the broken revision is never recorded"

        # The fix lands: the next cycle applies it (with the new image).
        policy.write_text(valid_policy)
        fixed = commit_all(repo, "fixed")
        assert fixed != broken
        result = loop.run_cycle()
        assert result.desired_error is None
        (outcome,) = result.clusters
        assert outcome.applied and outcome.has_changes
        assert _images(client, cluster)["decode"] == "example.invalid/engine:decode-v2"
        assert metric("heteroscale_desired_state_valid") == "1.0"
        assert stored_revision() == fixed
        assert loop.last_good is not None and loop.last_good.revision == fixed
    finally:
        server.shutdown()
        server.server_close()

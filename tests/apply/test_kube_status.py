"""`heteroscale status` against the real API server: Synced after `apply`, the applied
revision from the state ConfigMap once `apply` or `run` wrote it, and OutOfSync
naming the service whose Deployment someone scaled by hand."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from kubetestkit import (
    ControlPlane,
    cluster_for_cli,
    ensure_namespace,
    list_deployments,
    list_pods,
    wait_for,
)
from typer.testing import CliRunner

from reconciler.apply.kubeclient import deployments_path, leases_path
from reconciler.apply.lease import format_micro_time
from reconciler.cli import app

pytestmark = pytest.mark.kubernetes


def _status(common: list[str]) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["status", *common, "--format", "json"])
    assert result.exit_code in (0, 3, 4), result.output
    return result.exit_code, json.loads(result.stdout)


def test_status_after_apply_run_and_a_hand_scale(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    name = "status-e2e"
    home = "status-home"
    _state, common = cluster_for_cli(control_plane, tmp_path, name, ("alpha", "beta"))
    client = control_plane.client()
    ensure_namespace(client, home)
    where = [*common, "--lease-namespace", home]
    runner = CliRunner()

    code, before = _status(where)
    assert code == 3 and {s["sync"] for s in before["clusters"][0]["services"]} == {"OutOfSync"}
    assert before["leader"]["holder"] is None and "no Lease" in before["leader"]["describe"]
    assert before["clusters"][0]["revision"]["revision"] == "unknown"

    assert runner.invoke(app, ["apply", *where]).exit_code == 0
    wait_for(
        lambda: all(
            p["spec"].get("nodeName") for p in client.list(f"/api/v1/namespaces/{name}/pods")
        ),
        what="scheduled pods",
    )
    code, after = _status(where)
    (cluster,) = after["clusters"]
    services = {s["service"]: s for s in cluster["services"]}
    assert set(services) == {"alpha", "beta"}
    assert {s["sync"] for s in services.values()} == {"Synced"}, services
    # No Prometheus: every decision holds on missing metrics, which is Degraded.
    assert {s["health"] for s in services.values()} == {"Degraded"}
    assert all(s["holds"][0]["kind"] == "metrics_missing" for s in services.values())
    assert code == 4, "synced but not healthy"
    # `apply` recorded what it applied (a content hash: the repository is a directory).
    applied = cluster["revision"]
    assert applied["revision"].startswith("sha256:") and applied["applied_at"]
    assert applied["label"] == str(tmp_path)

    # One cycle of the loop writes the state ConfigMap too (nothing to change).
    ran = runner.invoke(
        app,
        [
            "run",
            *where,
            "--cycles",
            "1",
            "--interval",
            "0.2",
            "--listen",
            "127.0.0.1:0",
            "--no-leader-elect",  # a cycle before the first election would be a standby's
        ],
    )
    assert ran.exit_code == 0, ran.output
    code, stored = _status(where)
    revision = stored["clusters"][0]["revision"]
    assert revision["revision"].startswith("sha256:") and revision["applied_at"]
    assert revision["label"] == str(tmp_path)
    assert "no Lease" in stored["leader"]["describe"]
    # A replica holds the Lease: status names it and when it renewed.
    renewed = format_micro_time(time.time())
    client.request(
        "POST",
        leases_path(home),
        body={
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "heteroscale-reconciler", "namespace": home},
            "spec": {
                "holderIdentity": "replica-1",
                "leaseDurationSeconds": 15,
                "renewTime": renewed,
            },
        },
    )
    code, led = _status(where)
    assert led["leader"]["holder"] == "replica-1" and led["leader"]["renew_time"] == renewed
    text = runner.invoke(app, ["status", *where])
    assert f"revision {revision['revision'][:19]} ({tmp_path}) applied" in text.stdout

    # Someone scales one of alpha's Deployments by hand.
    victim = next(n for n in list_deployments(client, name) if n.startswith("alpha-"))
    client.merge_patch(
        deployments_path(name, victim), {"spec": {"replicas": 9}}, field_manager="kubectl-edit"
    )
    code, drifted = _status(where)
    services = {s["service"]: s for s in drifted["clusters"][0]["services"]}
    assert code == 3
    assert services["alpha"]["sync"] == "OutOfSync" and services["beta"]["sync"] == "Synced"
    assert any(victim in c for c in services["alpha"]["changes"]), services["alpha"]
    assert any(
        h["kind"] == "drift" and "kubectl-edit" in h["why"] for h in services["alpha"]["holds"]
    )
    text = runner.invoke(app, ["status", *where])
    assert text.exit_code == 3
    assert any(line.split()[:2] == ["alpha", "OutOfSync"] for line in text.stdout.splitlines()), (
        text.stdout
    )


def test_status_cuts_a_10_kb_lease_holder_the_api_server_stored(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Anyone who may edit the Lease writes its holder: 10 KB of it, escapes included,
    is one leader line of bounded length in `status` text, escaped."""
    name = "status-holder"
    home = "status-holder-home"
    _state, common = cluster_for_cli(control_plane, tmp_path, name, ("alpha",))
    client = control_plane.client()
    ensure_namespace(client, home)
    holder = "evil\x1b[2J\r\nfake line" + "A" * 10_000
    client.request(
        "POST",
        leases_path(home),
        body={
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "heteroscale-reconciler", "namespace": home},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": 15,
                "renewTime": format_micro_time(time.time()),
            },
        },
    )
    text = CliRunner().invoke(app, ["status", *common, "--lease-namespace", home]).stdout
    (line,) = [line for line in text.splitlines() if line.startswith("leader: ")]
    assert line.startswith("leader: evil\\x1b[2J\\r\\nfake lineAAA") and "A… (renewed " in line
    assert "\x1b" not in text and len(line) < 400
    assert not any(line.startswith("fake line") for line in text.splitlines())


def test_status_says_which_planner_memories_a_restart_would_resume(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The memories the state objects hold, in how many shards, and a shard that cannot
    be read (its services' planners would start afresh), without changing the exit
    code: nothing is out of sync for it."""
    from reconciler.apply.statestore import (
        ConfigMapStateStore,
        configmaps_path,
        memory_shard_names,
    )
    from reconciler.durable import DurableState, memory_shard_of
    from reconciler.policy.base import PolicyHistory
    from reconciler.policy.planner import PlannerMemory

    name = "status-memories"
    home = "status-memories-home"
    _state, common = cluster_for_cli(control_plane, tmp_path, name, ("alpha", "beta"))
    client = control_plane.client()
    ensure_namespace(client, home)
    where = [*common, "--lease-namespace", home]
    code, nothing = _status(where)
    assert nothing["clusters"][0]["memories"] is None  # no state object yet

    histories = {s: PolicyHistory(planner=PlannerMemory(mix_at_s=5.0)) for s in ("alpha", "beta")}
    store = ConfigMapStateStore(client, home, "writer", memory_shards=8)
    assert store.save(DurableState(name, 5.0, "writer", histories=histories))
    code, stored = _status(where)
    assert stored["clusters"][0]["memories"] == {"services": 2, "shards": 8, "problems": []}
    text = CliRunner().invoke(app, ["status", *where])
    assert "planner memories: 2 service(s) in 8 memory shards" in text.stdout

    # One shard corrupted: the memory it held is reported lost, the exit code stays.
    shard = memory_shard_names(name, 8)[memory_shard_of("alpha", 8)]
    client.merge_patch(
        configmaps_path(home, shard),
        {"data": {"memories.json": "{not json"}},
        field_manager="kubectl-edit",
    )
    again, broken = _status(where)
    memories = broken["clusters"][0]["memories"]
    lost = 1 + (memory_shard_of("beta", 8) == memory_shard_of("alpha", 8))
    assert memories["services"] == 2 - lost and memories["shards"] == 8
    assert len(memories["problems"]) == 1 and shard in memories["problems"][0]
    assert again == code


@pytest.mark.fault
def test_status_calls_a_refused_rollout_refused_not_drift(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """A cluster file's topology label key that no Node carries: the rollouts are
    refused before any write (no Node could run the new Pods). Nothing was changed
    outside Git, so status holds them as refused writes, with why, not as drift (an
    alert on drift holds would send someone looking for a hand edit)."""
    name = "status-refused"
    state, common = cluster_for_cli(control_plane, tmp_path, name, ("alpha",))
    assert CliRunner().invoke(app, ["apply", *common]).exit_code == 0

    cluster_file = tmp_path / "clusters" / f"{name}.yaml"
    s2_key = state.clusters[name].labels.s2
    cluster_file.write_text(cluster_file.read_text().replace(f"s2: {s2_key},", f"s2: {s2_key}x,"))
    code, report = _status(common)
    assert code == 3
    ((alpha),) = report["clusters"][0]["services"]
    assert alpha["sync"] == "OutOfSync" and alpha["health"] == "Degraded"
    refused = [h for h in alpha["holds"] if h["kind"] == "refused"]
    assert len(refused) == 2, alpha["holds"]  # its prefill and decode Deployments
    assert all(f"no node has a label '{s2_key}x'" in h["why"] for h in refused), refused
    assert [h for h in alpha["holds"] if h["kind"] == "drift"] == []
    text = CliRunner().invoke(app, ["status", *common], terminal_width=400).stdout
    assert "alpha: hold (refused) " in text and "hold (drift)" not in text


def test_plan_and_apply_do_not_say_the_cluster_matches_while_a_hand_edit_is_held(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Someone adds a container to a managed Deployment and pauses it: the cycle holds
    the edit (drift is not overwritten without ``--force``), so it has nothing to
    write, but its summary must not say the cluster matches the desired state while
    ``status`` calls the service OutOfSync."""
    name = "status-sidecar"
    _state, common = cluster_for_cli(control_plane, tmp_path, name, ("alpha",))
    runner = CliRunner()
    assert runner.invoke(app, ["apply", *common]).exit_code == 0
    client = control_plane.client()
    victim = next(iter(list_deployments(client, name)))
    path = deployments_path(name, victim)
    containers = client.get(path)["spec"]["template"]["spec"]["containers"]
    sidecar = {"name": "extra", "image": "example.org/extra:1"}
    patch = {"spec": {"paused": True, "template": {"spec": {"containers": [*containers, sidecar]}}}}
    client.merge_patch(path, patch, field_manager="kubectl-edit")

    for command in ("plan", "apply"):
        result = runner.invoke(app, [command, *common], terminal_width=400)
        assert result.exit_code == 0, result.output  # nothing to write
        assert "the clusters match the desired state" not in result.output, result.output
        assert "1 object(s) changed outside Git (drift above): not yet as desired." in (
            result.output
        ), result.output
    assert [c["name"] for c in client.get(path)["spec"]["template"]["spec"]["containers"]] == [
        *(c["name"] for c in containers),
        "extra",
    ]
    code, report = _status(common)
    assert code == 3 and report["clusters"][0]["services"][0]["sync"] == "OutOfSync"


def test_pods_not_ready_past_their_progress_deadline_make_the_service_degraded(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """A Pod whose engine crash-loops (and one no kubelet ever started) is starting
    capacity for a while, as any new instance is; past the Deployment's progress
    deadline (Kubernetes' 600 s) it is not on its way any more, and status says the
    service is Degraded with a ``stuck`` hold naming the Pods and why they wait, where
    it said Progressing for ever (a hostile prober)."""
    from reconciler.apply.backend import KubernetesBackend
    from reconciler.commands.status import service_status
    from reconciler.cycle import plan_cluster
    from reconciler.loop.cluster_cycle import ClusterOutcome
    from reconciler.placement.greedy import GreedyPlacer
    from reconciler.policy import make_autoscaler

    name = "status-stuck"
    state, common = cluster_for_cli(control_plane, tmp_path, name, ("alpha",))
    assert CliRunner().invoke(app, ["apply", *common]).exit_code == 0
    client = control_plane.client()
    replicas = sum(d["spec"]["replicas"] for d in list_deployments(client, name).values())
    # Every replica's Pod created and scheduled (the ReplicaSets create them one by one).
    pods = wait_for(
        lambda: (
            (p := list_pods(client, name))
            and len(p) == replicas
            and all(x["spec"].get("nodeName") for x in p)
            and p
        ),
        what="every replica's Pod scheduled",
    )
    crashing = pods[0]["metadata"]["name"]
    client.request(
        "PATCH",
        f"/api/v1/namespaces/{name}/pods/{crashing}/status",
        body={
            "status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [
                    {
                        "name": "engine",
                        "ready": False,
                        "restartCount": 40,
                        "image": "example.invalid/engine",
                        "imageID": "",
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    }
                ],
            }
        },
        content_type="application/merge-patch+json",
    )
    spec, policies = state.clusters[name], state.policies_for(name)

    def status_at(clock_s: float) -> Any:
        backend = KubernetesBackend(client, state=state, clock=lambda: clock_s)
        observation = backend.observe(spec, policies)
        plan, _ = plan_cluster(
            state,
            name,
            observation,
            {},
            {},
            clock_s,
            make_autoscaler("heteroscale"),
            GreedyPlacer(),
        )
        outcome = ClusterOutcome(cluster=name, plan=plan, observation=observation)
        return observation, service_status(outcome, "alpha", None)

    now_s = time.time()
    observation, fresh = status_at(now_s)
    assert observation.stuck == {} and [h for h in fresh.holds if h.kind == "stuck"] == []
    starting = observation.fleet.service_fleet("alpha")
    assert (starting.prefill.stuck, starting.decode.stuck) == (0, 0)
    observation, late = status_at(now_s + 601.0)
    # The fleet still counts them in the size, as stuck: the planner does not wait.
    fleet = observation.fleet.service_fleet("alpha")
    assert fleet.prefill.stuck + fleet.decode.stuck == len(pods)
    assert (fleet.prefill.stuck, fleet.decode.stuck) == (
        fleet.prefill.starting,
        fleet.decode.starting,
    )
    (stuck,) = [h for h in late.holds if h.kind == "stuck"]
    assert late.health == "Degraded"
    assert stuck.why.startswith(
        f"{len(pods)} Pod(s) not ready past their Deployment's progress deadline (600 s after "
        "creation): "
    ), stuck.why
    assert f"{name}/{crashing} CrashLoopBackOff" in stuck.why, stuck.why
    assert "not ready" in stuck.why  # the others: scheduled, no kubelet reported them


def test_a_deployment_being_deleted_makes_its_service_degraded_and_names_it(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """A Deployment deleted while a finalizer holds it still serves, and is counted,
    but goes when the finalizer does: status read Synced and Healthy beside it, and
    apply said the clusters match. Now its service is Degraded, the hold naming it."""
    name = "status-deleting"
    _state, common = cluster_for_cli(control_plane, tmp_path, name, ("alpha",))
    client = control_plane.client()
    assert CliRunner().invoke(app, ["apply", *common]).exit_code == 0
    victim = sorted(list_deployments(client, name))[0]
    path = deployments_path(name, victim)
    client.merge_patch(path, {"metadata": {"finalizers": ["example.com/hold"]}}, field_manager="t")
    client.delete(path)
    try:
        _code, report = _status(common)
        (service,) = report["clusters"][0]["services"]
        assert service["health"] == "Degraded"
        (hold,) = [h for h in service["holds"] if h["kind"] == "deleting"]
        assert f"{name}/{victim}" in hold["why"] and "being deleted" in hold["why"]
    finally:
        client.merge_patch(path, {"metadata": {"finalizers": None}}, field_manager="t")

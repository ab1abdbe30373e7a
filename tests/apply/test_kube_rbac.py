"""deploy/ applied to a real API server, then checked with a token of the
reconciler's own ServiceAccount: it may do its job and nothing more."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubetestkit import ControlPlane, apply_yaml_file, ensure_namespace

from reconciler.apply.kubeclient import (
    Forbidden,
    KubeClient,
    deployments_path,
    leases_path,
    nodes_path,
    pods_path,
)

pytestmark = pytest.mark.kubernetes
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _deployment(name: str, namespace: str) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "heteroscale"},
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            },
        },
    }


@pytest.fixture(scope="module")
def reconciler_token(control_plane: ControlPlane) -> KubeClient:
    admin = control_plane.client()
    for name in ("namespace.yaml", "rbac.yaml", "reconciler.yaml"):
        apply_yaml_file(admin, DEPLOY / name)
    # A bound token from the TokenRequest API (ServiceAccount admission is off in the
    # test control plane, so no token Secret is created for us; TokenRequest works).
    response = admin.request(
        "POST",
        "/api/v1/namespaces/heteroscale-system/serviceaccounts/heteroscale/token",
        body={
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        },
    )
    return admin.with_token(
        response["status"]["token"], name="system:serviceaccount:heteroscale-system:heteroscale"
    )


def test_the_reconciler_deployment_runs_two_replicas_with_leader_election(
    control_plane: ControlPlane, reconciler_token: KubeClient
) -> None:
    admin = control_plane.client()
    live = admin.get(deployments_path("heteroscale-system", "heteroscale-reconciler"))
    assert live["spec"]["replicas"] == 2
    container = live["spec"]["template"]["spec"]["containers"][0]
    assert "--leader-elect" in container["args"]
    assert live["spec"]["template"]["spec"]["serviceAccountName"] == "heteroscale"


def test_it_may_manage_deployments_in_managed_namespaces(
    control_plane: ControlPlane, reconciler_token: KubeClient
) -> None:
    path = deployments_path("chat", "rbac-probe")
    reconciler_token.apply(path, _deployment("rbac-probe", "chat"), field_manager="heteroscale")
    patched = reconciler_token.merge_patch(
        path, {"spec": {"replicas": 3}}, field_manager="heteroscale"
    )
    assert patched["spec"]["replicas"] == 3
    assert any(
        d["metadata"]["name"] == "rbac-probe"
        for d in reconciler_token.list(deployments_path("chat"))
    )
    reconciler_token.delete(path)


def test_it_may_read_nodes_and_pods_and_hold_its_lease(reconciler_token: KubeClient) -> None:
    list(reconciler_token.list(nodes_path()))
    list(reconciler_token.list(pods_path()))
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "rbac-probe", "namespace": "heteroscale-system"},
        "spec": {"holderIdentity": "probe", "leaseDurationSeconds": 15},
    }
    created = reconciler_token.request("POST", leases_path("heteroscale-system"), body=lease)
    reconciler_token.request("PUT", leases_path("heteroscale-system", "rbac-probe"), body=created)


def test_it_is_refused_on_secrets_and_on_deployments_elsewhere(
    control_plane: ControlPlane, reconciler_token: KubeClient
) -> None:
    admin = control_plane.client()
    ensure_namespace(admin, "not-managed")
    admin.apply(
        deployments_path("not-managed", "bystander"),
        _deployment("bystander", "not-managed"),
        field_manager="admin",
    )
    with pytest.raises(Forbidden):
        reconciler_token.get("/api/v1/namespaces/chat/secrets")
    with pytest.raises(Forbidden):
        reconciler_token.get("/api/v1/namespaces/heteroscale-system/secrets")
    with pytest.raises(Forbidden):
        reconciler_token.merge_patch(
            deployments_path("not-managed", "bystander"),
            {"spec": {"replicas": 0}},
            field_manager="heteroscale",
        )
    with pytest.raises(Forbidden):
        reconciler_token.apply(
            deployments_path("not-managed", "new"),
            _deployment("new", "not-managed"),
            field_manager="heteroscale",
        )
    with pytest.raises(Forbidden):
        reconciler_token.delete(deployments_path("not-managed", "bystander"))
    with pytest.raises(Forbidden):
        list(reconciler_token.list(deployments_path()))  # no cluster-wide Deployment access
    with pytest.raises(Forbidden):
        reconciler_token.request(
            "POST",
            leases_path("chat"),
            body={
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": "x", "namespace": "chat"},
                "spec": {},
            },
        )
    assert admin.get(deployments_path("not-managed", "bystander"))["spec"]["replicas"] == 1


def test_it_may_keep_its_state_configmap_and_no_other(
    control_plane: ControlPlane, reconciler_token: KubeClient
) -> None:
    from reconciler.apply.kubeclient import Forbidden
    from reconciler.apply.statestore import (
        ConfigMapStateStore,
        configmaps_path,
        memory_shard_names,
    )
    from reconciler.durable import DEFAULT_MEMORY_SHARDS, DurableState
    from reconciler.policy.base import PolicyHistory
    from reconciler.policy.planner import PlannerMemory

    ns = "heteroscale-system"
    store = ConfigMapStateStore(reconciler_token, ns, "probe")
    assert store.save(DurableState("prod-east", 1.0, "probe"))  # create
    assert store.save(DurableState("prod-east", 2.0, "probe"))  # update
    assert store.load("prod-east") is not None  # get

    # Its memory shards, each named in rbac.yaml: created by the first write, read by a
    # new process, updated by its write.
    def memories(at_s: float) -> dict[str, PolicyHistory]:
        return {f"svc-{i}": PolicyHistory(planner=PlannerMemory(mix_at_s=at_s)) for i in range(40)}

    assert store.save(DurableState("prod-east", 3.0, "probe", histories=memories(3.0)))
    shards = memory_shard_names("prod-east", DEFAULT_MEMORY_SHARDS)
    for name in shards:  # every one holds memories, as written by the reconciler
        assert control_plane.client().get(configmaps_path(ns, name))["data"]["memories.json"]
    restarted = ConfigMapStateStore(reconciler_token, ns, "probe")
    assert restarted.load("prod-east") is not None and restarted.load_problems("prod-east") == ()
    assert restarted.save(DurableState("prod-east", 4.0, "probe", histories=memories(4.0)))
    back = ConfigMapStateStore(reconciler_token, ns, "probe").load("prod-east")
    assert back is not None
    assert {h.planner.mix_at_s for h in back.histories.values() if h.planner} == {4.0}
    with pytest.raises(Forbidden):
        reconciler_token.delete(configmaps_path(ns, shards[0]))
    with pytest.raises(Forbidden):  # a shard of a cluster not listed
        reconciler_token.get(configmaps_path(ns, "heteroscale-state-prod-west-memories-0"))
    control_plane.client().request(
        "POST", configmaps_path(ns), body={"metadata": {"name": "other-config"}, "data": {}}
    )
    with pytest.raises(Forbidden):
        reconciler_token.get(configmaps_path(ns, "other-config"))
    with pytest.raises(Forbidden):
        reconciler_token.get(configmaps_path(ns))  # no list
    with pytest.raises(Forbidden):
        reconciler_token.delete(configmaps_path(ns, "heteroscale-state-prod-east"))
    with pytest.raises(Forbidden):
        reconciler_token.get(configmaps_path("chat", "heteroscale-state-prod-east"))


def test_memory_shards_the_role_does_not_name_are_reported_with_what_to_grant(
    control_plane: ControlPlane, reconciler_token: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """More shards than rbac.yaml lists (as after an upgrade whose Role was not
    updated): the state object is still written and read, and the refused shards say
    which names the Role must grant, or how to keep the memories inline."""
    from reconciler.apply.statestore import ConfigMapStateStore, memory_shard_names
    from reconciler.durable import DurableState
    from reconciler.policy.base import PolicyHistory
    from reconciler.policy.planner import PlannerMemory

    ns = "heteroscale-system"
    histories = {f"svc-{i}": PolicyHistory(planner=PlannerMemory(mix_at_s=5.0)) for i in range(40)}
    store = ConfigMapStateStore(reconciler_token, ns, "probe", memory_shards=16)
    with caplog.at_level("ERROR", logger="heteroscale.state"):
        assert store.save(DurableState("prod-east", 5.0, "probe", histories=histories))
    names = memory_shard_names("prod-east", 16)
    refused = [
        r.getMessage() for r in caplog.records if "planner memories not written" in r.getMessage()
    ]
    assert refused and all("Forbidden" in m for m in refused)
    assert all(f"({names[0]} to {names[-1]}, get and update" in m for m in refused)
    assert all("--state-memory-shards 0" in m for m in refused)
    restarted = ConfigMapStateStore(reconciler_token, ns, "probe", memory_shards=16)
    state = restarted.load("prod-east")
    assert state is not None  # the state object itself is readable
    problems = restarted.load_problems("prod-east")
    assert problems and all("the Role must name every memory shard" in p for p in problems)


def test_leftover_shards_the_role_no_longer_names_are_given_up_with_one_warning(
    control_plane: ControlPlane, reconciler_token: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Lowered from 16 shards to the 8 rbac.yaml names: the shards past 8 cannot be
    emptied (Forbidden), which is said once as a warning and not tried again; the state
    and the 8 shards are written as ever."""
    from reconciler.apply.statestore import ConfigMapStateStore
    from reconciler.durable import DEFAULT_MEMORY_SHARDS, DurableState
    from reconciler.policy.base import PolicyHistory
    from reconciler.policy.planner import PlannerMemory

    ns = "heteroscale-system"
    cluster = "prod-east"
    histories = {f"svc-{i}": PolicyHistory(planner=PlannerMemory(mix_at_s=6.0)) for i in range(40)}
    admin = ConfigMapStateStore(control_plane.client(), ns, "admin", memory_shards=16)
    assert admin.save(DurableState(cluster, 6.0, "admin", histories=histories))
    store = ConfigMapStateStore(reconciler_token, ns, "probe", memory_shards=DEFAULT_MEMORY_SHARDS)
    store.load(cluster)
    with caplog.at_level("WARNING", logger="heteroscale.state"):
        assert store.save(DurableState(cluster, 7.0, "probe", histories=histories))
        assert store.save(DurableState(cluster, 7.0 + 301.0, "probe", histories=histories))
    leftover = [
        r for r in caplog.records if "left by a larger memory shard count" in r.getMessage()
    ]
    assert len(leftover) == 1 and leftover[0].levelname == "WARNING"
    assert "Forbidden" in leftover[0].getMessage()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    back = ConfigMapStateStore(reconciler_token, ns, "probe").load(cluster)
    assert back is not None
    assert {h.planner.mix_at_s for h in back.histories.values() if h.planner} == {6.0}

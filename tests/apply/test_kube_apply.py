"""The applier against a real API server (v1.20, with the deployment, replicaset and
garbage-collector controllers and the scheduler running, no kubelet): render + apply
hand-built plans to fake GPU Nodes, scale up and down, prune, re-apply, drift,
conflicts, soft scale-in with real Pods, and an API server killed mid-apply."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubetestkit import (
    ControlPlane,
    create_nodes,
    ensure_namespace,
    group,
    hand_plan,
    list_deployments,
    list_pods,
    mark_ready,
    wait_for,
)

from reconciler.apply import names
from reconciler.apply.backend import ApplyOptions, KubernetesBackend
from reconciler.apply.kubeclient import KubeClient, deployments_path
from reconciler.desired import DesiredState
from reconciler.desired.models import ClusterSpec
from reconciler.errors import ClusterUnavailable
from reconciler.observe.base import Observation
from reconciler.plan import Plan
from reconciler.state import DeploymentGroup

pytestmark = pytest.mark.kubernetes
_counter = itertools.count()


@dataclass
class Env:
    state: DesiredState
    spec: ClusterSpec
    client: KubeClient
    plane: ControlPlane
    clock_s: float = 1_000_000.0

    @property
    def name(self) -> str:
        return self.spec.name

    def backend(self, **options: object) -> KubernetesBackend:
        backend = KubernetesBackend(
            self.client,
            state=self.state,
            options=ApplyOptions(**options),
            clock=lambda: self.clock_s,  # type: ignore[arg-type]
        )
        return backend

    def observe(self, backend: KubernetesBackend) -> Observation:
        return backend.observe(self.spec, self.state.policies_for(self.name))

    def plan(self, backend: KubernetesBackend, groups: list[DeploymentGroup]) -> Plan:
        return hand_plan(self.state, self.name, self.observe(backend), groups)

    def deployments(self) -> dict[str, dict]:
        return list_deployments(self.client, self.name)


@pytest.fixture
def env(control_plane: ControlPlane, tmp_path: Path) -> Env:
    from kubetestkit import make_desired_state

    name = f"t{next(_counter)}-{tmp_path.name[-6:].strip('_').lower().replace('_', '-')}".strip("-")
    name = names.dns_label(name, 30)
    state = make_desired_state(tmp_path, name)
    client = control_plane.client()
    ensure_namespace(client, name)
    create_nodes(client, state.clusters[name])
    return Env(state, state.clusters[name], client, control_plane)


def _groups(env: Env, g1_decode: int = 3, with_g2: bool = True) -> list[DeploymentGroup]:
    out = [group("svc", env.name, "g1", f"{env.name}-pa", ("h800", 2), ("h800", g1_decode))]
    if with_g2:
        out.append(group("svc", env.name, "g2", env.name, ("h800", 1), ("h20", 2)))
    return out


def _bound(pods: list[dict], count: int) -> bool:
    """``count`` Pods, all bound to a node (the observer counts a Pod as ready only
    once it is scheduled; a slow scheduler must not make a test flaky)."""
    return len(pods) == count and all(p["spec"].get("nodeName") for p in pods)


def _replicas(env: Env) -> dict[str, int]:
    return {name: d["spec"]["replicas"] for name, d in env.deployments().items()}


def test_create_renders_deployments_that_the_scheduler_places_on_the_right_gpus(env: Env) -> None:
    backend = env.backend(soft_scale_in_window_s=0)
    plan = env.plan(backend, _groups(env))
    preview = backend.diff_cluster(plan)
    assert preview.mode == "server-dry-run"
    assert sorted(o.action for o in preview.objects) == ["create"] * 4
    assert env.deployments() == {}, "a dry run creates nothing"

    done = backend.apply_cluster(plan)
    assert [o.key for o in done.objects] == [o.key for o in preview.objects]
    assert _replicas(env) == {"svc-g1-p": 2, "svc-g1-d": 3, "svc-g2-p": 1, "svc-g2-d": 2}

    deployment = env.deployments()["svc-g1-d"]
    labels = deployment["metadata"]["labels"]
    assert labels[names.MANAGED_BY_LABEL] == "heteroscale"
    assert (labels[names.SERVICE_LABEL], labels[names.GROUP_LABEL], labels[names.ROLE_LABEL]) == (
        "svc",
        "g1",
        "decode",
    )
    managers = {
        m["manager"]
        for m in deployment["metadata"]["managedFields"]
        if "f:spec" in m.get("fieldsV1", {})
    }
    assert managers == {"heteroscale"}

    # The scheduler honours the rendered affinity and GPU requests.
    def placed() -> list[dict]:
        pods = list_pods(env.client, env.name)
        return pods if len(pods) == 8 and all(p["spec"].get("nodeName") for p in pods) else []

    pods = wait_for(placed, what="8 scheduled pods")
    for pod in pods:
        node = pod["spec"]["nodeName"]
        pod_labels = pod["metadata"]["labels"]
        if pod_labels[names.GROUP_LABEL] == "g1":
            assert node.startswith(f"{env.name}-h800"), (
                "g1 is pinned to the H800 pod (S2 label + GPU type)"
            )
        elif pod_labels[names.ROLE_LABEL] == "decode":
            assert node.startswith(f"{env.name}-h20"), (
                "g2 decode runs on H20 (GPU type label value nvidia-h20)"
            )


def test_scale_up_down_prune_and_idempotent_reapply(env: Env) -> None:
    backend = env.backend(soft_scale_in_window_s=0)
    backend.apply_cluster(env.plan(backend, _groups(env)))
    # A Deployment we do not own in the same namespace must survive every prune.
    foreign = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "not-ours", "namespace": env.name},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "x"}},
            "template": {
                "metadata": {"labels": {"app": "x"}},
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            },
        },
    }
    env.client.apply(deployments_path(env.name, "not-ours"), foreign, field_manager="someone-else")

    # Re-applying the same plan changes nothing: no writes, same generations (the
    # controllers keep updating status, which does not bump the generation).
    versions = {n: d["metadata"]["generation"] for n, d in env.deployments().items()}
    again = env.plan(backend, _groups(env))
    assert not again.has_changes
    assert not backend.diff_cluster(again).has_changes
    assert backend.stats.dry_runs == 0, "objects carrying the applied hash skip the dry run"
    full = env.backend(soft_scale_in_window_s=0, skip_provably_unchanged=False)
    assert (
        not full.diff_cluster(env.plan(full, _groups(env))).has_changes and full.stats.dry_runs >= 4
    )
    backend.apply_cluster(again)
    assert backend.stats.writes == 0
    after = {n: d["metadata"]["generation"] for n, d in env.deployments().items()}
    assert {n: v for n, v in after.items() if n in versions} == versions

    # Scale up: the dry run names the field, apply does exactly that.
    up = env.plan(backend, _groups(env, g1_decode=5))
    diff = backend.diff_cluster(up)
    changed = {o.key: o for o in diff.changed}
    assert set(changed) == {f"{env.name}/svc-g1-d"}
    assert [str(f) for f in changed[f"{env.name}/svc-g1-d"].fields] == ["spec.replicas: 3 -> 5"]
    # The client-side fallback (for servers that cannot dry-run) reports the same.
    fallback = env.backend(soft_scale_in_window_s=0, diff_mode="client")
    client_diff = fallback.diff_cluster(env.plan(fallback, _groups(env, g1_decode=5)))
    assert client_diff.mode == "client-side" and fallback.stats.dry_runs == 0
    assert [(o.key, [str(f) for f in o.fields]) for o in client_diff.changed] == [
        (f"{env.name}/svc-g1-d", ["spec.replicas: 3 -> 5"])
    ]
    backend.apply_cluster(up)
    assert _replicas(env)["svc-g1-d"] == 5

    # Scale down (Pods are not ready: no kubelet, so no drain is needed).
    down = env.plan(backend, _groups(env, g1_decode=2))
    assert [c.kind for c in down.changes] == ["scale_down"]
    backend.apply_cluster(down)
    assert _replicas(env)["svc-g1-d"] == 2

    # Prune: g2 leaves the placement; only our objects go.
    pruned = env.plan(backend, _groups(env, g1_decode=2, with_g2=False))
    diff = backend.diff_cluster(pruned)
    assert sorted((o.key, o.action) for o in diff.changed) == [
        (f"{env.name}/svc-g2-d", "delete"),
        (f"{env.name}/svc-g2-p", "delete"),
    ]
    backend.apply_cluster(pruned)
    assert sorted(env.deployments()) == ["not-ours", "svc-g1-d", "svc-g1-p"]
    final = env.plan(backend, _groups(env, g1_decode=2, with_g2=False))
    assert not backend.diff_cluster(final).has_changes


def test_capacity_adding_changes_are_applied_before_removals(env: Env) -> None:
    backend = env.backend(soft_scale_in_window_s=0)
    backend.apply_cluster(env.plan(backend, _groups(env, g1_decode=4, with_g2=False)))
    writes: list[str] = []
    env.client.hooks.append(
        lambda method, path: (
            writes.append(path) if method in ("PATCH", "DELETE") and "dryRun" not in path else None
        )
    )
    try:
        # g1 decode shrinks while g2 is created: g2's Deployments must come first.
        mixed = env.plan(backend, _groups(env, g1_decode=1))
        backend.apply_cluster(mixed)
    finally:
        env.client.hooks.clear()
    order = [p.split("?")[0].rsplit("/", 1)[-1] for p in writes if "/deployments/" in p]
    assert order.index("svc-g1-d") > max(order.index("svc-g2-p"), order.index("svc-g2-d"))


def test_drift_nodes_and_objects_changed_by_someone_else(env: Env) -> None:
    backend = env.backend(soft_scale_in_window_s=0)
    backend.apply_cluster(env.plan(backend, _groups(env, with_g2=False)))

    # Node drift: one Node's S1 label disagrees, one Node's GPU capacity differs.
    first, second = f"{env.name}-h800-1", f"{env.name}-h20-2"
    env.client.merge_patch(
        f"/api/v1/nodes/{first}",
        {"metadata": {"labels": {env.spec.labels.s1: "elsewhere"}}},
        field_manager="ops",
    )
    env.client.request(
        "PATCH",
        f"/api/v1/nodes/{second}/status",
        body={"status": {"capacity": {"nvidia.com/gpu": "4"}}},
        content_type="application/merge-patch+json",
    )
    # A third's reads 10**9 GPUs: a quantity the API server accepts, no GPU count.
    third = f"{env.name}-h20-1"
    env.client.request(
        "PATCH",
        f"/api/v1/nodes/{third}/status",
        body={"status": {"capacity": {"nvidia.com/gpu": "1e9"}}},
        content_type="application/merge-patch+json",
    )
    drift = env.observe(backend).drift
    kinds = {(d.kind, d.name) for d in drift}
    assert ("node_label", first) in kinds
    assert ("node_capacity", second) in kinds
    (unreadable,) = [d for d in drift if (d.kind, d.name) == ("node_capacity", third)]
    assert unreadable.live == "unreadable" and "'1e9'" in unreadable.detail  # type: ignore[attr-defined]

    # Someone scales our Deployment by hand: reported as drift, not overwritten.
    env.client.merge_patch(
        deployments_path(env.name, "svc-g1-d"),
        {"spec": {"replicas": 7}},
        field_manager="kubectl-edit",
    )
    observation = env.observe(backend)
    assert any(
        d.kind == "object_modified" and d.name.endswith("svc-g1-d") for d in observation.drift
    )
    plan = hand_plan(env.state, env.name, observation, _groups(env, with_g2=False))
    diff = backend.diff_cluster(plan)
    conflict = next(o for o in diff.objects if o.key.endswith("svc-g1-d"))
    assert conflict.action == "conflict"
    assert "kubectl-edit" in conflict.notes[-1] and ".spec.replicas" in conflict.notes[-1]
    backend.apply_cluster(plan)
    assert _replicas(env)["svc-g1-d"] == 7, "without --force the hand edit stays"

    # --force takes the field back.
    forced = env.backend(soft_scale_in_window_s=0, force=True)
    plan = env.plan(forced, _groups(env, with_g2=False))
    diff = forced.diff_cluster(plan)
    assert [str(f) for f in next(o for o in diff.objects if o.key.endswith("svc-g1-d")).fields] == [
        "spec.replicas: 7 -> 3"
    ]
    forced.apply_cluster(plan)
    assert _replicas(env)["svc-g1-d"] == 3


def test_a_field_someone_else_removed_is_noticed_and_restored(env: Env) -> None:
    backend = env.backend(soft_scale_in_window_s=0)
    backend.apply_cluster(env.plan(backend, _groups(env, with_g2=False)))
    path = deployments_path(env.name, "svc-g1-p")
    env.client.merge_patch(
        path,
        {"metadata": {"annotations": {names.GPU_TYPE_ANNOTATION: None}}},
        field_manager="kubectl-annotate",
    )
    diff = backend.diff_cluster(env.plan(backend, _groups(env, with_g2=False)))
    (changed,) = diff.changed
    assert [str(f) for f in changed.fields] == [
        f"metadata.annotations.{names.GPU_TYPE_ANNOTATION}: + 'h800'"
    ]
    backend.apply_cluster(env.plan(backend, _groups(env, with_g2=False)))
    assert (
        env.deployments()["svc-g1-p"]["metadata"]["annotations"][names.GPU_TYPE_ANNOTATION]
        == "h800"
    )

    # An object that lost our ownership label is not ours any more: not overwritten.
    env.client.merge_patch(
        path,
        {"metadata": {"labels": {names.MANAGED_BY_LABEL: None}}},
        field_manager="kubectl-label",
    )
    diff = backend.diff_cluster(env.plan(backend, _groups(env, with_g2=False)))
    conflict = next(o for o in diff.objects if o.key.endswith("svc-g1-p"))
    assert conflict.action == "conflict" and "ownership labels" in conflict.notes[-1]


def test_a_409_conflict_is_retried_after_a_re_read(env: Env) -> None:
    backend = env.backend(soft_scale_in_window_s=0)
    backend.apply_cluster(env.plan(backend, _groups(env, with_g2=False)))
    plan = env.plan(backend, _groups(env, g1_decode=6, with_g2=False))
    other = env.plane.client()
    interfered: list[str] = []

    def interfere(method: str, path: str) -> None:
        # Just before our real apply of svc-g1-d, someone else writes the object.
        if (
            method == "PATCH"
            and "/deployments/svc-g1-d?" in path
            and "dryRun" not in path
            and not interfered
        ):
            path = path.split("?")[0]
            interfered.append(path)
            other.merge_patch(
                path, {"metadata": {"annotations": {"team": "serving"}}}, field_manager="other-tool"
            )

    backend.client.hooks.append(interfere)
    try:
        backend.apply_cluster(plan)
    finally:
        backend.client.hooks.clear()
    assert interfered
    assert backend.stats.conflicts_retried >= 1
    live = env.deployments()["svc-g1-d"]
    assert live["spec"]["replicas"] == 6
    assert live["metadata"]["annotations"]["team"] == "serving", "the other writer's field is kept"


def test_api_server_killed_mid_apply_next_cycle_finishes_without_doubling(env: Env) -> None:
    backend = env.backend(soft_scale_in_window_s=0)
    groups = [
        group(
            "svc",
            env.name,
            f"k{i}",
            f"{env.name}-pa" if i % 2 else env.name,
            ("h800", 1),
            ("h800", 1),
        )
        for i in range(4)
    ]
    plan = env.plan(backend, groups)
    writes: list[str] = []

    def kill_after_three(method: str, path: str) -> None:
        if method == "PATCH" and "/deployments/" in path and "dryRun" not in path:
            writes.append(path)
            if len(writes) == 4:  # three Deployments written, the fourth on its way
                env.plane.kill_apiserver()

    backend.client.hooks.append(kill_after_three)
    try:
        with pytest.raises(ClusterUnavailable):
            backend.apply_cluster(plan)
    finally:
        backend.client.hooks.clear()
        env.plane.restart_apiserver()
    assert 0 < len(env.deployments()) < 8, "the first cycle was cut short"

    # The next cycle (fresh observe) completes the job.
    fresh = env.backend(soft_scale_in_window_s=0)
    fresh.apply_cluster(env.plan(fresh, groups))
    assert _replicas(env) == {f"svc-k{i}-{r}": 1 for i in range(4) for r in ("p", "d")}
    assert not fresh.diff_cluster(env.plan(fresh, groups)).has_changes
    # Nothing doubled: the ReplicaSets create exactly one Pod per Deployment.
    wait_for(lambda: len(list_pods(env.client, env.name)) == 8, what="8 pods")


def test_soft_scale_in_drains_first_deletes_after_the_window_and_puts_back_on_slo_breach(
    env: Env,
) -> None:
    backend = env.backend(soft_scale_in_window_s=60)
    backend.slo = {"svc": "held"}
    base = [group("svc", env.name, "s1", f"{env.name}-pa", ("h800", 1), ("h800", 4))]
    backend.apply_cluster(env.plan(backend, base))
    selector = f"{names.GROUP_LABEL}=s1,{names.ROLE_LABEL}=decode"
    pods = wait_for(
        lambda: (p := list_pods(env.client, env.name, selector)) and _bound(p, 4) and p,
        what="4 scheduled decode pods",
    )
    for pod in pods:
        mark_ready(env.client, env.name, pod)
    wait_for(
        lambda: env.deployments()["svc-s1-d"].get("status", {}).get("readyReplicas") == 4,
        what="4 ready",
    )

    # Scale decode 4 -> 2: two Pods leave service discovery, keep running.
    smaller = [group("svc", env.name, "s1", f"{env.name}-pa", ("h800", 1), ("h800", 2))]
    plan = env.plan(backend, smaller)
    diff = backend.diff_cluster(plan)
    decode = next(o for o in diff.objects if o.key.endswith("svc-s1-d"))
    drained_names = [p.pod for p in decode.pods if p.action == "drain"]
    assert len(drained_names) == 2 and decode.replicas_after == 2, decode.lines()
    backend.apply_cluster(plan)
    drained_selector = f"{names.SERVING_LABEL}=false,{names.GROUP_LABEL}=s1"
    drained = list_pods(env.client, env.name, drained_selector)
    assert sorted(p["metadata"]["name"] for p in drained) == sorted(drained_names)
    assert all(not p["metadata"].get("ownerReferences") for p in drained), "out of the ReplicaSet"
    assert env.deployments()["svc-s1-d"]["spec"]["replicas"] == 2
    observation = env.observe(backend)
    assert observation.fleet.draining[("svc", "decode")] == 2
    assert observation.fleet.service_fleet("svc").decode.draining == 2

    # The SLO breaks inside the window: the same Pods go back at once (no cold start).
    backend.slo = {"svc": "broken"}
    plan = hand_plan(env.state, env.name, observation, smaller)
    backend.apply_cluster(plan)
    serving = list_pods(
        env.client,
        env.name,
        f"{names.SERVING_LABEL}=true,{names.GROUP_LABEL}=s1,{names.ROLE_LABEL}=decode",
    )
    assert set(drained_names) <= {p["metadata"]["name"] for p in serving}
    assert env.deployments()["svc-s1-d"]["spec"]["replicas"] == 4
    wait_for(
        lambda: all(
            p["metadata"].get("ownerReferences") for p in list_pods(env.client, env.name, selector)
        ),
        what="the ReplicaSet to adopt the put-back pods",
    )

    # Replicas go up before the Pods come back, so the ReplicaSet may briefly start a
    # replacement; it removes it again (the newest unready Pod), keeping the put-back ones.
    def ready(pod: dict) -> bool:
        conditions = pod.get("status", {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    settled = wait_for(
        lambda: (
            (p := list_pods(env.client, env.name, selector))
            and len(p) == 4
            and all(map(ready, p))
            and p
        ),
        what="4 ready decode pods again",
    )
    assert set(drained_names) <= {p["metadata"]["name"] for p in settled}

    # SLOs hold again: drain, and once the window has passed the Pods are deleted.
    backend.slo = {"svc": "held"}
    backend.apply_cluster(env.plan(backend, smaller))
    assert len(list_pods(env.client, env.name, drained_selector)) == 2
    env.clock_s += 30
    backend.apply_cluster(env.plan(backend, smaller))
    assert len(list_pods(env.client, env.name, drained_selector)) == 2, "still inside the window"
    env.clock_s += 31
    plan = env.plan(backend, smaller)
    finishing = next(o for o in backend.diff_cluster(plan).objects if o.key.endswith("svc-s1-d"))
    assert sorted(p.action for p in finishing.pods) == ["finish", "finish"]
    backend.apply_cluster(plan)
    wait_for(
        lambda: not list_pods(env.client, env.name, drained_selector), what="drained pods deleted"
    )
    assert env.deployments()["svc-s1-d"]["spec"]["replicas"] == 2


class Crash(BaseException):
    """The reconciler process dies here (nothing in it catches a BaseException)."""


def _serving_decode(env: Env, group_id: str) -> list[dict]:
    return list_pods(
        env.client,
        env.name,
        f"{names.SERVING_LABEL}=true,{names.GROUP_LABEL}={group_id},{names.ROLE_LABEL}=decode",
    )


def _is_ready(pod: dict) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.mark.fault
def test_a_restart_in_the_middle_of_a_soft_scale_in_neither_loses_nor_doubles_instances(
    env: Env,
) -> None:
    backend = env.backend(soft_scale_in_window_s=60)
    backend.slo = {"svc": "held"}
    base = [group("svc", env.name, "r1", f"{env.name}-pa", ("h800", 1), ("h800", 4))]
    backend.apply_cluster(env.plan(backend, base))
    pods = wait_for(
        lambda: (p := _serving_decode(env, "r1")) and _bound(p, 4) and p,
        what="4 scheduled decode pods",
    )
    for pod in pods:
        mark_ready(env.client, env.name, pod)
    wait_for(
        lambda: env.deployments()["svc-r1-d"].get("status", {}).get("readyReplicas") == 4,
        what="4 ready",
    )
    original = {p["metadata"]["name"] for p in pods}

    # Scale decode 4 -> 2; the process dies after the two drains, before the
    # Deployment's replicas go down.
    smaller = [group("svc", env.name, "r1", f"{env.name}-pa", ("h800", 1), ("h800", 2))]

    def die_before_the_shrink(method: str, path: str) -> None:
        if method == "PATCH" and "/deployments/svc-r1-d?" in path and "dryRun" not in path:
            raise Crash()

    backend.client.hooks.append(die_before_the_shrink)
    try:
        with pytest.raises(Crash):
            backend.apply_cluster(env.plan(backend, smaller))
    finally:
        backend.client.hooks.clear()
    drained_selector = f"{names.SERVING_LABEL}=false,{names.GROUP_LABEL}=r1"
    drained = {p["metadata"]["name"] for p in list_pods(env.client, env.name, drained_selector)}
    assert len(drained) == 2 and drained <= original
    assert env.deployments()["svc-r1-d"]["spec"]["replicas"] == 4, "the shrink was lost"
    # Meanwhile the ReplicaSet replaces the two Pods that left it (still starting).
    wait_for(lambda: len(_serving_decode(env, "r1")) == 4, what="two replacement pods")
    replacements = {p["metadata"]["name"] for p in _serving_decode(env, "r1")} - original
    assert len(replacements) == 2

    # A new process: it resumes the scale-in. No Pod is drained a second time and no
    # ready Pod is added to the drained ones (the starting replacements go, by the
    # replicas alone); the drained Pods keep their drain time (the window goes on).
    env.clock_s += 10
    restarted = env.backend(soft_scale_in_window_s=60)
    restarted.slo = {"svc": "held"}
    plan = env.plan(restarted, smaller)
    decode = next(o for o in restarted.diff_cluster(plan).objects if o.key.endswith("svc-r1-d"))
    assert [p.action for p in decode.pods] == [], decode.lines()
    assert (decode.replicas_before, decode.replicas_after) == (4, 2)
    restarted.apply_cluster(plan)
    assert env.deployments()["svc-r1-d"]["spec"]["replicas"] == 2
    serving = wait_for(
        lambda: (p := _serving_decode(env, "r1")) and len(p) == 2 and p,
        what="the replacements removed",
    )
    assert {p["metadata"]["name"] for p in serving} == original - drained, "the ready ones stay"
    assert all(map(_is_ready, serving)), "capacity never below the target"
    assert {
        p["metadata"]["name"] for p in list_pods(env.client, env.name, drained_selector)
    } == drained
    observation = env.observe(restarted)
    assert observation.fleet.service_fleet("svc").decode.draining == 2
    assert observation.fleet.service_fleet("svc").decode.ready == 2

    # The window counts from the first drain: 50 s later (60 s after it) they go.
    env.clock_s += 50
    restarted.apply_cluster(env.plan(restarted, smaller))
    wait_for(
        lambda: not list_pods(env.client, env.name, drained_selector), what="drained pods deleted"
    )
    decode_pods = list_pods(
        env.client, env.name, f"{names.GROUP_LABEL}=r1,{names.ROLE_LABEL}=decode"
    )
    assert {p["metadata"]["name"] for p in decode_pods} == original - drained
    assert not restarted.diff_cluster(env.plan(restarted, smaller)).has_changes


# ------------------------------------------------------------------ ownership


def _unmanaged_deployment(name: str, labels: dict[str, str]) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "x", "image": "example.invalid/x"}]},
            },
        },
    }


def _unmanaged_pod(name: str, labels: dict[str, str], annotations: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        # No scheduler picks it up: nothing but us could change it.
        "spec": {
            "schedulerName": "nobody",
            "containers": [{"name": "x", "image": "example.invalid/x"}],
        },
    }


def _untouched(obj: dict) -> tuple:
    """What any write of ours would change (not what the controllers write: status,
    the Deployment's revision annotation)."""
    meta = obj["metadata"]
    annotations = {
        k: v
        for k, v in (meta.get("annotations") or {}).items()
        if not k.startswith("deployment.kubernetes.io/")
    }
    ours = any(e["manager"] == names.FIELD_MANAGER for e in meta.get("managedFields") or [])
    return (meta.get("labels"), annotations, obj.get("spec"), ours)


def test_unmanaged_deployments_and_pods_in_a_managed_namespace_are_never_written(
    env: Env,
) -> None:
    """RBAC cannot restrict writes by label: whatever the desired state says, an
    object without our ownership labels (for this cluster) is never patched, scaled
    or deleted, even when it looks like ours in every other label."""
    cluster_label = names.label_value(env.name)
    look_alike = {
        names.SERVICE_LABEL: "svc",
        names.ROLE_LABEL: "decode",
        names.CLUSTER_LABEL: cluster_label,
    }
    deployments = {
        # The name the plan creates next.
        "svc-g1-p": _unmanaged_deployment(
            "svc-g1-p", {**look_alike, names.GROUP_LABEL: "g1", names.ROLE_LABEL: "prefill"}
        ),
        # A group the desired state does not have: would be pruned if it were ours.
        "svc-old-d": _unmanaged_deployment("svc-old-d", {**look_alike, names.GROUP_LABEL: "old"}),
        # Ours, but another cluster's (same API server).
        "svc-g9-d": _unmanaged_deployment(
            "svc-g9-d",
            {
                **look_alike,
                names.GROUP_LABEL: "g9",
                names.MANAGED_BY_LABEL: names.MANAGED_BY_VALUE,
                names.CLUSTER_LABEL: "elsewhere",
            },
        ),
    }
    for body in deployments.values():
        env.client.request("POST", deployments_path(env.name), body=body)
    pods = {
        # Looks drained from a Deployment we manage, long ago: would be deleted.
        "stray-drained": _unmanaged_pod(
            "stray-drained",
            {**look_alike, names.GROUP_LABEL: "g2", names.SERVING_LABEL: names.DRAINING},
            {names.DRAINED_AT_ANNOTATION: "1", names.DRAINED_FROM_ANNOTATION: "svc-g2-d"},
        ),
        # Looks like a serving instance of a group we scale in: would be drained.
        "stray-serving": _unmanaged_pod(
            "stray-serving",
            {**look_alike, names.GROUP_LABEL: "g2", names.SERVING_LABEL: "true"},
            {},
        ),
    }
    for body in pods.values():
        env.client.request("POST", f"/api/v1/namespaces/{env.name}/pods", body=body)

    def snapshot() -> dict[str, tuple]:
        live = {n: _untouched(d) for n, d in env.deployments().items() if n in deployments}
        live |= {
            p["metadata"]["name"]: _untouched(p)
            for p in list_pods(env.client, env.name)
            if p["metadata"]["name"] in pods
        }
        return live

    before = snapshot()
    assert set(before) == set(deployments) | set(pods)
    backend = env.backend(soft_scale_in_window_s=0)
    backend.slo = {"svc": "held"}
    # Create (g1 clashes with the look-alike), scale in, then prune everything.
    for groups in (
        [
            group("svc", env.name, "g1", f"{env.name}-pa", ("h800", 1), ("h800", 1)),
            group("svc", env.name, "g2", env.name, ("h800", 1), ("h20", 3)),
        ],
        [group("svc", env.name, "g2", env.name, ("h800", 1), ("h20", 1))],
        [],
    ):
        diff = backend.apply_cluster(env.plan(backend, groups))
        assert snapshot() == before, diff.lines()
    assert set(env.deployments()) == set(deployments), "ours pruned, the others kept"


@pytest.mark.fault
def test_objects_that_stop_being_ours_during_an_apply_are_left_alone(env: Env) -> None:
    """Between the observation and the write, someone takes an object over (removes
    our ownership label) or creates one of the name we create: each write is refused
    by its precondition and, re-read, found not ours, so it is not written."""
    backend = env.backend(soft_scale_in_window_s=60)
    backend.slo = {"svc": "held"}
    a1 = group("svc", env.name, "a1", f"{env.name}-pa", ("h800", 1), ("h800", 2))
    a2 = group("svc", env.name, "a2", f"{env.name}-pa", ("h800", 1), ("h800", 1))
    a4 = group("svc", env.name, "a4", f"{env.name}-pa", ("h800", 1), ("h800", 2))
    backend.apply_cluster(env.plan(backend, [a1, a2, a4]))
    for group_id in ("a1", "a4"):
        for pod in wait_for(
            lambda g=group_id: (p := _serving_decode(env, g)) and _bound(p, 2) and p,
            what=f"{group_id} scheduled decode pods",
        ):
            mark_ready(env.client, env.name, pod)
    wait_for(
        lambda: all(
            env.deployments()[f"svc-{g}-d"].get("status", {}).get("readyReplicas") == 2
            for g in ("a1", "a4")
        ),
        what="ready decode pods",
    )
    # a1's decode goes 2 -> 1 (one Pod drained), and the window passes.
    a1_small = group("svc", env.name, "a1", f"{env.name}-pa", ("h800", 1), ("h800", 1))
    backend.apply_cluster(env.plan(backend, [a1_small, a2, a4]))
    env.clock_s += 61

    # This cycle: finish a1's drained Pod, prune a2, create a3, drain one of a4's.
    a3 = group("svc", env.name, "a3", f"{env.name}-pa", ("h800", 1), ("h800", 1))
    a4_small = group("svc", env.name, "a4", f"{env.name}-pa", ("h800", 1), ("h800", 1))
    plan = env.plan(backend, [a1_small, a3, a4_small])
    preview = {o.key.rsplit("/", 1)[1]: o for o in backend.diff_cluster(plan).objects}
    (finished,) = [p.pod for p in preview["svc-a1-d"].pods if p.action == "finish"]
    (drained,) = [p.pod for p in preview["svc-a4-d"].pods if p.action == "drain"]
    assert preview["svc-a2-p"].action == "delete" and preview["svc-a3-p"].action == "create"

    intruder = env.plane.client()
    strip = {"metadata": {"labels": {names.MANAGED_BY_LABEL: None}}}
    interfered: list[str] = []

    def interfere(method: str, path: str) -> None:
        if "dryRun" in path:
            return
        target = path.split("?")[0]
        if method == "DELETE" and target.endswith(f"/pods/{finished}"):
            intruder.merge_patch(target, strip, field_manager="intruder")
        elif method == "DELETE" and target.endswith("/deployments/svc-a2-p"):
            intruder.merge_patch(target, strip, field_manager="intruder")
        elif method == "POST" and target.endswith("/deployments") and "svc-a3-p" not in interfered:
            intruder.request(
                "POST",
                deployments_path(env.name),
                body=_unmanaged_deployment("svc-a3-p", {"team": "someone-else"}),
            )
        elif method == "PATCH" and target.endswith(f"/pods/{drained}"):
            intruder.merge_patch(target, strip, field_manager="intruder")
        else:
            return
        interfered.append(target.rsplit("/", 1)[1] if method != "POST" else "svc-a3-p")

    backend.client.hooks.append(interfere)
    try:
        done = {o.key.rsplit("/", 1)[1]: o for o in backend.apply_cluster(plan).objects}
    finally:
        backend.client.hooks.clear()
    assert sorted(interfered) == sorted([finished, "svc-a2-p", "svc-a3-p", drained])
    for key in ("svc-a1-d", "svc-a2-p", "svc-a3-p", "svc-a4-d"):
        assert done[key].action == "conflict", done[key].lines()
        assert "ownership labels" in done[key].notes[-1], done[key].lines()

    live = env.deployments()
    assert "svc-a2-p" in live, "not deleted once it was not ours"
    assert "svc-a2-d" not in live, "its other half was ours: pruned"
    squatter = live["svc-a3-p"]
    assert (
        squatter["spec"]["replicas"] == 0
        and names.MANAGED_BY_LABEL not in (squatter["metadata"]["labels"])
    )
    assert "heteroscale" not in {e["manager"] for e in squatter["metadata"]["managedFields"]}
    assert live["svc-a4-d"]["spec"]["replicas"] == 2, "no shrink without its drain"
    assert "svc-a3-d" in live, "the rest of the plan went ahead"
    pods = {p["metadata"]["name"]: p for p in list_pods(env.client, env.name)}
    assert finished in pods, "a drained Pod that is not ours any more is not deleted"
    assert pods[drained]["metadata"]["labels"][names.SERVING_LABEL] == "true", "not drained"


def _as_if_its_create_was_interrupted(env: Env, name: str) -> None:
    """heteroscale's fields of Deployment ``name`` recorded as an "Update", as the
    create's POST leaves them when the process dies before its relabel."""
    path = deployments_path(env.name, name)
    live = env.client.get(path)
    entries = [
        {**e, "operation": "Update"} if e.get("manager") == names.FIELD_MANAGER else e
        for e in live["metadata"]["managedFields"]
    ]
    env.client.merge_patch(
        path,
        {
            "metadata": {
                "managedFields": entries,
                "resourceVersion": live["metadata"]["resourceVersion"],
            }
        },
        field_manager=names.FIELD_MANAGER,
    )


def test_an_interrupted_create_is_relabelled_not_called_a_change_outside_git(env: Env) -> None:
    """A process killed between a create's POST and its relabel leaves heteroscale's
    fields as an "Update"; server-side apply counts that as another manager, so every
    later change read as "changed outside Git" and was never made. The dry run now
    shows the change, the apply relabels the fields first and makes it."""
    backend = env.backend(soft_scale_in_window_s=0)
    backend.apply_cluster(env.plan(backend, _groups(env, with_g2=False)))
    _as_if_its_create_was_interrupted(env, "svc-g1-d")
    backend = env.backend(soft_scale_in_window_s=0)
    plan = env.plan(backend, _groups(env, g1_decode=6, with_g2=False))
    diff = backend.diff_cluster(plan)
    changed = next(o for o in diff.objects if o.key.endswith("svc-g1-d"))
    assert changed.action == "update", changed.notes
    assert any("interrupted" in note for note in changed.notes)
    backend.apply_cluster(plan)
    live = env.deployments()["svc-g1-d"]
    assert live["spec"]["replicas"] == 6
    operations = {
        e["operation"]
        for e in live["metadata"]["managedFields"]
        if e["manager"] == names.FIELD_MANAGER
    }
    assert operations == {"Apply"}

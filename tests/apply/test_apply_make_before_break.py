"""Make before break (pure): when a service moves to another namespace, its old
Deployments keep serving until the Deployments replacing them serve what the plan
asks of them; then they are pruned as before, live or by a saved plan. Only
leftovers (what a move left behind, or a group being deleted) are held."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.apply import names
from reconciler.apply.actions import (
    ScaleInWindow,
    WorkloadWork,
    effective_manifest,
    not_yet_serving,
    plan_workloads,
    scale_in_windows,
    unsized_services,
)
from reconciler.apply.render import ObjectKey, render_groups
from reconciler.apply.savedplan import (
    Observed,
    PlanFileError,
    PlanSource,
    SavedCluster,
    SavedPlan,
    WriteStep,
    check_leftovers,
    check_scope,
)
from reconciler.cycle import plan_cluster
from reconciler.desired import DesiredState, load_desired_state
from reconciler.observe.base import Observation
from reconciler.observe.kubernetes import (
    ClusterSnapshot,
    LiveDeployment,
    LivePod,
    fleet_from_snapshot,
    left_behind,
    observation_from_snapshot,
    parse_deployment,
)
from reconciler.placement.base import PlacementRequest, PlacementResult, UngroupedInstances
from reconciler.placement.greedy import GreedyPlacer
from reconciler.plan import Plan
from reconciler.policy import make_autoscaler
from reconciler.policy.base import (
    Autoscaler,
    Decision,
    DecisionInput,
    PolicyHistory,
    Recommendation,
)
from reconciler.state import DeploymentGroup, GroupRole

REPO = Path(__file__).resolve().parents[2]
CLUSTER = "prod-east"


@pytest.fixture(scope="module")
def before() -> DesiredState:
    """The repository's desired state: chat deploys to namespace chat."""
    return load_desired_state(REPO)


@pytest.fixture(scope="module")
def after(before: DesiredState) -> DesiredState:
    """The same, but chat's policy now deploys to namespace chat-v2."""
    policies = {
        name: p.model_copy(update={"namespace": "chat-v2"}) if name == "chat" else p
        for name, p in before.policies.items()
    }
    return DesiredState(policies=policies, clusters=before.clusters, templates=before.templates)


@pytest.fixture(scope="module")
def renamed(tmp_path_factory: pytest.TempPathFactory) -> DesiredState:
    """The repository's desired state with its switch pod-a renamed pod-z."""
    root = tmp_path_factory.mktemp("renamed")
    for folder in ("clusters", "policies", "templates"):
        shutil.copytree(REPO / folder, root / folder)
    cluster_file = root / "clusters" / f"{CLUSTER}.yaml"
    cluster_file.write_text(cluster_file.read_text().replace("pod-a", "pod-z"))
    return load_desired_state(root)


def grp(
    service: str, group_id: str, prefill: int, decode: int, domain: str = "pod-a"
) -> DeploymentGroup:
    return DeploymentGroup(
        service,
        CLUSTER,
        group_id,
        domain,
        None,
        GroupRole("h800", prefill),
        GroupRole("h800", decode),
    )


def live(
    state: DesiredState,
    groups: Iterable[DeploymentGroup],
    *,
    ready: int | None = None,
    generation: int = 1,
    observed_generation: int = 1,
) -> dict[str, LiveDeployment]:
    """The Deployments of ``groups`` as ``state`` renders them, as the API server lists
    them: ``ready`` ready replicas each (None: all of them)."""
    policies = {p.name: p for p in state.policies_for(CLUSTER)}
    rendered = render_groups(groups, policies, state.clusters[CLUSTER], state.templates)
    out = {}
    for key, w in rendered.items():
        manifest = effective_manifest(w, w.replicas, None)
        item = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind")}
        parsed = parse_deployment(
            {
                **item,
                "metadata": {
                    **manifest["metadata"],
                    "resourceVersion": "5",
                    "generation": generation,
                },
                "status": {
                    "readyReplicas": w.replicas if ready is None else ready,
                    "observedGeneration": observed_generation,
                },
            }
        )
        assert parsed is not None
        out[str(key)] = parsed
    return out


def pod_of(deployment: LiveDeployment, name: str, node: str | None = "n1") -> LivePod:
    return LivePod(
        key=ObjectKey(deployment.key.namespace, name),
        service=deployment.service,
        group_label=deployment.group_id,
        role=deployment.role,
        serving=True,
        ready=node is not None,
        scheduled=node is not None,
        node=node,
        template_hash=deployment.template_hash,
        drained_at_s=None,
        drained_from=None,
        deleting=False,
        created="2026-01-01T00:00:00Z",
        resource_version="7",
    )


def plan(
    state: DesiredState,
    groups: list[DeploymentGroup],
    *deployments: dict[str, LiveDeployment],
    unplaced: dict[str, str] | None = None,
    unsized: dict[str, str] | None = None,
    pods: tuple[LivePod, ...] = (),
    scale_in: dict[str, ScaleInWindow] | None = None,
    may_move: bool = False,
) -> dict[str, WorkloadWork]:
    """This cycle's work under ``state`` for ``groups`` against the live ``deployments``
    and ``pods`` (``unplaced``: the placement's shortfalls by service; ``unsized``: the
    services whose size was held, not sized; ``scale_in``: what each service's scale-in
    window allows; ``may_move``: the placement may have moved running instances), at
    100 s with a 60 s window."""
    snapshot = ClusterSnapshot(
        CLUSTER, {d.key: d for found in deployments for d in found.values()}, pods, (), 0.0
    )
    policies = {p.name: p for p in state.policies_for(CLUSTER)}
    rendered = render_groups(
        [g for g in groups if g.service in policies],
        policies,
        state.clusters[CLUSTER],
        state.templates,
    )
    work = plan_workloads(
        groups=groups,
        rendered=rendered,
        snapshot=snapshot,
        policies=policies,
        slo={s: "held" for s in policies},
        now_s=100.0,
        window_s=60.0,
        unplaced=unplaced,
        cluster=state.clusters[CLUSTER],
        unsized=unsized,
        scale_in=scale_in,
        may_move=may_move,
    )
    return {str(w.key): w for w in work}


def test_a_namespace_move_creates_the_new_deployments_and_keeps_the_old_ones(
    before: DesiredState, after: DesiredState
) -> None:
    old = live(before, [grp("chat", "a", 1, 3)])
    work = plan(after, [grp("chat", "a", 1, 3)], old)

    assert {k: w.action for k, w in work.items()} == {
        "chat-v2/chat-a-p": "create",
        "chat-v2/chat-a-d": "create",
        "chat/chat-a-p": "keep",
        "chat/chat-a-d": "keep",
    }
    kept = work["chat/chat-a-d"]
    assert kept.replicas_after == 3 and not kept.scale.drain and not kept.removes_capacity
    assert kept.scale.notes == (
        "kept until chat-v2/chat-a-d is ready (0 of 3 ready): service chat moved to "
        "namespace chat-v2, and this Deployment serves until those replacing it do",
    )


def test_the_old_deployments_stay_while_a_new_one_has_fewer_ready_replicas_than_asked(
    before: DesiredState, after: DesiredState
) -> None:
    old = live(before, [grp("chat", "a", 1, 3)])
    starting = live(after, [grp("chat", "a", 1, 3)], ready=1)
    work = plan(after, [grp("chat", "a", 1, 3)], old, starting)

    assert work["chat/chat-a-p"].action == work["chat/chat-a-d"].action == "keep"
    # The prefill is ready (1 of 1), the decode is not: the whole service waits.
    assert (
        "kept until chat-v2/chat-a-d is ready (1 of 3 ready)"
        in work["chat/chat-a-p"].scale.notes[0]
    )


def test_the_old_deployments_stay_while_the_controller_has_not_acted_on_the_new_spec(
    before: DesiredState, after: DesiredState
) -> None:
    old = live(before, [grp("chat", "a", 1, 3)])
    unobserved = live(after, [grp("chat", "a", 1, 3)], generation=2, observed_generation=1)
    work = plan(after, [grp("chat", "a", 1, 3)], old, unobserved)

    assert {work["chat/chat-a-p"].action, work["chat/chat-a-d"].action} == {"keep"}
    assert "3 of 3 ready, its last change not yet acted on" in work["chat/chat-a-d"].scale.notes[0]


def test_once_every_new_deployment_serves_the_old_ones_are_pruned_as_before(
    before: DesiredState, after: DesiredState
) -> None:
    old = live(before, [grp("chat", "a", 1, 3)])
    serving = live(after, [grp("chat", "a", 1, 3)])
    work = plan(after, [grp("chat", "a", 1, 3)], old, serving)

    assert work["chat/chat-a-p"].action == work["chat/chat-a-d"].action == "delete"
    assert work["chat/chat-a-d"].reason == "not in the desired placement"


def test_the_old_deployments_stay_while_the_service_is_not_all_placed(
    before: DesiredState, after: DesiredState
) -> None:
    # No room for a second copy beside the old one: placement placed only part of it.
    old = live(before, [grp("chat", "a", 1, 3)])
    serving = live(after, [grp("chat", "a", 1, 1)])
    short = {"chat": "2 decode: gpu_capacity"}
    work = plan(after, [grp("chat", "a", 1, 1)], old, serving, unplaced=short)

    assert work["chat/chat-a-p"].action == work["chat/chat-a-d"].action == "keep"
    assert (
        work["chat/chat-a-d"]
        .scale.notes[0]
        .startswith(
            "kept while its replacement is not all placed (2 decode: gpu_capacity; "
            "decode 1 of 3): service chat moved to namespace chat-v2"
        )
    )
    # A shortfall of a service that did not move holds nothing.
    running = live(before, [grp("chat", "a", 1, 3), grp("chat", "b", 1, 1)])
    scale_in = plan(before, [grp("chat", "a", 1, 3)], running, unplaced=short)
    assert scale_in["chat/chat-b-d"].action == "delete"


def test_a_shortfall_keeps_the_old_deployments_only_while_the_new_copy_is_smaller(
    before: DesiredState, after: DesiredState
) -> None:
    """The new copy serves 4 prefill and 8 decode, twice the old 1 and 3; the service
    asks for more still and placement cannot place it all. The old copy's GPUs are what
    the shortfall lacks, and kept for a shortfall unrelated to the move they stayed
    forever: it is pruned."""
    old = live(before, [grp("chat", "a", 1, 3)])
    larger = live(after, [grp("chat", "a", 4, 8)])
    work = plan(after, [grp("chat", "a", 4, 8)], old, larger, unplaced={"chat": "2 decode"})
    assert {work[key].action for key in old} == {"delete"}


def test_a_group_whose_switch_is_gone_from_the_cluster_file_is_kept_until_its_replacement_serves(
    before: DesiredState, renamed: DesiredState
) -> None:
    old = live(before, [grp("chat", "a", 1, 3)])
    work = plan(renamed, [grp("chat", "g-pod-z-1", 1, 3, domain="pod-z")], old)

    assert work["chat/chat-g-pod-z-1-d"].action == "create"
    assert work["chat/chat-a-p"].action == work["chat/chat-a-d"].action == "keep"
    assert work["chat/chat-a-d"].scale.notes == (
        "kept until chat/chat-g-pod-z-1-d is ready (0 of 3 ready): switch pod-a of its "
        "group is gone from cluster prod-east's file, and this Deployment serves until "
        "those replacing it do",
    )
    serving = live(renamed, [grp("chat", "g-pod-z-1", 1, 3, domain="pod-z")])
    done = plan(renamed, [grp("chat", "g-pod-z-1", 1, 3, domain="pod-z")], old, serving)
    assert done["chat/chat-a-p"].action == done["chat/chat-a-d"].action == "delete"

    # The fleet never counts it, so placement places the service anew, never keeps it.
    snapshot = ClusterSnapshot(CLUSTER, {d.key: d for d in old.values()}, (), (), 0.0)
    policies = {p.name: p for p in renamed.policies_for(CLUSTER)}
    fleet = fleet_from_snapshot(snapshot, policies, renamed.clusters[CLUSTER])
    assert [g for g in fleet.groups if g.service == "chat"] == []


def test_the_old_deployments_stay_while_the_services_size_is_held_not_sized(
    before: DesiredState, after: DesiredState
) -> None:
    """Right after a move with its metrics missing, the decision holds the service at
    the size of its groups, which leave the old copy out: the minimum. The new copy at
    that size serves soon, and the old one was pruned: 6 prefill and 12 decode became
    1 and 1. While the service's size is held rather than sized (metrics missing, a
    failed decision, a hold of the cycle) below what the service ran before the move, that
    is kept."""
    old = live(before, [grp("chat", "a", 6, 12)])
    new = live(after, [grp("chat", "a", 1, 1)])
    held = plan(after, [grp("chat", "a", 1, 1)], old, new, unsized={"chat": "metrics_missing"})
    for key in old:
        assert held[key].action == "keep", held[key]
        assert (
            "kept while the service's size is held, not sized (metrics_missing), and its "
            "groups hold fewer than the service ran before the move (decode 1 of 12, "
            "prefill 1 of 6)" in held[key].scale.notes[0]
        )
    sized = plan(after, [grp("chat", "a", 1, 1)], old, new)
    assert {sized[key].action for key in old} == {"delete"}
    # Held at a size the new copy already serves in full: nothing is lost, pruned.
    as_large = live(after, [grp("chat", "a", 6, 12)])
    done = plan(after, [grp("chat", "a", 6, 12)], old, as_large, unsized={"chat": "held"})
    assert {done[key].action for key in old} == {"delete"}


def test_the_old_deployments_stay_while_the_new_ones_roll_out_a_new_template(
    before: DesiredState, after: DesiredState
) -> None:
    """The new copy serves all it is asked, but this plan changes its Pod template (an
    image bump merged mid-move): its rollout takes up to a quarter of its Pods out of
    service, so the old copy still serves until the new Pods do."""
    old = live(before, [grp("chat", "a", 1, 3)])
    new = {
        key: replace(d, template_hash="an-older-template")
        for key, d in live(after, [grp("chat", "a", 1, 3)]).items()
    }
    work = plan(after, [grp("chat", "a", 1, 3)], old, new)
    for key in old:
        assert work[key].action == "keep", work[key]
        assert "about to be replaced by a new template" in work[key].scale.notes[0]


def test_unsized_services_are_the_cycles_holds_and_the_decisions_that_could_not_size() -> None:
    sized = Decision("a", 2, 4, "scale_out", "")
    missing = Decision("b", 1, 1, "metrics_missing", "")
    failed = Decision("c", 1, 1, "decision_failed", "")
    unsized = unsized_services({"d": "drift"}, {"a": sized, "b": missing, "c": failed})
    assert unsized == {"b": "metrics_missing", "c": "decision_failed", "d": "drift"}


def test_a_service_removed_from_the_policies_is_not_a_move_and_is_pruned(
    before: DesiredState,
) -> None:
    without_chat = DesiredState(
        policies={k: v for k, v in before.policies.items() if k != "chat"},
        clusters=before.clusters,
        templates=before.templates,
    )
    chat = live(before, [grp("chat", "a", 1, 3)])
    # Pruned (its groups are not in the plan: prune is on), although another service's
    # new Deployments are starting.
    work = plan(without_chat, [grp("summarize", "s", 1, 1)], chat)

    assert work["chat/chat-a-d"].action == "delete"
    assert work["summarize/summarize-s-d"].action == "create"


def test_placement_emptying_a_group_in_the_same_namespace_is_scale_in_not_a_move(
    before: DesiredState,
) -> None:
    running = live(before, [grp("chat", "a", 1, 3), grp("chat", "b", 1, 1)])
    work = plan(before, [grp("chat", "a", 1, 3), grp("chat", "c", 1, 1)], running)

    assert work["chat/chat-c-d"].action == "create"
    assert work["chat/chat-b-d"].action == "delete"


def test_not_yet_serving_counts_the_replicas_the_plan_asks_for(
    before: DesiredState,
) -> None:
    two_ready = live(before, [grp("chat", "a", 1, 2)])
    grown = plan(before, [grp("chat", "a", 1, 4)], two_ready)["chat/chat-a-d"]
    assert not_yet_serving(grown) == "2 of 4 ready"
    same = plan(before, [grp("chat", "a", 1, 2)], two_ready)["chat/chat-a-d"]
    assert not_yet_serving(same) is None
    created = plan(before, [grp("chat", "b", 1, 2)])["chat/chat-b-d"]
    assert not_yet_serving(created) == "0 of 2 ready"
    pruned = plan(before, [], two_ready)["chat/chat-a-d"]
    assert not_yet_serving(pruned) is None


def test_the_fleet_never_counts_a_kept_leftover(before: DesiredState, after: DesiredState) -> None:
    old = live(before, [grp("chat", "a", 1, 3)])
    starting = live(after, [grp("chat", "a", 1, 3)], ready=0)
    snapshot = ClusterSnapshot(
        CLUSTER, {d.key: d for d in [*old.values(), *starting.values()]}, (), (), 0.0
    )
    policies = {p.name: p for p in after.policies_for(CLUSTER)}
    fleet = fleet_from_snapshot(snapshot, policies)
    (chat,) = [g for g in fleet.groups if g.service == "chat"]
    assert (chat.prefill.instances, chat.decode.instances) == (1, 3)
    assert fleet.starting[("chat", "decode")] == 3


def test_what_a_move_left_behind_holds_its_gpus_where_it_runs(
    before: DesiredState, after: DesiredState
) -> None:
    old = live(before, [grp("chat", "a", 1, 3)])
    decode = old["chat/chat-a-d"]
    pods = (
        pod_of(decode, "chat-a-d-1", node="n1"),
        pod_of(decode, "chat-a-d-2", node="n1"),
        pod_of(decode, "chat-a-d-3", node=None),  # not on a node: holds none
    )
    snapshot = ClusterSnapshot(CLUSTER, {d.key: d for d in old.values()}, pods, (), 0.0)
    policies = {p.name: p for p in after.policies_for(CLUSTER)}
    gpus = decode.gpus_per_instance
    assert left_behind(snapshot, policies) == (UngroupedInstances("chat", "decode", "n1", 2, gpus),)
    # Before the move they are the service's groups, not left behind.
    assert left_behind(snapshot, {p.name: p for p in before.policies_for(CLUSTER)}) == ()


# ------------------------------------------------------------------ saved plans


def saved(*steps: WriteStep) -> SavedPlan:
    return SavedPlan(
        source=PlanSource("directory", "0" * 64),
        clusters=(SavedCluster(CLUSTER, Observed(), steps),),
        created_at="2026-01-01T00:00:00Z",
    )


def leftovers_checked(state: DesiredState, plan: SavedPlan, *objects: object) -> str:
    """``plan`` through both scope checks against the live ``objects``; the refusal, or ""."""
    deployments = {o.key: o for o in objects if isinstance(o, LiveDeployment)}
    pods = tuple(o for o in objects if isinstance(o, LivePod))
    snapshot = ClusterSnapshot(CLUSTER, deployments, pods, (), 0.0)
    try:
        check_scope(plan, state, Path("plan.json"))
        check_leftovers(plan, state, {CLUSTER: snapshot}, Path("plan.json"))
    except PlanFileError as exc:
        return str(exc)
    return ""


def test_a_saved_plan_may_prune_what_a_move_left_behind(
    before: DesiredState, after: DesiredState
) -> None:
    old = live(before, [grp("chat", "a", 1, 3)])["chat/chat-a-d"]
    pod = pod_of(old, "chat-a-d-5d8f-x1")
    prune = saved(
        WriteStep("drain", "chat", pod.key.name, "7", source=old.key.name),
        WriteStep("delete_deployment", "chat", old.key.name, "5"),
        WriteStep("delete_pod", "chat", pod.key.name, "8"),
    )
    assert leftovers_checked(after, prune, old, pod) == ""
    # Before the move the namespace is chat's own: the same writes are in scope as ever.
    assert leftovers_checked(before, prune, old, pod) == ""


def test_a_saved_plan_may_not_remove_in_a_foreign_namespace_what_no_move_left_behind(
    before: DesiredState, after: DesiredState
) -> None:
    old = live(before, [grp("chat", "a", 1, 3)])["chat/chat-a-d"]
    # Named like chat's Deployment, but of a service without a policy, or not there at all.
    stranger = replace(old, service="not-a-policy")
    prune = saved(WriteStep("delete_deployment", "chat", old.key.name, "5"))
    assert "not left behind by a service that moved to another namespace (it is service " in (
        leftovers_checked(after, prune, stranger)
    )
    assert "not left behind by a service that moved" in leftovers_checked(after, prune)
    # A drain must take its Pod from a leftover Deployment too.
    pod = pod_of(old, "chat-a-d-5d8f-x1")
    drain = saved(WriteStep("drain", "chat", pod.key.name, "7", source=old.key.name))
    assert f"Deployment chat/{old.key.name} is outside" in leftovers_checked(after, drain, pod)


def test_a_saved_plan_writing_anything_else_outside_the_managed_namespaces_is_refused_unread(
    after: DesiredState,
) -> None:
    # Refused by check_scope alone, the cluster never read: a create, and a removal of
    # an object no service's name begins.
    create = WriteStep(
        "apply", "chat", "chat-a-d", None, {"apiVersion": "apps/v1", "kind": "Deployment"}
    )
    for step in (create, WriteStep("delete_pod", "kube-system", "coredns", "1")):
        with pytest.raises(PlanFileError, match="is not one the desired state deploys to"):
            check_scope(saved(step), after, Path("plan.json"))


def drained_pod(deployment: LiveDeployment, name: str, drained_at_s: float) -> LivePod:
    """A Pod soft scale-in drained from ``deployment`` at ``drained_at_s``."""
    return replace(
        pod_of(deployment, name),
        serving=False,
        drained_at_s=drained_at_s,
        drained_from=deployment.key.name,
    )


def test_a_kept_leftover_still_finishes_the_pods_drained_from_it_before_the_move(
    before: DesiredState, after: DesiredState
) -> None:
    """A soft scale-in drained a Pod from the old decode before the service moved. The
    old Deployment is kept while the new copy starts, but the drained Pod serves
    nothing: once its window passed it is deleted as without the move, else it held
    its GPUs out of service for as long as the hold lasts. What the old Deployment
    serves is not touched (no drain, no write)."""
    old = live(before, [grp("chat", "a", 1, 3)])
    decode = old["chat/chat-a-d"]
    window_passed = drained_pod(decode, "chat-a-d-x9", drained_at_s=10.0)  # now 100, window 60
    inside_window = drained_pod(decode, "chat-a-d-y1", drained_at_s=90.0)
    serving = pod_of(decode, "chat-a-d-z2")
    pods = (window_passed, inside_window, serving)

    kept = plan(after, [grp("chat", "a", 1, 3)], old, pods=pods)["chat/chat-a-d"]
    assert kept.action == "keep" and kept.manifest is None
    assert kept.scale.finish == ("chat-a-d-x9",)
    assert kept.scale.drain == () and kept.replicas_after == 3 and not kept.removes_capacity
    assert kept.scale.notes[0].startswith("kept until chat-v2/chat-a-d is ready (0 of 3 ready)")
    # Without the move, the same Pod is finished the same way.
    same = plan(before, [grp("chat", "a", 1, 3)], old, pods=pods)["chat/chat-a-d"]
    assert same.scale.finish == kept.scale.finish


def test_pods_drained_from_what_a_move_left_behind_hold_their_gpus_where_they_run(
    before: DesiredState, after: DesiredState
) -> None:
    """Drained Pods of what a move left behind run until their window ends, on GPUs
    far from the new copy: counted only as the service's draining instances, placement
    held them on the new groups' nodes, or nowhere while the new copy had none. The
    observation lists them by node and the cycle asks placement to hold them there
    (``PlacementRequest.draining``), the Deployment they left kept or already pruned."""
    old = live(before, [grp("chat", "a", 1, 3)])
    decode = old["chat/chat-a-d"]
    from_kept = replace(drained_pod(decode, "chat-a-d-x9", 90.0), node="h800-a-001")
    from_pruned = replace(
        drained_pod(decode, "chat-b-d-y1", 90.0), node="h800-a-002", drained_from="chat-b-d"
    )
    snapshot = ClusterSnapshot(
        CLUSTER, {d.key: d for d in old.values()}, (from_kept, from_pruned), (), 0.0
    )
    spec = after.clusters[CLUSTER]
    policies = {p.name: p for p in after.policies_for(CLUSTER)}
    observation = observation_from_snapshot(snapshot, spec, policies)
    assert observation.draining == (
        UngroupedInstances("chat", "decode", "h800-a-002", 1, None),  # the policy's size
        UngroupedInstances("chat", "decode", "h800-a-001", 1, decode.gpus_per_instance),
    )
    unmoved = {p.name: p for p in before.policies_for(CLUSTER)}
    assert observation_from_snapshot(snapshot, spec, unmoved).draining == ()

    requests: list[PlacementRequest] = []

    class Recording(GreedyPlacer):
        def place(self, request: PlacementRequest) -> PlacementResult:
            requests.append(request)
            return super().place(request)

    class OneAndThree:
        name = "one-and-three"

        def decide(self, inputs: DecisionInput) -> Decision:
            return Decision(inputs.policy.name, 1, 3, "scale_out", "")

    plan_cluster(after, CLUSTER, observation, {}, {}, 100.0, OneAndThree(), Recording())
    assert requests[0].draining == observation.draining


@pytest.mark.fault
def test_half_of_a_service_on_a_switch_gone_from_the_cluster_file_is_kept_while_its_size_is_held(
    before: DesiredState, renamed: DesiredState
) -> None:
    """chat runs 6 prefill and 12 decode under pod-a and as many under pod-d; pod-a is
    gone from the cluster file and chat's metrics are missing. The decision holds chat
    at what its groups run, which leave pod-a's out: pod-d's half. The half on pod-a is
    not a copy of pod-d's but the other half of the service: it was pruned at once and
    nothing replaced it. While the size is held, it is kept."""
    running = live(before, [grp("chat", "a", 6, 12), grp("chat", "d", 6, 12, domain="pod-d")])
    snapshot = ClusterSnapshot(CLUSTER, {d.key: d for d in running.values()}, (), (), 0.0)
    policies = {p.name: p for p in renamed.policies_for(CLUSTER)}
    observation = observation_from_snapshot(snapshot, renamed.clusters[CLUSTER], policies)
    cycle, _histories = plan_cluster(
        renamed, CLUSTER, observation, {}, {}, 0.0, make_autoscaler("heteroscale"), GreedyPlacer()
    )
    assert cycle.decisions["chat"].reason == "metrics_missing"
    groups = list(cycle.groups)
    unsized = unsized_services(cycle.held, cycle.decisions)
    work = plan(renamed, groups, running, unsized=unsized)
    for key in ("chat/chat-a-p", "chat/chat-a-d"):
        assert work[key].action == "keep", work[key]
        assert (
            work[key]
            .scale.notes[0]
            .startswith(
                "kept while the service's size is held, not sized (metrics_missing), and its "
                "groups hold fewer than the service ran before the move (decode 12 of 24, "
                "prefill 6 of 12): switch pod-a of its group is gone"
            )
        )
    # Sized, the service's size is the decision's: pruned once all it asks serves.
    sized = plan(renamed, groups, running)
    assert {sized[key].action for key in ("chat/chat-a-p", "chat/chat-a-d")} == {"delete"}


@pytest.mark.fault
def test_both_copies_of_a_service_removed_in_the_middle_of_a_move_are_counted(
    before: DesiredState, after: DesiredState
) -> None:
    """chat's policy is removed while it moves (prune off, the default): neither copy
    is a leftover any more, and both are kept. They share their group ids (names do
    not hold the namespace): made one group, the fleet counted 4 of the 8 instances and
    the other copy's GPUs looked free to placement. Each copy is a group of its own."""
    without_chat = DesiredState(
        policies={k: v for k, v in before.policies.items() if k != "chat"},
        clusters=before.clusters,
        templates=before.templates,
    )
    old = live(before, [grp("chat", "a", 2, 2)])
    new = live(after, [grp("chat", "a", 2, 2)])
    deployments = [*old.values(), *new.values()]
    pods = tuple(
        pod_of(d, f"{d.key.name}-{i}", node=f"h800-a-{4 * n + i + 1:03d}")
        for n, d in enumerate(deployments)
        for i in range(d.replicas)
    )
    snapshot = ClusterSnapshot(CLUSTER, {d.key: d for d in deployments}, pods, (), 0.0)
    policies = {p.name: p for p in without_chat.policies_for(CLUSTER)}
    fleet = fleet_from_snapshot(snapshot, policies, without_chat.clusters[CLUSTER])
    chat = [g for g in fleet.groups if g.service == "chat"]
    assert [(g.prefill.instances, g.decode.instances) for g in chat] == [(2, 2), (2, 2)]
    held_nodes = {n.node for g in chat for role in (g.prefill, g.decode) for n in role.nodes}
    assert held_nodes == {p.node for p in pods}
    # Kept as they run, both copies (prune is off).
    work = plan(without_chat, list(fleet.groups), old, new)
    assert {work[key].action for key in [*old, *new]} == {"keep"}


def created_at(deployments: dict[str, LiveDeployment], at: str) -> dict[str, LiveDeployment]:
    """``deployments`` as the API server would list them, created at ``at``."""
    return {key: replace(d, created=at) for key, d in deployments.items()}


@pytest.mark.fault
@pytest.mark.parametrize(
    ("stays_at", "kept"), [("10:00:01", True), ("10:00:05", True), ("10:00:06", False)]
)
def test_a_group_created_in_the_same_apply_as_the_leftover_is_one_that_stays(
    before: DesiredState, renamed: DesiredState, stays_at: str, kept: bool
) -> None:
    """chat's two halves were created by one apply, the half that stays stamped a
    second after the other (whole seconds; an apply of many Deployments takes a few).
    Taken for a replacement, it was not counted with what chat ran, and the half on the
    gone switch was pruned while chat's size was held (a flaky API-server test showed
    it under load). Within ``SAME_APPLY_S`` it stays; later, it is what replaced the
    leftover."""
    gone = created_at(live(before, [grp("chat", "a", 6, 12)]), "2026-12-01T10:00:00Z")
    stays = created_at(
        live(before, [grp("chat", "d", 6, 12, domain="pod-d")]), f"2026-12-01T{stays_at}Z"
    )
    groups = [grp("chat", "d", 6, 12, domain="pod-d")]
    work = plan(renamed, groups, {**gone, **stays}, unsized={"chat": "metrics_missing"})
    assert {work[key].action for key in gone} == ({"keep"} if kept else {"delete"})


@pytest.mark.fault
def test_a_switch_gone_leftover_is_pruned_once_groups_created_after_it_serve_while_held(
    before: DesiredState, renamed: DesiredState
) -> None:
    """What replaces the half on the gone switch is created after it, once the switch
    is gone: it is not a group that stays. Counted as one, the leftover whose
    replacement serves was kept for as long as the service's size stayed held."""
    old = created_at(
        live(before, [grp("chat", "a", 6, 12), grp("chat", "d", 6, 12, domain="pod-d")]),
        "2026-12-01T10:00:00Z",
    )
    stays = {key: d for key, d in old.items() if "chat-d-" in key}
    replacement = created_at(
        live(renamed, [grp("chat", "z", 6, 12, domain="pod-z")]), "2026-12-07T10:00:00Z"
    )
    groups = [grp("chat", "d", 6, 12, domain="pod-d"), grp("chat", "z", 6, 12, domain="pod-z")]
    work = plan(renamed, groups, old, replacement, unsized={"chat": "metrics_missing"})
    assert {work[key].action for key in old if key not in stays} == {"delete"}
    # The same whole service on the gone switch: pruned once its replacement serves.
    whole = {key: d for key, d in old.items() if key not in stays}
    alone = plan(renamed, groups[1:], whole, replacement, unsized={"chat": "metrics_missing"})
    assert {alone[key].action for key in whole} == {"delete"}


@pytest.mark.fault
def test_half_of_a_service_on_a_gone_switch_is_kept_while_its_replacement_is_not_placed(
    before: DesiredState, renamed: DesiredState
) -> None:
    """chat asks for 12 prefill and 24 decode, as it ran, but placement finds room only
    for the half under pod-d that stays: compared with the gone half alone, the groups
    were as large, and that half was pruned at once. Once a replacement created after
    it serves, a shortfall that lasts no longer keeps it (it would stay forever, on GPUs
    the shortfall lacks)."""
    old = created_at(
        live(before, [grp("chat", "a", 6, 12), grp("chat", "d", 6, 12, domain="pod-d")]),
        "2026-12-01T10:00:00Z",
    )
    gone = [key for key in old if "chat-a-" in key]
    short = {"chat": "6 prefill: gpu_capacity; 12 decode: gpu_capacity"}
    staying = [grp("chat", "d", 6, 12, domain="pod-d")]
    work = plan(renamed, staying, old, unplaced=short)
    for key in gone:
        assert work[key].action == "keep", work[key]
        assert (
            "(6 prefill: gpu_capacity; 12 decode: gpu_capacity; decode 12 of 24, prefill 6 of 12)"
            in (work[key].scale.notes[0])
        )
    replacement = created_at(
        live(renamed, [grp("chat", "z", 6, 12, domain="pod-z")]), "2026-12-07T10:00:00Z"
    )
    groups = [*staying, grp("chat", "z", 6, 12, domain="pod-z")]
    done = plan(renamed, groups, old, replacement, unplaced={"chat": "2 decode: gpu_capacity"})
    assert {done[key].action for key in gone} == {"delete"}


@pytest.mark.fault
def test_after_two_moves_in_a_row_the_copies_left_behind_are_not_summed(
    before: DesiredState, after: DesiredState
) -> None:
    """chat moved from chat to chat-v2, and on to chat-v3 before chat-v2's copy served
    all of it: chat's copy runs 6 prefill and 12 decode, chat-v2's 1 and 3. They are two
    copies of one service: it ran 6 and 12 (not 7 and 15), so once chat-v3's 6 and 12
    serve, both go, its size held or not. Summed, they were kept for as long as the
    size stayed held."""
    third = DesiredState(
        policies={
            k: p.model_copy(update={"namespace": "chat-v3"}) if k == "chat" else p
            for k, p in before.policies.items()
        },
        clusters=before.clusters,
        templates=before.templates,
    )
    first = live(before, [grp("chat", "a", 6, 12)])
    second = live(after, [grp("chat", "a", 1, 3)], ready=0)
    small = live(third, [grp("chat", "a", 1, 3)])
    held = plan(third, [grp("chat", "a", 1, 3)], first, second, small, unsized={"chat": "held"})
    assert "(decode 3 of 12, prefill 1 of 6)" in held["chat/chat-a-d"].scale.notes[0]
    serving = live(third, [grp("chat", "a", 6, 12)])
    done = plan(third, [grp("chat", "a", 6, 12)], first, second, serving, unsized={"chat": "held"})
    assert {done[key].action for key in [*first, *second]} == {"delete"}


def sized(prefill: int, decode: int, *recommendations: tuple[float, int, int]) -> Decision:
    """chat's sized decision of ``prefill`` and ``decode``, its history holding
    ``recommendations`` (at_s, prefill, decode), this cycle's last."""
    history = PolicyHistory(recommendations=tuple(Recommendation(*r) for r in recommendations))
    return Decision("chat", prefill, decode, "within_tolerance", "sized", history=history)


@pytest.mark.fault
def test_half_of_a_service_on_a_gone_switch_waits_for_the_scale_in_window_when_sized(
    before: DesiredState, renamed: DesiredState
) -> None:
    """chat ran 6 prefill and 12 decode under pod-a and as many under pod-d; pod-a is
    gone from the cluster file and a sized decision finds pod-d's half alone covers the
    demand. Pruning pod-a's half is a scale-in of chat from 12 and 24 to 6 and 12: it
    was pruned at once, though chat's own scale-in waits for its 600 s window. It is
    kept until the window would have allowed the smaller size: while a recommendation
    of the whole service is in force over the window, or the history does not reach
    back to the window's start."""
    old = created_at(
        live(before, [grp("chat", "a", 6, 12), grp("chat", "d", 6, 12, domain="pod-d")]),
        "2026-12-01T10:00:00Z",
    )
    gone = [key for key in old if "chat-a-" in key]
    staying = [grp("chat", "d", 6, 12, domain="pod-d")]
    policies = {p.name: p for p in renamed.policies_for(CLUSTER)}
    assert policies["chat"].scaling.scale_in_window_s == 600

    # The whole service recommended 400 s ago, the half since: within the window.
    recent = sized(6, 12, (0.0, 12, 24), (400.0, 6, 12), (800.0, 6, 12))
    work = plan(renamed, staying, old, scale_in=scale_in_windows({"chat": recent}, policies))
    for key in gone:
        assert work[key].action == "keep", work[key]
        assert (
            work[key]
            .scale.notes[0]
            .startswith(
                "kept while its 600 s scale-in window allows the service no fewer instances "
                "than its groups would leave it (decode 12 of 24, the window allows no fewer "
                "than 24; prefill 6 of 12, the window allows no fewer than 12): switch pod-a"
            )
        ), work[key].scale.notes
    # A history shorter than the window: no scale-in yet, the half kept.
    young = sized(6, 12, (500.0, 6, 12), (800.0, 6, 12))
    work = plan(renamed, staying, old, scale_in=scale_in_windows({"chat": young}, policies))
    assert {work[key].action for key in gone} == {"keep"}
    assert "history does not cover the 600 s scale-in window" in work[gone[0]].scale.notes[0]
    # Only prefill's whole size still in force: the service waits as a whole.
    decode_first = sized(6, 12, (100.0, 6, 24), (150.0, 12, 12), (800.0, 6, 12))
    work = plan(renamed, staying, old, scale_in=scale_in_windows({"chat": decode_first}, policies))
    assert {work[key].action for key in gone} == {"keep"}
    assert "(prefill 6 of 12, the window allows no fewer than 12)" in work[gone[0]].scale.notes[0]

    # The whole service's recommendation aged out of the window: pruned, as before.
    aged = sized(6, 12, (0.0, 12, 24), (150.0, 6, 12), (800.0, 6, 12))
    work = plan(renamed, staying, old, scale_in=scale_in_windows({"chat": aged}, policies))
    assert {work[key].action for key in gone} == {"delete"}
    # Part of it aged out: what the window allows, no more, and no fewer.
    partly = sized(6, 12, (0.0, 12, 24), (150.0, 9, 18), (800.0, 6, 12))
    assert scale_in_windows({"chat": partly}, policies)["chat"].floor == (9, 18)
    work = plan(renamed, staying, old, scale_in=scale_in_windows({"chat": partly}, policies))
    assert {work[key].action for key in gone} == {"keep"}
    as_allowed = [grp("chat", "d", 9, 18, domain="pod-d")]
    grown = created_at(live(renamed, as_allowed), "2026-12-01T10:00:00Z")
    work = plan(
        renamed,
        as_allowed,
        {k: d for k, d in old.items() if k in gone},
        grown,
        scale_in=scale_in_windows({"chat": partly}, policies),
    )
    assert {work[key].action for key in gone} == {"delete"}


@pytest.mark.fault
def test_the_scale_in_window_holds_no_leftover_a_held_size_or_a_baseline_does_not(
    before: DesiredState, after: DesiredState
) -> None:
    """The window holds what the decision's scale-in would: a size held rather than
    sized is no decision's scale-in (``unsized_services`` holds its leftovers), and a
    baseline remembers only its own window, never one reaching back past it (required,
    its leftovers were kept forever)."""
    policies = {p.name: p for p in after.policies_for(CLUSTER)}
    held = replace(sized(1, 1, (0.0, 6, 12), (700.0, 1, 1)), reason="metrics_missing")
    assert scale_in_windows({"chat": held}, policies) == {}
    hpa = replace(sized(1, 1, (500.0, 1, 1), (700.0, 1, 1)), reason="baseline")
    assert scale_in_windows({"chat": hpa}, policies)["chat"].floor == (1, 1)
    old = live(before, [grp("chat", "a", 6, 12)])
    new = live(after, [grp("chat", "a", 1, 1)])
    work = plan(
        after,
        [grp("chat", "a", 1, 1)],
        old,
        new,
        scale_in=scale_in_windows({"chat": hpa}, policies),
    )
    assert {work[key].action for key in old} == {"delete"}
    # A namespace move is a scale-in too when the new copy is smaller than the old one.
    recent = sized(1, 1, (0.0, 6, 12), (700.0, 1, 1))
    work = plan(
        after,
        [grp("chat", "a", 1, 1)],
        old,
        new,
        scale_in=scale_in_windows({"chat": recent}, policies),
    )
    assert {work[key].action for key in old} == {"keep"}


@pytest.mark.fault
def test_a_group_moved_under_rebalance_serves_until_its_replacement_does(
    before: DesiredState,
) -> None:
    """CP-SAT under allow_rebalance moves chat's group from pod-a to pod-d: one layout
    with the new group and without the old one. The old one was deleted in the same
    apply as the new one was created, the service short of all of it until the new
    Pods started. It is kept while the new group does not serve, in the cycle of the
    move and in those after it (the placement then drops the old copy again, from a
    fleet that counts both); then it goes."""
    old = live(before, [grp("chat", "a", 2, 4)])
    moved = [grp("chat", "g-pod-d-1", 2, 4, domain="pod-d")]
    work = plan(before, moved, old, may_move=True)
    assert {work[key].action for key in old} == {"keep"}
    assert work["chat/chat-g-pod-d-1-d"].action == "create"
    assert work["chat/chat-a-d"].scale.notes == (
        "kept until chat/chat-g-pod-d-1-d is ready (0 of 4 ready): placement may have "
        "moved this Deployment's instances (allow_rebalance), and it serves until those "
        "replacing them do",
    )
    # Without a placement that moves, a group it empties is a scale-in, as before.
    assert {plan(before, moved, old)[key].action for key in old} == {"delete"}

    starting = live(before, moved, ready=1)
    work = plan(before, moved, old, starting, may_move=True)
    assert {work[key].action for key in old} == {"keep"}
    assert "(1 of 4 ready)" in work["chat/chat-a-p"].scale.notes[0]
    serving = live(before, moved)
    work = plan(before, moved, old, serving, may_move=True)
    assert {work[key].action for key in old} == {"delete"}


@pytest.mark.fault
def test_a_removal_under_rebalance_waits_only_for_what_is_not_itself_removed(
    before: DesiredState,
) -> None:
    """Only Deployments that add or keep capacity are waited for: one whose own
    removal is held never holds another (two that shrink while rolling out a new
    template held each other forever), nor does a removal of what serves nothing
    wait."""
    two = [grp("chat", "a", 2, 4), grp("chat", "d", 2, 4, domain="pod-d")]
    running = {key: replace(d, template_hash="old") for key, d in live(before, two).items()}
    smaller = [grp("chat", "a", 1, 2), grp("chat", "d", 1, 2, domain="pod-d")]
    work = plan(before, smaller, running, may_move=True)
    assert {w.action for w in work.values()} == {"update"}
    assert all(w.replicas_after < w.replicas_before for w in work.values())
    # A group that serves nothing yet goes at once, whatever starts beside it.
    unready = live(before, [grp("chat", "a", 2, 4)], ready=0)
    moved = [grp("chat", "g-pod-d-1", 2, 4, domain="pod-d")]
    work = plan(before, moved, unready, may_move=True)
    assert {work[key].action for key in unready} == {"delete"}


# ------------------------------------------------------------ a Deployment being deleted

DELETED_AT = "2026-01-01T00:10:00Z"


def being_deleted(deployment: LiveDeployment) -> LiveDeployment:
    """``deployment`` deleted while a finalizer holds it (deletionTimestamp set)."""
    return replace(deployment, deleting_since=DELETED_AT)


def test_a_group_with_a_deployment_being_deleted_is_a_leftover_whose_id_stays_reserved(
    before: DesiredState, after: DesiredState
) -> None:
    """chat's decode of group g-pod-a-1 is being deleted. It goes whatever the plan
    says, and its prefill alone serves nothing: the fleet counts neither (counted, the
    group was the capacity that was about to go, and nothing replaced it until it had
    gone), their Pods hold their GPUs where they run, and the group's id stays
    reserved while it exists (a new group under it would render the names being
    deleted)."""
    running = live(before, [grp("chat", "g-pod-a-1", 1, 3), grp("chat", "b", 1, 1)])
    decode = running["chat/chat-g-pod-a-1-d"] = being_deleted(running["chat/chat-g-pod-a-1-d"])
    prefill = running["chat/chat-g-pod-a-1-p"]
    pods = (
        pod_of(prefill, "chat-g-pod-a-1-p-1", node="n1"),
        *(pod_of(decode, f"chat-g-pod-a-1-d-{i}", node="n2") for i in range(3)),
    )
    snapshot = ClusterSnapshot(CLUSTER, {d.key: d for d in running.values()}, pods, (), 0.0)
    spec = before.clusters[CLUSTER]
    policies = {p.name: p for p in before.policies_for(CLUSTER)}

    observation = observation_from_snapshot(snapshot, spec, policies)
    assert [g.group_id for g in observation.fleet.groups if g.service == "chat"] == ["b"]
    chat = observation.fleet.service_fleet("chat")
    assert (chat.prefill.active, chat.decode.active) == (1, 1)
    assert observation.fleet.reserved_group_ids == {"chat": frozenset({"g-pod-a-1"})}
    assert observation.left_behind == (
        UngroupedInstances("chat", "decode", "n2", 3, decode.gpus_per_instance),
        UngroupedInstances("chat", "prefill", "n1", 1, prefill.gpus_per_instance),
    )

    # In a namespace the service moved away from, it reserves nothing: the group
    # replacing a moved one takes its id on purpose (names do not hold the namespace).
    moved = {p.name: p for p in after.policies_for(CLUSTER)}
    assert fleet_from_snapshot(snapshot, moved, spec).reserved_group_ids == {}


def test_a_deployment_being_deleted_is_replaced_while_it_serves_and_never_written(
    before: DesiredState,
) -> None:
    """The plan replaces the group being deleted with a new one under another id. The
    Deployment being deleted is never written (its removal is under way: no delete, no
    apply onto the terminating object); the rest of its group serves until the new
    group does, then is pruned."""
    running = live(before, [grp("chat", "g-pod-a-1", 1, 3)])
    running["chat/chat-g-pod-a-1-d"] = being_deleted(running["chat/chat-g-pod-a-1-d"])
    replacement = [grp("chat", "g-pod-a-2", 1, 3)]

    work = plan(before, replacement, running)
    assert {k: w.action for k, w in work.items()} == {
        "chat/chat-g-pod-a-2-p": "create",
        "chat/chat-g-pod-a-2-d": "create",
        "chat/chat-g-pod-a-1-p": "keep",
        "chat/chat-g-pod-a-1-d": "keep",
    }
    deleting = work["chat/chat-g-pod-a-1-d"]
    assert deleting.manifest is None and deleting.replicas_after == 3
    assert deleting.scale.notes == (
        f"being deleted since {DELETED_AT} (a finalizer or the garbage collector holds "
        "it): nothing is written to it, and it serves until it goes",
    )
    assert work["chat/chat-g-pod-a-1-p"].scale.notes == (
        "kept until chat/chat-g-pod-a-2-d is ready (0 of 3 ready): another Deployment of "
        "its group g-pod-a-1 is being deleted (the group is replaced whole), and this "
        "Deployment serves until those replacing it do",
    )

    serving = live(before, replacement)
    done = plan(before, replacement, running, serving)
    assert done["chat/chat-g-pod-a-1-p"].action == "delete"
    assert done["chat/chat-g-pod-a-1-d"].action == "keep"
    assert done["chat/chat-g-pod-a-1-d"].manifest is None

    # Even a plan that renders the very name being deleted writes nothing to it.
    same_name = plan(before, [grp("chat", "g-pod-a-1", 1, 3)], running)
    assert same_name["chat/chat-g-pod-a-1-d"].action == "keep"
    assert same_name["chat/chat-g-pod-a-1-d"].manifest is None


def test_the_cycle_replaces_a_group_being_deleted_under_a_new_id(before: DesiredState) -> None:
    """A cycle of the whole planner: the group it places chat in first is then being
    deleted. The next cycle does not count it, and places chat anew in another group
    whose Deployments have names of their own."""

    class OneAndThree:
        name = "one-and-three"

        def decide(self, inputs: DecisionInput) -> Decision:
            return Decision(inputs.policy.name, 1, 3, "scale_out", "")

    spec = before.clusters[CLUSTER]
    policies = {p.name: p for p in before.policies_for(CLUSTER)}

    def cycle(*deployments: LiveDeployment) -> list[DeploymentGroup]:
        snapshot = ClusterSnapshot(CLUSTER, {d.key: d for d in deployments}, (), (), 0.0)
        observation = observation_from_snapshot(snapshot, spec, policies)
        planned, _histories = plan_cluster(
            before, CLUSTER, observation, {}, {}, 100.0, OneAndThree(), GreedyPlacer()
        )
        return [g for g in planned.groups if g.service == "chat"]

    (first,) = cycle()
    running = live(before, [first])
    assert [g.group_id for g in cycle(*running.values())] == [first.group_id]

    decode = next(d for d in running.values() if d.role == "decode")
    running[str(decode.key)] = being_deleted(decode)
    (replacing,) = cycle(*running.values())
    assert replacing.group_id != first.group_id
    assert (replacing.prefill.instances, replacing.decode.instances) == (1, 3)


@pytest.mark.parametrize(("replacement_at", "kept"), [("00:10:00", True), ("00:10:01", False)])
def test_while_its_size_is_held_the_rest_of_a_group_being_deleted_waits_for_its_replacement(
    before: DesiredState, replacement_at: str, kept: bool
) -> None:
    """chat runs a group under pod-a and one under pod-d; pod-a's decode is being
    deleted (at 00:10:00) while chat's metrics are missing. Its prefill is kept while
    chat's groups hold fewer than it ran: pod-d's group, created before the deletion,
    stays beside the group being deleted; one created after it replaces that group
    (the sibling then goes once it serves). Created in the very second of the deletion,
    it counts as staying (whole seconds): the prefill is kept, no capacity lost."""
    old = created_at(
        live(before, [grp("chat", "g-pod-a-1", 1, 3), grp("chat", "d", 1, 3, domain="pod-d")]),
        "2026-01-01T00:00:00Z",
    )
    old["chat/chat-g-pod-a-1-d"] = being_deleted(old["chat/chat-g-pod-a-1-d"])
    replacing = created_at(
        live(before, [grp("chat", "g-pod-a-2", 1, 3)]), f"2026-01-01T{replacement_at}Z"
    )
    groups = [grp("chat", "d", 1, 3, domain="pod-d"), grp("chat", "g-pod-a-2", 1, 3)]
    work = plan(before, groups, old, replacing, unsized={"chat": "metrics_missing"})
    assert work["chat/chat-g-pod-a-1-d"].action == "keep"
    assert work["chat/chat-g-pod-a-1-p"].action == ("keep" if kept else "delete")
    if kept:
        assert (
            work["chat/chat-g-pod-a-1-p"]
            .scale.notes[0]
            .startswith(
                "kept while the service's size is held, not sized (metrics_missing), and its "
                "groups hold fewer than the service ran before the move (decode 6 of 9, "
                "prefill 2 of 3)"
            )
        )


def _deleting_at_10(before: DesiredState) -> dict[str, LiveDeployment]:
    """chat's groups g-pod-a-1 and d (pod-d), 1 prefill and 3 decode each, created at
    00:00; g-pod-a-1's decode being deleted since 00:10 (``DELETED_AT``)."""
    old = created_at(
        live(before, [grp("chat", "g-pod-a-1", 1, 3), grp("chat", "d", 1, 3, domain="pod-d")]),
        "2026-01-01T00:00:00Z",
    )
    old["chat/chat-g-pod-a-1-d"] = being_deleted(old["chat/chat-g-pod-a-1-d"])
    return old


def _planned(
    state: DesiredState,
    *deployments: dict[str, LiveDeployment],
    now_s: float,
    autoscaler: Autoscaler | None = None,
    held: Mapping[str, str] | None = None,
) -> tuple[Plan, dict[str, PolicyHistory]]:
    """One cycle of ``CLUSTER`` over ``deployments`` at ``now_s``, no metrics and no
    history (every service held for want of them), the greedy placer."""
    return plan_cluster(
        state,
        CLUSTER,
        _observed(state, *deployments),
        {},
        {},
        now_s,
        autoscaler or make_autoscaler("heteroscale"),
        GreedyPlacer(),
        held=held,
    )


def _observed(state: DesiredState, *deployments: dict[str, LiveDeployment]) -> Observation:
    snapshot = ClusterSnapshot(
        CLUSTER, {d.key: d for found in deployments for d in found.values()}, (), (), 0.0
    )
    policies = {p.name: p for p in state.policies_for(CLUSTER)}
    return observation_from_snapshot(snapshot, state.clusters[CLUSTER], policies)


@pytest.mark.parametrize(
    ("replacement", "unreplaced"),
    [
        (None, (1, 3)),
        # Created in the very second of the deletion: counted as staying (whole seconds).
        (("00:10:00", 1, 3), (1, 3)),
        (("00:10:01", 1, 3), (0, 0)),
        (("00:10:01", 1, 1), (0, 2)),
    ],
)
def test_the_instances_of_a_group_being_deleted_that_nothing_replaces_yet(
    before: DesiredState,
    replacement: tuple[str, int, int] | None,
    unreplaced: tuple[int, int],
) -> None:
    """What a hold keeps of a group being deleted: its instances, less what groups
    created after the deletion hold (a replacement, not counted twice); a group
    that stayed beside it (pod-d's) replaces none of it."""
    old = _deleting_at_10(before)
    found = [old]
    if replacement is not None:
        at, prefill, decode = replacement
        found.append(
            created_at(
                live(before, [grp("chat", "g-pod-a-2", prefill, decode)]), f"2026-01-01T{at}Z"
            )
        )
    chat = _observed(before, *found).fleet.service_fleet("chat")
    assert (chat.prefill.deleting_unreplaced, chat.decode.deleting_unreplaced) == unreplaced
    assert chat.decode.hold_size == chat.decode.active + unreplaced[1]
    # Nothing being deleted, nothing kept beyond the groups.
    calm = _observed(before, live(before, [grp("chat", "d", 1, 3, domain="pod-d")]))
    assert calm.fleet.deleting_unreplaced == {}


def test_a_replacement_being_deleted_in_its_turn_is_not_counted_again(
    before: DesiredState,
) -> None:
    """g-pod-a-1 is being deleted since 00:10; g-pod-a-2, created at 00:10:01 to
    replace it, is deleted too while the first still is. The service ran two groups
    (d and g-pod-a-1): one group's worth is unreplaced, not two (counted, the
    replacement being deleted asked for a third group where the service ran two)."""
    old = _deleting_at_10(before)
    replacing = created_at(live(before, [grp("chat", "g-pod-a-2", 1, 3)]), "2026-01-01T00:10:01Z")
    replacing = {
        key: replace(d, deleting_since="2026-01-01T00:11:00.000000Z")
        for key, d in replacing.items()
    }
    chat = _observed(before, old, replacing).fleet.service_fleet("chat")
    assert (chat.prefill.deleting_unreplaced, chat.decode.deleting_unreplaced) == (1, 3)
    assert (chat.prefill.hold_size, chat.decode.hold_size) == (2, 6)
    # Once the first group is gone, the replacement's own deletion is the first.
    alone = {k: d for k, d in old.items() if "g-pod-a-1" not in k}
    chat = _observed(before, alone, replacing).fleet.service_fleet("chat")
    assert (chat.prefill.deleting_unreplaced, chat.decode.deleting_unreplaced) == (1, 3)


def test_a_group_created_once_a_deletion_was_replaced_replaces_no_later_one(
    before: DesiredState,
) -> None:
    """g-pod-a-1 is being deleted since 00:10 (its finalizer stuck), replaced at
    00:10:01; at 01:00 the service scaled out by a group; at 02:00 group d, there since
    00:00, is deleted too. d's instances await a replacement: the scale-out was made
    while nothing awaited one (taken as replacing every deletion after the first, it
    hid d's, and the held service ran short once d's finalizer went)."""
    old = _deleting_at_10(before)
    replaced = created_at(live(before, [grp("chat", "g-pod-a-2", 1, 3)]), "2026-01-01T00:10:01Z")
    grown = created_at(live(before, [grp("chat", "g-pod-a-3", 1, 3)]), "2026-01-01T01:00:00Z")
    chat = _observed(before, old, replaced, grown).fleet.service_fleet("chat")
    assert (chat.prefill.deleting_unreplaced, chat.decode.deleting_unreplaced) == (0, 0)
    old["chat/chat-d-d"] = replace(old["chat/chat-d-d"], deleting_since="2026-01-01T02:00:00Z")
    chat = _observed(before, old, replaced, grown).fleet.service_fleet("chat")
    assert (chat.prefill.deleting_unreplaced, chat.decode.deleting_unreplaced) == (1, 3)
    # Its replacement, created after, leaves nothing awaiting.
    again = created_at(live(before, [grp("chat", "g-pod-a-4", 1, 3)]), "2026-01-01T02:00:01Z")
    chat = _observed(before, old, replaced, grown, again).fleet.service_fleet("chat")
    assert (chat.prefill.deleting_unreplaced, chat.decode.deleting_unreplaced) == (0, 0)


def test_a_deletion_time_that_does_not_read_never_counts_a_replacement_twice(
    before: DesiredState,
) -> None:
    """With no deletion time to tell a replacement from a group that stayed, none
    counts as staying: the group being deleted is compared with the groups alone."""
    old = _deleting_at_10(before)
    old["chat/chat-g-pod-a-1-d"] = replace(old["chat/chat-g-pod-a-1-d"], deleting_since="soon")
    chat = _observed(before, old).fleet.service_fleet("chat")
    assert (chat.prefill.deleting_unreplaced, chat.decode.deleting_unreplaced) == (0, 0)
    alone = {k: d for k, d in old.items() if "g-pod-a-1" in k}
    chat = _observed(before, alone).fleet.service_fleet("chat")
    assert (chat.prefill.deleting_unreplaced, chat.decode.deleting_unreplaced) == (1, 3)


def test_a_size_held_on_missing_metrics_keeps_a_group_being_deleted_until_replaced(
    before: DesiredState,
) -> None:
    """chat's metrics are missing while one of its two groups is being deleted. The
    hold counts that group (2 prefill, 6 decode, not the 1 and 3 its staying group
    runs) and says so; the plan adds what replaces it. Next cycle, the replacement
    running, the hold is the groups' own: nothing more is added."""
    old = _deleting_at_10(before)
    autoscaler = make_autoscaler("heteroscale")
    cycle, _histories = _planned(before, old, now_s=700.0, autoscaler=autoscaler)
    decision = cycle.decisions["chat"]
    assert decision.reason == "metrics_missing"
    assert (decision.prefill, decision.decode) == (2, 6)
    assert (
        "hold 2 prefill, 6 decode (the hold counts 1 prefill, 3 decode instance(s) of "
        "groups being deleted: replaced before they go)"
    ) in decision.message
    chat = [g for g in cycle.groups if g.service == "chat"]
    # Prefill may be placed beyond its target to open a group (an anchor).
    assert sum(g.prefill.instances for g in chat) >= 2
    assert sum(g.decode.instances for g in chat) == 6
    assert "g-pod-a-1" not in {g.group_id for g in chat}

    replacing = created_at(
        live(before, [g for g in chat if g.group_id != "d"]), "2026-01-01T00:10:01Z"
    )
    after, _histories = _planned(before, old, replacing, now_s=800.0, autoscaler=autoscaler)
    assert "groups being deleted" not in after.decisions["chat"].message
    assert (after.decisions["chat"].prefill, after.decisions["chat"].decode) == (2, 6)
    assert not [c for c in after.changes if c.service == "chat"]


def test_a_service_the_cycle_holds_replaces_a_group_being_deleted_by_a_new_group(
    before: DesiredState,
) -> None:
    """chat is held by the cycle (a refused scale change: none of its groups may
    change size) while one of its groups is being deleted. Its staying group keeps its
    size (the placer would have grown it, the very write the hold refuses) and a new
    group under an id of its own replaces the one being deleted; the note says so."""
    old = _deleting_at_10(before)
    cycle, _histories = _planned(before, old, now_s=700.0, held={"chat": "refused"})
    chat = {g.group_id: g for g in cycle.groups if g.service == "chat"}
    staying = chat.pop("d")
    assert (staying.prefill.instances, staying.decode.instances) == (1, 3)
    assert "g-pod-a-1" not in chat
    assert sum(g.prefill.instances for g in chat.values()) == 1
    assert sum(g.decode.instances for g in chat.values()) == 3
    assert (
        "service chat held at 1 prefill, 3 decode, plus 1 prefill, 3 decode in new groups "
        "replacing its groups being deleted (the hold counts them"
    ) in " ".join(cycle.notes)
    # A held service with nothing being deleted keeps exactly its groups, as before.
    calm = live(before, [grp("chat", "d", 1, 3, domain="pod-d")])
    same, _histories = _planned(before, calm, now_s=700.0, held={"chat": "refused"})
    assert [g for g in same.groups if g.service == "chat"] == [
        g for g in _observed(before, calm).fleet.groups if g.service == "chat"
    ]


DELETED_AT_S = dt.datetime(2026, 1, 1, 0, 10, tzinfo=dt.UTC).timestamp()  # DELETED_AT


def deleted_marked(
    deployment: LiveDeployment, mark: str | None, marked_at: str | None = "2026-01-01T00:09:59Z"
) -> LiveDeployment:
    """``deployment`` as the API server lists it once deleted at ``DELETED_AT`` while a
    finalizer holds it, carrying heteroscale's deletion mark ``mark`` (None: none),
    which the API server recorded at ``marked_at`` (the managedFields entry of the
    mark's field manager; None: no such entry)."""
    meta = deployment.raw["metadata"]
    annotations = dict(meta.get("annotations") or {})
    if mark is not None:
        annotations[names.DELETED_BY_PLAN_ANNOTATION] = mark
    entries = list(meta.get("managedFields") or [])
    if marked_at is not None:
        entries.append(
            {
                "manager": names.DELETION_MARK_MANAGER,
                "operation": "Update",
                "apiVersion": "apps/v1",
                "time": marked_at,
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:metadata": {"f:annotations": {f"f:{names.DELETED_BY_PLAN_ANNOTATION}": {}}}
                },
            }
        )
    parsed = parse_deployment(
        {
            **deployment.raw,
            "metadata": {
                **meta,
                "annotations": annotations,
                "managedFields": entries,
                "deletionTimestamp": DELETED_AT,
            },
        }
    )
    assert parsed is not None
    return replace(parsed, created=deployment.created)


@pytest.mark.parametrize(
    ("mark", "marked_at", "own"),
    [
        # Marked just before its DELETE (the API server's time of the mark a second
        # before its deletionTimestamp), or in the same second.
        (names.deletion_mark(DELETED_AT_S - 1.5), "2026-01-01T00:09:59Z", True),
        (names.deletion_mark(DELETED_AT_S - 0.2), DELETED_AT, True),
        # The reconciler's clock minutes ahead of the API server's: its value is not
        # what is judged.
        (names.deletion_mark(DELETED_AT_S + 240), "2026-01-01T00:09:59Z", True),
        # A saved plan that started ten minutes before this delete.
        (names.deletion_mark(DELETED_AT_S - 600), "2026-01-01T00:09:59Z", True),
        (None, None, False),  # kubectl delete, a namespace cleanup
        ("1767226199", "2026-01-01T00:09:59Z", False),  # not what heteroscale writes
        ("soon", "2026-01-01T00:09:59Z", False),
        # Its DELETE failed after the mark; someone deleted it an hour later, or two
        # minutes later.
        (names.deletion_mark(DELETED_AT_S - 3600), "2025-12-31T23:10:00Z", False),
        (names.deletion_mark(DELETED_AT_S - 120), "2026-01-01T00:08:00Z", False),
        # No time of the mark as the API server recorded it.
        (names.deletion_mark(DELETED_AT_S - 1), None, False),
    ],
)
def test_a_group_heteroscale_deleted_itself_is_not_asked_for_again_by_a_hold(
    before: DesiredState, mark: str | None, marked_at: str | None, own: bool
) -> None:
    """chat's group g-pod-a-1 was moved make before break: g-pod-a-2 created at 00:05,
    then the old group deleted at 00:10 while a finalizer holds it. Marked deleted by a
    plan, the API server's time of the mark at most the margin before its deletion,
    its capacity was removed by the plan: nothing awaits a replacement, and a hold
    keeps chat at its one group (counted, the replacement made before the deletion
    replaced none of it, and 1 prefill, 3 decode were held at 2 and 6 for as long as
    chat was held). Without a mark, with one that does not read, without the server's
    time of it or with a deletion long after it, it is someone else's deletion, which
    the hold keeps until a group created since replaces it (the side that never loses
    capacity)."""
    old = created_at(live(before, [grp("chat", "g-pod-a-1", 1, 3)]), "2026-01-01T00:00:00Z")
    old = {key: deleted_marked(d, mark, marked_at) for key, d in old.items()}
    new = created_at(live(before, [grp("chat", "g-pod-a-2", 1, 3)]), "2026-01-01T00:05:00Z")
    observation = _observed(before, old, new)
    chat = observation.fleet.service_fleet("chat")
    unreplaced = (0, 0) if own else (1, 3)
    assert (chat.prefill.deleting_unreplaced, chat.decode.deleting_unreplaced) == unreplaced
    assert (chat.prefill.hold_size, chat.decode.hold_size) == (1 + unreplaced[0], 3 + unreplaced[1])
    # Whose deletion it is, as the status says it.
    whose = "deleted by heteroscale's plan: not replaced" if own else "deleted by someone else"
    assert observation.deleting["chat"].count(whose) == 2


def test_a_scale_in_a_finalizer_holds_is_kept_by_a_hold_on_missing_metrics(
    before: DesiredState,
) -> None:
    """chat ran two groups until a scale-in deleted g-pod-a-1 at 00:10 (marked), which a
    finalizer holds; then chat's metrics went missing. The hold keeps what the scale-in
    left, 1 prefill and 3 decode, and adds no group (counted as someone else's
    deletion, the outage undid the scale-in for as long as it lasted)."""
    old = created_at(
        live(before, [grp("chat", "g-pod-a-1", 1, 3), grp("chat", "d", 1, 3, domain="pod-d")]),
        "2026-01-01T00:00:00Z",
    )
    mark = names.deletion_mark(DELETED_AT_S)
    old = {k: deleted_marked(d, mark) if "g-pod-a-1" in k else d for k, d in old.items()}
    cycle, _histories = _planned(before, old, now_s=700.0)
    decision = cycle.decisions["chat"]
    assert decision.reason == "metrics_missing"
    assert (decision.prefill, decision.decode) == (1, 3)
    assert "groups being deleted" not in decision.message
    assert [g.group_id for g in cycle.groups if g.service == "chat"] == ["d"]
    assert not [c for c in cycle.changes if c.service == "chat"]

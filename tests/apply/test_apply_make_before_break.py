"""Make before break (pure): when a service moves to another namespace, its old
Deployments keep serving until the Deployments replacing them serve what the plan
asks of them; then they are pruned as before. Only moves are held."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from reconciler.apply.actions import (
    WorkloadWork,
    effective_manifest,
    not_yet_serving,
    plan_workloads,
)
from reconciler.apply.render import render_groups
from reconciler.desired import DesiredState, load_desired_state
from reconciler.observe.kubernetes import (
    ClusterSnapshot,
    LiveDeployment,
    fleet_from_snapshot,
    parse_deployment,
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


def grp(service: str, group_id: str, prefill: int, decode: int) -> DeploymentGroup:
    return DeploymentGroup(
        service,
        CLUSTER,
        group_id,
        "pod-a",
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


def plan(
    state: DesiredState, groups: list[DeploymentGroup], *deployments: dict[str, LiveDeployment]
) -> dict[str, WorkloadWork]:
    """This cycle's work under ``state`` for ``groups`` against the live ``deployments``."""
    snapshot = ClusterSnapshot(
        CLUSTER, {d.key: d for found in deployments for d in found.values()}, (), (), 0.0
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
        "namespace chat-v2, and this Deployment serves until the Deployments replacing it do",
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

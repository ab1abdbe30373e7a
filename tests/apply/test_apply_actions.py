"""Pairing desired and live workloads (pure): create, update, prune, keep, and the
order that never drops capacity."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.apply import names
from reconciler.apply.actions import effective_manifest, plan_workloads, provably_unchanged
from reconciler.apply.render import render_groups
from reconciler.desired import DesiredState, load_desired_state
from reconciler.observe.kubernetes import ClusterSnapshot, parse_deployment, parse_pod
from reconciler.state import DeploymentGroup, GroupRole

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def state() -> DesiredState:
    return load_desired_state(REPO)


def grp(
    service: str, group_id: str, prefill: int, decode: int, domain: str = "pod-a"
) -> DeploymentGroup:
    return DeploymentGroup(
        service,
        "prod-east",
        group_id,
        domain,
        None,
        GroupRole("h800", prefill),
        GroupRole("h800", decode),
    )


def snapshot_of(
    state: DesiredState, groups: list[DeploymentGroup], pods: tuple = ()
) -> ClusterSnapshot:
    """What the API server would return after applying ``groups``."""
    cluster = state.clusters["prod-east"]
    rendered = render_groups(groups, state.policies, cluster, state.templates)
    live = {}
    for key, w in rendered.items():
        manifest = effective_manifest(w, w.replicas, None)
        # As in a list response: no apiVersion/kind on the items.
        item = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind")}
        live[key] = parse_deployment(
            {**item, "metadata": {**manifest["metadata"], "resourceVersion": "5"}}
        )
    return ClusterSnapshot("prod-east", live, pods, (), 0.0)


def work_for(
    state: DesiredState, groups: list[DeploymentGroup], snapshot: ClusterSnapshot, slo: str = "held"
):  # type: ignore[no-untyped-def]
    policies = {p.name: p for p in state.policies_for("prod-east")}
    rendered = render_groups(
        [g for g in groups if g.service in policies],
        policies,
        state.clusters["prod-east"],
        state.templates,
    )
    return plan_workloads(
        groups=groups,
        rendered=rendered,
        snapshot=snapshot,
        policies=policies,
        slo={s: slo for s in policies},
        now_s=100.0,
        window_s=60.0,
    )


def test_pairs_by_key_create_update_delete(state: DesiredState) -> None:
    snapshot = snapshot_of(state, [grp("chat", "a", 1, 3), grp("chat", "b", 1, 2)])
    work = work_for(state, [grp("chat", "a", 1, 5), grp("chat", "c", 2, 2)], snapshot)
    actions = {str(w.key): (w.action, w.replicas_before, w.replicas_after) for w in work}
    assert actions == {
        "chat/chat-a-p": ("update", 1, 1),
        "chat/chat-a-d": ("update", 3, 5),
        "chat/chat-c-p": ("create", 0, 2),
        "chat/chat-c-d": ("create", 0, 2),
        "chat/chat-b-p": ("delete", 1, 0),
        "chat/chat-b-d": ("delete", 2, 0),
    }
    # Capacity-adding work first, removals last.
    removing = [w.removes_capacity for w in work]
    assert removing == sorted(removing)
    assert all(
        w.manifest is not None and w.manifest["metadata"]["resourceVersion"] == "5"
        for w in work
        if w.action == "update"
    )


def test_groups_of_services_without_policy_are_kept_and_prunes_wait_while_slos_break(
    state: DesiredState,
) -> None:
    snapshot = snapshot_of(state, [grp("chat", "a", 1, 3)])
    orphan_state = DesiredState(
        policies={k: v for k, v in state.policies.items() if k != "chat"},
        clusters=state.clusters,
        templates=state.templates,
    )
    kept = work_for(orphan_state, [grp("chat", "a", 1, 3)], snapshot)
    assert {w.action for w in kept} == {"keep"} and "no policy" in kept[0].reason
    held = work_for(state, [], snapshot, slo="broken")
    assert {w.action for w in held} == {"keep"} and held[0].reason == "prune held: SLO not met"


def test_a_scale_in_drains_ready_pods_and_prunes_drain_everything(state: DesiredState) -> None:
    def pod(name: str) -> object:
        return parse_pod(
            {
                "metadata": {
                    "name": name,
                    "namespace": "chat",
                    "creationTimestamp": name,
                    "labels": {
                        names.SERVICE_LABEL: "chat",
                        names.GROUP_LABEL: "a",
                        names.ROLE_LABEL: "decode",
                        names.SERVING_LABEL: "true",
                    },
                },
                "spec": {"nodeName": "n"},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            }
        )

    snapshot = snapshot_of(state, [grp("chat", "a", 1, 3)], pods=(pod("p1"), pod("p2"), pod("p3")))
    work = {str(w.key): w for w in work_for(state, [grp("chat", "a", 1, 1)], snapshot)}
    assert work["chat/chat-a-d"].scale.drain == ("p3", "p2")
    pruned = {str(w.key): w for w in work_for(state, [], snapshot)}
    assert (
        sorted(pruned["chat/chat-a-d"].scale.drain) == ["p1", "p2", "p3"]
        and pruned["chat/chat-a-d"].action == "delete"
    )


def test_an_object_applied_from_the_same_manifest_is_provably_unchanged(
    state: DesiredState,
) -> None:
    groups = [grp("chat", "a", 1, 3)]
    snapshot = snapshot_of(state, groups)
    assert all(provably_unchanged(w) for w in work_for(state, groups, snapshot))
    resized = work_for(state, [grp("chat", "a", 1, 4)], snapshot)
    assert [provably_unchanged(w) for w in resized] == [True, False] or [
        provably_unchanged(w) for w in resized
    ] == [False, True]
    # Someone else manages it: never assumed unchanged.
    live = next(iter(snapshot.deployments.values()))
    raw = {
        **live.raw,
        "metadata": {
            **live.raw["metadata"],
            "managedFields": [{"manager": "kubectl", "fieldsV1": {}}],
        },
    }
    foreign = ClusterSnapshot(
        "prod-east", {**snapshot.deployments, live.key: parse_deployment(raw)}, (), (), 0.0
    )
    assert not all(provably_unchanged(w) for w in work_for(state, groups, foreign))

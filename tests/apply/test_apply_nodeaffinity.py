"""A create or a pod-template change that no live Node could run is refused, and the
service it belongs to loses no capacity that cycle: the Deployment controller would
stop old Pods for new ones that stay Pending (a typo in a topology label key in the
cluster file is enough). The matching follows the scheduler's rules for required node
affinity and ``nodeSelector``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reconciler.apply.actions import plan_workloads
from reconciler.apply.nodeaffinity import node_matches, unschedulable_problem
from reconciler.apply.render import render_groups
from reconciler.desired import DesiredState, load_desired_state
from reconciler.desired.models import ClusterSpec
from reconciler.observe.kubernetes import ClusterSnapshot, LiveNode
from tests.apply.test_apply_actions import grp, snapshot_of

REPO = Path(__file__).resolve().parents[2]
NODE = LiveNode("n1", {"zone": "a", "gpu": "h800", "slots": "8"}, 8)


def _spec(*terms: dict[str, Any], selector: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}
            }
        }
    }
    if selector is not None:
        spec["nodeSelector"] = selector
    return spec


def _expr(key: str, operator: str, *values: str) -> dict[str, Any]:
    return {"matchExpressions": [{"key": key, "operator": operator, "values": list(values)}]}


@pytest.mark.parametrize(
    "term, matches",
    [
        (_expr("zone", "In", "a", "b"), True),
        (_expr("zone", "In", "b"), False),
        (_expr("zone", "NotIn", "b"), True),
        (_expr("rack", "NotIn", "b"), True),  # absent: not in
        (_expr("zone", "Exists"), True),
        (_expr("rack", "Exists"), False),
        (_expr("rack", "DoesNotExist"), True),
        (_expr("slots", "Gt", "4"), True),
        (_expr("slots", "Lt", "4"), False),
        (_expr("zone", "Gt", "4"), False),  # not an integer
        (_expr("zone", "Near", "a"), False),  # an operator the scheduler refuses
        ({}, False),  # a term without requirements matches no node
        ({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}, True),
        ({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}, False),
    ],
)
def test_one_term_matches_as_the_scheduler_matches_it(term: dict[str, Any], matches: bool) -> None:
    assert node_matches(_spec(term), NODE) is matches


def test_terms_are_ored_expressions_anded_and_the_selector_applies_too() -> None:
    both = {
        "matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a"]},
            {"key": "gpu", "operator": "In", "values": ["h20"]},
        ]
    }
    assert not node_matches(_spec(both), NODE)
    assert node_matches(_spec(both, _expr("gpu", "In", "h800")), NODE)
    assert not node_matches(_spec(_expr("zone", "In", "a"), selector={"gpu": "h20"}), NODE)
    assert node_matches({"nodeSelector": {"gpu": "h800"}}, NODE)
    assert node_matches({}, NODE)  # no affinity: any node
    assert not node_matches(_spec(), NODE)  # an empty list of terms: none


def test_the_problem_names_the_label_key_no_node_has() -> None:
    manifest = {"spec": {"template": {"spec": _spec(_expr("zonex", "In", "a"))}}}
    problem = unschedulable_problem(manifest, [NODE])
    assert problem is not None and "none of the cluster's 1 nodes" in problem
    assert "no node has a label 'zonex'" in problem
    other_value = {"spec": {"template": {"spec": _spec(_expr("zone", "In", "q"))}}}
    assert "no node meets 'zone' In ['q']" in (unschedulable_problem(other_value, [NODE]) or "")
    assert unschedulable_problem(manifest, []) is None  # no node listed: nothing to judge


# ------------------------------------------------------------------ the cycle's work


@pytest.fixture(scope="module")
def state() -> DesiredState:
    return load_desired_state(REPO)


def _live_nodes(cluster: ClusterSpec) -> tuple[LiveNode, ...]:
    return tuple(LiveNode(n.name, cluster.node_labels(n), n.gpus) for n in cluster.nodes)


def _work(state: DesiredState, cluster: ClusterSpec, groups: list, snapshot: ClusterSnapshot):  # type: ignore[no-untyped-def]
    policies = {p.name: p for p in state.policies_for("prod-east")}
    rendered = render_groups(groups, policies, cluster, state.templates)
    return plan_workloads(
        groups=groups,
        rendered=rendered,
        snapshot=snapshot,
        policies=policies,
        slo={s: "held" for s in policies},
        now_s=100.0,
        window_s=60.0,
    )


def test_a_renamed_label_key_refuses_the_rollout_and_holds_the_services_capacity(
    state: DesiredState,
) -> None:
    cluster = state.clusters["prod-east"]
    # svc-a's group is on the whole cluster (no switch label in its affinity).
    loose = grp("svc-a", "a", 1, 1, domain="prod-east")
    running = [grp("chat", "a", 1, 3), grp("chat", "b", 1, 2), loose]
    live = snapshot_of(state, running)
    snapshot = ClusterSnapshot("prod-east", live.deployments, (), _live_nodes(cluster), 0.0)

    # As the cluster file says: every workload writes as before, nothing refused.
    same = _work(state, cluster, running, snapshot)
    assert not any(w.refusal for w in same)

    # The S2 label key mistyped in the cluster file: chat moves group b's capacity to
    # a new group c (a create) and scales a up.
    labels = cluster.labels.model_copy(update={"s2": cluster.labels.s2 + "x"})
    typo = cluster.model_copy(update={"labels": labels})
    wanted = [grp("chat", "a", 1, 4), grp("chat", "c", 1, 2), loose]
    work = {str(w.key): w for w in _work(state, typo, wanted, snapshot)}
    for key in ("chat/chat-a-p", "chat/chat-a-d", "chat/chat-c-p", "chat/chat-c-d"):
        assert "no node has a label" in work[key].refusal, key
        assert labels.s2 in work[key].refusal
    # Group b's removal would take capacity the refused group c was to replace: kept.
    for key in ("chat/chat-b-p", "chat/chat-b-d"):
        assert work[key].action == "keep" and work[key].manifest is None
        assert work[key].replicas_after == work[key].replicas_before
        assert "cannot be written (no node)" in work[key].scale.notes[0]
    # Another service is not held for chat's sake.
    assert not work["svc-a/svc-a-a-p"].refusal and work["svc-a/svc-a-a-p"].manifest is not None


def test_a_replica_change_alone_is_written_even_if_no_node_matches_any_more(
    state: DesiredState,
) -> None:
    # Same template: no Pod is replaced, so nothing is lost by writing the new count
    # (the nodes' labels changing under a running fleet is drift, reported as such).
    cluster = state.clusters["prod-east"]
    live = snapshot_of(state, [grp("chat", "a", 1, 3)])
    relabelled = tuple(
        LiveNode(n.name, {**n.labels, cluster.labels.s2: "elsewhere"}, n.gpus)
        for n in _live_nodes(cluster)
    )
    snapshot = ClusterSnapshot("prod-east", live.deployments, (), relabelled, 0.0)
    work = _work(state, cluster, [grp("chat", "a", 1, 5)], snapshot)
    assert not any(w.refusal for w in work)
    assert {str(w.key): w.replicas_after for w in work}["chat/chat-a-d"] == 5


def test_the_answer_is_kept_per_distinct_affinity_not_per_manifest() -> None:
    seen: dict[str, str | None] = {}
    missing = {"spec": {"template": {"spec": _spec(_expr("zonex", "In", "a"))}}}
    other_image = {
        "spec": {"template": {"spec": {**_spec(_expr("zonex", "In", "a")), "image": "x"}}}
    }
    present = {"spec": {"template": {"spec": _spec(_expr("zone", "In", "a"))}}}
    first = unschedulable_problem(missing, [NODE], seen)
    assert first is not None and unschedulable_problem(other_image, [NODE], seen) == first
    assert unschedulable_problem(present, [NODE], seen) is None
    assert len(seen) == 2

"""Reading the fleet and drift from API objects (the pure part of the observer)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.apply import names
from reconciler.apply.render import ObjectKey, render_groups
from reconciler.desired import DesiredState, load_desired_state
from reconciler.observe.kubernetes import (
    ClusterSnapshot,
    LiveNode,
    fleet_from_snapshot,
    node_drift,
    observation_from_snapshot,
    parse_deployment,
    parse_node,
    parse_pod,
)
from reconciler.state import DeploymentGroup, GroupRole

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def state() -> DesiredState:
    return load_desired_state(REPO)


def _live(state: DesiredState, groups: list[DeploymentGroup], ready: int = 0) -> dict:
    rendered = render_groups(groups, state.policies, state.clusters["prod-east"], state.templates)
    out = {}
    for key, workload in rendered.items():
        obj = {
            **workload.manifest,
            "metadata": {**workload.manifest["metadata"], "resourceVersion": "7"},
        }
        obj["status"] = {"readyReplicas": min(ready, workload.replicas)}
        out[key] = parse_deployment(obj)
    return out


def _pod(
    name: str,
    *,
    serving: bool = True,
    group: str = "pod-a-0",
    role: str = "decode",
    node: str = "h20-b-001",
    ready: bool = True,
    drained_from: str | None = None,
) -> dict:
    annotations = {names.TEMPLATE_HASH_ANNOTATION: "x"}
    if drained_from:
        annotations |= {
            names.DRAINED_AT_ANNOTATION: "100.5",
            names.DRAINED_FROM_ANNOTATION: drained_from,
        }
    return {
        "metadata": {
            "name": name,
            "namespace": "chat",
            "annotations": annotations,
            "labels": {
                names.SERVICE_LABEL: "chat",
                names.GROUP_LABEL: group,
                names.ROLE_LABEL: role,
                names.SERVING_LABEL: "true" if serving else "false",
            },
        },
        "spec": {"nodeName": node},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_deployments_become_groups_with_starting_and_draining(state: DesiredState) -> None:
    group = DeploymentGroup(
        "chat", "prod-east", "pod-a-0", "pod-a", "rg-a", GroupRole("h800", 2), GroupRole("h800", 6)
    )
    deployments = _live(state, [group], ready=2)
    pods = tuple(
        parse_pod(p)
        for p in [
            _pod("d1", node="h800-a-001"),
            _pod("d2", node="h800-a-001"),
            _pod("d3", node="h800-a-002"),
            _pod("old", serving=False, drained_from="chat-pod-a-0-d"),
        ]
    )
    snapshot = ClusterSnapshot("prod-east", deployments, pods, (), 0.0)
    fleet = fleet_from_snapshot(snapshot, state.policies)
    (observed,) = fleet.groups
    assert (observed.service, observed.group_id, observed.domain, observed.subgroup) == (
        "chat",
        "pod-a-0",
        "pod-a",
        "rg-a",
    )
    assert observed.prefill.instances == 2 and observed.decode.instances == 6
    assert [(n.node, n.instances) for n in observed.decode.nodes] == [
        ("h800-a-001", 2),
        ("h800-a-002", 1),
    ]
    assert fleet.starting[("chat", "decode")] == 4 and fleet.starting[("chat", "prefill")] == 0
    service = fleet.service_fleet("chat")
    assert (service.decode.ready, service.decode.starting, service.decode.draining) == (2, 4, 1)


def test_a_deployment_left_in_a_namespace_the_service_moved_from_is_not_its_fleet(
    state: DesiredState,
) -> None:
    # chat's policy deploys to namespace chat; the same group rendered into "old-ns"
    # (where chat deployed before a namespace change) has the same group id.
    group = DeploymentGroup(
        "chat", "prod-east", "pod-a-0", "pod-a", "rg-a", GroupRole("h800", 2), GroupRole("h800", 6)
    )
    current = _live(state, [group], ready=6)
    moved = state.policies["chat"].model_copy(update={"namespace": "old-ns"})
    before_the_move = DesiredState(
        policies={**state.policies, "chat": moved},
        clusters=state.clusters,
        templates=state.templates,
    )
    left = _live(before_the_move, [replace(group, decode=GroupRole("h800", 1))], ready=1)
    assert {k.namespace for k in left} == {"old-ns"}
    snapshot = ClusterSnapshot("prod-east", {**left, **current}, (), (), 0.0)
    (observed,) = fleet_from_snapshot(snapshot, state.policies).groups
    assert observed.decode.instances == 6  # the current namespace's, never the leftover's
    snapshot = ClusterSnapshot("prod-east", {**current, **left}, (), (), 0.0)
    (observed,) = fleet_from_snapshot(snapshot, state.policies).groups
    assert observed.decode.instances == 6


def test_a_group_with_one_role_gets_the_other_roles_preferred_type(state: DesiredState) -> None:
    group = DeploymentGroup(
        "chat", "prod-east", "g", "pod-b", "rg-b", GroupRole("h800", 0), GroupRole("h20", 3)
    )
    fleet = fleet_from_snapshot(
        ClusterSnapshot("prod-east", _live(state, [group]), (), (), 0.0), state.policies
    )
    assert fleet.groups[0].prefill == GroupRole("h800", 0)


def test_node_drift_reports_missing_relabelled_resized_and_unknown_nodes(
    state: DesiredState,
) -> None:
    cluster = state.clusters["prod-east"]
    labels = cluster.labels
    nodes = []
    for node in cluster.nodes:
        if node.name == "h800-a-001":
            continue  # missing
        node_labels = {
            labels.s2: node.s2,
            labels.s1: node.s1,
            labels.s0: node.s0,
            labels.gpu_type: node.gpu_type,
        }
        gpus = node.gpus
        if node.name == "h20-b-002":
            node_labels[labels.s1] = "mp-x"
        if node.name == "l20-c-001":
            gpus = 4
        nodes.append(LiveNode(node.name, node_labels, gpus))
    nodes.append(LiveNode("stray", {labels.gpu_type: "h20"}, 8))
    nodes.append(LiveNode("cpu-only", {}, 0))
    drift = node_drift(cluster, nodes)
    assert sorted((d.kind, d.name) for d in drift) == [
        ("node_capacity", "l20-c-001"),
        ("node_label", "h20-b-002"),
        ("node_missing", "h800-a-001"),
        ("node_unexpected", "stray"),
    ]
    detail = next(d.detail for d in drift if d.kind == "node_label")
    assert "'mp-x'" in detail and "'mp-b1'" in detail


def _node_objects(state: DesiredState, capacity_of: dict[str, str]) -> list[dict]:
    """prod-east's Nodes as the API server lists them, labelled as the cluster file
    says; a Node's ``nvidia.com/gpu`` capacity is ``capacity_of[name]`` when given."""
    cluster = state.clusters["prod-east"]
    labels = cluster.labels
    return [
        {
            "metadata": {
                "name": node.name,
                "labels": {
                    labels.s2: node.s2,
                    labels.s1: node.s1,
                    labels.s0: node.s0,
                    labels.gpu_type: node.gpu_type,
                },
            },
            "status": {
                "capacity": {
                    "cpu": "64",
                    names.GPU_RESOURCE: capacity_of.get(node.name, str(node.gpus)),
                }
            },
        }
        for node in cluster.nodes
    ]


def test_a_gpu_capacity_in_plain_digits_reads_and_a_node_without_one_has_no_gpus() -> None:
    def gpus(capacity: dict) -> int | None:
        return parse_node({"metadata": {"name": "n"}, "status": {"capacity": capacity}}).gpus

    assert gpus({names.GPU_RESOURCE: "8"}) == 8
    assert gpus({names.GPU_RESOURCE: "0"}) == 0
    assert gpus({"cpu": "64"}) == 0  # no device plugin: a CPU node


@pytest.mark.parametrize(
    "capacity",
    [
        "1e9",  # a legal quantity, 10**9 GPUs: beyond any node
        "4k",  # 4000: Kubernetes writes a count below 1000 in plain digits
        "65",  # plain digits, beyond the 64 GPUs a cluster file allows a node
        "abc",
        "-3",
        "4.5",
        "",
        "8\x1b[2J\u202e",
    ],
)
def test_an_unreadable_gpu_capacity_is_drift_said_as_unreadable_and_changes_no_count(
    state: DesiredState, capacity: str
) -> None:
    """Not 0 GPUs ("capacity is 0" reads as a node that lost its GPUs): the drift says
    unreadable, quoting the value escaped, and what the cycle counts (the fleet, the
    held services; placement reads the cluster file) is what a readable capacity gives."""
    cluster = state.clusters["prod-east"]
    victim = cluster.nodes[0]
    readable = tuple(parse_node(o) for o in _node_objects(state, {}))
    nodes = tuple(parse_node(o) for o in _node_objects(state, {victim.name: capacity}))
    seen = next(n for n in nodes if n.name == victim.name)
    assert seen.gpus is None and seen.gpus_unreadable is not None
    assert "\x1b" not in seen.gpus_unreadable and "\u202e" not in seen.gpus_unreadable

    (item,) = node_drift(cluster, nodes)
    assert (item.kind, item.name) == ("node_capacity", victim.name)
    assert (item.live, item.desired) == ("unreadable", str(victim.gpus))  # type: ignore[attr-defined]
    assert "unreadable" in item.detail and "capacity is 0" not in item.detail
    assert node_drift(cluster, readable) == ()

    group = DeploymentGroup(
        "chat", "prod-east", "g", "pod-b", "rg-b", GroupRole("h800", 1), GroupRole("h20", 3)
    )
    deployments = _live(state, [group])
    seen_with = observation_from_snapshot(
        ClusterSnapshot("prod-east", deployments, (), nodes, 0.0), cluster, state.policies
    )
    seen_without = observation_from_snapshot(
        ClusterSnapshot("prod-east", deployments, (), readable, 0.0), cluster, state.policies
    )
    assert seen_with.fleet == seen_without.fleet and seen_with.held == seen_without.held == {}


def test_objects_managed_by_someone_else_are_drift(state: DesiredState) -> None:
    group = DeploymentGroup(
        "chat", "prod-east", "g", "pod-b", "rg-b", GroupRole("h800", 1), GroupRole("h20", 3)
    )
    raw = next(iter(_live(state, [group]).values())).raw
    raw["metadata"]["managedFields"] = [
        {
            "manager": "heteroscale",
            "operation": "Apply",
            "fieldsV1": {"f:spec": {"f:replicas": {}}},
        },
        {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {"f:status": {}}},
        {
            "manager": "kubectl-scale",
            "operation": "Update",
            "fieldsV1": {"f:spec": {"f:replicas": {}}},
        },
    ]
    live = parse_deployment(raw)
    assert live is not None and live.other_managers == ("kubectl-scale",)
    snapshot = ClusterSnapshot("prod-east", {live.key: live}, (), (), 0.0)
    drift = [
        d
        for d in observation_from_snapshot(
            snapshot, state.clusters["prod-east"], state.policies
        ).drift
        if d.kind == "object_modified"
    ]
    assert [d.name for d in drift] == [str(live.key)] and "kubectl-scale" in drift[0].detail


def test_objects_without_our_labels_are_ignored() -> None:
    assert parse_deployment({"metadata": {"name": "x", "labels": {"app": "x"}}}) is None
    assert ObjectKey("a", "b").__str__() == "a/b"


def test_replicas_not_as_applied_are_drift_and_the_fleet_counts_what_was_applied(
    state: DesiredState,
) -> None:
    group = DeploymentGroup(
        "chat", "prod-east", "g", "pod-b", "rg-b", GroupRole("h800", 1), GroupRole("h20", 3)
    )
    decode = next(v for k, v in _live(state, [group]).items() if k.name.endswith("-d"))
    raw = decode.raw
    raw["metadata"]["annotations"][names.APPLIED_REPLICAS_ANNOTATION] = "3"
    raw["spec"]["replicas"] = 7  # `kubectl scale`: no managed-fields entry
    scaled = parse_deployment(raw)
    assert scaled is not None and scaled.replicas_drifted and scaled.replicas_managers == ()
    snapshot = ClusterSnapshot("prod-east", {scaled.key: scaled}, (), (), 0.0)
    cluster = state.clusters["prod-east"]
    observation = observation_from_snapshot(snapshot, cluster, state.policies)
    assert observation.fleet.service_fleet("chat").decode.active == 3, "the group keeps its shape"
    (item,) = [d for d in observation.drift if d.kind == "replicas_changed"]
    assert (item.path, item.live, item.desired) == ("spec.replicas", "7", "3")  # type: ignore[attr-defined]
    assert "taken back in the group's shape" in item.detail

    # Another field manager owns spec.replicas now: not overwritten without --force.
    raw["metadata"]["managedFields"] = [
        {
            "manager": "kubectl-edit",
            "operation": "Update",
            "fieldsV1": {"f:spec": {"f:replicas": {}}},
        }
    ]
    edited = parse_deployment(raw)
    assert edited is not None and edited.replicas_managers == ("kubectl-edit",)
    snapshot = ClusterSnapshot("prod-east", {edited.key: edited}, (), (), 0.0)
    for force, words in ((False, "is held while it conflicts"), (True, "taken back (--force)")):
        drift = observation_from_snapshot(snapshot, cluster, state.policies, force=force).drift
        (item,) = [d for d in drift if d.kind == "replicas_changed"]
        assert "kubectl-edit" in item.detail and words in item.detail
    (modified,) = [d for d in drift if d.kind == "object_modified"]
    assert modified.path == "spec.replicas"  # type: ignore[attr-defined]

    # As applied: no drift; written before the annotation existed: unknown, no drift.
    raw["metadata"]["managedFields"] = []
    raw["spec"]["replicas"] = 3
    assert not parse_deployment(raw).replicas_drifted  # type: ignore[union-attr]
    del raw["metadata"]["annotations"][names.APPLIED_REPLICAS_ANNOTATION]
    raw["spec"]["replicas"] = 9
    legacy = parse_deployment(raw)
    assert legacy is not None and not legacy.replicas_drifted and legacy.counted_replicas == 9


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (names.APPLIED_REPLICAS_ANNOTATION, "2147483648"),  # beyond int32: never applied
        # Within int32, beyond any policy's max_instances: never applied either.
        (names.APPLIED_REPLICAS_ANNOTATION, "2147483647"),
        (names.GPUS_PER_INSTANCE_ANNOTATION, "65"),
        (names.APPLIED_REPLICAS_ANNOTATION, "-3"),
        (names.APPLIED_REPLICAS_ANNOTATION, "1e9"),
        (names.APPLIED_REPLICAS_ANNOTATION, "abc\x1b[2J"),
        (names.GPUS_PER_INSTANCE_ANNOTATION, "0"),
        (names.GPUS_PER_INSTANCE_ANNOTATION, "-8"),
        (names.GPUS_PER_INSTANCE_ANNOTATION, "9" * 100_000),
    ],
    ids=[
        "int32+1",
        "int32",
        "65-gpus",
        "negative",
        "float",
        "escapes",
        "zero-gpus",
        "negative-gpus",
        "100kb",
    ],
)
def test_our_annotations_rewritten_with_garbage_hold_the_service_at_its_live_size(
    state: DesiredState, key: str, value: str
) -> None:
    group = DeploymentGroup(
        "chat", "prod-east", "g", "pod-b", "rg-b", GroupRole("h800", 1), GroupRole("h20", 3)
    )
    decode = next(v for k, v in _live(state, [group]).items() if k.name.endswith("-d"))
    raw = decode.raw
    raw["metadata"]["annotations"][key] = value
    forged = parse_deployment(raw)
    assert forged is not None and forged.unreadable is not None
    assert "\x1b" not in forged.unreadable and len(forged.unreadable) < 200
    snapshot = ClusterSnapshot("prod-east", {forged.key: forged}, (), (), 0.0)
    observation = observation_from_snapshot(snapshot, state.clusters["prod-east"], state.policies)
    # Counted at the replicas it runs, not at a number nobody applied; never negative.
    assert observation.fleet.service_fleet("chat").decode.active == 3
    assert all((g.decode.gpus_per_instance or 1) > 0 for g in observation.fleet.groups)
    assert set(observation.held) == {"chat"} and key in observation.held["chat"]
    (item,) = [d for d in observation.drift if d.kind == "annotations_unreadable"]
    assert "held" in item.detail
    assert not [d for d in observation.drift if d.kind == "replicas_changed"]


def test_listed_namespace_by_namespace_deployments_are_also_looked_for_where_pods_run() -> None:
    """Per-namespace RBAC: the managed namespaces are listed, then the other namespaces
    our Pods run in (a namespace a service moved away from) where RBAC allows; one it
    does not allow is skipped, never the cycle's failure."""
    from reconciler.apply.kubeclient import Forbidden
    from reconciler.observe.kubernetes import list_owned_deployments

    class PerNamespace:
        def __init__(self) -> None:
            self.listed: list[str] = []

        def list(self, path: str, label_selector: str = "") -> list[dict[str, str]]:
            if "/namespaces/" not in path or "/namespaces/not-ours/" in path:
                raise Forbidden(403, "Forbidden", path)
            self.listed.append(path)
            return [{"path": path}]

    client = PerNamespace()
    found = list_owned_deployments(
        client,  # type: ignore[arg-type]
        "prod-east",
        ["chat-v2", "summarize"],
        lambda: {"chat", "chat-v2", "not-ours"},
    )
    assert [o["path"] for o in found] == [
        "/apis/apps/v1/namespaces/chat-v2/deployments",
        "/apis/apps/v1/namespaces/summarize/deployments",
        "/apis/apps/v1/namespaces/chat/deployments",
    ]


def test_a_deployments_progress_deadline_and_a_pods_waiting_reason_read_or_default(
    state: DesiredState,
) -> None:
    """What ``stuck_starting`` judges by, as hostile objects may carry it: the
    progress deadline as a positive whole number or Kubernetes' default (600 s); a
    waiting reason from the first container that has one, init containers first, or
    none at all for any other shape."""
    group = DeploymentGroup(
        "chat", "prod-east", "pod-a-0", "pod-a", "rg-a", GroupRole("h800", 1), GroupRole("h800", 1)
    )
    live = next(iter(_live(state, [group]).values()))
    for written, read in ((120, 120.0), (True, 600.0), (-5, 600.0), ("120", 600.0), (None, 600.0)):
        raw = {**live.raw, "spec": {**live.raw["spec"], "progressDeadlineSeconds": written}}
        assert parse_deployment(raw).progress_deadline_s == read  # type: ignore[union-attr]
    pod = _pod("p", ready=False)
    waiting = {"state": {"waiting": {"reason": "CrashLoopBackOff"}}}
    shapes = [
        ({"containerStatuses": [waiting]}, "CrashLoopBackOff"),
        (
            {
                "initContainerStatuses": [{"state": {"waiting": {"reason": "PodInitializing"}}}],
                "containerStatuses": [waiting],
            },
            "PodInitializing",
        ),
        ({"containerStatuses": [{"state": {"running": {}}}, waiting]}, "CrashLoopBackOff"),
        ({"containerStatuses": "x"}, ""),
        ({"containerStatuses": [None, 3, {"state": []}, {"state": {"waiting": 7}}]}, ""),
        ({"containerStatuses": [{"state": {"waiting": {"reason": 5}}}]}, ""),
    ]
    for extra, reason in shapes:
        assert parse_pod({**pod, "status": {**pod["status"], **extra}}).waiting == reason


DELETED = "2026-01-01T00:10:00Z"
DELETED_S = 1767226200.0  # DELETED


def _mark_entry(time_text: object, manager: str = names.DELETION_MARK_MANAGER) -> dict:
    """A managedFields entry as the API server records a merge patch of the mark."""
    return {
        "manager": manager,
        "operation": "Update",
        "apiVersion": "apps/v1",
        "time": time_text,
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {"f:annotations": {f"f:{names.DELETED_BY_PLAN_ANNOTATION}": {}}}
        },
    }


@pytest.mark.parametrize(
    ("mark_s", "entries", "own"),
    [
        # Marked a second before the deletion, in its second, or the margin before, as
        # the API server's times say; the mark's value (the reconciler's clock, or a
        # saved plan's start) an hour off, which is not what is judged.
        (DELETED_S - 3600, [_mark_entry("2026-01-01T00:09:59Z")], True),
        (DELETED_S - 3600, [_mark_entry(DELETED)], True),
        (DELETED_S - 3600, [_mark_entry("2026-01-01T00:09:55Z")], True),
        # The latest of several entries of the mark's manager (one per apiVersion).
        (
            DELETED_S - 3600,
            [_mark_entry("2026-01-01T00:00:00Z"), _mark_entry("2026-01-01T00:09:59Z")],
            True,
        ),
        # The mark's value a second before the deletion (the reconciler's clock): the
        # server's time of the mark says otherwise. More than the margin before the
        # deletion, long before it (a DELETE that failed, someone's deletion two
        # minutes later), after it.
        (DELETED_S - 1, [_mark_entry("2026-01-01T00:09:54Z")], False),
        (DELETED_S - 1, [_mark_entry("2026-01-01T00:08:00Z")], False),
        (DELETED_S - 1, [_mark_entry("2026-01-01T00:10:01Z")], False),
        # No entry of the mark's manager, or none whose time reads: the annotation
        # alone (anyone with edit rights may write it) is not heteroscale's word.
        (DELETED_S - 1, [], False),
        (DELETED_S - 1, [_mark_entry("2026-01-01T00:09:59Z", manager="kubectl-annotate")], False),
        (DELETED_S - 1, [_mark_entry("soon"), _mark_entry(None), _mark_entry(7)], False),
    ],
)
def test_a_deletion_is_heteroscales_own_when_the_api_server_recorded_its_mark_just_before(
    state: DesiredState, mark_s: float, entries: list[dict], own: bool
) -> None:
    """Both times are the API server's (the ``time`` of the mark's managedFields entry,
    the deletionTimestamp): the deletion is heteroscale's own when it came at most
    ``OWN_DELETION_MARGIN_S`` after the mark and not before it, whatever the mark's
    value says (the reconciler's clock, a saved plan's start). Anything else is
    someone else's deletion, replaced by a held service."""
    group = DeploymentGroup(
        "chat", "prod-east", "pod-a-0", "pod-a", "rg-a", GroupRole("h800", 1), GroupRole("h800", 1)
    )
    raw = next(iter(_live(state, [group]).values())).raw
    meta = raw["metadata"]
    marked = {
        **raw,
        "metadata": {
            **meta,
            "annotations": {
                **meta["annotations"],
                names.DELETED_BY_PLAN_ANNOTATION: names.deletion_mark(mark_s),
            },
            "managedFields": [
                {"manager": "heteroscale", "operation": "Apply", "time": DELETED},
                *entries,
            ],
        },
    }
    before_deletion = parse_deployment(marked)
    assert before_deletion is not None and not before_deletion.deleted_by_plan
    deleted = parse_deployment(
        {**marked, "metadata": {**marked["metadata"], "deletionTimestamp": DELETED}}
    )
    assert deleted is not None and deleted.deleted_by_plan is own
    # Without the annotation (taken off again after a failed DELETE, or never written),
    # the manager's entry is no mark.
    unmarked = {**marked["metadata"], "annotations": meta["annotations"]}
    taken_off = parse_deployment({**raw, "metadata": {**unmarked, "deletionTimestamp": DELETED}})
    assert taken_off is not None and not taken_off.deleted_by_plan

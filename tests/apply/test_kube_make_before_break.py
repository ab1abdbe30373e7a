"""Against the real API server: a service whose policy moves it to another namespace
is made before it is broken. The first cycle creates its Deployments in the new
namespace and keeps the old ones serving (plan and apply say so; a hold is no
error); only once the new Deployments' Pods are ready does a later cycle prune the
old ones, live or through a saved plan (whose writes in the namespace moved away
from are in scope: they remove what the move left behind). Where there is no room
for a second copy beside the old one, the old one is kept, cycle after cycle. A
Deployment being deleted is replaced the same way, never written."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kubetestkit import (
    CLUSTER_HEAD,
    ControlPlane,
    cluster_for_cli,
    create_nodes,
    ensure_namespace,
    group,
    hand_plan,
    list_deployments,
    list_pods,
    make_desired_state,
    mark_ready,
    service_account_client,
    wait_for,
)
from typer.testing import CliRunner

from reconciler.apply import names
from reconciler.apply.actions import SAME_APPLY_S
from reconciler.apply.backend import ApplyOptions, KubernetesBackend
from reconciler.apply.kubeclient import Forbidden, deployments_path, nodes_path
from reconciler.apply.lease import parse_micro_time
from reconciler.apply.savedplan import (
    PlanSource,
    SavedCluster,
    SavedPlan,
    check_leftovers,
    check_scope,
    execute,
)
from reconciler.cli import app
from reconciler.commands.status import service_status
from reconciler.cycle import plan_cluster
from reconciler.desired import DesiredState, load_desired_state
from reconciler.errors import ClusterUnavailable
from reconciler.loop.cluster_cycle import ClusterOutcome
from reconciler.observe.kubernetes import OWN_DELETION_MARGIN_S, parse_deployment
from reconciler.placement.base import PlacementOptions
from reconciler.placement.cpsat import CpSatPlacer
from reconciler.plan import Plan
from reconciler.policy.base import Decision, DecisionInput, PolicyHistory, Recommendation
from reconciler.state import DeploymentGroup

pytestmark = [pytest.mark.kubernetes]


def _run(*args: str, exit_code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args), terminal_width=400)
    assert result.exit_code == exit_code, result.output
    return " ".join(result.output.split())


def _serve(
    client: Any, namespace: str, pods: list[dict[str, Any]], only: set[str] | None = None
) -> None:
    """Mark ``pods`` ready and wait until the Deployments of ``namespace`` (only those
    named in ``only``, where given) have every replica ready."""
    for pod in pods:
        mark_ready(client, namespace, pod)
    wait_for(
        lambda: all(
            d.get("status", {}).get("readyReplicas") == d["spec"]["replicas"]
            for n, d in list_deployments(client, namespace).items()
            if only is None or n in only
        ),
        what="the new Deployments ready",
    )


def _pods_on_nodes(client: Any, namespace: str, count: int, what: str) -> list[dict[str, Any]]:
    """Wait until ``namespace`` has ``count`` Pods, every one bound to a node; them."""
    return wait_for(
        lambda: (
            (p := list_pods(client, namespace))
            and len(p) == count
            and all(x["spec"].get("nodeName") for x in p)
            and p
        ),
        what=what,
    )


# Decode instances of 2 GPUs, as prefill's: what is free beside them holds whole
# instances however the scheduler spread them (1-GPU decode could strand a prefill).
_TWO_GPU_DECODE = ("decode: {gpus_per_instance: 1,", "decode: {gpus_per_instance: 2,")


def _edit(path: Path, *replacements: tuple[str, str]) -> None:
    """Rewrite ``path`` with each (old, new) text replaced, in order."""
    text = path.read_text()
    for old, new in replacements:
        assert old in text, f"{old!r} not in {path}"
        text = text.replace(old, new)
    path.write_text(text)


def _rename_switch(client: Any, root: Path, cluster: str, old: str, new: str) -> None:
    """Rename S2 switch ``old`` (and the S1 and S0 names it begins) ``new`` in the
    cluster file under ``root`` and on the Nodes' topology labels."""
    cluster_file = root / "clusters" / f"{cluster}.yaml"
    cluster_file.write_text(cluster_file.read_text().replace(old, new))
    renamed = load_desired_state(root).clusters[cluster]
    for node in renamed.nodes:
        client.request(
            "PATCH",
            nodes_path(node.name),
            body={"metadata": {"labels": renamed.node_labels(node)}},
            content_type="application/merge-patch+json",
        )


@pytest.mark.parametrize("pruned_by", ["apply", "saved plan"])
def test_a_namespace_move_keeps_the_old_deployments_until_the_new_ones_are_ready(
    control_plane: ControlPlane, tmp_path: Path, pruned_by: str
) -> None:
    name = "mbb" if pruned_by == "apply" else "mbb-saved"
    moved = f"{name}-v2"
    _state, options = cluster_for_cli(control_plane, tmp_path, name)
    client = control_plane.client()
    _run("apply", *options)
    old = {n: d["spec"] for n, d in list_deployments(client, name).items()}
    assert old

    policy = tmp_path / "policies" / "svc.yaml"
    policy.write_text(policy.read_text().replace(f"namespace: {name}", f"namespace: {moved}"))
    ensure_namespace(client, moved)

    # First cycle: the new Deployments are created, the old ones kept as they run
    # (plan exits 3: it found changes, the creates; a hold is not an error).
    for command, exit_code in (("plan", 3), ("apply", 0)):
        text = _run(command, *options, exit_code=exit_code)
        for deployment in old:
            assert f"= keep Deployment {name}/{deployment} " in text, text
        assert f"kept until {moved}/" in text and "is ready (0 of 1 ready" in text, text
    assert set(list_deployments(client, moved)) == set(old)
    assert {n: d["spec"] for n, d in list_deployments(client, name).items()} == old

    # Not ready yet: kept again, and said so again; a hold alone is no change. (The
    # Deployment controller may not yet have acted on the new spec: "0 of 1 ready, its
    # last change not yet acted on".)
    for command in ("plan", "apply"):
        text = _run(command, *options)
        assert f"kept until {moved}/" in text and "is ready (0 of 1 ready" in text, text
    assert {n: d["spec"] for n, d in list_deployments(client, name).items()} == old

    pods = wait_for(
        lambda: (p := list_pods(client, moved)) and len(p) == len(old) and p,
        what="the new Deployments' Pods",
    )
    _serve(client, moved, pods)

    # Ready: the next cycle prunes the old Deployments, as before.
    if pruned_by == "apply":
        text = _run("apply", *options)
    else:
        plan_file = tmp_path / "plan.json"
        text = _run("plan", *options, "--out", str(plan_file), exit_code=3)
        assert list_deployments(client, name), "plan --out changes nothing"
        _run("apply", str(plan_file), *options)
    assert "kept until" not in text, text
    for deployment in old:
        assert f"- delete Deployment {name}/{deployment} " in text, text
    wait_for(lambda: not list_deployments(client, name), what="the old Deployments pruned")
    assert set(list_deployments(client, moved)) == set(old)


@pytest.mark.fault
def test_with_no_room_for_a_second_copy_the_old_deployments_are_kept_and_said_so(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """5 prefill and 1 decode instances of 2 GPUs take 12 of the cluster's 16 H800
    GPUs (instances of one size, so however the scheduler spread them, what is free
    holds whole instances): beside them only a group of 1 prefill and 1 decode fits.
    The move creates what fits, keeps the old Deployments while they hold their GPUs,
    and goes on keeping them once the new Pods are ready: the service never serves
    from fewer instances, and every cycle says why."""
    name = "mbb-full"
    moved = f"{name}-v2"
    _state, options = cluster_for_cli(control_plane, tmp_path, name)
    policy = tmp_path / "policies" / "svc.yaml"
    _edit(
        policy,
        (
            "template: templates/prefill.yaml, min_instances: 1",
            "template: templates/prefill.yaml, min_instances: 5",
        ),
        _TWO_GPU_DECODE,
    )
    client = control_plane.client()
    _run("apply", *options)
    old = {n: d["spec"] for n, d in list_deployments(client, name).items()}
    assert sum(d["replicas"] for n, d in old.items() if n.endswith("-p")) == 5
    _pods_on_nodes(client, name, 6, "the old Pods on their nodes")

    policy.write_text(policy.read_text().replace(f"namespace: {name}", f"namespace: {moved}"))
    ensure_namespace(client, moved)
    text = _run("apply", *options)
    assert "svc/prefill: 4 instances not placed (gpu_capacity" in text, text
    assert {n: d["spec"] for n, d in list_deployments(client, name).items()} == old
    new = list_deployments(client, moved)
    assert {n[-1]: d["spec"]["replicas"] for n, d in new.items()} == {"p": 1, "d": 1}

    pods = _pods_on_nodes(client, moved, 2, "the new Pods on their nodes (beside the old ones)")
    _serve(client, moved, pods)
    for _cycle in range(2):
        text = _run("apply", *options)
        for deployment in old:
            assert f"= keep Deployment {name}/{deployment} " in text, text
        assert (
            "kept while its replacement is not all placed (4 prefill: gpu_capacity; prefill 1 of 5)"
            in text
        ), text
    assert {n: d["spec"] for n, d in list_deployments(client, name).items()} == old

    # status says so too: not Synced on the new copy's counts alone, but what the old
    # Deployments serve, and why they are kept.
    text = _run("status", *options, exit_code=3)
    # (Degraded: this test has no metrics.)
    assert (
        "svc OutOfSync Degraded prefill 1->5 (+5 left behind, serving until replaced), "
        "decode 1->1 (+1 left behind, serving until replaced)"
    ) in text, text
    assert "svc: hold (kept) " in text and "kept while its replacement is not all placed" in text


def test_a_switch_renamed_in_the_cluster_file_moves_the_group_and_keeps_the_old_one_until_ready(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The S2 switch (and its S1) of the service's group is renamed in the cluster file
    and on the Nodes: no group can be pinned to the old name any more. The service is
    placed anew under the new name, and its old Deployments serve until the new ones
    do."""
    name = "mbb-switch"
    _state, options = cluster_for_cli(control_plane, tmp_path, name)
    client = control_plane.client()
    _run("apply", *options)
    old = {n: d["spec"] for n, d in list_deployments(client, name).items()}
    assert old and all(f"{name}-pa-" in n for n in old)
    # What replaces a group on a gone switch is told from a group that stays by being
    # created more than an apply's span after it (``actions.SAME_APPLY_S``): a later
    # cycle, as a switch leaves Git between the two.
    time.sleep(SAME_APPLY_S + 1.1)

    _rename_switch(client, tmp_path, name, f"{name}-pa", f"{name}-pz")

    text = _run("apply", *options)
    for deployment in old:
        assert f"= keep Deployment {name}/{deployment} " in text, text
    assert f"switch {name}-pa of its group is gone from cluster {name}'s file" in text, text
    new = {n for n in list_deployments(client, name) if n not in old}
    assert new and all(f"{name}-pz-" in n for n in new)
    assert {n: d["spec"] for n, d in list_deployments(client, name).items() if n in old} == old

    groups = {
        d["spec"]["selector"]["matchLabels"][names.GROUP_LABEL]
        for n, d in list_deployments(client, name).items()
        if n in new
    }
    pods = wait_for(
        lambda: (
            (
                p := [
                    x
                    for x in list_pods(client, name)
                    if x["metadata"]["labels"].get(names.GROUP_LABEL) in groups
                ]
            )
            and len(p) == len(new)
            and p
        ),
        what="the new Deployments' Pods",
    )
    _serve(client, name, pods, only=new)
    text = _run("apply", *options)
    assert "kept until" not in text, text
    wait_for(lambda: set(list_deployments(client, name)) == new, what="the old Deployments pruned")


def test_a_service_held_while_it_moves_keeps_its_old_deployments(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """An unreadable heteroscale annotation on one of the old Deployments holds the
    service (its size is not changed on a guess); its groups, which leave what the move
    left behind out, then hold nothing. The old copy was deleted and nothing created:
    the service ran nowhere. Its leftovers are kept while its size is held."""
    name = "mbb-held"
    moved = f"{name}-v2"
    _state, options = cluster_for_cli(control_plane, tmp_path, name)
    client = control_plane.client()
    _run("apply", *options)
    old = list_deployments(client, name)
    pods = wait_for(
        lambda: (p := list_pods(client, name)) and len(p) == len(old) and p, what="old Pods"
    )
    _serve(client, name, pods)
    decode = next(n for n in old if n.endswith("-d"))
    client.request(
        "PATCH",
        deployments_path(name, decode),
        body={"metadata": {"annotations": {names.APPLIED_REPLICAS_ANNOTATION: "lots"}}},
        content_type="application/merge-patch+json",
    )
    policy = tmp_path / "policies" / "svc.yaml"
    policy.write_text(policy.read_text().replace(f"namespace: {name}", f"namespace: {moved}"))
    ensure_namespace(client, moved)
    text = _run("apply", *options)
    assert "kept while the service's size is held, not sized" in text, text
    assert set(list_deployments(client, name)) == set(old)


def test_a_deployment_being_deleted_is_replaced_under_a_new_name_before_it_goes(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The service's decode Deployment is deleted while a finalizer holds it: it
    serves until the finalizer goes, and then its instances go with it. It was counted
    as the service's capacity until then, and only the cycle after it had gone created
    it again (a start-up's gap). Now the next cycle creates a new group under another
    id (a Deployment of the old name would be the terminating object itself), writes
    nothing to the one being deleted, keeps its prefill until the new group serves,
    and once the finalizer goes the service still runs its full count."""
    name = "mbb-deleting"
    state, options = cluster_for_cli(control_plane, tmp_path, name)
    client = control_plane.client()
    _run("apply", *options)
    old = list_deployments(client, name)
    _serve(client, name, _pods_on_nodes(client, name, len(old), "the Pods on their nodes"))
    (decode,) = [n for n in old if n.endswith("-d")]
    (prefill,) = [n for n in old if n.endswith("-p")]
    path = deployments_path(name, decode)
    client.merge_patch(path, {"metadata": {"finalizers": ["example.com/hold"]}}, field_manager="t")
    client.delete(path)
    terminating = client.get(path)
    assert terminating["metadata"].get("deletionTimestamp")
    # What replaces a group being deleted is told from a group that stays beside it by
    # being created after the deletion (whole seconds): a later cycle, as in a loop.
    time.sleep(1.1)

    def heteroscale_wrote(obj: dict[str, Any]) -> list[str]:
        return sorted(
            entry.get("time", "")
            for entry in obj["metadata"].get("managedFields", ())
            if entry.get("manager") == names.FIELD_MANAGER
        )

    try:
        # The fleet no longer counts the group being deleted; its id stays reserved.
        spec = state.clusters[name]
        backend = KubernetesBackend(client, state=load_desired_state(tmp_path))
        observation = backend.observe(spec, backend.state.policies_for(name))
        assert observation.fleet.groups == ()
        group_id = old[decode]["spec"]["selector"]["matchLabels"][names.GROUP_LABEL]
        assert observation.fleet.reserved_group_ids == {"svc": frozenset({group_id})}

        for command, exit_code in (("plan", 3), ("apply", 0)):
            text = _run(command, *options, exit_code=exit_code)
            assert f"= keep Deployment {name}/{decode} " in text, text
            assert "being deleted since" in text and "nothing is written to it" in text, text
            assert f"= keep Deployment {name}/{prefill} " in text, text
            assert "is being deleted (the group is replaced whole)" in text, text
        new = set(list_deployments(client, name)) - set(old)
        assert len(new) == 2 and all(group_id not in n for n in new), new
        after = client.get(path)
        assert after["spec"] == terminating["spec"]
        assert heteroscale_wrote(after) == heteroscale_wrote(terminating)

        pods = [
            p
            for p in _pods_on_nodes(client, name, 4, "the new Pods beside the old ones")
            if p["metadata"]["labels"][names.GROUP_LABEL] != group_id
        ]
        _serve(client, name, pods, only=new)
        text = _run("apply", *options)
        assert f"- delete Deployment {name}/{prefill} " in text, text
        assert f"= keep Deployment {name}/{decode} " in text, text
        assert heteroscale_wrote(client.get(path)) == heteroscale_wrote(terminating)
    finally:
        client.merge_patch(path, {"metadata": {"finalizers": None}}, field_manager="t")

    wait_for(lambda: set(list_deployments(client, name)) == new, what="the old group gone")
    text = _run("apply", *options)
    assert "create" not in text, text
    running = list_deployments(client, name)
    assert {n[-1]: d["spec"]["replicas"] for n, d in running.items()} == {"p": 1, "d": 1}
    assert all(d["status"].get("readyReplicas") == 1 for d in running.values())


@pytest.mark.parametrize("held_by", ["metrics", "cycle"])
def test_a_group_being_deleted_of_a_held_service_is_replaced_before_it_goes(
    control_plane: ControlPlane, tmp_path: Path, held_by: str
) -> None:
    """The service runs two groups (its minimum, since lowered, had asked for them)
    and its size is held: its metrics are missing, and with ``cycle`` the cycle holds
    it too (an annotation of its other group does not read: none of its groups may
    change size, so the replacement is a new group). One group's decode Deployment
    is deleted while a finalizer holds it: the fleet leaves that group out, and the
    hold, taken from the fleet, held one group where the service ran two, so nothing
    replaced it and once the finalizer went the service ran on half. The hold counts
    the group being deleted: the next cycle creates a new group beside the one that
    stays (says why, writes nothing to the one being deleted), later cycles create
    nothing more (the replacement is not counted twice), and once the finalizer goes
    the service still runs both groups."""
    name = f"mbb-held-deleting-{held_by}"
    client, options, old = _two_served_groups_of_one(control_plane, tmp_path, name)
    text = _run("apply", *options)
    assert "create Deployment" not in text and "delete Deployment" not in text, text

    decode, staying = sorted(n for n in old if n.endswith("-d"))
    group_id = old[decode]["spec"]["selector"]["matchLabels"][names.GROUP_LABEL]
    (prefill,) = [
        n
        for n, d in old.items()
        if n.endswith("-p") and d["spec"]["selector"]["matchLabels"][names.GROUP_LABEL] == group_id
    ]
    if held_by == "cycle":
        unreadable = {names.APPLIED_REPLICAS_ANNOTATION: "lots"}
        client.merge_patch(
            deployments_path(name, staying),
            {"metadata": {"annotations": unreadable}},
            field_manager="t",
        )
    held = "held at 1 prefill, 1 decode, plus 1 prefill, 1 decode in new groups replacing"
    path = deployments_path(name, decode)
    client.merge_patch(path, {"metadata": {"finalizers": ["example.com/hold"]}}, field_manager="t")
    client.delete(path)
    terminating = client.get(path)
    assert terminating["metadata"].get("deletionTimestamp")
    time.sleep(1.1)  # the replacement is told apart by its creation after the deletion
    try:
        text = _run("apply", *options)
        assert "metrics_missing" in text or "metrics unavailable" in text, text
        assert "hold 2 prefill, 2 decode" in text, text
        assert "the hold counts 1 prefill, 1 decode instance(s) of groups being deleted" in text
        assert (held in text) == (held_by == "cycle"), text
        assert f"= keep Deployment {name}/{decode} " in text, text
        assert "nothing is written to it" in text, text
        assert f"= keep Deployment {name}/{prefill} " in text, text
        new = set(list_deployments(client, name)) - set(old)
        assert len(new) == 2 and all(group_id not in n for n in new), new
        assert client.get(path)["spec"] == terminating["spec"]

        pods = [
            p
            for p in _pods_on_nodes(client, name, 6, "the new Pods beside the old ones")
            if p["metadata"]["labels"][names.GROUP_LABEL] != group_id
        ]
        _serve(client, name, pods, only=new)
        for _cycle in range(2):
            text = _run("apply", *options)
            assert "create Deployment" not in text, text
            assert "hold 2 prefill, 2 decode" in text and "the hold counts" not in text, text
            assert "in new groups replacing" not in text, text
        assert f"{name}/{prefill}" not in {f"{name}/{n}" for n in list_deployments(client, name)}
        assert client.get(path)["spec"] == terminating["spec"]
    finally:
        client.merge_patch(path, {"metadata": {"finalizers": None}}, field_manager="t")

    wait_for(
        lambda: set(list_deployments(client, name)) == (set(old) - {decode, prefill}) | new,
        what="the deleted group gone",
    )
    text = _run("apply", *options)
    assert "create Deployment" not in text and "delete Deployment" not in text, text
    running = list_deployments(client, name)
    assert sorted(d["spec"]["replicas"] for d in running.values()) == [1, 1, 1, 1]
    assert sum(n.endswith("-d") for n in running) == 2


def test_a_replacement_deleted_in_its_turn_is_replaced_once(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """As above (metrics missing, two groups of one instance each), one group's decode
    is deleted while a finalizer holds it and the next cycle replaces the group; then
    the replacement's decode is deleted too, the first still held. The service ran
    two groups: one more group replaces it, not two (the replacement being deleted
    was counted as what the service ran, a third group made where it ran two)."""
    name = "mbb-held-deleting-twice"
    client, options, old = _two_served_groups_of_one(control_plane, tmp_path, name)
    _run("apply", *options)
    first = deployments_path(name, sorted(n for n in old if n.endswith("-d"))[0])
    held = [first]
    try:
        client.merge_patch(
            first, {"metadata": {"finalizers": ["example.com/hold"]}}, field_manager="t"
        )
        client.delete(first)
        time.sleep(1.1)  # the replacement is told apart by its creation after the deletion
        _run("apply", *options)
        replacement = set(list_deployments(client, name)) - set(old)
        assert len(replacement) == 2, replacement
        (decode,) = [n for n in replacement if n.endswith("-d")]
        second = deployments_path(name, decode)
        held.append(second)
        client.merge_patch(
            second, {"metadata": {"finalizers": ["example.com/hold"]}}, field_manager="t"
        )
        client.delete(second)
        time.sleep(1.1)
        text = _run("apply", *options)
        assert "hold 2 prefill, 2 decode" in text, text
        assert "the hold counts 1 prefill, 1 decode instance(s) of groups being deleted" in text
        new = set(list_deployments(client, name)) - set(old) - replacement
        assert len(new) == 2, new
    finally:
        for path in held:
            client.merge_patch(path, {"metadata": {"finalizers": None}}, field_manager="t")


class _Cycles:
    """Hand-made cycles of one cluster (``name``, its policies namespaced as ``desired``
    says) through a backend of ``client``, with SLOs held, a 60 s soft scale-in window
    and a clock the test moves."""

    def __init__(self, client: Any, desired: DesiredState, name: str, clock_s: list[float]):
        self.name = name
        self.spec = desired.clusters[name]
        self.backend = KubernetesBackend(
            client,
            state=desired,
            options=ApplyOptions(soft_scale_in_window_s=60),
            clock=lambda: clock_s[0],
        )
        self.backend.slo = {"svc": "held"}

    def plan(self, groups: list[DeploymentGroup]) -> Plan:
        state = self.backend.state
        observation = self.backend.observe(self.spec, state.policies_for(self.name))
        return hand_plan(state, self.name, observation, groups)

    def apply(self, groups: list[DeploymentGroup]) -> None:
        self.backend.apply_cluster(self.plan(groups))


def _moved(state: DesiredState, namespace: str) -> DesiredState:
    """``state`` with every policy deploying to ``namespace``."""
    policies = {
        service: policy.model_copy(update={"namespace": namespace})
        for service, policy in state.policies.items()
    }
    return DesiredState(policies=policies, clusters=state.clusters, templates=state.templates)


def _group_of(name: str, decode: int) -> list[DeploymentGroup]:
    return [group("svc", name, "s1", f"{name}-pa", ("h800", 1), ("h800", decode))]


def _moving_cluster(admin: Any, root: Path, name: str) -> tuple[DesiredState, str]:
    """``make_desired_state`` in ``root`` for cluster ``name``, its Nodes, and both its
    namespace and the one its service moves to (returned)."""
    moved = f"{name}-v2"
    state = make_desired_state(root, name)
    for namespace in (name, moved):
        ensure_namespace(admin, namespace)
    create_nodes(admin, state.clusters[name])
    return state, moved


def test_pods_drained_from_a_kept_leftover_are_deleted_once_their_window_passed(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """A soft scale-in drained 2 of 4 decode Pods; then the service moved. Its old
    Deployments are kept while the new ones start, but the 2 drained Pods serve nothing:
    once their window passed, the dry run lists their deletion under the kept decode
    and apply carries out exactly that dry run (the Pods go, the old Deployments stay
    as they are). Kept whole, they held their GPUs out of service for the whole hold."""
    name = "mbb-drained"
    client = control_plane.client()
    state, moved = _moving_cluster(client, tmp_path, name)
    clock_s = [1_000_000.0]

    before = _Cycles(client, state, name, clock_s)
    before.apply(_group_of(name, 4))
    pods = _pods_on_nodes(client, name, 5, "5 Pods on their nodes")
    _serve(client, name, pods)
    before.apply(_group_of(name, 2))
    drained_selector = f"{names.SERVING_LABEL}=false"
    drained = sorted(p["metadata"]["name"] for p in list_pods(client, name, drained_selector))
    assert len(drained) == 2
    old = {n: d["spec"] for n, d in list_deployments(client, name).items()}

    after = _Cycles(client, _moved(state, moved), name, clock_s)
    clock_s[0] += 61  # the drained Pods' window has passed
    plan = after.plan(_group_of(name, 2))
    preview = after.backend.diff_cluster(plan)
    kept = next(o for o in preview.objects if o.key == f"{name}/svc-s1-d")
    assert kept.action == "keep", kept.lines()
    assert sorted((p.action, p.pod) for p in kept.pods) == [("finish", n) for n in drained]
    # A saved plan of this dry run writes the same deletions, in scope though the
    # namespace is no managed one any more (they remove what the move left behind).
    steps = after.backend.saved_writes(preview)
    deletions = sorted(s.name for s in steps if s.op == "delete_pod" and s.namespace == name)
    assert deletions == drained
    saved = SavedPlan(
        PlanSource("directory", "0" * 64),
        (SavedCluster(name, after.backend.observed(), steps),),
        "2026-01-01T00:00:00Z",
    )
    check_scope(saved, after.backend.state, tmp_path / "plan.json")
    check_leftovers(saved, after.backend.state, {name: after.backend.snapshot}, tmp_path / "p")
    applied = after.backend.apply_cluster(plan)
    assert [o.lines() for o in applied.objects] == [o.lines() for o in preview.objects]

    wait_for(lambda: not list_pods(client, name, drained_selector), what="the drained Pods deleted")
    assert {n: d["spec"] for n, d in list_deployments(client, name).items()} == old
    assert set(list_deployments(client, moved)) == set(old)


@pytest.mark.fault
def test_half_of_a_service_on_a_switch_renamed_while_its_size_is_held_is_kept(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The service runs one group under each S2 switch (4 prefill and 8 decode of 2
    GPUs: 12 GPUs a group, 16 under each switch); the H800 switch is renamed in the
    cluster file and on the Nodes while the service's metrics are missing (and its
    minimum is lowered, so nothing asks for more). Its size is held at what its groups
    run, which leave the renamed switch's half out: as large as that half, which was
    then deleted at once, nothing replacing it. It is kept, and said why."""
    name = "mbb-half"
    _state, options = cluster_for_cli(control_plane, tmp_path, name)
    policy = tmp_path / "policies" / "svc.yaml"
    _edit(
        policy,
        (
            "gpu_types: {h800: 1.0}, template: templates/prefill.yaml, min_instances: 1",
            "gpu_types: {h800: 1.0, h20: 1.0}, template: templates/prefill.yaml, min_instances: 4",
        ),
        _TWO_GPU_DECODE,
        ("templates/decode.yaml, min_instances: 1", "templates/decode.yaml, min_instances: 8"),
    )
    client = control_plane.client()
    _run("apply", *options)
    old = {n: d["spec"] for n, d in list_deployments(client, name).items()}
    on_pa = {n for n in old if f"{name}-pa-" in n}
    assert len(on_pa) == 2 and len(old) == 4, old
    # The group that stays serves (the renamed switch's Pods need not: they are kept as
    # they are, ready or not).
    staying = {n: d for n, d in old.items() if n not in on_pa}
    (staying_group,) = {d["selector"]["matchLabels"][names.GROUP_LABEL] for d in staying.values()}
    selector = f"{names.GROUP_LABEL}={staying_group}"
    pods = wait_for(
        lambda: (
            (p := list_pods(client, name, selector))
            and len(p) == 6
            and all(x["spec"].get("nodeName") for x in p)
            and p
        ),
        what="the staying group's Pods on their nodes",
    )
    _serve(client, name, pods, only=set(staying))

    _edit(
        policy, ("min_instances: 4", "min_instances: 1"), ("min_instances: 8", "min_instances: 1")
    )
    _rename_switch(client, tmp_path, name, f"{name}-pa", f"{name}-pz")
    for _cycle in range(2):
        text = _run("apply", *options)
        for deployment in on_pa:
            assert f"= keep Deployment {name}/{deployment} " in text, text
        assert (
            "kept while the service's size is held, not sized (metrics_missing), and its "
            "groups hold fewer than the service ran before the move (decode 4 of 8, "
            "prefill 2 of 4)"
        ) in text, text
    assert {n: d["spec"] for n, d in list_deployments(client, name).items()} == old


def _namespaced_token(admin: Any, name: str, namespaces: tuple[str, ...]) -> Any:
    """A client of ServiceAccount ``name`` (in namespace ``name``) with deploy/'s
    least privilege: Nodes and Pods read cluster-wide, Deployments only in
    ``namespaces`` (so they are listed namespace by namespace)."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    subject = {"kind": "ServiceAccount", "name": name, "namespace": name}
    client = service_account_client(admin, name, name)

    def bind(path: str, role: str) -> None:
        """Bind ClusterRole ``role`` to the account, cluster-wide or in one namespace."""
        admin.request(
            "POST",
            path,
            body={
                "metadata": {"name": role},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": role,
                },
                "subjects": [subject],
            },
        )

    rules = {
        f"{name}-observer": [
            {"apiGroups": [""], "resources": ["nodes", "pods"], "verbs": ["get", "list", "watch"]}
        ],
        f"{name}-workloads": [
            {
                "apiGroups": ["apps"],
                "resources": ["deployments"],
                "verbs": ["get", "list", "watch", "create", "patch", "delete"],
            },
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch", "delete"]},
        ],
    }
    for role, role_rules in rules.items():
        admin.request(
            "POST", f"{rbac}/clusterroles", body={"metadata": {"name": role}, "rules": role_rules}
        )
    bind(f"{rbac}/clusterrolebindings", f"{name}-observer")
    for namespace in namespaces:
        bind(f"{rbac}/namespaces/{namespace}/rolebindings", f"{name}-workloads")
    return client


@pytest.mark.fault
def test_under_per_namespace_rbac_the_namespace_moved_away_from_is_read_too(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The reconciler may list Deployments only in the namespaces it manages (deploy/'s
    least privilege), so it lists them namespace by namespace: the one a service moved
    away from is no longer among them, and what the move left there was neither kept
    nor pruned (it ran on, unseen, its GPUs free to placement). It is looked for where
    the service's Pods run (Pods are read cluster-wide): kept until the new copy
    serves, then pruned."""
    name = "mbb-rbac"
    admin = control_plane.client()
    state, moved = _moving_cluster(admin, tmp_path, name)
    reconciler = _namespaced_token(admin, name, (name, moved))
    clock_s = [1_000_000.0]

    _Cycles(reconciler, state, name, clock_s).apply(_group_of(name, 1))
    old = list_deployments(admin, name)
    _serve(admin, name, _pods_on_nodes(admin, name, 2, "the old Pods on their nodes"))

    after = _Cycles(reconciler, _moved(state, moved), name, clock_s)
    first = after.backend.apply_cluster(after.plan(_group_of(name, 1)))
    actions = {o.key: o.action for o in first.objects}
    assert actions == {
        **{f"{name}/{n}": "keep" for n in old},
        **{f"{moved}/{n}": "create" for n in old},
    }, actions
    _serve(admin, moved, _pods_on_nodes(admin, moved, 2, "the new Pods on their nodes"))
    done = after.backend.apply_cluster(after.plan(_group_of(name, 1)))
    assert {o.key: o.action for o in done.objects if o.key.startswith(f"{name}/")} == {
        f"{name}/{n}": "delete" for n in old
    }
    wait_for(lambda: not list_deployments(admin, name), what="the old Deployments pruned")


@pytest.mark.fault
def test_half_of_a_service_on_a_renamed_switch_waits_for_the_scale_in_window_when_sized(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The service runs one group under each S2 switch; the H800 switch is renamed and
    a sized decision finds the H20 half alone covers the demand. Pruning the renamed
    switch's half takes the service from 2 and 2 to 1 and 1, a scale-in: it waits for
    the policy's 300 s scale-in window as the decision's own scale-in would (it was
    pruned at once, once nothing the plan writes was starting), then goes."""
    name = "mbb-window"
    client = control_plane.client()
    state = make_desired_state(tmp_path, name)
    _edit(
        tmp_path / "policies" / "svc.yaml",
        ("gpu_types: {h800: 1.0}", "gpu_types: {h800: 1.0, h20: 1.0}"),
    )
    state = load_desired_state(tmp_path)
    ensure_namespace(client, name)
    create_nodes(client, state.clusters[name])
    clock_s = [1_000_000.0]
    staying = group("svc", name, "b", f"{name}-pb", ("h20", 1), ("h20", 1))
    gone = group("svc", name, "a", f"{name}-pa", ("h800", 1), ("h800", 1))
    _Cycles(client, state, name, clock_s).apply([gone, staying])
    old = {n: d["spec"] for n, d in list_deployments(client, name).items()}
    _serve(client, name, _pods_on_nodes(client, name, 4, "the Pods on their nodes"))
    on_pa = {n for n in old if n.startswith("svc-a-")}
    assert len(on_pa) == 2 and len(old) == 4, old

    _rename_switch(client, tmp_path, name, f"{name}-pa", f"{name}-pz")
    after = _Cycles(client, load_desired_state(tmp_path), name, clock_s)
    now_s = clock_s[0]

    def sized(*recommendations: tuple[float, int, int]) -> Plan:
        """This cycle's plan: the staying half, sized, with ``recommendations``
        (seconds before now, prefill, decode) in its decision's history."""
        history = PolicyHistory(
            recommendations=tuple(
                Recommendation(now_s - ago, p, d) for ago, p, d in recommendations
            )
        )
        decision = Decision("svc", 1, 1, "within_tolerance", "sized", history=history)
        return replace(after.plan([staying]), decisions={"svc": decision})

    # The whole service recommended 200 s ago: within the window, the half is kept.
    kept = after.backend.apply_cluster(sized((400.0, 2, 2), (200.0, 1, 1), (0.0, 1, 1)))
    actions = {o.key: o.action for o in kept.objects}
    assert {actions[f"{name}/{n}"] for n in on_pa} == {"keep"}, actions
    text = "\n".join(line for o in kept.objects for line in o.lines())
    assert "kept while its 300 s scale-in window allows the service no fewer" in text, text
    assert {n: d["spec"] for n, d in list_deployments(client, name).items()} == old

    # Aged out of the window: pruned.
    done = after.backend.apply_cluster(sized((400.0, 2, 2), (350.0, 1, 1), (0.0, 1, 1)))
    actions = {o.key: o.action for o in done.objects}
    assert {actions[f"{name}/{n}"] for n in on_pa} == {"delete"}, actions
    wait_for(
        lambda: set(list_deployments(client, name)) == set(old) - on_pa,
        what="the renamed switch's half pruned",
    )


# A low-class S2 of H800 only and a high-class one (H800 beside H20 under one S1).
_TWO_CLASS_CLUSTER = (
    CLUSTER_HEAD
    + """\
s2:
  - name: {cluster}-pa
    defaults: {{gpu_type: h800}}
    s1: [{{name: {cluster}-pa1, s0: [{{name: {cluster}-la1, nodes: "{cluster}-a-[1-1]"}}]}}]
  - name: {cluster}-pd
    s1:
      - name: {cluster}-pd1
        s0:
          - {{name: {cluster}-ld1x, nodes: "{cluster}-dx-[1-1]", defaults: {{gpu_type: h800}}}}
          - {{name: {cluster}-ld1y, nodes: "{cluster}-dy-[1-1]", defaults: {{gpu_type: h20}}}}
"""
)


class _Fixed:
    """An autoscaler that asks for 1 prefill and 1 decode, whatever runs."""

    name = "fixed"

    def decide(self, inputs: DecisionInput) -> Decision:
        return Decision(inputs.policy.name, 1, 1, "within_tolerance", "1 and 1")


@pytest.mark.fault
def test_a_group_moved_under_rebalance_serves_until_its_replacement_does(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The service's group runs in the high-class S2, which it does not need; CP-SAT
    under allow_rebalance moves it to the low-class one. The old group was deleted in
    the apply that created the new one: the service served nothing until the new Pods
    started. It is kept, cycle after cycle, until the new group serves; the GPUs it
    holds are not given to anything in the meantime; then it goes."""
    name = "mbb-rebalance"
    client = control_plane.client()
    make_desired_state(tmp_path, name)
    (tmp_path / "clusters" / f"{name}.yaml").write_text(
        _TWO_CLASS_CLUSTER.format(cluster=name, prefix=f"{name}.test")
    )
    _edit(
        tmp_path / "policies" / "svc.yaml",
        ("gpu_types: {h20: 1.0, h800: 0.5}", "gpu_types: {h800: 1.0}"),
    )
    state = load_desired_state(tmp_path)
    ensure_namespace(client, name)
    create_nodes(client, state.clusters[name])
    clock_s = [1_000_000.0]
    cycles = _Cycles(client, state, name, clock_s)
    cycles.apply([group("svc", name, "d", f"{name}-pd", ("h800", 1), ("h800", 1))])
    old = {n: d["spec"] for n, d in list_deployments(client, name).items()}
    _serve(client, name, _pods_on_nodes(client, name, 2, "the old Pods on their nodes"))

    def cycle() -> Plan:
        observation = cycles.backend.observe(cycles.spec, state.policies_for(name))
        planned, _histories = plan_cluster(
            state,
            name,
            observation,
            {},
            {},
            clock_s[0],
            _Fixed(),
            CpSatPlacer(),
            placement_options=PlacementOptions(allow_rebalance=True),
        )
        return planned

    moved = cycle()
    assert [g.domain for g in moved.groups] == [f"{name}-pa"], moved.groups
    first = cycles.backend.apply_cluster(moved)
    actions = {o.key: o.action for o in first.objects}
    assert {actions[f"{name}/{n}"] for n in old} == {"keep"}, actions
    text = "\n".join(line for o in first.objects for line in o.lines())
    assert "placement may have moved this Deployment's instances (allow_rebalance)" in text
    new = set(list_deployments(client, name)) - set(old)
    assert len(new) == 2, new
    assert {n: d["spec"] for n, d in list_deployments(client, name).items() if n in old} == old
    # The service's status says the same as the apply: out of sync (Git has the old
    # group go), on its way (not degraded: nothing for a person to fix), and why each
    # old Deployment is kept.
    status = service_status(ClusterOutcome(cluster=name, plan=moved, diff=first), "svc", None)
    assert (status.sync, status.health) == ("OutOfSync", "Progressing"), status
    kept = [h.why for h in status.holds if h.kind == "kept"]
    assert {why.split(":")[0] for why in kept} == {f"{name}/{n}" for n in old}, status.holds
    assert all("placement may have moved" in why for why in kept), kept

    # The fleet counts both copies: the placement drops the old one again, and it is
    # kept again while the new one does not serve.
    again = cycles.backend.apply_cluster(cycle())
    actions = {o.key: o.action for o in again.objects}
    assert {actions[f"{name}/{n}"] for n in old} == {"keep"}, actions
    assert {actions[f"{name}/{n}"] for n in new} == {"unchanged"}, actions

    _serve(client, name, _pods_on_nodes(client, name, 4, "every Pod on its node"), only=new)
    done = cycles.backend.apply_cluster(cycle())
    actions = {o.key: o.action for o in done.objects}
    assert {actions[f"{name}/{n}"] for n in old} == {"delete"}, actions
    wait_for(lambda: set(list_deployments(client, name)) == new, what="the old group pruned")


def _two_served_groups_of_one(
    control_plane: ControlPlane, tmp_path: Path, name: str
) -> tuple[Any, list[str], dict[str, dict[str, Any]]]:
    """Cluster ``name`` running its service as two groups of one prefill and one decode
    instance each, every Pod serving, the policy's minimum then lowered back to 1 so
    that the size is held above it: the client, the CLI options and the four
    Deployments."""
    _state, options = cluster_for_cli(control_plane, tmp_path, name)
    policy = tmp_path / "policies" / "svc.yaml"
    _edit(
        policy,
        ("prefill.yaml, min_instances: 1", "prefill.yaml, min_instances: 2"),
        ("decode.yaml, min_instances: 1", "decode.yaml, min_instances: 2"),
        (
            "deployment_group: {prefill_instances: 2, decode_instances: 4}",
            "deployment_group: {prefill_instances: 1, decode_instances: 1}",
        ),
    )
    client = control_plane.client()
    _run("apply", *options)
    old = list_deployments(client, name)
    assert len(old) == 4, old
    _serve(client, name, _pods_on_nodes(client, name, 4, "the Pods on their nodes"))
    _edit(policy, ("min_instances: 2", "min_instances: 1"))  # both roles
    return client, options, old


def _held_with_a_group_finalized(
    control_plane: ControlPlane, tmp_path: Path, name: str
) -> tuple[Any, list[str], DesiredState, KubernetesBackend, DeploymentGroup, list[str], set[str]]:
    """``_two_served_groups_of_one``, the service held (its metrics missing) and a
    finalizer on both Deployments of one of its groups: the client, the CLI options,
    the desired state, the backend, the group that stays, the paths of the finalized
    group's Deployments and the names of every Deployment before."""
    client, options, _old = _two_served_groups_of_one(control_plane, tmp_path, name)
    state = load_desired_state(tmp_path)
    backend = KubernetesBackend(client, state=state, options=ApplyOptions(soft_scale_in_window_s=0))
    backend.slo = {"svc": "held"}
    observation = backend.observe(state.clusters[name], state.policies_for(name))
    staying, going = sorted(
        (g for g in observation.fleet.groups if g.service == "svc"), key=lambda g: g.group_id
    )
    paths = [
        deployments_path(name, names.deployment_name("svc", going.group_id, role))
        for role in ("prefill", "decode")
    ]
    before = set(list_deployments(client, name))
    for path in paths:
        client.merge_patch(
            path, {"metadata": {"finalizers": ["example.com/hold"]}}, field_manager="t"
        )
    return client, options, state, backend, staying, paths, before


@pytest.mark.parametrize("deleted_by", ["apply", "saved plan", "kubectl"])
def test_a_group_deleted_while_a_finalizer_holds_it_is_replaced_only_when_not_by_a_plan(
    control_plane: ControlPlane, tmp_path: Path, deleted_by: str
) -> None:
    """The service runs two groups of one instance each (its minimum, since lowered,
    had asked for them); a finalizer holds both Deployments of one group, which is then
    deleted, and the service's metrics are missing, so its size is held. Deleted by
    heteroscale (a plan that keeps the other group: a scale-in, or the old copy of a
    move, applied live or through a saved plan), the group carries the mark of its
    deletion and the hold keeps 1 prefill, 1 decode: its capacity was removed by a plan
    (counted as someone else's deletion, the outage undid the scale-in, 2 and 2 for as
    long as the service was held). Deleted by someone else (kubectl, unmarked), the
    hold keeps 2 and 2 and a new group replaces it before it goes."""
    name = f"mbb-held-deleted-by-{deleted_by.replace(' ', '-')}"
    client, options, state, backend, staying, paths, before = _held_with_a_group_finalized(
        control_plane, tmp_path, name
    )
    try:
        if deleted_by == "kubectl":
            for path in paths:
                client.delete(path)
        else:
            plan = hand_plan(
                state,
                name,
                backend.observe(state.clusters[name], state.policies_for(name)),
                [staying],
            )
            if deleted_by == "apply":
                backend.apply_cluster(plan)
            else:
                diff = backend.diff_cluster(plan)
                saved = SavedCluster(name, backend.observed(), backend.saved_writes(diff))
                # A plan started long before its deletes: not what the marks say.
                result = execute(
                    client, saved, field_manager=names.FIELD_MANAGER, now_s=time.time() - 3600
                )
                deleted = [w for w in result.done if w.startswith("delete Deployment")]
                assert result.refused is None and len(deleted) == 2, result
        for path in paths:
            meta = client.get(path)["metadata"]
            assert meta.get("deletionTimestamp"), meta
            mark = (meta.get("annotations") or {}).get(names.DELETED_BY_PLAN_ANNOTATION)
            assert (mark is None) == (deleted_by == "kubectl"), meta
            if mark is not None:
                assert abs(float(mark) - time.time()) < 30, mark
            _assert_mark_timed_by_the_server(client.get(path), own=deleted_by != "kubectl")
        time.sleep(1.1)  # a replacement is told apart by its creation after the deletion

        text = _run("apply", *options)
        assert "metrics_missing" in text or "metrics unavailable" in text, text
        created = set(list_deployments(client, name)) - before
        if deleted_by == "kubectl":
            assert "hold 2 prefill, 2 decode" in text, text
            assert "the hold counts 1 prefill, 1 decode instance(s) of groups being deleted" in text
            assert len(created) == 2, created
        else:
            assert "hold 1 prefill, 1 decode" in text, text
            assert "the hold counts" not in text and "create Deployment" not in text, text
            assert created == set(), created
    finally:
        for path in paths:
            client.merge_patch(path, {"metadata": {"finalizers": None}}, field_manager="t")


def _assert_mark_timed_by_the_server(obj: dict[str, Any], *, own: bool) -> None:
    """The API server recorded the mark's time in the managedFields entry of its field
    manager (whole seconds, its clock, as the deletionTimestamp); heteroscale's own
    deletion came at most the margin after it, and reads so."""
    meta = obj["metadata"]
    entries = [
        e for e in meta.get("managedFields") or [] if e["manager"] == names.DELETION_MARK_MANAGER
    ]
    live = parse_deployment(obj)
    assert live is not None and live.deleted_by_plan is own, meta
    if not own:
        assert entries == [] and live.deletion_marked_s is None, meta
        return
    (entry,) = entries
    assert entry["operation"] == "Update" and entry["time"].endswith("Z"), entry
    marked_s = parse_micro_time(entry["time"])
    deleted_s = parse_micro_time(meta["deletionTimestamp"])
    assert marked_s is not None and deleted_s is not None, meta
    assert live.deletion_marked_s == marked_s, meta
    assert 0 <= deleted_s - marked_s <= OWN_DELETION_MARGIN_S, meta


# How long after a mark a failed DELETE left someone deletes the object: more than
# OWN_DELETION_MARGIN_S, far less than the minutes a reconciler-clock mark was trusted.
LATER_S = 6.5


@pytest.mark.parametrize("unmark", ["taken off", "left behind"])
def test_a_mark_a_failed_delete_left_does_not_make_a_later_deletion_the_plans(
    control_plane: ControlPlane, tmp_path: Path, unmark: str
) -> None:
    """A plan deletes one of the service's two groups; the mark is written, then an
    admission webhook refuses the DELETE, and the plan keeps the group. The mark is
    taken off again; or, where that fails too (the API server gone meanwhile), left
    behind. Someone then deletes the group (kubectl) while a finalizer holds it, more
    than the margin after the mark, within the minutes a reconciler-clock mark was
    trusted: it is someone else's deletion, and the held service replaces it before it
    goes (judged its own, not replaced: capacity lost once the finalizer went)."""
    name = f"mbb-stale-mark-{unmark.replace(' ', '-')}"
    client, options, state, backend, staying, paths, before = _held_with_a_group_finalized(
        control_plane, tmp_path, name
    )
    refused: set[str] = set()

    def webhook(method: str, target: str) -> None:
        path = target.split("?")[0]
        if path not in paths:
            return
        if method == "DELETE":
            refused.add(path)
            raise Forbidden(
                403, "Forbidden", 'admission webhook "keep.example.com" denied the request'
            )
        if method == "PATCH" and path in refused and unmark == "left behind":
            raise ClusterUnavailable(f"API server {name} did not answer PATCH {path}")

    client.hooks.append(webhook)
    try:
        plan = hand_plan(
            state, name, backend.observe(state.clusters[name], state.policies_for(name)), [staying]
        )
        applied = backend.apply_cluster(plan)
        client.hooks.remove(webhook)
        assert refused == set(paths), refused
        assert [o.action for o in applied.objects if o.action == "error"] == ["error"] * 2
        for path in paths:
            meta = client.get(path)["metadata"]
            assert not meta.get("deletionTimestamp"), meta
            mark = (meta.get("annotations") or {}).get(names.DELETED_BY_PLAN_ANNOTATION)
            entries = [
                e
                for e in meta.get("managedFields") or []
                if e["manager"] == names.DELETION_MARK_MANAGER
            ]
            if unmark == "taken off":
                assert mark is None and entries == [], meta
            else:
                assert mark is not None and len(entries) == 1 and entries[0]["time"], meta
        time.sleep(LATER_S)
        for path in paths:  # kubectl delete
            client.delete(path)
        for path in paths:
            obj = client.get(path)
            assert obj["metadata"].get("deletionTimestamp"), obj["metadata"]
            live = parse_deployment(obj)
            assert live is not None and not live.deleted_by_plan, obj["metadata"]
            if unmark == "left behind":
                deleted_s = parse_micro_time(obj["metadata"]["deletionTimestamp"])
                assert live.deletion_marked_s is not None and deleted_s is not None
                assert deleted_s - live.deletion_marked_s > OWN_DELETION_MARGIN_S
        time.sleep(1.1)  # a replacement is told apart by its creation after the deletion

        text = _run("apply", *options)
        assert "metrics_missing" in text or "metrics unavailable" in text, text
        assert "hold 2 prefill, 2 decode" in text, text
        assert "the hold counts 1 prefill, 1 decode instance(s) of groups being deleted" in text
        created = set(list_deployments(client, name)) - before
        assert len(created) == 2, created
    finally:
        if webhook in client.hooks:
            client.hooks.remove(webhook)
        for path in paths:
            client.merge_patch(path, {"metadata": {"finalizers": None}}, field_manager="t")

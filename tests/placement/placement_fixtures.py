"""Builders and invariant checks shared by the placement tests.

Clusters and policies are built from plain dicts through the real pydantic models, so
the tests exercise the same validation as YAML files. ``check_invariants`` states what
every placement must satisfy, whatever the placer and the input.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from reconciler.desired.checks import check_cluster
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.placement.base import PlacementOptions, PlacementRequest, PlacementResult
from reconciler.placement.problem import ANCHOR_INSTANCES
from reconciler.state import ROLES, DeploymentGroup, FleetState, GroupRole, NodeInstances, Targets
from reconciler.topology import gpus_per_instance_of, topology_for, used_gpus

CATALOGUE = {
    "h800": {"memory_gib": 80, "bf16_tflops": 989, "memory_bandwidth_gbps": 3350},
    "h20": {"memory_gib": 96, "bf16_tflops": 148, "memory_bandwidth_gbps": 4000},
    "l20": {"memory_gib": 48, "bf16_tflops": 119.5, "memory_bandwidth_gbps": 864},
}


def s1(name: str, *leaves: tuple[str, str, str]) -> dict[str, Any]:
    """An S1 switch whose S0 leaves are ``(leaf name, node range, gpu type)``."""
    return {
        "name": name,
        "s0": [
            {"name": leaf, "nodes": nodes, "defaults": {"gpu_type": gpu}}
            for leaf, nodes, gpu in leaves
        ],
    }


def cluster(
    pods: Mapping[str, list[dict[str, Any]]],
    subgroups: Mapping[str, list[str]] | None = None,
    *,
    name: str = "tiny",
    gpus_per_node: int = 8,
) -> ClusterSpec:
    """A validated ``ClusterSpec``: ``pods`` maps S2 name -> S1 switches (see ``s1``);
    ``subgroups`` maps subgroup name -> S1/S2 switch names (default: one per S2)."""
    if subgroups is None:
        subgroups = {f"rg-{pod}": [pod] for pod in pods}
    spec = ClusterSpec.model_validate(
        {
            "name": name,
            "gpu_types": CATALOGUE,
            "defaults": {"gpus_per_node": gpus_per_node},
            "s2": [{"name": pod, "s1": s1s} for pod, s1s in pods.items()],
            "rdma_subgroups": [{"name": sg, "switches": sw} for sg, sw in subgroups.items()],
        }
    )
    problems = check_cluster(spec)
    assert not problems, problems
    return spec


def three_class_cluster(nodes_per_leaf: int = 2) -> ClusterSpec:
    """pod-a: H800 only (low); pod-b: H20 only (low); pod-c: one H800 S1 and one H20 S1
    (medium); pod-d: H800 and H20 under each S1 (high). Each leaf ``nodes_per_leaf``
    nodes of 8 GPUs."""
    n = nodes_per_leaf

    def rng(prefix: str) -> str:
        return f"{prefix}-[1-{n}]"

    return cluster(
        {
            "pod-a": [s1("a1", ("la1", rng("a1n"), "h800")), s1("a2", ("la2", rng("a2n"), "h800"))],
            "pod-b": [s1("b1", ("lb1", rng("b1n"), "h20")), s1("b2", ("lb2", rng("b2n"), "h20"))],
            "pod-c": [s1("c1", ("lc1", rng("c1n"), "h800")), s1("c2", ("lc2", rng("c2n"), "h20"))],
            "pod-d": [
                s1("d1", ("ld1x", rng("d1x"), "h800"), ("ld1y", rng("d1y"), "h20")),
                s1("d2", ("ld2x", rng("d2x"), "h800"), ("ld2y", rng("d2y"), "h20")),
            ],
        }
    )


def policy(
    name: str,
    *,
    prefill: tuple[int, Mapping[str, float]] = (1, {"h800": 1.0}),
    decode: tuple[int, Mapping[str, float]] = (1, {"h20": 1.0}),
    shape: tuple[int, int] = (2, 4),
    affinity: str = "s2",
    priority: int = 100,
    cluster_name: str = "tiny",
) -> ServicePolicy:
    def role(spec: tuple[int, Mapping[str, float]]) -> dict[str, Any]:
        return {
            "gpus_per_instance": spec[0],
            "gpu_types": dict(spec[1]),
            "min_instances": 0,
            "max_instances": 1000,
            "template": "templates/x.yaml",
        }

    return ServicePolicy.model_validate(
        {
            "name": name,
            "model": {"name": "m", "params_b": 8, "kv_bytes_per_token": 131072},
            "cluster": cluster_name,
            "namespace": name,
            "priority": priority,
            "slo": {"ttft_ms": 1000, "tbt_ms": 40},
            "prefill": role(prefill),
            "decode": role(decode),
            "pd_ratio": {"target": "1:2", "min": "1:8", "max": "8:1"},
            "deployment_group": {"prefill_instances": shape[0], "decode_instances": shape[1]},
            "affinity": affinity,
            "scaling": {"target_per_instance": 1000},
        }
    )


def group(
    service: str,
    group_id: str,
    domain: str,
    subgroup: str | None,
    prefill: tuple[str, Mapping[str, int]],
    decode: tuple[str, Mapping[str, int]],
    cluster_name: str = "tiny",
) -> DeploymentGroup:
    """A running group: ``prefill``/``decode`` = (gpu type, {node: instances})."""

    def role(spec: tuple[str, Mapping[str, int]]) -> GroupRole:
        gpu, nodes = spec
        return GroupRole(
            gpu, sum(nodes.values()), tuple(NodeInstances(n, c) for n, c in sorted(nodes.items()))
        )

    return DeploymentGroup(
        service, cluster_name, group_id, domain, subgroup, role(prefill), role(decode)
    )


def request(
    spec: ClusterSpec,
    policies: Iterable[ServicePolicy],
    targets: Mapping[str, tuple[int, int]],
    groups: Iterable[DeploymentGroup] = (),
    **options: Any,
) -> PlacementRequest:
    options.setdefault("time_limit_s", 10.0)
    return PlacementRequest(
        cluster=spec,
        policies={p.name: p for p in policies},
        current=FleetState(spec.name, groups=tuple(groups)),
        targets={name: Targets(name, p, d) for name, (p, d) in targets.items()},
        options=PlacementOptions(**options),
    )


def groups_of(result: PlacementResult, service: str) -> list[DeploymentGroup]:
    return [g for g in result.groups if g.service == service]


def node_usage(req: PlacementRequest, groups: Iterable[DeploymentGroup]) -> dict[str, int]:
    topo = topology_for(req.cluster)
    used = used_gpus(topo, groups, gpus_per_instance_of(req.policies))
    return {topo.nodes[i].name: int(u) for i, u in enumerate(used)}


def check_invariants(req: PlacementRequest, result: PlacementResult) -> None:
    """What every placement guarantees (see reconciler.placement.problem)."""
    topo = topology_for(req.cluster)
    policies = req.policies
    # Capacity per node, and no empty groups, unique ids.
    usage = node_usage(req, result.groups)
    for node in req.cluster.nodes:
        assert usage[node.name] <= node.gpus, (
            f"{node.name} overbooked: {usage[node.name]} > {node.gpus}"
        )
    # Capacity freed this cycle (a scale-in, a move under allow_rebalance, a pruned
    # group) is not reused in it: what is added on a node fits beside everything that
    # ran there before, whose Pods still hold their GPUs while the new ones start (an
    # instance of unknown size, a service without a policy, holds its whole node).
    gpus = gpus_per_instance_of(policies)
    ran_gpus = node_usage(req, req.current.groups)
    ran = {node.name: min(node.gpus, ran_gpus[node.name]) for node in req.cluster.nodes}
    ran_on = {
        (g.service, g.group_id, role): {p.node: p.instances for p in g.role(role).nodes}
        for g in req.current.groups
        for role in ROLES
    }
    added: dict[str, int] = defaultdict(int)
    for g in result.groups:
        for role in ROLES:
            old_nodes = ran_on.get((g.service, g.group_id, role), {})
            size = g.role(role).gpus_per_instance or gpus(g.service, role) or 0
            for p in g.role(role).nodes:
                added[p.node] += max(0, p.instances - old_nodes.get(p.node, 0)) * size
    for node in req.cluster.nodes:
        assert ran[node.name] + added[node.name] <= node.gpus, (
            f"{node.name}: {added[node.name]} GPUs added beside the {ran[node.name]} that ran "
            f"there: GPUs freed this cycle reused"
        )
    seen: set[tuple[str, str]] = set()
    for g in result.groups:
        assert (g.service, g.group_id) not in seen, f"duplicate group {g.service}/{g.group_id}"
        seen.add((g.service, g.group_id))
        assert g.prefill.instances + g.decode.instances > 0, f"empty group {g.group_id}"
        for role in ROLES:
            assert g.role(role).instances == sum(p.instances for p in g.role(role).nodes)
        assert g.service in policies, f"group of unknown service {g.service} kept"

    before = {(g.service, g.group_id): g for g in req.current.groups}
    for g in result.groups:
        old = before.get((g.service, g.group_id))
        policy = policies[g.service]
        domain = topo.domain_of_group(g)
        for role in ROLES:
            old_nodes = {p.node: p.instances for p in old.role(role).nodes} if old else {}
            grown = any(p.instances > old_nodes.get(p.node, 0) for p in g.role(role).nodes)
            if not grown:
                continue
            # Anything added sits inside the group's domain, on its GPU type, allowed.
            assert domain is not None, f"{g.group_id} grew outside any known domain"
            allowed = set(domain.node_indices)
            assert g.role(role).gpu_type in policy.role(role).gpu_types
            for p in g.role(role).nodes:
                index = topo.node_index[p.node]
                assert index in allowed, f"{g.group_id} {role} on {p.node} outside {domain.key}"
                assert topo.nodes[index].gpu_type == g.role(role).gpu_type
        if old is None:
            assert domain is not None
            required = [r for r in ROLES if req.targets[g.service].__getattribute__(r) > 0]
            for role in required:
                assert g.role(role).instances >= 1, f"new group {g.group_id} lacks {role}"
            if policy.affinity == "s1":
                assert {
                    topo.nodes[topo.node_index[p.node]].s1 for r in ROLES for p in g.role(r).nodes
                } == {g.domain}
            if policy.affinity == "s2":
                assert {
                    topo.nodes[topo.node_index[p.node]].s2 for r in ROLES for p in g.role(r).nodes
                } == {g.domain}

    # Running instances: never moved; a role only shrinks when its target is lower.
    after = {(g.service, g.group_id): g for g in result.groups}
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for g in req.current.groups:
        for role in ROLES:
            totals[(g.service, role)] += g.role(role).instances
    for key, old in before.items():
        if old.service not in policies:
            assert key not in after, "groups of services without a policy are pruned"
            continue
        new = after.get(key)
        target = req.targets.get(old.service)
        for role in ROLES:
            old_nodes = {p.node: p.instances for p in old.role(role).nodes}
            new_nodes = {p.node: p.instances for p in new.role(role).nodes} if new else {}
            if target is None:
                assert new == old, "a service without a target keeps its groups"
                continue
            shrinking = getattr(target, role) < totals[(old.service, role)]
            for node, count in old_nodes.items():
                if shrinking:
                    assert new_nodes.get(node, 0) <= count
                elif not req.options.allow_rebalance:
                    assert new_nodes.get(node, 0) >= count, f"{key} {role} lost instances on {node}"

    # Anchors: exactly ANCHOR_INSTANCES of the anchor role, in a group new this cycle
    # that also holds the other role, only while that role grows (without rebalancing,
    # which may move instances into the group) and the anchor role's target is met.
    for a in result.anchors:
        assert (a.service, a.group_id) not in before, f"anchor in running group {a.group_id}"
        g = after[(a.service, a.group_id)]
        grows = "decode" if a.role == "prefill" else "prefill"
        assert a.instances == g.role(a.role).instances == ANCHOR_INSTANCES
        assert g.role(grows).instances >= 1
        target = req.targets[a.service]
        assert getattr(target, a.role) > 0
        if not req.options.allow_rebalance:
            assert getattr(target, grows) > totals[(a.service, grows)], (
                "anchored a non-growing role"
            )
        assert result.placed(a.service, a.role) - result.overshoot(a.service, a.role) == getattr(
            target, a.role
        ), "anchor opened although the anchor role's target was not met"
        assert any(
            n.startswith(f"anchored group {a.service}/{a.group_id}") for n in result.stats.notes
        )
    assert len({(a.service, a.group_id) for a in result.anchors}) == len(result.anchors)

    # Targets: never exceeded but by anchors; every missing instance is explained, once.
    short: dict[tuple[str, str], int] = defaultdict(int)
    for s in result.shortfalls:
        assert s.instances > 0 and s.detail
        short[(s.service, s.role)] += s.instances
    for service, target in req.targets.items():
        if service not in policies:
            continue
        for role in ROLES:
            placed = result.placed(service, role)
            overshoot = result.overshoot(service, role)
            wanted = getattr(target, role)
            assert overshoot == 0 or short[(service, role)] == 0, "an anchor role is never short"
            assert placed - overshoot <= max(wanted, 0), (
                f"{service} {role}: {placed} - overshoot {overshoot} > target {wanted}"
            )
            assert placed - overshoot + short[(service, role)] == wanted, (
                f"{service} {role}: placed {placed} - overshoot {overshoot} + short "
                f"{short[(service, role)]} != target {wanted}"
            )

"""Quality measures of a placement, for benchmarks, reports and tests.

All measures are computed from the result's layout alone (plus the topology and the
policies), so any two placers can be compared on the same request:

- ``groups_in_one_subgroup``: groups whose instances all sit inside one RDMA subgroup
  (KV-cache transfer stays on RDMA);
- ``scarce_gpus_unneeded``: GPUs in medium/high subgroups held by groups whose GPU type
  pair and affinity would have been satisfied by a less scarce class (a homogeneous
  group in a mixed subgroup, or a two-type S2 group in an S1-heterogeneous one);
  ``_added`` counts only GPUs added in this cycle; ``scarce_gpu_steps`` weighs each of
  them by the class steps above the need (a homogeneous group in a high subgroup: 2);
- ``spanning_gpus``: GPUs of groups whose instances sit in more than one subgroup;
- ``whole_nodes_free``: nodes with no GPU in use after the cycle;
- ``unmet_gpus`` / ``unmet_weighted``: GPUs short of target, and weighted by priority+1;
  ``unmet_rank_weighted`` weights them as the CP-SAT objective does, by the dense rank
  of the service's priority among the services with a target, plus 1;
- ``preferred_share_added``: share of the GPUs added this cycle that are on each role's
  first-ranked GPU type (``problem.role_ranking``); ``preference_cost_added`` charges them as the CP-SAT
  objective does (``reconciler.placement.problem.preference_cost``: 0 for the most
  preferred type, up to 99 per GPU);
- ``anchored_groups`` / ``overshoot_gpus``: anchored groups opened for a role growing
  alone, and the GPUs their anchors hold beyond the other role's target;
- ``overflow_instances``: instances beyond their group's size (both roles together).

**Worse than greedy**, the one definition the CP-SAT placer, its tests and the
benchmark use (``worse_than``): two layouts of the same request are compared on the
measured terms in the order of the CP-SAT objective's levels (``objective_terms``),
lexicographically: unmet demand weighted by priority rank (level 1), GPUs held by
anchors beyond target (1b), GPUs of groups spanning RDMA subgroups, then scarce
subgroup GPUs x class steps held by groups that do not need them (2), instances
beyond their group's size (2b), the GPU type preference cost of the added GPUs (3),
and nodes not left whole (4). A layout is worse than another when, at the first term
where they differ, its value is higher. Each term is measured in the objective's own
unit (GPU class steps, not GPUs; preference cost, not the share on the best type), so
an improvement the objective sees is not mistaken for a loss. (Per-term dominance
would call every trade the objective makes on purpose -- a less preferred GPU type to
keep a scarce subgroup free -- a loss.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.placement.base import PlacementResult
from reconciler.placement.problem import needed_class_rank, preference_cost, role_ranking
from reconciler.state import ROLES, DeploymentGroup, FleetState, Targets
from reconciler.topology import Topology, gpus_per_instance_of, topology_for, used_gpus


@dataclass(frozen=True)
class PlacementQuality:
    groups: int
    groups_in_one_subgroup: int
    changed_groups: int
    changed_groups_in_one_subgroup: int
    scarce_gpus_unneeded: int
    scarce_gpus_unneeded_added: int
    whole_nodes_free: int
    unmet_gpus: int
    unmet_weighted: int
    gpus_added: int
    preferred_share_added: float
    anchored_groups: int = 0
    overshoot_gpus: int = 0
    unmet_rank_weighted: int = 0
    overflow_instances: int = 0
    scarce_gpu_steps: int = 0
    spanning_gpus: int = 0
    preference_cost_added: int = 0

    @property
    def share_in_one_subgroup(self) -> float:
        return self.groups_in_one_subgroup / self.groups if self.groups else 1.0

    @property
    def changed_share_in_one_subgroup(self) -> float:
        return (
            self.changed_groups_in_one_subgroup / self.changed_groups
            if self.changed_groups
            else 1.0
        )


def group_subgroups(topology: Topology, group: DeploymentGroup) -> set[str]:
    """The RDMA subgroups a group's instances sit in."""
    out: set[str] = set()
    for role in ROLES:
        for placed in group.role(role).nodes:
            index = topology.node_index.get(placed.node)
            if index is not None and placed.instances > 0:
                out.add(topology.subgroup_of_node(index))
    return out


def measure(
    cluster: ClusterSpec,
    policies: Mapping[str, ServicePolicy],
    current: FleetState,
    result: PlacementResult,
    targets: Mapping[str, Targets] | None = None,
) -> PlacementQuality:
    """The measures of ``result`` (placed from ``current``); ``targets``, the
    request's, define the priority ranks of ``unmet_rank_weighted`` (default: every
    service in ``policies``)."""
    return _measure(cluster, policies, current, result, result.groups, targets)


def measure_pair(
    cluster: ClusterSpec,
    policies: Mapping[str, ServicePolicy],
    current: FleetState,
    layout: PlacementResult,
    baseline: PlacementResult,
    targets: Mapping[str, Targets] | None = None,
) -> tuple[PlacementQuality, PlacementQuality]:
    """Measures of two layouts of the same request *to compare them* (``first_worse_term``
    of the pair is that of the two full ``measure``s): the groups equal in both are left
    out of the per-group sums, which they would raise by the same amount in both; whole
    nodes, unmet demand and anchors are counted on the full layouts. On a large fleet
    most groups are untouched by a cycle, so this costs a fraction of two ``measure``
    calls (the CP-SAT placer's last guard against greedy)."""
    theirs = {(g.service, g.group_id): g for g in baseline.groups}
    mine = {(g.service, g.group_id): g for g in layout.groups}

    def differing(
        groups: Mapping[tuple[str, str], DeploymentGroup],
        other: Mapping[tuple[str, str], DeploymentGroup],
    ) -> list[DeploymentGroup]:
        out: list[DeploymentGroup] = []
        for key, group in groups.items():
            twin = other.get(key)
            if twin is None or (twin is not group and twin != group):
                out.append(group)
        return out

    return (
        _measure(cluster, policies, current, layout, differing(mine, theirs), targets),
        _measure(cluster, policies, current, baseline, differing(theirs, mine), targets),
    )


def _measure(
    cluster: ClusterSpec,
    policies: Mapping[str, ServicePolicy],
    current: FleetState,
    result: PlacementResult,
    measured_groups: Iterable[DeploymentGroup],
    targets: Mapping[str, Targets] | None,
) -> PlacementQuality:
    """``measure`` with the per-group sums over ``measured_groups`` only (the whole
    layout, ``result.groups``, for node usage)."""
    topology = topology_for(cluster)
    before = {(g.service, g.group_id): g for g in current.groups}
    size_of = gpus_per_instance_of(policies)
    in_one = changed = changed_in_one = overflow = spanning = 0
    scarce = scarce_added = scarce_steps = added_total = preferred_added = preference = 0
    measured = list(measured_groups)
    for group in measured:
        policy = policies.get(group.service)
        one = len(group_subgroups(topology, group)) <= 1
        in_one += one
        old = before.get((group.service, group.group_id))
        if old != group:
            changed += 1
            changed_in_one += one
        if policy is None:
            continue
        shape = policy.deployment_group
        overflow += max(
            0,
            group.prefill.instances
            + group.decode.instances
            - shape.prefill_instances
            - shape.decode_instances,
        )
        need_rank = needed_class_rank(
            group.prefill.gpu_type, group.decode.gpu_type, policy.affinity
        )
        for role in ROLES:
            size = policy.role(role).gpus_per_instance
            order, weights = role_ranking(policy, cluster, role)
            best = order[0] if order else group.role(role).gpu_type
            unit_cost = preference_cost(weights, group.role(role).gpu_type)
            old_nodes = {p.node: p.instances for p in old.role(role).nodes} if old else {}
            for placed in group.role(role).nodes:
                index = topology.node_index.get(placed.node)
                if index is None:
                    continue
                rank = topology.subgroups[topology.subgroup_of_node(index)].class_rank
                gpus = placed.instances * size
                new_gpus = max(0, placed.instances - old_nodes.get(placed.node, 0)) * size
                added_total += new_gpus
                preference += new_gpus * unit_cost
                if not one:
                    spanning += gpus
                if group.role(role).gpu_type == best:
                    preferred_added += new_gpus
                if rank > need_rank:
                    scarce += gpus
                    scarce_added += new_gpus
                    scarce_steps += gpus * (rank - need_rank)
    used = used_gpus(topology, result.groups, size_of)
    ranked = [s for s in (policies if targets is None else targets) if s in policies]
    priority_rank = {p: i for i, p in enumerate(sorted({policies[s].priority for s in ranked}))}
    unmet = unmet_weighted = unmet_ranked = 0
    for shortfall in result.shortfalls:
        policy = policies.get(shortfall.service)
        gpus = shortfall.instances * (
            policy.role(shortfall.role).gpus_per_instance if policy else 1
        )
        unmet += gpus
        unmet_weighted += gpus * ((policy.priority if policy else 0) + 1)
        unmet_ranked += gpus * (priority_rank.get(policy.priority, -1) + 1 if policy else 0)
    return PlacementQuality(
        groups=len(measured),
        groups_in_one_subgroup=in_one,
        changed_groups=changed,
        changed_groups_in_one_subgroup=changed_in_one,
        scarce_gpus_unneeded=scarce,
        scarce_gpus_unneeded_added=scarce_added,
        whole_nodes_free=int(np.count_nonzero(used == 0)),
        unmet_gpus=unmet,
        unmet_weighted=unmet_weighted,
        gpus_added=added_total,
        preferred_share_added=preferred_added / added_total if added_total else 1.0,
        anchored_groups=len(result.anchors),
        overshoot_gpus=sum(
            a.instances * policies[a.service].role(a.role).gpus_per_instance
            for a in result.anchors
            if a.service in policies
        ),
        unmet_rank_weighted=unmet_ranked,
        overflow_instances=overflow,
        scarce_gpu_steps=scarce_steps,
        spanning_gpus=spanning,
        preference_cost_added=preference,
    )


def objective_terms(quality: PlacementQuality) -> tuple[tuple[str, float], ...]:
    """The measured terms in the CP-SAT objective's order, each ``(name, value)`` with
    lower values better (the module docstring, "worse than greedy")."""
    q = quality
    return (
        ("unmet demand (GPUs x priority rank)", q.unmet_rank_weighted),
        ("GPUs held by anchors beyond target", q.overshoot_gpus),
        ("GPUs of groups spanning RDMA subgroups", q.spanning_gpus),
        ("scarce-subgroup GPUs x class steps held by groups not needing them", q.scarce_gpu_steps),
        ("instances beyond their group's size", q.overflow_instances),
        ("GPU type preference cost of the added GPUs", q.preference_cost_added),
        ("nodes not left whole", -q.whole_nodes_free),
    )


def first_worse_term(layout: PlacementQuality, baseline: PlacementQuality) -> str | None:
    """The term that makes ``layout`` worse than ``baseline`` (the first one where they
    differ, when ``layout`` is higher there), or None when it is not worse."""
    for (name, mine), (_name, theirs) in zip(
        objective_terms(layout), objective_terms(baseline), strict=True
    ):
        if mine != theirs:
            return name if mine > theirs else None
    return None


def worse_than(layout: PlacementQuality, baseline: PlacementQuality) -> bool:
    """Whether ``layout`` is worse than ``baseline`` (the module docstring)."""
    return first_worse_term(layout, baseline) is not None


__all__ = [
    "PlacementQuality",
    "first_worse_term",
    "group_subgroups",
    "measure",
    "measure_pair",
    "objective_terms",
    "worse_than",
]

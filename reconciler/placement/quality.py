"""Quality measures of a placement, for benchmarks, reports and tests.

All measures are computed from the result's layout alone (plus the topology and the
policies), so any two placers can be compared on the same request:

- ``groups_in_one_subgroup``: groups whose instances all sit inside one RDMA subgroup
  (KV-cache transfer stays on RDMA);
- ``scarce_gpus_unneeded``: GPUs in medium/high subgroups held by groups whose GPU type
  pair and affinity would have been satisfied by a less scarce class (a homogeneous
  group in a mixed subgroup, or a two-type S2 group in an S1-heterogeneous one);
  ``_added`` counts only GPUs added in this cycle;
- ``whole_nodes_free``: nodes with no GPU in use after the cycle;
- ``unmet_gpus`` / ``unmet_weighted``: GPUs short of target, and weighted by priority+1;
- ``preferred_share_added``: share of the GPUs added this cycle that are on each role's
  most preferred GPU type;
- ``anchored_groups`` / ``overshoot_gpus``: anchored groups opened for a role growing
  alone, and the GPUs their anchors hold beyond the other role's target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from reconciler.desired.models import ServicePolicy
from reconciler.placement.base import PlacementResult
from reconciler.placement.problem import needed_class_rank
from reconciler.state import ROLES, DeploymentGroup, FleetState
from reconciler.topology import Topology, gpus_per_instance_of, used_gpus


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
    topology: Topology,
    policies: Mapping[str, ServicePolicy],
    current: FleetState,
    result: PlacementResult,
) -> PlacementQuality:
    before = {(g.service, g.group_id): g for g in current.groups}
    size_of = gpus_per_instance_of(policies)
    in_one = changed = changed_in_one = 0
    scarce = scarce_added = added_total = preferred_added = 0
    for group in result.groups:
        policy = policies.get(group.service)
        one = len(group_subgroups(topology, group)) <= 1
        in_one += one
        old = before.get((group.service, group.group_id))
        if old != group:
            changed += 1
            changed_in_one += one
        if policy is None:
            continue
        need_rank = needed_class_rank(
            group.prefill.gpu_type, group.decode.gpu_type, policy.affinity
        )
        for role in ROLES:
            size = policy.role(role).gpus_per_instance
            best = policy.role(role).preferred_gpu_types()[0]
            old_nodes = {p.node: p.instances for p in old.role(role).nodes} if old else {}
            for placed in group.role(role).nodes:
                index = topology.node_index.get(placed.node)
                if index is None:
                    continue
                rank = topology.subgroups[topology.subgroup_of_node(index)].class_rank
                gpus = placed.instances * size
                new_gpus = max(0, placed.instances - old_nodes.get(placed.node, 0)) * size
                added_total += new_gpus
                if group.role(role).gpu_type == best:
                    preferred_added += new_gpus
                if rank > need_rank:
                    scarce += gpus
                    scarce_added += new_gpus
    used = used_gpus(topology, result.groups, size_of)
    unmet = unmet_weighted = 0
    for shortfall in result.shortfalls:
        policy = policies.get(shortfall.service)
        gpus = shortfall.instances * (
            policy.role(shortfall.role).gpus_per_instance if policy else 1
        )
        unmet += gpus
        unmet_weighted += gpus * ((policy.priority if policy else 0) + 1)
    return PlacementQuality(
        groups=len(result.groups),
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
    )


__all__ = ["PlacementQuality", "group_subgroups", "measure"]

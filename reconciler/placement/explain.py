"""Why instances could not be placed: one ``Shortfall`` per (service, role) short.

The explanation is computed from the final layout, the GPUs still free after it
(``residual_free``) and those free when the cycle began (``initial_free``), so it names
the binding constraint in the user's terms:

- ``gpu_type``: none of the role's allowed GPU types exists in the cluster;
- ``group_shape``: no existing group can grow (none, or none pinned to a known domain)
  and no new group can be opened because the other role has no GPU type in the cluster
  (a role growing alone may open an *anchored* group, so a met target of the other
  role alone no longer blocks a new group);
- ``fragmentation``: enough GPUs are free in the chosen domain, but not enough of them
  on single nodes for the instance size (reported by node packing);
- ``affinity``: enough GPUs of the allowed types are free in the cluster, but no single
  scheduling domain (S1 / S2 / subgroup) has room for the rest of a group;
- ``gpu_capacity``: not enough free GPUs of the allowed types in the whole cluster.

The detail names the largest free capacity under one switch, the cluster-wide free
capacity, and which services took capacity of those types in this cycle.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from reconciler.placement.base import Shortfall
from reconciler.placement.problem import ANCHOR_INSTANCES, PlacementProblem, ServiceNeed
from reconciler.state import ROLES, Role
from reconciler.topology import SchedulingDomain, Topology


def slots(free: np.ndarray, size: int) -> int:
    """Instances of ``size`` GPUs that fit on these nodes."""
    return int((free // size).sum()) if free.size else 0


class SlotCounter:
    """``slots`` per (domain, GPU type, size) over one free-GPU array, memoised (the
    explanations of many shortfalls look at the same domains)."""

    def __init__(self, topology: Topology, free: np.ndarray):
        self.topology = topology
        self.free = free
        self._cache: dict[tuple[int, str, int], int] = {}

    def __call__(self, domain: SchedulingDomain, gpu_type: str, size: int) -> int:
        key = (domain.region, gpu_type, size)
        if key not in self._cache:
            self._cache[key] = slots(self.free[self.topology.domain_nodes(domain, gpu_type)], size)
        return self._cache[key]


def _level(need: ServiceNeed) -> str:
    return {"s1": "one S1", "s2": "one S2", "cluster": "one RDMA subgroup"}[need.affinity]


def explain(
    problem: PlacementProblem,
    need: ServiceNeed,
    role: Role,
    missing: int,
    residual_free: np.ndarray | SlotCounter,
    initial_free: np.ndarray | SlotCounter,
    takers: Mapping[str, Mapping[str, int]],
    hint: str | None = None,
    hint_detail: str | None = None,
) -> Shortfall:
    """Build the shortfall of ``missing`` instances of ``role`` of ``need.service``.

    ``takers``: GPU type -> service -> GPUs newly placed this cycle (for the detail).
    ``hint``: a constraint a placer already knows bound (e.g. "fragmentation").
    """
    topo = problem.topology
    residual = (
        residual_free
        if isinstance(residual_free, SlotCounter)
        else SlotCounter(topo, residual_free)
    )
    initial = (
        initial_free if isinstance(initial_free, SlotCounter) else SlotCounter(topo, initial_free)
    )
    rn = need.role(role)
    size = rn.gpus_per_instance
    gpus = missing * size
    head = f"{missing} {role} instance(s) of {size} GPU(s) ({gpus} GPUs)"
    if not rn.allowed_types:
        return Shortfall(
            need.service,
            role,
            missing,
            "gpu_type",
            f"{head}: none of the allowed GPU types ({', '.join(sorted(rn.weights))}) exists in cluster '{topo.cluster}'",
        )
    if hint is not None:
        return Shortfall(need.service, role, missing, hint, f"{head}: {hint_detail or hint}")

    other: Role = "decode" if role == "prefill" else "prefill"
    # Where the rest could have gone: any domain of the affinity when a new group can be
    # opened -- with the other role's missing instances, or (its target met) with an
    # anchor of it -- else only the domains of the service's existing groups.
    can_open = other not in need.required_roles or bool(need.role(other).allowed_types)
    anchored = (
        other in need.required_roles
        and problem.placed(need.service, other) >= need.role(other).target
    )
    if can_open:
        candidates = [(d, t) for d in topo.domains(need.affinity) for t in rn.allowed_types]
        where = _level(need)
    else:
        candidates = sorted(
            {
                (g.domain.key, g.gpu_type[role]): (g.domain, g.gpu_type[role])
                for g in problem.groups.get(need.service, ())
                if g.domain is not None and g.gpu_type[role] in rn.allowed_types
            }.values(),
            key=lambda dt: (dt[0].key, dt[1]),
        )
        where = "the domains of its existing groups"
        if not candidates:
            return Shortfall(
                need.service,
                role,
                missing,
                "group_shape",
                f"{head}: no existing group can grow and a new group needs a {other} instance, "
                f"but no allowed {other} GPU type exists in cluster '{topo.cluster}'",
            )
    best_slots, best_where, best_type = 0, "", rn.allowed_types[0]
    for domain, gpu_type in candidates:
        here = residual(domain, gpu_type, size)
        if here > best_slots:
            best_slots, best_where, best_type = here, domain.describe(), gpu_type
    cluster_slots = {t: residual(topo.cluster_domain, t, size) for t in rn.allowed_types}
    initial_slots = {t: initial(topo.cluster_domain, t, size) for t in rn.allowed_types}
    total_slots = sum(cluster_slots.values())
    # A new group needs the other role's missing instances too: judge the capacity of
    # the two together when both are short (they may share GPU types).
    placed_other = problem.placed(need.service, other)
    other_missing = need.role(other).target - placed_other if other in need.required_roles else 0
    if anchored:
        other_missing = ANCHOR_INSTANCES  # a new group needs its anchor
    enough = total_slots >= missing
    if can_open and other_missing > 0:
        orn = need.role(other)
        types = set(rn.allowed_types) | set(orn.allowed_types)
        free_gpus = sum(residual(topo.cluster_domain, t, 1) for t in types)
        other_slots = sum(
            residual(topo.cluster_domain, t, orn.gpus_per_instance) for t in orn.allowed_types
        )
        enough = (
            enough
            and other_slots >= other_missing
            and free_gpus >= gpus + other_missing * orn.gpus_per_instance
        )
    # GPUs free in whole instance-sized slots, and how many are free at all where that
    # is more (single free GPUs on many nodes seat no larger instance).
    free_gpus_of = {t: residual(topo.cluster_domain, t, 1) for t in rn.allowed_types}
    free_text = ", ".join(
        f"{cluster_slots[t] * size} {t}"
        + (
            f" in {size}-GPU slots, of {free_gpus_of[t]} free GPUs"
            if free_gpus_of[t] > cluster_slots[t] * size
            else ""
        )
        for t in rn.allowed_types
    )
    largest = (
        f"largest free under {where}: {best_slots * size} {best_type} GPUs under {best_where}"
        if best_slots
        else f"no {'/'.join(rn.allowed_types)} GPUs free for a {size}-GPU instance under {where}"
    )
    if not can_open:
        largest += f" (no {other} GPU type in the cluster, so no new group can be opened)"
    elif anchored:
        largest += (
            f" ({other} target met: a new group would also take {ANCHOR_INSTANCES} anchor "
            f"{other} instance(s) beyond it)"
        )
    taken: list[str] = []
    for gpu_type in rn.allowed_types:
        for service, count in sorted(
            takers.get(gpu_type, {}).items(), key=lambda kv: (-kv[1], kv[0])
        ):
            if service != need.service and count > 0:
                prio = problem.needs[service].priority if service in problem.needs else 0
                taken.append(f"{service} (priority {prio}) {count} {gpu_type}")
    taken_text = (
        f"; taken this cycle by {', '.join(taken[:5])}{' ...' if len(taken) > 5 else ''}"
        if taken
        else ""
    )
    if enough:
        constraint = "affinity"
        reason = (
            f"{head} as part of a group under {where}: {largest}; cluster-wide free: {free_text}"
        )
    else:
        constraint = "gpu_capacity"
        was = sum(initial_slots.values()) * size
        reason = (
            f"{head} of {'/'.join(rn.allowed_types)} under {where}: {largest}; cluster-wide free: "
            f"{free_text} (was {was} at the start of the cycle)"
        )
    return Shortfall(need.service, role, missing, constraint, reason + taken_text)


def shortfalls_for(
    problem: PlacementProblem,
    residual_free: np.ndarray,
    initial_free: np.ndarray,
    takers: Mapping[str, Mapping[str, int]],
    hints: Mapping[tuple[str, Role], tuple[str, str]] | None = None,
) -> list[Shortfall]:
    """A shortfall for every (service, role) whose placement stays below target."""
    out: list[Shortfall] = []
    residual = SlotCounter(problem.topology, residual_free)
    initial = SlotCounter(problem.topology, initial_free)
    for need in problem.services_by_priority():
        for role in ROLES:
            missing = need.role(role).target - problem.placed(need.service, role)
            if missing <= 0:
                continue
            hint = (hints or {}).get((need.service, role))
            out.append(
                explain(
                    problem,
                    need,
                    role,
                    missing,
                    residual,
                    initial,
                    takers,
                    hint=hint[0] if hint else None,
                    hint_detail=hint[1] if hint else None,
                )
            )
    return out


__all__ = ["SlotCounter", "explain", "shortfalls_for", "slots"]

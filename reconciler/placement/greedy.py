"""The paper's topology-aware scheduler, as the baseline behind the same interface.

HeteroScale schedules greedily, one request at a time, with a virtual allocation that
is deducted within the cycle:

1. requests (services that grow) are sorted by priority, highest first (ties: name);
2. each grows its existing deployment groups in place first (lowest subgroup class
   first), up to the group size (the room shared by the roles in proportion to need),
   a role only in groups where it runs on its first-ranked GPU type (``gpu_choice``:
   after a ranking change, the groups of the old type do not take the growth);
3. then opens new groups of up to the group size: GPU type pairs are tried preferred first,
   then the compatible ones (by the sum of the two roles' normalised weights), and for
   each pair the candidate domains are scored by subgroup priority (low before medium
   before high, then by name); the first domain where the whole group fits on nodes
   (first fit, node order) takes it. When no domain fits a full group, the group is
   halved until it fits or is down to one instance per role;
4. loose-affinity services (``affinity: cluster``) have no topology constraint in the
   paper's scheduler: each role takes the first nodes that fit anywhere, nodes ordered
   by their subgroup's priority, so such a group may span subgroups (its ``subgroup``
   is then ``None``);
5. a role that still grows alone (no new group can be opened without exceeding the
   other role's target) overflows the existing groups of its first-ranked type, as in
   the CP-SAT placer;
6. what even overflow cannot place (the existing groups' domains are full) opens an
   *anchored* group (``reconciler.placement.problem``): the growing role (up to the
   group size less the anchor, halved until it fits) plus ``ANCHOR_INSTANCES`` of the
   other role beyond its target, chosen like step 3 (preferred pair, least scarce
   domain); the rest of the role then overflows that group before another anchored
   group is opened. Only once the other role's target is met (it did not grow, or
   steps 2-5 placed all of its growth);
7. what the first-ranked type has no room for spills, beyond the group size, into the
   groups of the role's other allowed types.

Scale-in uses the shared rule (``reconciler.placement.problem.scale_in``). The greedy
scheduler never moves running instances (``allow_rebalance`` is ignored, and said so
in ``stats.notes``).
"""

from __future__ import annotations

import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from threading import Lock

import numpy as np

from reconciler.placement.base import PlacementRequest, PlacementResult, SolverStats
from reconciler.placement.explain import shortfalls_for
from reconciler.placement.problem import (
    ANCHOR_INSTANCES,
    PlacementProblem,
    ServiceNeed,
    WorkGroup,
    finalize,
    new_group_id,
    prepare,
    split_growth,
)
from reconciler.state import ROLES, Role
from reconciler.topology import CLASS_RANK, SchedulingDomain, Topology

_EMPTY = np.empty(0, dtype=np.int64)


def first_fit(free: np.ndarray, nodes: np.ndarray, size: int, count: int) -> dict[int, int]:
    """Up to ``count`` instances of ``size`` GPUs on ``nodes`` in order, filling each
    node before the next (does not mutate ``free``)."""
    if count <= 0 or nodes.size == 0:
        return {}
    cap = free[nodes] // size
    before = np.cumsum(cap) - cap
    take = np.minimum(np.maximum(count - before, 0), cap)
    hit = np.flatnonzero(take)
    return dict(zip(nodes[hit].tolist(), take[hit].tolist(), strict=True))


# Per topology (itself memoised per cluster spec), the node order loose-affinity groups
# fill: built once, not per placement (a simulation places hundreds of times a run,
# and the per-node Python loop cost milliseconds at thousands of nodes).
_LOOSE_NODES: weakref.WeakKeyDictionary[Topology, dict[str, np.ndarray]] = (
    weakref.WeakKeyDictionary()
)
_LOOSE_NODES_LOCK = Lock()


def loose_nodes(topology: Topology) -> dict[str, np.ndarray]:
    """Per GPU type, every node of that type by subgroup priority, then node order (the
    order loose-affinity roles take nodes in). Cached per topology; read-only."""
    with _LOOSE_NODES_LOCK:
        cached = _LOOSE_NODES.get(topology)
    if cached is not None:
        return cached
    # A node's class is its S1 switch's subgroup's: looked up once per switch in use.
    rank_of_s1 = np.zeros(len(topology.s1_switches), dtype=np.int64)
    for s1 in np.unique(topology.node_s1).tolist():
        subgroup = topology.subgroup_of_s1[topology.s1_switches[s1]]
        rank_of_s1[s1] = topology.subgroups[subgroup].class_rank
    class_of_node = rank_of_s1[np.asarray(topology.node_s1, dtype=np.int64)]
    out: dict[str, np.ndarray] = {}
    for code, gpu_type in enumerate(topology.gpu_types):
        nodes = np.nonzero(topology.node_type == code)[0]
        order = np.lexsort((nodes, class_of_node[nodes]))
        ordered = nodes[order].astype(np.int64)
        ordered.setflags(write=False)  # shared by every placement on this topology
        out[gpu_type] = ordered
    with _LOOSE_NODES_LOCK:
        return _LOOSE_NODES.setdefault(topology, out)


class GreedyPlacer:
    """The paper's greedy scheduler (see the module docstring)."""

    name = "greedy"

    def place(self, request: PlacementRequest) -> PlacementResult:
        problem = prepare(request)
        return _Greedy(problem).run()


class _Greedy:
    def __init__(self, problem: PlacementProblem):
        self.problem = problem
        self.topology = problem.topology
        self.initial_free = problem.free()
        self.free = self.initial_free.copy()
        self.takers: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.notes: list[str] = []
        if problem.request.options.allow_rebalance:
            self.notes.append("greedy never moves running instances; allow_rebalance ignored")
        self.loose_nodes = loose_nodes(self.topology)

    def run(self) -> PlacementResult:
        mark = time.perf_counter()
        for need in self.problem.services_by_priority():
            self._grow_service(need)
        mark = self.problem.lap("allocate", mark)
        shortfalls = shortfalls_for(
            self.problem, self.free, self.initial_free, {t: dict(s) for t, s in self.takers.items()}
        )
        self.problem.lap("explain", mark)
        stats = SolverStats(
            solver="greedy",
            status="heuristic",
            wall_s=time.perf_counter() - self.problem.started_s,
            phases_s=tuple(sorted(self.problem.timings_s.items())),
            notes=tuple(self.notes),
        )
        return finalize(self.problem, stats, shortfalls)

    # ------------------------------------------------------------------ steps
    def _commit(self, group: WorkGroup, role: Role, placement: dict[int, int], size: int) -> int:
        placed = 0
        for node, count in placement.items():
            self.free[node] -= count * size
            group.add(role, self.topology.nodes[node].name, count)
            placed += count
        self.takers[group.gpu_type[role]][group.service] += placed * size
        return placed

    def _grow_service(self, need: ServiceNeed) -> None:
        grow = {r: need.role(r).target - self.problem.placed(need.service, r) for r in ROLES}
        if all(g <= 0 for g in grow.values()):
            return
        groups = self.problem.groups.setdefault(need.service, [])
        growable = sorted(
            (g for g in groups if g.domain is not None), key=lambda g: (g.class_rank(), g.group_id)
        )

        def allowed(group: WorkGroup, role: Role) -> bool:
            return group.gpu_type[role] in need.role(role).allowed_types

        def first_ranked(group: WorkGroup, role: Role) -> bool:
            """On the role's first-ranked type (``problem.role_ranking``): where a role
            grows first, so that a ranking change (a price, ``gpu_choice``) moves new
            instances to the new first type instead of into groups of the old one."""
            types = need.role(role).allowed_types
            return bool(types) and group.gpu_type[role] == types[0]

        # 1. Existing groups in place, up to their size; the room is shared by the roles
        #    in proportion to what each still needs.
        for group in growable:
            want = {r: grow[r] if grow[r] > 0 and first_ranked(group, r) else 0 for r in ROLES}
            total = sum(want.values())
            room = need.room(group)
            if total == 0 or room == 0:
                continue
            take_p = min(want["prefill"], round(room * want["prefill"] / total))
            take_d = min(want["decode"], room - take_p)
            take_p = min(want["prefill"], room - take_d)
            for grp, role, count in split_growth(
                [group], need, {"prefill": take_p, "decode": take_d}
            ):
                grow[role] -= self._place_in(grp, role, count, need)
        # 2. New groups of up to the group size, split by what each role still needs.
        required = need.required_roles
        while required and all(grow[r] > 0 for r in required):
            sizes = self._group_sizes(need, grow)
            opened = self._open(need, sizes)
            while opened is None and any(s > 1 for s in sizes.values()):
                sizes = {r: max(1, s // 2) for r, s in sizes.items()}
                opened = self._open(need, sizes)
            if opened is None:
                break
            for r in required:
                grow[r] -= sizes[r]
        # 3. A role that still grows alone overflows the groups (old and just opened) on
        #    its first-ranked type.
        growable = sorted(
            (g for g in groups if g.domain is not None), key=lambda g: (g.class_rank(), g.group_id)
        )
        self._overflow(growable, grow, need, first_ranked)
        # 4. Still short with nowhere left to overflow, and the other role's target met
        #    (it did not grow, or all of its growth is placed): anchored groups.
        anchor = need.anchor_role(grow)
        if anchor is not None:
            self._grow_anchored(need, anchor, grow)
        # 5. What the first-ranked type had no room for spills into groups of the
        #    role's other allowed types.
        growable = sorted(
            (g for g in groups if g.domain is not None), key=lambda g: (g.class_rank(), g.group_id)
        )
        self._overflow(growable, grow, need, allowed)

    def _overflow(
        self,
        growable: list[WorkGroup],
        grow: dict[Role, int],
        need: ServiceNeed,
        takes: Callable[[WorkGroup, Role], bool],
    ) -> None:
        """Place what each role still needs (``grow``, updated) in ``growable`` groups
        beyond their size, in order, where ``takes(group, role)``."""
        for role in ROLES:
            for group in growable:
                if grow[role] <= 0:
                    break
                if takes(group, role):
                    grow[role] -= self._place_in(group, role, grow[role], need)

    def _grow_anchored(self, need: ServiceNeed, anchor: Role, grow: dict[Role, int]) -> None:
        """Open as few anchored groups as the short role needs (see step 6)."""
        short: Role = "decode" if anchor == "prefill" else "prefill"
        while grow[short] > 0:
            first = min(grow[short], max(1, need.group_size - ANCHOR_INSTANCES))
            sizes = {short: first, anchor: ANCHOR_INSTANCES}
            opened = self._open(need, sizes)
            while opened is None and sizes[short] > 1:
                sizes = {short: max(1, sizes[short] // 2), anchor: ANCHOR_INSTANCES}
                opened = self._open(need, sizes)
            if opened is None:
                return
            opened.anchor_role = anchor
            grow[short] -= sizes[short]
            if grow[short] > 0:
                grow[short] -= self._place_in(opened, short, grow[short], need)

    def _place_in(self, group: WorkGroup, role: Role, count: int, need: ServiceNeed) -> int:
        assert group.domain is not None
        size = need.role(role).gpus_per_instance
        nodes = self.topology.domain_nodes(group.domain, group.gpu_type[role])
        return self._commit(group, role, first_fit(self.free, nodes, size, count), size)

    @staticmethod
    def _group_sizes(need: ServiceNeed, grow: dict[Role, int]) -> dict[Role, int]:
        required = need.required_roles
        if len(required) == 1:
            return {required[0]: min(grow[required[0]], need.group_size)}
        total = grow["prefill"] + grow["decode"]
        size = min(need.group_size, total)
        prefill = min(grow["prefill"], max(1, min(size - 1, round(size * grow["prefill"] / total))))
        decode = min(grow["decode"], size - prefill)
        prefill = min(grow["prefill"], size - decode)
        return {"prefill": prefill, "decode": decode}

    def _pairs(self, need: ServiceNeed) -> list[tuple[str, str]]:
        def norm(role: Role, gpu_type: str) -> float:
            weights = need.role(role).weights
            return weights.get(gpu_type, 0.0) / max(weights.values())

        prefill = need.prefill.allowed_types or ("",)
        decode = need.decode.allowed_types or ("",)
        pairs = [(p, d) for p in prefill for d in decode]
        return sorted(pairs, key=lambda pd: (-(norm("prefill", pd[0]) + norm("decode", pd[1])), pd))

    def _open(self, need: ServiceNeed, sizes: dict[Role, int]) -> WorkGroup | None:
        """Open one group of ``sizes`` instances per role; None when none fits."""
        for tp, td in self._pairs(need):
            types: dict[Role, str] = {"prefill": tp, "decode": td}
            # Cheap rejection: not even the whole cluster has room for a role.
            if any(
                int(
                    (
                        self.free[self.loose_nodes.get(types[r], _EMPTY)]
                        // need.role(r).gpus_per_instance
                    ).sum()
                )
                < count
                for r, count in sizes.items()
            ):
                continue
            if need.affinity == "cluster":
                opened = self._try_loose(need, sizes, types)
                if opened is not None:
                    return opened
                continue
            candidates = [
                d
                for d in self.topology.domains(need.affinity)
                if all(types[r] in d.gpu_types for r in sizes)
            ]
            for domain in sorted(candidates, key=lambda d: (CLASS_RANK[d.subgroup_class], d.key)):
                opened = self._try_domain(need, sizes, types, domain)
                if opened is not None:
                    return opened
        return None

    def _fit(
        self, need: ServiceNeed, sizes: dict[Role, int], nodes_of: dict[Role, np.ndarray]
    ) -> dict[Role, dict[int, int]] | None:
        # Cheap rejection before copying: each role alone must fit.
        for role, count in sizes.items():
            size = need.role(role).gpus_per_instance
            if int((self.free[nodes_of[role]] // size).sum()) < count:
                return None
        scratch = self.free.copy() if len(sizes) > 1 else self.free
        plan: dict[Role, dict[int, int]] = {}
        for role, count in sizes.items():
            size = need.role(role).gpus_per_instance
            if int((scratch[nodes_of[role]] // size).sum()) < count:
                return None
            placement = first_fit(scratch, nodes_of[role], size, count)
            if sum(placement.values()) < count:
                return None
            if scratch is not self.free:
                for node, c in placement.items():
                    scratch[node] -= c * size
            plan[role] = placement
        return plan

    def _new_group(
        self, need: ServiceNeed, types: dict[Role, str], domain: SchedulingDomain
    ) -> WorkGroup:
        groups = self.problem.groups.setdefault(need.service, [])
        group = WorkGroup(
            service=need.service,
            cluster=self.problem.cluster,
            group_id=new_group_id(
                groups, domain.group_label, self.problem.reserved_ids(need.service)
            ),
            domain_name=domain.domain,
            subgroup=domain.subgroup,
            domain=domain,
            gpu_type={r: types[r] for r in ROLES},
            nodes={"prefill": {}, "decode": {}},
            is_new=True,
        )
        groups.append(group)
        return group

    def _try_domain(
        self,
        need: ServiceNeed,
        sizes: dict[Role, int],
        types: dict[Role, str],
        domain: SchedulingDomain,
    ) -> WorkGroup | None:
        nodes_of = {r: self.topology.domain_nodes(domain, types[r]) for r in sizes}
        plan = self._fit(need, sizes, nodes_of)
        if plan is None:
            return None
        group = self._new_group(need, types, domain)
        for role, placement in plan.items():
            self._commit(group, role, placement, need.role(role).gpus_per_instance)
        return group

    def _try_loose(
        self, need: ServiceNeed, sizes: dict[Role, int], types: dict[Role, str]
    ) -> WorkGroup | None:
        nodes_of = {r: self.loose_nodes.get(types[r], np.empty(0, dtype=np.int64)) for r in sizes}
        plan = self._fit(need, sizes, nodes_of)
        if plan is None:
            return None
        subgroups = {
            self.topology.subgroup_of_node(n) for placement in plan.values() for n in placement
        }
        domain = self.topology.cluster_domain
        if len(subgroups) == 1:
            only = subgroups.pop()
            domain = next(d for d in self.topology.domains("cluster") if d.subgroup == only)
        group = self._new_group(need, types, domain)
        for role, placement in plan.items():
            self._commit(group, role, placement, need.role(role).gpus_per_instance)
        return group


__all__ = ["GreedyPlacer", "first_fit", "loose_nodes"]

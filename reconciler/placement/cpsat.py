"""Topology-aware placement with OR-Tools CP-SAT.

Model (aggregated: integer counts, never one boolean per GPU)
-------------------------------------------------------------
For every service that grows, with ``S`` its group size (``prefill_instances +
decode_instances`` of its shape, see ``reconciler.placement.problem``):

- per *existing group class* (the service's groups with the same domain and GPU type
  pair): instances added in place per role, ``x_p + x_d <= room + o`` where ``room`` is
  what the class's groups lack to their size and ``o`` is overflow;
- per *candidate domain* ``d`` (``Topology.domains(affinity)``; for loose affinity also
  the whole cluster, at a price) and allowed GPU type pair ``(tp, td)`` present in
  ``d``: new groups ``g`` and their instances ``n_p``, ``n_d`` with ``n_r >= g`` (one
  instance per role and group) and ``n_p + n_d <= S*g + o`` with ``o <= M*g``. Splitting
  instances over the groups of a class is always possible under these bounds, so
  they are exact;
- ``sum of added instances <= target - running`` per role (targets are never exceeded,
  except by anchors, below);
- *anchored groups* (``reconciler.placement.problem``): for a growing role whose other role runs, per candidate domain and allowed type
  pair, anchored groups ``g_a``, the growing role's instances ``n >= g_a`` and anchor
  instances ``a = ANCHOR_INSTANCES * g_a`` of the other role, which count for capacity
  but *not* against the other role's target (they are its overshoot),
  ``n + a <= S*g_a + o``. When the other role grows too, a boolean ``met`` gates them:
  ``g_a <= U*met`` and ``met => (other role's placed == its growth)``, so an anchor
  never stands in for a missing instance of its own role. To keep the model small,
  these classes exist only when the other role does not grow (without rebalancing)
  or when the greedy layout (computed first) needed anchors for that service and
  role, so the greedy layout is always a solution of the model.

Capacity is written on the laminar region tree (``Topology.regions``): per region and
GPU type, GPUs added by every domain inside it <= GPUs free in it. On a tree this is
exact for GPU counts. Node granularity is approximated by valid slot inequalities (per
instance size k: instances of size >= k <= sum over nodes of floor(free / k)) and made
exact by the second step, ``reconciler.placement.packing`` (best fit, verified, with an
exact CP-SAT re-pack per RDMA subgroup when best fit fails).

Objective (minimise; lexicographic in this order)
-------------------------------------------------
=====  ===================================================  ===========================
level  term                                                 weight
=====  ===================================================  ===========================
1      GPUs short of target                                 5,000 x (priority rank + 1)
                                                            per GPU (rank: 0 = lowest
                                                            priority present)
1b     an anchor instance (overshoot of the other role's    1 per instance in phase 1,
       target to open an anchored group)                    4,000 per GPU in phase 2
2      a loose group spanning subgroups (KV off RDMA)       2,500 per GPU
2      subgroup class above what the GPU type pair needs    1,000 per GPU per class step
       (one type: low; two types under an S2 or subgroup:
       medium; two types under one S1: high)
2b     a group beyond its size (overflow; when a role      300 per instance
       grows alone, before any anchored group)
3      GPU type preference                                  0..99 per GPU: 99 x (1 -
                                                            weight / best weight)
4      a new group (so existing groups grow in place first) 30 per group
4      GPUs beyond what partly used nodes offer (breaking   2 per GPU per region level
       whole nodes)
=====  ===================================================  ===========================

Level 1 is strictly first: it is solved on its own (phase 1), and phase 2 then
optimises the weighted sum of all levels while every (service, role) keeps at least
the instances phase 1 placed. Level 1b rides in phase 1 at 1 per anchor instance:
below every GPU short (>= 5,000; the total of anchors is capped below that, a cap no
real cycle reaches), so an anchor is opened only where it places instances that
would otherwise be short, and phase 1 uses as few anchors as that needs; phase 2
holds the anchor count at phase 1's value or below and charges an anchor GPU 4,000
(above every level-2 cost of a GPU) in the reported objective. So anchors come after
placing in the existing groups' domains (in place or by overflow) and, when both
roles grow, after full-shaped new groups; they never replace a placement without. (A single weighted objective let the solver trade one
unmet instance for many GPUs of scarce-subgroup savings; measured on the benchmark it
also reached worse layouts within the time limit.) Inside level 1, priorities weigh
per GPU: a GPU of a higher-priority service outweighs a GPU of the next lower one,
but not nine (exact priority order would need exponential weights); priorities enter
as dense ranks so the coefficients stay small (large coefficients slow the LP down).
Below level 1 the weights make every level outweigh all lower ones together per GPU
(1,000 > 99 + 300 + 30 + 8), not across very different amounts.

Level 2 keeps the scarce subgroups for the heterogeneous P/D services that need them:
a homogeneous group in a medium/high subgroup, or a two-type S2 group in a high one,
pays for it; a heterogeneous group in the class it needs does not, so the GPU type
preference (level 3) can pick the heterogeneous pairing. Growing an existing group in
a scarce subgroup pays level 2 like a new group there, so a new group is opened
elsewhere when that saves scarce resources.

Level 5 (scale-in) is the shared rule ``reconciler.placement.problem.scale_in``:
scarcest class first, then least preferred type, then most fragmenting place.
With ``allow_rebalance`` the model also decides how many running instances of each
group class to keep (``keep``): kept GPUs pay levels 2 and 3 plus 200 per GPU per class
rank (free scarce resources first); every GPU not kept pays 500 (a move; the scale-in
amount is a constant offset), so instances move only to meet targets or to leave a
subgroup class they do not need. GPUs freed that way are reused in the same cycle (the
caller accepts that its rollout must delete before it creates for those).

Search
------
The paper's greedy scheduler runs first and its layout is given to CP-SAT as a
complete solution hint, so the answer is never worse than the baseline in the
objective, and the greedy layout is the fallback if CP-SAT finds nothing in time
(status ``UNKNOWN+greedy``). Presolve runs without probing and symmetry detection
(2-3x faster to a proven optimum on the benchmark). Determinism:
``PlacementOptions.deterministic`` (default) runs one search thread stopped by a
deterministic-time budget (``time_limit_s`` x ``DETERMINISTIC_UNITS_PER_S``, up to 70%
for phase 1, the rest for phase 2; the node packing fallback likewise): the same input
gives the same layout on any machine and at any load, so ``plan`` and ``apply``
agree. (CP-SAT's parallel portfolio exchanges solutions in timing-dependent order,
and its interleaved deterministic mode always spends its whole budget.) The wall
clock (3 x the limit) is only a runaway guard; a run stopped by it says so in
``stats.notes``. With ``deterministic=False``, ``workers`` threads search until
``time_limit_s``. The result carries the combined objective, its bound and the gap.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from reconciler.placement.base import PlacementRequest, PlacementResult, SolverStats
from reconciler.placement.explain import shortfalls_for
from reconciler.placement.packing import PackItem, component_of, pack
from reconciler.placement.problem import (
    ANCHOR_INSTANCES,
    PlacementProblem,
    ServiceNeed,
    WorkGroup,
    finalize,
    needed_class_rank,
    new_group_id,
    prepare,
    scale_in,
    split_growth,
    split_new_groups,
)
from reconciler.state import ROLES, Role
from reconciler.topology import CLASS_RANK, SchedulingDomain, Topology

W_SHORT_PER_RANK = 5_000
W_WASTE = 1_000
W_OPEN_GROUP = 30
W_FRAGMENT = 2
W_SPAN = 2_500
W_OVERFLOW = 300
W_MOVE = 500
W_KEEP_CLASS = 200
W_ANCHOR = 4_000  # per anchor GPU, phase 2 (phase 1: W_ANCHOR_PHASE1 per instance)
W_ANCHOR_PHASE1 = 1

# Deterministic-time budget of the solver per second of PlacementOptions.time_limit_s.
# One CP-SAT thread gets through 0.13-0.2 units per CPU second on this model on the
# 2-core reference machine; 0.1 leaves about a quarter of the limit for preparation,
# the greedy hint and node packing (benchmarks/bench_placement.py prints the split).
DETERMINISTIC_UNITS_PER_S = 0.1


@dataclass
class _Term:
    """One integer variable that uses GPUs of one type inside one region."""

    region: int
    type_code: int
    size: int
    var: cp_model.IntVar
    upper: int
    slot_counted: bool = True  # False: kept instances (rebalance) in GPU constraints only


@dataclass
class _ExistingClass:
    service: str
    domain: SchedulingDomain | None
    types: dict[Role, str]
    groups: list[WorkGroup]
    grow: dict[Role, cp_model.IntVar | None] = field(default_factory=dict)
    keep: dict[Role, cp_model.IntVar | None] = field(default_factory=dict)
    overflow: cp_model.IntVar | None = None
    room: int = 0


@dataclass
class _NewClass:
    service: str
    domain: SchedulingDomain
    types: dict[Role, str]
    groups: cp_model.IntVar
    instances: dict[Role, cp_model.IntVar | None]
    overflow: cp_model.IntVar | None = None
    # Anchored groups: the anchor role and its instances (beyond its target).
    anchor_role: Role | None = None
    anchors: cp_model.IntVar | None = None


class _RegionStats:
    """Free GPUs, free GPUs on partly used nodes, and slots per (region, type, size)."""

    def __init__(self, topology: Topology, free: np.ndarray, used: np.ndarray):
        self.topology = topology
        self.free = free
        self.partial = np.where(used > 0, free, 0)
        self._cache: dict[tuple[int, int, int], int] = {}

    def _nodes(self, region: int, type_code: int) -> np.ndarray:
        return self.topology.nodes_by_region_type.get(
            (region, type_code), np.empty(0, dtype=np.int64)
        )

    def free_gpus(self, region: int, type_code: int) -> int:
        return self.slots(region, type_code, 1)

    def partial_gpus(self, region: int, type_code: int) -> int:
        key = (region, type_code, -1)
        if key not in self._cache:
            self._cache[key] = int(self.partial[self._nodes(region, type_code)].sum())
        return self._cache[key]

    def slots(self, region: int, type_code: int, size: int) -> int:
        key = (region, type_code, size)
        if key not in self._cache:
            self._cache[key] = int((self.free[self._nodes(region, type_code)] // size).sum())
        return self._cache[key]


class CpSatPlacer:
    """Aggregated CP-SAT placement plus exact node packing (see the module docstring)."""

    name = "cp-sat"

    def place(self, request: PlacementRequest) -> PlacementResult:
        options = request.options
        rebalance = options.allow_rebalance
        problem = prepare(request, apply_scale_in=not rebalance)
        return _Solve(problem, rebalance).run()


class _Solve:
    def __init__(self, problem: PlacementProblem, rebalance: bool):
        self.problem = problem
        self.topology = problem.topology
        self.options = problem.request.options
        self.rebalance = rebalance
        self.initial_free = problem.free()
        self.stats_region = _RegionStats(self.topology, self.initial_free, problem.used)
        self.model = cp_model.CpModel()
        self.terms: list[_Term] = []
        self.existing: list[_ExistingClass] = []
        self.new: list[_NewClass] = []
        # Level 1 (GPUs short of target) is optimised first, the rest under it.
        self.short_terms: list[tuple[int, cp_model.IntVar]] = []
        self.short_offset = 0
        self.placed_vars: list[list[cp_model.IntVar]] = []  # per (service, role)
        self.objective_terms: list[tuple[int, cp_model.IntVar]] = []
        self.objective_offset = 0
        self.notes: list[str] = []
        self._freed_capacity: dict[tuple[int, int], int] = {}
        self.fragment_vars: list[tuple[cp_model.IntVar, list[_Term], int]] = []
        self.anchor_vars: list[tuple[cp_model.IntVar, int]] = []  # (instances, upper)
        self.anchor_gates: list[tuple[str, Role, cp_model.IntVar]] = []  # (service, role, met)
        self.greedy_anchored: set[tuple[str, Role]] = set()
        # Dense rank of each priority (0 = lowest present): keeps the weights small.
        priorities = sorted({n.priority for n in problem.needs.values()})
        self.priority_rank = {p: i for i, p in enumerate(priorities)}

    # ------------------------------------------------------------------ build
    def run(self) -> PlacementResult:
        mark = time.perf_counter()
        from reconciler.placement.greedy import GreedyPlacer

        # The greedy layout first: the hint, the fallback, and which services needed
        # anchors where this model offers none by default (see _add_service).
        greedy: PlacementResult | None = GreedyPlacer().place(self.problem.request)
        assert greedy is not None
        self.greedy_anchored = {(a.service, a.role) for a in greedy.anchors}
        mark = self.problem.lap("greedy_hint", mark)
        for need in self.problem.services_by_priority():
            self._add_service(need)
        self._add_capacity()
        mark = self.problem.lap("build_model", mark)
        baseline = greedy if self.short_terms or self.objective_terms else None
        if baseline is not None:
            self._hint_from_greedy(baseline)
        mark = self.problem.lap("greedy_hint", mark)
        status, objective, bound, solver = self._solve()
        mark = self.problem.lap("solve", mark)
        if solver is None and baseline is not None and status not in ("OPTIMAL",):
            # No CP-SAT solution in time: the greedy layout is a valid answer.
            assert baseline.stats is not None
            anchor_notes = tuple(n for n in baseline.stats.notes if n.startswith("anchored group"))
            notes = (
                *self.notes,
                f"cp-sat returned {status}; using the greedy layout",
                *anchor_notes,
            )
            stats = SolverStats(
                solver="cp-sat",
                status=f"{status}+greedy",
                wall_s=time.perf_counter() - self.problem.started_s,
                phases_s=tuple(sorted(self.problem.timings_s.items())),
                notes=notes,
            )
            return PlacementResult(
                baseline.cluster, baseline.groups, baseline.shortfalls, stats, baseline.anchors
            )
        takers, hints, free_after = self._realise(solver)
        mark = self.problem.lap("pack", mark)
        shortfalls = shortfalls_for(self.problem, free_after, self.initial_free, takers, hints)
        self.problem.lap("explain", mark)
        stats = SolverStats(
            solver="cp-sat",
            status=status,
            wall_s=time.perf_counter() - self.problem.started_s,
            objective=objective,
            best_bound=bound,
            phases_s=tuple(sorted(self.problem.timings_s.items())),
            notes=tuple(self.notes),
        )
        return finalize(self.problem, stats, shortfalls)

    def _domain_cost(
        self, need: ServiceNeed, domain: SchedulingDomain | None, tp: str, td: str
    ) -> int:
        """Per-GPU cost of placing a group of this type pair in this domain: a group
        spanning subgroups pays W_SPAN; otherwise W_WASTE per class step above need."""
        if domain is not None and self._spans(domain):
            return W_SPAN
        rank = domain.class_rank if domain is not None else CLASS_RANK["high"]
        return W_WASTE * max(0, rank - needed_class_rank(tp, td, need.affinity))

    def _spans(self, domain: SchedulingDomain) -> bool:
        return domain.subgroup is None and len(self.topology.subgroups) > 1

    def _add_service(self, need: ServiceNeed) -> None:
        topo = self.topology
        m = self.model
        placed: dict[Role, list[cp_model.IntVar]] = {r: [] for r in ROLES}
        if self.rebalance:
            grow = {r: need.role(r).target for r in ROLES}
        else:
            grow = {
                r: max(0, need.role(r).target - self.problem.placed(need.service, r)) for r in ROLES
            }
        if not any(grow.values()) and not self.rebalance:
            return
        weight_short = W_SHORT_PER_RANK * (self.priority_rank[need.priority] + 1)

        # Existing groups, by class (domain, type pair).
        classes: dict[tuple[str, str, str], _ExistingClass] = {}
        for group in self.problem.groups.get(need.service, ()):
            key = (
                group.domain.key if group.domain else f"?{group.group_id}",
                group.gpu_type["prefill"],
                group.gpu_type["decode"],
            )
            if key not in classes:
                classes[key] = _ExistingClass(need.service, group.domain, dict(group.gpu_type), [])
            classes[key].groups.append(group)
        for cls in classes.values():
            place_cost = self._domain_cost(
                need, cls.domain, cls.types["prefill"], cls.types["decode"]
            )
            region = cls.domain.region if cls.domain is not None else 0
            growth: list[cp_model.IntVar] = []
            growth_upper = 0
            for role in ROLES:
                rn = need.role(role)
                gpu_type = cls.types[role]
                code = topo.type_code(gpu_type)
                per_instance = rn.gpus_per_instance * (place_cost + rn.preference_cost(gpu_type))
                current = sum(g.count(role) for g in cls.groups)
                if self.rebalance and current:
                    keep = m.new_int_var(0, current, "")
                    cls.keep[role] = keep
                    placed[role].append(keep)
                    rank = cls.domain.class_rank if cls.domain else CLASS_RANK["high"]
                    keep_cost = per_instance + rn.gpus_per_instance * W_KEEP_CLASS * rank
                    # Not keeping an instance costs a move: offset + (-W_MOVE) per kept GPU.
                    self.objective_terms.append((keep_cost - rn.gpus_per_instance * W_MOVE, keep))
                    self.objective_offset += rn.gpus_per_instance * W_MOVE * current
                    if code >= 0:
                        self.terms.append(
                            _Term(
                                region,
                                code,
                                rn.gpus_per_instance,
                                keep,
                                current,
                                slot_counted=False,
                            )
                        )
                        self._freed_capacity[(region, code)] = (
                            self._freed_capacity.get((region, code), 0)
                            + rn.gpus_per_instance * current
                        )
                # A role that shrinks under rebalancing only loses instances in the
                # running groups (running instances never grow in place then).
                shrinking = self.rebalance and rn.target < self.problem.placed(need.service, role)
                can_grow = (
                    cls.domain is not None
                    and code >= 0
                    and gpu_type in rn.allowed_types
                    and grow[role] > 0
                    and not shrinking
                )
                if not can_grow:
                    continue
                upper = min(grow[role], self.stats_region.slots(region, code, rn.gpus_per_instance))
                if upper <= 0:
                    continue
                x = m.new_int_var(0, upper, "")
                cls.grow[role] = x
                growth.append(x)
                growth_upper += upper
                placed[role].append(x)
                self.terms.append(_Term(region, code, rn.gpus_per_instance, x, upper))
                self.objective_terms.append((per_instance, x))
            if growth:
                room = sum(need.room(g) for g in cls.groups)
                cls.room = room
                if growth_upper > room:
                    overflow = m.new_int_var(0, growth_upper - room, "")
                    cls.overflow = overflow
                    m.add(sum(growth) <= room + overflow)
                    self.objective_terms.append((W_OVERFLOW, overflow))
            self.existing.append(cls)

        # New groups.
        required = need.required_roles
        if self.rebalance:
            may_open = bool(required) and all(need.role(r).target > 0 for r in required)
        else:
            may_open = bool(required) and all(grow[r] > 0 for r in required)
        if may_open:
            self._add_new_groups(need, grow, placed)
        gates: list[tuple[Role, cp_model.IntVar]] = []
        # Anchored classes where they can matter, keeping the model small: the other
        # role does not grow (the common case), or the greedy layout needed anchors
        # (e.g. the other role's growth fits in place; with allow_rebalance ``grow`` is
        # the whole target) -- so the greedy layout is always representable.
        for short in ROLES:
            anchor: Role = "decode" if short == "prefill" else "prefill"
            if grow[short] <= 0 or anchor not in need.required_roles:
                continue
            if (not self.rebalance and grow[anchor] == 0) or (
                need.service,
                anchor,
            ) in self.greedy_anchored:
                gate = self._add_anchored_groups(need, grow, placed, anchor)
                if gate is not None:
                    gates.append((anchor, gate))
        for anchor, gate in gates:
            # Anchors only once the anchor role's own growth is all placed.
            m.add(sum(placed[anchor]) >= grow[anchor]).only_enforce_if(gate)

        for role in ROLES:
            rn = need.role(role)
            if placed[role]:
                m.add(sum(placed[role]) <= grow[role])
            unit = weight_short * rn.gpus_per_instance
            self.short_offset += unit * grow[role]
            for var in placed[role]:
                self.short_terms.append((-unit, var))
            if placed[role]:
                self.placed_vars.append(placed[role])

    def _add_new_groups(
        self, need: ServiceNeed, grow: dict[Role, int], placed: dict[Role, list[cp_model.IntVar]]
    ) -> None:
        topo = self.topology
        m = self.model
        required = need.required_roles
        size = need.group_size
        max_groups = min(grow[r] for r in required)
        domains = list(topo.domains(need.affinity))
        if need.affinity == "cluster" and self._spans(topo.cluster_domain):
            # Loose affinity may span subgroups, at a price (W_SPAN), to meet targets.
            domains.append(topo.cluster_domain)
        for domain in domains:
            region = domain.region
            options = {
                r: [t for t in need.role(r).allowed_types if t in domain.gpu_types]
                for r in required
            }
            if any(not options[r] for r in required):
                continue
            pairs = [
                {"prefill": tp, "decode": td}
                for tp in options.get(
                    "prefill", [need.prefill.allowed_types[0] if need.prefill.allowed_types else ""]
                )
                for td in options.get(
                    "decode", [need.decode.allowed_types[0] if need.decode.allowed_types else ""]
                )
            ]
            for pair in pairs:
                bounds = {
                    r: self.stats_region.slots(
                        region, topo.type_code(pair[r]), need.role(r).gpus_per_instance
                    )
                    for r in required
                }
                if len(required) == 2 and pair["prefill"] == pair["decode"]:
                    joint = self.stats_region.free_gpus(region, topo.type_code(pair["prefill"]))
                    if joint < need.prefill.gpus_per_instance + need.decode.gpus_per_instance:
                        continue
                upper_groups = min([max_groups, *bounds.values()])
                if upper_groups <= 0:
                    continue
                g = m.new_int_var(0, upper_groups, "")
                self.objective_terms.append((W_OPEN_GROUP, g))
                place_cost = self._domain_cost(need, domain, pair["prefill"], pair["decode"])
                instances: dict[Role, cp_model.IntVar | None] = {r: None for r in ROLES}
                for r in required:
                    rn = need.role(r)
                    upper = min(grow[r], bounds[r])
                    n = m.new_int_var(0, upper, "")
                    m.add(n >= g)
                    instances[r] = n
                    placed[r].append(n)
                    self.terms.append(
                        _Term(region, topo.type_code(pair[r]), rn.gpus_per_instance, n, upper)
                    )
                    cost = rn.gpus_per_instance * (place_cost + rn.preference_cost(pair[r]))
                    self.objective_terms.append((cost, n))
                # At most the group size per group; beyond it only by overflow (a role
                # that grows alone once the other role's need is met).
                most = sum(grow[r] for r in required)
                overflow = m.new_int_var(0, most, "")
                m.add(overflow <= most * g)  # no group, no overflow
                m.add(sum(v for v in instances.values() if v is not None) <= size * g + overflow)
                self.objective_terms.append((W_OVERFLOW, overflow))
                self.new.append(_NewClass(need.service, domain, dict(pair), g, instances, overflow))  # type: ignore[arg-type]

    def _add_anchored_groups(
        self,
        need: ServiceNeed,
        grow: dict[Role, int],
        placed: dict[Role, list[cp_model.IntVar]],
        anchor: Role,
    ) -> cp_model.IntVar | None:
        """Anchored groups for ``anchor``'s other role (see the module docstring).
        Returns the gate (``met``) when ``anchor`` grows too and anchored classes exist."""
        topo = self.topology
        m = self.model
        short: Role = "decode" if anchor == "prefill" else "prefill"
        rs, ra = need.role(short), need.role(anchor)
        gate: cp_model.IntVar | None = None
        domains = list(topo.domains(need.affinity))
        if need.affinity == "cluster" and self._spans(topo.cluster_domain):
            domains.append(topo.cluster_domain)
        for domain in domains:
            region = domain.region
            for ts in (t for t in rs.allowed_types if t in domain.gpu_types):
                for ta in (t for t in ra.allowed_types if t in domain.gpu_types):
                    code_s, code_a = topo.type_code(ts), topo.type_code(ta)
                    short_slots = self.stats_region.slots(region, code_s, rs.gpus_per_instance)
                    anchor_slots = self.stats_region.slots(region, code_a, ra.gpus_per_instance)
                    if ts == ta:
                        joint = self.stats_region.free_gpus(region, code_s)
                        if joint < rs.gpus_per_instance + ANCHOR_INSTANCES * ra.gpus_per_instance:
                            continue
                    upper_groups = min(grow[short], short_slots, anchor_slots // ANCHOR_INSTANCES)
                    if upper_groups <= 0:
                        continue
                    pair: dict[Role, str] = {short: ts, anchor: ta}
                    place_cost = self._domain_cost(need, domain, pair["prefill"], pair["decode"])
                    g = m.new_int_var(0, upper_groups, "")
                    if grow[anchor] > 0:
                        if gate is None:
                            gate = m.new_bool_var("")
                            self.anchor_gates.append((need.service, anchor, gate))
                        m.add(g <= upper_groups * gate)
                    self.objective_terms.append((W_OPEN_GROUP, g))
                    upper_n = min(grow[short], short_slots)
                    n = m.new_int_var(0, upper_n, "")
                    m.add(n >= g)
                    placed[short].append(n)
                    self.terms.append(_Term(region, code_s, rs.gpus_per_instance, n, upper_n))
                    self.objective_terms.append(
                        (rs.gpus_per_instance * (place_cost + rs.preference_cost(ts)), n)
                    )
                    upper_a = ANCHOR_INSTANCES * upper_groups
                    a = m.new_int_var(0, upper_a, "")
                    m.add(a == ANCHOR_INSTANCES * g)
                    self.terms.append(_Term(region, code_a, ra.gpus_per_instance, a, upper_a))
                    self.objective_terms.append(
                        (ra.gpus_per_instance * (place_cost + ra.preference_cost(ta) + W_ANCHOR), a)
                    )
                    self.anchor_vars.append((a, upper_a))
                    # The growing role beyond the group size overflows (no group, none).
                    overflow = m.new_int_var(0, upper_n, "")
                    m.add(overflow <= upper_n * g)
                    m.add(n + a <= need.group_size * g + overflow)
                    self.objective_terms.append((W_OVERFLOW, overflow))
                    instances: dict[Role, cp_model.IntVar | None] = {short: n, anchor: None}
                    self.new.append(
                        _NewClass(need.service, domain, pair, g, instances, overflow, anchor, a)
                    )
        return gate

    def _add_capacity(self) -> None:
        topo = self.topology
        m = self.model
        by_region: dict[tuple[int, int], list[_Term]] = defaultdict(list)
        for term in self.terms:
            for ancestor in topo.region_ancestors(term.region):
                by_region[(ancestor, term.type_code)].append(term)
        freed_in: dict[tuple[int, int], int] = defaultdict(int)
        for (region, code), gpus in self._freed_capacity.items():
            for ancestor in topo.region_ancestors(region):
                freed_in[(ancestor, code)] += gpus
        term_regions = {(t.region, t.type_code) for t in self.terms if t.slot_counted}
        for (region, code), terms in sorted(by_region.items()):
            free = self.stats_region.free_gpus(region, code) + freed_in.get((region, code), 0)
            upper = sum(t.size * t.upper for t in terms)
            if upper > free:
                m.add(sum(t.size * t.var for t in terms) <= free)
            slot_terms = [t for t in terms if t.slot_counted]
            for size in sorted({t.size for t in slot_terms if t.size > 1}):
                big = [t for t in slot_terms if t.size >= size]
                cap = self.stats_region.slots(region, code, size)
                if sum(t.upper for t in big) > cap:
                    m.add(sum(t.var for t in big) <= cap)
            if (region, code) in term_regions:
                # GPUs added beyond what partly used nodes offer break whole nodes.
                partial = self.stats_region.partial_gpus(region, code)
                bound = sum(t.size * t.upper for t in slot_terms)
                if bound > partial:
                    over = m.new_int_var(0, bound - partial, "")
                    self.fragment_vars.append((over, slot_terms, partial))
                    m.add(over >= sum(t.size * t.var for t in slot_terms) - partial)
                    self.objective_terms.append((W_FRAGMENT, over))

    # ------------------------------------------------------------------ solve
    def _solve(self) -> tuple[str, float | None, float | None, cp_model.CpSolver | None]:
        """Lexicographic in two solves: first the GPUs short of target (level 1), then,
        with level 1 held at the value found, everything else. Returns the status,
        the combined objective and bound, and the solver holding the final solution."""
        m = self.model
        if not self.short_terms and not self.objective_terms:
            total = float(self.short_offset + self.objective_offset)
            return "OPTIMAL", total, total, None

        def expr(terms: list[tuple[int, cp_model.IntVar]], offset: int) -> cp_model.LinearExprT:
            return (
                cp_model.LinearExpr.weighted_sum([v for _c, v in terms], [c for c, _v in terms])
                + offset
            )

        shortfall = expr(self.short_terms, self.short_offset)
        budget = self.options.time_limit_s * DETERMINISTIC_UNITS_PER_S
        anchors = [a for a, _upper in self.anchor_vars]
        anchor_upper = sum(upper for _a, upper in self.anchor_vars)
        if anchor_upper >= W_SHORT_PER_RANK:
            # Keeps level 1b below one GPU short (never reached by a real cycle).
            m.add(cp_model.LinearExpr.sum(anchors) <= W_SHORT_PER_RANK - 1)
            anchor_upper = W_SHORT_PER_RANK - 1

        # Phase 1: meet the targets (priority-weighted), from the greedy hint, with as
        # few anchors as that takes (level 1b, 1 per anchor instance).
        anchor_sum = cp_model.LinearExpr.sum(anchors)
        m.minimize(
            expr(self.short_terms + [(W_ANCHOR_PHASE1, a) for a in anchors], self.short_offset)
        )
        first, first_status = self._run(0.7 * budget, 0.7)
        if first_status not in ("OPTIMAL", "FEASIBLE"):
            return first_status, None, None, None
        short_value = round(first.value(shortfall))
        # A bound on level 1 alone: the phase bound less what anchors can add to it.
        short_bound = max(0.0, first.best_objective_bound - W_ANCHOR_PHASE1 * anchor_upper)
        if anchors:
            m.add(anchor_sum <= sum(first.value(a) for a in anchors))
        # Phase 2: hold level 1 -- every service keeps at least the instances phase 1
        # placed (simple bounds; one dense weighted constraint slows the LP down) --
        # and optimise everything, from phase 1's solution.
        for variables in self.placed_vars:
            m.add(sum(variables) >= sum(first.value(v) for v in variables))
        hint = [
            first.value(m.get_int_var_from_proto_index(i)) for i in range(len(m.proto.variables))
        ]
        m.clear_hints()
        for index, value in enumerate(hint):
            m.add_hint(m.get_int_var_from_proto_index(index), value)
        m.minimize(
            expr(self.short_terms + self.objective_terms, self.short_offset + self.objective_offset)
        )
        second, second_status = self._run(max(0.3 * budget, budget - first.deterministic_time), 1.0)
        phases = f"targets {first_status}, layout {second_status}"
        if second_status not in ("OPTIMAL", "FEASIBLE"):
            # Phase 1's solution stands; its full objective is level 1 plus the rest
            # evaluated on it, and level 1's bound bounds it (the rest is >= 0).
            self.notes.append(f"cp-sat phases: {phases}; layout from the targets phase")
            rest = expr(self.objective_terms, self.objective_offset)
            return (
                "FEASIBLE",
                float(short_value + first.value(rest)),
                max(0.0, float(short_bound)),  # every level is >= 0
                first,
            )
        both_optimal = first_status == "OPTIMAL" and second_status == "OPTIMAL"
        if not both_optimal:
            self.notes.append(f"cp-sat phases: {phases}")
        # The combined objective is comparable across phases; its bound is the weaker of
        # phase 1's bound on level 1 plus the rest, and phase 2's bound.
        rest_bound = second.best_objective_bound - short_value
        return (
            "OPTIMAL" if both_optimal else "FEASIBLE",
            float(second.objective_value),
            max(0.0, float(min(second.best_objective_bound, short_bound + max(0.0, rest_bound)))),
            second,
        )

    def _run(
        self, deterministic_time: float, share_of_remaining: float
    ) -> tuple[cp_model.CpSolver, str]:
        solver = cp_model.CpSolver()
        params = solver.parameters
        params.random_seed = self.options.seed
        params.num_workers = max(1, self.options.workers)
        # Light presolve: probing and symmetry detection cost more than they return on
        # this model (measured: 2-3x faster to a proven optimum on the benchmark).
        params.cp_model_probing_level = 0
        params.symmetry_level = 0
        if self.options.deterministic:
            # One search thread stopped by deterministic time only: the same input gives
            # the same answer on any machine and at any load (parallel threads exchange
            # solutions in timing-dependent order). The wall clock is a runaway guard.
            params.num_workers = 1
            params.max_deterministic_time = deterministic_time
            params.max_time_in_seconds = self._wall_guard_s()
        else:
            elapsed = time.perf_counter() - self.problem.started_s
            params.max_time_in_seconds = max(
                0.05, (self.options.time_limit_s - elapsed) * share_of_remaining
            )
        status = solver.solve(self.model)
        guard_hit = (
            status != cp_model.OPTIMAL and solver.wall_time >= params.max_time_in_seconds * 0.99
        )
        if guard_hit and self.options.deterministic:
            self.notes.append(
                "cp-sat stopped on the wall-clock guard: result may vary between runs"
            )
        return solver, solver.status_name(status)

    def _wall_guard_s(self) -> float:
        """Wall-clock limit of a deterministic solve: only a guard against runaway."""
        return max(3.0 * self.options.time_limit_s, self.options.time_limit_s + 2.0)

    def _hint_from_greedy(self, baseline: PlacementResult) -> None:
        """Give the greedy scheduler's layout on the same request to CP-SAT as a
        solution hint (a feasible start; the result is never worse than it in the
        model's objective)."""
        before = {(g.service, g.group_id): g for gs in self.problem.groups.values() for g in gs}
        grown: dict[tuple[str, str, str, str, Role], int] = defaultdict(int)
        # New groups by (service, domain, type pair, anchor role or None).
        opened: dict[tuple[str, str, str, str, Role | None], int] = defaultdict(int)
        opened_n: dict[tuple[str, str, str, str, Role | None, Role], int] = defaultdict(int)
        anchored_by = {(a.service, a.group_id): a.role for a in baseline.anchors}
        kept: dict[tuple[str, str, str, str, Role], int] = defaultdict(int)
        for group in baseline.groups:
            old = before.get((group.service, group.group_id))
            if old is not None:
                if old.domain is None:
                    continue
                key = (
                    group.service,
                    old.domain.key,
                    old.gpu_type["prefill"],
                    old.gpu_type["decode"],
                )
                for r in ROLES:
                    kept[(*key, r)] += min(group.role(r).instances, old.count(r))
                    grown[(*key, r)] += max(0, group.role(r).instances - old.count(r))
                continue
            domain = self.topology.domain_of_group(group)
            if domain is None:
                continue
            new_key = (
                group.service,
                domain.key,
                group.prefill.gpu_type,
                group.decode.gpu_type,
                anchored_by.get((group.service, group.group_id)),
            )
            opened[new_key] += 1
            for r in ROLES:
                opened_n[(*new_key, r)] += group.role(r).instances
        hint: dict[int, int] = {}
        for cls in self.existing:
            if cls.domain is None:
                continue
            key = (cls.service, cls.domain.key, cls.types["prefill"], cls.types["decode"])
            total = 0
            for r in ROLES:
                var = cls.grow.get(r)
                if var is not None:
                    value = grown.get((*key, r), 0)
                    hint[var.index] = value
                    total += value
                keep = cls.keep.get(r)
                if keep is not None:
                    hint[keep.index] = kept.get((*key, r), 0)
            if cls.overflow is not None:
                hint[cls.overflow.index] = max(0, total - cls.room)
        for new in self.new:
            new_key = (
                new.service,
                new.domain.key,
                new.types["prefill"],
                new.types["decode"],
                new.anchor_role,
            )
            count = opened.get(new_key, 0)
            hint[new.groups.index] = count
            total = 0
            for r, var in new.instances.items():
                if var is not None:
                    hint[var.index] = opened_n.get((*new_key, r), 0)
                    total += opened_n.get((*new_key, r), 0)
            if new.anchors is not None:
                hint[new.anchors.index] = ANCHOR_INSTANCES * count
                total += ANCHOR_INSTANCES * count
            if new.overflow is not None:
                hint[new.overflow.index] = max(
                    0, total - count * self.problem.needs[new.service].group_size
                )
        for service, role, gate in self.anchor_gates:
            met = baseline.placed(service, role) - baseline.overshoot(service, role)
            hint[gate.index] = int(met >= self.problem.needs[service].role(role).target)
        # Complete the hint (CP-SAT uses a complete, feasible hint as its first solution).
        for over, terms, partial in self.fragment_vars:
            hint[over.index] = max(
                0, sum(t.size * hint.get(t.var.index, 0) for t in terms) - partial
            )
        proto = self.model.proto
        for index in range(len(proto.variables)):
            self.model.add_hint(self.model.get_int_var_from_proto_index(index), hint.get(index, 0))

    # ------------------------------------------------------------------ realise
    def _realise(
        self, solver: cp_model.CpSolver | None
    ) -> tuple[dict[str, dict[str, int]], dict[tuple[str, Role], tuple[str, str]], np.ndarray]:
        topo = self.topology
        free = self.initial_free.copy()
        value = (lambda v: int(solver.value(v))) if solver is not None else (lambda v: 0)

        # Rebalance: drop what the model did not keep (scale-in rule inside each class),
        # and return those GPUs to the free pool.
        if self.rebalance and solver is not None:
            before = self._usage_by_node()
            for cls in self.existing:
                need = self.problem.needs[cls.service]
                drop = {
                    r: (sum(g.count(r) for g in cls.groups) - value(cls.keep[r]))
                    if cls.keep.get(r) is not None
                    else 0
                    for r in ROLES
                }
                if any(drop.values()):
                    subset = list(cls.groups)
                    scale_in(subset, need, drop, topo, self.problem.used)
            # Emptied groups stay in the working set (growth may refill them); results
            # never contain empty groups.
            after = self._usage_by_node()
            free = free + (before - after)

        additions: list[tuple[WorkGroup, Role, int]] = []
        for cls in self.existing:
            need = self.problem.needs[cls.service]
            add = {r: value(v) for r, v in cls.grow.items() if v is not None}
            if any(add.values()):
                order = sorted(cls.groups, key=lambda g: (need.room(g), g.group_id))
                additions.extend(split_growth(order, need, add))
        for new in self.new:
            opened = value(new.groups)
            if opened <= 0:
                continue
            need = self.problem.needs[new.service]
            service_groups = self.problem.groups.setdefault(new.service, [])
            add = {r: value(v) for r, v in new.instances.items() if v is not None}
            if new.anchor_role is not None and new.anchors is not None:
                add[new.anchor_role] = value(new.anchors)
            label = (
                new.domain.domain
                if new.domain.affinity != "cluster"
                else (new.domain.subgroup or new.domain.domain)
            )
            for share in split_new_groups(opened, need, add):
                group = WorkGroup(
                    service=new.service,
                    cluster=self.problem.cluster,
                    group_id=new_group_id(
                        service_groups, label, self.problem.running_ids(new.service)
                    ),
                    domain_name=new.domain.domain,
                    subgroup=new.domain.subgroup,
                    domain=new.domain,
                    gpu_type=dict(new.types),
                    nodes={"prefill": {}, "decode": {}},
                    is_new=True,
                    anchor_role=new.anchor_role,
                )
                service_groups.append(group)
                additions.extend((group, r, n) for r, n in share.items() if n)

        items: list[PackItem] = []
        for index, (group, role, count) in enumerate(additions):
            need = self.problem.needs[group.service]
            assert group.domain is not None
            items.append(
                PackItem(
                    key=index,
                    nodes=topo.domain_nodes(group.domain, group.gpu_type[role]),
                    size=need.role(role).gpus_per_instance,
                    count=count,
                    depth=topo.regions[group.domain.region].depth,
                    weight=need.priority + 1,
                    component=component_of(topo, group.domain.region),
                    order=(-need.priority, group.service, group.group_id, role),
                )
            )
        remaining = max(
            0.2, self.options.time_limit_s - (time.perf_counter() - self.problem.started_s)
        )
        outcome = pack(
            free,
            items,
            time_limit_s=self._wall_guard_s() if self.options.deterministic else remaining,
            deterministic_time=(
                self.options.time_limit_s * DETERMINISTIC_UNITS_PER_S
                if self.options.deterministic
                else None
            ),
            seed=self.options.seed,
            workers=1 if self.options.deterministic else self.options.workers,
            capacity=topo.node_gpus,
        )
        if outcome.fallback_components:
            self.notes.append(
                f"node packing: best fit left instances over; exact re-pack of {outcome.fallback_components} "
                f"subgroup(s) ({outcome.fallback_status})"
            )
        hints: dict[tuple[str, Role], tuple[str, str]] = {}
        unplaced_by: dict[tuple[str, Role], int] = defaultdict(int)
        for index, (group, role, _count) in enumerate(additions):
            for node, count in outcome.placed.get(index, {}).items():
                group.add(role, topo.nodes[node].name, count)
            missing = outcome.unplaced.get(index, 0)
            if missing:
                unplaced_by[(group.service, role)] += missing
        # A new group that lost every instance of a required role is dissolved.
        for service, service_groups in self.problem.groups.items():
            service_need = self.problem.needs.get(service)
            keep = []
            for group in service_groups:
                if (
                    group.is_new
                    and service_need is not None
                    and any(group.count(r) == 0 for r in service_need.required_roles)
                ):
                    for role in ROLES:
                        size = service_need.role(role).gpus_per_instance
                        for node_name, count in group.nodes[role].items():
                            free[topo.node_index[node_name]] += count * size
                        if group.count(role):
                            unplaced_by[(service, role)] += group.count(role)
                    continue
                keep.append(group)
            self.problem.groups[service] = keep
        for (service, role), missing in unplaced_by.items():
            hints[(service, role)] = (
                "fragmentation",
                f"{missing} instance(s) fit the free GPU count of the chosen domain but not onto single "
                "nodes (free GPUs are spread over partly used nodes)",
            )
        takers: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for group, role, _count in additions:
            need = self.problem.needs[group.service]
            added = group.count(role) - (
                group.original.role(role).instances if group.original else 0
            )
            if added > 0:
                takers[group.gpu_type[role]][group.service] += (
                    added * need.role(role).gpus_per_instance
                )
        return {t: dict(s) for t, s in takers.items()}, hints, free

    def _usage_by_node(self) -> np.ndarray:
        from reconciler.placement.problem import node_usage_of

        return node_usage_of(self.problem)


__all__ = ["CpSatPlacer"]

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
- *anchored groups* (``reconciler.placement.problem``): for a growing role whose other
  role runs, per candidate domain and allowed type pair, anchored groups ``g_a``, the
  growing role's instances ``n >= g_a`` and anchor instances ``a = ANCHOR_INSTANCES *
  g_a`` of the other role, which count for capacity but *not* against the other role's
  target (they are its overshoot), ``n + a <= S*g_a + o``. When the other role grows
  too, a boolean ``met`` gates them: ``g_a <= U*met`` and ``met => (other role's placed
  == its growth)``, so an anchor never stands in for a missing instance of its own
  role. To keep the model small, these classes exist only when the other role does
  not grow (without rebalancing) or when the greedy layout (computed first) needed
  anchors for that service and role, so the greedy layout is always a solution of the
  model.

Capacity is written on the laminar region tree (``Topology.regions``): per region and
GPU type, GPUs added by every domain inside it <= GPUs free in it. On a tree this is
exact for GPU counts. Node granularity is approximated by valid slot inequalities (per
instance size k: instances of size >= k <= sum over nodes of floor(free / k)) and made
exact by the second step, ``reconciler.placement.packing`` (best fit, verified, with an
exact CP-SAT re-pack per RDMA subgroup when best fit fails). GPUs free are those no
running, pending or draining instance holds (``reconciler.placement.problem``).

Objective (minimise; lexicographic in this order)
-------------------------------------------------
=====  ===================================================  ===========================
level  term                                                 weight
=====  ===================================================  ===========================
1      GPUs short of target                                 5,000 x (priority rank + 1)
                                                            per GPU (rank: 0 = lowest
                                                            priority present)
1b     an anchor GPU (overshoot of the other role's         1 per GPU in phase 1,
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

Level 1 is strictly first: when the greedy layout leaves demand unmet it is solved on
its own (phase 1, with level 1b at 1 per anchor GPU: below every GPU short, and the
total of anchor GPUs is capped below 5,000, a cap no real cycle reaches, so phase 1
uses as few anchors as meeting the targets takes); when the greedy layout meets every
target, level 1 is already at its optimum, 0, and phase 1 is skipped. Phase 2 then
optimises the weighted sum of all levels while every (service, role) keeps at least
the instances of the starting layout (phase 1's when it placed more, or as much with
fewer anchor GPUs; else the greedy layout's) and the anchor GPUs stay at or below the
starting layout's; an anchor GPU costs 4,000 there (above every level-2 cost of a
GPU). So anchors come after placing in the existing groups' domains (in place or by
overflow) and, when both roles grow, after full-shaped new groups; they never replace a
placement without. (A single weighted objective let the solver trade one unmet
instance for many GPUs of scarce-subgroup savings; measured on the benchmark it also
reached worse layouts within the time limit.) Inside level 1, priorities weigh per
GPU: a GPU of a higher-priority service outweighs a GPU of the next lower one, but not
nine (exact priority order would need exponential weights); priorities enter as dense
ranks so the coefficients stay small (large coefficients slow the LP down). Below
level 1 the weights make every level outweigh all lower ones together per GPU (1,000 >
99 + 300 + 30 + 8), not across very different amounts.

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
subgroup class they do not need. GPUs freed that way are *not* reused in the same
cycle: a move is made before it is broken, so the instances not kept serve on (apply
holds them, ``PlacementResult.may_move``) until the moved ones serve, and Pods put on
their GPUs could not start (placed there, the moved instances never served and the old
ones were held forever). What moves goes to GPUs free now; the freed ones are free to
placement once the old instances are gone, a later cycle. No flip-flop: next cycle
both copies run and the target leaves room for one. A GPU moved cost what placing it
new there costs plus the 500 of the move, less than keeping it where it was; kept
where it moved to, it costs that placing plus at most 400 (class rank 2 at most): less
than the old place still, so the old copy is what goes.

Search: never worse than greedy
-------------------------------
The paper's greedy scheduler runs first; its layout, written in the model's variables
(checked to satisfy every row), is the starting solution. The model is recorded as a
``reconciler.placement.decompose.BlockModel`` with one block per service and searched
by *decomposition* (``decompose.improve``): sub-models of one service, then of a
service and those it shares binding capacity with, every other service fixed where
the incumbent has it, each solved by CP-SAT from the incumbent, services furthest
above their floor (their cheapest conceivable placement) first; a model of up to
``WHOLE_MODEL_VARS`` variables is solved whole after the one-service passes, which
proves optimality on small and medium cycles. (One CP-SAT thread on the whole model of
a 20,000-GPU fleet spends a 2 s budget in presolve and the root LP without improving
on the greedy layout; a one-service sub-model is solved exactly in milliseconds.)
The incumbent only ever improves, so the model's objective never ends above the
greedy layout's.

The greedy layout is returned instead (``SolverStats.kept_greedy``, said in
``stats.notes``) when the search found nothing better in the model -- no solution in
time, or none below the greedy layout's level 1 and objective -- or when the realised
CP-SAT layout (after node packing, which can lose instances to fragmentation) is
*worse than greedy*: ``reconciler.placement.quality.worse_than`` on the measured terms
in the objective's order (measured by ``quality.measure_pair``, which leaves out the
groups equal in both layouts: the same comparison, at a fraction of the cost on a large
fleet). So a CP-SAT result is never worse than the greedy one.

Determinism: ``PlacementOptions.deterministic`` (default) runs one search thread per
solve, bounded by a deterministic-time budget (``time_limit_s`` x
``DETERMINISTIC_UNITS_PER_S`` in all, phase 1 up to ``PHASE1_SHARE`` of it, the node
packing fallback likewise) plus a fixed charge per sub-model: the same input gives the
same layout on any machine and at any load, so ``plan`` and ``apply`` agree. (CP-SAT's
parallel portfolio exchanges solutions in timing-dependent order, and its interleaved
deterministic mode always spends its whole budget.) The calling thread's CPU time (3 x
the limit; the one search worker runs in it) is only a runaway guard, and CP-SAT's wall
clock a far looser one, so neither a loaded machine nor other clusters' placements
solved at once (``run`` reconciles clusters on threads of their own) change the answer; a run stopped by the guard says so in
``stats.notes``. With ``deterministic=False``, the search runs until ``time_limit_s``
and a whole-model solve uses ``workers`` threads. Presolve runs without probing and symmetry detection
(2-3x faster to a proven optimum on the benchmark). The result carries the combined
objective and, when a whole-model solve gave one, its bound and the gap (the
per-service floors of the decomposition ignore capacity: too weak to report alone).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from reconciler.placement.base import PlacementRequest, PlacementResult, SolverStats
from reconciler.placement.decompose import (
    BlockModel,
    Objective,
    SearchBudget,
    SolverSettings,
    improve,
    solve,
)
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
from reconciler.placement.quality import first_worse_term, measure_pair
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
W_ANCHOR = 4_000  # per anchor GPU, phase 2 (phase 1: W_ANCHOR_PHASE1 per GPU)
W_ANCHOR_PHASE1 = 1

# Deterministic-time budget of the solver per second of PlacementOptions.time_limit_s.
# One CP-SAT thread gets through about 0.1 units per CPU second on this model (whole or
# in parts, sub-model building included) on the 2-core reference machine. The solver
# gets 0.08 units per second of the limit less OVERHEAD_UNITS_PER_VAR per model
# variable, since large models take longer around the solver (greedy layout, model
# building, node packing, measuring: ~0.5 s of CPU at 5,000 variables): a 2 s limit
# then keeps every placement of the 20,000-GPU benchmark under 2 s of CPU
# (benchmarks/bench_placement.py prints every run's CPU time and its phases).
DETERMINISTIC_UNITS_PER_S = 0.08
OVERHEAD_UNITS_PER_VAR = 1.2e-5
# Phase 1 (level 1 alone, whole model) may take this share of the budget.
PHASE1_SHARE = 0.5
# The exact node re-pack (when best fit leaves instances over) may take this share.
PACKING_SHARE = 0.25
# Above this many variables the model is not solved whole in phase 2 (its presolve
# alone would take most of the budget); the decomposed search does all the work.
WHOLE_MODEL_VARS = 3_000


@dataclass
class _Term:
    """One integer variable that uses GPUs of one type inside one region."""

    region: int
    type_code: int
    size: int
    var: int  # index in the BlockModel
    upper: int


@dataclass
class _ExistingClass:
    service: str
    domain: SchedulingDomain | None
    types: dict[Role, str]
    groups: list[WorkGroup]
    grow: dict[Role, int | None] = field(default_factory=dict)
    keep: dict[Role, int | None] = field(default_factory=dict)
    overflow: int | None = None
    room: int = 0


@dataclass
class _NewClass:
    service: str
    domain: SchedulingDomain
    types: dict[Role, str]
    groups: int
    instances: dict[Role, int | None]
    overflow: int | None = None
    # Anchored groups: the anchor role and its instances (beyond its target).
    anchor_role: Role | None = None
    anchors: int | None = None


@dataclass(frozen=True)
class _Searched:
    """The outcome of the search: the solution (None: none in time), its phase-2
    objective and bound, and the status to report."""

    status: str
    values: np.ndarray | None
    objective: float | None = None
    bound: float | None = None
    improved_on_greedy: bool = False


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
        result = _Solve(problem, rebalance).run()
        # Under rebalancing any removal may be the old half of a move, the greedy
        # layout's too (its scale-in may take the old half of an earlier move).
        return replace(result, may_move=True) if rebalance else result


class _Solve:
    def __init__(self, problem: PlacementProblem, rebalance: bool):
        self.problem = problem
        self.topology = problem.topology
        self.options = problem.request.options
        self.rebalance = rebalance
        self.initial_free = problem.free()
        self.stats_region = _RegionStats(self.topology, self.initial_free, problem.used)
        self.model = BlockModel()
        self.block = -1  # block (service index) of the variables being created
        self.terms: list[_Term] = []
        self.existing: list[_ExistingClass] = []
        self.new: list[_NewClass] = []
        # Level 1 (GPUs short of target) is optimised first, the rest under it; terms
        # are (coefficient, variable).
        self.short_terms: list[tuple[int, int]] = []
        self.short_offset = 0
        self.placed_vars: dict[tuple[str, Role], list[int]] = {}
        self.grow_of: dict[tuple[str, Role], int] = {}  # the bound on placed_vars' sum
        self.objective_terms: list[tuple[int, int]] = []
        self.objective_offset = 0
        self.notes: list[str] = []
        self.fragment_vars: list[tuple[int, list[_Term], int]] = []
        self.anchor_vars: list[tuple[int, int]] = []  # (instances, GPUs per instance)
        self.anchor_gates: list[tuple[str, Role, int]] = []  # (service, role, met)
        self.greedy_anchored: set[tuple[str, Role]] = set()
        self.type_codes: dict[str, int] = {}
        # Per service (block), a lower bound of its new-group and overflow costs.
        self.group_floor: dict[int, int] = {}
        # Dense rank of each priority (0 = lowest present): keeps the weights small.
        priorities = sorted({n.priority for n in problem.needs.values()})
        self.priority_rank = {p: i for i, p in enumerate(priorities)}

    def _code(self, gpu_type: str) -> int:
        """``Topology.type_code``, looked up once per type (it is asked per class)."""
        code = self.type_codes.get(gpu_type)
        if code is None:
            code = self.type_codes[gpu_type] = self.topology.type_code(gpu_type)
        return code

    def _var(self, upper: int) -> int:
        """A new variable in [0, upper] of the service being added."""
        return self.model.new_var(0, upper, self.block)

    # ------------------------------------------------------------------ run
    def run(self) -> PlacementResult:
        mark = time.perf_counter()
        from reconciler.placement.greedy import GreedyPlacer

        # The greedy layout first: the starting solution, the fallback, and which
        # services needed anchors where this model offers none by default.
        greedy = GreedyPlacer().place(self.problem.request)
        self.greedy_anchored = {(a.service, a.role) for a in greedy.anchors}
        mark = self.problem.lap("greedy_hint", mark)
        for block, need in enumerate(self.problem.services_by_priority()):
            self.block = block
            self._add_service(need)
        self._add_capacity()
        mark = self.problem.lap("build_model", mark)
        hint = self._hint_from_greedy(greedy)
        mark = self.problem.lap("greedy_hint", mark)
        searched = self._search(hint)
        mark = self.problem.lap("solve", mark)
        if searched.values is None:
            return self._keep_greedy(
                greedy, f"{searched.status}+greedy", f"cp-sat returned {searched.status}"
            )
        if not searched.improved_on_greedy:
            return self._keep_greedy(
                greedy,
                searched.status,
                "the search found nothing better than it in the model",
                objective=searched.objective,
                bound=searched.bound,
            )
        takers, hints, free_after = self._realise(searched.values)
        mark = self.problem.lap("pack", mark)
        shortfalls = shortfalls_for(self.problem, free_after, self.initial_free, takers, hints)
        mark = self.problem.lap("explain", mark)
        stats = SolverStats(
            solver="cp-sat",
            status=searched.status,
            wall_s=time.perf_counter() - self.problem.started_s,
            objective=searched.objective,
            best_bound=searched.bound,
            phases_s=tuple(sorted(self.problem.timings_s.items())),
            notes=tuple(self.notes),
        )
        result = finalize(self.problem, stats, shortfalls)
        request = self.problem.request
        worse = first_worse_term(
            *measure_pair(
                request.cluster, request.policies, request.current, result, greedy, request.targets
            )
        )
        self.problem.lap("compare", mark)
        if worse is not None:
            return self._keep_greedy(
                greedy,
                searched.status,
                f"the cp-sat layout measured worse than it on {worse} after node packing",
            )
        return result

    def _keep_greedy(
        self,
        greedy: PlacementResult,
        status: str,
        why: str,
        objective: float | None = None,
        bound: float | None = None,
    ) -> PlacementResult:
        """The greedy layout as this placer's answer, saying why."""
        assert greedy.stats is not None
        notes = (
            *self.notes,
            f"greedy layout kept: {why}",
            *greedy.stats.notes,
        )
        stats = SolverStats(
            solver="cp-sat",
            status=status,
            wall_s=time.perf_counter() - self.problem.started_s,
            objective=objective,
            best_bound=bound,
            phases_s=tuple(sorted(self.problem.timings_s.items())),
            notes=notes,
            kept_greedy=True,
        )
        return PlacementResult(
            greedy.cluster, greedy.groups, greedy.shortfalls, stats, greedy.anchors
        )

    # ------------------------------------------------------------------ build
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
        placed: dict[Role, list[int]] = {r: [] for r in ROLES}
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
            growth: list[int] = []
            growth_upper = 0
            for role in ROLES:
                rn = need.role(role)
                gpu_type = cls.types[role]
                code = self._code(gpu_type)
                per_instance = rn.gpus_per_instance * (place_cost + rn.preference_cost(gpu_type))
                current = sum(g.count(role) for g in cls.groups)
                if self.rebalance and current:
                    keep = self._var(current)
                    cls.keep[role] = keep
                    placed[role].append(keep)
                    rank = cls.domain.class_rank if cls.domain else CLASS_RANK["high"]
                    keep_cost = per_instance + rn.gpus_per_instance * W_KEEP_CLASS * rank
                    # Not keeping an instance costs a move: offset + (-W_MOVE) per kept GPU.
                    self.objective_terms.append((keep_cost - rn.gpus_per_instance * W_MOVE, keep))
                    self.objective_offset += rn.gpus_per_instance * W_MOVE * current
                    # Kept or not, the running instances hold their GPUs this cycle (no
                    # capacity term: ``initial_free`` already counts them busy). What is
                    # not kept is the old half of a move: apply keeps it serving until
                    # its replacement serves (make before break), so its GPUs are not
                    # free to anything placed this cycle, which could not start there.
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
                x = self._var(upper)
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
                    overflow = self._var(growth_upper - room)
                    cls.overflow = overflow
                    self.model.add([(1, x) for x in growth] + [(-1, overflow)], upper=room)
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
        gates: list[tuple[Role, int]] = []
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
            self.model.add([(1, v) for v in placed[anchor]], lower=grow[anchor], enforce=gate)

        if not self.rebalance:
            # What the growing groups' room cannot take needs new groups (30 each, of at
            # most S instances) or, for a role growing alone, overflow (300 an instance)
            # or anchored groups (an anchor costs 4,000 a GPU, for S - 1 instances):
            # at least this much. The floor lets the search skip services already there.
            room = sum(cls.room for cls in classes.values() if any(cls.grow.values()))
            beyond = max(0, sum(grow.values()) - room)
            size = max(1, need.group_size)
            if may_open:
                extra = W_OPEN_GROUP * -(-beyond // size)
            else:
                per_instance = W_OVERFLOW
                if size > ANCHOR_INSTANCES:
                    anchor_gpus = min(need.role(r).gpus_per_instance for r in ROLES)
                    anchored = W_ANCHOR * ANCHOR_INSTANCES * anchor_gpus + W_OPEN_GROUP
                    per_instance = min(W_OVERFLOW, anchored // (size - ANCHOR_INSTANCES))
                extra = beyond * per_instance
            self.group_floor[self.block] = extra
        for role in ROLES:
            rn = need.role(role)
            if placed[role]:
                self.model.add([(1, v) for v in placed[role]], upper=grow[role])
                self.placed_vars[(need.service, role)] = placed[role]
                self.grow_of[(need.service, role)] = grow[role]
            unit = weight_short * rn.gpus_per_instance
            self.short_offset += unit * grow[role]
            for var in placed[role]:
                self.short_terms.append((-unit, var))

    def _group_domains(self, need: ServiceNeed) -> list[SchedulingDomain]:
        """The domains a new group of ``need`` may be placed in: those its affinity
        allows and, for loose affinity, the whole cluster, which may span subgroups at
        a price (W_SPAN) to meet targets."""
        domains = list(self.topology.domains(need.affinity))
        if need.affinity == "cluster" and self._spans(self.topology.cluster_domain):
            domains.append(self.topology.cluster_domain)
        return domains

    def _add_new_groups(
        self, need: ServiceNeed, grow: dict[Role, int], placed: dict[Role, list[int]]
    ) -> None:
        required = need.required_roles
        size = need.group_size
        max_groups = min(grow[r] for r in required)
        for domain in self._group_domains(need):
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
                        region, self._code(pair[r]), need.role(r).gpus_per_instance
                    )
                    for r in required
                }
                if len(required) == 2 and pair["prefill"] == pair["decode"]:
                    joint = self.stats_region.free_gpus(region, self._code(pair["prefill"]))
                    if joint < need.prefill.gpus_per_instance + need.decode.gpus_per_instance:
                        continue
                upper_groups = min([max_groups, *bounds.values()])
                if upper_groups <= 0:
                    continue
                g = self._var(upper_groups)
                self.objective_terms.append((W_OPEN_GROUP, g))
                place_cost = self._domain_cost(need, domain, pair["prefill"], pair["decode"])
                instances: dict[Role, int | None] = {r: None for r in ROLES}
                for r in required:
                    rn = need.role(r)
                    upper = min(grow[r], bounds[r])
                    n = self._var(upper)
                    self.model.add([(1, n), (-1, g)], lower=0)
                    instances[r] = n
                    placed[r].append(n)
                    self.terms.append(
                        _Term(region, self._code(pair[r]), rn.gpus_per_instance, n, upper)
                    )
                    cost = rn.gpus_per_instance * (place_cost + rn.preference_cost(pair[r]))
                    self.objective_terms.append((cost, n))
                # At most the group size per group; beyond it only by overflow (a role
                # that grows alone once the other role's need is met).
                most = sum(grow[r] for r in required)
                overflow = self._var(most)
                self.model.add([(1, overflow), (-most, g)], upper=0)  # no group, no overflow
                self.model.add(
                    [(1, v) for v in instances.values() if v is not None]
                    + [(-size, g), (-1, overflow)],
                    upper=0,
                )
                self.objective_terms.append((W_OVERFLOW, overflow))
                self.new.append(_NewClass(need.service, domain, dict(pair), g, instances, overflow))  # type: ignore[arg-type]

    def _add_anchored_groups(
        self,
        need: ServiceNeed,
        grow: dict[Role, int],
        placed: dict[Role, list[int]],
        anchor: Role,
    ) -> int | None:
        """Anchored groups for ``anchor``'s other role (see the module docstring).
        Returns the gate (``met``) when ``anchor`` grows too and anchored classes exist."""
        short: Role = "decode" if anchor == "prefill" else "prefill"
        rs, ra = need.role(short), need.role(anchor)
        gate: int | None = None
        for domain in self._group_domains(need):
            region = domain.region
            for ts in (t for t in rs.allowed_types if t in domain.gpu_types):
                for ta in (t for t in ra.allowed_types if t in domain.gpu_types):
                    code_s, code_a = self._code(ts), self._code(ta)
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
                    g = self._var(upper_groups)
                    if grow[anchor] > 0:
                        if gate is None:
                            gate = self._var(1)
                            self.anchor_gates.append((need.service, anchor, gate))
                        self.model.add([(1, g), (-upper_groups, gate)], upper=0)
                    self.objective_terms.append((W_OPEN_GROUP, g))
                    upper_n = min(grow[short], short_slots)
                    n = self._var(upper_n)
                    self.model.add([(1, n), (-1, g)], lower=0)
                    placed[short].append(n)
                    self.terms.append(_Term(region, code_s, rs.gpus_per_instance, n, upper_n))
                    self.objective_terms.append(
                        (rs.gpus_per_instance * (place_cost + rs.preference_cost(ts)), n)
                    )
                    upper_a = ANCHOR_INSTANCES * upper_groups
                    a = self._var(upper_a)
                    self.model.add([(1, a), (-ANCHOR_INSTANCES, g)], lower=0, upper=0)
                    self.terms.append(_Term(region, code_a, ra.gpus_per_instance, a, upper_a))
                    self.objective_terms.append(
                        (ra.gpus_per_instance * (place_cost + ra.preference_cost(ta) + W_ANCHOR), a)
                    )
                    self.anchor_vars.append((a, ra.gpus_per_instance))
                    # The growing role beyond the group size overflows (no group, none).
                    overflow = self._var(upper_n)
                    self.model.add([(1, overflow), (-upper_n, g)], upper=0)
                    self.model.add([(1, n), (1, a), (-need.group_size, g), (-1, overflow)], upper=0)
                    self.objective_terms.append((W_OVERFLOW, overflow))
                    instances: dict[Role, int | None] = {short: n, anchor: None}
                    self.new.append(
                        _NewClass(need.service, domain, pair, g, instances, overflow, anchor, a)
                    )
        return gate

    def _add_capacity(self) -> None:
        topo = self.topology
        by_region: dict[tuple[int, int], list[_Term]] = defaultdict(list)
        for term in self.terms:
            for ancestor in topo.region_ancestors(term.region):
                by_region[(ancestor, term.type_code)].append(term)
        term_regions = {(t.region, t.type_code) for t in self.terms}
        for (region, code), terms in sorted(by_region.items()):
            free = self.stats_region.free_gpus(region, code)
            upper = sum(t.size * t.upper for t in terms)
            if upper > free:
                self.model.add([(t.size, t.var) for t in terms], upper=free)
            for size in sorted({t.size for t in terms if t.size > 1}):
                big = [t for t in terms if t.size >= size]
                cap = self.stats_region.slots(region, code, size)
                if sum(t.upper for t in big) > cap:
                    self.model.add([(1, t.var) for t in big], upper=cap)
            if (region, code) in term_regions:
                # GPUs added beyond what partly used nodes offer break whole nodes.
                partial = self.stats_region.partial_gpus(region, code)
                bound = sum(t.size * t.upper for t in terms)
                if bound > partial:
                    over = self.model.new_var(0, bound - partial)  # shared by the services
                    self.fragment_vars.append((over, terms, partial))
                    self.model.add([(1, over)] + [(-t.size, t.var) for t in terms], lower=-partial)
                    self.objective_terms.append((W_FRAGMENT, over))
        anchor_gpus = [(gpus, a) for a, gpus in self.anchor_vars]
        if sum(gpus * self.model.upper(a) for gpus, a in anchor_gpus) >= W_SHORT_PER_RANK:
            # Keeps level 1b below one GPU short in phase 1 (never reached by a real cycle).
            self.model.add(anchor_gpus, upper=W_SHORT_PER_RANK - 1)

    # ------------------------------------------------------------------ search
    def _vector(self, terms: list[tuple[int, int]]) -> np.ndarray:
        out = np.zeros(self.model.num_vars, dtype=np.int64)
        for coeff, var in terms:
            out[var] += coeff
        return out

    def _budget(self) -> SearchBudget:
        options = self.options
        if options.deterministic:
            # The runaway guard counts this thread's CPU time from here.
            deadline_s = time.thread_time() + self._guard_s()
        else:
            deadline_s = self.problem.started_s + options.time_limit_s
        # The work around the solver grows with the model; the solver gets what that
        # leaves of the limit (at least half).
        total = options.time_limit_s * DETERMINISTIC_UNITS_PER_S
        units = max(0.5 * total, total - OVERHEAD_UNITS_PER_VAR * self.model.num_vars)
        return SearchBudget(
            deterministic=options.deterministic,
            units=units,
            deadline_s=deadline_s,
            units_per_s=DETERMINISTIC_UNITS_PER_S,
        )

    def _search(self, hint: np.ndarray) -> _Searched:
        """Phase 1 when needed, then the decomposed phase 2 (module docstring)."""
        model = self.model
        level1 = Objective(self._vector(self.short_terms), self.short_offset)
        anchor_gpus = self._vector([(gpus, a) for a, gpus in self.anchor_vars])
        full = Objective(
            level1.coefficients + self._vector(self.objective_terms),
            self.short_offset + self.objective_offset,
        )
        if model.num_vars == 0:
            return _Searched("OPTIMAL", hint, float(full.offset), float(full.offset))
        budget = self._budget()
        settings = SolverSettings(seed=self.options.seed, workers=self.options.workers)
        violated = model.violated_rows(hint)
        if violated:
            # Not expected (the model represents every greedy layout); searched anyway.
            self.notes.append(
                f"the greedy layout breaks {len(violated)} constraint(s) of the model; "
                "cp-sat searched without it as a start"
            )
        greedy_rank = (level1.value(hint), int(anchor_gpus @ hint))
        start = hint
        # Level 1 is >= 0: a greedy layout that meets every target is at its optimum.
        level1_proven = not violated and greedy_rank[0] == 0
        level1_bound: float | None = None
        phases: list[str] = []
        if not level1_proven:
            phase1 = Objective(level1.coefficients + W_ANCHOR_PHASE1 * anchor_gpus, level1.offset)
            first = solve(model, phase1, hint, budget, settings, limit=PHASE1_SHARE * budget.left())
            phases.append(f"targets {first.status}")
            if first.values is None:
                if violated:
                    return _Searched(first.status, None)
            else:
                rank = (level1.value(first.values), int(anchor_gpus @ first.values))
                if violated or rank < greedy_rank:
                    start = first.values
                level1_proven = first.status == "OPTIMAL"
                if first.bound is not None:
                    # Phase 1's bound less what anchors can add to it bounds level 1.
                    anchors_most = min(W_SHORT_PER_RANK - 1, int(anchor_gpus @ model.uppers()))
                    level1_bound = max(0.0, first.bound - W_ANCHOR_PHASE1 * anchors_most)
        # Phase 2 holds level 1 (and the anchors) where the starting layout has them:
        # simple bounds per service and role (one dense weighted row slows the LP).
        for variables in self.placed_vars.values():
            self.model.add([(1, v) for v in variables], lower=int(start[variables].sum()))
        if self.anchor_vars:
            self.model.add(
                [(gpus, a) for a, gpus in self.anchor_vars], upper=int(anchor_gpus @ start)
            )
        floors = self._floors(full)
        values, report = improve(model, full, start, floors, budget, settings, WHOLE_MODEL_VARS)
        phases.append(f"layout {report.whole_status or 'decomposed'}")
        if report.sub_solves > 1 or report.whole_status is None:
            self.notes.append(report.describe())
        failed = [status for status in report.unsolved if status != "UNKNOWN"]
        if failed:  # out of time (UNKNOWN) is the budget at work; anything else is not
            self.notes.append(
                f"{len(failed)} sub-model(s) without a solution ({', '.join(sorted(set(failed)))})"
            )
        if budget.guard_hit:
            self.notes.append(
                "cp-sat stopped on the runaway guard (3 x the time limit): result may vary "
                "between runs"
            )
        optimal = level1_proven and report.whole_status == "OPTIMAL"
        if not optimal:
            self.notes.append(f"cp-sat phases: {', '.join(phases)}")
        # Bounds: the floors (valid, but capacity ignored), raised by the whole model's
        # bound when level 1 is settled, or by phase 1's bound on level 1 (every other
        # level is >= 0). Without either, no bound worth reporting.
        floor = float(sum(floors.values()) + full.offset)
        bound: float | None = None
        if level1_proven and report.whole_bound is not None:
            bound = max(floor, report.whole_bound)
        elif level1_bound is not None:
            bound = max(floor, level1_bound)
        else:
            self.notes.append("no bound: the model was only solved in parts")
        improved = bool(violated) or (level1.value(values), full.value(values)) < (
            level1.value(hint),
            full.value(hint),
        )
        return _Searched(
            "OPTIMAL" if optimal else "FEASIBLE",
            values,
            float(full.value(values)),
            None if bound is None else max(0.0, bound),
            improved,
        )

    def _floors(self, objective: Objective) -> dict[int, int]:
        """Per service (block), a lower bound of its part of ``objective``, capacity
        ignored: each role's growth at its cheapest variable, other variables at their
        cheapest bound, plus the fewest new groups the growth beyond the room of the
        growing groups takes. (Placing fewer instances only raises the part: a GPU
        short costs more than any placement.)"""
        coefficients = objective.coefficients
        blocks = self.model.blocks()
        upper = self.model.uppers()
        floors = {b: 0 for b in blocks}
        counted = np.zeros(self.model.num_vars, dtype=bool)
        for key, variables in self.placed_vars.items():
            cheapest = min(0, int(coefficients[variables].min()))
            floors[self.model.block_of(variables[0])] += self.grow_of[key] * cheapest
            counted[variables] = True
        for block, members in blocks.items():
            rest = members[~counted[members]]
            floors[block] += int(np.minimum(coefficients[rest], 0) @ upper[rest])
            floors[block] += self.group_floor.get(block, 0)
        return floors

    def _guard_s(self) -> float:
        """Time limit of a deterministic search: only a guard against runaway."""
        return max(3.0 * self.options.time_limit_s, self.options.time_limit_s + 2.0)

    def _hint_from_greedy(self, baseline: PlacementResult) -> np.ndarray:
        """The greedy scheduler's layout on the same request in the model's variables
        (the starting solution; ``BlockModel.violated_rows`` checks it)."""
        hint = np.zeros(self.model.num_vars, dtype=np.int64)
        after = {(g.service, g.group_id): g for g in baseline.groups}
        for cls in self.existing:
            total = 0
            for r in ROLES:
                kept = grown = 0
                for old in cls.groups:
                    now = after.get((old.service, old.group_id))
                    count = now.role(r).instances if now is not None else 0
                    kept += min(count, old.count(r))
                    grown += max(0, count - old.count(r))
                var = cls.grow.get(r)
                if var is not None:
                    hint[var] = grown
                    total += grown
                keep = cls.keep.get(r)
                if keep is not None:
                    hint[keep] = kept
            if cls.overflow is not None:
                hint[cls.overflow] = max(0, total - cls.room)
        # New groups by (service, domain, type pair, anchor role or None).
        before = {(g.service, g.group_id) for gs in self.problem.groups.values() for g in gs}
        anchored_by = {(a.service, a.group_id): a.role for a in baseline.anchors}
        opened: dict[tuple[str, str, str, str, Role | None], int] = defaultdict(int)
        opened_n: dict[tuple[str, str, str, str, Role | None, Role], int] = defaultdict(int)
        for group in baseline.groups:
            if (group.service, group.group_id) in before:
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
        for new in self.new:
            new_key = (
                new.service,
                new.domain.key,
                new.types["prefill"],
                new.types["decode"],
                new.anchor_role,
            )
            count = opened.get(new_key, 0)
            hint[new.groups] = count
            total = 0
            for r, var in new.instances.items():
                if var is not None:
                    hint[var] = opened_n.get((*new_key, r), 0)
                    total += opened_n.get((*new_key, r), 0)
            if new.anchors is not None:
                hint[new.anchors] = ANCHOR_INSTANCES * count
                total += ANCHOR_INSTANCES * count
            if new.overflow is not None:
                hint[new.overflow] = max(
                    0, total - count * self.problem.needs[new.service].group_size
                )
        for service, role, gate in self.anchor_gates:
            met = baseline.placed(service, role) - baseline.overshoot(service, role)
            hint[gate] = int(met >= self.problem.needs[service].role(role).target)
        for over, terms, partial in self.fragment_vars:
            hint[over] = max(0, sum(t.size * int(hint[t.var]) for t in terms) - partial)
        return hint

    # ------------------------------------------------------------------ realise
    def _realise(
        self, values: np.ndarray
    ) -> tuple[dict[str, dict[str, int]], dict[tuple[str, Role], tuple[str, str]], np.ndarray]:
        topo = self.topology
        free = self.initial_free.copy()

        def value(var: int) -> int:
            return int(values[var])

        # Rebalance: drop what the model did not keep (scale-in rule inside each class).
        # Those GPUs are not returned to the free pool: the dropped instances serve
        # until what replaces them does (apply holds them), so nothing packed this
        # cycle may go there.
        if self.rebalance:
            for cls in self.existing:
                need = self.problem.needs[cls.service]
                drop = {r: sum(g.count(r) for g in cls.groups) for r in ROLES}
                for r in ROLES:
                    kept = cls.keep.get(r)
                    drop[r] = drop[r] - value(kept) if kept is not None else 0
                if any(drop.values()):
                    subset = list(cls.groups)
                    scale_in(subset, need, drop, topo, self.problem.used)
            # Emptied groups stay in the working set (growth may refill them); results
            # never contain empty groups.

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
            for share in split_new_groups(opened, need, add):
                group = WorkGroup(
                    service=new.service,
                    cluster=self.problem.cluster,
                    group_id=new_group_id(
                        service_groups,
                        new.domain.group_label,
                        self.problem.reserved_ids(new.service),
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
            # Loaded machines stretch the wall clock: the guard is generous.
            time_limit_s=10 * self._guard_s() if self.options.deterministic else remaining,
            deterministic_time=(
                PACKING_SHARE * self.options.time_limit_s * DETERMINISTIC_UNITS_PER_S
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


__all__ = ["CpSatPlacer"]

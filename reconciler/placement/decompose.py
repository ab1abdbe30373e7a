"""A linear integer model split into blocks, and a large-neighbourhood search over them.

Why: the CP-SAT placer's model grows with the fleet. On an empty 20,000-GPU fleet it
has ~5,000 variables, and one CP-SAT thread spends most of a 2 s budget in presolve
and in the root LP without improving on its starting solution. The model separates
by service, though: every row but the capacity rows (and a cap on the total of
anchors) involves one service only. So the placer records it here as plain arrays,
each variable tagged with its *block* (a service; ``SHARED`` for the variables of the
capacity rows), and this module

- emits it to CP-SAT whole (``BlockModel.emit`` with ``free=None``), or as the
  sub-model over some blocks with every other variable fixed at the incumbent's
  value: a row then keeps the free variables' terms against what the fixed ones
  leave of its bounds, and rows without a free variable are dropped (the incumbent
  satisfies them);
- searches (``improve``): repeatedly re-solves neighbourhoods of blocks, most
  improvable first, each sub-model hinted with the incumbent (a complete, feasible
  hint), and keeps a sub-solution only when it lowers the objective. The incumbent
  therefore never gets worse, and every step is a small model CP-SAT solves in
  milliseconds.

Determinism: a search is bounded by ``SearchBudget``: CP-SAT's deterministic time plus
a fixed charge per sub-solve (its model building is not in CP-SAT's clock), so the
same input takes the same steps on any machine; the calling thread's CPU time is only
a runaway guard there. Without determinism the budget is the wall clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

SHARED = -1  # the block of variables that belong to no single block
INT_MIN = cp_model.INT_MIN
INT_MAX = cp_model.INT_MAX

# Charged to the budget per sub-solve on top of CP-SAT's deterministic time: emitting a
# sub-model and starting the solver cost ~3-5 ms of CPU, about 0.0005 units at CP-SAT's
# pace on the placement model (~0.1 units per CPU second).
SUBSOLVE_OVERHEAD_UNITS = 0.0005
# Deterministic time allowed to one sub-solve: a few hundred variables are solved to
# optimality well within it; a harder neighbourhood keeps the best it found. Below
# SUBSOLVE_MIN_UNITS left, a sub-solve would end before finding anything: none starts.
SUBSOLVE_UNITS = 0.004
SUBSOLVE_MIN_UNITS = 0.001
# Variables in the first neighbourhoods of several blocks; doubled once after a pass
# that gained less than MIN_PASS_GAIN of the objective.
NEIGHBOURHOOD_VARS = 400
MIN_PASS_GAIN = 0.01


@dataclass(frozen=True)
class Objective:
    """A linear objective over a model's variables (minimised)."""

    coefficients: np.ndarray  # int64, one per variable
    offset: int = 0

    def value(self, values: np.ndarray) -> int:
        return int(self.coefficients @ values) + self.offset


@dataclass(frozen=True)
class _Rows:
    """The rows in compressed form."""

    indptr: np.ndarray  # row r's terms are [indptr[r], indptr[r + 1])
    var: np.ndarray
    coeff: np.ndarray
    row_of_term: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    enforce: np.ndarray  # a 0/1 variable whose value 1 enforces the row, or -1
    var_lower: np.ndarray  # the variables' bounds
    var_upper: np.ndarray


class BlockModel:
    """Integer variables with bounds and a block each, and linear rows
    ``lower <= sum(coeff * var) <= upper``, optionally enforced by a 0/1 variable."""

    def __init__(self) -> None:
        self._lower: list[int] = []
        self._upper: list[int] = []
        self._block: list[int] = []
        self._row_terms: list[tuple[list[int], list[int]]] = []
        self._row_bounds: list[tuple[int, int]] = []
        self._row_enforce: list[int] = []
        self._rows: _Rows | None = None
        # Every emitted model is written into this one (building a CpModel costs ~1 ms).
        self._scratch = cp_model.CpModel()

    # ------------------------------------------------------------------ building
    @property
    def num_vars(self) -> int:
        return len(self._lower)

    def new_var(self, lower: int, upper: int, block: int = SHARED) -> int:
        """A new integer variable in ``[lower, upper]``; returns its index."""
        self._lower.append(int(lower))
        self._upper.append(int(upper))
        self._block.append(block)
        self._rows = None
        return len(self._lower) - 1

    def add(
        self,
        terms: Iterable[tuple[int, int]],
        *,
        lower: int = INT_MIN,
        upper: int = INT_MAX,
        enforce: int = -1,
    ) -> None:
        """Add ``lower <= sum(coefficient * var) <= upper`` over ``terms`` given as
        ``(coefficient, var)``, enforced only when ``enforce`` (a 0/1 variable) is 1."""
        coeffs, variables = [], []
        for coeff, var in terms:
            coeffs.append(int(coeff))
            variables.append(int(var))
        self._row_terms.append((variables, coeffs))
        self._row_bounds.append((int(lower), int(upper)))
        self._row_enforce.append(enforce)
        self._rows = None

    def upper(self, var: int) -> int:
        return self._upper[var]

    def uppers(self) -> np.ndarray:
        return np.asarray(self._upper, dtype=np.int64)

    def block_of(self, var: int) -> int:
        return self._block[var]

    def blocks(self) -> dict[int, np.ndarray]:
        """The variables of every block but ``SHARED``."""
        block = np.asarray(self._block, dtype=np.int64)
        return {int(b): np.flatnonzero(block == b) for b in np.unique(block) if b != SHARED}

    def rows_of(self, variables: np.ndarray) -> np.ndarray:
        """The rows that ``variables`` appear in (as terms or as enforcement)."""
        rows = self._frozen()
        mask = np.zeros(self.num_vars, dtype=bool)
        mask[variables] = True
        gated = np.flatnonzero((rows.enforce >= 0) & mask[np.maximum(rows.enforce, 0)])
        return np.union1d(rows.row_of_term[mask[rows.var]], gated)

    @property
    def num_rows(self) -> int:
        return len(self._row_bounds)

    def binding(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Who holds what in the rows that bind at ``values``: rows shared by several
        blocks with no room left for one more unit of their largest term. Returns
        ``(row, block, amount)`` for every term of such a row with a positive value."""
        rows = self._frozen()
        activity = np.zeros(len(rows.lower), dtype=np.int64)
        np.add.at(activity, rows.row_of_term, rows.coeff * values[rows.var])
        largest = np.zeros(len(rows.lower), dtype=np.int64)
        np.maximum.at(largest, rows.row_of_term, np.abs(rows.coeff))
        tight = (rows.upper != INT_MAX) & (rows.upper - activity < largest)
        block = np.asarray(self._block, dtype=np.int64)[rows.var]
        pairs = np.unique(np.stack([rows.row_of_term, block])[:, block != SHARED], axis=1)
        shared = np.bincount(pairs[0], minlength=len(rows.lower)) > 1
        held = (tight & shared)[rows.row_of_term] & (values[rows.var] > 0) & (block != SHARED)
        amount = rows.coeff[held] * values[rows.var[held]]
        return rows.row_of_term[held], block[held], amount

    def shared_vars(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self._block, dtype=np.int64) == SHARED)

    def _frozen(self) -> _Rows:
        if self._rows is None:
            sizes = np.fromiter((len(v) for v, _c in self._row_terms), dtype=np.int64)
            total = int(sizes.sum())
            bounds = np.asarray(self._row_bounds, dtype=np.int64).reshape(-1, 2)
            self._rows = _Rows(
                indptr=np.concatenate(([0], np.cumsum(sizes))),
                var=np.fromiter(
                    (x for v, _c in self._row_terms for x in v), dtype=np.int64, count=total
                ),
                coeff=np.fromiter(
                    (x for _v, c in self._row_terms for x in c), dtype=np.int64, count=total
                ),
                row_of_term=np.repeat(np.arange(len(sizes)), sizes),
                lower=bounds[:, 0],
                upper=bounds[:, 1],
                enforce=np.asarray(self._row_enforce, dtype=np.int64),
                var_lower=np.asarray(self._lower, dtype=np.int64),
                var_upper=np.asarray(self._upper, dtype=np.int64),
            )
        return self._rows

    # ------------------------------------------------------------------ checking
    def violated_rows(self, values: np.ndarray) -> list[int]:
        """Rows (and, as ``-1 - var``, variable bounds) that ``values`` violate."""
        rows = self._frozen()
        bad = [
            -1 - int(v)
            for v in np.flatnonzero((values < rows.var_lower) | (values > rows.var_upper))
        ]
        activity = np.zeros(len(rows.lower), dtype=np.int64)
        np.add.at(activity, rows.row_of_term, rows.coeff * values[rows.var])
        enforced = (rows.enforce < 0) | (values[np.maximum(rows.enforce, 0)] == 1)
        out = enforced & ((activity < rows.lower) | (activity > rows.upper))
        return bad + [int(r) for r in np.flatnonzero(out)]

    # ------------------------------------------------------------------ emitting
    def emit(
        self, objective: Objective, values: np.ndarray, free: np.ndarray | None = None
    ) -> tuple[cp_model.CpModel, np.ndarray]:
        """The CP-SAT model over the variables ``free`` (all when None), every other
        variable fixed at ``values``, hinted with ``values``. Its objective includes
        the fixed variables' part as an offset, so it is the full objective's value.
        Rows that the free variables' bounds cannot break are left out. Returns the
        model (reused by the next call: solve it first) and, per model variable, its
        index here."""
        rows = self._frozen()
        if free is None:
            chosen = np.arange(self.num_vars)
            touched = np.arange(len(rows.lower))
        else:
            chosen = np.unique(free)
            touched = self.rows_of(chosen)
        local = np.full(self.num_vars, -1, dtype=np.int64)
        local[chosen] = np.arange(len(chosen))
        # A row whose gate is fixed at 0 is not enforced.
        gate = rows.enforce[touched]
        gated = gate >= 0
        literal = np.where(gated, local[np.maximum(gate, 0)], -1)
        off = gated & (literal < 0) & (values[np.maximum(gate, 0)] != 1)
        touched, literal = touched[~off], literal[~off]
        # The touched rows' terms, row by row: split into free and fixed.
        starts = rows.indptr[touched]
        lengths = rows.indptr[touched + 1] - starts
        row = np.repeat(np.arange(len(touched)), lengths)
        term = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        term += np.repeat(starts, lengths)
        variables, coeffs = rows.var[term], rows.coeff[term]
        position = local[variables]
        inside = position >= 0
        fixed = np.zeros(len(touched), dtype=np.int64)
        np.add.at(fixed, row[~inside], coeffs[~inside] * values[variables[~inside]])
        # The free part's activity range over its variables' bounds.
        low = np.where(coeffs > 0, rows.var_lower[variables], rows.var_upper[variables]) * coeffs
        high = np.where(coeffs > 0, rows.var_upper[variables], rows.var_lower[variables]) * coeffs
        least = np.zeros(len(touched), dtype=np.int64)
        most = np.zeros(len(touched), dtype=np.int64)
        np.add.at(least, row[inside], low[inside])
        np.add.at(most, row[inside], high[inside])
        lower, upper = rows.lower[touched], rows.upper[touched]
        lower = np.where(lower == INT_MIN, INT_MIN, lower - fixed)
        upper = np.where(upper == INT_MAX, INT_MAX, upper - fixed)
        members = np.bincount(row[inside], minlength=len(touched))
        needed = (members > 0) & ((least < lower) | (most > upper))
        ends = np.cumsum(members)
        positions = position[inside].tolist()
        factors = coeffs[inside].tolist()

        model = self._scratch
        proto = model.proto
        proto.variables.clear()
        proto.constraints.clear()
        proto.clear_objective()
        proto.clear_solution_hint()
        for lo, hi in zip(
            rows.var_lower[chosen].tolist(), rows.var_upper[chosen].tolist(), strict=True
        ):
            proto.variables.add().domain.extend([lo, hi])
        for k in np.flatnonzero(needed).tolist():
            first, last = int(ends[k] - members[k]), int(ends[k])
            constraint = proto.constraints.add()
            linear = constraint.linear
            linear.vars.extend(positions[first:last])
            linear.coeffs.extend(factors[first:last])
            linear.domain.extend([int(lower[k]), int(upper[k])])
            if literal[k] >= 0:
                constraint.enforcement_literal.append(int(literal[k]))
        coefficients = objective.coefficients[chosen]
        used = np.flatnonzero(coefficients)
        proto.objective.vars.extend(used.tolist())
        proto.objective.coeffs.extend(coefficients[used].tolist())
        outside = np.ones(self.num_vars, dtype=bool)
        outside[chosen] = False
        proto.objective.offset = float(
            objective.offset + int(objective.coefficients[outside] @ values[outside])
        )
        proto.solution_hint.vars.extend(range(len(chosen)))
        proto.solution_hint.values.extend(values[chosen].tolist())
        return model, chosen


# --------------------------------------------------------------------------- solving


@dataclass
class SearchBudget:
    """What a search may spend. Deterministic: ``units`` of CP-SAT deterministic time
    (plus ``SUBSOLVE_OVERHEAD_UNITS`` per sub-solve); ``deadline_s``, a
    ``time.thread_time()`` value, is only a runaway guard (the calling thread's CPU
    time, which CP-SAT's one search worker runs in: a loaded machine does not trip it,
    nor the placements of other clusters solved at once on the loop's other threads,
    which the process's CPU time counted). Otherwise: the wall clock alone, ``deadline_s``
    a ``time.perf_counter()`` value, with ``units_per_s`` converting unit amounts (such
    as ``SUBSOLVE_UNITS``) to seconds."""

    deterministic: bool
    units: float
    deadline_s: float
    units_per_s: float
    guard_hit: bool = False

    def left(self) -> float:
        """What is still available: deterministic units, or wall seconds."""
        if not self.deterministic:
            return max(0.0, self.deadline_s - time.perf_counter())
        if time.thread_time() >= self.deadline_s:
            self.guard_hit = True
            return 0.0
        return max(0.0, self.units)

    def of_units(self, units: float) -> float:
        """``units`` in this budget's currency."""
        return units if self.deterministic else units / self.units_per_s

    def wall_limit_s(self) -> float:
        """CP-SAT's wall-clock limit for one deterministic solve: far beyond what its
        deterministic time takes even on a loaded machine (a runaway guard only)."""
        return max(1.0, 10.0 * (self.deadline_s - time.thread_time()))

    def charge(self, solver: cp_model.CpSolver, overhead_units: float) -> None:
        self.units -= solver.deterministic_time + overhead_units


@dataclass(frozen=True)
class SolverSettings:
    """CP-SAT settings shared by every solve of one placement."""

    seed: int = 0
    workers: int = 1  # search threads of a whole-model solve without determinism


@dataclass(frozen=True)
class Solved:
    status: str
    values: np.ndarray | None  # every variable of the model; None without a solution
    objective: int | None
    bound: float | None


def solve(
    model: BlockModel,
    objective: Objective,
    start: np.ndarray,
    budget: SearchBudget,
    settings: SolverSettings,
    *,
    limit: float | None = None,
    free: np.ndarray | None = None,
) -> Solved:
    """Solve the whole model (``free`` None) or the sub-model over ``free`` from
    ``start``, spending at most ``limit`` (in the budget's currency; default: all
    that is left)."""
    cp, chosen = model.emit(objective, start, free)
    solver = cp_model.CpSolver()
    params = solver.parameters
    params.random_seed = settings.seed
    # Light presolve: probing and symmetry detection cost more than they return on
    # the placement model (measured: 2-3x faster to a proven optimum).
    params.cp_model_probing_level = 0
    params.symmetry_level = 0
    # The hint is a complete solution, taken as the first one: searching near it
    # first ("hint search") only delays the real search (measured on the 20,000-GPU
    # benchmark: 2x lower objective in the same deterministic time when skipped).
    params.hint_conflict_limit = 0
    left = budget.left() if limit is None else min(limit, budget.left())
    if budget.deterministic:
        # One thread: parallel workers exchange solutions in timing-dependent order.
        params.num_workers = 1
        params.max_deterministic_time = max(1e-4, left)
        params.max_time_in_seconds = budget.wall_limit_s()
    else:
        params.num_workers = 1 if free is not None else max(1, settings.workers)
        params.max_time_in_seconds = max(0.01, left)
    status = solver.solve(cp)
    budget.charge(solver, SUBSOLVE_OVERHEAD_UNITS if free is not None else 0.0)
    if (
        budget.deterministic
        and status not in (cp_model.OPTIMAL, cp_model.INFEASIBLE)
        and solver.wall_time >= params.max_time_in_seconds * 0.99
    ):
        budget.guard_hit = True
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return Solved(solver.status_name(status), None, None, None)
    values = start.copy()
    values[chosen] = np.asarray(solver.response_proto.solution, dtype=np.int64)
    # The objective is integral: its bound rounds up (CP-SAT's may carry LP noise).
    return Solved(
        solver.status_name(status),
        values,
        round(solver.objective_value),
        float(math.ceil(solver.best_objective_bound - 1e-6)),
    )


# --------------------------------------------------------------------------- search


@dataclass
class SearchReport:
    """What a large-neighbourhood search did (for the placer's notes)."""

    sub_solves: int = 0
    improved: int = 0
    passes: int = 0
    start_objective: int = 0
    objective: int = 0
    unsolved: list[str] = field(default_factory=list)  # statuses of solves without a solution
    # The last solve over every variable at once, if the search got there.
    whole_status: str | None = None
    whole_bound: float | None = None

    def describe(self) -> str:
        return (
            f"decomposed search: {self.sub_solves} sub-model(s) in {self.passes} pass(es), "
            f"{self.improved} improved the layout (objective {self.start_objective:,} -> "
            f"{self.objective:,})"
        )


def related_neighbourhoods(
    model: BlockModel,
    blocks: Mapping[int, np.ndarray],
    order: Sequence[int],
    max_vars: int,
    values: np.ndarray,
) -> list[list[int]]:
    """One neighbourhood per block of ``order`` (its seed): the seed and the blocks
    holding the most of the binding rows the seed appears in (``BlockModel.binding``),
    up to ``max_vars`` variables -- the blocks it would have to trade capacity with."""
    held_row, held_block, held_amount = model.binding(values)
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for seed in order:
        mine = np.isin(held_row, model.rows_of(blocks[seed]))
        score = np.bincount(held_block[mine], weights=held_amount[mine])
        hood, count = [seed], len(blocks[seed])
        for other in np.argsort(-score, kind="stable").tolist():
            if score[other] <= 0:
                break
            if other != seed and other in blocks and count + len(blocks[other]) <= max_vars:
                hood.append(other)
                count += len(blocks[other])
        key = tuple(sorted(hood))
        if len(hood) > 1 and key not in seen:
            seen.add(key)
            out.append(hood)
    return out


def improve(
    model: BlockModel,
    objective: Objective,
    start: np.ndarray,
    floors: Mapping[int, int],
    budget: SearchBudget,
    settings: SolverSettings,
    whole_model_vars: int,
) -> tuple[np.ndarray, SearchReport]:
    """Large-neighbourhood search from the feasible ``start``.

    Every pass takes the improvable blocks -- whose part of the objective lies above
    ``floors[block]``, a lower bound of that part -- largest excess first, and
    re-solves each with the shared variables: first one block at a time (most of the
    gain, at a few milliseconds each); then, for a model of at most
    ``whole_model_vars`` variables, the whole model with the rest of the budget (its
    outcome is reported); for a larger one, each block together with the blocks it
    would have to trade capacity with (``related_neighbourhoods``), up to
    ``NEIGHBOURHOOD_VARS`` variables, then twice that. A size is repeated while a
    pass improves the objective by at least ``MIN_PASS_GAIN`` of it; a neighbourhood
    already solved to optimality is skipped while no row it touches has changed (its
    sub-model would be the same). The search ends after the whole model, after a pass
    of the largest size that gains less, or when the budget is spent."""
    values = start.copy()
    blocks = model.blocks()
    shared = model.shared_vars()
    report = SearchReport(start_objective=objective.value(values))
    # The largest neighbourhood: the whole model when small enough, else a few hundred
    # variables (larger sub-models rarely finish in their share of the budget).
    cap = model.num_vars if model.num_vars <= whole_model_vars else 2 * NEIGHBOURHOOD_VARS
    max_vars = 0  # one block per neighbourhood
    step = 0
    row_changed = np.zeros(model.num_rows, dtype=np.int64)  # step of a row's last change
    proven: dict[tuple[int, ...], tuple[int, np.ndarray]] = {}  # hood -> (step, its rows)
    enough = budget.of_units(SUBSOLVE_MIN_UNITS)
    while budget.left() >= enough:
        whole = max_vars >= model.num_vars
        if whole:
            hoods: list[list[int]] = [sorted(blocks)]
        else:
            excess = {
                b: int(objective.coefficients[v] @ values[v]) - floors.get(b, 0)
                for b, v in blocks.items()
            }
            order = sorted((b for b in blocks if excess[b] > 0), key=lambda b: (-excess[b], b))
            if max_vars == 0:
                hoods = [[b] for b in order]
            else:
                hoods = related_neighbourhoods(model, blocks, order, max_vars, values)
        report.passes += 1
        pass_start = objective.value(values)
        for hood in hoods:
            if budget.left() < enough:
                break
            known = proven.get(tuple(sorted(hood)))
            if known is not None and int(row_changed[known[1]].max(initial=0)) <= known[0]:
                continue
            step += 1
            before = objective.value(values)
            # Larger neighbourhoods get proportionally more time; the whole model all.
            scale = max(1.0, max_vars / NEIGHBOURHOOD_VARS)
            limit = None if whole else budget.of_units(SUBSOLVE_UNITS * scale)
            free = None if whole else np.concatenate([blocks[b] for b in hood] + [shared])
            outcome = solve(model, objective, values, budget, settings, limit=limit, free=free)
            report.sub_solves += 1
            if free is None or len(free) == model.num_vars:  # the whole model, in effect
                report.whole_status = outcome.status
                report.whole_bound = outcome.bound
            if outcome.values is None:
                report.unsolved.append(outcome.status)
                continue
            if outcome.status == "OPTIMAL" and free is not None:
                proven[tuple(sorted(hood))] = (step, model.rows_of(free))
            if outcome.objective is not None and outcome.objective < before:
                changed = np.flatnonzero(outcome.values != values)
                row_changed[model.rows_of(changed)] = step
                values = outcome.values
                report.improved += 1
        gain = pass_start - objective.value(values)
        if whole:
            break
        if gain >= MIN_PASS_GAIN * max(1, objective.value(values)):
            continue  # the same size again
        if max_vars >= cap:
            break
        # A model small enough is solved whole right after the one-block passes.
        max_vars = cap if cap == model.num_vars else min(2 * max_vars or NEIGHBOURHOOD_VARS, cap)
    report.objective = objective.value(values)
    return values, report


__all__ = [
    "INT_MAX",
    "INT_MIN",
    "SHARED",
    "BlockModel",
    "Objective",
    "SearchBudget",
    "SearchReport",
    "Solved",
    "SolverSettings",
    "improve",
    "related_neighbourhoods",
    "solve",
]

"""reconciler.placement.decompose: a block model, its sub-models, and the search.

- A sub-model fixes every variable outside its blocks at the incumbent's value: its
  rows keep what the fixed variables leave, and its objective is the full one.
- The search starts from a feasible solution and never ends worse; on a model small
  enough it ends with the whole model solved (here: to optimality).
- ``violated_rows`` names the rows (and variable bounds) a solution breaks.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from ortools.sat.python import cp_model

from reconciler.placement.decompose import (
    BlockModel,
    Objective,
    SearchBudget,
    SolverSettings,
    improve,
    solve,
)


def budget(units: float = 1.0) -> SearchBudget:
    return SearchBudget(
        deterministic=True, units=units, deadline_s=time.thread_time() + 30, units_per_s=0.1
    )


def test_cpu_spent_by_other_threads_does_not_trip_the_runaway_guard() -> None:
    # Other clusters' placements solved at once, on the loop's other threads.
    guarded = SearchBudget(
        deterministic=True, units=1.0, deadline_s=time.thread_time() + 0.5, units_per_s=0.1
    )

    def burn() -> None:
        end = time.thread_time() + 1.0
        while time.thread_time() < end:
            pass

    other = threading.Thread(target=burn)
    other.start()
    other.join()
    # Before: the process's CPU time, the other thread's second included, tripped it.
    assert guarded.left() == 1.0 and not guarded.guard_hit
    assert guarded.wall_limit_s() >= 1.0


@st.composite
def knapsacks(draw):
    """Blocks of 1-3 items (0..3 copies each, value and weight random) sharing one
    capacity row; inside a block, at most ``k`` copies in all. Start: nothing taken."""
    model = BlockModel()
    values: list[int] = []
    capacity: list[tuple[int, int]] = []
    for block in range(draw(st.integers(1, 5))):
        items = []
        for _ in range(draw(st.integers(1, 3))):
            var = model.new_var(0, 3, block)
            items.append(var)
            values.append(-draw(st.integers(1, 20)))  # minimised: value is negative
            capacity.append((draw(st.integers(1, 6)), var))
        model.add([(1, v) for v in items], upper=draw(st.integers(1, 4)))
    model.add(capacity, upper=draw(st.integers(0, 20)))
    objective = Objective(np.array(values, dtype=np.int64))
    return model, objective


@settings(max_examples=40, deadline=None)
@given(knapsacks())
def test_the_search_never_ends_worse_and_finishes_with_the_whole_models_optimum(case):
    model, objective = case
    start = np.zeros(model.num_vars, dtype=np.int64)
    assert not model.violated_rows(start)
    floors = {
        b: int(np.minimum(objective.coefficients[v], 0).sum() * 3)
        for b, v in model.blocks().items()
    }
    values, report = improve(model, objective, start, floors, budget(), SolverSettings(), 100)
    assert not model.violated_rows(values)
    assert objective.value(values) <= objective.value(start)
    assert report.whole_status == "OPTIMAL"
    whole = solve(model, objective, start, budget(), SolverSettings())
    assert objective.value(values) == whole.objective


def test_a_sub_model_keeps_what_the_fixed_blocks_leave_of_a_shared_row():
    """Two blocks share 10 units of capacity; block 1 holds 7 of them. Re-solving
    block 0 alone can take the 3 left, not 10."""
    model = BlockModel()
    a = model.new_var(0, 10, block=0)
    b = model.new_var(0, 10, block=1)
    model.add([(1, a), (1, b)], upper=10)
    objective = Objective(np.array([-1, 0], dtype=np.int64), offset=5)
    start = np.array([0, 7], dtype=np.int64)
    cp, chosen = model.emit(objective, start, free=np.array([a]))
    assert chosen.tolist() == [a]
    solver = cp_model.CpSolver()
    assert solver.solve(cp) == cp_model.OPTIMAL
    assert solver.value(cp.get_int_var_from_proto_index(0)) == 3
    # The objective includes the fixed part (here none but the offset): -3 + 5.
    assert solver.objective_value == 2


def test_a_row_gated_off_by_a_fixed_variable_is_left_out():
    model = BlockModel()
    gate = model.new_var(0, 1, block=1)
    x = model.new_var(0, 5, block=0)
    model.add([(1, x)], lower=4, enforce=gate)
    objective = Objective(np.array([0, 1], dtype=np.int64))
    off = solve(model, objective, np.array([0, 0]), budget(), SolverSettings(), free=np.array([x]))
    on = solve(model, objective, np.array([1, 4]), budget(), SolverSettings(), free=np.array([x]))
    assert off.values is not None and off.values[x] == 0
    assert on.values is not None and on.values[x] == 4


def test_violated_rows_names_broken_rows_and_bounds():
    model = BlockModel()
    x = model.new_var(0, 3, block=0)
    y = model.new_var(0, 3, block=0)
    model.add([(1, x), (1, y)], upper=4)
    model.add([(1, x)], lower=1)
    assert model.violated_rows(np.array([1, 3])) == []
    assert model.violated_rows(np.array([0, 3])) == [1]
    assert model.violated_rows(np.array([2, 5])) == [-1 - y, 0]

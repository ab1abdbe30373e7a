"""The shortcuts in the simulator's hot paths (``reconciler.sim.generations``, the
oracle's search) give bit-identical results to the forms they replaced (the simulator's
figures must not move when it gets faster)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.desired import DesiredState
from reconciler.sim.engine import (
    ServiceSim,
    synthetic_profile,
    token_gap_quantiles_s,
    weighted_quantile,
)
from reconciler.sim.generations import (
    _FREE_SLOT_ROW,
    EPS,
    DecodeGenerations,
    LengthCurves,
    _interp_pair,
    water_fill,
)
from reconciler.sim.oracle import _power_fit

_nonnegative = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
_signed = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


def _pair(values: list[tuple[float, float]], offset: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros(len(values) + offset)
    a[offset:] = [v[0] for v in values]
    return a[offset:], np.array([v[1] for v in values])


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.tuples(_nonnegative, _nonnegative), min_size=1, max_size=300),
    offset=st.integers(0, 7),
)
def test_ndarray_dot_is_matmul_bit_for_bit(values: list[tuple[float, float]], offset: int) -> None:
    # advance() uses ndarray.dot (cheaper to call) where it used ``@`` on 1-D cohort
    # slices, whose operands are never negative (counts, survivals, contexts).
    a, b = _pair(values, offset)
    assert a.dot(b).tobytes() == (a @ b).tobytes()


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.tuples(_signed, _signed), min_size=1, max_size=300),
    offset=st.integers(0, 7),
)
def test_ndarray_dot_is_matmul_up_to_the_sign_of_zero(
    values: list[tuple[float, float]], offset: int
) -> None:
    # With negative operands the two differ at most in an exact zero's sign (matmul's sum
    # starts from +0.0): why the engine's use is restricted to non-negative operands.
    a, b = _pair(values, offset)
    dot, matmul = a.dot(b), a @ b
    assert dot.tobytes() == matmul.tobytes() or dot == matmul == 0.0


@settings(max_examples=200, deadline=None)
@given(
    total=st.floats(0, 500),
    levels=st.lists(st.floats(0, 100), min_size=1, max_size=5),
    data=st.data(),
)
def test_water_fill_one_usable_bin_as_before(
    total: float, levels: list[float], data: st.DataObject
) -> None:
    # One usable bin is answered before the all-fit sum now: the same value either way.
    n = len(levels)
    usable = data.draw(st.integers(0, n - 1))
    weights = [float(data.draw(st.integers(1, 8))) if i == usable else 0.0 for i in range(n)]
    caps = data.draw(st.lists(st.floats(0, 200), min_size=n, max_size=n))
    out = water_fill(total, levels, weights, caps)
    expected = [0.0] * n
    if total > EPS and caps[usable] > EPS:
        cap = caps[usable]
        expected[usable] = cap if cap <= total else min(total, cap)
    assert [np.float64(x).tobytes() for x in out] == [np.float64(x).tobytes() for x in expected]


@settings(max_examples=200, deadline=None)
@given(
    scalar=_signed,
    values=st.lists(st.tuples(_signed, _nonnegative), min_size=1, max_size=300),
    offset=st.integers(0, 7),
)
def test_scratch_and_zero_d_operands_as_before(
    scalar: float, values: list[tuple[float, float]], offset: int
) -> None:
    # advance() hands its Python-float operand over as a 0-d array and writes results
    # into scratch arrays (``out``): the same bits as the expressions they replaced.
    a, b = _pair(values, offset)
    zero_d = np.zeros(())
    zero_d[()] = scalar
    out = np.full(a.size, np.nan)
    assert np.subtract(zero_d, a, out).tobytes() == (scalar - a).tobytes()
    assert np.add(a, zero_d, out).tobytes() == (a + scalar).tobytes()
    assert np.multiply(a, b, out).tobytes() == (a * b).tobytes()
    gained = np.subtract(a, b, out)
    assert np.divide(gained, b + 1.0, gained).tobytes() == ((a - b) / (b + 1.0)).tobytes()
    # ... and writes its dot products and sums into a 0-d array.
    total = np.zeros(())
    assert np.float64(float(a.dot(b, total))).tobytes() == a.dot(b).tobytes()
    reduced = np.float64(float(np.add.reduce(a, out=total)))
    assert reduced.tobytes() == np.add.reduce(a).tobytes()


def _generations(slots: int, staleness: int) -> DecodeGenerations:
    """A pool's generations for the router and idle-second shortcuts, which read
    neither the performance model nor the length curves."""
    curves = LengthCurves(np.arange(3.0), np.array([1.0, 0.5, 0.0]), np.array([0.0, 1.0, 1.5]))
    return DecodeGenerations(
        cast(Any, None),
        slots=slots,
        staleness=staleness,
        tolerance=0.05,
        idle_step_s=0.011,
        out_p99=100.0,
        out_max=200.0,
        lengths=curves,
    )


@settings(max_examples=200, deadline=None)
@given(
    total=st.floats(0, 500),
    ready=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    data=st.data(),
)
def test_route_one_taker_as_water_fill(total: float, ready: list[int], data: st.DataObject) -> None:
    # route() answers one slot with room before building water_fill's inputs.
    gens = _generations(len(ready), staleness=2)
    gens.used = len(ready)
    gens.ready = list(ready)
    gens.history = [[data.draw(st.floats(0, 50)), 0.0] for _ in ready]
    room = data.draw(st.lists(st.floats(0, 200), min_size=len(ready), max_size=len(ready)))
    levels = [h[0] for h in gens.history]
    expected = water_fill(total, levels, [float(r) for r in ready], room)
    out = gens.route(total, room)
    assert [np.float64(x).tobytes() for x in out] == [np.float64(x).tobytes() for x in expected]


def test_idle_rows_as_advance() -> None:
    # The engine writes a never-used pool's row with idle_rows(), not advance(): the row
    # of an idle pool (its idle step, its drain clock, the admissions; every slot free)
    # whatever it is called by, its clock moving by an idle step's tokens.
    stepped, idle = _generations(3, staleness=2), _generations(3, staleness=2)
    clock = 0.0
    for _second in range(5):
        row: list[float] = []
        assert stepped.advance(None, 0.0, 500.0, 1.0, row) == (0.0, 0.0)
        clock += 1.0 / 0.011
        assert row == [0.011, 0.0, 0.0, clock, 0.0, 0.0, 0.0, 0.0, *_FREE_SLOT_ROW * 3]
        row = []
        idle.idle_rows(0.0, row)
        assert row == [0.011, 0.0, 0.0, clock, 0.0, 0.0, 0.0, 0.0, *_FREE_SLOT_ROW * 3]
        assert idle.clock == stepped.clock == clock


def _power_fit_on_arrays(
    p1: tuple[int, float], p2: tuple[int, float], anchor: tuple[int, float]
) -> float | None:
    """``oracle._power_fit`` as it was, its bisection on 0-d arrays."""
    (n1, y1), (n2, y2), (na, ya) = p1, p2, anchor
    if n1 == n2 or max(n1, n2) >= na or y1 <= ya or y2 <= ya:
        return None

    def mismatch(g: np.ndarray) -> np.ndarray:
        result: np.ndarray = (y1 - ya) / (n1**-g - na**-g) - (y2 - ya) / (n2**-g - na**-g)
        return result

    grid = np.linspace(0.05, 12.0, 120)
    values = mismatch(grid)
    sign = np.flatnonzero(np.sign(values[:-1]) * np.sign(values[1:]) <= 0)
    if sign.size == 0:
        return None
    a, b = float(grid[sign[0]]), float(grid[sign[0] + 1])
    va = float(values[sign[0]])
    for _ in range(40):
        mid = (a + b) / 2.0
        if (float(mismatch(np.array(mid))) > 0) == (va > 0):
            a = mid
        else:
            b = mid
    return (a + b) / 2.0


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.integers(1, 3000), min_size=3, max_size=3, unique=True),
    ys=st.lists(st.floats(0.0, 0.2, allow_subnormal=False), min_size=3, max_size=3),
)
def test_power_fit_bisects_in_floats_as_on_arrays(counts: list[int], ys: list[float]) -> None:
    # _power_fit's bisection runs on Python floats (the same operations as on 0-d arrays).
    n1, n2, na = sorted(counts)
    points = ((n1, ys[0]), (n2, ys[1]), (na, min(ys[2], ys[0], ys[1]) / 2.0))
    assert _power_fit(*points) == _power_fit_on_arrays(*points)


@settings(max_examples=300, deadline=None)
@given(
    survival=st.lists(st.floats(0, 1), min_size=2, max_size=400),
    lengths=st.lists(st.floats(-5, 500, allow_nan=False), min_size=1, max_size=40),
    whole=st.booleans(),
    many=st.booleans(),
)
def test_interp_pair_is_two_interps_bit_for_bit(
    survival: list[float], lengths: list[float], whole: bool, many: bool
) -> None:
    # advance() interpolates survival and generated tokens in one complex interp on the
    # integer grid: the same bits as two real ones (with or without numpy's slope table,
    # which it builds when there are more points than grid steps).
    grid = np.arange(float(len(survival)))
    curve = np.sort(np.array(survival))[::-1]
    generated = np.concatenate(([0.0], np.cumsum((curve[:-1] + curve[1:]) / 2.0)))
    pair = np.empty(grid.size, dtype=np.complex128)
    pair.real, pair.imag = curve, generated
    x = np.array(lengths)
    if whole:
        x = np.floor(x)
    if many:  # more points than the grid: numpy's slope-table branch
        x = np.resize(x, grid.size + 1)
    both = _interp_pair(x, grid, pair, None, None)
    assert both.real.tobytes() == np.interp(x, grid, curve).tobytes()
    assert both.imag.tobytes() == np.interp(x, grid, generated).tobytes()


def test_length_curves_on_the_integer_grid_only() -> None:
    curves = LengthCurves(np.array([0.0, 2.0, 4.0]), np.array([1.0, 0.5, 0.0]), np.zeros(3))
    with pytest.raises(ValueError):
        DecodeGenerations(
            cast(Any, None),
            slots=1,
            staleness=0,
            tolerance=0.05,
            idle_step_s=0.011,
            out_p99=100.0,
            out_max=200.0,
            lengths=curves,
        )


def test_a_decode_pool_never_used_adds_nothing_to_first_steps_and_token_gaps(
    state: DesiredState,
) -> None:
    # _first_step_per_second and token_gap_quantiles_s skip a decode pool that never had
    # an instance (every second of its slots is a free slot's: no admissions, no token,
    # step 0): the same values as reading every pool, as they did.
    policy = state.policies["svc-b"]  # decode on H20, then H800
    profile = synthetic_profile("b", hours=0.05, peak_rps=8, seed=3)
    sim = ServiceSim(policy, state.clusters[policy.cluster], profile)
    sim.set_counts({("h800", "rdma"): 4.0}, {sim.decode_pools[0].gpu_type: 3}, {})
    while sim.t < 150:
        sim.step()
    assert len(sim.decode_pools) == 2
    assert sim.decode_gens[0].used and not sim.decode_gens[1].used
    pools = range(len(sim.decode_pools))
    seconds = slice(0, sim.t)
    num = den = fallback = np.zeros(sim.t)
    for q in pools:
        admitted = sim._slot_block("admitted", q, seconds)
        tau = sim._slot_block("tau", q, seconds)
        num = num + (admitted * tau).sum(axis=0)
        den = den + admitted.sum(axis=0)
        fallback = np.maximum(fallback, tau.max(axis=0))
    every_pool = np.where(den > 0, num / np.maximum(den, 1e-12), fallback)
    assert den.sum() > 0
    assert sim._first_step_per_second(seconds).tobytes() == every_pool.tobytes()
    for quantile in (0.5, 0.9, 1.0):
        for start, stop in ((0, sim.t), (30, 90), (100, sim.t)):
            steps = [sim._step_times(q, start, stop) for q in pools]
            expected = weighted_quantile(
                np.concatenate([tau for tau, _tokens in steps]),
                np.concatenate([tokens for _tau, tokens in steps]),
                quantile,
            )
            assert expected is not None
            assert token_gap_quantiles_s(sim, quantile, start, (stop,)) == [expected]

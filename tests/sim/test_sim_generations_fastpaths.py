"""The shortcuts in ``reconciler.sim.generations``' hot paths give bit-identical results to
the forms they replaced (the simulator's figures must not move when it gets faster)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.sim.generations import EPS, water_fill

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

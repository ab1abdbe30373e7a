"""The reactive reference: the headroom a policy that sizes from the past, exactly and
at once, needs for the attainment goal (reconciler.sim.reactive)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.sim.reactive import WINDOW_S, covered_share, reactive_role

HOUR_S = 3600


def _flat(level: float, seconds: int = HOUR_S) -> np.ndarray:
    return np.full(seconds, level)


def test_a_flat_load_needs_no_headroom() -> None:
    role = reactive_role(_flat(1000.0), _flat(1.0), 120.0, 600.0, 0.995)
    assert role.headroom == pytest.approx(0.0)
    assert role.capacity_multiple == pytest.approx(1.0)


def test_a_step_up_needs_headroom_of_the_step_when_it_carries_more_than_the_tail() -> None:
    """Demand doubles for ten minutes: the first start-up of it was sized before it
    began; that is far more than 0.5 % of the requests, so only +100 % covers them."""
    demand = _flat(1000.0)
    demand[1800:2400] *= 2.0
    requests = demand / 1000.0
    role = reactive_role(demand, requests, 120.0, 600.0, 0.995)
    assert role.headroom == pytest.approx(1.0)
    # With a loose goal the two windows of the step are the tail it may miss.
    loose = reactive_role(demand, requests, 120.0, 600.0, 0.9)
    assert loose.headroom == pytest.approx(0.0)


def test_a_dip_shorter_than_the_scale_in_window_is_held_through() -> None:
    """One quiet minute, then the usual load: a policy holding the highest minute of
    its scale-in window never sized down, so the return needs nothing."""
    demand = _flat(1000.0)
    demand[1800:1860] = 300.0
    held = reactive_role(demand, demand / 1000.0, 120.0, 600.0, 0.995)
    assert held.headroom == pytest.approx(0.0)
    unheld = reactive_role(demand, demand / 1000.0, 120.0, 0.0, 0.995)
    assert unheld.headroom > 2.0  # sized on the quiet minute, 1000 arrives


def test_holding_costs_capacity_after_a_peak() -> None:
    demand = _flat(1000.0)
    demand[1200:1500] = 3000.0
    short = reactive_role(demand, demand / 1000.0, 120.0, 60.0, 0.5)
    long = reactive_role(demand, demand / 1000.0, 120.0, 1200.0, 0.5)
    assert long.capacity_multiple > short.capacity_multiple


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(100.0, 10_000.0), min_size=30, max_size=90),
    st.sampled_from([0.9, 0.99, 0.995]),
    st.sampled_from([0.0, 300.0, 600.0]),
)
def test_the_headroom_found_is_the_least_that_covers_the_goal(
    levels: list[float], goal: float, hold_s: float
) -> None:
    """With the headroom it reports, the windows within capacity hold at least the
    goal's share of the requests, and with any less they do not."""
    demand = np.repeat(np.asarray(levels), WINDOW_S)
    role = reactive_role(demand, demand, 120.0, hold_s, goal)
    assert covered_share(demand, demand, 120.0, hold_s, role.headroom) >= goal
    if role.headroom > 0:
        assert covered_share(demand, demand, 120.0, hold_s, role.headroom * 0.999 - 1e-9) < goal

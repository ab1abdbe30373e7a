"""The reactive reference: the headroom a policy that sizes from the past, exactly and
at once, needs for the attainment goal (reconciler.sim.reactive)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.desired import DesiredState, load_desired_state
from reconciler.desired.models import ServicePolicy
from reconciler.sim.engine import LoadProfile
from reconciler.sim.reactive import (
    WINDOW_S,
    covered_at_multiples,
    covered_share,
    reactive_reference,
    reactive_role,
)

HOUR_S = 3600
# The example chat policy, for the property test (hypothesis does not take fixtures).
_CHAT_POLICY = load_desired_state(Path(__file__).resolve().parents[2]).policies["chat"]


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


# ------------------------------------------------------- attainment at a given spend


def _load(requests_per_s: np.ndarray) -> LoadProfile:
    """A load of ``requests_per_s`` per second, every request 1,000 prompt and 200
    output tokens."""
    prompt, output = np.full(100, 1000.0), np.full(100, 200.0)
    return LoadProfile.from_bins(
        requests_per_s,
        requests_per_s * 1000.0,
        requests_per_s * 1000.0**2,
        requests_per_s * 200.0,
        prompt,
        output,
        length_classes=4,
        sample=None,
        sample_weight=1.0,
        name="test",
        cyclic=False,
        notes=(),
    )


def _stepped(state: DesiredState) -> tuple[LoadProfile, ServicePolicy]:
    rps = _flat(10.0)
    rps[1800:2400] *= 2.0
    return _load(rps), state.policies["chat"]


def test_spending_the_reference_headroom_buys_the_goal_on_both_roles(
    state: DesiredState,
) -> None:
    """At the capacity multiples the reactive reference reports for the goal, its
    attainment at that spend covers the goal; what a policy spends beyond them buys no
    more than every request."""
    load, policy = _stepped(state)
    reference = reactive_reference(load, policy)
    multiples = {
        "prefill": reference.prefill.capacity_multiple,
        "decode": reference.decode.capacity_multiple,
    }
    assert covered_at_multiples(load, policy, multiples) >= policy.slo.attainment_goal
    assert covered_at_multiples(load, policy, {"prefill": 5.0, "decode": 5.0}) == 1.0


def test_the_worse_role_bounds_what_the_spend_buys(state: DesiredState) -> None:
    """A window counts only where both roles cover it: ample capacity on one role cannot
    make up for the other held to what follows demand exactly, which misses the step."""
    load, policy = _stepped(state)
    ample = {"prefill": 5.0, "decode": 5.0}
    decode_short = {"prefill": 5.0, "decode": 1.0}
    prefill_short = {"prefill": 1.0, "decode": 5.0}
    full = covered_at_multiples(load, policy, ample)
    assert covered_at_multiples(load, policy, decode_short) < full
    assert covered_at_multiples(load, policy, prefill_short) < full


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(1.0, 100.0), min_size=20, max_size=60),
    st.floats(0.5, 3.0),
    st.floats(1.0, 1.5),
)
def test_more_spend_never_covers_fewer_requests(
    levels: list[float], multiple: float, more: float
) -> None:
    load = _load(np.repeat(np.asarray(levels), WINDOW_S))
    policy = _CHAT_POLICY
    less = covered_at_multiples(load, policy, {"prefill": multiple, "decode": multiple})
    for role in ("prefill", "decode"):
        grown = {"prefill": multiple, "decode": multiple, role: multiple * more}
        assert covered_at_multiples(load, policy, grown) >= less

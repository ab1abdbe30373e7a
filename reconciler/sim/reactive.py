"""What reacting costs: the headroom a policy that cannot see the future needs.

oracle-min (``reconciler.sim.oracle``) knows the whole workload and starts instances a
start-up before the window that needs them. No deployed autoscaler can: an instance it
asks for at ``t`` serves from ``t + startup_s``, sized from what it knew at ``t``. On
traffic whose steps come without warning (the burst days of the evaluation matrix)
the gap between the two is not the policy's fault, and this module measures it.

The *reactive reference* is the best such sizing of its simple kind, with every other
handicap removed: at each moment it knows the demand of the minute just past exactly
(no scrape, no rate window, no noise), it keeps the highest of those minutes over its
scale-in window (the policy's ``scale_in_window_s``, as every policy here does), and
the capacity serving window ``w`` is ``(1 + h)`` times what it kept at ``startup_s``
before ``w`` began. A window whose demand exceeds that is a miss for every request in
it (an optimistic count: a real backlog also spills into the next windows). The
*reactive headroom* is the least ``h`` for which the windows within capacity hold
the attainment goal's share of the requests (a weighted quantile of demand over known
demand); its *capacity multiple* is the capacity that sizing holds over the day
divided by the capacity that follows demand exactly (what oracle-min's counts follow,
up to whole instances). Both per role, on prompt tokens/s (prefill) and output
tokens/s (decode).

Read the other way (``covered_at_multiples``), the reference says what share of the
requests a given spend keeps within capacity: at a policy's own GPU-hours per role (as
multiples of oracle-min's), how much attainment a constant headroom would have bought,
beside the policy's own, where no such sizing can meet the goals.

It is a reference, not a bound on every possible policy (one that knew when the
bursts come could do better; on seeded random bursts none can): where its capacity
multiple exceeds a goal such as "within 1.25x of oracle-min", no policy sizing from
the past with a constant headroom reaches that goal at the attainment goal on that
traffic, and the matrix says so next to the policies' figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reconciler.desired.models import ServicePolicy
from reconciler.sim.engine import LoadProfile

WINDOW_S = 60  # the minute the reference knows exactly, and oracle-min's window


@dataclass(frozen=True)
class ReactiveRole:
    """The reactive reference for one role."""

    headroom: float  # least h covering the goal's share of requests
    capacity_multiple: float  # capacity held / capacity that follows demand exactly

    def to_json(self) -> dict[str, float]:
        return {
            "headroom": round(self.headroom, 4),
            "capacity_multiple": round(self.capacity_multiple, 4),
        }


@dataclass(frozen=True)
class ReactiveReference:
    lag_s: dict[str, float]  # per role: the start-up the sizing must look back over
    hold_s: float  # the scale-in window over which it keeps the highest minute
    goal: float
    prefill: ReactiveRole
    decode: ReactiveRole

    @property
    def capacity_multiple(self) -> float:
        """The larger of the two roles' multiples (the fleet cannot do better than its
        worse role)."""
        return max(self.prefill.capacity_multiple, self.decode.capacity_multiple)

    def to_json(self) -> dict[str, object]:
        return {
            "lag_s": self.lag_s,
            "hold_s": self.hold_s,
            "goal": self.goal,
            "prefill": self.prefill.to_json(),
            "decode": self.decode.to_json(),
        }


def _rolling_mean(per_second: np.ndarray, window_s: int) -> np.ndarray:
    """``out[t]``: the mean of ``per_second`` over ``[t - window_s, t)`` (what is known
    at ``t``), over fewer seconds near the start."""
    cumulative = np.concatenate(([0.0], np.cumsum(per_second)))
    t = np.arange(per_second.size + 1)
    start = np.maximum(0, t - window_s)
    span = np.maximum(1, t - start)
    out: np.ndarray = (cumulative[t] - cumulative[start]) / span
    return out


def _window_table(
    per_second: np.ndarray, requests: np.ndarray, lag_s: float, hold_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per window of the load: its demand, what the reference kept for it, its
    requests, and whether it is usable (decided after the load began, with requests and
    something known)."""
    bins = per_second.size // WINDOW_S
    if bins < 2:
        empty = np.zeros(0)
        return empty, empty, empty, np.zeros(0, dtype=bool)
    demand = per_second[: bins * WINDOW_S].reshape(bins, WINDOW_S).mean(axis=1)
    weight = requests[: bins * WINDOW_S].reshape(bins, WINDOW_S).sum(axis=1)
    known_at = _rolling_mean(per_second, WINDOW_S)
    decided_s = np.arange(bins) * WINDOW_S - math.ceil(lag_s)
    # Windows decided before the load began are left out: the warm start covers them.
    usable = (decided_s >= WINDOW_S) & (weight > 0)
    # The highest minute known at any decision in [decided - hold, decided].
    looks = np.arange(0, max(0, math.floor(hold_s)) + 1, WINDOW_S)
    seconds = np.clip(decided_s[:, None] - looks[None, :], 0, per_second.size)
    known = known_at[seconds].max(axis=1)
    usable &= known > 0
    return demand, known, weight, usable


def _windows(
    per_second: np.ndarray, requests: np.ndarray, lag_s: float, hold_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per usable window: its demand, what the reference kept for it, its requests."""
    demand, known, weight, usable = _window_table(per_second, requests, lag_s, hold_s)
    return demand[usable], known[usable], weight[usable]


def _covers(demand: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Which windows' demand the capacity kept for them covers. A headroom read as a
    window's demand / known - 1 and added back can round just below the ratio it came
    from, so the last bits of a double are allowed."""
    return demand <= kept * (1.0 + 1e-12)


def _role_inputs(
    profile: LoadProfile, policy: ServicePolicy
) -> dict[str, tuple[np.ndarray, float]]:
    """Per role, its demand series (per second) and the start-up its sizing lags by."""
    return {
        "prefill": (profile.prompt_sum, policy.prefill.startup_s),
        "decode": (profile.output_sum, policy.decode.startup_s),
    }


def covered_share(
    per_second: np.ndarray, requests: np.ndarray, lag_s: float, hold_s: float, headroom: float
) -> float:
    """The share of requests in windows the reference covers with ``headroom``: an
    attainment ceiling for sizing from the past with that headroom (1.0 with no
    usable window)."""
    demand, known, weight = _windows(per_second, requests, lag_s, hold_s)
    if weight.size == 0:
        return 1.0
    within = _covers(demand, (1.0 + headroom) * known)
    return float(weight[within].sum() / weight.sum())


def reactive_role(
    per_second: np.ndarray, requests: np.ndarray, lag_s: float, hold_s: float, goal: float
) -> ReactiveRole:
    """The reference for one demand series (per second), weighting windows by their
    requests (module docstring): sized ``lag_s`` ahead, holding the highest minute of
    the last ``hold_s``."""
    demand, known, weight = _windows(per_second, requests, lag_s, hold_s)
    if weight.size == 0:
        return ReactiveRole(0.0, 1.0)
    ratio = demand / known
    order = np.argsort(ratio)
    covered = np.cumsum(weight[order]) / weight.sum()
    needed = float(ratio[order][min(int(np.searchsorted(covered, goal)), ratio.size - 1)])
    headroom = max(0.0, needed - 1.0)
    held = float(((1.0 + headroom) * known).sum())
    exact = float(demand.sum())
    return ReactiveRole(headroom, held / exact if exact > 0 else 1.0)


def covered_at_multiples(
    profile: LoadProfile, policy: ServicePolicy, multiples: dict[str, float]
) -> float:
    """The share of requests in windows the reference covers on both roles when each
    role holds ``multiples[role]`` times the capacity that follows its demand exactly:
    the attainment sizing from the past with a constant headroom buys for a given spend
    (optimistic as ``covered_share`` is), to set beside a policy's own attainment at
    that policy's own multiples of oracle-min per role. The headroom that spends a
    multiple ``m`` is ``m x sum(demand) / sum(known) - 1`` over the role's windows (the
    capacity multiple is linear in ``1 + h``); below the exact capacity it is negative,
    and the windows it covers are fewer. 1.0 with no usable window."""
    hold_s = policy.scaling.scale_in_window_s
    within: np.ndarray | None = None
    usable_both: np.ndarray | None = None
    for role, (series, lag_s) in _role_inputs(profile, policy).items():
        demand, known, weight, usable = _window_table(series, profile.count, lag_s, hold_s)
        if not usable.any():
            return 1.0
        # Each role's spend over its own usable windows, as reactive_role counts it.
        scale = multiples[role] * float(demand[usable].sum()) / float(known[usable].sum())
        covered = _covers(demand, scale * known)
        within = covered if within is None else within & covered
        usable_both = usable if usable_both is None else usable_both & usable
    assert within is not None and usable_both is not None
    if not usable_both.any():
        return 1.0
    return float(weight[within & usable_both].sum() / weight[usable_both].sum())


def reactive_reference(profile: LoadProfile, policy: ServicePolicy) -> ReactiveReference:
    """The reactive reference of a workload for a service: its roles' start-up times,
    its scale-in window and its attainment goal."""
    hold_s = policy.scaling.scale_in_window_s
    goal = policy.slo.attainment_goal
    inputs = _role_inputs(profile, policy)
    roles = {
        role: reactive_role(series, profile.count, lag_s, hold_s, goal)
        for role, (series, lag_s) in inputs.items()
    }
    return ReactiveReference(
        lag_s={role: lag_s for role, (_series, lag_s) in inputs.items()},
        hold_s=hold_s,
        goal=goal,
        prefill=roles["prefill"],
        decode=roles["decode"],
    )


__all__ = [
    "ReactiveReference",
    "ReactiveRole",
    "covered_at_multiples",
    "covered_share",
    "reactive_reference",
    "reactive_role",
]

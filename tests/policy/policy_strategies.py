"""Hypothesis strategies and checks shared by the property tests of the paper policy
(``test_policy_properties``) and of the planner (``test_policy_planner_properties``):
generated policy overrides, fleets, hostile floats, and whether a P/D ratio is inside
its bounds or could be within a role's min/max."""

from __future__ import annotations

import math

from hypothesis import strategies as st

from reconciler.desired.ratio import parse_ratio
from reconciler.policy.clamps import RoleBounds, ceil_count, floor_count
from reconciler.state import RoleCount, ServiceFleet

# Any float, as a hostile reading or a damaged memory could hold it: the special values
# often (drawn over all floats alike they are rare), and anything else.
any_float = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e6, 1e7),
    st.floats(1e300, 1e308),
)

RATIOS = ["1:5", "1:4", "1:3", "1:2", "2:3", "1:1", "3:2", "2:1", "3:1", "9:1"]


@st.composite
def policy_overrides(draw, granularity: str = "instance") -> dict:
    low, high = sorted(
        draw(st.lists(st.sampled_from(RATIOS), min_size=2, max_size=2)), key=parse_ratio
    )
    candidates = [r for r in RATIOS if parse_ratio(low) <= parse_ratio(r) <= parse_ratio(high)]
    target = draw(st.sampled_from(candidates))
    prefill_min = draw(st.integers(0, 6))
    decode_min = draw(st.integers(0, 6))
    metric = draw(st.sampled_from(["decode_tps", "prefill_tps"]))
    tiers = draw(
        st.sampled_from(
            [
                [],
                [{"metric": "tbt", "above": 1.0, "step_percent": 10}],
                [
                    {"metric": "tbt", "above": 1.0, "step_percent": 10},
                    {"metric": "tbt", "above": 1.5, "step_percent": 30},
                    {"metric": "ttft", "above": 1.0, "step_percent": 20},
                ],
            ]
        )
    )
    return {
        "prefill": {
            "min_instances": prefill_min,
            "max_instances": prefill_min + draw(st.integers(1, 150)),
        },
        "decode": {
            "min_instances": decode_min,
            "max_instances": decode_min + draw(st.integers(1, 300)),
        },
        "pd_ratio": {
            "target": target,
            "min": low,
            "max": high,
            "dynamic": draw(st.booleans()),
        },
        "scaling": {
            "metric": metric,
            "target_per_instance": draw(st.sampled_from([300, 1000, 1600, 2400, 9000])),
            "tolerance": draw(st.sampled_from([0.0, 0.05, 0.1, 0.2])),
            "scale_in_window_s": draw(st.sampled_from([0, 120, 300])),
            "scale_out_window_s": draw(st.sampled_from([0, 0, 60])),
            "cooldown_s": draw(st.sampled_from([0, 120])),
            "max_step_instances": draw(st.integers(1, 8)),
            "max_step_percent": draw(st.sampled_from([10, 50, 100, 300])),
            "latency_tiers": tiers,
            "granularity": granularity,
            # The prefill floor (rule 5a); ignored by the prefill_tps metric.
            "prefill_target_per_instance": draw(st.sampled_from([None, None, 2000, 5000, 12000])),
        },
    }


fleets = st.builds(
    lambda p, ps, d, ds: ServiceFleet(
        "svc", RoleCount(ready=p, starting=ps), RoleCount(ready=d, starting=ds)
    ),
    st.integers(0, 150),
    st.integers(0, 3),
    st.integers(0, 300),
    st.integers(0, 3),
)


def ratio_feasible(p: RoleBounds, d: RoleBounds, low: float, high: float) -> bool:
    """Is there any pair inside [min, max] of both roles with low <= P/D <= high?
    (Not counting the empty pair: scaling a loaded service to zero to satisfy a ratio
    is no answer.)"""
    for decode in range(max(d.min_instances, 1), d.max_instances + 1):
        lo = max(p.min_instances, ceil_count(decode * low))
        hi = min(p.max_instances, floor_count(decode * high))
        if lo <= hi:
            return True
    return False


def ratio_inside(prefill: int, decode: int, low: float, high: float) -> bool:
    if decode == 0:
        return prefill == 0
    return low * (1 - 1e-9) <= prefill / decode <= high * (1 + 1e-9)

"""Properties of the coordinated policy over generated policies, fleets, loads and
histories: monotone in load, never outside min/max, ratio inside its bounds when
min/max permit, no change inside the tolerance band, deterministic; of the shared
ratio arithmetic on its own; and of every autoscaler given a damaged history."""

from __future__ import annotations

import os
from fractions import Fraction
from functools import cache

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from policy_strategies import (
    RATIOS,
    any_float,
    fleets,
    policy_overrides,
    ratio_feasible,
    ratio_inside,
)
from policy_testkit import REPO_ROOT, make_policy

from reconciler.desired import load_desired_state
from reconciler.desired.loader import DesiredState
from reconciler.desired.ratio import parse_ratio
from reconciler.policy import PolicyHistory, decide, make_autoscaler
from reconciler.policy.base import DecisionInput, Recommendation
from reconciler.policy.clamps import RoleBounds, ceil_count, enforce_ratio
from reconciler.sim.hand_targets import with_hand_targets
from reconciler.state import RoleCount, Sample, ServiceFleet, ServiceMetrics

NOW = 10_000.0
SETTINGS = settings(max_examples=int(os.environ.get("POLICY_EXAMPLES", "150")), deadline=None)


@st.composite
def histories(draw) -> PolicyHistory:
    steps = draw(st.lists(st.tuples(st.integers(0, 150), st.integers(0, 300)), max_size=25))
    recs = tuple(
        Recommendation(NOW - 15.0 * (len(steps) - i), p, d) for i, (p, d) in enumerate(steps)
    )
    last_change = draw(st.sampled_from([None, NOW - 30.0, NOW - 1000.0]))
    return PolicyHistory(recommendations=recs, last_change_at_s=last_change)


@st.composite
def signal_values(draw) -> dict:
    decode_tps = draw(st.floats(0, 600_000, allow_nan=False))
    return {
        "decode_tps": decode_tps,
        "prefill_tps": decode_tps * draw(st.floats(0.5, 12)),
        "tbt": draw(st.floats(5, 90)),
        "ttft": draw(st.floats(100, 2500)),
    }


def signals(values: dict, factor: float = 1.0) -> ServiceMetrics:
    scaled = {k: v * factor if k.endswith("_tps") else v for k, v in values.items()}
    return ServiceMetrics("svc", **{k: Sample(v, NOW - 5) for k, v in scaled.items()})


@SETTINGS
@given(policy_overrides(), fleets, signal_values(), histories())
def test_never_below_min_or_above_max(overrides, fleet, values, history):
    policy = make_policy(**overrides)
    decision = decide(policy, fleet, signals(values), history, NOW)
    assert policy.prefill.min_instances <= decision.prefill <= policy.prefill.max_instances
    assert policy.decode.min_instances <= decision.decode <= policy.decode.max_instances


@SETTINGS
@given(policy_overrides(), fleets, signal_values(), histories())
def test_ratio_inside_its_bounds_when_min_and_max_permit(overrides, fleet, values, history):
    policy = make_policy(**overrides)
    bounds = (
        RoleBounds("prefill", policy.prefill.min_instances, policy.prefill.max_instances),
        RoleBounds("decode", policy.decode.min_instances, policy.decode.max_instances),
    )
    assume(ratio_feasible(*bounds, policy.pd_ratio.min, policy.pd_ratio.max))
    decision = decide(policy, fleet, signals(values), history, NOW)
    assert decision.reason != "metrics_missing"
    assert ratio_inside(
        decision.prefill, decision.decode, policy.pd_ratio.min, policy.pd_ratio.max
    ), decision.message


@SETTINGS
@given(policy_overrides(), fleets, signal_values(), histories(), st.floats(1.0, 4.0))
def test_monotone_in_load(overrides, fleet, values, history, factor):
    policy = make_policy(**overrides)
    lower = decide(policy, fleet, signals(values), history, NOW)
    higher = decide(policy, fleet, signals(values, factor), history, NOW)
    assert higher.prefill >= lower.prefill, (lower.message, higher.message)
    assert higher.decode >= lower.decode, (lower.message, higher.message)


@SETTINGS
@given(policy_overrides(), fleets, signal_values(), histories(), st.floats(1.0, 6.0))
def test_monotone_in_prefill_load_alone(overrides, fleet, values, history, factor):
    # More prompt tokens/s with the same decode load never means fewer instances of
    # either role (the floor only lifts prefill; the dynamic ratio only rises).
    overrides["scaling"]["metric"] = "decode_tps"
    overrides["scaling"]["prefill_target_per_instance"] = 5000
    policy = make_policy(**overrides)
    more_prompt = {**values, "prefill_tps": values["prefill_tps"] * factor}
    lower = decide(policy, fleet, signals(values), history, NOW)
    higher = decide(policy, fleet, signals(more_prompt), history, NOW)
    assert higher.prefill >= lower.prefill, (lower.message, higher.message)
    assert higher.decode >= lower.decode, (lower.message, higher.message)


@SETTINGS
@given(policy_overrides(), histories(), st.data())
def test_no_change_inside_the_tolerance_band(overrides, history, data):
    overrides["pd_ratio"]["dynamic"] = False
    overrides["scaling"]["latency_tiers"] = []
    policy = make_policy(**overrides)
    scaling, ratio = policy.scaling, policy.pd_ratio
    driven = "decode" if scaling.metric == "decode_tps" else "prefill"
    bounds = policy.role(driven)
    count = data.draw(
        st.integers(max(bounds.min_instances, 1), bounds.max_instances), label="driven"
    )
    # The other role sits where the ratio puts it (a consistent pair).
    if driven == "decode":
        prefill, decode = ceil_count(count * ratio.target), count
    else:
        prefill, decode = count, ceil_count(count / ratio.target)
    assume(policy.prefill.min_instances <= prefill <= policy.prefill.max_instances)
    assume(policy.decode.min_instances <= decode <= policy.decode.max_instances)
    assume(ratio_inside(prefill, decode, ratio.min, ratio.max))
    band = st.floats(1 - scaling.tolerance, 1 + scaling.tolerance)
    usage = data.draw(band, label="usage")
    load = count * scaling.target_per_instance * usage
    observed = {scaling.metric: Sample(load, NOW)}
    if driven == "decode" and scaling.prefill_target_per_instance is not None:
        # The prompt load inside the floor's band too.
        prefill_usage = data.draw(band, label="prefill usage")
        observed["prefill_tps"] = Sample(
            prefill * scaling.prefill_target_per_instance * prefill_usage, NOW
        )
    fleet = ServiceFleet("svc", RoleCount(ready=prefill), RoleCount(ready=decode))
    decision = decide(policy, fleet, ServiceMetrics("svc", **observed), history, NOW)
    assert (decision.prefill, decision.decode) == (prefill, decode), decision.message
    assert decision.reason == "within_tolerance"


@SETTINGS
@given(policy_overrides(), fleets, signal_values(), histories())
def test_same_inputs_give_the_same_decision(overrides, fleet, values, history):
    first = decide(make_policy(**overrides), fleet, signals(values), history, NOW)
    # A fresh but equal policy object (no cached numbers) and a decision in between.
    decide(make_policy(), fleet, signals(values, 2.0), PolicyHistory(), NOW)
    second = decide(make_policy(**overrides), fleet, signals(values), history, NOW)
    assert first == second


@SETTINGS
@given(st.data())
def test_group_granularity_gives_whole_groups(data):
    shape_prefill = data.draw(st.integers(1, 4))
    shape_decode = data.draw(st.integers(1, 8))
    shape_ratio = Fraction(shape_prefill, shape_decode)
    overrides = data.draw(policy_overrides("group"))
    # Bounds around the shape's ratio, min/max in whole groups.
    overrides["pd_ratio"] = {
        "target": float(shape_ratio),
        "min": float(shape_ratio) / 2,
        "max": float(shape_ratio) * 2,
    }
    groups_min = data.draw(st.integers(0, 3))
    groups_max = groups_min + data.draw(st.integers(1, 20))
    overrides["prefill"] = {
        "min_instances": groups_min * shape_prefill,
        "max_instances": groups_max * shape_prefill,
    }
    overrides["decode"] = {
        "min_instances": groups_min * shape_decode,
        "max_instances": groups_max * shape_decode,
    }
    overrides["deployment_group"] = {
        "prefill_instances": shape_prefill,
        "decode_instances": shape_decode,
    }
    policy = make_policy(**overrides)
    fleet = data.draw(fleets)
    decision = decide(
        policy, fleet, signals(data.draw(signal_values())), data.draw(histories()), NOW
    )
    if decision.reason == "metrics_missing":
        return
    groups = decision.decode // shape_decode
    assert (decision.prefill, decision.decode) == (groups * shape_prefill, groups * shape_decode), (
        decision.message
    )


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 60),
    st.integers(0, 60),
    st.integers(0, 20),
    st.integers(1, 60),
    st.integers(0, 20),
    st.integers(1, 60),
    st.sampled_from(RATIOS),
    st.sampled_from(RATIOS),
)
def test_enforce_ratio_lands_inside_whenever_a_pair_exists(
    prefill, decode, pmin, pspan, dmin, dspan, a, b
):
    low, high = sorted((parse_ratio(a), parse_ratio(b)))
    p_bounds = RoleBounds("prefill", pmin, pmin + pspan)
    d_bounds = RoleBounds("decode", dmin, dmin + dspan)
    prefill, decode = p_bounds.clip(prefill), d_bounds.clip(decode)
    clamps: list = []
    out_prefill, out_decode = enforce_ratio(prefill, decode, low, high, p_bounds, d_bounds, clamps)
    assert p_bounds.clip(out_prefill) == out_prefill
    assert d_bounds.clip(out_decode) == out_decode
    if ratio_inside(prefill, decode, low, high):
        assert (out_prefill, out_decode) == (prefill, decode) and not clamps
    elif ratio_feasible(p_bounds, d_bounds, low, high):
        assert ratio_inside(out_prefill, out_decode, low, high)
    else:
        assert [c.name for c in clamps] == ["ratio_unattainable"]


@cache
def repository() -> DesiredState:
    return load_desired_state(REPO_ROOT)


any_pairs = st.lists(st.tuples(any_float, any_float), max_size=5)


@st.composite
def damaged_histories(draw) -> PolicyHistory:
    counts = st.integers(-(10**9), 10**9)
    recommendations = draw(
        st.lists(st.builds(Recommendation, any_float, counts, counts), max_size=6)
    )
    # The paper policy's dynamic-ratio memory, and a key no one reads.
    extra_keys = st.sampled_from(["pd_mix_anchor", "pd_mix_ewma", "pd_mix_at_s", "other"])
    return PolicyHistory(
        recommendations=tuple(recommendations),
        last_change_at_s=draw(st.one_of(st.none(), any_float)),
        ttft_ms=tuple(draw(any_pairs)),
        tbt_ms=tuple(draw(any_pairs)),
        kv_usage=tuple(draw(any_pairs)),
        dynamic_ratio=draw(st.one_of(st.none(), any_float)),
        extra=tuple(draw(st.lists(st.tuples(extra_keys, any_float), max_size=4))),
    )


@SETTINGS
@given(
    st.sampled_from(["heteroscale", "heteroscale-paper", "hpa-gpu-util", "hpa-decode-tps"]),
    st.sampled_from(["chat", "summarize", "svc-a", "svc-b"]),
    fleets,
    damaged_histories(),
)
def test_a_damaged_history_never_makes_an_autoscaler_raise_or_leave_min_max(
    name, service, fleet, history
):
    """Every autoscaler reads the history a state document gave back; whatever numbers
    it holds, the next two decisions stay within min/max (the hand-set targets give the
    paper policy and the tokens/s HPA theirs)."""
    state = repository()
    policy = with_hand_targets(state.policies[service])
    autoscaler = make_autoscaler(name)
    for k in range(2):
        now = NOW + 15.0 * k
        metrics = ServiceMetrics(
            service,
            prefill_tps=Sample(50_000.0, now),
            decode_tps=Sample(8_000.0, now),
            ttft=Sample(900.0, now),
            tbt=Sample(40.0, now),
        )
        inputs = DecisionInput(policy, fleet, metrics, history, now, state.clusters[policy.cluster])
        decision = autoscaler.decide(inputs)
        history = decision.history
        assert policy.prefill.min_instances <= decision.prefill <= policy.prefill.max_instances
        assert policy.decode.min_instances <= decision.decode <= policy.decode.max_instances

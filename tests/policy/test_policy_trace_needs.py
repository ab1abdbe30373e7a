"""What a load needs of each role against the policy's bounds (``validate --trace``):
the P/D ratio at its mean rate and the counts at its busiest minute, as the planner
would size them, so a bound that excludes them is found before the traffic is."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from policy_testkit import length_buckets

from reconciler.desired import load_desired_state
from reconciler.desired.loader import DesiredState
from reconciler.policy.base import PolicyHistory
from reconciler.policy.capacity import ENGINE_LENGTH_BOUNDS, LatencyCorrection, RequestMix
from reconciler.policy.perf_context import capacities_for
from reconciler.policy.planner import perf_context, plan_decide
from reconciler.policy.trace_needs import (
    RATIO_SLACK,
    RatioNeed,
    TraceLoad,
    trace_out_of_reach,
    trace_peak_need,
    trace_ratio_need,
)
from reconciler.state import RoleCount, Sample, ServiceFleet, ServiceMetrics

REPO = Path(__file__).resolve().parents[2]
DURATION_S = 600.0


@pytest.fixture(scope="module")
def state() -> DesiredState:
    return load_desired_state(REPO)


def lengths(median: float, sigma: float, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(1, rng.lognormal(math.log(median), sigma, count)).round()


def need(state: DesiredState, service: str, prompts: np.ndarray, outputs: np.ndarray) -> RatioNeed:
    policy = state.policies[service]
    found = trace_ratio_need(policy, state.clusters[policy.cluster], load_of(prompts, outputs))
    assert found is not None
    return found


def load_of(
    prompts: np.ndarray, outputs: np.ndarray, arrival: np.ndarray | None = None
) -> TraceLoad:
    """The requests as the checks read them; without arrival times, spread evenly over
    ``DURATION_S``; with them, over time 0 to the last (as ``Workload.duration_s``)."""
    if arrival is None:
        arrival, duration_s = np.arange(prompts.size) * (DURATION_S / prompts.size), DURATION_S
    else:
        duration_s = float(arrival[-1])
    load = TraceLoad.of(arrival, prompts, outputs, duration_s)
    assert load is not None
    return load


# Long-context conversation (the Mooncake trace's shape): ~10,000-token prompts,
# ~350-token outputs, 30 requests/s.
LONG_PROMPTS = lengths(9_000, 0.5, 18_000, 1)
LONG_OUTPUTS = lengths(330, 0.4, 18_000, 2)
# Chat (the Azure trace's shape): ~1,000 / ~200 tokens.
CHAT_PROMPTS = lengths(1_000, 0.6, 18_000, 3)
CHAT_OUTPUTS = lengths(200, 0.5, 18_000, 4)


def test_long_prompts_need_more_prefill_than_a_2_to_1_bound_allows(state: DesiredState) -> None:
    """svc-a allows at most 2 prefill per decode; long prompts need more, so the
    bound would hold decode above its need by the ratio over the bound."""
    found = need(state, "svc-a", LONG_PROMPTS, LONG_OUTPUTS)
    assert found.ratio_max == pytest.approx(2.0)
    assert found.ratio > 2.0 * (1.0 + RATIO_SLACK)
    assert found.excess == pytest.approx(found.ratio / 2.0)
    text = found.warning("long.csv")
    assert text is not None
    assert text.startswith("service svc-a: the mix in long.csv")
    assert "pd_ratio max 2:1 holds decode at" in text
    assert f"{found.excess:.2f}x what it needs" in text


def test_the_same_service_on_chat_traffic_is_within_its_bounds(state: DesiredState) -> None:
    found = need(state, "svc-a", CHAT_PROMPTS, CHAT_OUTPUTS)
    assert found.ratio_min <= found.ratio <= found.ratio_max
    assert found.excess == 1.0
    assert found.warning("chat.csv") is None


def test_short_prompts_with_long_outputs_fall_below_the_minimum(state: DesiredState) -> None:
    """chat keeps at least 1 prefill per 3 decode; 100-token prompts with
    3,000-token outputs need far less, so the minimum holds prefill up."""
    found = need(state, "chat", lengths(100, 0.3, 18_000, 5), lengths(3_000, 0.3, 18_000, 6))
    assert found.ratio < found.ratio_min / (1.0 + RATIO_SLACK)
    assert found.excess == pytest.approx(found.ratio_min / found.ratio)
    text = found.warning("gen.csv")
    assert text is not None and "pd_ratio min 1:3 holds prefill at" in text


def test_each_role_is_sized_on_its_own_capacity_at_the_mean_load(state: DesiredState) -> None:
    """Decode instances x decode capacity is the mean output rate; prefill's count
    is at least the prompt rate over its capacity (more where unattainable prompts'
    work weighs more than the attainable mix the capacity is stated for)."""
    found = need(state, "svc-a", LONG_PROMPTS, LONG_OUTPUTS)
    rate = LONG_PROMPTS.size / DURATION_S
    assert found.decode_instances * found.capacities.decode_tps_per_instance == pytest.approx(
        rate * LONG_OUTPUTS.mean()
    )
    assert (
        found.prefill_instances * found.capacities.prefill_tps_per_instance
        >= rate * LONG_PROMPTS.mean()
    )


def test_the_planner_raises_decode_by_about_the_excess_the_check_states(
    state: DesiredState,
) -> None:
    """One planner cycle at the mean load of the long-prompt mix: the ratio clamp
    lifts decode from what decode needs to prefill / max, the excess ``validate``
    warns about (within whole instances)."""
    policy = state.policies["svc-a"]
    cluster = state.clusters[policy.cluster]
    found = need(state, "svc-a", LONG_PROMPTS, LONG_OUTPUTS)
    rate = LONG_PROMPTS.size / DURATION_S
    metrics = ServiceMetrics(
        "svc-a",
        prefill_tps=Sample(rate * LONG_PROMPTS.mean(), 0.0),
        decode_tps=Sample(rate * LONG_OUTPUTS.mean(), 0.0),
        prompt_tokens=length_buckets(LONG_PROMPTS, 0.0),
        output_tokens=length_buckets(LONG_OUTPUTS, 0.0),
    )
    prefill_now = math.ceil(found.prefill_instances)
    decode_now = math.ceil(found.decode_instances)
    fleet = ServiceFleet("svc-a", RoleCount(prefill_now), RoleCount(decode_now))
    decision = plan_decide(
        policy, fleet, metrics, PolicyHistory(), 0.0, perf_context(policy, cluster)
    )
    clamp = re.search(r"ratio_max\(decode: (\d+) -> (\d+);", decision.message)
    assert clamp is not None, decision.message
    sized, held = int(clamp[1]), int(clamp[2])
    # Both counts carry the planner's headroom; their quotient is the excess.
    assert held / sized == pytest.approx(found.excess, rel=0.15)
    assert decision.prefill / decision.decode == pytest.approx(found.ratio_max, rel=0.1)


def test_prefill_is_sized_at_the_least_count_whose_pooled_capacity_carries_the_load(
    state: DesiredState,
) -> None:
    """A prefill instance's capacity grows with the count it is pooled over, so the
    need is stated at the fixed point: the least count whose capacity carries the
    load (one fewer does not)."""
    policy = state.policies["svc-a"]
    perf = perf_context(policy, state.clusters[policy.cluster])
    assert perf is not None
    found = need(state, "svc-a", LONG_PROMPTS, LONG_OUTPUTS)
    mix = RequestMix.from_samples(LONG_PROMPTS, LONG_OUTPUTS, ENGINE_LENGTH_BOUNDS)
    prompt_tps = LONG_PROMPTS.size / DURATION_S * LONG_PROMPTS.mean()

    def instances_needed(count: int) -> float:
        caps = capacities_for(policy, perf, mix, count, LatencyCorrection())
        return (
            caps.prefill.demand_tps(perf.prefill, mix, prompt_tps) / caps.prefill_tps_per_instance
        )

    # The least count that carries the load, by a plain scan (the module bisects).
    count = next(n for n in range(1, 1000) if instances_needed(n) <= n)
    assert count > 1 and instances_needed(count - 1) > count - 1
    assert found.prefill_instances == pytest.approx(instances_needed(count))


def _arrivals(per_s: float, seconds: float, start_s: float = 0.0) -> np.ndarray:
    return start_s + np.arange(int(per_s * seconds)) / per_s


def test_the_busiest_minute_is_measured_and_sized_against_max_instances(
    state: DesiredState,
) -> None:
    """A quiet hour at 2 requests/s with one minute at 1,000: the counts are stated at
    that minute's rate, and chat's 64 prefill instances cannot serve it."""
    arrival = np.sort(np.concatenate([_arrivals(2.0, 3_600.0), _arrivals(998.0, 60.0, 1_800.0)]))
    count = arrival.size
    prompts, outputs = lengths(1_000, 0.6, count, 3), lengths(200, 0.5, count, 4)
    policy = state.policies["chat"]
    found = trace_peak_need(
        policy, state.clusters[policy.cluster], load_of(prompts, outputs, arrival)
    )
    assert found is not None
    assert found.requests_per_s == pytest.approx(1_000.0, abs=2.0)
    assert found.prefill_max == 64 and found.prefill_instances > 64
    text = found.warning("burst.csv")
    assert text is not None and text.startswith("service chat: the busiest minute of burst.csv")
    assert "prefill about" in text and "max_instances 64" in text
    # The same hour without the busy minute fits.
    quiet = _arrivals(2.0, 3_600.0)
    calm = trace_peak_need(
        policy,
        state.clusters[policy.cluster],
        load_of(prompts[: quiet.size], outputs[: quiet.size], quiet),
    )
    assert calm is not None and calm.requests_per_s == pytest.approx(2.0, abs=0.05)
    assert calm.warning("calm.csv") is None


def test_the_peak_counts_are_the_same_sizing_as_the_ratio_at_that_rate(
    state: DesiredState,
) -> None:
    """At a steady rate the busiest minute is the mean: both checks size alike."""
    arrival = _arrivals(30.0, DURATION_S)
    prompts, outputs = LONG_PROMPTS[: arrival.size], LONG_OUTPUTS[: arrival.size]
    policy = state.policies["svc-a"]
    cluster = state.clusters[policy.cluster]
    load = load_of(prompts, outputs, arrival)
    peak = trace_peak_need(policy, cluster, load)
    ratio = trace_ratio_need(policy, cluster, load)
    assert peak is not None and ratio is not None
    assert peak.prefill_instances == pytest.approx(ratio.prefill_instances, rel=0.02)
    assert peak.decode_instances == pytest.approx(ratio.decode_instances, rel=0.02)


def test_a_role_no_instance_can_serve_is_named_not_sized(state: DesiredState) -> None:
    """A 2 ms TBT is below one sequence's step for chat's model on any of its decode
    types: the check says so instead of sizing decode at a capacity of 0 (which would
    have read as billions of instances against max_instances)."""
    policy = state.policies["chat"]
    tight = policy.model_copy(update={"slo": policy.slo.model_copy(update={"tbt_ms": 2.0})})
    cluster = state.clusters[policy.cluster]
    load = load_of(CHAT_PROMPTS, CHAT_OUTPUTS)
    assert trace_out_of_reach(policy, cluster, load) == ()
    (found,) = trace_out_of_reach(tight, cluster, load)
    assert found[0] == "decode" and "no batch meets the 2 ms TBT" in found[1]
    assert trace_ratio_need(tight, cluster, load) is None
    assert trace_peak_need(tight, cluster, load) is None

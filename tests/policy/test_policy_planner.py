"""The SLO-guaranteed planner (``heteroscale``, the default): capacity from the model for the
live mix, headroom from what was kept, unattainable requests not chased, damped tiers."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_testkit import busy_floor, busy_taught, length_buckets

from reconciler.desired import load_desired_state
from reconciler.desired.models import DEFAULT_MIN_HEADROOM, ClusterSpec, RequestShape, ServicePolicy
from reconciler.durable import DurableState, decode, encode
from reconciler.latency_buckets import VLLM_ITL_BUCKETS_S
from reconciler.policy import make_autoscaler
from reconciler.policy.base import Decision, DecisionInput, PolicyHistory, Recommendation
from reconciler.policy.capacity import (
    LatencyCorrection,
    LengthHistogram,
    PrefillLoad,
    RequestMix,
    predicted_ttft_s,
    read_prefill_busy,
    transfer_s_per_token,
)
from reconciler.policy.forecast import (
    ForecastConfig,
    ForecastState,
    sizing_demand,
    update,
    values_for_bound,
)
from reconciler.policy.planner import (
    DRAIN_S,
    MAX_KEPT_ERRORS,
    MIN_KEPT_ERRORS,
    PEAK_MEMORY_S,
    Backlog,
    KeptCapacity,
    PlannerAutoscaler,
    PlannerMemory,
    RoleDemand,
    SizedDemand,
    _sized_demand,
    capacities_for,
    clear_caches,
    confirmed_decode_peak,
    declared_mix,
    decode_follows_prefill,
    decode_settled,
    factor_evidence,
    forecast_config,
    mix_explained_factor,
    observed_cycle_s,
    past_time,
    perf_context,
    plan_decide,
    role_demand,
    running_growth_tps,
    token_rate_spread,
    within_bucket,
)
from reconciler.state import RoleCount, Sample, ServiceFleet, ServiceMetrics

REPO = Path(__file__).resolve().parents[2]

# The errors a planner keeps at the example policies' 99.5 % attainment goal.
ERRORS_KEPT = values_for_bound(0.995, MAX_KEPT_ERRORS)


def _chat(**scaling: object) -> tuple[ServicePolicy, ClusterSpec]:
    state = load_desired_state(REPO)
    policy = state.policies["chat"]
    updates = {"target_per_instance": None, "prefill_target_per_instance": None, **scaling}
    policy = policy.model_copy(update={"scaling": policy.scaling.model_copy(update=updates)})
    return policy, state.clusters[policy.cluster]


def _metrics(
    now_s: float,
    prefill_tps: float | None,
    decode_tps: float | None,
    prompts: np.ndarray | None = None,
    ttft_ms: float | None = None,
    tbt_ms: float | None = None,
    prefill_queue: float | None = None,
    prefill_gpu_util: float | None = None,
) -> ServiceMetrics:
    rng = np.random.default_rng(1)
    prompts = prompts if prompts is not None else rng.lognormal(math.log(1000), 0.6, 4000)
    outputs = rng.lognormal(math.log(200), 0.5, 4000)
    sample = lambda v: None if v is None else Sample(v, now_s)  # noqa: E731
    return ServiceMetrics(
        "chat",
        prefill_tps=sample(prefill_tps),
        decode_tps=sample(decode_tps),
        ttft=sample(ttft_ms),
        tbt=sample(tbt_ms),
        prefill_queue=sample(prefill_queue),
        prefill_gpu_util=sample(prefill_gpu_util),
        prompt_tokens=length_buckets(prompts, now_s),
        output_tokens=length_buckets(outputs, now_s),
    )


def _fleet(prefill: int, decode: int, prefill_starting: int = 0, decode_starting: int = 0):  # type: ignore[no-untyped-def]
    return ServiceFleet(
        "chat", RoleCount(prefill, prefill_starting), RoleCount(decode, decode_starting)
    )


def test_is_registered_and_sizes_from_its_cluster() -> None:
    policy, cluster = _chat()
    planner = make_autoscaler("heteroscale")
    assert isinstance(planner, PlannerAutoscaler)
    decision = planner.decide(
        DecisionInput(
            policy, _fleet(10, 20), _metrics(0.0, 100_000, 20_000), PolicyHistory(), 0.0, cluster
        )
    )
    assert "capacity from the model" in decision.message


def test_a_missing_rate_holds_both_roles() -> None:
    policy, cluster = _chat()
    for prefill_tps, decode_tps in ((None, 20_000.0), (100_000.0, None), (math.nan, 20_000.0)):
        decision = plan_decide(
            policy,
            _fleet(10, 20),
            _metrics(0.0, prefill_tps, decode_tps),
            PolicyHistory(),
            0.0,
            perf_context(policy, cluster),
        )
        assert (decision.prefill, decision.decode) == (10, 20)
        assert decision.reason == "metrics_missing"


def _remembered(policy: ServicePolicy, cluster: ClusterSpec, fleet: ServiceFleet) -> PolicyHistory:
    """The planner's memory after one cycle of chat at 100,000 prompt and 20,000
    output tokens/s on ``fleet`` (a mix and a demand to size from)."""
    return plan_decide(
        policy,
        fleet,
        _metrics(-30.0, 100_000.0, 20_000.0),
        PolicyHistory(),
        -30.0,
        perf_context(policy, cluster),
    ).history


def test_a_hold_on_a_missing_rate_still_escalates_on_the_latency_tiers() -> None:
    """The rate says nothing about the latency that can be read: held blind, chat kept
    88.7% within both SLOs through a 30-minute gap in decode_tps on the rise of its day
    (98.0% with the tiers). A tier firing raises its role from the held size; the other
    role stays held. With nothing remembered to size from, the hold stands."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    slow = _metrics(0.0, 100_000.0, None, tbt_ms=3 * policy.slo.tbt_ms)
    history = _remembered(policy, cluster, _fleet(10, 20))
    decision = plan_decide(policy, _fleet(10, 20), slow, history, 0.0, perf)
    assert decision.reason == "latency_feedback"
    assert decision.prefill == 10 and decision.decode > 20
    assert "decode_tps missing" in decision.message
    assert "under the latency tiers: tbt" in decision.message
    assert decision.history.recommendations[-1].decode == decision.decode
    blind = plan_decide(policy, _fleet(10, 20), slow, PolicyHistory(), 0.0, perf)
    assert (blind.prefill, blind.decode, blind.reason) == (10, 20, "metrics_missing")


def test_prefill_is_said_slower_than_the_correction_takes_only_on_its_busy_fraction() -> None:
    """Prefill's factor may sit at the bound only because a gateway's TTFT is not yet
    learnt as an offset (chat behind 1.0 s of gateway: half an hour at 99.6% within
    both SLOs). Said only where the busy fraction, the instances' own speed, agrees,
    or where none is read at all (the factor is then all there is)."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    metrics = _metrics(0.0, 100_000.0, 20_000.0)
    said = "model out of reach: prefill"
    at_model = ((-60.0, 1.0, 0.02), (-30.0, 1.0, 0.02))
    slower = ((-60.0, 2.6, 0.02), (-30.0, 2.6, 0.02))
    for readings, expected in ((at_model, False), (slower, True), ((), True)):
        memory = PlannerMemory(
            correction=LatencyCorrection(prefill=2.0), prefill_busy_readings=readings
        )
        decision = plan_decide(
            policy, _fleet(10, 20), metrics, PolicyHistory(planner=memory), 0.0, perf
        )
        assert (said in decision.message) is expected, decision.message


def test_a_hold_under_the_tiers_waits_for_starting_instances_and_never_lowers() -> None:
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    history = _remembered(policy, cluster, _fleet(10, 20))
    slow = _metrics(0.0, 100_000.0, None, tbt_ms=3 * policy.slo.tbt_ms)
    starting = plan_decide(policy, _fleet(10, 20, 0, 4), slow, history, 0.0, perf)
    assert (starting.prefill, starting.decode) == (10, 24)
    assert starting.reason == "metrics_missing"
    fast = _metrics(0.0, 100_000.0, None, ttft_ms=10.0, tbt_ms=1.0)
    quiet = plan_decide(policy, _fleet(10, 20), fast, history, 0.0, perf)
    assert (quiet.prefill, quiet.decode) == (10, 20)
    assert quiet.reason == "metrics_missing"


def test_a_long_hold_under_the_tiers_stops_at_twice_what_the_model_sized() -> None:
    """A latency more instances cannot bring down (here a TBT at 3x the SLO whatever
    the count), through an hour of decode_tps missing, the fleet following each
    decision: decode stops at twice what the model sized for the last demand
    remembered. Capped at twice what runs instead, it rose every cycle its new
    instances were ready, to max_instances (svc-b: 13.7x the GPU-hours)."""
    policy, cluster = _chat(max_step_instances=1000, max_step_percent=1000.0)
    perf = perf_context(policy, cluster)
    history = _remembered(policy, cluster, _fleet(10, 20))
    memory = history.planner
    assert isinstance(memory, PlannerMemory) and memory.mix is not None
    caps = capacities_for(policy, perf, memory.mix, 10, memory.correction)
    sized = math.ceil(memory.decode_demand.last_value / caps.decode_tps_per_instance)
    decode = 20
    for cycle in range(120):
        now = 30.0 * cycle
        slow = _metrics(now, 100_000.0, None, tbt_ms=3 * policy.slo.tbt_ms)
        decision = plan_decide(policy, _fleet(10, decode), slow, history, now, perf)
        history, decode = decision.history, decision.decode
    assert decode == max(20, 2 * sized) < policy.decode.max_instances


@pytest.mark.parametrize(
    ("rates", "gauges", "said"),
    [
        ((0.0, 20_000.0), {"prefill_gpu_util": 0.8}, "prefill_tps reads 0 while prefill_gpu_util"),
        ((0.0, 20_000.0), {"prefill_queue": 12.0}, "prefill_tps reads 0 while prefill_queue"),
        ((100_000.0, 0.0), {"decode_running": 240.0}, "decode_tps reads 0 while decode_running"),
    ],
)
def test_a_rate_reading_0_while_the_role_works_holds_both_roles(
    rates: tuple[float, float], gauges: dict[str, float], said: str
) -> None:
    """A counter that stopped, or a query broken into 0, is present, fresh and finite:
    believed, it scaled chat to 1 prefill and 2 decode under its load (a prober's TTFT
    of 109 s). A rate of 0 while the role's gauges say it works holds, as a missing one
    does."""
    policy, cluster = _chat()
    metrics = replace(_metrics(0.0, *rates), **{k: Sample(v, 0.0) for k, v in gauges.items()})
    decision = plan_decide(
        policy, _fleet(10, 20), metrics, PolicyHistory(), 0.0, perf_context(policy, cluster)
    )
    assert (decision.prefill, decision.decode) == (10, 20)
    assert decision.reason == "metrics_missing"
    assert said in decision.message


def _ceilings(policy: ServicePolicy, cluster: ClusterSpec) -> tuple[float, float]:
    """Per instance: (prefill, decode) tokens/s no instance serves even at the fastest
    speed the correction admits."""
    perf = perf_context(policy, cluster)
    fastest = 1.0 / LatencyCorrection.MIN_FACTOR
    return (
        perf.prefill.prefill_ceiling_tps * fastest,
        perf.decode.decode_ceiling_tps * fastest,
    )


def _a_cycle_after_another(
    policy: ServicePolicy, cluster: ClusterSpec, metrics: ServiceMetrics
) -> tuple[PolicyHistory, Decision]:
    """The history after one cycle of chat on 10 prefill and 20 decode at 100,000
    prompt and 20,000 output tokens/s, and the decision 30 s later on ``metrics``."""
    planner = PlannerAutoscaler()
    before = planner.decide(
        DecisionInput(
            policy, _fleet(10, 20), _metrics(0.0, 100_000, 20_000), PolicyHistory(), 0.0, cluster
        )
    ).history
    decision = planner.decide(DecisionInput(policy, _fleet(10, 20), metrics, before, 30.0, cluster))
    return before, decision


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_rate_no_instance_could_serve_holds_and_is_not_remembered(role: str) -> None:
    """A target scraped twice or a counter reset read as a jump: a rate above what the
    role's instances could serve at any mix, at the fastest speed the correction admits.
    Believed, a 2-minute x10 spike held chat at twice static peak's GPU-hours for an
    hour (the forecaster remembered it). It holds, as a missing rate does, and leaves
    the planner's memory as it was."""
    policy, cluster = _chat()
    ceilings = _ceilings(policy, cluster)
    rates = [10 * ceilings[0] * 0.5, 20 * ceilings[1] * 0.5]  # half what could be served
    rates[0 if role == "prefill" else 1] *= 2.2  # 10 % beyond it
    before, decision = _a_cycle_after_another(policy, cluster, _metrics(30.0, *rates))
    assert (decision.prefill, decision.decode) == (10, 20)
    assert decision.reason == "metrics_missing"
    assert f"{role}_tps reads" in decision.message
    assert "a broken counter, not demand" in decision.message
    assert decision.history.planner == before.planner


def test_a_rate_the_instances_could_serve_is_believed() -> None:
    """Just within the ceiling is demand (an overloaded fleet serves beyond its SLO
    capacity), sized as such."""
    policy, cluster = _chat()
    prefill_ceiling, decode_ceiling = _ceilings(policy, cluster)
    rates = (10 * prefill_ceiling * 0.95, 20 * decode_ceiling * 0.95)
    decision = plan_decide(
        policy,
        _fleet(10, 20),
        _metrics(0.0, *rates),
        PolicyHistory(),
        0.0,
        perf_context(policy, cluster),
    )
    assert "a broken counter" not in decision.message
    assert decision.prefill > 10 and decision.decode > 20


def test_a_rate_beyond_the_instances_with_nothing_remembered_is_believed() -> None:
    """Engines the fleet does not count may serve it (a service taken over from
    Deployments heteroscale does not manage): with no demand remembered, or one
    remembered beyond the bound too, the rate is demand, sized as such, and not held at
    the few instances heteroscale runs."""
    policy, cluster = _chat(max_step_instances=1000, max_step_percent=1000.0)
    prefill_ceiling, decode_ceiling = _ceilings(policy, cluster)
    rates = (30 * prefill_ceiling, 40 * decode_ceiling)
    planner = PlannerAutoscaler()
    first = planner.decide(
        DecisionInput(policy, _fleet(2, 4), _metrics(0.0, *rates), PolicyHistory(), 0.0, cluster)
    )
    assert "a broken counter" not in first.message
    assert first.prefill > 30 and first.decode > 40
    again = planner.decide(
        DecisionInput(policy, _fleet(2, 4), _metrics(30.0, *rates), first.history, 30.0, cluster)
    )
    assert "a broken counter" not in again.message


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_rate_beyond_the_instances_with_its_latency_over_the_slo_is_believed(role: str) -> None:
    """A load beyond what the instances serve shows in the role's own latency: a rate
    the model cannot explain while it does is a load the model does not know (a
    mixture-of-experts model, whose tokens take the FLOPs of its active parameters
    only), believed rather than held through the rise."""
    policy, cluster = _chat()
    ceilings = _ceilings(policy, cluster)
    rates = [10 * ceilings[0] * 0.5, 20 * ceilings[1] * 0.5]
    rates[0 if role == "prefill" else 1] *= 2.2
    planner = PlannerAutoscaler()
    before = planner.decide(
        DecisionInput(
            policy, _fleet(10, 20), _metrics(0.0, 100_000, 20_000), PolicyHistory(), 0.0, cluster
        )
    ).history
    latency = {"ttft_ms": 2 * policy.slo.ttft_ms} if role == "prefill" else {"tbt_ms": 80.0}
    decision = planner.decide(
        DecisionInput(
            policy, _fleet(10, 20), _metrics(30.0, *rates, **latency), before, 30.0, cluster
        )
    )
    assert "a broken counter" not in decision.message
    assert decision.history.planner != before.planner


def test_a_latency_read_in_the_bucket_that_holds_the_slo_does_not_make_a_glitch_believed() -> None:
    """A reading in the histogram bucket that holds the SLO is no evidence of a miss:
    behind a gateway chat's p90 TTFT reads in vLLM's 1.0-2.5 s bucket around its 1.5 s
    SLO (and svc-b's TBT always in the one around its 20 ms), and every glitch was
    believed (+69% and +71% GPU-hours)."""
    policy, cluster = _chat()
    prefill_ceiling, decode_ceiling = _ceilings(policy, cluster)
    rates = (10 * prefill_ceiling * 0.5 * 2.2, 20 * decode_ceiling * 0.5)
    _before, decision = _a_cycle_after_another(
        policy, cluster, _metrics(30.0, *rates, ttft_ms=2_000.0)
    )
    assert "a broken counter, not demand" in decision.message


def test_instances_scaled_in_within_the_rate_window_count_as_serving() -> None:
    """The rate is a minute's: instances decided away within it served part of it, so
    what 40 prefill instances served is no broken counter after a scale-in to 10."""
    policy, cluster = _chat()
    prefill_ceiling, _ = _ceilings(policy, cluster)
    history = PolicyHistory(recommendations=(Recommendation(-45.0, 40, 20),))
    decision = plan_decide(
        policy,
        _fleet(10, 20),
        _metrics(0.0, 30 * prefill_ceiling, 20_000),
        history,
        0.0,
        perf_context(policy, cluster),
    )
    assert "a broken counter" not in decision.message


def test_an_idle_service_reading_0_is_sized_as_idle() -> None:
    """No request running, none waiting, GPUs at an idle engine's few percent: a rate
    of 0 is believed (the mix, not read this cycle, still keeps the size: the
    ``metrics_missing`` there is the mix's)."""
    policy, cluster = _chat()
    idle = replace(
        _metrics(0.0, 0.0, 0.0),
        prefill_gpu_util=Sample(0.01, 0.0),
        prefill_queue=Sample(0.0, 0.0),
        decode_running=Sample(0.0, 0.0),
    )
    decision = plan_decide(
        policy, _fleet(10, 20), idle, PolicyHistory(), 0.0, perf_context(policy, cluster)
    )
    assert "reads 0 while" not in decision.message


def test_a_tbt_no_batch_can_meet_holds_decode_where_it_runs_and_is_not_chased() -> None:
    # 2 ms between tokens: slower than the model's step for one sequence on any type.
    # No count of decode instances meets it, so decode is neither sized from a
    # capacity of 0 (a division by zero until found by the planner's property tests)
    # nor driven to max_instances by the TBT tiers; prefill is sized as usual.
    policy, cluster = _chat()
    policy = policy.model_copy(update={"slo": policy.slo.model_copy(update={"tbt_ms": 2.0})})
    decision = plan_decide(
        policy,
        _fleet(10, 20),
        _metrics(0.0, 100_000.0, 20_000.0, tbt_ms=60.0),
        PolicyHistory(),
        0.0,
        perf_context(policy, cluster),
    )
    assert decision.decode == 20
    assert "decode: SLO out of reach, no batch meets the 2 ms TBT" in decision.message
    assert "kept up with the work, at least 20 (where it runs)" in decision.message
    assert "tbt 60 ms above SLO: decode out of reach, not chased" in decision.message
    assert 5 <= decision.prefill <= 15  # ~100,000 x 1.1 / ~13,000 per instance


def test_a_decode_no_batch_of_which_meets_the_tbt_still_grows_to_keep_up() -> None:
    """Held where it runs, two decode instances would leave most of 60,000 output
    tokens/s waiting without bound: decode grows to what keeps up with the work at the
    largest batch (the TBT still not chased), and a larger fleet is never scaled in."""
    policy, cluster = _chat(max_step_instances=1000, max_step_percent=1000.0)
    policy = policy.model_copy(update={"slo": policy.slo.model_copy(update={"tbt_ms": 2.0})})
    perf = perf_context(policy, cluster)
    metrics = _metrics(0.0, 100_000.0, 60_000.0, tbt_ms=60.0)
    small = plan_decide(policy, _fleet(10, 2), metrics, PolicyHistory(), 0.0, perf)
    assert small.decode > 4
    assert "no batch meets the TBT: decode sized to keep up with the work" in small.message
    assert "kept up with the work, at least 2 (where it runs)" in small.message
    large = plan_decide(policy, _fleet(40, 120), metrics, PolicyHistory(), 0.0, perf)
    assert large.decode == 120


def test_without_overrides_each_role_is_sized_from_the_models_capacity() -> None:
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    assert perf is not None
    metrics = _metrics(0.0, 300_000.0, 40_000.0)
    decision = plan_decide(policy, _fleet(20, 20), metrics, PolicyHistory(), 0.0, perf)
    memory = decision.history.planner
    assert isinstance(memory, PlannerMemory) and memory.mix is not None
    caps = capacities_for(policy, perf, memory.mix, 20, memory.correction)
    # No forecast yet: the demand of now plus the minimum headroom.
    decode = math.ceil(40_000.0 * (1 + DEFAULT_MIN_HEADROOM) / caps.decode_tps_per_instance)
    attainable = caps.prefill.demand_tps(
        perf.prefill, memory.mix, 300_000.0 * (1 + DEFAULT_MIN_HEADROOM)
    )
    prefill = math.ceil(attainable / caps.prefill_tps_per_instance)
    assert (decision.prefill, decision.decode) == (prefill, decode)
    # The capacity is the model's, not a hand target: near the calibrated TP4 H20
    # decode capacity at the 50 ms SLO (~1,700 tokens/s at a ~1,300-token context).
    assert 1_400 < caps.decode_tps_per_instance < 1_900


def _first_decision_with_overrides(**scaling: object) -> Decision:
    """chat's first decision (no forecast yet) at 300,000 prompt and 40,000 output
    tokens/s, with overrides of 1,000 and 10,000 tokens/s per instance, so the
    arithmetic of the size is exact."""
    policy, cluster = _chat(
        target_per_instance=1000.0, prefill_target_per_instance=10_000.0, **scaling
    )
    return plan_decide(
        policy,
        _fleet(30, 30),
        _metrics(0.0, 300_000.0, 40_000.0),
        PolicyHistory(),
        0.0,
        perf_context(policy, cluster),
    )


def test_the_policys_least_headroom_replaces_the_default_floor() -> None:
    """``scaling.min_headroom``: a team that knows its service bursts sets the least
    headroom; with no forecast yet the size is the demand of now times one plus it."""
    for least in (0.0, 0.25, 0.5):  # within max_instances and the P/D ratio bounds
        decision = _first_decision_with_overrides(min_headroom=least)
        assert decision.decode == math.ceil(40_000 * (1 + least) / 1000.0)
        assert decision.prefill == math.ceil(300_000 * (1 + least) / 10_000.0)
        assert f"+{least:.0%} (forecast needs more history)" in decision.message


def test_the_least_headroom_also_raises_the_ceiling_over_the_hours_peak() -> None:
    # Steady load for an hour: the learnt headroom is ~0, so the floor sets the size,
    # and the ceiling (the hour's peak plus the floor) does not cut it back.
    sizes = {}
    for least in (0.1, 0.6):
        policy, cluster = _chat(
            target_per_instance=1000.0,
            prefill_target_per_instance=10_000.0,
            min_headroom=least,
            scale_in_window_s=0.0,
            cooldown_s=0.0,
        )
        perf = perf_context(policy, cluster)
        history, fleet = PolicyHistory(), _fleet(40, 40)
        for k in range(40):
            metrics = _metrics(30.0 * k, 300_000.0, 40_000.0)
            decision = plan_decide(policy, fleet, metrics, history, 30.0 * k, perf)
            history, fleet = decision.history, _fleet(decision.prefill, decision.decode)
        sizes[least] = decision.decode
    assert sizes[0.1] == math.ceil(40_000 * 1.1 / 1000.0)
    assert sizes[0.6] == math.ceil(40_000 * 1.6 / 1000.0)


def test_an_override_replaces_the_derived_capacity() -> None:
    decision = _first_decision_with_overrides()
    assert decision.decode == math.ceil(40_000 * (1 + DEFAULT_MIN_HEADROOM) / 1000.0)
    assert decision.prefill == math.ceil(300_000 * (1 + DEFAULT_MIN_HEADROOM) / 10_000.0)
    assert "(override)" in decision.message


def test_with_a_prefill_metric_the_target_overrides_prefill_and_decode_is_derived() -> None:
    """``target_per_instance`` belongs to the role the metric measures (as for every
    policy: ``policy_tps_targets``): with ``prefill_tps`` it is prefill's."""
    policy, cluster = _chat(metric="prefill_tps", target_per_instance=10_000.0)
    derived, _ = _chat()
    metrics = _metrics(0.0, 300_000.0, 40_000.0)
    decision = plan_decide(
        policy, _fleet(30, 30), metrics, PolicyHistory(), 0.0, perf_context(policy, cluster)
    )
    reference = plan_decide(
        derived, _fleet(30, 30), metrics, PolicyHistory(), 0.0, perf_context(derived, cluster)
    )
    assert decision.prefill == math.ceil(300_000 * (1 + DEFAULT_MIN_HEADROOM) / 10_000.0)
    assert decision.decode == reference.decode


def test_with_no_mix_ever_seen_no_declared_shape_and_no_override_it_holds() -> None:
    policy, cluster = _chat()
    policy = policy.model_copy(update={"request_shape": None})
    metrics = ServiceMetrics(
        "chat", prefill_tps=Sample(300_000.0, 0.0), decode_tps=Sample(40_000.0, 0.0)
    )
    decision = plan_decide(
        policy, _fleet(30, 30), metrics, PolicyHistory(), 0.0, perf_context(policy, cluster)
    )
    assert (decision.prefill, decision.decode) == (30, 30)
    assert "no request mix observed yet" in decision.message


def test_a_missing_mix_falls_back_to_the_last_known_one() -> None:
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    first = plan_decide(
        policy, _fleet(30, 30), _metrics(0.0, 300_000.0, 40_000.0), PolicyHistory(), 0.0, perf
    )
    bare = ServiceMetrics(
        "chat", prefill_tps=Sample(300_000.0, 30.0), decode_tps=Sample(40_000.0, 30.0)
    )
    second = plan_decide(policy, _fleet(30, 30), bare, first.history, 30.0, perf)
    assert "the last known one (t=0 s)" in second.message
    assert (second.prefill, second.decode) == (first.prefill, first.decode)


def _declared(policy: ServicePolicy, prompt_tokens: int, output_tokens: int) -> ServicePolicy:
    shape = RequestShape(prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    return policy.model_copy(update={"request_shape": shape})


def test_with_no_mix_ever_seen_it_sizes_from_the_declared_request_shape() -> None:
    # A new service, or an engine without length histograms: 300,000 prompt tokens/s
    # of ~1,150-token prompts is far beyond 5 prefill instances.
    policy, cluster = _chat()
    declared = _declared(policy, 1150, 210)
    bare = ServiceMetrics(
        "chat", prefill_tps=Sample(300_000.0, 0.0), decode_tps=Sample(40_000.0, 0.0)
    )
    decision = plan_decide(
        declared, _fleet(5, 5), bare, PolicyHistory(), 0.0, perf_context(declared, cluster)
    )
    assert decision.prefill > 5 and decision.decode > 5
    assert "the declared request_shape (1150 prompt / 210 output tokens)" in decision.message
    # The declared shape is not remembered as an observed mix.
    assert decision.history.planner is not None and decision.history.planner.mix is None


def test_a_mix_not_read_this_cycle_never_scales_a_role_in() -> None:
    policy, cluster = _chat()
    declared = _declared(policy, 1150, 210)
    light = ServiceMetrics(
        "chat", prefill_tps=Sample(10_000.0, 0.0), decode_tps=Sample(2_000.0, 0.0)
    )
    decision = plan_decide(
        declared, _fleet(30, 30), light, PolicyHistory(), 0.0, perf_context(declared, cluster)
    )
    assert (decision.prefill, decision.decode) == (30, 30)
    assert "prefill: no scale-in on a mix not read this cycle" in decision.message
    # A hold for want of a reading, as for any missing signal (a review counts it as
    # unsized), not "within_tolerance".
    assert decision.reason == "metrics_missing"
    # Read this cycle, the same light load scales in (after the window allows it).
    read = _metrics(0.0, 10_000.0, 2_000.0)
    fresh = plan_decide(
        declared, _fleet(30, 30), read, PolicyHistory(), 0.0, perf_context(declared, cluster)
    )
    assert "no scale-in on a mix not read" not in fresh.message


def test_unattainable_prompts_are_reported_and_never_chased() -> None:
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    rng = np.random.default_rng(2)
    prompts = rng.lognormal(math.log(1000), 0.6, 4000)
    prompts[::8] = 200_000.0  # one in eight: far beyond what an idle instance prefills in 1.5 s
    calm = _metrics(0.0, 300_000.0, 40_000.0, prompts=prompts)
    alarmed = _metrics(0.0, 300_000.0, 40_000.0, prompts=prompts, ttft_ms=7_500.0)
    quiet = plan_decide(policy, _fleet(30, 30), calm, PolicyHistory(), 0.0, perf)
    loud = plan_decide(policy, _fleet(30, 30), alarmed, PolicyHistory(), 0.0, perf)
    assert "unattainable" in quiet.message
    assert "not chased" in loud.message
    assert loud.prefill == quiet.prefill  # a TTFT at 5x the SLO adds nothing


def test_a_mix_no_prompt_of_which_meets_the_slo_is_still_sized_to_keep_up() -> None:
    """Every prompt far beyond what an idle instance prefills within the TTFT: no count
    meets the SLO, but one instance serving many times its sustained rate drops
    requests while its queue grows. The planner sizes for the work (the model's
    sustained rate), says why, and does not chase the TTFT; half the load wants about
    half the instances."""
    policy, cluster = _chat(max_step_instances=1000, max_step_percent=1000.0)
    perf = perf_context(policy, cluster)
    prompts = np.full(4000, 200_000.0)

    def decided(prompt_tps: float) -> Decision:
        metrics = _metrics(0.0, prompt_tps, 100.0, prompts=prompts, ttft_ms=2_500_000.0)
        return plan_decide(policy, _fleet(1, 2), metrics, PolicyHistory(), 0.0, perf)

    heavy, light = decided(200_000.0), decided(100_000.0)
    assert "prefill sized to keep up with the work, not the TTFT" in heavy.message
    assert "not chased" in heavy.message
    assert heavy.prefill > 4
    assert light.prefill == pytest.approx(heavy.prefill / 2, abs=1)
    # Out of reach, fewer instances would only queue the prompts longer: a fleet larger
    # than the work needs is held, not scaled in.
    metrics = _metrics(0.0, 100_000.0, 100.0, prompts=prompts, ttft_ms=2_500_000.0)
    large = plan_decide(policy, _fleet(40, 8), metrics, PolicyHistory(), 0.0, perf)
    assert large.prefill == 40 and "kept up with the work, at least 40" in large.message


def test_latency_tiers_do_not_escalate_while_instances_start() -> None:
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    # The model asks for fewer decode instances than the 40 ready (about 30); TBT at 2x
    # the SLO fires the +30% tier on the 40.
    hot = _metrics(0.0, 200_000.0, 40_000.0, tbt_ms=100.0)
    settled = plan_decide(policy, _fleet(20, 40), hot, PolicyHistory(), 0.0, perf)
    starting = plan_decide(
        policy, _fleet(20, 40, decode_starting=4), hot, PolicyHistory(), 0.0, perf
    )
    assert settled.decode == math.ceil(40 * 1.3)
    assert starting.decode == 44  # holds what it has, starting ones included
    assert "still starting, no escalation" in starting.message


def test_instances_stuck_past_their_progress_deadline_are_not_waited_for() -> None:
    """Four decode instances that crash-loop are in decode's size but not on their way:
    the TBT tier escalates as it would with none starting (waiting for them kept it
    silent for as long as they looped), and the decision says why."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    hot = _metrics(0.0, 200_000.0, 40_000.0, tbt_ms=100.0)

    def decided(stuck: int) -> Decision:
        fleet = ServiceFleet(
            "chat", RoleCount(ready=20), RoleCount(ready=40, starting=4, stuck=stuck)
        )
        return plan_decide(policy, fleet, hot, PolicyHistory(), 0.0, perf)

    waiting, stuck = decided(0), decided(4)
    assert "still starting, no escalation" in waiting.message
    assert stuck.decode == math.ceil(40 * 1.3) and "decode +30% of 40 ready" in stuck.message
    assert "4 decode instance(s) not ready past their progress deadline" in stuck.message


def test_a_latency_read_in_the_bucket_that_holds_the_slo_does_not_escalate() -> None:
    """svc-b's TBT SLO, 20 ms, lies inside vLLM's (10, 25] ms bucket: its p90 reads
    23.5 ms for any step in it, so such a reading cannot tell a tail within the SLO
    from one beyond it and leaves decode where the model sizes it. A reading in the
    (25, 50] ms bucket is a miss whatever the interpolation, and the tier fires."""
    state = load_desired_state(REPO)
    policy = state.policies["svc-b"]
    assert policy.slo.tbt_ms == 20
    perf = perf_context(policy, state.clusters[policy.cluster])
    fleet = _fleet(20, 40)

    def decide(tbt_ms: float | None, policy: ServicePolicy = policy):  # type: ignore[no-untyped-def]
        # About 38 decode instances' worth: a +10% tier on the 40 is within the
        # largest model error the correction takes, so it would show.
        metrics = _metrics(0.0, 200_000.0, 130_000.0, tbt_ms=tbt_ms)
        return plan_decide(policy, fleet, metrics, PolicyHistory(), 0.0, perf)

    quiet, ambiguous, missed = decide(None), decide(23.5), decide(30.0)
    assert ambiguous.decode == quiet.decode == 40  # the model sizes no more than runs
    assert "read in the bucket 10-25 ms that holds the SLO: no evidence" in ambiguous.message
    assert missed.decode == math.ceil(40 * 1.1)
    assert "decode +10% of 40 ready" in missed.message
    # Read through the user's own query, the bounds are unknown: the value is taken as
    # exact and the tier fires on it.
    queries = policy.metrics.model_copy(update={"queries": {"tbt": "my_tbt_p90_ms"}})
    overridden = policy.model_copy(update={"metrics": queries})
    assert decide(23.5, overridden).decode == math.ceil(40 * 1.1)


def test_latency_tiers_stop_at_the_largest_model_error_the_correction_takes() -> None:
    """Light demand: the model sizes decode at a handful of instances while 40 run,
    and TBT still reads 2x the SLO. Ten times the model's count not meeting the SLO is
    no model error (the correction takes up to ``MAX_FACTOR``, 2x): the +30% tier is
    held to twice the model's count, so it adds nothing to the 40, and says so. (On
    engines slower than their model, such a tier grew decode without end.)"""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    hot = _metrics(0.0, 50_000.0, 5_000.0, tbt_ms=100.0)
    calm = _metrics(0.0, 50_000.0, 5_000.0)
    loud = plan_decide(policy, _fleet(20, 40), hot, PolicyHistory(), 0.0, perf)
    quiet = plan_decide(policy, _fleet(20, 40), calm, PolicyHistory(), 0.0, perf)
    assert loud.decode == quiet.decode == 40
    held = re.search(
        r"decode \+30% of 40 ready -> 52, held to (\d+) \(2x what the model sizes", loud.message
    )
    assert held is not None, loud.message
    assert int(held[1]) < 40


def test_scale_in_waits_for_the_whole_window() -> None:
    policy, cluster = _chat(scale_in_window_s=300.0, cooldown_s=0.0)
    perf = perf_context(policy, cluster)
    history = PolicyHistory()
    fleet = _fleet(60, 60)
    sizes = []
    for k in range(20):
        now = 30.0 * k
        decode_tps = 60_000.0 if now < 120 else 15_000.0
        decision = plan_decide(
            policy, fleet, _metrics(now, 400_000.0, decode_tps), history, now, perf
        )
        history = decision.history
        fleet = _fleet(decision.prefill, decision.decode)
        sizes.append((now, decision.decode))
    size = dict(sizes)
    # Too big from the start, but no scale-in before the history covers the window;
    # then only to what the high demand (until 120 s) asked for...
    assert all(size[t] == 60 for t in size if t < 300)
    high = size[300.0]
    assert high < 60
    # ...until the window has passed since the drop at 120 s.
    assert all(size[t] >= high for t in size if t < 120 + 300)
    assert size[570.0] < high


def test_headroom_grows_with_how_far_demand_outruns_what_was_kept() -> None:
    def headroom(sized: np.ndarray, demand: np.ndarray) -> float:
        """Sized each cycle for ``sized``, then ``demand`` arrived."""
        kept = KeptCapacity()
        for k, (want, value) in enumerate(zip(sized, demand, strict=True)):
            kept = kept.observe(30.0 * k, float(value), float(want), 210.0, 600.0, ERRORS_KEPT)
        room = kept.headroom(0.9)
        assert room is not None
        return room

    rng = np.random.default_rng(3)
    calm = 1000.0 * (1 + 0.02 * rng.standard_normal(200))
    bursty = calm.copy()
    bursty[rng.choice(200, 30, replace=False)] *= 1.8
    assert headroom(calm, calm) < 0.05 < 0.5 < headroom(calm, bursty)


@pytest.mark.parametrize(("goal", "kept"), [(0.995, True), (0.99, False)])
def test_a_burst_counts_in_the_headroom_as_long_as_the_goal_needs_errors(
    goal: float, kept: bool
) -> None:
    """The headroom bounds the next shortfall at the attainment goal from as many past
    ones as make that bound valid: 199 cycles (100 minutes) at 99.5 %, 99 at 99 %. A
    burst 84 minutes back still sets the headroom at 99.5 % (an hour's memory had let
    it go, and the burst days' next burst broke the TBT); at 99 % it has gone."""
    policy, cluster = _chat(scale_in_window_s=300.0, cooldown_s=0.0)
    policy = policy.model_copy(
        update={"slo": policy.slo.model_copy(update={"attainment_goal": goal})}
    )
    perf = perf_context(policy, cluster)
    history, fleet, message = PolicyHistory(), _fleet(40, 40), ""
    for k in range(230):
        level = 1.8 if k in (60, 61, 62) else 1.0  # one burst, 84 minutes before the end
        decision = plan_decide(
            policy,
            fleet,
            _metrics(30.0 * k, 100_000.0 * level, 20_000.0 * level),
            history,
            30.0 * k,
            perf,
        )
        history, message = decision.history, decision.message
        fleet = _fleet(decision.prefill, decision.decode)
    memory = history.planner
    assert isinstance(memory, PlannerMemory)
    assert len(memory.decode_kept.errors) == values_for_bound(goal, MAX_KEPT_ERRORS)
    rooms = [int(r) for r in re.findall(r"\+(\d+)% headroom", message)]
    assert len(rooms) == 2
    if kept:
        assert min(rooms) >= 50
    else:
        assert max(rooms) == round(100 * DEFAULT_MIN_HEADROOM)


def test_the_kept_peak_is_the_highest_demand_of_the_memory() -> None:
    rng = np.random.default_rng(5)
    demands = rng.lognormal(10.0, 0.5, 400)
    kept = KeptCapacity()
    for k, value in enumerate(demands):
        now = 30.0 * k
        kept = kept.observe(now, float(value), float(value), 210.0, 600.0, ERRORS_KEPT)
        first = max(0, k - int(PEAK_MEMORY_S // 30.0))
        assert kept.peak_tps == float(demands[first : k + 1].max())
    assert len(kept.peaks) < 30  # the sliding maximum stays short


def _run_chat(
    cycles: int, level: Callable[[int], float], cycle_s: float = 30.0
) -> tuple[ServiceFleet, str]:
    """``cycles`` cycles ``cycle_s`` apart of chat at ``level(k)`` x (100k prompt, 20k
    output tokens/s), scale-in window 300 s, no cooldown; the fleet and the message of
    the last cycle."""
    policy, cluster = _chat(scale_in_window_s=300.0, cooldown_s=0.0)
    perf = perf_context(policy, cluster)
    history, fleet = PolicyHistory(), _fleet(40, 40)
    message = ""
    for k in range(cycles):
        decision = plan_decide(
            policy,
            fleet,
            _metrics(cycle_s * k, 100_000.0 * level(k), 20_000.0 * level(k)),
            history,
            cycle_s * k,
            perf,
        )
        history, message = decision.history, decision.message
        fleet = _fleet(decision.prefill, decision.decode)
    return fleet, message


@pytest.mark.parametrize("cycle_s", [120.0, 300.0])
def test_at_a_long_cadence_a_steady_load_is_sized_as_at_the_default_one(cycle_s: float) -> None:
    """A loop run at ``--interval 300`` decides every five minutes. Its forecaster was
    spanned and sampled for 30 s cycles: the smoothing weights went above 1, the
    forecast swung wider each cycle, and within hours a steady load held chat at its
    ``max_instances``. Sized from the cadence its decisions show, for the wait to the
    next one, a steady load (+-3 %) needs what it needs at the default cadence."""
    rng = np.random.default_rng(5)
    noise = rng.normal(1.0, 0.03, 200)
    steady, _ = _run_chat(240, lambda k: float(noise[k % 200]))
    slow, message = _run_chat(48, lambda k: float(noise[k % 200]), cycle_s=cycle_s)
    assert f"forecast in {120 + cycle_s + 60:.0f} s" in message
    assert abs(slow.prefill.ready - steady.prefill.ready) <= 1
    assert abs(slow.decode.ready - steady.decode.ready) <= 2


def test_the_cadence_is_read_from_the_decisions_themselves() -> None:
    """The median gap between the remembered decisions and now, in whole seconds; one
    late cycle or an outage does not move it; with a single gap, the forecaster's mean
    gap over its samples; before any decision, the loop's default."""
    at = lambda *times: tuple(Recommendation(t, 1, 1) for t in times)  # noqa: E731
    assert observed_cycle_s((), 0.0) == 30.0
    assert observed_cycle_s(at(0.0), 300.0) == 300.0
    assert observed_cycle_s(at(0.0, 300.2, 600.1), 899.9) == 300.0
    # A late cycle, then an outage of an hour: the median is the cadence.
    assert observed_cycle_s(at(0.0, 30.0, 60.0, 150.0), 3750.0) == 30.0
    # A single gap after an outage longer than the window: the samples' mean gap.
    demand = ForecastState(samples=2881, first_at_s=0.0, last_at_s=86_400.0 + 1200.0)
    assert observed_cycle_s(at(86_400.0), 87_600.0, demand) == 30.0
    # A damaged memory's numbers stay within the loop's own bounds.
    broken = ForecastState(samples=3, first_at_s=0.0, last_at_s=1e300)
    assert observed_cycle_s(at(0.0), 1e9, broken) == 86_400.0
    assert observed_cycle_s(at(0.0), 1e-3) == 1.0
    # Times no decision was made at count for nothing (a property test found -inf).
    assert observed_cycle_s(at(-math.inf, math.nan, -1e308), 1e308) == 30.0
    assert observed_cycle_s(at(-math.inf, 0.0, 30.0), 60.0) == 30.0
    # A count of samples no cadence reaches (valid JSON, read back as it is) is not
    # divided by: an integer of 400 digits raised OverflowError.
    huge = ForecastState(samples=10**400, first_at_s=0.0, last_at_s=600.0)
    assert observed_cycle_s(at(0.0), 300.0, huge) == 300.0
    # A clock stepped back an hour after a day's step forward: no decision before now,
    # and samples after it, whose mean gap holds the steps (513 s), are not read.
    stepped = ForecastState(samples=180, first_at_s=0.0, last_at_s=91_740.0)
    assert observed_cycle_s(at(91_740.0), 88_140.0, stepped) == 30.0


def test_a_memory_counting_more_samples_than_a_float_holds_is_decided_as_usual() -> None:
    """A state document whose forecaster counts 10**400 samples, read back through the
    durable codec (its integers are read as they are), with one decision remembered:
    the decision is made, where the cadence's mean gap raised OverflowError every
    cycle (the failure keeps the memory, so the service was held for good)."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    history = _learnt_history(policy, cluster)
    history = replace(history, recommendations=history.recommendations[-1:])
    assert isinstance(history.planner, PlannerMemory)
    demand = replace(history.planner.prefill_demand, samples=10**400)
    damaged = replace(history, planner=replace(history.planner, prefill_demand=demand))
    text, _ = encode(DurableState("east", 600.0, histories={"chat": damaged}))
    stored = decode(text).histories["chat"]
    assert isinstance(stored.planner, PlannerMemory)
    assert stored.planner.prefill_demand.samples == 10**400
    metrics = _metrics(630.0, 250_000.0, 35_000.0, ttft_ms=700.0, tbt_ms=47.5)
    decision = plan_decide(policy, _fleet(30, 30), metrics, stored, 630.0, perf)
    sound = plan_decide(policy, _fleet(30, 30), metrics, history, 630.0, perf)
    assert (decision.prefill, decision.decode) == (sound.prefill, sound.decode)


def _burst_history(bursty: bool) -> tuple[ServiceFleet, str]:
    """Forty minutes of chat at 20k output tokens/s, with three 2x bursts when
    ``bursty``, then fifteen steady minutes at the bursts' level (longer than the
    scale-in window, shorter than the headroom's memory)."""

    def level(k: int) -> float:
        in_burst = k >= 80 or (bursty and k % 20 in (10, 11, 12))
        return 2.0 if in_burst or not bursty else 1.0

    return _run_chat(110, level)


def test_headroom_never_holds_more_than_the_hours_peak_demand() -> None:
    """Bursts leave shortfalls of +100% in the headroom's evidence; on a base as high
    as the bursts' that would hold twice a level not seen within the hour. The size
    stays at what the peak with the floor's headroom needs: what a service that always
    ran at that level gets."""
    bursty, message = _burst_history(bursty=True)
    steady, _ = _burst_history(bursty=False)
    assert "held to the hour's peak" in message
    assert (bursty.prefill.ready, bursty.decode.ready) == (
        steady.prefill.ready,
        steady.decode.ready,
    )


def test_the_message_names_what_held_the_headroom() -> None:
    """The ceiling is the hour's peak or, above it, the forecast, each with the floor's
    headroom: the message says which (it named the peak when the forecast set it)."""
    demand = RoleDemand(1_000.0, 0.0, None, None)
    config = ForecastConfig(min_headroom=0.1)
    state = ForecastState()
    for k in range(30):  # a ramp: Holt forecasts beyond what was seen
        state = update(state, 30.0 * k, 500.0 + 20.0 * k, config)
    kept = KeptCapacity(errors=(3.0,) * 20, peaks=((0.0, 900.0),))
    how = _sized_demand(900.0, demand, state, config, kept, 150.0, 600.0).how
    forecast_tps = float(how.split(" forecast")[0])
    assert forecast_tps > 900.0
    assert "held to the forecast +10% (above the hour's peak 1000)" in how  # now's, filed
    higher = KeptCapacity(errors=(9.0,) * 20, peaks=((0.0, 5_000.0),))
    how = _sized_demand(900.0, demand, state, config, higher, 150.0, 600.0).how
    assert "held to the hour's peak 5000 +10%" in how


def _rises(came_true: bool, count: int, start_s: float = 0.0) -> KeptCapacity:
    """A load at 1,000 tokens/s whose hour's peak is 1,000, forecast at 1,800 every
    cycle for ``count`` cycles; the demand then reaches 1,800 (``came_true``) or stays
    at 1,000, scored a horizon (150 s) later."""
    kept = KeptCapacity()
    for k in range(count + 6):
        now = start_s + 30.0 * k
        reached = 1_800.0 if came_true and k >= 5 else 1_000.0
        demand = 1_000.0 if k < 5 else reached
        kept = kept.observe(now, demand, 1_800.0 if k < count else None, 150.0, 600.0, 199)
    return kept


def test_a_rise_past_the_peak_is_trusted_as_far_as_such_rises_came_true() -> None:
    """Forecasts above the hour's peak are scored a horizon later by how much of their
    rise past it the demand reached. Until ten are scored the forecast is trusted
    whole; then at the attainment goal's bound of what came true: nothing of a load
    that returns to its old peak again and again, all of one that climbs."""
    assert _rises(came_true=False, count=5).rise_trust(800.0) == 1.0  # too few scored
    fell_back = _rises(came_true=False, count=20)
    assert len(fell_back.rises_scored_at) == MIN_KEPT_ERRORS
    assert fell_back.rise_trust(800.0) == 0.0
    assert _rises(came_true=True, count=20).rise_trust(800.0) == 1.0


def test_what_rises_came_true_is_learnt_over_the_hour_the_peak_is_remembered() -> None:
    """The first rise of an on-off load comes true (the hour's peak was lower then);
    kept beyond the peak's memory it would vouch for every later one."""
    kept = _rises(came_true=False, count=20)
    later = PEAK_MEMORY_S + 30.0 * 30
    kept = kept.observe(later, 1_000.0, 1_000.0, 150.0, 600.0, 199)
    assert kept.rises_true == () and kept.rise_trust(later) == 1.0


def test_a_damaged_memory_of_rises_is_read_as_far_as_sound() -> None:
    kept = KeptCapacity(
        rises=(
            (100.0, 1_000.0, 1_800.0, 1_000.0),
            (100.0, 2_000.0, 1_000.0, 0.0),
            (2e9, 1_000.0, 1_800.0, 1_000.0),
        ),
        rises_true=((10.0, 0.5), (10.0, 7.0), (math.nan, 0.2), (20.0, -1.0)),
        rises_scored_at=(10.0, math.inf, 60.0),
    )
    sound = kept.readable(50.0)
    # A forecast below its peak, and one due in 60 years, are dropped.
    assert sound.rises == ((100.0, 1_000.0, 1_800.0, 1_000.0),)
    # One already due (a restart read the memory back after its horizon) is kept, and
    # scored at the next observation.
    later = kept.readable(130.0)
    assert later.rises == ((100.0, 1_000.0, 1_800.0, 1_000.0),)
    scored = later.observe(130.0, 1_800.0, None, 150.0, 600.0, 199)
    assert scored.rises == () and scored.rises_true[-1] == (130.0, 1.0)
    assert sound.rises_true == ((10.0, 0.5),) and sound.rises_scored_at == (10.0,)


def _instances_on_off(trust_learnt: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """Chat at 2x its load for 10 minutes and 1x for 5, over and over, for 65 minutes
    (scale-in window 300 s, no cooldown): the instances asked for over the last 25
    minutes, summed, and the last message; ``trust_learnt`` False trusts every
    forecast's rise past the hour's peak whole (as before the planner learnt it)."""
    if not trust_learnt:
        monkeypatch.setattr(KeptCapacity, "rise_trust", lambda self, now_s: 1.0)
    policy, cluster = _chat(scale_in_window_s=300.0, cooldown_s=0.0)
    perf = perf_context(policy, cluster)
    history, fleet, total, message = PolicyHistory(), _fleet(40, 40), 0, ""
    for k in range(130):
        level = 2.0 if k % 30 < 20 else 1.0
        metrics = _metrics(30.0 * k, 100_000.0 * level, 20_000.0 * level)
        decision = plan_decide(policy, fleet, metrics, history, 30.0 * k, perf)
        history, message = decision.history, decision.message
        fleet = _fleet(decision.prefill, decision.decode)
        if k >= 80:
            total += decision.prefill + decision.decode
    return total, message


def test_an_on_off_load_is_not_sized_past_its_old_peak_once_its_rises_fell_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every switch up reads to Holt as a ramp and its forecast runs past the hour's
    peak; the demand only ever returns to that peak. Once such rises have been seen to
    fall back, the size is held to the peak with the floor: fewer instances than when
    every such forecast was trusted, and the message says how much of it was."""
    learnt, message = _instances_on_off(True, monkeypatch)
    trusting, _ = _instances_on_off(False, monkeypatch)
    assert learnt < trusting
    assert "0% of the forecast's rise past it (as far as such rises came true)" in message


def test_decode_carries_the_bursts_headroom_as_prefill_does() -> None:
    """A shortfall lasts until new instances serve (a start-up at least), longer than a
    request decodes, so it slows most tokens of every request decoding through it:
    the share of slow tokens a request's TBT tolerates does not make a decode shortfall
    cheaper than a prefill one. Decode covers the attainment goal's share of the
    shortfalls as prefill does; at the SLO quantile's share, three 2x bursts in twenty
    minutes left decode +10% where prefill carried +85%, and the next burst broke the
    TBT of the requests in it."""
    _fleet_after, message = _run_chat(75, lambda k: 2.0 if k % 20 in (10, 11, 12) else 1.0)
    rooms = dict(re.findall(r"(prefill|decode) [^;]*?\+(\d+)% headroom", message))
    assert int(rooms["prefill"]) > 50
    assert int(rooms["decode"]) == pytest.approx(int(rooms["prefill"]), abs=10)


def test_too_few_errors_give_no_headroom_of_their_own() -> None:
    kept = KeptCapacity()
    for k in range(5):
        kept = kept.observe(30.0 * k, 1000.0, 1000.0, 60.0, 60.0, ERRORS_KEPT)
    assert kept.headroom(0.9) is None


@pytest.mark.parametrize("horizon_s", [60.0, 210.0])
def test_only_sizings_old_enough_to_serve_count_as_kept(horizon_s: float) -> None:
    kept = KeptCapacity()
    kept = kept.observe(0.0, 1000.0, 500.0, horizon_s, 600.0, ERRORS_KEPT)  # nothing in force yet
    kept = kept.observe(30.0, 1000.0, 2000.0, horizon_s, 600.0, ERRORS_KEPT)
    assert kept.errors == ()
    kept = kept.observe(horizon_s + 30.0, 1000.0, 1000.0, horizon_s, 600.0, ERRORS_KEPT)
    # In force now: the larger of the sizings made at 0 and 30 s (2000), which the
    # demand did not outrun (500 would have been a shortfall of 100 %).
    assert kept.errors == (0.0,)


def test_the_request_mix_is_read_from_the_engines_histograms() -> None:
    rng = np.random.default_rng(4)
    prompts = rng.lognormal(math.log(1000), 0.6, 4000)
    metrics = _metrics(0.0, 1.0, 1.0, prompts=prompts)
    assert metrics.prompt_tokens is not None and metrics.output_tokens is not None
    mix = RequestMix.from_cumulative(
        zip(metrics.prompt_tokens.le, metrics.prompt_tokens.cumulative, strict=True),
        zip(metrics.output_tokens.le, metrics.output_tokens.cumulative, strict=True),
    )
    assert mix is not None
    # Coarse 1-2-5 buckets spread evenly: the mean within ~15 % of the samples'.
    assert mix.prompt_mean_tokens == pytest.approx(float(prompts.mean()), rel=0.15)


# ---------------------------------------------------------------- demand beyond what was served


def test_a_growing_queue_is_demand_the_served_rate_does_not_show() -> None:
    first = role_demand("prefill", 100_000.0, Sample(0.0, 0.0), 1000.0, None, 0.0, 60.0)
    assert first.arriving_tps == 100_000.0 and first.drain_tps == 0.0
    # 30 s later 600 requests of ~1,000 prompt tokens are waiting: 20,000 tokens/s
    # arrived that the instances could not serve, and the backlog must drain too.
    later = role_demand(
        "prefill", 100_000.0, Sample(600.0, 30.0), 1000.0, first.backlog, 30.0, 60.0
    )
    assert later.arriving_tps == pytest.approx(120_000.0)
    assert later.drain_tps == pytest.approx(600 * 1000.0 / DRAIN_S)
    assert later.note is not None and "queue growth" in later.note


def test_a_draining_queue_is_not_counted_as_demand() -> None:
    # The instances serve 150,000 tokens/s while the queue shrinks by 1,500,000 tokens in
    # 30 s: 50,000 of the served tokens/s were the backlog, not new arrivals.
    before = Backlog(0.0, 2_000_000.0)
    demand = role_demand("prefill", 150_000.0, Sample(500.0, 30.0), 1000.0, before, 30.0, 60.0)
    assert demand.arriving_tps == pytest.approx(100_000.0)


def test_the_queue_grows_over_the_window_the_served_rate_averages() -> None:
    """The served rate is a 60 s average, so the queue's growth is read over the same
    60 s: a backlog of 3,000,000 tokens emptied in the window's first half leaves the
    queue unchanged over the last cycle, but 50,000 of the 150,000 tokens/s served
    were that backlog, not new arrivals."""
    window_start = role_demand("prefill", 100_000.0, Sample(3000.0, 0.0), 1000.0, None, 0.0, 60.0)
    emptied = role_demand(
        "prefill", 150_000.0, Sample(0.0, 30.0), 1000.0, window_start.backlog, 30.0, 60.0
    )
    now = role_demand("prefill", 150_000.0, Sample(0.0, 60.0), 1000.0, emptied.backlog, 60.0, 60.0)
    assert now.arriving_tps == pytest.approx(100_000.0)
    # Readings are kept back to a window and a cycle: the one that opened this window
    # is still there for a cycle that runs late.
    assert now.backlog is not None and [at for at, _ in now.backlog.earlier] == [0.0, 30.0]
    later = role_demand("prefill", 100_000.0, Sample(0.0, 120.0), 1000.0, now.backlog, 120.0, 60.0)
    assert later.backlog is not None and [at for at, _ in later.backlog.earlier] == [30.0, 60.0]


def test_a_damaged_earlier_reading_is_dropped_not_read() -> None:
    # A state document read back damaged: earlier readings after the last one, NaN or
    # beyond any usable queue. Only the sound one is measured against.
    damaged = Backlog(30.0, 0.0, ((0.0, math.nan), (45.0, 1.0), (10.0, 1e300), (0.0, 600_000.0)))
    demand = role_demand("prefill", 100_000.0, Sample(0.0, 60.0), 1000.0, damaged, 60.0, 60.0)
    assert demand.arriving_tps == pytest.approx(100_000.0 - 600_000.0 / 60.0)
    assert demand.backlog is not None and demand.backlog.earlier == ((0.0, 600_000.0), (30.0, 0.0))
    # The last reading itself damaged: the new one is read as the first.
    for last in (Backlog(90.0, 0.0, ((0.0, 600_000.0),)), Backlog(math.nan, 0.0)):
        first = role_demand("prefill", 100_000.0, Sample(0.0, 60.0), 1000.0, last, 60.0, 60.0)
        assert first.arriving_tps == 100_000.0 and first.backlog == Backlog(60.0, 0.0)


def _decode_demand(
    served_tps: float, waiting: float, running: float | None, previous: Backlog | None, at_s: float
) -> RoleDemand:
    """Decode's demand with ``waiting`` and ``running`` requests read at ``at_s``: 800
    output tokens each while waiting, 400 still to generate each while running."""
    return role_demand(
        "decode",
        served_tps,
        Sample(waiting, at_s),
        800.0,
        previous,
        at_s,
        60.0,
        None if running is None else Sample(running, at_s),
        400.0,
    )


def test_decodes_demand_is_what_it_served_plus_the_growth_of_all_its_work() -> None:
    """Decode overloaded, then scaled out: its 2,000 waiting requests are admitted at
    once (the queue empties into the batch), and over the next minute the swollen batch
    drains, serving 45,000 output tokens/s. Its work is what waits (800 tokens a
    request) and what runs (400 still to generate a request, beyond the count's own
    noise: ``running_growth_tps``): the queue emptying into the batch is not read as its
    whole work served, nor the batch's drain as demand. Read from the queue alone, the
    first read as nothing arriving and the second as 45,000 tokens/s arriving: the
    phantom peak that held decode at twice its size for an hour after outputs grew 4x."""
    readings = [  # (at s, served tokens/s, waiting, running)
        (0.0, 25_000.0, 2_000.0, 1_000.0),
        (30.0, 25_000.0, 0.0, 3_000.0),
        (60.0, 25_000.0, 0.0, 3_000.0),
        (90.0, 45_000.0, 0.0, 2_000.0),
        (120.0, 45_000.0, 0.0, 1_000.0),
    ]
    with_batch: list[float] = []
    queue_alone: list[float] = []
    kept: Backlog | None = None
    alone: Backlog | None = None
    for at_s, served_tps, waiting, running in readings:
        demand = _decode_demand(served_tps, waiting, running, kept, at_s)
        kept = demand.backlog
        with_batch.append(demand.arriving_tps)
        demand_alone = _decode_demand(served_tps, waiting, None, alone, at_s)
        alone = demand_alone.backlog
        queue_alone.append(demand_alone.arriving_tps)

    def running_growth(k: int, then: int) -> float:
        # Over the window the served rate averages: from the reading at its start.
        _, served_tps, _, running_now = readings[k]
        return running_growth_tps(readings[then][3], running_now, 60.0, served_tps / 800.0, 400.0)

    assert with_batch[2:] == pytest.approx(
        [
            25_000.0 - 2_000 * 800 / 60.0 + running_growth(2, 0),  # 10,850: work went on
            45_000.0 + running_growth(3, 1),  # 39,276
            45_000.0 + running_growth(4, 2),  # 32,510
        ]
    )
    assert with_batch[2] > 10_000 and max(with_batch[3:]) < 40_000
    assert queue_alone[2:] == [0.0, 45_000.0, 45_000.0]
    # Only the queue is drained on top: the running work is being served.
    first = _decode_demand(25_000.0, 2_000.0, 1_000.0, None, 0.0)
    assert first.drain_tps == pytest.approx(2_000 * 800.0 / DRAIN_S)


def test_a_running_count_moving_within_its_noise_is_no_demand() -> None:
    """At 1.5 requests/s of long outputs (8,000 tokens, ~5,400 still to generate a
    running request), some 270 requests run and their count moves by about
    sqrt(2 x 90) = 13 a minute by chance alone; that is no demand, and a larger move
    counts only beyond two of those deviations."""
    completions_per_s = 1.5
    deviation = math.sqrt(2 * completions_per_s * 60.0)
    assert running_growth_tps(270.0, 270.0 + 1.9 * deviation, 60.0, 1.5, 5_400.0) == 0.0
    assert running_growth_tps(270.0, 270.0 - 1.9 * deviation, 60.0, 1.5, 5_400.0) == 0.0
    beyond = running_growth_tps(270.0, 270.0 + 3 * deviation, 60.0, 1.5, 5_400.0)
    assert beyond == pytest.approx(deviation * 5_400.0 / 60.0)
    # Short requests: the count's own size bounds its variance (the requests running a
    # minute apart are others), so a small batch's move of 20 is read.
    assert running_growth_tps(10.0, 30.0, 60.0, 100.0, 100.0) > 0.0


@given(
    st.floats(0, 5_000),
    st.floats(0, 5_000),
    st.floats(1.0, 600.0),
    st.floats(0, 1_000),
    st.floats(1.0, 20_000.0),
)
def test_running_growth_is_shrunk_towards_zero_never_past_it(
    then: float, now: float, span_s: float, completions_per_s: float, remaining: float
) -> None:
    grown = running_growth_tps(then, now, span_s, completions_per_s, remaining)
    raw = (now - then) * remaining / span_s
    assert abs(grown) <= abs(raw) + 1e-9
    assert grown == 0.0 or math.copysign(1.0, grown) == math.copysign(1.0, raw)
    assert running_growth_tps(now, then, span_s, completions_per_s, remaining) == pytest.approx(
        -grown
    )


def test_decodes_work_with_and_without_its_running_requests_is_not_compared() -> None:
    """A running-request reading that comes or goes between two cycles (a scrape that
    missed it) would read the whole batch's work as arrived or served: its growth is
    read only between two readings that have it."""
    with_running = _decode_demand(25_000.0, 0.0, 3_000.0, None, 0.0)
    assert with_running.backlog is not None and with_running.backlog.running == ((0.0, 3_000.0),)
    for running, previous in ((None, with_running.backlog), (3_000.0, Backlog(0.0, 0.0))):
        demand = _decode_demand(25_000.0, 0.0, running, previous, 60.0)
        assert demand.arriving_tps == 25_000.0
        assert demand.backlog is not None
        assert demand.backlog.running == (() if running is None else ((60.0, 3_000.0),))


def test_without_a_usable_queue_the_served_rate_stands_in() -> None:
    for queue, tokens in (
        (None, 1000.0),
        (Sample(math.nan, 0.0), 1000.0),
        (Sample(5.0, 0.0), None),
    ):
        demand = role_demand("prefill", 100_000.0, queue, tokens, None, 0.0, 60.0)
        assert (demand.arriving_tps, demand.drain_tps) == (100_000.0, 0.0)
        assert demand.note is not None and "served rate" in demand.note
    stale = role_demand("decode", 10_000.0, Sample(5.0, 0.0), 200.0, None, 600.0, 60.0)
    assert stale.arriving_tps == 10_000.0 and "served rate" in (stale.note or "")


def test_the_same_scrape_read_twice_adds_no_growth() -> None:
    first = role_demand("prefill", 100_000.0, Sample(100.0, 0.0), 1000.0, None, 0.0, 60.0)
    again = role_demand("prefill", 100_000.0, Sample(100.0, 0.0), 1000.0, first.backlog, 10.0, 60.0)
    assert again.arriving_tps == 100_000.0
    assert again.backlog == first.backlog


def test_an_overloaded_prefill_is_sized_beyond_what_it_serves() -> None:
    """Saturated, prefill serves the same tokens/s whatever arrives; only its queue
    shows the rest. Sized from the queue, it asks for more than from the served rate."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    history = PolicyHistory()
    sizes: dict[str, int] = {}
    for label, queues in (("served only", (None, None)), ("with queue", (0.0, 3000.0))):
        history = PolicyHistory()
        decision = None
        for k, queue in enumerate(queues):
            now = 30.0 * k
            metrics = _metrics(now, 300_000.0, 40_000.0, prefill_queue=queue)
            decision = plan_decide(policy, _fleet(25, 30), metrics, history, now, perf)
            history = decision.history
        assert decision is not None
        sizes[label] = decision.prefill
    # 3,000 requests of ~1,200 prompt tokens queued in 30 s: ~120,000 tokens/s more
    # arriving than served, and a backlog to drain on top.
    assert sizes["with queue"] > 1.5 * sizes["served only"] > 15


def test_in_steady_state_decode_demand_is_its_own() -> None:
    # Prefill serves what it is asked for and holds no backlog: decode's reading
    # stands, whatever the mix says about output per prompt token.
    decode = RoleDemand(20_000.0, 0.0, None, None)
    prefill = RoleDemand(100_000.0, 0.0, None, None)
    assert decode_follows_prefill(decode, prefill, 100_000.0, 0.5) is decode


@pytest.mark.parametrize(
    ("prefill", "prefill_served", "arriving", "drain", "note"),
    [
        # Prefill serves 100,000 prompt tokens/s but is asked for 180,000, and holds a
        # backlog it drains at 50,000: at 0.2 output per prompt token decode will be
        # asked for 16,000 more output tokens/s, and 10,000 more while the backlog
        # drains: a surge is decode demand before decode sees it.
        pytest.param(
            RoleDemand(180_000.0, 50_000.0, None, None),
            100_000.0,
            20_000.0 + 16_000.0,
            10_000.0,
            "+16000 output tokens/s held back at prefill",
            id="held back",
        ),
        # Prefill serves 150,000 prompt tokens/s of which 50,000 drain its backlog:
        # decode is passed 10,000 output tokens/s beyond what arrives and reads them as
        # served; that is backlog, not demand to forecast. The backlog still left
        # (40,000 prompt tokens/s to drain) is sized on top.
        pytest.param(
            RoleDemand(100_000.0, 40_000.0, None, None),
            150_000.0,
            20_000.0 - 10_000.0,
            8_000.0,
            "-10000 output tokens/s released from prefill's backlog",
            id="released",
        ),
    ],
)
def test_decode_demand_follows_what_prefill_holds_back_or_releases(
    prefill: RoleDemand, prefill_served: float, arriving: float, drain: float, note: str
) -> None:
    decode = RoleDemand(20_000.0, 0.0, None, None)
    followed = decode_follows_prefill(decode, prefill, prefill_served, 0.2)
    assert followed.arriving_tps == pytest.approx(arriving)
    assert followed.drain_tps == pytest.approx(drain)
    assert followed.note is not None and note in followed.note


def test_a_released_backlog_never_takes_decode_demand_below_nothing() -> None:
    # Whatever the mix's conversion says: 50,000 prompt tokens/s released at 5 output
    # tokens each is more than decode served.
    decode = RoleDemand(30_000.0, 0.0, None, None)
    prefill = RoleDemand(100_000.0, 40_000.0, None, None)
    assert decode_follows_prefill(decode, prefill, 150_000.0, 5.0).arriving_tps == 0.0


def test_decode_remembers_as_its_peak_only_what_the_arriving_requests_confirm() -> None:
    """A decode batch catching up after an overload serves more than arrives, and its
    running work's estimate (steady-state ages) takes only part of that off. The hour's
    peak keeps at most the output tokens/s the prompts reaching prefill bring (its
    demand and queue's drain, at the mix's output per prompt token) with two spreads of
    that figure; a demand within it is kept whole."""
    outputs = np.random.default_rng(5).lognormal(math.log(2000.0), 0.5, 4000)
    mix = RequestMix.from_samples(_prompts(1150.0), outputs)
    per_prompt_token = mix.output_mean_tokens / mix.prompt_mean_tokens
    prefill = RoleDemand(6_000.0, 900.0, None, None)
    entering = (6_000.0 + 900.0) * per_prompt_token
    catching_up = RoleDemand(1.4 * entering, 0.0, None, None)
    confirmed = confirmed_decode_peak(catching_up, prefill, mix)
    spread = token_rate_spread(mix.output, entering)
    assert 0.01 < spread < 0.1
    assert confirmed == pytest.approx(entering * (1.0 + 2.0 * spread))
    steady = RoleDemand(1.05 * entering, 0.0, None, None)
    assert confirmed_decode_peak(steady, prefill, mix) == steady.arriving_tps
    assert token_rate_spread(mix.output, 0.0) == math.inf


def test_decode_is_sized_for_a_prefill_surge_in_the_same_cycle() -> None:
    """A burst reaches decode only after prefill lets it through; sized from prefill's
    demand, decode grows in the cycle the surge shows at prefill, not a TTFT later."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    sizes: dict[str, int] = {}
    for label, queues in (("steady", (0.0, 0.0)), ("surge", (0.0, 3000.0))):
        history = PolicyHistory()
        decision = None
        for k, queue in enumerate(queues):
            now = 30.0 * k
            metrics = _metrics(now, 120_000.0, 24_000.0, prefill_queue=queue)
            decision = plan_decide(policy, _fleet(12, 16), metrics, history, now, perf)
            history = decision.history
        assert decision is not None
        sizes[label] = decision.decode
    assert sizes["surge"] > 1.5 * sizes["steady"]


def test_a_count_asked_for_a_backlog_is_not_held_once_it_has_drained() -> None:
    """A backlog is sized to drain within DRAIN_S; the scale-in window remembers what
    the demand needs, so once the queue is gone the extra instances go after the
    cooldown, not a whole scale-in window later."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    window_s = policy.scaling.scale_in_window_s
    assert window_s >= 3 * policy.scaling.cooldown_s  # room to tell the two apart
    mean_prompt = 1000.0 * math.exp(0.6**2 / 2)  # the lognormal mix of ``_metrics``
    backlog_tps = 3000 * mean_prompt / 60.0  # 3,000 queued, drained within a window
    history, fleet, counts, remembered = PolicyHistory(), _fleet(20, 30), [], []
    for k in range(60):
        now = 30.0 * k
        # Cycle 40 reads 3,000 queued requests; the instances drain them before the
        # next read, so the two windows reaching back over the drain served more.
        queue = 3000.0 if k == 40 else 0.0
        served = 250_000.0 + (backlog_tps if k in (41, 42) else 0.0)
        metrics = _metrics(now, served, 35_000.0, prefill_queue=queue)
        decision = plan_decide(policy, fleet, metrics, history, now, perf)
        history, fleet = decision.history, _fleet(decision.prefill, decision.decode)
        counts.append(decision.prefill)
        remembered.append(history.recommendations[-1].prefill)
    # The queue's growth is demand too (a surge the forecast and headroom remember);
    # the drain on top of it is what goes once the queue is gone, before the window.
    asked, for_demand = counts[40], remembered[40]
    assert asked > for_demand > counts[39]
    within_window = counts[41 : 40 + round(window_s / 30.0)]
    assert for_demand <= min(within_window) < asked


def test_sizings_made_before_any_forecast_are_not_remembered_as_kept() -> None:
    """Before the forecaster has a window of history the planner sizes from the demand
    of now, while the fleet keeps what it has: a low first reading must not come back
    as a shortfall of several hundred percent for the next hour."""
    kept = KeptCapacity()
    kept = kept.observe(0.0, 20_000.0, None, 210.0, 600.0, ERRORS_KEPT)  # no forecast yet
    for k in range(1, 40):
        kept = kept.observe(30.0 * k, 120_000.0, 120_000.0, 210.0, 600.0, ERRORS_KEPT)
    assert kept.errors and max(kept.errors) == pytest.approx(0.0)


# ---------------------------------------------------------------- a new request mix


def _prompts(mean_tokens: float, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(math.log(mean_tokens), 0.6, 4000)


def _after_prompt_switch(
    requests_per_s: Callable[[int], float], long_from_cycle: int | None, cycles: int = 22
) -> PlannerMemory:
    """The planner's memory after ``cycles`` cycles 30 s apart at ``requests_per_s(k)``
    requests/s, whose prompts (~1,000 tokens) turn ~3.5x longer from
    ``long_from_cycle`` on (None: never), half and half the cycle before, as a 60 s
    window straddling the switch shows it."""
    policy, cluster = _chat()
    short, long = _prompts(1000.0), _prompts(3500.0)
    history = PolicyHistory()
    for k in range(cycles):
        if long_from_cycle is None or k < long_from_cycle - 1:
            prompts = short
        elif k == long_from_cycle - 1:
            prompts = np.concatenate([short[:2000], long[:2000]])
        else:
            prompts = long
        tps = requests_per_s(k) * float(prompts.mean())
        metrics = _metrics(30.0 * k, tps, 40_000.0, prompts=prompts)
        perf = perf_context(policy, cluster)
        history = plan_decide(policy, _fleet(30, 30), metrics, history, 30.0 * k, perf).history
    memory = history.planner
    assert isinstance(memory, PlannerMemory)
    return memory


def test_longer_prompts_at_one_request_rate_are_not_read_as_a_rising_demand() -> None:
    """The same 100 requests/s turn to 3.5x longer prompts: the prompt tokens/s step up
    3.5x over two cycles, a new size per request and not a growth to extrapolate. The
    forecast at prefill's horizon stays at the new level (read as a ramp, the step was
    forecast 1.5x past it, and the scale-in window held what that bought)."""
    memory = _after_prompt_switch(lambda _k: 100.0, long_from_cycle=20)
    config, horizon_s, _ = forecast_config(_chat()[0])
    state = memory.prefill_demand
    predicted = sizing_demand(state, horizon_s, config)
    assert predicted is not None
    assert predicted == pytest.approx(state.last_value, rel=0.05)


def test_a_request_rate_that_grows_at_one_mix_keeps_its_trend() -> None:
    """Requests growing 3% a cycle at an unchanged mix: all demand, forecast ahead."""
    memory = _after_prompt_switch(lambda k: 100.0 * 1.03**k, long_from_cycle=None)
    config, horizon_s, _ = forecast_config(_chat()[0])
    state = memory.prefill_demand
    predicted = sizing_demand(state, horizon_s, config)
    assert predicted is not None and predicted > 1.15 * state.last_value


def test_what_a_new_mix_explains_of_a_change_in_demand() -> None:
    """The mean length's ratio, as far as the tokens' change (and the mean's sampling
    spread) bears it out; 1 with nothing to compare."""
    outputs = _prompts(200.0)
    short = RequestMix.from_samples(_prompts(1000.0), outputs).prompt
    long = RequestMix.from_samples(_prompts(3500.0), outputs).prompt
    ratio = long.moment(1) / short.moment(1)
    assert mix_explained_factor(short, long, 100_000.0, 100_000.0 * ratio) == pytest.approx(ratio)
    assert mix_explained_factor(long, short, 100_000.0 * ratio, 100_000.0) == pytest.approx(
        1.0 / ratio
    )
    # A mean 3.5x longer while the tokens held (a broken histogram, or a rate that fell
    # as much): the history moves by the mean's sampling spread at most, not 3.5x.
    held = mix_explained_factor(short, long, 100_000.0, 100_000.0)
    assert 1.0 < held < 1.05
    for previous_tps in (0.0, math.nan, math.inf):
        assert mix_explained_factor(short, long, previous_tps, 100_000.0) == 1.0


# ---------------------------------------------------------------- latency read through buckets


def test_a_reading_in_the_predicted_bucket_keeps_the_correction() -> None:
    """vLLM's p90 inter-token latency reads 47.5 ms for any step in (25, 50] ms: a model
    predicting 30 ms agrees with it, and the factor stays where it was."""
    implied = lambda s: s / 0.030  # noqa: E731  (the model's step is 30 ms at factor 1)
    assert within_bucket(implied, 0.0475, VLLM_ITL_BUCKETS_S, 1.0) == 1.0
    assert within_bucket(implied, 0.0475, VLLM_ITL_BUCKETS_S, 1.2) == 1.2
    # Taken as exact (no known bounds), the same reading would claim a 58% slower model.
    assert within_bucket(implied, 0.0475, None, 1.0) == pytest.approx(0.0475 / 0.030)


def test_a_reading_outside_the_predicted_bucket_moves_the_factor_to_its_nearest_edge() -> None:
    implied = lambda s: s / 0.030  # noqa: E731
    # Read in (50, 75] ms: the model (30 ms) is at least 50/30 slower than it says.
    assert within_bucket(implied, 0.07, VLLM_ITL_BUCKETS_S, 1.0) == pytest.approx(0.05 / 0.03)
    # Read in (10, 25] ms while the factor predicts 60 ms: at most 25/30.
    assert within_bucket(implied, 0.02, VLLM_ITL_BUCKETS_S, 2.0) == pytest.approx(0.025 / 0.03)
    # With the model's prediction given, the same answers without inverting both edges.
    predicted = lambda f: 0.030 * f  # noqa: E731
    assert within_bucket(implied, 0.07, VLLM_ITL_BUCKETS_S, 1.0, predicted) == pytest.approx(
        0.05 / 0.03
    )
    assert within_bucket(implied, 0.0475, VLLM_ITL_BUCKETS_S, 1.0, predicted) == 1.0


def test_steady_tbt_read_through_buckets_does_not_inflate_the_decode_correction() -> None:
    """At a steady load the histogram reads the top of the step's bucket; the planner's
    decode correction stays at 1 instead of reading the interpolation as a slower
    instance (which cost decode capacity on every cycle)."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    assert perf is not None
    history = PolicyHistory()
    # 1,450 output tokens/s per instance: the model's step is in (25, 50] ms there.
    for k in range(20):
        now = 30.0 * k
        metrics = _metrics(now, 200_000.0, 30 * 1450.0, tbt_ms=47.5, ttft_ms=900.0)
        decision = plan_decide(policy, _fleet(30, 30), metrics, history, now, perf)
        history = decision.history
    memory = history.planner
    assert isinstance(memory, PlannerMemory)
    assert memory.correction.decode == pytest.approx(1.0)


def _decode_factor_after(fleet_at: Callable[[float], ServiceFleet], cycles: int) -> float:
    """The decode correction after ``cycles`` cycles at 20 output tokens/s per decode
    instance (a light load: the model's step is short) with TBT reading 47.5 ms, the
    fleet at each cycle given by ``fleet_at``."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    history = PolicyHistory()
    for k in range(cycles):
        now = 30.0 * k
        fleet = fleet_at(now)
        metrics = _metrics(now, 100_000.0, 20.0 * fleet.decode.ready, tbt_ms=47.5)
        history = plan_decide(policy, fleet, metrics, history, now, perf).history
    memory = history.planner
    assert isinstance(memory, PlannerMemory)
    return memory.correction.decode


@pytest.mark.parametrize(("queue_growth", "learnt"), [(0.0, True), (50.0, False)])
def test_decode_latency_is_learnt_only_while_its_work_holds_still(
    queue_growth: float, learnt: bool
) -> None:
    """A light decode load with a TBT reading slower than the model predicts teaches a
    slower decode, but only while decode's work holds still: with its queue growing by
    ``queue_growth`` requests a cycle the window's mean rate is within capacity while
    its tokens (and so the TBT quantile) crowd into the load that is coming (a return
    from near-idle taught a 1.29x slower decode so)."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    history = PolicyHistory()
    fleet = _fleet(30, 30)
    for k in range(40):
        now = 30.0 * k
        metrics = replace(
            _metrics(now, 100_000.0, 20.0 * 30, tbt_ms=47.5),
            decode_queue=Sample(queue_growth * k, now),
        )
        history = plan_decide(policy, fleet, metrics, history, now, perf).history
    memory = history.planner
    assert isinstance(memory, PlannerMemory)
    if learnt:
        assert memory.correction.decode > 1.05
    else:
        assert memory.correction.decode == 1.0


def test_decode_latency_corrects_the_model_only_once_its_size_has_settled() -> None:
    """After decode's size changes, the instances that were there keep their batches
    (sequences are pinned) while new ones start empty: the TBT quantile reads the old,
    busy ones at a mean load that says little about them. A reading far above what the
    model predicts moves the correction only once the size has held for a metrics
    window plus the time the earlier sequences take to finish."""
    policy, _ = _chat()
    mix = declared_mix(policy.request_shape)
    settle_s = 60.0 + mix.output.quantile(policy.slo.quantile) * policy.slo.tbt_ms / 1000.0
    assert not decode_settled(policy, mix, 100.0, 100.0 + settle_s - 1.0)
    assert decode_settled(policy, mix, 100.0, 100.0 + settle_s)
    # Grown from 20 to 60 at 60 s, then held: no correction until it settles...
    grown = lambda now: _fleet(30, 20 if now < 60 else 60)  # noqa: E731
    unsettled = math.ceil((60.0 + settle_s) / 30.0)  # cycles, the last before 60 s + settle
    assert _decode_factor_after(grown, unsettled) == pytest.approx(1.0)
    # ...and the same reading moves it once the size has held long enough.
    assert _decode_factor_after(grown, unsettled + 4) > 1.05
    held = lambda now: _fleet(30, 60)  # noqa: E731
    assert _decode_factor_after(held, 8) > 1.05


def test_a_ttft_read_over_a_backlog_is_left_to_the_queue_not_the_tiers() -> None:
    """A TTFT whose window reaches back to a backlog beyond the SLO reads that wait;
    the queue's growth and drain already size for it, so the TTFT tiers do not add to
    them (after a burst they held prefill at max_instances for ten minutes). A window
    after the backlog, a slow TTFT escalates again."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    counts: dict[float, list[int]] = {}
    for ttft_ms in (60_000.0, 1_000.0):
        history, counts[ttft_ms] = PolicyHistory(), []
        for k in range(6):
            # 700 requests of ~1,200 prompt tokens wait: more than 30 instances prefill
            # within the 1.5 s SLO.
            metrics = _metrics(30.0 * k, 200_000.0, 20_000.0, ttft_ms=ttft_ms, prefill_queue=700.0)
            decision = plan_decide(policy, _fleet(30, 30), metrics, history, 30.0 * k, perf)
            history = decision.history
            counts[ttft_ms].append(decision.prefill)
        if ttft_ms > policy.slo.ttft_ms:
            assert "backlog beyond the SLO, sized by the queue: not chased" in decision.message
    assert counts[60_000.0] == counts[1_000.0]
    later = _metrics(240.0, 200_000.0, 20_000.0, ttft_ms=6_000.0, prefill_queue=0.0)
    decision = plan_decide(policy, _fleet(30, 30), later, history, 240.0, perf)
    assert "ttft 6000 ms = 4.00 x SLO > 2: prefill +50% of 30 ready -> 45" in decision.message


def test_ttft_read_over_a_backlog_does_not_teach_a_slower_prefill() -> None:
    """A queue holding more work than the ready instances prefill within the TTFT SLO
    is one no load within capacity leaves: TTFTs read over it (and for the metrics
    window after it) are its wait, not the instances' speed. Learned from, draining
    one burst's backlog taught the planner a 1.35x slower prefill for two hours."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    history = PolicyHistory()

    def factor_after(now: float, ttft_ms: float, queue: float) -> float:
        nonlocal history
        metrics = _metrics(now, 200_000.0, 20_000.0, ttft_ms=ttft_ms, prefill_queue=queue)
        history = plan_decide(policy, _fleet(30, 30), metrics, history, now, perf).history
        memory = history.planner
        assert isinstance(memory, PlannerMemory)
        return memory.correction.prefill

    # 700 requests of ~1,200 prompt tokens wait: more than 30 instances prefill in 1.5 s.
    assert all(factor_after(30.0 * k, 60_000.0, 700.0) == 1.0 for k in range(10))
    decision = plan_decide(
        policy,
        _fleet(30, 30),
        _metrics(290.0, 200_000.0, 20_000.0, ttft_ms=60_000.0, prefill_queue=700.0),
        history,
        290.0,
        perf,
    )
    assert "prefill's latency factor kept: the TTFT's window reaches back" in decision.message
    # The queue is empty, but the TTFT's window still holds requests that waited.
    assert factor_after(300.0, 5_000.0, 0.0) == 1.0
    assert factor_after(330.0, 5_000.0, 0.0) == 1.0
    # A window after the last backlog, the same reading says the instances are slower.
    assert factor_after(360.0, 5_000.0, 0.0) > 1.05


@pytest.mark.parametrize("seen_s", [math.nan, math.inf, 1e12])
def test_a_backlog_time_from_a_damaged_memory_does_not_stop_the_correction(
    seen_s: float,
) -> None:
    """A memory read back from a damaged state document may carry any float: a backlog
    time that is not a past reading counts as none, or it would keep the prefill
    correction from ever learning again."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    memory = PlannerMemory(prefill_backlog_seen_s=seen_s)
    history = PolicyHistory(planner=memory)
    for k in range(3):
        now = 600.0 + 30.0 * k
        metrics = _metrics(now, 200_000.0, 20_000.0, ttft_ms=5_000.0, prefill_queue=0.0)
        history = plan_decide(policy, _fleet(30, 30), metrics, history, now, perf).history
    learned = history.planner
    assert isinstance(learned, PlannerMemory)
    assert learned.correction.prefill > 1.05
    assert learned.prefill_backlog_seen_s is None


@pytest.mark.parametrize("since_s", [math.nan, math.inf, 1e12])
def test_a_steady_time_from_a_damaged_memory_starts_afresh(since_s: float) -> None:
    """Likewise each role's "steady since": one that never passes would keep its size
    from ever counting as settled; it starts from the cycle that reads it."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    memory = PlannerMemory(
        decode_ready_seen=60,
        decode_steady_since_s=since_s,
        prefill_ready_seen=30,
        prefill_steady_since_s=since_s,
    )
    decision = plan_decide(
        policy,
        _fleet(30, 60),
        _metrics(600.0, 100_000.0, 1_200.0),
        PolicyHistory(planner=memory),
        600.0,
        perf,
    )
    learned = decision.history.planner
    assert isinstance(learned, PlannerMemory)
    assert learned.decode_steady_since_s == 600.0
    assert learned.prefill_steady_since_s == 600.0
    assert past_time(599.0, 600.0) == 599.0 and past_time(None, 600.0) is None


@pytest.mark.parametrize(
    "memory",
    [
        # Found by the damaged-memory property test: a remembered backlog of 8e298
        # tokens overflowed the sizing to inf, and a zero correction factor divided the
        # capacity by zero.
        PlannerMemory(prefill_backlog=Backlog(600.0, 7.6e298)),
        PlannerMemory(prefill_backlog=Backlog(math.nan, 1000.0)),
        PlannerMemory(correction=LatencyCorrection(prefill=0.0, decode=math.inf)),
        PlannerMemory(correction=LatencyCorrection(prefill=math.nan, decode=1e-300)),
    ],
)
def test_a_damaged_memory_is_read_as_a_fresh_reading_would_be(memory: PlannerMemory) -> None:
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    metrics = _metrics(600.0, 200_000.0, 20_000.0, ttft_ms=900.0, prefill_queue=10.0)
    history = PolicyHistory(planner=memory)
    decision = plan_decide(policy, _fleet(30, 30), metrics, history, 600.0, perf)
    fresh = plan_decide(policy, _fleet(30, 30), metrics, PolicyHistory(), 600.0, perf)
    assert (decision.prefill, decision.decode) == (fresh.prefill, fresh.decode)
    learned = decision.history.planner
    assert isinstance(learned, PlannerMemory)
    assert learned.correction.sanitized() is learned.correction


def _learnt_history(policy: ServicePolicy, cluster: ClusterSpec) -> PolicyHistory:
    """The history twenty cycles of a steady load leave: forecasters with a window of
    history, the capacity kept with its errors, a mix and its time."""
    perf = perf_context(policy, cluster)
    history = PolicyHistory()
    for k in range(20):
        now = 30.0 * k
        metrics = _metrics(now, 250_000.0, 35_000.0, ttft_ms=700.0, tbt_ms=47.5)
        history = plan_decide(policy, _fleet(30, 30), metrics, history, now, perf).history
    return history


HUGE_TIMES_TWELVE = (1e308,) * 12


@pytest.mark.parametrize(
    ("part", "damage"),
    [
        # Finite, so a NaN check passes them, but beyond any number a planner files: the
        # forecast overflowed to inf (or NaN) and the decision raised OverflowError.
        ("prefill_demand", {"trend": 1e300}),
        ("decode_demand", {"trend": -1e308}),
        ("prefill_demand", {"level": 1e308}),
        # A peak of 1e308 made the headroom's ceiling infinite, and errors as large
        # took the size past it.
        ("prefill_kept", {"errors": HUGE_TIMES_TWELVE, "peaks": ((590.0, 1e308),)}),
    ],
)
def test_a_hand_edited_memory_of_absurd_finite_numbers_is_read_as_none_and_said(
    part: str, damage: dict[str, object]
) -> None:
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    history = _learnt_history(policy, cluster)
    memory = history.planner
    assert isinstance(memory, PlannerMemory)
    damaged = replace(memory, **{part: replace(getattr(memory, part), **damage)})
    reset = replace(memory, **{part: type(getattr(memory, part))()})
    metrics = _metrics(600.0, 250_000.0, 35_000.0, ttft_ms=700.0, tbt_ms=47.5)
    decision = plan_decide(
        policy, _fleet(30, 30), metrics, replace(history, planner=damaged), 600.0, perf
    )
    without = plan_decide(
        policy, _fleet(30, 30), metrics, replace(history, planner=reset), 600.0, perf
    )
    assert (decision.prefill, decision.decode) == (without.prefill, without.decode)
    assert f"stored planner memory damaged in {part}: read as far as sound" in decision.message


@pytest.mark.parametrize(
    ("mix", "mix_at_s"),
    [
        # A mix without its time: formatting "the last known one (t=...)" raised
        # TypeError, every cycle, so the service held for good.
        (RequestMix.from_samples([1000.0] * 10, [200.0] * 10), None),
        (RequestMix.from_samples([1000.0] * 10, [200.0] * 10), math.nan),
        # NaN bounds passed LengthHistogram's own checks and raised ValueError in numpy;
        # counts whose sum overflows made every capacity NaN (ValueError at the count).
        (
            RequestMix(
                LengthHistogram((math.nan, math.inf), (1.0, 1.0)),
                LengthHistogram((200.0,), (1.0,)),
            ),
            500.0,
        ),
        (
            RequestMix(
                LengthHistogram((1000.0,), (1e308,)),
                LengthHistogram((200.0, 1000.0), (1e308, 1e308)),
            ),
            500.0,
        ),
        # Beyond any context a model serves.
        (
            RequestMix(
                LengthHistogram((1e300, math.inf), (1.0, 0.0)),
                LengthHistogram((200.0,), (1.0,)),
            ),
            500.0,
        ),
    ],
)
def test_a_remembered_mix_no_engine_reading_could_give_is_read_as_none_and_said(
    mix: RequestMix, mix_at_s: float | None
) -> None:
    """When the engines' histograms are missing, the planner sizes from the last mix it
    read; one from a damaged or hand-edited state document is no mix at all: the
    decision is the one without it (here the declared request_shape), and says so."""
    policy, cluster = _chat()
    declared = _declared(policy, 1150, 210)
    perf = perf_context(declared, cluster)
    bare = ServiceMetrics(
        "chat", prefill_tps=Sample(250_000.0, 600.0), decode_tps=Sample(35_000.0, 600.0)
    )
    memory = PlannerMemory(mix=mix, mix_at_s=mix_at_s)
    decision = plan_decide(
        declared, _fleet(30, 30), bare, PolicyHistory(planner=memory), 600.0, perf
    )
    without = plan_decide(declared, _fleet(30, 30), bare, PolicyHistory(), 600.0, perf)
    assert (decision.prefill, decision.decode) == (without.prefill, without.decode)
    assert "stored planner memory damaged in mix" in decision.message
    assert "the declared request_shape" in decision.message
    learned = decision.history.planner
    assert isinstance(learned, PlannerMemory) and learned.mix is None


def test_a_sound_memory_read_back_is_not_called_damaged() -> None:
    policy, cluster = _chat()
    history = _learnt_history(policy, cluster)
    assert isinstance(history.planner, PlannerMemory)
    text, _ = encode(DurableState("c", 600.0, histories={"chat": history}))
    read_back = decode(text).histories["chat"]
    assert read_back.planner == history.planner and read_back.planner is not history.planner
    metrics = _metrics(600.0, 250_000.0, 35_000.0, ttft_ms=700.0, tbt_ms=47.5)
    perf = perf_context(policy, cluster)
    decision = plan_decide(policy, _fleet(30, 30), metrics, read_back, 600.0, perf)
    assert "damaged" not in decision.message
    fresh = plan_decide(policy, _fleet(30, 30), metrics, PolicyHistory(), 600.0, perf)
    assert "damaged" not in fresh.message


# ---------------------------------------------------------------- caches and memory


def _cycles(
    policy: ServicePolicy, cluster: ClusterSpec, before_each: Callable[[], None]
) -> list[str]:
    """The planner's decisions (reprs) over twelve cycles of a swinging load with
    latency read, from an empty memory; ``before_each`` runs before every cycle."""
    history, out = PolicyHistory(), []
    for k in range(12):
        before_each()
        now = 30.0 * k
        load = 1.0 + 0.2 * math.sin(k / 3.0)
        metrics = _metrics(now, 250_000.0 * load, 35_000.0 * load, ttft_ms=700.0, tbt_ms=47.5)
        perf = perf_context(policy, cluster)
        decision = plan_decide(policy, _fleet(30, 30), metrics, history, now, perf)
        history = decision.history
        out.append(repr(decision))
    return out


def test_emptied_caches_decide_as_kept_ones() -> None:
    """Caches only spare work: with every cache emptied before each cycle the planner
    decides exactly as with them kept (for one mix throughout: a capacity cached for
    a mix whose shares moved by less than the key's step is reused as it is)."""
    policy, cluster = _chat()
    clear_caches()
    kept = _cycles(policy, cluster, lambda: None)
    assert _cycles(policy, cluster, clear_caches) == kept


def test_the_memory_of_a_live_mix_is_stored_durably() -> None:
    """The mix read from the engines' histograms is kept as plain ``LengthHistogram``s
    (what the durable state stores), whatever the planner cached on them."""
    policy, cluster = _chat()
    decision = plan_decide(
        policy,
        _fleet(20, 20),
        _metrics(0.0, 300_000.0, 40_000.0, ttft_ms=700.0, tbt_ms=47.5),
        PolicyHistory(),
        0.0,
        perf_context(policy, cluster),
    )
    memory = decision.history.planner
    assert isinstance(memory, PlannerMemory) and memory.mix is not None
    text, dropped = encode(DurableState("east", 0.0, histories={"chat": decision.history}))
    assert not dropped
    back = decode(text).histories["chat"].planner
    assert isinstance(back, PlannerMemory) and back.mix == memory.mix


@pytest.mark.parametrize(
    ("fine", "coarse", "current", "evidence"),
    [
        (None, None, 1.0, None),
        # The quantile alone, as within_bucket read it.
        (None, 1.3, 1.0, 1.3),
        (None, 0.8, 1.0, 0.8),
        # The fine reading (busy fraction, mean gap) says faster or slower ...
        (0.77, None, 1.0, 0.77),
        (1.3, None, 1.0, 1.3),
        (0.77, 0.9, 1.0, 0.77),
        (0.77, 1.0, 1.0, 0.77),
        # ... and a quantile read slower than the current factor predicts wins over it
        (0.77, 1.2, 1.0, 1.2),
        (1.3, 1.2, 1.0, 1.3),
        # ... but one in the predicted bucket (within_bucket's "current") does not hold
        # a factor above 1 up.
        (0.9, 1.05, 1.05, 0.9),
    ],
)
def test_factor_evidence_takes_the_fine_reading_and_a_quantile_read_slower(
    fine: float | None, coarse: float | None, current: float, evidence: float | None
) -> None:
    assert factor_evidence(fine, coarse, current) == evidence


def _mix_read_from(metrics: ServiceMetrics) -> RequestMix:
    """The request mix as the planner reads it from the metrics' two histograms."""
    assert metrics.prompt_tokens is not None and metrics.output_tokens is not None
    return RequestMix.from_cumulative_columns(
        metrics.prompt_tokens.le,
        metrics.prompt_tokens.cumulative,
        metrics.output_tokens.le,
        metrics.output_tokens.cumulative,
    )


def _busy_for(util_factor: float, prefill_tps: float, instances: int) -> float:
    """The GPU utilisation the chat prefill would report serving ``prefill_tps`` on
    ``instances`` instances ``util_factor`` x slower than the model."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    mix = _mix_read_from(_metrics(0.0, prefill_tps, 20_000.0))
    predicted = busy_taught(perf.prefill, mix, prefill_tps, instances, 1.0)
    assert predicted is not None
    return util_factor / predicted


def _prefill_factors_at_1_3x(prefill_counts: list[int], ttft_ms: list[float | None]) -> list[float]:
    """The prefill latency factor after each of these cycles (30 s apart) of the chat
    prefill, 1.3x faster than the model, serving 200,000 prompt tokens/s on the given
    counts: busy for 0.77 of what the model predicts, with the given TTFT readings."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    util = _busy_for(0.77, 200_000.0, 30)
    history = PolicyHistory()
    factors = []
    for k, (prefill, ttft) in enumerate(zip(prefill_counts, ttft_ms, strict=True)):
        now = 600.0 + 30.0 * k
        metrics = _metrics(
            now, 200_000.0, 20_000.0, ttft_ms=ttft, prefill_gpu_util=util * 30 / prefill
        )
        history = plan_decide(policy, _fleet(prefill, 60), metrics, history, now, perf).history
        memory = history.planner
        assert isinstance(memory, PlannerMemory)
        factors.append(memory.correction.prefill)
    return factors


@pytest.mark.parametrize(("queued", "learnt"), [(60.0, True), (0.0, False)])
def test_a_saturated_prefill_teaches_its_speed_at_a_moderate_rate(
    queued: float, learnt: bool
) -> None:
    """Five chat prefill instances serving 25,000 prompt tokens/s (about 20 prompts/s:
    too few for a busy reading of a pool that idles between prompts) report their GPUs
    at the engine's full utilisation: where a queue held prompts through the window,
    the pool was busy all the time and the reading is read, slower than the model (the
    model has them busy for less); with no queue it is not."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    # A pool busy all the time: its GPUs at full utilisation (a gauge reads 100% at most).
    full_util = min(1.0, float(perf.prefill.util.get("prefill_util_per_busy", 1.0)))
    mix = _mix_read_from(_metrics(0.0, 25_000.0, 20_000.0))
    # What the model says of that reading: 1 / its busy fraction at this load, well
    # above 1 (the model has the pool idle for a good part of the time).
    implied = busy_taught(perf.prefill, mix, 25_000.0, 5, full_util, backlogged=True)
    assert implied is not None and implied > 1.5
    assert busy_taught(perf.prefill, mix, 25_000.0, 5, full_util) is None
    history = PolicyHistory()
    for k in range(10):
        now = 600.0 + 30.0 * k
        metrics = _metrics(
            now, 25_000.0, 20_000.0, prefill_queue=queued, prefill_gpu_util=full_util
        )
        history = plan_decide(policy, _fleet(5, 60), metrics, history, now, perf).history
    memory = history.planner
    assert isinstance(memory, PlannerMemory)
    if learnt:
        assert memory.correction.prefill > 1.2
    else:
        assert memory.correction.prefill == 1.0


@pytest.mark.parametrize("busy_read", [True, False])
def test_the_ttft_alone_does_not_take_a_slower_factor_below_what_the_busy_fraction_allows(
    busy_read: bool,
) -> None:
    """Chat's prefill 1.67x slower than the model, over-provisioned (nine instances for
    25,000 prompt tokens/s, about 20 prompts/s), its correction at 1.67: the TTFT read
    alone (low, as an idle pool shows through the prompt buckets) pulled the
    factor back towards the model's (a 200 ms p90, in the bucket below the one the model
    predicts at 1.67), prefill was scaled in and overloaded again. Its
    busy fraction, too coarse there to teach a factor, still bounds it from below."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    mix = _mix_read_from(_metrics(0.0, 25_000.0, 20_000.0))
    at_full = read_prefill_busy(perf.prefill, mix, 25_000.0, 9, 1.0)
    assert at_full is not None
    util = 1.67 / at_full.factor  # the utilisation a 1.67x slower pool reports
    floor = busy_floor(perf.prefill, mix, 25_000.0, 9, util)
    assert floor is not None and 1.1 < floor < 1.67
    # Nine instances steady for a while (the busy fraction reads only over a window the
    # count held through).
    memory = PlannerMemory(
        correction=LatencyCorrection(prefill=1.67),
        prefill_ready_seen=9,
        prefill_steady_since_s=0.0,
    )
    history = PolicyHistory(planner=memory)
    for k in range(12):
        now = 600.0 + 30.0 * k
        metrics = _metrics(
            now,
            25_000.0,
            20_000.0,
            ttft_ms=200.0,
            prefill_gpu_util=util if busy_read else None,
        )
        history = plan_decide(policy, _fleet(9, 60), metrics, history, now, perf).history
    memory = history.planner
    assert isinstance(memory, PlannerMemory)
    if busy_read:
        assert memory.correction.prefill >= floor - 1e-9
    else:
        assert memory.correction.prefill < floor


def test_a_slower_prefill_never_saturated_is_learnt_from_busy_readings_together() -> None:
    """Chat's prefill 1.67x slower than the model at about 20 prompts/s on nine
    instances: never saturated, each window's busy reading too coarse to teach the
    factor (it scatters by its spread about the truth), and the TTFT read low (200 ms:
    an idle pool's, as the prompt buckets show it). The readings of non-overlapping
    windows together teach what none does alone: the correction comes within 5 % of
    1.67 in fifteen windows, where alone the coarse readings only floor it (two spreads
    low) and the TTFT holds it there (azure-x10-engines-0.6x: 93.8 % of requests within
    both SLOs before)."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    mix = _mix_read_from(_metrics(0.0, 25_000.0, 20_000.0))
    at_full = read_prefill_busy(perf.prefill, mix, 25_000.0, 9, 1.0)
    assert at_full is not None and at_full.taught is None
    true_util = 1.67 / at_full.factor
    noise = np.random.default_rng(7).standard_normal(40)
    memory = PlannerMemory(prefill_ready_seen=9, prefill_steady_since_s=0.0)
    history = PolicyHistory(planner=memory)
    for k in range(30):
        now = 600.0 + 30.0 * k
        util = true_util * math.exp(at_full.spread * noise[k // 2])  # one draw a window
        metrics = _metrics(now, 25_000.0, 20_000.0, ttft_ms=200.0, prefill_gpu_util=util)
        history = plan_decide(policy, _fleet(9, 60), metrics, history, now, perf).history
    memory = history.planner
    assert isinstance(memory, PlannerMemory)
    assert memory.correction.prefill == pytest.approx(1.67, rel=0.05)


def test_prefill_learns_a_faster_instance_from_its_busy_fraction_once_its_size_held() -> None:
    """An instance busy for 0.77 of what the model predicts is 1.3x faster: the
    correction takes it (which the TTFT tail cannot say) once the prefill count has held
    for a metrics window, the window the busy fraction is read over; a reading over a
    window in which the count changed is not taken."""
    # Two instances became ready at the second cycle.
    factors = _prefill_factors_at_1_3x([28] + [30] * 7, [None] * 8)
    # Steady from the second cycle (630 s): readable from 690 s, the fourth cycle.
    assert factors[:3] == [1.0, 1.0, 1.0]
    assert factors[3] < 0.9
    assert factors[-1] == pytest.approx(0.77, rel=0.03)


@pytest.mark.parametrize(("ttft_after_ms", "kept"), [(200.0, True), (1_800.0, False)])
def test_a_faster_prefill_is_kept_while_its_busy_fraction_pauses_for_a_count_change(
    ttft_after_ms: float, kept: bool
) -> None:
    """After a count change the busy fraction is not read for a metrics window; the
    TTFT tail alone, which reads faster than the instance is (the prompt buckets), then
    keeps the faster factor the busy fraction taught, and moves it only where it reads
    slower than that factor and likely above the SLO (1.8 s in vLLM's (1.0, 2.5] s
    bucket against chat's 1.5 s; below the SLO the excess is an offset)."""
    # One instance removed at the ninth cycle.
    factors = _prefill_factors_at_1_3x([30] * 8 + [29] * 4, [200.0] * 8 + [ttft_after_ms] * 4)
    learnt, paused = factors[7], factors[8:10]
    assert learnt == pytest.approx(0.77, rel=0.03)
    if kept:
        assert paused == [learnt, learnt]
    else:
        assert min(paused) > learnt * 1.1


def _ttft_with_floor_ms(prefill: int, floor_s: float, prefill_tps: float = 200_000.0) -> float:
    """The chat prefill's TTFT at the SLO quantile, its instances exactly the model's,
    serving ``prefill_tps`` on ``prefill`` of them, plus ``floor_s`` spent before them
    (a gateway, the network) whatever the load."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    mix = _mix_read_from(_metrics(0.0, prefill_tps, 20_000.0))
    caps = capacities_for(policy, perf, mix, prefill, LatencyCorrection())
    load = PrefillLoad(
        perf.prefill,
        mix,
        policy.slo.quantile,
        prefill_tps / prefill,
        prefill,
        transfer_s_per_token(perf.prefill.kv_bytes_per_token, perf.link_gbps),
        caps.decode.step_s,
    )
    return (predicted_ttft_s(load) + floor_s) * 1000.0


def _settled_prefill(floor_s: float, busy_read: bool) -> tuple[int, LatencyCorrection, str]:
    """The chat prefill's count, correction and last message after 30 cycles of a
    steady 200,000 prompt tokens/s, its count following the planner's decisions and its
    TTFT ``_ttft_with_floor_ms`` at that count (its busy fraction the model's, where
    read)."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    history, prefill, message = PolicyHistory(), 5, ""
    util_at_one = _busy_for(1.0, 200_000.0, 1)
    for k in range(30):
        now = 600.0 + 30.0 * k
        metrics = _metrics(
            now,
            200_000.0,
            20_000.0,
            ttft_ms=_ttft_with_floor_ms(prefill, floor_s),
            prefill_gpu_util=util_at_one / prefill if busy_read else None,
        )
        decision = plan_decide(policy, _fleet(prefill, 60), metrics, history, now, perf)
        history, prefill, message = decision.history, decision.prefill, decision.message
    memory = history.planner
    assert isinstance(memory, PlannerMemory)
    return prefill, memory.correction, message


@pytest.mark.parametrize("busy_read", [True, False])
def test_a_ttft_spent_outside_the_instances_is_learnt_as_an_offset(busy_read: bool) -> None:
    """Half a second of every TTFT spent before the instances (a gateway, the network)
    is not a slower prefill: more instances never remove it. Read as a slower factor,
    with or without the busy fraction, it ratcheted the factor to its 2x bound and
    prefill to about twice the count it needed. It is learnt as an offset added to every
    TTFT (to within the histogram bucket it is read in): the factor stays the model's,
    and prefill grows only by what the smaller TTFT budget needs."""
    without_floor, plain, _ = _settled_prefill(0.0, busy_read)
    with_floor, correction, message = _settled_prefill(0.5, busy_read)
    assert plain.prefill_ttft_offset_s == 0.0
    assert correction.prefill == pytest.approx(1.0, abs=0.03)
    # Read through vLLM's TTFT buckets (0.5, 0.75, 1.0 s), the floor is known to
    # within a bucket.
    assert 0.25 <= correction.prefill_ttft_offset_s <= 0.75
    assert f"TTFT +{correction.prefill_ttft_offset_s * 1000:.0f} ms outside the instances" in (
        message
    )
    assert without_floor <= with_floor <= math.ceil(1.3 * without_floor)


@pytest.mark.parametrize(("floor_s", "factor_moves"), [(0.85, False), (1.5, True)])
def test_a_ttft_read_alone_in_a_bucket_around_the_slo_goes_by_the_reading(
    floor_s: float, factor_moves: bool
) -> None:
    """No busy fraction, and a TTFT whose p90 reads in vLLM's (1.0, 2.5] s bucket, which
    holds chat's 1.5 s SLO. A reading below the SLO likely meets it (interpolated within
    the bucket, a thinning tail reads high): the excess is an offset, the factor stays
    the model's and prefill grows only by what the smaller budget needs. Read as a
    slower factor, 0.85 s of gateway (a 1.1 s p90) ratcheted the factor to its 2x bound
    and prefill from 20 to 33. A reading above the SLO still moves the factor."""
    without_floor, _, _ = _settled_prefill(0.0, busy_read=False)
    with_floor, correction, _ = _settled_prefill(floor_s, busy_read=False)
    reading_ms = _ttft_with_floor_ms(with_floor, floor_s)
    assert 1_000.0 < reading_ms < 2_500.0
    assert (reading_ms > 1_500.0) is factor_moves
    if factor_moves:
        assert correction.prefill > 1.1
    else:
        assert correction.prefill == pytest.approx(1.0, abs=0.03)
        assert 0.5 <= correction.prefill_ttft_offset_s <= 1.0
        assert without_floor <= with_floor <= math.ceil(1.3 * without_floor)


def _offsets_after(
    ttft_ms: list[float], ttft_at_s: list[float | None] | None = None
) -> list[float]:
    """The TTFT offset after each of these cycles (30 s apart) of the chat prefill, its
    instances exactly the model's (busy fraction read), 30 of them serving 200,000
    prompt tokens/s, with the given TTFT readings (taken at ``ttft_at_s``, where
    given, else when read)."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    util = _busy_for(1.0, 200_000.0, 30)
    history, offsets = PolicyHistory(), []
    for k, ttft in enumerate(ttft_ms):
        now = 600.0 + 30.0 * k
        metrics = _metrics(now, 200_000.0, 20_000.0, ttft_ms=ttft, prefill_gpu_util=util)
        taken_s = ttft_at_s[k] if ttft_at_s is not None else None
        if taken_s is not None and metrics.ttft is not None:
            metrics = replace(metrics, ttft=Sample(metrics.ttft.value, taken_s))
        history = plan_decide(policy, _fleet(30, 60), metrics, history, now, perf).history
        memory = history.planner
        assert isinstance(memory, PlannerMemory)
        offsets.append(memory.correction.prefill_ttft_offset_s)
    return offsets


def test_an_offset_learnt_from_a_spike_is_unlearnt_once_the_ttft_is_back() -> None:
    """Two readings at three times the SLO teach an offset that leaves little of the
    TTFT budget: the instances' capacity at the SLO shrinks below their load and most
    of the tail reads unattainable. Judged by that capacity, the TTFT readings after the
    spike looked like an overload and were never read again, and the offset stayed
    above the TTFT itself. They are judged by the instances' own capacity (the offset
    left out), so the offset falls back to what a 900 ms reading allows."""
    offsets = _offsets_after([900.0] * 10 + [4_500.0] * 2 + [900.0] * 10)
    before, spiked, after = offsets[9], offsets[11], offsets[-1]
    assert spiked > 1.0
    # A 900 ms p90 lies in vLLM's (0.75, 1.0] s bucket: the offset is below 1 s.
    assert before < 1.0 and after < 1.0


@pytest.mark.parametrize("reading", [math.nan, -5.0, 0.0, "stale"])
def test_a_broken_ttft_reading_teaches_no_offset(reading: float | str) -> None:
    """A NaN, negative or zero TTFT (no request takes no time) or one older than the
    metrics' maximum age says nothing of the instances: a NaN fell into the first
    bucket and halved the offset every cycle; an hour-old spike would pin it."""
    learnt = [900.0] * 8
    if reading == "stale":
        offsets = _offsets_after([*learnt, 4_500.0, 4_500.0], [*[None] * 8, 0.0, 0.0])
    else:
        offsets = _offsets_after([*learnt, float(reading), float(reading)])
    assert offsets[-1] == offsets[7] > 0.0


def _mean_gap_ms(factor: float, decode_tps: float, instances: int) -> float:
    """The mean inter-token gap of the chat decode serving ``decode_tps`` on
    ``instances`` instances ``factor`` x slower than the model: the step at the batch
    the rate holds at that step (Little's law), found by iterating to the fixed point."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    mix = _mix_read_from(_metrics(0.0, 100_000.0, decode_tps))
    context = mix.live_context_tokens
    step_s = 0.02
    for _ in range(200):
        batch = decode_tps / instances * step_s
        step_s = perf.decode.decode_step_float_s(batch, batch * context, context) * factor
    return step_s * 1000.0


@pytest.mark.parametrize("truth", [0.77, 1.3])
def test_decode_learns_its_speed_from_the_mean_gap_where_the_p90_bucket_cannot(
    truth: float,
) -> None:
    """vLLM's p90 inter-token latency is known only to its bucket, so a model off by
    less than a bucket keeps its factor; the histogram's sum over its count is exact,
    and the correction converges on it either way once decode has settled."""
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    decode_tps = 20_000.0
    gap_ms = _mean_gap_ms(truth, decode_tps, 60)
    model_gap_ms = _mean_gap_ms(1.0, decode_tps, 60)
    factors: dict[bool, float] = {}
    for with_mean in (False, True):
        history = PolicyHistory()
        for k in range(12):
            now = 600.0 + 30.0 * k
            metrics = replace(
                # The p90 reads the model's own prediction: the bucket says nothing.
                _metrics(now, 100_000.0, decode_tps, tbt_ms=model_gap_ms),
                tbt_mean=Sample(gap_ms, now) if with_mean else None,
            )
            history = plan_decide(policy, _fleet(30, 60), metrics, history, now, perf).history
        memory = history.planner
        assert isinstance(memory, PlannerMemory)
        factors[with_mean] = memory.correction.decode
    assert factors[False] == 1.0
    assert factors[True] == pytest.approx(truth, rel=0.02)


def test_the_running_counts_spread_adds_only_what_the_headroom_does_not_hold() -> None:
    """The headroom's measured error and the count's spread are independent errors at
    one share, so together they need their quadrature; the policy's floor (meant for a
    minute's Poisson spread) holds what it already does."""

    def sized(base_tps: float, room: float, error_room: float, drain_tps: float = 0.0):  # type: ignore[no-untyped-def]
        return SizedDemand(
            base_tps * (1 + room) + drain_tps, "", KeptCapacity(), base_tps, error_room, drain_tps
        )

    # A large pool: the 10 % floor over a 5 % measured error holds a 2,304 spread.
    large = sized(40_000.0, 0.10, 0.05)
    assert large.with_running_spread(2_304.0) == (large.tps, 0.0)
    # A small pool, no error measured: the floor's 260 is topped up to the spread.
    small = sized(2_600.0, 0.10, 0.0, drain_tps=50.0)
    tps, added = small.with_running_spread(929.0)
    assert added == pytest.approx(929.0 - 260.0)
    assert tps == pytest.approx(2_600.0 + 929.0 + 50.0)
    # A measured error of +56 % and the spread: their quadrature.
    bursty = sized(2_600.0, 0.56, 0.56)
    _, added = bursty.with_running_spread(929.0)
    assert added == pytest.approx(math.hypot(0.56 * 2_600.0, 929.0) - 0.56 * 2_600.0)
    assert bursty.with_running_spread(0.0)[1] == 0.0


def test_decode_holds_the_spread_of_a_small_batch() -> None:
    """At a 20 ms TBT SLO an instance runs about 20 sequences: decode at 2,600 output
    tokens/s (about 52 running) is sized for the count's 99.5 % quantile, four
    instances where the mean batch alone asks for three, and says so."""
    policy, cluster = _chat()
    slo = policy.slo.model_copy(update={"tbt_ms": 20.0, "ttft_ms": 5000.0})
    tight = policy.model_copy(update={"slo": slo})
    perf = perf_context(tight, cluster)
    decision = plan_decide(
        tight, _fleet(4, 4), _metrics(0.0, 20_000.0, 2_600.0), PolicyHistory(), 0.0, perf
    )
    assert "for the running count's spread" in decision.message
    sizing = re.search(
        r"decode [^;]*?\+(\d+) for the running count's spread = \d+ output tokens/s "
        r"/ (\d+) per instance -> (\d+)",
        decision.message,
    )
    assert sizing is not None, decision.message
    per_instance = float(sizing[2])
    assert 2 * per_instance < 2_600.0 * 1.1 < 3 * per_instance  # the mean batch: 3
    assert int(sizing[3]) == 4
    assert decision.decode == 4

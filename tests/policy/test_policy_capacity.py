"""Capacity from the performance model: the request mix, prefill and decode capacity,
unattainable requests, the online latency correction -- and the derived capacity
against the simulator's measured saturation point."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from functools import cache
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_testkit import REPO_ROOT, busy_floor, busy_taught

from reconciler.desired import load_desired_state
from reconciler.desired.models import ServicePolicy
from reconciler.latency_buckets import VLLM_TTFT_BUCKETS_S, bucket_around
from reconciler.perfmodel.instance import InstancePerf, instance_perf
from reconciler.perfmodel.queueing import MAX_GGC_UTILISATION
from reconciler.policy.capacity import (
    BUSY_READ_MAX_ERROR,
    GAUGE_SAMPLES_PER_WINDOW,
    BusyReading,
    DecodeCapacity,
    LatencyCorrection,
    LengthHistogram,
    PrefillCapacity,
    PrefillLoad,
    RequestMix,
    RoleCapacities,
    bucket_side,
    combined_busy_reading,
    decode_capacity,
    idle_ttft_s,
    implied_decode_factor,
    implied_prefill_factor,
    kept_busy_readings,
    one_two_five_buckets,
    predicted_ttft_s,
    predicted_ttft_side,
    prefill_capacity,
    prefill_instances_for,
    read_prefill_busy,
    role_capacities,
    running_spread_tps,
    transfer_s_per_token,
    unattainable,
)
from reconciler.policy.planner import implied_ttft_offset_s
from reconciler.sim.engine import LoadProfile, ServiceSim, SimConfig
from reconciler.sim.workload import synthetic_workload

# --------------------------------------------------------------------------- fixtures


@cache
def chat() -> tuple[ServicePolicy, InstancePerf, InstancePerf, float]:
    """The repository's chat service: TP4 H800 prefill, TP4 H20 decode, RDMA link."""
    state = load_desired_state(REPO_ROOT)
    policy = state.policies["chat"]
    cluster = state.clusters[policy.cluster]
    prefill = instance_perf(policy.model, "h800", cluster.gpu_types["h800"], 4)
    decode = instance_perf(policy.model, "h20", cluster.gpu_types["h20"], 4)
    return policy, prefill, decode, cluster.network.rdma_gbps


def lognormal_lengths(mean: float, cv: float, n: int = 2000) -> np.ndarray:
    """``n`` equal-probability lengths of a log-normal (deterministic: its quantiles)."""
    sigma = math.sqrt(math.log(1.0 + cv * cv))
    mu = math.log(mean) - sigma * sigma / 2.0
    z = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    return np.maximum(np.rint(np.exp(mu + sigma * z)), 1.0)


def chat_mix(prompt_scale: float = 1.0) -> RequestMix:
    return RequestMix.from_samples(
        lognormal_lengths(1150 * prompt_scale, 0.8), lognormal_lengths(210, 0.9)
    )


def tpt() -> float:
    _, prefill, _, link = chat()
    return transfer_s_per_token(prefill.kv_bytes_per_token, link)


# --------------------------------------------------------------------------- the mix


def test_prometheus_buckets_interpolate_like_histogram_quantile() -> None:
    """Cumulative (le, count): 5 up to 10 tokens, 10 more up to 20, 5 beyond (+Inf)."""
    mix = RequestMix.from_cumulative(
        [(10.0, 5.0), (20.0, 15.0), (math.inf, 20.0)], [(100.0, 1.0), (math.inf, 1.0)]
    )
    assert mix is not None
    # rank 10 of 20 falls half-way into (10, 20]: 10 + 10 x 5/10
    assert mix.prompt.quantile(0.5) == pytest.approx(15.0)
    # the first bucket starts at 0: rank 2.5 of 5 -> 5
    assert mix.prompt.quantile(0.125) == pytest.approx(5.0)
    # a rank in the +Inf bucket reports the highest finite bound, and so does its mass
    assert mix.prompt.quantile(0.95) == 20.0
    assert mix.prompt.cdf(20.0) == pytest.approx(1.0)
    # mean: 5 x 5 + 10 x 15 + 5 x 20 over 20
    assert mix.prompt_mean_tokens == pytest.approx((25 + 150 + 100) / 20)


def test_rate_artefacts_are_made_monotonic_and_empty_histograms_give_no_mix() -> None:
    bumpy = RequestMix.from_cumulative(
        [(10.0, 5.0), (20.0, 4.0), (math.inf, 8.0)], [(math.inf, 3.0)]
    )
    assert bumpy is not None
    assert bumpy.prompt.counts == (5.0, 0.0, 3.0)
    assert RequestMix.from_cumulative([(10.0, 0.0), (math.inf, 0.0)], [(math.inf, 3.0)]) is None
    assert RequestMix.from_cumulative([], [(math.inf, 3.0)]) is None


def test_one_bucket_bound_twice_is_refused() -> None:
    """Two series of one bound (``le="10"`` and ``le="10.0"``) make a histogram no one
    can read: refused as ``LengthHistogram`` refuses bounds that do not increase, in
    order or not."""
    for pairs in (
        [(10.0, 1.0), (10.0, 2.0), (math.inf, 3.0)],
        [(math.inf, 3.0), (10.0, 1.0), (10.0, 2.0)],
    ):
        with pytest.raises(ValueError, match="must increase"):
            RequestMix.from_cumulative_columns(
                [le for le, _ in pairs], [c for _, c in pairs], [math.inf], [1.0]
            )


def test_samples_binned_finely_keep_the_mix_moments() -> None:
    prompt = lognormal_lengths(1150, 0.8)
    output = lognormal_lengths(210, 0.9)
    mix = RequestMix.from_samples(prompt, output)
    assert mix.prompt_mean_tokens == pytest.approx(prompt.mean(), rel=0.01)
    assert mix.prompt.moment(2) == pytest.approx((prompt**2).mean(), rel=0.02)
    assert mix.output_mean_tokens == pytest.approx(output.mean(), rel=0.01)
    # live context: the batch holds sequences length-biased, half-way through
    expected = prompt.mean() + (output**2).mean() / (2 * output.mean())
    assert mix.live_context_tokens == pytest.approx(expected, rel=0.02)


def test_vllm_style_one_two_five_buckets() -> None:
    assert one_two_five_buckets(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    coarse = RequestMix.from_samples(
        lognormal_lengths(1150, 0.8), lognormal_lengths(210, 0.9), one_two_five_buckets(32768)
    )
    # Spreading evenly inside wide 1-2-5 buckets (histogram_quantile's interpolation)
    # overstates a right-skewed mix's mean: the mass of (1000, 2000] sits near 1000. The
    # bias is towards longer prompts, i.e. less capacity (the safe side), and bounded.
    fine = chat_mix().prompt_mean_tokens
    assert fine < coarse.prompt_mean_tokens < 1.15 * fine


def test_a_histogram_rejects_malformed_buckets() -> None:
    with pytest.raises(ValueError):
        LengthHistogram((10.0, 5.0), (1.0, 1.0))
    with pytest.raises(ValueError):
        LengthHistogram((10.0,), (-1.0,))


# --------------------------------------------------------------------------- prefill


@settings(max_examples=25, deadline=None)
@given(
    mean=st.floats(300, 2000),
    longer=st.floats(1.1, 2.5),
    slo_s=st.floats(3.0, 6.0),
    instances=st.integers(1, 32),
)
def test_prefill_capacity_falls_as_prompts_get_longer(
    mean: float, longer: float, slo_s: float, instances: int
) -> None:
    """Longer prompts cost more per token (attention) and take longer alone; with every
    request attainable (SLOs of seconds against these lengths) prompt tokens/s per
    instance can only fall."""
    _, prefill, _, _ = chat()
    output = lognormal_lengths(200, 0.5, 200)
    short = RequestMix.from_samples(lognormal_lengths(mean, 0.6, 400), output)
    long = RequestMix.from_samples(lognormal_lengths(mean * longer, 0.6, 400), output)
    caps = [
        prefill_capacity(prefill, mix, slo_s, 0.9, tpt(), 0.05, instances) for mix in (short, long)
    ]
    assert caps[1].unattainable.share == 0.0
    assert caps[1].tps_per_instance < caps[0].tps_per_instance
    assert caps[1].work_per_token > caps[0].work_per_token


@settings(max_examples=25, deadline=None)
@given(slo_s=st.floats(2.0, 5.0), tighter=st.floats(0.5, 0.95), instances=st.integers(1, 32))
def test_prefill_capacity_falls_as_the_slo_tightens(
    slo_s: float, tighter: float, instances: int
) -> None:
    """A tighter TTFT leaves less room for queueing: the utilisation and the capacity
    fall (within the SLOs where every request of the mix stays attainable)."""
    _, prefill, _, _ = chat()
    mix = RequestMix.from_samples(lognormal_lengths(1150, 0.6, 400), lognormal_lengths(210, 0.5))
    loose = prefill_capacity(prefill, mix, slo_s, 0.9, tpt(), 0.05, instances)
    tight = prefill_capacity(prefill, mix, slo_s * tighter, 0.9, tpt(), 0.05, instances)
    assert tight.unattainable.share == 0.0
    assert tight.tps_per_instance <= loose.tps_per_instance
    assert tight.ttft_quantile_s <= slo_s * tighter + 1e-3


def test_prefill_capacity_meets_the_slo_at_the_returned_rate_and_not_above() -> None:
    _, prefill, _, _ = chat()
    mix = chat_mix()
    cap = prefill_capacity(prefill, mix, 1.0, 0.9, tpt(), 0.05, 4)
    assert cap.unattainable.share == 0.0  # so the whole mix is what the SLO covers
    assert 0.5 < cap.utilisation < 0.99
    at = predicted_ttft_s(PrefillLoad(prefill, mix, 0.9, cap.tps_per_instance, 4, tpt(), 0.05))
    above = predicted_ttft_s(
        PrefillLoad(prefill, mix, 0.9, cap.tps_per_instance * 1.01, 4, tpt(), 0.05)
    )
    assert at == pytest.approx(cap.ttft_quantile_s)
    assert at <= 1.0 + 1e-4 < above


def test_at_zero_load_the_predicted_ttft_is_the_idle_one() -> None:
    """Nobody waits on an idle pool: the prediction is the limit of a vanishing load
    (it divided 0 by 0 before)."""
    _, prefill, _, _ = chat()
    mix = chat_mix()
    idle = predicted_ttft_s(PrefillLoad(prefill, mix, 0.9, 0.0, 4, tpt(), 0.05))
    assert idle == pytest.approx(
        predicted_ttft_s(PrefillLoad(prefill, mix, 0.9, 1e-9, 4, tpt(), 0.05))
    )
    assert (
        predicted_ttft_side(PrefillLoad(prefill, mix, 0.9, 0.0, 4, tpt(), 0.05), 1.0, 0.0, idle * 2)
        == 0
    )


def test_a_larger_pool_sustains_more_per_instance() -> None:
    """Pooling: the same utilisation queues less with more servers."""
    _, prefill, _, _ = chat()
    caps = [prefill_capacity(prefill, chat_mix(), 0.5, 0.9, tpt(), 0.05, n) for n in (1, 4, 32)]
    assert caps[0].tps_per_instance < caps[1].tps_per_instance < caps[2].tps_per_instance
    assert caps[2].tps_per_instance < caps[2].sustained_tps_per_instance


def test_instances_for_a_demand_are_the_fewest_that_cover_it() -> None:
    _, prefill, _, _ = chat()
    mix = chat_mix()
    demand = 100_000.0

    def at(instances: int) -> PrefillCapacity:
        return prefill_capacity(prefill, mix, 0.5, 0.9, tpt(), 0.05, instances)

    n, cap = prefill_instances_for(demand, at)
    assert n * cap.tps_per_instance >= demand
    fewer = at(n - 1)
    assert (n - 1) * fewer.tps_per_instance < demand


# --------------------------------------------------------------------------- unattainable


def with_long_prompts(mix: RequestMix, tokens: float, share: float) -> RequestMix:
    """``mix`` plus ``share`` (of the result) requests of ``tokens`` prompt tokens."""
    bounds = list(mix.prompt.bounds)
    counts = list(mix.prompt.counts)
    finite = [b for b in bounds if math.isfinite(b)]
    assert tokens > finite[-1]
    extra = share / (1.0 - share) * mix.prompt.total
    # a bucket (tokens * 0.99, tokens] just below +Inf
    bounds[-1:-1] = [tokens * 0.99, tokens]
    counts[-1:-1] = [0.0, extra]
    return RequestMix(LengthHistogram(tuple(bounds), tuple(counts)), mix.output)


def test_unattainable_requests_do_not_change_the_prefill_capacity_of_the_rest() -> None:
    _, prefill, _, _ = chat()
    base = chat_mix()
    slo_s = 1.5
    plain = prefill_capacity(prefill, base, slo_s, 0.9, tpt(), 0.05, 8)
    # 60,000-token prompts take ~5 s alone on a TP4 H800: beyond a 1.5 s TTFT.
    polluted = with_long_prompts(base, 60_000, 0.05)
    lost = unattainable(prefill, polluted, slo_s, tpt(), 0.05)
    assert lost.above_prompt_tokens is not None
    assert lost.share == pytest.approx(0.05)
    mixed = prefill_capacity(prefill, polluted, slo_s, 0.9, tpt(), 0.05, 8)
    assert mixed.tps_per_instance == pytest.approx(plain.tps_per_instance, rel=1e-6)
    assert mixed.utilisation == pytest.approx(plain.utilisation, rel=1e-6)
    # ... but their work is still served: the demand in attainable-mix tokens grows.
    assert mixed.demand_tps(prefill, polluted, 10_000.0) > 10_000.0 * 1.05
    assert plain.unattainable.share == 0.0
    assert plain.demand_tps(prefill, base, 10_000.0) == pytest.approx(10_000.0)


@pytest.mark.parametrize("slo_s", [0.3, 0.8, 1.5, 3.0])
def test_the_unattainable_threshold_is_where_an_idle_instance_just_misses(slo_s: float) -> None:
    _, prefill, _, _ = chat()
    mix = with_long_prompts(chat_mix(), 60_000, 0.02)
    lost = unattainable(prefill, mix, slo_s, tpt(), 0.05)
    assert lost.above_prompt_tokens is not None
    threshold = lost.above_prompt_tokens
    just_below = float(idle_ttft_s(prefill, threshold * 0.999, tpt(), 0.05))
    just_above = float(idle_ttft_s(prefill, threshold * 1.001, tpt(), 0.05))
    assert just_below <= slo_s < just_above
    assert lost.share == pytest.approx(1.0 - mix.prompt.cdf(threshold))


def test_nothing_is_unattainable_when_the_longest_prompt_makes_it() -> None:
    _, prefill, _, _ = chat()
    lost = unattainable(prefill, chat_mix(), 60.0, tpt(), 0.05)
    assert lost.share == 0.0 and lost.above_prompt_tokens is None


def test_everything_is_unattainable_when_the_fixed_costs_exceed_the_slo() -> None:
    _, prefill, _, _ = chat()
    lost = unattainable(prefill, chat_mix(), 0.04, tpt(), 0.05)  # one decode step > SLO
    assert lost.share == 1.0


def test_with_no_rate_meeting_the_slo_the_capacity_keeps_up_with_the_work() -> None:
    """No prompt meets the TTFT even alone: no instance count brings it within the SLO,
    but the work must be served (else the queue grows without bound and requests are
    dropped). The capacity is the whole mix's sustained rate at the queueing model's
    stability limit, the same rate an attainable mix's capacity is a share of."""
    _, prefill, _, _ = chat()
    cap = prefill_capacity(prefill, chat_mix(), 0.04, 0.9, tpt(), 0.05, 8)
    reachable = prefill_capacity(prefill, chat_mix(), 60.0, 0.9, tpt(), 0.05, 8)
    assert cap.unattainable.share == 1.0 and math.isinf(cap.ttft_quantile_s)
    assert cap.utilisation == MAX_GGC_UTILISATION
    assert cap.sustained_tps_per_instance == pytest.approx(reachable.sustained_tps_per_instance)
    assert cap.tps_per_instance == pytest.approx(
        MAX_GGC_UTILISATION * reachable.sustained_tps_per_instance
    )
    # As much as a loose SLO allows (60 s: met at the stability limit), more than one
    # that binds.
    assert cap.tps_per_instance == reachable.tps_per_instance
    binding = prefill_capacity(prefill, chat_mix(), 1.5, 0.9, tpt(), 0.05, 8)
    assert binding.utilisation < MAX_GGC_UTILISATION
    assert cap.tps_per_instance > binding.tps_per_instance


# --------------------------------------------------------------------------- decode


def test_with_no_batch_meeting_the_tbt_the_decode_capacity_keeps_up_with_the_work() -> None:
    """One sequence's step already exceeds a 2 ms TBT: no decode count brings it within
    the SLO, but the tokens must be generated. The capacity is then the most an
    instance generates, at the largest batch the engine and KV cache allow: what a SLO
    too loose to bind gives."""
    _, _, decode, _ = chat()
    mix = chat_mix()
    cap = decode_capacity(decode, mix, 0.002)
    loose = decode_capacity(decode, mix, 60.0)
    assert cap.limit == "keep_up" and cap.keeps_up_only
    assert loose.limit in ("max_batch", "kv_cache") and not loose.keeps_up_only
    assert (cap.batch, cap.tps_per_instance) == (loose.batch, loose.tps_per_instance)
    assert cap.step_s > 0.002
    assert not decode_capacity(decode, mix, 0.05).keeps_up_only


def test_decode_capacity_agrees_with_the_perf_model_when_the_slo_binds() -> None:
    _, _, decode, _ = chat()
    mix = chat_mix()
    cap = decode_capacity(decode, mix, 0.05)
    assert cap.limit == "tbt_slo"
    assert cap.step_s == pytest.approx(0.05, rel=1e-4)
    assert cap.tps_per_instance == pytest.approx(
        decode.decode_capacity_tps(0.05, mix.live_context_tokens), rel=0.01
    )


@settings(max_examples=25, deadline=None)
@given(tbt_s=st.floats(0.03, 0.12), tighter=st.floats(0.5, 0.95), longer=st.floats(1.2, 4.0))
def test_decode_capacity_falls_as_the_slo_tightens_and_contexts_grow(
    tbt_s: float, tighter: float, longer: float
) -> None:
    _, _, decode, _ = chat()
    mix = chat_mix()

    def within_slo(cap: DecodeCapacity) -> float:
        # A rate that only keeps up with the work is no capacity within the SLO.
        return 0.0 if cap.keeps_up_only else cap.tps_per_instance

    loose = within_slo(decode_capacity(decode, mix, tbt_s))
    assert within_slo(decode_capacity(decode, mix, tbt_s * tighter)) <= loose
    assert within_slo(decode_capacity(decode, chat_mix(longer), tbt_s)) <= loose


def test_decode_capacity_is_bounded_by_max_batch_and_the_kv_cache() -> None:
    policy, _, _, _ = chat()
    state = load_desired_state(REPO_ROOT)
    h20 = state.clusters[policy.cluster].gpu_types["h20"]
    small_batch = instance_perf(policy.model, "h20", h20, 4, max_batch=16)
    cap = decode_capacity(small_batch, chat_mix(), 0.2)
    assert cap.limit == "max_batch" and cap.batch == 16
    # 40,000-token prompts + outputs: the KV cache (681k tokens on 4 H20) holds ~17.
    _, _, decode, _ = chat()
    long = RequestMix.from_samples(np.full(100, 40_000.0), np.full(100, 200.0))
    kv = decode_capacity(decode, long, 1.0)
    assert kv.limit == "kv_cache"
    assert kv.batch == pytest.approx(decode.kv_capacity_tokens / 40_200.0, rel=0.02)
    assert kv.tps_per_instance == pytest.approx(kv.batch / kv.step_s)


# --------------------------------------------------------------------------- vs the simulator


def saturation_per_instance(
    policy: ServicePolicy,
    *,
    prefill: int,
    decode: int,
    tokens_per_request: float,
    rate_unit_tps: float,
    meets: str,
    minutes: float = 20.0,
) -> float:
    """Bisection on the arrival rate (in units of ``rate_unit_tps`` per instance of the
    role under test) for the highest constant rate at which the simulator's quantile
    of ``meets`` ('ttft' or 'tbt', per request) stays within the SLO; returned as
    tokens/s per instance of that role."""
    state = load_desired_state(REPO_ROOT)
    cluster = state.clusters[policy.cluster]
    count = prefill if meets == "ttft" else decode
    slo_ms = policy.slo.ttft_ms if meets == "ttft" else policy.slo.tbt_ms

    def ok(fraction: float) -> bool:
        rps = fraction * rate_unit_tps * count / tokens_per_request
        workload = synthetic_workload(
            "chat", hours=minutes / 60, peak_rps=rps, seed=0, trough_ratio=1.0, bursts=()
        )
        profile = LoadProfile.from_workload(workload)
        sim = ServiceSim(policy, cluster, profile)
        sim.set_counts({("h800", "rdma"): float(prefill)}, {"h20": decode}, {})
        while sim.t < profile.horizon_s + 300:
            sim.step()
        outcome = sim.request_outcomes()
        value = outcome.ttft_quantile_ms if meets == "ttft" else outcome.tbt_quantile_ms
        return value is not None and value <= slo_ms

    lo, hi = 0.4, 1.1
    assert ok(lo) and not ok(hi)
    for _ in range(8):  # 0.7 / 2^8: 0.3 % of the unit
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo * rate_unit_tps


def sim_mix() -> RequestMix:
    """The synthetic chat load's lengths, as a policy would read them (an hour's worth,
    another seed than the load under test)."""
    workload = synthetic_workload(
        "chat", hours=1.0, peak_rps=30.0, seed=1, trough_ratio=1.0, bursts=()
    )
    return RequestMix.from_samples(workload.prompt_tokens, workload.output_tokens)


@pytest.mark.parametrize(
    ("prefill", "ttft_ms"),
    [(8, None), (3, None), (8, 400.0), (2, 500.0)],
    ids=[
        "chat-slo-8-instances",
        "chat-slo-3-instances",
        "ttft-400ms-8-instances",
        "ttft-500ms-2-instances",
    ],
)
def test_prefill_capacity_matches_the_simulated_saturation_point(
    prefill: int, ttft_ms: float | None
) -> None:
    """The chat policy (and tighter TTFTs, where queueing decides more): the capacity
    derived for the mix is within 10 % of the highest constant prompt rate per instance
    at which the simulator keeps the TTFT quantile within the SLO. The last case is the
    one a queue-blind figure (the sustained rate) would miss by ~20 %."""
    policy, prefill_perf, decode_perf, link = chat()
    if ttft_ms is not None:
        policy = policy.model_copy(
            update={"slo": policy.slo.model_copy(update={"ttft_ms": ttft_ms})}
        )
    mix = sim_mix()
    capacities = role_capacities(
        prefill_perf,
        decode_perf,
        mix,
        ttft_slo_s=policy.slo.ttft_ms / 1000,
        tbt_slo_s=policy.slo.tbt_ms / 1000,
        quantile=policy.slo.quantile,
        link_gbps=link,
        prefill_instances_hint=prefill,
    )
    measured = saturation_per_instance(
        policy,
        prefill=prefill,
        decode=80,  # ample: no admission wait
        tokens_per_request=mix.prompt_mean_tokens,
        rate_unit_tps=capacities.prefill.sustained_tps_per_instance,
        meets="ttft",
    )
    print(
        f"prefill x{prefill}, TTFT {policy.slo.ttft_ms:g} ms: model "
        f"{capacities.prefill_tps_per_instance:.0f}, simulator {measured:.0f} prompt tokens/s "
        f"per instance ({capacities.prefill_tps_per_instance / measured - 1:+.1%})"
    )
    assert capacities.prefill_tps_per_instance == pytest.approx(measured, rel=0.10)


def test_decode_capacity_matches_the_simulated_saturation_point() -> None:
    policy, _, decode_perf, _ = chat()
    mix = sim_mix()
    capacity = decode_capacity(decode_perf, mix, policy.slo.tbt_ms / 1000)
    measured = saturation_per_instance(
        policy,
        prefill=40,  # ample: prefill never queues
        decode=4,
        tokens_per_request=mix.output_mean_tokens,
        rate_unit_tps=capacity.tps_per_instance,
        meets="tbt",
    )
    print(
        f"decode x4, TBT {policy.slo.tbt_ms:g} ms: model {capacity.tps_per_instance:.0f}, "
        f"simulator {measured:.0f} output tokens/s per instance "
        f"({capacity.tps_per_instance / measured - 1:+.1%})"
    )
    assert capacity.tps_per_instance == pytest.approx(measured, rel=0.10)


# --------------------------------------------------------------------------- correction


def test_decode_correction_converges_within_a_few_cycles_when_the_model_is_30_percent_off() -> None:
    """The real instance steps 1.3x slower than the model. Each cycle the policy sees
    the decode rate and TBT of instances run at the corrected capacity; the factor
    reaches 1.3 within 5 % in 3 cycles and within 2 % in 4 (ln 1.3 halves each cycle)."""
    _, _, decode, _ = chat()
    mix = chat_mix()
    slo_s = 0.05
    truth = 1.3
    correction = LatencyCorrection()
    factors = []
    for _ in range(6):
        planned = decode_capacity(decode, mix, slo_s, correction.decode)
        # The real instance at the planned batch: step truth x the model's.
        real_step = truth * float(
            decode.decode_step_s(
                planned.batch, planned.batch * mix.live_context_tokens, mix.live_context_tokens
            )
        )
        observed_tps = planned.batch / real_step
        correction = correction.updated(
            "decode", implied_decode_factor(decode, mix, real_step, observed_tps)
        )
        factors.append(correction.decode)
    assert factors[2] == pytest.approx(truth, rel=0.05)
    assert factors[3] == pytest.approx(truth, rel=0.02)
    assert correction.prefill == 1.0  # roles are separate
    # The corrected capacity is what a 1.3x slower instance sustains at the SLO.
    corrected = decode_capacity(decode, mix, slo_s, correction.decode)
    assert corrected.step_s == pytest.approx(slo_s, rel=1e-3)
    assert corrected.tps_per_instance < decode_capacity(decode, mix, slo_s).tps_per_instance


@pytest.mark.parametrize("truth", [1.3, 1 / 1.3])
def test_prefill_correction_converges_within_a_few_cycles_when_the_model_is_30_percent_off(
    truth: float,
) -> None:
    """The observed TTFT is what the model predicts for an instance ``truth`` x slower
    at the observed load; inverting the model recovers the factor although only part
    of the TTFT scales with it, and the correction converges like the decode one."""
    _, prefill, _, _ = chat()
    mix = chat_mix()
    correction = LatencyCorrection()
    factors = []
    for cycle in range(5):
        load = 6_000.0 + 500.0 * cycle  # prompt tokens/s per instance, below saturation
        at_load = PrefillLoad(prefill, mix, 0.9, load, 8, tpt(), 0.05)
        observed = predicted_ttft_s(at_load, truth)
        implied = implied_prefill_factor(at_load, observed)
        assert implied == pytest.approx(truth, rel=1e-3)
        correction = correction.updated("prefill", implied)
        factors.append(correction.prefill)
    assert factors[2] == pytest.approx(truth, rel=0.05)
    assert factors[3] == pytest.approx(truth, rel=0.02)
    assert correction.decode == 1.0


def test_the_correction_is_bounded_and_ignores_unusable_observations() -> None:
    correction = LatencyCorrection()
    for _ in range(20):
        correction = correction.updated("decode", 10.0)
    # an implied factor beyond the bound counts as the bound: the factor approaches it
    assert correction.decode <= LatencyCorrection.MAX_FACTOR
    assert correction.decode == pytest.approx(LatencyCorrection.MAX_FACTOR, rel=1e-4)
    for _ in range(20):
        correction = correction.updated("prefill", 0.01)
    assert correction.prefill >= LatencyCorrection.MIN_FACTOR
    assert correction.prefill == pytest.approx(LatencyCorrection.MIN_FACTOR, rel=1e-4)
    for bad in (None, math.nan, math.inf, 0.0, -1.0):
        assert correction.updated("decode", bad) == correction
    assert LatencyCorrection.from_extra(correction.to_extra()) == correction
    assert LatencyCorrection.from_extra(()) == LatencyCorrection()


def test_a_ttft_offset_is_smoothed_bounded_and_kept_with_the_factors() -> None:
    """The TTFT spent outside the instances moves by the factors' EWMA (in seconds, an
    offset being added), stays within ``[0, the TTFT SLO]``, travels in the memory, and
    a damaged one is read back as none (or as the largest SLO a policy may set)."""
    correction = LatencyCorrection()
    offsets = []
    for _ in range(4):
        correction = correction.with_ttft_offset(0.4, limit_s=1.5)
        offsets.append(correction.prefill_ttft_offset_s)
    assert offsets == pytest.approx([0.2, 0.3, 0.35, 0.375])
    assert (correction.prefill, correction.decode) == (1.0, 1.0)
    for bad in (None, math.nan, math.inf):
        assert correction.with_ttft_offset(bad, limit_s=1.5) == correction
    assert correction.with_ttft_offset(-3.0, limit_s=1.5).prefill_ttft_offset_s == 0.1875
    for _ in range(40):
        correction = correction.with_ttft_offset(100.0, limit_s=1.5)
    assert correction.prefill_ttft_offset_s == pytest.approx(1.5)
    assert correction.within_ttft_slo(0.8).prefill_ttft_offset_s == 0.8
    assert correction.within_ttft_slo(2.0) is correction
    assert (
        correction.updated("prefill", 1.3).prefill_ttft_offset_s == correction.prefill_ttft_offset_s
    )
    assert LatencyCorrection.from_extra(correction.to_extra()) == correction
    damaged = [LatencyCorrection(prefill_ttft_offset_s=v).sanitized() for v in (math.nan, -1.0)]
    assert [c.prefill_ttft_offset_s for c in damaged] == [0.0, 0.0]
    huge = LatencyCorrection(prefill_ttft_offset_s=1e300).sanitized()
    assert huge.prefill_ttft_offset_s == LatencyCorrection.MAX_TTFT_OFFSET_S


@pytest.mark.parametrize("offset_s", [0.1, 0.4, 0.8])
def test_a_ttft_offset_adds_to_every_ttft_and_shrinks_the_budget(offset_s: float) -> None:
    """An offset is added to each request's TTFT, so the predicted quantile at a load
    moves by exactly it; prefill capacity is then what the rest of the SLO allows, and
    prompts whose idle TTFT plus the offset miss the SLO count as unattainable."""
    policy, prefill, decode, link = chat()
    mix = chat_mix()
    at_load = PrefillLoad(prefill, mix, 0.9, 8_000.0, 8, tpt(), 0.05)
    shifted = PrefillLoad(prefill, mix, 0.9, 8_000.0, 8, tpt(), 0.05 + offset_s)
    assert predicted_ttft_s(shifted) == pytest.approx(predicted_ttft_s(at_load) + offset_s)

    def capacities(offset: float) -> RoleCapacities:
        return role_capacities(
            prefill,
            decode,
            mix,
            ttft_slo_s=policy.slo.ttft_ms / 1000.0,
            tbt_slo_s=policy.slo.tbt_ms / 1000.0,
            quantile=policy.slo.quantile,
            link_gbps=link,
            prefill_instances_hint=8,
            correction=LatencyCorrection(prefill_ttft_offset_s=offset),
        )

    plain, offset = capacities(0.0), capacities(offset_s)
    assert offset.prefill.tps_per_instance < plain.prefill.tps_per_instance
    assert offset.prefill.unattainable.share >= plain.prefill.unattainable.share
    assert offset.decode == plain.decode
    assert f"TTFT +{offset_s * 1000:.0f} ms outside the instances" in offset.explain()
    assert "outside the instances" not in plain.explain()


@settings(max_examples=60, deadline=None)
@given(
    load=st.floats(min_value=500.0, max_value=9_000.0),
    observed_s=st.floats(min_value=0.002, max_value=4.0),
    current_s=st.sampled_from([0.0, 0.2, 0.7]),
)
def test_an_implied_offset_puts_the_prediction_in_the_observed_bucket(
    load: float, observed_s: float, current_s: float
) -> None:
    """Whatever the reading, the offset an observed TTFT quantile implies is never
    negative, is the current one where that one's prediction lies in the reading's
    bucket, and otherwise puts the prediction on the bucket's nearest edge (or at 0
    where even no offset predicts more than the bucket holds)."""
    _, prefill, _, _ = chat()
    at_load = PrefillLoad(prefill, chat_mix(), 0.9, load, 8, tpt(), 0.05 + current_s)
    correction = LatencyCorrection(prefill_ttft_offset_s=current_s)
    implied = implied_ttft_offset_s(at_load, correction, observed_s, VLLM_TTFT_BUCKETS_S)
    assert implied is not None and implied >= 0.0
    lower_s, upper_s = bucket_around(observed_s, VLLM_TTFT_BUCKETS_S)
    with_implied = replace(at_load, decode_first_step_s=0.05 + implied)
    predicted = predicted_ttft_s(with_implied)
    if implied == current_s:
        assert lower_s - 1e-9 <= predicted <= upper_s + 1e-9 or implied == 0.0
    elif implied > 0.0:
        assert min(abs(predicted - lower_s), abs(predicted - upper_s)) < 1e-6
    else:  # no offset at all already predicts above the bucket
        assert predicted >= upper_s - 1e-9


def _prefill_windows(
    policy: ServicePolicy,
    peak_rps: float,
    speed: float,
    prefill_instances: int,
    windows: int = 10,
) -> Iterator[tuple[dict[str, float | None], RequestMix]]:
    """``windows`` 60 s windows' readings (from 300 s on) of chat's simulated prefill,
    engines at ``speed`` x the declared compute, ``prefill_instances`` H800 instances
    serving a steady ``peak_rps`` of chat's synthetic load, with the mix as read from
    the engines' coarse 1-2-5 buckets."""
    cluster = load_desired_state(REPO_ROOT).clusters[policy.cluster]
    workload = synthetic_workload(
        "chat",
        hours=max(0.3, (300 + 60 * (windows + 1)) / 3600),
        peak_rps=peak_rps,
        seed=0,
        trough_ratio=1.0,
        bursts=(),
    )
    config = SimConfig(prefill_engine_speed=speed, decode_engine_speed=speed)
    sim = ServiceSim(policy, cluster, LoadProfile.from_workload(workload), config)
    sim.set_counts({("h800", "rdma"): float(prefill_instances)}, {"h20": 48}, {})
    coarse = RequestMix.from_samples(
        workload.prompt_tokens, workload.output_tokens, one_two_five_buckets(32768)
    )
    for end_s in range(300, 300 + 60 * windows, 60):
        while sim.t < end_s:
            sim.step()
        yield sim.window_metrics(60.0), coarse


@pytest.mark.parametrize("speed", [0.77, 1.0, 1.3])
def test_prefills_busy_fraction_reads_how_much_slower_or_faster_the_engine_runs(
    speed: float,
) -> None:
    """A simulated prefill at ``speed`` x the declared GPU's compute, at a steady load,
    reports a GPU utilisation from which the model's busy fraction for the prompt
    tokens/s it served recovers ``1 / speed``: either way, and with the mix read from
    coarse 1-2-5 buckets (their overstated mean prompt is in both the prediction and
    the capacity it corrects, so it cancels). One reading averages four scrapes of the
    gauge, each a second's busy fraction (about +-7 %); ten readings, as the
    correction's EWMA averages them, come within 5 %."""
    policy, prefill, _, _ = chat()
    log_factors = []
    for read, coarse in _prefill_windows(policy, 80.0, speed, 16):
        served_tps, gpu_util = read["prefill_tps"], read["prefill_gpu_util"]
        assert served_tps is not None and gpu_util is not None and 0.2 < gpu_util < 0.9
        implied = busy_taught(prefill, coarse, served_tps, 16, gpu_util)
        assert implied is not None
        log_factors.append(math.log(implied))
    assert math.exp(float(np.mean(log_factors))) == pytest.approx(1.0 / speed, rel=0.05)


def test_a_saturated_prefill_reads_its_speed_at_any_prompt_rate() -> None:
    """Prefill at 0.6x the declared compute, too few instances for 20 prompts/s: a queue
    holds prompts through every window and the pool is busy all the time. Too few
    prompts for a busy reading of an unsaturated pool, yet every sampled second of this
    one is busy whatever arrived, and what it served is what it can do: read with the
    queue it held (``backlogged``), the busy fraction gives 1 / 0.6, as the correction
    needs where the TTFT is not read (overloaded, it reads the queue's wait). Without
    that, at 40 requests/s such a prefill was never read slower and the planner cycled
    between overload and drain (a hostile prober: 50.8% within both SLOs)."""
    policy, prefill, _, _ = chat()
    factors = []
    for read, coarse in _prefill_windows(policy, 20.0, 0.6, 2):
        served_tps, gpu_util, queue = (
            read["prefill_tps"],
            read["prefill_gpu_util"],
            read["prefill_queue"],
        )
        assert served_tps is not None and gpu_util is not None and queue is not None
        assert queue > 10
        unsaturated_read = busy_taught(prefill, coarse, served_tps, 2, gpu_util)
        assert unsaturated_read is None  # too few prompts for an unsaturated pool's reading
        implied = busy_taught(prefill, coarse, served_tps, 2, gpu_util, backlogged=True)
        assert implied is not None
        factors.append(implied)
    assert float(np.median(factors)) == pytest.approx(1.0 / 0.6, rel=0.05)


def test_a_coarse_busy_reading_still_bounds_the_factor_from_below() -> None:
    """Prefill at 0.6x, enough instances for 20 prompts/s that it idles between them:
    each reading is too coarse to teach the factor, yet two of its spreads below it, it
    is a floor the true factor (1 / 0.6) stays above, and well above the model's."""
    policy, prefill, _, _ = chat()
    floors = []
    for read, coarse in _prefill_windows(policy, 20.0, 0.6, 6):
        served_tps, gpu_util = read["prefill_tps"], read["prefill_gpu_util"]
        assert served_tps is not None and gpu_util is not None and gpu_util < 0.9
        assert busy_taught(prefill, coarse, served_tps, 6, gpu_util) is None
        floor = busy_floor(prefill, coarse, served_tps, 6, gpu_util)
        assert floor is not None
        floors.append(floor)
    assert max(floors) < 1.0 / 0.6
    assert float(np.median(floors)) > 1.15


def test_coarse_busy_readings_together_teach_the_speed_none_teaches_alone() -> None:
    """The same 0.6x prefill idling between 20 prompts/s on six instances: no one
    reading is precise enough to teach its speed, but readings of non-overlapping
    windows are independent samples of it, and kept (``kept_busy_readings``) and
    combined (``combined_busy_reading``) they come within BUSY_READ_MAX_ERROR: read
    precise, within 5 % of 1 / 0.6 (a hostile prober's 40 requests/s of chat on such
    engines: the planner cycled between overload and drain, 50.8 % within both SLOs)."""
    policy, prefill, _, _ = chat()
    kept: tuple[tuple[float, float, float], ...] = ()
    together = None
    for k, (read, coarse) in enumerate(_prefill_windows(policy, 20.0, 0.6, 6, windows=30)):
        served_tps, gpu_util = read["prefill_tps"], read["prefill_gpu_util"]
        assert served_tps is not None and gpu_util is not None
        reading = read_prefill_busy(prefill, coarse, served_tps, 6, gpu_util)
        assert reading is not None and reading.taught is None
        kept = kept_busy_readings(kept, reading, 60.0 * k, 60.0, 3600.0)
        together = combined_busy_reading(kept)
        assert together is not None
        if together.precise:
            break
    assert together is not None and together.precise and together.taught is not None
    assert 5 < len(kept) < 30
    assert together.taught == pytest.approx(1.0 / 0.6, rel=0.05)


def _busy(factor: float, spread: float) -> BusyReading:
    return BusyReading(factor=factor, spread=spread, precise=False, saturated=False)


def test_busy_readings_are_kept_one_a_window_for_the_memory_and_never_saturated() -> None:
    kept = kept_busy_readings((), _busy(1.5, 0.2), 100.0, 60.0, 3600.0)
    assert kept == ((100.0, 1.5, 0.2),)
    # The next cycle's window overlaps this one's: the pair is not two readings' worth.
    assert kept_busy_readings(kept, _busy(1.7, 0.2), 130.0, 60.0, 3600.0) == kept
    kept = kept_busy_readings(kept, _busy(1.7, 0.2), 160.0, 60.0, 3600.0)
    assert kept == ((100.0, 1.5, 0.2), (160.0, 1.7, 0.2))
    # A saturated reading teaches alone and is not kept; nor is a senseless one.
    saturated = BusyReading(factor=1.6, spread=0.2, precise=False, saturated=True)
    assert kept_busy_readings(kept, saturated, 300.0, 60.0, 3600.0) == kept
    assert kept_busy_readings(kept, _busy(1.6, 0.0), 300.0, 60.0, 3600.0) == kept
    # An hour on, the first has gone.
    later = kept_busy_readings(kept, _busy(1.6, 0.2), 3700.0, 60.0, 3600.0)
    assert later == ((160.0, 1.7, 0.2), (3700.0, 1.6, 0.2))


def test_busy_readings_combine_newest_first_only_as_far_as_precision_needs() -> None:
    """n readings of spread s spread by s / sqrt(n); once within BUSY_READ_MAX_ERROR
    the older are not read, so a speed that changed is forgotten as soon as the newer
    readings suffice."""
    assert combined_busy_reading(()) is None
    spread = 0.1
    needed = math.ceil((spread / BUSY_READ_MAX_ERROR) ** 2)  # 4
    old = tuple((60.0 * k, 1.0, spread) for k in range(10))
    new = tuple((600.0 + 60.0 * k, 1.6, spread) for k in range(needed))
    together = combined_busy_reading(old + new)
    assert together is not None and together.precise
    assert together.factor == pytest.approx(1.6)
    assert together.spread == pytest.approx(spread / math.sqrt(needed))
    # One fewer new reading: an old one is read too, and weighs as much.
    partly = combined_busy_reading(old + new[:-1])
    assert partly is not None and partly.precise
    assert partly.factor == pytest.approx(math.exp((needed - 1) * math.log(1.6) / needed))
    # Too few to be precise: not taught, but its floor is closer than one reading's.
    few = combined_busy_reading(new[:2])
    assert few is not None and not few.precise and few.taught is None
    assert few.floor > _busy(1.6, spread).floor


def test_a_damaged_kept_busy_reading_is_passed_over() -> None:
    damaged = ((0.0, math.nan, 0.1), (60.0, 1.5, 0.0), (120.0, -1.0, 0.1), (180.0, 2.0, math.inf))
    assert combined_busy_reading(damaged) is None
    together = combined_busy_reading(((0.0, 1.5, 0.2), *damaged))
    assert together is not None and together.factor == pytest.approx(1.5)


@given(
    st.lists(
        st.tuples(st.floats(0.5, 2.0), st.floats(0.01, 1.0)),
        min_size=1,
        max_size=60,
    )
)
def test_combined_busy_reading_lies_among_its_readings_and_is_no_coarser(
    readings: list[tuple[float, float]],
) -> None:
    kept = tuple((60.0 * k, factor, spread) for k, (factor, spread) in enumerate(readings))
    together = combined_busy_reading(kept)
    assert together is not None
    factors = [f for f, _ in readings]
    assert min(factors) * (1 - 1e-9) <= together.factor <= max(factors) * (1 + 1e-9)
    assert together.spread <= readings[-1][1] * (1 + 1e-9)
    assert together.precise == (together.spread <= BUSY_READ_MAX_ERROR)


def test_a_busy_fraction_over_too_few_prompts_or_out_of_range_says_nothing() -> None:
    """One second of a pool's busy time spreads with its Poisson prompts: a reading of
    four scrapes is taken only from the prompt rate at which what the correction keeps
    of its spread is within BUSY_READ_MAX_ERROR."""
    _, prefill, _, _ = chat()
    mix = chat_mix()
    work = prefill.prefill_work(lognormal_lengths(1150, 0.8))
    scv = float(np.var(work)) / float(np.mean(work)) ** 2
    kept = LatencyCorrection.SMOOTHING / (2 - LatencyCorrection.SMOOTHING)
    needed = (1 + scv) * kept / (GAUGE_SAMPLES_PER_WINDOW * BUSY_READ_MAX_ERROR**2)
    assert 40 < needed < 80  # prompts/s: a few chat instances' worth
    enough_tps = needed * mix.prompt_mean_tokens * 1.03
    assert busy_taught(prefill, mix, enough_tps, 8, 0.5) is not None
    assert busy_taught(prefill, mix, enough_tps * 0.95, 8, 0.5) is None
    for util in (0.0, -0.1, 1.2, math.nan, math.inf):
        assert busy_taught(prefill, mix, 2 * enough_tps, 8, util) is None
    for tps in (0.0, -5.0, math.nan):
        assert busy_taught(prefill, mix, tps, 8, 0.5) is None
    assert busy_taught(prefill, mix, 2 * enough_tps, 0, 0.5) is None


# --------------------------------------------------------------------------- together


def test_role_capacities_explain_in_one_line() -> None:
    _, prefill, decode, link = chat()
    mix = with_long_prompts(chat_mix(), 60_000, 0.01)
    capacities = role_capacities(
        prefill,
        decode,
        mix,
        ttft_slo_s=1.5,
        tbt_slo_s=0.05,
        quantile=0.9,
        link_gbps=link,
        prefill_instances_hint=8,
    )
    line = capacities.explain()
    assert "\n" not in line
    assert "h800" in line and "h20" in line
    assert f"{capacities.prefill_tps_per_instance:.0f} prompt tokens/s" in line
    assert f"{capacities.decode_tps_per_instance:.0f} output tokens/s" in line
    assert "unattainable" in line
    # The first decode step in TTFT is decode's own step at its operating point.
    assert capacities.decode.step_s <= 0.05


def test_prefill_sized_for_a_larger_share_of_requests_takes_less_per_instance() -> None:
    """Each request is judged on its own TTFT: sizing for the attainment goal's share
    (99.5 %) of the attainable requests leaves less load per instance than sizing for
    the SLO quantile (90 %) when long prompts make the TTFT bind, and the same when
    compute binds first."""
    _, prefill, decode, link = chat()

    def per_instance(mix: RequestMix, share: float) -> float:
        caps = role_capacities(
            prefill,
            decode,
            mix,
            ttft_slo_s=1.5,
            tbt_slo_s=0.05,
            quantile=0.9,
            link_gbps=link,
            prefill_instances_hint=8,
            ttft_share=share,
        )
        return caps.prefill_tps_per_instance

    long_prompts = with_long_prompts(chat_mix(), 12_000, 0.2)
    assert per_instance(long_prompts, 0.995) < per_instance(long_prompts, 0.9)
    assert per_instance(chat_mix(), 0.995) <= per_instance(chat_mix(), 0.9)


# --------------------------------------------------------------------------- exactness


@settings(max_examples=200, deadline=None)
@given(
    bounds=st.lists(st.floats(-10, 1e6), min_size=1, max_size=20, unique=True),
    counts=st.lists(
        st.sampled_from([0.0, 1.0, 3.5, 1e-300]) | st.floats(0, 1e5), min_size=21, max_size=21
    ),
    with_inf=st.booleans(),
)
def test_the_whole_mass_from_the_shared_layout_is_the_spread_bit_for_bit(
    bounds: list[float], counts: list[float], with_inf: bool
) -> None:
    """``points()`` takes its lengths from a layout shared by every histogram with the
    same buckets held; they and its weights must be exactly what spreading the buckets
    one by one gives (``upper=inf`` spreads every bucket whole)."""
    edges = (*sorted(bounds), math.inf) if with_inf else tuple(sorted(bounds))
    histogram = LengthHistogram(edges, tuple(counts[: len(edges)]))
    lengths, weights = histogram.points()
    spread_lengths, spread_weights = histogram.points(math.inf)
    assert lengths.tobytes() == spread_lengths.tobytes()
    assert weights.tobytes() == spread_weights.tobytes()


def test_a_layout_shared_by_equal_bounds_is_not_shared_across_the_sign_of_zero() -> None:
    """0.0 == -0.0, so a layout cached for bounds ``(-0.0, inf)`` was the one for
    ``(0.0, inf)`` too, and its points carried the first one's zero."""
    for bounds in ((-0.0, math.inf), (0.0, math.inf)):
        histogram = LengthHistogram(bounds, (1.0, 1.0))
        assert histogram.points()[0].tobytes() == histogram.points(math.inf)[0].tobytes()


def test_the_predicted_ttfts_side_of_a_bucket_is_the_predictions() -> None:
    """``predicted_ttft_side`` skips the TTFT quantile's bisection where two attainments
    settle it; placed against any bucket, edges within the bisection's tolerance of the
    prediction included, it must answer as comparing the prediction does."""
    _, prefill, _, _ = chat()
    checked = 0
    for mix in (chat_mix(), chat_mix(4.0)):
        for instances in (1, 8):
            full = prefill_capacity(prefill, mix, 10.0, 0.9, tpt(), 0.05, instances)
            for share in (0.1, 0.6, 0.95):
                for factor in (0.5, 1.0, 1.7):
                    load = PrefillLoad(
                        prefill,
                        mix,
                        0.9,
                        full.sustained_tps_per_instance * share,
                        instances,
                        tpt(),
                        0.05,
                    )
                    predicted = predicted_ttft_s(load, factor)
                    edges = {0.0, 0.1, 1.0, math.inf}
                    for delta in (0.0, 1e-7, 1e-6, 1.9e-6, 2e-6, 2.1e-6, 1e-5, 1e-3):
                        edges |= {predicted - delta, predicted + delta}
                    ordered = sorted(e for e in edges if e >= 0)
                    for i, lower in enumerate(ordered):
                        for upper in ordered[i + 1 :]:
                            side = predicted_ttft_side(load, factor, lower, upper)
                            assert side == bucket_side(predicted, lower, upper)
                            checked += 1
    assert checked > 4_000


# --------------------------------------------------------------------------- running spread


@given(
    demand_tps=st.floats(1.0, 1e6),
    step_s=st.floats(0.005, 0.2),
)
def test_the_running_counts_spread_grows_as_the_square_root_of_the_demand(
    demand_tps: float, step_s: float
) -> None:
    """The count running is Poisson with mean demand x step: at the 99.5 % goal it
    reaches 2.576 spreads above that mean, each sequence 1 / step tokens/s, so four
    times the demand needs twice the spread (a shrinking share of it)."""
    decode = DecodeCapacity(1000.0, 20.0, step_s, 1000.0, "tbt_slo")
    spread = running_spread_tps(decode, demand_tps, 0.995)
    z = NormalDist().inv_cdf(0.995)
    assert spread == pytest.approx(z * math.sqrt(demand_tps * step_s) / step_s)
    assert running_spread_tps(decode, 4 * demand_tps, 0.995) == pytest.approx(2 * spread)


def test_the_running_counts_spread_is_nothing_where_there_is_nothing_to_hold() -> None:
    decode = DecodeCapacity(1000.0, 20.0, 0.02, 1000.0, "tbt_slo")
    assert running_spread_tps(decode, 0.0, 0.995) == 0.0
    assert running_spread_tps(decode, 5000.0, 0.5) == 0.0  # the mean is the median
    # No batch meets the SLO: the capacity keeps up with the work, no batch to hold.
    keeping_up = DecodeCapacity(1000.0, 256.0, 0.08, 1000.0, "keep_up")
    assert running_spread_tps(keeping_up, 5000.0, 0.995) == 0.0

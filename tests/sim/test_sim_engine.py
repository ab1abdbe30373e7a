"""The fluid P/D model: conservation, the latency cliff, transfer penalties, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reconciler.desired import DesiredState
from reconciler.perfmodel.instance import kv_transfer_s
from reconciler.sim.engine import (
    LoadProfile,
    ServiceSim,
    SimConfig,
    fifo_delay,
    serve_in_flight,
    synthetic_profile,
)
from reconciler.sim.fleet import SimulatedFleet
from reconciler.sim.workload import Workload, synthetic_workload
from reconciler.state import METRIC_NAMES, DeploymentGroup, GroupRole, NodeInstances


def steady_load(rps: float, minutes: float = 10, shape: str = "b", seed: int = 0) -> LoadProfile:
    workload = synthetic_workload(
        shape, hours=minutes / 60, peak_rps=rps, seed=seed, trough_ratio=1.0, bursts=()
    )
    return LoadProfile.from_workload(workload)


def run_fixed(
    state: DesiredState,
    service: str,
    profile: LoadProfile,
    prefill: dict[tuple[str, str], float],
    decode: dict[str, int],
    extra_s: int = 900,
) -> ServiceSim:
    policy = state.policies[service]
    sim = ServiceSim(policy, state.clusters[policy.cluster], profile)
    sim.set_counts(prefill, decode, {})
    while sim.t < profile.horizon_s + extra_s:
        sim.step()
    return sim


# --------------------------------------------------------------------------- conservation


@settings(max_examples=6, deadline=None)
@given(
    rps=st.floats(2, 60),
    prefill=st.integers(0, 6),
    decode=st.integers(0, 6),
    seed=st.integers(0, 1000),
)
# A saturated prefill: its last requests wait ~33 s in the G/G/c term the fluid does not
# hold, and decode after the fluid counters drained (judged as never completed before
# the tail ran until the sampled requests were done).
@example(rps=4.0, prefill=1, decode=2, seed=1)
def test_every_request_completes_once_or_is_dropped(
    state: DesiredState, rps: float, prefill: int, decode: int, seed: int
) -> None:
    profile = steady_load(rps, minutes=4, seed=seed)
    policy = state.policies["svc-b"]
    sim = ServiceSim(policy, state.clusters[policy.cluster], profile)
    sim.set_counts({("h800", "rdma"): float(prefill)}, {"h20": decode}, {})

    def step_and_check() -> None:
        sim.step()
        c = sim.conservation()
        # At every second: arrived = dropped + completed + in flight.
        assert c["arrived"] == pytest.approx(
            c["dropped"] + c["completed"] + c["in_flight"], rel=1e-9, abs=1e-6
        )

    while sim.t < profile.horizon_s:
        step_and_check()
    serve_in_flight(sim, profile.horizon_s + 7200, step_and_check)
    c = sim.conservation()
    assert c["arrived"] == pytest.approx(profile.requests)
    assert c["in_flight"] == pytest.approx(0.0, abs=1e-6)
    outcome = sim.request_outcomes()
    assert outcome.requests == pytest.approx(profile.requests)
    assert (
        0.0 <= outcome.slo_attainment <= min(outcome.ttft_attainment, outcome.tbt_attainment) <= 1.0
    )
    # The per-request view (a sample) agrees with the fluid counters on what completed.
    assert outcome.completed_fraction == pytest.approx(c["completed"] / c["arrived"], abs=0.02)
    if prefill == 0 or decode == 0:
        assert c["completed"] == 0.0
        assert any("no request completed" in note for note in outcome.notes)


def test_decode_tokens_match_the_requests_output(state: DesiredState) -> None:
    profile = steady_load(20, minutes=5)
    sim = run_fixed(state, "svc-b", profile, {("h800", "rdma"): 10}, {"h20": 16})
    generated = sim.series.col("decode_tokens").sum()
    assert generated == pytest.approx(profile.output_sum.sum(), rel=0.01)
    assert sim.series.col("prefill_tokens").sum() == pytest.approx(
        profile.prompt_sum.sum(), rel=1e-9
    )


# --------------------------------------------------------------------------- latency


def test_overload_shows_the_latency_cliff(state: DesiredState) -> None:
    """TTFT stays flat while prefill has headroom and explodes once load exceeds it."""
    p90 = {}
    busy = {}
    for rps in (5.0, 12.0, 20.0):  # 4 H800 prefill instances serve ~17 req/s of 7800 tokens
        sim = run_fixed(
            state, "svc-b", steady_load(rps, minutes=10), {("h800", "rdma"): 4}, {"h20": 60}
        )
        p90[rps] = sim.request_outcomes().ttft_quantile_ms
        busy[rps] = float(sim.series.col("prefill_busy")[:600].mean())
    assert busy[5.0] < 0.35 and 0.6 < busy[12.0] < 0.85 and busy[20.0] > 0.99
    assert p90[12.0] < 2.5 * p90[5.0]  # flat ...
    assert p90[20.0] > 20 * p90[12.0]  # ... then a cliff
    assert p90[20.0] > 10_000


def test_decode_overload_drives_tbt_over_the_slo(state: DesiredState) -> None:
    light = run_fixed(state, "svc-b", steady_load(20), {("h800", "rdma"): 12}, {"h20": 30})
    heavy = run_fixed(state, "svc-b", steady_load(20), {("h800", "rdma"): 12}, {"h20": 8})
    slo_ms = state.policies["svc-b"].slo.tbt_ms
    assert light.request_outcomes().tbt_quantile_ms < slo_ms
    assert heavy.request_outcomes().tbt_quantile_ms > slo_ms
    assert heavy.request_outcomes().tbt_attainment < 0.5 < light.request_outcomes().tbt_attainment


def test_utilisation_counters_mislead_for_decode_and_track_prefill(state: DesiredState) -> None:
    """Decode reads ~100 % busy at light and heavy load alike; prefill follows its load."""
    # A few sequences per decode instance against a nearly full batch at the TBT SLO.
    light = run_fixed(
        state, "svc-b", steady_load(8), {("h800", "rdma"): 12}, {"h20": 30}, extra_s=0
    )
    heavy = run_fixed(
        state, "svc-b", steady_load(40), {("h800", "rdma"): 12}, {"h20": 30}, extra_s=0
    )
    m_light, m_heavy = light.window_metrics(120), heavy.window_metrics(120)
    assert m_light["decode_gpu_util"] > 0.95 and m_heavy["decode_gpu_util"] > 0.95
    assert m_heavy["decode_tps"] > 4 * m_light["decode_tps"]
    assert m_light["prefill_gpu_util"] < 0.25 < 0.6 < m_heavy["prefill_gpu_util"]
    assert m_light["decode_kv_usage"] < m_heavy["decode_kv_usage"]


def test_window_metrics_report_all_signals(state: DesiredState) -> None:
    sim = run_fixed(state, "svc-b", steady_load(10), {("h800", "rdma"): 6}, {"h20": 12}, extra_s=0)
    metrics = sim.window_metrics(60)
    assert set(metrics) == {
        "prefill_tps",
        "decode_tps",
        "ttft",
        "tbt",
        "prefill_gpu_util",
        "decode_gpu_util",
        "prefill_sm_active",
        "decode_sm_active",
        "decode_kv_usage",
        "prefill_queue",
        "decode_queue",
        "tbt_mean",
        "decode_running",
    }
    assert set(metrics) == set(METRIC_NAMES)
    assert all(v is not None and v >= 0 for v in metrics.values())
    assert metrics["prefill_tps"] == pytest.approx(10 * 7800, rel=0.25)


# --------------------------------------------------------------------------- placement and transfer


def _group(
    prefill_node: str, decode_node: str, prefill: int = 6, decode: int = 12
) -> DeploymentGroup:
    return DeploymentGroup(
        service="svc-b",
        cluster="prod-east",
        group_id="g-test-1",
        domain="test",
        subgroup=None,
        prefill=GroupRole("h800", prefill, (NodeInstances(prefill_node, prefill),)),
        decode=GroupRole("h20", decode, (NodeInstances(decode_node, decode),)),
    )


def _run_group(state: DesiredState, group: DeploymentGroup, profile: LoadProfile) -> ServiceSim:
    fleet = SimulatedFleet(state.clusters, {"svc-b": state.policies["svc-b"]}, {"svc-b": profile})
    fleet.bootstrap([group])
    fleet.advance_to(profile.horizon_s + 900)
    return fleet.sims["svc-b"]


def test_prefill_and_decode_in_different_spines_pay_the_transfer_penalty(
    state: DesiredState,
) -> None:
    profile = steady_load(8, minutes=8)
    same = _run_group(state, _group("h800-d-001", "h20-d-001"), profile)  # both under pod-d (rg-d)
    apart = _run_group(state, _group("h800-a-001", "h20-b-001"), profile)  # pod-a vs pod-b
    same_ttft = same.request_outcomes().ttft_p50_ms
    apart_ttft = apart.request_outcomes().ttft_p50_ms
    network = state.clusters["prod-east"].network
    kvb = state.policies["svc-b"].model.kv_bytes_per_token
    median_prompt = float(np.median(profile.sample.prompt_tokens))
    penalty_ms = 1000 * float(
        kv_transfer_s(median_prompt, kvb, network.cross_subgroup_gbps)
        - kv_transfer_s(median_prompt, kvb, network.rdma_gbps)
    )
    assert apart_ttft - same_ttft >= 0.9 * penalty_ms
    assert same.series.col("p0_share").max() > 0.99  # rdma pool carries all prefill when together
    assert apart.series.col("p1_share").max() > 0.99  # the cross-spine pool when apart


def test_a_slow_link_caps_prefill_throughput(state: DesiredState) -> None:
    """Cross-spine links (50 Gb/s) ship at most ~45k tokens/s of an 8 B model's KV cache
    per prefill instance; long prompts at H800 speed come close, so the link queues."""
    sim_same = _run_group(
        state, _group("h800-d-001", "h20-d-001", prefill=2), steady_load(7, minutes=6)
    )
    sim_apart = _run_group(
        state, _group("h800-a-001", "h20-b-001", prefill=2), steady_load(7, minutes=6)
    )
    assert sim_apart.series.col("p1_slowdown").max() > 1.5
    assert sim_same.series.col("p0_slowdown").max() < 1.2


# --------------------------------------------------------------------------- determinism and helpers


def test_same_seed_same_result(state: DesiredState) -> None:
    def once(seed: int) -> tuple[float, float, float]:
        profile = synthetic_profile("b", hours=0.2, peak_rps=15, seed=seed)
        sim = run_fixed(state, "svc-b", profile, {("h800", "rdma"): 8}, {"h20": 14}, extra_s=300)
        o = sim.request_outcomes()
        return o.ttft_attainment, o.tbt_attainment, float(sim.series.col("decode_tokens").sum())

    assert once(7) == once(7)
    assert once(7) != once(8)


def test_fifo_delay_inverts_a_cumulative_curve() -> None:
    served = np.array([10.0, 10.0, 30.0])  # 10 units in second 0, none in 1, 20 in 2
    time, ok = fifo_delay(np.array([5.0, 10.0, 20.0, 31.0]), served)
    assert ok.tolist() == [True, True, True, False]
    assert time[:3].tolist() == pytest.approx([0.5, 1.0, 2.5])
    assert np.isinf(time[3])


def test_binned_profile_matches_its_requests() -> None:
    workload = Workload(np.array([0.2, 0.7, 2.5]), np.array([100, 300, 50]), np.array([10, 20, 30]))
    profile = LoadProfile.from_workload(workload)
    assert profile.count.tolist() == [2, 0, 1]
    assert profile.prompt_sum.tolist() == [400, 0, 50]
    assert profile.prompt_sq_sum.tolist() == [100**2 + 300**2, 0, 50**2]
    assert profile.output_survival[0] == 1.0 and profile.output_survival[-1] == 0.0


def test_fluid_scaling_keeps_the_minute_rate_and_poissonises_seconds() -> None:
    workload = synthetic_workload(
        "chat", hours=0.5, peak_rps=3, seed=0, trough_ratio=1.0, bursts=()
    )
    profile = LoadProfile.from_workload(workload)
    scaled = profile.scaled(200, seed=1)
    assert scaled.requests == pytest.approx(200 * profile.requests, rel=0.01)
    assert scaled.sample_weight * profile.sample.requests == pytest.approx(scaled.requests)
    inner = scaled.count[60:-60]
    # Poisson noise of a 600/s stream, not 200 copies of a 3/s stream's noise.
    assert inner.std() / inner.mean() < 3 / np.sqrt(inner.mean())
    assert scaled.prompt_sum.sum() / scaled.requests == pytest.approx(profile.prompt_mean, rel=0.01)
    assert np.array_equal(profile.scaled(200, seed=1).count, scaled.count)


def test_synthetic_profile_has_the_load_of_its_rate_curve() -> None:
    profile = synthetic_profile("a", hours=1, peak_rps=500, seed=1, trough_ratio=1.0, bursts=())
    assert profile.count.mean() == pytest.approx(500, rel=0.01)
    assert profile.prompt_sum.sum() / profile.count.sum() == pytest.approx(3000, rel=0.03)
    assert profile.sample is not None and profile.sample.requests <= 200_000 * 1.05
    assert profile.sample_weight * profile.sample.requests == pytest.approx(profile.count.sum())


def test_a_sample_of_the_days_first_minutes_stands_for_their_requests() -> None:
    """``sample_until_s`` (the review's warm-up): the per-second load is the whole
    day's, the request sample covers the first seconds at the same density, and each
    sample request stands for the requests of those seconds, not of the day."""
    full = synthetic_profile("a", hours=1, peak_rps=500, seed=1, trough_ratio=1.0, bursts=())
    part = synthetic_profile(
        "a", hours=1, peak_rps=500, seed=1, trough_ratio=1.0, bursts=(), sample_until_s=600
    )
    np.testing.assert_array_equal(part.count, full.count)
    assert part.sample is not None and full.sample is not None
    assert float(part.sample.arrival_s.max()) < 600
    assert part.sample_weight * part.sample.requests == pytest.approx(part.count[:600].sum())
    assert part.sample_weight == pytest.approx(full.sample_weight, rel=0.05)  # same density
    assert part.prompt_sum.sum() / part.count.sum() == pytest.approx(3000, rel=0.03)


def test_sim_config_defaults_are_documented_values() -> None:
    config = SimConfig()
    assert config.metrics_window_s == 60 and config.max_batch == 256


# --------------------------------------------------------------------------- warm-up


def test_a_load_after_a_warm_up_is_the_warm_up_then_the_load_judged_from_its_end() -> None:
    warmup = synthetic_profile("chat", hours=0.1, peak_rps=20, seed=100)
    load = synthetic_profile("chat", hours=0.2, peak_rps=10, seed=1)
    joined = load.preceded_by(warmup)
    assert joined.horizon_s == warmup.horizon_s + load.horizon_s
    assert joined.judged_from_s == warmup.horizon_s
    assert np.array_equal(joined.count[: warmup.horizon_s], warmup.count)
    assert joined.sample is not None and warmup.sample is not None and load.sample is not None
    assert joined.sample.requests == warmup.sample.requests + load.sample.requests
    assert "after a warm-up of 0.1 h" in joined.notes[-1]
    # Its judged part is the load itself, and its warm-up part the warm-up, array for
    # array (the sample's times shifted back, to the float).
    for part, original in ((joined.judged(), load), (joined.warm_up(), warmup)):
        assert part.judged_from_s == 0
        for name in ("count", "prompt_sum", "prompt_sq_sum", "output_sum"):
            assert np.array_equal(getattr(part, name), getattr(original, name))
        assert part.sample is not None and original.sample is not None
        assert np.allclose(part.sample.arrival_s, original.sample.arrival_s)
        assert np.array_equal(part.sample.prompt_tokens, original.sample.prompt_tokens)
        assert np.array_equal(part.sample.output_tokens, original.sample.output_tokens)
    assert load.judged() is load
    with pytest.raises(ValueError, match="no warm-up"):
        load.warm_up()


_SPLIT_LOAD = synthetic_profile("chat", hours=0.05, peak_rps=20, seed=5)


@settings(max_examples=50, deadline=None)
@given(warm_up_s=st.integers(0, _SPLIT_LOAD.horizon_s - 1))
def test_the_warm_up_and_the_judged_part_partition_the_load(warm_up_s: int) -> None:
    """Wherever the judging starts, the warm-up and the judged part are the load's
    seconds before and from it, and its sampled requests split between them."""
    load = _SPLIT_LOAD.judged_after(warm_up_s)
    judged = load.judged()
    parts = (load.warm_up(), judged) if warm_up_s else (judged,)
    for name in ("count", "prompt_sum", "prompt_sq_sum", "output_sum"):
        joined = np.concatenate([getattr(p, name) for p in parts])
        assert np.array_equal(joined, getattr(_SPLIT_LOAD, name))
    assert _SPLIT_LOAD.sample is not None
    assert sum(p.sample.requests for p in parts if p.sample) == _SPLIT_LOAD.sample.requests
    if not warm_up_s:
        with pytest.raises(ValueError, match="no warm-up"):
            load.warm_up()


def test_only_plain_loads_take_a_warm_up() -> None:
    warmup = synthetic_profile("chat", hours=0.1, peak_rps=20, seed=100)
    load = synthetic_profile("chat", hours=0.1, peak_rps=10, seed=1)
    cyclic = synthetic_profile("chat", hours=0.1, peak_rps=10, seed=1, cyclic=True)
    with pytest.raises(ValueError, match="warm-up"):
        cyclic.preceded_by(warmup)
    with pytest.raises(ValueError, match="warm-up"):
        load.preceded_by(warmup).preceded_by(warmup)

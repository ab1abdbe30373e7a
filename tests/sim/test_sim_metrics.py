"""What policies read in the simulator: metrics as Prometheus returns them.

A read at time t comes from the last 15 s scrape at or before t and carries that
scrape's time; rates cover the 60 s before the scrape; latency quantiles are PromQL's
``histogram_quantile`` over vLLM's buckets; gauges are the scraped samples. The exact
mode (``SimConfig(prometheus_like=False)``) reads everything at the moment asked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from reconciler.desired import DesiredState, ServicePolicy
from reconciler.observe.exporter import (
    SGLANG_ITL_BUCKETS_S,
    VLLM_ITL_BUCKETS_S,
    VLLM_TTFT_BUCKETS_S,
)
from reconciler.placement.base import PlacementRequest
from reconciler.placement.greedy import GreedyPlacer
from reconciler.plan import Plan, diff_groups
from reconciler.policy.base import PolicyHistory
from reconciler.policy.coordinated import decide
from reconciler.sim import engine
from reconciler.sim.engine import (
    SimConfig,
    bucket_counts,
    histogram_quantile,
    synthetic_profile,
    weighted_quantile,
)
from reconciler.sim.fleet import SimulatedFleet, SimulatedServiceMetrics
from reconciler.sim.hand_targets import with_hand_targets
from reconciler.sim.plugins import observe
from reconciler.state import METRIC_NAMES, ROLES, ServiceMetrics, Targets

SERVICE = "svc-b"
WINDOW_S = 60


# --------------------------------------------------------------------------- histogram_quantile

# le = 0.1: 10, le = 0.5: 30, le = 1.0: 35, +Inf: 40
BOUNDS = (0.1, 0.5, 1.0)
CUMULATIVE = (10.0, 30.0, 35.0, 40.0)


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.2, 0.08),  # rank 8 in the first bucket, which starts at 0: 0.1 x 8/10
        (0.5, 0.3),  # rank 20: 0.1 + 0.4 x (20 - 10)/20
        (0.75, 0.5),  # rank 30 fills (0.1, 0.5] exactly: its upper bound
        (0.8, 0.7),  # rank 32: 0.5 + 0.5 x (32 - 30)/5
        (0.95, 1.0),  # rank 38 is in +Inf: the highest finite bound
        (1.0, 1.0),
    ],
)
def test_histogram_quantile_interpolates_as_promql(q: float, expected: float) -> None:
    assert histogram_quantile(q, BOUNDS, CUMULATIVE) == pytest.approx(expected)


def test_histogram_quantile_edge_cases_follow_promql() -> None:
    assert math.isnan(histogram_quantile(0.9, BOUNDS, (0.0, 0.0, 0.0, 0.0)))  # no observation
    assert histogram_quantile(1.5, BOUNDS, CUMULATIVE) == math.inf
    assert histogram_quantile(-0.1, BOUNDS, CUMULATIVE) == -math.inf
    # a first bound at or below zero answers with that bound
    assert histogram_quantile(0.2, (0.0, 1.0), (5.0, 10.0, 10.0)) == 0.0
    with pytest.raises(ValueError):
        histogram_quantile(0.5, BOUNDS, CUMULATIVE[:-1])


def test_observations_fill_buckets_by_le() -> None:
    """A value equal to a bound counts in that bucket; beyond the last bound, in +Inf."""
    counts = bucket_counts(np.array([0.1, 0.2, 2.0, 0.05]), np.array([1.0, 2.0, 3.0, 4.0]), BOUNDS)
    assert counts.tolist() == [5.0, 7.0, 7.0, 10.0]


def test_each_simulated_service_reads_through_its_engines_buckets(state: DesiredState) -> None:
    """vLLM's bounds (vllm/v1/metrics/loggers.py) for a vLLM service, SGLang's
    inter-token bounds for an SGLang one: the bounds the test exporter serves and the
    planner compares against (reconciler.latency_buckets)."""
    assert len(VLLM_TTFT_BUCKETS_S) == 22 and len(VLLM_ITL_BUCKETS_S) == 19
    profile = synthetic_profile("b", hours=0.1, peak_rps=1, seed=0, bursts=())
    for name, tbt in (("chat", VLLM_ITL_BUCKETS_S), ("summarize", SGLANG_ITL_BUCKETS_S)):
        policy = state.policies[name]
        sim = engine.ServiceSim(policy, state.clusters[policy.cluster], profile)
        assert (sim.ttft_buckets, sim.tbt_buckets) == (VLLM_TTFT_BUCKETS_S, tbt), name


# --------------------------------------------------------------------------- the fleet's reads


def _fleet(
    state: DesiredState, config: SimConfig | None = None, prefill: int = 6
) -> SimulatedFleet:
    """svc-b at a steady 10 requests/s on 6 prefill and 10 decode instances, scraped
    every 15 s from second 0 (round times in these tests; the default phase is
    checked on its own below)."""
    config = config or SimConfig(scrape_offset_s=0.0)
    profile = synthetic_profile("b", hours=1.0, peak_rps=10, seed=0, trough_ratio=1.0, bursts=())
    policy = state.policies[SERVICE]
    fleet = SimulatedFleet(state.clusters, {SERVICE: policy}, {SERVICE: profile}, config)
    cluster = state.clusters[policy.cluster]
    current = fleet.observe(cluster, [policy]).fleet
    placed = GreedyPlacer().place(
        PlacementRequest(
            cluster=cluster,
            policies={SERVICE: policy},
            current=current,
            targets={SERVICE: Targets(SERVICE, prefill, 10)},
        )
    )
    gpus = {(SERVICE, role): policy.role(role).gpus_per_instance for role in ROLES}
    plan = Plan(cluster.name, {}, placed, diff_groups(current, placed.groups, gpus), current)
    fleet.bootstrap(plan.groups)
    return fleet


def _read(fleet: SimulatedFleet, now_s: float) -> SimulatedServiceMetrics:
    metrics = fleet.fetch([fleet.policies[SERVICE]], now_s)[SERVICE]
    assert isinstance(metrics, SimulatedServiceMetrics)
    return metrics


def _values(metrics: ServiceMetrics) -> dict[str, float | None]:
    return {name: (s.value if (s := metrics.get(name)) else None) for name in METRIC_NAMES}


def _bucket_of(value: float, bounds: tuple[float, ...]) -> int:
    return int(np.searchsorted(bounds, value, side="left"))


def test_between_two_scrapes_the_reading_is_the_earlier_scrape(state: DesiredState) -> None:
    fleet = _fleet(state)
    first = _read(fleet, 242.0)
    assert fleet.now_s == 242.0  # the fleet moves on; only the reading is the scrape's
    for name in METRIC_NAMES:
        sample = first.get(name)
        assert sample is not None and sample.at_s == 240.0, name
    assert first.prompt_tokens is not None and first.prompt_tokens.at_s == 240.0
    assert first.output_tokens is not None and first.output_tokens.at_s == 240.0
    for now_s in (250.0, 254.0):
        later = _read(fleet, now_s)
        assert _values(later) == _values(first)
        assert later.prompt_tokens == first.prompt_tokens
        assert all(s.at_s == 240.0 for n in METRIC_NAMES if (s := later.get(n)) is not None)
    next_scrape = _read(fleet, 255.0)
    assert next_scrape.decode_tps is not None and next_scrape.decode_tps.at_s == 255.0
    assert _values(next_scrape) != _values(first)


def test_scrape_times_are_on_the_callers_clock(state: DesiredState) -> None:
    """With a wall-clock origin the scrape time is shifted like the fleet's own time."""
    profile = synthetic_profile("b", hours=0.5, peak_rps=5, seed=0)
    policy = state.policies[SERVICE]
    fleet = SimulatedFleet(
        state.clusters, {SERVICE: policy}, {SERVICE: profile}, time_origin_s=None
    )
    fleet.fetch([policy], 1_800_000_000.0)  # anchors simulation second 0 here
    metrics = fleet.fetch([policy], 1_800_000_100.5)[SERVICE]
    assert fleet.now_s == 100.0
    # The last scrape: 7 s past a multiple of 15 s of simulation time (97), shifted.
    assert metrics.prefill_tps is not None and metrics.prefill_tps.at_s == 1_800_000_097.0


def test_a_rate_at_the_scrape_covers_exactly_the_minute_before_it(state: DesiredState) -> None:
    fleet = _fleet(state)
    metrics = _read(fleet, 254.0)
    series = fleet.sims[SERVICE].series
    for signal, column in (("prefill_tps", "prefill_tokens"), ("decode_tps", "decode_tokens")):
        sample = metrics.get(signal)  # type: ignore[arg-type]
        assert sample is not None
        assert sample.value == pytest.approx(series.col(column, 180, 240).sum() / WINDOW_S)
        assert sample.value != pytest.approx(series.col(column, 194, 254).sum() / WINDOW_S)


def test_latencies_are_bucket_quantiles_of_the_scraped_window(state: DesiredState) -> None:
    fleet = _fleet(state)
    metrics = _read(fleet, 254.0)
    sim = fleet.sims[SERVICE]
    quantile = fleet.policies[SERVICE].slo.quantile
    # TBT: one inter-token gap per token, each second's step time, over the minute
    # before the scrape, through vLLM's inter-token buckets.
    pools = range(len(sim.decode_pools))
    gaps_s = np.concatenate([sim.series.col(f"d{q}_tau", 180, 240) for q in pools])
    tokens = np.concatenate([sim.series.col(f"d{q}_tokens", 180, 240) for q in pools])
    cumulative = bucket_counts(gaps_s, tokens, VLLM_ITL_BUCKETS_S).tolist()
    assert metrics.tbt is not None
    assert metrics.tbt.value == pytest.approx(
        1000.0 * histogram_quantile(quantile, VLLM_ITL_BUCKETS_S, cumulative)
    )
    # Both lie in the bucket of the exact quantile at the scrape, but only by chance on it.
    exact = _read(_fleet(state, SimConfig(prometheus_like=False)), 240.0)
    assert exact.tbt is not None and exact.ttft is not None and metrics.ttft is not None
    for scraped_ms, exact_ms, bounds in (
        (metrics.tbt.value, exact.tbt.value, VLLM_ITL_BUCKETS_S),
        (metrics.ttft.value, exact.ttft.value, VLLM_TTFT_BUCKETS_S),
    ):
        assert _bucket_of(scraped_ms / 1000, bounds) == _bucket_of(exact_ms / 1000, bounds)
        assert scraped_ms != pytest.approx(exact_ms, rel=1e-6)


def test_the_mean_tbt_is_the_histograms_sum_over_its_count_exact_either_way(
    state: DesiredState,
) -> None:
    """Every token's gap (its second's step time) summed over the tokens: the same
    value whether read at a scrape or exactly, where the p90 is only its bucket's."""
    fleet = _fleet(state)
    metrics = _read(fleet, 254.0)
    sim = fleet.sims[SERVICE]
    pools = range(len(sim.decode_pools))
    gaps_s = np.concatenate([sim.series.col(f"d{q}_tau", 180, 240) for q in pools])
    tokens = np.concatenate([sim.series.col(f"d{q}_tokens", 180, 240) for q in pools])
    assert metrics.tbt_mean is not None and tokens.sum() > 0
    assert metrics.tbt_mean.value == pytest.approx(1000.0 * (gaps_s @ tokens) / tokens.sum())
    exact = _read(_fleet(state, SimConfig(prometheus_like=False)), 240.0)
    assert exact.tbt_mean is not None
    assert metrics.tbt_mean.value == pytest.approx(exact.tbt_mean.value, rel=1e-9)


def test_gauges_are_the_scraped_samples(state: DesiredState) -> None:
    """KV usage: the last sample, a mean over decode instances. GPU utilisation:
    ``avg_over_time`` of the samples scraped at 195, 210, 225 and 240 s."""
    fleet = _fleet(state)
    metrics = _read(fleet, 254.0)
    sim = fleet.sims[SERVICE]
    s = sim.series
    kv_share = instances = 0.0
    for q, pool in enumerate(sim.decode_pools):
        if s.col(f"d{q}_instances")[239] > 0:
            kv_share += s.col(f"d{q}_kv")[239] / pool.perf.kv_capacity_tokens
            instances += s.col(f"d{q}_instances")[239]
    assert metrics.decode_kv_usage is not None
    assert metrics.decode_kv_usage.value == pytest.approx(kv_share / instances)
    rows = [194, 209, 224, 239]
    busy = s.col("prefill_busy")[rows]
    weights = s.col("prefill_instances")[rows]
    expected = float(weights @ sim.prefill_pools[0].perf.prefill_gpu_util(busy) / weights.sum())
    assert metrics.prefill_gpu_util is not None
    assert metrics.prefill_gpu_util.value == pytest.approx(expected)


def test_queues_are_the_last_scraped_sample_and_grow_under_overload(
    state: DesiredState,
) -> None:
    """``sum(vllm:num_requests_waiting)`` per role: the state in the second before the
    scrape. With one prefill instance for a load that needs six, the prefill queue
    grows until clients time out, while the served prompt tokens/s stay flat."""
    fleet = _fleet(state)
    metrics = _read(fleet, 254.0)
    s = fleet.sims[SERVICE].series
    assert metrics.prefill_queue is not None and metrics.decode_queue is not None
    assert metrics.prefill_queue.value == s.col("queue_requests")[239]
    assert metrics.decode_queue.value == s.col("admit_queue")[239]

    starved = _fleet(state, prefill=1)
    queues, served = [], []
    for now_s in (31.0, 61.0, 121.0, 181.0, 241.0):
        reading = _read(starved, now_s)
        assert reading.prefill_queue is not None and reading.prefill_tps is not None
        queues.append(reading.prefill_queue.value)
        served.append(reading.prefill_tps.value)
    assert 0 < queues[0] < queues[1] < queues[2]
    assert min(queues) > 10 * max(1.0, metrics.prefill_queue.value)
    assert max(served[2:]) == pytest.approx(min(served[2:]), rel=0.05)


def test_decode_running_is_the_last_scraped_batch_and_keeps_littles_law(
    state: DesiredState,
) -> None:
    """``sum(vllm:num_requests_running)`` on decode: the sequences alive in every decode
    generation in the second before the scrape. In steady state every one of them
    emits a token a step, so the generated tokens/s are the running requests over the
    mean inter-token gap (Little's law), within the window's noise."""
    fleet = _fleet(state)
    metrics = _read(fleet, 254.0)
    sim = fleet.sims[SERVICE]
    alive = sum(
        float(sim._slot_block("alive", q, np.array([239])).sum())
        for q in range(len(sim.decode_pools))
    )
    assert metrics.decode_running is not None and metrics.decode_running.value == alive > 0
    assert metrics.decode_tps is not None and metrics.tbt_mean is not None
    littles_law = metrics.decode_running.value / (metrics.tbt_mean.value / 1000.0)
    assert littles_law == pytest.approx(metrics.decode_tps.value, rel=0.15)


def _with_max_age(policy: ServicePolicy, max_age_s: float) -> ServicePolicy:
    """``policy`` for the paper policy's ``decide`` (its hand-set targets) with the given
    ``metric_max_age_s``."""
    policy = with_hand_targets(policy)
    scaling = policy.scaling.model_copy(update={"metric_max_age_s": max_age_s})
    return policy.model_copy(update={"scaling": scaling})


def test_a_policy_holds_when_the_scrape_is_older_than_it_accepts(state: DesiredState) -> None:
    fleet = _fleet(state)
    strict = _with_max_age(fleet.policies[SERVICE], 10.0)
    view = fleet.fleet_state(strict.cluster).service_fleet(SERVICE)

    fresh = _read(fleet, 240.0)  # read at the scrape: 0 s old
    acted = decide(strict, view, fresh, PolicyHistory(), 240.0)
    assert acted.reason != "metrics_missing", acted.message

    stale = _read(fleet, 254.0)  # the same scrape, 14 s old
    held = decide(strict, view, stale, PolicyHistory(), 254.0)
    assert held.reason == "metrics_missing"
    assert "stale (sampled 14 s ago > metric_max_age_s 10)" in held.message
    assert (held.prefill, held.decode) == (view.prefill.active, view.decode.active)
    lenient = _with_max_age(fleet.policies[SERVICE], 20.0)
    assert decide(lenient, view, stale, PolicyHistory(), 254.0).reason != "metrics_missing"


def test_a_plugin_observes_the_same_scrape(state: DesiredState) -> None:
    fleet = _fleet(state)
    metrics = _read(fleet, 254.0)
    policy = fleet.policies[SERVICE]
    view = fleet.fleet_state(policy.cluster).service_fleet(SERVICE)
    seen = observe(policy, view, metrics, 254.0)
    assert metrics.decode_tps is not None and seen.output_tokens_per_s == metrics.decode_tps.value
    series = fleet.sims[SERVICE].series
    assert seen.requests_per_s == pytest.approx(series.col("arrived", 180, 240).sum() / WINDOW_S)
    sim = fleet.sims[SERVICE]
    pools = range(len(sim.decode_pools))
    gaps_s = np.concatenate([series.col(f"d{q}_tau", 180, 240) for q in pools])
    tokens = np.concatenate([series.col(f"d{q}_tokens", 180, 240) for q in pools])
    cumulative = bucket_counts(gaps_s, tokens, VLLM_ITL_BUCKETS_S).tolist()
    assert seen.tbt_p50_ms == pytest.approx(
        1000.0 * histogram_quantile(0.5, VLLM_ITL_BUCKETS_S, cumulative)
    )
    if policy.slo.quantile == 0.9:
        assert metrics.ttft is not None and seen.ttft_p90_ms == pytest.approx(metrics.ttft.value)


def test_the_exact_mode_reads_everything_at_the_moment_asked(state: DesiredState) -> None:
    fleet = _fleet(state, SimConfig(prometheus_like=False))
    metrics = _read(fleet, 254.0)
    assert all(s.at_s == 254.0 for n in METRIC_NAMES if (s := metrics.get(n)) is not None)
    sim = fleet.sims[SERVICE]
    series = sim.series
    assert metrics.decode_tps is not None
    assert metrics.decode_tps.value == pytest.approx(
        series.col("decode_tokens", 194, 254).sum() / WINDOW_S
    )
    # TBT: the exact token-weighted quantile of the step times, no buckets.
    pools = range(len(sim.decode_pools))
    gaps_s = np.concatenate([series.col(f"d{q}_tau", 194, 254) for q in pools])
    tokens = np.concatenate([series.col(f"d{q}_tokens", 194, 254) for q in pools])
    exact_s = weighted_quantile(gaps_s, tokens, fleet.policies[SERVICE].slo.quantile)
    assert exact_s is not None and metrics.tbt is not None
    assert metrics.tbt.value == pytest.approx(1000.0 * exact_s)
    # KV usage: cached tokens over capacity across the whole window.
    kv = sum(series.col(f"d{q}_kv", 194, 254).sum() for q in pools)
    capacity = sum(
        (series.col(f"d{q}_instances", 194, 254) * pool.perf.kv_capacity_tokens).sum()
        for q, pool in enumerate(sim.decode_pools)
    )
    assert metrics.decode_kv_usage is not None
    assert metrics.decode_kv_usage.value == pytest.approx(kv / capacity)


def test_by_default_a_decision_reads_a_scrape_about_half_an_interval_old(
    state: DesiredState,
) -> None:
    """The reconcile loop is not in phase with Prometheus: scrapes fall 7 s past each
    multiple of 15 s, so a decision at 240 s reads the scrape of 232 s."""
    fleet = _fleet(state, SimConfig())
    metrics = fleet.fetch([state.policies[SERVICE]], 240.0)[SERVICE]
    assert metrics.decode_tps is not None and metrics.decode_tps.at_s == 232.0
    later = fleet.fetch([state.policies[SERVICE]], 246.0)[SERVICE]
    assert later.decode_tps == metrics.decode_tps  # no scrape in between
    assert fleet.fetch([state.policies[SERVICE]], 247.0)[SERVICE].decode_tps.at_s == 247.0  # type: ignore[union-attr]

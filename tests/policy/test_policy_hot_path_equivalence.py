"""The planner's hot path computes some figures in plain Python floats where it once
used numpy (a decision reads a couple of dozen buckets, where numpy's per-call cost
outweighs its speed): these tests pin that the floats are the same, bit for bit, or
to the last bits where only the order of additions differs."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_testkit import REPO_ROOT

from reconciler.desired.loader import load_desired_state
from reconciler.perfmodel.calibrate import (
    decode_step_float_s,
    prefill_latency_float_s,
    prefill_terms,
)
from reconciler.perfmodel.instance import InstancePerf, instance_perf
from reconciler.policy.capacity import (
    _BISECTION_STEPS,
    _TTFT_TOLERANCE_S,
    LengthHistogram,
    RequestMix,
    _per_point,
    _PrefillQueue,
)
from reconciler.policy.forecast import ForecastConfig, ForecastState, update


def numpy_repair(cumulative: list[float]) -> tuple[float, ...]:
    """``histogram_quantile``'s repair as numpy does it: counts floored at 0, raised to
    the running maximum, then per-bucket differences."""
    running = np.maximum.accumulate(np.maximum(cumulative, 0.0)).tolist()
    return tuple(np.diff([0.0, *running]).tolist())


counts = st.floats(min_value=-5.0, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(counts, min_size=1, max_size=25), st.randoms(use_true_random=False))
def test_cumulative_buckets_repair_like_numpy(cumulative: list[float], rng) -> None:
    bounds = [float(2**i) for i in range(len(cumulative) - 1)] + [math.inf]
    pairs = list(zip(bounds, cumulative, strict=True))
    rng.shuffle(pairs)  # the pairs may come in any order
    mix = RequestMix.from_cumulative(pairs, [(math.inf, 1.0)])
    repaired = numpy_repair(cumulative)
    if max(cumulative) <= 0:
        assert mix is None
        return
    assert mix is not None
    assert mix.prompt.bounds == tuple(bounds)
    assert mix.prompt.counts == repaired
    assert [math.copysign(1.0, c) for c in mix.prompt.counts] == [
        math.copysign(1.0, c) for c in repaired
    ]
    columns = RequestMix.from_cumulative_columns(bounds, cumulative, [math.inf], [1.0])
    assert columns == mix


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e5), min_size=20, max_size=20))
def test_the_whole_mass_weighs_each_point_like_the_spread(raw: list[float]) -> None:
    """``points()`` (the shared layout, weights in floats) against ``_spread`` (numpy),
    bit for bit; and the moments, which the layout's per-bucket means give in a dozen
    products, equal the pass over every point but for the order of the additions."""
    bounds = (*(float(10 * 2**i) for i in range(19)), math.inf)
    histogram = LengthHistogram(bounds, tuple(raw))
    lengths, weights = histogram.points()
    spread_lengths, spread_weights = histogram.points(math.inf)
    assert lengths.tolist() == spread_lengths.tolist()
    assert weights.tolist() == spread_weights.tolist()
    # (Counts of a few subnormals spread to weights that sum to 0: _moment's 0 case.)
    if spread_weights.sum() > 0:
        expected = float(spread_weights @ spread_lengths**2 / spread_weights.sum())
        assert math.isclose(histogram.moment(2), expected, rel_tol=1e-12)
        first = float(spread_weights @ spread_lengths / spread_weights.sum())
        assert math.isclose(histogram.moment(1), first, rel_tol=1e-12)


def test_forecast_files_what_the_new_state_forecasts() -> None:
    """``update`` files its forecasts before the new state exists: they are the new
    state's own sizing forecasts, as ``forecast`` reads them."""
    from reconciler.policy.forecast import _sizing_forecast

    config = ForecastConfig(horizons_s=(150.0, 270.0), error_window_s=300.0)
    state = ForecastState()
    for k in range(40):
        at_s = 30.0 * k
        before = state.pending
        state = update(state, at_s, 1000.0 + 50.0 * math.sin(k / 4.0) + 3.0 * k, config)
        filed = [p for p in state.pending if p not in before]
        if state.samples > 1 and state.last_at_s - state.first_at_s >= config.window_s:
            assert filed == [
                (at_s + h, float(i), _sizing_forecast(state, config, h)[0])
                for i, h in enumerate(config.horizons_s)
            ]
        else:
            assert filed == []
        assert all(len(e) <= config.errors_kept for e in state.errors)
        assert all(isinstance(e, tuple) for e in state.errors)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e5), min_size=20, max_size=20))
def test_work_per_token_from_bucket_means_equals_the_pass_over_points(raw: list[float]) -> None:
    """Prefill's work per prompt token of the whole mass (``demand_tps``), from the
    layout's per-bucket means of the work, against the weighted pass over every point."""
    from reconciler.desired import load_desired_state
    from reconciler.perfmodel.instance import instance_perf
    from reconciler.policy.capacity import _work_per_token

    state = load_desired_state(REPO_ROOT)
    policy = state.policies["chat"]
    cluster = state.clusters[policy.cluster]
    perf = instance_perf(policy.model, "h800", cluster.gpu_types["h800"], 4)
    bounds = (*(float(10 * 2**i) for i in range(19)), math.inf)
    histogram = LengthHistogram(bounds, tuple(raw))
    lengths, weights = histogram.points()
    tokens, per_token = _work_per_token(perf, histogram)[1]
    expected_tokens = float(weights @ lengths)
    if weights.sum() > 0:
        mean = expected_tokens / float(weights.sum())
        assert math.isclose(tokens, mean, rel_tol=1e-12, abs_tol=1e-300)
    if expected_tokens > 0 and tokens > 0:
        expected = float(weights @ perf.prefill_work(lengths)) / expected_tokens
        assert math.isclose(per_token, expected, rel_tol=1e-12)


# ------------------------------------------------- the planner's faster exact forms


@cache
def _instances() -> tuple[InstancePerf, ...]:
    """Every example service's prefill and decode instance models, on each type its
    roles may run on."""
    state = load_desired_state(REPO_ROOT)
    perfs = []
    for policy in state.policies.values():
        cluster = state.clusters[policy.cluster]
        for role in ("prefill", "decode"):
            role_policy = policy.role(role)  # type: ignore[arg-type]
            for gpu_type in role_policy.gpu_types:
                perfs.append(
                    instance_perf(
                        policy.model,
                        gpu_type,
                        cluster.gpu_types[gpu_type],
                        role_policy.gpus_per_instance,
                    )
                )
    return tuple(perf for perf in perfs if perf.fits)


instance_index = st.integers(min_value=0, max_value=1_000)


@settings(max_examples=300, deadline=None)
@given(
    instance_index,
    st.floats(min_value=0.0, max_value=512.0),
    st.floats(min_value=0.0, max_value=2e6),
    st.floats(min_value=0.0, max_value=2e5),
    st.floats(min_value=0.0, max_value=2e5),
)
def test_the_one_point_forms_equal_calibrates_chain_bit_for_bit(
    index: int, batch: float, kv_tokens: float, context: float, prompt: float
) -> None:
    perf = _instances()[index % len(_instances())]
    assert perf.decode_step_float_s(batch, kv_tokens, context) == decode_step_float_s(
        perf.decode_params, perf._decode_terms_at(max(batch, 1e-9), kv_tokens, context)
    )
    terms = prefill_terms(perf.prefill_params, batch=1.0, prompt=prompt, model=perf._model_on_card)
    assert perf.prefill_latency_one_s(prompt) == prefill_latency_float_s(perf.prefill_params, terms)


def _histogram(raw: list[float]) -> LengthHistogram:
    """Counts in vLLM's 1-2-5 buckets up to 100k tokens, then +Inf."""
    bounds = (*(float(m * 10**e) for e in range(5) for m in (1, 2, 5)), 100_000.0, math.inf)
    return LengthHistogram(bounds, tuple(raw[: len(bounds)]))


histogram_counts = st.lists(st.floats(min_value=0.0, max_value=1e5), min_size=17, max_size=17)


@settings(max_examples=200, deadline=None)
@given(histogram_counts, st.floats(min_value=0.5, max_value=2e5), instance_index)
def test_a_cut_mass_takes_the_whole_mass_points_below_the_cut(
    raw: list[float], upper: float, index: int
) -> None:
    """``cut_points`` and the per-point figures built on the whole mass's below the cut
    are ``points(upper)`` and the figures computed afresh, bit for bit."""
    histogram = _histogram(raw)
    lengths, weights, prefix = histogram.cut_points(upper)
    spread_lengths, spread_weights = histogram.points(upper)
    assert lengths.tolist() == spread_lengths.tolist()
    assert weights.tolist() == spread_weights.tolist()
    assert lengths[:prefix].tolist() == histogram.points()[0][:prefix].tolist()
    perf = _instances()[index % len(_instances())]
    own, work = _per_point(perf, histogram, upper, lengths, prefix)
    assert own.tolist() == perf.prefill_latency_s(lengths).tolist()
    assert work.tolist() == perf.prefill_work(lengths).tolist()


def _plain_ttft_bisection(queue: _PrefillQueue, rho: float, quantile: float) -> float:
    """The TTFT quantile's bisection as it was written before it skipped midpoints."""
    ready = queue._ready_s(rho)
    mean, p_wait = queue.wait(rho)
    lo, hi = queue._ttft_bracket(ready, mean, p_wait, quantile)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if queue._attainment(ready, mean, p_wait, mid) < quantile else (lo, mid)
        if hi - lo < _TTFT_TOLERANCE_S:
            break
    return hi


@settings(max_examples=300, deadline=None)
@given(
    histogram_counts,
    histogram_counts,
    instance_index,
    st.floats(min_value=0.0, max_value=0.97),
    st.floats(min_value=0.05, max_value=0.9999),
    st.integers(min_value=1, max_value=64),
    st.floats(min_value=0.5, max_value=2.0),
    st.sampled_from([0.0, 1e-7, 1e-6]),
)
def test_the_ttft_bisection_takes_the_plain_bisections_answer(
    prompts: list[float],
    outputs: list[float],
    index: int,
    rho: float,
    quantile: float,
    instances: int,
    factor: float,
    transfer_s_per_token: float,
) -> None:
    """The bisection computes only the midpoints between the nearest known short and
    attaining bounds, seeded by a closed-form guess: the same answer bit for bit."""
    if sum(prompts) <= 0 or sum(outputs) <= 0:
        return
    mix = RequestMix(_histogram(prompts), _histogram(outputs))
    perf = _instances()[index % len(_instances())]
    queue = _PrefillQueue(perf, mix, transfer_s_per_token, 0.03, factor, instances, None)
    if queue.empty:
        return
    assert queue.ttft_quantile_s(rho, quantile) == _plain_ttft_bisection(queue, rho, quantile)

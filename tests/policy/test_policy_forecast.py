"""The short-horizon demand forecaster: Holt's level and trend, the daily curve, the
headroom from its own errors, and the scale-in guard."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.policy.forecast import (
    ForecastConfig,
    ForecastState,
    forecast,
    headroom,
    prediction_bound,
    readable,
    rescaled,
    sizing_demand,
    stays_below,
    trend_forecast,
    update,
    values_for_bound,
)

CYCLE_S = 30.0


def feed(
    series: Callable[[float], float],
    cycles: int,
    config: ForecastConfig | None = None,
    state: ForecastState | None = None,
    start_s: float = 0.0,
) -> ForecastState:
    state = state or ForecastState()
    for k in range(cycles):
        t = start_s + k * CYCLE_S
        state = update(state, t, series(t), config)
    return state


def noisy(mean: float, relative_sd: float, seed: int) -> Callable[[float], float]:
    rng = np.random.default_rng(seed)
    return lambda _t: max(0.0, mean * (1.0 + relative_sd * float(rng.standard_normal())))


# --------------------------------------------------------------------------- history


def test_no_forecast_before_a_window_of_history() -> None:
    """Ten cycles span 270 s, less than the 300 s window: no forecast, and the scale-in
    guard says no; the eleventh (300 s) brings the first forecast."""
    state = feed(lambda _t: 1000.0, 10)
    assert forecast(state, 150.0) is None
    assert not stays_below(state, 10_000.0, 600.0)
    state = update(state, 10 * CYCLE_S, 1000.0)
    first = forecast(state, 150.0)
    assert first is not None
    assert first.demand == pytest.approx(1000.0)
    # No error has come due yet: the configured minimum headroom alone.
    assert first.errors_used == 0 and first.headroom == ForecastConfig().min_headroom


def test_bad_samples_leave_the_state_unchanged() -> None:
    state = feed(lambda _t: 1000.0, 12)
    for at_s, value in ((400.0, math.nan), (400.0, -5.0), (400.0, math.inf), (100.0, 1.0)):
        assert update(state, at_s, value) == state


# --------------------------------------------------------------------------- Holt


def test_holt_follows_a_linear_ramp() -> None:
    """Demand growing 2 tokens/s every second: after 20 minutes the forecast 150 s ahead
    is the ramp's value then, not today's."""
    state = feed(lambda t: 1000.0 + 2.0 * t, 41)
    now_s = 40 * CYCLE_S
    predicted = forecast(state, 150.0)
    assert predicted is not None
    assert predicted.demand == pytest.approx(1000.0 + 2.0 * (now_s + 150.0), rel=0.01)
    assert predicted.demand > 1000.0 + 2.0 * now_s


def test_holt_handles_irregular_cycles() -> None:
    """A late cycle (90 s gap) is one sample: the spans are in seconds, not samples."""
    times = [k * CYCLE_S for k in range(30)] + [
        29 * CYCLE_S + 90.0 + k * CYCLE_S for k in range(12)
    ]
    state = ForecastState()
    for t in times:
        state = update(state, t, 1000.0 + 2.0 * t)
    predicted = forecast(state, 150.0)
    assert predicted is not None
    assert predicted.demand == pytest.approx(1000.0 + 2.0 * (times[-1] + 150.0), rel=0.01)


@pytest.mark.parametrize("gap_s", [120.0, 300.0, 600.0, 3600.0])
def test_samples_further_apart_than_the_spans_keep_the_forecast_within_the_demand(
    gap_s: float,
) -> None:
    """At a cadence as long as a span or longer, each sample is the memory's whole (its
    weight 1, never more): a steady demand sampled every 300 s was forecast 4x within
    hours as Holt weighed the past negatively and over-corrected with a growing swing.
    Now the swing does not grow: the trend read from a few noisy samples still moves
    the forecast (the planner spans it over ten of its cycles), never to twice the
    demand."""
    series = noisy(1000.0, 0.05, seed=3)
    state = ForecastState()
    for k in range(120):
        state = update(state, k * gap_s, series(k * gap_s))
        predicted = sizing_demand(state, 480.0)
        assert predicted is None or predicted < 2000.0


@settings(max_examples=50, deadline=None)
@given(gap_s=st.floats(1.0, 86_400.0), level=st.floats(1.0, 1e6), seed=st.integers(0, 1000))
def test_holt_never_leaves_the_range_a_flat_noisy_demand_spans_by_more_than_its_trend(
    gap_s: float, level: float, seed: int
) -> None:
    """Whatever the cadence, Holt's level after a flat demand lies within the samples'
    range (each update weighs the new sample between 0 and 1)."""
    series = noisy(level, 0.1, seed)
    values = [series(0.0) for _ in range(40)]
    state = ForecastState()
    for k, value in enumerate(values):
        state = update(state, k * gap_s, value)
    low, high = min(values), max(values)
    spread = high - low
    assert low - 2 * spread <= state.level <= high + 2 * spread


# --------------------------------------------------------------------------- unit


@settings(max_examples=30, deadline=None)
@given(
    factor=st.floats(0.05, 20.0),
    slope=st.floats(-1.0, 3.0),
    seed=st.integers(0, 10_000),
    horizon_s=st.sampled_from([30.0, 150.0, 210.0, 600.0]),
)
def test_a_rescaled_history_forecasts_the_same_demand_in_the_new_unit(
    factor: float, slope: float, seed: int, horizon_s: float
) -> None:
    """Rescaling is a change of unit: every forecast of the rescaled state is the
    factor times the old state's, the trend's extrapolation included."""
    base = noisy(1000.0, 0.1, seed)
    state = feed(lambda t: base(t) + slope * t, 30)
    before, after = forecast(state, horizon_s), forecast(rescaled(state, factor), horizon_s)
    assert before is not None and after is not None
    assert after.demand == pytest.approx(factor * before.demand, rel=1e-9)
    assert sizing_demand(rescaled(state, factor), horizon_s) == pytest.approx(
        factor * sizing_demand(state, horizon_s), rel=1e-9
    )


def test_a_rescaled_history_scores_no_error_for_the_change_of_unit() -> None:
    """A steady series, rescaled 3.5x, then fed the same demand in the new unit: the
    forecasts filed before the rescale are scored against it without error, and no
    trend is read into the history (fed unrescaled, the step forecasts past itself)."""
    config = ForecastConfig()
    steady = feed(lambda _t: 1000.0, 20, config)
    start_s = 20 * CYCLE_S

    def then(state: ForecastState) -> ForecastState:
        return feed(lambda _t: 3500.0, 6, config, state, start_s)

    rescaled_after = then(rescaled(steady, 3.5))
    assert all(abs(e) < 1e-9 for errors in rescaled_after.errors for e in errors)
    assert sizing_demand(rescaled_after, 150.0, config) == pytest.approx(3500.0, rel=1e-6)
    stepped = then(steady)
    assert sizing_demand(stepped, 150.0, config) > 1.3 * 3500.0


def test_rescaling_by_one_or_by_no_number_keeps_the_state() -> None:
    state = feed(lambda t: 1000.0 + t, 12)
    for factor in (1.0, 0.0, -2.0, math.nan, math.inf):
        assert rescaled(state, factor) is state
    assert rescaled(ForecastState(), 3.0) == ForecastState()


# --------------------------------------------------------------------------- headroom


@settings(max_examples=10, deadline=None)
@given(
    calm_sd=st.floats(0.0, 0.05),
    bursty_sd=st.floats(0.2, 0.4),
    seed=st.integers(0, 10_000),
)
def test_headroom_grows_with_the_variance_of_the_demand(
    calm_sd: float, bursty_sd: float, seed: int
) -> None:
    """Same mean, different noise, two hours of cycles: the bursty series under-forecasts
    by more, so its 95th-percentile error -- its headroom -- is larger."""
    calm = feed(noisy(1000.0, calm_sd, seed), 240)
    bursty = feed(noisy(1000.0, bursty_sd, seed + 1), 240)
    calm_room, calm_used = headroom(calm, 150.0)
    bursty_room, bursty_used = headroom(bursty, 150.0)
    assert calm_used == bursty_used == ForecastConfig().errors_kept  # the last hour
    assert bursty_room > calm_room >= ForecastConfig().min_headroom
    # The noise's own 95th percentile (1.645 sd) plus the forecaster's error: a median
    # of 2.8 sd over 600 random draws. It is a sample quantile of the last hour's 120
    # errors, though, whose spread is a fifth of an sd and more (sqrt(0.05 x 0.95 / 120)
    # over the normal density at 1.645): hypothesis found 1.49 sd (seed 132, sd 0.25),
    # below the 1.645 this checked before. Above 1.2 sd it still says the headroom
    # follows the noise (the calm series' stays at the floor).
    assert bursty_room > 1.2 * bursty_sd


def test_headroom_is_measured_at_its_horizon() -> None:
    """On a steady ramp Holt's forecast at 150 s is nearly right (a few per cent while
    the trend is still being learnt), so the recorded errors are small; a step of
    +1000 the forecaster could not foresee shows up, when the forecast made 150 s
    before it comes due, as 1000 / (the ramp's 2200) = 45 %."""
    config = ForecastConfig(min_headroom=0.0)
    state = feed(lambda t: 1000.0 + t, 40, config)
    room, used = headroom(state, 150.0, config)
    assert used > 0 and room < 0.05
    now_s = 40 * CYCLE_S
    state = feed(lambda t: 1000.0 + t + 1000.0, 1, config, state, now_s)
    assert state.errors[0][-1] == pytest.approx(1000.0 / (1000.0 + now_s), rel=0.02)


# --------------------------------------------------------------------------- daily curve


def diurnal(t: float) -> float:
    return 1000.0 * (1.0 + 0.6 * math.sin(2.0 * math.pi * t / 86_400.0))


def test_the_daily_curve_is_used_once_a_day_of_history_exists() -> None:
    """Two days of a diurnal series with 5 % noise. Before a full day the forecast is
    Holt alone; after it the daily curve shapes it, and 15 minutes ahead it is much
    closer to the truth than Holt's extrapolated slope (the same forecaster with a
    10-day 'day' never gets a curve)."""
    horizon_s = 900.0
    results = {}
    for label, config in (
        ("curve", ForecastConfig(horizons_s=(horizon_s,))),
        ("holt", ForecastConfig(horizons_s=(horizon_s,), day_s=10 * 86_400.0)),
    ):
        rng = np.random.default_rng(7)
        state = ForecastState()
        errors = []
        seasonal_flags = []
        for k in range(2 * 2880):
            t = k * CYCLE_S
            state = update(state, t, diurnal(t) * (1.0 + 0.05 * rng.standard_normal()), config)
            predicted = forecast(state, horizon_s, config)
            if predicted is None:
                continue
            seasonal_flags.append((t, predicted.seasonal))
            if t >= 86_400.0 + 3600.0:
                model = trend_forecast(state, horizon_s, config)
                assert model is not None and predicted.demand >= model
                errors.append(abs(model / diurnal(t + horizon_s) - 1.0))
        results[label] = (float(np.mean(errors)), seasonal_flags)
    curve_error, flags = results["curve"]
    holt_error, holt_flags = results["holt"]
    assert all(not seasonal for t, seasonal in flags if t < 86_400.0)
    assert all(seasonal for t, seasonal in flags if t >= 86_400.0 + 15 * 60)
    assert not any(seasonal for _, seasonal in holt_flags)
    assert curve_error < 0.5 * holt_error


# --------------------------------------------------------------------------- scale-in


def test_scale_in_guard_checks_the_forecast_over_the_window() -> None:
    steady = feed(noisy(1000.0, 0.01, 3), 60)
    # min headroom 10 %: 1000 x 1.1 fits under 1300, not under 1050
    assert stays_below(steady, 1300.0, 600.0)
    assert not stays_below(steady, 1050.0, 600.0)
    # A ramp that is below the threshold now but crosses it within the window.
    ramp = feed(lambda t: 500.0 + 0.5 * t, 60)  # 1385 now, +300 over 600 s
    now = 500.0 + 0.5 * 59 * CYCLE_S
    assert stays_below(ramp, 2000.0, 600.0)
    assert not stays_below(ramp, now * 1.2, 600.0)


# --------------------------------------------------------------------------- storage


def test_the_state_round_trips_through_policy_history_extra() -> None:
    state = feed(noisy(1000.0, 0.1, 5), 50)
    extra = state.to_extra()
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in extra)
    assert ForecastState.from_extra(extra) == state
    assert ForecastState.from_extra(()) == ForecastState()
    # other keys in the same storage are ignored
    assert ForecastState.from_extra((*extra, ("pd_mix_ewma", 0.5))) == state


def test_what_is_sized_for_never_falls_below_the_latest_sample() -> None:
    """A falling trend may forecast less, but capacity added now also serves the demand
    of now: the sizing forecast is floored at the latest sample, and its errors (the
    headroom) are scored on that floored value."""
    config = ForecastConfig()
    state = ForecastState()
    for k in range(40):
        state = update(state, k * CYCLE_S, 10_000.0 - 200.0 * k, config)
    model = trend_forecast(state, 150.0, config)
    predicted = forecast(state, 150.0, config)
    assert model is not None and predicted is not None
    assert model < state.last_value
    assert predicted.demand == state.last_value


# --------------------------------------------------------------------------- exactness


# --------------------------------------------------------------------------- bounds


def _coverage(bound: Callable[[np.ndarray], float], n: int, trials: int = 20_000) -> float:
    """The share of ``trials`` in which a next draw lies at or below ``bound`` of ``n``
    earlier ones, all from one heavy-tailed distribution (log-normal, sigma 1)."""
    rng = np.random.default_rng(17)
    draws = rng.lognormal(0.0, 1.0, size=(trials, n + 1))
    bounds = np.array([bound(row[:n]) for row in draws])
    return float(np.mean(draws[:, n] <= bounds))


def test_the_prediction_bound_covers_the_next_value_at_the_goal_where_a_quantile_does_not() -> None:
    """With as many values as ``values_for_bound`` asks, the bound covers the next one
    at the goal (99.5 %); the interpolated 99.5 % quantile of an hour's 120 errors, what
    the headroom read before, covers it about (1 + 119 x 0.995) / 121 = 98.7 % of the
    time: the headroom was short one cycle in 77 rather than one in 200."""
    q = 0.995
    n = values_for_bound(q, 10_000)
    assert n == 199
    assert _coverage(lambda v: prediction_bound(tuple(v), q), n) >= q - 0.001
    assert _coverage(lambda v: float(np.quantile(v, q)), 120) == pytest.approx(
        (1 + 119 * q) / 121, abs=0.002
    )


@pytest.mark.parametrize(
    ("q", "most", "values"),
    [(0.995, 1000, 199), (0.99, 1000, 99), (0.5, 1000, 1), (0.999, 500, 500), (1.0, 700, 700)],
)
def test_the_values_a_bound_needs_follow_the_goal_up_to_a_cap(
    q: float, most: int, values: int
) -> None:
    assert values_for_bound(q, most) == values


@given(
    values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=250),
    q=st.floats(0.5, 1),
)
def test_the_prediction_bound_is_one_of_the_values_at_least_their_quantile(
    values: list[float], q: float
) -> None:
    """Above one half (the goals it serves), never below the interpolated quantile,
    which covers less."""
    bound = prediction_bound(tuple(values), q)
    rank = min(len(values), math.ceil((len(values) + 1) * q - 1e-9))
    assert bound == sorted(values)[rank - 1]
    assert bound >= float(np.quantile(np.asarray(values), q)) - 1e-12
    assert math.isnan(prediction_bound((*values, math.nan), q))


def test_the_sizing_demand_is_the_forecasts() -> None:
    state = ForecastState()
    for k in range(60):
        demand = 100.0 + 40.0 * math.sin(k / 7.0) + 3.0 * (k % 5)
        state = update(state, k * CYCLE_S, demand)
        predicted = forecast(state, 150.0)
        alone = sizing_demand(state, 150.0)
        assert (alone is None) == (predicted is None)
        assert predicted is None or alone == predicted.demand
    assert sizing_demand(state, 150.0) is not None


def test_a_state_update_left_is_readable_and_a_damaged_one_starts_afresh() -> None:
    """A memory read back damaged may hold any float: one NaN level would make every
    later forecast NaN, a time ahead of now would freeze the forecaster."""
    config = ForecastConfig()
    state = ForecastState()
    for k in range(20):
        state = update(state, 30.0 * k, 1000.0 + 10.0 * k, config)
    now = 30.0 * 20
    assert readable(state, now, config) is state
    for damage in (
        {"level": math.nan},
        {"trend": math.inf},
        {"last_at_s": now + 1e12},
        {"day_mean": (math.nan,) * config.day_bins},
        {"errors": ((math.nan,),)},
        {"pending": ((now, 7.0, 1.0),)},
        # Finite but beyond any number a forecaster files: the forecast overflowed to
        # inf (or inf - inf, NaN) and the planner's decision raised.
        {"trend": 1e300},
        {"level": 1e308},
        {"first_at_s": -1e308},
        {"errors": ((1e308,),)},
    ):
        assert readable(dataclasses.replace(state, **damage), now, config) == ForecastState()
    fresh = readable(ForecastState(samples=0, level=math.nan), now, config)
    assert fresh.samples == 0 and fresh.level == 0.0
    # A fresh state is kept as the very object: the planner tells damage by identity.
    unused = ForecastState()
    assert readable(unused, now, config) is unused

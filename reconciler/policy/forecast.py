"""A short-horizon demand forecaster for sizing at the time a new instance would serve
(DESIGN.md, "Capacity from the model": start-up lag is covered by the forecast plus
headroom from the forecaster's own recent errors).

Pure and immutable: :func:`update` takes a :class:`ForecastState` and one demand
sample and returns a new state; :func:`forecast` reads one. The state is plain floats
and tuples (``to_extra`` / ``from_extra`` flatten it into ``PolicyHistory.extra``-style
``(key, float)`` pairs), so it survives a restart like the other policy memory.

The method, and where its numbers come from:

- **Holt's linear method** (level + trend) on the demand sampled each cycle; what
  :func:`forecast` returns (and what its errors are scored on) is that forecast but
  never below the latest sample (:func:`_sizing_forecast`). Sampling
  may be irregular (a cycle runs late, a sample is missing), so the smoothing
  constants come from *spans* in seconds, per sample ``alpha = 2 / (span / dt + 1)``
  (the usual EWMA span convention, whose mean age equals that of a ``span``-long
  moving average). The level's span is one start-up (120 s: the demand a new
  instance must meet is the one about a start-up from now, so the level should not
  remember much older load); the trend's span is the minimum window (300 s: a slope
  read from fewer than ~10 cycles of a noisy 60 s rate is mostly noise).
- **A daily curve**: per time-of-day bin (96 of 15 minutes), the mean demand seen in
  that bin, with a memory of about one day (a running mean over the first visit,
  then an EWMA with weight ``dt / bin_s`` per sample, i.e. about one visit). Once a
  full day of history exists the curve's factors (bin mean / mean of the bins,
  linear between bin centres) deseasonalise the samples Holt sees and reseasonalise
  the forecast, so the forecast turns at a daily peak instead of extrapolating the
  morning ramp.
- **Headroom**: every update files the forecast for each tracked horizon; when a
  later sample arrives at its due time the relative error ``(actual - forecast) /
  forecast`` is kept (the last ``error_window_s`` worth). The headroom at a horizon is
  the bound those errors give the next one at ``error_quantile`` (``prediction_bound``;
  the planner sets the attainment goal), at least ``min_headroom``: a bursty series
  under-forecasts more often and by more, and carries more headroom.
- **A change of unit** (:func:`rescaled`): a caller whose demand is tokens per second
  sees the work per request change with the request mix; the part of a change it
  knows to be that (the planner's ``mix_explained_factor``) rescales the history
  instead of entering it as a step, so the trend extrapolates only a change in the
  requests. A switch to 3.5x longer prompts at one request rate read as a steep ramp
  and forecast 1.6x the new level for three cycles.
- **Too little history**: with samples spanning less than ``window_s`` (5 minutes)
  :func:`forecast` returns ``None``; the caller sizes for the current demand plus
  ``min_headroom``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

import numpy as np


@dataclass(frozen=True)
class ForecastConfig:
    """The forecaster's spans and windows (module docstring for each choice)."""

    interval_s: float = 30.0  # the reconcile cycle: one sample each
    level_span_s: float = 120.0  # one start-up
    trend_span_s: float = 300.0  # the minimum window
    window_s: float = 300.0  # history needed before any forecast
    horizons_s: tuple[float, ...] = (150.0,)  # tracked for errors: start-up + one cycle
    error_window_s: float = 3600.0  # errors kept (the last hour)
    error_quantile: float = 0.95
    min_headroom: float = 0.1  # the caller's configured floor
    day_s: float = 86_400.0
    day_bins: int = 96  # 15-minute bins
    # Deseasonalising divides by the factor; a near-empty bin would turn noise into a
    # huge level. Bins below this share of the day's mean count as this share.
    min_daily_factor: float = 0.1

    @property
    def bin_s(self) -> float:
        return self.day_s / self.day_bins

    @property
    def errors_kept(self) -> int:
        return max(1, round(self.error_window_s / self.interval_s))


@dataclass(frozen=True)
class ForecastState:
    """Everything the forecaster remembers (plain floats and tuples)."""

    samples: int = 0
    first_at_s: float = math.nan
    last_at_s: float = math.nan
    last_value: float = math.nan
    level: float = 0.0  # deseasonalised once ``seasonal`` is set
    trend: float = 0.0  # per second, same scale as ``level``
    seasonal: float = 0.0  # 1.0 once the daily curve is in use
    day_mean: tuple[float, ...] = ()  # mean demand per time-of-day bin
    day_count: tuple[float, ...] = ()  # samples seen per bin (capped)
    # Forecasts awaiting their actual value: (due_s, horizon index, forecast).
    pending: tuple[tuple[float, float, float], ...] = ()
    # Relative errors per tracked horizon, oldest first.
    errors: tuple[tuple[float, ...], ...] = ()

    def to_extra(self, prefix: str = "forecast") -> tuple[tuple[str, float], ...]:
        """Flattened into ``(key, float)`` pairs (``PolicyHistory.extra``)."""
        out: list[tuple[str, float]] = []
        for f in fields(self):
            value = getattr(self, f.name)
            key = f"{prefix}.{f.name}"
            if isinstance(value, tuple):
                out.append((f"{key}.n", float(len(value))))
                for i, item in enumerate(value):
                    if isinstance(item, tuple):
                        out.append((f"{key}.{i}.n", float(len(item))))
                        out += [(f"{key}.{i}.{j}", float(x)) for j, x in enumerate(item)]
                    else:
                        out.append((f"{key}.{i}", float(item)))
            else:
                out.append((key, float(value)))
        return tuple(out)

    @classmethod
    def from_extra(
        cls, extra: Iterable[tuple[str, float]], prefix: str = "forecast"
    ) -> ForecastState:
        """The inverse of :meth:`to_extra`; missing keys give a fresh state."""
        values = {k: v for k, v in extra if k.startswith(prefix + ".")}
        if not values:
            return cls()
        kwargs: dict[str, object] = {}
        defaults = cls()
        for f in fields(cls):
            key = f"{prefix}.{f.name}"
            default = getattr(defaults, f.name)
            if isinstance(default, tuple):
                count = int(values.get(f"{key}.n", 0))
                items: list[object] = []
                for i in range(count):
                    inner = values.get(f"{key}.{i}.n")
                    if inner is None:
                        items.append(values[f"{key}.{i}"])
                    else:
                        items.append(tuple(values[f"{key}.{i}.{j}"] for j in range(int(inner))))
                kwargs[f.name] = tuple(items)
            elif f.name == "samples":
                kwargs[f.name] = int(values.get(key, 0))
            else:
                kwargs[f.name] = float(values.get(key, default))
        return cls(**kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Forecast:
    """Demand expected ``horizon_s`` from now, and the headroom to size with."""

    demand: float
    headroom: float  # fraction: size for demand x (1 + headroom)
    horizon_s: float
    errors_used: int  # errors behind the headroom (0: min_headroom alone)
    seasonal: bool  # the daily curve shaped this forecast

    @property
    def with_headroom(self) -> float:
        return self.demand * (1.0 + self.headroom)


def prediction_bound(values: tuple[float, ...], q: float) -> float:
    """The ``ceil((n + 1) q)``-th smallest of ``n`` values, the largest where that rank
    is beyond ``n``; NaN when any value is NaN.

    Where the values are exchangeable (split conformal prediction), the next one lies
    at or below it with probability at least ``q``: a bound for the next value, which a
    plain quantile of the values is not (the interpolated ``q`` quantile of ``n`` covers
    the next with probability ``(1 + (n - 1) q) / (n + 1)``, short of ``q`` for any ``q``
    above one half: 98.7 % for the 99.5 % quantile of 120). The rank is within ``n``
    once ``n >= q / (1 - q)`` (``values_for_bound``)."""
    if any(map(math.isnan, values)):
        return math.nan
    # The epsilon keeps a product that lands on an integer (200 x 0.995) from rounding
    # up past it.
    rank = min(len(values), max(1, math.ceil((len(values) + 1) * q - 1e-9)))
    # Counted from the top, without sorting them all: at a high goal it is the largest
    # or close to it (the planner reads two lists of 199 every decision).
    from_top = len(values) - rank + 1
    if from_top == 1:
        return float(max(values))
    return float(heapq.nlargest(from_top, values)[-1])


def values_for_bound(q: float, most: int) -> int:
    """The fewest values of which :func:`prediction_bound` is a bound at ``q`` (its rank
    within them), ``ceil(q / (1 - q))`` (199 for 99.5 %, 1 for one half or less), but
    not more than ``most`` (all of which a ``q`` of 1 would take)."""
    if q >= 1.0:
        return most
    return min(most, max(1, math.ceil(q / (1.0 - q) - 1e-9)))


def _alpha(span_s: float, dt_s: float) -> float:
    """The smoothing weight of a sample ``dt_s`` after the last, for a memory of
    ``span_s`` (``2 / (N + 1)`` with ``N = span / dt`` samples). It reaches 1 at a gap of
    one span, and stays there beyond: a gap longer than the memory leaves nothing older
    to weigh. Above 1 it weighed the past negatively, and at a 300 s cadence (a level
    span of 120 s: 1.43) Holt over-corrected with a growing swing, a steady demand
    forecast 4x within hours, the fleet held at ``max_instances``."""
    return min(1.0, 2.0 / (span_s / max(dt_s, 1e-9) + 1.0))


def _curve_factor(
    seasonal: float, day_mean: tuple[float, ...], config: ForecastConfig, at_s: float
) -> float:
    """The daily curve's factor at ``at_s`` (1.0 before it is in use); linear between
    bin centres, wrapping around midnight."""
    if not seasonal or not day_mean:
        return 1.0
    means = np.asarray(day_mean)
    overall = float(means.mean())
    if overall <= 0:
        return 1.0
    position = (at_s % config.day_s) / config.bin_s - 0.5
    lo = math.floor(position)
    frac = position - lo
    bins = config.day_bins
    value = (1.0 - frac) * means[lo % bins] + frac * means[(lo + 1) % bins]
    return max(float(value) / overall, config.min_daily_factor)


def _raw_forecast(
    state: ForecastState, config: ForecastConfig, horizon_s: float
) -> tuple[float, bool]:
    value = _holt_forecast(
        state.level, state.trend, state.seasonal, state.day_mean, state.last_at_s, config, horizon_s
    )
    return value, bool(state.seasonal)


def _holt_forecast(
    level: float,
    trend: float,
    seasonal: float,
    day_mean: tuple[float, ...],
    last_at_s: float,
    config: ForecastConfig,
    horizon_s: float,
) -> float:
    """:func:`_raw_forecast`'s value from the state's parts (``update`` files forecasts
    before the new state exists)."""
    at = last_at_s + horizon_s
    if seasonal:
        # With the daily curve carrying the day's shape, the trend is a deviation from
        # it, read over ``trend_span_s``: damp it over that span instead of extrapolating
        # it for hours (trend x tau x (1 - exp(-h / tau)), ~linear for h << tau).
        tau = config.trend_span_s
        drift = trend * tau * -math.expm1(-horizon_s / tau)
    else:
        drift = trend * horizon_s
    value = (level + drift) * _curve_factor(seasonal, day_mean, config, at)
    return max(value, 0.0)


def _sizing_forecast(
    state: ForecastState, config: ForecastConfig, horizon_s: float
) -> tuple[float, bool]:
    """What a planner sizes for: the forecast, never below the latest sample. Capacity
    added now must also serve the demand of now, and a trend read from a noisy series
    overshoots both ways; only the floor's errors matter for headroom (actual above
    it), so they are what is scored."""
    value, seasonal = _raw_forecast(state, config, horizon_s)
    return max(value, state.last_value), seasonal


# No number a forecaster or a planner files comes near this (demand signals stop at
# ``MAX_SIGNAL_VALUE``, 1e12; times are seconds since the epoch), and within it no sum
# or product of two or three of them overflows a float: a trend of 1e300 read back from
# a hand-edited memory made the forecast infinite and the decision raise.
MAX_REMEMBERED = 1e100


def remembered(x: float) -> bool:
    """Whether ``x`` is a number a memory may hold: finite and within
    ``MAX_REMEMBERED`` either side (NaN fails)."""
    return -MAX_REMEMBERED <= x <= MAX_REMEMBERED


def readable(state: ForecastState, now_s: float, config: ForecastConfig) -> ForecastState:
    """``state``, or a fresh one where it cannot be a state ``update`` left: a memory
    read back from a damaged state document may hold any float, and one NaN time or
    level would make every later forecast NaN, a huge trend an infinite one. Kept (the
    very object) when every number is one a memory may hold (``remembered``), the times
    ordered and not after ``now_s``, the daily curve and the errors shaped for
    ``config``; a state without samples has nothing to keep."""
    if state.samples <= 0:
        return state if state == ForecastState() else ForecastState()
    scalars = (
        state.first_at_s,
        state.last_at_s,
        state.last_value,
        state.level,
        state.trend,
        state.seasonal,
    )
    horizons = len(config.horizons_s)
    ok = (
        all(map(remembered, scalars))
        and state.first_at_s <= state.last_at_s <= now_s
        and len(state.day_mean) in (0, config.day_bins)
        and len(state.day_count) == len(state.day_mean)
        and all(remembered(x) and x >= 0 for x in (*state.day_mean, *state.day_count))
        and all(
            len(entry) == 3
            and all(map(remembered, entry))
            and 0 <= entry[1] < horizons
            and entry[1] == int(entry[1])
            for entry in state.pending
        )
        and len(state.errors) in (0, horizons)
        and all(remembered(x) for errors in state.errors for x in errors)
    )
    return state if ok else ForecastState()


def update(
    state: ForecastState, at_s: float, demand: float, config: ForecastConfig | None = None
) -> ForecastState:
    """The state after one demand sample taken at ``at_s`` (non-finite or negative
    samples, and samples not after the last one, leave it unchanged)."""
    config = config or ForecastConfig()
    if not math.isfinite(demand) or demand < 0 or not math.isfinite(at_s):
        return state
    if state.samples and at_s <= state.last_at_s:
        return state
    bins = config.day_bins

    # 1. Score the forecasts that fall due (the actual is this sample).
    errors = list(state.errors) or [() for _ in config.horizons_s]
    pending: list[tuple[float, float, float]] = []
    due_by_s = at_s + config.interval_s / 2.0
    for entry in state.pending:
        due, index, predicted = entry
        if due <= due_by_s:
            if at_s - due <= config.interval_s and predicted > 0:
                scored = int(index)
                errors[scored] = (*errors[scored], (demand - predicted) / predicted)
        else:
            pending.append(entry)
    kept = config.errors_kept

    # 2. The daily curve: this sample joins its time-of-day bin.
    b = int((at_s % config.day_s) // config.bin_s) % bins
    per_visit = config.bin_s / config.interval_s
    day_mean = state.day_mean or (0.0,) * bins
    day_count = state.day_count or (0.0,) * bins
    # One bin changes: the counts kept as they are once that bin's is full (a count
    # >= 1 equal to the old one is it bit for bit). Each new tuple of a day's bins was
    # work for the cyclic collector after a batch of decisions too.
    count = min(day_count[b] + 1.0, per_visit)
    if count != day_count[b]:
        counts = list(day_count)
        counts[b] = count
        day_count = tuple(counts)
    means = list(day_mean)
    means[b] += (demand - means[b]) / count
    curve = tuple(means)

    # 3. Holt on the (deseasonalised) demand.
    if state.samples == 0:
        samples, first_at_s, level, trend, seasonal = 1, at_s, demand, 0.0, state.seasonal
    else:
        samples, first_at_s = state.samples + 1, state.first_at_s
        seasonal = state.seasonal
        level, trend = state.level, state.trend
        full_day = at_s - state.first_at_s >= config.day_s and all(c > 0 for c in day_count)
        if not seasonal and full_day:
            # Switch to the daily curve: re-base the level on the deseasonalised scale;
            # the slope so far was mostly the daily ramp, which the curve now carries.
            seasonal = 1.0
            level = level / _curve_factor(1.0, curve, config, state.last_at_s)
            trend = 0.0
        y = demand / _curve_factor(seasonal, curve, config, at_s)
        dt = at_s - state.last_at_s
        a = _alpha(config.level_span_s, dt)
        beta = _alpha(config.trend_span_s, dt)
        new_level = a * y + (1.0 - a) * (level + trend * dt)
        trend = beta * (new_level - level) / dt + (1.0 - beta) * trend
        level = new_level
    # 4. File this cycle's forecasts for scoring, once forecasts are made: each
    # ``_sizing_forecast`` of the new state (its ``last_value`` is this demand), worked
    # out from its parts so that the state is built once.
    if _spans_window(samples, first_at_s, at_s, config):
        for index, horizon in enumerate(config.horizons_s):
            value = _holt_forecast(level, trend, seasonal, curve, at_s, config, horizon)
            pending.append((at_s + horizon, float(index), max(value, demand)))
    return ForecastState(
        samples=samples,
        first_at_s=first_at_s,
        last_at_s=at_s,
        last_value=demand,
        level=level,
        trend=trend,
        seasonal=seasonal,
        day_mean=curve,
        day_count=tuple(day_count),  # the same tuple when it is one
        pending=tuple(pending),
        errors=tuple(tuple(e[-kept:]) for e in errors),
    )


def rescaled(state: ForecastState, factor: float) -> ForecastState:
    """``state`` with every demand figure it holds (the last sample, the level, the
    trend and the forecasts awaiting scoring) multiplied by ``factor``: what the state
    would be had the same requests always carried ``factor`` times the work each. The
    caller's unit changed, not the demand, so no trend is read into it, and no forecast
    filed before it is scored as an error for it. The daily curve is relative (its
    factors are bins over their mean) and the errors are ratios: both unchanged.
    ``state`` itself for a factor of 1 or one that is not a finite positive number."""
    if factor == 1.0 or not (0.0 < factor < math.inf) or state.samples <= 0:
        return state
    return replace(
        state,
        last_value=state.last_value * factor,
        level=state.level * factor,
        trend=state.trend * factor,
        pending=tuple((due, index, value * factor) for due, index, value in state.pending),
    )


def _has_history(state: ForecastState, config: ForecastConfig) -> bool:
    return _spans_window(state.samples, state.first_at_s, state.last_at_s, config)


def _spans_window(
    samples: int, first_at_s: float, last_at_s: float, config: ForecastConfig
) -> bool:
    """Whether a history of ``samples`` from ``first_at_s`` to ``last_at_s`` is enough
    to forecast from (two samples at least, a window apart)."""
    return samples > 1 and last_at_s - first_at_s >= config.window_s


def _config_if_history(
    state: ForecastState, config: ForecastConfig | None
) -> ForecastConfig | None:
    """``config`` (the default when None) if ``state`` has the history to forecast from,
    else None: the guard of every public forecast below."""
    config = config or ForecastConfig()
    return config if _has_history(state, config) else None


def headroom(
    state: ForecastState, horizon_s: float, config: ForecastConfig | None = None
) -> tuple[float, int]:
    """(headroom fraction, errors behind it) at ``horizon_s``: the bound at
    ``error_quantile`` (``prediction_bound``, as the planner reads the capacity it
    kept) of the recent relative errors of the tracked horizon nearest at or above it
    (the largest if none is), at least ``min_headroom``."""
    config = config or ForecastConfig()
    upper, used = error_bound(state, horizon_s, config)
    return (config.min_headroom if upper is None else max(upper, config.min_headroom)), used


def error_bound(
    state: ForecastState, horizon_s: float, config: ForecastConfig | None = None
) -> tuple[float | None, int]:
    """(bound, errors behind it) of :func:`headroom` before its floor (None: no errors
    at that horizon yet)."""
    config = config or ForecastConfig()
    if not state.errors:
        return None, 0
    horizons = config.horizons_s
    above = [i for i, h in enumerate(horizons) if h >= horizon_s]
    index = min(above, key=lambda i: horizons[i]) if above else int(np.argmax(horizons))
    recent = state.errors[index] if index < len(state.errors) else ()
    if not recent:
        return None, 0
    return prediction_bound(recent, config.error_quantile), len(recent)


def trend_forecast(
    state: ForecastState, horizon_s: float, config: ForecastConfig | None = None
) -> float | None:
    """The model's own forecast (Holt, shaped by the daily curve once in use), without
    the floor at the latest sample that :func:`forecast` applies for sizing."""
    config = _config_if_history(state, config)
    return None if config is None else _raw_forecast(state, config, horizon_s)[0]


def sizing_demand(
    state: ForecastState, horizon_s: float, config: ForecastConfig | None = None
) -> float | None:
    """:func:`forecast`'s demand alone (None likewise): for a caller that takes its
    headroom from elsewhere and reads :func:`headroom` only when it needs it."""
    config = _config_if_history(state, config)
    return None if config is None else _sizing_forecast(state, config, horizon_s)[0]


def forecast(
    state: ForecastState, horizon_s: float, config: ForecastConfig | None = None
) -> Forecast | None:
    """Demand expected ``horizon_s`` after the last sample, with its headroom; ``None``
    with less than ``window_s`` of history (the caller uses the current demand plus
    ``min_headroom``)."""
    config = _config_if_history(state, config)
    if config is None:
        return None
    demand, seasonal = _sizing_forecast(state, config, horizon_s)
    room, used = headroom(state, horizon_s, config)
    return Forecast(demand, room, horizon_s, used, seasonal)


def stays_below(
    state: ForecastState,
    threshold: float,
    window_s: float,
    config: ForecastConfig | None = None,
) -> bool:
    """Scale-in guard: whether the forecast *with headroom* stays at or below
    ``threshold`` at every cycle over the next ``window_s`` (the stabilisation window).
    ``False`` without a forecast: no history, no evidence that demand will stay low."""
    config = _config_if_history(state, config)
    if config is None:
        return False
    steps = max(1, math.ceil(window_s / config.interval_s))
    for k in range(steps + 1):
        predicted = forecast(state, min(k * config.interval_s, window_s), config)
        if predicted is None or predicted.with_headroom > threshold:
            return False
    return True

"""The SLO-guaranteed planner, the default policy (``heteroscale``).

It sizes prefill and decode from what it can know, not from hand-set targets: the
performance model (``reconciler.perfmodel``, the one the simulator uses), the live
request mix (the engines' prompt- and output-length histograms), the latency it
observes, and a forecast of the demand at the time a new instance would serve.

One cycle, in order (each step that changes a number says so in the message):

1. **Signals.** Prompt tokens/s (``prefill_tps``) and output tokens/s
   (``decode_tps``) must be usable (present, finite, fresh), believable (not 0 while
   the role's gauges say it works, ``rate_contradicted``; not jumping beyond what its
   instances could serve at all, ``rate_beyond_instances``), else both roles hold: a
   broken metric never scales in, and the latency tiers (step 7) may still raise a
   role (``under_latency_tiers``). They count what the instances *served*: under
   overload that stops at capacity, so the demand is read as served plus the growth
   of the role's queue over the same window (``prefill_queue`` / ``decode_queue``,
   requests waiting, times the mix's mean prompt or output length), and the queue
   itself is sized to drain within ``DRAIN_S``. Decode's work also counts what its
   running requests still have to generate (``decode_running`` times the mix's
   length-biased remaining output, beyond the count's own noise): its batch swells
   under overload and drains after it, which the queue alone read as served and then
   as demand. Without a queue signal the served rate stands in (noted). Decode is
   also asked for what prefill holds back (its
   queue's growth and backlog, converted at the mix's output per prompt token:
   ``decode_follows_prefill``): a surge reaches prefill first, and decode's own rates
   would show it only once prefill let it through. What prefill releases from its
   backlog is taken off decode's reading the same way: it is backlog, not demand.
2. **Mix.** The request mix from ``metrics.prompt_tokens`` / ``output_tokens``;
   missing or stale, the last known mix (the message says from when). With no mix
   ever seen and no override, the planner holds.
3. **Latency correction.** In steady state (no instance of the role starting, load at
   or below the model's capacity, and for decode its size settled: ``decode_settled``)
   the ratio of observed to predicted latency corrects the model
   (``capacity.LatencyCorrection``: log-space EWMA, bounded).
   Under overload the latency measures the queue, not the model, so it is not used;
   nor is prefill's TTFT while a backlog beyond what the instances prefill within the
   SLO is in its metrics window (it reads the backlog's wait). The latency quantiles
   are known only to their histogram bucket, so where a finer reading exists it is
   used: decode's mean inter-token gap (``tbt_mean``, the histogram's sum over its
   count), and prefill's busy fraction (``prefill_gpu_util`` against the model's work
   for the prompt tokens/s served, once its count has held for a metrics window: over
   enough prompts for its precision, or over any number where a queue held prompts
   through the window and the pool read fully busy, ``_queued_through_window``; too
   coarse alone, the readings of the last non-overlapping windows teach it together,
   as many as their precision needs, ``capacity.combined_busy_reading``; too few
   still, they are a floor the TTFT read alone may not take the factor below).
   Decode's TBT quantile still counts where it reads slower than the model predicts
   it (``factor_evidence`` says why). Beside prefill's busy fraction, a TTFT beyond
   the model's prediction is time spent outside the instances (a gateway, the
   network): learnt as an offset added to every TTFT (``implied_ttft_offset_s``),
   which more instances do not remove; so is one read from the TTFT alone while it
   meets the SLO (its bucket does, or the reading does in a bucket that straddles the
   SLO: ``reading_likely_meets_slo``). Read alone and likely above the SLO, it is taken
   only as evidence of a slower instance
   (``_ttft_alone_factor``).
4. **Capacity per instance** for that mix (``capacity.role_capacities``): prefill
   prompt tokens/s at which the attainment goal's share of the attainable requests
   meets the TTFT SLO (each request is judged on its own TTFT); decode output tokens/s
   at the batch whose step time meets the TBT SLO at the live context, with the count
   of sequences running held at the goal's share, not only its mean
   (``capacity.running_spread_tps``, ``SizedDemand.with_running_spread``). The policy's
   own tokens/s targets, when given, override the derived figure of their role
   (``baselines.policy_tps_targets``: ``target_per_instance`` is the role its metric
   measures, ``prefill_target_per_instance`` prefill's unless that role is already
   set).
5. **Demand at the horizon.** A new instance serves ``startup_s`` + one cycle + the
   metrics window from now; each role's demand is forecast at that horizon
   (``forecast``: Holt's trend plus the daily curve once a day of history exists; its
   history rescaled first by what a change in the mix's mean length explains,
   ``mix_explained_factor``, so a new mix is a new size per request, not a trend) and
   sized for ``max(now, forecast) x (1 + headroom)``. The headroom bounds how far
   the demand outran the capacity kept in force (``KeptCapacity``): the bound at the
   attainment goal (for both roles) of the recent shortfalls, which the next one stays
   within with that probability (``forecast.prediction_bound``), over as many of them
   as make it one (199 at the default 99.5 %: 100 minutes; an hour's 120 read as their
   largest covered the next 120 times in 121), the forecaster's own errors at that
   horizon until ten exist, and at least the policy's ``scaling.min_headroom`` (10 %
   by default, ``models.DEFAULT_MIN_HEADROOM``): a bursty service carries more on its
   own. Too little history: current demand x (1 + that floor). The headroom is
   relative, so it never takes the size above ``max(peak, forecast) x (1 + the
   floor)``, ``peak`` being the last hour's highest demand (``KeptCapacity.peak_tps``;
   decode's only as far as the requests reaching prefill confirm it,
   ``confirmed_decode_peak``); a forecast above that peak counts above it only by
   the share of such rises that came true within the hour (``KeptCapacity.rise_trust``).
6. **Unattainable requests** (TTFT missed even on an idle instance) are left out of
   the capacity (their work is still counted: ``PrefillCapacity.demand_tps``), shown
   with the prompt length beyond which the SLO is out of reach, and never chased:
   the TTFT tiers are skipped when they alone exceed the SLO's tail (``1 -
   quantile``). Where no rate meets the SLO at all, prefill is held where it runs and
   grown to keep up with the work (``capacity.prefill_capacity``): never held while its
   queue grows, never scaled in to queue the prompts longer.
7. **Latency tiers** stay as a safety net (the policy's ``latency_tiers``), damped: a
   role with instances still starting does not escalate, a reading whose histogram
   bucket holds the SLO is no evidence of a miss (``reading_holds_slo``), and no tier
   takes a role beyond ``LatencyCorrection.MAX_FACTOR`` times the count the model
   sizes (the largest model error the correction takes as one).
8. **Shape and stabilisation** exactly as the paper policy
   (``coordinated._shape``, ``coordinated.stabilise``): min/max, P/D ratio bounds,
   whole groups, scale-out at once, scale-in only after the recommendation (which
   includes the forecast and headroom) stayed lower for the whole scale-in window,
   cooldown, max step; the scale-in window remembers the count without a queue's
   drain (gone once drained). The P/D ratio is the outcome of sizing each role on its
   own; when a bound keeps a role below what the SLO needs, the message says so.

Everything is pure; the planner's memory (forecasters, correction, last mix) travels
in ``PolicyHistory.planner``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from itertools import pairwise

from reconciler.desired.models import DAY_S, ClusterSpec, ServicePolicy
from reconciler.latency_buckets import (
    LatencySignal,
    bucket_around,
    policy_latency_buckets,
    reading_holds_slo,
    reading_likely_meets_slo,
)
from reconciler.policy.base import (
    Clamp,
    Decision,
    DecisionInput,
    PolicyHistory,
    Recommendation,
    clamps_note,
    decided,
    gc_paused,
)
from reconciler.policy.baselines import policy_tps_targets
from reconciler.policy.capacity import (
    NOISE_SPREADS,
    KeptBusyReading,
    LatencyCorrection,
    LengthHistogram,
    PrefillLoad,
    RequestMix,
    RoleCapacities,
    bucket_side,
    combined_busy_reading,
    implied_decode_factor,
    implied_prefill_factor,
    kept_busy_readings,
    predicted_ttft_s,
    predicted_ttft_side,
    read_prefill_busy,
    running_spread_tps,
    transfer_s_per_token,
)
from reconciler.policy.clamps import ceil_count
from reconciler.policy.coordinated import (
    PolicyNumbers,
    _feedback_target,
    _hold,
    _reason,
    _shape,
    _trim_recommendations,
    _window_extreme,
    finish,
    policy_numbers,
    rate_contradicted,
    role_counts,
    sample_problem,
    stabilise,
)
from reconciler.policy.forecast import (
    ForecastConfig,
    ForecastState,
    error_bound,
    prediction_bound,
    readable,
    remembered,
    rescaled,
    sizing_demand,
    update,
    values_for_bound,
)
from reconciler.policy.gpu_economics import (
    choose_gpu_types,
    clear_choice_caches,
    perf_context,
    perf_variant,
    ranked_gpu_types,
)
from reconciler.policy.perf_context import (
    PerfContext,
    capacities_for,
    clear_capacity_caches,
    declared_mix,
    fitting_perfs,
)
from reconciler.state import (
    MAX_SIGNAL_VALUE,
    LengthBuckets,
    Role,
    Sample,
    ServiceFleet,
    ServiceMetrics,
)

# The reconcile interval the forecaster samples at until the decisions show their own
# (``observed_cycle_s``): the loop's default.
CYCLE_S = 30.0
# The most samples ``observed_cycle_s`` reads a forecaster's mean gap over (2**53: every
# count up to it is exact as a float).
MAX_COUNTED_SAMPLES = 2**53
# The metrics window behind every rate (a PromQL rate over one minute).
METRICS_WINDOW_S = 60.0
# Errors behind the headroom: as many as make its bound at the attainment goal a valid
# one (``forecast.values_for_bound``: 199 at the default 99.5 %, 100 minutes of 30 s
# cycles), at most this many (a goal above 99.9 % reads the largest of them, which
# covers the next with probability 1000/1001): a planner memory holds two such lists,
# and the durable state stores it. With fewer than ten (five minutes) the
# forecaster's own errors stand in.
MAX_KEPT_ERRORS = 1000
MIN_KEPT_ERRORS = 10
# The highest demand the headroom's ceiling goes by: the last hour's. Not as long as the
# errors: remembered for their 100 minutes at the default goal, it cost burst days up to
# 12 % more GPU-hours with no request more within the SLO (burst-chat-3-warm: 459.5
# against 413.7 at 100.0 %, the matrix's heteroscale run of that cell).
PEAK_MEMORY_S = 3600.0
# A backlog is sized to drain within one metrics window once the capacity is there:
# every request behind it misses its TTFT while it lasts (so slower draining loses
# more requests), and a window is the soonest the loop can see that it drained (the
# rates it reads are 60 s averages).
DRAIN_S = METRICS_WINDOW_S
# Queue readings are remembered this long: a window and a cycle, so the one nearest a
# window's start is still there when a cycle runs late.
BACKLOG_MEMORY_S = METRICS_WINDOW_S + CYCLE_S
# A role's work moving by less than this share of what it served is no change of its
# load: a real engine's queue flickers by a few requests every scrape.
FLICKER_SHARE = 0.01
# Prefill's busy readings are combined over up to an hour (the planner's memory of a
# peak, PEAK_MEMORY_S): 60 windows, enough for readings of a spread up to
# 0.05 x sqrt(60) = 0.39 to teach the speed together (``combined_busy_reading``).
BUSY_MEMORY_S = PEAK_MEMORY_S
# Capacities are cached per quantised mix: bucket shares rounded to this. Not below the
# model's resolution everywhere: two mixes of one key may differ by up to a step in
# each bucket, which in a long-prompt bucket moves the mean prompt by up to ~13 % and
# the prefill count by up to ~5 % (the example services' shapes); the entry of the
# first mix seen is the one used. The correction's factors are used in 1 % steps
# (``perf_context._FACTOR_STEP`` says why).


@dataclass(frozen=True)
class PlannerMemory:
    """What the planner remembers between cycles (immutable)."""

    prefill_demand: ForecastState = field(default_factory=ForecastState)
    decode_demand: ForecastState = field(default_factory=ForecastState)
    correction: LatencyCorrection = field(default_factory=LatencyCorrection)
    mix: RequestMix | None = None
    mix_at_s: float | None = None
    prefill_kept: KeptCapacity = field(default_factory=lambda: KeptCapacity())
    decode_kept: KeptCapacity = field(default_factory=lambda: KeptCapacity())
    prefill_backlog: Backlog | None = None
    decode_backlog: Backlog | None = None
    # Decode's ready count as last seen, and since when it has neither changed nor had
    # instances starting (``decode_settled``).
    decode_ready_seen: int | None = None
    decode_steady_since_s: float | None = None
    # The same for prefill: its busy fraction reads its speed only over a metrics
    # window its instances all served through (``_corrected``).
    prefill_ready_seen: int | None = None
    prefill_steady_since_s: float | None = None
    # The last prefill queue reading whose wait alone exceeded the TTFT SLO
    # (``_corrected``): TTFTs read over a window reaching back to it read that wait.
    prefill_backlog_seen_s: float | None = None
    # Prefill's recent busy readings, (at s, factor, spread), oldest first: together
    # they teach a speed no one of them is precise enough to (``_corrected``).
    prefill_busy_readings: tuple[KeptBusyReading, ...] = ()


@dataclass(frozen=True)
class Backlog:
    """A role's work as last read: tokens of work waiting, at the sample's time, and
    the readings before it that are still within reach of a metrics window
    (``earlier``, (at s, tokens), oldest first: ``role_demand`` measures the queue's
    growth over the window the served rate averages); and decode's requests running
    at those readings that read them (``running``, (at s, requests), oldest first, the
    latest included), counted in requests so that both ends of a window convert to
    tokens alike."""

    at_s: float
    tokens: float
    earlier: tuple[tuple[float, float], ...] = ()
    running: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class RoleDemand:
    """What a role is asked to serve, from what it served and its queue."""

    arriving_tps: float  # served + the queue's growth: the demand to forecast
    drain_tps: float  # the queue's tokens over DRAIN_S: added on top, not forecast
    backlog: Backlog | None  # the reading to remember
    note: str | None  # how it was read, when the queue changed it or was missing


def role_demand(
    role: str,
    served_tps: float,
    queue: Sample | None,
    tokens_per_request: float | None,
    previous: Backlog | None,
    now_s: float,
    max_age_s: float,
    running: Sample | None = None,
    running_tokens_per_request: float | None = None,
) -> RoleDemand:
    """The demand on a role (module docstring, step 1). The growth of its work over the
    metrics window is demand the instances could not serve (or, shrinking, backlog they
    served beyond what arrived); a queue reading that is missing, stale or not
    convertible to tokens (no mix) leaves the served rate alone.

    The work is the queue's, and with ``running`` (requests running, each with
    ``running_tokens_per_request`` still to generate on average) theirs too: decode's
    batch grows under overload (each step slower, every sequence still admitted) and
    after a scale-out drains faster than work arrives. Read from the queue alone, the
    queue emptying into the batch was taken as served, and the batch's drain minutes
    later as demand: outputs growing 4x read 49,000 output tokens/s where 25,000
    arrived, remembered as the hour's peak (+78% GPU-hours over static peak for the
    next hour). Only the queue is drained on top (``drain_tps``): the running work is
    being served. The running requests' growth counts only beyond their own noise
    (``running_growth_tps``)."""
    problem = sample_problem(queue, f"{role}_queue", now_s, max_age_s)
    if problem is not None or tokens_per_request is None or tokens_per_request <= 0:
        why = problem or "no request mix to weigh its queue"
        return RoleDemand(served_tps, 0.0, previous, f"{role} queue unread ({why}): served rate")
    assert queue is not None
    waiting_tokens = max(0.0, queue.value) * tokens_per_request
    running_now: tuple[tuple[float, float], ...] = ()
    if (
        running is not None
        and running_tokens_per_request is not None
        and running_tokens_per_request > 0
        and sample_problem(running, f"{role}_running", now_s, max_age_s) is None
    ):
        running_now = ((queue.at_s, max(0.0, running.value)),)
    backlog = Backlog(queue.at_s, waiting_tokens, running=running_now)
    readings = (
        [] if previous is None else _sound_readings(previous, backlog.at_s, tokens_per_request)
    )
    # The running readings kept: those at the times of the queue readings kept, taken
    # only while this one reads them too (with and without, no growth is read).
    earlier_running = (
        {at_s: count for at_s, count in previous.running if math.isfinite(count) and count >= 0}
        if previous is not None and running_now
        else {}
    )
    growth_tps = 0.0
    running_growth = 0.0
    if readings and readings[-1][0] == backlog.at_s:
        # The same scrape again: keep the older readings' times.
        kept = tuple(readings[:-1])
        backlog = Backlog(*readings[-1], kept, _running_at(earlier_running, readings))
    elif readings:
        # The served rate is the window's average, so the queue's growth is read over
        # the same window: from the reading nearest its start. Read over one cycle
        # instead, a backlog emptied early in the window counted its drain as demand
        # (served over 60 s, growth 0 over the last 30), and after a burst that
        # phantom demand was remembered as the hour's peak and held decode at
        # max_instances for a quarter of an hour (burst-chat-0).
        at_s, tokens = window_start_reading(readings, backlog.at_s)
        span_s = backlog.at_s - at_s
        growth_tps = (backlog.tokens - tokens) / span_s
        if at_s in earlier_running:
            assert running_tokens_per_request is not None
            running_growth = running_growth_tps(
                earlier_running[at_s],
                running_now[0][1],
                span_s,
                served_tps / tokens_per_request,
                running_tokens_per_request,
            )
            growth_tps += running_growth
        kept = tuple(r for r in readings if r[0] >= backlog.at_s - BACKLOG_MEMORY_S)
        backlog = Backlog(
            backlog.at_s, backlog.tokens, kept, _running_at(earlier_running, kept) + running_now
        )
    arriving = max(0.0, served_tps + growth_tps)
    drain = waiting_tokens / DRAIN_S
    note = None
    # Say so when the queue moves the demand by more than its flicker.
    if max(abs(growth_tps), drain) > FLICKER_SHARE * max(served_tps, 1.0):
        grown = f"{growth_tps - running_growth:+.0f} queue growth"
        if running_growth:
            grown += f" {running_growth:+.0f} running work growth"
        note = (
            f"{role}: {served_tps:.0f} tokens/s served {grown} = "
            f"{arriving:.0f} arriving; {queue.value:.0f} queued: +{drain:.0f} to drain "
            f"in {DRAIN_S:.0f} s"
        )
    return RoleDemand(arriving, drain, backlog, note)


def _running_at(
    counts: dict[float, float], readings: Sequence[tuple[float, float]]
) -> tuple[tuple[float, float], ...]:
    """The running counts read at the times of ``readings``, oldest first."""
    return tuple((at_s, counts[at_s]) for at_s, _ in readings if at_s in counts)


def running_growth_tps(
    running_then: float,
    running_now: float,
    span_s: float,
    completions_per_s: float,
    remaining_tokens_per_request: float,
) -> float:
    """The growth of the running requests' work over ``span_s`` (tokens/s), beyond what
    their count moves by chance.

    Requests start and finish at random, so the count of those running moves about its
    mean even at a steady load: as in an M/G/inf queue, by a variance of up to twice the
    requests finishing in the span and at most twice the count (the requests running
    then and now are the same ones once a request runs longer than the span). Long
    outputs turned that wobble into demand: at 1.5 requests/s of 8,000-token outputs,
    +-13 requests a minute at ~5,400 tokens each swung the demand read by +-1,000 of
    12,000 tokens/s, and the scale-in window kept the highest (decode +35 %, a
    hostile prober). A growth beyond ``NOISE_SPREADS`` of its standard deviations is
    taken, less that; a drained batch (thousands of requests) passes whole."""
    mean_count = (running_then + running_now) / 2.0
    variance = 2.0 * min(max(0.0, completions_per_s) * span_s, mean_count)
    grown = running_now - running_then
    beyond = max(0.0, abs(grown) - NOISE_SPREADS * math.sqrt(variance))
    return math.copysign(beyond, grown) * remaining_tokens_per_request / span_s


def window_start_reading(
    readings: Sequence[tuple[float, float]], end_s: float
) -> tuple[float, float]:
    """Of queue ``readings`` (at s, tokens; at least one), the one nearest the start of
    the metrics window that ends at ``end_s``: where the served rate's average begins."""
    start_s = end_s - METRICS_WINDOW_S
    return min(readings, key=lambda reading: abs(reading[0] - start_s))


def _sound_readings(
    previous: Backlog, now_s: float, tokens_per_request: float
) -> list[tuple[float, float]]:
    """The remembered queue readings (at s, tokens; oldest first) that could be this
    queue's: the last one at or before ``now_s``, the earlier ones before it, each
    finite and within what a usable reading holds (``MAX_SIGNAL_VALUE`` requests at
    the mix's tokens each). A state document read back damaged could hold any float,
    and 8e298 tokens overflowed the sizing; with none sound, the new reading is read
    as the first."""
    top_tokens = MAX_SIGNAL_VALUE * tokens_per_request

    def sound(at_s: float, tokens: float, before_s: float) -> bool:
        return past_time(at_s, before_s) is not None and 0.0 <= tokens <= top_tokens

    if not sound(previous.at_s, previous.tokens, now_s):
        return []
    earlier = sorted(
        (at_s, tokens)
        for at_s, tokens in previous.earlier
        if sound(at_s, tokens, previous.at_s) and at_s < previous.at_s
    )
    return [*earlier, (previous.at_s, previous.tokens)]


def decode_follows_prefill(
    decode: RoleDemand,
    prefill: RoleDemand,
    prefill_served_tps: float,
    output_per_prompt_token: float,
) -> RoleDemand:
    """Decode's demand, with what prefill holds back added. Every request that reaches
    prefill reaches decode within a TTFT: the requests prefill is asked for beyond what
    it served (its queue's growth) and those waiting in its backlog are decode work
    that decode's own rates cannot show yet, at the mix's output tokens per prompt
    token. A surge shows at prefill first; without this, decode would see it only once
    prefill had let it through, a start-up later. Only the excess is converted, so in
    steady state (no queue growth, no backlog) decode's own reading stands whatever the
    mix's estimate of the conversion."""
    excess_tps = (prefill.arriving_tps - prefill_served_tps) * output_per_prompt_token
    held_back_tps = max(0.0, excess_tps)
    # The other way round, prefill serving its backlog passes decode more than arrives:
    # decode's own rate shows that as demand, but it is the backlog (sized by the drain
    # term below, never forecast), so it is taken off, as prefill's own reading takes
    # it off (``role_demand``). Left in, after a burst it was remembered as the
    # hour's peak and as a shortfall of the capacity kept (burst-chat-0: 153,000
    # output tokens/s read where ~90,000 arrived).
    released_tps = min(max(0.0, -excess_tps), decode.arriving_tps)
    backlog_tps = prefill.drain_tps * output_per_prompt_token
    if held_back_tps + released_tps + backlog_tps <= FLICKER_SHARE * max(decode.arriving_tps, 1.0):
        return decode
    note = (
        f"decode: +{held_back_tps:.0f} output tokens/s held back at prefill"
        if released_tps == 0
        else f"decode: -{released_tps:.0f} output tokens/s released from prefill's backlog"
    )
    note += (
        f", +{backlog_tps:.0f} as its backlog drains" if backlog_tps > 0 else ""
    ) + f" ({output_per_prompt_token:.3f} output per prompt token)"
    return RoleDemand(
        arriving_tps=decode.arriving_tps + held_back_tps - released_tps,
        drain_tps=decode.drain_tps + backlog_tps,
        backlog=decode.backlog,
        note="; ".join(n for n in (decode.note, note) if n),
    )


def mix_explained_factor(
    previous: LengthHistogram, lengths: LengthHistogram, previous_tps: float, tps: float
) -> float:
    """How far a role's requests changed in size between two cycles, as the factor the
    forecaster's history is rescaled by (``forecast.rescaled``): the ratio of the mean
    lengths (``previous`` -> ``lengths``, prompt or output), so that the trend reads
    only the change in requests. ``previous_tps`` -> ``tps``: the role's demand in
    tokens/s at the same two cycles.

    Tokens/s are requests/s times the tokens each, and a new mix is a new size per
    request, not a demand that grows: read as one, a switch to 3.5x longer prompts at
    one request rate (seen over two cycles through the 60 s window) was forecast at
    1.6x the new level, and the scale-in window held the count it bought through the
    next phase (a prober's mix alternating every 10 minutes: +51% GPU-hours over static
    peak).

    Bounded by the tokens: the mean may move beyond the tokens' own change only by
    ``NOISE_SPREADS`` of its sampling spread (the window's requests, at the new mix's
    spread of lengths), as a rate's noise moves them apart. A mean 1000x off while the
    tokens hold (a broken histogram) would otherwise scale the history 1000x. 1 where a
    figure is not a finite positive number (no history, an empty histogram)."""
    previous_mean, mean = previous.moment(1), lengths.moment(1)
    figures = (previous_mean, mean, previous_tps, tps)
    if not all(0.0 < x < math.inf for x in figures):
        return 1.0
    requests = tps * METRICS_WINDOW_S / mean
    relative_variance = max(lengths.moment(2) / (mean * mean) - 1.0, 0.0)
    mean_spread = math.sqrt(relative_variance / max(requests, 1.0))
    limit = abs(math.log(tps / previous_tps)) + NOISE_SPREADS * mean_spread
    return math.exp(min(max(math.log(mean / previous_mean), -limit), limit))


def token_rate_spread(lengths: LengthHistogram, tps: float) -> float:
    """The relative standard deviation of a metrics window's tokens at ``tps`` tokens/s
    of requests of these ``lengths`` arriving as a Poisson stream: the window's token
    count is a compound Poisson sum, of variance (requests) x E[L^2], so its spread is
    sqrt(E[L^2] / E[L] / tokens). Infinite where there is no rate or no length."""
    mean = lengths.moment(1)
    tokens = tps * METRICS_WINDOW_S
    if not (mean > 0 and tokens > 0):
        return math.inf
    return math.sqrt(lengths.moment(2) / mean / tokens)


def confirmed_decode_peak(decode: RoleDemand, prefill: RoleDemand, mix: RequestMix) -> float:
    """The part of decode's demand that the requests reaching the service confirm, for
    the hour's peak to keep: at most the output tokens/s the prompts asked of prefill
    bring at this mix's output per prompt token, with ``NOISE_SPREADS`` of that
    figure's spread (``token_rate_spread``).

    Decode's demand is what it served plus the growth of its work, and the running
    requests' work is read at the mix's steady-state remaining output: right for a
    batch of steady-state ages, not for one that drains an overload. After outputs
    grew 10x, a decode short of instances caught up at 1.4x what arrived (17,779
    output tokens/s served, 12,024 arriving), the catch-up was filed as the hour's peak
    and held decode at 12 instances for an hour where 9 served (a prober). This
    cycle's size still goes by the demand as read (a catch-up is served either way);
    only the memory waits for the arrivals to confirm it. The mix's output lengths are
    of completed requests, which lag a switch to longer ones by a request's duration:
    for that while a true peak is filed low, and the next readings file it."""
    prompt_mean, output_mean = mix.prompt_mean_tokens, mix.output_mean_tokens
    if not (prompt_mean > 0 and output_mean > 0):
        return decode.arriving_tps
    entering_tps = (prefill.arriving_tps + prefill.drain_tps) * output_mean / prompt_mean
    spread = token_rate_spread(mix.output, entering_tps)
    return min(decode.arriving_tps, entering_tps * (1.0 + NOISE_SPREADS * spread))


def _sliding_max(
    entries: Sequence[tuple[float, float]], since_s: float, at_s: float, value: float
) -> list[tuple[float, float]]:
    """A sliding maximum's entries ((at s, value), each higher than every later one)
    with ``value`` added at ``at_s`` and those from before ``since_s`` gone: its first
    entry is the highest value since, and it stays short."""
    kept = [entry for entry in entries if entry[0] >= since_s and entry[1] > value]
    kept.append((at_s, value))
    return kept


@dataclass(frozen=True)
class KeptCapacity:
    """The headroom's evidence for one role: what the planner sized for (before
    headroom) each cycle, and how far the demand that then arrived exceeded what it
    kept in force.

    Instances asked for at ``s`` serve from ``s + horizon``, and the scale-in window
    keeps the largest recent size: the demand at ``t`` meets the largest sizing made
    in ``[t - horizon - window, t - horizon]``. The relative excess of the demand over
    that is the error that matters (a forecast's own error ignores what the window
    keeps, and counts the same risk twice). The headroom is its quantile at the
    attainment goal.

    Only sizings made from a forecast are filed (``sized=None`` otherwise): before the
    forecaster has a window of history the planner sizes from the current demand, and
    the fleet keeps what it had (the warm start, min_instances, the cooldown), so such
    a sizing says nothing of what was kept; filed, a low first reading would be
    remembered for an hour as a shortfall of several hundred percent."""

    sized: tuple[tuple[float, float], ...] = ()  # (made at s, demand sized for)
    errors: tuple[float, ...] = ()  # max(0, demand / kept - 1), oldest first
    # The demand's sliding maximum over PEAK_MEMORY_S: (at s, demand), each entry
    # higher than every later one (so it stays short).
    peaks: tuple[tuple[float, float], ...] = ()
    # Forecasts made above the hour's peak, awaiting their horizon: (due at s, the
    # peak then, the forecast, the highest demand since), oldest first.
    rises: tuple[tuple[float, float, float, float], ...] = ()
    # What share of such a forecast's rise past the peak came true (0 to 1): its
    # sliding maximum over the peak's own memory (PEAK_MEMORY_S), (scored at s, share),
    # each entry higher than every later one; and when the last MIN_KEPT_ERRORS were
    # scored (whether there is evidence enough). How far the next rise is trusted
    # (``rise_trust``), in a few numbers where every share of an hour of them was 240.
    rises_true: tuple[tuple[float, float], ...] = ()
    rises_scored_at: tuple[float, ...] = ()

    def observe(
        self,
        now_s: float,
        demand: float,
        sized: float | None,
        horizon_s: float,
        window_s: float,
        errors_kept: int,
        peak_demand: float | None = None,
    ) -> KeptCapacity:
        """Itself with the demand ``now_s`` scored against the capacity then in force
        (``errors_kept`` of the errors kept, the newest) and ``sized`` filed; the hour's
        peak takes ``peak_demand`` where given (the part of the demand other readings
        confirm: ``confirmed_decode_peak``), the demand otherwise."""
        oldest, newest = now_s - horizon_s - window_s, now_s - horizon_s
        # The sizings still remembered (made at or after ``oldest``), and of those the
        # ones in force now (made by ``newest``): the entries themselves, not copies.
        kept = [entry for entry in self.sized if entry[0] >= oldest]
        in_force = [v for at, v in kept if at <= newest]
        errors = self.errors
        if in_force and max(in_force) > 0:
            # A demand within what was kept fell short of nothing: 0. The headroom is at
            # least the policy's floor (0 or more), so no bound below 0 is ever read,
            # and zeros pack small in the durable state, which keeps 199 a role.
            shortfall = max(0.0, demand / max(in_force) - 1.0)
            errors = (*errors, shortfall)[-errors_kept:]
        if sized is not None:
            kept.append((now_s, sized))
        since_s = now_s - PEAK_MEMORY_S
        peak = demand if peak_demand is None else peak_demand
        peaks = _sliding_max(self.peaks, since_s, now_s, peak)
        # Score the rises past the peak that fell due: the share of the forecast's
        # excess over the peak then that the highest demand since reached.
        rises = []
        rises_true = [r for r in self.rises_true if r[0] >= since_s]
        scored_at = list(self.rises_scored_at)
        for due_s, peak_then, forecast, highest in self.rises:
            highest = max(highest, demand)
            if now_s >= due_s:
                came = round(min(max((highest - peak_then) / (forecast - peak_then), 0.0), 1.0), 3)
                rises_true = _sliding_max(rises_true, since_s, now_s, came)
                scored_at.append(now_s)
            else:
                rises.append((due_s, peak_then, forecast, highest))
        hour_peak = max(p[1] for p in peaks)
        if sized is not None and sized > hour_peak:
            rises.append((now_s + horizon_s, hour_peak, sized, demand))
        return KeptCapacity(
            tuple(kept),
            errors,
            tuple(peaks),
            tuple(rises),
            tuple(rises_true),
            tuple(scored_at[-MIN_KEPT_ERRORS:]),
        )

    def readable(self, now_s: float) -> KeptCapacity:
        """Itself, without the entries it cannot have filed (a damaged memory may hold
        any float: one NaN error made the headroom NaN, a peak of 1e308 its ceiling
        infinite): sizings and peaks at a finite time not after ``now_s`` of a demand
        of 0 or more a memory may hold (``remembered``), errors a memory may hold."""

        def filed(at_s: float, value: float) -> bool:
            return past_time(at_s, now_s) is not None and remembered(value) and value >= 0

        sized = tuple(entry for entry in self.sized if filed(*entry))
        errors = tuple(e for e in self.errors if remembered(e))
        peaks = tuple(entry for entry in self.peaks if filed(*entry))
        # A rise falls due within a horizon of when it was filed (a day either side of
        # now is far beyond any start-up; one already due is scored at the next
        # observation) and its forecast is above its peak (the share's denominator).
        rises = tuple(
            entry
            for entry in self.rises
            if all(map(remembered, entry))
            and abs(entry[0] - now_s) <= DAY_S
            and 0 <= entry[1] < entry[2]
            and entry[3] >= 0
        )
        rises_true = tuple(r for r in self.rises_true if filed(*r) and r[1] <= 1.0)
        scored_at = tuple(at for at in self.rises_scored_at if filed(at, 0.0))
        kept = (sized, errors, peaks, rises, rises_true, scored_at)
        read = (
            self.sized,
            self.errors,
            self.peaks,
            self.rises,
            self.rises_true,
            self.rises_scored_at,
        )
        if tuple(map(len, kept)) == tuple(map(len, read)):
            return self
        return KeptCapacity(*kept)

    @property
    def peak_tps(self) -> float:
        """The highest demand of the last ``PEAK_MEMORY_S`` (0 before any). Read over
        every entry, not just the first: a stored memory need not be ordered."""
        return max((demand for _, demand in self.peaks), default=0.0)

    def rise_trust(self, now_s: float) -> float:
        """How much of a forecast's rise past the hour's peak to size for: the most of
        such a rise that came true within the hour (the attainment goal's bound of them
        wherever an hour holds fewer than the goal needs for a bound inside them, as
        ``prediction_bound`` takes it: 199 at 99.5 %, and an hour of cycles is 120), all
        of it (1) with fewer than ``MIN_KEPT_ERRORS`` of them scored within the hour.

        A rise past anything seen in the hour is a level never reached, and Holt's
        trend, read off a step up, forecasts 1.3-1.9x the new level for a few cycles:
        where the load returns to one level again and again (batch jobs, an on-off
        service) every such forecast fell back to the old peak, and the scale-in window
        kept what it bought (a hostile prober: +24% to +61% over static peak on nine
        recurring shapes). On a day that climbs to new highs (a morning ramp, a first
        burst) they come true, and the trend is trusted whole. Learnt over the hour the
        peak is remembered: the first rise of an on-off load comes true (the peak was
        lower then), and kept longer it would vouch for every later one."""
        scored = self.rises_scored_at
        if len(scored) < MIN_KEPT_ERRORS or min(scored) < now_s - PEAK_MEMORY_S:
            return 1.0
        return max((share for _, share in self.rises_true), default=1.0)

    def headroom(self, quantile: float) -> float | None:
        """The recent errors' bound at ``quantile`` (``prediction_bound``: the next
        error lies within it with that probability, where the errors are exchangeable),
        None with fewer than ``MIN_KEPT_ERRORS`` of them."""
        if len(self.errors) < MIN_KEPT_ERRORS:
            return None
        return prediction_bound(self.errors, quantile)


def forecast_config(
    policy: ServicePolicy, cycle_s: float = CYCLE_S
) -> tuple[ForecastConfig, float, float]:
    """The forecaster's settings for a policy decided every ``cycle_s``
    (``observed_cycle_s``), and each role's horizon: start-up, plus one cycle until the
    decision, plus the metrics window until the load shows. Its errors stand in for the
    headroom's own evidence until that has ``MIN_KEPT_ERRORS``, at the same quantile:
    the attainment goal's (``_sized_demand``)."""
    return _forecast_config(
        policy.prefill.startup_s,
        policy.decode.startup_s,
        policy.slo.attainment_goal,
        policy.scaling.min_headroom,
        cycle_s,
    )


def observed_cycle_s(
    past: Sequence[Recommendation], now_s: float, demand: ForecastState | None = None
) -> float:
    """The cadence this service is decided at, as its decisions show it, in whole
    seconds (a loop's jitter leaves the cached settings alone). The loop's interval is a
    command-line setting (``run --interval``), not the policy's: at 300 s the forecaster,
    spanned and sampled for 30 s cycles, diverged, and the horizon left out four
    minutes of the wait for the next decision.

    The median gap between the remembered recommendations' times and now, the lower of
    two middle ones, so that neither one late cycle nor an outage's gap moves it; with
    one gap only (a scale-in window no longer than the cadence, or the first decision
    after an outage longer than the window), the mean gap over ``demand``'s samples,
    which an outage within a day of cycles moves by a second or two; the one gap where
    that has fewer than two samples (a service's second decision); ``CYCLE_S`` before
    any earlier decision."""
    # A damaged history may hold any float: only gaps between finite times count.
    times = sorted({r.at_s for r in past if math.isfinite(r.at_s) and r.at_s < now_s} | {now_s})
    gaps = sorted(
        gap for gap in (later - earlier for earlier, later in pairwise(times)) if math.isfinite(gap)
    )
    # A count no cadence reaches (one a second for 285 million years) is a damaged
    # memory's: read as a float, an integer of 400 digits raised OverflowError, and the
    # service's every decision failed, its memory kept as it was.
    if len(gaps) < 2 and demand is not None and 2 <= demand.samples <= MAX_COUNTED_SAMPLES:
        span_s = demand.last_at_s - demand.first_at_s
        # Samples after now are a clock stepped back's (``readable`` starts them afresh):
        # their mean gap holds the step (an hour back after a day forward read 513 s).
        if math.isfinite(span_s) and span_s > 0 and demand.last_at_s <= now_s:
            gaps = [span_s / (demand.samples - 1)]
    if not gaps:
        return CYCLE_S
    # Within the loop's own bounds (``run --interval``: 1 s to a day), whatever a damaged
    # memory holds.
    return min(DAY_S, max(1.0, float(round(gaps[(len(gaps) - 1) // 2]))))


@lru_cache(maxsize=1024)
def _forecast_config(
    prefill_startup_s: float,
    decode_startup_s: float,
    quantile: float,
    min_headroom: float,
    cycle_s: float,
) -> tuple[ForecastConfig, float, float]:
    horizons = tuple(
        startup_s + cycle_s + METRICS_WINDOW_S
        for startup_s in (prefill_startup_s, decode_startup_s)
    )
    # The trend's span and the history before a forecast stay in seconds, as at the
    # default cadence: read over ten cycles at 300 s, the trend lagged the Azure day's
    # ramps, 93.0% of its requests within both SLOs where 300 s keeps 98.2%
    # (``simulate --interval 300``, azure-x50's load).
    config = ForecastConfig(
        interval_s=cycle_s,
        level_span_s=max(prefill_startup_s, decode_startup_s, cycle_s),
        horizons_s=tuple(sorted(set(horizons))),
        error_quantile=quantile,
        min_headroom=min_headroom,
        # The forecaster's own errors stand in only until the capacity kept has
        # MIN_KEPT_ERRORS of its own, and both gain one a cycle from the first forecast
        # on: more of them are never read, and an hour's worth was a third of the
        # memory the durable state stores per service.
        error_window_s=MIN_KEPT_ERRORS * cycle_s,
    )
    return config, horizons[0], horizons[1]


def _mix_from(metrics: ServiceMetrics, now_s: float, max_age_s: float) -> RequestMix | None:
    prompt, output = metrics.prompt_tokens, metrics.output_tokens
    if not (_usable(prompt, now_s, max_age_s) and _usable(output, now_s, max_age_s)):
        return None
    assert prompt is not None and output is not None
    return RequestMix.from_cumulative_columns(
        prompt.le, prompt.cumulative, output.le, output.cumulative
    )


def _usable(buckets: LengthBuckets | None, now_s: float, max_age_s: float) -> bool:
    return buckets is not None and buckets.is_usable(now_s, max_age_s)


def _sized_demand(
    now_s: float,
    demand: RoleDemand,
    state: ForecastState,
    config: ForecastConfig,
    kept: KeptCapacity,
    horizon_s: float,
    window_s: float,
    peak_tps: float | None = None,
) -> SizedDemand:
    """The demand to size for (forecast plus headroom, plus the queue's drain), how it
    was found, and the headroom's evidence updated (``KeptCapacity``). The headroom is
    ``config.error_quantile`` (the attainment goal, ``forecast_config``) of the capacity
    kept's shortfalls, or of the forecaster's own errors until those are too few."""
    now_tps = demand.arriving_tps
    predicted = sizing_demand(state, horizon_s, config)
    base = now_tps if predicted is None else predicted
    errors_kept = values_for_bound(config.error_quantile, MAX_KEPT_ERRORS)
    kept = kept.observe(now_s, now_tps, predicted, horizon_s, window_s, errors_kept, peak_tps)
    drain = ""
    if demand.drain_tps > 0:
        drain = f" +{demand.drain_tps:.0f} to drain the queue"
    least = config.min_headroom  # the policy's floor (``scaling.min_headroom``)
    if predicted is None:
        sized = now_tps * (1.0 + least) + demand.drain_tps
        how = f"{now_tps:.0f} now +{least:.0%} (forecast needs more history){drain}"
        return SizedDemand(sized, how, kept, now_tps, 0.0, demand.drain_tps)
    error_room = kept.headroom(config.error_quantile)
    source = "shortfalls of the capacity kept"
    if error_room is None:
        error_room, source = error_bound(state, horizon_s, config)[0], "forecast errors"
    room = least if error_room is None else max(error_room, least)
    sized = base * (1.0 + room)
    how = f"{base:.0f} forecast in {horizon_s:.0f} s ({now_tps:.0f} now) +{room:.0%} headroom ({source})"
    # The headroom is the relative excess of demand over what was kept, so after a
    # burst it multiplies whatever level the demand is at: on a higher base it would
    # hold up to twice a level this service has not reached within the memory the
    # headroom itself comes from. Above that hour's peak (with the floor's spread) the
    # capacity guards only against a level never seen, and the burst days show it buys
    # no attainment there (it held decode at max_instances for half an hour).
    peak = kept.peak_tps
    trust = kept.rise_trust(now_s) if base > peak else 1.0
    top = max(peak, peak + trust * (base - peak))
    ceiling = top * (1.0 + least)
    if sized > ceiling:
        sized = ceiling
        # Say which set it: a forecast above the hour's peak holds the ceiling there.
        if peak >= base:
            how += f", held to the hour's peak {peak:.0f} +{least:.0%}"
        elif trust >= 1.0:
            how += f", held to the forecast +{least:.0%} (above the hour's peak {peak:.0f})"
        else:
            how += (
                f", held to the hour's peak {peak:.0f} and {trust:.0%} of the forecast's rise "
                f"past it (as far as such rises came true) = {top:.0f} +{least:.0%}"
            )
    return SizedDemand(
        sized + demand.drain_tps, how + drain, kept, base, error_room or 0.0, demand.drain_tps
    )


@dataclass(frozen=True)
class SizedDemand:
    """A role's demand to size for, and what it is made of (``_sized_demand``)."""

    tps: float  # forecast plus headroom (within the ceiling), plus the queue's drain
    how: str  # how it was found
    kept: KeptCapacity  # the headroom's evidence, updated
    base_tps: float  # what the headroom was added to: the forecast, or the demand now
    # The headroom's measured bound before the policy's floor (the shortfalls', else
    # the forecaster's errors'), relative to ``base_tps``; 0 where none is known.
    error_room: float
    drain_tps: float  # the queue's drain, added on top

    def with_running_spread(self, spread_tps: float) -> tuple[float, float]:
        """(demand to size for, what was added) with decode's count of sequences
        running held at its spread (``capacity.running_spread_tps``).

        The headroom's measured part is the error of the demand's 60 s average at the
        attainment goal; within the window the count running spreads about that
        average on its own, at the same share. Two independent errors at one quantile
        combine as normal deviations do, in quadrature. The policy's floor is the least
        headroom, itself meant to hold a minute's Poisson spread at one instance's
        scale (``models.DEFAULT_MIN_HEADROOM``), so the headroom holds what it already
        does and only what the quadrature needs beyond it is added: nothing on a large
        pool, where the floor holds the spread, most of the spread on a small one."""
        margin = max(0.0, self.tps - self.drain_tps - self.base_tps)
        error_margin = min(margin, max(0.0, self.error_room) * self.base_tps)
        added = max(0.0, math.hypot(error_margin, spread_tps) - margin)
        return self.tps + added, added


def clear_caches() -> None:
    """Forget every cached ranking, performance context, capacity and mix layout, and
    which memories this planner made: the state after a start (what a benchmark's cold
    call measures)."""
    clear_choice_caches()
    clear_capacity_caches()
    _MEMORIES_MADE.clear()
    _MEMORIES_READ.clear()


# The memories this process's planner made (by id, while they live): read back as they
# are. Any other (a state document's, a test's) is checked by ``readable_memory`` first.
_MEMORIES_MADE: weakref.WeakValueDictionary[int, PlannerMemory] = weakref.WeakValueDictionary()
# And the memories ``readable_memory`` checked and found readable as they are, by (id,
# now, config), while they live: the check is a pure function of those three, and a
# memory read again at the same instant (a cycle retried, the same inputs decided
# twice) need not walk every entry again (a fifth of a decision).
_MEMORIES_READ: weakref.WeakValueDictionary[tuple[int, float, ForecastConfig], PlannerMemory] = (
    weakref.WeakValueDictionary()
)


def readable_memory(
    memory: PlannerMemory, now_s: float, config: ForecastConfig
) -> tuple[PlannerMemory, tuple[str, ...]]:
    """``memory`` as the planner could have left it, and the names of the parts that
    could not be (for the decision to say so): a memory read back from a damaged or
    hand-edited state document may hold any number, and one NaN made every later
    forecast, headroom or capacity NaN, a time that never passes stopped the latency
    correction for good, and a remembered mix without its time or with NaN bounds
    made the decision raise. Forecasters that cannot be one ``update`` left start
    afresh, the capacity kept loses the entries it cannot have filed, a latency
    factor goes back within its bounds, a time that is not a past reading counts as
    none, and so does a mix an engine's usable reading could not give
    (``RequestMix.is_usable``) or one without a past time. A memory this process's
    planner made is read as it is (the checks cost a fifth of a decision)."""
    if _MEMORIES_MADE.get(id(memory)) is memory:
        return memory, ()
    key = (id(memory), now_s, config)
    if _MEMORIES_READ.get(key) is memory:
        return memory, ()
    mix_at_s = past_time(memory.mix_at_s, now_s)
    sound = memory.mix is not None and mix_at_s is not None and memory.mix.is_usable()
    mix = memory.mix if sound else None
    checked = replace(
        memory,
        prefill_demand=readable(memory.prefill_demand, now_s, config),
        decode_demand=readable(memory.decode_demand, now_s, config),
        correction=memory.correction.sanitized(),
        mix=mix,
        mix_at_s=None if mix is None else mix_at_s,
        prefill_kept=memory.prefill_kept.readable(now_s),
        decode_kept=memory.decode_kept.readable(now_s),
        decode_steady_since_s=past_time(memory.decode_steady_since_s, now_s),
        prefill_steady_since_s=past_time(memory.prefill_steady_since_s, now_s),
        prefill_backlog_seen_s=past_time(memory.prefill_backlog_seen_s, now_s),
    )
    # Each check returns the very part it was given when that part is sound.
    damaged = tuple(
        f.name for f in fields(memory) if getattr(checked, f.name) is not getattr(memory, f.name)
    )
    if damaged:
        return checked, damaged
    _MEMORIES_READ[key] = memory
    return memory, ()


def rate_beyond_instances(
    metrics: ServiceMetrics,
    name: str,
    fleet: ServiceFleet,
    past: tuple[Recommendation, ...],
    now_s: float,
    perf: PerfContext | None,
    held: Mapping[Role, tuple[HeldInstances, ...]],
    memory: PlannerMemory,
    policy: ServicePolicy,
) -> str | None:
    """Why a token rate (``prefill_tps`` or ``decode_tps``, a usable sample) cannot
    have been served, or None: more tokens/s than the role's instances could serve at
    any load and mix, at the fastest speed the latency correction admits (the model's
    compute ceiling, ``InstancePerf.prefill_ceiling_tps`` or ``decode_ceiling_tps``,
    over ``LatencyCorrection.MIN_FACTOR``, whose bound says the same: an engine faster
    than that is a broken model or broken metrics), jumping there from a remembered
    demand within it. Such a reading is a broken counter (a unit or query gone wrong,
    a series counted many times over), not demand; believed, it entered the
    forecaster's memory, and a 2-minute x10 spike in both rates held chat at 22
    prefill and 31 decode instances for an hour, twice static peak's GPU-hours (a
    prober).

    Held only while the role's own latency (TTFT for prefill, TBT for decode), where
    read, stays within its SLO, or reads in the histogram bucket that holds the SLO
    (no evidence of a miss, as the tiers take it: svc-b's p90 TBT reads 23.5 ms
    against its 20 ms SLO for any step from 10 to 25 ms, and a gateway's TTFT read
    in vLLM's 1.0-2.5 s bucket around chat's 1.5 s, so every glitch of theirs was
    believed: +71% and +69% GPU-hours, a prober): a load beyond what the instances
    serve shows there, and a rate the model cannot explain while it does is a load the
    model does not know, believed. A mixture-of-experts model, whose tokens take the FLOPs of its
    active parameters only where ``params_b`` counts them all (Mixtral 8x7B: 3.6x
    the ceiling), would otherwise have been held through every rise beyond it.

    Only a jump: with no demand remembered (a first cycle, a lost memory), or one
    remembered beyond the bound too, the rate is believed. Engines the fleet does not
    count may serve it: a service taken over from Deployments heteroscale does not
    manage, whose load its own minimum would otherwise have been held at.

    The instances are every one that may have served over the rate's window: the
    role's instances now (starting ones too: a restarted instance served before it
    went), those draining or in groups being deleted, and at least the largest size
    decided for the role over the window (``_window_extreme``), so that a scale-in
    within it does not make its own rate look impossible. Each counts at the fastest
    ceiling of the types the role runs on (``held``: its instances off ``perf``'s
    type). No model (``perf`` None): nothing to judge by."""
    rate = getattr(metrics, name)
    if perf is None or rate is None or not rate.value > 0:
        return None
    role: Role = "prefill" if name == "prefill_tps" else "decode"
    index = 0 if role == "prefill" else 1
    count = fleet.role(role)
    perfs = [perf.role(role)] + [h.perf.role(role) for h in held.get(role, ()) if h.perf]
    fastest_tps = (
        max(p.prefill_ceiling_tps if role == "prefill" else p.decode_ceiling_tps for p in perfs)
        / LatencyCorrection.MIN_FACTOR
    )
    serving = count.active + count.draining + count.deleting_unreplaced
    if rate.value <= serving * fastest_tps:
        return None  # the common case, before the history is read
    highest, _, _ = _window_extreme(past, now_s, METRICS_WINDOW_S, index, True)
    serving = max(serving, highest or 0)
    limit_tps = serving * fastest_tps
    remembered = memory.prefill_demand if role == "prefill" else memory.decode_demand
    last_tps = remembered.last_value
    if rate.value <= limit_tps or not (math.isfinite(last_tps) and last_tps <= limit_tps):
        return None
    latency_name: LatencySignal = "ttft" if role == "prefill" else "tbt"
    slo_ms = policy.slo.ttft_ms if role == "prefill" else policy.slo.tbt_ms
    latency = getattr(metrics, latency_name)
    if (
        sample_problem(latency, latency_name, now_s, policy.scaling.metric_max_age_s) is None
        and latency.value > slo_ms
        and not reading_in_slo_bucket(latency.value, slo_ms, policy, latency_name)
    ):
        return None  # the role's latency shows a load beyond its instances: believed
    return (
        f"{name} reads {rate.value:.0f} tokens/s, more than {serving} {role} instance(s) "
        f"could serve ({limit_tps:.0f}: the model's compute ceiling at "
        f"{1.0 / LatencyCorrection.MIN_FACTOR:g}x its speed): a broken counter, not demand"
    )


def plan_decide(
    policy: ServicePolicy,
    fleet: ServiceFleet,
    metrics: ServiceMetrics,
    history: PolicyHistory,
    now_s: float,
    perf: PerfContext | None,
    notes: tuple[str, ...] = (),
    held: Mapping[Role, tuple[HeldInstances, ...]] | None = None,
) -> Decision:
    """The planner's decision for one service at ``now_s`` (module docstring);
    ``notes`` lead its message (the GPU-type choice, when cost moved it); ``held``,
    per role whose instances do not all run on ``perf``'s type, the instances per
    type in the ranking's order (``held_instances``)."""
    held = held or {}
    n = policy_numbers(policy)
    current, ready, starting = role_counts(fleet)
    past = _trim_recommendations(history.recommendations, now_s, n.history_horizon_s)
    memory = history.planner if isinstance(history.planner, PlannerMemory) else PlannerMemory()
    config, horizon_prefill_s, horizon_decode_s = forecast_config(
        policy, observed_cycle_s(past, now_s, memory.prefill_demand)
    )
    memory, damaged = readable_memory(memory, now_s, config)
    clamps: list[Clamp] = []
    parts: list[str] = list(notes)
    if damaged:
        parts.append(f"stored planner memory damaged in {', '.join(damaged)}: read as far as sound")
    # Starting instances stuck past their progress deadline stay in the role's size but
    # are not on their way: waited for, one crash-looping Pod kept the latency tiers
    # silent and the correction from learning for as long as it looped.
    stuck = [fleet.prefill.stuck, fleet.decode.stuck]
    starting = [max(0, on - late) for on, late in zip(starting, stuck, strict=True)]
    for role, late in zip(("prefill", "decode"), stuck, strict=True):
        if late:
            parts.append(
                f"{late} {role} instance(s) not ready past their progress deadline: counted "
                "in the size, not waited for"
            )

    # 1. Signals.
    for name in ("prefill_tps", "decode_tps"):
        problem = (
            sample_problem(getattr(metrics, name), name, now_s, n.metric_max_age_s)
            or rate_contradicted(metrics, name, now_s, n.metric_max_age_s)
            or rate_beyond_instances(metrics, name, fleet, past, now_s, perf, held, memory, policy)
        )
        if problem is not None:
            held_size = _hold(n, fleet, history, past, history.kv_usage, now_s, problem)
            return under_latency_tiers(
                held_size,
                n,
                policy,
                fleet,
                metrics,
                history,
                past,
                now_s,
                ready,
                starting,
                perf,
                memory,
            )
    prefill_tps = metrics.prefill_tps.value  # type: ignore[union-attr]
    decode_tps = metrics.decode_tps.value  # type: ignore[union-attr]

    # 2. Mix.
    fresh_mix = _mix_from(metrics, now_s, n.metric_max_age_s)
    mix = fresh_mix if fresh_mix is not None else memory.mix
    if fresh_mix is None and mix is not None:
        parts.append(f"request mix missing: the last known one (t={memory.mix_at_s:.0f} s)")
    if mix is None and policy.request_shape is not None:
        mix = declared_mix(policy.request_shape)
        parts.append(
            f"request mix never read: the declared request_shape ("
            f"{policy.request_shape.prompt_tokens} prompt / "
            f"{policy.request_shape.output_tokens} output tokens)"
        )

    # 1 (continued). Demand: what was served plus what queued up.
    means = (None, None) if mix is None else (mix.prompt_mean_tokens, mix.output_mean_tokens)
    prefill_in = role_demand(
        "prefill",
        prefill_tps,
        metrics.prefill_queue,
        means[0],
        memory.prefill_backlog,
        now_s,
        n.metric_max_age_s,
    )
    # Prefill's running requests finish within a pass: its queue is its work.
    decode_in = role_demand(
        "decode",
        decode_tps,
        metrics.decode_queue,
        means[1],
        memory.decode_backlog,
        now_s,
        n.metric_max_age_s,
        metrics.decode_running,
        None if mix is None else mix.running_output_tokens,
    )
    if mix is not None and mix.prompt_mean_tokens > 0:
        decode_in = decode_follows_prefill(
            decode_in, prefill_in, prefill_tps, mix.output_mean_tokens / mix.prompt_mean_tokens
        )
    parts.extend(d.note for d in (prefill_in, decode_in) if d.note)

    # 5 (first, it only needs demand). Demand at each role's horizon, the history first
    # put in this mix's tokens per request as far as the tokens bear it out.
    prefill_history, decode_history = memory.prefill_demand, memory.decode_demand
    if fresh_mix is not None and memory.mix is not None:
        prefill_history = rescaled(
            prefill_history,
            mix_explained_factor(
                memory.mix.prompt,
                fresh_mix.prompt,
                prefill_history.last_value,
                prefill_in.arriving_tps,
            ),
        )
        decode_history = rescaled(
            decode_history,
            mix_explained_factor(
                memory.mix.output,
                fresh_mix.output,
                decode_history.last_value,
                decode_in.arriving_tps,
            ),
        )
    prefill_state = update(prefill_history, now_s, prefill_in.arriving_tps, config)
    decode_state = update(decode_history, now_s, decode_in.arriving_tps, config)
    # How often the demand may outrun what is kept (module docstring, step 5): the
    # attainment goal's share of cycles, for both roles (``forecast_config``). A TTFT
    # has no slack. A request's TBT tolerates 1 - quantile of slow tokens, but a
    # shortfall lasts until new instances serve (a start-up at least, 120 s), longer
    # than a request decodes (the 0.9 quantile of chat's synthetic outputs, ~420
    # tokens, at 50 ms: 21 s), so it slows most tokens of every request decoding
    # through it. At the SLO quantile decode carried +10% where prefill carried +85%
    # after three bursts and lost the next burst's TBT (bench_matrix's -warm cells at
    # 99% or more: 2 of 16 before, 14 after, fdcf816).
    window_s = n.scale_in_window_s
    prefill_sized = _sized_demand(
        now_s,
        prefill_in,
        prefill_state,
        config,
        memory.prefill_kept,
        horizon_prefill_s,
        window_s,
    )
    decode_sized = _sized_demand(
        now_s,
        decode_in,
        decode_state,
        config,
        memory.decode_kept,
        horizon_decode_s,
        window_s,
        None if fresh_mix is None else confirmed_decode_peak(decode_in, prefill_in, fresh_mix),
    )
    prefill_demand, prefill_how, prefill_kept = (
        prefill_sized.tps,
        prefill_sized.how,
        prefill_sized.kept,
    )
    decode_demand, decode_how, decode_kept = decode_sized.tps, decode_sized.how, decode_sized.kept

    # 3-4. Capacity per instance: derived from the model for the mix, or overridden.
    override_prefill, override_decode = policy_tps_targets(policy)
    caps: RoleCapacities | None = None
    correction = memory.correction.within_ttft_slo(policy.slo.ttft_ms / 1000.0)
    backlog_seen_s = memory.prefill_backlog_seen_s
    busy_readings = memory.prefill_busy_readings
    steady_since_s = (
        steady_since(
            memory.prefill_ready_seen, memory.prefill_steady_since_s, ready[0], starting[0], now_s
        ),
        steady_since(
            memory.decode_ready_seen, memory.decode_steady_since_s, ready[1], starting[1], now_s
        ),
    )
    if perf is not None and mix is not None:
        # The correction learns the model of the type the planner sizes with: the
        # latency of a fleet spread over several types says nothing clean about it.
        one_type = [role not in held for role in ("prefill", "decode")]
        correction, backlog_seen_s, busy_readings = _corrected(
            correction,
            policy,
            perf,
            mix,
            metrics,
            ready,
            starting,
            steady_since_s,
            now_s,
            one_type,
            prefill_in,
            decode_in,
            backlog_seen_s,
            busy_readings,
        )
        caps = capacities_for(policy, perf, mix, current[0], correction)
        parts.extend(
            f"model out of reach: {role} reads at least {LatencyCorrection.MAX_FACTOR:g}x "
            "slower than its model, the most the latency correction takes (a wrong model, "
            "engine settings or metrics): sized at that, its SLO at risk"
            for role in slower_than_corrected(correction, busy_readings)
        )
    memory = PlannerMemory(
        prefill_demand=prefill_state,
        decode_demand=decode_state,
        correction=correction,
        # Observed mixes only, bare: what this cycle computed from it is not kept.
        mix=fresh_mix.bare() if fresh_mix is not None else memory.mix,
        mix_at_s=now_s if fresh_mix is not None else memory.mix_at_s,
        prefill_kept=prefill_kept,
        decode_kept=decode_kept,
        prefill_backlog=prefill_in.backlog,
        decode_backlog=decode_in.backlog,
        decode_ready_seen=ready[1],
        decode_steady_since_s=steady_since_s[1],
        prefill_ready_seen=ready[0],
        prefill_steady_since_s=steady_since_s[0],
        prefill_backlog_seen_s=backlog_seen_s,
        prefill_busy_readings=busy_readings,
    )
    _MEMORIES_MADE[id(memory)] = memory
    if caps is None and (override_prefill is None or override_decode is None):
        why = (
            "no request mix observed yet, no request_shape declared"
            if perf is not None
            else "no GPU type of a role fits"
        )
        return _hold(
            n,
            fleet,
            replace(history, planner=memory),
            past,
            history.kv_usage,
            now_s,
            f"{why} and no target_per_instance to size from",
        )

    wants = [0, 0]
    sized_tps = [prefill_demand, decode_demand]  # what each role's count serves
    unattainable_share = 0.0
    # A role no instance of which meets its SLO for this mix (capacity 0): more
    # instances would not help, so it is held where it runs and never chased.
    role_overrides: tuple[tuple[int, Role, float | None], ...] = (
        (0, "prefill", override_prefill),
        (1, "decode", override_decode),
    )
    unreachable = [
        None if caps is None or override is not None else out_of_reach(policy, caps, role)
        for _, role, override in role_overrides
    ]
    if override_prefill is not None:
        wants[0], text = _count_for_demand(
            "prefill", prefill_how, prefill_demand, prefill_demand, override_prefill, override=True
        )
    else:
        assert caps is not None and perf is not None and mix is not None
        sized_tps[0] = caps.prefill.demand_tps(perf.prefill, mix, prefill_demand)
        wants[0], text = _count_for_demand(
            "prefill",
            prefill_how,
            prefill_demand,
            sized_tps[0],
            caps.prefill_tps_per_instance,
            override=False,
        )
    parts.append(text)
    if override_decode is not None:
        wants[1], text = _count_for_demand(
            "decode", decode_how, decode_demand, decode_demand, override_decode, override=True
        )
    else:
        assert caps is not None
        sized_tps[1], spread = decode_sized.with_running_spread(
            running_spread_tps(caps.decode, decode_sized.base_tps, policy.slo.attainment_goal)
        )
        if spread >= 0.5:
            decode_how += f" +{spread:.0f} for the running count's spread"
        wants[1], text = _count_for_demand(
            "decode",
            decode_how,
            sized_tps[1],
            sized_tps[1],
            caps.decode_tps_per_instance,
            override=False,
        )
    parts.append(text)
    if caps is not None:
        parts.append(caps.explain())
        unattainable_share = caps.prefill.unattainable.share
        if backlog_in_window(backlog_seen_s, metrics.ttft):
            parts.append(
                f"prefill's latency factor kept: the TTFT's window reaches back to a "
                f"backlog beyond the SLO (read at t={backlog_seen_s:.0f} s)"
            )
    # 4b. Instances on another type than the first-ranked count at their own capacity.
    for ri, mixed_role, override in role_overrides:
        if mixed_role in held and override is None and caps is not None and mix is not None:
            wants[ri], text = _count_on_types(
                policy,
                mixed_role,
                held[mixed_role],
                sized_tps[ri],
                caps,
                mix,
                current[0],
                correction,
            )
            parts.append(text)

    for ri, out_role, _ in role_overrides:
        beyond = unreachable[ri]
        if beyond is None:
            continue
        if caps is not None and caps.keeps_up_only(out_role):
            # Sized above to keep up with the work; fewer instances would only queue
            # the prompts longer or make the decode batches larger (its TBT longer), so
            # never below where it runs.
            wants[ri] = max(wants[ri], current[ri])
            parts.append(
                f"{out_role}: SLO out of reach, {beyond}: kept up with the work, at least "
                f"{current[ri]} (where it runs)"
            )
        else:
            wants[ri] = current[ri]
            parts.append(f"{out_role}: SLO out of reach, {beyond}: held at {current[ri]}")

    # 6-7. Latency tiers: a damped safety net; TTFT not chased for unattainable prompts.
    fired = latency_escalation(
        n,
        policy,
        metrics,
        now_s,
        ready,
        starting,
        wants,
        list(wants),
        unreachable,
        unattainable_share,
        backlog_seen_s,
        parts,
    )

    # Sized from a mix not read this cycle (the last known or the declared one): the
    # live mix may be heavier, so no role is taken below what runs. This holds a
    # service with no requests at all too (its histograms stand still, so no mix is
    # read): the planner issue asks for it ("never scale in on a missing mix"), and
    # the fleet it keeps is what serves the traffic's return (a prober's idle hour:
    # scaled in, the sudden return at 20 requests/s kept 95.8% within both SLOs,
    # held 99.998%, at 57.2 against 63.9 GPU-hours).
    held_for_mix = False
    if fresh_mix is None and caps is not None:
        for ri, role in enumerate(("prefill", "decode")):
            if wants[ri] < current[ri]:
                parts.append(f"{role}: no scale-in on a mix not read this cycle")
                wants[ri] = current[ri]
                held_for_mix = True

    # 8. Shape, then say when a bound keeps a role below what the SLO needs.
    recommendation = _shape(n, wants[0], wants[1], clamps)
    for ri, role in enumerate(("prefill", "decode")):
        if recommendation[ri] < wants[ri]:
            limit = next(
                (c for c in reversed(clamps) if c.role in (role, "both") and c.after < c.before),
                None,
            )
            parts.append(
                f"SLO at risk: {role} needs {wants[ri]}, "
                f"{limit.name if limit else 'a bound'} allows {recommendation[ri]}"
            )
    prefill, decode = stabilise(n, recommendation, current, past, history, now_s, clamps)

    within = recommendation == (current[0], current[1])
    reason = _reason(current, prefill, decode, recommendation, within, fired)
    if held_for_mix and (prefill, decode) == (current[0], current[1]):
        # Held where it runs for want of a reading, not sized there: a review and the
        # status count it as a hold (``UNSIZED_REASONS``), as for any missing signal;
        # it read "within_tolerance" while its message said the sizing wanted fewer.
        reason = "metrics_missing"
    # The scale-in window remembers what the demand needs, not the backlog: a queue is
    # sized to drain within DRAIN_S and is gone once it has, so a count asked for it
    # would otherwise be held for the whole window after it drained (burst-chat-0:
    # prefill and decode at max_instances for ten minutes after the burst's backlog).
    for_demand = list(wants)
    for ri, (role_in, sized) in enumerate(
        ((prefill_in, prefill_demand), (decode_in, sized_tps[1]))
    ):
        if fired[ri] is None and 0 < role_in.drain_tps < sized:
            for_demand[ri] = ceil_count(wants[ri] * (1.0 - role_in.drain_tps / sized))
    remembered_now = (
        recommendation if for_demand == wants else _shape(n, for_demand[0], for_demand[1], [])
    )
    this_cycle = Recommendation(now_s, remembered_now[0], remembered_now[1])
    remembered = replace(
        history, recommendations=(*past, this_cycle), dynamic_ratio=None, planner=memory
    )
    return finish(n, current, (prefill, decode), reason, parts, clamps, remembered, now_s)


def out_of_reach(policy: ServicePolicy, caps: RoleCapacities, role: Role) -> str | None:
    """Why no instance of ``role`` meets its SLO for the mix ``caps`` were derived for
    (its capacity per instance is 0, or for prefill only the rate that keeps up with
    the work), None when one does."""
    if caps.tps_per_instance(role) > 0 and not caps.keeps_up_only(role):
        return None
    if role == "prefill":
        if caps.prefill.unattainable.share >= 1.0:
            return f"no prompt of the mix meets the {policy.slo.ttft_ms:g} ms TTFT even on an idle instance"
        return (
            f"the {policy.slo.ttft_ms:g} ms TTFT quantile is out of reach for the mix at any load"
        )
    if caps.decode.limit == "kv_cache":
        return "one sequence of the mix (prompt and output) does not fit an instance's KV cache"
    return f"no batch meets the {policy.slo.tbt_ms:g} ms TBT at the mix's context, not even one sequence"


def _count_for_demand(
    role: Role,
    how: str,
    demand_tps: float,
    sized_tps: float,
    tps_per_instance: float,
    *,
    override: bool,
) -> tuple[int, str]:
    """A role's instance count for ``sized_tps`` (the part of ``demand_tps`` it can
    serve) at ``tps_per_instance`` each, and the line saying how it was reached."""
    tokens = "prompt" if role == "prefill" else "output"
    if tps_per_instance <= 0:  # no instance meets the SLO: the caller holds the role
        return 0, f"{role} {how} = {demand_tps:.0f} {tokens} tokens/s, none within the SLO"
    count = ceil_count(sized_tps / tps_per_instance)
    per_instance = (
        f"{tps_per_instance:g} per instance (override)"
        if override
        else f"{tps_per_instance:.0f} per instance"
    )
    return count, f"{role} {how} = {demand_tps:.0f} {tokens} tokens/s / {per_instance} -> {count}"


@dataclass(frozen=True)
class HeldInstances:
    """A role's placed instances on one GPU type, and that type's model (None: the
    type no longer fits or is no longer allowed, so it counts as no capacity)."""

    gpu_type: str
    instances: int
    perf: PerfContext | None


def held_instances(
    policy: ServicePolicy, cluster: ClusterSpec, fleet: ServiceFleet, perf: PerfContext
) -> dict[Role, tuple[HeldInstances, ...]]:
    """Per role whose placed instances are not all on the type ``perf`` sizes with:
    its instances per type, in the order placement keeps them (the ranking, first
    kept longest; types outside it last). Roles all on that type are left out."""
    out: dict[Role, tuple[HeldInstances, ...]] = {}
    for role in ("prefill", "decode"):
        by_type = dict(fleet.role(role).by_type)
        first = perf.role(role).gpu_type
        if not by_type or set(by_type) == {first}:
            continue
        order = ranked_gpu_types(policy, cluster, role)
        keep = [t for t in order if t in by_type] + sorted(t for t in by_type if t not in order)
        out[role] = tuple(
            HeldInstances(t, by_type[t], perf_variant(policy, cluster, role, t)) for t in keep
        )
    return out


def count_on_types(needed_tps: float, first_tps: float, held: list[tuple[int, float]]) -> int:
    """The fewest instances whose capacity covers ``needed_tps`` when placement keeps
    the ``held`` ones ((instances, tokens/s each), in the order it keeps them) and adds
    new ones at ``first_tps`` each: a fleet on a weaker type is never cut to the count
    the first type would need, and one on a stronger type is not grown for nothing."""
    capacity = 0.0
    count = 0
    for instances, tps_each in held:
        if capacity >= needed_tps or tps_each <= 0:
            break
        take = min(instances, ceil_count((needed_tps - capacity) / tps_each))
        capacity += take * tps_each
        count += take
        if take < instances:
            return count
    if capacity >= needed_tps or first_tps <= 0:
        return count
    return count + ceil_count((needed_tps - capacity) / first_tps)


def _count_on_types(
    policy: ServicePolicy,
    role: Role,
    held: tuple[HeldInstances, ...],
    needed_tps: float,
    caps: RoleCapacities,
    mix: RequestMix,
    prefill_hint: int,
    correction: LatencyCorrection,
) -> tuple[int, str]:
    """``count_on_types`` for ``role`` with each held type's capacity from the model,
    and the line saying so."""

    def tps_of(context: PerfContext | None) -> float:
        if context is None:
            return 0.0
        return capacities_for(policy, context, mix, prefill_hint, correction).tps_per_instance(role)

    first_tps = caps.tps_per_instance(role)
    sized = [(h.instances, tps_of(h.perf)) for h in held]
    count = count_on_types(needed_tps, first_tps, sized)
    on = ", ".join(
        f"{h.instances} on {h.gpu_type} at {tps:.0f}"
        for h, (_, tps) in zip(held, sized, strict=True)
    )
    tokens = "prompt" if role == "prefill" else "output"
    return count, (
        f"{role} runs on several GPU types ({on} {tokens} tokens/s each, kept in that "
        f"order; new instances on the first-ranked): {needed_tps:.0f} {tokens} tokens/s "
        f"-> {count}"
    )


def backlog_in_window(backlog_seen_s: float | None, ttft: Sample | None) -> bool:
    """Whether the TTFT quantile's metrics window reaches back to the last prefill
    backlog (``_corrected``): its readings are then that backlog's wait."""
    if backlog_seen_s is None or ttft is None:
        return False
    return ttft.at_s - backlog_seen_s <= METRICS_WINDOW_S


def past_time(at_s: float | None, now_s: float) -> float | None:
    """A time the memory holds, or None where it cannot be one of this planner's past
    readings (NaN, infinite, after ``now_s``): a memory read back from a damaged state
    document may carry any float, and a "since" or "last seen" time that never passes
    would keep the latency correction from learning for good."""
    if at_s is None or not (math.isfinite(at_s) and at_s <= now_s):
        return None
    return at_s


def steady_since(
    ready_seen: int | None, since_s: float | None, ready: int, starting: int, now_s: float
) -> float:
    """Since when a role has had ``ready`` instances and none starting: ``since_s`` if
    the last cycle saw the same, else now (a change between two cycles is dated at the
    later one, so a window that starts after it holds none of it)."""
    if starting > 0 or ready != ready_seen or since_s is None:
        return now_s
    return since_s


def decode_settled(
    policy: ServicePolicy, mix: RequestMix, steady_since_s: float, now_s: float
) -> bool:
    """Whether decode's latency can say how fast its instances are.

    Decode sequences stay on the instance that admitted them: after decode's size
    changes, the instances that were there keep the batches they had (after a surge,
    overloaded ones) while the new ones fill from new work, so the TBT quantile reads
    the busiest instances at a mean load that says little about them. That lasts until
    the sequences admitted before the change have finished (the SLO quantile's output
    length at the SLO's step time) and one metrics window has passed without them."""
    finish_s = mix.output.quantile(policy.slo.quantile) * policy.slo.tbt_ms / 1000.0
    return now_s - steady_since_s >= METRICS_WINDOW_S + finish_s


def _corrected(
    correction: LatencyCorrection,
    policy: ServicePolicy,
    perf: PerfContext,
    mix: RequestMix,
    metrics: ServiceMetrics,
    ready: list[int],
    starting: list[int],
    steady_since_s: tuple[float, float],
    now_s: float,
    one_type: list[bool],
    prefill_demand: RoleDemand,
    decode_demand: RoleDemand,
    backlog_seen_s: float | None,
    busy_readings: tuple[KeptBusyReading, ...],
) -> tuple[LatencyCorrection, float | None, tuple[KeptBusyReading, ...]]:
    """The correction updated from this cycle's latency, in steady state only (module
    docstring, step 3): no instance of the role starting, all of them on the type the
    model is of (``one_type``, per role), and load at or below the capacity the model
    (as corrected so far) gives it; and the time of the last prefill backlog.

    Prefill's load is what it is asked for (arriving plus its queue's drain), not what
    it served, which an overloaded prefill holds at its capacity. And no prefill queue
    reading within the TTFT's metrics window may have held more work than the ready
    instances prefill within the TTFT SLO (``backlog_seen_s``): no load within capacity
    leaves such a backlog in the model's steady state, and the TTFTs read over it are
    its wait, not the instances' speed. Draining a burst's backlog taught the planner a
    1.35x slower prefill, kept for the next two hours (burst-summarize-3-warm).

    Decode's load is steady only where its demand is what it served (``decode_demand``:
    no growth of its work beyond the flicker, nothing held back at prefill): a window
    that ends in a surge averages a rate within capacity while its TBT, weighted by
    tokens, reads the surge's overloaded steps, and taught a 1.29x slower decode after
    a return from near-idle (a hostile prober).

    Prefill's busy fraction needs none of that: it is the work the instances served
    over their compute, at any load, backlog or not; only the window it is read over
    must hold one prefill count throughout (``steady_since_s``), or the tokens/s per
    ready instance would be over the wrong count.

    Prefill's TTFT beyond the model's prediction teaches the offset (time spent outside
    the instances) beside the busy reading, and alone while its bucket meets the SLO;
    alone and likely above the SLO, a slower factor (``_ttft_alone_factor``)."""
    slo = policy.slo
    caps = capacities_for(policy, perf, mix, max(1, ready[0]), correction)
    max_age_s = policy.scaling.metric_max_age_s
    tbt = _latency_reading(metrics.tbt, "tbt", now_s, max_age_s)
    ttft = _latency_reading(metrics.ttft, "ttft", now_s, max_age_s)
    tbt_mean = _latency_reading(metrics.tbt_mean, "tbt_mean", now_s, max_age_s)
    decode_tps = metrics.decode_tps.value if metrics.decode_tps else math.nan
    if (
        (tbt is not None or tbt_mean is not None)
        and one_type[1]
        and ready[1] > 0
        and starting[1] == 0
        and decode_settled(policy, mix, steady_since_s[1], now_s)
        and abs(decode_demand.arriving_tps - decode_tps) <= FLICKER_SHARE * decode_tps
    ):
        per_instance = decode_tps / ready[1]
        if 0 < per_instance <= caps.decode_tps_per_instance:
            decode_tps_now = per_instance
            # The mean gap (the histogram's sum over its count) is exact; the quantile
            # is known only to its bucket (``factor_evidence`` weighs the two).
            from_mean = None
            if tbt_mean is not None:
                from_mean = implied_decode_factor(
                    perf.decode, mix, tbt_mean.value / 1000.0, decode_tps_now
                )
            from_quantile = None
            if tbt is not None:
                from_quantile = within_bucket(
                    lambda s: implied_decode_factor(perf.decode, mix, s, decode_tps_now),
                    tbt.value / 1000.0,
                    policy_latency_buckets(policy, "tbt"),
                    correction.decode,
                )
            correction = correction.updated(
                "decode", factor_evidence(from_mean, from_quantile, correction.decode)
            )
    backlog = prefill_demand.backlog
    if backlog is not None and backlog.tokens > 0:
        prefilled_in_slo = max(1, ready[0]) * caps.prefill_tps_per_instance * slo.ttft_ms / 1000.0
        if backlog.tokens > prefilled_in_slo:
            backlog_seen_s = backlog.at_s
    busy_implied = busy_floor = None
    gpu_util = metrics.prefill_gpu_util
    if (
        one_type[0]
        and ready[0] > 0
        and now_s - steady_since_s[0] >= METRICS_WINDOW_S
        and metrics.prefill_tps is not None
        and gpu_util is not None
        and sample_problem(gpu_util, "prefill_gpu_util", now_s, policy.scaling.metric_max_age_s)
        is None
    ):
        reading = read_prefill_busy(
            perf.prefill,
            mix,
            metrics.prefill_tps.value,
            ready[0],
            gpu_util.value,
            backlogged=_queued_through_window(prefill_demand.backlog),
        )
        if reading is not None:
            busy_readings = kept_busy_readings(
                busy_readings, reading, now_s, METRICS_WINDOW_S, BUSY_MEMORY_S
            )
            # One reading precise enough (or saturated) teaches alone, as it always
            # has; otherwise the recent ones together may.
            busy_implied = reading.taught
            if busy_implied is None:
                together = combined_busy_reading(busy_readings) or reading
                busy_implied = together.taught
                busy_floor = together.floor if busy_implied is None else None
    if busy_implied is not None:
        correction = correction.updated("prefill", busy_implied)
    # What the TTFT reading is judged by: the instances' own capacity, the offset left
    # out. The offset makes requests unattainable and shrinks the capacity at the SLO;
    # a large one (learnt from a spike, or kept when the SLO was lowered) counted the
    # tail unattainable and the load an overload, closing the very reading that would
    # unlearn it.
    own = caps
    if caps.correction.prefill_ttft_offset_s > 0:
        own = capacities_for(
            policy, perf, mix, max(1, ready[0]), replace(caps.correction, prefill_ttft_offset_s=0.0)
        )
    attainable_tail = own.prefill.unattainable.share < (1.0 - slo.quantile) / 2.0
    if (
        ttft is not None
        and not backlog_in_window(backlog_seen_s, ttft)
        and one_type[0]
        and ready[0] > 0
        and starting[0] == 0
        and attainable_tail
    ):
        per_instance = (prefill_demand.arriving_tps + prefill_demand.drain_tps) / ready[0]
        if 0 < per_instance <= own.prefill_tps_per_instance:
            transfer = transfer_s_per_token(perf.prefill.kv_bytes_per_token, perf.link_gbps)
            first_step_s = caps.decode.step_s if caps.decode.step_s > 0 else slo.tbt_ms / 1000.0
            # The observed load as the capacity sees it (the offset learnt so far added),
            # as both the inversion and the bucket test read it.
            load = PrefillLoad(
                perf.prefill,
                mix,
                slo.quantile,
                per_instance,
                ready[0],
                transfer,
                first_step_s + correction.prefill_ttft_offset_s,
            )
            observed_s = ttft.value / 1000.0
            buckets = policy_latency_buckets(policy, "ttft")
            # A bucket that straddles the SLO (vLLM's (1.0, 2.5] s around a 1.5 s SLO)
            # goes by the reading within it: taken as possibly above the SLO, a steady
            # 1.1 s p90 of which 0.3 s was a gateway ratcheted the factor to its 2x bound.
            within_slo = reading_likely_meets_slo(ttft.value, slo.ttft_ms, buckets)
            if busy_implied is None:
                factor = _ttft_alone_factor(load, correction, observed_s, buckets)
                if within_slo and factor is not None:
                    factor = min(factor, correction.prefill)
                if factor is not None and busy_floor is not None:
                    # Never below what a coarse busy reading allows, nor raised by it.
                    factor = max(factor, min(busy_floor, correction.prefill))
                correction = correction.updated("prefill", factor)
            if busy_implied is not None or within_slo:
                # The busy fraction has pinned the instances' speed, or the SLO is met:
                # a TTFT beyond what the model predicts is then taken as spent outside
                # the instances (a gateway, the network), added whatever the load. Read
                # as a slower factor instead, it never went away with more instances and
                # ratcheted prefill to twice the count it needed.
                correction = correction.with_ttft_offset(
                    implied_ttft_offset_s(load, correction, observed_s, buckets),
                    limit_s=slo.ttft_ms / 1000.0,
                )
    return correction, backlog_seen_s, busy_readings


def slower_than_corrected(
    correction: LatencyCorrection, busy_readings: tuple[KeptBusyReading, ...]
) -> tuple[Role, ...]:
    """The roles to report as slower than the latency correction takes
    (``LatencyCorrection.at_slowest``). Decode's factor comes from its mean
    inter-token gap, a reading of the instances' own step. Prefill's may come from a
    TTFT that time outside the instances (a gateway) inflates until the offset is
    learnt: behind 1.0 s of gateway, chat's prefill factor sat at the bound for half
    an hour at 99.6% within both SLOs (a prober). So prefill is reported only where
    its busy fraction, the instances' own speed, says as much (its readings' floor at
    the bound too), or where no busy fraction is read at all (then the factor is all
    there is: a prefill at 0.3x the model with no utilisation gauge kept 8.6% of
    requests and said nothing, a prober)."""
    roles = correction.at_slowest()
    if "prefill" not in roles or not busy_readings:
        return roles  # no busy fraction to tell the gateway apart: the factor says it
    reading = combined_busy_reading(busy_readings)
    if (
        reading is not None
        and reading.floor >= LatencyCorrection.AT_BOUND * LatencyCorrection.MAX_FACTOR
    ):
        return roles
    return tuple(role for role in roles if role != "prefill")


def reading_in_slo_bucket(
    value_ms: float, slo_ms: float, policy: ServicePolicy, metric: LatencySignal
) -> bool:
    """Whether a latency reading lies in the histogram bucket that holds its SLO
    (``reading_holds_slo``, through the buckets the policy's engine exports): no
    evidence either way of a miss (the tiers' judgement and the glitch guard's)."""
    bounds = policy_latency_buckets(policy, metric)
    return bounds is not None and reading_holds_slo(value_ms, slo_ms, bounds)


def under_latency_tiers(
    held: Decision,
    n: PolicyNumbers,
    policy: ServicePolicy,
    fleet: ServiceFleet,
    metrics: ServiceMetrics,
    history: PolicyHistory,
    past: tuple[Recommendation, ...],
    now_s: float,
    ready: list[int],
    starting: list[int],
    perf: PerfContext | None,
    memory: PlannerMemory,
) -> Decision:
    """A hold on a token rate that cannot be read (``held``), under the latency
    tiers' safety net (``latency_escalation``, damped as ever): the rate says nothing
    about the latency that can be read, and a tier firing on it raises its role, never
    lowers one. Held blind, chat kept 88.7% of requests within both SLOs through a
    30-minute gap in decode_tps on the rise of its day; with the tiers, 98.0% (a
    prober).

    Bounded as the sizing's own tiers are: at twice what the model sizes for the last
    demand remembered (``remembered_counts``), not twice what runs. Twice what runs
    moves up with every rise, and a TTFT that more instances could not bring down (a
    gateway's, engines slower than their model) raised svc-b to its max_instances
    (256 prefill and decode, 13.7x the GPU-hours) in a 3-hour outage of prefill_tps
    (a prober). The rise goes through the stabilisation and the max step as every
    decision's does. Nothing remembered to size from (no mix, no model, no demand read
    yet): the hold stands."""
    remembered = remembered_counts(policy, perf, memory, max(1, held.prefill))
    if remembered is None:
        return held
    sized, caps = remembered
    before = [fleet.prefill.hold_size, fleet.decode.hold_size]
    wants = [held.prefill, held.decode]
    unreachable = [out_of_reach(policy, caps, role) for role in ("prefill", "decode")]
    parts: list[str] = []
    fired = latency_escalation(
        n,
        policy,
        metrics,
        now_s,
        ready,
        starting,
        wants,
        sized,
        unreachable,
        caps.prefill.unattainable.share,
        memory.prefill_backlog_seen_s,
        parts,
    )
    if fired == [None, None]:
        return held
    clamps: list[Clamp] = []
    recommendation = _shape(n, wants[0], wants[1], clamps)
    prefill, decode = stabilise(n, recommendation, before, past, history, now_s, clamps)
    # Never below the hold: a held size outside the ratio bounds (a hold keeps what
    # runs) is shaped down on one role to follow the other.
    prefill, decode = max(prefill, held.prefill), max(decode, held.decode)
    if (prefill, decode) == (held.prefill, held.decode):
        return held  # a bound or the stabilisation took the tiers' rise back
    message = f"{held.message}; under the latency tiers: {'; '.join(parts)}{clamps_note(clamps)}"
    raised = Recommendation(now_s, prefill, decode)
    remembered_history = replace(
        held.history, recommendations=(*held.history.recommendations[:-1], raised)
    )
    return decided(
        n.service,
        (prefill, decode),
        before,
        "latency_feedback",
        message,
        (*held.clamps, *clamps),
        remembered_history,
        now_s,
    )


def remembered_counts(
    policy: ServicePolicy, perf: PerfContext | None, memory: PlannerMemory, prefill_pool: int
) -> tuple[list[int], RoleCapacities] | None:
    """Per role, the count the model sizes for the last demand the planner remembers
    (its forecasters' last values, at the last known mix and the remembered
    correction), with the capacities it used; None where there is nothing to size
    from. A role no instance of which meets its SLO counts as 0 (``out_of_reach``
    tells it)."""
    if perf is None or memory.mix is None:
        return None
    last = (memory.prefill_demand.last_value, memory.decode_demand.last_value)
    if not all(math.isfinite(tps) and tps >= 0 for tps in last):
        return None
    caps = capacities_for(policy, perf, memory.mix, prefill_pool, memory.correction)
    prefill_tps = caps.prefill.demand_tps(perf.prefill, memory.mix, last[0])
    counts = [
        ceil_count(tps / per_instance) if per_instance > 0 else 0
        for tps, per_instance in (
            (prefill_tps, caps.prefill_tps_per_instance),
            (last[1], caps.decode_tps_per_instance),
        )
    ]
    return counts, caps


def latency_escalation(
    n: PolicyNumbers,
    policy: ServicePolicy,
    metrics: ServiceMetrics,
    now_s: float,
    ready: list[int],
    starting: list[int],
    wants: list[int],
    sized: Sequence[int],
    unreachable: Sequence[str | None],
    unattainable_share: float,
    backlog_seen_s: float | None,
    parts: list[str],
) -> list[str | None]:
    """Step 7, the latency tiers: a damped safety net over ``wants`` (each role's
    count so far, raised in place where a tier fires), TTFT not chased for
    unattainable prompts, nor beyond twice ``sized`` (what the model sizes for the
    demand); what each says goes to ``parts``. Returns, per role, "latency" where a
    tier raised it, else None.

    The net covers a model error as large as the latency correction would take
    (``LatencyCorrection.MAX_FACTOR``: instances that much slower need that many times
    the instances), not more: latency the sizing's count times that does not bring
    down is not the instance count's (a step-time floor of engines slower than their
    model), and chasing it grew decode from 25 to 88 instances in half an hour with
    its TBT unchanged (svc-b, engines at 0.77x the model, ``simulate --engine-speed``).
    """
    reach = [math.ceil(LatencyCorrection.MAX_FACTOR * count) for count in sized]
    fired: list[str | None] = [None, None]
    tail = 1.0 - policy.slo.quantile
    for rule in n.latency_rules:
        sample = getattr(metrics, rule.metric)
        if sample_problem(sample, rule.metric, now_s, n.metric_max_age_s) is not None:
            continue
        of_slo = sample.value / rule.slo_ms
        tier = next((t for t in rule.tiers if of_slo > t[0]), None)
        if tier is None:
            continue
        ri = rule.role_index
        if unreachable[ri] is not None:
            parts.append(
                f"{rule.metric} {sample.value:.0f} ms above SLO: {rule.role} out of reach, not chased"
            )
            continue
        if rule.metric == "ttft" and unattainable_share >= tail:
            parts.append(
                f"ttft {sample.value:.0f} ms above SLO, but {unattainable_share:.1%} of "
                f"requests cannot meet it on any instance (> the {tail:.0%} tail): not chased"
            )
            continue
        if rule.metric == "ttft" and backlog_in_window(backlog_seen_s, sample):
            # The TTFT reads the wait of a backlog the queue's growth and drain already
            # size for; escalating on it held prefill at max_instances for ten minutes
            # after a burst's backlog had drained (burst-chat-0). A model error that
            # keeps a backlog growing shows in the queue's growth, read every cycle.
            parts.append(
                f"ttft {sample.value:.0f} ms above SLO: its window reaches back to a "
                "backlog beyond the SLO, sized by the queue: not chased"
            )
            continue
        if starting[ri] > 0:
            parts.append(
                f"{rule.metric} {sample.value:.0f} ms = {of_slo:.2f} x SLO: "
                f"{starting[ri]} {rule.role} instances still starting, no escalation"
            )
            continue
        if reading_in_slo_bucket(sample.value, rule.slo_ms, policy, rule.metric):
            # Read through a histogram, the quantile is only known to lie in its bucket:
            # one that holds the SLO reads the same for a tail met as for one missed
            # (vLLM's p90 TBT reads 23.5 ms for any step from 10 to 25 ms against
            # svc-b's 20 ms), so it is no evidence of a model error, and the sizing's
            # model, corrected where a reading falls outside its prediction's bucket,
            # stands. Escalating on it took svc-b's decode to 512 (its max_instances)
            # through a burst for which the model sized 270-400 (burst-svc-b-1), where
            # static peak's 308 keep 99% of requests within both SLOs.
            bounds = policy_latency_buckets(policy, rule.metric)
            assert bounds is not None  # reading_in_slo_bucket read through them
            lower_s, upper_s = bucket_around(sample.value / 1000.0, bounds)
            parts.append(
                f"{rule.metric} {sample.value:.0f} ms = {of_slo:.2f} x SLO, read in the "
                f"bucket {lower_s * 1000:g}-{upper_s * 1000:g} ms that holds the SLO: "
                "no evidence of a miss, no escalation"
            )
            continue
        asked = _feedback_target(ready[ri], tier[1])
        text = (
            f"{rule.metric} {sample.value:.0f} ms = {of_slo:.2f} x SLO > {tier[0]:g}: "
            f"{rule.role} +{tier[1]:g}% of {ready[ri]} ready -> {asked}"
        )
        if asked > max(wants[ri], reach[ri]):
            asked = max(wants[ri], reach[ri])
            text += (
                f", held to {asked} ({LatencyCorrection.MAX_FACTOR:g}x what the model sizes: "
                "more is no model error the latency correction would take)"
            )
        if asked > wants[ri]:
            wants[ri] = asked
            fired[ri] = "latency"
        parts.append(text)
    return fired


def _queued_through_window(backlog: Backlog | None) -> bool:
    """Whether the queue held work at the latest reading and at the one nearest the
    metrics window's start (``role_demand`` keeps them)."""
    if backlog is None or backlog.tokens <= 0:
        return False
    earlier = [r for r in backlog.earlier if r[0] <= backlog.at_s]
    if not earlier:
        return False
    at_s, tokens = window_start_reading(earlier, backlog.at_s)
    return tokens > 0 and backlog.at_s - at_s >= METRICS_WINDOW_S / 2


def _latency_reading(
    sample: Sample | None, name: str, now_s: float, max_age_s: float
) -> Sample | None:
    """``sample`` where the correction may learn from it: usable (``sample_problem``)
    and above 0 (no request takes no time). Otherwise it says nothing of the instances:
    a NaN TTFT fell into the first bucket and halved the offset every cycle, and an
    hour-old spike pinned it."""
    if sample is None or sample_problem(sample, name, now_s, max_age_s) is not None:
        return None
    return sample if sample.value > 0 else None


def _ttft_alone_factor(
    load: PrefillLoad,
    correction: LatencyCorrection,
    observed_s: float,
    buckets: tuple[float, ...] | None,
) -> float | None:
    """The prefill factor the TTFT quantile implies where no busy fraction is read.

    The TTFT tail reads the prompt-length tail, which engines bucket coarsely (1-2-5):
    spread evenly within a wide bucket the model's tail sits too long, so observed TTFT
    below the prediction says as much about the buckets as about the instance. Alone,
    it never raises prefill capacity above the model's, nor lowers a faster factor the
    busy fraction taught (a factor below 1 comes only from that fine reading): the busy
    reading pauses for a metrics window after every count change, and the TTFT tail
    pulling the factor towards 1 meanwhile cost a fifth of prefill's capacity on 1.3x
    engines until it resumed (and for the whole of any scale-out, which freezes the
    correction)."""
    at_or_below = min(1.0, correction.prefill)
    implied = within_bucket(
        lambda s: implied_prefill_factor(load, s, at_or_below),
        observed_s,
        buckets,
        correction.prefill,
        side_at=lambda factor, lower_s, upper_s: predicted_ttft_side(
            load, factor, lower_s, upper_s
        ),
    )
    return None if implied is None else max(at_or_below, implied)


def implied_ttft_offset_s(
    load: PrefillLoad,
    correction: LatencyCorrection,
    observed_s: float,
    buckets: tuple[float, ...] | None,
) -> float | None:
    """The TTFT spent outside the instances that an observed TTFT quantile supports,
    the instances' speed taken as ``correction.prefill`` (``load`` already holds
    ``correction.prefill_ttft_offset_s``). A quantile of a latency plus a constant is
    the quantile plus that constant, so the offset is the observed quantile less the
    model's prediction without one; read through a histogram the quantile is known
    only to its bucket, and ``within_bucket`` keeps the current offset where its
    prediction lies in it and otherwise moves to the nearest offset whose does.
    Negative (the model predicts more than is seen): 0, the factor's business. None
    where the model saturates at this load."""
    current_s = correction.prefill_ttft_offset_s
    without_offset_step_s = load.decode_first_step_s - current_s

    def at_offset(offset_s: float) -> PrefillLoad:
        return replace(load, decode_first_step_s=without_offset_step_s + offset_s)

    predicted_without: list[float] = []  # computed once, only when needed

    def implied_at(quantile_s: float) -> float | None:
        if not predicted_without:
            predicted_without.append(predicted_ttft_s(at_offset(0.0), correction.prefill))
        if not math.isfinite(predicted_without[0]):
            return None
        return max(0.0, quantile_s - predicted_without[0])

    return within_bucket(
        implied_at,
        observed_s,
        buckets,
        current_s,
        side_at=lambda offset_s, lower_s, upper_s: predicted_ttft_side(
            at_offset(offset_s), correction.prefill, lower_s, upper_s
        ),
    )


def factor_evidence(fine: float | None, coarse: float | None, current: float) -> float | None:
    """The factor one cycle's readings of decode imply, from a fine one (exact, either
    way: the mean inter-token gap) and a coarse one (the
    latency quantile, known only to its bucket: ``within_bucket``'s factor, which is
    ``current`` where the model's prediction lies in the observed bucket), either None
    when unread.

    The fine reading is taken as it is. The coarse one only where it says slower than
    ``current``, and then the slower of the two wins: the SLO is on the quantile, and a
    model that predicts it below the bucket it was read in is missing something the
    fine reading cannot see (a spread of batches or loads over instances and seconds,
    a slower KV transfer, queueing beyond the model's)."""
    if fine is None:
        return coarse
    if coarse is not None and coarse > current:
        return max(fine, coarse)
    return fine


def within_bucket(
    implied_at: Callable[[float], float | None],
    observed_s: float,
    bounds: tuple[float, ...] | None,
    current: float,
    predicted_at: Callable[[float], float] | None = None,
    side_at: Callable[[float, float, float], int] | None = None,
    slower_only: bool = False,
) -> float | None:
    """The correction factor an observed latency quantile supports.

    Read through ``histogram_quantile``, a quantile is only known to lie in its bucket
    (``reconciler.latency_buckets``): vLLM's p90 inter-token latency reads 47.5 ms for
    any step between 25 and 50 ms. Every factor whose prediction falls in that bucket
    agrees with the reading, so the current factor is kept when it is among them and
    otherwise moved to the nearest that is (``implied_at`` gives the factor at which
    the model predicts a latency; larger latencies need larger factors). A model off
    by less than a bucket cannot be told from the histogram. With unknown bounds (an
    override, an engine not listed) the reading is taken as exact. ``predicted_at``
    (the model's latency at a factor), when given, spares the inversions: the current
    factor's prediction tells which edge of the bucket, if any, it is outside.
    ``side_at(factor, lower_s, upper_s)`` does the same without the prediction itself:
    -1, 0 or 1 as it lies at or below, in or above the bucket (``capacity.bucket_side``).
    ``slower_only`` (with ``side_at`` or ``predicted_at``): the caller uses no factor
    below ``current``, so a prediction above the bucket returns ``current`` without an
    inversion whose result nothing would use."""
    if bounds is None:
        return implied_at(observed_s)
    lower_s, upper_s = bucket_around(observed_s, bounds)
    if side_at is None and predicted_at is not None:
        predicted = predicted_at

        def side_at(factor: float, lower_s: float, upper_s: float) -> int:
            return bucket_side(predicted(factor), lower_s, upper_s)

    if side_at is not None:
        side = side_at(current, lower_s, upper_s)
        if side == 0:
            return current
        if side < 0:
            return implied_at(lower_s) if lower_s > 0 else current
        if slower_only:
            return current
        return implied_at(upper_s) if math.isfinite(upper_s) else current
    low = implied_at(lower_s) if lower_s > 0 else LatencyCorrection.MIN_FACTOR
    high = implied_at(upper_s) if math.isfinite(upper_s) else LatencyCorrection.MAX_FACTOR
    if low is None or high is None:
        return None
    return min(max(current, low), high)


class PlannerAutoscaler:
    """``heteroscale``, the default: ``plan_decide`` with the service's performance
    model taken from its cluster. The paper's coordinated policy, which needs hand-set
    targets, stays available as ``heteroscale-paper`` for comparison."""

    name = "heteroscale"

    def decide(self, inputs: DecisionInput) -> Decision:
        """Sized from the cluster's performance model; without a cluster, only from
        the policy's own targets (else it holds)."""
        policy, cluster, fleet = inputs.policy, inputs.cluster, inputs.fleet
        perf = perf_context(policy, cluster) if cluster is not None else None
        if cluster is None or perf is None:
            return plan_decide(policy, fleet, inputs.metrics, inputs.history, inputs.now_s, perf)
        notes = tuple(c.reason for c in choose_gpu_types(policy, cluster) if c.by_cost)
        held = held_instances(policy, cluster, fleet, perf)
        return plan_decide(
            policy, fleet, inputs.metrics, inputs.history, inputs.now_s, perf, notes, held
        )

    def decide_many(self, batch: Sequence[DecisionInput]) -> list[Decision]:
        """``decide`` for each of many services at once (a cycle's cluster), in order:
        the same decisions, with the cyclic garbage collector paused for the batch
        (``base.gc_paused``)."""
        with gc_paused():
            return [self.decide(inputs) for inputs in batch]


__all__ = [
    "HeldInstances",
    "PerfContext",
    "PlannerAutoscaler",
    "PlannerMemory",
    "capacities_for",
    "clear_caches",
    "count_on_types",
    "declared_mix",
    "fitting_perfs",
    "forecast_config",
    "held_instances",
    "perf_context",
    "plan_decide",
]

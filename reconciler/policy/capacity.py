"""Per-instance capacity of prefill and decode, derived from the performance model for
the live request mix (DESIGN.md, "Capacity from the model", "Unattainable requests").

Pure functions over plain data: they read ``reconciler.perfmodel`` (the calibrated
instance model the simulator also uses) and never the simulator itself.

The pieces, and where every number comes from:

- :class:`RequestMix`: the prompt- and output-length histograms as the engines export
  them (vLLM's ``vllm:request_prompt_tokens`` / ``vllm:request_generation_tokens`` are
  Prometheus histograms). Within a bucket the lengths are spread evenly, which is the
  linear interpolation of ``histogram_quantile``; the ``+Inf`` bucket sits at the
  highest finite bound, as ``histogram_quantile`` reports it.
- :func:`unattainable`: the prompt length above which even an idle instance misses the
  TTFT SLO (own prefill latency + KV transfer + one decode step), and the mix's share
  above it. Those requests are reported, never chased.
- :func:`prefill_capacity`: prompt tokens/s per instance at the highest utilisation at
  which the TTFT quantile of the attainable requests stays within the SLO.
- :func:`decode_capacity`: output tokens/s per instance at the largest batch whose step
  time meets the TBT SLO, within the batch limit and the KV cache.
- :class:`LatencyCorrection`: a bounded, smoothed factor per role by which the real
  instance is slower (> 1) or faster (< 1) than the model, learnt online from observed
  latency; every capacity function takes it as ``latency_factor``.
- :func:`role_capacities` puts them together into :class:`RoleCapacities`, whose
  ``explain()`` is one line for the decision's reasons.

The planner runs these for every service every cycle, so they are kept cheap without
moving a number: what depends on a histogram alone is computed once per histogram
(``cached_on``), what depends on its bucket layout alone once per layout, bisections
over one point evaluate the model in floats exactly as numpy does for one point
(``InstancePerf.decode_step_float_s``), and :func:`predicted_ttft_side` places the
TTFT against a latency bucket without its bisection where that provably gives the
same answer.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Literal, TypeVar

import numpy as np

from reconciler.latency_buckets import one_two_five_buckets
from reconciler.perfmodel.instance import InstancePerf, kv_transfer_s
from reconciler.perfmodel.queueing import (
    MAX_GGC_UTILISATION,
    ggc_wait_probability,
    ggc_wait_s,
)
from reconciler.state import Role, usable_length_histogram

# Poisson arrivals: the squared CV of inter-arrival times is 1. Many independent
# clients superpose to a Poisson stream (Palm-Khintchine); the simulator assumes the same.
POISSON_ARRIVAL_SCV = 1.0

# Points per histogram bucket when the mix is evaluated (lengths spread evenly within a
# bucket). 16 points put the second moment within (width / 16)^2 / 12 of the uniform
# bucket's exact value; the mean is exact.
POINTS_PER_BUCKET = 16

# Geometric bucket grid for ``RequestMix.from_samples``: 8 buckets per doubling (~9 %
# wide), fine enough that in-bucket spreading moves the mix's moments by well under 1 %.
SAMPLE_BUCKETS_PER_DOUBLING = 8

# Bisection stops when the bracket is this narrow (utilisation, relative prompt length,
# relative factor): far below any figure the policy rounds to.
_BISECTION_STEPS = 60
# Prefill's busy fraction is a gauge: a window's reading averages the samples scraped in
# it (GAUGE_SAMPLES_PER_WINDOW: a 15 s scrape in a 60 s window), each about one second
# of the pool's busy time. Prompts arrive as a Poisson stream of work, so one second's
# busy time spreads by sqrt((1 + scv) / prompts_per_s) relative (scv: the squared CV
# of a prompt's work) and a reading by that over sqrt(samples). The correction's EWMA
# keeps a third of one reading's variance; the reading is taken only where what is
# left stays within BUSY_READ_MAX_ERROR, half the planner's minimum headroom (10 %):
# prompts_per_s >= (1 + scv) / (3 x samples x 0.05^2), 33 x (1 + scv) prompts/s. Below
# that the noise turned into GPU-hours: capacity is scaled out on every high reading at
# once and in on a low one only after the scale-in window (summarize, ~10-30 prompts/s:
# +10 % GPU-hours on the burst days).
GAUGE_SAMPLES_PER_WINDOW = 4
BUSY_READ_MAX_ERROR = 0.05
# How many of its standard deviations a noisy reading is taken to fall short of (a busy
# reading's floor) or to move by chance (decode's running count): two, which chance
# exceeds one time in forty on one side.
NOISE_SPREADS = 2.0
# The TTFT quantile's bisection stops once its bracket is narrower than this.
_TTFT_TOLERANCE_S = 1e-6
# ``predicted_ttft_side`` answers without the bisection only when the bisection is
# sure to stop on its tolerance, not its step limit (2^60 x 1e-6 s ~ 1e12 s).
_SIDE_MAX_SPAN_S = 1e9

_T = TypeVar("_T")


def cached_on(owner: object, key: Hashable, compute: Callable[[], _T]) -> _T:
    """``compute()`` once per ``owner`` and ``key``, kept in the owner's ``__dict__``: a
    frozen dataclass carries it without a field, so its equality, repr and the durable
    encoding (which walk the fields) never see it. For values that depend on the
    owner's fields alone, or on other objects named in ``key`` and held by the value
    (so that an ``id`` in the key cannot be reused while the entry lives)."""
    memo: dict[Hashable, object] | None = owner.__dict__.get("_memo")
    if memo is None:
        memo = owner.__dict__["_memo"] = {}
    if key in memo:
        return memo[key]  # type: ignore[return-value]
    value = memo[key] = compute()
    return value


def _read_only(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two arrays, made read-only: cached, they are shared by every reader."""
    first.setflags(write=False)
    second.setflags(write=False)
    return first, second


# --------------------------------------------------------------------------- the mix


# The length-histogram bounds the engines export (vLLM's 1-2-5 buckets up to a million
# tokens, then +Inf): the mix the planner reads, as the simulated engines export it.
ENGINE_LENGTH_BOUNDS: tuple[float, ...] = (*one_two_five_buckets(1_000_000), math.inf)


@dataclass(frozen=True, eq=False)
class _Layout:
    """The points of a histogram's whole mass, less their weights: fixed by its bucket
    bounds and which buckets hold any mass, so every histogram with that layout (one
    engine's buckets, cycle after cycle) shares them, and what is computed per point
    from the lengths alone (``cached_on`` the layout: an instance's own latency and
    work per point)."""

    lengths: np.ndarray  # read-only, as ``LengthHistogram._spread`` makes them
    kept: tuple[int, ...]  # the buckets holding mass, in order
    # Per kept bucket: its width when spread over points, None for a point mass.
    widths: tuple[float | None, ...]
    rows: np.ndarray  # per point: its bucket's position in ``kept``
    # Per kept bucket: the mean over its points of the length and of its square. A
    # histogram of this layout has as moments its kept counts' weighted mean of these
    # (each bucket's points weigh alike), a dozen products instead of a pass over
    # every point (``LengthHistogram.moment``).
    length_means: tuple[float, ...]
    square_means: tuple[float, ...]

    def bucket_means(self, per_point: np.ndarray) -> tuple[float, ...]:
        """Per kept bucket: the mean of ``per_point`` (one value per point of
        ``lengths``) over its points."""
        return _means_per_bucket(self.rows, len(self.kept), per_point)


def _means_per_bucket(rows: np.ndarray, buckets: int, per_point: np.ndarray) -> tuple[float, ...]:
    """Per bucket ``0 .. buckets - 1``: the mean of ``per_point`` over the points whose
    ``rows`` entry names it."""
    points = np.maximum(np.bincount(rows, minlength=buckets), 1)
    return tuple((np.bincount(rows, weights=per_point, minlength=buckets) / points).tolist())


_LAYOUTS: dict[tuple[tuple[float, ...], tuple[bool, ...]], _Layout] = {}
_LAYOUTS_LIMIT = 4096


def clear_layouts() -> None:
    """Forget the shared layouts (and what is kept with them): as after a start."""
    _LAYOUTS.clear()


_POSITIVE = (0.0).__lt__  # ``0.0 < c``: a bucket holding mass


def _layout(bounds: tuple[float, ...], counts: tuple[float, ...]) -> _Layout:
    held = tuple(map(_POSITIVE, counts))
    key = (bounds, held)
    # A zero bound is not shared: 0.0 == -0.0 as a key, and a layout built for one would
    # give the other's points a zero of the wrong sign (no engine's bound is zero).
    layout = None if 0.0 in bounds else _LAYOUTS.get(key)
    if layout is None:
        shape = LengthHistogram(bounds, tuple(1.0 if h else 0.0 for h in held))
        lengths, _ = shape._spread(None, POINTS_PER_BUCKET)
        lengths.setflags(write=False)
        widths: list[float | None] = []
        rows: list[int] = []
        for lo, hi, count in shape._buckets():
            if count > 0:  # a held bucket: spread, or a point mass (hi <= lo)
                widths.append(hi - lo if hi > lo else None)
                rows += [len(widths) - 1] * (POINTS_PER_BUCKET if hi > lo else 1)
        kept = tuple(i for i, h in enumerate(held) if h)
        row_of_point = np.array(rows, dtype=np.intp)
        layout = _Layout(
            lengths,
            kept,
            tuple(widths),
            row_of_point,
            _means_per_bucket(row_of_point, len(kept), lengths),
            _means_per_bucket(row_of_point, len(kept), lengths**2),
        )
        if 0.0 not in bounds:
            if len(_LAYOUTS) >= _LAYOUTS_LIMIT:
                _LAYOUTS.clear()
            _LAYOUTS[key] = layout
    return layout


@dataclass(frozen=True)
class LengthHistogram:
    """A token-length histogram: bucket upper bounds (increasing; the last may be
    ``inf``) and the count in each bucket (not cumulative)."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.counts) or not self.bounds:
            raise ValueError("a histogram needs one count per bucket bound, at least one")
        if any(map(operator.ge, self.bounds, self.bounds[1:])):
            raise ValueError(f"bucket bounds must increase: {self.bounds}")
        if min(self.counts) < 0 or not all(map(math.isfinite, self.counts)):
            raise ValueError(f"bucket counts must be finite and >= 0: {self.counts}")

    @classmethod
    def checked(cls, bounds: tuple[float, ...], counts: tuple[float, ...]) -> LengthHistogram:
        """A histogram whose bounds and counts the caller has already checked as
        ``__post_init__`` does (every decision reads two, from the engines' cumulative
        buckets, which ``_histogram_from_cumulative`` checks on the way)."""
        histogram = object.__new__(cls)
        object.__setattr__(histogram, "bounds", bounds)
        object.__setattr__(histogram, "counts", counts)
        return histogram

    @property
    def total(self) -> float:
        return float(sum(self.counts))

    def _buckets(self) -> Iterable[tuple[float, float, float]]:
        """(lower, upper, count) per bucket, the ``+Inf`` bucket collapsed onto the
        highest finite bound, and the first bucket starting at 0 (as
        ``histogram_quantile`` does for a positive first bound)."""
        lower = 0.0
        for upper, count in zip(self.bounds, self.counts, strict=True):
            if math.isinf(upper):
                yield lower, lower, count
            else:
                yield lower, upper, count
                lower = upper

    def points(
        self, upper: float | None = None, per_bucket: int = POINTS_PER_BUCKET
    ) -> tuple[np.ndarray, np.ndarray]:
        """Representative lengths and their weights (counts), lengths spread evenly
        within each bucket; with ``upper``, only the mass at or below ``upper``. The
        whole mass at the default spread is computed once per histogram (a decision
        reads it some ten times) and returned read-only."""
        if upper is None and per_bucket == POINTS_PER_BUCKET:
            return cached_on(self, "points", self._whole)
        return self._spread(upper, per_bucket)

    def cut_points(self, upper: float) -> tuple[np.ndarray, np.ndarray, int]:
        """``points(upper)``, and how many of its first points are the whole mass's
        (``points()``) unchanged: those of every bucket at or below ``upper`` (the same
        floats: ``_spread`` computes a whole bucket's lengths and weights as ``_whole``
        and the layout do), then the bucket ``upper`` cuts, spread as ``_spread``
        spreads it (its lengths element by element: the same floats on one bucket as
        on several). The prefix is taken from the cached whole; only the cut bucket is
        computed."""
        lengths, weights = self.points()
        prefix = 0
        cut: tuple[float, float, float] | None = None  # (lo, top - lo, weight per point)
        ended = False  # a bucket left out or cut: every later one must be left out
        for lo, hi, count in self._buckets():  # ``_spread``'s choices, bucket by bucket
            if count <= 0:
                continue
            top = hi if hi <= lo else min(hi, upper)
            if (not lo <= upper) if hi <= lo else (top <= lo):  # left out
                ended = True
                continue
            if ended:  # bounds not as the engines' (a mass after a part left out)
                return (*self._spread(upper, POINTS_PER_BUCKET), 0)
            if hi <= lo:  # a point mass, kept
                prefix += 1
            elif top >= hi:  # a whole bucket
                prefix += POINTS_PER_BUCKET
            else:
                kept = count * (top - lo) / (hi - lo)
                cut = (lo, top - lo, kept / POINTS_PER_BUCKET)
                ended = True
        if cut is None:
            return lengths[:prefix], weights[:prefix], prefix
        lo, width, each = cut
        offsets = (np.arange(POINTS_PER_BUCKET) + 0.5) / POINTS_PER_BUCKET
        cut_lengths = lo + offsets * width
        cut_weights = np.full(POINTS_PER_BUCKET, each)
        return (
            np.concatenate((lengths[:prefix], cut_lengths)),
            np.concatenate((weights[:prefix], cut_weights)),
            prefix,
        )

    def layout(self) -> _Layout:
        """Where the points of the whole mass lie (:class:`_Layout`)."""
        return cached_on(self, "layout", lambda: _layout(self.bounds, self.counts))

    def _whole(self) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_spread` of the whole mass, its lengths from the shared layout and
        only the weights computed: ``count x width / width / n`` per spread bucket
        (the arithmetic ``_spread`` does with ``top = hi``; in Python floats, the same
        IEEE operations as numpy's on a dozen buckets, for less), the count for a
        point mass."""
        layout = self.layout()
        if not layout.kept:
            return _read_only(np.zeros(0), np.zeros(0))
        per_bucket = [
            self.counts[i] if width is None else self.counts[i] * width / width / POINTS_PER_BUCKET
            for i, width in zip(layout.kept, layout.widths, strict=True)
        ]
        weights = np.array(per_bucket)[layout.rows]
        weights.setflags(write=False)
        return layout.lengths, weights

    def _spread(self, upper: float | None, per_bucket: int) -> tuple[np.ndarray, np.ndarray]:
        # Buckets in order: a point mass (the +Inf bucket) as one point, any other as
        # ``per_bucket`` points. Consecutive spread buckets go through numpy together,
        # with the arithmetic of one bucket at a time element by element (the same
        # floats): lo + (i + 0.5) / n x width, each weighing kept / n.
        lengths: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        run: list[tuple[float, float, float]] = []  # (lo, width, weight per point)
        offsets = (np.arange(per_bucket) + 0.5) / per_bucket

        def flush() -> None:
            if run:
                lo, width, each = (np.array(column) for column in zip(*run, strict=True))
                lengths.append((lo[:, None] + offsets[None, :] * width[:, None]).ravel())
                weights.append(np.repeat(each, per_bucket))
                run.clear()

        for lo, hi, count in self._buckets():
            if count <= 0:
                continue
            if hi <= lo:  # a point mass (the +Inf bucket)
                if upper is None or lo <= upper:
                    flush()
                    lengths.append(np.array([lo]))
                    weights.append(np.array([count]))
                continue
            top = hi if upper is None else min(hi, upper)
            if top <= lo:
                continue
            kept = count * (top - lo) / (hi - lo)
            run.append((lo, top - lo, kept / per_bucket))
        flush()
        if not lengths:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(lengths), np.concatenate(weights)

    def cdf(self, tokens: float) -> float:
        """Share of the mass at or below ``tokens`` (linear within a bucket)."""
        total = self.total
        if total <= 0:
            return 0.0
        below = 0.0
        for lo, hi, count in self._buckets():
            if tokens >= hi:
                below += count
            elif tokens > lo:
                below += count * (tokens - lo) / (hi - lo)
        return below / total

    def quantile(self, q: float) -> float:
        """The ``q`` quantile, interpolated as Prometheus' ``histogram_quantile`` does."""
        total = self.total
        if total <= 0:
            return math.nan
        rank = min(max(q, 0.0), 1.0) * total
        seen = 0.0
        last = 0.0
        for lo, hi, count in self._buckets():
            if count > 0 and seen + count >= rank:
                return lo + (hi - lo) * (rank - seen) / count if hi > lo else lo
            seen += count
            last = hi
        return last

    def moment(self, power: int, upper: float | None = None) -> float:
        """``E[L^power]`` over the mass at or below ``upper`` (all of it by default)."""
        if upper is None:
            return cached_on(self, ("moment", power), lambda: self._moment(power, None))
        return self._moment(power, upper)

    def _moment(self, power: int, upper: float | None) -> float:
        if upper is None and power in (1, 2):
            layout = self.layout()
            return self.mean_over_buckets(
                layout.length_means if power == 1 else layout.square_means
            )
        lengths, weights = self.points(upper)
        mass = weights.sum()
        if mass <= 0:
            return 0.0
        return float(weights @ lengths**power / mass)

    def mean_over_buckets(self, bucket_means: Sequence[float]) -> float:
        """The mean over the whole mass of a value whose mean over each kept bucket's
        points is ``bucket_means`` (``_Layout.bucket_means``): the buckets' means
        weighted by their counts. 0 without mass."""
        counts, mass = cached_on(self, "kept counts", self._kept_counts)
        if mass <= 0:
            return 0.0
        return sum(map(operator.mul, counts, bucket_means)) / mass

    def _kept_counts(self) -> tuple[list[float], float]:
        """The counts of the layout's kept buckets, and their sum."""
        counts = [self.counts[i] for i in self.layout().kept]
        return counts, sum(counts)


def _histogram_from_cumulative(
    le: Sequence[float], cumulative: Sequence[float]
) -> LengthHistogram | None:
    """:meth:`RequestMix.from_cumulative`'s histogram of one column pair (bounds, then
    cumulative counts), None when empty, non-finite or holding no observation."""
    if len(le) != len(cumulative):
        raise ValueError("a histogram needs one cumulative count per bucket bound")
    bounds = tuple(map(float, le))
    cumulative_counts = tuple(map(float, cumulative))
    if not bounds:
        return None
    if not all(map(operator.lt, bounds, bounds[1:])):  # not in order: sort the pairs
        rows = sorted(zip(bounds, cumulative_counts, strict=True))
        bounds = tuple(le for le, _ in rows)
        cumulative_counts = tuple(c for _, c in rows)
        if any(map(operator.ge, bounds, bounds[1:])):  # one bound twice
            raise ValueError(f"bucket bounds must increase: {bounds}")
    if not all(map(math.isfinite, cumulative_counts)):
        return None
    # The running maximum of the counts floored at 0 (``histogram_quantile``'s repair of
    # rate artefacts), in floats: numpy's ``maximum.accumulate(maximum(c, 0.0))`` gives
    # the same values, and costs more than it saves on a couple of dozen buckets. A
    # plain loop: ``accumulate`` with ``max`` called a builtin per bucket, on a generator.
    running: list[float] = []
    top = 0.0
    for count in cumulative_counts:
        if count > top:  # ``max(top, count if count > 0.0 else 0.0)``, the same float
            top = count
        running.append(top)
    if running[-1] <= 0:
        return None
    # np.diff's subtractions, one by one: finite and >= 0, and the bounds increase
    # (sorted above), so the checks of ``LengthHistogram`` hold already.
    counts = tuple(map(operator.sub, running, [0.0, *running[:-1]]))
    return LengthHistogram.checked(bounds, counts)


@dataclass(frozen=True)
class RequestMix:
    """The live request mix: prompt- and output-length histograms."""

    prompt: LengthHistogram
    output: LengthHistogram

    @classmethod
    def from_samples(
        cls,
        prompt_tokens: Sequence[float] | np.ndarray,
        output_tokens: Sequence[float] | np.ndarray,
        bounds: Sequence[float] | None = None,
    ) -> RequestMix:
        """Bin raw request lengths (tests, the simulator). ``bounds`` defaults to a
        geometric grid of ``SAMPLE_BUCKETS_PER_DOUBLING`` buckets per doubling from 1
        token to the longest sample, plus ``+Inf``."""
        prompt = np.asarray(prompt_tokens, dtype=float)
        output = np.asarray(output_tokens, dtype=float)
        if prompt.size == 0 or output.size == 0:
            raise ValueError("a request mix needs at least one prompt and one output length")

        def grid(values: np.ndarray) -> tuple[float, ...]:
            if bounds is not None:
                given = tuple(float(b) for b in bounds)
                return given if math.isinf(given[-1]) else (*given, math.inf)
            top = max(float(values.max()), 1.0)
            steps = math.ceil(math.log2(top) * SAMPLE_BUCKETS_PER_DOUBLING) + 1
            edges = 2.0 ** (np.arange(steps + 1) / SAMPLE_BUCKETS_PER_DOUBLING)
            return (*(float(e) for e in edges), math.inf)

        def histogram(values: np.ndarray) -> LengthHistogram:
            upper = grid(values)
            # Bucket i holds lengths in (upper[i-1], upper[i]] (Prometheus' "le").
            index = np.searchsorted(np.asarray(upper), values, side="left")
            counts = np.bincount(index, minlength=len(upper))
            return LengthHistogram(upper, tuple(float(c) for c in counts))

        return cls(histogram(prompt), histogram(output))

    @classmethod
    def from_cumulative(
        cls,
        prompt_buckets: Iterable[tuple[float, float]],
        output_buckets: Iterable[tuple[float, float]],
    ) -> RequestMix | None:
        """From Prometheus-style cumulative buckets ``(le, count)`` (counts, increases or
        rates: only proportions matter), ``le`` may be ``inf``. Like
        ``histogram_quantile``, non-monotonic cumulative counts (rate artefacts) are
        raised to the running maximum. ``None`` when either histogram has no
        observations (nothing to size from: the caller holds)."""

        def columns(buckets: Iterable[tuple[float, float]]) -> tuple[list[float], list[float]]:
            rows = sorted((float(le), float(c)) for le, c in buckets)
            return [le for le, _ in rows], [c for _, c in rows]

        return cls.from_cumulative_columns(*columns(prompt_buckets), *columns(output_buckets))

    @classmethod
    def from_cumulative_columns(
        cls,
        prompt_le: Sequence[float],
        prompt_cumulative: Sequence[float],
        output_le: Sequence[float],
        output_cumulative: Sequence[float],
    ) -> RequestMix | None:
        """:meth:`from_cumulative` from the bounds and cumulative counts as two columns
        each (as ``LengthBuckets`` holds them): the same histograms, without pairing
        every bucket up (a decision reads two histograms every cycle)."""
        prompt = _histogram_from_cumulative(prompt_le, prompt_cumulative)
        output = _histogram_from_cumulative(output_le, output_cumulative)
        if prompt is None or output is None:
            return None
        return cls(prompt, output)

    def bare(self) -> RequestMix:
        """The same mix (the same bounds and counts) without what was computed from it
        and kept with it (``cached_on``: points, queue shapes, capacities): for a mix
        remembered beyond the cycle that read it. Kept with those, every remembered mix
        held some twenty more objects for the cyclic collector to walk after a batch
        (its share of a batch of 1,000 fell from 18 % to 14 % without them) and ~9 KiB
        of arrays."""
        return RequestMix(
            LengthHistogram.checked(self.prompt.bounds, self.prompt.counts),
            LengthHistogram.checked(self.output.bounds, self.output.counts),
        )

    def is_usable(self) -> bool:
        """Whether both histograms are ones a usable engine reading gives
        (``LengthBuckets.is_usable``): a mix read back from a damaged state document
        may hold NaN or absurd bounds, or counts whose sum overflows."""
        return all(usable_length_histogram(h.bounds, h.total) for h in (self.prompt, self.output))

    @property
    def prompt_mean_tokens(self) -> float:
        return self.prompt.moment(1)

    @property
    def output_mean_tokens(self) -> float:
        return self.output.moment(1)

    @property
    def running_output_tokens(self) -> float:
        """Mean output tokens a sequence in the decode batch has generated so far, and
        as many still to generate. A sequence of ``L`` output tokens stays in the batch
        for ``L`` steps, so the batch holds sequences in proportion to their length
        (length-biased), each half-way through on average: ``E[L^2] / (2 E[L])``. This
        is ``E[L] / 2`` when every output has one length and more when lengths vary (by
        ``(1 + CV^2)``). 0 without outputs."""
        mean_output = self.output.moment(1)
        if mean_output <= 0:
            return 0.0
        return self.output.moment(2) / (2.0 * mean_output)

    @property
    def live_context_tokens(self) -> float:
        """Mean context of a sequence in the decode batch: its prompt plus the tokens it
        has generated so far (``running_output_tokens``); prompts are independent of
        output lengths."""
        return self.prompt_mean_tokens + self.running_output_tokens


# --------------------------------------------------------------------------- unattainable


@dataclass(frozen=True)
class Unattainable:
    """The part of the mix that misses the TTFT SLO even on an idle instance."""

    share: float  # of requests
    above_prompt_tokens: float | None  # prompt length from which the SLO is out of reach
    idle_ttft_s_at_mean: float  # idle TTFT of a mean-length prompt (for the message)


def transfer_s_per_token(kv_bytes_per_token: float, link_gbps: float) -> float:
    """Seconds per prompt token to ship its KV cache over an idle link of ``link_gbps``."""
    return float(kv_transfer_s(1.0, kv_bytes_per_token, link_gbps))


def idle_ttft_s(
    perf: InstancePerf,
    prompt_tokens: np.ndarray | float,
    transfer_s_per_token: float,
    decode_first_step_s: float,
    latency_factor: float = 1.0,
) -> np.ndarray:
    """TTFT on an idle instance and idle link: own prefill latency (one prompt alone,
    ``perf.prefill_latency_s``, times the learnt factor) + KV transfer + one decode
    step (the first token streams from the decode instance)."""
    prompt = np.asarray(prompt_tokens, dtype=float)
    own: np.ndarray = perf.prefill_latency_s(prompt) * latency_factor
    return own + prompt * transfer_s_per_token + decode_first_step_s


def _idle_ttft_one_s(
    perf: InstancePerf,
    prompt_tokens: float,
    transfer_s_per_token: float,
    decode_first_step_s: float,
    latency_factor: float,
) -> float:
    """:func:`idle_ttft_s` of one prompt, as a float and bit for bit the same."""
    own = perf.prefill_latency_one_s(prompt_tokens) * latency_factor
    return own + prompt_tokens * transfer_s_per_token + decode_first_step_s


def unattainable(
    perf: InstancePerf,
    mix: RequestMix,
    ttft_slo_s: float,
    transfer_s_per_token: float,
    decode_first_step_s: float,
    latency_factor: float = 1.0,
) -> Unattainable:
    """The share of the mix whose TTFT exceeds the SLO even on an idle instance, and the
    prompt length above which it does (``None``: every length in the mix is
    attainable). Idle TTFT grows with the prompt, so the threshold is the one length
    where it equals the SLO (bisection)."""
    mean = mix.prompt_mean_tokens
    at_mean = _idle_ttft_one_s(
        perf, mean, transfer_s_per_token, decode_first_step_s, latency_factor
    )
    lengths, _ = mix.prompt.points()
    longest = float(lengths.max()) if lengths.size else 0.0

    def misses(tokens: float) -> bool:
        ttft = _idle_ttft_one_s(
            perf, tokens, transfer_s_per_token, decode_first_step_s, latency_factor
        )
        return ttft > ttft_slo_s

    if not misses(longest):
        return Unattainable(0.0, None, at_mean)
    if misses(0.0):  # not even an empty prompt: the fixed costs alone exceed the SLO
        return Unattainable(1.0, 0.0, at_mean)
    lo, hi = 0.0, longest
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if misses(mid) else (mid, hi)
        if hi - lo <= 1e-6 * hi:
            break
    return Unattainable(1.0 - mix.prompt.cdf(lo), lo, at_mean)


# --------------------------------------------------------------------------- prefill


@dataclass(frozen=True)
class PrefillCapacity:
    """What one prefill instance sustains within the TTFT SLO for a mix."""

    tps_per_instance: float  # prompt tokens/s of attainable requests at the SLO
    utilisation: float  # the busy fraction at that rate (rho)
    sustained_tps_per_instance: float  # at 100 % busy (compute, or the link if slower)
    work_per_token: float  # compute-equivalent FLOPs per attainable prompt token
    wait_s: float  # mean queue wait at that rate (G/G/c)
    ttft_quantile_s: float  # the TTFT at the SLO quantile at that rate
    instances: int  # servers assumed for the queue
    unattainable: Unattainable

    @property
    def keeps_up_only(self) -> bool:
        """No rate meets the TTFT SLO: the capacity is the sustained rate that keeps up
        with the work (``prefill_capacity``), not one within the SLO."""
        return math.isinf(self.ttft_quantile_s) and self.tps_per_instance > 0

    def demand_tps(self, perf: InstancePerf, mix: RequestMix, prompt_tps: float) -> float:
        """Observed prompt tokens/s (every request, unattainable ones included) as
        tokens/s of the attainable mix, so it can be divided by ``tps_per_instance``:
        unattainable requests are still served and their long, dear prompts take
        instance time; only the SLO is not chased for them."""
        tokens, all_work_per_token = cached_on(
            mix.prompt, ("work per token", id(perf)), lambda: _work_per_token(perf, mix.prompt)
        )[1]
        if tokens <= 0 or self.work_per_token <= 0:
            return prompt_tps
        return prompt_tps * all_work_per_token / self.work_per_token


def _work_per_token(
    perf: InstancePerf, prompt: LengthHistogram
) -> tuple[InstancePerf, tuple[float, float]]:
    """(``perf``, (mean prompt tokens of the whole mass, its work per token)); ``perf`` rides
    along so that its ``id`` in the cache key stays its own. Both from the layout's
    per-bucket means (the work's kept with it per instance), weighted by the counts."""
    layout = prompt.layout()
    tokens = prompt.mean_over_buckets(layout.length_means)
    if tokens <= 0:
        return perf, (tokens, 0.0)

    def work_means() -> tuple[InstancePerf, tuple[float, ...]]:
        return perf, layout.bucket_means(_per_point(perf, prompt, None, layout.lengths)[1])

    _, means = cached_on(layout, ("work means", id(perf)), work_means)
    return perf, (tokens, prompt.mean_over_buckets(means) / tokens)


def _per_point(
    perf: InstancePerf,
    prompt: LengthHistogram,
    upper: float | None,
    lengths: np.ndarray,
    whole_prefix: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per point of ``prompt.points(upper)`` (whose ``lengths`` the caller has): one
    prompt's own latency alone and its work. For the whole mass they depend on the
    layout alone, so they are kept with it (the same lengths every cycle: the same
    numbers); so are those of the first ``whole_prefix`` points of a cut mass (the
    whole's, ``LengthHistogram.cut_points``): numpy computes each element alike
    whatever array it is in, so only the rest are computed."""
    if upper is not None:
        if whole_prefix <= 0:
            return perf.prefill_latency_s(lengths), perf.prefill_work(lengths)
        whole_own, whole_work = _per_point(perf, prompt, None, prompt.layout().lengths)
        rest = lengths[whole_prefix:]
        return (
            np.concatenate((whole_own[:whole_prefix], perf.prefill_latency_s(rest))),
            np.concatenate((whole_work[:whole_prefix], perf.prefill_work(rest))),
        )
    layout = prompt.layout()

    def compute() -> tuple[InstancePerf, np.ndarray, np.ndarray]:
        own, work = _read_only(
            perf.prefill_latency_s(layout.lengths), perf.prefill_work(layout.lengths)
        )
        return perf, own, work  # perf held: its id in the key stays its own

    _, own, work = cached_on(layout, ("per point", id(perf)), compute)
    return own, work


@dataclass(frozen=True)
class _QueueShape:
    """What a prefill queue takes from the mix (the part up to ``upper``) and the
    instance alone: the same for every load, factor, link and pool size, so it is
    computed once per prompt histogram, instance and ``upper``."""

    perf: InstancePerf  # held, so that its id in the cache key stays its own
    lengths: np.ndarray
    weights: np.ndarray  # normalised to 1
    empty: bool
    own_latency_s: np.ndarray  # one prompt alone, factor 1
    zeros: np.ndarray  # read-only, one per point: what an unmet point adds to attainment
    work_per_token: float
    mean_tokens: float
    service_scv: float


def _queue_shape(perf: InstancePerf, prompt: LengthHistogram, upper: float | None) -> _QueueShape:
    whole_prefix = 0
    if upper is None:
        lengths, weights = prompt.points()
    else:
        lengths, weights, whole_prefix = prompt.cut_points(upper)
    mass = float(weights.sum())
    empty = mass <= 0 or not perf.fits or float(weights @ lengths) <= 0
    weights = weights / mass if mass > 0 else weights
    own, work = _per_point(perf, prompt, upper, lengths, whole_prefix)
    work_per_token = mean_tokens = service_scv = 0.0
    if not empty:
        mean_work = float(weights @ work)
        mean_tokens = float(weights @ lengths)
        work_per_token = mean_work / mean_tokens
        # The service time's CV is that of the work (attention makes work grow faster
        # than tokens).
        service_scv = float(weights @ (work - mean_work) ** 2) / mean_work**2
    zeros = np.zeros(lengths.size)
    zeros.setflags(write=False)
    return _QueueShape(
        perf,
        lengths,
        weights,
        empty,
        own,
        zeros,
        work_per_token,
        mean_tokens,
        service_scv,
    )


def _cached_queue_shape(
    perf: InstancePerf, prompt: LengthHistogram, upper: float | None
) -> _QueueShape:
    """``_queue_shape``, once per histogram, instance model and cut."""
    return cached_on(prompt, ("queue", id(perf), upper), lambda: _queue_shape(perf, prompt, upper))


def bucket_side(value: float, lower: float, upper: float) -> int:
    """Where ``value`` lies against the bucket ``(lower, upper]``: -1 at or below
    ``lower``, 0 inside, 1 above (or NaN)."""
    if lower < value <= upper:
        return 0
    return -1 if value <= lower else 1


class _PrefillQueue:
    """The prefill pool as one G/G/c queue for (the part up to ``upper`` of) a mix."""

    def __init__(
        self,
        perf: InstancePerf,
        mix: RequestMix,
        transfer_s_per_token: float,
        decode_first_step_s: float,
        latency_factor: float,
        instances: int,
        upper: float | None,
    ):
        shape = _cached_queue_shape(perf, mix.prompt, upper)
        self.empty = shape.empty
        self.instances = max(int(instances), 1)
        self.weights = shape.weights
        self._zeros = shape.zeros
        self.transfer_s = shape.lengths * transfer_s_per_token
        self.transfer_s_per_token = transfer_s_per_token
        # What does not depend on the latency factor, computed once (the correction
        # bisects over the factor): own latency alone, the first decode step, the work.
        self._own_latency_s = shape.own_latency_s
        self._first_step_s = decode_first_step_s
        self._capacity_work_per_s = perf.prefill_capacity_work_per_s
        self.work_per_token = shape.work_per_token
        self.service_scv = shape.service_scv
        self._mean_tokens = shape.mean_tokens
        self.mean_service_s = 0.0
        self._set_factor(latency_factor)

    def _set_factor(self, latency_factor: float) -> None:
        # Own latency (one prompt alone) and the first decode step do not depend on load.
        fixed_s = self._own_latency_s * latency_factor
        self.fixed_s = np.add(fixed_s, self._first_step_s, out=fixed_s)  # no temporary
        if self.empty:
            self.sustained_tps = 0.0
            return
        # A busy instance batches prompts: it sustains its compute at the fitted
        # efficiency (perfmodel assumption 5), slower by the learnt factor ...
        compute_tps = self._capacity_work_per_s / latency_factor / self.work_per_token
        # ... and cannot ship KV cache faster than its link (assumption 6).
        link_tps = 1.0 / self.transfer_s_per_token if self.transfer_s_per_token > 0 else math.inf
        self.sustained_tps = min(compute_tps, link_tps)
        # The mean prompt's service time at the sustained rate.
        self.mean_service_s = self._mean_tokens / self.sustained_tps

    def with_factor(self, latency_factor: float) -> _PrefillQueue:
        """The same queue for an instance slower by ``latency_factor``."""
        other = object.__new__(_PrefillQueue)
        other.__dict__.update(self.__dict__)
        other._set_factor(latency_factor)
        return other

    def wait(self, rho: float) -> tuple[float, float]:
        """(mean wait, probability of waiting) at utilisation ``rho``."""
        mean = ggc_wait_s(
            rho, self.instances, self.mean_service_s, POISSON_ARRIVAL_SCV + self.service_scv
        )
        return mean, ggc_wait_probability(rho, self.instances)

    def _ready_s(self, rho: float) -> np.ndarray:
        """Per point: TTFT without the queue wait at utilisation ``rho``."""
        link_rho = min(rho * self.sustained_tps * self.transfer_s_per_token, MAX_GGC_UTILISATION)
        # ``fixed + transfer / (1 - link_rho)``, the sum into the quotient's array (IEEE
        # addition commutes bit for bit): one temporary fewer.
        ready: np.ndarray = np.divide(self.transfer_s, 1.0 - link_rho)
        return np.add(self.fixed_s, ready, out=ready)

    def attainment(self, rho: float, ttft_s: float) -> float:
        """Share of the requests with TTFT <= ``ttft_s`` at utilisation ``rho``."""
        mean, p_wait = self.wait(rho)
        return self._attainment(self._ready_s(rho), mean, p_wait, ttft_s)

    def _attainment(self, ready: np.ndarray, mean: float, p_wait: float, ttft_s: float) -> float:
        """:meth:`attainment` with the load's terms given (a search over ``ttft_s`` at one
        load computes them once)."""
        # The ufuncs called directly and ``ndarray.dot`` for ``@`` (both BLAS's ddot on
        # two contiguous float64 vectors): the same numbers, without the operators'
        # dispatch, a third of this call's time on the few hundred points of a mix.
        slack = np.subtract(ttft_s, ready)
        met = np.greater_equal(slack, 0.0)
        if p_wait <= 0 or mean <= 0:
            return float(self.weights @ met)
        # ``1 - p_wait x exp(-max(slack, 0) / conditional)`` per point, each step in place
        # on ``slack`` (this is the planner's most frequent call, and the temporaries
        # were a third of it); ``x / -c`` is ``-x / c`` bit for bit (IEEE division
        # rounds the magnitude alike and takes the sign apart).
        conditional = mean / p_wait
        ok = np.maximum(slack, 0.0, out=slack)
        np.divide(ok, -conditional, out=ok)
        np.exp(ok, out=ok)
        np.multiply(p_wait, ok, out=ok)
        np.subtract(1.0, ok, out=ok)
        return float(self.weights.dot(np.where(met, ok, self._zeros)))

    def ttft_quantile_s(self, rho: float, quantile: float) -> float:
        """The TTFT at ``quantile`` (attainment is monotone in the bound: bisection)."""
        ready = self._ready_s(rho)
        mean, p_wait = self.wait(rho)
        lo, hi = self._ttft_bracket(ready, mean, p_wait, quantile)
        return self._ttft_bisection(ready, mean, p_wait, quantile, lo, hi)

    @staticmethod
    def _ttft_bracket(
        ready: np.ndarray, mean: float, p_wait: float, quantile: float
    ) -> tuple[float, float]:
        lo = float(ready.min())
        hi = float(ready.max()) + 1e-9
        if p_wait > 0:  # at zero load nobody waits (and the conditional wait is 0 / 0)
            hi += mean / p_wait * math.log(max(p_wait / max(1.0 - quantile, 1e-12), 1.0))
        return lo, hi

    def _ttft_bisection(
        self, ready: np.ndarray, mean: float, p_wait: float, quantile: float, lo: float, hi: float
    ) -> float:
        """The bisection for the TTFT at ``quantile`` over ``[lo, hi]``: its last ``hi``.

        Bit for bit the plain bisection's, with fewer attainments: attainment ``A(t)``
        does not decrease with ``t`` (``ttft_side`` says why), so once ``A(below) < q``
        and ``A(above) >= q`` are known, a midpoint at or below ``below`` falls short
        and one at or above ``above`` attains without being computed: every step goes
        the way the plain one goes, and only midpoints between the two are computed.
        A guess from a closed form of ``A`` (``_ttft_seeds``) puts the two either side
        of the answer and close to it first, so that of the twenty-odd steps two or
        three compute (a realistic prefill queue: 120 -> 38 us)."""
        below, above = -math.inf, math.inf  # A(below) < quantile <= A(above)
        if p_wait > 0 and mean > 0 and math.isfinite(hi) and lo < hi:
            below, above = self._ttft_seeds(ready, mean, p_wait, quantile, lo, hi)
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            if mid <= below:
                short = True
            elif mid >= above:
                short = False
            else:
                short = self._attainment(ready, mean, p_wait, mid) < quantile
                if short:
                    below = mid
                else:
                    above = mid
            lo, hi = (mid, hi) if short else (lo, mid)
            if hi - lo < _TTFT_TOLERANCE_S:
                break
        return hi

    def _ttft_seeds(
        self, ready: np.ndarray, mean: float, p_wait: float, quantile: float, lo: float, hi: float
    ) -> tuple[float, float]:
        """``(below, above)`` with ``A(below) < quantile <= A(above)`` (either infinite
        when not found), either side of where ``A`` crosses ``quantile`` and close to
        it. Only each computed point's side matters (:meth:`_ttft_bisection`): a poor
        guess costs time, never a different answer.

        The guess, from a closed form of ``A`` (rounded otherwise than ``A`` itself):
        with the points in order of their ready times ``r``, between the ``k``-th and
        the next, ``A(t) = W_k - p exp(L_k - t / c)``, where ``W_k`` is the mass met so
        far and ``L_k = log sum_(i <= k) w_i exp(r_i / c)`` (a running ``logaddexp``,
        which neither overflows nor loses the points far behind). ``A`` crosses the
        quantile either at a jump (a point turning met: the guesses are that ready
        time and the float just below it) or between two, where ``t`` solves that
        form (the guesses a quarter of the tolerance either side)."""
        if not ready.size:
            return -math.inf, math.inf
        conditional = mean / p_wait
        order = np.argsort(ready, kind="stable")
        times = ready[order]
        weights = self.weights[order]
        met_mass = np.cumsum(weights)
        guesses: tuple[float, float] = (math.nan, math.nan)
        # A guess only: no warning (a point of no weight has log 0 = -inf, an extreme
        # queue may overflow), and a NaN or infinite one is never tried.
        with np.errstate(all="ignore"):
            scaled_times = times / conditional
            logs = np.logaddexp.accumulate(np.log(weights) + scaled_times)
            # A just after each point turns met.
            after = met_mass - p_wait * np.exp(logs - scaled_times)
            crossing = int(np.argmax(after >= quantile))
            if after[crossing] < quantile:  # past the last point
                guesses = self._smooth_guesses(
                    met_mass[-1], logs[-1], conditional, p_wait, quantile
                )
            else:
                jump_at = float(times[crossing])
                # A just before it turns met, then between the previous point and it.
                before = (
                    met_mass[crossing - 1]
                    - p_wait * np.exp(logs[crossing - 1] - scaled_times[crossing])
                    if crossing > 0
                    else 0.0
                )
                if before >= quantile:
                    guesses = self._smooth_guesses(
                        met_mass[crossing - 1], logs[crossing - 1], conditional, p_wait, quantile
                    )
                else:
                    guesses = (float(np.nextafter(jump_at, -math.inf)), jump_at)
        below, above = -math.inf, math.inf
        for t in guesses:
            if lo < t < hi:
                if self._attainment(ready, mean, p_wait, t) < quantile:
                    below = max(below, t)
                else:
                    above = min(above, t)
        return below, above

    @staticmethod
    def _smooth_guesses(
        met_mass: float, log_sum: float, conditional: float, p_wait: float, quantile: float
    ) -> tuple[float, float]:
        """Either side of where ``met_mass - p exp(log_sum - t / c)`` is ``quantile``."""
        gap = (float(met_mass) - quantile) / p_wait
        if not 0 < gap < math.inf:
            return math.nan, math.nan
        t = conditional * (float(log_sum) - math.log(gap))
        margin = _TTFT_TOLERANCE_S / 4
        return t - margin, t + margin

    def ttft_side(self, rho: float, quantile: float, lower_s: float, upper_s: float) -> int:
        """``bucket_side(ttft_quantile_s(rho, quantile), lower_s, upper_s)``, the same answer,
        mostly from two attainments instead of the bisection's twenty-odd.

        Why it is the same: attainment ``A(t)`` does not decrease with ``t`` (each
        point's term does not, the weights are >= 0, and rounded sums keep that). The
        bisection's ``hi`` is its start ``H`` or a bound with ``A >= q``; its ``lo`` is
        its start (the least ready time ``L``) or a bound with ``A < q``; it stops with
        ``hi - lo < tol``. So ``A(u) < q`` and ``H > u`` put the answer above ``u``;
        ``A(u - 2 tol) >= q`` puts ``lo <= u - 2 tol`` (``L`` too: ``A > 0`` needs a
        ready time at or below), hence the answer below ``u``; ``H <= u`` does too. The
        same two tests at ``lower_s`` place it against the lower edge. Within ``2 tol``
        of an edge, or when the bisection might stop on its step limit, it runs."""
        ready = self._ready_s(rho)
        mean, p_wait = self.wait(rho)
        lo, hi = self._ttft_bracket(ready, mean, p_wait, quantile)
        margin_s = 2.0 * _TTFT_TOLERANCE_S
        if quantile > 0 and math.isfinite(lo) and math.isfinite(hi) and hi - lo < _SIDE_MAX_SPAN_S:

            def attains(ttft_s: float) -> bool:
                return self._attainment(ready, mean, p_wait, ttft_s) >= quantile

            if hi <= upper_s or attains(upper_s - margin_s):  # at or below upper_s
                if not attains(lower_s):
                    return 0 if hi > lower_s else -1
                if attains(lower_s - margin_s):
                    return -1
            elif not attains(upper_s):
                return 1
        return bucket_side(
            self._ttft_bisection(ready, mean, p_wait, quantile, lo, hi), lower_s, upper_s
        )


def prefill_capacity(
    perf: InstancePerf,
    mix: RequestMix,
    ttft_slo_s: float,
    quantile: float,
    transfer_s_per_token: float,
    decode_first_step_s: float,
    instances_hint: int,
    latency_factor: float = 1.0,
) -> PrefillCapacity:
    """Prompt tokens/s per prefill instance at which the TTFT at the SLO ``quantile``
    over the attainable part of ``mix`` stays within ``ttft_slo_s``.

    The model (each item a modelling choice; no number here is fitted to a case):

    - **TTFT** = queue wait + own prefill latency + KV transfer + one decode step
      (``decode_first_step_s``: the first token streams from the decode instance; the
      caller passes the decode step at its operating point, at most the TBT SLO, plus
      any TTFT spent outside the instances: ``LatencyCorrection.prefill_ttft_offset_s``).
    - **Own latency**: ``perf.prefill_latency_s`` of the prompt alone (batch 1), times
      ``latency_factor`` (the online correction).
    - **Work and sustained rate**: a busy instance batches prompts and sustains
      ``perf.prefill_capacity_work_per_s`` compute-equivalent FLOPs/s (perfmodel
      assumption 5); a prompt costs ``perf.prefill_work`` (linear layers + causal
      attention, so long prompts cost more per token). The sustained rate in prompt
      tokens/s is that divided by the mix's work per token ``E[work] / E[tokens]``,
      and no more than the link ships KV cache (``1 / transfer_s_per_token``).
    - **Queue wait**: the instances are ``instances_hint`` servers of one G/G/c queue
      (a shared scheduler in front of them). Its mean is Allen-Cunneen
      (``ggc_wait_s``) with Poisson arrivals (squared CV 1: many independent clients)
      and the squared CV of the work per prompt over the mix, the service time being
      the mean prompt at the sustained rate. Its *spread* has the M/M/c form: no wait
      with probability ``1 - P_w`` (``ggc_wait_probability``, the Erlang-C
      approximation inside Allen-Cunneen), else exponential with mean
      ``E[W] / P_w`` (exact for M/M/c; for G/G/c its mean is Allen-Cunneen's). The
      wait is independent of the request's own prompt (FIFO).
    - **KV transfer**: ``prompt x transfer_s_per_token`` on an idle link, times
      ``1 / (1 - link utilisation)`` (M/M/1 sojourn on the instance's shared link).
    - **Quantile**: a rate meets the SLO when at least ``quantile`` of the attainable
      requests have TTFT <= SLO, i.e. the mixture over the prompt lengths (histogram
      points) of ``P(wait <= SLO - rest of TTFT)`` is at least ``quantile``.
    - **Unattainable requests** (above :func:`unattainable`'s threshold) are left out
      of the quantile, the work per token and the service-time CV: no capacity helps
      them, and letting them in would let a few of them size the pool. Their work
      still has to be served: :meth:`PrefillCapacity.demand_tps` converts the
      observed prompt rate into tokens of the attainable mix.
    - **Solve**: attainment falls as the utilisation ``rho`` rises; the highest
      ``rho`` in ``[0, MAX_GGC_UTILISATION]`` that meets the SLO is found by
      bisection, and the capacity is ``rho x`` the sustained rate. Capacity per
      instance grows with ``instances_hint`` (pooling): :func:`prefill_instances_for`
      finds the count consistent with a demand.
    """
    instances = max(int(instances_hint), 1)
    lost = unattainable(
        perf, mix, ttft_slo_s, transfer_s_per_token, decode_first_step_s, latency_factor
    )
    queue = _PrefillQueue(
        perf,
        mix,
        transfer_s_per_token,
        decode_first_step_s,
        latency_factor,
        instances,
        lost.above_prompt_tokens,
    )
    if not queue.empty:

        def meets(rho: float) -> bool:
            return queue.attainment(rho, ttft_slo_s) >= quantile

        lo, hi = 0.0, MAX_GGC_UTILISATION
        if meets(hi):
            lo = hi
        else:
            for _ in range(_BISECTION_STEPS):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if meets(mid) else (lo, mid)
                if hi - lo < 1e-5:
                    break
        if lo > 0.0:
            return _capacity_at(queue, lo, queue.ttft_quantile_s(lo, quantile), instances, lost)
    # No rate meets the SLO (no prompt of the mix meets it even alone, or its quantile
    # is out of reach at any load): more instances cannot bring the TTFT within it,
    # yet the work must be served, or the queue grows without bound and requests are
    # dropped. The capacity is then the whole mix's sustained rate at the highest
    # utilisation the queueing model holds stable (its own limit): keeping up is all
    # an instance count can do, and the planner's headroom sits on top.
    whole = _PrefillQueue(
        perf, mix, transfer_s_per_token, decode_first_step_s, latency_factor, instances, None
    )
    if whole.empty:  # the model does not fit an instance: no capacity at all
        return PrefillCapacity(0.0, 0.0, 0.0, 0.0, 0.0, math.inf, instances, lost)
    return _capacity_at(whole, MAX_GGC_UTILISATION, math.inf, instances, lost)


def _capacity_at(
    queue: _PrefillQueue,
    rho: float,
    ttft_quantile_s: float,
    instances: int,
    lost: Unattainable,
) -> PrefillCapacity:
    """The capacity of ``queue``'s instances run at utilisation ``rho``."""
    return PrefillCapacity(
        tps_per_instance=rho * queue.sustained_tps,
        utilisation=rho,
        sustained_tps_per_instance=queue.sustained_tps,
        work_per_token=queue.work_per_token,
        wait_s=queue.wait(rho)[0],
        ttft_quantile_s=ttft_quantile_s,
        instances=instances,
        unattainable=lost,
    )


def prefill_instances_for(
    demand_tps: float, at: Callable[[int], PrefillCapacity], max_instances: int = 4096
) -> tuple[int, PrefillCapacity]:
    """The fewest instances ``n`` whose capacity ``at(n)`` (:func:`prefill_capacity`
    with ``n`` as its ``instances_hint``) covers ``demand_tps`` (attainable-mix
    tokens/s, see ``PrefillCapacity.demand_tps``), and that capacity. ``n x
    capacity(n)`` grows with ``n`` (a larger pool queues less), so a bisection over
    ``n`` finds it; ``max_instances`` when even that is short."""
    lo, hi = 1, max(int(max_instances), 1)
    cap = at(lo)
    if demand_tps <= cap.tps_per_instance:
        return lo, cap
    # Never fewer than the sustained rate allows: start the bracket there.
    if cap.sustained_tps_per_instance > 0:
        lo = min(max(lo, math.ceil(demand_tps / cap.sustained_tps_per_instance) - 1), hi)
    top = at(hi)
    if hi * top.tps_per_instance < demand_tps:
        return hi, top
    while hi - lo > 1:  # invariant: lo falls short (or is 1 below the floor), hi covers
        mid = (lo + hi) // 2
        if mid * at(mid).tps_per_instance >= demand_tps:
            hi = mid
        else:
            lo = mid
    return hi, at(hi)


@dataclass(frozen=True)
class PrefillLoad:
    """A prefill load as the TTFT model reads it: ``prompt_tps_per_instance`` on each
    of ``instances`` instances of ``perf`` serving ``mix``, the TTFT read at
    ``quantile``; a request's first token also waits for its KV transfer
    (``transfer_s_per_token``) and one decode step (``decode_first_step_s``)."""

    perf: InstancePerf
    mix: RequestMix
    quantile: float
    prompt_tps_per_instance: float
    instances: int
    transfer_s_per_token: float
    decode_first_step_s: float

    def unloaded(self, latency_factor: float) -> _PrefillQueue:
        """The whole mix's queue on these instances, its load not yet applied."""
        return _PrefillQueue(
            self.perf,
            self.mix,
            self.transfer_s_per_token,
            self.decode_first_step_s,
            latency_factor,
            self.instances,
            None,
        )

    def queue(self, latency_factor: float) -> tuple[_PrefillQueue, float] | None:
        """The whole mix's queue and its utilisation at this load; None when the model
        has no capacity for it or the load saturates it (the TTFT is then infinite)."""
        queue = self.unloaded(latency_factor)
        if queue.empty:
            return None
        rho = self.prompt_tps_per_instance / queue.sustained_tps
        if rho >= MAX_GGC_UTILISATION:
            return None
        return queue, rho


def predicted_ttft_s(load: PrefillLoad, latency_factor: float = 1.0) -> float:
    """The model's TTFT at the SLO quantile over the whole mix (as observed:
    unattainable requests included) at ``load``; ``inf`` at or beyond saturation."""
    loaded = load.queue(latency_factor)
    if loaded is None:
        return math.inf
    queue, rho = loaded
    return queue.ttft_quantile_s(rho, load.quantile)


def predicted_ttft_side(
    load: PrefillLoad, latency_factor: float, lower_s: float, upper_s: float
) -> int:
    """Where :func:`predicted_ttft_s` (same arguments) lies against the latency bucket
    ``(lower_s, upper_s]``: -1 at or below ``lower_s``, 0 inside, 1 above. The same
    answer as computing it and comparing, without its bisection in most cases
    (``_PrefillQueue.ttft_side`` says why)."""
    loaded = load.queue(latency_factor)
    if loaded is None:
        return bucket_side(math.inf, lower_s, upper_s)
    queue, rho = loaded
    return queue.ttft_side(rho, load.quantile, lower_s, upper_s)


# --------------------------------------------------------------------------- decode

# What bounds the batch: the TBT SLO, the engine's max batch, the KV cache, or, where
# no batch meets the TBT SLO (not even one sequence), nothing but keeping up with the
# work (``keep_up``: the largest batch max_batch and the KV cache allow).
DecodeLimit = Literal["tbt_slo", "max_batch", "kv_cache", "keep_up"]


@dataclass(frozen=True)
class DecodeCapacity:
    """What one decode instance sustains within the TBT SLO for a mix (or, where no
    batch meets it, keeping up with the work: ``keeps_up_only``)."""

    tps_per_instance: float  # output tokens/s
    batch: float  # sequences per instance at that rate
    step_s: float  # step time (time between tokens) at that batch
    context_tokens: float  # live context per sequence
    limit: DecodeLimit

    @property
    def keeps_up_only(self) -> bool:
        """No batch meets the TBT SLO: the capacity is the rate that keeps up with the
        work (``decode_capacity``), not one within the SLO."""
        return self.limit == "keep_up" and self.tps_per_instance > 0


def running_spread_tps(decode: DecodeCapacity, demand_tps: float, share: float) -> float:
    """Output tokens/s beyond ``demand_tps`` that the decode pool must hold so that the
    count of sequences running, not only its mean, stays within the batches its
    capacity is at for ``share`` of the time (the attainment goal).

    Requests arrive at random and each decodes for a while, so the count running is
    Poisson, as in an M/G/inf queue, whatever the output lengths: its mean is
    ``demand_tps x step_s`` (Little's law at the capacity's step), its spread the
    square root of that, and at ``share`` it reaches the mean plus ``z`` spreads (the
    normal quantile). Each sequence beyond the batch is ``1 / step_s`` tokens/s at that
    step. Relative to the demand this shrinks as the pool grows (square-root
    staffing): +6 % at 2,000 sequences running, +36 % at 50 (a 20 ms TBT SLO at 3
    instances, where the mean batch alone left 2.7 % of requests' TBT missed). Burstier
    arrivals than Poisson spread more; this is the least spread the count has. None
    where no batch meets the SLO (``keeps_up_only``): nothing to keep it within."""
    if demand_tps <= 0 or decode.step_s <= 0 or decode.keeps_up_only:
        return 0.0
    return _normal_quantile(share) * math.sqrt(demand_tps / decode.step_s)


def _normal_quantile(share: float) -> float:
    """The standard normal quantile at ``share`` (0 at one half or less; a share of 1
    is taken as the largest below it a float holds)."""
    if share <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(min(share, 1.0 - 1e-16))


def _step_s(perf: InstancePerf, batch: float, context: float, factor: float) -> float:
    return perf.decode_step_float_s(batch, batch * context, context) * factor


def decode_capacity(
    perf: InstancePerf,
    mix: RequestMix,
    tbt_slo_s: float,
    latency_factor: float = 1.0,
) -> DecodeCapacity:
    """Output tokens/s per decode instance at the largest batch whose step time meets
    ``tbt_slo_s``, at the mix's live context (:attr:`RequestMix.live_context_tokens`),
    within ``perf.max_batch`` and the KV cache.

    - Every sequence of a batch advances one token per step, so an instance at batch
      ``b`` emits ``b / step(b)`` tokens/s; that grows with ``b`` (the step has a fixed
      part), so the capacity sits at the largest allowed batch.
    - The SLO-bound batch is where ``step(b) x latency_factor = tbt_slo_s``; its rate
      agrees with ``perf.decode_capacity_tps`` (which searches a grid of batches).
    - KV cache: admission reserves a sequence's prompt plus its output (no
      preemption), so at most ``kv_capacity / (E[prompt] + E[output])`` sequences fit.
    - No batch meets the SLO (one sequence's step exceeds it): more instances cannot
      bring the TBT within it, yet the tokens must be generated, or sequences wait
      without bound. The capacity is then the rate at the largest batch the engine and
      the KV cache allow, the most an instance generates (``limit`` ``keep_up``), as
      ``prefill_capacity`` keeps up at the queue's stability limit.
    """
    context = mix.live_context_tokens
    zero = DecodeCapacity(0.0, 0.0, 0.0, context, "tbt_slo")
    if not perf.fits:
        return zero
    reserve = mix.prompt_mean_tokens + mix.output_mean_tokens
    kv_batch = perf.kv_capacity_tokens / max(reserve, 1.0)
    limits: list[tuple[float, DecodeLimit]] = [
        (float(perf.max_batch), "max_batch"),
        (kv_batch, "kv_cache"),
    ]
    top = min(b for b, _ in limits)
    if top < 1.0:
        return DecodeCapacity(0.0, 0.0, 0.0, context, "kv_cache")
    if _step_s(perf, 1.0, context, latency_factor) > tbt_slo_s:
        step = _step_s(perf, top, context, latency_factor)
        return DecodeCapacity(top / step, top, step, context, "keep_up")
    if _step_s(perf, top, context, latency_factor) <= tbt_slo_s:
        batch, limit = top, min(limits)[1]
    else:
        lo, hi = 1.0, top
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            lo, hi = (
                (mid, hi) if _step_s(perf, mid, context, latency_factor) <= tbt_slo_s else (lo, mid)
            )
            if hi - lo < 1e-6 * hi:
                break
        batch, limit = lo, "tbt_slo"
    step = _step_s(perf, batch, context, latency_factor)
    return DecodeCapacity(batch / step, batch, step, context, limit)


# --------------------------------------------------------------------------- correction


@dataclass(frozen=True)
class LatencyCorrection:
    """How much slower (> 1) or faster (< 1) each role's instances are than the model,
    learnt online from latency. Immutable: ``updated`` returns a new one.

    Each cycle an observation gives an *implied factor*: the factor at which the
    model reproduces the observed latency (:func:`implied_decode_factor`,
    :func:`implied_prefill_factor`). The stored factor moves towards it by an EWMA in
    log space (so 2x too slow and 2x too fast weigh alike):
    ``ln f' = (1 - SMOOTHING) ln f + SMOOTHING ln implied``, bounded to
    ``[MIN_FACTOR, MAX_FACTOR]`` (a factor beyond these means a broken model or
    broken metrics, not a calibration error: the bound keeps one bad signal from
    halving or doubling the fleet).

    Why ``SMOOTHING = 0.5``: with a steady implied factor the log error shrinks by
    ``(1 - 0.5)`` per cycle, so a model 30 % off (``ln 1.3 = 0.26``) is within 3.3 %
    after 3 cycles and 1.7 % after 4 (1.5-2 minutes at a 30 s cycle). Each cycle's
    latency comes from a 60 s quantile window, which at a 30 s cycle overlaps the
    previous one by half: a cycle brings about half new information, and weighting it
    by one half matches that. The EWMA's variance is ``0.5 / (2 - 0.5) = 1/3`` of one
    observation's, so one noisy window moves capacity by a third of its error.
    """

    prefill: float = 1.0
    decode: float = 1.0
    # TTFT that no prefill instance spends (a gateway, tokenisation, the network
    # before the engine): added to every request's TTFT, whatever the load. Learnt
    # only beside prefill's busy fraction, which pins the instances' own speed, so
    # what the TTFT shows beyond it is not theirs (``planner._corrected``).
    prefill_ttft_offset_s: float = 0.0

    SMOOTHING = 0.5
    MIN_FACTOR = 0.5
    MAX_FACTOR = 2.0
    # A factor this share of a bound or more sits at it (``at_slowest``).
    AT_BOUND = 0.99
    # The largest TTFT SLO a policy may set (``models.DAY_S``); the planner bounds the
    # offset by its own policy's SLO (``within_ttft_slo``).
    MAX_TTFT_OFFSET_S = 86_400.0

    def factor(self, role: Role) -> float:
        return self.prefill if role == "prefill" else self.decode

    def sanitized(self) -> LatencyCorrection:
        """Itself, or with each factor a damaged memory holds (NaN or infinite: 1;
        outside the bounds: the nearest) made one ``updated`` could have left, and an
        offset that is not a finite non-negative number made 0 (one beyond
        ``MAX_TTFT_OFFSET_S``, that). A zero factor divided the capacity by zero."""

        def sane(factor: float) -> float:
            if not math.isfinite(factor):
                return 1.0
            return min(max(factor, self.MIN_FACTOR), self.MAX_FACTOR)

        prefill, decode = sane(self.prefill), sane(self.decode)
        offset_s = self.prefill_ttft_offset_s
        if not (math.isfinite(offset_s) and offset_s >= 0.0):
            offset_s = 0.0
        offset_s = min(offset_s, self.MAX_TTFT_OFFSET_S)
        if (prefill, decode, offset_s) == (self.prefill, self.decode, self.prefill_ttft_offset_s):
            return self
        return LatencyCorrection(prefill=prefill, decode=decode, prefill_ttft_offset_s=offset_s)

    def updated(self, role: Role, implied_factor: float | None) -> LatencyCorrection:
        """After one observation (``None``, NaN or non-positive: unchanged)."""
        if implied_factor is None or not math.isfinite(implied_factor) or implied_factor <= 0:
            return self
        target = min(max(implied_factor, self.MIN_FACTOR), self.MAX_FACTOR)
        old = self.factor(role)
        new = math.exp((1.0 - self.SMOOTHING) * math.log(old) + self.SMOOTHING * math.log(target))
        new = min(max(new, self.MIN_FACTOR), self.MAX_FACTOR)
        if role == "prefill":
            return replace(self, prefill=new)
        return replace(self, decode=new)

    def at_slowest(self) -> tuple[Role, ...]:
        """The roles whose factor sits at ``MAX_FACTOR`` (within ``AT_BOUND``: from the
        model's 1.0, six cycles of readings beyond the bound bring it there): their
        instances read at least that much slower than the model, so the readings went
        beyond what the correction takes, and the capacity it sizes with is too high."""
        return tuple(
            role
            for role in ("prefill", "decode")
            if self.factor(role) >= self.AT_BOUND * self.MAX_FACTOR
        )

    def with_ttft_offset(self, implied_offset_s: float | None, limit_s: float) -> LatencyCorrection:
        """After one observation of the TTFT outside the instances (``None`` or not
        finite: unchanged): the same EWMA as the factors', in seconds (an offset is
        added, not multiplied), bounded to ``[0, limit_s]`` (the TTFT SLO: beyond it
        no request could meet the SLO, and a larger reading is broken metrics)."""
        if implied_offset_s is None or not math.isfinite(implied_offset_s):
            return self
        target = min(max(implied_offset_s, 0.0), limit_s)
        old = self.prefill_ttft_offset_s
        new = (1.0 - self.SMOOTHING) * old + self.SMOOTHING * target
        return replace(self, prefill_ttft_offset_s=min(max(new, 0.0), limit_s))

    def within_ttft_slo(self, ttft_slo_s: float) -> LatencyCorrection:
        """Itself, the offset no larger than ``ttft_slo_s`` (a policy whose SLO was
        lowered since the offset was learnt)."""
        if self.prefill_ttft_offset_s <= ttft_slo_s:
            return self
        return replace(self, prefill_ttft_offset_s=ttft_slo_s)

    def to_extra(self) -> tuple[tuple[str, float], ...]:
        """As ``PolicyHistory.extra`` entries."""
        return (
            ("latency_factor_prefill", self.prefill),
            ("latency_factor_decode", self.decode),
            ("latency_offset_prefill_ttft_s", self.prefill_ttft_offset_s),
        )

    @classmethod
    def from_extra(cls, extra: Iterable[tuple[str, float]]) -> LatencyCorrection:
        values = dict(extra)
        return cls(
            prefill=float(values.get("latency_factor_prefill", 1.0)),
            decode=float(values.get("latency_factor_decode", 1.0)),
            prefill_ttft_offset_s=float(values.get("latency_offset_prefill_ttft_s", 0.0)),
        )


def implied_decode_factor(
    perf: InstancePerf,
    mix: RequestMix,
    observed_tbt_s: float,
    output_tps_per_instance: float,
) -> float | None:
    """The factor by which the real decode step is slower than the model's.

    At ``output_tps_per_instance`` with a step of ``observed_tbt_s``, an instance holds
    ``b = tps x tbt`` sequences (Little's law: every sequence emits one token per
    step); the model's step at that batch and the mix's live context is the
    prediction, and ``observed / predicted`` is the factor (the step scales with it
    one to one). ``None`` without load or latency to compare."""
    if not (observed_tbt_s > 0 and output_tps_per_instance > 0) or not perf.fits:
        return None
    if not (math.isfinite(observed_tbt_s) and math.isfinite(output_tps_per_instance)):
        return None
    batch = max(output_tps_per_instance * observed_tbt_s, 1.0)
    predicted = _step_s(perf, batch, mix.live_context_tokens, 1.0)
    return observed_tbt_s / predicted if predicted > 0 else None


def implied_prefill_factor(
    load: PrefillLoad, observed_ttft_s: float, alike_at_or_below: float | None = None
) -> float | None:
    """The factor at which the model's TTFT (:func:`predicted_ttft_s`) equals the
    observed one at the observed ``load``. Not the plain ratio of TTFTs: only the
    prefill part of TTFT scales with the instance's speed (transfer and the decode step
    do not), and near saturation the wait grows much faster than the speed factor, so
    a plain ratio would over-correct. TTFT grows with the factor, so bisection over
    ``[MIN_FACTOR, MAX_FACTOR]`` inverts it; outside that range the bound is
    returned. ``None`` without a usable observation.

    ``alike_at_or_below``: the caller treats every factor at or below it alike, so once
    the bracket's top is there the bisection stops and returns it (its answer, the
    geometric mean of a bracket within that top, could not be above it)."""
    if not (math.isfinite(observed_ttft_s) and observed_ttft_s > 0):
        return None
    prompt_tps_per_instance = load.prompt_tps_per_instance
    if not (math.isfinite(prompt_tps_per_instance) and prompt_tps_per_instance >= 0):
        return None
    quantile = load.quantile
    # The bisection's own queue (nothing else holds it), its factor set anew at every
    # step: the numbers of a copy per factor (``with_factor``), without the copies.
    queue = load.unloaded(1.0)

    def within(factor: float) -> bool:
        """Whether the model with ``factor`` predicts a TTFT quantile <= observed."""
        queue._set_factor(factor)
        if queue.empty:
            return False
        rho = prompt_tps_per_instance / queue.sustained_tps
        return rho < MAX_GGC_UTILISATION and queue.attainment(rho, observed_ttft_s) >= quantile

    lo, hi = LatencyCorrection.MIN_FACTOR, LatencyCorrection.MAX_FACTOR
    if not within(lo):
        return lo
    if within(hi):
        return hi
    floor = -math.inf if alike_at_or_below is None else alike_at_or_below
    for _ in range(_BISECTION_STEPS):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if within(mid) else (lo, mid)
        if hi <= floor:
            # ``sqrt(lo x hi) <= hi`` in floats too: ``lo x hi`` rounds to at most
            # ``hi x hi``, whose rounded square root is ``hi``.
            return hi
        if hi / lo - 1.0 < 1e-6:
            break
    return math.sqrt(lo * hi)


@dataclass(frozen=True)
class BusyReading:
    """What one window's busy fraction of prefill says (``read_prefill_busy``)."""

    factor: float  # how much slower (> 1) or faster (< 1) than the model it ran
    spread: float  # one reading's relative standard deviation (Poisson prompts)
    precise: bool  # within BUSY_READ_MAX_ERROR once the correction's EWMA averages it
    saturated: bool  # busy through the window with a queue: no spread at all

    @property
    def taught(self) -> float | None:
        """The factor, where the reading may teach it (precise, or saturated); None
        where it says too little (too few prompts for its precision: see
        ``BUSY_READ_MAX_ERROR``)."""
        return self.factor if self.precise or self.saturated else None

    @property
    def floor(self) -> float:
        """The least factor a reading too coarse to teach one still allows: its factor
        ``NOISE_SPREADS`` of its spreads low (a reading that noisy is below the true
        factor by more than that about one time in forty). The TTFT read alone, which
        the prompt buckets bias fast, may not take the correction below it: once
        over-provisioned, it pulled a slower prefill's factor back to the model's, and
        prefill cycled between overload and drain (azure-x10-engines-0.6x: 90.0%
        within both SLOs, 93.8% with this floor)."""
        return max(0.0, 1.0 - NOISE_SPREADS * self.spread) * self.factor


def read_prefill_busy(
    perf: InstancePerf,
    mix: RequestMix,
    prompt_tps: float,
    instances: int,
    gpu_util: float,
    backlogged: bool = False,
) -> BusyReading | None:
    """One window's busy-fraction reading of prefill: by what factor the real prefill
    instance is slower (> 1) or faster (< 1) than the model, from how busy it was at
    the prompt tokens/s it served. The GPU utilisation an engine's GPUs report is its
    busy fraction times the calibrated ``prefill_util_per_busy``, and the model's busy
    fraction at that rate is the rate's work over the instance's compute. Their ratio
    is the factor, faster or slower (which the TTFT tail cannot say of a faster
    instance), and what the mix's bucketing does to the work per token cancels in the
    throughput it corrects (the prediction and the capacity read the same one).
    ``prompt_tps`` is what the ``instances`` served together, and ``gpu_util`` their
    GPUs' mean, over one metrics window. None without usable figures.

    ``backlogged``: a queue held prompts through the window; then a reading of a busy
    pool needs no count of prompts: every second of it was busy whatever arrived, so
    its samples do not spread (the precision's premise is busy time set by Poisson
    arrivals within each sampled second), and the prompts it served are what the
    instances could do (``saturated``). Without it a prefill slower than the model at
    a moderate rate was never read slower: overloaded, no reading was taken, and the
    planner cycled between overload and drain (a hostile prober: 50.8% of chat's
    requests within both SLOs at 40 requests/s on 0.6x prefill engines)."""
    if not (
        math.isfinite(prompt_tps)
        and prompt_tps > 0
        and instances > 0
        and math.isfinite(gpu_util)
        and 0 < gpu_util <= 1.0
    ):
        return None
    shape = _cached_queue_shape(perf, mix.prompt, None)
    util_per_busy = float(perf.util.get("prefill_util_per_busy", 1.0))
    if shape.empty or not (util_per_busy > 0) or perf.prefill_capacity_work_per_s <= 0:
        return None
    prompts_per_s = prompt_tps / shape.mean_tokens
    smoothing = LatencyCorrection.SMOOTHING
    kept_variance = smoothing / (2.0 - smoothing)  # the EWMA's share of one reading's
    needed_per_s = (
        (1.0 + shape.service_scv)
        * kept_variance
        / (GAUGE_SAMPLES_PER_WINDOW * BUSY_READ_MAX_ERROR**2)
    )
    predicted_busy = (
        prompt_tps / instances * shape.work_per_token / perf.prefill_capacity_work_per_s
    )
    return BusyReading(
        factor=(gpu_util / util_per_busy) / predicted_busy,
        spread=math.sqrt((1.0 + shape.service_scv) / (GAUGE_SAMPLES_PER_WINDOW * prompts_per_s)),
        precise=prompts_per_s >= needed_per_s,
        saturated=backlogged and gpu_util / util_per_busy >= 1.0 - BUSY_READ_MAX_ERROR,
    )


# One busy reading as the planner keeps it: (at s, factor, spread), as ``BusyReading``.
KeptBusyReading = tuple[float, float, float]


def kept_busy_readings(
    kept: tuple[KeptBusyReading, ...],
    reading: BusyReading,
    now_s: float,
    window_s: float,
    memory_s: float,
) -> tuple[KeptBusyReading, ...]:
    """``kept`` (oldest first) with ``reading``, read at ``now_s`` over a metrics window
    of ``window_s``, added: not where its window overlaps the newest kept one's (the two
    share samples, so the pair is not two readings' worth), and without those read more
    than ``memory_s`` ago. A saturated reading is not kept: its factor needs no
    averaging, and its spread (that of a Poisson stream it did not see) would weigh it
    as if it did."""
    if reading.saturated or not (reading.spread > 0 and reading.factor > 0):
        return kept
    recent = tuple(r for r in kept if now_s - memory_s < r[0] <= now_s)
    if recent and now_s - recent[-1][0] < window_s:
        return recent
    # Four decimals: far finer than the 1 % steps the factor is used in
    # (``perf_context``), and a quarter of the durable state's bytes for them.
    spread = max(round(reading.spread, 4), 1e-4)
    return (*recent, (now_s, round(reading.factor, 4), spread))


def combined_busy_reading(kept: tuple[KeptBusyReading, ...]) -> BusyReading | None:
    """What the kept busy readings say together: their factors' inverse-variance
    weighted mean in log space (each reading's spread is its relative standard
    deviation, about its log's), newest first and only as many as it takes to come
    within ``BUSY_READ_MAX_ERROR`` (then ``precise``), or all of them (not precise: its
    ``floor`` still bounds the factor, closer than one reading's).

    Readings of non-overlapping windows are independent samples of one factor: n of
    spread s spread by s / sqrt(n), so a prefill serving too few prompts for one
    reading to teach its speed is still read within the error after (s / 0.05)^2
    windows (chat's prefill at 10-20 prompts/s: spread ~0.18, 13 windows). Taking the newest
    first forgets a speed that changed as soon as the newer readings suffice."""
    weight_sum = weighted_log_sum = 0.0
    for _at_s, factor, spread in reversed(kept):
        if not (0 < factor < math.inf and 0 < spread < math.inf):
            continue  # a damaged memory's entry (the durable state is read back)
        weight = 1.0 / (spread * spread)
        weight_sum += weight
        weighted_log_sum += weight * math.log(factor)
        if weight_sum * BUSY_READ_MAX_ERROR**2 >= 1.0:
            break
    if weight_sum <= 0:
        return None
    spread = 1.0 / math.sqrt(weight_sum)
    return BusyReading(
        factor=math.exp(weighted_log_sum / weight_sum),
        spread=spread,
        precise=spread <= BUSY_READ_MAX_ERROR,
        saturated=False,
    )


# --------------------------------------------------------------------------- together


@dataclass(frozen=True)
class RoleCapacities:
    """Per-instance capacity of both roles for one service, and why."""

    prefill_gpu_type: str
    decode_gpu_type: str
    prefill: PrefillCapacity
    decode: DecodeCapacity
    correction: LatencyCorrection
    prompt_mean_tokens: float
    output_mean_tokens: float

    @property
    def prefill_tps_per_instance(self) -> float:
        return self.prefill.tps_per_instance

    @property
    def decode_tps_per_instance(self) -> float:
        return self.decode.tps_per_instance

    def tps_per_instance(self, role: Role) -> float:
        """``role``'s tokens/s per instance (prompt for prefill, output for decode)."""
        return self.prefill.tps_per_instance if role == "prefill" else self.decode.tps_per_instance

    def keeps_up_only(self, role: Role) -> bool:
        """No rate of ``role`` meets its SLO: its capacity only keeps up with the work."""
        return self.prefill.keeps_up_only if role == "prefill" else self.decode.keeps_up_only

    def explain(self) -> str:
        """One line for the decision's reasons (written once: the capacities are
        cached, and every decision sized with them says the same)."""
        return cached_on(self, "explain", self._explain)

    def _explain(self) -> str:
        p, d, lost = self.prefill, self.decode, self.prefill.unattainable
        unattainable_text = (
            f"; {lost.share:.2%} of requests unattainable (prompts > "
            f"{lost.above_prompt_tokens:.0f} tokens miss TTFT even on an idle instance)"
            if lost.above_prompt_tokens is not None
            else ""
        )
        if p.keeps_up_only:
            unattainable_text += ": prefill sized to keep up with the work, not the TTFT"
        if d.keeps_up_only:
            unattainable_text += "; no batch meets the TBT: decode sized to keep up with the work"
        offset_s = self.correction.prefill_ttft_offset_s
        offset_text = (
            f", TTFT +{offset_s * 1000:.0f} ms outside the instances" if offset_s >= 0.0005 else ""
        )
        return (
            f"capacity from the model for prompts ~{self.prompt_mean_tokens:.0f} / outputs "
            f"~{self.output_mean_tokens:.0f} tokens: prefill {p.tps_per_instance:.0f} prompt "
            f"tokens/s per {self.prefill_gpu_type} instance ({p.utilisation:.0%} busy at "
            f"{p.instances} instances, TTFT q {p.ttft_quantile_s * 1000:.0f} ms), decode "
            f"{d.tps_per_instance:.0f} output tokens/s per {self.decode_gpu_type} instance "
            f"(batch {d.batch:.0f}, step {d.step_s * 1000:.1f} ms, bound by {d.limit}); "
            f"latency factors prefill x{self.correction.prefill:.2f}, decode "
            f"x{self.correction.decode:.2f}{offset_text}{unattainable_text}"
        )


def role_capacities(
    prefill_perf: InstancePerf,
    decode_perf: InstancePerf,
    mix: RequestMix,
    *,
    ttft_slo_s: float,
    tbt_slo_s: float,
    quantile: float,
    link_gbps: float,
    prefill_instances_hint: int,
    correction: LatencyCorrection | None = None,
    ttft_share: float | None = None,
) -> RoleCapacities:
    """Both roles' capacity for ``mix``: decode first, since its step time at the
    operating point is the TTFT's last part (the first token). Prefill meets the TTFT
    SLO for ``ttft_share`` of the attainable requests (default the SLO ``quantile``)."""
    correction = correction or LatencyCorrection()
    decode = decode_capacity(decode_perf, mix, tbt_slo_s, correction.decode)
    # What every request's TTFT holds besides prefill's own queue, work and transfer:
    # its first decode step, and the TTFT spent outside the instances (both added).
    first_step_s = (
        decode.step_s if decode.step_s > 0 else tbt_slo_s
    ) + correction.prefill_ttft_offset_s
    prefill = prefill_capacity(
        prefill_perf,
        mix,
        ttft_slo_s,
        quantile if ttft_share is None else ttft_share,
        transfer_s_per_token(prefill_perf.kv_bytes_per_token, link_gbps),
        first_step_s,
        prefill_instances_hint,
        correction.prefill,
    )
    return RoleCapacities(
        prefill_gpu_type=prefill_perf.gpu_type,
        decode_gpu_type=decode_perf.gpu_type,
        prefill=prefill,
        decode=decode,
        correction=correction,
        prompt_mean_tokens=mix.prompt_mean_tokens,
        output_mean_tokens=mix.output_mean_tokens,
    )

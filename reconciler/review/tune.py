"""Policy curation by stress test (HeteroScale paper, section on policy curation):
sweep the prefill/decode split of a fixed GPU budget in the simulator, find the
throughput under SLO of each split (a bell-shaped curve over the P/D ratio), and
derive a service's ``pd_ratio.target`` from the peak. ``heteroscale tune``
(``reconciler.commands.tune``) prints, verifies and writes it back.

What else it does depends on the autoscaler the service runs under:

- ``heteroscale`` (the default planner) derives each role's capacity per instance from
  the performance model every cycle, so tune *checks* that derivation instead of
  searching for targets: :func:`check_capacity` sets the capacity the planner derives
  for the sweep's request mix beside what the sweep measured at its best split (and
  beside any ``target_per_instance`` override the policy sets), and says where they
  part by more than ``CAPACITY_CHECK_TOLERANCE``.
- ``heteroscale-paper`` scales on hand-set targets: tune also derives
  ``scaling.target_per_instance`` and ``scaling.prefill_target_per_instance`` from the
  peak (steps 4 and 4a below).

Method and assumptions:

1. **The split sweep.** A GPU budget (default: the GPUs of 16 instances, half of
   each role's ``gpus_per_instance``-sized instances, i.e. ``8 x (gpus_prefill +
   gpus_decode)``) is divided into ``P`` prefill and ``D`` decode instances for every
   ``P`` whose ratio ``P/D`` lies in [1:6, 6:1] and whose counts respect the roles'
   ``min_instances``/``max_instances``; ``D`` takes all GPUs ``P`` leaves (whole
   instances; a remainder smaller than one decode instance stays unused). Each split
   runs with fixed counts (the ``static-peak`` autoscaler, through
   ``reconciler.sim.evaluate.run_autoscaler``: placed by the real placer, warm,
   serving from time 0) on a *flat* Poisson load of ``duration_s`` (default 600 s).
2. **Throughput under SLO.** For each split, the highest request rate at which both
   the TTFT and the TBT attainment (share of requests meeting each SLO, dropped ones
   failing) reach ``slo.attainment_goal`` (TTFT's read over the requests an idle
   instance could serve in time: ``Probe.ttft_goal``) is found by bracketing (x1.5 steps from
   the analytic estimate of ``role_capacity``) and bisection to ``rate_tolerance``
   (default 3 %). Attainment falls with the rate, and every probe of a split replays
   the *same* random stream (common random numbers: a unit-rate Poisson process
   whose times are divided by the rate, with the same request lengths in the same
   order), so the bisection is not fooled by noise between probes. Throughput under
   SLO is the served output tokens/s at that rate, measured after the first minute
   (the warm-up of the decode batches). The request lengths are resampled (prompt and
   output together) from ``--trace`` when given, else from the service's synthetic
   shape (``reconciler.sim.workload.shape_for_service``).
3. **The P/D target** is the ratio of the split with the highest throughput, clamped
   into the service's [pd_ratio.min, pd_ratio.max] with a warning when the optimum
   lies outside (or, with ``widen_bounds``, the bound moved to the optimum).
4. **The per-instance target.** At the best split, the per-instance tokens/s of the
   scaled role at the SLO-limited rate is the capacity the coordinated policy sees
   when a ratio-keeping fleet reaches its SLO limit (decode output tokens/s per
   decode instance for ``metric: decode_tps``, prompt tokens/s per prefill instance
   for ``prefill_tps``). The policy acts only once the observed per-instance load
   exceeds ``target x (1 + tolerance)``, and what it adds serves a start-up time
   later, so the recommendation is ``capacity x (1 - headroom) / (1 + tolerance)``:
   the tolerance band fits below the SLO limit, and the headroom (default 10 %)
   covers the load's growth while new instances start. Rounded to 50 tokens/s.
   Utilisation and latency metrics get no target recommendation.
4a. **The prefill floor target** (``scaling.prefill_target_per_instance``, used by
   the coordinated policy only with a decode-driven metric, so recommended only
   then): prompt tokens/s per prefill instance at the best split's SLO-limited rate,
   through the same formula and rounding. At the peak of the bell both roles are
   near their limits; where decode binds first the figure sits below prefill's own
   limit, so the floor errs towards more prefill, never less.
5. **Verification** replays the service's autoscaler (``heteroscale`` or
   ``heteroscale-paper``) with the current and the recommended values on the same load (``reconciler.sim.evaluate.evaluate``) so the
   GPU-hours and attainment of both read side by side.
6. **Write-back** (``write_back``) edits only the changed values, as text, with
   ``reconciler.desired.roundtrip.set_value`` (comments, order, quoting, flow or block
   style, indentation, line endings and a BOM kept), so the file's diff is exactly the
   recommended lines; a key the file lacks (``prefill_target_per_instance`` in an
   older file) is inserted after its sibling (``target_per_instance``), the comment
   lines below that sibling staying with the key they introduce. The comments that
   described the old values give way to one note per line (``refresh_comments``), so a
   second write of the same values changes nothing. A file it cannot edit safely (a
   value an alias shares, several documents) is refused, named and located.

Everything here is pure computation over the desired state and the simulator; the
command module does the file and terminal I/O.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from reconciler.desired.loader import DesiredState
from reconciler.desired.models import ServicePolicy
from reconciler.desired.ratio import format_ratio, parse_ratio
from reconciler.desired.roundtrip import refresh_comments, set_value
from reconciler.errors import PermanentError
from reconciler.placement.base import Placer
from reconciler.policy import CoordinatedAutoscaler, PlannerAutoscaler, make_autoscaler
from reconciler.policy.baselines import policy_tps_targets
from reconciler.policy.capacity import ENGINE_LENGTH_BOUNDS, LatencyCorrection, RequestMix
from reconciler.policy.coordinated import policy_numbers
from reconciler.policy.gpu_economics import RoleEconomics, role_economics
from reconciler.policy.planner import capacities_for, perf_context
from reconciler.sim.engine import LoadProfile, SimConfig
from reconciler.sim.evaluate import (
    PolicyResult,
    compare_results,
    default_placer,
    evaluate,
    percent_text,
    role_capacity,
    run_autoscaler,
)
from reconciler.sim.workload import Workload, shape_for_service, synthetic_workload

DEFAULT_INSTANCES = 16
DEFAULT_DURATION_S = 600
DEFAULT_RATE_TOLERANCE = 0.03
DEFAULT_HEADROOM = 0.1
MIN_SWEEP_RATIO = 1.0 / 6.0
MAX_SWEEP_RATIO = 6.0
TARGET_STEP_TPS = 50
WARMUP_S = 60  # first minute of a flat run: decode batches still filling
BRACKET_FACTOR = 1.5
MAX_BRACKET_STEPS = 12
# The autoscalers tune can curate for: the default planner (checks its derived
# capacity) and the paper policy (derives its hand-set targets).
PLANNER = PlannerAutoscaler.name
PAPER = CoordinatedAutoscaler.name
TUNED_AUTOSCALERS = (PLANNER, PAPER)
# Derived and measured capacity further apart than this are reported: the planner's
# latency correction bounds what a wrong model costs, but not by much more (its
# smoothing takes a few cycles to move), and the issue's own check of the model
# against the simulator's saturation point allows 10%.
CAPACITY_CHECK_TOLERANCE = 0.10
# Length pool for a service without a trace: enough requests that resampling does
# not repeat a visible pattern over a 600 s run.
SYNTHETIC_POOL_HOURS = 0.25
SYNTHETIC_POOL_RPS = 20.0
_CHUNK = 8192  # arrivals drawn per block: a longer run extends a shorter one's stream


class TuneError(PermanentError):
    """The sweep cannot run as asked (no split fits the budget, unknown service...)."""


# --------------------------------------------------------------------------- load


def length_pool(policy: ServicePolicy, trace: Workload | None, seed: int = 0) -> Workload:
    """The (prompt, output) pairs the sweep resamples: the trace's, else the service's
    synthetic shape."""
    if trace is not None:
        if trace.requests == 0:
            raise TuneError(f"trace '{trace.name}' has no requests")
        return trace
    return synthetic_workload(
        shape_for_service(policy.name),
        hours=SYNTHETIC_POOL_HOURS,
        peak_rps=SYNTHETIC_POOL_RPS,
        seed=seed,
        trough_ratio=1.0,
        bursts=(),
    )


def flat_workload(pool: Workload, rate_rps: float, duration_s: int, seed: int = 0) -> Workload:
    """A Poisson arrival stream at ``rate_rps`` for ``duration_s`` with lengths drawn
    from ``pool``. Common random numbers: the same seed gives the same unit-rate
    stream and the same length picks at every rate (module docstring)."""
    if not rate_rps > 0:
        raise ValueError(f"rate must be positive, got {rate_rps}")
    unit_horizon = rate_rps * duration_s
    arrival_rng = np.random.default_rng([seed, 0x7A5E])
    pick_rng = np.random.default_rng([seed, 0x91C4])
    units: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    end = 0.0
    while end <= unit_horizon:
        block = end + np.cumsum(arrival_rng.exponential(1.0, _CHUNK))
        units.append(block)
        picks.append(pick_rng.integers(0, pool.requests, _CHUNK))
        end = float(block[-1])
    unit = np.concatenate(units)
    pick = np.concatenate(picks)
    count = int(np.searchsorted(unit, unit_horizon))
    return Workload(
        unit[:count] / rate_rps,
        pool.prompt_tokens[pick[:count]],
        pool.output_tokens[pick[:count]],
        name=f"flat {rate_rps:.3g} req/s",
    )


def flat_profile(
    pool: Workload, rate_rps: float, duration_s: int, seed: int, config: SimConfig
) -> LoadProfile:
    return LoadProfile.from_workload(
        flat_workload(pool, rate_rps, duration_s, seed),
        horizon_s=duration_s,
        length_classes=config.length_classes,
        sample_limit=config.request_sample_limit,
        seed=seed,
    )


# --------------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class SweepSettings:
    """How hard the stress test works (defaults: module docstring)."""

    gpus: int | None = None  # the budget; None: DEFAULT_INSTANCES instances' worth
    duration_s: int = DEFAULT_DURATION_S
    rate_tolerance: float = DEFAULT_RATE_TOLERANCE
    min_ratio: float = MIN_SWEEP_RATIO
    max_ratio: float = MAX_SWEEP_RATIO
    seed: int = 0
    interval_s: float = 30.0

    def budget_gpus(self, policy: ServicePolicy) -> int:
        if self.gpus is not None:
            return self.gpus
        per_pair = policy.prefill.gpus_per_instance + policy.decode.gpus_per_instance
        return DEFAULT_INSTANCES // 2 * per_pair


QUICK_SETTINGS = SweepSettings(duration_s=300, rate_tolerance=0.06)


@dataclass(frozen=True)
class Probe:
    """One flat run of one split at one rate."""

    rate_rps: float
    ttft_attainment: float
    tbt_attainment: float
    output_tps: float  # served, after warm-up
    prompt_tps: float
    placement_shortfalls: int
    # Requests that miss TTFT even on an idle instance: no split serves them in time,
    # so they count against TTFT at every rate and the goal is read over the rest.
    unattainable_share: float = 0.0

    def ttft_goal(self, goal: float) -> float:
        """The TTFT attainment that reaches ``goal`` of the attainable requests."""
        return goal * (1.0 - self.unattainable_share)

    def meets(self, goal: float) -> bool:
        return (
            self.placement_shortfalls == 0
            and self.ttft_attainment >= self.ttft_goal(goal)
            and self.tbt_attainment >= goal
        )


@dataclass(frozen=True)
class SplitResult:
    """The throughput under SLO of one prefill/decode split."""

    prefill: int
    decode: int
    gpus: int
    best: Probe | None  # the highest rate meeting the SLOs; None: not even the lowest
    first_failing: Probe | None  # the lowest rate probed that failed
    probes: int
    feasible: bool  # placed in full (the cluster holds the split)

    @property
    def ratio(self) -> float:
        return self.prefill / self.decode

    @property
    def max_rate_rps(self) -> float:
        return self.best.rate_rps if self.best else 0.0

    @property
    def throughput_tps(self) -> float:
        """Served output tokens/s at the SLO-limited rate."""
        return self.best.output_tps if self.best else 0.0

    @property
    def decode_tps_per_instance(self) -> float:
        return self.throughput_tps / self.decode

    @property
    def prefill_tps_per_instance(self) -> float:
        return (self.best.prompt_tps if self.best else 0.0) / self.prefill

    def limited_by(self, goal: float) -> str:
        """What failed just above the SLO-limited rate: TTFT, TBT, both, or placement."""
        if not self.feasible:
            return "placement"
        probe = self.first_failing
        if probe is None:
            return "-"
        failed = [
            label
            for label, value, needed in (
                ("TTFT", probe.ttft_attainment, probe.ttft_goal(goal)),
                ("TBT", probe.tbt_attainment, goal),
            )
            if value < needed
        ]
        return "+".join(failed) or "-"


@dataclass(frozen=True)
class Sweep:
    service: str
    workload: str  # where the lengths came from
    budget_gpus: int
    duration_s: int
    attainment_goal: float
    splits: tuple[SplitResult, ...]  # by increasing P/D ratio

    @property
    def best_index(self) -> int:
        scores = [s.throughput_tps if s.feasible else -1.0 for s in self.splits]
        return int(np.argmax(scores))

    @property
    def best(self) -> SplitResult:
        return self.splits[self.best_index]

    @property
    def has_interior_peak(self) -> bool:
        """The bell: the best split is strictly better than both ends of the sweep."""
        i = self.best_index
        top = self.splits[i].throughput_tps
        return (
            0 < i < len(self.splits) - 1
            and self.splits[0].throughput_tps < top
            and self.splits[-1].throughput_tps < top
        )


def split_candidates(
    policy: ServicePolicy, budget_gpus: int, min_ratio: float, max_ratio: float
) -> list[tuple[int, int]]:
    """Every (prefill, decode) instance split of the budget inside the ratio range and
    the roles' instance bounds, by increasing prefill count (module docstring)."""
    gp, gd = policy.prefill.gpus_per_instance, policy.decode.gpus_per_instance
    out = []
    for prefill in range(1, budget_gpus // gp + 1):
        decode = (budget_gpus - prefill * gp) // gd
        if decode < 1:
            break
        if not (min_ratio - 1e-9 <= prefill / decode <= max_ratio + 1e-9):
            continue
        bounds_ok = (
            policy.prefill.min_instances <= prefill <= policy.prefill.max_instances
            and policy.decode.min_instances <= decode <= policy.decode.max_instances
        )
        if bounds_ok:
            out.append((prefill, decode))
    return out


def probe_split(
    state: DesiredState,
    service: str,
    pool: Workload,
    prefill: int,
    decode: int,
    rate_rps: float,
    settings: SweepSettings,
    config: SimConfig,
    placer: Placer,
) -> Probe:
    """Run one split with fixed counts on a flat load at ``rate_rps``."""
    profile = flat_profile(pool, rate_rps, settings.duration_s, settings.seed, config)
    result = run_autoscaler(
        state,
        service,
        profile,
        make_autoscaler("static-peak", prefill=prefill, decode=decode),
        name=f"{prefill}P+{decode}D",
        config=config,
        placer=placer,
        interval_s=settings.interval_s,
    )
    return Probe(
        rate_rps=rate_rps,
        ttft_attainment=result.ttft_attainment,
        tbt_attainment=result.tbt_attainment,
        output_tps=_steady_mean(result, "decode_tps"),
        prompt_tps=_steady_mean(result, "prefill_tps"),
        placement_shortfalls=result.placement_shortfalls,
        unattainable_share=result.unattainable_share,
    )


def _steady_mean(result: PolicyResult, series: str) -> float:
    values = np.asarray(result.timeline[series], dtype=float)
    skip = WARMUP_S // 60 if len(values) > WARMUP_S // 60 else 0
    steady = values[skip:]
    return float(np.nanmean(steady)) if steady.size else 0.0


def max_rate_under_slo(
    state: DesiredState,
    service: str,
    pool: Workload,
    prefill: int,
    decode: int,
    settings: SweepSettings,
    config: SimConfig,
    placer: Placer,
    estimate_rps: float,
) -> SplitResult:
    """Bracket (from ``estimate_rps``) and bisect the highest rate meeting both SLOs
    (module docstring)."""
    policy = state.policies[service]
    goal = policy.slo.attainment_goal
    probes = 0

    def run(rate: float) -> Probe:
        nonlocal probes
        probes += 1
        return probe_split(state, service, pool, prefill, decode, rate, settings, config, placer)

    gpus = prefill * policy.prefill.gpus_per_instance + decode * policy.decode.gpus_per_instance
    first = run(estimate_rps)
    if first.placement_shortfalls:
        return SplitResult(prefill, decode, gpus, None, first, probes, feasible=False)
    passing: Probe | None = first if first.meets(goal) else None
    failing: Probe | None = None if first.meets(goal) else first
    for _ in range(MAX_BRACKET_STEPS):
        if passing is not None and failing is not None:
            break
        if passing is not None:
            probe = run(passing.rate_rps * BRACKET_FACTOR)
        else:
            assert failing is not None
            probe = run(failing.rate_rps / BRACKET_FACTOR)
        if probe.meets(goal):
            passing = probe
        else:
            failing = probe
    if passing is None or failing is None:
        # Never met (or never broke) the SLOs over MAX_BRACKET_STEPS x1.5 steps:
        # report what was found rather than guess.
        return SplitResult(prefill, decode, gpus, passing, failing, probes, feasible=True)
    while (failing.rate_rps - passing.rate_rps) > settings.rate_tolerance * passing.rate_rps:
        probe = run((passing.rate_rps + failing.rate_rps) / 2.0)
        if probe.meets(goal):
            passing = probe
        else:
            failing = probe
    return SplitResult(prefill, decode, gpus, passing, failing, probes, feasible=True)


SweepProgress = Callable[[int, int], None]


def sweep_splits(
    state: DesiredState,
    service: str,
    pool: Workload,
    settings: SweepSettings | None = None,
    *,
    config: SimConfig | None = None,
    placer: Placer | None = None,
    progress: SweepProgress | None = None,
) -> Sweep:
    """The stress test: throughput under SLO of every split of the budget."""
    if service not in state.policies:
        raise TuneError(f"unknown service '{service}' (known: {', '.join(sorted(state.policies))})")
    settings = settings or SweepSettings()
    config = config or SimConfig()
    placer = placer or default_placer()
    policy = state.policies[service]
    budget = settings.budget_gpus(policy)
    candidates = split_candidates(policy, budget, settings.min_ratio, settings.max_ratio)
    if len(candidates) < 3:
        raise TuneError(
            f"a budget of {budget} GPUs gives {len(candidates)} prefill/decode split(s) of "
            f"'{service}' between {format_ratio(settings.min_ratio)} and "
            f"{format_ratio(settings.max_ratio)} inside its instance bounds; a sweep needs "
            f"at least 3 (prefill {policy.prefill.gpus_per_instance} and decode "
            f"{policy.decode.gpus_per_instance} GPUs per instance): raise --gpus"
        )
    # The analytic capacity of each role for these lengths seeds every bracket.
    lengths = LoadProfile.from_workload(
        pool, length_classes=config.length_classes, sample_limit=config.request_sample_limit
    )
    capacity = role_capacity(state, policy, lengths, config)
    prefill_rps = capacity.prefill_tps / lengths.prompt_mean
    decode_rps = capacity.decode_tps / lengths.output_mean
    results = []
    for done, (prefill, decode) in enumerate(candidates):
        if progress is not None:
            progress(done, len(candidates))
        estimate = min(prefill * prefill_rps, decode * decode_rps)
        results.append(
            max_rate_under_slo(
                state, service, pool, prefill, decode, settings, config, placer, estimate
            )
        )
    if progress is not None:
        progress(len(candidates), len(candidates))
    if not any(r.feasible and r.best is not None for r in results):
        raise TuneError(
            f"no split of {budget} GPUs meets the SLOs of '{service}' at any rate "
            "(check the SLOs, the GPU types, or the cluster's free capacity)"
        )
    return Sweep(
        service=service,
        workload=pool.name,
        budget_gpus=budget,
        duration_s=settings.duration_s,
        attainment_goal=policy.slo.attainment_goal,
        splits=tuple(results),
    )


# --------------------------------------------------------------------------- recommend


@dataclass(frozen=True)
class ValueChange:
    """One value to write into the service file."""

    key_path: tuple[str, ...]
    old_text: str
    new_text: str
    value: Any  # what set_value writes

    @property
    def key(self) -> str:
        return ".".join(self.key_path)


@dataclass(frozen=True)
class Recommendation:
    service: str
    pd_ratio_target: float
    pd_ratio_min: float
    pd_ratio_max: float
    optimum_ratio: float  # the sweep's best split, before clamping
    metric: str
    capacity_per_instance: float | None  # tokens/s of the scaled role at the SLO limit
    target_per_instance: float | None  # None: metric not a TPS (no recommendation)
    headroom: float
    tolerance: float  # scaling.tolerance the target leaves room for
    changes: tuple[ValueChange, ...]
    warnings: tuple[str, ...] = ()
    # The prefill floor (module docstring, 4a); None: the metric drives prefill.
    prefill_capacity_per_instance: float | None = None  # prompt tokens/s at the SLO limit
    prefill_target_per_instance: float | None = None


def round_target(tps: float, step: int = TARGET_STEP_TPS) -> int:
    return max(step, round(tps / step) * step)


def _same_ratio(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(a, b)


def recommend(
    policy: ServicePolicy,
    sweep: Sweep,
    headroom: float = DEFAULT_HEADROOM,
    *,
    widen_bounds: bool = False,
    hand_targets: bool = False,
) -> Recommendation:
    """The P/D target from the sweep and, with ``hand_targets`` (a service under
    ``heteroscale-paper``), the per-instance targets (module docstring). Without it the
    measured capacities are still reported, but no target is recommended: the default
    planner derives capacity itself, and a target would override that."""
    if not 0 <= headroom < 1:
        raise TuneError(f"headroom must be in [0, 1), got {headroom}")
    best = sweep.best
    ratios = policy.pd_ratio
    optimum = parse_ratio(format_ratio(best.ratio))
    target, low, high = optimum, ratios.min, ratios.max
    warnings: list[str] = []
    outside = optimum < ratios.min or optimum > ratios.max
    if outside:
        bound_key = "min" if optimum < ratios.min else "max"
        bound = ratios.min if bound_key == "min" else ratios.max
        if widen_bounds:
            low, high = min(low, optimum), max(high, optimum)
            warnings.append(
                f"the best P/D ratio {format_ratio(optimum)} lies outside "
                f"[{format_ratio(ratios.min)}, {format_ratio(ratios.max)}]: "
                f"pd_ratio.{bound_key} widened to it"
            )
        else:
            target = bound
            warnings.append(
                f"the best P/D ratio {format_ratio(optimum)} lies outside "
                f"[{format_ratio(ratios.min)}, {format_ratio(ratios.max)}]: target clamped to "
                f"pd_ratio.{bound_key} {format_ratio(bound)} (--widen-bounds moves the bound)"
            )
    metric = policy.scaling.metric
    capacity: float | None
    if metric == "decode_tps":
        capacity = best.decode_tps_per_instance
    elif metric == "prefill_tps":
        capacity = best.prefill_tps_per_instance
    else:
        capacity = None
        if hand_targets:
            warnings.append(
                f"scaling.metric is {metric}: the sweep measures tokens/s, so "
                "scaling.target_per_instance is left as it is"
            )
    tolerance = policy.scaling.tolerance
    per_instance = (
        round_target(capacity * (1.0 - headroom) / (1.0 + tolerance))
        if capacity and hand_targets
        else None
    )
    # The floor applies only under a decode-driven metric (the policy's own rule).
    prefill_capacity: float | None = None
    prefill_per_instance: int | None = None
    if policy_numbers(policy).driven_role == "decode":
        prefill_capacity = best.prefill_tps_per_instance
        if prefill_capacity > 0 and hand_targets:
            prefill_per_instance = round_target(
                prefill_capacity * (1.0 - headroom) / (1.0 + tolerance)
            )

    changes: list[ValueChange] = []
    for key, old, new in (("target", ratios.target, target), ("min", ratios.min, low)):
        if not _same_ratio(old, new):
            changes.append(
                ValueChange(
                    ("pd_ratio", key), format_ratio(old), format_ratio(new), format_ratio(new)
                )
            )
    if not _same_ratio(ratios.max, high):
        changes.append(
            ValueChange(
                ("pd_ratio", "max"),
                format_ratio(ratios.max),
                format_ratio(high),
                format_ratio(high),
            )
        )
    current = policy.scaling.target_per_instance
    if per_instance is not None and (current is None or not math.isclose(current, per_instance)):
        changes.append(
            ValueChange(
                ("scaling", "target_per_instance"),
                "unset" if current is None else f"{current:g}",
                f"{per_instance:g}",
                per_instance,
            )
        )
    current_prefill = policy.scaling.prefill_target_per_instance
    if prefill_per_instance is not None and (
        current_prefill is None or not math.isclose(current_prefill, prefill_per_instance)
    ):
        changes.append(
            ValueChange(
                ("scaling", "prefill_target_per_instance"),
                "unset" if current_prefill is None else f"{current_prefill:g}",
                f"{prefill_per_instance:g}",
                prefill_per_instance,
            )
        )
    return Recommendation(
        service=policy.name,
        pd_ratio_target=target,
        pd_ratio_min=low,
        pd_ratio_max=high,
        optimum_ratio=optimum,
        metric=metric,
        capacity_per_instance=capacity,
        target_per_instance=per_instance,
        headroom=headroom,
        tolerance=tolerance,
        changes=tuple(changes),
        warnings=tuple(warnings),
        prefill_capacity_per_instance=prefill_capacity,
        prefill_target_per_instance=prefill_per_instance,
    )


def with_recommendation(policy: ServicePolicy, recommendation: Recommendation) -> ServicePolicy:
    """The policy with the recommended values (for the verification replay)."""
    pd_ratio = policy.pd_ratio.model_copy(
        update={
            "target": recommendation.pd_ratio_target,
            "min": recommendation.pd_ratio_min,
            "max": recommendation.pd_ratio_max,
        }
    )
    scaling = policy.scaling
    if recommendation.target_per_instance is not None:
        scaling = scaling.model_copy(
            update={"target_per_instance": float(recommendation.target_per_instance)}
        )
    if recommendation.prefill_target_per_instance is not None:
        scaling = scaling.model_copy(
            update={
                "prefill_target_per_instance": float(recommendation.prefill_target_per_instance)
            }
        )
    return policy.model_copy(update={"pd_ratio": pd_ratio, "scaling": scaling})


# --------------------------------------------------------------------------- capacity check


@dataclass(frozen=True)
class CapacityCheck:
    """One role's capacity per instance as the default planner derives it from the
    performance model for the sweep's request mix, beside what the sweep measured at
    its best split and beside the policy's override, if it sets one.

    The measured figure is the role's tokens/s per instance at the best split's
    SLO-limited rate; it is the role's capacity only when that role's SLO is what failed
    just above that rate (``limiting``), and a lower bound of it otherwise."""

    role: str  # "prefill" or "decode"
    gpu_type: str
    derived_tps: float
    measured_tps: float
    limiting: bool
    override_tps: float | None

    @property
    def derived_vs_measured(self) -> float:
        return self.derived_tps / self.measured_tps if self.measured_tps > 0 else math.inf

    def line(self) -> str:
        unit = "prompt" if self.role == "prefill" else "output"
        text = (
            f"{self.role} capacity per {self.gpu_type} instance: derived from the model "
            f"{self.derived_tps:,.0f} {unit} tokens/s, measured at the SLO limit "
            f"{self.measured_tps:,.0f} ({self.derived_vs_measured:.2f}x"
            + ("" if self.limiting else f"; {self.role} did not limit the best split")
            + ")"
        )
        if self.override_tps is not None:
            text += f"; the policy overrides it with {self.override_tps:,.0f}"
        return text

    def warnings(self) -> list[str]:
        out: list[str] = []
        ratio = self.derived_vs_measured
        if self.limiting and ratio > 1.0 + CAPACITY_CHECK_TOLERANCE:
            out.append(
                f"the model overestimates {self.role} capacity by {100 * (ratio - 1):.0f}% on "
                "this mix: the planner relies on its latency correction to find the SLO "
                "limit, and under-provisions until it has"
            )
        if self.limiting and ratio < 1.0 - CAPACITY_CHECK_TOLERANCE:
            out.append(
                f"the model underestimates {self.role} capacity by {100 * (1 - ratio):.0f}% on "
                "this mix: the planner provisions more than the SLO needs until its latency "
                "correction catches up (prefill takes only evidence of a slower instance)"
            )
        if (
            self.override_tps is not None
            and self.override_tps > self.measured_tps
            and self.limiting
        ):
            out.append(
                f"the {self.role} override {self.override_tps:,.0f} tokens/s per instance is "
                f"above the measured capacity at the SLO limit ({self.measured_tps:,.0f}): "
                "sizing on it misses the SLO; remove it to let the planner derive capacity"
            )
        return out


def engine_mix(pool: Workload) -> RequestMix:
    """``pool``'s request mix binned as the engines export it: what the planner reads."""
    return RequestMix.from_samples(pool.prompt_tokens, pool.output_tokens, ENGINE_LENGTH_BOUNDS)


def check_capacity(
    state: DesiredState, service: str, sweep: Sweep, pool: Workload
) -> tuple[CapacityCheck, ...]:
    """The default planner's derived capacity for ``pool``'s request mix (binned as the
    engines export it) against the sweep's best split, per role (``CapacityCheck``).
    Empty when the planner cannot size the service (no allowed GPU type fits)."""
    policy = state.policies[service]
    perf = perf_context(policy, state.clusters[policy.cluster])
    if perf is None:
        return ()
    mix = engine_mix(pool)
    best = sweep.best
    derived = capacities_for(policy, perf, mix, max(1, best.prefill), LatencyCorrection())
    limited = best.limited_by(sweep.attainment_goal)
    prefill_override, decode_override = policy_tps_targets(policy)
    return (
        CapacityCheck(
            "prefill",
            derived.prefill_gpu_type,
            derived.prefill_tps_per_instance,
            best.prefill_tps_per_instance,
            "TTFT" in limited,
            prefill_override,
        ),
        CapacityCheck(
            "decode",
            derived.decode_gpu_type,
            derived.decode_tps_per_instance,
            best.decode_tps_per_instance,
            "TBT" in limited,
            decode_override,
        ),
    )


def gpu_type_economics(
    state: DesiredState, service: str, sweep: Sweep, pool: Workload
) -> tuple[RoleEconomics, RoleEconomics]:
    """What each GPU type the roles allow delivers per unit of the cluster's currency
    for ``pool``'s request mix, at the best split's prefill pool size
    (``reconciler.policy.gpu_economics``): a preference that costs more per token than
    another allowed type is reported."""
    policy = state.policies[service]
    cluster = state.clusters[policy.cluster]
    return role_economics(
        policy,
        cluster,
        engine_mix(pool),
        prefill_instances=max(1, sweep.best.prefill),
        running=perf_context(policy, cluster),
    )


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Verification:
    """The heteroscale policy replayed with the current and the recommended values."""

    load: str
    horizon_s: int
    requests: float
    current: PolicyResult
    recommended: PolicyResult | None  # None: nothing changes
    attainment_goal: float

    def verdict(self) -> str:
        if self.recommended is None:
            return "the recommendation equals the current values: nothing to replay"
        return compare(self.current, self.recommended, self.attainment_goal)

    def shortfall(self) -> str | None:
        """Why the recommended values must not be written, or None when they may: they
        must keep both SLOs for the goal's share of the requests any fleet could serve
        in time (those missing TTFT even on an idle instance are out of reach) on the
        verification day, and must not cost more than the current values unless the
        current ones miss the goal."""
        recommended = self.recommended
        if recommended is None:
            return None
        goal = self.attainment_goal * (1.0 - recommended.unattainable_share)
        reached = recommended.slo_attainment >= goal
        if not reached:
            return (
                f"the recommended values keep both SLOs for {percent_text(recommended.slo_attainment)}"
                f" of requests on {self.load}, below the {percent_text(goal)} goal"
                + (
                    f" ({percent_text(self.attainment_goal)} of the attainable)"
                    if recommended.unattainable_share > 0
                    else ""
                )
            )
        current = self.current
        current_reaches = current.slo_attainment >= self.attainment_goal * (
            1.0 - current.unattainable_share
        )
        if current_reaches and recommended.gpu_hours > current.gpu_hours * 1.0005:
            return (
                f"the current values already reach the goal with fewer GPU-hours "
                f"({current.gpu_hours:.1f} against {recommended.gpu_hours:.1f})"
            )
        return None

    @property
    def notes(self) -> tuple[str, ...]:
        """Why the replay may not tell the two apart."""
        runs = [r for r in (self.current, self.recommended) if r is not None]
        if all(r.scaling_actions == 0 for r in runs):
            peak = self.current
            return (
                f"the replay never scaled (fleet held at {peak.peak_prefill_instances} prefill + "
                f"{peak.peak_decode_instances} decode): the load is too light to compare the "
                "values; raise it with --rate-scale (and --diurnal-hours)",
            )
        return ()


def compare(current: PolicyResult, recommended: PolicyResult, goal: float) -> str:
    """One line: GPU-hours and attainment, recommended against current."""

    def goal_note(_before: float, after: float) -> str:
        return f" (below the {percent_text(goal)} goal)" if after < goal else ""

    return compare_results("recommended", current, recommended, goal_note)


def verify(
    state: DesiredState,
    service: str,
    profile: LoadProfile,
    recommendation: Recommendation,
    *,
    seed: int = 0,
    config: SimConfig | None = None,
    placer: Placer | None = None,
    interval_s: float = 30.0,
    autoscaler: str = PLANNER,
) -> Verification:
    """Replay ``autoscaler`` with both sets of values on ``profile``."""
    policy = state.policies[service]
    runs: dict[str, PolicyResult] = {}
    variants = [("current", state)]
    if recommendation.changes:
        tuned = with_recommendation(policy, recommendation)
        variants.append(
            ("recommended", replace(state, policies={**state.policies, service: tuned}))
        )
    for label, variant in variants:
        result = evaluate(
            variant,
            service,
            profile,
            [autoscaler],
            seed,
            interval_s=interval_s,
            config=config,
            placer=placer,
        )
        runs[label] = result.policies[autoscaler]
    return Verification(
        load=profile.name,
        horizon_s=profile.horizon_s,
        requests=profile.requests,
        current=runs["current"],
        recommended=runs.get("recommended"),
        attainment_goal=policy.slo.attainment_goal,
    )


# --------------------------------------------------------------------------- write back


# Where a recommended key a file may lack goes: after this sibling (module docstring, 6).
_INSERT_AFTER: dict[tuple[str, ...], str] = {
    ("scaling", "prefill_target_per_instance"): "target_per_instance",
}


def apply_changes(text: str, changes: Sequence[ValueChange], *, path: str) -> str:
    """``text`` (the file ``path``) with each change written by ``set_value`` (a key
    the file lacks inserted after its sibling in ``_INSERT_AFTER``); a quoted string
    stays quoted the same way, a plain one plain where it reads back as itself."""
    for change in changes:
        text = set_value(
            text,
            change.key_path,
            change.value,
            path=path,
            insert_after=_INSERT_AFTER.get(change.key_path),
        )
    return text


def write_back(text: str, changes: Sequence[ValueChange], note: str, *, path: str) -> str:
    """``text`` (the file ``path``) as ``tune --write`` leaves it: each change written
    (``apply_changes``) and the comments that described the old values replaced by
    ``note`` (``refresh_comments``); writing the same changes again changes nothing.
    ``ConfigError`` naming ``path``, the line and the field when the file cannot be
    edited safely (``reconciler.desired.roundtrip``)."""
    changed = apply_changes(text, changes, path=path)
    return refresh_comments(changed, [change.key_path for change in changes], note, path=path)


def unified_diff(path: str, before: str, after: str) -> str:
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"a/{path}",
            tofile=f"b/{path}",
        )
    )


__all__ = [
    "CAPACITY_CHECK_TOLERANCE",
    "DEFAULT_HEADROOM",
    "PAPER",
    "PLANNER",
    "QUICK_SETTINGS",
    "TUNED_AUTOSCALERS",
    "CapacityCheck",
    "Probe",
    "Recommendation",
    "SplitResult",
    "Sweep",
    "SweepSettings",
    "TuneError",
    "ValueChange",
    "Verification",
    "apply_changes",
    "check_capacity",
    "flat_workload",
    "gpu_type_economics",
    "length_pool",
    "max_rate_under_slo",
    "recommend",
    "refresh_comments",
    "round_target",
    "split_candidates",
    "sweep_splits",
    "unified_diff",
    "verify",
    "with_recommendation",
    "write_back",
]

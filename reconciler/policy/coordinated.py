"""HeteroScale's coordinated P/D autoscaling policy, as one pure function.

``decide(policy, fleet, metrics, history, now_s) -> Decision`` reads no clock and does
no I/O: time is an argument and everything the policy remembers between cycles
comes in as ``history`` and goes out, renewed, inside the ``Decision``.

One cycle, in order (each step that changes a number records a ``Clamp``):

1. **Signal check.** The primary metric (``scaling.metric``) must be present, finite
   and younger than ``scaling.metric_max_age_s``; otherwise both roles hold their
   current size (only min/max still apply: no ratio repair on bad data) and the
   message says why. The hold is stored as a recommendation of the current size,
   so after a gap a scale-in first needs a whole window of good data.
2. **Driven role.** The metric's name prefix names the role it drives (``decode_tps``
   -> decode, ``prefill_gpu_util`` -> prefill; ``ttft`` -> prefill, ``tbt`` ->
   decode). Proportional control for the linear metrics: ``desired = ceil(observed
   total / target_per_instance)``, where the total is the summed TPS, or the
   average utilisation x the role's *ready* instances (starting instances report
   no load); the usage ratio ``total / (active x target)`` counts starting
   instances as capacity, and inside ``1 +- tolerance`` the role holds.
3. **Latency negative feedback.** TTFT tiers act on prefill, TBT tiers on decode;
   of the tiers that fire (latency > ``above`` x SLO) the one with the highest
   threshold wins and asks for ``ready x (1 + step%)`` (at least one more than
   ready). Asking relative to *ready* instances makes starting ones count: a tier
   that keeps firing while its first scale-out warms up asks for nothing more
   unless a higher tier fires. With ``ttft``/``tbt`` as the primary metric the
   tiers are the only scale-out; scale-in recommends ``-p%`` (``p`` = the
   smallest tier step of that metric, 10% without tiers) whenever latency is below
   ``latency_scale_in_below`` x SLO, and because scale-in takes the *highest*
   recommendation over the scale-in window, it happens only when latency stayed
   that low for the whole window.
4. **KV-cache pressure** (optional): decode KV usage above the threshold in every
   sample in force over ``window_s`` (the samples must reach back to the window's
   start, and this cycle's must be usable) asks for decode ``ready x (1 + step%)``.
5. **Coordination.** The driven role's want is clipped to its [min, max], the other
   role follows it through the P/D ratio target (rounded up: the follower never
   starves the driven role), each role takes the largest of what its rules ask
   (a TTFT tier may lift the follower above the ratio), then the pair is shaped:
   min/max per role, ratio bounds (``clamps.enforce_ratio``: add to the short role
   first, never starve the bottleneck), whole deployment groups when
   ``granularity: group``. This shaped pair is the cycle's *recommendation* and is
   stored in the history.
5a. **Prefill floor** (optional, ``scaling.prefill_target_per_instance`` with a
   decode-driven metric): the ratio follows decode, so when the prompt/output mix
   shifts towards prefill (longer prompts, flat decode) it would leave prefill short
   until a TTFT tier fires on a queue that has already formed. The floor is
   proportional control on ``prefill_tps`` with the primary metric's tolerance band:
   usage ``prefill_tps / (active prefill x target)`` above ``1 + tolerance`` asks
   for ``ceil(prefill_tps / target)``, inside the band it holds the active prefill
   count, below it asks for ``ceil(prefill_tps / target)``. Prefill takes the larger
   of that and what the ratio and the TTFT tiers ask, before the shaping above
   (so min/max, ratio bounds -- which may add decode -- and groups still apply).
   ``prefill_tps`` missing, stale or not finite: no floor this cycle (the message
   says so); decode and the ratio still decide.
6. **Stabilisation** per role, as the Kubernetes HPA does it: scale-out takes the
   lowest recommendation over ``scale_out_window_s`` (0 = at once), scale-in the
   highest over ``scale_in_window_s``; a recommendation is in force from its cycle
   until the next, and scale-in waits until the history covers the whole window
   (after a restart the policy first has to see a full window). No scale-in within
   ``cooldown_s`` of any change. The prefill floor's scale-out is not delayed by
   ``scale_out_window_s`` (a prompt surge starves prefill at once); its scale-in is
   stabilised like any other, since the floor is part of the stored recommendation.
7. **Max step** per role and cycle: ``max(max_step_instances, max_step_percent%
   of current)``; then the pair is shaped again (bounds, ratio, groups), which may
   exceed the step where the ratio bounds or a whole group demand it.

The dynamic P/D ratio (``pd_ratio.dynamic``) is in :func:`_dynamic_ratio`.

Performance: the policy's numbers are read from the pydantic model once and cached
per policy object (:func:`policy_numbers`), so ``decide`` itself touches only slotted
dataclasses and the inputs; ``benchmarks/bench_policy.py`` measures 1,000 services.
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, replace

from reconciler.desired.models import ServicePolicy
from reconciler.desired.ratio import format_ratio
from reconciler.latency_buckets import LatencySignal
from reconciler.policy.base import (
    Clamp,
    Decision,
    DecisionInput,
    PolicyHistory,
    Reason,
    Recommendation,
    clamps_note,
    decided,
    gc_paused,
)
from reconciler.policy.clamps import (
    RoleBounds,
    ceil_count,
    clamp_bounds,
    clamp_step,
    enforce_ratio,
    floor_count,
    follow_ratio,
    round_to_groups,
)
from reconciler.state import MAX_SIGNAL_VALUE, ROLES, Role, Sample, ServiceFleet, ServiceMetrics

# Scale-in step with a latency metric as the primary signal and no tier to borrow it from.
DEFAULT_LATENCY_SCALE_IN_PERCENT = 10.0

# history.extra keys of the dynamic ratio estimator.
_MIX_ANCHOR = "pd_mix_anchor"
_MIX_EWMA = "pd_mix_ewma"
_MIX_AT_S = "pd_mix_at_s"


def _positive(value: float) -> bool:
    """Finite and above zero: a ratio or token mix as this module writes them."""
    return math.isfinite(value) and value > 0


def _written_here(key: str, value: float, now_s: float) -> bool:
    """Whether a dynamic-ratio memory entry could have been written by this module: a
    mix finite and positive, its time finite and not after ``now_s``."""
    if key in (_MIX_ANCHOR, _MIX_EWMA):
        return _positive(value)
    if key == _MIX_AT_S:
        return math.isfinite(value) and value <= now_s
    return True


# --------------------------------------------------------------------------- policy numbers


@dataclass(frozen=True, slots=True)
class LatencyRule:
    """The tiers of one latency metric: which role they drive and its SLO."""

    metric: LatencySignal
    role: Role
    role_index: int  # 0 prefill, 1 decode
    primary: bool  # this metric is the policy's primary signal
    slo_ms: float
    tiers: tuple[tuple[float, float], ...]  # (above x SLO, step %), highest threshold first
    scale_in_percent: float  # used only when this metric is the primary one


@dataclass(frozen=True, slots=True)
class PolicyNumbers:
    """Every number ``decide`` needs from a ``ServicePolicy``, read once.

    Reading a frozen dataclass with slots is several times faster than walking the
    nested pydantic models on every call, which matters at thousands of services.
    """

    service: str
    metric: str
    driven_role: Role
    driven_index: int  # 0 prefill, 1 decode
    proportional: bool  # False: ttft/tbt as the primary metric (latency tiers only)
    per_ready_instance: bool  # utilisation/SM activity: an average over ready instances
    target_per_instance: float | None  # None: not set (the paper policy cannot size)
    target_text: str  # "target 1600 per instance", preformatted for messages
    tolerance: float
    tolerance_text: str
    scale_out_window_s: float
    scale_in_window_s: float
    cooldown_s: float
    max_step_percent: float
    max_step_instances: int
    prefill_bounds: RoleBounds
    decode_bounds: RoleBounds
    ratio_target: float
    ratio_target_text: str
    ratio_min: float
    ratio_max: float
    ratio_min_slack: float  # ratio_min and ratio_max widened by the float slack of clamps
    ratio_max_slack: float
    dynamic_ratio: bool
    dynamic_max_step: float
    group_shape: tuple[int, int] | None  # (prefill, decode) per group with granularity "group"
    latency_rules: tuple[LatencyRule, ...]
    latency_scale_in_below: float
    metric_max_age_s: float
    kv_threshold: float | None
    kv_window_s: float
    kv_step_percent: float
    history_horizon_s: float  # longest window any rule looks back over
    # Prefill floor (rule 5a): prompt tokens/s per prefill instance, None when unset
    # or when the primary metric drives prefill itself.
    prefill_floor_target: float | None
    prefill_floor_text: str  # "target 11000 per instance", preformatted

    def bounds(self, role: Role) -> RoleBounds:
        return self.prefill_bounds if role == "prefill" else self.decode_bounds


def _numbers_from_policy(policy: ServicePolicy) -> PolicyNumbers:
    scaling = policy.scaling
    metric = scaling.metric
    if metric == "ttft":
        driven: Role = "prefill"
    elif metric == "tbt":
        driven = "decode"
    else:
        driven = "prefill" if metric.startswith("prefill_") else "decode"
    latency_rules = []
    rule_sources: tuple[tuple[LatencySignal, Role, float], ...] = (
        ("ttft", "prefill", policy.slo.ttft_ms),
        ("tbt", "decode", policy.slo.tbt_ms),
    )
    for latency_metric, role, slo_ms in rule_sources:
        tiers = sorted(
            (
                (t.above, t.step_percent)
                for t in scaling.latency_tiers
                if t.metric == latency_metric
            ),
            reverse=True,
        )
        if tiers or metric == latency_metric:
            steps = [step for _above, step in tiers]
            latency_rules.append(
                LatencyRule(
                    metric=latency_metric,
                    role=role,
                    role_index=0 if role == "prefill" else 1,
                    primary=metric == latency_metric,
                    slo_ms=slo_ms,
                    tiers=tuple(tiers),
                    scale_in_percent=min(steps) if steps else DEFAULT_LATENCY_SCALE_IN_PERCENT,
                )
            )
    kv = scaling.kv_cache_pressure
    ratio = policy.pd_ratio
    # The floor complements a decode-driven policy; a prefill-driven one already
    # sizes prefill from its own signal.
    prefill_floor_target = scaling.prefill_target_per_instance if driven == "decode" else None
    return PolicyNumbers(
        service=policy.name,
        metric=metric,
        driven_role=driven,
        driven_index=0 if driven == "prefill" else 1,
        proportional=metric not in ("ttft", "tbt"),
        per_ready_instance=metric.endswith(("_gpu_util", "_sm_active")),
        target_per_instance=scaling.target_per_instance,
        target_text=(
            f"target {_fmt_value(metric, scaling.target_per_instance)} per instance"
            if scaling.target_per_instance is not None
            else "no target"
        ),
        tolerance=scaling.tolerance,
        tolerance_text=f"{scaling.tolerance:.0%}",
        scale_out_window_s=scaling.scale_out_window_s,
        scale_in_window_s=scaling.scale_in_window_s,
        cooldown_s=scaling.cooldown_s,
        max_step_percent=scaling.max_step_percent,
        max_step_instances=scaling.max_step_instances,
        prefill_bounds=RoleBounds(
            "prefill", policy.prefill.min_instances, policy.prefill.max_instances
        ),
        decode_bounds=RoleBounds(
            "decode", policy.decode.min_instances, policy.decode.max_instances
        ),
        ratio_target=ratio.target,
        ratio_target_text=_ratio_text(ratio.target),
        ratio_min=ratio.min,
        ratio_max=ratio.max,
        ratio_min_slack=ratio.min * (1 - 1e-9),
        ratio_max_slack=ratio.max * (1 + 1e-9),
        dynamic_ratio=ratio.dynamic,
        dynamic_max_step=ratio.dynamic_max_step,
        group_shape=(
            (policy.deployment_group.prefill_instances, policy.deployment_group.decode_instances)
            if scaling.granularity == "group"
            else None
        ),
        latency_rules=tuple(latency_rules),
        latency_scale_in_below=scaling.latency_scale_in_below,
        metric_max_age_s=scaling.metric_max_age_s,
        kv_threshold=kv.threshold if kv is not None else None,
        kv_window_s=kv.window_s if kv is not None else 0.0,
        kv_step_percent=kv.step_percent if kv is not None else 0.0,
        history_horizon_s=max(
            scaling.scale_in_window_s,
            scaling.scale_out_window_s,
            kv.window_s if kv is not None else 0.0,
        ),
        prefill_floor_target=prefill_floor_target,
        prefill_floor_text=(
            f"target {prefill_floor_target:.0f} per instance"
            if prefill_floor_target is not None
            else ""
        ),
    )


# Policies are frozen, so their numbers can be cached per object. Keyed by id() with a
# weak reference to detect a recycled id; bounded so a long-running loop that loads
# new revisions does not grow without limit.
_NUMBERS_CACHE: dict[int, tuple[weakref.ref[ServicePolicy], PolicyNumbers]] = {}
_NUMBERS_CACHE_LIMIT = 65_536


def policy_numbers(policy: ServicePolicy) -> PolicyNumbers:
    """The policy's numbers, computed once per policy object."""
    key = id(policy)
    cached = _NUMBERS_CACHE.get(key)
    if cached is not None and cached[0]() is policy:
        return cached[1]
    numbers = _numbers_from_policy(policy)
    if len(_NUMBERS_CACHE) >= _NUMBERS_CACHE_LIMIT:
        _NUMBERS_CACHE.clear()
    _NUMBERS_CACHE[key] = (weakref.ref(policy), numbers)
    return numbers


# --------------------------------------------------------------------------- small helpers


def sample_problem(sample: Sample | None, name: str, now_s: float, max_age_s: float) -> str | None:
    """Why ``sample`` cannot be acted on (``Sample.is_usable``), or None if it can."""
    if sample is not None and sample.is_usable(now_s, max_age_s):
        return None  # the common case first
    if sample is None:
        return f"{name} missing"
    if not math.isfinite(sample.value):
        return f"{name} is {sample.value}"
    if sample.value < 0:
        return f"{name} is negative ({sample.value:g})"
    if sample.value > MAX_SIGNAL_VALUE:
        return f"{name} is beyond any real reading ({sample.value:g})"
    age_s = now_s - sample.at_s
    if age_s > max_age_s:
        return f"{name} stale (sampled {age_s:.0f} s ago > metric_max_age_s {max_age_s:g})"
    return None


# An idle engine's utilisation gauge reads a few percent at most (kernel launches, the
# scrape itself); above this share its GPUs are computing prompts.
IDLE_BUSY_SHARE = 0.05


def rate_contradicted(
    metrics: ServiceMetrics, name: str, now_s: float, max_age_s: float
) -> str | None:
    """Why a token rate that reads 0 (``prefill_tps`` or ``decode_tps``, usable as a
    sample) cannot be believed, or None: decode serves no token in a minute while a
    request runs on it, or prefill none while a prompt waits for it or its GPUs are
    busy. Such a rate is a counter that stopped or a broken query, not an idle role;
    believed, it scaled the role to its minimum with the load on it (a prober: chat to
    1 prefill and 2 decode, a TTFT of 109 s), where a missing rate holds."""
    rate = getattr(metrics, name)
    if rate is None or rate.value > 0:
        return None
    evidence = (
        (("decode_running", 1.0, "request(s) running"),)
        if name == "decode_tps"
        else (
            ("prefill_queue", 1.0, "prompt(s) waiting"),
            ("prefill_gpu_util", IDLE_BUSY_SHARE, "GPU utilisation"),
        )
    )
    for gauge, least, what in evidence:
        sample = getattr(metrics, gauge)
        if sample_problem(sample, gauge, now_s, max_age_s) is None and sample.value >= least:
            return f"{name} reads 0 while {gauge} reads {sample.value:g} ({what})"
    return None


_AT_S = operator.attrgetter("at_s")
_ROLE_VALUE = (operator.attrgetter("prefill"), operator.attrgetter("decode"))


def _window_extreme(
    history: tuple[Recommendation, ...],
    now_s: float,
    window_s: float,
    role_index: int,
    highest: bool,
) -> tuple[int | None, bool, float | None]:
    """The highest (or lowest) earlier recommendation for one role in force at some
    time in ``[now - window, now]``: every one made inside the window plus the last
    one made at or before its start (it was in force when the window opened).

    Returns ``(extreme or None, covered, oldest_at_s)``; ``covered`` says whether the
    history reaches back to the window's start: a recommendation made at or before it,
    and not more than a window before it. One older than that was in force across a
    gap longer than the window in which the policy saw nothing (a clock stepped forward,
    a replica down for an hour): it says nothing of the demand then, and taken as
    covering, one low reading after the gap scaled in at once, past the window and the
    cooldown. ``history`` is in time order (each cycle appends), so the window's start
    is found by bisection."""
    if window_s <= 0:
        return None, True, None  # no window: only this cycle's recommendation counts
    start_s = now_s - window_s
    first = bisect.bisect_right(history, start_s, key=_AT_S) - 1
    covered = first >= 0 and start_s - history[first].at_s <= window_s
    # Not covered: only the recommendations made inside the window count.
    in_window = history[first:] if covered else history[first + 1 :]
    if not in_window:
        return None, covered, None
    values = map(_ROLE_VALUE[role_index], in_window)
    return (max(values) if highest else min(values)), covered, in_window[0].at_s


def scale_in_floor(
    recommendations: tuple[Recommendation, ...], window_s: float, *, needs_cover: bool = True
) -> tuple[int, int] | None:
    """The fewest instances of each role (prefill, decode) the scale-in window lets a
    service run at its last recommendation's instant: the highest recommendation in
    force over the window, that last one included (``recommendations`` as a decision
    leaves them in its history, this cycle's last), as ``stabilise`` takes it. With no
    window, the last recommendation alone.

    None when the history does not reach back to the window's start and
    ``needs_cover``: ``stabilise`` then holds every scale-in (after a restart the
    policy first has to see a whole window), so no fewer than run may run. Without
    ``needs_cover`` (an autoscaler whose memory is only its own window, as the HPA's)
    the recommendations there are all it goes by. Pure: time is the history's."""
    if not recommendations:
        return None if needs_cover else (0, 0)
    now_s = recommendations[-1].at_s
    floor = [0, 0]
    for ri in (0, 1):
        highest, covered, _oldest = _window_extreme(
            recommendations, now_s, window_s, ri, highest=True
        )
        if not covered and needs_cover:
            return None
        floor[ri] = _ROLE_VALUE[ri](recommendations[-1]) if highest is None else highest
    return floor[0], floor[1]


def _trim_recommendations(
    history: tuple[Recommendation, ...], now_s: float, horizon_s: float
) -> tuple[Recommendation, ...]:
    """Drop recommendations no window can reach any more (keep the boundary one)."""
    first = bisect.bisect_right(history, now_s - horizon_s, key=_AT_S) - 1
    return history[first:] if first > 0 else history


def _append_sample(
    samples: tuple[tuple[float, float], ...],
    sample: Sample,
    now_s: float,
    horizon_s: float,
) -> tuple[tuple[float, float], ...]:
    """Add a usable sample (once: a sample seen twice is not new evidence) and drop
    those outside the horizon, keeping the one in force at its start."""
    if not samples or sample.at_s > samples[-1][0]:
        samples = (*samples, (sample.at_s, sample.value))
    start_s = now_s - horizon_s
    for index in range(len(samples) - 1, -1, -1):
        if samples[index][0] <= start_s:
            return samples[index:]
    return samples


def _held_above(
    samples: tuple[tuple[float, float], ...], now_s: float, window_s: float, threshold: float
) -> bool:
    """Every sample in force during ``[now - window, now]`` is above ``threshold``, and
    the samples reach back to the window's start."""
    start_s = now_s - window_s
    for at_s, value in reversed(samples):
        if value <= threshold:
            return False
        if at_s <= start_s:
            return True
    return False


def _feedback_target(ready: int, step_percent: float) -> int:
    """What a firing tier asks for: ``step%`` more than the ready instances, at least one."""
    return max(ceil_count(ready * (1.0 + step_percent / 100.0)), ready + 1)


def _fmt_value(metric: str, value: float) -> str:
    if metric.endswith("_tps"):
        return f"{value:.0f}"
    return f"{value:.2f}"


@functools.lru_cache(maxsize=4096)
def _ratio_text(ratio: float) -> str:
    """``format_ratio`` (a Fraction search) memoised: dynamic ratios repeat."""
    return format_ratio(ratio)


def _shape(n: PolicyNumbers, prefill: int, decode: int, clamps: list[Clamp]) -> tuple[int, int]:
    """Min/max per role, ratio bounds, whole groups: what every pair must satisfy."""
    if (
        n.group_shape is None
        and n.prefill_bounds.min_instances <= prefill <= n.prefill_bounds.max_instances
        and n.decode_bounds.min_instances <= decode <= n.decode_bounds.max_instances
        and n.ratio_min_slack * decode <= prefill <= n.ratio_max_slack * decode
        and decode > 0
    ):
        return prefill, decode  # fast path: already a valid pair
    prefill = clamp_bounds(prefill, n.prefill_bounds, clamps)
    decode = clamp_bounds(decode, n.decode_bounds, clamps)
    prefill, decode = enforce_ratio(
        prefill, decode, n.ratio_min, n.ratio_max, n.prefill_bounds, n.decode_bounds, clamps
    )
    if n.group_shape is not None:
        prefill, decode = round_to_groups(
            prefill,
            decode,
            n.group_shape[0],
            n.group_shape[1],
            n.prefill_bounds,
            n.decode_bounds,
            clamps,
        )
    return prefill, decode


def policy_shaped_pair(
    policy: ServicePolicy, prefill: int, decode: int
) -> tuple[int, int, tuple[Clamp, ...]]:
    """``(prefill, decode)`` as the policy lets a pair run (each role's min/max, the
    ``pd_ratio`` bounds, whole deployment groups: ``_shape``, what every decision of
    either policy ends as), with the clamps that moved it. For counts sized outside a
    decision (the evaluation's static peak and oracle-min), so that they are held to
    the same policy file as the autoscalers they are compared with."""
    clamps: list[Clamp] = []
    shaped = _shape(policy_numbers(policy), prefill, decode, clamps)
    return shaped[0], shaped[1], tuple(clamps)


# --------------------------------------------------------------------------- prefill floor


def _prefill_floor(
    n: PolicyNumbers,
    target_per_instance: float,
    sample: Sample | None,
    active: int,
    now_s: float,
    parts: list[str],
) -> int | None:
    """Rule 5a: the fewest prefill instances the observed prompt load needs, with the
    primary metric's tolerance band (inside it: hold ``active``). None when
    ``prefill_tps`` cannot be acted on."""
    problem = sample_problem(sample, "prefill_tps", now_s, n.metric_max_age_s)
    if problem is not None:
        parts.append(f"no prefill floor ({problem})")
        return None
    total = sample.value  # type: ignore[union-attr]
    capacity = active * target_per_instance
    usage = total / capacity if capacity > 0 else (math.inf if total > 0 else 1.0)
    observed = f"prefill_tps {total:.0f} / {n.prefill_floor_text}"
    if abs(usage - 1.0) <= n.tolerance + 1e-9:
        parts.append(
            f"{observed} = {usage:.2f} of {active} prefill, within {n.tolerance_text}: "
            f"floor {active} prefill"
        )
        return active
    floor = ceil_count(total / target_per_instance)
    parts.append(f"{observed} -> {floor} prefill (floor)")
    return floor


# --------------------------------------------------------------------------- dynamic ratio


def _dynamic_ratio(
    n: PolicyNumbers,
    metrics: ServiceMetrics,
    history: PolicyHistory,
    now_s: float,
    parts: list[str],
) -> tuple[float, tuple[tuple[str, float], ...]]:
    """Move the P/D ratio target towards the ratio that balances observed demand.

    Estimator. Balanced means each role is as loaded as the other against its
    per-instance capacity: ``P x C_p / prefill_tps = D x C_d / decode_tps``, so
    ``P/D = (prefill_tps / decode_tps) x C_d / C_p``. The decode capacity ``C_d`` is
    the policy's per-instance target; the prefill capacity is not read from the
    optional ``prefill_target_per_instance`` (that is the floor of rule 5a), but
    derived from the ratio target and the decode target under the assumption
    that the configured target balances the traffic mix first observed (the
    *anchor* mix ``m0`` of prefill to decode tokens/s): ``C_p = m0 x C_d / target``.
    Substituting gives ``balanced = target x m / m0`` -- the ratio follows shifts in
    the token mix (longer prompts -> more prefill), independent of absolute load.
    ``m`` is an exponentially weighted mean with time constant ``scale_in_window_s``
    so noise does not move the ratio.

    Control. The target moves only when the balanced ratio is more than
    ``tolerance / 2`` away, by at most ``dynamic_max_step`` (relative) per cycle,
    and never outside [pd_ratio.min, pd_ratio.max]. Missing or unusable TPS holds it.

    Limits (documented, not hidden): the anchor is the first mix seen, so a policy
    history that is lost (restart) re-anchors at the then-current mix and restarts
    from the configured target; with ``granularity: group`` the group shape pins
    the ratio and the dynamic target has no effect on the counts.
    """
    # What the history holds is read as it could have been written: a state document
    # read back damaged may hold any float (a NaN ratio raised in its message; a zero
    # anchor would divide by zero), and such an entry counts as never written.
    extra = {k: v for k, v in history.extra if _written_here(k, v, now_s)}
    current = history.dynamic_ratio
    if current is None or not _positive(current):
        current = n.ratio_target
    current = min(max(current, n.ratio_min), n.ratio_max)
    prefill_sample, decode_sample = metrics.prefill_tps, metrics.decode_tps
    problem = sample_problem(
        prefill_sample, "prefill_tps", now_s, n.metric_max_age_s
    ) or sample_problem(decode_sample, "decode_tps", now_s, n.metric_max_age_s)
    if problem is None and (decode_sample.value <= 0 or prefill_sample.value <= 0):  # type: ignore[union-attr]
        problem = "no traffic to measure the token mix"  # an idle service says nothing about it
    if problem is not None:
        parts.append(f"dynamic ratio held at {_ratio_text(current)} ({problem})")
        return current, history.extra
    mix = prefill_sample.value / decode_sample.value  # type: ignore[union-attr]
    anchor = extra.get(_MIX_ANCHOR, mix)
    previous = extra.get(_MIX_EWMA)
    if previous is None:
        smoothed = mix
    else:
        elapsed_s = max(0.0, now_s - extra.get(_MIX_AT_S, now_s))
        alpha = 1.0 - math.exp(-elapsed_s / max(n.scale_in_window_s, 1.0))
        smoothed = previous + alpha * (mix - previous)
    extra[_MIX_ANCHOR] = anchor
    extra[_MIX_EWMA] = smoothed
    extra[_MIX_AT_S] = now_s
    balanced = n.ratio_target * smoothed / anchor
    wanted = min(max(balanced, n.ratio_min), n.ratio_max)
    new = current
    if abs(wanted / current - 1.0) > n.tolerance / 2.0:
        new = min(
            max(wanted, current * (1.0 - n.dynamic_max_step)), current * (1.0 + n.dynamic_max_step)
        )
        new = min(max(new, n.ratio_min), n.ratio_max)
        capacity = ""
        target = n.target_per_instance
        if target is None:
            pass  # no hand-set target: nothing to derive the other role's capacity from
        elif n.metric == "decode_tps":
            capacity = (
                f"; C_d {target:.0f} tps, C_p = {anchor:.2f} x {target:.0f}"
                f" / {format_ratio(n.ratio_target)} = {anchor * target / n.ratio_target:.0f} tps"
            )
        elif n.metric == "prefill_tps":
            capacity = (
                f"; C_p {target:.0f} tps, C_d = {target:.0f} x "
                f"{format_ratio(n.ratio_target)} / {anchor:.2f} = "
                f"{target * n.ratio_target / anchor:.0f} tps"
            )
        parts.append(
            f"dynamic ratio {current:.3f} -> {new:.3f}: prefill/decode tokens {smoothed:.2f}"
            f" vs {anchor:.2f} anchored{capacity}; balanced {balanced:.3f}, step <= "
            f"{n.dynamic_max_step:.0%}"
        )
    return new, tuple(sorted(extra.items()))


# --------------------------------------------------------------------------- decide

_ROLE_NAMES: tuple[Role, Role] = ("prefill", "decode")


def role_counts(fleet: ServiceFleet) -> tuple[list[int], list[int], list[int]]:
    """Each role's instances (ready and starting), ready ones and starting ones, as
    [prefill, decode] lists indexed by role (0, 1): cheaper than dicts in the hot path."""
    prefill, decode = fleet.prefill, fleet.decode
    return (
        [prefill.ready + prefill.starting, decode.ready + decode.starting],
        [prefill.ready, decode.ready],
        [prefill.starting, decode.starting],
    )


def decide(
    policy: ServicePolicy,
    fleet: ServiceFleet,
    metrics: ServiceMetrics,
    history: PolicyHistory,
    now_s: float,
) -> Decision:
    """The coordinated decision for one service at ``now_s`` (see the module docstring)."""
    n = policy_numbers(policy)
    current, ready, _ = role_counts(fleet)
    clamps: list[Clamp] = []
    parts: list[str] = []
    past = _trim_recommendations(history.recommendations, now_s, n.history_horizon_s)

    kv_samples = history.kv_usage
    kv_sample = metrics.decode_kv_usage
    kv_problem = None
    if n.kv_threshold is not None:
        kv_problem = sample_problem(kv_sample, "decode_kv_usage", now_s, n.metric_max_age_s)
        if kv_problem is None:
            kv_samples = _append_sample(kv_samples, kv_sample, now_s, n.kv_window_s)  # type: ignore[arg-type]

    # 1. The primary signal must be usable, else hold.
    di, fi = n.driven_index, 1 - n.driven_index
    driven, follower = _ROLE_NAMES[di], _ROLE_NAMES[fi]
    primary = getattr(metrics, n.metric)
    problem = sample_problem(primary, n.metric, now_s, n.metric_max_age_s)
    if problem is None and n.metric in ("prefill_tps", "decode_tps"):
        problem = rate_contradicted(metrics, n.metric, now_s, n.metric_max_age_s)
    if problem is None and n.per_ready_instance and ready[di] == 0:
        problem = f"{n.metric} has no ready {driven} instance to report it"
    if problem is None and n.proportional and n.target_per_instance is None:
        problem = (
            "scaling.target_per_instance is not set (this policy scales on a hand-set "
            f"target of {n.metric}; heteroscale derives capacity from the model)"
        )
    if problem is not None:
        return _hold(n, fleet, history, past, kv_samples, now_s, problem)

    # 2. Proportional control on the driven role.
    wants = [0, 0]
    within_tolerance = False
    fired: list[str | None] = [None, None]  # per role: "latency" or "kv" when feedback raised it
    if n.proportional:
        value = primary.value
        if n.per_ready_instance:
            total = value * ready[di]
            observed = f"{n.metric} {value:.2f} x {ready[di]} ready"
        else:
            total = value
            observed = f"{n.metric} {value:.0f}"
        target = n.target_per_instance
        assert target is not None  # checked with the signal (rule 1)
        capacity = current[di] * target
        usage = total / capacity if capacity > 0 else (math.inf if total > 0 else 1.0)
        proportional = ceil_count(total / target)
        if abs(usage - 1.0) <= n.tolerance + 1e-9:  # slack: 11000 / 10000 - 1 > 0.1 in floats
            within_tolerance = True
            wants[di] = current[di]
            parts.append(
                f"{observed} / {n.target_text} = {usage:.2f} of {current[di]} {driven}, "
                f"within {n.tolerance_text}: hold {current[di]} {driven}"
            )
            if proportional != current[di]:
                clamps.append(
                    Clamp(
                        "tolerance",
                        driven,
                        proportional,
                        current[di],
                        f"usage {usage:.2f} within 1 +- {n.tolerance:g}",
                    )
                )
        else:
            wants[di] = proportional
            parts.append(f"{observed} / {n.target_text} -> {proportional} {driven}")
    else:
        wants[di] = current[di]
        within_tolerance = True

    # 3. Latency negative feedback (and, for a latency primary, its scale-in).
    for rule in n.latency_rules:
        sample = getattr(metrics, rule.metric)
        latency_problem = sample_problem(sample, rule.metric, now_s, n.metric_max_age_s)
        if latency_problem is not None:
            parts.append(f"{latency_problem}: {rule.metric} tiers skipped")
            continue
        of_slo = sample.value / rule.slo_ms
        ri = rule.role_index
        tier = None
        for candidate in rule.tiers:
            if of_slo > candidate[0]:
                tier = candidate
                break
        if tier is not None:
            asked = _feedback_target(ready[ri], tier[1])
            if asked > wants[ri]:
                wants[ri] = asked
                fired[ri] = "latency"
                within_tolerance = False
            parts.append(
                f"{rule.metric} {sample.value:.0f} ms = {of_slo:.2f} x SLO {rule.slo_ms:g} ms > "
                f"{tier[0]:g}: {rule.role} +{tier[1]:g}% of {ready[ri]} ready -> {asked}"
            )
        elif rule.primary:
            observed = (
                f"{rule.metric} {sample.value:.0f} ms = {of_slo:.2f} x SLO {rule.slo_ms:g} ms"
            )
            if of_slo < n.latency_scale_in_below:
                fewer = max(1, floor_count(current[ri] * rule.scale_in_percent / 100.0))
                wants[ri] = max(current[ri] - fewer, 0)
                within_tolerance = False
                parts.append(
                    f"{observed} < {n.latency_scale_in_below:g}: {rule.role} "
                    f"-{rule.scale_in_percent:g}% -> {wants[ri]} once low for the whole "
                    "scale-in window"
                )
            else:
                parts.append(f"{observed}: hold {current[ri]} {rule.role}")

    # 4. KV-cache pressure on decode.
    if (
        n.kv_threshold is not None
        and kv_problem is None
        and _held_above(kv_samples, now_s, n.kv_window_s, n.kv_threshold)
    ):
        asked = _feedback_target(ready[1], n.kv_step_percent)
        if asked > wants[1]:
            wants[1] = asked
            fired[1] = fired[1] or "kv"
            within_tolerance = False
        parts.append(
            f"decode_kv_usage {kv_sample.value:.2f} > {n.kv_threshold:g} for "  # type: ignore[union-attr]
            f"{n.kv_window_s:g} s: decode +{n.kv_step_percent:g}% of {ready[1]} ready -> {asked}"
        )

    # 5. Coordination through the P/D ratio, then the shape every pair must have.
    extra = history.extra
    if n.dynamic_ratio:
        ratio, extra = _dynamic_ratio(n, metrics, history, now_s, parts)
        ratio_text = _ratio_text(ratio)
    else:
        ratio, ratio_text = n.ratio_target, n.ratio_target_text
    # The follower pairs with what the driven role can have: its want inside [min, max].
    driven_bounds = n.prefill_bounds if di == 0 else n.decode_bounds
    if not driven_bounds.min_instances <= wants[di] <= driven_bounds.max_instances:
        wants[di] = clamp_bounds(wants[di], driven_bounds, clamps)
    followed = follow_ratio(driven, wants[di], ratio)
    parts.append(f"ratio {ratio_text} -> {followed} {follower}")
    if followed > wants[fi]:
        wants[fi] = followed
        fired[fi] = None  # the ratio, not the feedback, sets the follower
    # 5a. The prefill floor from prompt tokens/s (decode-driven policies only).
    floor = None
    if n.prefill_floor_target is not None:
        floor = _prefill_floor(
            n, n.prefill_floor_target, metrics.prefill_tps, current[0], now_s, parts
        )
        if floor is not None and floor >= wants[0]:
            if floor > wants[0]:
                wants[0] = floor
                fired[0] = None  # the floor, not the feedback, sets prefill
            if floor != current[0]:
                within_tolerance = False  # the prompt load asks for this change
    recommendation = _shape(n, wants[0], wants[1], clamps)

    # 6-7. Stabilisation per role, then the max step per cycle and the shape again.
    prefill, decode = stabilise(n, recommendation, current, past, history, now_s, clamps, floor)

    reason = _reason(current, prefill, decode, recommendation, within_tolerance, fired)
    this_cycle = Recommendation(now_s, recommendation[0], recommendation[1])
    remembered = replace(
        history,
        recommendations=(*past, this_cycle),
        kv_usage=kv_samples,
        dynamic_ratio=ratio if n.dynamic_ratio else None,
        extra=extra,
        planner=None,
    )
    return finish(n, current, (prefill, decode), reason, parts, clamps, remembered, now_s)


def finish(
    n: PolicyNumbers,
    current: list[int],
    counts: tuple[int, int],
    reason: Reason,
    parts: list[str],
    clamps: list[Clamp],
    remembered: PolicyHistory,
    now_s: float,
) -> Decision:
    """The decision for ``counts`` with its one-line message (reasons, then the clamps
    and the result), carrying what the policy ``remembered`` for the next cycle (this
    cycle's recommendation among them)."""
    prefill, decode = counts
    message = "; ".join(parts)
    if clamps:
        message += (
            clamps_note(clamps)
            + f" => {prefill} prefill, {decode} decode (now {current[0]}, {current[1]})"
        )
    return decided(n.service, counts, current, reason, message, clamps, remembered, now_s)


def stabilise(
    n: PolicyNumbers,
    recommendation: tuple[int, int],
    current: list[int],
    past: tuple[Recommendation, ...],
    history: PolicyHistory,
    now_s: float,
    clamps: list[Clamp],
    floor: int | None = None,
) -> tuple[int, int]:
    """Rules 6 and 7 of the module docstring: stabilisation per role (scale-out window,
    scale-in window, cooldown), then the max step per cycle and the shape again.
    ``floor``: a prefill count that scales out at once (the prefill floor)."""
    # 6. Stabilisation, per role.
    # A change dated after now (a clock stepped back, a hand-edited state) is none this
    # policy can date: no cooldown from it, or one such value would hold every scale
    # for ever (the next change records now in its place).
    cooling = (
        history.last_change_at_s is not None
        and 0.0 <= now_s - history.last_change_at_s < n.cooldown_s
    )
    stabilised = [0, 0]
    for ri in (0, 1):
        rec, cur = recommendation[ri], current[ri]
        value_now = rec
        if rec > cur and n.scale_out_window_s > 0:
            lowest, _covered, _oldest = _window_extreme(
                past, now_s, n.scale_out_window_s, ri, highest=False
            )
            value_now = max(cur, rec if lowest is None else min(rec, lowest))
            if ri == 0 and floor is not None and floor > value_now:
                # The prefill floor scales out at once (module docstring, rule 6).
                value_now = min(rec, floor)
            if value_now != rec:
                clamps.append(
                    Clamp(
                        "scale_out_window",
                        _ROLE_NAMES[ri],
                        rec,
                        value_now,
                        f"lowest recommendation over {n.scale_out_window_s:g} s",
                    )
                )
        elif rec < cur:
            highest, covered, oldest_s = _window_extreme(
                past, now_s, n.scale_in_window_s, ri, highest=True
            )
            if not covered:
                value_now = cur
                why = (
                    f"history covers {0.0 if oldest_s is None else now_s - oldest_s:.0f} s"
                    f" of the {n.scale_in_window_s:g} s window"
                )
            else:
                value_now = min(cur, rec if highest is None else max(rec, highest))
                why = f"highest recommendation over {n.scale_in_window_s:g} s"
            if value_now != rec:
                clamps.append(Clamp("scale_in_window", _ROLE_NAMES[ri], rec, value_now, why))
            if value_now < cur and cooling:
                clamps.append(
                    Clamp(
                        "cooldown",
                        _ROLE_NAMES[ri],
                        value_now,
                        cur,
                        f"last change {now_s - history.last_change_at_s:.0f} s ago < "  # type: ignore[operator]
                        f"cooldown {n.cooldown_s:g} s",
                    )
                )
                value_now = cur
        stabilised[ri] = value_now

    # 7. Max step per cycle, then shape again.
    prefill = clamp_step(
        stabilised[0], current[0], "prefill", n.max_step_instances, n.max_step_percent, clamps
    )
    decode = clamp_step(
        stabilised[1], current[1], "decode", n.max_step_instances, n.max_step_percent, clamps
    )
    if prefill != recommendation[0] or decode != recommendation[1]:
        prefill, decode = _shape(n, prefill, decode, clamps)  # the recommendation is shaped

    return prefill, decode


def _reason(
    current: list[int],
    prefill: int,
    decode: int,
    recommendation: tuple[int, int],
    within_tolerance: bool,
    fired: list[str | None],
) -> Reason:
    """The one reason code for the decision; ``within_tolerance`` means the primary
    signal asked for no change and no feedback rule fired."""
    if prefill == current[0] and decode == current[1]:
        if recommendation != (current[0], current[1]):
            return "stabilised"
        return "within_tolerance" if within_tolerance else "bounds"
    grew = (prefill > current[0], decode > current[1])
    if (grew[0] and fired[0] == "latency") or (grew[1] and fired[1] == "latency"):
        return "latency_feedback"
    if grew[1] and fired[1] == "kv":
        return "kv_cache_pressure"
    if within_tolerance:
        return "bounds"  # the signals asked for nothing; min/max, ratio or groups moved it
    return "scale_out" if grew[0] or grew[1] else "scale_in"


def _hold(
    n: PolicyNumbers,
    fleet: ServiceFleet,
    history: PolicyHistory,
    past: tuple[Recommendation, ...],
    kv_samples: tuple[tuple[float, float], ...],
    now_s: float,
    problem: str,
) -> Decision:
    """Hold the current size on an unusable primary signal (min/max still apply).

    The current size is ``RoleCount.hold_size``: the active instances and those of
    groups being deleted that nothing replaces yet, so that their replacement is made
    before they go. The hold is stored as a recommendation of that size, so after a
    gap the policy needs a full scale-in window of good data before it scales in."""
    current = [fleet.prefill.hold_size, fleet.decode.hold_size]
    clamps: list[Clamp] = []
    prefill = clamp_bounds(current[0], n.prefill_bounds, clamps)
    decode = clamp_bounds(current[1], n.decode_bounds, clamps)
    if (prefill, decode) == (current[0], current[1]):
        message = f"{problem}: hold {current[0]} prefill, {current[1]} decode"
    else:  # a size outside the policy's bounds is not held, even without data
        message = (
            f"{problem}: hold, within the policy's min/max: {current[0]} -> {prefill} prefill, "
            f"{current[1]} -> {decode} decode"
        )
    message += deleting_note(fleet) + clamps_note(clamps)
    held = Recommendation(now_s, prefill, decode)
    remembered = replace(history, recommendations=(*past, held), kv_usage=kv_samples)
    # Before is the held size: keeping a group being deleted is no change of the
    # service's size, so it does not re-arm the cooldown.
    return decided(
        n.service, (prefill, decode), current, "metrics_missing", message, clamps, remembered, now_s
    )


def deleting_note(fleet: ServiceFleet) -> str:
    """What of a held size is in groups being deleted that nothing replaces yet
    (``RoleCount.deleting_unreplaced``), for the end of a hold's message; "" if none."""
    counts = [(fleet.role(role).deleting_unreplaced, role) for role in ROLES]
    if not any(count for count, _ in counts):
        return ""
    named = ", ".join(f"{count} {role}" for count, role in counts if count)
    return (
        f" (the hold counts {named} instance(s) of groups being deleted: replaced before they go)"
    )


def decide_many(
    items: Iterable[tuple[ServicePolicy, ServiceFleet, ServiceMetrics, PolicyHistory]],
    now_s: float,
) -> list[Decision]:
    """``decide`` for many services at one instant (the reconcile loop's shape), the
    cyclic garbage collector paused for the batch (``base.gc_paused``)."""
    with gc_paused():
        return [
            decide(policy, fleet, metrics, history, now_s)
            for policy, fleet, metrics, history in items
        ]


class CoordinatedAutoscaler:
    """The coordinated policy exactly as the paper has it (``heteroscale-paper``):
    proportional control on the policy's hand-set ``target_per_instance``, latency
    tiers, the P/D ratio kept. Kept for comparison with the default planner
    (``reconciler.policy.planner``) and for services that pin their targets."""

    name = "heteroscale-paper"

    def decide(self, inputs: DecisionInput) -> Decision:
        return decide(inputs.policy, inputs.fleet, inputs.metrics, inputs.history, inputs.now_s)


__all__ = [
    "DEFAULT_LATENCY_SCALE_IN_PERCENT",
    "CoordinatedAutoscaler",
    "LatencyRule",
    "PolicyNumbers",
    "decide",
    "decide_many",
    "policy_numbers",
    "sample_problem",
    "scale_in_floor",
]

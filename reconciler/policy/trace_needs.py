"""What a recorded load needs of each role, against the policy's bounds:
``heteroscale validate --trace``.

The planner sizes each role from its own capacity, so the P/D ratio is the outcome;
``pd_ratio.min``/``max`` only add instances to one role when the outcome leaves them
(``clamps.enforce_ratio``), and ``max_instances`` caps a role below what the SLO needs.
Either costs silently but for a clamp in each decision's message: a 2:1 maximum on
long-context traffic that needs 3 prefill per decode keeps decode at 1.5x what it needs
all day; a ``max_instances`` below the busiest minute's need loses that minute's SLO
whatever the autoscaler does. These checks say so before the traffic arrives, from the
same pieces the planner sizes with: the instance models of ``planner.perf_context``,
the trace's request mix binned as the engines export it, the capacities of
``perf_context.capacities_for`` (prefill counted on the whole prompt work,
unattainable requests included, as ``PrefillCapacity.demand_tps`` does).

Prefill capacity per instance grows with the instance count (queueing pools), so a
need is stated at a load: the ratio at the trace's mean rate (after ``--rate-scale``),
the counts at its busiest ``PEAK_WINDOW_S``, with the whole trace's mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.desired.ratio import format_ratio
from reconciler.policy.capacity import (
    ENGINE_LENGTH_BOUNDS,
    LatencyCorrection,
    RequestMix,
    RoleCapacities,
)
from reconciler.policy.perf_context import capacities_for
from reconciler.policy.planner import out_of_reach, perf_context
from reconciler.state import ROLES, Role

# Outside a bound by more than this share the check warns: the planner's rounding to
# whole instances and groups moves a small fleet's ratio by about this much anyway.
RATIO_SLACK = 0.1
# The busiest stretch the counts are checked at: the planner's rates are one-minute
# averages, and a minute is the shortest stretch it sizes for.
PEAK_WINDOW_S = 60.0


@dataclass(frozen=True)
class RatioNeed:
    """The prefill instances per decode instance one service needs for a load."""

    service: str
    capacities: RoleCapacities  # each role's per instance, as the planner derives them
    prefill_instances: float  # at the load's mean rate, unrounded
    decode_instances: float
    ratio_min: float  # the policy's bounds (prefill / decode)
    ratio_max: float

    @property
    def ratio(self) -> float:
        return self.prefill_instances / self.decode_instances

    @property
    def excess(self) -> float:
        """How many times what it needs the bound holds the other role at (1: none).

        Above ``max``, decode is raised to prefill / max; below ``min``, prefill to
        decode x min."""
        if self.ratio > self.ratio_max:
            return self.ratio / self.ratio_max
        if self.ratio < self.ratio_min:
            return self.ratio_min / self.ratio
        return 1.0

    def warning(self, trace_name: str) -> str | None:
        """The warning ``validate --trace`` prints, None within the bounds (and
        ``RATIO_SLACK``)."""
        if self.excess <= 1.0 + RATIO_SLACK:
            return None
        above = self.ratio > self.ratio_max
        bound, held = (
            (f"pd_ratio max {format_ratio(self.ratio_max)}", "decode")
            if above
            else (f"pd_ratio min {format_ratio(self.ratio_min)}", "prefill")
        )
        caps = self.capacities
        return (
            f"service {self.service}: the mix in {trace_name} (prompts ~"
            f"{caps.prompt_mean_tokens:,.0f} / outputs ~{caps.output_mean_tokens:,.0f} "
            f"tokens) needs about {self.ratio:.2f} prefill per decode instance at its mean "
            f"load ({caps.prefill_tps_per_instance:,.0f} prompt tokens/s per "
            f"{caps.prefill_gpu_type} prefill instance, {caps.decode_tps_per_instance:,.0f} "
            f"output tokens/s per {caps.decode_gpu_type} decode instance); {bound} holds "
            f"{held} at {self.excess:.2f}x what it needs"
        )


@dataclass(frozen=True)
class PeakNeed:
    """Each role's instances one service needs at a load's busiest minute, against
    its ``max_instances``."""

    service: str
    capacities: RoleCapacities
    requests_per_s: float  # over the busiest PEAK_WINDOW_S
    prefill_instances: float
    decode_instances: float
    prefill_max: int
    decode_max: int

    def warning(self, trace_name: str) -> str | None:
        """The warning ``validate --trace`` prints, None when both roles fit."""
        short = [
            f"{role} about {need:,.1f} instances, max_instances {most}"
            for role, need, most in (
                ("prefill", self.prefill_instances, self.prefill_max),
                ("decode", self.decode_instances, self.decode_max),
            )
            if math.ceil(need - 1e-9) > most
        ]
        if not short:
            return None
        return (
            f"service {self.service}: the busiest minute of {trace_name} "
            f"({self.requests_per_s:,.1f} requests/s) needs {' and '.join(short)}: the "
            "SLO cannot hold there whatever the autoscaler does"
        )


@dataclass(frozen=True)
class TraceLoad:
    """What the checks read of a trace, whatever the service: its request mix, binned
    as the engines export it (vLLM's 1-2-5 buckets, as the planner reads it: on long
    prompts near the TTFT reach the derived capacity depends on the bins), its mean
    lengths, and its mean and busiest ``PEAK_WINDOW_S`` request rates."""

    mix: RequestMix
    prompt_mean_tokens: float
    output_mean_tokens: float
    mean_requests_per_s: float
    peak_requests_per_s: float

    @classmethod
    def of(
        cls,
        arrival_s: np.ndarray,
        prompt_tokens: np.ndarray,
        output_tokens: np.ndarray,
        duration_s: float,
    ) -> TraceLoad | None:
        """The requests (one entry each, arrival times sorted, arriving over
        ``duration_s``); None when there is no load to size for."""
        if len(arrival_s) == 0 or not duration_s > 0:
            return None
        arrival = np.asarray(arrival_s, dtype=float)
        ends = np.searchsorted(arrival, arrival + PEAK_WINDOW_S, side="left")
        busiest = int((ends - np.arange(arrival.size)).max())
        return cls(
            RequestMix.from_samples(prompt_tokens, output_tokens, ENGINE_LENGTH_BOUNDS),
            float(np.mean(prompt_tokens)),
            float(np.mean(output_tokens)),
            len(arrival) / duration_s,
            busiest / PEAK_WINDOW_S,
        )


def trace_out_of_reach(
    policy: ServicePolicy, cluster: ClusterSpec, load: TraceLoad
) -> tuple[tuple[Role, str], ...]:
    """Each role no instance of which meets its SLO for the load's mix, and why (the
    planner holds such a role where it runs, prefill grown to keep up with the work,
    and says so: ``planner.out_of_reach``);
    empty when every role can, or no GPU type of a role fits."""
    perf = perf_context(policy, cluster)
    if perf is None:
        return ()
    caps = capacities_for(policy, perf, load.mix, 1, LatencyCorrection())
    found = ((role, out_of_reach(policy, caps, role)) for role in ROLES)
    return tuple((role, why) for role, why in found if why is not None)


def trace_ratio_need(
    policy: ServicePolicy, cluster: ClusterSpec, load: TraceLoad
) -> RatioNeed | None:
    """The ratio the load needs at its mean rate. None when a role has no GPU type in
    the cluster that fits the model."""
    needs = _needs(policy, cluster, load, load.mean_requests_per_s)
    if needs is None:
        return None
    prefill, decode, caps = needs
    return RatioNeed(policy.name, caps, prefill, decode, policy.pd_ratio.min, policy.pd_ratio.max)


def trace_peak_need(
    policy: ServicePolicy, cluster: ClusterSpec, load: TraceLoad
) -> PeakNeed | None:
    """Each role's need at the load's busiest ``PEAK_WINDOW_S``, with the whole trace's
    mix. None as ``trace_ratio_need``."""
    rate = load.peak_requests_per_s
    needs = _needs(policy, cluster, load, rate)
    if needs is None:
        return None
    prefill, decode, caps = needs
    return PeakNeed(
        policy.name,
        caps,
        rate,
        prefill,
        decode,
        policy.prefill.max_instances,
        policy.decode.max_instances,
    )


def _needs(
    policy: ServicePolicy, cluster: ClusterSpec, load: TraceLoad, requests_per_s: float
) -> tuple[float, float, RoleCapacities] | None:
    """Each role's instances (unrounded) for the load's mix at ``requests_per_s``, and
    the capacities they were sized with; None without a fitting GPU type."""
    perf = perf_context(policy, cluster)
    if perf is None or not requests_per_s > 0:
        return None
    mix = load.mix
    prompt_tps = requests_per_s * load.prompt_mean_tokens
    output_tps = requests_per_s * load.output_mean_tokens
    correction = LatencyCorrection()

    def sized(count: int) -> tuple[float, RoleCapacities]:
        """Prefill instances the load needs at the capacity pooled over ``count``."""
        caps = capacities_for(policy, perf, mix, count, correction)
        demand = caps.prefill.demand_tps(perf.prefill, mix, prompt_tps)
        return demand / max(caps.prefill_tps_per_instance, 1e-9), caps

    # Capacity per instance grows with the count it is pooled over, so the count the
    # load needs is the least n with sized(n) <= n: sized(1) is an upper bound (no
    # count has less capacity than one), and sized falls as n grows: bisect.
    low, high = 0, max(1, math.ceil(sized(1)[0]))
    while high - low > 1:
        middle = (low + high) // 2
        if sized(middle)[0] <= middle:
            high = middle
        else:
            low = middle
    prefill, caps = sized(high)
    if (
        not (caps.prefill_tps_per_instance > 0 and caps.decode_tps_per_instance > 0)
        or caps.prefill.keeps_up_only
        or caps.decode.keeps_up_only
    ):
        return None  # a role out of reach: no count meets its SLO (trace_out_of_reach)
    decode = output_tps / caps.decode_tps_per_instance
    if not (prefill > 0 and decode > 0):
        return None
    return prefill, decode, caps


__all__ = [
    "PEAK_WINDOW_S",
    "RATIO_SLACK",
    "PeakNeed",
    "RatioNeed",
    "TraceLoad",
    "trace_out_of_reach",
    "trace_peak_need",
    "trace_ratio_need",
]

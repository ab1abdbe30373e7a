"""Which prefill-to-decode ratio a recorded load needs, against the policy's bounds:
``heteroscale validate --trace``.

The planner sizes each role from its own capacity, so the P/D ratio is the outcome;
``pd_ratio.min``/``max`` only add instances to one role when the outcome leaves them
(``clamps.enforce_ratio``). A bound that excludes what the traffic needs therefore costs
instances every cycle, silently but for a clamp in each decision's message: a 2:1
maximum on long-context traffic that needs 3 prefill per decode keeps decode at 1.5x
what it needs all day. This check says so before the traffic arrives, from the same
pieces the planner sizes with: the instance models of ``planner.perf_context``, the
trace's request mix binned as the engines export it, the capacities of ``perf_context.capacities_for`` (prefill counted
on the whole prompt work, unattainable requests included, as
``PrefillCapacity.demand_tps`` does) at the trace's mean load.

Prefill capacity per instance grows with the instance count (queueing pools), so the
need is stated at a load: the trace's mean rate, after ``--rate-scale``.
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
from reconciler.policy.planner import perf_context

# Outside a bound by more than this share the check warns: the planner's rounding to
# whole instances and groups moves a small fleet's ratio by about this much anyway.
RATIO_SLACK = 0.1


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


def trace_ratio_need(
    policy: ServicePolicy,
    cluster: ClusterSpec,
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
    duration_s: float,
) -> RatioNeed | None:
    """The ratio the requests (one entry each, arriving over ``duration_s``) need at
    their mean rate. None when a role has no GPU type in the cluster that fits the
    model, or there is no load to size for."""
    perf = perf_context(policy, cluster)
    requests = len(prompt_tokens)
    if perf is None or requests == 0 or not duration_s > 0:
        return None
    # Binned as the engines export it (vLLM's 1-2-5 buckets), as the planner reads it:
    # on long prompts near the TTFT reach the derived capacity depends on the bins.
    mix = RequestMix.from_samples(prompt_tokens, output_tokens, ENGINE_LENGTH_BOUNDS)
    requests_per_s = requests / duration_s
    prompt_tps = requests_per_s * float(np.mean(prompt_tokens))
    output_tps = requests_per_s * float(np.mean(output_tokens))
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
    decode = output_tps / max(caps.decode_tps_per_instance, 1e-9)
    if not (prefill > 0 and decode > 0):
        return None
    return RatioNeed(policy.name, caps, prefill, decode, policy.pd_ratio.min, policy.pd_ratio.max)


__all__ = ["RATIO_SLACK", "RatioNeed", "trace_ratio_need"]

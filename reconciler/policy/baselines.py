"""The autoscalers the coordinated policy is measured against, behind the same
``Autoscaler`` protocol so every comparison runs the same harness.

- :class:`HpaGpuUtilAutoscaler` (``hpa-gpu-util``): what a Kubernetes user gets
  from a HorizontalPodAutoscaler per role on DCGM GPU utilisation: each role scaled
  on its own, no P/D coordination.
- :class:`StaticPeakAutoscaler` (``static-peak``): provision for the peak and never
  change (the common practice the paper's savings are measured against).
- :class:`OracleAutoscaler` (``oracle``): knows future demand exactly and sizes each
  role for the most it will see before a new instance could start; no real
  autoscaler can use fewer GPU-hours without queueing, so it is the lower bound.

All three use the shared arithmetic in ``reconciler.policy.clamps`` (rounding,
min/max, step) and report ``reason="baseline"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from reconciler.desired.models import ServicePolicy
from reconciler.errors import PermanentError
from reconciler.policy.base import Clamp, Decision, PolicyHistory, Recommendation
from reconciler.policy.clamps import RoleBounds, ceil_count, clamp_bounds, clamp_step
from reconciler.policy.coordinated import policy_numbers, sample_problem
from reconciler.state import ROLES, Role, ServiceFleet, ServiceMetrics


class AutoscalerConfigError(PermanentError):
    """An autoscaler was built or asked for with inputs it cannot use."""


# --------------------------------------------------------------------------- HPA


# Stored for a role whose metric could not be read: the Kubernetes HPA records no
# recommendation in that case, so stabilisation windows skip this value.
NO_RECOMMENDATION = -1


@dataclass(frozen=True, slots=True)
class _HpaRole:
    recommendation: int  # NO_RECOMMENDATION when the metric was unusable
    text: str


class HpaGpuUtilAutoscaler:
    """The Kubernetes HPA algorithm (``pkg/controller/podautoscaler``) on GPU
    utilisation, one independent HPA per role.

    Per role, each cycle:
    - ``usage = observed / target`` with ``observed`` the role's average utilisation
      (the metrics source averages over the GPUs of *ready* instances, as the HPA
      averages over ready pods);
    - inside ``1 +- tolerance`` (10%): keep the current replicas;
    - otherwise ``desired = ceil(usage x ready)``; when scaling up with instances
      still starting, the HPA counts those at 0% utilisation and recomputes
      (``usage' = observed x ready / (ready + starting) / target``), keeping the
      current replicas if that lands inside the tolerance or flips direction;
    - missing data: a metric that is absent, NaN or older than ``metric_max_age_s``
      (default: the policy's ``scaling.metric_max_age_s``) makes the HPA skip the
      role (its ``ScalingActive=False`` condition): no scale either way, and no
      recommendation stored; the same with no ready instance to report. Per-pod
      gaps (the HPA assumes 100% on scale-down, 0% on scale-up for pods without
      metrics) cannot arise here: the source delivers one average per role;
    - a target of 0 replicas disables scaling (the HPA never scales from zero),
      except to reach ``min_instances``;
    - scale-down stabilisation: the highest recommendation over the last
      ``scale_down_window_s`` (default 300 s), the current one included;
    - scale-up rate limit, the HPA's default ``behavior``: at most
      ``max(4 pods, 100%)`` more per cycle (the HPA's 15 s sync period);
    - then ``min_instances``/``max_instances`` of the policy.

    Target utilisation defaults to 0.6: the usual setting for GPU inference HPAs,
    leaving headroom for a burst during the minutes a new instance takes to load
    (``startup_s``). It is a parameter so a sweep can reproduce other operating
    points; the paper's point is that no single value works for decode, whose
    utilisation stays high at light load.
    """

    name = "hpa-gpu-util"

    def __init__(
        self,
        target_utilisation: float = 0.6,
        *,
        tolerance: float = 0.1,
        scale_down_window_s: float = 300.0,
        signal: Literal["gpu_util", "sm_active"] = "gpu_util",
        scale_up_limit_instances: int = 4,
        scale_up_limit_percent: float = 100.0,
        metric_max_age_s: float | None = None,
    ) -> None:
        if not 0.0 < target_utilisation <= 1.0:
            raise AutoscalerConfigError(
                f"hpa-gpu-util: target_utilisation must be in (0, 1], got {target_utilisation}"
            )
        if not 0.0 <= tolerance < 1.0:
            raise AutoscalerConfigError(
                f"hpa-gpu-util: tolerance must be in [0, 1), got {tolerance}"
            )
        if signal not in ("gpu_util", "sm_active"):
            raise AutoscalerConfigError(
                f"hpa-gpu-util: signal must be 'gpu_util' or 'sm_active', got {signal!r}"
            )
        self.target_utilisation = target_utilisation
        self.tolerance = tolerance
        self.scale_down_window_s = scale_down_window_s
        self.signal = signal
        self.scale_up_limit_instances = scale_up_limit_instances
        self.scale_up_limit_percent = scale_up_limit_percent
        self.metric_max_age_s = metric_max_age_s

    def _recommend(
        self,
        role: Role,
        fleet: ServiceFleet,
        metrics: ServiceMetrics,
        max_age_s: float,
        now_s: float,
    ) -> _HpaRole:
        count = fleet.role(role)
        current, ready, starting = count.active, count.ready, count.starting
        metric = f"{role}_{self.signal}"
        problem = sample_problem(metrics.get(metric), metric, now_s, max_age_s)  # type: ignore[arg-type]
        if problem is None and ready == 0:
            problem = f"{metric}: no ready {role} instance reports it"
        if problem is not None:
            return _HpaRole(NO_RECOMMENDATION, f"{problem}: hold {current} {role}")
        observed = metrics.get(metric).value  # type: ignore[arg-type, union-attr]
        usage = observed / self.target_utilisation
        head = f"{metric} {observed:.2f} / target {self.target_utilisation:.2f} = {usage:.2f}"
        if starting > 0 and usage > 1.0:
            # Unready pods count as 0% on scale-up (replica_calculator.go).
            adjusted = observed * ready / (ready + starting) / self.target_utilisation
            if abs(1.0 - adjusted) <= self.tolerance + 1e-9 or adjusted < 1.0:
                return _HpaRole(
                    current,
                    f"{head}, {adjusted:.2f} counting {starting} starting at 0: hold {current} {role}",
                )
            desired = ceil_count(adjusted * (ready + starting))
            return _HpaRole(
                max(desired, current),
                f"{head}, {adjusted:.2f} counting {starting} starting at 0 -> {desired} {role}",
            )
        if abs(1.0 - usage) <= self.tolerance + 1e-9:  # float slack at the band's edge
            return _HpaRole(current, f"{head} within {self.tolerance:.0%}: hold {current} {role}")
        desired = ceil_count(usage * ready)
        return _HpaRole(desired, f"{head} x {ready} ready -> {desired} {role}")

    def decide(
        self,
        policy: ServicePolicy,
        fleet: ServiceFleet,
        metrics: ServiceMetrics,
        history: PolicyHistory,
        now_s: float,
    ) -> Decision:
        max_age_s = (
            self.metric_max_age_s
            if self.metric_max_age_s is not None
            else policy.scaling.metric_max_age_s
        )
        past = _trim(history.recommendations, now_s, self.scale_down_window_s)
        clamps: list[Clamp] = []
        parts: list[str] = []
        recommendations: dict[str, int] = {}
        final: dict[str, int] = {}
        for role in ROLES:
            current = fleet.role(role).active
            proposal = self._recommend(role, fleet, metrics, max_age_s, now_s)
            parts.append(proposal.text)
            recommendations[role] = proposal.recommendation
            bounds = policy.role(role)
            if current == 0:
                # The HPA does not scale a target at zero replicas, except up to min.
                target = bounds.min_instances
            elif proposal.recommendation == NO_RECOMMENDATION:
                target = current
            else:
                target = self._stabilise(
                    role, proposal.recommendation, current, past, now_s, clamps
                )
                if target > current:
                    target = clamp_step(
                        target,
                        current,
                        role,
                        self.scale_up_limit_instances,
                        self.scale_up_limit_percent,
                        clamps,
                    )
            final[role] = clamp_bounds(
                target,
                _bounds(policy, role),
                clamps,
            )
        changed = final["prefill"] != fleet.prefill.active or final["decode"] != fleet.decode.active
        message = "hpa: " + "; ".join(parts)
        if clamps:
            message += "; clamps: " + ", ".join(str(c) for c in clamps)
        return Decision(
            service=policy.name,
            prefill=final["prefill"],
            decode=final["decode"],
            reason="baseline",
            message=message,
            clamps=tuple(clamps),
            history=PolicyHistory(
                recommendations=(
                    *past,
                    Recommendation(now_s, recommendations["prefill"], recommendations["decode"]),
                ),
                last_change_at_s=now_s if changed else history.last_change_at_s,
            ),
        )

    def _stabilise(
        self,
        role: Role,
        recommendation: int,
        current: int,
        past: Sequence[Recommendation],
        now_s: float,
        clamps: list[Clamp],
    ) -> int:
        """Scale-down takes the highest recommendation made after ``now - window``
        (the HPA's cutoff is exclusive), the current one included."""
        if recommendation >= current:
            return recommendation
        cutoff_s = now_s - self.scale_down_window_s
        highest = recommendation
        for rec in past:
            if rec.at_s > cutoff_s:
                value = rec.prefill if role == "prefill" else rec.decode
                highest = max(highest, value)
        stabilised = min(current, highest)
        if stabilised != recommendation:
            clamps.append(
                Clamp(
                    "scale_in_window",
                    role,
                    recommendation,
                    stabilised,
                    f"highest recommendation over {self.scale_down_window_s:g} s",
                )
            )
        return stabilised


def _trim(
    history: tuple[Recommendation, ...], now_s: float, window_s: float
) -> tuple[Recommendation, ...]:
    cutoff_s = now_s - window_s
    for index, rec in enumerate(history):
        if rec.at_s > cutoff_s:
            return history[index:]
    return ()


def _bounds(policy: ServicePolicy, role: Role) -> RoleBounds:
    return policy_numbers(policy).bounds(role)


# --------------------------------------------------------------------------- static peak


class StaticPeakAutoscaler:
    """Fixed counts, set once for the peak: ``StaticPeakAutoscaler(prefill=12,
    decode=30)`` for one service, or ``counts={"svc-a": (12, 30), ...}`` for many.
    The simulator computes the peak need (:meth:`from_peak_demand` does the
    arithmetic). Only the policy's min/max can change the counts."""

    name = "static-peak"

    def __init__(
        self,
        prefill: int | None = None,
        decode: int | None = None,
        *,
        counts: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        if counts is None and (prefill is None or decode is None):
            raise AutoscalerConfigError(
                "static-peak needs prefill= and decode= counts, or counts={service: (prefill, decode)}"
            )
        given = [*(counts or {}).values()]
        if prefill is not None and decode is not None:
            given.append((prefill, decode))
        if any(p < 0 or d < 0 for p, d in given):
            raise AutoscalerConfigError("static-peak: instance counts must not be negative")
        self.default = (prefill, decode) if prefill is not None and decode is not None else None
        self.counts = dict(counts or {})

    @classmethod
    def from_peak_demand(
        cls,
        peak_prefill_tps: float,
        peak_decode_tps: float,
        prefill_tps_per_instance: float,
        decode_tps_per_instance: float,
    ) -> StaticPeakAutoscaler:
        """Enough instances of each role for the peak demand at the given per-instance
        capacities (tokens/s at SLO)."""
        return cls(
            prefill=ceil_count(peak_prefill_tps / prefill_tps_per_instance),
            decode=ceil_count(peak_decode_tps / decode_tps_per_instance),
        )

    def decide(
        self,
        policy: ServicePolicy,
        fleet: ServiceFleet,
        metrics: ServiceMetrics,
        history: PolicyHistory,
        now_s: float,
    ) -> Decision:
        pair = self.counts.get(policy.name, self.default)
        if pair is None:
            raise AutoscalerConfigError(
                f"static-peak has no counts for service '{policy.name}' "
                f"(known: {', '.join(sorted(self.counts)) or 'none'})"
            )
        clamps: list[Clamp] = []
        prefill = clamp_bounds(pair[0], _bounds(policy, "prefill"), clamps)
        decode = clamp_bounds(pair[1], _bounds(policy, "decode"), clamps)
        message = f"static peak: {prefill} prefill, {decode} decode"
        if clamps:
            message += "; clamps: " + ", ".join(str(c) for c in clamps)
        changed = prefill != fleet.prefill.active or decode != fleet.decode.active
        return Decision(
            service=policy.name,
            prefill=prefill,
            decode=decode,
            reason="baseline",
            message=message,
            clamps=tuple(clamps),
            history=PolicyHistory(last_change_at_s=now_s if changed else history.last_change_at_s),
        )


# --------------------------------------------------------------------------- oracle

DemandFunction = Callable[[float], tuple[float, float]]


@dataclass(frozen=True)
class DemandSeries:
    """Demand over time as a step function: from ``t_s[i]`` until ``t_s[i + 1]`` the
    service needs ``prefill_tps[i]`` and ``decode_tps[i]`` tokens/s (before the first
    sample, the first sample's demand)."""

    t_s: np.ndarray
    prefill_tps: np.ndarray
    decode_tps: np.ndarray

    @classmethod
    def of(
        cls, t_s: Sequence[float], prefill_tps: Sequence[float], decode_tps: Sequence[float]
    ) -> DemandSeries:
        times = np.asarray(t_s, dtype=float)
        prefill = np.asarray(prefill_tps, dtype=float)
        decode = np.asarray(decode_tps, dtype=float)
        if not (times.ndim == prefill.ndim == decode.ndim == 1) or not (
            len(times) == len(prefill) == len(decode) > 0
        ):
            raise AutoscalerConfigError(
                "oracle demand: t_s, prefill_tps and decode_tps must be 1-D and of one non-zero length"
            )
        if np.any(np.diff(times) < 0):
            raise AutoscalerConfigError("oracle demand: t_s must be sorted ascending")
        if not (np.all(np.isfinite(prefill)) and np.all(np.isfinite(decode))):
            raise AutoscalerConfigError("oracle demand: tokens/s must be finite")
        return cls(times, prefill, decode)

    def max_over(self, start_s: float, end_s: float) -> tuple[float, float]:
        """Highest prefill and decode demand in force at any time in [start, end]."""
        first = max(int(np.searchsorted(self.t_s, start_s, side="right")) - 1, 0)
        last = max(int(np.searchsorted(self.t_s, end_s, side="right")), first + 1)
        return float(self.prefill_tps[first:last].max()), float(self.decode_tps[first:last].max())


def _sampled_max(
    demand: DemandFunction, start_s: float, end_s: float, step_s: float
) -> tuple[float, float]:
    """Highest demand of a callable sampled every ``step_s`` over [start, end] (both ends)."""
    steps = max(0, math.ceil((end_s - start_s) / step_s - 1e-9))
    best_prefill = best_decode = 0.0
    for index in range(steps + 1):
        prefill, decode = demand(min(start_s + index * step_s, end_s))
        best_prefill = max(best_prefill, prefill)
        best_decode = max(best_decode, decode)
    return best_prefill, best_decode


DemandInput = (
    DemandSeries | DemandFunction | tuple[Sequence[float], Sequence[float], Sequence[float]]
)


class OracleAutoscaler:
    """Sizes each role for the highest demand over ``[now, now + lookahead]``.

    ``lookahead_s`` defaults to each role's ``startup_s``: an instance asked for now
    serves only after it has started, so covering the demand up to then is exactly
    what a clairvoyant policy must do, and nothing more. Counts are
    ``ceil(max demand / per-instance capacity)`` within the policy's min/max. The
    oracle keeps neither the ratio bounds nor a step limit: both are heuristics for
    policies that do not know the future, and the oracle is the lower bound on
    GPU-hours that other policies are measured against.

    ``demand`` is a :class:`DemandSeries`, a ``(t_s, prefill_tps, decode_tps)``
    triple of arrays, or a callable ``t_s -> (prefill_tps, decode_tps)`` sampled
    every ``sample_step_s``; it and the capacities may also be mappings by service
    name, for one oracle over many services.
    """

    name = "oracle"

    def __init__(
        self,
        demand: DemandInput | Mapping[str, DemandInput],
        prefill_tps_per_instance: float | Mapping[str, float],
        decode_tps_per_instance: float | Mapping[str, float],
        *,
        lookahead_s: float | None = None,
        sample_step_s: float = 5.0,
    ) -> None:
        if sample_step_s <= 0:
            raise AutoscalerConfigError(
                f"oracle: sample_step_s must be positive, got {sample_step_s}"
            )
        if lookahead_s is not None and lookahead_s < 0:
            raise AutoscalerConfigError(
                f"oracle: lookahead_s must not be negative, got {lookahead_s}"
            )
        for capacity in (prefill_tps_per_instance, decode_tps_per_instance):
            values = capacity.values() if isinstance(capacity, Mapping) else [capacity]
            if any(not (v > 0 and math.isfinite(v)) for v in values):
                raise AutoscalerConfigError(
                    "oracle: per-instance capacities must be positive tokens/s"
                )
        if isinstance(demand, Mapping):
            self._demand: (
                Mapping[str, DemandSeries | DemandFunction] | DemandSeries | DemandFunction
            ) = {service: _demand_of(value) for service, value in demand.items()}
        else:
            self._demand = _demand_of(demand)
        self.prefill_tps_per_instance = prefill_tps_per_instance
        self.decode_tps_per_instance = decode_tps_per_instance
        self.lookahead_s = lookahead_s
        self.sample_step_s = sample_step_s

    def _max_demand(
        self, demand: DemandSeries | DemandFunction, start_s: float, end_s: float
    ) -> tuple[float, float]:
        if isinstance(demand, DemandSeries):
            return demand.max_over(start_s, end_s)
        return _sampled_max(demand, start_s, end_s, self.sample_step_s)

    def decide(
        self,
        policy: ServicePolicy,
        fleet: ServiceFleet,
        metrics: ServiceMetrics,
        history: PolicyHistory,
        now_s: float,
    ) -> Decision:
        service = policy.name
        demand = _for_service(self._demand, service, "demand")
        capacity = {
            "prefill": _for_service(self.prefill_tps_per_instance, service, "prefill capacity"),
            "decode": _for_service(self.decode_tps_per_instance, service, "decode capacity"),
        }
        clamps: list[Clamp] = []
        parts: list[str] = []
        counts: dict[str, int] = {}
        for index, role in enumerate(ROLES):
            lookahead_s = (
                self.lookahead_s if self.lookahead_s is not None else policy.role(role).startup_s
            )
            peak = self._max_demand(demand, now_s, now_s + lookahead_s)[index]
            needed = ceil_count(peak / capacity[role])
            parts.append(
                f"max {role} demand {peak:.0f} tps over the next {lookahead_s:g} s / "
                f"{capacity[role]:g} per instance -> {needed} {role}"
            )
            counts[role] = clamp_bounds(needed, _bounds(policy, role), clamps)
        message = "oracle: " + "; ".join(parts)
        if clamps:
            message += "; clamps: " + ", ".join(str(c) for c in clamps)
        changed = (
            counts["prefill"] != fleet.prefill.active or counts["decode"] != fleet.decode.active
        )
        return Decision(
            service=service,
            prefill=counts["prefill"],
            decode=counts["decode"],
            reason="baseline",
            message=message,
            clamps=tuple(clamps),
            history=PolicyHistory(last_change_at_s=now_s if changed else history.last_change_at_s),
        )


def _demand_of(value: DemandInput) -> DemandSeries | DemandFunction:
    if isinstance(value, DemandSeries):
        return value
    if isinstance(value, tuple) and len(value) == 3:
        return DemandSeries.of(*value)
    if callable(value):
        return value
    raise AutoscalerConfigError(
        "oracle demand must be a DemandSeries, a (t_s, prefill_tps, decode_tps) tuple of arrays, "
        "or a callable t_s -> (prefill_tps, decode_tps)"
    )


def _for_service(value: Any, service: str, what: str) -> Any:
    if isinstance(value, Mapping):
        if service not in value:
            raise AutoscalerConfigError(
                f"oracle has no {what} for service '{service}' (known: {', '.join(sorted(value))})"
            )
        return value[service]
    return value


__all__ = [
    "NO_RECOMMENDATION",
    "AutoscalerConfigError",
    "DemandSeries",
    "HpaGpuUtilAutoscaler",
    "OracleAutoscaler",
    "StaticPeakAutoscaler",
]

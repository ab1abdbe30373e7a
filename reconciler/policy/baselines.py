"""The autoscalers the coordinated policy is measured against, behind the same
``Autoscaler`` protocol so every comparison runs the same harness.

- :class:`HpaGpuUtilAutoscaler` (``hpa-gpu-util``): what a Kubernetes user gets
  from a HorizontalPodAutoscaler per role on DCGM GPU utilisation: each role scaled
  on its own, no P/D coordination.
- :class:`HpaTokensAutoscaler` (``hpa-decode-tps``): the same HPA per role on the
  tokens/s signal the coordinated policy uses, so a comparison separates the signal
  from the coordination. Both share :class:`PerRoleHpa` (the HPA arithmetic, at the
  HPA's 15 s sync period).
- :class:`StaticPeakAutoscaler` (``static-peak``): provision for the peak and never
  change (the common practice the paper's savings are measured against).

The paper's coordinated policy (``heteroscale-paper``) is
``reconciler.policy.coordinated.CoordinatedAutoscaler``.

The HPAs and static peak use the shared arithmetic in
``reconciler.policy.clamps`` (rounding, min/max, step) and report
``reason="baseline"``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict, Unpack

from reconciler.desired.models import ServicePolicy
from reconciler.errors import PermanentError
from reconciler.policy.base import (
    Clamp,
    Decision,
    DecisionInput,
    PolicyHistory,
    Reason,
    Recommendation,
    clamps_note,
    decided,
)
from reconciler.policy.clamps import RoleBounds, ceil_count, clamp_bounds, clamp_step
from reconciler.policy.coordinated import policy_numbers, sample_problem
from reconciler.state import ROLES, MetricName, Role, ServiceFleet, ServiceMetrics


class AutoscalerConfigError(PermanentError):
    """An autoscaler was built or asked for with inputs it cannot use."""


# --------------------------------------------------------------------------- HPA


# Stored for a role whose metric could not be read: the Kubernetes HPA records no
# recommendation in that case, so stabilisation windows skip this value.
NO_RECOMMENDATION = -1

# The HPA controller's default sync period (--horizontal-pod-autoscaler-sync-period).
# Its default scale-up policies (4 pods, 100%) have ``periodSeconds: 15`` too, so one
# limit per sync is the HPA's own clock.
HPA_SYNC_PERIOD_S = 15.0


@dataclass(frozen=True, slots=True)
class HpaTarget:
    """What one role's HPA reads and aims for.

    ``role_total`` says how the per-instance average the HPA compares with ``target``
    is formed: True for a role total (tokens/s summed over instances) divided by the
    ready instances (the HPA's ``AverageValue`` target); False for a signal the source
    already averages over the ready instances' GPUs (the HPA's ``Utilization``)."""

    metric: MetricName
    target: float
    role_total: bool
    number_format: str  # for messages: ".2f" for fractions, ".0f" for tokens/s


@dataclass(frozen=True, slots=True)
class _HpaRole:
    recommendation: int  # NO_RECOMMENDATION when the metric was unusable
    text: str


class HpaSettings(TypedDict, total=False):
    """The settings every :class:`PerRoleHpa` takes by keyword (defaults there), typed
    for the subclasses' ``**settings``."""

    tolerance: float
    scale_down_window_s: float
    scale_up_limit_instances: int
    scale_up_limit_percent: float
    metric_max_age_s: float | None


class PerRoleHpa(ABC):
    """The Kubernetes HPA algorithm (``pkg/controller/podautoscaler``), one independent
    HPA per role; subclasses say which metric and target each role's HPA reads
    (:meth:`hpa_target`).

    Per role, each sync (every :attr:`interval_s`, the HPA's 15 s):
    - ``usage = observed / target`` with ``observed`` the role's average per *ready*
      instance (the HPA averages over ready pods);
    - inside ``1 +- tolerance`` (10%): keep the current replicas;
    - otherwise ``desired = ceil(usage x ready)``; when scaling up with instances
      still starting, the HPA counts those at 0 and recomputes
      (``usage' = observed x ready / (ready + starting) / target``), keeping the
      current replicas if that lands inside the tolerance or flips direction;
    - missing data: a metric that is absent, NaN or older than ``metric_max_age_s``
      (default: the policy's ``scaling.metric_max_age_s``) makes the HPA skip the
      role (its ``ScalingActive=False`` condition): no scale either way, and no
      recommendation stored; the same with no ready instance to report. Per-pod
      gaps (the HPA assumes 100% on scale-down, 0% on scale-up for pods without
      metrics) cannot arise here: the source delivers one figure per role;
    - a target of 0 replicas disables scaling (the HPA never scales from zero),
      except to reach ``min_instances``;
    - scale-down stabilisation: the highest recommendation made after
      ``now - scale_down_window_s`` (default 300 s), the current one included; it
      compares timestamps, so it holds whatever the sync period;
    - scale-up rate limit, the HPA's default ``behavior``: at most
      ``max(4 pods, 100%)`` more per sync. The real HPA counts it per 15 s period;
      with ``decide`` called once per sync (the harness honours :attr:`interval_s`)
      the two agree. Called more often, this would scale up faster than the HPA;
    - then ``min_instances``/``max_instances`` of the policy.
    """

    name = "hpa"
    interval_s = HPA_SYNC_PERIOD_S

    def __init__(
        self,
        *,
        tolerance: float = 0.1,
        scale_down_window_s: float = 300.0,
        scale_up_limit_instances: int = 4,
        scale_up_limit_percent: float = 100.0,
        metric_max_age_s: float | None = None,
    ) -> None:
        if not 0.0 <= tolerance < 1.0:
            raise AutoscalerConfigError(
                f"{self.name}: tolerance must be in [0, 1), got {tolerance}"
            )
        if scale_down_window_s < 0:
            raise AutoscalerConfigError(
                f"{self.name}: scale_down_window_s must not be negative, got {scale_down_window_s}"
            )
        self.tolerance = tolerance
        self.scale_down_window_s = scale_down_window_s
        self.scale_up_limit_instances = scale_up_limit_instances
        self.scale_up_limit_percent = scale_up_limit_percent
        self.metric_max_age_s = metric_max_age_s

    @abstractmethod
    def hpa_target(self, policy: ServicePolicy, role: Role) -> HpaTarget:
        """The metric and target of ``role``'s HPA for this service."""

    def _recommend(
        self,
        role: Role,
        target: HpaTarget,
        fleet: ServiceFleet,
        metrics: ServiceMetrics,
        max_age_s: float,
        now_s: float,
    ) -> _HpaRole:
        count = fleet.role(role)
        current, ready, starting = count.active, count.ready, count.starting
        metric = target.metric
        sample = metrics.get(metric)
        problem = sample_problem(sample, metric, now_s, max_age_s)
        if problem is None and ready == 0:
            problem = f"{metric}: no ready {role} instance reports it"
        if problem is not None or sample is None:
            held = f"{count.hold_size} {role}"
            if count.deleting_unreplaced:
                held += f" ({count.deleting_unreplaced} of them in groups being deleted)"
            return _HpaRole(NO_RECOMMENDATION, f"{problem}: hold {held}")
        fmt = target.number_format
        if target.role_total:
            observed = sample.value / ready
            head = f"{metric} {sample.value:{fmt}} / {ready} ready = {observed:{fmt}}"
        else:
            observed = sample.value
            head = f"{metric} {observed:{fmt}}"
        usage = observed / target.target
        head += f" / target {target.target:{fmt}} = {usage:.2f}"
        if starting > 0 and usage > 1.0:
            # Unready pods count as 0 on scale-up (replica_calculator.go).
            adjusted = observed * ready / (ready + starting) / target.target
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

    def decide(self, inputs: DecisionInput) -> Decision:
        policy, fleet, metrics, history, now_s = inputs.unpacked()
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
            proposal = self._recommend(
                role, self.hpa_target(policy, role), fleet, metrics, max_age_s, now_s
            )
            parts.append(proposal.text)
            recommendations[role] = proposal.recommendation
            bounds = policy.role(role)
            held = fleet.role(role).hold_size
            if proposal.recommendation == NO_RECOMMENDATION and held != current:
                # Held with instances of groups being deleted: kept, so that their
                # replacement is made before they go (``RoleCount.hold_size``).
                target = held
            elif current == 0:
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
        message = f"{self.name}: " + "; ".join(parts) + clamps_note(clamps)
        asked = Recommendation(now_s, recommendations["prefill"], recommendations["decode"])
        remembered = PolicyHistory(
            recommendations=(*past, asked), last_change_at_s=history.last_change_at_s
        )
        counts = (final["prefill"], final["decode"])
        before = (fleet.prefill.active, fleet.decode.active)
        # No role read its metric: a hold for want of a reading, as the planner's, which
        # the cycle, a review and the status count as unsized (``UNSIZED_REASONS``).
        unread = all(recommendations[role] == NO_RECOMMENDATION for role in ROLES)
        reason: Reason = "metrics_missing" if unread else "baseline"
        return decided(policy.name, counts, before, reason, message, clamps, remembered, now_s)

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


class HpaGpuUtilAutoscaler(PerRoleHpa):
    """A Kubernetes HPA per role on GPU utilisation (``Utilization`` target):
    ``observed`` is the role's utilisation, which the metrics source averages over
    the GPUs of ready instances (:class:`PerRoleHpa` has the algorithm).

    Target utilisation defaults to 0.6: the usual setting for GPU inference HPAs,
    leaving headroom for a burst during the minutes a new instance takes to load
    (``startup_s``). It is a parameter so a sweep can pick the operating point
    (``reconciler.sim.sweep``); the paper's point is that no single value works for
    decode, whose utilisation stays high at light load.
    """

    name = "hpa-gpu-util"

    def __init__(
        self,
        target_utilisation: float = 0.6,
        *,
        signal: Literal["gpu_util", "sm_active"] = "gpu_util",
        **settings: Unpack[HpaSettings],
    ) -> None:
        if not 0.0 < target_utilisation <= 1.0:
            raise AutoscalerConfigError(
                f"{self.name}: target_utilisation must be in (0, 1], got {target_utilisation}"
            )
        if signal not in ("gpu_util", "sm_active"):
            raise AutoscalerConfigError(
                f"{self.name}: signal must be 'gpu_util' or 'sm_active', got {signal!r}"
            )
        super().__init__(**settings)
        self.target_utilisation = target_utilisation
        self.signal = signal
        self._targets: dict[Role, HpaTarget] = {
            role: HpaTarget(f"{role}_{signal}", target_utilisation, False, ".2f")  # type: ignore[arg-type]
            for role in ROLES
        }

    def hpa_target(self, policy: ServicePolicy, role: Role) -> HpaTarget:
        return self._targets[role]


def policy_tps_targets(policy: ServicePolicy) -> tuple[float | None, float | None]:
    """The per-instance tokens/s targets the policy itself sets: (prefill, decode),
    None for a role it sets none for. ``target_per_instance`` belongs to the role
    the primary metric measures; ``prefill_target_per_instance`` is the prefill
    floor's, which the policy ignores when the primary metric is prefill's."""
    scaling = policy.scaling
    if scaling.metric == "prefill_tps":
        return scaling.target_per_instance, None
    decode = scaling.target_per_instance if scaling.metric == "decode_tps" else None
    return scaling.prefill_target_per_instance, decode


class HpaTokensAutoscaler(PerRoleHpa):
    """A Kubernetes HPA per role on the tokens/s signal the coordinated policy uses,
    without its P/D coordination: prefill on ``prefill_tps``, decode on
    ``decode_tps``, each an ``AverageValue`` target per instance (the role's tokens/s
    divided by its ready instances, against ``*_tps_per_instance``). Everything else
    is :class:`PerRoleHpa`. A target left None is the policy's own
    (:func:`policy_tps_targets`); a role with neither cannot be scaled and is an
    error. What separates it from ``heteroscale`` is then only the coordination
    (ratio, latency tiers, cooldown), not the signal."""

    name = "hpa-decode-tps"

    def __init__(
        self,
        prefill_tps_per_instance: float | None = None,
        decode_tps_per_instance: float | None = None,
        **settings: Unpack[HpaSettings],
    ) -> None:
        for what, value in (
            ("prefill_tps_per_instance", prefill_tps_per_instance),
            ("decode_tps_per_instance", decode_tps_per_instance),
        ):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise AutoscalerConfigError(
                    f"{self.name}: {what} must be positive tokens/s, got {value}"
                )
        super().__init__(**settings)
        self.prefill_tps_per_instance = prefill_tps_per_instance
        self.decode_tps_per_instance = decode_tps_per_instance

    def hpa_target(self, policy: ServicePolicy, role: Role) -> HpaTarget:
        given = self.prefill_tps_per_instance if role == "prefill" else self.decode_tps_per_instance
        target = given if given is not None else policy_tps_targets(policy)[ROLES.index(role)]
        if target is None:
            raise AutoscalerConfigError(
                f"{self.name}: no {role} tokens/s target for service '{policy.name}': pass "
                f"{role}_tps_per_instance= or set it in the policy's scaling"
            )
        return HpaTarget(f"{role}_tps", target, True, ".0f")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- paper policy


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

    def decide(self, inputs: DecisionInput) -> Decision:
        policy, fleet, history, now_s = inputs.policy, inputs.fleet, inputs.history, inputs.now_s
        pair = self.counts.get(policy.name, self.default)
        if pair is None:
            raise AutoscalerConfigError(
                f"static-peak has no counts for service '{policy.name}' "
                f"(known: {', '.join(sorted(self.counts)) or 'none'})"
            )
        return fixed_counts(policy, fleet, history, now_s, pair, "static peak")


def fixed_counts(
    policy: ServicePolicy,
    fleet: ServiceFleet,
    history: PolicyHistory,
    now_s: float,
    asked: tuple[int, int],
    label: str,
) -> Decision:
    """The decision of an autoscaler that names its counts outright (static peak, an
    external planner): ``asked`` within the policy's min/max, each clamp recorded."""
    clamps: list[Clamp] = []
    prefill = clamp_bounds(asked[0], _bounds(policy, "prefill"), clamps)
    decode = clamp_bounds(asked[1], _bounds(policy, "decode"), clamps)
    message = f"{label}: {asked[0]} prefill, {asked[1]} decode" + clamps_note(clamps)
    # A baseline remembers only its last change (the paper policy's hold, its whole history).
    remembered = PolicyHistory(last_change_at_s=history.last_change_at_s)
    before = (fleet.prefill.active, fleet.decode.active)
    return decided(
        policy.name, (prefill, decode), before, "baseline", message, clamps, remembered, now_s
    )


__all__ = [
    "HPA_SYNC_PERIOD_S",
    "NO_RECOMMENDATION",
    "AutoscalerConfigError",
    "HpaGpuUtilAutoscaler",
    "HpaSettings",
    "HpaTarget",
    "HpaTokensAutoscaler",
    "PerRoleHpa",
    "StaticPeakAutoscaler",
    "fixed_counts",
    "policy_tps_targets",
]

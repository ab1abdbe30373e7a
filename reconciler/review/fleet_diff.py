"""The fleet half of a pull-request review: what each revision would make the
reconciler do to the fleet, from the same observed load.

Both revisions are planned against one observation and one set of metrics, with the
histories the running reconciler has (so stabilisation windows act as they would the
minute after merge). The head plan's changes are exactly what ``apply`` would do
after merge; the per-service and per-domain GPU differences between the two plans
say what the change itself costs or frees.

Where the observation comes from:
- the simulated fleet (the default): warmed up under the *base* revision, which
  plays the reconciler as it runs today, cycle after cycle until its histories cover
  the longest scale-in window;
- a live backend and metrics source given by the caller (real clusters and
  Prometheus): one observation, histories empty (stated in the notes).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from reconciler.cost import CostChange, groups_cost_per_hour
from reconciler.cycle import plan_cluster
from reconciler.desired.loader import DesiredState
from reconciler.errors import MetricsUnavailable
from reconciler.observe.base import ClusterBackend, MetricsSource, Observation
from reconciler.placement.base import PlacementOptions, Placer
from reconciler.plan import Plan
from reconciler.policy.base import UNSIZED_REASONS, Autoscaler, PolicyHistory
from reconciler.state import ROLES, ServiceMetrics

RECONCILE_INTERVAL_S = 30.0
# The simulated fleet starts warm (placed and serving); the first cycle only needs one
# full metrics window (60 s) behind it, plus a margin.
WARMUP_S = 90.0
WARM_DAY_HOURS = 2.0


class ReviewTimeout(Exception):
    """The review's time budget ran out before the fleet diff was complete."""


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise ReviewTimeout


@dataclass(frozen=True)
class ServiceFleetDiff:
    """One service under base and head: targets, GPUs by type, GPUs by domain."""

    service: str
    cluster: str
    base_targets: tuple[int, int] | None  # (prefill, decode); None = not in that revision
    head_targets: tuple[int, int] | None
    base_gpus: Mapping[str, int]  # GPU type -> GPUs after that revision's plan
    head_gpus: Mapping[str, int]
    base_domains: Mapping[str, int]  # switch domain -> GPUs
    head_domains: Mapping[str, int]
    head_reason: str = ""
    head_message: str = ""
    base_reason: str = ""

    @property
    def changed(self) -> bool:
        return (
            self.base_targets != self.head_targets
            or dict(self.base_gpus) != dict(self.head_gpus)
            or dict(self.base_domains) != dict(self.head_domains)
        )

    @property
    def decision_kind_changed(self) -> bool:
        """Base and head both decide for the service, one of them sizing it and the
        other holding it unsized (``UNSIZED_REASONS``): e.g. head's model fits no GPU
        type. Counts held where they run look the same, so the reasons must be shown."""
        if not self.base_reason or not self.head_reason:
            return False
        return (self.base_reason in UNSIZED_REASONS) != (self.head_reason in UNSIZED_REASONS)

    def gpu_delta(self) -> dict[str, int]:
        return _delta(self.base_gpus, self.head_gpus)

    def domain_delta(self) -> dict[str, int]:
        return _delta(self.base_domains, self.head_domains)


def _delta(base: Mapping[str, int], head: Mapping[str, int]) -> dict[str, int]:
    """``head - base`` per key of either (a missing key counts 0), sorted by key; keys
    that did not change left out."""
    return {
        key: head.get(key, 0) - base.get(key, 0)
        for key in sorted(set(base) | set(head))
        if head.get(key, 0) != base.get(key, 0)
    }


@dataclass(frozen=True)
class FleetReview:
    """Plans of both revisions per cluster, and the per-service comparison."""

    source: str  # where the observation came from
    base_plans: Mapping[str, Plan]
    head_plans: Mapping[str, Plan]
    services: tuple[ServiceFleetDiff, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def apply_changes(self) -> int:
        """Group changes ``apply`` would carry out after merge."""
        return sum(len(p.changes) for p in self.head_plans.values())

    @property
    def differs(self) -> bool:
        return any(s.changed or s.decision_kind_changed for s in self.services)

    def cost_per_hour(self) -> dict[str, CostChange]:
        """Per cluster, what the base plan's groups and the head plan's groups cost per
        hour, both at head's prices (a price change alone moves neither side: the
        config diff shows it). Clusters without prices in head are left out. A group's
        GPUs per instance are head's policy's, else base's: the groups of a service
        whose policy head removes keep running (prune is off) at base's size."""
        out: dict[str, CostChange] = {}
        for name, head in sorted(self.head_plans.items()):
            if head.prices is None:
                continue
            base = self.base_plans.get(name)
            base_groups = base.groups if base is not None else ()
            sizes = {**(base.gpus_per_instance if base else {}), **head.gpus_per_instance}
            out[name] = CostChange(
                current=groups_cost_per_hour(base_groups, sizes, head.prices),
                planned=groups_cost_per_hour(head.groups, sizes, head.prices),
            )
        return out


def _gpus_by(
    plan: Plan | None, state: DesiredState, service: str
) -> tuple[dict[str, int], dict[str, int]]:
    by_type: Counter[str] = Counter()
    by_domain: Counter[str] = Counter()
    if plan is None or service not in state.policies:
        return {}, {}
    policy = state.policies[service]
    for group in plan.groups:
        if group.service != service:
            continue
        for role in ROLES:
            gpus = group.role(role).instances * policy.role(role).gpus_per_instance
            if gpus:
                by_type[group.role(role).gpu_type] += gpus
                by_domain[group.domain] += gpus
    return dict(sorted(by_type.items())), dict(sorted(by_domain.items()))


@dataclass
class _Edge:
    """The observed side for one cluster: a backend and a metrics source."""

    backend: ClusterBackend
    metrics: MetricsSource


def review_fleet(
    base: DesiredState,
    head: DesiredState,
    *,
    autoscaler_factory: Callable[[], Autoscaler],
    placer: Placer,
    edges: Callable[[str], tuple[ClusterBackend, MetricsSource]] | None = None,
    seed: int = 0,
    placement_options: PlacementOptions | None = None,
    now_s: float | None = None,
    deadline: float | None = None,
) -> FleetReview:
    """Plan ``base`` and ``head`` from the same observation (module docstring).

    ``edges(cluster)`` returns the live backend and metrics source of a cluster; when
    it is None the simulated fleet stands in for every cluster. Raises
    ``ReviewTimeout`` once ``deadline`` (``time.monotonic()``) has passed, checked
    between cycles and between plans.
    """
    notes: list[str] = []
    histories: dict[str, PolicyHistory] = {}
    observations: dict[str, Observation] = {}
    metrics: dict[str, dict[str, ServiceMetrics]] = {}
    clusters = sorted(set(base.clusters) | set(head.clusters))

    if edges is None:
        from reconciler.sim import default_simulated_fleet

        longest_window_s = max(
            (
                max(p.scaling.scale_in_window_s, p.scaling.cooldown_s)
                for p in base.policies.values()
            ),
            default=0.0,
        )
        cycles = max(1, math.ceil(longest_window_s / RECONCILE_INTERVAL_S) + 1)
        # A short synthetic day is enough: the review observes the fleet once, after
        # the warm-up, and generating a 24-hour load for every service costs seconds.
        # Per-request outcomes are drawn only as far as the warm-up reads (one more
        # cycle of margin): the whole day's sample was half of the review's time.
        warm_until_s = WARMUP_S + (cycles + 1) * RECONCILE_INTERVAL_S
        fleet = default_simulated_fleet(
            base, seed, time_origin_s=0.0, hours=WARM_DAY_HOURS, sample_until_s=warm_until_s
        )
        autoscaler = autoscaler_factory()
        t = WARMUP_S
        for _ in range(cycles):
            _check_deadline(deadline)
            fleet.advance_to(t)
            for name in sorted(base.clusters):
                policies = base.policies_for(name)
                observation = fleet.observe(base.clusters[name], policies)
                plan, new = plan_cluster(
                    base,
                    name,
                    observation,
                    fleet.fetch(policies, t),
                    histories,
                    t,
                    autoscaler,
                    placer,
                    placement_options=placement_options,
                )
                histories.update(new)
                fleet.apply(plan)
            t += RECONCILE_INTERVAL_S
        fleet.advance_to(t)
        now = t
        all_policies = {**base.policies, **head.policies}
        for name in clusters:
            spec = head.clusters.get(name) or base.clusters[name]
            policies = [p for p in all_policies.values() if p.cluster == name]
            observations[name] = fleet.observe(spec, policies)
            metrics[name] = fleet.fetch(policies, now)
        source = (
            f"simulated fleet warmed up under base for {cycles} cycles "
            f"({cycles * RECONCILE_INTERVAL_S:.0f} s of synthetic load, seed {seed})"
        )
    else:
        import time

        now = time.time() if now_s is None else now_s
        all_policies = {**base.policies, **head.policies}
        for name in clusters:
            spec = head.clusters.get(name) or base.clusters[name]
            policies = [p for p in all_policies.values() if p.cluster == name]
            backend, source_of_metrics = edges(name)
            observations[name] = backend.observe(spec, policies)
            try:
                metrics[name] = source_of_metrics.fetch(policies, now)
            except MetricsUnavailable as exc:
                metrics[name] = {}
                notes.append(
                    f"cluster {name}: metrics unavailable ({exc}); services hold their size"
                )
        source = "live clusters and metrics"
        notes.append(
            "live review: the reconciler's stabilisation histories are not read, so scale-in is held"
        )

    base_plans: dict[str, Plan] = {}
    head_plans: dict[str, Plan] = {}
    for name in clusters:
        for state, plans in ((base, base_plans), (head, head_plans)):
            if name not in state.clusters:
                continue
            _check_deadline(deadline)
            plan, _ = plan_cluster(
                state,
                name,
                observations[name],
                metrics[name],
                histories,
                now,
                autoscaler_factory(),
                placer,
                placement_options=placement_options,
            )
            plans[name] = plan

    services: list[ServiceFleetDiff] = []
    for service in sorted(set(base.policies) | set(head.policies)):
        policy = head.policies.get(service) or base.policies[service]
        base_plan = (
            base_plans.get(base.policies[service].cluster) if service in base.policies else None
        )
        head_plan = (
            head_plans.get(head.policies[service].cluster) if service in head.policies else None
        )
        base_decision = base_plan.decisions.get(service) if base_plan else None
        head_decision = head_plan.decisions.get(service) if head_plan else None
        base_gpus, base_domains = _gpus_by(base_plan, base, service)
        head_gpus, head_domains = _gpus_by(head_plan, head, service)
        services.append(
            ServiceFleetDiff(
                service=service,
                cluster=policy.cluster,
                base_targets=(base_decision.prefill, base_decision.decode)
                if base_decision
                else None,
                head_targets=(head_decision.prefill, head_decision.decode)
                if head_decision
                else None,
                base_gpus=base_gpus,
                head_gpus=head_gpus,
                base_domains=base_domains,
                head_domains=head_domains,
                head_reason=head_decision.reason if head_decision else "",
                head_message=head_decision.message if head_decision else "",
                base_reason=base_decision.reason if base_decision else "",
            )
        )
    for plan in head_plans.values():
        notes.extend(f"head, cluster {plan.cluster}: {note}" for note in plan.notes)
    return FleetReview(source, base_plans, head_plans, tuple(services), tuple(notes))

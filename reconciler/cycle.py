"""One reconcile cycle for one cluster, as a pure function: decide -> place -> diff.

This is the glue the loop, ``plan``, the simulator and the pull-request what-if all
share, so a dry-run report, an applied cycle and a simulated one come from the same
code. It does no I/O: the observation and metrics are read by the caller (through a
``ClusterBackend`` and a ``MetricsSource``), the plan is applied by the caller.

Held services (``held``, service -> why): the caller found that a scale change of
the service would be refused (drift: someone else owns a field heteroscale would
write, see ``reconciler.observe.kubernetes``). A held service is still decided (the
decision is reported and its windows advance), but every one of its groups keeps the
size it has in the observation, so no scale change is spread over its other groups
in a way that breaks the deployment-group shape, and the cooldown is not re-armed by
a change that does not happen (``last_change_at_s`` stays what it was).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from reconciler.cost import GpuPrices
from reconciler.desired.loader import DesiredState
from reconciler.observe.base import Observation
from reconciler.placement.base import PlacementOptions, PlacementRequest, Placer
from reconciler.plan import Plan, diff_groups
from reconciler.policy.base import Autoscaler, DecisionInput, PolicyHistory
from reconciler.state import ROLES, Role, ServiceMetrics, Targets


def plan_cluster(
    state: DesiredState,
    cluster: str,
    observation: Observation,
    metrics: Mapping[str, ServiceMetrics],
    histories: Mapping[str, PolicyHistory],
    now_s: float,
    autoscaler: Autoscaler,
    placer: Placer,
    *,
    placement_options: PlacementOptions | None = None,
    prune_removed_services: bool = False,
    held: Mapping[str, str] | None = None,
) -> tuple[Plan, dict[str, PolicyHistory]]:
    """Decide targets for every service of ``cluster``, place them, and diff the
    placement against what runs now.

    Groups of services that are no longer in the desired state are kept (and noted)
    unless ``prune_removed_services``: deleting a policy file should not silently tear
    down serving capacity (Argo CD's prune is opt-in for the same reason).
    """
    spec = state.clusters[cluster]
    policies = {p.name: p for p in sorted(state.policies_for(cluster), key=lambda p: p.name)}
    held = {name: why for name, why in (held or {}).items() if name in policies}
    notes: list[str] = []

    decisions = {}
    new_histories: dict[str, PolicyHistory] = {}
    targets: dict[str, Targets] = {}
    for name, policy in policies.items():
        fleet = observation.fleet.service_fleet(name)
        decision = autoscaler.decide(
            DecisionInput(
                policy,
                fleet,
                metrics.get(name, ServiceMetrics(service=name)),
                histories.get(name, PolicyHistory()),
                now_s,
                spec,
            )
        )
        decisions[name] = decision
        if name in held:
            groups = [g for g in observation.fleet.groups if g.service == name]
            running = (
                sum(g.prefill.instances for g in groups),
                sum(g.decode.instances for g in groups),
            )
            previous = histories.get(name, PolicyHistory())
            new_histories[name] = replace(
                decision.history, last_change_at_s=previous.last_change_at_s
            )
            targets[name] = Targets(name, *running)
            notes.append(
                f"service {name} held at {running[0]} prefill, {running[1]} decode "
                f"(the decision asks {decision.prefill}, {decision.decode}): {held[name]}"
            )
            continue
        new_histories[name] = decision.history
        targets[name] = Targets(name, decision.prefill, decision.decode)

    orphans = tuple(g for g in observation.fleet.groups if g.service not in policies)
    for service in sorted({g.service for g in orphans}):
        action = "pruned" if prune_removed_services else "kept (prune is off)"
        notes.append(
            f"service {service} is running but has no policy in {state.source_label}: {action}"
        )

    request = PlacementRequest(
        cluster=spec,
        policies=policies,
        current=observation.fleet,
        targets=targets,
        options=placement_options or PlacementOptions(),
    )
    result = placer.place(request)
    # A held service keeps exactly the groups it runs, whatever the placer did.
    placed = tuple(
        g for g in result.groups if g.service in policies and g.service not in held
    ) + tuple(g for g in observation.fleet.groups if g.service in held)
    if not prune_removed_services:
        placed += orphans
    result = replace(result, groups=placed)

    for shortfall in result.shortfalls:
        if shortfall.service in held:
            continue
        notes.append(
            f"{shortfall.service}/{shortfall.role}: {shortfall.instances} instances not placed "
            f"({shortfall.constraint}: {shortfall.detail})"
        )
    for drift in observation.drift:
        notes.append(f"drift {drift.kind} {drift.name}: {drift.detail}")

    gpus_per_instance: dict[tuple[str, Role], int] = {
        (name, role): policy.role(role).gpus_per_instance
        for name, policy in policies.items()
        for role in ROLES
    }
    changes = diff_groups(observation.fleet, result.groups, gpus_per_instance)
    plan = Plan(
        cluster=cluster,
        decisions=decisions,
        placement=result,
        changes=changes,
        current=observation.fleet,
        notes=tuple(notes),
        held=held,
        prices=GpuPrices.of_cluster(spec),
        gpus_per_instance=gpus_per_instance,
    )
    return plan, new_histories

"""One reconcile cycle for one cluster, as a pure function: decide -> place -> diff.

This is the glue the loop, ``plan`` and the pull-request what-if share, so a dry-run
report and an applied cycle come from the same code (the simulator chains the same
decide, placer and diff for its one service in ``reconciler.sim.evaluate``). It does no
I/O: the observation and metrics are read by the caller (through a ``ClusterBackend``
and a ``MetricsSource``), the plan is applied by the caller.

Held services (``held``, service -> why): the caller found that a scale change of
the service would be refused (drift: someone else owns a field heteroscale would
write, see ``reconciler.observe.kubernetes``). A held service is still decided (the
decision is reported and its windows advance), but every one of its groups keeps the
size it has in the observation, so no scale change is spread over its other groups
in a way that breaks the deployment-group shape, and the cooldown is not re-armed by
a change that does not happen (``last_change_at_s`` stays what it was).

A service whose autoscaler raises (a bug, for one service's inputs) is held the same
way, its history kept as it was, with a ``decision_failed`` decision naming the error
and where it was raised: one service's failure never stops its cluster's cycle.

A held size counts the groups being deleted that nothing replaces yet
(``RoleCount.hold_size``): they go whatever the plan says, so a hold of what the
groups run alone lost them once their finalizer went. A policy's own hold (metrics
missing) asks for them in its decision; a service the cycle holds keeps its groups
exactly and gets new groups for them (``_replacing_held``).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from reconciler.cost import GpuPrices
from reconciler.desired.loader import DesiredState
from reconciler.observe.base import Observation
from reconciler.placement.base import (
    PlacementOptions,
    PlacementRequest,
    Placer,
    UngroupedInstances,
    placement_options_for,
)
from reconciler.plan import Plan, diff_groups
from reconciler.policy.base import Autoscaler, Decision, DecisionInput, PolicyHistory
from reconciler.state import ROLES, Role, ServiceFleet, ServiceMetrics, Targets

# How much of a failed decision's error message a note carries.
_ERROR_CHARS = 300


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
    held = {
        name: why for name, why in {**observation.held, **(held or {})}.items() if name in policies
    }
    notes: list[str] = []

    decisions = {}
    new_histories: dict[str, PolicyHistory] = {}
    targets: dict[str, Targets] = {}
    # Held services with groups being deleted that nothing replaces yet: the instances
    # new groups of theirs replace (``_replacing_held``).
    replacing: dict[str, Targets] = {}
    inputs = [
        DecisionInput(
            policy,
            observation.fleet.service_fleet(name),
            metrics.get(name, ServiceMetrics(service=name)),
            histories.get(name, PolicyHistory()),
            now_s,
            spec,
        )
        for name, policy in policies.items()
    ]
    for name, one, decision in zip(
        policies, inputs, decide_services(autoscaler, inputs), strict=True
    ):
        previous = one.history
        if decision.reason == "decision_failed":
            held[name] = decision.message
        decision = with_missing_reasons(decision, one.metrics)
        decisions[name] = decision
        if name in held:
            groups = [g for g in observation.fleet.groups if g.service == name]
            running = (
                sum(g.prefill.instances for g in groups),
                sum(g.decode.instances for g in groups),
            )
            new_histories[name] = replace(
                decision.history, last_change_at_s=previous.last_change_at_s
            )
            targets[name] = Targets(name, *running)
            unreplaced = (
                one.fleet.prefill.deleting_unreplaced,
                one.fleet.decode.deleting_unreplaced,
            )
            if any(unreplaced):
                replacing[name] = Targets(name, *unreplaced)
            asks = (
                ""
                if decision.reason == "decision_failed"
                else f" (the decision asks {decision.prefill}, {decision.decode})"
            )
            notes.append(
                f"service {name} held at {running[0]} prefill, {running[1]} decode"
                f"{_replacing_note(unreplaced)}{asks}: {held[name]}"
            )
            continue
        new_histories[name] = decision.history
        targets[name] = Targets(name, decision.prefill, decision.decode)

    orphans = tuple(g for g in observation.fleet.groups if g.service not in policies)
    # A service whose policy now names another cluster moved there; it was not removed.
    # This cluster's cycle cannot see the new copy serve, so it never prunes the old one:
    # pruned at once, every ready instance was drained and deleted while the other
    # cluster's copy had none ready yet (a prober's move between clusters).
    moved_to = {p.name: p.cluster for p in state.policies.values() if p.cluster != cluster}
    for service in sorted({g.service for g in orphans}):
        if service in moved_to:
            notes.append(
                f"service {service} is running but its policy now deploys it to cluster "
                f"{moved_to[service]}: kept here (never pruned, whatever the prune setting: "
                "delete it once the new copy serves)"
            )
            continue
        action = "pruned" if prune_removed_services else "kept (prune is off)"
        notes.append(
            f"service {service} is running but has no policy in {state.source_label}: {action}"
        )
    kept_orphans = tuple(g for g in orphans if not prune_removed_services or g.service in moved_to)

    request = PlacementRequest(
        cluster=spec,
        policies=policies,
        current=observation.fleet,
        targets=targets,
        options=placement_options_for(spec, placement_options),
        left_behind=observation.left_behind,
        draining=observation.draining,
    )
    if replacing:
        request = _replacing_held(request, replacing)
    result = placer.place(request)
    # A held service keeps exactly the groups it runs, whatever the placer did, and
    # the new groups replacing those of it being deleted (all of its placed groups
    # there: its running ones were hidden from the placer).
    placed = (
        tuple(
            g
            for g in result.groups
            if g.service in policies and (g.service not in held or g.service in replacing)
        )
        + tuple(g for g in observation.fleet.groups if g.service in held)
        + kept_orphans
    )
    result = replace(result, groups=placed)

    for shortfall in result.shortfalls:
        if shortfall.service in held and shortfall.service not in replacing:
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


def _replacing_note(unreplaced: tuple[int, int]) -> str:
    """What a held service's note adds for the instances of its groups being deleted
    that new groups replace (``RoleCount.deleting_unreplaced``); "" for none."""
    if not any(unreplaced):
        return ""
    return (
        f", plus {unreplaced[0]} prefill, {unreplaced[1]} decode in new groups replacing its "
        "groups being deleted (the hold counts them: those go whatever the plan says)"
    )


def _replacing_held(
    request: PlacementRequest, replacing: Mapping[str, Targets]
) -> PlacementRequest:
    """``request`` with the held services of ``replacing`` asking only for the new
    groups that replace the instances of their groups being deleted: their running
    groups are hidden from the placer, which would otherwise grow them (a scale change
    of a held group, the very write the hold refuses) rather than open new ones. Hidden,
    their instances hold their GPUs as ``left_behind`` (those not yet on a node hold
    none, as a leftover's do), and their ids stay taken (``reserved_group_ids``)."""
    current = request.current
    hidden = [g for g in current.groups if g.service in replacing]
    reserved = {service: set(ids) for service, ids in current.reserved_group_ids.items()}
    for group in hidden:
        reserved.setdefault(group.service, set()).add(group.group_id)
    held_instances = tuple(
        UngroupedInstances(
            group.service, role, on.node, on.instances, group.role(role).gpus_per_instance
        )
        for group in hidden
        for role in ROLES
        for on in group.role(role).nodes
    )
    fleet = replace(
        current,
        groups=tuple(g for g in current.groups if g.service not in replacing),
        starting={k: v for k, v in current.starting.items() if k[0] not in replacing},
        stuck={k: v for k, v in current.stuck.items() if k[0] not in replacing},
        reserved_group_ids={service: frozenset(ids) for service, ids in reserved.items()},
    )
    return replace(
        request,
        current=fleet,
        targets={**request.targets, **replacing},
        left_behind=request.left_behind + held_instances,
    )


# How many missing signals a held decision names the reasons of.
MAX_MISSING_REASONS = 4


def with_missing_reasons(decision: Decision, metrics: ServiceMetrics) -> Decision:
    """``decision``, where it holds on a missing signal, with why the metrics source
    read each of the service's missing signals as missing (``ServiceMetrics.gaps``,
    the first ``MAX_MISSING_REASONS``): a policy sees only that a signal is missing,
    and "decode_tps missing" alone left the operator to guess whether its value was
    NaN, stale or never exported (a hostile prober)."""
    if decision.reason != "metrics_missing" or not metrics.gaps:
        return decision
    # The signals the decision names first: optional ones (SM activity) are often
    # missing for good and say nothing about this hold.
    gaps = sorted(metrics.gaps, key=lambda gap: gap[0] not in decision.message)
    shown = [f"{signal}: {why}" for signal, why in gaps[:MAX_MISSING_REASONS]]
    more = len(metrics.gaps) - len(shown)
    why = "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
    return replace(decision, message=f"{decision.message} (read as missing: {why})")


def decide_services(autoscaler: Autoscaler, inputs: Sequence[DecisionInput]) -> list[Decision]:
    """Each service's decision, in order, a failure held to its service
    (``failed_decision``). An autoscaler with a ``decide_many`` (the planner) decides
    them as one batch; should the batch raise, each is decided again on its own, so
    that only the service that raised is held (autoscalers are pure: the others decide
    as they did in the batch)."""
    many: Callable[[Sequence[DecisionInput]], list[Decision]] | None = getattr(
        autoscaler, "decide_many", None
    )
    if many is not None:
        try:
            return many(inputs)
        except Exception:  # decided one by one below, which names the service
            pass
    decisions = []
    for one in inputs:
        try:
            decisions.append(autoscaler.decide(one))
        except Exception as exc:  # one service's failure must not stop the cluster's cycle
            decisions.append(failed_decision(one.policy.name, one.fleet, one.history, exc))
    return decisions


def failed_decision(
    service: str, fleet: ServiceFleet, history: PolicyHistory, error: Exception
) -> Decision:
    """The decision standing in for one that raised ``error``: the service's active
    counts, its history as it was, and a message naming the error and the line of code
    that raised it (the traceback itself goes to no log from here: this module does no
    I/O)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    text = str(error)
    if len(text) > _ERROR_CHARS:
        text = text[:_ERROR_CHARS] + "..."
    # The held size counts the groups being deleted (``RoleCount.hold_size``): the
    # cycle holds this service, and makes their replacement (``_replacing_held``).
    return Decision(
        service,
        fleet.prefill.hold_size,
        fleet.decode.hold_size,
        "decision_failed",
        f"the autoscaler failed ({type(error).__name__}: {text}{where}): "
        f"hold {fleet.prefill.hold_size} prefill, {fleet.decode.hold_size} decode",
        history=history,
    )

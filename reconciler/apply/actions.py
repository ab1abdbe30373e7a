"""What to do with every workload of one cluster this cycle (pure).

Pairs desired and live objects by key (namespace/name), as gitops-engine does:
desired only = create; both = update (replicas and/or template); live only = prune,
but only objects carrying our ownership label ever reach this function (the observer
lists by that label), and groups the plan keeps on purpose (a service whose policy
file was removed while prune is off) are left alone. Each workload's scale change
goes through soft scale-in (``softscale.plan_scale``).

The result is ordered so capacity is never dropped: everything that adds capacity
(creates, scale-ups, put-backs, template changes at the same size) comes before
anything that removes it (drains, scale-downs, deletes).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from reconciler.apply import names
from reconciler.apply.fields import comparable, contains
from reconciler.apply.lease import parse_micro_time
from reconciler.apply.nodeaffinity import unschedulable_problem
from reconciler.apply.render import Manifest, ObjectKey, RenderedWorkload
from reconciler.apply.softscale import PodView, ScalePlan, SloStatus, plan_scale
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.observe.kubernetes import (
    ClusterSnapshot,
    GroupKey,
    LiveDeployment,
    LivePod,
    leftover_reason,
    moved_away,
)
from reconciler.policy.base import UNSIZED_REASONS, Decision
from reconciler.policy.coordinated import scale_in_floor
from reconciler.state import ROLES, DeploymentGroup

Action = Literal["create", "update", "delete", "keep", "unchanged"]


@dataclass(frozen=True)
class WorkloadWork:
    """One workload's part of the cycle."""

    key: ObjectKey
    service: str
    group_id: str
    role: str
    action: Action
    desired: RenderedWorkload | None
    live: LiveDeployment | None
    scale: ScalePlan
    manifest: Manifest | None  # what server-side apply sends (None: nothing to apply)
    reason: str = ""
    # Why the manifest must not be written (no live Node could run its Pods): reported
    # as an error, nothing written (``nodeaffinity``).
    refusal: str = ""

    @property
    def replicas_before(self) -> int:
        return self.live.replicas if self.live else 0

    @property
    def replicas_after(self) -> int:
        if self.action == "delete":
            return 0
        if self.action == "keep":
            return self.replicas_before
        return self.scale.replicas

    @property
    def removes_capacity(self) -> bool:
        return (
            self.action == "delete"
            or self.replicas_after < self.replicas_before
            or bool(self.scale.drain)
        )

    @property
    def rolls_out(self) -> bool:
        """This cycle writes Pods of a new template: a create, or a template change
        whose rollout replaces the running Pods."""
        return self.desired is not None and (
            self.live is None or self.live.template_hash != self.desired.template_hash
        )

    @property
    def pod_namespace(self) -> str:
        return self.key.namespace


def _view(pod: LivePod) -> PodView:
    return PodView(
        name=pod.key.name,
        ready=pod.ready and pod.scheduled,
        created=pod.created,
        template_hash=pod.template_hash,
        drained_at_s=pod.drained_at_s,
    )


def manifest_hash(manifest: Manifest) -> str:
    """Hash of what we apply, without the precondition and the hash itself."""
    metadata = {k: v for k, v in manifest["metadata"].items() if k != "resourceVersion"}
    annotations = {
        k: v
        for k, v in metadata.get("annotations", {}).items()
        if k != names.APPLIED_HASH_ANNOTATION
    }
    text = json.dumps(
        {**manifest, "metadata": {**metadata, "annotations": annotations}}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def effective_manifest(
    desired: RenderedWorkload, replicas: int, live: LiveDeployment | None
) -> Manifest:
    """The rendered manifest with this cycle's replicas and its hash, and the live
    object's resourceVersion as a precondition (a concurrent change answers 409)."""
    # Copy only what changes here (the pod template is shared, never mutated): a deep
    # copy of thousands of manifests per cycle costs seconds.
    source = desired.manifest
    manifest = {
        **source,
        "metadata": {
            **source["metadata"],
            "annotations": {
                **source["metadata"]["annotations"],
                # What we set, so a change by anyone else shows (replica drift).
                names.APPLIED_REPLICAS_ANNOTATION: str(replicas),
            },
        },
        "spec": {**source["spec"], "replicas": replicas},
    }
    manifest["metadata"]["annotations"][names.APPLIED_HASH_ANNOTATION] = manifest_hash(manifest)
    if live is not None and live.resource_version:
        manifest["metadata"]["resourceVersion"] = live.resource_version
    return manifest


def provably_unchanged(work: WorkloadWork) -> bool:
    """Applying ``work.manifest`` would change nothing: the live object carries the
    hash of this very manifest (so we set no other fields last time), still holds
    every value in it, and no one but us and the controllers manages it. Anything
    less goes to the server-side dry run."""
    live, manifest = work.live, work.manifest
    if live is None or manifest is None or live.foreign_managers:
        return False
    if live.applied_hash != manifest["metadata"]["annotations"].get(names.APPLIED_HASH_ANNOTATION):
        return False
    # Objects in a list response carry no apiVersion/kind: compare metadata and spec.
    return contains(comparable(live.raw), comparable(manifest))


def plan_workloads(
    *,
    groups: Iterable[DeploymentGroup],
    rendered: Mapping[ObjectKey, RenderedWorkload],
    snapshot: ClusterSnapshot,
    policies: Mapping[str, ServicePolicy],
    slo: Mapping[str, SloStatus],
    now_s: float,
    window_s: float,
    unplaced: Mapping[str, str] | None = None,
    cluster: ClusterSpec | None = None,
    unsized: Mapping[str, str] | None = None,
    scale_in: Mapping[str, ScaleInWindow] | None = None,
    may_move: bool = False,
) -> tuple[WorkloadWork, ...]:
    """Every workload's action this cycle, capacity-adding ones first. ``unplaced``:
    the services placement could not give all they asked for, and what is missing;
    ``cluster``: the cluster file, whose switches tell what a move left behind;
    ``unsized``: the services whose size this cycle was held, not sized, and why
    (``unsized_services``); ``scale_in``: what each sized service's scale-in window
    allows this cycle (``scale_in_windows``); ``may_move``: the placement may have
    moved running instances (``PlacementResult.may_move``: ``_hold_moved``)."""
    kept_groups = {(g.service, g.group_id) for g in groups if g.service not in policies}
    drained: dict[ObjectKey, list[LivePod]] = defaultdict(list)
    for pod in snapshot.drained_pods():
        if pod.drained_from and pod.drained_at_s is not None:
            drained[ObjectKey(pod.key.namespace, pod.drained_from)].append(pod)

    work: list[WorkloadWork] = []
    for key in sorted(rendered.keys() | snapshot.deployments.keys() | drained.keys(), key=str):
        desired = rendered.get(key)
        live = snapshot.deployments.get(key)
        serving = [_view(p) for p in snapshot.pods_of(live)] if live else []
        drained_views = [_view(p) for p in drained.get(key, [])]
        role: str
        if desired is not None:
            service, group_id, role = desired.service, desired.group_id, desired.role
        elif live is not None:
            service, group_id, role = live.service, live.group_id, live.role
        else:
            pods = drained[key]
            service, group_id, role = pods[0].service, pods[0].group_label, pods[0].role
        status = slo.get(service, "unknown")

        if desired is None and live is not None and (service, group_id) in kept_groups:
            work.append(
                WorkloadWork(
                    key,
                    service,
                    group_id,
                    role,
                    "keep",
                    None,
                    live,
                    ScalePlan(replicas=live.replicas),
                    None,
                    reason=(
                        f"service {service} has no policy for this cluster; kept (prune is "
                        "off, or its policy moved it to another cluster)"
                    ),
                )
            )
            continue

        scale = plan_scale(
            desired=desired.replicas if desired else 0,
            live_replicas=live.replicas if live else None,
            serving=serving,
            drained=drained_views,
            template_hash=desired.template_hash if desired else None,
            slo=status,
            now_s=now_s,
            window_s=window_s,
        )
        if desired is not None:
            action: Action = "update" if live is not None else "create"
            manifest = effective_manifest(desired, scale.replicas, live)
            reason = ""
        elif live is not None:
            if status == "broken":
                # Never tear a group down while its service misses its SLOs.
                action, manifest, reason = "keep", None, "prune held: SLO not met"
                scale = ScalePlan(replicas=live.replicas, notes=(reason,))
            else:
                action, manifest, reason = "delete", None, "not in the desired placement"
        else:
            action, manifest, reason = "unchanged", None, "only drained instances left"
        work.append(
            WorkloadWork(
                key, service, group_id, role, action, desired, live, scale, manifest, reason
            )
        )

    work = _leave_being_deleted(work)
    work = _hold_unschedulable(work, snapshot)
    work = _hold_moves(
        work,
        policies,
        cluster,
        snapshot.groups_being_deleted,
        unplaced or {},
        unsized or {},
        scale_in or {},
    )
    if may_move:
        work = _hold_moved(work, policies)
    work.sort(key=lambda w: (w.removes_capacity, w.action == "delete", str(w.key)))
    return tuple(work)


def _leave_being_deleted(work: list[WorkloadWork]) -> list[WorkloadWork]:
    """``work`` with nothing written to a Deployment being deleted (``deletionTimestamp``
    set): its removal is under way, whatever the plan says. A delete would only repeat
    it; an update or a server-side apply would write onto the terminating object,
    which goes with what was written. It is a leftover (``leftover_reason``), so no
    plan keeps it or renders its name (its group id is reserved while it exists): new
    groups replace it while it serves, and once it is gone it is simply absent. Pods
    drained from it before are still finished once their window passed (``_kept``)."""
    out: list[WorkloadWork] = []
    for w in work:
        if w.live is not None and w.live.deleting_since and w.action != "keep":
            w = _kept(
                w,
                f"being deleted since {w.live.deleting_since} (a finalizer or the garbage "
                "collector holds it): nothing is written to it, and it serves until it goes",
            )
        out.append(w)
    return out


def _hold_unschedulable(work: list[WorkloadWork], snapshot: ClusterSnapshot) -> list[WorkloadWork]:
    """``work`` with every create or template change whose Pods no live Node could run
    refused (``nodeaffinity``), and, for a service with such a workload, every
    workload that would remove capacity kept as it is: its replacement could not
    run, so nothing of the service is taken away this cycle."""
    refused: dict[str, WorkloadWork] = {}
    out: list[WorkloadWork] = []
    seen: dict[str, str | None] = {}
    for w in work:
        problem = (
            unschedulable_problem(w.manifest, snapshot.nodes, seen)
            if w.rolls_out and w.manifest is not None
            else None
        )
        if problem is not None:
            w = replace(w, refusal=problem)
            refused.setdefault(w.service, w)
        out.append(w)
    if not refused:
        return out
    held: list[WorkloadWork] = []
    for w in out:
        first = refused.get(w.service)
        if first is not None and not w.refusal and w.live is not None and w.removes_capacity:
            w = _kept(w, f"held: {first.key} of service {w.service} cannot be written (no node)")
        held.append(w)
    return held


def _kept(w: WorkloadWork, why: str) -> WorkloadWork:
    """``w``, a removal of live capacity, turned into keeping the Deployment as it runs
    (no write, no drain), with ``why`` as its note. Pods soft scale-in drained from it
    before this cycle are still finished once their window passed (``scale.finish``):
    they serve nothing, and kept they held their GPUs out of service for as long as
    the hold lasts, which may be indefinitely. A Pod this cycle would drain is not
    drained, so not finished either."""
    assert w.live is not None
    drained_before = tuple(p for p in w.scale.finish if p not in w.scale.drain)
    return replace(
        w,
        action="keep",
        manifest=None,
        scale=ScalePlan(replicas=w.live.replicas, finish=drained_before, notes=(why,)),
        reason="",
    )


def not_yet_serving(w: WorkloadWork) -> str | None:
    """How far the Deployment ``w`` writes (a create or an update) is from serving what
    this plan asks of it ("0 of 2 ready"), or None once it serves it all. Asked is the
    plan's replicas: a Deployment grown this cycle is not yet serving its new
    instances. Ready is the live ``readyReplicas``, counted only once the Deployment
    controller has acted on the current spec (``observedGeneration``): before, it is
    the count of the spec before. A create has none ready, and a template change this
    plan writes serves none of its new Pods yet: its rollout takes up to a quarter of
    the running Pods out of service (the Deployment controller's default), so what it
    replaces must still serve."""
    if w.desired is None:
        return None
    asked = w.replicas_after
    if w.live is None:
        return f"0 of {asked} ready"
    ready = w.live.ready_replicas
    if w.rolls_out:
        return f"{ready} of {asked} ready, its Pods about to be replaced by a new template"
    if not w.live.rollout_observed:
        return f"{ready} of {asked} ready, its last change not yet acted on by the controller"
    return f"{ready} of {asked} ready" if ready < asked else None


def _hold_moves(
    work: list[WorkloadWork],
    policies: Mapping[str, ServicePolicy],
    cluster: ClusterSpec | None,
    groups_being_deleted: Collection[GroupKey],
    unplaced: Mapping[str, str],
    unsized: Mapping[str, str],
    scale_in: Mapping[str, ScaleInWindow],
) -> list[WorkloadWork]:
    """Make before break: ``work`` with every removal of a leftover (``leftover_reason``:
    the policy now deploys to another namespace, the group's switch is gone from the
    cluster file, or a Deployment of the group is being deleted, ``groups_being_deleted``;
    "the move" below is any of these) kept while any Deployment of the service that
    this plan writes is not yet serving (``not_yet_serving``); or, while the groups
    hold fewer instances of a role than the service ran before the move
    (``_short_of_left_behind``), placement could not place all the service asks
    for (``unplaced``: the leftovers hold GPUs, so there may be no room for a second
    copy until they go), the service's size was held this cycle, not sized
    (``unsized``: metrics missing, a failed decision, a drift hold: its groups, which
    leave the leftovers out, are then only what the new copy happens to hold), or its
    scale-in window would not yet have allowed it that few (``scale_in``: pruning the
    leftover takes the service from what it ran to its groups, a scale-in of its
    capacity like any other, so it waits for the same window the decision's own
    scale-in waits for); so the service never runs on fewer instances than before the
    move sooner than its policy would have let it. Once all is sized, placed, serving
    and allowed by the window, a later cycle prunes the leftover as before.

    A replacement that never becomes ready (an image that does not pull) or cannot be
    placed (no capacity for it beside the leftover) keeps the leftover indefinitely:
    capacity is never lost, and every cycle's report says what it waits for. The
    whole service waits, not one role: a new group's prefill without its decode
    serves nothing, and the old group's decode without its prefill neither.

    Why a kept leftover cannot flip-flop: whether an object is a leftover depends only
    on it, its group and the desired state (the policy's namespace, the cluster file's
    switches, a deletionTimestamp), not on anything a plan decides; the fleet leaves
    leftovers out (``fleet_from_snapshot``), so the decision never counts them and placement never
    sees them, keeps them or places into them (it only holds their GPUs:
    ``left_behind``). Next cycle the service's capacity is its new Deployments alone,
    exactly as this cycle planned it, and the leftover is again only something to
    prune. The window's hold ends by itself: the recommendations that held it age out
    of the window, and those made since (the decision's, of the groups' size) do not
    hold it.

    A Deployment being deleted is never written (``_leave_being_deleted``): its removal
    is no write of this plan, so holding means keeping the rest of its group.

    Not held: a service removed from the policies (not a move: its groups are kept or
    pruned by the prune setting), and scale-in by placement (a group it empties is
    counted by the fleet, so keeping it would count it twice next cycle), but for a
    placement that may move running instances (``_hold_moved``)."""
    waiting = {
        service: f"kept until {key} is ready ({why})"
        for service, (key, why) in _first_not_serving(work).items()
    }
    # A shortfall, a held size or the window matter only while the groups hold less
    # than the service ran before the move: once the new copy is as large, the
    # leftovers' GPUs are what a shortfall lacks, and keeping them for one unrelated to
    # the move kept them forever.
    short = (
        _short_of_left_behind(work, policies, cluster, groups_being_deleted)
        if unplaced or unsized or scale_in
        else {}
    )
    for service, roles in sorted(short.items()):
        text = _short_text(roles)
        missing = unplaced.get(service)
        if missing is not None:
            waiting.setdefault(
                service, f"kept while its replacement is not all placed ({missing}; {text})"
            )
        why = unsized.get(service)
        if why is not None:
            waiting.setdefault(
                service,
                f"kept while the service's size is held, not sized ({why}), and its groups "
                f"hold fewer than the service ran before the move ({text})",
            )
        window = scale_in.get(service)
        held = window.holds(roles) if window is not None else None
        if held is not None:
            waiting.setdefault(service, held)
    if not waiting:
        return work
    out: list[WorkloadWork] = []
    for w in work:
        until = waiting.get(w.service)
        move = (
            leftover_reason(w.live, policies, cluster, groups_being_deleted)
            if until is not None and w.live is not None and w.removes_capacity
            else None
        )
        if until is not None and move is not None:
            w = _kept(w, f"{until}: {move}, and this Deployment serves until those replacing it do")
        out.append(w)
    return out


def _hold_moved(
    work: list[WorkloadWork], policies: Mapping[str, ServicePolicy]
) -> list[WorkloadWork]:
    """Make before break for the moves of a placement that may move running instances
    (CP-SAT under ``allow_rebalance``): ``work`` with every removal of a Deployment
    that serves (ready replicas) kept as it runs while a Deployment of its service
    that this plan creates, grows or keeps is not yet serving (``not_yet_serving``).

    A move is a removal here and an addition there, the same cycle or, once the
    removal was held, the next (the placement then only drops the old half): told
    apart from a scale-in only by what still starts, so any removal of the service
    waits, as the whole service does for a leftover (a moved prefill without
    its decode serves nothing). The placement never puts what it moves on the GPUs
    of what it moves away from (``reconciler.placement.cpsat``), so the replacement
    can start while the old instances run; one that never serves keeps them
    indefinitely, said every cycle, with no capacity lost.

    Why it cannot flip-flop: the kept Deployment is a group like any other, counted
    by the fleet next cycle (the service then runs both copies, more than its target),
    and placement drops the old copy again, the cheaper one to lose; it goes once the
    new one serves. Only what adds or keeps capacity is waited for: a Deployment
    whose own removal is held never holds another (two rolling out a new template
    while they shrink held each other forever)."""
    waiting = _first_not_serving(
        w for w in work if w.service in policies and not w.removes_capacity
    )
    if not waiting:
        return work
    out: list[WorkloadWork] = []
    for w in work:
        until = waiting.get(w.service)
        if (
            until is not None
            and w.live is not None
            and w.removes_capacity
            and w.live.ready_replicas > 0
            and not w.refusal
        ):
            key, why = until
            w = _kept(
                w,
                f"kept until {key} is ready ({why}): placement may have moved this "
                "Deployment's instances (allow_rebalance), and it serves until those "
                "replacing them do",
            )
        out.append(w)
    return out


def _first_not_serving(work: Iterable[WorkloadWork]) -> dict[str, tuple[ObjectKey, str]]:
    """Per service, its first Deployment in ``work`` that this plan writes and that is
    not yet serving, and why (``not_yet_serving``): what a make-before-break hold
    waits for."""
    waiting: dict[str, tuple[ObjectKey, str]] = {}
    for w in work:
        why = not_yet_serving(w)
        if why is not None:
            waiting.setdefault(w.service, (w.key, why))
    return waiting


# Per role: (what the groups hold after this plan, what the service ran before the move).
RoleShort = dict[str, tuple[int, int]]


def _short_text(roles: RoleShort) -> str:
    """Per role, the groups' instances of what the service ran before the move:
    "decode 1 of 12, prefill 1 of 6"."""
    return ", ".join(f"{role} {groups} of {ran}" for role, (groups, ran) in sorted(roles.items()))


@dataclass(frozen=True)
class ScaleInWindow:
    """What one service's scale-in window allows this cycle: ``floor``, the fewest
    instances per role (prefill, decode) it may run (``coordinated.scale_in_floor``),
    or None while its history does not cover the window (no scale-in at all)."""

    window_s: float
    floor: tuple[int, int] | None

    def holds(self, roles: RoleShort) -> str | None:
        """Why the leftovers of a service whose groups are ``roles`` short of what it
        ran before the move must stay (the window allows it no fewer than its groups
        would leave), or None once the window allows the groups' size."""
        if self.floor is None:
            return (
                f"kept while its history does not cover the {self.window_s:g} s scale-in "
                f"window, and its groups hold fewer than the service ran before the move "
                f"({_short_text(roles)})"
            )
        above: list[str] = []
        for role, (groups, ran) in sorted(roles.items()):
            allowed = min(ran, self.floor[ROLES.index(role)])
            if groups < allowed:
                above.append(f"{role} {groups} of {ran}, the window allows no fewer than {allowed}")
        if not above:
            return None
        return (
            f"kept while its {self.window_s:g} s scale-in window allows the service no fewer "
            f"instances than its groups would leave it ({'; '.join(above)})"
        )


def scale_in_windows(
    decisions: Mapping[str, Decision], policies: Mapping[str, ServicePolicy]
) -> dict[str, ScaleInWindow]:
    """Per sized service, what its policy's scale-in window allows this cycle, read
    from its decision's history of recommendations (the window is the policy's
    ``scaling.scale_in_window_s``, the one the planner and the paper's policy obey).
    A baseline's history is its own window's and never reaches back past it: it is
    taken as it is, as the HPA itself takes it. Services held rather than sized
    (``UNSIZED_REASONS``) are left out (``unsized_services`` holds theirs), and so are
    decisions that remember no recommendation (nothing says what the window held)."""
    out: dict[str, ScaleInWindow] = {}
    for service, decision in decisions.items():
        policy = policies.get(service)
        history = decision.history.recommendations
        if policy is None or decision.reason in UNSIZED_REASONS or not history:
            continue
        window_s = policy.scaling.scale_in_window_s
        floor = scale_in_floor(history, window_s, needs_cover=decision.reason != "baseline")
        out[service] = ScaleInWindow(window_s, floor)
    return out


def _short_of_left_behind(
    work: Sequence[WorkloadWork],
    policies: Mapping[str, ServicePolicy],
    cluster: ClusterSpec | None,
    groups_being_deleted: Collection[GroupKey],
) -> dict[str, RoleShort]:
    """Per service with leftovers (``leftover_reason``), the roles whose groups this
    plan sizes below what the service ran before the move, as (groups, ran) replicas,
    ready or still starting ("prefill 1 of 6"): a size held rather than sized is the
    groups' own, which may be the minimum a new copy started at.

    Before a namespace move the service ran what the move left behind: the groups
    are a second copy of it. A group whose switch is gone from the cluster file is
    only part of the service, whose other groups stay where they are: it ran those as
    well, so the groups must replace the leftover besides them (compared with the
    leftover alone, a service held at its staying half, or placed no more than that,
    lost the other half at once). A Deployment that stays is one created no later
    than ``SAME_APPLY_S`` after the newest of the service's leftovers: those created to
    replace them came in a later cycle, once the switch was gone (counted, a leftover
    whose replacement serves was kept for as long as the size stayed held or a
    shortfall lasted, maybe forever). A group created later for a reason of its own is
    taken for a replacement too: not counted, the leftover is compared with less, never
    kept for more than the service ran. A group being deleted is such a part too: a
    Deployment stays when created no later than the deletion (``_stays_until_s``),
    as what replaces the group is created once a cycle saw the deletion. A time that
    does not read counts as staying (the leftover kept: the side that loses no
    capacity). A Deployment heteroscale deleted itself (``LiveDeployment.deleted_by_plan``)
    is no part of what the service ran: a plan removed it, nothing is to replace it."""
    # Per (service, role): what each namespace the service moved away from holds (each
    # a copy of it: after two moves in a row, the older copy and the one that was
    # replacing it; their sum was more than the service ever ran), and what it runs in
    # its own namespace on gone switches and in the groups that stay.
    copies: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    before: dict[tuple[str, str], int] = defaultdict(int)
    groups: dict[tuple[str, str], int] = defaultdict(int)
    # Per service with a leftover in its own namespace (on a gone switch, or being
    # deleted; not a namespace move's copy): until when a Deployment created counts as
    # staying, the latest of its leftovers' (``_stays_until_s``).
    stays_until: dict[str, float] = {}
    for w in work:
        if w.live is not None and w.live.deleted_by_plan:
            continue
        if (
            w.live is not None
            and leftover_reason(w.live, policies, cluster, groups_being_deleted) is not None
        ):
            if moved_away(w.service, w.key.namespace, policies):
                copies[(w.service, w.role)][w.key.namespace] += w.live.replicas
            else:
                before[(w.service, w.role)] += w.live.replicas
                # A group being deleted counts from its deletion, which the Deployment
                # being deleted gives (its sibling's creation may be later than that).
                group = (w.key.namespace, w.live.service, w.live.group_id)
                if w.live.deleting_since or group not in groups_being_deleted:
                    stays_until[w.service] = max(
                        stays_until.get(w.service, -math.inf), _stays_until_s(w.live)
                    )
        elif w.desired is not None:
            groups[(w.service, w.role)] += w.replicas_after
    for w in work:
        until_s = stays_until.get(w.service)
        if (
            until_s is not None
            and w.live is not None
            and _created_by(w.live.created, until_s)
            and leftover_reason(w.live, policies, cluster, groups_being_deleted) is None
        ):
            before[(w.service, w.role)] += w.live.replicas
    for key, by_namespace in copies.items():
        before[key] += max(by_namespace.values())
    out: dict[str, RoleShort] = defaultdict(dict)
    for (service, role), ran in sorted(before.items()):
        if ran and groups[(service, role)] < ran:
            out[service][role] = (groups[(service, role)], ran)
    return dict(out)


# A cycle's creates are stamped within a few seconds of each other (whole seconds, and
# tens of Deployments take seconds to write); what replaces a leftover is created a
# cycle later at least, once the switch is gone from Git. Compared to the second, a
# group created in the same apply as the leftover but stamped a second later was taken
# for a replacement, and the leftover pruned (the side that loses capacity).
SAME_APPLY_S = 5.0


def _stays_until_s(leftover: LiveDeployment) -> float:
    """Until when a Deployment of the leftover's service created counts as one that
    stays beside it, not as what replaces it: the end of the apply that created it
    (``SAME_APPLY_S`` after; what replaces a group on a gone switch comes a cycle
    later at least, once the switch is gone from Git); being deleted, the deletion
    (a cycle creates the replacement after it read it; whole seconds, so a group
    created in the very second of the deletion counts as staying). -inf when the time
    does not read (every Deployment then counts as staying)."""
    if leftover.deleting_since:
        deleted_s = parse_micro_time(leftover.deleting_since)
        return -math.inf if deleted_s is None else deleted_s
    created_s = parse_micro_time(leftover.created)
    return -math.inf if created_s is None else created_s + SAME_APPLY_S


def _created_by(created: str, until_s: float) -> bool:
    """Whether a Deployment created at ``created`` (RFC 3339) came no later than
    ``until_s`` (``_stays_until_s``); one whose time does not read counts as such, and
    so does every one when ``until_s`` does not."""
    created_s = parse_micro_time(created)
    if created_s is None or not math.isfinite(until_s):
        return True
    return created_s <= until_s


def unsized_services(held: Mapping[str, str], decisions: Mapping[str, Decision]) -> dict[str, str]:
    """The services whose size a cycle held rather than sized, and why: held by the
    cycle (``held``: drift, unreadable objects), or decided for a reason that could not
    size them (``UNSIZED_REASONS``: metrics missing, a failed decision)."""
    out: dict[str, str] = {
        service: decision.reason
        for service, decision in decisions.items()
        if decision.reason in UNSIZED_REASONS
    }
    out.update(held)
    return out


def manually_drained(snapshot: ClusterSnapshot) -> tuple[LivePod, ...]:
    """Pods out of service discovery that we did not drain (no drain annotation):
    reported, never deleted."""
    return tuple(
        p for p in snapshot.drained_pods() if not (p.drained_from and p.drained_at_s is not None)
    )

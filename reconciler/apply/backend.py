"""The Kubernetes ``ClusterBackend``: observe, exact dry-run diff, and apply.

One cycle against one cluster::

    observe(cluster, policies)   three list calls -> FleetState + Drift (snapshot kept)
    diff(plan)                   render -> plan_workloads (pure) -> server-side apply
                                 dry run (dryRun=All, field manager "heteroscale") of
                                 every workload, in parallel -> field-by-field report
    apply(plan)                  the same computation, then carry it out in the order
                                 that never drops capacity

Exactness: the report compares the live object with what the API server says the
apply would produce (admission, defaulting, field ownership included), so ``plan``
prints what ``apply`` does. Only when the server cannot dry run (e.g. a webhook
without dry-run support: HTTP 400 "does not support dry run", or no server-side
apply at all: 415) does it fall back to a client-side comparison of the fields we
set, and says so in the report.

Conflicts:
- the live ``resourceVersion`` goes with every apply as a precondition, so an object
  changed since the observation answers 409; it is re-read and applied again (up to
  ``conflict_retries`` times);
- a field-ownership conflict (someone else set a field we own, e.g. ``kubectl
  edit``) is drift: reported, not overwritten, unless ``force``; the refused object
  writes nothing (its drains are not carried out either) and is not a change. A
  refused scale change makes the loop hold the whole service (``reconciler.loop``);
  replica drift is described in ``reconciler.observe.kubernetes``.

Ownership (RBAC cannot restrict writes by label, so it is checked here, in code):
only objects listed by the ownership selector are ever planned for, and every write
carries the observed ``resourceVersion`` as a precondition. When that fails (409),
the object is re-read and written again only while it still carries our ownership
labels for this cluster (``names.owned_by_us``); otherwise it is left alone and the
object is reported (``NotOurs``). A create is a POST, which fails when an object of
that name appeared meanwhile; that object is then written only if it is ours. The
one exception is ``--force``, which takes over a Deployment of exactly a name
heteroscale renders (the dry run says so first) and writes a Deployment that lost
our labels since it was observed; Pods that are not ours are never relabelled or
deleted and Deployments that are not ours never deleted, ``--force`` or not. A
Deployment whose spec someone else also manages is not deleted without ``--force``
either (a delete would overwrite their fields, which server-side apply refuses).

Errors: transport errors, 429 and 5xx are retried with backoff inside the client and
then abort the cycle (``ClusterUnavailable``); whatever was not done is done by the
next cycle, and because every write is declarative (server-side apply to stable
names, label patches to named Pods) nothing is lost or done twice.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from reconciler.apply import names
from reconciler.apply.actions import (
    WorkloadWork,
    manually_drained,
    plan_workloads,
    provably_unchanged,
    scale_in_windows,
    unsized_services,
)
from reconciler.apply.fields import FieldChange, client_side_changes, field_changes
from reconciler.apply.kubeclient import (
    ApiRejected,
    FieldOwnershipConflict,
    KubeApiError,
    KubeClient,
    NotFound,
    ResourceConflict,
    deployments_path,
    pods_path,
    status_causes,
)
from reconciler.apply.render import ObjectKey, render_groups
from reconciler.apply.report import ClusterDiff, DiffMode, ObjectDiff, PodAction, summarise_drift
from reconciler.apply.savedplan import (
    ROLLOUT_WAIT_S,
    Observed,
    ObservedDeployment,
    WriteStep,
    adopt_created,
    await_rollout,
    being_deleted,
    conflicts_only_with,
    delete_marked,
    deployment_fingerprint,
    node_fingerprint,
    relabel_patch,
)
from reconciler.apply.softscale import SloStatus
from reconciler.daemon_pool import DaemonThreadPool
from reconciler.desired.loader import DesiredState
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.errors import PermanentError
from reconciler.observe.base import Drift, Observation
from reconciler.observe.kubernetes import (
    ClusterSnapshot,
    ClusterWatch,
    FieldDrift,
    LiveDeployment,
    observation_from_snapshot,
    parse_deployment,
    read_snapshot,
)
from reconciler.plan import Plan
from reconciler.text_safety import quoted


@dataclass(frozen=True)
class ApplyOptions:
    force: bool = False  # take back fields someone else changed
    soft_scale_in_window_s: float = 120.0  # 0: delete at once (no observation window)
    diff_mode: Literal["auto", "server", "client"] = "auto"
    conflict_retries: int = 3
    dry_run_workers: int = 8
    # Skip the dry run of objects that provably would not change (actions.provably_unchanged).
    skip_provably_unchanged: bool = True
    # Keep Pods and Nodes in a list+watch cache between cycles (the loop) instead of
    # listing them every cycle (one-shot plan/apply).
    watch: bool = False
    # How long a put-back waits for the ReplicaSet to get the raised replicas first.
    rollout_wait_s: float = ROLLOUT_WAIT_S


class NotOurs(PermanentError):
    """An object to write no longer carries heteroscale's ownership labels: left alone."""


class WritesStopped(PermanentError):
    """This replica must make no further write (it no longer leads, or its loop is
    stopping and gives the Lease up): another may be acting on the same objects."""


@dataclass
class ApplyStats:
    """Counters of the last diff/apply, for the loop's metrics and the tests."""

    dry_runs: int = 0
    writes: int = 0
    conflicts_retried: int = 0
    ownership_conflicts: int = 0
    errors: list[str] = field(default_factory=list)


INTERRUPTED_CREATE_NOTE = (
    "heteroscale's own fields are recorded as an Update, as a create interrupted before "
    "its relabel leaves them: relabelled as its apply before the apply"
)


def _only_own_update_conflicts(w: WorkloadWork, exc: FieldOwnershipConflict) -> bool:
    """Whether the conflict is with heteroscale's own "Update" entry alone
    (``LiveDeployment.own_update_entry``, ``savedplan.conflicts_only_with``): not a
    change made outside Git, and relabelling that entry as our apply ends it."""
    return (
        w.live is not None
        and w.live.own_update_entry
        and conflicts_only_with(exc, names.FIELD_MANAGER)
    )


def _dry_run_unsupported(exc: KubeApiError) -> bool:
    if exc.status in (405, 415):
        return True
    text = exc.api_message.lower()
    return exc.status == 400 and ("dry run" in text or "dryrun" in text or "dry-run" in text)


def _visible(changes: tuple[FieldChange, ...]) -> tuple[FieldChange, ...]:
    """Field changes worth reporting: the applied-hash annotation follows every other
    change, the applied-replicas one every replicas change; they would only repeat them."""
    hidden = {
        f"metadata.annotations.{names.APPLIED_HASH_ANNOTATION}",
        f"metadata.annotations.{names.APPLIED_REPLICAS_ANNOTATION}",
    }
    return tuple(c for c in changes if c.path not in hidden)


def _path_parts(path: str) -> list[str]:
    """A server-side apply field path split at its dots, but not within a list item's
    selector (``[name="a.b"]``) nor its quoted values."""
    parts: list[str] = []
    current: list[str] = []
    depth, quote = 0, False
    for ch in path.strip("."):
        if ch == '"' and depth:
            quote = not quote
        elif not quote and ch == "[":
            depth += 1
        elif not quote and ch == "]":
            depth = max(0, depth - 1)
        if ch == "." and not depth and not quote:
            if current:
                parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if current:
        parts.append("".join(current))
    return parts


# A list item's selector in a field path: ``[name="engine"]``, ``[containerPort=80,protocol="TCP"]``.
_SELECTOR = re.compile(r"\[([^\]]*)\]$")
_SELECTOR_PAIR = re.compile(r'\s*([^=,\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,]*)')


def _selected(node: Any, selector: str) -> Any:
    """The item of list ``node`` whose fields equal every ``key=value`` of ``selector``
    (values as JSON: ``"engine"``, ``80``); None where none or not a list."""
    if not isinstance(node, list):
        return None
    wanted: dict[str, Any] = {}
    for key, raw in _SELECTOR_PAIR.findall(selector):
        try:
            wanted[key] = json.loads(raw)
        except ValueError:
            wanted[key] = raw.strip()
    if not wanted:
        return None
    for item in node:
        if isinstance(item, Mapping) and all(item.get(k) == v for k, v in wanted.items()):
            return item
    return None


def _value_at(obj: Mapping[str, Any] | None, path: str) -> Any:
    """The value at a server-side apply field path (``.spec.replicas``,
    ``.spec.template.spec.containers[name="engine"].image``); keys that contain dots
    (label and annotation keys) are matched greedily, a list item by its selector. None
    if absent (a conflict's live and desired values read "None" where a selector was
    taken for a key)."""
    node: Any = obj
    parts = _path_parts(path)
    i = 0
    while i < len(parts):
        if not isinstance(node, Mapping):
            return None
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            selector = _SELECTOR.search(key) if j == i + 1 else None
            if selector is not None and key[: selector.start()] in node:
                node, i = _selected(node[key[: selector.start()]], selector.group(1)), j
                break
            if key in node:
                node, i = node[key], j
                break
        else:
            return None
    return node


def _shown(value: Any) -> str | None:
    return None if value is None else str(value)


class KubernetesBackend:
    """``ClusterBackend`` for one Kubernetes cluster."""

    def __init__(
        self,
        client: KubeClient,
        *,
        state: DesiredState | None = None,
        options: ApplyOptions | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.client = client
        self.state = state
        self.options = options or ApplyOptions()
        self.clock = clock
        # The SLO status of each service this cycle, set by the loop from its metrics;
        # soft scale-in finishes a drain only while it says "held".
        self.slo: Mapping[str, SloStatus] = {}
        self.stats = ApplyStats()
        self._cluster: ClusterSpec | None = None
        self._policies: dict[str, ServicePolicy] = {}
        self._snapshot: ClusterSnapshot | None = None
        self._observation: Observation | None = None
        self._watch: ClusterWatch | None = None
        self._watch_cluster = ""
        self._stats_lock = threading.Lock()
        self._last_work: dict[str, WorkloadWork] = {}
        # Field-ownership conflicts of the last dry run, as drift (object, field, values).
        self._conflict_drift: dict[str, tuple[Drift, ...]] = {}
        # The last diff_cluster: (plan, diff, work), reused by apply_cluster(plan).
        self._preview: tuple[Plan, ClusterDiff, dict[str, WorkloadWork]] | None = None
        # Why no write may be made now (None: it may), asked before each write of an
        # apply (``apply_cluster``'s ``writes_refused``).
        self._writes_refused: Callable[[], str | None] = _never_refused

    # ------------------------------------------------------------------- observe

    def observe(self, cluster: ClusterSpec, policies: Sequence[ServicePolicy]) -> Observation:
        self._cluster = cluster
        self._policies = {p.name: p for p in policies}
        namespaces = {p.namespace for p in policies}
        if self.options.watch and (self._watch is None or self._watch_cluster != cluster.name):
            if self._watch is not None:
                self._watch.close()
            self._watch, self._watch_cluster = (
                ClusterWatch.start(self.client, cluster.name),
                cluster.name,
            )
        self._preview = None
        self._snapshot = read_snapshot(
            self.client, cluster, namespaces, now_s=self.clock(), watch=self._watch
        )
        self._observation = observation_from_snapshot(
            self._snapshot, cluster, self._policies, force=self.options.force
        )
        return self._observation

    @property
    def snapshot(self) -> ClusterSnapshot | None:
        return self._snapshot

    # ---------------------------------------------------------------- the plan

    def _context(self, plan: Plan) -> tuple[ClusterSpec, dict[str, ServicePolicy], ClusterSnapshot]:
        if self.state is None:
            raise PermanentError(
                "KubernetesBackend needs the desired state (backend.state) to render"
            )
        cluster = self.state.clusters.get(plan.cluster)
        if cluster is None:
            raise PermanentError(f"plan for unknown cluster '{plan.cluster}'")
        if self._cluster is None or self._cluster.name != plan.cluster or self._snapshot is None:
            self.observe(cluster, self.state.policies_for(plan.cluster))
        assert self._snapshot is not None
        policies = self._policies or {p.name: p for p in self.state.policies_for(plan.cluster)}
        return cluster, policies, self._snapshot

    def plan_work(self, plan: Plan) -> tuple[WorkloadWork, ...]:
        """The pure part: render the placement and pair it with the live objects."""
        cluster, policies, snapshot = self._context(plan)
        assert self.state is not None
        rendered = render_groups(
            (g for g in plan.groups if g.service in policies),
            policies,
            cluster,
            self.state.templates,
        )
        return plan_workloads(
            groups=plan.groups,
            rendered=rendered,
            snapshot=snapshot,
            policies=policies,
            slo=self.slo,
            now_s=self.clock(),
            window_s=self.options.soft_scale_in_window_s,
            unplaced=unplaced_by_service(plan),
            cluster=cluster,
            unsized=unsized_services(plan.held, plan.decisions),
            scale_in=scale_in_windows(plan.decisions, policies),
            may_move=plan.placement.may_move,
        )

    # -------------------------------------------------------------------- diff

    def diff_cluster(self, plan: Plan) -> ClusterDiff:
        """The exact dry run of ``apply(plan)``. ``apply_cluster`` of the same plan
        object, next, carries out this very dry run (no second one)."""
        diff, work = self._diff(plan)
        self._preview = (plan, diff, work)
        return diff

    def _diff(self, plan: Plan) -> tuple[ClusterDiff, dict[str, WorkloadWork]]:
        self.stats = ApplyStats()
        self._conflict_drift = {}
        work = self.plan_work(plan)
        mode: DiffMode = "client-side" if self.options.diff_mode == "client" else "server-dry-run"
        notes: list[str] = []
        results: dict[ObjectKey, ObjectDiff] = {}
        for w in work:
            if w.refusal:
                results[w.key] = self._object_diff(w, "error", (), (w.refusal,))
        to_dry_run = [w for w in work if w.manifest is not None and not w.refusal]
        if self.options.skip_provably_unchanged:
            for w in to_dry_run:
                if provably_unchanged(w):
                    results[w.key] = self._object_diff(
                        w, "update" if w.scale.pod_actions else "unchanged", ()
                    )
            to_dry_run = [w for w in to_dry_run if w.key not in results]
        if mode == "server-dry-run" and to_dry_run:
            workers = max(1, min(self.options.dry_run_workers, len(to_dry_run)))
            with DaemonThreadPool(max_workers=workers, thread_name_prefix="dry-run") as pool:
                outcomes = list(pool.map(self._dry_run_one, to_dry_run))
            fallback = [
                w for w, outcome in zip(to_dry_run, outcomes, strict=True) if outcome is None
            ]
            for w, outcome in zip(to_dry_run, outcomes, strict=True):
                if outcome is not None:
                    results[w.key] = outcome
            if fallback:
                if self.options.diff_mode == "server":
                    raise PermanentError(
                        "the API server cannot dry-run server-side apply (diff mode 'server')"
                    )
                mode = "client-side"
                notes.append(
                    "the API server could not dry-run server-side apply; diff computed on the client "
                    "(fields we set, normalised; fields we stopped setting are not shown)"
                )
                for w in fallback:
                    results[w.key] = self._client_side_one(w)
        elif to_dry_run:
            for w in to_dry_run:
                results[w.key] = self._client_side_one(w)
        objects = tuple(results.get(w.key) or self._no_apply_diff(w) for w in work)
        self._last_work = {str(w.key): w for w in work}
        diff = ClusterDiff(
            cluster=plan.cluster,
            mode=mode,
            objects=objects,
            drift=self._drift(objects),
            notes=tuple(notes) + self._manual_drain_notes(),
        )
        return diff, self._last_work

    def diff(self, plan: Plan) -> list[str]:
        diff = self.diff_cluster(plan)
        return diff.lines() + summarise_drift(diff.drift)

    def _drift(self, objects: Sequence[ObjectDiff]) -> tuple[Drift, ...]:
        assert self._observation is not None
        base = self._observation.drift
        extra: list[Drift] = []
        for o in objects:
            if o.action != "conflict":
                continue
            known = self._conflict_drift.get(o.key)
            if known:
                extra.extend(known)
                continue
            w = self._last_work.get(o.key)
            if w is not None and w.live is not None:  # ours, changed by someone else
                path, live = "spec", f"managed by {', '.join(w.live.other_managers) or 'others'}"
                desired = f"managed by {names.FIELD_MANAGER}"
            else:  # an object of that name that is not ours
                path, live = f"metadata.labels.{names.MANAGED_BY_LABEL}", "not heteroscale's"
                desired = names.MANAGED_BY_VALUE
            extra.append(
                FieldDrift(
                    "object_modified",
                    o.key,
                    "; ".join(o.notes),
                    path=path,
                    live=live,
                    desired=desired,
                )
            )
        return base + tuple(extra)

    def _record_conflict(
        self, w: WorkloadWork, exc: FieldOwnershipConflict, live: Mapping[str, Any] | None
    ) -> None:
        """Each conflicting field as drift: who changed it, live and desired value."""
        items: list[Drift] = []
        for cause in status_causes(exc.body):
            path = str(cause.get("field", "?"))
            live_value = _value_at(live, path)
            desired = _value_at(w.manifest, path)
            # The field and message are the answer's: escaped and cut where shown.
            shown_path = quoted(path.lstrip("."))
            items.append(
                FieldDrift(
                    "object_modified",
                    str(w.key),
                    f"{shown_path} is {live_value!r}, heteroscale wants {desired!r} "
                    f"({quoted(str(cause.get('message', 'conflict')))}); "
                    "not overwritten without --force",
                    path=shown_path,
                    live=_shown(live_value),
                    desired=_shown(desired),
                )
            )
        if items:
            with self._stats_lock:
                self._conflict_drift[str(w.key)] = tuple(items)

    def _manual_drain_notes(self) -> tuple[str, ...]:
        assert self._snapshot is not None
        return tuple(
            f"pod {p.key} is out of service discovery but was not drained by heteroscale; left alone"
            for p in manually_drained(self._snapshot)
        )

    def _summary(self, w: WorkloadWork) -> str:
        if w.desired is None:
            return ""
        meta = w.desired.manifest["metadata"]["annotations"]
        return (
            f"{meta[names.GPU_TYPE_ANNOTATION]} x{w.desired.gpus_per_instance} GPUs per instance "
            f"under {meta[names.DOMAIN_ANNOTATION]}"
        )

    def _pod_actions(self, w: WorkloadWork) -> tuple[PodAction, ...]:
        window = self.options.soft_scale_in_window_s
        out = [
            PodAction("put_back", p, "back into service discovery (no cold start)")
            for p in w.scale.put_back
        ]
        out += [
            PodAction(
                "drain",
                p,
                "leaves service discovery, keeps running"
                + (f"; deleted after {window:g} s if SLOs hold" if window > 0 else "; deleted now"),
            )
            for p in w.scale.drain
        ]
        out += [
            PodAction("finish", p, "SLOs held through the observation window")
            for p in w.scale.finish
            if p not in w.scale.drain
        ]
        out += [
            PodAction("finish", p, "no observation window")
            for p in w.scale.finish
            if p in w.scale.drain
        ]
        return tuple(out)

    def _object_diff(
        self,
        w: WorkloadWork,
        action: Any,
        fields: tuple[FieldChange, ...],
        notes: tuple[str, ...] = (),
    ) -> ObjectDiff:
        # A refused object writes nothing: its Pods are not drained, put back or
        # deleted either, so it changes nothing and is not counted as a change.
        refused = action in ("conflict", "error")
        return ObjectDiff(
            key=str(w.key),
            service=w.service,
            group_id=w.group_id,
            role=w.role,
            action=action,
            replicas_before=w.replicas_before,
            replicas_after=w.replicas_after,
            fields=fields,
            pods=() if refused else self._pod_actions(w),
            notes=tuple(w.scale.notes) + ((w.reason,) if w.reason else ()) + notes,
            summary=self._summary(w) if action == "create" else "",
        )

    def _no_apply_diff(self, w: WorkloadWork) -> ObjectDiff:
        # A delete removes the whole object: the headline says so (replicas n -> 0).
        if (
            w.action == "delete"
            and w.live is not None
            and w.live.other_managers
            and not self.options.force
        ):
            # Deleting overwrites every field someone else set: refused like an apply
            # that would (server-side apply refuses those; a delete would not).
            return self._object_diff(w, "conflict", (), self._foreign_owned(w))
        return self._object_diff(w, w.action, ())

    def _dry_run_one(
        self,
        w: WorkloadWork,
        attempt: int = 0,
        live: dict[str, Any] | None = None,
        *,
        force: bool | None = None,
    ) -> ObjectDiff | None:
        """Server-side dry run of one workload; None when the server cannot dry run.
        ``live`` is the object to compare against (default: the observed one); ``force``
        (default: the options') takes fields other managers hold."""
        assert w.manifest is not None
        force = self.options.force if force is None else force
        path = deployments_path(w.key.namespace, w.key.name)
        with self._stats_lock:  # dry runs run in a thread pool
            self.stats.dry_runs += 1
        try:
            result = self.client.apply(
                path,
                w.manifest,
                field_manager=names.FIELD_MANAGER,
                force=force,
                dry_run=True,
            )
        except FieldOwnershipConflict as exc:
            if not force and _only_own_update_conflicts(w, exc):
                # What the apply does (relabel, then apply): the fields were ours.
                diff = self._dry_run_one(w, attempt, live, force=True)
                if diff is None:
                    return None
                return replace(diff, notes=(*diff.notes, INTERRUPTED_CREATE_NOTE))
            with self._stats_lock:
                self.stats.ownership_conflicts += 1
            self._record_conflict(
                w, exc, live if live is not None else (w.live.raw if w.live else None)
            )
            return self._object_diff(w, "conflict", (), self._conflict_notes(exc))
        except ResourceConflict as exc:
            # Changed since we observed it (often just a status or revision update by
            # the controllers): dry-run again on a fresh read and compare against it.
            if attempt >= self.options.conflict_retries:
                return self._object_diff(w, "error", (), (str(exc),))
            try:
                manifest, fresh = self._refresh(w)
            except NotOurs as gone:
                return self._object_diff(w, "conflict", (), (str(gone),))
            return self._dry_run_one(replace(w, manifest=manifest), attempt + 1, fresh, force=force)
        except ApiRejected as exc:
            if _dry_run_unsupported(exc):
                return None
            return self._object_diff(w, "error", (), (str(exc),))
        except NotFound as exc:  # e.g. the namespace does not exist
            return self._object_diff(w, "error", (), (str(exc),))
        if w.action == "create":
            if result.get("metadata", {}).get("resourceVersion"):
                # An object of that name exists without our ownership labels.
                if not self.options.force:
                    with self._stats_lock:
                        self.stats.ownership_conflicts += 1
                    return self._object_diff(
                        w,
                        "conflict",
                        (),
                        (
                            "a Deployment of this name exists without heteroscale's ownership labels; "
                            "not touched (use --force to take it over)",
                        ),
                    )
                existing = self.client.get(path)
                return self._object_diff(
                    replace(w, action="update"), "update", _visible(field_changes(existing, result))
                )
            return self._object_diff(
                w, "create", (FieldChange("spec.replicas", None, w.scale.replicas),)
            )
        before = live if live is not None else (w.live.raw if w.live else None)
        fields = _visible(field_changes(before, result))
        action = "update" if fields or w.scale.pod_actions else "unchanged"
        return self._object_diff(w, action, fields)

    def _client_side_one(self, w: WorkloadWork) -> ObjectDiff:
        assert w.manifest is not None
        manifest = dict(w.manifest)
        manifest["metadata"] = {
            k: v for k, v in manifest["metadata"].items() if k != "resourceVersion"
        }
        if w.action == "create":
            return self._object_diff(
                w, "create", (FieldChange("spec.replicas", None, w.scale.replicas),)
            )
        conflicts = self._foreign_owned(w)
        if conflicts and not self.options.force:
            return self._object_diff(w, "conflict", (), conflicts)
        fields = _visible(client_side_changes(w.live.raw if w.live else None, manifest))
        action = "update" if fields or w.scale.pod_actions else "unchanged"
        return self._object_diff(w, action, fields)

    @staticmethod
    def _foreign_owned(w: WorkloadWork) -> tuple[str, ...]:
        if w.live is None or not w.live.other_managers:
            return ()
        what = "not deleted" if w.action == "delete" else "use --force to take them back"
        return (
            f"spec fields also managed by {', '.join(w.live.other_managers)}; {what}"
            + (" without --force" if w.action == "delete" else ""),
        )

    @staticmethod
    def _conflict_notes(exc: FieldOwnershipConflict) -> tuple[str, ...]:
        details = exc.conflicts or [exc.api_message]
        return (
            "changed outside Git, not overwritten (use --force to take it back): "
            + "; ".join(details),
        )

    def _refresh(self, w: WorkloadWork) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Re-read a Deployment after a 409; the manifest rebased on its
        resourceVersion, and the fresh object (None when it is gone). Raises
        ``NotOurs`` when it no longer carries our ownership labels (unless ``force``)."""
        assert w.manifest is not None
        with self._stats_lock:
            self.stats.conflicts_retried += 1
        manifest = dict(w.manifest)
        metadata = dict(manifest["metadata"])
        fresh: dict[str, Any] | None
        try:
            fresh = self.client.get(deployments_path(w.key.namespace, w.key.name))
        except NotFound:
            fresh = None
            metadata.pop("resourceVersion", None)
        else:
            if not self.options.force:
                self._check_ours(fresh, f"Deployment {w.key}")
            metadata["resourceVersion"] = fresh["metadata"]["resourceVersion"]
        manifest["metadata"] = metadata
        return manifest, fresh

    # ------------------------------------------------------------------- apply

    def apply_cluster(
        self, plan: Plan, writes_refused: Callable[[], str | None] | None = None
    ) -> ClusterDiff:
        """Carry out the plan: dry run first (so unchanged objects are not written
        and conflicts are known), then writes in capacity-safe order. Returns the
        report of what was done (``mode="applied"``). Raises ``ClusterUnavailable``
        when the API server stops answering; the next cycle finishes the job.

        ``writes_refused`` is asked before every write, a conflict's retry included
        (None: it may write): a replica that lost the Lease in the middle of an apply
        wrote on, and its retry of a 409 wrote its stale replicas over the ones the new
        leader had just set. From the first refusal on, nothing is written and every
        object not yet written is reported as such."""
        if self._preview is not None and self._preview[0] is plan and self._snapshot is not None:
            _plan, preview, work = self._preview
        else:
            preview, work = self._diff(plan)
        self._preview = None
        self._writes_refused = writes_refused or _never_refused
        try:
            return self._carry_out_all(preview, work)
        finally:
            self._writes_refused = _never_refused

    def _carry_out_all(self, preview: ClusterDiff, work: dict[str, WorkloadWork]) -> ClusterDiff:
        done: list[ObjectDiff] = []
        stopped: str | None = None
        for obj in preview.objects:
            # A kept Deployment is not written, but the drained Pods it lists are
            # finished (``actions._kept``): it changes something only through them.
            if obj.action in ("conflict", "error") or not obj.changes_something:
                done.append(obj)
                continue
            if stopped is not None:
                done.append(replace(obj, action="error", notes=(*obj.notes, stopped)))
                continue
            try:
                self._carry_out(
                    work[obj.key], write_object=bool(obj.fields) or obj.action == "create"
                )
            except (NotOurs, FieldOwnershipConflict) as exc:
                # Refused because someone else changed or took the object since the
                # dry run: drift, left alone (writes before it in its order stay done).
                self.stats.errors.append(f"{obj.key}: {exc}")
                notes = (
                    self._conflict_notes(exc)
                    if isinstance(exc, FieldOwnershipConflict)
                    else (str(exc),)
                )
                done.append(replace(obj, action="conflict", notes=(*obj.notes, *notes)))
                continue
            except WritesStopped as exc:
                stopped = f"not written: {exc}"
                self.stats.errors.append(f"{obj.key}: {stopped}")
                done.append(replace(obj, action="error", notes=(*obj.notes, stopped)))
                continue
            except (PermanentError, NotFound, ResourceConflict) as exc:
                self.stats.errors.append(f"{obj.key}: {exc}")
                done.append(replace(obj, action="error", notes=(*obj.notes, str(exc))))
                continue
            done.append(obj)
        # The next observe must see the new state: relist the watched Pods if we wrote
        # any (drains are decided from them), and re-read everything else.
        self._snapshot = None
        if self._watch is not None and any(o.pods for o in done):
            self._watch.pods.invalidate()
        return replace(preview, mode="applied", objects=tuple(done))

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def apply(self, plan: Plan) -> list[str]:
        result = self.apply_cluster(plan)
        return result.lines() + summarise_drift(result.drift)

    def _carry_out(self, w: WorkloadWork, *, write_object: bool) -> None:
        now = self.clock()
        steps = self._steps(w, write_object=write_object)
        for index, step in enumerate(steps):
            if step.op == "apply":
                generation = self._apply_manifest(w)
                if any(s.op == "put_back" for s in steps[index + 1 :]) and not await_rollout(
                    self.client,
                    w.key.namespace,
                    w.key.name,
                    generation,
                    timeout_s=self.options.rollout_wait_s,
                ):
                    raise PermanentError(
                        f"Deployment {w.key} did not pass its new replicas on to its "
                        f"ReplicaSet within {self.options.rollout_wait_s:g} s; drained Pods "
                        "not put back (a later cycle does)"
                    )
            elif step.op in ("drain", "put_back"):
                self._relabel(
                    step.namespace,
                    step.name,
                    drain=step.op == "drain",
                    now_s=now,
                    source=step.source,
                    resource_version=step.resource_version,
                )
            elif step.op == "delete_deployment":
                self._delete_deployment(step.namespace, step.name, step.resource_version)
            else:  # delete_pod: a drained Pod whose window passed
                self._delete_pod(step.namespace, step.name, step.resource_version)

    def _delete_pod(self, namespace: str, name: str, resource_version: str | None) -> None:
        path = pods_path(namespace, name)

        def write(rv: str | None) -> Any:
            return self.client.delete(path, propagation="Background", resource_version=rv)

        self._guarded(
            path,
            resource_version,
            write,
            what=f"Pod {namespace}/{name}",
            still_wanted=_still_drained,
        )

    def _delete_deployment(self, namespace: str, name: str, resource_version: str | None) -> None:
        """Delete a Deployment marked as the plan's deletion (``savedplan.delete_marked``),
        re-read and done again on a 409 of either write while it is ours (``_guarded``).
        One found being deleted meanwhile is left alone: its removal is under way
        (someone else's: a mark written after it would not make it the plan's)."""
        path = deployments_path(namespace, name)

        def write(rv: str | None) -> None:
            assert rv is not None  # ``_guarded`` re-reads the version when none was observed
            delete_marked(self.client, path, rv, now_s=self.clock())

        self._guarded(
            path,
            resource_version,
            write,
            what=f"Deployment {namespace}/{name}",
            still_wanted=lambda obj: not being_deleted(obj),
        )

    def _check_may_write(self) -> None:
        """Raise ``WritesStopped`` when ``apply_cluster``'s ``writes_refused`` says no."""
        reason = self._writes_refused()
        if reason is not None:
            raise WritesStopped(reason)

    # ------------------------------------------------------------ ownership

    def _check_ours(self, obj: Mapping[str, Any], what: str) -> None:
        cluster = self._cluster.name if self._cluster is not None else ""
        if not names.owned_by_us(obj, cluster):
            raise NotOurs(
                f"{what} no longer carries heteroscale's ownership labels for cluster "
                f"{cluster} ({names.ownership_selector(cluster)}); not touched"
            )

    def _guarded(
        self,
        path: str,
        resource_version: str | None,
        write: Callable[[str | None], Any],
        *,
        what: str,
        still_wanted: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> Any:
        """One write with the observed ``resourceVersion`` as its precondition. On a
        409 (or with no observed version) the object is re-read and written at its
        fresh version only while it is still ours (else ``NotOurs``) and, with
        ``still_wanted``, still in the state the write was planned for (else skipped).
        A vanished object is skipped. Returns the write's answer (None if skipped)."""
        rv = resource_version
        for attempt in range(self.options.conflict_retries + 2):
            self._check_may_write()
            if rv is None or attempt > 0:
                try:
                    fresh = self.client.get(path)
                except NotFound:
                    return None
                self._check_ours(fresh, what)
                if still_wanted is not None and not still_wanted(fresh):
                    return None
                rv = str(fresh["metadata"]["resourceVersion"])
            try:
                answer = write(rv)
            except NotFound:
                return None
            except ResourceConflict:
                with self._stats_lock:
                    self.stats.conflicts_retried += 1
                continue
            self.stats.writes += 1
            return answer
        raise ResourceConflict(
            409,
            "Conflict",
            f"{what} kept changing; gave up after {self.options.conflict_retries} re-reads",
        )

    def _steps(self, w: WorkloadWork, *, write_object: bool) -> list[WriteStep]:
        """The writes of one workload, in order (shared by apply and saved plans, so a
        saved plan writes what apply would). Preconditions are the observed
        resourceVersions; the live apply path re-reads on a 409, a saved plan refuses."""
        namespace = w.key.namespace
        pod_rv = (
            {p.key.name: p.resource_version for p in self._snapshot.pods} if self._snapshot else {}
        )

        def pods(op: Literal["drain", "put_back"], names_: Sequence[str]) -> list[WriteStep]:
            source = w.key.name if op == "drain" else ""
            return [WriteStep(op, namespace, n, pod_rv.get(n), source=source) for n in names_]

        steps: list[WriteStep] = []
        if w.action in ("create", "update"):
            assert w.manifest is not None
            rv = w.live.resource_version if w.live is not None else None
            write = (
                [WriteStep("apply", namespace, w.key.name, rv, w.manifest)] if write_object else []
            )
            if w.scale.put_back or w.scale.replicas >= w.replicas_before:
                # Capacity first: replicas up, then the drained Pods back in.
                steps += write + pods("put_back", w.scale.put_back)
            else:
                # Out of service discovery first, then fewer replicas.
                steps += pods("drain", w.scale.drain) + write
        elif w.action == "delete":
            assert w.live is not None
            steps += pods("drain", w.scale.drain)
            steps.append(
                WriteStep("delete_deployment", namespace, w.key.name, w.live.resource_version)
            )
        steps += [WriteStep("delete_pod", namespace, p, pod_rv.get(p)) for p in w.scale.finish]
        return steps

    # -------------------------------------------------------------- saved plans

    def observed(self) -> Observed:
        """What the last observation read, as a saved plan records it."""
        assert self._snapshot is not None
        return Observed(
            deployments={
                str(k): ObservedDeployment(
                    d.resource_version,
                    int(d.raw.get("metadata", {}).get("generation", 0)),
                    deployment_fingerprint(d.raw),
                )
                for k, d in self._snapshot.deployments.items()
            },
            pods={str(p.key): p.resource_version for p in self._snapshot.pods},
            nodes={n.name: node_fingerprint(n.labels, n.gpus, n.uid) for n in self._snapshot.nodes},
        )

    def saved_writes(self, diff: ClusterDiff) -> tuple[WriteStep, ...]:
        """The writes ``apply_cluster`` would make for the dry run ``diff`` (the last
        one this backend computed), in order: what a saved plan carries out."""
        steps: list[WriteStep] = []
        for obj in diff.objects:
            if obj.action in ("conflict", "error") or not obj.changes_something:
                continue
            w = self._last_work[obj.key]
            steps += self._steps(w, write_object=bool(obj.fields) or obj.action == "create")
        return tuple(steps)

    def _create(self, w: WorkloadWork) -> dict[str, Any] | None:
        """Create a Deployment that must not exist: a POST (server-side apply would
        write over an object of that name that appeared since the dry run). Returns
        the manifest to apply instead when one appeared and is ours (written at its
        resourceVersion), None when created; raises ``NotOurs`` when it is not ours."""
        assert w.manifest is not None
        path = deployments_path(w.key.namespace, w.key.name)
        body = {**w.manifest, "metadata": dict(w.manifest["metadata"])}
        body["metadata"].pop("resourceVersion", None)
        self._check_may_write()
        try:
            created = self.client.request(
                "POST",
                deployments_path(w.key.namespace),
                query={"fieldManager": names.FIELD_MANAGER},
                body=body,
            )
        except ResourceConflict:  # 409 AlreadyExists
            try:
                existing = self.client.get(path)
            except NotFound:
                return dict(body)  # gone again: server-side apply creates it
            self._check_ours(existing, f"Deployment {w.key} (created by someone else)")
            manifest, _fresh = self._refresh(w)
            return manifest
        self.stats.writes += 1
        # The POST's fields are our "Update"; make them our "Apply", so our next
        # server-side apply owns them (as ``apply PLAN`` does).
        adopt_created(self.client, path, created, names.FIELD_MANAGER)
        return None

    def _relabel_interrupted_create(self, w: WorkloadWork, path: str) -> dict[str, Any]:
        """Our fields recorded as an "Update" (``LiveDeployment.own_update_entry``: a
        create interrupted before ``_create``'s relabel) made our "Apply", so the apply
        that follows does not conflict with heteroscale itself; the manifest pinned to
        the relabelled object. Where the object's spec moved meanwhile the relabel is not
        made (``adopt_created`` refuses it) and the apply says what conflicts."""
        assert w.live is not None and w.manifest is not None
        self._check_may_write()
        try:
            version = adopt_created(self.client, path, w.live.raw, names.FIELD_MANAGER)
        except ResourceConflict:
            return w.manifest
        self.stats.writes += 1
        if "resourceVersion" not in w.manifest.get("metadata", {}):
            return w.manifest
        return {**w.manifest, "metadata": {**w.manifest["metadata"], "resourceVersion": version}}

    def _apply_manifest(self, w: WorkloadWork) -> int | None:
        """Write the manifest; the written object's generation (None when created)."""
        manifest = w.manifest
        path = deployments_path(w.key.namespace, w.key.name)
        if w.live is None and not self.options.force:
            manifest = self._create(w)
            if manifest is None:
                return None
        elif w.live is not None and w.live.own_update_entry and not self.options.force:
            manifest = self._relabel_interrupted_create(w, path)
        for _attempt in range(self.options.conflict_retries + 1):
            assert manifest is not None
            self._check_may_write()
            try:
                written = self.client.apply(
                    path, manifest, field_manager=names.FIELD_MANAGER, force=self.options.force
                )
                self.stats.writes += 1
                generation = written.get("metadata", {}).get("generation")
                return int(generation) if generation is not None else None
            except ResourceConflict:
                manifest, _fresh = self._refresh(replace(w, manifest=manifest))
        raise ResourceConflict(
            409,
            "Conflict",
            f"{w.key} kept changing; gave up after {self.options.conflict_retries} re-reads",
        )

    def _relabel(
        self,
        namespace: str,
        pod: str,
        *,
        drain: bool,
        now_s: float,
        source: str,
        resource_version: str | None = None,
    ) -> None:
        """Flip a Pod out of (or back into) service discovery and its ReplicaSet, at
        the observed resourceVersion, and only while it is ours (``_guarded``)."""
        path = pods_path(namespace, pod)

        def write(rv: str | None) -> Any:
            patch = relabel_patch(drain=drain, now_s=now_s, source=source)
            patch["metadata"]["resourceVersion"] = rv
            return self.client.merge_patch(path, patch, field_manager=names.FIELD_MANAGER)

        # Gone already: nothing to drain or put back (``_guarded`` skips it).
        self._guarded(path, resource_version, write, what=f"Pod {namespace}/{pod}")


def unplaced_by_service(plan: Plan) -> dict[str, str]:
    """Per service with a placement shortfall, what is missing ("2 decode: gpu_capacity"),
    its shortfalls joined."""
    missing: dict[str, list[str]] = {}
    for shortfall in plan.placement.shortfalls:
        missing.setdefault(shortfall.service, []).append(
            f"{shortfall.instances} {shortfall.role}: {shortfall.constraint}"
        )
    return {service: "; ".join(parts) for service, parts in missing.items()}


def _never_refused() -> str | None:
    return None


def _still_drained(pod: Mapping[str, Any]) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(names.SERVING_LABEL) == names.DRAINING


def deployment_from_api(client: KubeClient, key: ObjectKey) -> LiveDeployment | None:
    """One Deployment as the observer sees it (None when absent)."""
    try:
        return parse_deployment(client.get(deployments_path(key.namespace, key.name)))
    except NotFound:
        return None

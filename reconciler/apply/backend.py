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
  scale``) is drift: reported, not overwritten, unless ``force``.

Errors: transport errors, 429 and 5xx are retried with backoff inside the client and
then abort the cycle (``ClusterUnavailable``); whatever was not done is done by the
next cycle, and because every write is declarative (server-side apply to stable
names, label patches to named Pods) nothing is lost or done twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from reconciler.apply import names
from reconciler.apply.actions import (
    WorkloadWork,
    manually_drained,
    plan_workloads,
    provably_unchanged,
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
)
from reconciler.apply.render import ObjectKey, render_groups
from reconciler.apply.report import ClusterDiff, DiffMode, ObjectDiff, PodAction, summarise_drift
from reconciler.apply.savedplan import (
    Observed,
    ObservedDeployment,
    WriteStep,
    deployment_fingerprint,
    node_fingerprint,
    relabel_patch,
)
from reconciler.apply.softscale import SloStatus
from reconciler.desired.loader import DesiredState
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.errors import PermanentError
from reconciler.observe.base import Drift, Observation
from reconciler.observe.kubernetes import (
    ClusterSnapshot,
    ClusterWatch,
    LiveDeployment,
    observation_from_snapshot,
    parse_deployment,
    read_snapshot,
)
from reconciler.plan import Plan


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


@dataclass
class ApplyStats:
    """Counters of the last diff/apply, for the loop's metrics and the tests."""

    dry_runs: int = 0
    writes: int = 0
    conflicts_retried: int = 0
    ownership_conflicts: int = 0
    errors: list[str] = field(default_factory=list)


def _dry_run_unsupported(exc: KubeApiError) -> bool:
    if exc.status in (405, 415):
        return True
    text = exc.api_message.lower()
    return exc.status == 400 and ("dry run" in text or "dryrun" in text or "dry-run" in text)


def _visible(changes: tuple[FieldChange, ...]) -> tuple[FieldChange, ...]:
    """Field changes worth reporting: the applied-hash annotation follows every other
    change and would only repeat it."""
    hidden = f"metadata.annotations.{names.APPLIED_HASH_ANNOTATION}"
    return tuple(c for c in changes if c.path != hidden)


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
        self._snapshot = read_snapshot(
            self.client, cluster, namespaces, now_s=self.clock(), watch=self._watch
        )
        self._observation = observation_from_snapshot(self._snapshot, cluster, self._policies)
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
        )

    # -------------------------------------------------------------------- diff

    def diff_cluster(self, plan: Plan) -> ClusterDiff:
        """The exact dry run of ``apply(plan)``."""
        return self._diff(plan)[0]

    def _diff(self, plan: Plan) -> tuple[ClusterDiff, dict[str, WorkloadWork]]:
        self.stats = ApplyStats()
        work = self.plan_work(plan)
        mode: DiffMode = "client-side" if self.options.diff_mode == "client" else "server-dry-run"
        notes: list[str] = []
        results: dict[ObjectKey, ObjectDiff] = {}
        to_dry_run = [w for w in work if w.manifest is not None]
        if self.options.skip_provably_unchanged:
            for w in to_dry_run:
                if provably_unchanged(w):
                    results[w.key] = self._object_diff(
                        w, "update" if w.scale.pod_actions else "unchanged", ()
                    )
            to_dry_run = [w for w in to_dry_run if w.key not in results]
        if mode == "server-dry-run" and to_dry_run:
            workers = max(1, min(self.options.dry_run_workers, len(to_dry_run)))
            with ThreadPoolExecutor(max_workers=workers) as pool:
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
        diff = ClusterDiff(
            cluster=plan.cluster,
            mode=mode,
            objects=objects,
            drift=self._drift(objects),
            notes=tuple(notes) + self._manual_drain_notes(),
        )
        self._last_work = {str(w.key): w for w in work}
        return diff, self._last_work

    def diff(self, plan: Plan) -> list[str]:
        diff = self.diff_cluster(plan)
        return diff.lines() + summarise_drift(diff.drift)

    def _drift(self, objects: Sequence[ObjectDiff]) -> tuple[Drift, ...]:
        assert self._observation is not None
        base = self._observation.drift
        extra = tuple(
            Drift("object_modified", o.key, "; ".join(o.notes))
            for o in objects
            if o.action == "conflict"
        )
        return base + extra

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
        return ObjectDiff(
            key=str(w.key),
            service=w.service,
            group_id=w.group_id,
            role=w.role,
            action=action,
            replicas_before=w.replicas_before,
            replicas_after=w.replicas_after,
            fields=fields,
            pods=self._pod_actions(w),
            notes=tuple(w.scale.notes) + ((w.reason,) if w.reason else ()) + notes,
            summary=self._summary(w) if action == "create" else "",
        )

    def _no_apply_diff(self, w: WorkloadWork) -> ObjectDiff:
        # A delete removes the whole object: the headline says so (replicas n -> 0).
        return self._object_diff(w, w.action, ())

    def _dry_run_one(
        self, w: WorkloadWork, attempt: int = 0, live: dict[str, Any] | None = None
    ) -> ObjectDiff | None:
        """Server-side dry run of one workload; None when the server cannot dry run.
        ``live`` is the object to compare against (default: the observed one)."""
        assert w.manifest is not None
        path = deployments_path(w.key.namespace, w.key.name)
        with self._stats_lock:  # dry runs run in a thread pool
            self.stats.dry_runs += 1
        try:
            result = self.client.apply(
                path,
                w.manifest,
                field_manager=names.FIELD_MANAGER,
                force=self.options.force,
                dry_run=True,
            )
        except FieldOwnershipConflict as exc:
            with self._stats_lock:
                self.stats.ownership_conflicts += 1
            return self._object_diff(w, "conflict", (), self._conflict_notes(exc))
        except ResourceConflict as exc:
            # Changed since we observed it (often just a status or revision update by
            # the controllers): dry-run again on a fresh read and compare against it.
            if attempt >= self.options.conflict_retries:
                return self._object_diff(w, "error", (), (str(exc),))
            manifest, fresh = self._refresh(w)
            return self._dry_run_one(replace(w, manifest=manifest), attempt + 1, fresh)
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
        return (
            f"spec fields also managed by {', '.join(w.live.other_managers)}; use --force to take them back",
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
        resourceVersion, and the fresh object (None when it is gone)."""
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
            metadata["resourceVersion"] = fresh["metadata"]["resourceVersion"]
        manifest["metadata"] = metadata
        return manifest, fresh

    # ------------------------------------------------------------------- apply

    def apply_cluster(self, plan: Plan) -> ClusterDiff:
        """Carry out the plan: dry run first (so unchanged objects are not written
        and conflicts are known), then writes in capacity-safe order. Returns the
        report of what was done (``mode="applied"``). Raises ``ClusterUnavailable``
        when the API server stops answering; the next cycle finishes the job."""
        preview, work = self._diff(plan)
        done: list[ObjectDiff] = []
        for obj in preview.objects:
            if obj.action in ("conflict", "error", "keep") or not obj.changes_something:
                done.append(obj)
                continue
            try:
                self._carry_out(
                    work[obj.key], write_object=bool(obj.fields) or obj.action == "create"
                )
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
        for step in self._steps(w, write_object=write_object):
            if step.op == "apply":
                self._apply_manifest(w)
            elif step.op in ("drain", "put_back"):
                self._relabel(
                    step.namespace,
                    step.name,
                    drain=step.op == "drain",
                    now_s=now,
                    source=step.source,
                )
            else:
                path = (
                    deployments_path(step.namespace, step.name)
                    if step.op == "delete_deployment"
                    else pods_path(step.namespace, step.name)
                )
                try:
                    self.client.delete(path, propagation="Background")
                    self.stats.writes += 1
                except NotFound:
                    pass

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
            nodes={n.name: node_fingerprint(n.labels, n.gpus) for n in self._snapshot.nodes},
        )

    def saved_writes(self, diff: ClusterDiff) -> tuple[WriteStep, ...]:
        """The writes ``apply_cluster`` would make for the dry run ``diff`` (the last
        one this backend computed), in order: what a saved plan carries out."""
        steps: list[WriteStep] = []
        for obj in diff.objects:
            if obj.action in ("conflict", "error", "keep") or not obj.changes_something:
                continue
            w = self._last_work[obj.key]
            steps += self._steps(w, write_object=bool(obj.fields) or obj.action == "create")
        return tuple(steps)

    def _apply_manifest(self, w: WorkloadWork) -> None:
        manifest = w.manifest
        path = deployments_path(w.key.namespace, w.key.name)
        for _attempt in range(self.options.conflict_retries + 1):
            assert manifest is not None
            try:
                self.client.apply(
                    path, manifest, field_manager=names.FIELD_MANAGER, force=self.options.force
                )
                self.stats.writes += 1
                return
            except ResourceConflict:
                manifest, _fresh = self._refresh(replace(w, manifest=manifest))
        raise ResourceConflict(
            409,
            "Conflict",
            f"{w.key} kept changing; gave up after {self.options.conflict_retries} re-reads",
        )

    def _relabel(self, namespace: str, pod: str, *, drain: bool, now_s: float, source: str) -> None:
        """Flip a Pod out of (or back into) service discovery and its ReplicaSet."""
        patch = relabel_patch(drain=drain, now_s=now_s, source=source)
        try:
            self.client.merge_patch(
                pods_path(namespace, pod), patch, field_manager=names.FIELD_MANAGER
            )
            self.stats.writes += 1
        except NotFound:
            pass  # gone already: nothing to drain or put back


def deployment_from_api(client: KubeClient, key: ObjectKey) -> LiveDeployment | None:
    """One Deployment as the observer sees it (None when absent)."""
    try:
        return parse_deployment(client.get(deployments_path(key.namespace, key.name)))
    except NotFound:
        return None

"""One cluster's cycle: observe, restore the durable windows, read the metrics,
decide -> place -> diff through ``reconciler.cycle.plan_cluster`` (the path ``plan``,
``apply`` and the simulator share), dry-run, then apply (the acting leader) or only
report, and record decisions, drift and the outcome.

Holding on refusal: the dry run comes first, and when the API server refuses a scale
change of a service, the cycle is planned again with that service held; a refusal
that appears only while applying (a race) leaves the service's cooldown as it was.
Errors of the cluster propagate to the schedule, which reports them and backs off.

Leadership: the schedule reads it when the cluster's cycle starts; the read, the
decision and the dry run may take long on a slow API server, so the acting leader asks
``apply_refused`` again right before applying, then the API server whether its Lease
still names this replica (``lease_refused``: its own clock may say it leads while
another holds the Lease, one that took it over, or an operator who moved it), and if it
no longer leads (or the loop is stopping), only reports, as a standby does, and reads
the stored windows again the next time it acts (another leader may have written them
meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from reconciler.apply.report import ClusterDiff, summarise_drift
from reconciler.apply.softscale import SloStatus, slo_status
from reconciler.cycle import plan_cluster
from reconciler.desired.loader import DesiredState
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.errors import MetricsUnavailable
from reconciler.loop.reporting import DriftLog, LoopMetrics, log, record_cycle, record_plan
from reconciler.loop.windows import PolicyWindows
from reconciler.observe.base import (
    OBJECT_DRIFT_KINDS,
    ClusterBackend,
    MetricsSource,
    Observation,
)
from reconciler.placement.base import PlacementOptions, Placer
from reconciler.plan import Plan
from reconciler.policy.base import Autoscaler, PolicyHistory
from reconciler.state import ServiceMetrics
from reconciler.text_safety import visible


@dataclass
class ClusterOutcome:
    """What one cycle did for one cluster."""

    cluster: str
    plan: Plan | None = None
    diff: ClusterDiff | None = None  # rich report (Kubernetes backend)
    lines: tuple[str, ...] = ()  # report lines (any backend)
    observation: Observation | None = None
    applied: bool = False
    outcome: str = "ok"  # ok | error | skipped | standby
    error: str | None = None
    duration_s: float = 0.0
    # Why the metrics source could not be read this cycle (every service held), e.g.
    # "MetricsUnavailable: ..."; None when it was read.
    metrics_error: str | None = None

    @property
    def has_changes(self) -> bool:
        if self.diff is not None:
            return self.diff.has_changes
        return bool(self.plan and self.plan.has_changes) or bool(self.lines)

    @property
    def refused_objects(self) -> int:
        """Objects whose write was refused (``error``: by the API server, or before
        it, e.g. Pods no Node could run): the cluster is not as desired, whatever the
        other objects did."""
        if self.diff is None:
            return 0
        return sum(1 for o in self.diff.objects if o.action == "error")

    @property
    def applied_in_full(self) -> bool:
        """Applied with no write refused: only then does the cluster run this plan and
        its revision, so only then are they recorded as the applied ones (a refused
        write leaves the previous record, as a saved plan's does)."""
        return self.applied and not self.refused_objects

    @property
    def drifted_objects(self) -> int:
        """Objects of this cycle's diff that someone else changed (``drifted_objects``):
        held as they run, this cycle writes nothing for them, and the cluster is not as
        desired."""
        return 0 if self.diff is None else len(drifted_objects(self.diff))

    @property
    def kept_objects(self) -> int:
        """Objects kept as they run though the desired state has them go (``keep``: a
        leftover, what a move left behind or a group being deleted, until its
        replacement serves; a Deployment being deleted is never written): not yet as
        desired, though this cycle writes nothing for them."""
        if self.diff is None:
            return 0
        return sum(1 for o in self.diff.objects if o.action == "keep")


def drifted_objects(diff: ClusterDiff) -> dict[str, str]:
    """The objects of ``diff`` that someone else changed (the observation's drift of
    one of them), by key, with what changed: what ``status`` holds a service for as
    drift, and what keeps a cycle from saying the cluster matches the desired state."""
    drifted = {d.name: d.detail for d in diff.drift if d.kind in OBJECT_DRIFT_KINDS}
    return {o.key: drifted[o.key] for o in diff.objects if o.key in drifted}


def refused_scale_changes(diff: ClusterDiff) -> dict[str, str]:
    """Services with a scale change the API server refuses (a ``conflict``: someone
    else owns a field we would write, or a delete would overwrite theirs), with why.
    Carrying out the rest of such a service's changes could break its groups' shape,
    so the loop holds the whole service."""
    refused: dict[str, str] = {}
    for obj in diff.objects:
        if obj.action == "conflict" and obj.replicas_before != obj.replicas_after:
            refused.setdefault(
                obj.service,
                f"Deployment {obj.key} refused the scale change {obj.replicas_before} -> "
                f"{obj.replicas_after}: {'; '.join(obj.notes[-1:]) or 'conflict'}",
            )
    return refused


def scaled_services(diff: ClusterDiff) -> set[str]:
    """Services at least one of whose Deployments changed size."""
    return {
        o.service
        for o in diff.objects
        if o.action not in ("conflict", "error")
        and o.changes_something
        and o.replicas_before != o.replicas_after
    }


@dataclass(frozen=True)
class _Seen:
    """What a cycle read before deciding: the inputs of every plan it makes."""

    state: DesiredState
    cluster: str
    observation: Observation
    metrics: Mapping[str, ServiceMetrics]
    previous: Mapping[str, PolicyHistory]  # the windows as they were before this cycle
    now_s: float


@dataclass(kw_only=True, eq=False)
class ClusterCycle:
    """Runs one cluster's cycle (``run``); owns the backend of each cluster, built on
    first use and kept (a watch cache lives in it)."""

    backend_for: Callable[[ClusterSpec], ClusterBackend]
    metrics_for: Callable[[ClusterSpec], MetricsSource]
    autoscaler: Autoscaler
    placer: Placer
    metrics: LoopMetrics
    windows: PolicyWindows
    clock: Callable[[], float]
    dry_run: bool
    placement_options: PlacementOptions | None
    prune_removed_services: bool
    # Why this cycle must not apply after all, asked right before applying (None: it
    # may): the leadership read at the cycle's start may be minutes old by then.
    apply_refused: Callable[[], str | None] = lambda: None
    # The same asked of the API server, once, after ``apply_refused`` let the cycle
    # apply (one read of the Lease; per write, the local check alone).
    lease_refused: Callable[[], str | None] = lambda: None
    drift: DriftLog = field(init=False)
    backends: dict[str, ClusterBackend] = field(init=False, default_factory=dict)
    # The kubeconfig context each backend was built for (the one spec field it connects
    # by): a cluster file naming another context gets a new backend.
    _contexts: dict[str, str | None] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.drift = DriftLog(self.metrics)

    def run(
        self, state: DesiredState, spec: ClusterSpec, leader: bool, outcome: ClusterOutcome
    ) -> None:
        """Reconcile ``spec`` once, filling in ``outcome``; only the acting leader
        (``leader`` and not a dry run) applies."""
        name = spec.name
        policies = state.policies_for(name)
        backend = self._backend(state, spec)
        observation = backend.observe(spec, policies)
        outcome.observation = observation
        self.windows.restore(name, acting=leader and not self.dry_run)
        now_s = self.clock()
        metrics = self._read_metrics(spec, policies, now_s, outcome)
        previous = self.windows.histories.get(name, {})
        seen = _Seen(state, name, observation, metrics, previous, now_s)
        plan, histories, preview = self._decide(seen, backend, policies)
        self.windows.histories[name] = histories
        outcome.plan = plan
        record_plan(self.metrics, name, plan)
        refused = None
        if leader and not self.dry_run:
            refused = self.apply_refused() or self.lease_refused()
        if refused is not None:
            leader = False
            self.windows.stood_down(name)
            log.warning(
                f"cluster {name}: not applied: {refused}",
                extra={"event": "apply_withheld", "cluster": name},
            )
        if leader and not self.dry_run:
            self._apply(seen, backend, plan, outcome)
        else:
            if not self.dry_run:
                outcome.outcome = "standby"
            self._report(backend, plan, preview, outcome)
        self.drift.record(
            name, outcome.diff.drift if outcome.diff is not None else observation.drift
        )
        record_cycle(self.metrics, name, plan, outcome, leader=leader, dry_run=self.dry_run)

    def forget(self, clusters: Collection[str], busy: Callable[[str], bool]) -> None:
        """Close and drop the backends of the clusters not in ``clusters`` (removed from
        the desired state: their watch connections stayed open for the life of the
        process), but for one whose cycle is still in flight (``busy``), left to a later
        call."""
        for name in [n for n in self.backends if n not in clusters and not busy(n)]:
            self._close(self.backends.pop(name))
            self._contexts.pop(name, None)

    @staticmethod
    def _close(backend: ClusterBackend) -> None:
        close = getattr(backend, "close", None)
        if callable(close):
            close()

    def _backend(self, state: DesiredState, spec: ClusterSpec) -> ClusterBackend:
        backend = self.backends.get(spec.name)
        if backend is not None and self._contexts.get(spec.name) != spec.kube_context:
            # The cluster file now names another kubeconfig context: the backend built for
            # the old one would go on writing to the cluster Git moved away from (a
            # running `run` scaled the old control plane while `plan` targeted the new).
            log.warning(
                f"cluster {spec.name}: kube_context changed "
                f"({visible(str(self._contexts.get(spec.name)))} -> "
                f"{visible(str(spec.kube_context))}): connecting anew",
                extra={"event": "kube_context_changed", "cluster": spec.name},
            )
            self._close(backend)
            backend = None
        if backend is None:
            backend = self.backends[spec.name] = self.backend_for(spec)
            self._contexts[spec.name] = spec.kube_context
        if hasattr(backend, "state"):
            backend.state = state  # it renders the objects it writes from this revision
        return backend

    def _read_metrics(
        self,
        spec: ClusterSpec,
        policies: Sequence[ServicePolicy],
        now_s: float,
        outcome: ClusterOutcome,
    ) -> Mapping[str, ServiceMetrics]:
        name = spec.name
        try:
            metrics: Mapping[str, ServiceMetrics] = self.metrics_for(spec).fetch(policies, now_s)
        except MetricsUnavailable as exc:
            # Hold every service (missing metrics = hold); still reconcile the rest.
            log.warning(
                f"cluster {name}: metrics unavailable, holding: {exc}",
                extra={"event": "metrics_unavailable", "cluster": name},
            )
            self.metrics.errors.labels(name, "MetricsUnavailable").inc()
            self.metrics.metrics_available.labels(name).set(0)
            outcome.metrics_error = f"MetricsUnavailable: {exc}"
            return {}
        self.metrics.metrics_available.labels(name).set(1)
        return metrics

    def _plan(self, seen: _Seen, held: Mapping[str, str]) -> tuple[Plan, dict[str, PolicyHistory]]:
        return plan_cluster(
            seen.state,
            seen.cluster,
            seen.observation,
            seen.metrics,
            seen.previous,
            seen.now_s,
            self.autoscaler,
            self.placer,
            placement_options=self.placement_options,
            prune_removed_services=self.prune_removed_services,
            held=held,
        )

    def _decide(
        self, seen: _Seen, backend: ClusterBackend, policies: Sequence[ServicePolicy]
    ) -> tuple[Plan, dict[str, PolicyHistory], ClusterDiff | None]:
        """The plan, its histories and, with a backend that can, its dry run."""
        plan, histories = self._plan(seen, {})
        if hasattr(backend, "slo"):
            by_name = {p.name: p for p in policies}
            statuses: dict[str, SloStatus] = {
                svc: slo_status(by_name[svc], seen.metrics.get(svc), seen.now_s) for svc in by_name
            }
            backend.slo = statuses
        preview: ClusterDiff | None = None
        if hasattr(backend, "diff_cluster"):
            # The dry run first: a scale change the API server refuses holds its
            # service, and apply_cluster carries out this very dry run.
            preview = backend.diff_cluster(plan)
            held = refused_scale_changes(preview)
            if held:
                plan, histories = self._plan(seen, held)
                preview = backend.diff_cluster(plan)
        return plan, histories, preview

    def _apply(
        self, seen: _Seen, backend: ClusterBackend, plan: Plan, outcome: ClusterOutcome
    ) -> None:
        if plan.has_changes:
            # Write-ahead: the windows with this cycle's recommendations and cooldown
            # anchor are stored before the cluster changes. A process killed between the
            # apply and the write after it (SIGKILL, OOM, a lost node) otherwise restarts
            # on windows that never saw the scale-out it applied, and scales in at its
            # first cycle, skipping both the scale-in window and the cooldown. Killed
            # before the apply instead, it restarts on windows that saw a change that
            # never happened: held a window and a cooldown longer, never scaled in early.
            # The revision and applied plan stay as stored until the apply succeeds.
            self.windows.persist(seen.state, seen.cluster, plan, seen.now_s, applied_in_full=False)
        if hasattr(backend, "apply_cluster"):
            # Leadership is asked again before every write: the Lease may be lost while
            # the apply runs, and another replica may then be writing these objects.
            outcome.diff = backend.apply_cluster(plan, self.apply_refused)
            outcome.lines = tuple(outcome.diff.lines() + summarise_drift(outcome.diff.drift))
            self._keep_cooldown(seen, plan, outcome.diff)
        else:
            outcome.lines = tuple(backend.apply(plan))
        outcome.applied = True
        self.windows.persist(
            seen.state, seen.cluster, plan, seen.now_s, applied_in_full=outcome.applied_in_full
        )

    def _report(
        self,
        backend: ClusterBackend,
        plan: Plan,
        preview: ClusterDiff | None,
        outcome: ClusterOutcome,
    ) -> None:
        """What applying would do (a standby or a dry run)."""
        if preview is not None:
            outcome.diff = preview
            outcome.lines = tuple(outcome.diff.lines() + summarise_drift(outcome.diff.drift))
        else:
            outcome.lines = tuple(backend.diff(plan))

    def _keep_cooldown(self, seen: _Seen, plan: Plan, applied: ClusterDiff) -> None:
        """A service whose scale change was refused while applying (and none of whose
        Deployments changed size) did not change: its cooldown stays as it was."""
        histories = self.windows.histories.get(seen.cluster, {})
        scaled = scaled_services(applied)
        for service in refused_scale_changes(applied):
            if service in plan.held or service in scaled or service not in histories:
                continue
            before = seen.previous.get(service, PolicyHistory())
            histories[service] = replace(
                histories[service], last_change_at_s=before.last_change_at_s
            )

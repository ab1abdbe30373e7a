"""The reconcile loop: every N seconds, for every cluster, observe -> decide -> place
-> diff -> apply (or only report). Thin glue over ``reconciler.cycle.plan_cluster``.

Rules it keeps (DESIGN.md, "Rules of the road"):
- Desired state is loaded each cycle (a Git revision such as ``main`` is resolved
  again each time); an invalid revision is reported and the last known good one
  stays in force.
- Every cluster is reconciled through its own backend (kube context); a cluster that
  is unreachable or errors is reported and skipped, never blocking the others, and
  is retried with exponential backoff (capped at ``max_backoff_s``).
- With leader election, only the Lease holder acts (applies); a standby replica
  still observes and plans, so its metrics and health stay meaningful. An election
  that reaches no valid decision for a bounded time (``LeaseElector.health_problem``)
  fails ``/healthz``, so Kubernetes restarts the stuck replica; its failed rounds are
  counted in ``heteroscale_lease_errors_total``.
- Policy histories (stabilisation windows) live in memory between cycles and, with a
  ``state_store`` (``reconciler.apply.statestore``), in the cluster: read before a
  cluster's first cycle and again when this replica becomes the leader (merged with
  what it planned as a standby), written by the leader after every acting cycle with
  the last known good revision and the applied plan's identity. A stored object that
  cannot be read is reported (log, ``heteroscale_errors_total{kind="StateUnreadable"}``,
  ``state_problems``) and ignored: the windows start fresh.
- A metrics source that cannot be read (``MetricsUnavailable``: Prometheus down)
  holds every service of the cluster at its size; the cycle goes on (drift, desired
  state), the outcome carries the cause (``metrics_error``), it is counted in
  ``heteroscale_errors_total{kind="MetricsUnavailable"}`` and shown as
  ``heteroscale_metrics_available{cluster} 0``; ``/healthz`` stays up (a restart
  would not bring Prometheus back). When it returns, windows only partly covered by
  samples read as missing (``reconciler.observe.prometheus``, window coverage), so
  the loop keeps holding until a whole window is there, never scales in on them.
- Drift (``reconciler.observe.kubernetes``, "Replica drift") is logged item by item
  when first seen (event ``drift``: object, field, live and desired value; ``drift
  resolved`` when it goes), counted in ``heteroscale_drift_total{cluster,kind}`` and
  shown as ``heteroscale_drift_items{cluster,kind}`` while it lasts, and listed in
  every report. The cycle's dry run comes first (``apply`` then carries out that very
  dry run): when the API server refuses a scale change of a service (someone else
  owns a field we would write), the cycle is planned again with that service held
  (``plan_cluster(held=...)``): none of its groups changes size, so the change is not
  spread over its other groups, it is not counted as a change and the cooldown is not
  re-armed; the report and ``status`` say why. A refusal that appears only while
  applying (a race) also leaves the cooldown as it was.

Its own Prometheus metrics (``LoopMetrics``) and a health endpoint are served by
``serve_http``; logs are structured (``configure_logging(json=True)`` for JSON).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, runtime_checkable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from reconciler.apply.report import ClusterDiff, summarise_drift
from reconciler.apply.softscale import SloStatus, slo_status
from reconciler.cycle import plan_cluster
from reconciler.desired.loader import DesiredState
from reconciler.desired.models import ClusterSpec
from reconciler.durable import (
    DurableState,
    StateFormatError,
    StateTooLarge,
    merge_history,
    next_applied_plan,
    plan_identity,
    revision_of,
)
from reconciler.errors import ConfigError, HeteroscaleError, MetricsUnavailable
from reconciler.observe.base import ClusterBackend, Drift, MetricsSource, Observation
from reconciler.placement.base import PlacementOptions, Placer
from reconciler.plan import Plan
from reconciler.policy.base import Autoscaler, PolicyHistory
from reconciler.state import ServiceMetrics

log = logging.getLogger("heteroscale.loop")


# --------------------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra``."""

    _RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
        "message",
        "asctime",
    }

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._RESERVED:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(*, json_format: bool = False, level: int = logging.INFO) -> logging.Handler:
    """Log the ``heteroscale`` loggers to stderr (JSON lines or text); returns the
    handler so a caller can remove it again."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if json_format
        else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    root = logging.getLogger("heteroscale")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return handler


def reset_logging(handler: logging.Handler) -> None:
    root = logging.getLogger("heteroscale")
    if handler in root.handlers:
        root.removeHandler(handler)
    root.propagate = True
    root.setLevel(logging.NOTSET)


# --------------------------------------------------------------------------- metrics


class LoopMetrics:
    """The loop's own Prometheus metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.cycle_duration = Histogram(
            "heteroscale_cycle_duration_seconds",
            "Wall time of one cluster's reconcile cycle",
            ["cluster"],
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.cycles = Counter(
            "heteroscale_cycles_total",
            "Cluster cycles by outcome (ok, error, skipped, standby)",
            ["cluster", "outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "heteroscale_decisions_total",
            "Autoscaling decisions by reason",
            ["service", "reason"],
            registry=r,
        )
        self.target_instances = Gauge(
            "heteroscale_target_instances",
            "Instances the policy asks for",
            ["service", "role"],
            registry=r,
        )
        self.placement_solve = Histogram(
            "heteroscale_placement_solve_seconds",
            "Placement solver wall time",
            ["cluster", "solver"],
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
        )
        self.drift = Gauge(
            "heteroscale_drift_items",
            "Drift items seen in the last cycle",
            ["cluster", "kind"],
            registry=r,
        )
        self.drift_total = Counter(
            "heteroscale_drift_total",
            "Drift items newly seen (an object field whose live value is not the desired "
            "one, a node that disagrees with the cluster file), by kind",
            ["cluster", "kind"],
            registry=r,
        )
        self.held = Gauge(
            "heteroscale_services_held",
            "Services held in the last cycle because a scale change was refused (drift)",
            ["cluster"],
            registry=r,
        )
        self.errors = Counter(
            "heteroscale_errors_total",
            "Errors by cluster and kind",
            ["cluster", "kind"],
            registry=r,
        )
        self.plan_changes = Gauge(
            "heteroscale_plan_changes", "Object changes in the last plan", ["cluster"], registry=r
        )
        self.leader = Gauge(
            "heteroscale_is_leader", "1 while this replica holds the Lease", registry=r
        )
        self.desired_valid = Gauge(
            "heteroscale_desired_state_valid",
            "1 when the latest desired state loaded cleanly",
            registry=r,
        )
        self.last_cycle = Gauge(
            "heteroscale_last_cycle_timestamp_seconds", "When the last full cycle ended", registry=r
        )
        self.desired_from_store = Gauge(
            "heteroscale_desired_state_from_store",
            "1 while the desired state in force is the stored last known good revision "
            "(the latest was invalid when this process started)",
            registry=r,
        )
        self.metrics_available = Gauge(
            "heteroscale_metrics_available",
            "1 when the cluster's last cycle read its metrics source, 0 when the source was "
            "unavailable (MetricsUnavailable: every service of the cluster held its size)",
            ["cluster"],
            registry=r,
        )
        self.state_writes = Counter(
            "heteroscale_state_writes_total",
            "Writes of the durable state object by outcome (written, skipped, failed)",
            ["cluster", "outcome"],
            registry=r,
        )


@runtime_checkable
class LeaderElection(Protocol):
    """What the loop reads from a leader election (``reconciler.apply.lease.LeaseElector``)."""

    def is_leader(self) -> bool: ...

    def health_problem(self) -> str | None: ...

    def error_counts(self) -> dict[str, int]: ...

    def decision_age_s(self) -> float: ...


class _LeaseCollector(Collector):
    """The election's own counters, read at scrape time: the elector runs (and fails)
    before the loop exists, so nothing is lost by pulling instead of pushing."""

    def __init__(self, election: LeaderElection) -> None:
        self.election = election

    def collect(self) -> Any:
        errors = CounterMetricFamily(
            "heteroscale_lease_errors",
            "Failed leader-election rounds by error kind (each retried with backoff)",
            labels=["kind"],
        )
        for kind, count in sorted(self.election.error_counts().items()):
            errors.add_metric([kind], count)
        yield errors
        yield GaugeMetricFamily(
            "heteroscale_lease_decision_age_seconds",
            "Seconds since the leader election last reached a valid decision",
            value=self.election.decision_age_s(),
        )
        yield GaugeMetricFamily(
            "heteroscale_lease_healthy",
            "1 while the leader election reaches decisions within its bound",
            value=0.0 if self.election.health_problem() else 1.0,
        )


# ------------------------------------------------------------------------ drift

# Kinds always exported (0 when absent), so an alert on them has a series to watch.
DRIFT_KINDS = (
    "node_missing",
    "node_label",
    "node_capacity",
    "node_unexpected",
    "object_modified",
    "replicas_changed",
)


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


# ---------------------------------------------------------------------- the loop


class DesiredStateLoader(Protocol):
    def __call__(self) -> DesiredState: ...


class StateStore(Protocol):
    """Where the durable state lives (``reconciler.apply.statestore.ConfigMapStateStore``)."""

    def load(self, cluster: str) -> DurableState | None: ...

    def save(self, state: DurableState) -> bool: ...

    def describe(self, cluster: str) -> str: ...


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


@dataclass
class CycleResult:
    clusters: list[ClusterOutcome] = field(default_factory=list)
    desired_error: str | None = None  # the latest revision was invalid (last good used)
    source_label: str = ""

    @property
    def has_changes(self) -> bool:
        return any(c.has_changes for c in self.clusters)

    @property
    def has_errors(self) -> bool:
        return any(c.outcome == "error" for c in self.clusters)


@dataclass
class _Backoff:
    failures: int = 0
    next_attempt_s: float = 0.0


class ReconcileLoop:
    """Reconciles every cluster of the desired state, once per ``run_cycle``."""

    def __init__(
        self,
        *,
        load_desired: DesiredStateLoader,
        backend_for: Callable[[ClusterSpec], ClusterBackend],
        metrics_for: Callable[[ClusterSpec], MetricsSource],
        autoscaler: Autoscaler,
        placer: Placer,
        dry_run: bool = False,
        clock: Callable[[], float] = time.time,
        is_leader: Callable[[], bool] = lambda: True,
        metrics: LoopMetrics | None = None,
        placement_options: PlacementOptions | None = None,
        interval_s: float = 30.0,
        max_backoff_s: float = 300.0,
        only_clusters: tuple[str, ...] = (),
        prune_removed_services: bool = False,
        leader_election: LeaderElection | None = None,
        state_store: StateStore | None = None,
        identity: str = "",
    ):
        """``leader_election`` feeds ``/healthz`` and the lease metrics; when it is not
        given and ``is_leader`` is a bound method of an election (``run`` passes
        ``elector.is_leader``), that election is used."""
        self.load_desired = load_desired
        self.backend_for = backend_for
        self.metrics_for = metrics_for
        self.autoscaler = autoscaler
        self.placer = placer
        self.dry_run = dry_run
        self.clock = clock
        self.is_leader = is_leader
        self.metrics = metrics or LoopMetrics()
        self.placement_options = placement_options
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.only_clusters = only_clusters
        self.prune_removed_services = prune_removed_services
        self.last_good: DesiredState | None = None
        self.histories: dict[str, dict[str, PolicyHistory]] = {}
        self.backends: dict[str, ClusterBackend] = {}
        self._backoff: dict[str, _Backoff] = {}
        self.last_cycle_end_s: float | None = None
        self.cycles_run = 0
        self.acted_cycles = 0
        if leader_election is None:
            owner = getattr(is_leader, "__self__", None)
            if isinstance(owner, LeaderElection):
                leader_election = owner
        self.state_store = state_store
        self.identity = identity
        # Per cluster: the state read from the store, whether this replica led in its
        # last cycle there (a takeover re-reads), and why a stored object was ignored.
        self.stored: dict[str, DurableState] = {}
        self._leading: dict[str, bool] = {}
        self.state_problems: dict[str, str] = {}
        # Per cluster: the drift items of the last cycle (logged and counted when new).
        self._drift_seen: dict[str, dict[tuple[str, str, str], Drift]] = {}
        # The latest revision's error, while the last known good one is in force.
        self.desired_error: str | None = None
        self.leader_election = leader_election
        if leader_election is not None:
            self.metrics.registry.register(_LeaseCollector(leader_election))

    # ------------------------------------------------------------- desired state

    def refresh_desired(self) -> tuple[DesiredState | None, str | None]:
        """Load the desired state; on failure keep the last known good one."""
        try:
            state = self.load_desired()
        except ConfigError as exc:
            self.metrics.desired_valid.set(0)
            message = f"desired state invalid ({len(exc.issues)} problem(s)); keeping the last known good one: {exc}"
            log.error(
                message,
                extra={"event": "desired_invalid", "problems": [str(i) for i in exc.issues]},
            )
            self.desired_error = message
            return self.last_good, message
        self.metrics.desired_valid.set(1)
        self.metrics.desired_from_store.set(0)
        self.desired_error = None
        self.last_good = state
        return state, None

    # ------------------------------------------------------------------- cycles

    def run_cycle(self) -> CycleResult:
        state, desired_error = self.refresh_desired()
        result = CycleResult(desired_error=desired_error)
        if state is None:
            self.cycles_run += 1
            return result
        result.source_label = state.source_label
        leader = self.is_leader()
        self.metrics.leader.set(1 if leader else 0)
        for name in sorted(state.clusters):
            if self.only_clusters and name not in self.only_clusters:
                continue
            result.clusters.append(self._cluster_cycle(state, state.clusters[name], leader))
        self.last_cycle_end_s = self.clock()
        self.metrics.last_cycle.set(time.time())
        self.cycles_run += 1
        if leader and not self.dry_run:
            self.acted_cycles += 1
        return result

    def _cluster_cycle(
        self, state: DesiredState, spec: ClusterSpec, leader: bool
    ) -> ClusterOutcome:
        name = spec.name
        outcome = ClusterOutcome(cluster=name)
        backoff = self._backoff.setdefault(name, _Backoff())
        now = self.clock()
        if now < backoff.next_attempt_s:
            outcome.outcome = "skipped"
            outcome.error = f"backing off after {backoff.failures} failure(s); next attempt in {backoff.next_attempt_s - now:.0f} s"
            self.metrics.cycles.labels(name, "skipped").inc()
            return outcome
        started = time.perf_counter()
        try:
            self._run_cluster(state, spec, leader, outcome)
        except (HeteroscaleError, OSError) as exc:
            outcome.outcome = "error"
            outcome.error = f"{type(exc).__name__}: {exc}"
            backoff.failures += 1
            delay = min(self.max_backoff_s, self.interval_s * 2 ** (backoff.failures - 1))
            backoff.next_attempt_s = now + delay if backoff.failures > 1 else 0.0
            self.metrics.errors.labels(name, type(exc).__name__).inc()
            log.error(
                f"cluster {name}: {outcome.error}",
                extra={"event": "cluster_error", "cluster": name, "error_kind": type(exc).__name__},
            )
        else:
            backoff.failures = 0
            backoff.next_attempt_s = 0.0
        outcome.duration_s = time.perf_counter() - started
        self.metrics.cycle_duration.labels(name).observe(outcome.duration_s)
        self.metrics.cycles.labels(name, outcome.outcome).inc()
        return outcome

    def _run_cluster(
        self, state: DesiredState, spec: ClusterSpec, leader: bool, outcome: ClusterOutcome
    ) -> None:
        name = spec.name
        policies = state.policies_for(name)
        backend = self.backends.get(name)
        if backend is None:
            backend = self.backends[name] = self.backend_for(spec)
        if hasattr(backend, "state"):
            backend.state = state
        observation = backend.observe(spec, policies)
        outcome.observation = observation
        self._restore(name, leader)
        now = self.clock()
        try:
            metrics: Mapping[str, ServiceMetrics] = self.metrics_for(spec).fetch(policies, now)
        except MetricsUnavailable as exc:
            # Hold every service (missing metrics = hold); still reconcile the rest.
            log.warning(
                f"cluster {name}: metrics unavailable, holding: {exc}",
                extra={"event": "metrics_unavailable", "cluster": name},
            )
            self.metrics.errors.labels(name, "MetricsUnavailable").inc()
            self.metrics.metrics_available.labels(name).set(0)
            outcome.metrics_error = f"MetricsUnavailable: {exc}"
            metrics = {}
        else:
            self.metrics.metrics_available.labels(name).set(1)
        previous = self.histories.get(name, {})

        def plan_for(held: Mapping[str, str]) -> tuple[Plan, dict[str, PolicyHistory]]:
            return plan_cluster(
                state,
                name,
                observation,
                metrics,
                previous,
                now,
                self.autoscaler,
                self.placer,
                placement_options=self.placement_options,
                prune_removed_services=self.prune_removed_services,
                held=held,
            )

        plan, histories = plan_for({})
        if hasattr(backend, "slo"):
            by_name = {p.name: p for p in policies}
            statuses: dict[str, SloStatus] = {
                svc: slo_status(by_name[svc], metrics.get(svc), now) for svc in by_name
            }
            backend.slo = statuses
        preview: ClusterDiff | None = None
        if hasattr(backend, "diff_cluster"):
            # The dry run first: a scale change the API server refuses holds its
            # service (module doc), and apply_cluster carries out this very dry run.
            preview = backend.diff_cluster(plan)
            held = refused_scale_changes(preview)
            if held:
                plan, histories = plan_for(held)
                preview = backend.diff_cluster(plan)
        self.histories[name] = histories
        outcome.plan = plan
        self._record_plan(name, plan, observation)

        act = leader and not self.dry_run
        if not leader and not self.dry_run:
            outcome.outcome = "standby"
        if act:
            if hasattr(backend, "apply_cluster"):
                outcome.diff = backend.apply_cluster(plan)
                outcome.lines = tuple(outcome.diff.lines() + summarise_drift(outcome.diff.drift))
                self._keep_cooldown(name, plan, outcome.diff, previous)
            else:
                outcome.lines = tuple(backend.apply(plan))
            outcome.applied = True
            self._persist(state, name, plan, now)
        elif preview is not None:
            outcome.diff = preview
            outcome.lines = tuple(outcome.diff.lines() + summarise_drift(outcome.diff.drift))
        else:
            outcome.lines = tuple(backend.diff(plan))
        self._record_drift(
            name, outcome.diff.drift if outcome.diff is not None else observation.drift
        )
        changes = len(outcome.diff.changed) if outcome.diff is not None else len(plan.changes)
        self.metrics.plan_changes.labels(name).set(changes)
        log.info(
            f"cluster {name}: {len(plan.changes)} group change(s), {changes} object change(s)"
            + (
                " applied"
                if outcome.applied
                else " (dry run)"
                if self.dry_run
                else " (standby)"
                if not leader
                else ""
            ),
            extra={
                "event": "cycle",
                "cluster": name,
                "group_changes": [str(c) for c in plan.changes],
                "applied": outcome.applied,
                "leader": leader,
            },
        )

    # -------------------------------------------------------------------- drift

    def _record_drift(self, cluster: str, drift: tuple[Drift, ...]) -> None:
        """Log each drift item when first seen (and when it goes), count it, and show
        how many of each kind there are now."""
        seen = self._drift_seen.get(cluster, {})
        now = {(d.kind, d.name, d.detail): d for d in drift}
        for key, item in now.items():
            if key in seen:
                continue
            self.metrics.drift_total.labels(cluster, item.kind).inc()
            log.warning(
                f"cluster {cluster}: drift {item.kind} {item.name}: {item.detail}",
                extra={
                    "event": "drift",
                    "cluster": cluster,
                    "kind": item.kind,
                    "object": item.name,
                    "field": getattr(item, "path", ""),
                    "live": getattr(item, "live", None),
                    "desired": getattr(item, "desired", None),
                },
            )
        for key, item in seen.items():
            if key not in now:
                log.info(
                    f"cluster {cluster}: drift resolved: {item.kind} {item.name}",
                    extra={
                        "event": "drift_resolved",
                        "cluster": cluster,
                        "kind": item.kind,
                        "object": item.name,
                    },
                )
        self._drift_seen[cluster] = now
        kinds: dict[str, int] = {kind: 0 for kind in DRIFT_KINDS}
        kinds.update({kind: 0 for kind, _, _ in seen})
        for kind, _, _ in now:
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, count in kinds.items():
            self.metrics.drift.labels(cluster, kind).set(count)

    def _keep_cooldown(
        self,
        cluster: str,
        plan: Plan,
        applied: ClusterDiff,
        previous: Mapping[str, PolicyHistory],
    ) -> None:
        """A service whose scale change was refused while applying (and none of whose
        Deployments changed size) did not change: its cooldown stays as it was."""
        histories = self.histories.get(cluster, {})
        scaled = scaled_services(applied)
        for service in refused_scale_changes(applied):
            if service in plan.held or service in scaled or service not in histories:
                continue
            before = previous.get(service, PolicyHistory())
            histories[service] = replace(
                histories[service], last_change_at_s=before.last_change_at_s
            )

    # ------------------------------------------------------------ durable state

    def _restore(self, cluster: str, leader: bool) -> None:
        """Read the stored state before the first cycle and on becoming the leader.
        API errors propagate (the cluster holds and retries with backoff: acting
        without the windows could scale in too early)."""
        acting = leader and not self.dry_run
        first = cluster not in self._leading
        takeover = acting and not self._leading.get(cluster, False)
        if self.state_store is None or not (first or takeover):
            self._leading[cluster] = acting
            return
        where = self.state_store.describe(cluster)
        try:
            stored = self.state_store.load(cluster)
        except StateFormatError as exc:
            problem = f"{where} ignored, starting fresh: {exc}"
            self.state_problems[cluster] = problem
            self.metrics.errors.labels(cluster, "StateUnreadable").inc()
            log.error(problem, extra={"event": "state_unreadable", "cluster": cluster})
            self._leading[cluster] = acting
            return
        self._leading[cluster] = acting  # only once read: a failed read is retried
        if stored is None:
            return
        self.stored[cluster] = stored
        local = self.histories.get(cluster, {})
        self.histories[cluster] = {
            svc: merge_history(h, local[svc]) if svc in local else h
            for svc, h in stored.histories.items()
        } | {svc: h for svc, h in local.items() if svc not in stored.histories}
        log.info(
            f"cluster {cluster}: resumed {len(stored.histories)} service histories from "
            f"{where} (written by {stored.writer or 'unknown'}"
            + (
                f", revision {stored.revision.label or stored.revision.id}"
                if stored.revision
                else ""
            )
            + ")",
            extra={"event": "state_restored", "cluster": cluster, "takeover": not first},
        )

    def _persist(self, state: DesiredState, cluster: str, plan: Plan, now: float) -> None:
        """Write what a successor needs; a failure is reported, never fails the cycle
        (the cluster already got its changes; the next cycle writes again)."""
        if self.state_store is None:
            return
        revision = revision_of(state)
        previous = self.stored.get(cluster)
        last_plan = next_applied_plan(
            previous.last_plan if previous is not None else None,
            plan_identity(plan),
            plan.has_changes,
            revision.id,
            now,
        )
        record = DurableState(
            cluster=cluster,
            saved_at_s=now,
            writer=self.identity,
            revision=revision,
            histories=dict(self.histories.get(cluster, {})),
            last_plan=last_plan,
        )
        try:
            written = self.state_store.save(record)
        except (HeteroscaleError, OSError, StateTooLarge) as exc:
            self.metrics.state_writes.labels(cluster, "failed").inc()
            log.error(
                f"cluster {cluster}: state not saved to {self.state_store.describe(cluster)}: "
                f"{type(exc).__name__}: {exc}",
                extra={"event": "state_write_failed", "cluster": cluster},
            )
            return
        self.metrics.state_writes.labels(cluster, "written" if written else "skipped").inc()
        if written:
            self.stored[cluster] = record
            self.state_problems.pop(cluster, None)

    def _record_plan(self, cluster: str, plan: Plan, observation: Observation) -> None:
        for service, decision in plan.decisions.items():
            self.metrics.decisions.labels(service, decision.reason).inc()
            self.metrics.target_instances.labels(service, "prefill").set(decision.prefill)
            self.metrics.target_instances.labels(service, "decode").set(decision.decode)
            log.info(
                f"{service}: {decision.message}",
                extra={
                    "event": "decision",
                    "cluster": cluster,
                    "service": service,
                    "reason": decision.reason,
                    "prefill": decision.prefill,
                    "decode": decision.decode,
                },
            )
        stats = plan.placement.stats
        if stats is not None:
            self.metrics.placement_solve.labels(cluster, stats.solver).observe(stats.wall_s)
        self.metrics.held.labels(cluster).set(len(plan.held))
        for service, why in plan.held.items():
            log.warning(
                f"cluster {cluster}: {service} held: {why}",
                extra={"event": "service_held", "cluster": cluster, "service": service},
            )

    # ---------------------------------------------------------------- forever

    def run_forever(
        self, stop: threading.Event, *, on_cycle: Callable[[CycleResult], None] | None = None
    ) -> None:
        """Cycle every ``interval_s`` (measured start to start) until ``stop`` is set."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                result = self.run_cycle()
            except Exception:  # the loop must outlive any bug in one cycle
                log.exception("cycle failed", extra={"event": "cycle_crash"})
            else:
                if on_cycle is not None:
                    on_cycle(result)
            stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def health_problems(self, now_s: float | None = None) -> list[str]:
        """Why this replica should be restarted: its cycles stalled, or its leader
        election reaches no decision (empty when healthy)."""
        problems = []
        if self.last_cycle_end_s is not None:
            now = self.clock() if now_s is None else now_s
            if now - self.last_cycle_end_s > 3 * self.interval_s + 30:
                problems.append(f"stalled: no cycle ended for {now - self.last_cycle_end_s:.0f} s")
        if self.leader_election is not None:
            lease_problem = self.leader_election.health_problem()
            if lease_problem is not None:
                problems.append(lease_problem)
        return problems

    def healthy(self, now_s: float | None = None) -> bool:
        """Alive: a cycle ended within three intervals (or none was due yet), and the
        leader election (if any) reached a decision within its bound."""
        return not self.health_problems(now_s)


# ----------------------------------------------------------------------- serving


def serve_http(loop: ReconcileLoop, host: str, port: int) -> ThreadingHTTPServer:
    """``/metrics`` (Prometheus text), ``/healthz`` (alive) and ``/readyz`` (a valid
    desired state is loaded) in a daemon thread. Port 0 picks a free port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, status, kind = (
                    generate_latest(loop.metrics.registry),
                    200,
                    CONTENT_TYPE_LATEST,
                )
            elif self.path.startswith("/healthz"):
                problems = loop.health_problems()
                body, status, kind = (
                    ("\n".join(problems) + "\n").encode() if problems else b"ok\n",
                    (503 if problems else 200),
                    "text/plain",
                )
            elif self.path.startswith("/readyz"):
                ok = loop.last_good is not None
                body, status, kind = (
                    (b"ok\n" if ok else b"no valid desired state yet\n"),
                    (200 if ok else 503),
                    "text/plain",
                )
            else:
                body, status, kind = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="heteroscale-http", daemon=True)
    thread.start()
    return server

"""When and whether the loop acts: the desired state each cycle (the last known good
one kept while the latest is invalid), leadership, each cluster in turn with its own
exponential backoff, the interval of ``run_forever``, and health.

One cluster's work is ``ClusterCycle``'s; what the loop reports is ``reporting``'s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from reconciler.desired.loader import DesiredState, reuse_unchanged
from reconciler.desired.models import ClusterSpec
from reconciler.durable import DurableState
from reconciler.errors import ConfigError, HeteroscaleError
from reconciler.loop.cluster_cycle import ClusterCycle, ClusterOutcome
from reconciler.loop.protocols import DesiredStateLoader, LeaderElection, StateStore
from reconciler.loop.reporting import LeaseCollector, LoopMetrics, log, record_slos
from reconciler.loop.windows import PolicyWindows
from reconciler.observe.base import ClusterBackend, MetricsSource
from reconciler.placement.base import PlacementOptions, Placer
from reconciler.policy.base import Autoscaler, PolicyHistory


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


def backoff_delay(interval_s: float, max_backoff_s: float, failures: int) -> float:
    """Seconds a cluster waits after its ``failures``-th failure in a row: the first
    retries next cycle; then the wait doubles, capped at ``max_backoff_s``. The
    exponent is capped too: a cluster down for days fails thousands of times, and
    ``interval_s * 2**1100`` overflows a float."""
    doublings = min(max(failures - 1, 0), 62)
    return min(max_backoff_s, interval_s * 2**doublings)


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
        self.dry_run = dry_run
        self.clock = clock
        self.is_leader = is_leader
        self.metrics = metrics or LoopMetrics()
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.only_clusters = only_clusters
        self.last_good: DesiredState | None = None
        # The latest revision's error, while the last known good one is in force.
        self.desired_error: str | None = None
        self._backoff: dict[str, _Backoff] = {}
        self.last_cycle_end_s: float | None = None
        self.cycles_run = 0
        self.acted_cycles = 0
        self.windows = PolicyWindows(self.metrics, state_store, identity)
        self.cluster_cycle = ClusterCycle(
            backend_for=backend_for,
            metrics_for=metrics_for,
            autoscaler=autoscaler,
            placer=placer,
            metrics=self.metrics,
            windows=self.windows,
            clock=clock,
            dry_run=dry_run,
            placement_options=placement_options,
            prune_removed_services=prune_removed_services,
            apply_refused=self._apply_refused,
        )
        if leader_election is None:
            owner = getattr(is_leader, "__self__", None)
            if isinstance(owner, LeaderElection):
                leader_election = owner
        self.leader_election = leader_election
        if leader_election is not None:
            self.metrics.registry.register(LeaseCollector(leader_election))

    # What the cluster cycle holds, where callers (``run``, saved plans, tests) read or
    # set it on the loop.

    @property
    def histories(self) -> dict[str, dict[str, PolicyHistory]]:
        return self.windows.histories

    @property
    def backends(self) -> dict[str, ClusterBackend]:
        return self.cluster_cycle.backends

    @property
    def stored(self) -> dict[str, DurableState]:
        return self.windows.stored

    @property
    def state_problems(self) -> dict[str, str]:
        return self.windows.problems

    @property
    def state_store(self) -> StateStore | None:
        return self.windows.state_store

    @state_store.setter
    def state_store(self, store: StateStore | None) -> None:
        self.windows.state_store = store

    @property
    def identity(self) -> str:
        return self.windows.identity

    @identity.setter
    def identity(self, identity: str) -> None:
        self.windows.identity = identity

    # ------------------------------------------------------------- desired state

    def refresh_desired(self) -> tuple[DesiredState | None, str | None]:
        """Load the desired state; on failure keep the last known good one."""
        try:
            state = reuse_unchanged(self.last_good, self.load_desired())
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
        record_slos(self.metrics, state)  # of the state in force, the last good one included
        result.source_label = state.source_label
        leader = self.is_leader()
        self.metrics.leader.set(1 if leader else 0)
        for name in sorted(state.clusters):
            if self.only_clusters and name not in self.only_clusters:
                continue
            result.clusters.append(self._cluster_cycle(state, state.clusters[name]))
        self.last_cycle_end_s = self.clock()
        self.metrics.last_cycle.set(time.time())
        self.cycles_run += 1
        if leader and not self.dry_run:
            self.acted_cycles += 1
        return result

    def _apply_refused(self) -> str | None:
        """Why a cluster's cycle that started as the acting leader must not apply now."""
        if not self.is_leader():
            return "this replica no longer leads (the Lease was lost during the cycle)"
        return None

    def _cluster_cycle(self, state: DesiredState, spec: ClusterSpec) -> ClusterOutcome:
        """One cluster's cycle unless it is backing off; its errors are reported here
        and never reach the other clusters. Leadership is read as it starts, and again
        right before it applies (``ClusterCycle.apply_refused``)."""
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
            self.cluster_cycle.run(state, spec, self.is_leader(), outcome)
        except (HeteroscaleError, OSError) as exc:
            outcome.outcome = "error"
            outcome.error = f"{type(exc).__name__}: {exc}"
            backoff.failures += 1
            delay = backoff_delay(self.interval_s, self.max_backoff_s, backoff.failures)
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

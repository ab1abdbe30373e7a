"""When and whether the loop acts: the desired state each cycle (the last known good
one kept while the latest is invalid), leadership, each cluster with its own
exponential backoff, the interval of ``run_forever``, and health.

Clusters one after another, or each on its own thread. With ``cluster_workers`` 0
(the one-shot commands, the simulated fleet, which is one object for every cluster)
each cluster's cycle runs in turn in the caller's thread, as before. With
``cluster_workers`` N >= 1 (``run``) each cluster's cycle runs on a thread of its own,
at most N at once (``running.ClusterRuns``), and ``run_cycle`` waits for them until
each ended or its deadline (``cluster_deadline_s``, by default the interval and at
least ``MIN_DEFAULT_CLUSTER_DEADLINE_S``) passed. A cluster whose cycle is still
running then is reported for that loop cycle (outcome ``error``, "still running after
N s", ``heteroscale_errors_total{kind="CycleOverdue"}``, event ``cycle_overdue``,
and ``heteroscale_cycle_running_seconds`` while it runs), and in every later loop
cycle it is still running in, without being started again: never two cycles writing
to one cluster. Its thread is not stopped (a thread cannot be, and an apply cut
midway is worse than one finished late): when it ends, its outcome counts as any
cycle's does (``heteroscale_cycles_total`` by outcome, its whole duration in the
duration histogram, the backoff by its success or failure), its end is logged
(``cycle_overdue_ended``) and the next ``run_cycle`` hands it on in
``CycleResult.finished_late``.

What the cycles of different clusters share is safe to share: each cluster's own
entries (its backoff here, its windows, stored state and drift in ``PolicyWindows``,
``ConfigMapStateStore`` and ``DriftLog``, its backend) are touched only by its own
cycle, one at a time, and by the schedule only while it has none in flight; the
metrics registry, the Kubernetes and Prometheus clients and the autoscalers' caches
are thread-safe, the autoscaler and placer keep no state between calls. Leadership is
read as each cluster's cycle starts and again right before it applies.

One cluster's work is ``ClusterCycle``'s; what the loop reports is ``reporting``'s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from reconciler.desired.loader import DesiredState, reuse_unchanged
from reconciler.desired.models import ClusterSpec
from reconciler.durable import DurableState
from reconciler.errors import ConfigError, HeteroscaleError, shown_issues
from reconciler.loop.cluster_cycle import ClusterCycle, ClusterOutcome
from reconciler.loop.protocols import DesiredStateLoader, LeaderElection, StateStore
from reconciler.loop.reporting import (
    LeaseCollector,
    LoopMetrics,
    RunningCollector,
    forget_removed,
    log,
    record_slos,
)
from reconciler.loop.running import ClusterRuns, RunningCycle
from reconciler.loop.windows import PolicyWindows
from reconciler.observe.base import ClusterBackend, MetricsSource
from reconciler.placement.base import PlacementOptions, Placer
from reconciler.policy.base import Autoscaler, PolicyHistory

# A cluster's cycle may take this long by default, or the interval when longer: a
# healthy cycle's placement alone may take its 2 s budget (PlacementOptions.time_limit_s)
# and up to three times that under the CPU guard, and a few list calls of a large
# cluster take seconds more; a shorter deadline would call healthy cycles overdue.
MIN_DEFAULT_CLUSTER_DEADLINE_S = 10.0
# How long a stopping loop waits for the cycles in flight (a third of Kubernetes'
# default 30 s termination grace period, as ``run`` gives the memory flush another).
STOP_WAIT_S = 10.0


def default_cluster_deadline(interval_s: float) -> float:
    """A cluster's cycle should end before the next is due: the interval, at least
    ``MIN_DEFAULT_CLUSTER_DEADLINE_S``."""
    return max(interval_s, MIN_DEFAULT_CLUSTER_DEADLINE_S)


def windows_never_covered(state: DesiredState, interval_s: float) -> list[str]:
    """The services whose scale-in window the loop's decisions never cover, each as
    ``name (N s)``: those whose window is no longer than half the interval. A window
    is covered by a decision made at or before its start and no more than a window
    before it (``coordinated._window_extreme``: a longer gap is an outage or a clock
    step, not a quiet spell), so decisions an interval apart cover it while the
    interval is under twice the window (a cycle a little late past twice the window
    covers nothing), and such services never scale in: the loop says so when it reads
    such a revision. A window shorter than the interval but more than half of it is
    covered by the decision before it (no warning: those services scale in)."""
    return [
        f"{name} ({policy.scaling.scale_in_window_s:g} s)"
        for name, policy in sorted(state.policies.items())
        if policy.scaling.scale_in_window_s > 0
        and interval_s >= 2 * policy.scaling.scale_in_window_s
    ]


@dataclass
class CycleResult:
    clusters: list[ClusterOutcome] = field(default_factory=list)
    desired_error: str | None = None  # the latest revision was invalid (last good used)
    source_label: str = ""
    # Cycles reported overdue by an earlier loop cycle that ended since the last one
    # (their own outcome; ``clusters`` holds this loop cycle's report of each cluster).
    finished_late: list[ClusterOutcome] = field(default_factory=list)

    @property
    def has_changes(self) -> bool:
        return any(c.has_changes for c in self.clusters)

    @property
    def has_errors(self) -> bool:
        """A cluster failed, or an object's write was refused."""
        return any(c.outcome == "error" or c.refused_objects for c in self.clusters)


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
        cluster_workers: int = 0,
        cluster_deadline_s: float | None = None,
        stop_wait_s: float = STOP_WAIT_S,
    ):
        """``leader_election`` feeds ``/healthz`` and the lease metrics; when it is not
        given and ``is_leader`` is a bound method of an election (``run`` passes
        ``elector.is_leader``), that election is used. ``cluster_workers``: 0 runs the
        clusters in turn in the caller's thread; N runs each on its own thread, at most
        N at once, each within ``cluster_deadline_s`` (None: ``default_cluster_deadline``
        of the interval; see the module docstring)."""
        self.load_desired = load_desired
        self.dry_run = dry_run
        self.clock = clock
        self.is_leader = is_leader
        self.metrics = metrics or LoopMetrics()
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.only_clusters = only_clusters
        if cluster_workers < 0:
            raise ValueError("cluster_workers must be 0 (in turn) or more")
        self.cluster_deadline_s = (
            default_cluster_deadline(interval_s)
            if cluster_deadline_s is None
            else cluster_deadline_s
        )
        self.stop_wait_s = stop_wait_s
        self.runs = ClusterRuns(cluster_workers) if cluster_workers else None
        # ``run_forever``'s stop, once it runs: a signal sets it in the middle of a cycle.
        self._stop: threading.Event | None = None
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
            lease_refused=self._lease_refused,
        )
        if leader_election is None:
            owner = getattr(is_leader, "__self__", None)
            if isinstance(owner, LeaderElection):
                leader_election = owner
        self.leader_election = leader_election
        if leader_election is not None:
            self.metrics.registry.register(LeaseCollector(leader_election))
        if self.runs is not None:
            self.metrics.registry.register(
                RunningCollector(self.runs.ages, lambda: list(self._backoff))
            )

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
            # The first problems of each file: a revision with 200,000 is not logged whole
            # every cycle.
            shown = shown_issues(exc.issues)
            listed = "\n".join(shown)
            message = (
                f"desired state invalid ({len(exc.issues)} problem(s)); keeping the last known "
                f"good one: {listed}"
            )
            log.error(message, extra={"event": "desired_invalid", "problems": shown})
            self.desired_error = message
            return self.last_good, message
        self.metrics.desired_valid.set(1)
        self.metrics.desired_from_store.set(0)
        self.desired_error = None
        if state is not self.last_good:
            short = windows_never_covered(state, self.interval_s)
            if short:
                log.warning(
                    f"the loop's interval, {self.interval_s:g} s, is at least twice the "
                    f"scale-in window of {', '.join(short)}: a window is covered only by a "
                    "decision at most a window before its start, so these never scale in; "
                    "lengthen their scale_in_window_s to over half the interval or shorten "
                    "--interval",
                    extra={"event": "scale_in_window_shorter_than_interval", "services": short},
                )
        self.last_good = state
        return state, None

    # ------------------------------------------------------------------- cycles

    def run_cycle(self) -> CycleResult:
        """One loop cycle: every cluster's cycle, in turn or each on its thread (the
        module docstring). One caller at a time."""
        state, desired_error = self.refresh_desired()
        result = CycleResult(desired_error=desired_error)
        if self.runs is not None:
            result.finished_late = self.runs.take_finished_late()
        if state is None:
            self.cycles_run += 1
            return result
        record_slos(self.metrics, state)  # of the state in force, the last good one included
        forget_removed(self.metrics, state)
        for gone in set(self._backoff) - set(state.clusters):
            # A removed cluster's backoff would keep it listed (at 0) in
            # heteroscale_cycle_running_seconds; one added again starts afresh.
            del self._backoff[gone]
        runs = self.runs
        self.cluster_cycle.forget(
            state.clusters, busy=lambda name: runs is not None and runs.running(name) is not None
        )
        result.source_label = state.source_label
        leader = self.is_leader()
        self.metrics.leader.set(1 if leader else 0)
        names = [
            n for n in sorted(state.clusters) if n in self.only_clusters or not self.only_clusters
        ]
        if self.runs is None:
            for name in names:
                now = self.clock()
                result.clusters.append(
                    self._skipped(name, now)
                    or self._cluster_cycle(state, state.clusters[name], now)
                )
        else:
            result.clusters = self._cluster_cycles_at_once(self.runs, state, names)
        self.last_cycle_end_s = self.clock()
        self.metrics.last_cycle.set(time.time())
        self.cycles_run += 1
        if leader and not self.dry_run:
            self.acted_cycles += 1
        return result

    def _cluster_cycles_at_once(
        self, runs: ClusterRuns, state: DesiredState, names: list[str]
    ) -> list[ClusterOutcome]:
        """Each cluster's cycle on its own thread, waited for until it ended or its
        deadline passed; a cluster whose cycle is still running is not started again."""
        reported: dict[str, ClusterOutcome] = {}
        started: list[RunningCycle] = []
        for name in names:
            running = runs.running(name)
            if running is not None:  # overdue since an earlier loop cycle
                reported[name] = self._overdue(running)
                continue
            now = self.clock()
            skipped = self._skipped(name, now)
            if skipped is not None:
                reported[name] = skipped
                continue
            spec = state.clusters[name]
            cycle = partial(self._cluster_cycle, state, spec, now, contain_bugs=True)
            started.append(runs.start(name, self.cluster_deadline_s, cycle))
        # A stop ends the wait (the cycles then apply nothing more: ``_apply_refused``):
        # waited out, a cycle deadline (the interval by default) passed before the stop
        # was seen, and a cycle applied 12.8 s after a SIGTERM.
        runs.wait(started, until=self._stop)
        for run in started:
            outcome = runs.ended_or_overdue(run)
            reported[run.cluster] = outcome if outcome is not None else self._overdue(run)
        return [reported[name] for name in names]

    def _overdue(self, run: RunningCycle) -> ClusterOutcome:
        """This loop cycle's report of a cluster whose cycle runs past its deadline."""
        age = run.age_s()
        outcome = ClusterOutcome(
            cluster=run.cluster,
            outcome="error",
            error=(
                f"CycleOverdue: still running after {age:.1f} s (deadline "
                f"{run.deadline_s:g} s); not started again until it ends"
            ),
            duration_s=age,
        )
        self.metrics.errors.labels(run.cluster, "CycleOverdue").inc()
        log.error(
            f"cluster {run.cluster}: {outcome.error}",
            extra={
                "event": "cycle_overdue",
                "cluster": run.cluster,
                "running_s": round(age, 3),
                "deadline_s": run.deadline_s,
            },
        )
        return outcome

    def _stopping(self) -> bool:
        """Whether a stop was asked: ``run_forever``'s event (a signal sets it, maybe in
        the middle of a loop cycle), or ``stop_cycles``."""
        return (self._stop is not None and self._stop.is_set()) or (
            self.runs is not None and self.runs.stopping.is_set()
        )

    def _apply_refused(self) -> str | None:
        """Why a cluster's cycle that started as the acting leader must not apply now."""
        if self._stopping():
            return "the loop is stopping"
        if not self.is_leader():
            return "this replica no longer leads (the Lease was lost during the cycle)"
        return None

    def _lease_refused(self) -> str | None:
        """Why a cluster's cycle must not apply by the Lease the API server holds (None:
        it names this replica, or there is no election to ask)."""
        if self.leader_election is None or self.leader_election.holds_lease():
            return None
        return (
            "the Lease on the API server does not name this replica (another holds it, "
            "or it could not be read)"
        )

    def _skipped(self, name: str, now: float) -> ClusterOutcome | None:
        """The report of a cluster backing off after failures (None: its cycle is due)."""
        backoff = self._backoff.setdefault(name, _Backoff())
        # Due, or further off than any backoff waits: the wall clock stepped back (an NTP
        # correction), and the cluster was skipped for the length of the step (an hour).
        if now >= backoff.next_attempt_s or backoff.next_attempt_s - now > self.max_backoff_s:
            return None
        self.metrics.cycles.labels(name, "skipped").inc()
        return ClusterOutcome(
            cluster=name,
            outcome="skipped",
            error=f"backing off after {backoff.failures} failure(s); next attempt in {backoff.next_attempt_s - now:.0f} s",
        )

    def _cluster_cycle(
        self, state: DesiredState, spec: ClusterSpec, now: float, *, contain_bugs: bool = False
    ) -> ClusterOutcome:
        """One cluster's cycle; its errors are reported here and never reach the other
        clusters (with ``contain_bugs``, on a cycle's own thread, not even a bug's:
        logged with its traceback and counted as the cluster's error). Leadership is
        read as it starts, and again right before it applies
        (``ClusterCycle.apply_refused``). ``now``: when it was due (the backoff
        counts from it)."""
        name = spec.name
        outcome = ClusterOutcome(cluster=name)
        backoff = self._backoff.setdefault(name, _Backoff())
        started = time.perf_counter()
        try:
            self.cluster_cycle.run(state, spec, self.is_leader(), outcome)
        except Exception as exc:
            known = isinstance(exc, HeteroscaleError | OSError)
            if not (known or contain_bugs):
                raise  # in the caller's thread: run_forever logs it (cycle_crash)
            outcome.outcome = "error"
            outcome.error = f"{type(exc).__name__}: {exc}"
            backoff.failures += 1
            delay = backoff_delay(self.interval_s, self.max_backoff_s, backoff.failures)
            backoff.next_attempt_s = now + delay if backoff.failures > 1 else 0.0
            self.metrics.errors.labels(name, type(exc).__name__).inc()
            log.error(
                f"cluster {name}: {outcome.error}",
                exc_info=not known,  # a traceback for a bug
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
        """Cycle every ``interval_s`` (measured start to start) until ``stop`` is set;
        then ``stop_cycles``."""
        if self.runs is not None:
            self.runs.stopping.clear()
        self._stop = stop
        try:
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
        finally:
            self.stop_cycles()

    def stop_cycles(self, wait_s: float | None = None) -> list[str]:
        """At a stop: the cycles in flight start no apply any more (one already applying
        finishes its writes), and are waited for up to ``wait_s`` (``stop_wait_s``); the
        clusters whose cycle still runs then, logged (their threads end with the
        process). Call it before the Lease is released: a cycle past this point can
        only be reading, or finishing an apply it began while leading."""
        if self.runs is None:
            return []
        self.runs.stopping.set()
        left = self.runs.drain(self.stop_wait_s if wait_s is None else wait_s)
        for run in left:
            log.warning(
                f"cluster {run.cluster}: its cycle still runs at the stop, after "
                f"{run.age_s():.1f} s; left to end with the process",
                extra={"event": "cycle_abandoned", "cluster": run.cluster},
            )
        return [run.cluster for run in left]

    def health_problems(self, now_s: float | None = None) -> list[str]:
        """Why this replica should be restarted: its cycles stalled, or its leader
        election reaches no decision (empty when healthy)."""
        problems = []
        if self.last_cycle_end_s is not None:
            now = self.clock() if now_s is None else now_s
            # A loop cycle waits for its clusters up to their deadline (a slow cluster is
            # not a stalled loop: a restart would not make its API server faster).
            waited_s = self.cluster_deadline_s if self.runs is not None else 0.0
            if now - self.last_cycle_end_s > 3 * self.interval_s + 30 + waited_s:
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

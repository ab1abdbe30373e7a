"""Each cluster's cycle on a thread of its own, so that one slow cluster (an API server
or a Prometheus answering slowly, within every bound) holds no other cluster's cycle.

``ClusterRuns`` keeps the cycles in flight: at most one per cluster (a cluster whose
cycle is still running is never started again: two cycles would write to the same
cluster at once), each on a daemon thread named after its cluster, at most
``workers`` of them working at once (the others wait for a slot; their wait counts
towards their deadline). Daemon threads, not a ``ThreadPoolExecutor``: the
executor's threads are joined when the interpreter exits, so a cycle stuck on a slow
API server would hold a stopping replica past its termination grace period.

The schedule (``ReconcileLoop``) waits for the cycles it started until each ended or
its deadline passed; one still running then is ``overdue``: reported for that loop
cycle and every later one it is still running in, and when it ends its outcome is
kept for the next ``run_cycle`` to hand on (``take_finished_late``) and its end is
logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from reconciler.loop.cluster_cycle import ClusterOutcome
from reconciler.loop.reporting import log

# How often a wait for the cycles in flight looks whether a stop was asked.
STOP_POLL_S = 0.1


@dataclass(eq=False)
class RunningCycle:
    """One cluster's cycle handed to its thread and not yet ended (``outcome`` None)."""

    cluster: str
    started_s: float  # time.monotonic() when it was handed over
    deadline_s: float  # how long it may take from then
    done: threading.Event = field(default_factory=threading.Event)
    outcome: ClusterOutcome | None = None
    overdue: bool = False  # reported as still running past its deadline

    def age_s(self, now_s: float | None = None) -> float:
        return (time.monotonic() if now_s is None else now_s) - self.started_s

    def wait(self, until_s: float) -> bool:
        """Wait until it ended or ``until_s`` (monotonic) passed; True when it ended."""
        return self.done.wait(max(0.0, until_s - time.monotonic()))


class ClusterRuns:
    """The clusters' cycles in flight (see the module docstring). Its tables are
    changed under one lock; a cycle's work itself runs outside it."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("ClusterRuns needs at least one worker")
        self.workers = workers
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._running: dict[str, RunningCycle] = {}
        self._finished_late: list[ClusterOutcome] = []
        # Set at a stop: cycles in flight must not start applying any more.
        self.stopping = threading.Event()

    def running(self, cluster: str) -> RunningCycle | None:
        with self._lock:
            return self._running.get(cluster)

    def start(
        self, cluster: str, deadline_s: float, work: Callable[[], ClusterOutcome]
    ) -> RunningCycle:
        """Run ``work`` (one cycle of ``cluster``, which reports its own errors) on a
        thread of its own; ``cluster`` must have no cycle in flight."""
        run = RunningCycle(cluster, time.monotonic(), deadline_s)
        with self._lock:
            if cluster in self._running:
                raise RuntimeError(f"cluster {cluster}: a cycle is already running")
            self._running[cluster] = run
        thread = threading.Thread(
            target=self._work, args=(run, work), name=f"heteroscale-cycle-{cluster}", daemon=True
        )
        try:
            thread.start()
        except BaseException:  # no thread: nothing would ever end the run
            with self._lock:
                del self._running[cluster]
            raise
        return run

    def _work(self, run: RunningCycle, work: Callable[[], ClusterOutcome]) -> None:
        try:
            with self._slots:
                outcome = work()
        except BaseException as exc:  # ``work`` reports its errors; this is a last guard
            log.exception(
                f"cluster {run.cluster}: the cycle's thread failed",
                extra={"event": "cycle_crash", "cluster": run.cluster},
            )
            outcome = ClusterOutcome(
                cluster=run.cluster, outcome="error", error=f"{type(exc).__name__}: {exc}"
            )
        with self._lock:
            run.outcome = outcome
            del self._running[run.cluster]
            late = run.overdue
            if late:
                self._finished_late.append(outcome)
        if late:
            took = run.age_s()
            log.warning(
                f"cluster {run.cluster}: the overdue cycle ended after {took:.1f} s "
                f"(deadline {run.deadline_s:g} s): {outcome.outcome}"
                + (f": {outcome.error}" if outcome.error else "")
                + (" (applied)" if outcome.applied else ""),
                extra={
                    "event": "cycle_overdue_ended",
                    "cluster": run.cluster,
                    "duration_s": round(took, 3),
                    "deadline_s": run.deadline_s,
                    "outcome": outcome.outcome,
                    "applied": outcome.applied,
                },
            )
        run.done.set()  # last: whoever waits for it sees all it did, its log line too

    def wait(self, runs: Iterable[RunningCycle], until: threading.Event | None = None) -> None:
        """Until each of ``runs`` ended or its deadline passed, or ``until`` is set
        (looked at every ``STOP_POLL_S``)."""
        for run in runs:
            deadline = run.started_s + run.deadline_s
            while not run.wait(min(deadline, time.monotonic() + STOP_POLL_S)):
                if time.monotonic() >= deadline or (until is not None and until.is_set()):
                    break
            if until is not None and until.is_set():
                return

    def ended_or_overdue(self, run: RunningCycle) -> ClusterOutcome | None:
        """``run``'s outcome when it ended; else None, and it is overdue from now on
        (its outcome, when it ends, goes to ``take_finished_late``)."""
        with self._lock:
            if run.outcome is None:
                run.overdue = True
            return run.outcome

    def take_finished_late(self) -> list[ClusterOutcome]:
        """The outcomes of the overdue cycles that ended since the last call, in the
        order they ended."""
        with self._lock:
            taken, self._finished_late = self._finished_late, []
        return taken

    def ages(self) -> dict[str, float]:
        """Seconds each cycle in flight has run, by cluster."""
        now = time.monotonic()
        with self._lock:
            return {name: run.age_s(now) for name, run in self._running.items()}

    def drain(self, wait_s: float) -> list[RunningCycle]:
        """Wait up to ``wait_s`` for the cycles in flight to end; those still running."""
        until = time.monotonic() + wait_s
        with self._lock:
            runs = list(self._running.values())
        return [run for run in runs if not run.wait(until)]

"""The policy histories (stabilisation windows, cooldown anchors) of every cluster,
between cycles: kept in memory and, with a ``StateStore``, in the cluster.

The stored object is read before a cluster's first cycle and again when this replica
becomes the leader there (merged with what it planned as a standby), and written by
the leader after every acting cycle with the last known good revision and the applied
plan's identity. An object that cannot be read is reported and ignored: the windows
start fresh. A memory shard that cannot be read is reported alike (once per read) and
only its services' planners start afresh.

Clusters' cycles at once (``run``, ``reconciler.loop.running``): every table here is
keyed by cluster, and a cluster's entries are read and written only by that cluster's
cycle, of which one at most runs at a time; cycles of different clusters therefore
share no entry and need no lock (a dict's single get or set is atomic).
"""

from __future__ import annotations

from reconciler.apply.lease import shown_holder
from reconciler.desired.loader import DesiredState
from reconciler.dns1123 import MAX_SUBDOMAIN
from reconciler.durable import (
    AppliedPlan,
    DurableState,
    Revision,
    StateFormatError,
    StateTooLarge,
    merge_history,
    next_applied_plan,
    plan_identity,
    revision_of,
)
from reconciler.errors import HeteroscaleError
from reconciler.loop.protocols import StateStore
from reconciler.loop.reporting import LoopMetrics, log
from reconciler.plan import Plan
from reconciler.policy.base import PolicyHistory
from reconciler.text_safety import cut, visible


class PolicyWindows:
    """Owns ``histories`` (cluster -> service -> history) and their durable copy."""

    def __init__(
        self, metrics: LoopMetrics, state_store: StateStore | None = None, identity: str = ""
    ) -> None:
        self.metrics = metrics
        self.state_store = state_store
        self.identity = identity  # written into the stored object as its writer
        self.histories: dict[str, dict[str, PolicyHistory]] = {}
        # Per cluster: the state read from the store, whether this replica acted in its
        # last cycle there (a takeover re-reads), and why a stored object was ignored.
        self.stored: dict[str, DurableState] = {}
        self._leading: dict[str, bool] = {}
        self.problems: dict[str, str] = {}

    def restore(self, cluster: str, acting: bool) -> None:
        """Read the stored state before the first cycle and on becoming the acting
        leader. API errors propagate (the cluster holds and retries with backoff:
        acting without the windows could scale in too early)."""
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
            self.problems[cluster] = problem
            self.metrics.errors.labels(cluster, "StateUnreadable").inc()
            log.error(problem, extra={"event": "state_unreadable", "cluster": cluster})
            self._leading[cluster] = acting
            return
        self._leading[cluster] = acting  # only once read: a failed read is retried
        for problem in self.state_store.load_problems(cluster):
            self.problems[cluster] = problem
            self.metrics.errors.labels(cluster, "StateUnreadable").inc()
            log.error(problem, extra={"event": "state_memories_unreadable", "cluster": cluster})
        if stored is None:
            return
        self.stored[cluster] = stored
        self._merge(cluster, stored)
        # The writer (a replica's identity, as a Lease holder is) and the revision are
        # text anyone who may edit the object wrote: quoted at most as long as a Pod name.
        writer = visible(shown_holder(stored.writer)) or "unknown"
        revision = (
            f", revision {visible(cut(stored.revision.label or stored.revision.id, MAX_SUBDOMAIN))}"
            if stored.revision
            else ""
        )
        log.info(
            f"cluster {cluster}: resumed {len(stored.histories)} service histories from "
            f"{where} (written by {writer}{revision})",
            extra={"event": "state_restored", "cluster": cluster, "takeover": not first},
        )

    def stood_down(self, cluster: str) -> None:
        """This replica planned to act on ``cluster`` but did not (it lost the Lease
        during the cycle): the next cycle it acts in reads the stored state again."""
        self._leading[cluster] = False

    def _merge(self, cluster: str, stored: DurableState) -> None:
        """The stored windows, each merged with what this replica planned meanwhile."""
        local = self.histories.get(cluster, {})
        self.histories[cluster] = {
            svc: merge_history(h, local[svc]) if svc in local else h
            for svc, h in stored.histories.items()
        } | {svc: h for svc, h in local.items() if svc not in stored.histories}

    def persist(
        self, state: DesiredState, cluster: str, plan: Plan, now_s: float, *, applied_in_full: bool
    ) -> None:
        """Write what a successor needs; a failure is reported, never fails the cycle
        (the cluster already got its changes; the next cycle writes again). The windows
        are written whatever the cycle did; the revision and the applied plan only when
        ``applied_in_full`` (no write refused), else they stay as stored: `status` shows
        them as what the cluster runs, and a refused rollout leaves it on the old one."""
        if self.state_store is None:
            return
        previous = self.stored.get(cluster)
        revision: Revision | None
        last_plan: AppliedPlan | None
        if applied_in_full:
            revision = revision_of(state)
            last_plan = next_applied_plan(
                previous.last_plan if previous is not None else None,
                plan_identity(plan),
                plan.has_changes,
                revision.id,
                now_s,
            )
        elif previous is not None:
            revision, last_plan = previous.revision, previous.last_plan
        else:
            revision, last_plan = None, None
        record = DurableState(
            cluster=cluster,
            saved_at_s=now_s,
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
            self.problems.pop(cluster, None)

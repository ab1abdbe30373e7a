"""The reconcile loop: every N seconds, for every cluster, observe -> decide -> place
-> diff -> apply (or only report). Thin glue over ``reconciler.cycle.plan_cluster``.

Rules it keeps (DESIGN.md, "Rules of the road"):
- Desired state is loaded each cycle (a Git revision such as ``main`` is resolved
  again each time); an invalid revision is reported and the last known good one
  stays in force.
- Every cluster is reconciled through its own backend (kube context); a cluster that
  is unreachable or errors is reported and skipped, never blocking the others, and
  is retried with exponential backoff (capped at ``max_backoff_s``). A cluster that
  is slow does not block them either: with ``cluster_workers`` (``run``) each
  cluster's cycle runs on its own thread within ``cluster_deadline_s``; one past it
  is reported (``CycleOverdue``) and not started again until it ends
  (``schedule``, ``running``).
- With leader election, only the Lease holder acts (applies), read as each cluster's
  cycle starts and again right before it applies; a standby replica
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
  ``state_problems``) and ignored: the windows start fresh; a memory shard that cannot
  be read, or is absent though the state object records memories in it, is reported
  alike and loses only its services' planner memories.
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

The parts, one job each:
- ``schedule``: ``ReconcileLoop``: the desired state each cycle, leadership, each
  cluster with its own backoff and deadline, ``run_forever`` and health;
- ``running``: ``ClusterRuns``: the clusters' cycles in flight, each on its own thread;
- ``cluster_cycle``: ``ClusterCycle``: one cluster's cycle, observe -> restore ->
  decide/place/diff (``reconciler.cycle``) -> dry run -> apply or report;
- ``windows``: ``PolicyWindows``: the policy histories, in memory and stored;
- ``reporting``: logging, ``LoopMetrics``, the per-cycle records and ``serve_http``;
- ``protocols``: what the loop reads from outside (desired state, election, store).
"""

from reconciler.loop.cluster_cycle import (
    ClusterCycle,
    ClusterOutcome,
    refused_scale_changes,
    scaled_services,
)
from reconciler.loop.protocols import DesiredStateLoader, LeaderElection, StateStore
from reconciler.loop.reporting import (
    DRIFT_KINDS,
    JsonFormatter,
    LoopMetrics,
    configure_logging,
    reset_logging,
    serve_http,
)
from reconciler.loop.schedule import CycleResult, ReconcileLoop
from reconciler.loop.windows import PolicyWindows

__all__ = [
    "DRIFT_KINDS",
    "ClusterCycle",
    "ClusterOutcome",
    "CycleResult",
    "DesiredStateLoader",
    "JsonFormatter",
    "LeaderElection",
    "LoopMetrics",
    "PolicyWindows",
    "ReconcileLoop",
    "StateStore",
    "configure_logging",
    "refused_scale_changes",
    "reset_logging",
    "scaled_services",
    "serve_http",
]

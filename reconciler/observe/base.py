"""The two edges of the reconciler that read the world, as protocols.

Real adapters (Prometheus, Kubernetes) and the simulator implement the same
interfaces, so the reconcile loop runs unchanged against either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.placement.base import UngroupedInstances
from reconciler.plan import Plan
from reconciler.state import FleetState, ServiceMetrics


class MetricsSource(Protocol):
    """Current signals for many services in one batched read.

    Returns one ``ServiceMetrics`` per requested service (signals that could not be
    read are ``None`` inside it). Raises ``MetricsUnavailable`` when the backend as a
    whole cannot be read; the reconciler then holds every service.
    """

    def fetch(
        self, policies: Sequence[ServicePolicy], now_s: float
    ) -> dict[str, ServiceMetrics]: ...


@dataclass(frozen=True)
class Drift:
    """A difference between the cluster file and the live cluster, or an object
    changed by someone else."""

    kind: str  # "node_missing", "node_label", "node_capacity", "object_modified", ...
    name: str
    detail: str


# The drift kinds that say one of our objects was changed outside Git (the others are
# about Nodes: the cluster file against the live cluster).
OBJECT_DRIFT_KINDS = ("object_modified", "replicas_changed")


@dataclass(frozen=True)
class Observation:
    """What a cluster backend saw: our groups, plus any drift."""

    fleet: FleetState
    drift: tuple[Drift, ...] = field(default=())
    # Services whose live objects could not be read reliably (service -> why): the
    # cycle holds them at the size they run, never scaling on a guess.
    held: Mapping[str, str] = field(default_factory=dict)
    # Instances of leftovers (``observe.kubernetes.leftover_reason``: what a move left
    # behind, or what is being deleted), by node: not in ``fleet``, but holding GPUs
    # (``PlacementRequest.left_behind``).
    left_behind: tuple[UngroupedInstances, ...] = field(default=())
    # Drained instances by node, where placement must hold their GPUs there rather
    # than near the service's groups (``PlacementRequest.draining``): those drained
    # from leftovers.
    draining: tuple[UngroupedInstances, ...] = field(default=())
    # Services with instances that stopped being on their way to serving (service ->
    # what: Pods not ready past their Deployment's progress deadline). Still counted
    # as starting; ``status`` calls the service Degraded.
    stuck: Mapping[str, str] = field(default_factory=dict)
    # Services with Deployments being deleted (service -> which: ``deletionTimestamp``
    # set, held by a finalizer or the garbage collector). Leftovers, being replaced;
    # ``status`` calls the service Degraded until they are gone.
    deleting: Mapping[str, str] = field(default_factory=dict)


class ClusterBackend(Protocol):
    """Reads and changes one cluster.

    ``diff`` is the exact dry run of ``apply``: both take the same plan, and apply
    returns the changes it carried out in the same shape.
    """

    def observe(self, cluster: ClusterSpec, policies: Sequence[ServicePolicy]) -> Observation: ...

    def diff(self, plan: Plan) -> Sequence[str]: ...

    def apply(self, plan: Plan) -> Sequence[str]: ...

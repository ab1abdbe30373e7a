"""Placement as data: what is asked, what comes back, and why something could not be placed.

Placement never fails with a bare error: whatever cannot be placed comes back as a
``Shortfall`` naming the service, role, the constraint that bound, and how many GPUs
of which type were missing under which switch (as in Karpenter's scheduler, where
infeasibility is part of the result).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.state import DeploymentGroup, FleetState, Role, Targets


@dataclass(frozen=True)
class PlacementOptions:
    time_limit_s: float = 2.0
    seed: int = 0
    workers: int = 2
    allow_rebalance: bool = False  # move running instances (off: never)
    # Added for CP-SAT: one search thread bounded by a deterministic-time budget derived
    # from time_limit_s, so `plan` and `apply` compute the same placement (workers is
    # used only when this is off).
    deterministic: bool = True


def placement_options_for(
    cluster: ClusterSpec, options: PlacementOptions | None = None
) -> PlacementOptions:
    """The options a cluster's placement runs with: the caller's (or the defaults),
    with running instances allowed to move where the cluster's desired state says so
    (``placement.allow_rebalance``, reviewed in Git like every other setting)."""
    options = options or PlacementOptions()
    if cluster.placement.allow_rebalance and not options.allow_rebalance:
        options = replace(options, allow_rebalance=True)
    return options


@dataclass(frozen=True)
class UngroupedInstances:
    """Instances of one role of a service that run outside its deployment groups,
    holding their GPUs: draining ones (soft scale-in took them out of service
    discovery until their observation window ends, ``reconciler.apply.softscale``), or
    leftovers (``reconciler.observe.kubernetes.leftover_reason``: what a move left
    behind, or a group being deleted; kept serving until the groups replacing them
    serve)."""

    service: str
    role: Role
    node: str | None  # None: not known (placement then holds them near the service's groups)
    instances: int
    gpus_per_instance: int | None = None  # None: the policy's


@dataclass(frozen=True)
class PlacementRequest:
    """Everything placement needs for one cluster and one cycle."""

    cluster: ClusterSpec
    policies: Mapping[str, ServicePolicy]  # the services that run in this cluster
    current: FleetState  # groups as they run now
    targets: Mapping[str, Targets]  # per service, from the policy
    options: PlacementOptions = field(default_factory=PlacementOptions)
    # Draining instances by node where the caller knows it. Instances that
    # ``current.draining`` counts beyond these are held without a known node (see
    # reconciler.placement.problem, "Pending and draining instances hold capacity").
    draining: tuple[UngroupedInstances, ...] = ()
    # Instances of leftovers (what a move left behind, or a group being deleted), on
    # their nodes: no group's (the fleet leaves them out), but their GPUs are busy until
    # they are pruned or gone, so placement must not put
    # the groups replacing them there (Pods that could never be scheduled would keep
    # the leftovers forever).
    left_behind: tuple[UngroupedInstances, ...] = ()


@dataclass(frozen=True)
class Shortfall:
    """Instances that could not be placed, and why."""

    service: str
    role: Role
    instances: int
    constraint: str  # e.g. "gpu_capacity", "affinity", "gpu_type", "max_groups"
    detail: str  # e.g. "needs 16 h20 GPUs under one S2; largest free: 8 under pod-b"


@dataclass(frozen=True)
class Anchor:
    """Instances of ``role`` placed *beyond* its target to open a group for the other
    role (added for anchored groups, see ``reconciler.placement.problem``).

    When only one role of a service grows and its existing groups' domains are full,
    a new group is opened with the growing role plus ``instances`` of ``role`` although
    ``role``'s target is already met: the service then runs ``instances`` more of
    ``role`` than its target (the overshoot), all of them in group ``group_id``."""

    service: str
    role: Role  # the role that overshoots its target
    group_id: str
    instances: int


@dataclass(frozen=True)
class SolverStats:
    solver: Literal["cp-sat", "greedy"]
    status: str  # OPTIMAL, FEASIBLE, ... or "heuristic"
    wall_s: float
    objective: float | None = None
    best_bound: float | None = None
    # Optional detail (added for the placers): wall time per phase, and what happened
    # on the way (e.g. a node-packing fallback, a solver that timed out).
    phases_s: tuple[tuple[str, float], ...] = ()
    notes: tuple[str, ...] = ()
    # CP-SAT only: the layout is the greedy scheduler's, because the search found
    # nothing better (``notes`` says why; see reconciler.placement.cpsat).
    kept_greedy: bool = False

    @property
    def gap(self) -> float | None:
        """Relative optimality gap (0 = proven optimal); None when unknown."""
        if self.objective is None or self.best_bound is None:
            return None
        denom = max(abs(self.objective), 1e-9)
        return abs(self.objective - self.best_bound) / denom


@dataclass(frozen=True)
class PlacementResult:
    """The full desired layout of the cluster after this cycle (unchanged groups
    included), plus what could not be placed."""

    cluster: str
    groups: tuple[DeploymentGroup, ...]
    shortfalls: tuple[Shortfall, ...] = ()
    stats: SolverStats | None = None
    # Added for anchored groups: every instance placed beyond its role's target.
    anchors: tuple[Anchor, ...] = ()
    # The placer may have moved running instances (CP-SAT under ``allow_rebalance``):
    # a removal in this layout may be the old half of a move, which apply keeps serving
    # until what replaces it serves (``reconciler.apply.actions``).
    may_move: bool = False

    def placed(self, service: str, role: Role) -> int:
        """Every instance of the role in the layout, anchors included: with anchors,
        ``placed - overshoot + short == target`` (without, ``placed + short == target``)."""
        return sum(g.role(role).instances for g in self.groups if g.service == service)

    def overshoot(self, service: str, role: Role) -> int:
        """Instances of the role placed beyond its target (as anchors of new groups)."""
        return sum(a.instances for a in self.anchors if a.service == service and a.role == role)


class Placer(Protocol):
    """CP-SAT placement and the paper's greedy scheduler share this interface."""

    name: str

    def place(self, request: PlacementRequest) -> PlacementResult: ...

"""The plan of one cycle and its group-level diff against the observed fleet.

The diff pairs desired and live deployment groups by key ``(service, group_id)``
(as gitops-engine pairs objects): missing live = create, missing desired = delete,
both present with other counts = scale. The same ``Plan`` feeds the dry-run report
and ``apply``, so the report is exactly what apply does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from reconciler.cost import Cost, CostChange, GpuPrices, groups_cost_per_hour
from reconciler.placement.base import PlacementResult
from reconciler.policy.base import Decision
from reconciler.state import ROLES, DeploymentGroup, FleetState, Role

ChangeKind = Literal["create", "scale_up", "scale_down", "delete"]


@dataclass(frozen=True)
class GroupChange:
    """One role of one deployment group changes size (0 -> n is a create, n -> 0 a delete)."""

    kind: ChangeKind
    service: str
    group_id: str
    role: Role
    gpu_type: str
    domain: str
    before: int
    after: int
    gpus_per_instance: int

    @property
    def gpu_delta(self) -> int:
        return (self.after - self.before) * self.gpus_per_instance

    def to_json(self, group_key: str = "group_id") -> dict[str, Any]:
        """The change as a JSON object (``group_key`` names the group field: the cycle
        report and the review's apply-after-merge list spell it differently)."""
        return {
            "kind": self.kind,
            "service": self.service,
            group_key: self.group_id,
            "role": self.role,
            "gpu_type": self.gpu_type,
            "domain": self.domain,
            "before": self.before,
            "after": self.after,
            "gpu_delta": self.gpu_delta,
        }

    def __str__(self) -> str:
        return (
            f"{self.kind:<10} {self.service}/{self.group_id}/{self.role} on {self.gpu_type} "
            f"under {self.domain}: {self.before} -> {self.after} instances "
            f"({self.gpu_delta:+d} {'GPU' if abs(self.gpu_delta) == 1 else 'GPUs'})"
        )


# Order that never drops capacity: add first, then remove.
_ORDER: dict[ChangeKind, int] = {"create": 0, "scale_up": 1, "scale_down": 2, "delete": 3}


def diff_groups(
    current: FleetState,
    desired: tuple[DeploymentGroup, ...],
    gpus_per_instance: Mapping[tuple[str, Role], int],
) -> tuple[GroupChange, ...]:
    """Changes that turn ``current`` into ``desired``, capacity-adding ones first."""
    live = {(g.service, g.group_id): g for g in current.groups}
    want = {(g.service, g.group_id): g for g in desired}
    changes: list[GroupChange] = []
    for key in sorted(live.keys() | want.keys()):
        before_group, after_group = live.get(key), want.get(key)
        for role in ROLES:
            before = before_group.role(role).instances if before_group else 0
            after = after_group.role(role).instances if after_group else 0
            if before == after:
                continue
            ref = after_group or before_group
            assert ref is not None
            if before == 0:
                kind: ChangeKind = "create"
            elif after == 0:
                kind = "delete"
            else:
                kind = "scale_up" if after > before else "scale_down"
            changes.append(
                GroupChange(
                    kind=kind,
                    service=key[0],
                    group_id=key[1],
                    role=role,
                    gpu_type=ref.role(role).gpu_type,
                    domain=ref.domain,
                    before=before,
                    after=after,
                    gpus_per_instance=gpus_per_instance.get((key[0], role))
                    or ref.role(role).gpus_per_instance
                    or 1,
                )
            )
    changes.sort(key=lambda c: (_ORDER[c.kind], c.service, c.group_id, c.role))
    return tuple(changes)


@dataclass(frozen=True)
class Plan:
    """What one cycle wants for one cluster: per-service decisions, the placement that
    realises them, and the changes against what runs now."""

    cluster: str
    decisions: Mapping[str, Decision]
    placement: PlacementResult
    changes: tuple[GroupChange, ...]
    current: FleetState
    notes: tuple[str, ...] = field(default=())  # held services, skipped stages, drift
    # Services held this cycle (their groups keep their sizes), with why: a scale
    # change the API server refused because of drift (``reconciler.cycle``).
    held: Mapping[str, str] = field(default_factory=dict)
    # For the cost lines of the reports: the cluster's GPU prices (None: no cost is
    # reported) and each service's GPUs per instance by role (the policy's).
    prices: GpuPrices | None = None
    gpus_per_instance: Mapping[tuple[str, Role], int] = field(default_factory=dict)

    @property
    def groups(self) -> tuple[DeploymentGroup, ...]:
        return self.placement.groups

    def cost_per_hour(self, service: str | None = None) -> CostChange | None:
        """What ``service`` (None: every group of the cluster, services without a
        policy included) costs per hour now and once the plan is carried out; None
        without prices. Counts the instances of the groups (ready and starting):
        instances draining after a scale-in hold their GPUs a little longer."""
        prices = self.prices
        if prices is None:
            return None

        def cost(groups: tuple[DeploymentGroup, ...]) -> Cost:
            mine = [g for g in groups if service is None or g.service == service]
            return groups_cost_per_hour(mine, self.gpus_per_instance, prices)

        return CostChange(current=cost(self.current.groups), planned=cost(self.groups))

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

"""What both placers share: turning a ``PlacementRequest`` into a working problem,
the scale-in rule, group identities, and assembling the ``PlacementResult``.

Decisions (documented here once, followed by every placer):

- **Targets are exact.** A service never gets more instances of a role than its
  target; fewer only when capacity (or a rule below) prevents it, and then a
  ``Shortfall`` says why. A service in ``policies`` without a target keeps what it
  runs; groups of services *not* in ``policies`` are pruned (GitOps: missing desired
  = delete), and a target without a policy is reported as a ``no_policy`` shortfall.
- **Group size.** The shape (``ServicePolicy.deployment_group``) bounds a group's
  *total* instances, ``prefill_instances + decode_instances``; the P/D split inside a
  group follows the service's need (its targets), because a fixed per-role shape that
  disagrees with the P/D ratio would strand capacity. Growth fills existing groups up
  to that size, then opens new groups. Every *new* group has at least one instance of
  each role the service runs (a group without prefill would pull its KV cache across
  spines). When one role grows alone and the existing groups are full, it first
  *overflows* them (existing groups exceed their size; the CP-SAT objective charges an
  overflowed instance more than opening a group, so it happens only then).
- **Anchored groups** (the one exception to exact targets). When one role grows alone
  (the other role's target is met) and its existing groups' domains have no room left
  for it -- not even by overflow -- a new group may be opened with the growing role
  plus an *anchor* of ``ANCHOR_INSTANCES`` (1) instance of the other role. The anchor
  overshoots the other role's target by that one instance; it is reported in
  ``PlacementResult.anchors`` (and ``stats.notes``) and is visible to the caller's
  diff as an extra instance, so ``placed - overshoot + short == target`` holds for
  every role. Order of preference, strictly: (a) the existing groups' domains (in
  place, then overflow), (b) full-shaped new groups (only when both roles grow), (c)
  anchored groups, as few as possible (a second one only when the first one's domain
  is full; the rest of the role overflows the anchored group), (d) a shortfall. An
  anchored group is never opened when the role could be placed otherwise, and only
  once the other role's target is met -- it did not grow, or all of its growth is
  placed (an anchor never stands in for a missing instance of its own role). Under
  CP-SAT's ``allow_rebalance`` a new group can also take a *moved* instance of the
  other role; anchors remain for when that does not suffice. *Why one instance*, not the count that keeps the P/D ratio bounds inside the
  group: the bounds are a service-level constraint on the targets, which the policy
  owns (+1 instance moves the service's ratio by one instance); a larger anchor would
  overshoot more GPUs only to decorate a group, and no group split is enforced
  elsewhere either (overflow already skews groups). Next cycle the policy sees the
  extra instance; if it scales it in, the scale-in rule keeps the anchored group's
  last instance (pass 1 below) and takes one from another group.
- **Capacity freed by scale-in is not reused in the same cycle.** The plan applies
  creates before deletes (``reconciler.plan``) and soft scale-in keeps a removed
  instance running through its observation window, so those GPUs are still busy when
  new instances start. Free capacity is therefore measured against everything that
  runs now, under CP-SAT's ``allow_rebalance`` too: the instances it moves away from
  serve until the moved ones do (apply holds them), so their GPUs are busy.
- **Pending and draining instances hold capacity.** Every GPU a running instance
  holds is busy for placement, and so are the GPUs of instances that hold capacity
  without sitting in a group's node list: instances *left behind* by a move or by a
  group being deleted (``PlacementRequest.left_behind``: kept serving until their
  replacement serves, held
  on their nodes), *pending* instances of a live group (its
  instance count says they exist, no node is bound yet: the scheduler will put them
  inside the group's domain on the role's GPU type, so that is where their GPUs are
  held) and *draining* instances (soft scale-in took them out of their group; they run
  until their window ends). A draining instance with a known node
  (``PlacementRequest.draining``) holds its GPUs there; one only counted
  (``FleetState.draining``) is held on the nodes of the service's groups running that
  role, the place it left. Held-without-a-node instances take the fullest nodes that
  fit them (best fit, as node packing does), so whole nodes stay whole; what fits
  nowhere holds nothing, and ``stats.notes`` says so (as it says what is held).
- **Scale-in rule** (the paper's order): remove from groups in the scarcest RDMA
  subgroup class first, then on the least preferred GPU type, then the most
  fragmenting place; a group that can be emptied in both roles is deleted whole; no
  group loses its last instance of a role while it keeps the other role, unless
  nothing else is left to remove. Inside a group, instances leave the nodes with the
  fewest GPUs in use first, so whole nodes become free.
- **Domains.** A new group is pinned to one domain of its service's affinity
  (``Topology.domains``); loose groups go to one RDMA subgroup, and only as a priced
  last resort (CP-SAT) or by the paper's rule (greedy) span the cluster
  (``subgroup=None``). A running group whose ``domain``/``subgroup`` names no domain of
  the topology (a switch that is gone) is kept and may shrink, but never grows.
- **New group ids** are ``g-<domain>-<n>`` (for loose groups ``g-<subgroup>-<n>``, or
  ``g-<cluster>-<n>`` when spanning) with the smallest ``n >= 1`` the service does not
  use, did not use at the start of the cycle, and that no group of it being deleted
  still holds (``FleetState.reserved_group_ids``): stable and deterministic.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from reconciler.desired.models import Affinity, ClusterSpec, ServicePolicy
from reconciler.placement.base import (
    Anchor,
    PlacementRequest,
    PlacementResult,
    Shortfall,
    SolverStats,
    UngroupedInstances,
)
from reconciler.placement.packing import PackItem, best_fit
from reconciler.policy.gpu_economics import role_choice
from reconciler.state import (
    ROLES,
    DeploymentGroup,
    GroupRole,
    NodeInstances,
    Role,
    group_id_prefix,
)
from reconciler.topology import (
    CLASS_RANK,
    SchedulingDomain,
    Topology,
    gpus_per_instance_of,
    topology_for,
    used_gpus,
)

# Instances of the other role that anchor a new group for a role growing alone.
ANCHOR_INSTANCES = 1

# --------------------------------------------------------------------------- needs


def preference_cost(weights: Mapping[str, float], gpu_type: str) -> int:
    """Per GPU of ``gpu_type`` under a role's preference ``weights``: 0 for the most
    preferred type, up to 99 for the least (99 x (1 - weight / best weight))."""
    if not weights:
        return 0
    best = max(weights.values())
    return round(99 * (1.0 - weights.get(gpu_type, 0.0) / best))


def role_ranking(
    policy: ServicePolicy, cluster: ClusterSpec, role: Role
) -> tuple[tuple[str, ...], Mapping[str, float]]:
    """``role``'s allowed GPU types in the policy's ranking (by cost at the SLO unless
    the policy keeps its preference: ``gpu_economics.choose_gpu_types``), and its
    weights moved onto that ranking, so that new instances go to the first type and
    scale-in removes the last-ranked first. Cached with the ranking."""
    choice = role_choice(policy, cluster, role)
    return choice.order, choice.weights


@dataclass(frozen=True)
class RoleNeed:
    """One role of one service for this cycle."""

    role: Role
    gpus_per_instance: int
    allowed_types: tuple[str, ...]  # allowed by the policy AND present in the cluster, best first
    weights: Mapping[str, float]  # the policy's weights moved onto the ranking
    target: int
    current: int  # instances running now

    @property
    def grow(self) -> int:
        return max(0, self.target - self.current)

    @property
    def shrink(self) -> int:
        return max(0, self.current - self.target)

    def preference_cost(self, gpu_type: str) -> int:
        """0 for the most preferred type, up to 99 for the least (per GPU)."""
        return preference_cost(self.weights, gpu_type)


@dataclass(frozen=True)
class ServiceNeed:
    """A service's shape, affinity, priority and per-role need for this cycle."""

    service: str
    policy: ServicePolicy
    prefill: RoleNeed
    decode: RoleNeed

    @property
    def priority(self) -> int:
        return self.policy.priority

    @property
    def affinity(self) -> Affinity:
        return self.policy.affinity

    def role(self, role: Role) -> RoleNeed:
        return self.prefill if role == "prefill" else self.decode

    def shape(self, role: Role) -> int:
        shape = self.policy.deployment_group
        return shape.prefill_instances if role == "prefill" else shape.decode_instances

    @property
    def group_size(self) -> int:
        """Instances one group holds (both roles together)."""
        shape = self.policy.deployment_group
        return shape.prefill_instances + shape.decode_instances

    def room(self, group: WorkGroup) -> int:
        """Instances a group can still take before it reaches its size."""
        return max(0, self.group_size - group.count("prefill") - group.count("decode"))

    @property
    def required_roles(self) -> tuple[Role, ...]:
        """Roles every new group must contain (those with a positive target)."""
        return tuple(r for r in ROLES if self.role(r).target > 0)

    @property
    def may_open_groups(self) -> bool:
        """New groups need >= 1 instance of each required role within the targets."""
        required = self.required_roles
        return bool(required) and all(self.role(r).grow > 0 for r in required)

    def anchor_role(self, grow: Mapping[Role, int]) -> Role | None:
        """The role that would anchor a new group for a role growing alone: the other
        role, when exactly one role grows (``grow``: instances still to add per role)
        and the other runs (positive target) but does not grow. None otherwise."""
        growing = [r for r in ROLES if grow.get(r, 0) > 0]
        if len(growing) != 1:
            return None
        other: Role = "decode" if growing[0] == "prefill" else "prefill"
        return other if other in self.required_roles else None


def needed_class_rank(prefill_type: str, decode_type: str, affinity: Affinity) -> int:
    """The least scarce subgroup class that can host a group of this type pair.

    One type: any class (low). Two types under one S2 or subgroup: S2-heterogeneous
    (medium) suffices. Two types under one S1: only S1-heterogeneous (high) has it.
    """
    if prefill_type == decode_type:
        return CLASS_RANK["low"]
    return CLASS_RANK["high"] if affinity == "s1" else CLASS_RANK["medium"]


# --------------------------------------------------------------------------- groups


# Instances a live group runs whose Pods are not bound to a node yet (Pending): the
# group's instance count says they exist, its node list cannot say where. They stay
# part of the group under this pseudo-node, so a group whose Pods are still being
# scheduled is neither mistaken for an empty one (and re-placed) nor grown twice.
# They hold no node's GPUs in the accounting, and scale-in removes them first (an
# unknown node sorts before every real one).
UNSCHEDULED = ""


def role_nodes(group_role: GroupRole) -> dict[str, int]:
    """Instances per node of one role of a group, unscheduled ones under ``UNSCHEDULED``."""
    nodes = {p.node: p.instances for p in group_role.nodes if p.instances > 0}
    unscheduled = group_role.instances - sum(nodes.values())
    if unscheduled > 0:
        nodes[UNSCHEDULED] = nodes.get(UNSCHEDULED, 0) + unscheduled
    return nodes


@dataclass
class WorkGroup:
    """A deployment group while a placer works on it (mutable, private to one call)."""

    service: str
    cluster: str
    group_id: str
    domain_name: str
    subgroup: str | None
    domain: SchedulingDomain | None  # None: unknown to the topology (never grows)
    gpu_type: dict[Role, str]
    nodes: dict[Role, dict[str, int]]  # node name -> instances
    is_new: bool = False
    original: DeploymentGroup | None = None
    anchor_role: Role | None = None  # set on new groups anchored by this role's instances

    def count(self, role: Role) -> int:
        return sum(self.nodes[role].values())

    def add(self, role: Role, node: str, instances: int) -> None:
        if instances:
            self.nodes[role][node] = self.nodes[role].get(node, 0) + instances

    def remove(self, role: Role, node: str, instances: int) -> None:
        left = self.nodes[role].get(node, 0) - instances
        if left < 0:
            raise ValueError(
                f"removing {instances} {role} from {node} in {self.group_id}: only {left + instances}"
            )
        if left:
            self.nodes[role][node] = left
        else:
            self.nodes[role].pop(node, None)

    @property
    def is_empty(self) -> bool:
        return self.count("prefill") == 0 and self.count("decode") == 0

    def class_rank(self) -> int:
        return self.domain.class_rank if self.domain is not None else CLASS_RANK["high"]

    def freeze(self) -> DeploymentGroup:
        """The deployment group this work group now stands for (the inverse of
        :meth:`from_group`, field for field): the original when nothing moved."""
        if self.original is not None and not self._changed():
            return self.original
        roles = {
            r: GroupRole(
                gpu_type=self.gpu_type[r],
                instances=self.count(r),
                nodes=tuple(
                    NodeInstances(n, c)
                    for n, c in sorted(self.nodes[r].items())
                    if c > 0 and n != UNSCHEDULED
                ),
                gpus_per_instance=self.original.role(r).gpus_per_instance
                if self.original
                else None,
            )
            for r in ROLES
        }
        return DeploymentGroup(
            service=self.service,
            cluster=self.cluster,
            group_id=self.group_id,
            domain=self.domain_name,
            subgroup=self.subgroup,
            prefill=roles["prefill"],
            decode=roles["decode"],
        )

    def _changed(self) -> bool:
        assert self.original is not None
        for r in ROLES:
            if role_nodes(self.original.role(r)) != {n: c for n, c in self.nodes[r].items() if c}:
                return True
        return False

    @staticmethod
    def from_group(group: DeploymentGroup, topology: Topology) -> WorkGroup:
        """A deployed group as a work group to edit (:meth:`freeze` turns it back)."""
        return WorkGroup(
            service=group.service,
            cluster=group.cluster,
            group_id=group.group_id,
            domain_name=group.domain,
            subgroup=group.subgroup,
            domain=topology.domain_of_group(group),
            gpu_type={r: group.role(r).gpu_type for r in ROLES},
            nodes={r: role_nodes(group.role(r)) for r in ROLES},
            original=group,
        )


def new_group_id(
    service_groups: Iterable[WorkGroup], domain_name: str, reserved: Iterable[str] = ()
) -> str:
    """``g-<domain>-<n>``, smallest n >= 1 used neither by the service's groups nor in
    ``reserved`` (``PlacementProblem.reserved_ids``: the ids of groups that ran at the
    start of the cycle, as an id deleted in this cycle is not reused in it, or the diff
    would see one group change type; and those of groups being deleted, whose names are
    taken until they are gone)."""
    taken = {g.group_id for g in service_groups} | set(reserved)
    n = 1
    while f"{group_id_prefix(domain_name)}{n}" in taken:
        n += 1
    return f"{group_id_prefix(domain_name)}{n}"


# --------------------------------------------------------------------------- problem


@dataclass
class PlacementProblem:
    """A prepared request: needs per service, working groups after the scale-in rule,
    and GPUs in use per node (everything running now)."""

    request: PlacementRequest
    topology: Topology
    needs: dict[str, ServiceNeed]
    groups: dict[str, list[WorkGroup]]  # per service, after scale-in
    used: np.ndarray  # GPUs per node in use now (incl. instances being scaled in)
    shortfalls: list[Shortfall] = field(default_factory=list)
    started_s: float = field(default_factory=time.perf_counter)
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # reported in every result's stats
    _reserved_ids: dict[str, frozenset[str]] | None = field(default=None, init=False, repr=False)

    @property
    def cluster(self) -> str:
        return self.topology.cluster

    def free(self) -> np.ndarray:
        return self.topology.free_gpus(self.used)

    def reserved_ids(self, service: str) -> frozenset[str]:
        """Ids no new group of the service may take this cycle: those of its groups at
        the start of the cycle (never reused in it), and those the fleet reserves
        (``FleetState.reserved_group_ids``: groups being deleted, left out of it, whose
        names are taken until they are gone; a new group under such an id would render
        the very name being deleted).

        Indexed once per problem: asked per new group, a scan of every running group
        made opening groups quadratic in the fleet (0.36 s at 160,000 GPUs)."""
        if self._reserved_ids is None:
            current = self.request.current
            index: dict[str, set[str]] = defaultdict(set)
            for g in current.groups:
                index[g.service].add(g.group_id)
            for name, ids in current.reserved_group_ids.items():
                index[name].update(ids)
            self._reserved_ids = {k: frozenset(v) for k, v in index.items()}
        return self._reserved_ids.get(service, frozenset())

    def services_by_priority(self) -> list[ServiceNeed]:
        """Highest priority first, then by name (the order capacity is handed out in)."""
        return sorted(self.needs.values(), key=lambda n: (-n.priority, n.service))

    def placed(self, service: str, role: Role) -> int:
        return sum(g.count(role) for g in self.groups.get(service, ()))

    def lap(self, name: str, since_s: float) -> float:
        now = time.perf_counter()
        self.timings_s[name] = self.timings_s.get(name, 0.0) + (now - since_s)
        return now


def prepare(request: PlacementRequest, *, apply_scale_in: bool = True) -> PlacementProblem:
    """Build the working problem; apply the scale-in rule unless the caller (the
    CP-SAT placer under ``allow_rebalance``) decides removals itself."""
    started = time.perf_counter()
    topology = topology_for(request.cluster)
    policies = request.policies
    size_of = gpus_per_instance_of(policies)
    used = used_gpus(topology, request.current.groups, size_of)
    held, hold_notes = held_gpus(request, topology, used)
    used = used + held

    groups: dict[str, list[WorkGroup]] = defaultdict(list)
    for group in request.current.groups:
        if group.service in policies:
            groups[group.service].append(WorkGroup.from_group(group, topology))
    for service_groups in groups.values():
        service_groups.sort(key=lambda g: g.group_id)

    needs: dict[str, ServiceNeed] = {}
    shortfalls: list[Shortfall] = []
    for service in sorted(request.targets):
        targets = request.targets[service]
        policy = policies.get(service)
        if policy is None:
            for role in ROLES:
                wanted = max(0, getattr(targets, role))
                if wanted:
                    shortfalls.append(
                        Shortfall(
                            service,
                            role,
                            wanted,
                            "no_policy",
                            f"service '{service}' has no policy for cluster '{topology.cluster}'",
                        )
                    )
            continue
        roles: dict[Role, RoleNeed] = {}
        for role in ROLES:
            rp = policy.role(role)
            present = set(topology.gpu_types)
            order, weights = role_ranking(policy, request.cluster, role)
            roles[role] = RoleNeed(
                role=role,
                gpus_per_instance=rp.gpus_per_instance,
                allowed_types=tuple(t for t in order if t in present),
                weights=weights,
                target=max(0, getattr(targets, role)),
                current=sum(g.count(role) for g in groups.get(service, ())),
            )
        needs[service] = ServiceNeed(service, policy, roles["prefill"], roles["decode"])

    problem = PlacementProblem(
        request=request,
        topology=topology,
        needs=needs,
        groups=groups,
        used=used,
        shortfalls=shortfalls,
        started_s=started,
        notes=hold_notes,
    )
    mark = problem.lap("prepare", started)
    if apply_scale_in:
        for need in needs.values():
            if need.prefill.shrink or need.decode.shrink:
                scale_in(
                    problem.groups[need.service],
                    need,
                    {r: need.role(r).shrink for r in ROLES},
                    topology,
                    used,
                )
        problem.lap("scale_in", mark)
    return problem


# --------------------------------------------------------------------------- held


def held_gpus(
    request: PlacementRequest, topology: Topology, used: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """GPUs per node held by pending and draining instances (module docstring), on top
    of ``used`` (the groups' instances on their nodes), and notes saying what is held."""
    policies = request.policies
    held = np.zeros_like(used)
    items: list[PackItem] = []
    counts = {"pending": 0, "draining": 0, "left behind": 0}
    lost: list[str] = []

    def size_of(service: str, role: Role, observed: int | None) -> int | None:
        policy = policies.get(service)
        return observed or (policy.role(role).gpus_per_instance if policy else None)

    def hold(kind: str, what: str, nodes: np.ndarray, size: int, count: int) -> None:
        counts[kind] += count
        key = f"{kind} instance(s) of {what}"
        items.append(PackItem(key, nodes, size, count, 0, 1, 0, (key,)))

    groups_of: dict[str, list[DeploymentGroup]] = defaultdict(list)
    for group in request.current.groups:
        groups_of[group.service].append(group)
        if group.service not in policies:
            continue  # pruned this cycle: its Pods go
        domain = topology.domain_of_group(group)
        for role in ROLES:
            pending = role_nodes(group.role(role)).get(UNSCHEDULED, 0)
            size = size_of(group.service, role, group.role(role).gpus_per_instance)
            if not pending or size is None:
                continue
            if domain is None:
                lost.append(f"{pending} pending {role} of {group.service}/{group.group_id}")
                continue
            nodes = topology.domain_nodes(domain, group.role(role).gpu_type)
            hold("pending", f"{group.service}/{group.group_id}/{role}", nodes, size, pending)

    def hold_on_node(kind: str, instances: UngroupedInstances) -> None:
        assert instances.node is not None
        index = topology.node_index.get(instances.node)
        if index is None:
            return  # a node the cluster file no longer lists: not capacity here
        size = size_of(instances.service, instances.role, instances.gpus_per_instance)
        counts[kind] += instances.instances
        # Unknown size (a service without a policy): its whole node, as used_gpus does.
        held[index] += instances.instances * size if size is not None else topology.node_gpus[index]

    # Left behind by a move: on their nodes (instances not yet on a node hold nothing).
    for left_behind in request.left_behind:
        if left_behind.node is not None:
            hold_on_node("left behind", left_behind)

    # Draining instances: on their node when known, else near the service's groups.
    listed: dict[tuple[str, Role], int] = defaultdict(int)
    located: dict[tuple[str, Role], int] = defaultdict(int)
    for drained in request.draining:
        listed[(drained.service, drained.role)] += drained.instances
        if drained.node is None:
            continue
        located[(drained.service, drained.role)] += drained.instances
        hold_on_node("draining", drained)
    for service, role in sorted({*listed, *request.current.draining}):
        left = max(listed[(service, role)], request.current.draining.get((service, role), 0))
        left -= located[(service, role)]
        running = [g for g in groups_of.get(service, ()) if g.role(role).instances]
        observed = next((g.role(role).gpus_per_instance for g in running), None)
        size = size_of(service, role, observed)
        if left <= 0 or size is None:
            continue
        domains = [
            (d, g.role(role).gpu_type)
            for g in running
            if (d := topology.domain_of_group(g)) is not None
        ]
        if not domains:
            lost.append(f"{left} draining {role} of {service}")
            continue
        nodes = np.unique(np.concatenate([topology.domain_nodes(d, t) for d, t in domains]))
        hold("draining", f"{service}/{role}", nodes, size, left)

    placed, unplaced = best_fit(topology.free_gpus(used + held), items)
    for item in items:
        for node, count in placed.get(item.key, {}).items():
            held[node] += count * item.size
        missing = unplaced.get(item.key, 0)
        if missing:
            lost.append(f"{missing} {item.key}: no room left in their domain")
    notes = []
    if counts["pending"] or counts["draining"] or counts["left behind"]:
        moved = f", {counts['left behind']} left behind" if counts["left behind"] else ""
        notes.append(
            f"capacity held for {counts['pending']} pending and {counts['draining']} draining "
            f"instance(s){moved}: {int(held.sum())} GPUs"
        )
    if lost:
        notes.append(f"held nowhere (node unknown or no room): {'; '.join(lost)}")
    return held, notes


# --------------------------------------------------------------------------- scale-in


def scale_in_order_key(group: WorkGroup, need: ServiceNeed) -> tuple[int, float, int, str]:
    """Sort key, most removable first: scarcest subgroup class, least preferred GPU
    types, smallest group (emptying it frees a domain), then group id."""
    preference = sum(need.role(r).weights.get(group.gpu_type[r], 0.0) for r in ROLES)
    return (
        -group.class_rank(),
        preference,
        group.count("prefill") + group.count("decode"),
        group.group_id,
    )


def scale_in(
    service_groups: list[WorkGroup],
    need: ServiceNeed,
    remove: Mapping[Role, int],
    topology: Topology,
    used: np.ndarray,
) -> dict[Role, int]:
    """Remove ``remove[role]`` instances from the service's groups by the scale-in rule
    (module docstring). Mutates the groups, drops the emptied ones from the list, and
    returns how many instances could not be removed (0 unless the groups hold fewer)."""
    left = {r: max(0, remove.get(r, 0)) for r in ROLES}
    ordered = sorted(service_groups, key=lambda g: scale_in_order_key(g, need))

    def take(group: WorkGroup, role: Role, count: int) -> None:
        # Leave the nodes with the fewest GPUs in use first: they become whole again.
        def node_key(name: str) -> tuple[int, str]:
            index = topology.node_index.get(name)
            return (int(used[index]) if index is not None else -1, name)

        for node in sorted(group.nodes[role], key=node_key):
            if count == 0:
                break
            here = min(count, group.nodes[role][node])
            group.remove(role, node, here)
            left[role] -= here
            count -= here

    # Pass 1: per group in order, delete it whole if it fits, else shrink to >= 1 per role.
    for group in ordered:
        if all(group.count(r) <= left[r] for r in ROLES) and not group.is_empty:
            for r in ROLES:
                take(group, r, group.count(r))
            continue
        for r in ROLES:
            keep_one = 1 if group.count(r) > 0 else 0
            take(group, r, min(left[r], max(0, group.count(r) - keep_one)))
    # Pass 2 (last resort): last instances, in the same order.
    for group in ordered:
        for r in ROLES:
            take(group, r, min(left[r], group.count(r)))
    service_groups[:] = [g for g in service_groups if not g.is_empty]
    return left


# --------------------------------------------------------------------------- growth


def split_growth(
    groups: list[WorkGroup], need: ServiceNeed, add: Mapping[Role, int]
) -> list[tuple[WorkGroup, Role, int]]:
    """Spread ``add[role]`` new instances over existing ``groups`` (in the given order):
    a group missing a role gets one first, then each group's room is shared between the
    roles in proportion to what is left; what no room takes (overflow) goes round-robin
    over the groups. Deterministic."""
    left = {r: max(0, add.get(r, 0)) for r in ROLES}
    plan: dict[tuple[int, Role], int] = defaultdict(int)
    live = list(groups)
    if not live:
        return []
    room = [need.room(g) for g in live]
    for i, group in enumerate(live):
        for r in ROLES:
            if left[r] and group.count(r) == 0:
                plan[(i, r)] += 1
                left[r] -= 1
                room[i] = max(0, room[i] - 1)
    for i in range(len(live)):
        total = left["prefill"] + left["decode"]
        if total == 0:
            break
        take = min(room[i], total)
        take_p = min(left["prefill"], round(take * left["prefill"] / total))
        take_d = min(left["decode"], take - take_p)
        take_p = min(left["prefill"], take - take_d)
        split: tuple[tuple[Role, int], ...] = (("prefill", take_p), ("decode", take_d))
        for r, n in split:
            plan[(i, r)] += n
            left[r] -= n
    i = 0
    while left["prefill"] + left["decode"] > 0:
        for r in ROLES:
            if left[r]:
                plan[(i % len(live), r)] += 1
                left[r] -= 1
        i += 1
    return [
        (live[i], r, n)
        for (i, r), n in sorted(plan.items(), key=lambda kv: (kv[0][0], kv[0][1]))
        if n
    ]


def split_new_groups(
    count: int, need: ServiceNeed, add: Mapping[Role, int]
) -> list[dict[Role, int]]:
    """Spread ``add`` instances over ``count`` new groups: one of each required role per
    group, then the rest round-robin up to the group size, then (overflow) beyond it."""
    shares: list[dict[Role, int]] = [{r: 0 for r in ROLES} for _ in range(count)]
    left = {r: max(0, add.get(r, 0)) for r in ROLES}
    for share in shares:
        for r in need.required_roles:
            if left[r]:
                share[r] += 1
                left[r] -= 1
    progress = True
    while progress and (left["prefill"] or left["decode"]):
        progress = False
        for share in shares:
            for r in ROLES:
                if left[r] and share["prefill"] + share["decode"] < need.group_size:
                    share[r] += 1
                    left[r] -= 1
                    progress = True
    # Overflow (a role growing alone past the group size): round-robin, beyond the size.
    i = 0
    while shares and (left["prefill"] or left["decode"]):
        for r in ROLES:
            if left[r]:
                shares[i % len(shares)][r] += 1
                left[r] -= 1
        i += 1
    return shares


# --------------------------------------------------------------------------- results


def finalize(
    problem: PlacementProblem,
    stats: SolverStats,
    extra_shortfalls: Iterable[Shortfall] = (),
) -> PlacementResult:
    groups: list[DeploymentGroup] = []
    for service_groups in problem.groups.values():
        groups.extend(g.freeze() for g in service_groups if not g.is_empty)
    groups.sort(key=lambda g: (g.service, g.group_id))
    shortfalls = sorted(
        [*problem.shortfalls, *extra_shortfalls],
        key=lambda s: (s.service, s.role, s.constraint),
    )
    anchors = anchors_of(problem)
    stats = replace(stats, notes=(*problem.notes, *stats.notes, *(anchor_note(a) for a in anchors)))
    return PlacementResult(
        cluster=problem.cluster,
        groups=tuple(groups),
        shortfalls=tuple(shortfalls),
        stats=stats,
        anchors=anchors,
    )


def anchors_of(problem: PlacementProblem) -> tuple[Anchor, ...]:
    """The anchors of the anchored groups that survived placement, by service and id."""
    anchors = [
        Anchor(g.service, g.anchor_role, g.group_id, g.count(g.anchor_role))
        for service_groups in problem.groups.values()
        for g in service_groups
        if g.anchor_role is not None and g.count(g.anchor_role) > 0
    ]
    return tuple(sorted(anchors, key=lambda a: (a.service, a.group_id)))


def anchor_note(anchor: Anchor) -> str:
    grows = "decode" if anchor.role == "prefill" else "prefill"
    return (
        f"anchored group {anchor.service}/{anchor.group_id}: {anchor.instances} {anchor.role} "
        f"instance(s) beyond the {anchor.role} target, to open a group for {grows} growing "
        "alone (no room left in the domains of its existing groups)"
    )


__all__ = [
    "ANCHOR_INSTANCES",
    "PlacementProblem",
    "RoleNeed",
    "ServiceNeed",
    "WorkGroup",
    "anchor_note",
    "anchors_of",
    "finalize",
    "held_gpus",
    "needed_class_rank",
    "new_group_id",
    "preference_cost",
    "prepare",
    "scale_in",
    "scale_in_order_key",
    "split_growth",
    "split_new_groups",
]

"""``SimulatedFleet``: a simulated cluster behind the reconciler's two edge interfaces.

It implements ``reconciler.observe.base.MetricsSource`` (``fetch``) and
``ClusterBackend`` (``observe``, ``diff``, ``apply``), so the production decide ->
place -> diff -> apply cycle runs against it unchanged. It is also the embedded default
fleet (:func:`default_simulated_fleet`): with no cluster and no Prometheus, the main
job scales the services of ``policies/`` against a synthetic diurnal load.

Time: the fleet is at simulation second ``now_s``; ``fetch(policies, now_s)`` first
advances it to ``now_s - time_origin_s`` (an origin of ``None`` anchors at the first
call, so a loop that passes wall-clock seconds works). ``advance_to`` steps one second
at a time through every service's fluid model (``reconciler.sim.engine``).

Instance life cycle:

- ``apply`` turns each ``GroupChange`` of a plan into instances: new ones are created
  *starting* on the nodes the plan's placement named and serve after the role's
  ``startup_s`` (model load); they hold their GPUs from creation.
- Scale-in first cancels instances that are still starting (no drain needed), then
  drains ready ones: a draining instance leaves routing at once and keeps its GPUs
  until its in-flight work is done (prefill: ``prefill_drain_s``; decode: until its
  pool's decode clock has advanced by the 99th-percentile output length, i.e. the
  sequences it held have finished).
- Where instances land decides their KV-transfer link: within a deployment group the
  share of prefill-decode instance pairs whose nodes are in one RDMA subgroup (as
  ``reconciler.topology`` derives them) transfers at ``network.rdma_gbps``, the rest at
  ``network.cross_subgroup_gbps``. Groups without node information use the group's
  ``subgroup`` field (set: RDMA; unset: cross).

Observed state: deployment groups count ready + starting instances (draining ones
are reported in ``FleetState.draining``). The placer therefore does not see the GPUs
of instances that are draining (a known simplification: for up to a drain period the
simulated cluster may hold more instances on a node than it has GPUs).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.observe.base import Observation
from reconciler.plan import GroupChange, Plan
from reconciler.sim.engine import LoadProfile, ServiceSim, SimConfig, _Grow
from reconciler.state import (
    ROLES,
    DeploymentGroup,
    FleetState,
    GroupRole,
    NodeInstances,
    Role,
    Sample,
    ServiceMetrics,
)
from reconciler.topology import topology_for


@dataclass
class _Instance:
    service: str
    cluster: str
    group_id: str
    role: Role
    gpu_type: str
    node: str | None
    created_s: float
    ready_s: float
    drain_started_s: float | None = None
    drain_until_s: float | None = None  # prefill: time the drain ends
    drain_until_psi: float | None = None  # decode: decode-clock value the drain ends at
    gone: bool = False

    @property
    def draining(self) -> bool:
        return self.drain_started_s is not None


@dataclass
class _GroupMeta:
    cluster: str
    domain: str
    subgroup: str | None


FLEET_COLUMNS = (
    "prefill_ready",
    "prefill_starting",
    "prefill_draining",
    "decode_ready",
    "decode_starting",
    "decode_draining",
    "prefill_gpus",
    "decode_gpus",
)


class SimulatedFleet:
    """A simulated P/D fleet (see the module docstring)."""

    def __init__(
        self,
        clusters: Mapping[str, ClusterSpec],
        policies: Mapping[str, ServicePolicy],
        loads: Mapping[str, LoadProfile],
        config: SimConfig | None = None,
        *,
        time_origin_s: float | None = 0.0,
    ):
        self.config = config or SimConfig()
        self.clusters = dict(clusters)
        self.policies = dict(policies)
        self.time_origin_s = time_origin_s
        self.sims: dict[str, ServiceSim] = {}
        self.notes: list[str] = []
        for name, load in loads.items():
            policy = self.policies.get(name)
            if policy is None:
                raise KeyError(f"load given for service '{name}' which has no policy")
            cluster = self.clusters.get(policy.cluster)
            if cluster is None:
                raise KeyError(
                    f"service '{name}' runs in cluster '{policy.cluster}', which is not given"
                )
            sim = ServiceSim(policy, cluster, load, self.config)
            self.sims[name] = sim
            self.notes.extend(sim.notes)
        self.instances: dict[str, list[_Instance]] = {name: [] for name in self.policies}
        self.groups: dict[tuple[str, str], _GroupMeta] = {}
        self.fleet_series: dict[str, _Grow] = {name: _Grow(FLEET_COLUMNS) for name in self.sims}
        self._subgroup_of_node: dict[str, dict[str, str]] = {}
        for name, spec in self.clusters.items():
            topology = topology_for(spec)
            self._subgroup_of_node[name] = {
                node.name: topology.subgroup_of_node(i) for i, node in enumerate(topology.nodes)
            }
        self.t = 0
        self._dirty: set[str] = set(self.sims)
        self._next_event_s = math.inf
        self._allocated: dict[str, list[float]] = {name: [0.0] * 8 for name in self.sims}
        self._group_types: dict[tuple[str, str, str], str] = {}
        self._has_decode_drains = False

    # ------------------------------------------------------------------ time

    @property
    def now_s(self) -> float:
        return float(self.t)

    def _sim_time(self, now_s: float) -> float:
        if self.time_origin_s is None:
            self.time_origin_s = now_s - self.t
        return now_s - self.time_origin_s

    def advance_to(self, t_s: float) -> None:
        """Simulate every second up to (not including) ``t_s``."""
        target = math.floor(t_s + 1e-9)
        while self.t < target:
            self._events(self.t)
            if self._dirty:
                for service in sorted(self._dirty):
                    self._push_counts(service)
                self._dirty.clear()
            for name, sim in self.sims.items():
                sim.step()
                self.fleet_series[name].append(self._allocated[name])
            self.t += 1

    def _events(self, t: int) -> None:
        if t < self._next_event_s and not self._has_decode_drains:
            return
        next_event = math.inf
        any_decode_drain = False
        for service, instances in self.instances.items():
            changed = False
            sim = self.sims.get(service)
            for inst in instances:
                if inst.gone:
                    continue
                if inst.drain_started_s is None:
                    if inst.ready_s > t:
                        next_event = min(next_event, inst.ready_s)
                    elif inst.ready_s > t - 1:
                        changed = True  # became ready this second
                    continue
                if inst.drain_until_s is not None:
                    if inst.drain_until_s <= t:
                        inst.gone = True
                        changed = True
                    else:
                        next_event = min(next_event, inst.drain_until_s)
                elif inst.drain_until_psi is not None:
                    clock = sim.decode_clock(inst.gpu_type) if sim else math.inf
                    if clock >= inst.drain_until_psi:
                        inst.gone = True
                        changed = True
                    else:
                        any_decode_drain = True
            if changed:
                self.instances[service] = [i for i in instances if not i.gone]
                self._dirty.add(service)
        self._next_event_s = next_event
        self._has_decode_drains = any_decode_drain

    # ------------------------------------------------------------------ pools

    def _push_counts(self, service: str) -> None:
        sim = self.sims.get(service)
        instances = self.instances.get(service, [])
        t = self.t
        allocated = [0.0] * 8
        policy = self.policies[service]
        for inst in instances:
            offset = 0 if inst.role == "prefill" else 3
            if inst.draining:
                allocated[offset + 2] += 1
            elif inst.ready_s <= t:
                allocated[offset] += 1
            else:
                allocated[offset + 1] += 1
            allocated[6 if inst.role == "prefill" else 7] += policy.role(
                inst.role
            ).gpus_per_instance
        self._allocated[service] = allocated
        if sim is None:
            return
        by_group: dict[str, list[_Instance]] = defaultdict(list)
        for inst in instances:
            by_group[inst.group_id].append(inst)
        prefill: dict[tuple[str, str], float] = defaultdict(float)
        decode_ready: dict[str, int] = defaultdict(int)
        decode_draining: dict[str, int] = defaultdict(int)
        for group_id, members in by_group.items():
            ready_prefill = [
                i for i in members if i.role == "prefill" and not i.draining and i.ready_s <= t
            ]
            decode_members = [i for i in members if i.role == "decode" and not i.draining]
            ready_decode = [i for i in decode_members if i.ready_s <= t]
            for inst in members:
                if inst.role == "decode":
                    if inst.draining:
                        decode_draining[inst.gpu_type] += 1
                    elif inst.ready_s <= t:
                        decode_ready[inst.gpu_type] += 1
            if not ready_prefill:
                continue
            rdma_share = self._rdma_share(
                service, group_id, ready_prefill, ready_decode or decode_members
            )
            for inst in ready_prefill:
                prefill[(inst.gpu_type, "rdma")] += rdma_share
                prefill[(inst.gpu_type, "cross")] += 1.0 - rdma_share
        sim.set_counts(prefill, decode_ready, decode_draining)

    def _rdma_share(
        self, service: str, group_id: str, prefill: Sequence[_Instance], decode: Sequence[_Instance]
    ) -> float:
        """Share of (prefill, decode) instance pairs of a group inside one RDMA subgroup."""
        meta = self.groups.get((service, group_id))
        if not decode:
            return 0.0
        cluster = meta.cluster if meta else self.policies[service].cluster
        subgroup_of = self._subgroup_of_node.get(cluster, {})
        if all(i.node is None for i in (*prefill, *decode)):
            return 1.0 if meta is not None and meta.subgroup is not None else 0.0
        fallback = meta.subgroup if meta else None

        def counts(instances: Sequence[_Instance]) -> dict[str | None, int]:
            out: dict[str | None, int] = defaultdict(int)
            for inst in instances:
                out[subgroup_of.get(inst.node, fallback) if inst.node else fallback] += 1
            return out

        p, d = counts(prefill), counts(decode)
        pairs = sum(n * d.get(sg, 0) for sg, n in p.items() if sg is not None)
        return pairs / (len(prefill) * len(decode))

    # ------------------------------------------------------------------ MetricsSource

    def fetch(self, policies: Sequence[ServicePolicy], now_s: float) -> dict[str, ServiceMetrics]:
        self.advance_to(self._sim_time(now_s))
        out: dict[str, ServiceMetrics] = {}
        for policy in policies:
            sim = self.sims.get(policy.name)
            if sim is None:
                out[policy.name] = ServiceMetrics(policy.name)
                continue
            values = sim.window_metrics(self.config.metrics_window_s)
            samples = {
                name: Sample(float(value), now_s)
                for name, value in values.items()
                if value is not None and math.isfinite(value)
            }
            out[policy.name] = ServiceMetrics(policy.name, **samples)
        return out

    # ------------------------------------------------------------------ ClusterBackend

    def observe(self, cluster: ClusterSpec, policies: Sequence[ServicePolicy]) -> Observation:
        return Observation(self.fleet_state(cluster.name, [p.name for p in policies]))

    def fleet_state(self, cluster: str, services: Sequence[str] | None = None) -> FleetState:
        wanted = set(services) if services is not None else None
        groups: list[DeploymentGroup] = []
        starting: dict[tuple[str, Role], int] = defaultdict(int)
        draining: dict[tuple[str, Role], int] = defaultdict(int)
        t = self.t
        for service, instances in self.instances.items():
            if wanted is not None and service not in wanted:
                continue
            if self.policies[service].cluster != cluster:
                continue
            by_group: dict[str, list[_Instance]] = defaultdict(list)
            for inst in instances:
                if inst.draining:
                    draining[(service, inst.role)] += 1
                    continue
                if inst.ready_s > t:
                    starting[(service, inst.role)] += 1
                by_group[inst.group_id].append(inst)
            for group_id in sorted(by_group):
                members = by_group[group_id]
                meta = self.groups.get((service, group_id), _GroupMeta(cluster, cluster, None))
                roles = {}
                for role in ROLES:
                    of_role = [i for i in members if i.role == role]
                    nodes: dict[str, int] = defaultdict(int)
                    for inst in of_role:
                        if inst.node is not None:
                            nodes[inst.node] += 1
                    gpu_type = (
                        of_role[0].gpu_type
                        if of_role
                        else self._group_gpu_type(service, group_id, role)
                    )
                    roles[role] = GroupRole(
                        gpu_type=gpu_type,
                        instances=len(of_role),
                        nodes=tuple(NodeInstances(n, c) for n, c in sorted(nodes.items())),
                    )
                groups.append(
                    DeploymentGroup(
                        service=service,
                        cluster=meta.cluster,
                        group_id=group_id,
                        domain=meta.domain,
                        subgroup=meta.subgroup,
                        prefill=roles["prefill"],
                        decode=roles["decode"],
                    )
                )
        return FleetState(
            cluster=cluster, groups=tuple(groups), starting=dict(starting), draining=dict(draining)
        )

    def _group_gpu_type(self, service: str, group_id: str, role: Role) -> str:
        types = self._group_types.get((service, group_id, role))
        return types or self.policies[service].role(role).preferred_gpu_types()[0]

    def diff(self, plan: Plan) -> Sequence[str]:
        return [str(change) for change in plan.changes]

    def apply(self, plan: Plan) -> Sequence[str]:
        """Carry out the plan's changes (module docstring); returns what was done."""
        desired = {(g.service, g.group_id): g for g in plan.groups}
        for group in plan.groups:
            self.groups[(group.service, group.group_id)] = _GroupMeta(
                group.cluster, group.domain, group.subgroup
            )
        done: list[str] = []
        for change in plan.changes:
            self._apply_change(
                change, desired.get((change.service, change.group_id)), immediate=False
            )
            done.append(str(change))
        return done

    def bootstrap(self, groups: Sequence[DeploymentGroup]) -> None:
        """Start the fleet with ``groups`` already serving (a warm start at time now)."""
        for group in groups:
            self.groups[(group.service, group.group_id)] = _GroupMeta(
                group.cluster, group.domain, group.subgroup
            )
            for role in ROLES:
                role_group = group.role(role)
                if role_group.instances:
                    change = GroupChange(
                        kind="create",
                        service=group.service,
                        group_id=group.group_id,
                        role=role,
                        gpu_type=role_group.gpu_type,
                        domain=group.domain,
                        before=0,
                        after=role_group.instances,
                        gpus_per_instance=self.policies[group.service].role(role).gpus_per_instance,
                    )
                    self._apply_change(change, group, immediate=True)

    def _apply_change(
        self, change: GroupChange, desired: DeploymentGroup | None, *, immediate: bool
    ) -> None:
        service = change.service
        if service not in self.policies:
            raise KeyError(f"plan changes service '{service}', which this fleet does not run")
        policy = self.policies[service]
        t = float(self.t)
        self._group_types[(service, change.group_id, change.role)] = change.gpu_type
        members = [
            i
            for i in self.instances.setdefault(service, [])
            if i.group_id == change.group_id and i.role == change.role and not i.draining
        ]
        want_nodes: dict[str, int] = {}
        if desired is not None:
            want_nodes = {n.node: n.instances for n in desired.role(change.role).nodes}
        have_nodes: dict[str | None, int] = defaultdict(int)
        for inst in members:
            have_nodes[inst.node] += 1
        delta = change.after - len(members)
        if delta > 0:
            nodes: list[str | None] = []
            for node, count in sorted(want_nodes.items()):
                nodes += [node] * max(0, count - have_nodes.get(node, 0))
            nodes += [None] * max(0, delta - len(nodes))
            startup = 0.0 if immediate else policy.role(change.role).startup_s
            cluster = desired.cluster if desired is not None else policy.cluster
            for new_node in nodes[:delta]:
                self.instances[service].append(
                    _Instance(
                        service,
                        cluster,
                        change.group_id,
                        change.role,
                        change.gpu_type,
                        new_node,
                        t,
                        t + startup,
                    )
                )
                self._next_event_s = min(self._next_event_s, t + startup)
        elif delta < 0:
            surplus: dict[str | None, int] = (
                {node: have_nodes[node] - want_nodes.get(node or "", 0) for node in have_nodes}
                if desired
                else {}
            )

            def removal_key(inst: _Instance) -> tuple[int, int, float]:
                # Starting instances first (cancelled at no cost), then nodes with a
                # surplus against the placement, newest first.
                return (
                    0 if inst.ready_s > t else 1,
                    0 if surplus.get(inst.node, 1) > 0 else 1,
                    -inst.created_s,
                )

            for inst in sorted(members, key=removal_key)[:-delta]:
                self._retire(inst, t)
                if inst.node in surplus:
                    surplus[inst.node] -= 1
        self._dirty.add(service)

    def _retire(self, inst: _Instance, t: float) -> None:
        if inst.ready_s > t:
            inst.gone = True
            self.instances[inst.service] = [i for i in self.instances[inst.service] if not i.gone]
            return
        inst.drain_started_s = t
        if inst.role == "prefill":
            inst.drain_until_s = t + self.config.prefill_drain_s
            self._next_event_s = min(self._next_event_s, inst.drain_until_s)
        else:
            sim = self.sims.get(inst.service)
            if sim is None:
                inst.drain_until_s = t
            else:
                inst.drain_until_psi = sim.decode_clock(inst.gpu_type) + sim.out_p99
                self._has_decode_drains = True

    # ------------------------------------------------------------------ results

    def instance_counts(self, service: str) -> dict[str, np.ndarray]:
        """Per-second instance and GPU counts of a service."""
        series = self.fleet_series[service]
        return {name: series.col(name) for name in FLEET_COLUMNS}

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

Instances are rows of parallel numpy arrays (no object per instance): at 2,000
instances the per-second bookkeeping and the observed ``FleetState`` (cached until the
next change) stay far below the fluid model's cost.

Observed state: deployment groups count ready + starting instances (draining ones
are reported in ``FleetState.draining``). The placer therefore does not see the GPUs
of instances that are draining (a known simplification: for up to a drain period the
simulated cluster may hold more instances on a node than it has GPUs).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    LengthBuckets,
    NodeInstances,
    Role,
    Sample,
    ServiceMetrics,
)
from reconciler.topology import topology_for

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

PREFILL, DECODE = 0, 1
ROLE_CODE: dict[str, int] = {"prefill": PREFILL, "decode": DECODE}


@dataclass(frozen=True)
class SimulatedServiceMetrics(ServiceMetrics):
    """``ServiceMetrics`` as the simulated fleet reports them, with a handle on the
    readings a planner would also get from Prometheus but the nine signals leave out
    (request rate, mean lengths, other latency quantiles: ``ServiceSim.window_detail``),
    read at the same scrape as the signals. Computed only when asked, so autoscalers
    that never ask pay nothing; valid until the fleet advances."""

    sim: ServiceSim | None = field(default=None, repr=False, compare=False)
    window_s: float = 60.0
    at_second: int = 0  # the simulation second the metrics were fetched at
    scrape_second: int = 0  # the simulation second of the scrape they come from

    def detail(self, quantiles: Sequence[float] = (0.5, 0.9)) -> dict[str, float | None]:
        if self.sim is None:
            return {}
        if self.sim.t != self.at_second:
            raise RuntimeError(
                f"{self.service}: the fleet advanced from second {self.at_second} to "
                f"{self.sim.t} since these metrics were fetched"
            )
        return self.sim.window_detail(self.window_s, quantiles, at_s=self.scrape_second)


@dataclass(frozen=True)
class _GroupMeta:
    service: str
    group_id: str
    cluster: str
    domain: str
    subgroup: str | None


class _InstanceTable:
    """Every instance as one row of parallel arrays; rows are never reused (``alive``
    turns false) and the table compacts itself when most rows are dead."""

    COLUMNS: ClassVar[dict[str, Any]] = {
        "service": np.int32,
        "group": np.int32,
        "role": np.int8,
        "gpu_type": np.int32,
        "node": np.int32,  # -1: unknown
        "subgroup": np.int32,  # -1: none (never shares an RDMA subgroup)
        "created_s": np.float64,
        "ready_s": np.float64,
        "drain_started_s": np.float64,  # nan: not draining
        "drain_until_s": np.float64,  # prefill drains end at a time ...
        "drain_until_psi": np.float64,  # ... decode drains at a decode-clock value
        "alive": np.bool_,
    }

    def __init__(self, capacity: int = 256):
        self.size = 0
        self.cols: dict[str, np.ndarray] = {
            name: np.zeros(capacity, dtype=dtype) for name, dtype in self.COLUMNS.items()
        }

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name][: self.size]

    def append(self, count: int, **values: float | np.ndarray) -> None:
        """``count`` new rows; each value is a scalar or one value per row."""
        if count <= 0:
            return
        need = self.size + count
        if need > self.cols["alive"].size:
            grow = max(need, 2 * self.cols["alive"].size)
            for name, array in self.cols.items():
                bigger = np.zeros(grow, dtype=array.dtype)
                bigger[: self.size] = array[: self.size]
                self.cols[name] = bigger
        for name in self.COLUMNS:
            default = math.nan if name.startswith("drain") else (True if name == "alive" else 0)
            self.cols[name][self.size : need] = values.get(name, default)
        self.size = need

    def compact(self) -> None:
        alive = self["alive"]
        if self.size < 1024 or alive.sum() * 2 > self.size:
            return
        keep = np.flatnonzero(alive)
        for array in self.cols.values():
            array[: keep.size] = array[keep]
        self.size = keep.size


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
        self.services = sorted(self.policies)
        self.service_index = {name: i for i, name in enumerate(self.services)}
        self.gpu_types = sorted({t for spec in self.clusters.values() for t in spec.gpu_types})
        self.gpu_index = {name: i for i, name in enumerate(self.gpu_types)}
        # Nodes and RDMA subgroups of every cluster, as indices.
        self.nodes: list[str] = []
        self.node_index: dict[str, int] = {}
        self.subgroups: list[str] = []
        self.subgroup_index: dict[str, int] = {}
        node_subgroup: list[int] = []
        for cluster_name, spec in sorted(self.clusters.items()):
            topology = topology_for(spec)
            for i, node in enumerate(topology.nodes):
                key = f"{cluster_name}/{topology.subgroup_of_node(i)}"
                sub = self.subgroup_index.setdefault(key, len(self.subgroups))
                if sub == len(self.subgroups):
                    self.subgroups.append(key)
                self.node_index[f"{cluster_name}/{node.name}"] = len(self.nodes)
                self.nodes.append(node.name)
                node_subgroup.append(sub)
        self.node_subgroup = np.asarray(node_subgroup, dtype=np.int32)
        self.groups: list[_GroupMeta] = []
        self.group_index: dict[tuple[str, str], int] = {}
        self._group_types: dict[tuple[int, int], str] = {}
        self.table = _InstanceTable()
        self.fleet_series: dict[str, _Grow] = {name: _Grow(FLEET_COLUMNS) for name in self.sims}
        # GPUs held per GPU type (both roles, draining included) per second: what the
        # reports price (``gpus_by_type``).
        self.gpu_type_series: dict[str, _Grow] = {name: _Grow(self.gpu_types) for name in self.sims}
        self.t = 0
        self._dirty: set[int] = {self.service_index[name] for name in self.sims}
        self._next_event_s = math.inf
        self._has_decode_drains = False
        self._allocated: dict[str, list[float]] = {name: [0.0] * 8 for name in self.sims}
        self._allocated_by_type: dict[str, list[float]] = {
            name: [0.0] * len(self.gpu_types) for name in self.sims
        }
        self._version = 0
        self._state_cache: dict[tuple[str, tuple[str, ...] | None], tuple[int, FleetState]] = {}

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
                self.gpu_type_series[name].append(self._allocated_by_type[name])
            self.t += 1

    def _changed(self, services: np.ndarray | list[int]) -> None:
        self._dirty.update(int(s) for s in np.unique(np.asarray(services, dtype=np.int64)))
        self._version += 1

    def _events(self, t: int) -> None:
        if t < self._next_event_s and not self._has_decode_drains:
            return
        tab = self.table
        alive = tab["alive"]
        draining = ~np.isnan(tab["drain_started_s"])
        ready_s = tab["ready_s"]
        serving = alive & ~draining
        became_ready = serving & (ready_s <= t) & (ready_s > t - 1)
        prefill_done = alive & draining & (tab["drain_until_s"] <= t)
        decode_drain = alive & draining & ~np.isnan(tab["drain_until_psi"])
        decode_done = np.zeros_like(decode_drain)
        if decode_drain.any():
            rows = np.flatnonzero(decode_drain)
            clocks = np.array(
                [self._clock(int(tab["service"][i]), int(tab["gpu_type"][i])) for i in rows]
            )
            decode_done[rows] = clocks >= tab["drain_until_psi"][rows]
        gone = prefill_done | decode_done
        if gone.any():
            tab["alive"][gone] = False
        if became_ready.any() or gone.any():
            self._changed(tab["service"][became_ready | gone])
        pending_ready = ready_s[serving & (ready_s > t)]
        pending_drain = tab["drain_until_s"][
            alive & ~gone & draining & ~np.isnan(tab["drain_until_s"])
        ]
        self._next_event_s = min(
            float(pending_ready.min()) if pending_ready.size else math.inf,
            float(pending_drain.min()) if pending_drain.size else math.inf,
        )
        self._has_decode_drains = bool((decode_drain & ~decode_done).any())
        tab.compact()

    def _clock(self, service: int, gpu_type: int) -> float:
        sim = self.sims.get(self.services[service])
        return sim.decode_clock(self.gpu_types[gpu_type]) if sim is not None else math.inf

    # ------------------------------------------------------------------ pools

    def _push_counts(self, service_code: int) -> None:
        service = self.services[service_code]
        tab = self.table
        t = self.t
        policy = self.policies[service]
        mine = tab["alive"] & (tab["service"] == service_code)
        role = tab["role"]
        draining = ~np.isnan(tab["drain_started_s"])
        ready = tab["ready_s"] <= t
        allocated: list[float] = []
        for code in (PREFILL, DECODE):
            of_role = mine & (role == code)
            allocated += [
                float((of_role & ~draining & ready).sum()),
                float((of_role & ~draining & ~ready).sum()),
                float((of_role & draining).sum()),
            ]
        allocated += [
            allocated[0] + allocated[1] + allocated[2],
            allocated[3] + allocated[4] + allocated[5],
        ]
        allocated[6] *= policy.prefill.gpus_per_instance
        allocated[7] *= policy.decode.gpus_per_instance
        self._allocated[service] = allocated
        n_types = len(self.gpu_types)
        gpu = tab["gpu_type"]
        by_type = np.zeros(n_types)
        for code, rp in ((PREFILL, policy.prefill), (DECODE, policy.decode)):
            by_type += np.bincount(gpu[mine & (role == code)], minlength=n_types) * (
                rp.gpus_per_instance
            )
        self._allocated_by_type[service] = by_type.tolist()
        sim = self.sims.get(service)
        if sim is None:
            return
        decode_rows = mine & (role == DECODE)
        decode_ready = np.bincount(gpu[decode_rows & ~draining & ready], minlength=n_types)
        decode_draining = np.bincount(gpu[decode_rows & draining], minlength=n_types)
        prefill_rows = mine & (role == PREFILL) & ~draining & ready
        share = self._rdma_share(
            prefill_rows, decode_rows & ~draining, decode_rows & ~draining & ready
        )
        group = tab["group"]
        rdma = np.bincount(gpu[prefill_rows], weights=share[group[prefill_rows]], minlength=n_types)
        total = np.bincount(gpu[prefill_rows], minlength=n_types).astype(np.float64)
        prefill: dict[tuple[str, str], float] = {}
        for i, name in enumerate(self.gpu_types):
            if total[i] > 0:
                prefill[(name, "rdma")] = float(rdma[i])
                prefill[(name, "cross")] = float(total[i] - rdma[i])
        sim.set_counts(
            prefill,
            {name: int(decode_ready[i]) for i, name in enumerate(self.gpu_types)},
            {name: int(decode_draining[i]) for i, name in enumerate(self.gpu_types)},
        )

    def _rdma_share(
        self, prefill: np.ndarray, decode_all: np.ndarray, decode_ready: np.ndarray
    ) -> np.ndarray:
        """Per group: the share of (ready prefill, decode) instance pairs inside one RDMA
        subgroup; the decode side is the group's ready instances, or all of them while
        none is ready yet."""
        tab = self.table
        n_groups = max(len(self.groups), 1)
        n_sub = len(self.subgroups) + 1
        group = tab["group"]
        sub = tab["subgroup"] + 1  # 0 = no subgroup, never paired

        def per_group_subgroup(mask: np.ndarray) -> np.ndarray:
            keys = group[mask].astype(np.int64) * n_sub + sub[mask]
            return (
                np.bincount(keys, minlength=n_groups * n_sub)
                .reshape(n_groups, n_sub)
                .astype(np.float64)
            )

        p = per_group_subgroup(prefill)
        d_ready = per_group_subgroup(decode_ready)
        d_all = per_group_subgroup(decode_all)
        d = np.where(d_ready.sum(axis=1, keepdims=True) > 0, d_ready, d_all)
        pairs = (p[:, 1:] * d[:, 1:]).sum(axis=1)
        total = p.sum(axis=1) * d.sum(axis=1)
        share: np.ndarray = np.where(total > 0, pairs / np.maximum(total, 1.0), 0.0)
        return share

    # ------------------------------------------------------------------ MetricsSource

    def fetch(self, policies: Sequence[ServicePolicy], now_s: float) -> dict[str, ServiceMetrics]:
        """Every service's signals as Prometheus would return them at ``now_s``: from
        the last scrape at or before it, each ``Sample.at_s`` that scrape's time on the
        caller's clock (``SimConfig.prometheus_like``; without it, exact at ``now_s``)."""
        self.advance_to(self._sim_time(now_s))
        origin_s = self.time_origin_s if self.time_origin_s is not None else 0.0
        window_s = self.config.metrics_window_s
        out: dict[str, ServiceMetrics] = {}
        for policy in policies:
            sim = self.sims.get(policy.name)
            if sim is None:
                out[policy.name] = ServiceMetrics(policy.name)
                continue
            scrape = sim.scrape_s()
            sampled_at_s = origin_s + scrape if self.config.prometheus_like else now_s
            values = sim.window_metrics(window_s, at_s=scrape)
            # Any: a field name per signal, which mypy cannot match to ServiceMetrics'.
            samples: dict[str, Any] = {
                name: Sample(float(value), sampled_at_s)
                for name, value in values.items()
                if value is not None and math.isfinite(value)
            }
            lengths = sim.window_lengths(window_s, at_s=scrape)
            prompt_tokens = output_tokens = None
            if lengths is not None:
                le, prompt_cum, output_cum = lengths
                prompt_tokens = LengthBuckets(le, prompt_cum, sampled_at_s)
                output_tokens = LengthBuckets(le, output_cum, sampled_at_s)
            out[policy.name] = SimulatedServiceMetrics(
                policy.name,
                **samples,
                prompt_tokens=prompt_tokens,
                output_tokens=output_tokens,
                sim=sim,
                window_s=window_s,
                at_second=sim.t,
                scrape_second=scrape,
            )
        return out

    # ------------------------------------------------------------------ ClusterBackend

    def observe(self, cluster: ClusterSpec, policies: Sequence[ServicePolicy]) -> Observation:
        return Observation(self.fleet_state(cluster.name, [p.name for p in policies]))

    def fleet_state(self, cluster: str, services: Sequence[str] | None = None) -> FleetState:
        """The groups of ``cluster`` (of ``services``, or all), as observed now."""
        key = (cluster, tuple(sorted(services)) if services is not None else None)
        cached = self._state_cache.get(key)
        if cached is not None and cached[0] == self._version:
            return cached[1]
        state = self._fleet_state(cluster, services)
        self._state_cache[key] = (self._version, state)
        return state

    def _fleet_state(self, cluster: str, services: Sequence[str] | None) -> FleetState:
        tab = self.table
        t = self.t
        wanted = [
            self.service_index[s]
            for s in (services if services is not None else self.services)
            if s in self.service_index and self.policies[s].cluster == cluster
        ]
        mine = tab["alive"] & np.isin(tab["service"], wanted)
        draining = ~np.isnan(tab["drain_started_s"])
        starting_rows = mine & ~draining & (tab["ready_s"] > t)
        starting: dict[tuple[str, Role], int] = {}
        draining_counts: dict[tuple[str, Role], int] = {}
        for rows, out in ((starting_rows, starting), (mine & draining, draining_counts)):
            keys, counts = np.unique(
                tab["service"][rows] * 2 + tab["role"][rows], return_counts=True
            )
            for k, c in zip(keys.tolist(), counts.tolist(), strict=True):
                out[(self.services[k // 2], ROLES[k % 2])] = int(c)
        serving = mine & ~draining
        n_nodes = len(self.nodes) + 1
        keys = (tab["group"][serving].astype(np.int64) * 2 + tab["role"][serving]) * n_nodes + (
            tab["node"][serving] + 1
        )
        uniq, counts = np.unique(keys, return_counts=True)
        per_group: dict[int, dict[int, list[tuple[int, int]]]] = defaultdict(lambda: {0: [], 1: []})
        for k, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            group_role, node = divmod(k, n_nodes)
            g, r = divmod(group_role, 2)
            per_group[g][r].append((node - 1, c))
        groups: list[DeploymentGroup] = []
        for g in per_group:
            meta = self.groups[g]
            roles = {}
            for code, role in ((PREFILL, "prefill"), (DECODE, "decode")):
                entries = per_group[g][code]
                nodes = tuple(
                    sorted(
                        (NodeInstances(self.nodes[n], c) for n, c in entries if n >= 0),
                        key=lambda x: x.node,
                    )
                )
                roles[role] = GroupRole(
                    gpu_type=self._group_types.get((g, code))
                    or self.policies[meta.service].role(role).preferred_gpu_types()[0],
                    instances=sum(c for _n, c in entries),
                    nodes=nodes,
                )
            # Filled as WorkGroup.freeze and the live observation fill it: one type from
            # three sources (this table, a work group, API objects), nothing to share.
            groups.append(
                DeploymentGroup(
                    service=meta.service,
                    cluster=meta.cluster,
                    group_id=meta.group_id,
                    domain=meta.domain,
                    subgroup=meta.subgroup,
                    prefill=roles["prefill"],
                    decode=roles["decode"],
                )
            )
        groups.sort(key=lambda g: (g.service, g.group_id))
        return FleetState(
            cluster=cluster, groups=tuple(groups), starting=starting, draining=draining_counts
        )

    def diff(self, plan: Plan) -> Sequence[str]:
        return [str(change) for change in plan.changes]

    def apply(self, plan: Plan) -> Sequence[str]:
        """Carry out the plan's changes (module docstring); returns what was done."""
        desired = {(g.service, g.group_id): g for g in plan.groups}
        for group in plan.groups:
            self._group(group.service, group.group_id, group.cluster, group.domain, group.subgroup)
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
            self._group(group.service, group.group_id, group.cluster, group.domain, group.subgroup)
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

    def _group(
        self, service: str, group_id: str, cluster: str, domain: str, subgroup: str | None
    ) -> int:
        index = self.group_index.get((service, group_id))
        meta = _GroupMeta(service, group_id, cluster, domain, subgroup)
        if index is None:
            index = len(self.groups)
            self.groups.append(meta)
            self.group_index[(service, group_id)] = index
        else:
            self.groups[index] = meta
        return index

    def _apply_change(
        self, change: GroupChange, desired: DeploymentGroup | None, *, immediate: bool
    ) -> None:
        service = change.service
        if service not in self.policies:
            raise KeyError(f"plan changes service '{service}', which this fleet does not run")
        policy = self.policies[service]
        cluster = desired.cluster if desired is not None else policy.cluster
        group = self.group_index.get((service, change.group_id))
        if group is None:
            group = self._group(service, change.group_id, cluster, change.domain, None)
        code = ROLE_CODE[change.role]
        self._group_types[(group, code)] = change.gpu_type
        tab = self.table
        t = float(self.t)
        members = np.flatnonzero(
            tab["alive"]
            & np.isnan(tab["drain_started_s"])
            & (tab["group"] == group)
            & (tab["role"] == code)
        )
        want: dict[int, int] = {}
        if desired is not None:
            for entry in desired.role(change.role).nodes:
                node = self.node_index.get(f"{cluster}/{entry.node}")
                if node is not None:
                    want[node] = want.get(node, 0) + entry.instances
        have: dict[int, int] = defaultdict(int)
        for node in tab["node"][members].tolist():
            have[node] += 1
        delta = change.after - members.size
        if delta > 0:
            new_nodes: list[int] = []
            for node, count in sorted(want.items()):
                new_nodes += [node] * max(0, count - have.get(node, 0))
            new_nodes = (new_nodes + [-1] * delta)[:delta]
            meta = self.groups[group]
            fallback = (
                self.subgroup_index.get(f"{cluster}/{meta.subgroup}", -1) if meta.subgroup else -1
            )
            startup = 0.0 if immediate else policy.role(change.role).startup_s
            nodes = np.asarray(new_nodes, dtype=np.int32)
            subgroups = np.where(nodes >= 0, self.node_subgroup[np.maximum(nodes, 0)], fallback)
            tab.append(
                delta,
                service=self.service_index[service],
                group=group,
                role=code,
                gpu_type=self.gpu_index.get(change.gpu_type, 0),
                node=nodes,
                subgroup=subgroups,
                created_s=t,
                ready_s=t + startup,
            )
            self._next_event_s = min(self._next_event_s, t + startup)
        elif delta < 0:
            surplus = (
                {node: have[node] - want.get(node, 0) for node in have}
                if desired is not None
                else {}
            )
            starting = tab["ready_s"][members] > t
            with_surplus = np.array(
                [surplus.get(n, 1) > 0 for n in tab["node"][members].tolist()], dtype=bool
            )
            # Starting instances first (cancelled at no cost), then nodes with a
            # surplus against the placement, newest first.
            order = np.lexsort((-tab["created_s"][members], ~with_surplus, ~starting))
            for row in members[order[:-delta]].tolist():
                self._retire(row, t)
        self._changed([self.service_index[service]])

    def _retire(self, row: int, t: float) -> None:
        tab = self.table
        if tab["ready_s"][row] > t:
            tab["alive"][row] = False
            return
        tab["drain_started_s"][row] = t
        if tab["role"][row] == PREFILL:
            tab["drain_until_s"][row] = t + self.config.prefill_drain_s
            self._next_event_s = min(self._next_event_s, t + self.config.prefill_drain_s)
            return
        sim = self.sims.get(self.services[int(tab["service"][row])])
        if sim is None:
            tab["drain_until_s"][row] = t
            self._next_event_s = min(self._next_event_s, t)
        else:
            tab["drain_until_psi"][row] = (
                sim.decode_clock(self.gpu_types[int(tab["gpu_type"][row])]) + sim.out_p99
            )
            self._has_decode_drains = True

    # ------------------------------------------------------------------ results

    def instance_counts(self, service: str) -> dict[str, np.ndarray]:
        """Per-second instance and GPU counts of a service."""
        series = self.fleet_series[service]
        return {name: series.col(name) for name in FLEET_COLUMNS}

    def gpus_by_type(self, service: str) -> dict[str, np.ndarray]:
        """Per-second GPUs a service holds on each GPU type (both roles, from creation
        to the end of a drain, as ``instance_counts``' ``*_gpus``)."""
        series = self.gpu_type_series[service]
        return {name: series.col(name) for name in self.gpu_types}

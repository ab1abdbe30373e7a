"""The paper's findings (c) topology and (d) heterogeneity, as the project's own models
see them (issue #15, items 3 and 4). Every figure comes from the simulator, the
performance model and the prices in ``clusters/``; none is taken from the paper.

Finding (d), heterogeneity: the ``chat`` service replays a diurnal day (the Azure
conversation trace x50 tiled over ``--hours``, seed 7: the evaluation matrix's
``azure-x50`` cell; a synthetic day of the same service without ``shared/traces``) under
the default autoscaler (``heteroscale``, the planner), twice:

- *heterogeneous*: the repository's ``clusters/`` and ``policies/`` as they are (prefill
  on H800, decode on H20 first);
- *homogeneous*: a copy, in memory, where every node of the cluster carries the prefill
  GPU type and both roles of ``chat`` are pinned to it (the RDMA subgroups keep their
  switches; their scarcity class is derived again, all ``low`` now).

Each reports dollars per million output tokens served within SLO (``usd_per_mtok`` of
``reconciler.sim.evaluate``: GPU-hours per type x the cluster's ``cost_per_hour``, over
the output tokens of requests that met both SLOs), with GPU-hours, attainment and each
role's capacity per dollar on each type (``role_capacity``: what explains the figure).

Finding (c), topology: the same services are placed by a topology-aware placer and by
``TopologyUnawarePlacer`` (below: deployment groups keep their size and P/D pairing, but
each instance lands on a node drawn at random among those of an allowed GPU type with
room, anywhere in the cluster). Two views, both through the simulator's link model (a
prefill instance ships KV cache at ``network.rdma_gbps`` to a decode instance of its
group inside its RDMA subgroup, at ``network.cross_subgroup_gbps`` otherwise; a link of
utilisation rho takes 1 / (1 - rho) times as long, rho capped at
``SimConfig.max_link_utilisation``):

- *static*: every example service placed at its peak on its synthetic default day (the
  counts static-peak would hold) by CP-SAT (as ``plan`` places) and by the unaware
  placer; per service the share of P/D pairs inside one RDMA subgroup and the
  unloaded bandwidth per pair;
- *chat day*: the heterogeneous run above (greedy placement, as ``simulate`` places)
  against the same run with the unaware placer: the effective KV-transfer bandwidth per
  P/D pair, weighted by the prompt tokens each second's links carried (KV bytes moved /
  time moving them, M/M/1 slowdown included), and the TTFT it leads to.

Run: ``python benchmarks/bench_findings.py [--json F] [--plots DIR] [--hours H]
[--synthetic] [--static-placer cp-sat|greedy]``. Writes
``DIR/finding_heterogeneity.png`` and ``DIR/finding_kv_topology.png`` (default
``docs/``) and prints every figure they plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reconciler.desired import load_desired_state  # noqa: E402
from reconciler.desired.checks import check_cluster  # noqa: E402
from reconciler.desired.loader import DesiredState  # noqa: E402
from reconciler.desired.models import ClusterSpec, ServicePolicy  # noqa: E402
from reconciler.perfmodel.calibrate import shared_dir  # noqa: E402
from reconciler.perfmodel.instance import instance_perf, kv_transfer_s  # noqa: E402
from reconciler.placement.base import (  # noqa: E402
    PlacementRequest,
    PlacementResult,
    Placer,
    Shortfall,
)
from reconciler.policy import make_autoscaler  # noqa: E402
from reconciler.sim.default import synthetic_load_for  # noqa: E402
from reconciler.sim.engine import (  # noqa: E402
    LoadProfile,
    ServiceSim,
    SimConfig,
    synthetic_profile,
)
from reconciler.sim.evaluate import (  # noqa: E402
    PolicyResult,
    default_placer,
    peak_demand,
    role_capacity,
    run_autoscaler,
)
from reconciler.sim.fleet import SimulatedFleet  # noqa: E402
from reconciler.sim.load import load_with_requests  # noqa: E402
from reconciler.sim.workload import shape_for_service  # noqa: E402
from reconciler.state import (  # noqa: E402
    ROLES,
    DeploymentGroup,
    FleetState,
    GroupRole,
    NodeInstances,
    Role,
    Targets,
)
from reconciler.topology import Topology, fleet_used_gpus, topology_for  # noqa: E402

SERVICE = "chat"
AUTOSCALER = "heteroscale"
TRACE = "AzureLLMInferenceTrace_conv.csv"
RATE_SCALE = 50.0  # the evaluation matrix's azure-x50 cell
SEED = 7
HOURS = 8.0
STATIC_PEAK_SHARE = 0.4  # the embedded default day's peak (reconciler.sim.default)
PLOTS = ("finding_heterogeneity.png", "finding_kv_topology.png")


# --------------------------------------------------------------------------- the load


def chat_load(
    state: DesiredState, hours: float, seed: int, config: SimConfig, *, synthetic: bool = False
) -> LoadProfile:
    """The chat day: the Azure conversation trace x50 tiled over ``hours`` (the matrix's
    azure-x50 cell), or the service's synthetic day when asked or the trace is absent."""
    trace = None
    if not synthetic:
        shared = shared_dir()
        candidate = shared / "traces" / TRACE if shared is not None else None
        trace = candidate if candidate is not None and candidate.is_file() else None
    return load_with_requests(
        state, SERVICE, trace, RATE_SCALE if trace is not None else None, hours, seed, config
    ).profile


# --------------------------------------------------------------------------- (d) heterogeneity


def _retyped(value: Any, gpu_type: str) -> Any:
    """``value`` (a dumped cluster) with every ``gpu_type`` that is set replaced."""
    if isinstance(value, Mapping):
        return {
            k: gpu_type if k == "gpu_type" and v is not None else _retyped(v, gpu_type)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_retyped(v, gpu_type) for v in value]
    return value


def homogeneous_cluster(cluster: ClusterSpec, gpu_type: str) -> ClusterSpec:
    """The same switch tree with every node of ``gpu_type``. Declared subgroup classes
    are dropped: with one type everywhere they are all derived as ``low``."""
    data = _retyped(cluster.model_dump(by_alias=True, exclude_unset=True), gpu_type)
    for subgroup in data.get("rdma_subgroups", []):
        subgroup.pop("class", None)
    spec = ClusterSpec.model_validate(data)
    problems = check_cluster(spec)
    if problems:
        raise ValueError(f"homogeneous {cluster.name} is invalid: {problems}")
    return spec


def pinned_to(policy: ServicePolicy, gpu_type: str) -> ServicePolicy:
    """``policy`` with both roles allowed ``gpu_type`` only."""
    return policy.model_copy(
        update={
            role: policy.role(role).model_copy(update={"gpu_types": {gpu_type: 1.0}})
            for role in ROLES
        }
    )


def homogeneous_state(state: DesiredState, service: str = SERVICE) -> DesiredState:
    """A copy of ``state`` serving ``service`` alone on a fleet of its prefill GPU type,
    both roles pinned to that type (repository files untouched)."""
    policy = state.policies[service]
    gpu_type = policy.prefill.preferred_gpu_types()[0]
    pinned = pinned_to(policy, gpu_type)
    cluster = homogeneous_cluster(state.clusters[policy.cluster], gpu_type)
    return dataclasses.replace(state, policies={service: pinned}, clusters={cluster.name: cluster})


def capacity_per_usd(
    state: DesiredState, policy: ServicePolicy, profile: LoadProfile
) -> dict[str, dict[str, dict[str, float]]]:
    """Per role and priced GPU type of the policy's cluster: one instance's tokens/s at
    SLO on ``profile``'s mix with the role on that type (``role_capacity``: prefill at
    85 % of compute, decode at 70 % of the TBT SLO) and the million tokens it serves per
    dollar. A type the model does not fit on serves 0."""
    cluster = state.clusters[policy.cluster]
    out: dict[str, dict[str, dict[str, float]]] = {role: {} for role in ROLES}
    for gpu_type, gpu in sorted(cluster.gpu_types.items()):
        if gpu.cost_per_hour is None or gpu_type not in cluster.largest_node_gpus:
            continue
        capacity = role_capacity(state, pinned_to(policy, gpu_type), profile)
        for role, tps in (("prefill", capacity.prefill_tps), ("decode", capacity.decode_tps)):
            tps = tps if tps >= 1.0 else 0.0  # role_capacity floors "does not fit" at 1e-9
            usd_per_hour = gpu.cost_per_hour * policy.role(role).gpus_per_instance
            out[role][gpu_type] = {
                "tokens_per_s_per_instance": tps,
                "usd_per_instance_hour": usd_per_hour,
                "mtok_per_usd": tps * 3600 / 1e6 / usd_per_hour,
            }
    return out


def service_mix(name: str, seed: int) -> LoadProfile:
    """A service's own length mix, as the embedded default day draws it (a short
    probe: capacity depends on the lengths, not the rate)."""
    return synthetic_profile(
        shape_for_service(name), hours=0.1, peak_rps=50.0, seed=seed, trough_ratio=1.0, bursts=()
    )


def break_even_price(
    capacity: Mapping[str, Mapping[str, Mapping[str, float]]],
    role: str,
    gpu_type: str,
    reference_type: str,
    reference_price: float,
) -> float | None:
    """The price per GPU-hour at which ``gpu_type`` serves ``role`` as many tokens per
    dollar as ``reference_type`` at ``reference_price``."""
    ours = capacity[role].get(gpu_type, {}).get("tokens_per_s_per_instance")
    theirs = capacity[role].get(reference_type, {}).get("tokens_per_s_per_instance")
    if not ours or not theirs:
        return None
    return reference_price * ours / theirs


def run_figures(result: PolicyResult, state: DesiredState) -> dict[str, Any]:
    """The figures of one run that explain its cost per token."""
    cluster = state.clusters[state.policies[SERVICE].cluster]
    return {
        "usd_per_mtok": result.usd_per_mtok,
        "cost_usd": result.cost_usd,
        "currency": result.currency,
        "output_tokens_within_slo": result.output_tokens_within_slo,
        "gpu_hours": result.gpu_hours,
        "gpu_hours_prefill": result.gpu_hours_prefill,
        "gpu_hours_decode": result.gpu_hours_decode,
        "gpu_hours_by_type": dict(result.gpu_hours_by_type),
        "prices_usd_per_gpu_hour": {
            t: cluster.gpu_types[t].cost_per_hour for t in result.gpu_hours_by_type
        },
        "slo_attainment": result.slo_attainment,
        "ttft_attainment": result.ttft_attainment,
        "tbt_attainment": result.tbt_attainment,
        "ttft_p90_ms": result.ttft_quantile_ms,
        "tbt_p90_ms": result.tbt_quantile_ms,
        "peak_instances": {
            "prefill": result.peak_prefill_instances,
            "decode": result.peak_decode_instances,
        },
        "mean_gpu_util": {
            "prefill": result.mean_gpu_util_prefill,
            "decode": result.mean_gpu_util_decode,
        },
        "placement_shortfalls": result.placement_shortfalls,
        "notes": list(result.notes),
    }


# --------------------------------------------------------------------------- (c) topology


class TopologyUnawarePlacer:
    """A placer that ignores the switch tree: scale-out fills the service's groups up to
    their ``deployment_group`` size, then opens new ones of that size, and puts each new
    instance on a node drawn uniformly from the nodes of the role's GPU type (most
    preferred type with room first) that still have room, anywhere in the cluster.
    Scale-in removes the newest groups' instances first. Groups still pair prefill with
    decode (KV cache goes to the group's decode instances); only where they run differs
    from a topology-aware placement. Running instances never move.

    GPUs in use are counted as the topology-aware placers count them
    (``fleet_used_gpus``, instances being scaled in included, so a cycle never reuses
    GPUs still draining)."""

    name = "topology-unaware"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def place(self, request: PlacementRequest) -> PlacementResult:
        cluster = request.cluster
        topology = topology_for(cluster)
        free = topology.free_gpus(fleet_used_gpus(topology, request.current, request.policies))
        for draining in request.draining:
            index = topology.node_index.get(draining.node or "")
            if index is not None:
                size = (
                    draining.gpus_per_instance
                    or request.policies[draining.service].role(draining.role).gpus_per_instance
                )
                free[index] = max(0, int(free[index]) - draining.instances * size)
        groups = [g for g in request.current.groups if g.service not in request.targets]
        shortfalls: list[Shortfall] = []
        ordered = sorted(request.targets, key=lambda s: (-request.policies[s].priority, s))
        for service in ordered:
            placed, short = self._service(
                request, topology, free, service, request.targets[service]
            )
            groups += placed
            shortfalls += short
        return PlacementResult(
            cluster=cluster.name, groups=tuple(groups), shortfalls=tuple(shortfalls)
        )

    def _service(
        self,
        request: PlacementRequest,
        topology: Topology,
        free: np.ndarray,
        service: str,
        target: Targets,
    ) -> tuple[list[DeploymentGroup], list[Shortfall]]:
        policy = request.policies[service]
        cluster = request.cluster.name
        current = sorted(
            (g for g in request.current.groups if g.service == service),
            key=lambda g: _group_number(g.group_id),
        )
        # Per group and role: GPU type and instances per node (mutable working copy).
        work: list[tuple[str, dict[Role, str], dict[Role, dict[str, int]]]] = [
            (
                g.group_id,
                {r: g.role(r).gpu_type for r in ROLES},
                {r: {n.node: n.instances for n in g.role(r).nodes} for r in ROLES},
            )
            for g in current
        ]
        shape = {
            "prefill": policy.deployment_group.prefill_instances,
            "decode": policy.deployment_group.decode_instances,
        }
        wanted = {"prefill": target.prefill, "decode": target.decode}
        shortfalls: list[Shortfall] = []
        left: dict[Role, int] = {}
        for role in ROLES:
            have = sum(sum(placed[role].values()) for _id, _t, placed in work)
            if have > wanted[role]:
                self._remove(work, role, have - wanted[role])
            left[role] = max(0, wanted[role] - have)
            # Existing groups first, up to their size.
            for _id, group_types, group_nodes in work:
                room = max(0, shape[role] - sum(group_nodes[role].values()))
                take = min(room, left[role])
                left[role] -= self._spread(
                    topology, free, policy, role, group_types, group_nodes, take
                )
        taken = {g.group_id for g in request.current.groups if g.service == service}
        while left["prefill"] or left["decode"]:
            group_id = _new_group_id(cluster, taken | {w[0] for w in work})
            types = {r: policy.role(r).preferred_gpu_types()[0] for r in ROLES}
            nodes: dict[Role, dict[str, int]] = {"prefill": {}, "decode": {}}
            placed_any = False
            for role in ROLES:
                take = min(shape[role], left[role])
                if take == 0:
                    continue
                types[role] = self._type_with_room(topology, free, policy, role)
                placed = self._spread(topology, free, policy, role, types, nodes, take)
                left[role] -= placed
                placed_any = placed_any or placed > 0
            if not placed_any:
                break
            work.append((group_id, types, nodes))
        for role in ROLES:
            if left[role]:
                shortfalls.append(
                    Shortfall(
                        service,
                        role,
                        left[role],
                        "gpu_capacity",
                        f"no node of {', '.join(policy.role(role).preferred_gpu_types())} "
                        f"with {policy.role(role).gpus_per_instance} free GPUs",
                    )
                )
        out = []
        for group_id, types, nodes in work:
            if not any(sum(nodes[r].values()) for r in ROLES):
                continue
            roles = {
                r: GroupRole(
                    gpu_type=types[r],
                    instances=sum(nodes[r].values()),
                    nodes=tuple(NodeInstances(n, c) for n, c in sorted(nodes[r].items()) if c > 0),
                )
                for r in ROLES
            }
            # Spread over the cluster: no domain or subgroup holds the group.
            out.append(
                DeploymentGroup(
                    service, cluster, group_id, cluster, None, roles["prefill"], roles["decode"]
                )
            )
        return out, shortfalls

    @staticmethod
    def _remove(
        work: list[tuple[str, dict[Role, str], dict[Role, dict[str, int]]]], role: Role, count: int
    ) -> None:
        for _id, _types, nodes in reversed(work):
            for node in sorted(nodes[role], reverse=True):
                if count == 0:
                    return
                here = min(count, nodes[role][node])
                nodes[role][node] -= here
                count -= here
            nodes[role] = {n: c for n, c in nodes[role].items() if c > 0}

    @staticmethod
    def _type_with_room(
        topology: Topology, free: np.ndarray, policy: ServicePolicy, role: Role
    ) -> str:
        size = policy.role(role).gpus_per_instance
        types = policy.role(role).preferred_gpu_types()
        for gpu_type in types:
            code = topology.type_code(gpu_type)
            if code >= 0 and bool(((topology.node_type == code) & (free >= size)).any()):
                return gpu_type
        return types[0]

    def _spread(
        self,
        topology: Topology,
        free: np.ndarray,
        policy: ServicePolicy,
        role: Role,
        types: dict[Role, str],
        nodes: dict[Role, dict[str, int]],
        count: int,
    ) -> int:
        """Put up to ``count`` instances of ``role`` on random nodes with room; returns
        how many found one."""
        size = policy.role(role).gpus_per_instance
        code = topology.type_code(types[role])
        placed = 0
        for _ in range(count):
            candidates = np.flatnonzero((topology.node_type == code) & (free >= size))
            if code < 0 or candidates.size == 0:
                break
            index = int(self.rng.choice(candidates))
            free[index] -= size
            name = topology.nodes[index].name
            nodes[role][name] = nodes[role].get(name, 0) + 1
            placed += 1
        return placed


def _group_number(group_id: str) -> tuple[int, str]:
    tail = group_id.rsplit("-", 1)[-1]
    return (int(tail) if tail.isdigit() else 0, group_id)


def _new_group_id(cluster: str, taken: set[str]) -> str:
    n = 1
    while f"g-{cluster}-{n}" in taken:
        n += 1
    return f"g-{cluster}-{n}"


def pair_links(topology: Topology, groups: tuple[DeploymentGroup, ...], service: str) -> float:
    """The share of a service's prefill-decode instance pairs (within each group) whose
    nodes are in one RDMA subgroup, each prefill instance weighted equally: the rule the
    simulated fleet uses to split prefill instances between the two link classes."""
    rdma = total = 0.0
    for group in groups:
        if group.service != service:
            continue
        per_sub: dict[Role, dict[str, int]] = {
            "prefill": defaultdict(int),
            "decode": defaultdict(int),
        }
        for role in ROLES:
            for placed in group.role(role).nodes:
                index = topology.node_index[placed.node]
                per_sub[role][topology.subgroup_of_node(index)] += placed.instances
        prefill = sum(per_sub["prefill"].values())
        decode = sum(per_sub["decode"].values())
        if prefill == 0 or decode == 0:
            continue
        same = sum(n * per_sub["decode"].get(s, 0) for s, n in per_sub["prefill"].items())
        rdma += prefill * same / (prefill * decode)
        total += prefill
    return rdma / total if total else math.nan


def bare_gbps(rdma_share: float, cluster: ClusterSpec) -> float:
    """Unloaded bandwidth per P/D pair of a link mix: KV bytes over the time moving them
    (a harmonic mean: transfer time, not bandwidth, adds up)."""
    net = cluster.network
    return 1.0 / (rdma_share / net.rdma_gbps + (1.0 - rdma_share) / net.cross_subgroup_gbps)


def static_targets(state: DesiredState, hours: float, seed: int, config: SimConfig) -> dict:
    """Every example service at the peak of its synthetic default day (the counts
    static-peak holds: peak 60 s demand over one instance's capacity at SLO)."""
    targets: dict[str, Targets] = {}
    for index, (name, policy) in enumerate(sorted(state.policies.items())):
        profile = synthetic_load_for(
            state,
            policy,
            hours=hours,
            seed=seed + index,
            peak_share=STATIC_PEAK_SHARE,
            config=config,
        )
        capacity = role_capacity(state, policy, profile)
        prefill_tps, decode_tps = peak_demand(profile)
        counts = []
        for role, demand, per_instance in (
            ("prefill", prefill_tps, capacity.prefill_tps),
            ("decode", decode_tps, capacity.decode_tps),
        ):
            bounds = policy.role(role)
            need = math.ceil(demand / per_instance)
            counts.append(min(max(need, bounds.min_instances, 1), bounds.max_instances))
        targets[name] = Targets(name, counts[0], counts[1])
    return targets


def static_placement(
    state: DesiredState, targets: Mapping[str, Targets], placers: Mapping[str, Placer]
) -> dict[str, Any]:
    """Per placer and service: the share of P/D pairs inside one RDMA subgroup and the
    unloaded bandwidth per pair, every service of each cluster placed at once."""
    out: dict[str, Any] = {}
    for label, placer in placers.items():
        per_service: dict[str, Any] = {}
        shortfalls = 0
        wall_s = 0.0
        for cluster_name, cluster in sorted(state.clusters.items()):
            policies = {p.name: p for p in state.policies_for(cluster_name)}
            if not policies:
                continue
            started = time.perf_counter()
            result = placer.place(
                PlacementRequest(
                    cluster=cluster,
                    policies=policies,
                    current=FleetState(cluster_name),
                    targets={n: targets[n] for n in policies},
                )
            )
            wall_s += time.perf_counter() - started
            shortfalls += sum(s.instances for s in result.shortfalls)
            topology = topology_for(cluster)
            for name in sorted(policies):
                share = pair_links(topology, result.groups, name)
                per_service[name] = {
                    "prefill": targets[name].prefill,
                    "decode": targets[name].decode,
                    "rdma_pair_share": share,
                    "kv_gbps": bare_gbps(share, cluster) if math.isfinite(share) else None,
                    "groups": sum(1 for g in result.groups if g.service == name),
                }
        out[label] = {"services": per_service, "shortfall_instances": shortfalls, "wall_s": wall_s}
    return out


def link_figures(sim: ServiceSim, horizon_s: int) -> dict[str, Any]:
    """The simulator's KV links over the run, weighted by the prompt tokens each second
    moved: the effective bandwidth per P/D pair (KV bytes / time moving them, M/M/1
    slowdown included, and without it), the share on RDMA, and the mean slowdown."""
    tokens = sim.series.col("prefill_tokens", 0, horizon_s)
    loaded = np.zeros_like(tokens)
    bare = np.zeros_like(tokens)
    rdma = np.zeros_like(tokens)
    slowdown = np.zeros_like(tokens)
    for i, pool in enumerate(sim.prefill_pools):
        share = sim.series.col(f"p{i}_share", 0, horizon_s)
        slow = sim.series.col(f"p{i}_slowdown", 0, horizon_s)
        loaded += share * slow / pool.link_gbps
        bare += share / pool.link_gbps
        slowdown += share * slow
        if pool.link == "rdma":
            rdma += share
    total = float(tokens.sum())
    if total <= 0:
        return {"kv_gbps": None, "kv_gbps_unloaded": None, "rdma_share": None}
    kv_gbps = total / float(tokens @ loaded)
    per_request_kv_gbit = sim.profile.prompt_mean * sim.kv_bytes_per_token * 8 / 1e9
    return {
        "kv_gbps": kv_gbps,
        "kv_gbps_unloaded": total / float(tokens @ bare),
        "rdma_share": float(tokens @ rdma) / total,
        "mean_link_slowdown": float(tokens @ slowdown) / total,
        # The mean prompt's KV cache at that bandwidth (what TTFT pays for it).
        "kv_transfer_ms_mean_prompt": 1000.0 * per_request_kv_gbit / kv_gbps,
    }


@dataclass(frozen=True)
class ChatRun:
    result: PolicyResult
    links: dict[str, Any]


def run_chat(
    state: DesiredState,
    profile: LoadProfile,
    seed: int,
    config: SimConfig,
    placer: Placer | None = None,
) -> ChatRun:
    """``chat`` under the default autoscaler, with its simulator's link figures (read
    from the run's fleet: its result does not carry the per-second link shares)."""
    fleets: list[SimulatedFleet] = []
    result = run_autoscaler(
        state,
        SERVICE,
        profile,
        make_autoscaler(AUTOSCALER),
        name=AUTOSCALER,
        config=config,
        placer=placer,
        on_fleet=fleets.append,
    )
    if result.failed is not None:
        raise RuntimeError(f"{AUTOSCALER} failed: {result.failed}")
    return ChatRun(result, link_figures(fleets[-1].sims[SERVICE], profile.horizon_s))


def idle_ttft_ms(state: DesiredState, profile: LoadProfile, kv_gbps: float) -> float:
    """The mean prompt's TTFT on an idle prefill instance of the preferred type with its
    KV cache moved at ``kv_gbps``: the part of TTFT placement decides, without queues."""
    policy = state.policies[SERVICE]
    cluster = state.clusters[policy.cluster]
    gpu_type = policy.prefill.preferred_gpu_types()[0]
    perf = instance_perf(
        policy.model, gpu_type, cluster.gpu_types[gpu_type], policy.prefill.gpus_per_instance
    )
    prompt = profile.prompt_mean
    seconds = float(perf.prefill_latency_s(prompt)) + float(
        kv_transfer_s(prompt, policy.model.kv_bytes_per_token, kv_gbps)
    )
    return 1000.0 * seconds


# --------------------------------------------------------------------------- findings


def findings(
    state: DesiredState,
    profile: LoadProfile,
    *,
    seed: int = SEED,
    config: SimConfig | None = None,
    static_placer: str = "cp-sat",
    static_hours: float = HOURS,
) -> dict[str, Any]:
    """Both findings as one JSON document (module docstring)."""
    config = config or SimConfig()
    started = time.perf_counter()
    homogeneous = homogeneous_state(state)
    aware = run_chat(state, profile, seed, config)
    homog = run_chat(homogeneous, profile, seed, config)
    unaware = run_chat(state, profile, seed, config, TopologyUnawarePlacer(seed))
    het_usd = aware.result.usd_per_mtok
    hom_usd = homog.result.usd_per_mtok
    # Tokens per dollar of each role on each type: why one fleet is cheaper.
    capacity = {SERVICE: capacity_per_usd(state, state.policies[SERVICE], profile)}
    for index, (name, policy) in enumerate(sorted(state.policies.items())):
        if name != SERVICE:
            capacity[name] = capacity_per_usd(state, policy, service_mix(name, seed + index))
    cluster = state.clusters[state.policies[SERVICE].cluster]
    own_types = {r: state.policies[SERVICE].role(r).preferred_gpu_types()[0] for r in ROLES}
    reference_price = cluster.gpu_types[own_types["prefill"]].cost_per_hour
    heterogeneity = {
        "service": SERVICE,
        "autoscaler": AUTOSCALER,
        "heterogeneous_usd_per_mtok": het_usd,
        "homogeneous_usd_per_mtok": hom_usd,
        "homogeneous_over_heterogeneous": hom_usd / het_usd if het_usd and hom_usd else None,
        "gpu_types": {
            "heterogeneous": own_types,
            "homogeneous": {r: own_types["prefill"] for r in ROLES},
        },
        "heterogeneous": run_figures(aware.result, state),
        "homogeneous": run_figures(homog.result, homogeneous),
        "capacity_per_usd": capacity,
        # The decode type's price at which it matches the prefill type per token.
        "decode_break_even_usd_per_gpu_hour": {
            "gpu_type": own_types["decode"],
            "price_now": cluster.gpu_types[own_types["decode"]].cost_per_hour,
            "break_even": None
            if reference_price is None
            else break_even_price(
                capacity[SERVICE],
                "decode",
                own_types["decode"],
                own_types["prefill"],
                reference_price,
            ),
        },
    }
    targets = static_targets(state, static_hours, seed, config)
    static = static_placement(
        state,
        targets,
        {
            f"topology-aware ({static_placer})": default_placer(static_placer),
            "topology-unaware": TopologyUnawarePlacer(seed),
        },
    )
    aware_gbps = aware.links["kv_gbps"]
    unaware_gbps = unaware.links["kv_gbps"]
    runs = {"topology-aware (greedy)": aware, "topology-unaware": unaware}
    kv_topology = {
        "service": SERVICE,
        "autoscaler": AUTOSCALER,
        "topology_aware_kv_gbps": aware_gbps,
        "topology_unaware_kv_gbps": unaware_gbps,
        "bandwidth_loss": 1.0 - unaware_gbps / aware_gbps if aware_gbps and unaware_gbps else None,
        "ttft_p90_ms_difference": _diff(
            unaware.result.ttft_quantile_ms, aware.result.ttft_quantile_ms
        ),
        "idle_ttft_ms_mean_prompt_difference": idle_ttft_ms(state, profile, unaware_gbps)
        - idle_ttft_ms(state, profile, aware_gbps),
        "network": state.clusters[state.policies[SERVICE].cluster].network.model_dump(),
        "max_link_utilisation": config.max_link_utilisation,
        "runs": {
            label: {
                **run.links,
                "idle_ttft_ms_mean_prompt": idle_ttft_ms(state, profile, run.links["kv_gbps"]),
                "ttft_p90_ms": run.result.ttft_quantile_ms,
                "ttft_attainment": run.result.ttft_attainment,
                "slo_attainment": run.result.slo_attainment,
                "gpu_hours": run.result.gpu_hours,
                "gpu_hours_prefill": run.result.gpu_hours_prefill,
                "gpu_hours_decode": run.result.gpu_hours_decode,
                "peak_instances": {
                    "prefill": run.result.peak_prefill_instances,
                    "decode": run.result.peak_decode_instances,
                },
                "cost_usd": run.result.cost_usd,
                "usd_per_mtok": run.result.usd_per_mtok,
                "placement_shortfalls": run.result.placement_shortfalls,
            }
            for label, run in runs.items()
        },
        "static_placement": static,
    }
    return {
        "load": {
            "name": profile.name,
            "horizon_s": profile.horizon_s,
            "requests": profile.requests,
            "prompt_mean": profile.prompt_mean,
            "output_mean": profile.output_mean,
            "seed": seed,
        },
        "heterogeneity": heterogeneity,
        "kv_topology": kv_topology,
        "wall_s": time.perf_counter() - started,
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# --------------------------------------------------------------------------- report


def _f(value: float | None, digits: int = 2, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.{digits}f}{unit}"


def report(document: dict[str, Any]) -> str:
    """Every figure the plots show, as text."""
    h = document["heterogeneity"]
    k = document["kv_topology"]
    load = document["load"]
    lines = [
        f"load: {load['name']}, {load['horizon_s']} s, {load['requests']:,.0f} requests "
        f"(mean {load['prompt_mean']:.0f} prompt / {load['output_mean']:.0f} output tokens)",
        "",
        f"finding (d) heterogeneity: service {h['service']}, autoscaler {h['autoscaler']}",
        f"{'fleet':<15}{'P/D type':>11}{'USD/Mtok':>10}{'cost USD':>10}{'GPU-h P+D':>15}"
        f"{'by type':>20}{'SLO ok':>9}{'TTFT p90':>10}{'TBT p90':>9}{'peak P+D':>10}",
    ]
    for name in ("heterogeneous", "homogeneous"):
        r = h[name]
        types = h["gpu_types"][name]
        by_type = ", ".join(f"{t} {v:,.0f}" for t, v in sorted(r["gpu_hours_by_type"].items()))
        split = f"{r['gpu_hours_prefill']:,.0f}+{r['gpu_hours_decode']:,.0f}"
        peak = f"{r['peak_instances']['prefill']}+{r['peak_instances']['decode']}"
        lines.append(
            f"{name:<15}{types['prefill'] + '/' + types['decode']:>11}"
            f"{_f(r['usd_per_mtok'], 3):>10}{_f(r['cost_usd'], 0):>10}{split:>15}{by_type:>20}"
            f"{_f(100 * r['slo_attainment'], 2, '%'):>9}{_f(r['ttft_p90_ms'], 0, ' ms'):>10}"
            f"{_f(r['tbt_p90_ms'], 1, ' ms'):>9}{peak:>10}"
        )
    ratio = h["homogeneous_over_heterogeneous"]
    lines.append(
        f"homogeneous / heterogeneous USD per Mtok: {_f(ratio, 3)}x "
        f"({_f(None if ratio is None else 100 * (ratio - 1), 1, '%')} per token)"
    )
    even = h["decode_break_even_usd_per_gpu_hour"]
    lines.append(
        f"decode on {even['gpu_type']} matches decode on {h['gpu_types']['homogeneous']['decode']} "
        f"per token at {_f(even['break_even'], 3)} USD per GPU-hour (now "
        f"{_f(even['price_now'], 2)})"
    )
    lines.append(
        "tokens/s per instance at SLO and million tokens per USD, per role and GPU type "
        f"(role_capacity; {h['service']} on this day's mix, the others on their own):"
    )
    for service, roles in h["capacity_per_usd"].items():
        for role, per_type in roles.items():
            cells = "   ".join(
                f"{t} {c['tokens_per_s_per_instance']:>7,.0f} tok/s {c['mtok_per_usd']:>6.2f} Mtok/USD"
                for t, c in per_type.items()
            )
            lines.append(f"  {service:<10}{role:<8}{cells}")
    lines += [
        "",
        f"finding (c) topology: service {k['service']}, autoscaler {k['autoscaler']}; links "
        f"{k['network']['rdma_gbps']:g} Gb/s RDMA inside a subgroup, "
        f"{k['network']['cross_subgroup_gbps']:g} Gb/s across, M/M/1 slowdown "
        f"(rho <= {k['max_link_utilisation']:g})",
        f"{'placement (chat day)':<26}{'KV Gb/s':>9}{'unloaded':>10}{'on RDMA':>9}"
        f"{'slowdown':>10}{'KV ms':>8}{'idle TTFT':>11}{'TTFT p90':>10}{'SLO ok':>9}{'GPU-h':>8}",
    ]
    for label, r in k["runs"].items():
        lines.append(
            f"{label:<26}{_f(r['kv_gbps'], 1):>9}{_f(r['kv_gbps_unloaded'], 1):>10}"
            f"{_f(100 * r['rdma_share'], 1, '%'):>9}{_f(r['mean_link_slowdown'], 2, 'x'):>10}"
            f"{_f(r['kv_transfer_ms_mean_prompt'], 1):>8}"
            f"{_f(r['idle_ttft_ms_mean_prompt'], 0, ' ms'):>11}{_f(r['ttft_p90_ms'], 0, ' ms'):>10}"
            f"{_f(100 * r['slo_attainment'], 2, '%'):>9}{_f(r['gpu_hours'], 0):>8}"
        )
    loss = k["bandwidth_loss"]
    lines.append(
        f"effective KV bandwidth per P/D pair: aware {_f(k['topology_aware_kv_gbps'], 1)} Gb/s, "
        f"unaware {_f(k['topology_unaware_kv_gbps'], 1)} Gb/s "
        f"({_f(None if loss is None else 100 * loss, 1, '%')} lost); TTFT p90 "
        f"{_f(k['ttft_p90_ms_difference'], 0, ' ms')}, idle TTFT of the mean prompt "
        f"{_f(k['idle_ttft_ms_mean_prompt_difference'], 0, ' ms')} (unaware - aware)"
    )
    runs = list(k["runs"].values())
    lines.append(
        "GPU-hours prefill+decode: "
        + ", ".join(
            f"{label} {r['gpu_hours_prefill']:,.0f}+{r['gpu_hours_decode']:,.0f} "
            f"(peak {r['peak_instances']['prefill']}+{r['peak_instances']['decode']}, "
            f"{_f(r['usd_per_mtok'], 3)} USD/Mtok)"
            for label, r in k["runs"].items()
        )
        + f"; unaware / aware GPU-hours {_f(runs[1]['gpu_hours'] / runs[0]['gpu_hours'], 3)}x"
    )
    lines.append("static placement, every example service at its default day's peak:")
    for label, placed in k["static_placement"].items():
        lines.append(
            f"  {label} ({placed['wall_s']:.1f} s, {placed['shortfall_instances']} instances short)"
        )
        for name, s in placed["services"].items():
            share = s["rdma_pair_share"]
            lines.append(
                f"    {name:<10}{s['prefill']:>4} P +{s['decode']:>4} D in {s['groups']:>3} groups: "
                f"{_f(None if share is None else 100 * share, 1, '%')} of P/D pairs on RDMA, "
                f"{_f(s['kv_gbps'], 1)} Gb/s per pair"
            )
    return "\n".join(lines)


def plot(document: dict[str, Any], folder: Path) -> list[Path]:
    """The two figures (module docstring), matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    h = document["heterogeneity"]
    k = document["kv_topology"]
    names = ("heterogeneous", "homogeneous")
    colours = {"h800": "#c44e52", "h20": "#4c72b0", "l20": "#55a868"}

    fig, (cost_ax, hours_ax, decode_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [
        f"{n}\n{h['gpu_types'][n]['prefill']} P / {h['gpu_types'][n]['decode']} D" for n in names
    ]
    values = [h[n]["usd_per_mtok"] or 0.0 for n in names]
    bars = cost_ax.bar(labels, values, color=["#4c72b0", "#c44e52"])
    cost_ax.bar_label(bars, labels=[f"{v:.3f}" for v in values])
    cost_ax.set_ylabel("USD per million output tokens within SLO")
    cost_ax.set_title(f"{h['service']} day ({h['autoscaler']}): cost per token")
    bottom = np.zeros(len(names))
    for gpu_type in sorted({t for n in names for t in h[n]["gpu_hours_by_type"]}):
        heights = np.array([h[n]["gpu_hours_by_type"].get(gpu_type, 0.0) for n in names])
        hours_ax.bar(
            labels, heights, bottom=bottom, color=colours.get(gpu_type, "#8c8c8c"), label=gpu_type
        )
        bottom += heights
    for i, total in enumerate(bottom):
        hours_ax.text(i, total, f"{total:,.0f}", ha="center", va="bottom")
    hours_ax.set_ylabel("GPU-hours")
    hours_ax.set_title("GPU-hours by GPU type")
    hours_ax.legend(fontsize=8)
    capacity = h["capacity_per_usd"]
    services = list(capacity)
    types = sorted({t for c in capacity.values() for t in c["decode"]})
    width = 0.8 / max(len(types), 1)
    for i, gpu_type in enumerate(types):
        per_usd = [
            capacity[sv]["decode"].get(gpu_type, {}).get("mtok_per_usd", 0.0) for sv in services
        ]
        bars = decode_ax.bar(
            np.arange(len(services)) + (i - (len(types) - 1) / 2) * width,
            per_usd,
            width,
            color=colours.get(gpu_type, "#8c8c8c"),
            label=gpu_type,
        )
        # A type the model does not fit on serves nothing: labelled, not drawn.
        decode_ax.bar_label(
            bars, labels=[f"{v:.1f}" if v > 0 else "n/a" for v in per_usd], fontsize=7
        )
    decode_ax.set_xticks(np.arange(len(services)), services)
    decode_ax.set_ylabel("decode: million output tokens per USD")
    decode_ax.set_title("decode tokens per dollar at the TBT SLO")
    decode_ax.legend(fontsize=8)
    fig.tight_layout()
    first = folder / PLOTS[0]
    fig.savefig(first, dpi=110)
    plt.close(fig)

    fig, (bw_ax, ttft_ax, static_ax) = plt.subplots(1, 3, figsize=(14, 4))
    labels = list(k["runs"])
    x = np.arange(len(labels))
    loaded = [k["runs"][lb]["kv_gbps"] for lb in labels]
    bare = [k["runs"][lb]["kv_gbps_unloaded"] for lb in labels]

    def paired_bars(
        ax: Any, left: tuple[str, list[float], str], right: tuple[str, list[float], str]
    ) -> None:
        """Two bars per placement, each (legend, values, colour), labelled."""
        for offset, (legend, values, colour) in ((-0.2, left), (0.2, right)):
            bars = ax.bar(x + offset, values, 0.4, label=legend, color=colour)
            ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.legend(fontsize=8)

    paired_bars(
        bw_ax,
        ("links unloaded", bare, "#8da0cb"),
        ("with link load (M/M/1)", loaded, "#4c72b0"),
    )
    bw_ax.set_ylabel("effective KV Gb/s per P/D pair")
    bw_ax.set_title(f"{k['service']} day: KV-transfer bandwidth")
    idle = [k["runs"][lb]["idle_ttft_ms_mean_prompt"] for lb in labels]
    p90 = [k["runs"][lb]["ttft_p90_ms"] or 0.0 for lb in labels]
    paired_bars(
        ttft_ax,
        ("mean prompt, idle instance", idle, "#a6d854"),
        ("p90 over the day (simulated)", p90, "#66a61e"),
    )
    ttft_ax.set_ylabel("TTFT ms")
    ttft_ax.set_title("TTFT")
    static = k["static_placement"]
    services = sorted({s for placed in static.values() for s in placed["services"]})
    width = 0.8 / max(len(static), 1)
    for i, (label, placed) in enumerate(static.items()):
        shares = [100 * (placed["services"][s]["rdma_pair_share"] or 0.0) for s in services]
        bars = static_ax.bar(
            np.arange(len(services)) + (i - (len(static) - 1) / 2) * width,
            shares,
            width,
            label=label,
        )
        static_ax.bar_label(bars, labels=[f"{v:.0f}" for v in shares], fontsize=8)
    static_ax.set_xticks(np.arange(len(services)), services)
    static_ax.set_ylabel("% of P/D pairs inside one RDMA subgroup")
    static_ax.set_title("every service at its peak, placed at once")
    static_ax.set_ylim(0, 115)
    static_ax.legend(fontsize=8)
    fig.tight_layout()
    second = folder / PLOTS[1]
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return [first, second]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every figure as JSON here")
    parser.add_argument("--plots", type=Path, default=REPO / "docs", help="folder for the PNGs")
    parser.add_argument("--hours", type=float, default=HOURS, help="length of the day")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--synthetic", action="store_true", help="the service's synthetic day, not the trace"
    )
    parser.add_argument("--static-placer", choices=("cp-sat", "greedy"), default="cp-sat")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    state = load_desired_state(REPO)
    config = SimConfig()
    profile = chat_load(state, args.hours, args.seed, config, synthetic=args.synthetic)
    document = findings(
        state,
        profile,
        seed=args.seed,
        config=config,
        static_placer=args.static_placer,
        static_hours=args.hours,
    )
    print(report(document))
    for path in plot(document, args.plots):
        print(f"wrote {path}")
    if args.json:
        args.json.write_text(json.dumps(_jsonable(document), indent=2) + "\n")
        print(f"wrote {args.json}")
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

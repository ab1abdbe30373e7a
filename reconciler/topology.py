"""The switch topology of one cluster: S2 -> S1 -> S0 -> node -> GPU slots, RDMA
subgroups and their scarcity class, the scheduling domains a deployment group can be
pinned to, and free GPUs per domain and GPU type for a given fleet state.

Design
------
- ``Topology.graph`` is a networkx ``DiGraph`` rooted at the cluster. Every switch and
  node is a graph node (id ``"s2:<name>"``, ``"s1:<name>"``, ``"s0:<name>"``,
  ``"node:<name>"``), each carrying ``kind`` and, for nodes, ``gpu_type`` and ``gpus``.
  GPU slots are *aggregated* on the node (``gpus`` attribute) by default: per-GPU
  vertices multiply the graph by nine for no information a placer uses (all GPUs of a
  node are one type under one S0). ``build_topology(spec, gpu_slots=True)`` adds them
  (``"gpu:<node>/<i>"``) for callers that want them. Measured on the 20,000-GPU
  benchmark fleet (2,500 nodes): see ``benchmarks/bench_placement.py`` (it prints both).
- The placers never walk the graph in their hot loops: the same facts are kept as flat
  arrays (``node_gpus``, ``node_type``, ``node_s1``) indexed by a node's position in
  ``ClusterSpec.nodes``, and every domain knows its node indices.
- RDMA subgroups come from ``ClusterSpec.rdma_subgroups``; their class is derived with
  ``reconciler.desired.checks.derive_subgroup_class`` (one concept, one place). S1
  switches that no declared subgroup lists form one *implicit* subgroup per S2, named
  after the S2, on the assumption that an S2 fabric is RDMA-connected (the common case
  in the paper, where groups typically share an S2).
- Scheduling domains (``SchedulingDomain``) are where a *new* deployment group can be
  pinned, per affinity: ``s1`` -> one S1 switch; ``s2`` -> the part of one S2 that lies
  in one RDMA subgroup (a whole S2 whenever the subgroup is declared per S2);
  ``cluster`` (loose) -> one whole RDMA subgroup (domain = the cluster name). Keeping
  loose groups inside a subgroup costs nothing -- a service may open as many groups as
  it needs -- and keeps their KV-cache transfer on RDMA.
- Domains nest into a laminar family of *regions* (sets of S1 switches): cluster ⊃
  subgroup ⊃ (S2 ∩ subgroup) ⊃ S1. Capacity constraints written per region and GPU
  type are then exact for GPU counts (flow on a tree), which is what lets the CP-SAT
  placer work on aggregated counts instead of GPUs.

All functions are pure; ``topology_for`` memoises on the identity of the (immutable)
``ClusterSpec`` so a reconcile loop builds a cluster's topology once per revision.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from threading import Lock

import networkx as nx
import numpy as np

from reconciler.desired.checks import derive_subgroup_class, subgroup_s1s
from reconciler.desired.models import Affinity, ClusterSpec, Node, SubgroupClass
from reconciler.state import DeploymentGroup, FleetState, Role

CLASS_RANK: dict[SubgroupClass, int] = {"low": 0, "medium": 1, "high": 2}
"""Scarcity of a subgroup class: higher is scarcer (keep it free for those who need it)."""

_AFFINITY_DEPTH: dict[Affinity, int] = {"cluster": 1, "s2": 2, "s1": 3}


@dataclass(frozen=True)
class Subgroup:
    """An RDMA subgroup: S1 switches whose machines reach each other over RDMA."""

    name: str
    s1_switches: tuple[str, ...]
    s2_switches: tuple[str, ...]
    gpu_types: frozenset[str]
    subgroup_class: SubgroupClass
    declared: bool  # False for the implicit per-S2 subgroup of unlisted S1 switches

    @property
    def class_rank(self) -> int:
        return CLASS_RANK[self.subgroup_class]


@dataclass(frozen=True)
class Region:
    """A node of the laminar region tree: a set of S1 switches (see module docstring)."""

    index: int
    s1_switches: frozenset[str]
    parent: int | None
    depth: int  # 0 = cluster, then subgroup, S2 part, S1
    label: str  # human-readable, e.g. "pod-a" or "mp-a1"


@dataclass(frozen=True)
class SchedulingDomain:
    """Where a deployment group can be pinned: an S1, an S2 part inside one subgroup, a
    whole subgroup (loose affinity), or -- only for groups found running so -- the
    whole cluster."""

    key: str  # unique, e.g. "s2/pod-a/rg-a"
    affinity: Affinity
    domain: str  # DeploymentGroup.domain: switch name, or the cluster name
    subgroup: str | None  # DeploymentGroup.subgroup
    subgroup_class: SubgroupClass
    region: int  # index into Topology.regions
    s1_switches: tuple[str, ...]
    node_indices: tuple[int, ...]  # positions in Topology.nodes, in spec order
    gpu_types: frozenset[str]

    @property
    def class_rank(self) -> int:
        return CLASS_RANK[self.subgroup_class]

    @property
    def group_label(self) -> str:
        """What the id of a new group placed here is made from (``new_group_id``): the
        switch, or for loose affinity the subgroup (the cluster when it spans several).
        ``reconciler.desired.checks.group_labels`` lists them from the cluster file."""
        if self.affinity != "cluster":
            return self.domain
        return self.subgroup or self.domain

    def describe(self) -> str:
        """How a user would name this domain: 'S2 pod-a (subgroup rg-a)'."""
        level = {"s1": "S1", "s2": "S2", "cluster": "cluster"}[self.affinity]
        if self.subgroup is None:
            return f"{level} {self.domain}"
        if self.affinity == "cluster":
            return f"subgroup {self.subgroup}"
        return f"{level} {self.domain} (subgroup {self.subgroup})"


@dataclass(frozen=True, eq=False)
class Topology:
    """One cluster's switch hierarchy with derived subgroups, regions and domains."""

    cluster: str
    graph: nx.DiGraph
    nodes: tuple[Node, ...]
    node_index: Mapping[str, int]
    node_gpus: np.ndarray  # int64 per node
    node_type: np.ndarray  # int16 per node: index into gpu_types
    node_s1: np.ndarray  # int32 per node: index into s1_switches
    gpu_types: tuple[str, ...]  # types present on nodes, sorted
    s1_switches: tuple[str, ...]  # in spec order
    s1_parent: Mapping[str, str]  # S1 -> S2
    subgroups: Mapping[str, Subgroup]
    subgroup_of_s1: Mapping[str, str]
    regions: tuple[Region, ...]
    region_of_s1: Mapping[str, int]
    _domains: Mapping[Affinity, tuple[SchedulingDomain, ...]] = field(repr=False)

    # ----------------------------------------------------------------- look-ups
    def domains(self, affinity: Affinity) -> tuple[SchedulingDomain, ...]:
        """Domains a new group of a service with this affinity can be pinned to."""
        return self._domains[affinity]

    @cached_property
    def cluster_domain(self) -> SchedulingDomain:
        """The whole cluster (loose groups found spanning subgroups live here)."""
        return SchedulingDomain(
            key=f"cluster/{self.cluster}",
            affinity="cluster",
            domain=self.cluster,
            subgroup=None,
            subgroup_class=max(
                (sg.subgroup_class for sg in self.subgroups.values()),
                key=CLASS_RANK.__getitem__,
                default="low",
            ),
            region=0,
            s1_switches=self.s1_switches,
            node_indices=tuple(range(len(self.nodes))),
            gpu_types=frozenset(self.gpu_types),
        )

    @cached_property
    def _domain_by_key(self) -> dict[tuple[str, str | None], SchedulingDomain]:
        out: dict[tuple[str, str | None], SchedulingDomain] = {}
        affinities: tuple[Affinity, ...] = ("cluster", "s2", "s1")
        for affinity in affinities:
            for dom in self._domains[affinity]:
                out.setdefault((dom.domain, dom.subgroup), dom)
        return out

    def domain_of_group(self, group: DeploymentGroup) -> SchedulingDomain | None:
        """The domain a running group is pinned to, from its ``domain`` and ``subgroup``
        fields. ``None`` when they name no domain of this topology (a switch that is
        gone, or an S2 split over several subgroups with no subgroup given): such a
        group is kept and may shrink, but never grows."""
        if group.domain == self.cluster:
            if group.subgroup is None:
                return self.cluster_domain
            return self._domain_by_key.get((self.cluster, group.subgroup))
        found = self._domain_by_key.get((group.domain, group.subgroup))
        if found is not None:
            return found
        if group.subgroup is None:
            # An S1, or an S2 wholly inside one subgroup, determines its subgroup.
            candidates = [
                d for (name, _sg), d in self._domain_by_key.items() if name == group.domain
            ]
            if len(candidates) == 1:
                return candidates[0]
        return None

    def subgroup_of_node(self, node_index: int) -> str:
        return self.subgroup_of_s1[self.s1_switches[int(self.node_s1[node_index])]]

    def type_code(self, gpu_type: str) -> int:
        """Index of a GPU type in ``gpu_types``; -1 when no node has it."""
        try:
            return self.gpu_types.index(gpu_type)
        except ValueError:
            return -1

    @cached_property
    def region_children(self) -> tuple[tuple[int, ...], ...]:
        children: list[list[int]] = [[] for _ in self.regions]
        for region in self.regions:
            if region.parent is not None:
                children[region.parent].append(region.index)
        return tuple(tuple(c) for c in children)

    def region_ancestors(self, region: int) -> tuple[int, ...]:
        """The region itself and every region above it, up to the cluster."""
        out = [region]
        parent = self.regions[region].parent
        while parent is not None:
            out.append(parent)
            parent = self.regions[parent].parent
        return tuple(out)

    @cached_property
    def node_region(self) -> np.ndarray:
        """The S1 region of every node."""
        return np.array(
            [self.region_of_s1[self.s1_switches[int(s1)]] for s1 in self.node_s1], dtype=np.int32
        )

    @cached_property
    def nodes_by_region_type(self) -> dict[tuple[int, int], np.ndarray]:
        """Node indices (ascending) per (region, GPU type code), for every region."""
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(len(self.nodes)):
            t = int(self.node_type[i])
            for region in self.region_ancestors(int(self.node_region[i])):
                buckets[(region, t)].append(i)
        return {key: np.array(sorted(v), dtype=np.int64) for key, v in buckets.items()}

    def domain_nodes(self, domain: SchedulingDomain, gpu_type: str) -> np.ndarray:
        """Indices of the domain's nodes that carry ``gpu_type``."""
        code = self.type_code(gpu_type)
        return self.nodes_by_region_type.get((domain.region, code), np.empty(0, dtype=np.int64))

    # ----------------------------------------------------------------- capacity
    def free_gpus(self, used_gpus: np.ndarray) -> np.ndarray:
        """Free GPUs per node (never negative) given GPUs used per node."""
        return np.maximum(self.node_gpus - used_gpus, 0)

    def free_by_domain(
        self, used_gpus: np.ndarray, affinity: Affinity
    ) -> dict[tuple[str, str], int]:
        """Free GPUs per (domain key, GPU type) for every domain of an affinity."""
        free = self.free_gpus(used_gpus)
        out: dict[tuple[str, str], int] = {}
        for dom in self.domains(affinity):
            for gpu_type in sorted(dom.gpu_types):
                out[(dom.key, gpu_type)] = int(free[self.domain_nodes(dom, gpu_type)].sum())
        return out

    def free_by_subgroup(self, used_gpus: np.ndarray) -> dict[tuple[str, str], int]:
        """Free GPUs per (subgroup, GPU type)."""
        free = self.free_gpus(used_gpus)
        out: dict[tuple[str, str], int] = defaultdict(int)
        for i in range(len(self.nodes)):
            out[(self.subgroup_of_node(i), self.gpu_types[int(self.node_type[i])])] += int(free[i])
        return dict(out)


# --------------------------------------------------------------------------- usage


def gpus_per_instance_of(policies: Mapping[str, object]) -> Callable[[str, Role], int | None]:
    """``(service, role) -> GPUs per instance`` from ServicePolicy objects (None if the
    service has no policy)."""

    def lookup(service: str, role: Role) -> int | None:
        policy = policies.get(service)
        if policy is None:
            return None
        return int(policy.role(role).gpus_per_instance)  # type: ignore[attr-defined]

    return lookup


def used_gpus(
    topology: Topology,
    groups: Iterable[DeploymentGroup],
    gpus_per_instance: Callable[[str, Role], int | None],
) -> np.ndarray:
    """GPUs used per node by running groups: instances x GPUs per instance of the role.

    The size observed on the live workload (``GroupRole.gpus_per_instance``) wins over
    the policy's (a policy change does not resize running instances). An instance of
    unknown size -- a service without a policy, whose group is about to be pruned -- is
    counted as taking its whole node: never overbooking matters more than a node's
    worth of capacity for one cycle. Nodes the cluster file no longer lists are ignored.
    """
    used = np.zeros(len(topology.nodes), dtype=np.int64)
    roles: tuple[Role, Role] = ("prefill", "decode")
    for group in groups:
        for role in roles:
            observed = group.role(role).gpus_per_instance
            size = observed or gpus_per_instance(group.service, role)
            for placed in group.role(role).nodes:
                index = topology.node_index.get(placed.node)
                if index is None or placed.instances <= 0:
                    continue
                used[index] += (
                    placed.instances * size if size is not None else topology.node_gpus[index]
                )
    return used


def fleet_used_gpus(
    topology: Topology, fleet: FleetState, policies: Mapping[str, object]
) -> np.ndarray:
    """``used_gpus`` for a whole fleet state with sizes taken from the policies."""
    return used_gpus(topology, fleet.groups, gpus_per_instance_of(policies))


# --------------------------------------------------------------------------- building


def build_topology(spec: ClusterSpec, *, gpu_slots: bool = False) -> Topology:
    """Build the topology of a validated ``ClusterSpec`` (see the module docstring)."""
    nodes = spec.nodes
    graph = nx.DiGraph(cluster=spec.name)
    root = f"cluster:{spec.name}"
    graph.add_node(root, kind="cluster", name=spec.name)
    s1_parent: dict[str, str] = {}
    s1_order: list[str] = []
    for s2 in spec.s2:
        graph.add_node(f"s2:{s2.name}", kind="s2", name=s2.name)
        graph.add_edge(root, f"s2:{s2.name}")
        for s1 in s2.s1:
            s1_parent[s1.name] = s2.name
            s1_order.append(s1.name)
            graph.add_node(f"s1:{s1.name}", kind="s1", name=s1.name)
            graph.add_edge(f"s2:{s2.name}", f"s1:{s1.name}")
    seen_s0: set[str] = set()
    node_attrs = []
    edges = []
    for node in nodes:
        s0_id = f"s0:{node.s0}"
        if node.s0 not in seen_s0:
            seen_s0.add(node.s0)
            graph.add_node(s0_id, kind="s0", name=node.s0)
            graph.add_edge(f"s1:{node.s1}", s0_id)
        node_id = f"node:{node.name}"
        node_attrs.append(
            (
                node_id,
                {"kind": "node", "name": node.name, "gpu_type": node.gpu_type, "gpus": node.gpus},
            )
        )
        edges.append((s0_id, node_id))
        if gpu_slots:
            for slot in range(node.gpus):
                slot_id = f"gpu:{node.name}/{slot}"
                node_attrs.append(
                    (slot_id, {"kind": "gpu", "gpu_type": node.gpu_type, "slot": slot})
                )
                edges.append((node_id, slot_id))
    graph.add_nodes_from(node_attrs)
    graph.add_edges_from(edges)

    gpu_types = tuple(sorted({n.gpu_type for n in nodes}))
    type_code = {t: i for i, t in enumerate(gpu_types)}
    s1_code = {s1: i for i, s1 in enumerate(s1_order)}
    node_gpus = np.array([n.gpus for n in nodes], dtype=np.int64)
    node_type = np.array([type_code[n.gpu_type] for n in nodes], dtype=np.int16)
    node_s1 = np.array([s1_code[n.s1] for n in nodes], dtype=np.int32)
    types_per_s1: dict[str, set[str]] = defaultdict(set)
    for n in nodes:
        types_per_s1[n.s1].add(n.gpu_type)

    subgroups = _derive_subgroups(spec, s1_order, s1_parent, types_per_s1)
    subgroup_of_s1 = {s1: sg.name for sg in subgroups.values() for s1 in sg.s1_switches}
    for s1_name in s1_order:
        graph.nodes[f"s1:{s1_name}"]["subgroup"] = subgroup_of_s1[s1_name]

    regions, region_of_s1, region_by_set = _build_regions(spec.name, s1_order, s1_parent, subgroups)

    s1_nodes: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        s1_nodes[n.s1].append(i)

    def make_domain(
        affinity: Affinity, domain: str, subgroup: Subgroup, s1s: list[str]
    ) -> SchedulingDomain:
        indices = tuple(sorted(i for s1 in s1s for i in s1_nodes[s1]))
        return SchedulingDomain(
            key=f"{affinity}/{domain}/{subgroup.name}",
            affinity=affinity,
            domain=domain,
            subgroup=subgroup.name,
            subgroup_class=subgroup.subgroup_class,
            region=region_by_set[frozenset(s1s)],
            s1_switches=tuple(s1s),
            node_indices=indices,
            gpu_types=frozenset(t for s1 in s1s for t in types_per_s1[s1]),
        )

    domains: dict[Affinity, list[SchedulingDomain]] = {"s1": [], "s2": [], "cluster": []}
    for sg in subgroups.values():
        domains["cluster"].append(make_domain("cluster", spec.name, sg, list(sg.s1_switches)))
        for s2_name, part in _s1_by_s2(sg, s1_parent).items():
            domains["s2"].append(make_domain("s2", s2_name, sg, part))
        for s1_name in sg.s1_switches:
            domains["s1"].append(make_domain("s1", s1_name, sg, [s1_name]))
    return Topology(
        cluster=spec.name,
        graph=graph,
        nodes=nodes,
        node_index={n.name: i for i, n in enumerate(nodes)},
        node_gpus=node_gpus,
        node_type=node_type,
        node_s1=node_s1,
        gpu_types=gpu_types,
        s1_switches=tuple(s1_order),
        s1_parent=s1_parent,
        subgroups=subgroups,
        subgroup_of_s1=subgroup_of_s1,
        regions=regions,
        region_of_s1=region_of_s1,
        _domains={k: tuple(sorted(v, key=lambda d: d.key)) for k, v in domains.items()},
    )


def _derive_subgroups(
    spec: ClusterSpec,
    s1_order: list[str],
    s1_parent: Mapping[str, str],
    types_per_s1: Mapping[str, set[str]],
) -> dict[str, Subgroup]:
    position = {s1: i for i, s1 in enumerate(s1_order)}

    def make(name: str, s1s: Iterable[str], declared: bool) -> Subgroup:
        ordered = sorted(set(s1s), key=position.__getitem__)
        # S2 switches in the order of their first S1.
        s2s = dict.fromkeys(s1_parent[s1] for s1 in ordered)
        return Subgroup(
            name=name,
            s1_switches=tuple(ordered),
            s2_switches=tuple(s2s),
            gpu_types=frozenset(t for s1 in ordered for t in types_per_s1.get(s1, ())),
            subgroup_class=derive_subgroup_class(
                {s1: types_per_s1.get(s1, set()) for s1 in ordered}
            ),
            declared=declared,
        )

    return {
        name: make(name, s1s, declared)
        for name, (s1s, declared) in subgroup_s1s(spec, s1_order, s1_parent).items()
    }


def _s1_by_s2(subgroup: Subgroup, s1_parent: Mapping[str, str]) -> dict[str, list[str]]:
    """The subgroup's S1 switches under each of its S2 switches, both in order: one
    pass over the S1 switches, not one per S2."""
    parts: dict[str, list[str]] = {s2: [] for s2 in subgroup.s2_switches}
    for s1 in subgroup.s1_switches:
        parts[s1_parent[s1]].append(s1)
    return parts


def _build_regions(
    cluster: str,
    s1_order: list[str],
    s1_parent: Mapping[str, str],
    subgroups: Mapping[str, Subgroup],
) -> tuple[tuple[Region, ...], dict[str, int], dict[frozenset[str], int]]:
    """The laminar tree cluster > subgroup > S2 part > S1, with equal sets merged."""
    regions: list[Region] = []
    by_set: dict[frozenset[str], int] = {}

    def add(s1s: Iterable[str], parent: int | None, depth: int, label: str) -> int:
        key = frozenset(s1s)
        if key in by_set:
            return by_set[key]
        index = len(regions)
        regions.append(Region(index, key, parent, depth, label))
        by_set[key] = index
        return index

    root = add(s1_order, None, 0, cluster)
    region_of_s1: dict[str, int] = {}
    for sg in subgroups.values():
        sg_region = add(sg.s1_switches, root, 1, sg.name)
        for s2, part in _s1_by_s2(sg, s1_parent).items():
            part_region = add(part, sg_region, 2, s2)
            for s1 in part:
                region_of_s1[s1] = add([s1], part_region, 3, s1)
    return tuple(regions), region_of_s1, by_set


# --------------------------------------------------------------------------- caching

_CACHE: OrderedDict[int, tuple[ClusterSpec, Topology]] = OrderedDict()
_CACHE_SIZE = 8
_CACHE_LOCK = Lock()


def topology_for(spec: ClusterSpec) -> Topology:
    """``build_topology(spec)``, memoised on the spec object (specs are immutable; a
    new revision is a new object). Keeps the last few clusters."""
    key = id(spec)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] is spec:
            _CACHE.move_to_end(key)
            return hit[1]
    topology = build_topology(spec)
    with _CACHE_LOCK:
        _CACHE[key] = (spec, topology)
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return topology


def affinity_depth(affinity: Affinity) -> int:
    """How deep in the region tree an affinity's domains sit (cluster 1 ... S1 3)."""
    return _AFFINITY_DEPTH[affinity]


__all__ = [
    "CLASS_RANK",
    "Region",
    "SchedulingDomain",
    "Subgroup",
    "Topology",
    "affinity_depth",
    "build_topology",
    "fleet_used_gpus",
    "gpus_per_instance_of",
    "topology_for",
    "used_gpus",
]

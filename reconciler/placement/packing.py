"""Second, exact step of CP-SAT placement: new instances onto nodes.

The aggregated model decides how many instances of which size and GPU type go into
each scheduling domain; here they get nodes. Items are *(key, candidate nodes, size,
count)*; the candidate nodes of an item are the nodes of its domain with its GPU type.
Domains nest (S1 ⊂ S2 part ⊂ subgroup ⊂ cluster), so items of different domains may
compete for the same nodes.

1. **Best-fit decreasing**: most constrained items first (deepest domain, then largest
   instance), each instance onto the candidate node with the least free GPUs that still
   fits it (ties: node order). Best fit fills partly used nodes before it breaks a
   whole one, which is objective (4): keep whole nodes free.
2. **Verification**: every placement is checked against node capacity (an assertion on
   the arrays, not a hope).
3. **Exact fallback**: if best fit leaves an instance unplaced, every item of the
   affected RDMA subgroups (the packing components: domains never cross subgroups,
   except a loose group found spanning the cluster, which joins everything) is
   re-packed by a small CP-SAT model over (item, node) integer counts that maximises
   the priority-weighted GPUs placed. Anything still unplaced is genuinely
   fragmented capacity and comes back as such (the caller reports it as a
   ``fragmentation`` shortfall).

The aggregated model already carries per-size slot constraints (valid inequalities:
instances of size >= k in a region <= sum over its nodes of floor(free / k)), so the
fallback is rare; the benchmark prints how often it ran.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from reconciler.topology import Topology


@dataclass(frozen=True)
class PackItem:
    """``count`` instances of ``size`` GPUs, each onto one of ``nodes``."""

    key: Hashable
    nodes: np.ndarray  # candidate node indices, ascending
    size: int
    count: int
    depth: int  # region depth of the domain (deeper = more constrained)
    weight: int  # value of placing one GPU of it (priority-derived), for the fallback
    component: int  # packing component (top region); -1 = the whole cluster
    order: tuple[object, ...] = ()  # deterministic tie-break


@dataclass(frozen=True)
class PackOutcome:
    placed: dict[Hashable, dict[int, int]]  # key -> node index -> instances
    unplaced: dict[Hashable, int]
    fallback_components: int  # how many components needed the exact CP-SAT re-pack
    fallback_status: str  # "" if unused, else the worst CP-SAT status seen


def component_of(topology: Topology, region: int) -> int:
    """The packing component of a region: its subgroup-level ancestor, or -1 for the
    cluster root."""
    for ancestor in topology.region_ancestors(region):
        if topology.regions[ancestor].depth == 1:
            return ancestor
    return -1


def best_fit(free: np.ndarray, items: Sequence[PackItem]) -> tuple[dict[Hashable, dict[int, int]], dict[Hashable, int]]:
    """Best-fit decreasing; mutates ``free``."""
    placed: dict[Hashable, dict[int, int]] = {}
    unplaced: dict[Hashable, int] = {}
    for item in sorted(items, key=lambda it: (-it.depth, -it.size, it.order)):
        spot: dict[int, int] = {}
        left = item.count
        nodes = item.nodes
        while left > 0 and nodes.size:
            avail = free[nodes]
            fits = avail >= item.size
            if not fits.any():
                break
            # Least free first; argmin takes the first (lowest node index) on ties.
            score = np.where(fits, avail, np.iinfo(np.int64).max)
            pos = int(np.argmin(score))
            node = int(nodes[pos])
            # Put as many as fit there while it stays the best fit: a node with the
            # least free GPUs remains least after taking more.
            take = min(left, int(free[node]) // item.size)
            free[node] -= take * item.size
            spot[node] = spot.get(node, 0) + take
            left -= take
        placed[item.key] = spot
        if left:
            unplaced[item.key] = left
    return placed, unplaced


def exact_pack(
    free: np.ndarray,
    items: Sequence[PackItem],
    time_limit_s: float,
    seed: int,
    workers: int,
) -> tuple[dict[Hashable, dict[int, int]], dict[Hashable, int], str]:
    """Exact re-pack of ``items`` onto ``free`` (mutated): maximise weighted GPUs placed."""
    model = cp_model.CpModel()
    per_node: dict[int, list[tuple[int, cp_model.IntVar]]] = defaultdict(list)
    per_item: list[list[tuple[int, cp_model.IntVar]]] = []
    objective = []
    for i, item in enumerate(items):
        entries = []
        for node in item.nodes.tolist():
            cap = int(free[node]) // item.size
            if cap <= 0:
                continue
            var = model.new_int_var(0, min(cap, item.count), f"y{i}_{node}")
            entries.append((node, var))
            per_node[node].append((item.size, var))
        per_item.append(entries)
        if entries:
            model.add(sum(v for _n, v in entries) <= item.count)
            objective.append(item.weight * item.size * sum(v for _n, v in entries))
    for node, terms in per_node.items():
        model.add(sum(size * var for size, var in terms) <= int(free[node]))
    # Among equally good packings prefer few touched nodes (keep whole nodes free):
    # a tiny penalty per node used that was whole.
    whole_nodes = [n for n in per_node if free[n] > 0]
    used_flags = []
    for node in whole_nodes:
        flag = model.new_bool_var(f"u{node}")
        model.add(sum(v for _s, v in per_node[node]) == 0).only_enforce_if(flag.Not())
        used_flags.append(flag)
    model.maximize(sum(objective) * (len(used_flags) + 1) - sum(used_flags))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, time_limit_s)
    solver.parameters.random_seed = seed
    solver.parameters.num_workers = max(1, workers)
    status = solver.solve(model)
    placed: dict[Hashable, dict[int, int]] = {}
    unplaced: dict[Hashable, int] = {}
    ok = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    for item, entries in zip(items, per_item, strict=True):
        spot: dict[int, int] = {}
        if ok:
            for node, var in entries:
                value = int(solver.value(var))
                if value:
                    spot[node] = value
                    free[node] -= value * item.size
        placed[item.key] = spot
        missing = item.count - sum(spot.values())
        if missing:
            unplaced[item.key] = missing
    return placed, unplaced, solver.status_name(status)


def pack(
    free: np.ndarray,
    items: Sequence[PackItem],
    *,
    time_limit_s: float = 1.0,
    seed: int = 0,
    workers: int = 1,
) -> PackOutcome:
    """Place every item (best fit, exact fallback per component). Mutates ``free``."""
    start_free = free.copy()
    placed, unplaced = best_fit(free, items)
    fallback_components = 0
    worst = ""
    if unplaced:
        failing = {it.component for it in items if it.key in unplaced}
        if -1 in failing or any(it.component == -1 for it in items):
            failing = {it.component for it in items}
        redo = [it for it in items if it.component in failing]
        # Undo best fit for those items, then solve them exactly.
        for it in redo:
            for node, count in placed.pop(it.key, {}).items():
                free[node] += count * it.size
            unplaced.pop(it.key, None)
        by_component: dict[int, list[PackItem]] = defaultdict(list)
        for it in redo:
            by_component[it.component].append(it)
        for component in sorted(by_component):
            fallback_components += 1
            got, missing, status = exact_pack(
                free, by_component[component], time_limit_s / max(1, len(by_component)), seed, workers
            )
            placed.update(got)
            unplaced.update(missing)
            if status not in ("OPTIMAL",):
                worst = status
            elif not worst:
                worst = status
    # Verification: no node over capacity, nothing placed outside its candidates.
    if np.any(free < 0):
        raise AssertionError("node packing overbooked a node")
    used_now = start_free - free
    expect = np.zeros_like(free)
    for it in items:
        allowed = set(it.nodes.tolist())
        for node, count in placed.get(it.key, {}).items():
            if node not in allowed:
                raise AssertionError(f"item {it.key!r} placed outside its domain")
            expect[node] += count * it.size
    if not np.array_equal(expect, used_now):
        raise AssertionError("node packing bookkeeping is inconsistent")
    return PackOutcome(placed, unplaced, fallback_components, worst)


__all__ = ["PackItem", "PackOutcome", "best_fit", "component_of", "exact_pack", "pack"]

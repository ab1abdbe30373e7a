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
from collections.abc import Hashable, Mapping, Sequence
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


def best_fit(
    free: np.ndarray, items: Sequence[PackItem]
) -> tuple[dict[Hashable, dict[int, int]], dict[Hashable, int]]:
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
    capacity: np.ndarray | None = None,
    deterministic_time: float | None = None,
    hint: Mapping[Hashable, Mapping[int, int]] | None = None,
) -> tuple[dict[Hashable, dict[int, int]], dict[Hashable, int], str]:
    """Exact re-pack of ``items`` onto ``free`` (mutated): maximise the weighted GPUs
    placed, then touch as few whole nodes as possible. ``hint`` (instances per item and
    node, e.g. best fit's) is the search's starting point.

    Items that are interchangeable (same candidate nodes, size and weight, e.g. the
    groups of one service in one domain) share one integer variable per node, which
    removes the symmetry that would otherwise make optimality hard to prove; their
    totals are handed back to the items in order afterwards.
    """
    classes: dict[tuple[tuple[int, ...], int, int], list[PackItem]] = defaultdict(list)
    for item in items:
        classes[(tuple(item.nodes.tolist()), item.size, item.weight)].append(item)
    model = cp_model.CpModel()
    per_node: dict[int, list[tuple[int, cp_model.IntVar]]] = defaultdict(list)
    per_class: list[list[tuple[int, cp_model.IntVar]]] = []
    placed_value = []
    whole_penalty = []
    total_gpus = int(sum(it.size * it.count for it in items)) + 1
    for (nodes, size, weight), members in classes.items():
        count = sum(it.count for it in members)
        entries = []
        for node in nodes:
            cap = int(free[node]) // size
            if cap <= 0:
                continue
            var = model.new_int_var(0, min(cap, count), "")
            if hint is not None:
                start = sum(hint.get(it.key, {}).get(node, 0) for it in members)
                model.add_hint(var, min(start, cap, count))
            entries.append((node, var))
            per_node[node].append((size, var))
            placed_value.append((weight * size * total_gpus, var))
            if capacity is not None and free[node] == capacity[node]:
                whole_penalty.append((size, var))  # breaks a whole node
        per_class.append(entries)
        if entries:
            model.add(sum(v for _n, v in entries) <= count)
    for node, terms in per_node.items():
        model.add(sum(size * var for size, var in terms) <= int(free[node]))
    model.maximize(
        cp_model.LinearExpr.weighted_sum(
            [v for _c, v in placed_value], [c for c, _v in placed_value]
        )
        - cp_model.LinearExpr.weighted_sum(
            [v for _s, v in whole_penalty], [s for s, _v in whole_penalty]
        )
    )
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, time_limit_s)
    if deterministic_time is not None:
        solver.parameters.max_deterministic_time = deterministic_time
    solver.parameters.random_seed = seed
    solver.parameters.num_workers = max(1, workers)
    status = solver.solve(model)
    ok = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    placed: dict[Hashable, dict[int, int]] = {}
    unplaced: dict[Hashable, int] = {}
    for ((_nodes, size, _w), members), entries in zip(classes.items(), per_class, strict=True):
        pool = []  # (node, instances) still to hand out, in node order
        if ok:
            for node, var in entries:
                value = int(solver.value(var))
                if value:
                    pool.append([node, value])
                    free[node] -= value * size
        for item in sorted(members, key=lambda it: it.order):
            spot: dict[int, int] = {}
            want = item.count
            while want and pool:
                node, left = pool[0]
                take = min(want, left)
                spot[node] = spot.get(node, 0) + take
                want -= take
                pool[0][1] -= take
                if pool[0][1] == 0:
                    pool.pop(0)
            placed[item.key] = spot
            if want:
                unplaced[item.key] = want
    return placed, unplaced, solver.status_name(status)


def _value(items: Sequence[PackItem], unplaced: Mapping[Hashable, int]) -> int:
    """Weighted GPUs of ``items`` left unplaced (what the exact re-pack minimises)."""
    return sum(it.weight * it.size * unplaced.get(it.key, 0) for it in items)


def pack(
    free: np.ndarray,
    items: Sequence[PackItem],
    *,
    time_limit_s: float = 1.0,
    seed: int = 0,
    workers: int = 1,
    capacity: np.ndarray | None = None,
    deterministic_time: float | None = None,
) -> PackOutcome:
    """Place every item (best fit, exact fallback per component). Mutates ``free``.
    ``capacity`` (GPUs per node) lets the fallback tell whole nodes apart;
    ``deterministic_time`` bounds it reproducibly (the wall clock stays a guard)."""
    start_free = free.copy()
    placed, unplaced = best_fit(free, items)
    fitted, fitted_missing = dict(placed), dict(unplaced)
    fallback_components = 0
    worst = ""
    if unplaced:
        failing = {it.component for it in items if it.key in unplaced}
        spanning = any(it.component == -1 for it in items)
        if spanning:
            # A cluster-wide item shares nodes with every subgroup: one component.
            failing = {it.component for it in items}
        redo = [it for it in items if it.component in failing]
        # Undo best fit for those items, then solve them exactly.
        for it in redo:
            for node, count in placed.pop(it.key, {}).items():
                free[node] += count * it.size
            unplaced.pop(it.key, None)
        by_component: dict[int, list[PackItem]] = defaultdict(list)
        for it in redo:
            by_component[-1 if spanning else it.component].append(it)
        for component in sorted(by_component):
            fallback_components += 1
            share = 1.0 / max(1, len(by_component))
            members = by_component[component]
            got, missing, status = exact_pack(
                free,
                members,
                time_limit_s * share,
                seed,
                workers,
                capacity,
                deterministic_time * share if deterministic_time is not None else None,
                hint=fitted,
            )
            if _value(members, missing) > _value(members, fitted_missing):
                # Out of time before matching best fit: best fit's placement stands.
                for it in members:
                    for node, count in got.get(it.key, {}).items():
                        free[node] += count * it.size
                    for node, count in fitted.get(it.key, {}).items():
                        free[node] -= count * it.size
                got = {it.key: fitted.get(it.key, {}) for it in members}
                missing = {
                    it.key: fitted_missing[it.key] for it in members if it.key in fitted_missing
                }
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
    # Items of one domain and type share one node array: each array is made a set once
    # (a set per item was most of the packing time on a 160,000-GPU fleet).
    allowed_of: dict[int, tuple[np.ndarray, set[int]]] = {}
    for it in items:
        spot = placed.get(it.key)
        if not spot:
            continue
        cached = allowed_of.get(id(it.nodes))
        if cached is None or cached[0] is not it.nodes:
            cached = allowed_of[id(it.nodes)] = (it.nodes, set(it.nodes.tolist()))
        allowed = cached[1]
        for node, count in spot.items():
            if node not in allowed:
                raise AssertionError(f"item {it.key!r} placed outside its domain")
            expect[node] += count * it.size
    if not np.array_equal(expect, used_now):
        raise AssertionError("node packing bookkeeping is inconsistent")
    return PackOutcome(placed, unplaced, fallback_components, worst)


__all__ = ["PackItem", "PackOutcome", "best_fit", "component_of", "exact_pack", "pack"]

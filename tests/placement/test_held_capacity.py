"""Pending and draining instances hold their GPUs (reconciler.placement.problem,
"Pending and draining instances hold capacity").

- A pending instance of a live group (counted, not bound to a node yet) holds its GPUs
  inside the group's domain, on the role's GPU type.
- A draining instance (out of its group, still running) holds its GPUs on its node
  when the request names it, else on the nodes of the service's groups.
- An instance a move left behind (out of every group, still serving) holds its GPUs
  on its node: the group replacing it goes where there is room beside it.
- Nothing placed may use held GPUs; what could not be held is said in the notes.

The cluster: one S2 ``pod-a`` of one S1 with two 8-GPU H800 nodes (16 GPUs), and a
second S2 ``pod-b`` with one 8-GPU H800 node.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from placement_fixtures import check_invariants, cluster, group, node_usage, policy, request, s1

from reconciler.placement.base import PlacementRequest, PlacementResult, UngroupedInstances
from reconciler.placement.cpsat import CpSatPlacer
from reconciler.placement.greedy import GreedyPlacer

BOTH = pytest.mark.parametrize("placer", [CpSatPlacer(), GreedyPlacer()], ids=lambda p: p.name)
H800 = {"prefill": (1, {"h800": 1.0}), "decode": (1, {"h800": 1.0})}


@pytest.fixture(scope="module")
def spec():
    return cluster(
        {
            "pod-a": [s1("a1", ("la1", "a1n-[1-2]", "h800"))],
            "pod-b": [s1("b1", ("lb1", "b1n-1", "h800"))],
        }
    )


def old_group(on_node: int, pending: int = 0):
    """``old``'s live group in pod-a: ``on_node`` prefill and decode instances on
    a1n-1, plus ``pending`` decode instances bound to no node."""
    running = group(
        "old",
        "g-pod-a-1",
        "pod-a",
        "rg-pod-a",
        ("h800", {"a1n-1": on_node}),
        ("h800", {"a1n-1": on_node}),
    )
    return replace(running, decode=replace(running.decode, instances=on_node + pending))


def gpus_used(req: PlacementRequest, result: PlacementResult, nodes: list[str]) -> int:
    usage = node_usage(req, result.groups)
    return sum(usage[n] for n in nodes)


@BOTH
def test_pending_instances_hold_gpus_in_their_groups_domain(placer, spec):
    """``old`` runs 4+4 on a1n-1 and 6 more decode instances wait for a node: pod-a
    has 16 - 8 - 6 = 2 GPUs left, not 8; ``new`` (pod-a only, by its S2 and 8 GPUs
    per instance) finds no room there and goes to pod-b."""
    new = policy("new", prefill=(4, {"h800": 1.0}), decode=(4, {"h800": 1.0}), shape=(1, 1))
    req = request(
        spec,
        [policy("old", shape=(8, 16), **H800), new],
        {"old": (4, 10), "new": (1, 1)},
        [old_group(4, pending=6)],
    )
    result = placer.place(req)  # (check_invariants wants every instance on a node)
    [placed] = [g for g in result.groups if g.service == "new"]
    assert placed.domain == "pod-b"
    assert gpus_used(req, result, ["a1n-1", "a1n-2"]) + 6 <= 16
    assert any(
        n == "capacity held for 6 pending and 0 draining instance(s): 6 GPUs"
        for n in result.stats.notes
    )


@BOTH
def test_without_pending_instances_the_same_room_is_free(placer, spec):
    """The control: the same group with every instance on a node leaves pod-a 8 GPUs."""
    new = policy("new", prefill=(4, {"h800": 1.0}), decode=(4, {"h800": 1.0}), shape=(1, 1))
    req = request(
        spec,
        [policy("old", shape=(8, 16), **H800), new],
        {"old": (4, 4), "new": (1, 1)},
        [old_group(4)],
    )
    result = placer.place(req)
    [placed] = [g for g in result.groups if g.service == "new"]
    assert placed.domain == "pod-a"


@BOTH
def test_draining_instances_hold_gpus_on_their_node(placer, spec):
    """8 GPUs of pod-b are held by a draining instance: ``new`` cannot go there."""
    new = policy("new", prefill=(4, {"h800": 1.0}), decode=(4, {"h800": 1.0}), shape=(1, 1))
    old = policy("old", prefill=(8, {"h800": 1.0}), decode=(8, {"h800": 1.0}))
    req = request(spec, [old, new], {"new": (2, 2)})
    req = replace(req, draining=(UngroupedInstances("old", "decode", "b1n-1", 1),))
    result = placer.place(req)
    check_invariants(req, result)
    assert gpus_used(req, result, ["b1n-1"]) == 0
    assert sum(s.instances for s in result.shortfalls) == 0  # 16 GPUs in pod-a suffice
    assert "capacity held for 0 pending and 1 draining instance(s): 8 GPUs" in result.stats.notes


@BOTH
def test_instances_a_move_left_behind_hold_gpus_on_their_node(placer, spec):
    """``new`` moved namespace: its two old decode instances (8 GPUs each) still serve
    from a1n-1 and a1n-2, and no group of it is counted. pod-a is full: its new group
    goes to pod-b, where the Pods can run."""
    new = policy("new", prefill=(4, {"h800": 1.0}), decode=(4, {"h800": 1.0}), shape=(1, 1))
    req = request(spec, [new], {"new": (1, 1)})
    req = replace(
        req,
        left_behind=tuple(
            UngroupedInstances("new", "decode", node, 1, 8) for node in ("a1n-1", "a1n-2")
        ),
    )
    result = placer.place(req)
    check_invariants(req, result)
    [placed] = [g for g in result.groups if g.service == "new"]
    assert placed.domain == "pod-b"
    assert sum(s.instances for s in result.shortfalls) == 0
    assert (
        "capacity held for 0 pending and 0 draining instance(s), 2 left behind: 16 GPUs"
        in result.stats.notes
    )


@BOTH
def test_draining_instances_only_counted_are_held_near_their_service(placer, spec):
    """The fleet state counts 3 draining decode instances of ``old`` (4 GPUs each)
    without nodes: they left ``old``'s group in pod-a (which keeps one on a1n-1), so
    12 GPUs are held there, pod-a is full, and ``new``'s 8 GPUs go to pod-b."""
    old = policy("old", prefill=(4, {"h800": 1.0}), decode=(4, {"h800": 1.0}))
    new = policy("new", affinity="s2", shape=(4, 4), **H800)
    running = group("old", "g1", "pod-a", "rg-pod-a", ("h800", {}), ("h800", {"a1n-1": 1}))
    req = request(spec, [old, new], {"new": (4, 4)}, [running])
    req = replace(req, current=replace(req.current, draining={("old", "decode"): 3}))
    result = placer.place(req)
    check_invariants(req, result)
    assert {g.domain for g in result.groups if g.service == "new"} == {"pod-b"}
    assert not result.shortfalls
    assert "capacity held for 0 pending and 3 draining instance(s): 12 GPUs" in result.stats.notes


@BOTH
def test_what_cannot_be_held_is_said(placer, spec):
    """Draining instances of a service with no group left have no known place."""
    old = policy("old", **H800)
    req = request(spec, [old], {})
    req = replace(req, current=replace(req.current, draining={("old", "prefill"): 2}))
    result = placer.place(req)
    assert any(
        n.startswith("held nowhere") and "2 draining prefill of old" in n
        for n in result.stats.notes
    )

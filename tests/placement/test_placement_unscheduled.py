"""Live groups whose Pods are not bound to nodes yet (Pending right after an apply):
their instances exist, only their nodes are unknown. Placement must keep them as they
are, not mistake the group for an empty one and place it again."""

from __future__ import annotations

from dataclasses import replace

import pytest

from reconciler.placement.cpsat import CpSatPlacer
from reconciler.placement.greedy import GreedyPlacer
from reconciler.plan import diff_groups
from reconciler.state import GroupRole
from tests.placement.placement_fixtures import group, policy, request, three_class_cluster

PLACERS = [CpSatPlacer(), GreedyPlacer()]


def pending(role: GroupRole, scheduled: int) -> GroupRole:
    """The same role with only ``scheduled`` of its instances bound to nodes."""
    nodes, left = [], scheduled
    for placed in role.nodes:
        here = min(left, placed.instances)
        if here:
            nodes.append(replace(placed, instances=here))
        left -= here
    return replace(role, nodes=tuple(nodes))


@pytest.fixture
def running():
    spec = three_class_cluster()
    chat = policy("chat", shape=(2, 4))
    live = group(
        "chat", "g-pod-c-1", "pod-c", "rg-pod-c", ("h800", {"c1n-1": 2}), ("h20", {"c2n-1": 4})
    )
    return spec, chat, live


@pytest.mark.parametrize("placer", PLACERS, ids=lambda p: p.name)
@pytest.mark.parametrize("scheduled", [0, 1])
def test_a_group_with_pending_pods_is_kept_as_it_is(running, placer, scheduled: int) -> None:
    spec, chat, live = running
    live = replace(live, prefill=pending(live.prefill, scheduled), decode=pending(live.decode, 0))
    req = request(spec, [chat], {"chat": (2, 4)}, [live])
    result = placer.place(req)
    assert result.groups == (live,)
    assert diff_groups(req.current, result.groups, {}) == ()


@pytest.mark.parametrize("placer", PLACERS, ids=lambda p: p.name)
def test_scale_in_removes_unscheduled_instances_first(running, placer) -> None:
    spec, chat, live = running
    live = replace(live, decode=pending(live.decode, 2))  # 2 bound to c2n-1, 2 pending
    result = placer.place(request(spec, [chat], {"chat": (2, 2)}, [live]))
    [kept] = result.groups
    assert kept.decode.instances == 2
    assert [(p.node, p.instances) for p in kept.decode.nodes] == [("c2n-1", 2)]


@pytest.mark.parametrize("placer", PLACERS, ids=lambda p: p.name)
def test_growth_adds_to_a_group_with_pending_pods_without_recounting_them(running, placer) -> None:
    spec, chat, live = running
    live = replace(live, decode=pending(live.decode, 0))
    result = placer.place(request(spec, [chat], {"chat": (2, 5)}, [live]))
    assert sum(g.decode.instances for g in result.groups) - result.overshoot("chat", "decode") == 5

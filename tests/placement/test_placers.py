"""Both placers on small, hand-checked topologies with known optimal answers.

Cluster used by most tests (``three_class_cluster``; every leaf 2 nodes x 8 GPUs):
pod-a 32 H800 (class low), pod-b 32 H20 (low), pod-c one H800 S1 + one H20 S1 (medium),
pod-d H800 and H20 under each S1 (high).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from placement_fixtures import (
    check_invariants,
    cluster,
    group,
    groups_of,
    node_usage,
    policy,
    request,
    s1,
    three_class_cluster,
)

from reconciler.placement.base import Anchor
from reconciler.placement.cpsat import CpSatPlacer
from reconciler.placement.greedy import GreedyPlacer

PLACERS = [CpSatPlacer(), GreedyPlacer()]
BOTH = pytest.mark.parametrize("placer", PLACERS, ids=lambda p: p.name)

HOMOGENEOUS = {"prefill": (1, {"h800": 1.0}), "decode": (1, {"h800": 1.0})}
HETEROGENEOUS = {"prefill": (1, {"h800": 1.0}), "decode": (1, {"h20": 1.0})}


@pytest.fixture(scope="module")
def spec():
    return three_class_cluster()


def place(placer, req):
    result = placer.place(req)
    check_invariants(req, result)
    return result


# --------------------------------------------------------------------------- classes


@BOTH
def test_homogeneous_service_takes_a_low_class_subgroup(placer, spec):
    req = request(spec, [policy("svc", **HOMOGENEOUS)], {"svc": (2, 4)})
    result = place(placer, req)
    [g] = result.groups
    assert (g.domain, g.subgroup, g.group_id) == ("pod-a", "rg-pod-a", "g-pod-a-1")
    assert (g.prefill.instances, g.decode.instances) == (2, 4)
    assert not result.shortfalls


@BOTH
def test_a_new_group_never_takes_the_id_of_a_group_being_deleted(placer, spec):
    """The service's group g-pod-a-1 is being deleted (a finalizer holds it): the fleet
    leaves it out, so placement opens a group to replace it, where g-pod-a-1 would be
    the first free id, and its Deployments the very names being deleted. The fleet
    reserves the id while the group exists: the new group takes the next one."""
    req = request(spec, [policy("svc", **HOMOGENEOUS)], {"svc": (2, 4)})
    req = replace(
        req, current=replace(req.current, reserved_group_ids={"svc": frozenset({"g-pod-a-1"})})
    )
    result = place(placer, req)
    [g] = result.groups
    assert (g.domain, g.group_id) == ("pod-a", "g-pod-a-2")


@BOTH
def test_heterogeneous_s2_service_takes_medium_not_high(placer, spec):
    req = request(spec, [policy("svc", **HETEROGENEOUS)], {"svc": (2, 4)})
    [g] = place(placer, req).groups
    assert (g.domain, g.prefill.gpu_type, g.decode.gpu_type) == ("pod-c", "h800", "h20")


@BOTH
def test_heterogeneous_s1_service_needs_an_s1_heterogeneous_subgroup(placer, spec):
    req = request(spec, [policy("svc", affinity="s1", **HETEROGENEOUS)], {"svc": (2, 4)})
    [g] = place(placer, req).groups
    assert g.domain in ("d1", "d2") and g.subgroup == "rg-pod-d"


@BOTH
def test_loose_service_stays_inside_one_subgroup(placer, spec):
    req = request(
        spec,
        [policy("svc", affinity="cluster", prefill=(1, {"h20": 1.0}), decode=(1, {"h20": 1.0}))],
        {"svc": (2, 4)},
    )
    [g] = place(placer, req).groups
    assert (g.domain, g.subgroup, g.group_id) == ("tiny", "rg-pod-b", "g-rg-pod-b-1")


def test_cp_sat_keeps_the_scarce_subgroup_for_the_service_that_needs_it():
    """A (high priority) prefers H800 prefill + H20 decode but can run H20/H20 at 0.9;
    B can only run H800/H20, which only pod-c offers, and needs all of it. The optimum
    serves both (A on H20/H20 in pod-b); the greedy scheduler, serving A's preferred
    pairing first, leaves B short."""
    spec = cluster(
        {
            "pod-b": [s1("b1", ("lb1", "b1n-[1-2]", "h20")), s1("b2", ("lb2", "b2n-[1-2]", "h20"))],
            "pod-c": [
                s1("c1", ("lc1", "c1n-[1-2]", "h800")),
                s1("c2", ("lc2", "c2n-[1-2]", "h20")),
            ],
        }
    )
    a = policy("a", priority=500, prefill=(2, {"h800": 1.0, "h20": 0.9}), decode=(2, {"h20": 1.0}))
    b = policy("b", priority=100, prefill=(2, {"h800": 1.0}), decode=(2, {"h20": 1.0}))
    req = request(spec, [a, b], {"a": (2, 4), "b": (8, 8)})

    optimal = place(CpSatPlacer(), req)
    assert optimal.stats.status == "OPTIMAL"
    assert not optimal.shortfalls
    assert {(g.domain, g.prefill.gpu_type) for g in groups_of(optimal, "a")} == {("pod-b", "h20")}
    assert {g.domain for g in groups_of(optimal, "b")} == {"pod-c"}

    greedy = place(GreedyPlacer(), req)
    assert {(g.domain, g.prefill.gpu_type) for g in groups_of(greedy, "a")} == {("pod-c", "h800")}
    assert {s.service for s in greedy.shortfalls} == {"b"}


# --------------------------------------------------------------------------- growth


@BOTH
def test_existing_group_grows_in_place_on_its_partly_used_node(placer, spec):
    running = group(
        "svc", "g1", "pod-a", "rg-pod-a", ("h800", {"a1n-1": 1}), ("h800", {"a1n-1": 2})
    )
    req = request(spec, [policy("svc", **HOMOGENEOUS)], {"svc": (2, 4)}, [running])
    [g] = place(placer, req).groups
    assert g.group_id == "g1"
    assert (g.prefill.instances, g.decode.instances) == (2, 4)
    assert {p.node for p in g.prefill.nodes} | {p.node for p in g.decode.nodes} == {"a1n-1"}


def test_cp_sat_opens_a_new_group_rather_than_grow_in_a_scarce_subgroup(spec):
    running = group(
        "svc", "g1", "pod-c", "rg-pod-c", ("h800", {"c1n-1": 1}), ("h800", {"c1n-1": 1})
    )
    pol = policy("svc", shape=(4, 4), **HOMOGENEOUS)
    req = request(spec, [pol], {"svc": (3, 3)}, [running])
    result = place(CpSatPlacer(), req)
    by_id = {g.group_id: g for g in result.groups}
    assert by_id["g1"] == running  # untouched
    assert (by_id["g-pod-a-1"].prefill.instances, by_id["g-pod-a-1"].decode.instances) == (2, 2)
    # The paper's scheduler grows the group in place.
    greedy = place(GreedyPlacer(), req)
    assert [g.group_id for g in greedy.groups] == ["g1"]


@BOTH
def test_a_role_growing_alone_overflows_its_groups(placer, spec):
    """Prefill is at target and every group is full: a new group would need a prefill
    instance beyond the target, so decode grows past the group size instead."""
    running = group(
        "svc", "g1", "pod-a", "rg-pod-a", ("h800", {"a1n-1": 2}), ("h800", {"a1n-1": 4})
    )
    req = request(spec, [policy("svc", **HOMOGENEOUS)], {"svc": (2, 7)}, [running])
    result = place(placer, req)
    [g] = result.groups
    assert (g.group_id, g.prefill.instances, g.decode.instances) == ("g1", 2, 7)
    assert not result.anchors  # room in place: no anchored group, no overshoot
    assert result.placed("svc", "prefill") == 2


# --------------------------------------------------------------------------- anchors

# chat-like: H800 prefill; decode prefers H20, accepts H800 at 0.4; TP4; groups of 3+4.
CHAT_LIKE = {"prefill": (4, {"h800": 1.0}), "decode": (4, {"h20": 1.0, "h800": 0.4})}


def pod_c_full_group():
    """One group filling pod-c: 4 H800 prefill on c1 and 4 H20 decode on c2 (TP4)."""
    return group(
        "svc",
        "g-pod-c-1",
        "pod-c",
        "rg-pod-c",
        ("h800", {"c1n-1": 2, "c1n-2": 2}),
        ("h20", {"c2n-1": 2, "c2n-2": 2}),
    )


@BOTH
def test_a_role_growing_alone_next_to_a_group_that_cannot_grow_opens_an_anchored_group(
    placer, spec
):
    """The running group's switch is gone, prefill is at target and decode grows: a
    new group in the cheapest domain takes the 2 decode plus 1 anchor prefill."""
    stray = group("svc", "g1", "old-switch", None, ("h800", {"a1n-1": 1}), ("h800", {"a1n-1": 1}))
    result = place(placer, request(spec, [policy("svc", **HOMOGENEOUS)], {"svc": (1, 3)}, [stray]))
    by_id = {g.group_id: g for g in result.groups}
    assert by_id["g1"] == stray
    anchored = by_id["g-pod-a-1"]
    assert (anchored.prefill.instances, anchored.decode.instances) == (1, 2)
    assert result.anchors == (Anchor("svc", "prefill", "g-pod-a-1", 1),)
    assert result.placed("svc", "prefill") == 2 and result.overshoot("svc", "prefill") == 1
    assert not result.shortfalls
    assert any("1 prefill instance(s) beyond the prefill target" in n for n in result.stats.notes)


@BOTH
def test_prefill_growing_alone_with_its_domain_full_opens_an_anchored_group(placer, spec):
    """Prefill must grow by 2 and pod-c (the group's S2) has no H800 left. CP-SAT opens
    an H800/H800 group in pod-a (low class; decode on H800 costs 59 per GPU of
    preference, far less than the scarce-class waste of pod-d); the paper's greedy
    rule tries the preferred pair H800/H20 first, which only pod-d (high) offers."""
    running = pod_c_full_group()
    req = request(spec, [policy("svc", shape=(3, 4), **CHAT_LIKE)], {"svc": (6, 4)}, [running])
    result = place(placer, req)
    assert not result.shortfalls
    by_id = {g.group_id: g for g in result.groups}
    assert by_id["g-pod-c-1"] == running
    [new] = [g for g in result.groups if g.group_id != "g-pod-c-1"]
    assert (new.prefill.instances, new.decode.instances) == (2, 1)
    expected = {"cp-sat": ("pod-a", "h800"), "greedy": ("pod-d", "h20")}[placer.name]
    assert (new.domain, new.decode.gpu_type) == expected
    assert result.anchors == (Anchor("svc", "decode", new.group_id, 1),)
    assert result.placed("svc", "decode") - result.overshoot("svc", "decode") == 4


@BOTH
def test_anchored_group_takes_the_rest_by_overflow_before_a_second_anchor(placer, spec):
    """Prefill grows by 6 (group size 7): one anchored group holds all of them, the
    part beyond its size by overflow, so the overshoot stays one decode instance."""
    running = pod_c_full_group()
    req = request(spec, [policy("svc", shape=(3, 4), **CHAT_LIKE)], {"svc": (12, 4)}, [running])
    result = place(placer, req)
    assert not result.shortfalls
    [anchor] = result.anchors
    new = {g.group_id: g for g in result.groups}[anchor.group_id]
    assert (new.prefill.instances, new.decode.instances) == (8, 1)


@BOTH
def test_no_anchor_when_the_existing_domain_has_room(placer, spec):
    """Like above, but pod-c's H800 S1 has room for exactly the 2 new prefill
    instances: they overflow the full group in place (300 each, far less than an
    anchor), and no decode instance is added."""
    running = group(
        "svc", "g-pod-c-1", "pod-c", "rg-pod-c", ("h800", {"c1n-1": 2}), ("h20", {"c2n-1": 2})
    )
    req = request(spec, [policy("svc", shape=(2, 2), **CHAT_LIKE)], {"svc": (4, 2)}, [running])
    result = place(placer, req)
    [g] = result.groups
    assert (g.group_id, g.prefill.instances, g.decode.instances) == ("g-pod-c-1", 4, 2)
    assert not result.anchors and not result.shortfalls
    # One more prefill instance than pod-c holds: now (and only now) an anchor.
    req = request(spec, [policy("svc", shape=(2, 2), **CHAT_LIKE)], {"svc": (5, 2)}, [running])
    result = place(placer, req)
    assert not result.shortfalls and len(result.anchors) == 1
    assert result.overshoot("svc", "decode") == 1


@BOTH
def test_anchor_shortfall_says_a_new_group_needs_an_anchor(placer):
    """Decode grows alone next to a group that cannot grow; 4 GPUs are left, enough
    for the decode instance but not with the anchor prefill: the shortfall says why."""
    spec = cluster({"pod-a": [s1("a1", ("la1", "a1n-[1-2]", "h800"))]})
    running = group("svc", "g1", "old-switch", None, ("h800", {"a1n-1": 1}), ("h800", {"a1n-1": 1}))
    other = group(
        "other", "g1", "pod-a", "rg-pod-a", ("h800", {"a1n-2": 2}), ("h800", {"a1n-2": 2})
    )
    pols = [
        policy("svc", prefill=(4, {"h800": 1.0}), decode=(4, {"h800": 1.0})),
        policy("other", prefill=(1, {"h800": 1.0}), decode=(1, {"h800": 1.0})),
    ]
    result = place(placer, request(spec, pols, {"svc": (1, 2)}, [running, other]))
    assert not result.anchors
    [s] = result.shortfalls
    assert (s.role, s.instances, s.constraint) == ("decode", 1, "gpu_capacity")
    assert "1 anchor prefill instance(s)" in s.detail


def test_example_fleet_chat_prefill_growth_leaves_full_pod_c_for_an_anchored_group(repo_root):
    """prod-east: chat's groups fill pod-c's 128 H800 GPUs with prefill; TTFT raises
    prefill by 4 while decode is at target. Both placers open one anchored group."""
    from reconciler.desired import load_desired_state

    state = load_desired_state(repo_root)
    spec = state.clusters["prod-east"]
    pols = [p for p in state.policies_for("prod-east") if p.name == "chat"]
    start = place(CpSatPlacer(), request(spec, pols, {"chat": (32, 32)}))
    assert not start.shortfalls and {g.domain for g in start.groups} == {"pod-c"}
    for placer in PLACERS:
        result = place(placer, request(spec, pols, {"chat": (36, 32)}, start.groups))
        assert not result.shortfalls
        [anchor] = result.anchors
        assert (anchor.role, anchor.instances) == ("decode", 1)
        new = {g.group_id: g for g in result.groups}[anchor.group_id]
        assert (new.prefill.instances, new.decode.instances) == (4, 1)
        assert new.domain == {"cp-sat": "pod-a", "greedy": "pod-d"}[placer.name]
        assert result.placed("chat", "decode") == 33


@BOTH
def test_new_groups_split_instances_by_need_within_the_group_size(placer, spec):
    req = request(spec, [policy("svc", shape=(2, 4), **HOMOGENEOUS)], {"svc": (3, 9)})
    result = place(placer, req)
    assert len(result.groups) == 2
    for g in result.groups:
        assert g.prefill.instances >= 1 and g.decode.instances >= 1
        assert g.prefill.instances + g.decode.instances <= 6


def test_cp_sat_packs_onto_partly_used_nodes_to_keep_whole_nodes_free(spec):
    other = group("other", "g1", "a1", "rg-pod-a", ("h800", {"a1n-1": 2}), ("h800", {"a1n-1": 2}))
    pols = [
        policy("other", affinity="s1", **HOMOGENEOUS),
        policy("svc", affinity="s1", **HOMOGENEOUS),
    ]
    req = request(spec, pols, {"svc": (2, 2)}, [other])
    result = place(CpSatPlacer(), req)
    [g] = groups_of(result, "svc")
    assert {p.node for p in g.prefill.nodes + g.decode.nodes} == {"a1n-1"}
    usage = node_usage(req, result.groups)
    assert [n for n in ("a1n-1", "a1n-2", "a2n-1", "a2n-2") if usage[n] == 0] == [
        "a1n-2",
        "a2n-1",
        "a2n-2",
    ]


# --------------------------------------------------------------------------- scale-in


@BOTH
def test_scale_in_frees_the_scarcest_subgroup_first_and_deletes_whole_groups(placer, spec):
    low = group("svc", "g-low", "pod-a", "rg-pod-a", ("h800", {"a1n-1": 2}), ("h800", {"a1n-1": 2}))
    high = group(
        "svc", "g-high", "pod-d", "rg-pod-d", ("h800", {"d1x-1": 2}), ("h800", {"d1x-1": 2})
    )
    pol = policy("svc", **HOMOGENEOUS)
    result = place(placer, request(spec, [pol], {"svc": (2, 2)}, [low, high]))
    assert [g.group_id for g in result.groups] == ["g-low"]
    result = place(placer, request(spec, [pol], {"svc": (3, 3)}, [low, high]))
    by_id = {g.group_id: g for g in result.groups}
    assert (by_id["g-high"].prefill.instances, by_id["g-high"].decode.instances) == (1, 1)
    assert by_id["g-low"] == low


@BOTH
def test_scale_in_empties_the_least_used_node_first(placer, spec):
    running = group(
        "svc", "g1", "pod-a", "rg-pod-a", ("h800", {"a1n-1": 1}), ("h800", {"a1n-1": 5, "a1n-2": 1})
    )
    result = place(
        placer,
        request(spec, [policy("svc", shape=(2, 8), **HOMOGENEOUS)], {"svc": (1, 5)}, [running]),
    )
    [g] = result.groups
    assert {p.node: p.instances for p in g.decode.nodes} == {"a1n-1": 5}


@BOTH
def test_groups_of_services_without_policy_are_pruned_and_services_without_target_kept(
    placer, spec
):
    gone = group("gone", "g1", "pod-a", "rg-pod-a", ("h800", {"a1n-1": 1}), ("h800", {"a1n-1": 1}))
    held = group("held", "g1", "pod-b", "rg-pod-b", ("h20", {"b1n-1": 1}), ("h20", {"b1n-1": 1}))
    pols = [policy("held", prefill=(1, {"h20": 1.0}), decode=(1, {"h20": 1.0}))]
    result = place(placer, request(spec, pols, {}, [gone, held]))
    assert result.groups == (held,)


# --------------------------------------------------------------------------- shortfalls


@BOTH
def test_capacity_goes_to_the_higher_priority_and_the_rest_is_explained(placer):
    spec = cluster({"pod-a": [s1("a1", ("la1", "a1n-[1-4]", "h800"))]})
    hi = policy("hi", priority=500, **HOMOGENEOUS)
    lo = policy("lo", priority=100, **HOMOGENEOUS)
    result = place(placer, request(spec, [hi, lo], {"hi": (8, 16), "lo": (8, 16)}))
    assert result.placed("hi", "prefill") == 8 and result.placed("hi", "decode") == 16
    assert {s.service for s in result.shortfalls} == {"lo"}
    assert sum(s.instances for s in result.shortfalls) == 16
    for s in result.shortfalls:
        assert s.constraint == "gpu_capacity"
        assert "cluster-wide free: 0 h800" in s.detail
        assert "hi (priority 500) 24 h800" in s.detail


@BOTH
def test_missing_gpu_type_is_reported_per_role(placer, spec):
    pol = policy("svc", prefill=(1, {"l20": 1.0}), decode=(1, {"l20": 1.0}))
    result = place(placer, request(spec, [pol], {"svc": (1, 2)}))
    assert not result.groups
    assert [(s.role, s.instances, s.constraint) for s in result.shortfalls] == [
        ("decode", 2, "gpu_type"),
        ("prefill", 1, "gpu_type"),
    ]
    assert "l20" in result.shortfalls[0].detail and "tiny" in result.shortfalls[0].detail


@BOTH
def test_affinity_shortfall_names_the_switch_level(placer):
    spec = cluster(
        {
            "pod-c": [
                s1("c1", ("lc1", "c1n-[1-2]", "h800")),
                s1("c2", ("lc2", "c2n-[1-2]", "h20")),
            ],
        }
    )
    pol = policy("svc", affinity="s1", **HETEROGENEOUS)
    result = place(placer, request(spec, [pol], {"svc": (1, 2)}))
    assert not result.groups
    assert {(s.role, s.constraint) for s in result.shortfalls} == {
        ("prefill", "affinity"),
        ("decode", "affinity"),
    }
    assert all("under one S1" in s.detail for s in result.shortfalls)


@BOTH
def test_capacity_shortfall_names_the_largest_free_domain(placer):
    spec = cluster({"pod-b": [s1("b1", ("lb1", "b1n-[1-4]", "h20"))]})
    other = group(
        "other", "g1", "pod-b", "rg-pod-b", ("h20", {"b1n-1": 8, "b1n-2": 8}), ("h20", {"b1n-3": 8})
    )
    pols = [
        policy("other", prefill=(1, {"h20": 1.0}), decode=(1, {"h20": 1.0}), shape=(16, 8)),
        policy("svc", prefill=(8, {"h20": 1.0}), decode=(8, {"h20": 1.0})),
    ]
    result = place(placer, request(spec, pols, {"svc": (1, 1)}, [other]))
    # 8 GPUs are free: either role alone would fit, a group of both (16 GPUs) does not.
    assert not groups_of(result, "svc")
    assert {(s.role, s.constraint) for s in result.shortfalls} == {
        ("prefill", "gpu_capacity"),
        ("decode", "gpu_capacity"),
    }
    for s in result.shortfalls:
        assert "8 GPU(s)" in s.detail
        assert "largest free under one S2: 8 h20 GPUs under S2 pod-b" in s.detail


@BOTH
def test_group_that_cannot_grow_and_cannot_be_joined_is_a_group_shape_shortfall(placer, spec):
    """Decode grows alone next to a group on a switch that is gone; a new group would
    need a prefill instance, but no allowed prefill type exists in the cluster."""
    stray = group("svc", "g1", "old-switch", None, ("l20", {"a1n-1": 1}), ("h800", {"a1n-1": 1}))
    pol = policy("svc", prefill=(1, {"l20": 1.0}), decode=(1, {"h800": 1.0}))
    result = place(placer, request(spec, [pol], {"svc": (1, 3)}, [stray]))
    assert result.groups == (stray,)
    assert not result.anchors
    [s] = result.shortfalls
    assert (s.role, s.instances, s.constraint) == ("decode", 2, "group_shape")
    assert "no allowed prefill GPU type" in s.detail


def test_no_policy_target_is_reported(spec):
    result = place(CpSatPlacer(), request(spec, [], {"ghost": (1, 1)}))
    assert {(s.service, s.constraint) for s in result.shortfalls} == {("ghost", "no_policy")}


# --------------------------------------------------------------------------- cp-sat


def test_cp_sat_reports_optimality_and_phases(spec):
    req = request(spec, [policy("svc", **HETEROGENEOUS)], {"svc": (4, 8)})
    stats = CpSatPlacer().place(req).stats
    assert stats.solver == "cp-sat" and stats.status == "OPTIMAL"
    assert stats.gap == 0.0
    assert {"prepare", "build_model", "solve"} <= {name for name, _ in stats.phases_s}
    # The greedy layout is optimal here: kept, and said so (nothing to pack).
    assert stats.kept_greedy
    assert any(n.startswith("greedy layout kept") for n in stats.notes)


def test_cp_sat_is_deterministic(repo_root):
    from reconciler.desired import load_desired_state

    state = load_desired_state(repo_root)
    spec = state.clusters["prod-east"]
    pols = state.policies_for("prod-east")
    targets = {"svc-a": (12, 24), "svc-b": (24, 24), "chat": (6, 18), "summarize": (8, 16)}
    first = CpSatPlacer().place(request(spec, pols, targets))
    second = CpSatPlacer().place(request(spec, pols, targets))
    assert first.groups == second.groups and first.shortfalls == second.shortfalls


def test_example_fleet_places_heterogeneous_services_in_mixed_subgroups(repo_root):
    from reconciler.desired import load_desired_state

    state = load_desired_state(repo_root)
    spec = state.clusters["prod-east"]
    pols = state.policies_for("prod-east")
    targets = {"svc-a": (8, 16), "svc-b": (16, 16), "chat": (4, 12), "summarize": (4, 8)}
    for placer in PLACERS:
        req = request(spec, pols, targets)
        result = place(placer, req)
        assert not result.shortfalls
        for g in result.groups:
            if g.service == "summarize":
                assert g.subgroup == "rg-c"  # the only L20 capacity
            else:
                assert (g.prefill.gpu_type, g.decode.gpu_type) != ("h20", "h20")
                assert g.subgroup == "rg-c"  # medium suffices: high stays free
    # CP-SAT leaves pod-d (class high) completely free.
    result = CpSatPlacer().place(request(spec, pols, targets))
    assert not any(g.domain == "pod-d" for g in result.groups)


def test_rebalance_moves_a_group_out_of_a_subgroup_it_does_not_need(spec):
    stuck = group("svc", "g1", "pod-d", "rg-pod-d", ("h800", {"d1x-1": 2}), ("h800", {"d1x-1": 2}))
    pol = policy("svc", **HOMOGENEOUS)
    kept = place(CpSatPlacer(), request(spec, [pol], {"svc": (2, 2)}, [stuck]))
    assert kept.groups == (stuck,)
    moved = place(
        CpSatPlacer(), request(spec, [pol], {"svc": (2, 2)}, [stuck], allow_rebalance=True)
    )
    [g] = moved.groups
    assert (g.domain, g.prefill.instances, g.decode.instances) == ("pod-a", 2, 2)


def test_rebalance_does_not_move_what_is_already_well_placed(spec):
    fine = group("svc", "g1", "pod-a", "rg-pod-a", ("h800", {"a1n-1": 2}), ("h800", {"a1n-1": 2}))
    pol = policy("svc", **HOMOGENEOUS)
    result = place(
        CpSatPlacer(), request(spec, [pol], {"svc": (3, 3)}, [fine], allow_rebalance=True)
    )
    [g] = result.groups
    assert g.group_id == "g1" and (g.prefill.instances, g.decode.instances) == (3, 3)
    assert {p.node: p.instances for p in g.prefill.nodes}["a1n-1"] >= 2


def test_greedy_ignores_rebalance_and_says_so(spec):
    stuck = group("svc", "g1", "pod-d", "rg-pod-d", ("h800", {"d1x-1": 2}), ("h800", {"d1x-1": 2}))
    result = GreedyPlacer().place(
        request(
            spec, [policy("svc", **HOMOGENEOUS)], {"svc": (2, 2)}, [stuck], allow_rebalance=True
        )
    )
    assert result.groups == (stuck,)
    assert any("allow_rebalance ignored" in n for n in result.stats.notes)


def test_example_fleet_puts_new_instances_on_the_type_ranked_first(repo_root):
    """Placement reads the policy's ranking (``gpu_economics.ranked_gpu_types``): chat's
    decode kept on H20 by preference lands there; ranked by cost, on H800."""
    from reconciler.desired import load_desired_state

    state = load_desired_state(repo_root)
    spec = state.clusters["prod-east"]
    chat = state.policies["chat"]
    by_cost = chat.model_copy(
        update={"decode": chat.decode.model_copy(update={"gpu_choice": "cost"})}
    )
    for placer in PLACERS:
        for pol, decode_type in ((chat, "h20"), (by_cost, "h800")):
            result = place(placer, request(spec, [pol], {"chat": (4, 12)}))
            assert not result.shortfalls
            assert {g.decode.gpu_type for g in result.groups} == {decode_type}, placer.name


RANKED_DECODE = {"prefill": (1, {"h800": 1.0}), "decode": (1, {"h800": 1.0, "h20": 0.5})}


def test_greedy_grows_a_role_on_its_first_ranked_type_not_in_groups_of_another(spec):
    """A group whose decode runs on H20 (placed before the ranking put H800 first) does
    not take the role's growth: it goes to a group on H800, so a ranking change moves
    new instances to the new first type."""
    old = group("svc", "g1", "pod-c", "rg-pod-c", ("h800", {"c1n-1": 2}), ("h20", {"c2n-1": 2}))
    result = place(
        GreedyPlacer(), request(spec, [policy("svc", **RANKED_DECODE)], {"svc": (2, 4)}, [old])
    )
    kept = next(g for g in result.groups if g.group_id == "g1")
    assert kept.decode.instances == 2  # the H20 ones stay, none added
    added = sum(g.decode.instances for g in result.groups if g.decode.gpu_type == "h800")
    assert added == 2


def test_greedy_spills_growth_to_another_allowed_type_when_the_first_is_full(spec):
    """No H800 GPU free: the growth goes where the role's other allowed type runs."""
    h800_nodes = ["a1n-1", "a1n-2", "a2n-1", "a2n-2"]
    blocker = group(
        "blk", "b1", "pod-a", "rg-pod-a", ("h800", {n: 8 for n in h800_nodes}), ("h800", {})
    )
    others = [
        group("blk", "b2", "pod-c", "rg-pod-c", ("h800", {"c1n-1": 8, "c1n-2": 8}), ("h800", {})),
        group(
            "blk",
            "b3",
            "pod-d",
            "rg-pod-d",
            ("h800", {"d1x-1": 8, "d1x-2": 8, "d2x-1": 8, "d2x-2": 8}),
            ("h800", {}),
        ),
    ]
    old = group("svc", "g1", "pod-c", "rg-pod-c", ("h800", {"c1n-1": 0}), ("h20", {"c2n-1": 2}))
    old = replace(old, prefill=replace(old.prefill, instances=0, nodes=()))
    blk = policy("blk", prefill=(1, {"h800": 1.0}), decode=(1, {"h800": 1.0}), shape=(64, 1))
    req = request(
        spec,
        [policy("svc", **RANKED_DECODE), blk],
        {"svc": (0, 4), "blk": (48, 0)},
        [blocker, *others, old],
    )
    result = place(GreedyPlacer(), req)
    decode = [(g.decode.gpu_type, g.decode.instances) for g in groups_of(result, "svc")]
    assert {t for t, n in decode if n} == {"h20"} and sum(n for _, n in decode) == 4
    assert not [s for s in result.shortfalls if s.service == "svc"]


@BOTH
def test_free_gpus_too_scattered_for_an_instance_are_said_as_such(placer):
    # One-GPU nodes, two-GPU prefill instances: 4 GPUs free, none in a 2-GPU slot.
    spec = cluster(
        {"pa": [s1("a1", ("la1", "a1n-[1-4]", "h800"), ("lb1", "b1n-[1-4]", "h20"))]},
        gpus_per_node=1,
    )
    pol = policy("s", prefill=(2, {"h800": 1.0}), shape=(1, 1))
    result = place(placer, request(spec, [pol], {"s": (1, 1)}))
    (short,) = [s for s in result.shortfalls if s.role == "prefill"]
    assert "cluster-wide free: 0 h800 in 2-GPU slots, of 4 free GPUs" in short.detail


def test_rebalance_never_reuses_in_the_same_cycle_the_gpus_it_frees():
    """svc runs 4 prefill and 4 decode on d1x-1, in pod-d (class high, which it does
    not need); three heterogeneous services want 8 H800 prefill each, and only pod-c
    and pod-d have H800 beside H20. Under allow_rebalance svc moves to pod-a, and its
    GPUs on d1x-1 were handed to the others in the same cycle: but svc's old instances
    serve until the moved ones do (apply holds them, make before break), so those GPUs
    are busy and Pods put there could not start. They are free to placement only once
    svc's old instances are gone, a later cycle."""
    spec = three_class_cluster(nodes_per_leaf=1)
    svc = policy("svc", shape=(4, 4), **HOMOGENEOUS)
    hets = [policy(f"het{n}", shape=(8, 4), **HETEROGENEOUS) for n in (1, 2, 3)]
    stuck = group("svc", "g1", "pod-d", "rg-pod-d", ("h800", {"d1x-1": 4}), ("h800", {"d1x-1": 4}))
    targets = {"svc": (4, 4), **{p.name: (8, 4) for p in hets}}
    req = request(spec, [svc, *hets], targets, [stuck], allow_rebalance=True)
    result = place(CpSatPlacer(), req)  # check_invariants: no GPU freed this cycle reused
    [moved] = [g for g in result.groups if g.service == "svc"]
    assert moved.domain == "pod-a", moved
    others = {p.node for g in result.groups if g.service != "svc" for p in g.prefill.nodes}
    assert "d1x-1" not in others
    assert sum(s.instances for s in result.shortfalls if s.role == "prefill") == 8

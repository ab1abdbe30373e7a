"""reconciler.placement.packing: best fit, its exact fallback, and the split helpers."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from placement_fixtures import policy

from reconciler.placement.packing import PackItem, best_fit, pack
from reconciler.placement.problem import ServiceNeed, WorkGroup, split_growth, split_new_groups


def item(key, nodes, size, count, depth=3, component=0, weight=1):
    return PackItem(
        key, np.array(nodes, dtype=np.int64), size, count, depth, weight, component, (key,)
    )


def test_best_fit_prefers_the_fullest_node_that_still_fits():
    free = np.array([8, 3, 5, 8])
    placed, unplaced = best_fit(free, [item("a", [0, 1, 2, 3], 2, 3)])
    # 3 free -> one instance (1 left); 5 free -> two (1 left); whole nodes untouched.
    assert placed["a"] == {1: 1, 2: 2}
    assert not unplaced
    assert list(free) == [8, 1, 1, 8]


def test_best_fit_places_deeper_domains_first():
    free = np.array([4, 4])
    wide = item("wide", [0, 1], 4, 1, depth=2)
    narrow = item("narrow", [0], 4, 1, depth=3)
    placed, unplaced = best_fit(free, [wide, narrow])
    assert placed == {"narrow": {0: 1}, "wide": {1: 1}} and not unplaced


def test_exact_fallback_packs_what_best_fit_cannot():
    """Sizes 3 and 2 on nodes with 5 and 4 free: best fit puts the 3 on the 4-node and
    strands a 2; the exact re-pack finds 3+2 | 2+2."""
    items = [item("three", [0, 1], 3, 1), item("two", [0, 1], 2, 3)]
    _placed, unplaced = best_fit(np.array([5, 4]), items)
    assert unplaced == {"two": 1}
    free = np.array([5, 4])
    outcome = pack(free, items, time_limit_s=5.0)
    assert not outcome.unplaced
    assert outcome.fallback_components == 1 and outcome.fallback_status == "OPTIMAL"
    assert list(free) == [0, 0]


def test_pack_reports_what_does_not_fit_at_all():
    free = np.array([4, 4])
    outcome = pack(
        free, [item("big", [0, 1], 8, 1, weight=5), item("small", [0, 1], 4, 1)], time_limit_s=5.0
    )
    assert outcome.unplaced == {"big": 1}
    assert sum(sum(v.values()) for v in outcome.placed.values()) == 1


@settings(max_examples=60, deadline=None)
@given(
    free=st.lists(st.integers(0, 8), min_size=1, max_size=8),
    items=st.lists(
        st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(1, 6), st.integers(0, 2**8 - 1)),
        min_size=1,
        max_size=5,
    ),
)
def test_pack_never_overbooks_and_stays_on_candidate_nodes(free, items):
    nodes = len(free)
    built = []
    for i, (size, count, mask) in enumerate(items):
        candidates = [n for n in range(nodes) if mask >> n & 1] or [0]
        built.append(item(i, candidates, size, count))
    start = np.array(free, dtype=np.int64)
    left = start.copy()
    outcome = pack(left, built, time_limit_s=2.0)
    assert np.all(left >= 0)
    used = np.zeros(nodes, dtype=np.int64)
    for it in built:
        spot = outcome.placed.get(it.key, {})
        assert set(spot) <= set(it.nodes.tolist())
        assert sum(spot.values()) + outcome.unplaced.get(it.key, 0) == it.count
        for node, count in spot.items():
            used[node] += count * it.size
    assert np.array_equal(start - left, used)


def _need(shape=(2, 4)) -> ServiceNeed:
    from reconciler.placement.problem import RoleNeed

    pol = policy("svc", shape=shape)
    roles = {
        r: RoleNeed(r, 1, ("h800",), {"h800": 1.0}, target=100, current=0)
        for r in ("prefill", "decode")
    }
    return ServiceNeed("svc", pol, roles["prefill"], roles["decode"])


def _group(gid, p, d) -> WorkGroup:
    return WorkGroup(
        "svc",
        "tiny",
        gid,
        "pod-a",
        None,
        None,
        {"prefill": "h800", "decode": "h800"},
        {"prefill": {"n": p} if p else {}, "decode": {"n": d} if d else {}},
    )


def test_split_new_groups_gives_every_group_both_roles_and_respects_the_size():
    shares = split_new_groups(3, _need((2, 4)), {"prefill": 4, "decode": 12})
    assert [s["prefill"] + s["decode"] for s in shares] == [6, 5, 5]
    assert all(s["prefill"] >= 1 and s["decode"] >= 1 for s in shares)
    assert sum(s["prefill"] for s in shares) == 4 and sum(s["decode"] for s in shares) == 12


def test_split_new_groups_overflows_round_robin_beyond_the_size():
    shares = split_new_groups(2, _need((1, 1)), {"prefill": 2, "decode": 6})
    assert [s["decode"] for s in shares] == [3, 3] and [s["prefill"] for s in shares] == [1, 1]


def test_split_growth_fills_room_in_proportion_then_overflows():
    a, b = _group("a", 2, 2), _group("b", 1, 1)
    plan = split_growth([a, b], _need((2, 4)), {"prefill": 1, "decode": 7})
    per_group = {}
    for g, role, n in plan:
        per_group.setdefault(g.group_id, {}).setdefault(role, 0)
        per_group[g.group_id][role] += n
    assert sum(v.get("prefill", 0) for v in per_group.values()) == 1
    assert sum(v.get("decode", 0) for v in per_group.values()) == 7
    # room: a 2, b 4 -> 6 in place, 2 overflow
    assert per_group["a"].get("prefill", 0) + per_group["a"].get("decode", 0) >= 2

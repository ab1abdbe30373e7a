"""The shared arithmetic every autoscaler uses (reconciler.policy.clamps)."""

from __future__ import annotations

import pytest

from reconciler.policy.clamps import (
    RoleBounds,
    ceil_count,
    clamp_bounds,
    clamp_step,
    enforce_ratio,
    floor_count,
    follow_ratio,
    round_to_groups,
    step_allowance,
)

P = RoleBounds("prefill", 1, 100)
D = RoleBounds("decode", 1, 200)


@pytest.mark.parametrize(
    ("x", "ceil", "floor"),
    [
        (0.0, 0, 0),
        (-3.0, 0, 0),
        (2.5, 3, 2),
        (3.0, 3, 3),
        (0.1 * 3, 1, 0),  # 0.30000000000000004
        (41600 / 1600, 26, 26),
        (2.9999999999, 3, 3),  # within float slack of 3
        (26.000001, 27, 26),
    ],
)
def test_rounding_with_float_slack(x, ceil, floor):
    assert (ceil_count(x), floor_count(x)) == (ceil, floor)


@pytest.mark.parametrize(
    ("current", "instances", "percent", "allowance"),
    [
        (10, 4, 100, 10),  # max(4, 10)
        (2, 4, 100, 4),  # max(4, 2)
        (10, 2, 25, 3),  # max(2, ceil(2.5))
        (0, 4, 100, 4),  # nothing to take a percentage of
    ],
)
def test_step_allowance(current, instances, percent, allowance):
    assert step_allowance(current, instances, percent) == allowance


def test_clamp_step_both_directions_and_records_numbers():
    clamps: list = []
    assert clamp_step(40, 10, "decode", 4, 100, clamps) == 20
    assert clamp_step(0, 10, "decode", 2, 50, clamps) == 5
    assert clamp_step(12, 10, "decode", 4, 10, clamps) == 12  # within the allowance
    assert [(c.before, c.after) for c in clamps] == [(40, 20), (0, 5)]
    assert clamps[1].detail == "max step 2 instances or 50% of 10"


def test_clamp_bounds_records_which_bound():
    clamps: list = []
    bounds = RoleBounds("decode", 3, 30)
    assert [clamp_bounds(v, bounds, clamps) for v in (0, 10, 99)] == [3, 10, 30]
    assert [(c.name, c.before, c.after) for c in clamps] == [
        ("min_instances", 0, 3),
        ("max_instances", 99, 30),
    ]


@pytest.mark.parametrize(
    ("role", "count", "ratio", "expected"),
    [
        ("decode", 25, 0.5, 13),  # 12.5 -> 13 prefill
        ("decode", 26, 1 / 3, 9),  # 8.67 -> 9 prefill
        ("decode", 27, 1 / 3, 9),  # exactly 9 despite 1/3 in floats
        ("prefill", 9, 0.5, 18),
        ("prefill", 7, 3.0, 3),  # 2.33 -> 3 decode
    ],
)
def test_follow_ratio_rounds_up(role, count, ratio, expected):
    assert follow_ratio(role, count, ratio) == expected


@pytest.mark.parametrize(
    ("pair", "bounds", "expected", "clamp_names"),
    [
        # inside 1:4..1:1: untouched
        ((5, 10), (P, D), (5, 10), []),
        # 1 / 10 < 1:4 -> prefill up to ceil(10 / 4) = 3 (add to the short role)
        ((1, 10), (P, D), (3, 10), ["ratio_min"]),
        # 12 / 10 > 1:1 -> decode up to 12
        ((12, 10), (P, D), (12, 12), ["ratio_max"]),
        # prefill max 5 cannot reach ceil(40 / 4) = 10: decode cut to 5 / (1/4) = 20
        ((5, 40), (RoleBounds("prefill", 1, 5), D), (5, 20), ["ratio_min"]),
        # decode max 8 cannot reach 12: prefill cut to 8 x 1 = 8
        ((12, 8), (P, RoleBounds("decode", 1, 8)), (8, 8), ["ratio_max"]),
        # decode min 1, prefill min 3 and max ratio 1:1 -> no pair with decode < 3;
        # decode 1 -> 3 (the ratio bound adds to the short role)
        ((3, 1), (RoleBounds("prefill", 3, 10), D), (3, 3), ["ratio_max"]),
    ],
)
def test_enforce_ratio_prefers_adding_to_the_short_role(pair, bounds, expected, clamp_names):
    clamps: list = []
    assert enforce_ratio(*pair, 0.25, 1.0, *bounds, clamps) == expected
    assert sorted({c.name for c in clamps}) == clamp_names


def test_enforce_ratio_finds_the_nearest_pair_when_integers_leave_a_gap():
    # Exactly 1:2 with 3 decode needs 1.5 prefill: no integer pair; the nearest decode
    # count upward that admits one is 4 (2 prefill).
    clamps: list = []
    assert enforce_ratio(1, 3, 0.5, 0.5, P, D, clamps) == (2, 4)
    assert {c.name for c in clamps} == {"ratio_bound"}


def test_enforce_ratio_with_a_capped_decode_keeps_the_most_it_can_pair():
    """Exactly 1:5, decode at most 11: 3 prefill would need 15 decode, and no integer
    pair holds the 11 the cap allows. The pair kept is the largest the cap admits (2
    and 10), not the one nearest the 4 decode asked for (1 and 5), which 2 prefill and
    4 decode already reach: more demand never means fewer instances."""
    prefill, decode = RoleBounds("prefill", 0, 3), RoleBounds("decode", 0, 11)
    clamps: list = []
    assert enforce_ratio(3, 4, 0.2, 0.2, prefill, decode, clamps) == (2, 10)
    assert enforce_ratio(2, 4, 0.2, 0.2, prefill, decode, []) == (2, 10)


def test_enforce_ratio_reports_an_unattainable_ratio():
    # prefill fixed at 10, decode at most 5: 10 / 5 = 2 > max 1:1 whatever we do.
    clamps: list = []
    out = enforce_ratio(
        10, 5, 0.25, 1.0, RoleBounds("prefill", 10, 10), RoleBounds("decode", 1, 5), clamps
    )
    assert out == (10, 5)
    assert [c.name for c in clamps] == ["ratio_unattainable"]
    assert "prefill 10..10 and decode 1..5" in clamps[0].detail


@pytest.mark.parametrize(
    ("pair", "bounds", "expected"),
    [
        # shape 2 + 4: max(ceil(5 / 2), ceil(9 / 4)) = 3 groups -> 6, 12
        ((5, 9), (P, D), (6, 12)),
        ((6, 12), (P, D), (6, 12)),
        # decode max 18 -> at most 4 whole groups -> 8, 16
        ((20, 40), (P, RoleBounds("decode", 1, 18)), (8, 16)),
        # min 3 prefill -> at least 2 groups -> 4, 8
        ((0, 0), (RoleBounds("prefill", 3, 100), D), (4, 8)),
    ],
)
def test_round_to_groups(pair, bounds, expected):
    clamps: list = []
    assert round_to_groups(*pair, 2, 4, *bounds, clamps) == expected
    assert bool(clamps) == (pair != expected)
    assert all("deployment groups of 2 prefill + 4 decode" in c.detail for c in clamps)

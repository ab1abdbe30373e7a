"""CP-SAT is never worse than the paper's greedy scheduler.

"Worse than greedy" is ``reconciler.placement.quality.worse_than``: the measured terms
in the CP-SAT objective's order (unmet demand by priority rank, anchor GPUs, GPUs of
groups spanning subgroups, scarce GPUs x class steps, overflow, preference cost, whole
nodes), compared lexicographically. CP-SAT starts from the greedy layout and returns
it, saying so, whenever its search finds nothing better in time.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from placement_fixtures import check_invariants, group, policy, request, three_class_cluster
from placement_strategies import SETTINGS, requests

from reconciler.placement import cpsat
from reconciler.placement.cpsat import CpSatPlacer
from reconciler.placement.greedy import GreedyPlacer
from reconciler.placement.quality import (
    PlacementQuality,
    first_worse_term,
    measure,
    measure_pair,
    objective_terms,
    worse_than,
)

HOMOGENEOUS = {"prefill": (1, {"h800": 1.0}), "decode": (1, {"h800": 1.0})}


def measured(req, result) -> PlacementQuality:
    return measure(req.cluster, req.policies, req.current, result, req.targets)


def both(req):
    """CP-SAT's and greedy's placement of ``req``, each checked for the invariants."""
    cp_sat, greedy = CpSatPlacer().place(req), GreedyPlacer().place(req)
    check_invariants(req, cp_sat)
    return cp_sat, greedy


# --------------------------------------------------------------------------- definition


def quality(**terms: float) -> PlacementQuality:
    base = {
        "groups": 4,
        "groups_in_one_subgroup": 4,
        "changed_groups": 4,
        "changed_groups_in_one_subgroup": 4,
        "scarce_gpus_unneeded": 0,
        "scarce_gpus_unneeded_added": 0,
        "whole_nodes_free": 10,
        "unmet_gpus": 0,
        "unmet_weighted": 0,
        "gpus_added": 8,
        "preferred_share_added": 1.0,
    }
    return PlacementQuality(**{**base, **terms})  # type: ignore[arg-type]


def test_worse_than_compares_the_terms_in_the_objective_order():
    better_on_unmet = quality(unmet_rank_weighted=1, spanning_gpus=0)
    worse_on_unmet = quality(unmet_rank_weighted=2, spanning_gpus=0)
    assert worse_than(worse_on_unmet, better_on_unmet)
    assert not worse_than(better_on_unmet, worse_on_unmet)
    # A higher term counts only when every earlier one ties.
    less_unmet_more_scarce = quality(unmet_rank_weighted=1, scarce_gpu_steps=500)
    assert not worse_than(less_unmet_more_scarce, worse_on_unmet)
    assert first_worse_term(quality(scarce_gpu_steps=3), quality(scarce_gpu_steps=2)) == (
        "scarce-subgroup GPUs x class steps held by groups not needing them"
    )
    # More whole nodes left free is better (the last term).
    assert worse_than(quality(whole_nodes_free=9), quality(whole_nodes_free=10))
    # Equal on every term: not worse.
    assert not worse_than(quality(), quality())
    names = [name for name, _value in objective_terms(quality())]
    assert names[0].startswith("unmet demand") and names[-1] == "nodes not left whole"


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(requests())
def test_cp_sat_is_never_worse_than_greedy(case):
    spec, pols, targets, running = case
    req = request(spec, pols, targets, running)
    cp_sat, greedy = both(req)
    assert not worse_than(measured(req, cp_sat), measured(req, greedy)), first_worse_term(
        measured(req, cp_sat), measured(req, greedy)
    )
    # The greedy layout is always a solution of the model, so the search starts there.
    assert not any("breaks" in n for n in cp_sat.stats.notes), cp_sat.stats.notes
    if cp_sat.stats.kept_greedy:
        assert cp_sat.groups == greedy.groups and cp_sat.shortfalls == greedy.shortfalls
        assert any(n.startswith("greedy layout kept: ") for n in cp_sat.stats.notes)


@SETTINGS
@given(requests())
def test_measuring_only_the_groups_that_differ_compares_like_measuring_all(case):
    """``measure_pair`` (the placer's last guard, cheap on large fleets) leaves out the
    groups equal in both layouts: every term differs between the two by what the full
    measures differ by, so the comparison is the same."""
    spec, pols, targets, running = case
    req = request(spec, pols, targets, running)
    cp_sat, greedy = CpSatPlacer().place(req), GreedyPlacer().place(req)
    args = (req.cluster, req.policies, req.current)
    for a, b in ((cp_sat, greedy), (greedy, cp_sat), (greedy, greedy)):
        full = [measure(*args, r, req.targets) for r in (a, b)]
        pair = measure_pair(*args, a, b, req.targets)

        def differences(qa, qb):
            return [
                x - y
                for (_, x), (_, y) in zip(objective_terms(qa), objective_terms(qb), strict=True)
            ]

        assert differences(*full) == differences(*pair)
        assert first_worse_term(*pair) == first_worse_term(*full)


@SETTINGS
@given(requests(), st.sampled_from([1e-9, 0.001]))
def test_a_search_cut_short_still_returns_at_least_the_greedy_layout(case, time_limit_s):
    spec, pols, targets, running = case
    req = request(spec, pols, targets, running, time_limit_s=time_limit_s)
    cp_sat, greedy = both(req)
    assert not worse_than(measured(req, cp_sat), measured(req, greedy))


# --------------------------------------------------------------------------- cases


def test_with_no_time_to_search_cp_sat_returns_the_greedy_layout_and_says_so():
    spec = three_class_cluster()
    pols = [policy("a", **HOMOGENEOUS), policy("b", affinity="cluster", **HOMOGENEOUS)]
    req = request(spec, pols, {"a": (6, 12), "b": (4, 8)}, time_limit_s=1e-9)
    cp_sat, greedy = both(req)
    assert cp_sat.groups == greedy.groups
    assert cp_sat.stats.solver == "cp-sat" and cp_sat.stats.kept_greedy
    assert "greedy layout kept: the search found nothing better than it in the model" in (
        cp_sat.stats.notes
    )


def test_with_time_cp_sat_improves_on_the_greedy_layout():
    """Greedy grows the group in the scarce subgroup in place; CP-SAT opens a new
    group in a low-class one (and says nothing about greedy)."""
    spec = three_class_cluster()
    running = group(
        "svc", "g1", "pod-c", "rg-pod-c", ("h800", {"c1n-1": 1}), ("h800", {"c1n-1": 1})
    )
    req = request(spec, [policy("svc", shape=(4, 4), **HOMOGENEOUS)], {"svc": (3, 3)}, [running])
    cp_sat, greedy = both(req)
    assert not cp_sat.stats.kept_greedy
    assert worse_than(measured(req, greedy), measured(req, cp_sat))


def test_a_shortage_cut_short_keeps_the_greedy_layout():
    """Capacity runs out: with no time, phase 1 finds nothing better than greedy."""
    spec = three_class_cluster()
    hi = policy("hi", priority=500, **HOMOGENEOUS)
    lo = policy("lo", priority=100, **HOMOGENEOUS)
    req = request(spec, [hi, lo], {"hi": (40, 40), "lo": (20, 20)}, time_limit_s=1e-9)
    cp_sat, greedy = both(req)
    assert cp_sat.shortfalls and cp_sat.stats.kept_greedy
    assert cp_sat.groups == greedy.groups


def test_a_cp_sat_layout_measured_worse_is_replaced_by_the_greedy_one(monkeypatch):
    """The last guard: the realised layout (after node packing) measured against
    greedy's; whichever term it loses on is named."""
    monkeypatch.setattr(cpsat, "first_worse_term", lambda _mine, _greedy: "a term")
    spec = three_class_cluster()
    running = group(
        "svc", "g1", "pod-c", "rg-pod-c", ("h800", {"c1n-1": 1}), ("h800", {"c1n-1": 1})
    )
    req = request(spec, [policy("svc", shape=(4, 4), **HOMOGENEOUS)], {"svc": (3, 3)}, [running])
    result = CpSatPlacer().place(req)
    assert result.stats.kept_greedy
    assert result.groups == GreedyPlacer().place(req).groups
    assert (
        "greedy layout kept: the cp-sat layout measured worse than it on a term after node "
        "packing" in result.stats.notes
    )

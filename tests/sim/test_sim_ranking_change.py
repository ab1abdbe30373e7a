"""A change of GPU-type ranking on a running service, end to end in the simulator: the
planner, placement and the fleet together. Chat's decode runs on H20 (its example
``gpu_choice: preference``); twenty minutes in, a reviewed change ranks it by cost
(H800 first). The fleet must keep serving: instances on H20 count at their own
capacity, new ones go to H800, and nothing is cut to the count H800 alone would need."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from reconciler.desired import DesiredState
from reconciler.desired.models import ServicePolicy
from reconciler.placement.base import PlacementRequest, PlacementResult, Placer
from reconciler.placement.cpsat import CpSatPlacer
from reconciler.placement.greedy import GreedyPlacer
from reconciler.policy.base import Decision, DecisionInput
from reconciler.policy.planner import PlannerAutoscaler
from reconciler.sim.engine import synthetic_profile
from reconciler.sim.evaluate import PolicyResult, run_autoscaler
from reconciler.sim.fleet import SimulatedFleet

SWITCH_S = 20 * 60


@dataclass
class RankingChange:
    """The planner and the placer of one service, both switched to ``after`` (the same
    policy ranked by cost) at ``at_s``, as a merged pull request would switch them."""

    after: ServicePolicy
    at_s: float
    placer: Placer
    switched: bool = False
    name: str = "heteroscale"

    def decide(self, inputs: DecisionInput) -> Decision:
        if inputs.now_s >= self.at_s:
            self.switched = True
            inputs = replace(inputs, policy=self.after)
        return PlannerAutoscaler().decide(inputs)

    def place(self, request: PlacementRequest) -> PlacementResult:
        if self.switched:
            request = replace(request, policies={self.after.name: self.after})
        return self.placer.place(request)


def _run(
    state: DesiredState, change: RankingChange | None, placer: Placer
) -> tuple[PolicyResult, dict[str, int]]:
    # Conversation lengths like chat's declared request shape (what the ranking prices
    # at), under a load that rises to its peak mid-hour and falls: decode grows after
    # the switch and shrinks at the end.
    profile = synthetic_profile(
        "chat", hours=1.0, peak_rps=500.0, seed=3, trough_ratio=0.4, bursts=()
    )
    fleets: list[SimulatedFleet] = []
    autoscaler = change if change is not None else PlannerAutoscaler()
    result = run_autoscaler(
        state,
        "chat",
        profile,
        autoscaler,
        placer=change if change is not None else placer,
        on_fleet=fleets.append,
    )
    [fleet] = fleets
    cluster = state.policies["chat"].cluster
    decode = dict(fleet.fleet_state(cluster).service_fleet("chat").decode.by_type)
    return result, decode


def _by_cost(chat: ServicePolicy) -> ServicePolicy:
    return chat.model_copy(update={"decode": chat.decode.model_copy(update={"gpu_choice": "cost"})})


@pytest.fixture(scope="module", params=[GreedyPlacer(), CpSatPlacer()], ids=lambda p: p.name)
def runs(
    state: DesiredState, request: pytest.FixtureRequest
) -> tuple[PolicyResult, PolicyResult, dict[str, int]]:
    placer: Placer = request.param
    chat = state.policies["chat"]
    assert chat.decode.gpu_choice == "preference"
    kept, _ = _run(state, None, placer)
    changed, decode_by_type = _run(state, RankingChange(_by_cost(chat), SWITCH_S, placer), placer)
    return kept, changed, decode_by_type


def test_new_decode_instances_go_to_the_type_ranked_first(
    runs: tuple[PolicyResult, PolicyResult, dict[str, int]],
) -> None:
    _, _, decode_by_type = runs
    assert decode_by_type.get("h800", 0) > 0
    assert decode_by_type.get("h20", 0) > 0  # kept: the load never fell to retire them


def test_the_change_keeps_the_slo_and_costs_less(
    runs: tuple[PolicyResult, PolicyResult, dict[str, int]],
) -> None:
    kept, changed, _ = runs
    assert changed.slo_attainment >= kept.slo_attainment - 0.005, (
        kept.slo_attainment,
        changed.slo_attainment,
    )
    assert kept.cost_usd is not None and changed.cost_usd is not None
    assert changed.cost_usd < kept.cost_usd


def test_sizing_the_new_type_alone_would_break_the_slo(
    state: DesiredState,
    runs: tuple[PolicyResult, PolicyResult, dict[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the per-type count prevents: with every H20 instance taken for an H800 one,
    the planner cuts decode to the H800 count and the SLO breaks (the check above is
    one that can fail)."""
    import reconciler.policy.planner as planner

    monkeypatch.setattr(planner, "held_instances", lambda *args: {})
    placer = GreedyPlacer()
    change = RankingChange(_by_cost(state.policies["chat"]), SWITCH_S, placer)
    blind, _ = _run(state, change, placer)
    _, counted, _ = runs
    assert blind.slo_attainment < counted.slo_attainment - 0.05

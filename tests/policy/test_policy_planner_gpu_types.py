"""The planner on GPU types chosen by cost: it sizes with the first-ranked type's
model and counts instances on any other type at their own capacity, so a change of
ranking (a price, a policy) never cuts a fleet to the count the new type would need."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from reconciler.desired import load_desired_state
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.policy.base import DecisionInput, PolicyHistory
from reconciler.policy.planner import (
    PlannerAutoscaler,
    count_on_types,
    held_instances,
    perf_context,
)
from reconciler.state import (
    DeploymentGroup,
    FleetState,
    GroupRole,
    LengthBuckets,
    RoleCount,
    Sample,
    ServiceFleet,
    ServiceMetrics,
)

REPO = Path(__file__).resolve().parents[2]
BUCKETS = (*(float(m * 10**e) for e in range(6) for m in (1, 2, 5)), math.inf)


def _chat_by_cost() -> tuple[ServicePolicy, ClusterSpec]:
    """The example chat service with its decode ranked by cost (H800 first)."""
    state = load_desired_state(REPO)
    policy = state.policies["chat"]
    decode = policy.decode.model_copy(update={"gpu_choice": "cost"})
    scaling = policy.scaling.model_copy(
        update={"target_per_instance": None, "prefill_target_per_instance": None}
    )
    return policy.model_copy(update={"decode": decode, "scaling": scaling}), state.clusters[
        policy.cluster
    ]


def _metrics(now_s: float, prefill_tps: float, decode_tps: float) -> ServiceMetrics:
    rng = np.random.default_rng(1)
    bounds = np.asarray(BUCKETS)

    def buckets(values: np.ndarray) -> LengthBuckets:
        counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=bounds.size)
        return LengthBuckets(BUCKETS, tuple(float(c) for c in np.cumsum(counts)), now_s)

    return ServiceMetrics(
        "chat",
        prefill_tps=Sample(prefill_tps, now_s),
        decode_tps=Sample(decode_tps, now_s),
        prompt_tokens=buckets(rng.lognormal(math.log(1000), 0.6, 4000)),
        output_tokens=buckets(rng.lognormal(math.log(200), 0.5, 4000)),
    )


def _fleet(prefill: int, decode_by_type: dict[str, int]) -> ServiceFleet:
    return ServiceFleet(
        "chat",
        RoleCount(prefill, by_type=(("h800", prefill),)),
        RoleCount(sum(decode_by_type.values()), by_type=tuple(sorted(decode_by_type.items()))),
    )


def _decide(fleet: ServiceFleet, decode_tps: float) -> tuple[int, int, str]:
    policy, cluster = _chat_by_cost()
    decision = PlannerAutoscaler().decide(
        DecisionInput(
            policy, fleet, _metrics(0.0, 150_000.0, decode_tps), PolicyHistory(), 0.0, cluster
        )
    )
    return decision.prefill, decision.decode, decision.message


# --------------------------------------------------------------------------- counting


def test_instances_on_the_first_type_alone_need_no_conversion() -> None:
    assert count_on_types(10_000.0, 1_000.0, [(4, 1_000.0)]) == 10
    assert count_on_types(10_000.0, 1_000.0, []) == 10


def test_a_weaker_type_kept_is_counted_at_its_own_capacity() -> None:
    """12 instances of 250 tokens/s each hold 3,000: covering 10,000 keeps all 12 and
    adds 7 of the first type (1,000 each), not the 10 the first type alone needs."""
    assert count_on_types(10_000.0, 1_000.0, [(12, 250.0)]) == 19
    # Enough of them: only as many as needed are kept.
    assert count_on_types(1_000.0, 1_000.0, [(12, 250.0)]) == 4


def test_the_kept_order_is_the_given_order() -> None:
    """Placement keeps the first-ranked type longest: those count first."""
    assert count_on_types(2_000.0, 1_000.0, [(2, 1_000.0), (8, 250.0)]) == 2
    assert count_on_types(3_000.0, 1_000.0, [(2, 1_000.0), (8, 250.0)]) == 6
    # A type with no capacity (no longer fits) ends what can be kept.
    assert count_on_types(3_000.0, 1_000.0, [(2, 1_000.0), (8, 0.0), (4, 500.0)]) == 3


@given(
    needed=st.floats(0.0, 1e6),
    first=st.floats(1.0, 1e4),
    held=st.lists(st.tuples(st.integers(0, 200), st.floats(1.0, 1e4)), max_size=4),
)
def test_the_count_covers_the_need_and_no_smaller_count_does(
    needed: float, first: float, held: list[tuple[int, float]]
) -> None:
    def capacity(count: int) -> float:
        total, left = 0.0, count
        for instances, tps in held:
            take = min(instances, left)
            total += take * tps
            left -= take
        return total + left * first

    count = count_on_types(needed, first, held)
    # Within ``ceil_count``'s rounding tolerance (a count never rounds up for a need
    # a float's error above a whole one).
    assert capacity(count) >= needed * (1 - 1e-6) - 1e-6
    if count > 0:
        assert capacity(count - 1) < needed * (1 + 1e-6) + 1e-6


# --------------------------------------------------------------------------- decisions


def test_a_fleet_on_the_type_ranked_first_is_sized_as_before() -> None:
    policy, cluster = _chat_by_cost()
    perf = perf_context(policy, cluster)
    assert perf is not None and perf.decode.gpu_type == "h800"
    fleet = _fleet(12, {"h800": 8})
    assert held_instances(policy, cluster, fleet, perf) == {}
    _, decode, message = _decide(fleet, 40_000.0)
    assert "several GPU types" not in message
    assert "decode on h800 by cost" in message  # the choice and its reason
    assert decode >= 7  # 40,000 output tokens/s over ~6,400 each, plus headroom


def test_a_ranking_change_never_cuts_a_fleet_to_the_new_types_count() -> None:
    """Chat's decode on 30 H20 instances when the ranking puts H800 first: the same
    demand sized on H800 alone would keep ~8; counted at H20's own capacity the fleet
    keeps what serves the demand and grows on H800."""
    policy, cluster = _chat_by_cost()
    on_h800 = _decide(_fleet(12, {"h800": 8}), 40_000.0)[1]
    _, decode, message = _decide(_fleet(12, {"h20": 30}), 40_000.0)
    assert "decode runs on several GPU types (30 on h20" in message
    assert decode > on_h800 * 2
    perf = perf_context(policy, cluster)
    assert perf is not None
    held = held_instances(policy, cluster, _fleet(12, {"h20": 30, "h800": 2}), perf)
    assert [(h.gpu_type, h.instances) for h in held["decode"]] == [("h800", 2), ("h20", 30)]


def test_service_fleet_counts_instances_per_type() -> None:
    def group(group_id: str, decode_type: str, decode: int) -> DeploymentGroup:
        return DeploymentGroup(
            "chat",
            "prod-east",
            group_id,
            "pod-a",
            "pod-a",
            GroupRole("h800", 2),
            GroupRole(decode_type, decode),
        )

    state = FleetState(
        "prod-east",
        (group("g1", "h20", 3), group("g2", "h800", 2), group("g3", "h20", 1)),
        starting={("chat", "decode"): 1},
    )
    fleet = state.service_fleet("chat")
    assert fleet.decode.by_type == (("h20", 4), ("h800", 2))
    assert fleet.decode.active == 6 and fleet.decode.starting == 1
    assert fleet.prefill.by_type == (("h800", 6),)


def test_a_type_no_node_has_is_never_the_one_sized_with() -> None:
    """A faster type in the catalogue without nodes (ordered, not yet racked) first in
    chat's prefill preference: sizing with its model would count on capacity no node
    gives, and every instance would land on the slower type that is there. The type
    ranked first, and sized with, is one that some node has."""
    policy, cluster = _chat_by_cost()
    faster = cluster.gpu_types["h800"].model_copy(
        update={"bf16_tflops": 2250.0, "memory_bandwidth_gbps": 8000.0, "memory_gib": 180.0}
    )
    cluster = cluster.model_copy(update={"gpu_types": {**cluster.gpu_types, "b200": faster}})
    assert "b200" not in cluster.gpu_types_with_nodes
    prefill = policy.prefill.model_copy(update={"gpu_types": {"b200": 1.0, "h800": 0.1}})
    policy = policy.model_copy(update={"prefill": prefill})
    perf = perf_context(policy, cluster)
    assert perf is not None and perf.prefill.gpu_type == "h800"

    def prefill_count(on: tuple[ServicePolicy, ClusterSpec]) -> int:
        decision = PlannerAutoscaler().decide(
            DecisionInput(
                on[0],
                _fleet(12, {"h20": 30}),
                _metrics(0.0, 150_000.0, 40_000.0),
                PolicyHistory(),
                0.0,
                on[1],
            )
        )
        return decision.prefill

    # The same count as a policy that allows h800 alone: b200 plays no part.
    only_h800 = policy.model_copy(
        update={"prefill": prefill.model_copy(update={"gpu_types": {"h800": 1.0}})}
    )
    assert prefill_count((policy, cluster)) == prefill_count((only_h800, cluster))

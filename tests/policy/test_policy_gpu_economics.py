"""What each allowed GPU type delivers per dollar (``reconciler.policy.gpu_economics``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.desired import load_desired_state
from reconciler.desired.loader import DesiredState
from reconciler.policy.capacity import LatencyCorrection
from reconciler.policy.gpu_economics import (
    COSTLIER_TOLERANCE,
    RoleEconomics,
    TypeEconomics,
    role_economics,
)
from reconciler.policy.planner import capacities_for, declared_mix, perf_context

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def state() -> DesiredState:
    return load_desired_state(REPO)


def test_each_allowed_type_that_fits_is_listed_in_preference_order(state: DesiredState) -> None:
    policy = state.policies["chat"]
    prefill, decode = role_economics(
        policy, state.clusters[policy.cluster], declared_mix(policy.request_shape)
    )
    assert [t.gpu_type for t in prefill.types] == ["h800"]
    assert [t.gpu_type for t in decode.types] == ["h20", "h800"]  # {h20: 1.0, h800: 0.4}


def test_the_preferred_types_capacity_is_the_planners(state: DesiredState) -> None:
    """One derivation: the figure tune shows for the type that runs is what the planner
    sizes with (same mix, same pool size, no correction)."""
    policy = state.policies["chat"]
    cluster = state.clusters[policy.cluster]
    mix = declared_mix(policy.request_shape)
    prefill, decode = role_economics(policy, cluster, mix, prefill_instances=8)
    perf = perf_context(policy, cluster)
    assert perf is not None
    planner = capacities_for(policy, perf, mix, 8, LatencyCorrection())
    assert prefill.types[0].tps_per_instance == pytest.approx(planner.prefill_tps_per_instance)
    assert decode.types[0].tps_per_instance == pytest.approx(planner.decode_tps_per_instance)


def test_tokens_per_dollar_follow_capacity_and_the_instance_price(state: DesiredState) -> None:
    policy = state.policies["chat"]
    cluster = state.clusters[policy.cluster]
    _, decode = role_economics(policy, cluster, declared_mix(policy.request_shape))
    for t in decode.types:
        gpus = policy.decode.gpus_per_instance
        price = cluster.gpu_types[t.gpu_type].cost_per_hour
        assert price is not None
        assert t.usd_per_hour == pytest.approx(gpus * price)
        assert t.mtok_per_usd == pytest.approx(t.tps_per_instance * 3600 / (gpus * price) / 1e6)


def test_chats_decode_preference_costs_more_per_token_than_h800_and_is_reported(
    state: DesiredState,
) -> None:
    """The finding of benchmarks/bench_findings.py, per service: a 70 B dense model's
    H20 decode instance is compute-bound long before an H800's, so the H800 serves a
    decode token for less despite 2.5x the price; svc-a's and svc-b's decode is
    cheaper on the preferred H20."""
    for service, costlier in (("chat", True), ("svc-a", False), ("svc-b", False)):
        policy = state.policies[service]
        _, decode = role_economics(
            policy, state.clusters[policy.cluster], declared_mix(policy.request_shape)
        )
        assert (decode.costlier_preference() is not None) is costlier, decode.line("USD")
        warning = decode.warning("USD")
        assert (warning is not None) is costlier
    policy = state.policies["chat"]
    _, decode = role_economics(
        policy, state.clusters[policy.cluster], declared_mix(policy.request_shape)
    )
    assert decode.cheapest is not None and decode.cheapest.gpu_type == "h800"
    assert "decode prefers h20" in (decode.warning("USD") or "")


def test_a_difference_within_the_tolerance_or_an_unpriced_type_is_not_reported() -> None:
    def economics(*types: TypeEconomics) -> RoleEconomics:
        return RoleEconomics("decode", types)

    near = economics(
        TypeEconomics("a", 1000.0, 4.0), TypeEconomics("b", 1000.0 * (1 + COSTLIER_TOLERANCE), 4.0)
    )
    assert near.costlier_preference() is None
    far = economics(TypeEconomics("a", 1000.0, 4.0), TypeEconomics("b", 2000.0, 4.0))
    assert far.costlier_preference() == pytest.approx(2.0)
    unpriced = economics(TypeEconomics("a", 1000.0, None), TypeEconomics("b", 2000.0, 4.0))
    assert unpriced.costlier_preference() is None and unpriced.cheapest is not None
    assert unpriced.types[0].mtok_per_usd is None
    assert economics().preferred is None and economics().warning("USD") is None

"""What each allowed GPU type delivers per dollar (``reconciler.policy.gpu_economics``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.desired import load_desired_state
from reconciler.desired.loader import DesiredState
from reconciler.desired.models import ClusterSpec, RequestShape, ServicePolicy
from reconciler.policy.capacity import LatencyCorrection
from reconciler.policy.gpu_economics import (
    COSTLIER_TOLERANCE,
    RoleEconomics,
    TypeEconomics,
    choose_gpu_types,
    ranked_gpu_types,
    ranked_weights,
    role_economics,
)
from reconciler.policy.planner import capacities_for, declared_mix, perf_context
from reconciler.state import Role

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
    perf = perf_context(policy, cluster)
    assert perf is not None
    prefill, decode = role_economics(policy, cluster, mix, prefill_instances=8, running=perf)
    planner = capacities_for(policy, perf, mix, 8, LatencyCorrection())

    def listed(economics: RoleEconomics, gpu_type: str) -> TypeEconomics:
        return next(t for t in economics.types if t.gpu_type == gpu_type)

    running_prefill = listed(prefill, perf.prefill.gpu_type)
    running_decode = listed(decode, perf.decode.gpu_type)
    assert running_prefill.tps_per_instance == pytest.approx(planner.prefill_tps_per_instance)
    assert running_decode.tps_per_instance == pytest.approx(planner.decode_tps_per_instance)


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


def with_choice(policy: ServicePolicy, role: Role, choice: str) -> ServicePolicy:
    role_policy = policy.role(role).model_copy(update={"gpu_choice": choice})
    return policy.model_copy(update={role: role_policy})


def test_chats_decode_preference_costs_more_per_token_than_h800_and_is_reported(
    state: DesiredState,
) -> None:
    """The finding of benchmarks/bench_findings.py, per service: a 70 B dense model's
    H20 decode instance is compute-bound long before an H800's, so the H800 serves a
    decode token for less despite 2.5x the price; svc-a's and svc-b's decode is
    cheaper on the preferred H20. Kept by preference, the costlier type is reported."""
    for service, costlier in (("chat", True), ("svc-a", False), ("svc-b", False)):
        policy = with_choice(state.policies[service], "decode", "preference")
        _, decode = role_economics(
            policy, state.clusters[policy.cluster], declared_mix(policy.request_shape)
        )
        assert (decode.costlier_preference() is not None) is costlier, decode.line("USD")
        warning = decode.warning("USD")
        assert (warning is not None) is costlier
    policy = with_choice(state.policies["chat"], "decode", "preference")
    _, decode = role_economics(
        policy, state.clusters[policy.cluster], declared_mix(policy.request_shape)
    )
    assert decode.cheapest is not None and decode.cheapest.gpu_type == "h800"
    assert "decode prefers h20" in (decode.warning("USD") or "")
    assert [t.gpu_type for t in decode.ranked()] == ["h20", "h800"]  # preference stands


def test_by_cost_chats_decode_runs_on_h800_and_nothing_is_reported(state: DesiredState) -> None:
    """``gpu_choice: cost`` (the default): the cheaper type per token is ranked first,
    the decision says why, and there is no preference left to warn about. (The
    example keeps chat's decode on H20 by ``gpu_choice: preference``.)"""
    policy = with_choice(state.policies["chat"], "decode", "cost")
    cluster = state.clusters[policy.cluster]
    _, decode = role_economics(policy, cluster, declared_mix(policy.request_shape))
    assert [t.gpu_type for t in decode.ranked()] == ["h800", "h20"]
    assert decode.warning("USD") is None
    prefill_choice, decode_choice = choose_gpu_types(policy, cluster)
    assert prefill_choice.order == ("h800",) and not prefill_choice.by_cost
    assert decode_choice.order == ("h800", "h20") and decode_choice.by_cost
    assert "decode on h800 by cost" in decode_choice.reason
    perf = perf_context(policy, cluster)
    assert perf is not None and perf.decode.gpu_type == "h800"


def test_a_type_no_batch_of_which_meets_the_tbt_is_not_ranked_by_the_work_it_keeps_up_with(
    state: DesiredState,
) -> None:
    """At an 18 ms TBT one sequence's step on chat's H800 decode (about 19 ms) already
    misses, while the H20's (about 17 ms) meets it: the H800 has no capacity at the SLO,
    however many tokens it generates at its largest batch, so by cost the H20 comes
    first, not the type whose keep-up rate looks the cheapest per token."""
    policy = with_choice(state.policies["chat"], "decode", "cost")
    policy = policy.model_copy(update={"slo": policy.slo.model_copy(update={"tbt_ms": 18.0})})
    cluster = state.clusters[policy.cluster]
    _, decode = role_economics(policy, cluster, declared_mix(policy.request_shape))
    by_type = {t.gpu_type: t.tps_per_instance for t in decode.types}
    assert by_type["h800"] == 0.0 and by_type["h20"] > 0.0
    assert decode.ranked()[0].gpu_type == "h20"


def test_the_choice_follows_the_prices_per_role(state: DesiredState) -> None:
    """Capacity per dollar picks the type per role on constructed prices, and flips
    when the prices do: at 8 USD an H800 GPU-hour, chat's decode goes back to H20;
    svc-a's prefill (compute-bound) stays on H800 until the H20 costs almost nothing."""
    chat = with_choice(state.policies["chat"], "decode", "cost")
    svc_a = state.policies["svc-a"]
    cluster = state.clusters[chat.cluster]

    def priced(**prices: float) -> ClusterSpec:
        types = {
            name: gpu.model_copy(update={"cost_per_hour": prices.get(name, gpu.cost_per_hour)})
            for name, gpu in cluster.gpu_types.items()
        }
        return cluster.model_copy(update={"gpu_types": types})

    assert ranked_gpu_types(chat, priced(), "decode") == ("h800", "h20")
    assert ranked_gpu_types(chat, priced(h800=8.0), "decode") == ("h20", "h800")
    assert ranked_gpu_types(svc_a, priced(), "prefill") == ("h800", "h20")
    assert ranked_gpu_types(svc_a, priced(h20=0.01), "prefill") == ("h20", "h800")
    assert ranked_gpu_types(svc_a, priced(), "decode") == ("h20", "h800")
    assert ranked_gpu_types(svc_a, priced(h20=4.0), "decode") == ("h800", "h20")


def test_an_unpriced_cluster_or_no_request_shape_keeps_the_weights_order(
    state: DesiredState,
) -> None:
    chat = with_choice(state.policies["chat"], "decode", "cost")
    cluster = state.clusters[chat.cluster]
    unpriced = cluster.model_copy(
        update={
            "gpu_types": {
                name: gpu.model_copy(update={"cost_per_hour": None})
                for name, gpu in cluster.gpu_types.items()
            }
        }
    )
    assert ranked_gpu_types(chat, unpriced, "decode") == ("h20", "h800")
    shapeless = chat.model_copy(update={"request_shape": None})
    assert ranked_gpu_types(shapeless, cluster, "decode") == ("h20", "h800")
    assert ranked_gpu_types(with_choice(chat, "decode", "preference"), cluster, "decode") == (
        "h20",
        "h800",
    )


def test_equally_cheap_types_are_ordered_by_the_weights() -> None:
    """Within ``COSTLIER_TOLERANCE`` the weights decide; beyond it, tokens per dollar."""

    def ranked(*types: TypeEconomics) -> list[str]:
        return [t.gpu_type for t in RoleEconomics("decode", types, "cost").ranked()]

    within = 1000.0 * (1 + COSTLIER_TOLERANCE * 0.9)
    beyond = 1000.0 * (1 + COSTLIER_TOLERANCE * 1.1)
    assert ranked(TypeEconomics("a", 1000.0, 4.0), TypeEconomics("b", within, 4.0)) == ["a", "b"]
    assert ranked(TypeEconomics("a", 1000.0, 4.0), TypeEconomics("b", beyond, 4.0)) == ["b", "a"]
    three = ranked(
        TypeEconomics("a", 1000.0, 4.0),
        TypeEconomics("b", 3000.0, 4.0),
        TypeEconomics("c", 2000.0, 4.0),
    )
    assert three == ["b", "c", "a"]


def test_ranked_weights_move_the_weights_onto_the_ranking() -> None:
    weights = {"h20": 1.0, "h800": 0.4, "l20": 0.2}
    assert ranked_weights(weights, ("h20", "h800", "l20")) == weights
    assert ranked_weights(weights, ("h800", "h20", "l20")) == {"h800": 1.0, "h20": 0.4, "l20": 0.2}
    # A type the cluster lacks keeps its weight; the present ones share theirs.
    assert ranked_weights(weights, ("h800", "h20")) == {"h800": 1.0, "h20": 0.4, "l20": 0.2}


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


def test_a_live_mix_that_reverses_the_declared_ranking_is_reported(state: DesiredState) -> None:
    """Ranked by cost at chat's declared shape (1,150 / 210 tokens) H800 decodes for
    less; at long contexts (7,800 / 700) decode reads far more KV cache per token, the
    H800's compute edge shrinks and the H20 is cheaper: tune says the declared shape no
    longer describes the traffic. The declared mix itself raises nothing."""
    policy = with_choice(state.policies["chat"], "decode", "cost")
    cluster = state.clusters[policy.cluster]
    _, declared_choice = choose_gpu_types(policy, cluster)
    assert declared_choice.first == "h800"
    _, declared = role_economics(policy, cluster, declared_mix(policy.request_shape))
    assert declared.ranking_drift(declared_choice.first, "USD") is None
    long_mix = declared_mix(RequestShape(prompt_tokens=7800, output_tokens=700))
    _, live = role_economics(policy, cluster, long_mix)
    drift = live.ranking_drift(declared_choice.first, "USD")
    assert drift is not None and "update request_shape" in drift and "on h20" in drift
    # Kept by preference, nothing is ranked by cost, so nothing drifts.
    kept = with_choice(policy, "decode", "preference")
    _, live_kept = role_economics(kept, cluster, long_mix)
    assert live_kept.ranking_drift("h20", "USD") is None

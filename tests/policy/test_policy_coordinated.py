"""The coordinated policy, rule by rule (issue 3, rules 1-7).

Unless a test says otherwise the policy is the synthetic ``svc`` of
``policy_testkit``: decode target 1000 tokens/s per instance, tolerance 10%, ratio
1:2 within 1:4..1:1, max step max(4, 100%), no stabilisation window, no cooldown.
"""

from __future__ import annotations

import math

import pytest
from policy_testkit import (
    example_policy,
    fleet,
    make_policy,
    metrics,
    paper_example_policy,
    steady_history,
    with_overrides,
)

from reconciler.policy import CoordinatedAutoscaler, PolicyHistory, decide, decide_many
from reconciler.policy.base import DecisionInput, Recommendation
from reconciler.policy.coordinated import policy_numbers, stabilise
from reconciler.state import Sample, ServiceMetrics

NOW = 1000.0


def clamp_names(decision) -> list[str]:
    return [c.name for c in decision.clamps]


# --------------------------------------------------------------------------- rule 1


@pytest.mark.parametrize(
    ("decode_now", "decode_tps", "expected_decode", "reason"),
    [
        # 15000 / (10 x 1000) = 1.5 > 1.1 -> ceil(15000 / 1000) = 15
        (10, 15000, 15, "scale_out"),
        # 10500 / 10000 = 1.05, inside 1 +- 0.1 -> hold 10
        (10, 10500, 10, "within_tolerance"),
        # 11000 / 10000 = 1.10 exactly: the band is inclusive -> hold
        (10, 11000, 10, "within_tolerance"),
        # 11500 / 10000 = 1.15 -> ceil(11.5) = 12
        (10, 11500, 12, "scale_out"),
        # 8000 / 10000 = 0.8 < 0.9 -> ceil(8.0) = 8
        (10, 8000, 8, "scale_in"),
        # 9100 / 10000 = 0.91, inside -> hold
        (10, 9100, 10, "within_tolerance"),
        # 2500 / 10000 = 0.25 -> ceil(2.5) = 3; step allowance max(4, 100% of 10) = 10
        (10, 2500, 3, "scale_in"),
        # 41600 / 30000 = 1.39 -> ceil(41.6) = 42 (float slack must not make it 43)
        (30, 41600, 42, "scale_out"),
    ],
)
def test_proportional_control_on_decode_tps(decode_now, decode_tps, expected_decode, reason):
    policy = make_policy()
    prefill_now = math.ceil(decode_now / 2)
    decision = decide(
        policy,
        fleet(prefill_now, decode_now),
        metrics(NOW, decode_tps=decode_tps),
        PolicyHistory(),
        NOW,
    )
    assert decision.decode == expected_decode
    # prefill follows 1:2, rounded up: ceil(decode / 2)
    assert decision.prefill == math.ceil(expected_decode / 2)
    assert decision.reason == reason


def test_exact_multiple_is_not_rounded_up_by_float_error():
    # 0.1 * 3 = 0.30000000000000004 in floats; 3 instances' worth must give 3.
    policy = make_policy(scaling={"target_per_instance": 0.1, "metric": "decode_tps"})
    decision = decide(policy, fleet(1, 1), metrics(NOW, decode_tps=0.1 * 3), PolicyHistory(), NOW)
    assert decision.decode == 3


@pytest.mark.parametrize(
    ("metric", "target", "observed", "prefill_now", "decode_now", "expected"),
    [
        # prefill_tps drives prefill: 30000 / 5000 = 6 prefill; decode = ceil(6 / 0.5) = 12
        ("prefill_tps", 5000, 30000, 2, 4, (6, 12)),
        # decode_gpu_util is an average over ready instances: 0.9 x 10 ready = 9.0
        # GPU-loads / 0.6 target = 15 decode; prefill ceil(15 / 2) = 8
        ("decode_gpu_util", 0.6, 0.9, 5, 10, (8, 15)),
        # prefill_sm_active: 0.8 x 4 ready / 0.5 = 6.4 -> 7 prefill; decode 7 / 0.5 = 14
        ("prefill_sm_active", 0.5, 0.8, 4, 8, (7, 14)),
        # prefill_gpu_util 0.62 / 0.6 = 1.03: inside the band -> hold 4 and 8
        ("prefill_gpu_util", 0.6, 0.62, 4, 8, (4, 8)),
        # decode_sm_active: 0.3 x 10 / 0.6 = 5 decode -> 3 prefill
        ("decode_sm_active", 0.6, 0.3, 5, 10, (3, 5)),
    ],
)
def test_selectable_primary_metric_drives_the_role_named_by_its_prefix(
    metric, target, observed, prefill_now, decode_now, expected
):
    policy = make_policy(
        scaling={"metric": metric, "target_per_instance": target, "max_step_percent": 1000}
    )
    decision = decide(
        policy,
        fleet(prefill_now, decode_now),
        metrics(NOW, **{metric: observed}),
        PolicyHistory(),
        NOW,
    )
    assert (decision.prefill, decision.decode) == expected


def test_utilisation_counts_starting_instances_as_capacity():
    # 0.9 average over 10 ready = 9.0 loads; capacity (10 + 5 starting) x 0.6 = 9.0
    # -> usage 1.0, hold: the starting instances already answer the load.
    policy = make_policy(scaling={"metric": "decode_gpu_util", "target_per_instance": 0.6})
    decision = decide(
        policy,
        fleet(8, 10, decode_starting=5),
        metrics(NOW, decode_gpu_util=0.9),
        PolicyHistory(),
        NOW,
    )
    assert (decision.prefill, decision.decode) == (8, 15)
    assert decision.reason == "within_tolerance"


def test_message_has_the_numbers_in_the_documented_shape():
    # The chat example with its decode target and ratio pinned to the example:
    # 41200 / 1600 = 25.75 -> 26 decode; ceil(26 / 3) = 9 prefill. Latency and KV
    # signals are fine, so they add nothing. The prefill floor (chat's 10200 prompt
    # tokens/s per instance): 81600 / (6 x 10200) = 1.33 > 1.1 -> ceil(81600 / 10200)
    # = 8 prefill, below the ratio's 9, so it is stated but does not bind.
    policy = with_overrides(
        example_policy("chat"),
        pd_ratio={"target": "1:3", "min": "1:5", "max": "1:1", "dynamic": False},
        scaling={"target_per_instance": 1600, "prefill_target_per_instance": 10200},
    )
    signals = metrics(
        NOW,
        service="chat",
        decode_tps=41200,
        prefill_tps=81600,
        tbt=30,
        ttft=500,
        decode_kv_usage=0.5,
    )
    decision = decide(policy, fleet(6, 18), signals, PolicyHistory(), NOW)
    assert decision.message == (
        "decode_tps 41200 / target 1600 per instance -> 26 decode; ratio 1:3 -> 9 prefill; "
        "prefill_tps 81600 / target 10200 per instance -> 8 prefill (floor)"
    )
    assert (decision.prefill, decision.decode, decision.reason) == (9, 26, "scale_out")
    assert decision.service == "chat"


def test_within_tolerance_records_the_tolerance_clamp_with_numbers():
    # 10500 / 10000 = 1.05; unclamped ceil(10.5) = 11 -> held at 10 by the band.
    decision = decide(
        make_policy(), fleet(5, 10), metrics(NOW, decode_tps=10500), PolicyHistory(), NOW
    )
    (clamp,) = decision.clamps
    assert (clamp.name, clamp.role, clamp.before, clamp.after) == ("tolerance", "decode", 11, 10)
    assert "1.05" in clamp.detail
    assert "within 10%" in decision.message


# --------------------------------------------------------------------------- rule 2

TIERS = [
    {"metric": "tbt", "above": 1.0, "step_percent": 10},
    {"metric": "tbt", "above": 1.5, "step_percent": 30},
    {"metric": "ttft", "above": 1.0, "step_percent": 20},
]


@pytest.mark.parametrize(
    ("tbt_ms", "ttft_ms", "expected", "reason"),
    [
        # TBT 44 ms = 1.1 x SLO 40: tier 1.0 fires, decode 20 ready x 1.1 = 22;
        # prefill follows: ceil(22 / 2) = 11
        (44, 500, (11, 22), "latency_feedback"),
        # TBT 64 ms = 1.6 x SLO: tiers 1.0 and 1.5 fire, the highest wins: 20 x 1.3 = 26
        (64, 500, (13, 26), "latency_feedback"),
        # TBT 36 ms = 0.9 x SLO: nothing fires; decode_tps 20000 / 20000 = 1.0 -> hold
        (36, 500, (10, 20), "within_tolerance"),
        # TTFT 1200 ms = 1.2 x SLO 1000: prefill 10 ready x 1.2 = 12; decode holds
        # (12 / 20 = 0.6 is inside 1:4..1:1)
        (36, 1200, (12, 20), "latency_feedback"),
        # both fire: decode 20 x 1.3 = 26; prefill max(ceil(26 / 2) = 13, 10 x 1.2 = 12) = 13
        (64, 1200, (13, 26), "latency_feedback"),
    ],
)
def test_latency_tiers_scale_their_role_and_the_largest_firing_tier_wins(
    tbt_ms, ttft_ms, expected, reason
):
    policy = make_policy(scaling={"latency_tiers": TIERS})
    signals = metrics(NOW, decode_tps=20000, tbt=tbt_ms, ttft=ttft_ms)
    decision = decide(policy, fleet(10, 20), signals, PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode) == expected
    assert decision.reason == reason


def test_latency_tier_adds_at_least_one_instance():
    # 3 ready x 1.1 = 3.3 -> ceil 4, and at least 3 + 1 = 4
    policy = make_policy(scaling={"latency_tiers": TIERS[:1]}, decode={"min_instances": 1})
    decision = decide(
        policy, fleet(2, 3), metrics(NOW, decode_tps=3000, tbt=50), PolicyHistory(), NOW
    )
    assert decision.decode == 4


@pytest.mark.parametrize(
    ("starting", "tbt_ms", "expected_decode"),
    [
        # 20 ready + 2 starting; tier 1.0 asks 20 x 1.1 = 22 = already active -> no more
        (2, 44, 22),
        # tier 1.5 asks 20 x 1.3 = 26 > 22 active -> 4 more
        (2, 64, 26),
    ],
)
def test_latency_feedback_counts_starting_instances(starting, tbt_ms, expected_decode):
    policy = make_policy(scaling={"latency_tiers": TIERS})
    signals = metrics(NOW, decode_tps=22000, tbt=tbt_ms, ttft=500)
    decision = decide(
        policy, fleet(11, 20, decode_starting=starting), signals, PolicyHistory(), NOW
    )
    assert decision.decode == expected_decode


def test_latency_beats_a_proportional_scale_in():
    # decode_tps 10000 asks for 10 decode, but TBT 1.1 x SLO asks for 20 x 1.1 = 22.
    policy = make_policy(scaling={"latency_tiers": TIERS})
    decision = decide(
        policy,
        fleet(10, 20),
        metrics(NOW, decode_tps=10000, tbt=44, ttft=500),
        PolicyHistory(),
        NOW,
    )
    assert decision.decode == 22
    assert decision.reason == "latency_feedback"


def test_missing_latency_signal_skips_its_tiers_and_says_so():
    policy = make_policy(scaling={"latency_tiers": TIERS})
    decision = decide(policy, fleet(10, 20), metrics(NOW, decode_tps=20000), PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode) == (10, 20)
    assert "tbt missing: tbt tiers skipped" in decision.message


def latency_primary_policy(**scaling):
    return make_policy(
        scaling={
            "metric": "tbt",
            "target_per_instance": 1,
            "latency_tiers": TIERS[:2],
            "scale_in_window_s": 300,
            "latency_scale_in_below": 0.5,
            **scaling,
        }
    )


def test_latency_primary_scales_out_on_its_tiers():
    # TBT 1.2 x SLO: decode 20 x 1.1 = 22, prefill ceil(22 / 2) = 11
    decision = decide(
        latency_primary_policy(), fleet(10, 20), metrics(NOW, tbt=48), PolicyHistory(), NOW
    )
    assert (decision.prefill, decision.decode, decision.reason) == (11, 22, "latency_feedback")


def test_latency_primary_holds_between_scale_in_threshold_and_slo():
    # TBT 28 ms = 0.7 x SLO: above 0.5 x SLO and below the first tier -> hold
    decision = decide(
        latency_primary_policy(), fleet(10, 20), metrics(NOW, tbt=28), PolicyHistory(), NOW
    )
    assert (decision.prefill, decision.decode, decision.reason) == (10, 20, "within_tolerance")


def test_latency_primary_scales_in_only_after_a_whole_window_below_threshold():
    policy = latency_primary_policy()
    # A full 300 s window of "scale in" recommendations (TBT was below 0.5 x SLO in
    # each of them): 20 - max(1, floor(20 x 10%)) = 18 decode, 9 prefill.
    low_window = steady_history(9, 18, until_s=NOW, span_s=300)
    decision = decide(policy, fleet(10, 20), metrics(NOW, tbt=12), low_window, NOW)
    assert (decision.prefill, decision.decode, decision.reason) == (9, 18, "scale_in")
    # One cycle in the window where TBT was not that low (a hold at 10/20) blocks it.
    recs = list(low_window.recommendations)
    recs[5] = Recommendation(recs[5].at_s, 10, 20)
    blocked = decide(
        policy, fleet(10, 20), metrics(NOW, tbt=12), PolicyHistory(recommendations=tuple(recs)), NOW
    )
    assert (blocked.prefill, blocked.decode, blocked.reason) == (10, 20, "stabilised")
    # A history shorter than the window blocks it too.
    short = steady_history(9, 18, until_s=NOW, span_s=120)
    fresh = decide(policy, fleet(10, 20), metrics(NOW, tbt=12), short, NOW)
    assert (fresh.prefill, fresh.decode) == (10, 20)
    assert "history covers 135 s of the 300 s window" in fresh.message


# --------------------------------------------------------------------------- rule 3


def test_follower_rounds_up():
    # 25 decode x 1/2 = 12.5 -> 13 prefill (never starve decode of prefill)
    decision = decide(
        make_policy(), fleet(10, 20), metrics(NOW, decode_tps=25000), PolicyHistory(), NOW
    )
    assert (decision.prefill, decision.decode) == (13, 25)


def test_prefill_driven_follower_rounds_up():
    # 9 prefill / (1/2) = 18 decode; 9.5 prefill worth of load -> 10 prefill -> 20 decode
    policy = make_policy(scaling={"metric": "prefill_tps", "target_per_instance": 1000})
    decision = decide(policy, fleet(5, 10), metrics(NOW, prefill_tps=9500), PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode) == (10, 20)


def test_ratio_max_adds_decode_when_latency_raises_prefill():
    # TTFT 1.5 x SLO with a +30% ttft tier: prefill 20 x 1.3 = 26 against 20 decode,
    # ratio 1.3 > max 1:1 -> decode raised to ceil(26 / 1) = 26.
    policy = make_policy(
        scaling={"latency_tiers": [{"metric": "ttft", "above": 1.0, "step_percent": 30}]}
    )
    decision = decide(
        policy, fleet(20, 20), metrics(NOW, decode_tps=20000, ttft=1500), PolicyHistory(), NOW
    )
    assert (decision.prefill, decision.decode) == (26, 26)
    assert "ratio_max" in clamp_names(decision)


def test_prefill_at_max_limits_decode_to_what_it_can_feed():
    # 40000 tps -> 40 decode, prefill ceil(40 / 2) = 20 but max 5; at the 1:4 bound
    # 5 prefill feed floor(5 / 0.25) = 20 decode.
    policy = make_policy(prefill={"max_instances": 5}, scaling={"max_step_percent": 1000})
    decision = decide(policy, fleet(4, 16), metrics(NOW, decode_tps=40000), PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode) == (5, 20)
    ratio_clamp = next(c for c in decision.clamps if c.name == "ratio_min" and c.role == "decode")
    assert (ratio_clamp.before, ratio_clamp.after) == (40, 20)
    assert "prefill at max 5" in ratio_clamp.detail


@pytest.mark.parametrize(
    ("decode_tps", "expected", "clamp"),
    [
        # 50 decode wanted, max 30 -> 30; prefill follows the clamped 30: ceil(30 / 2) = 15
        (50000, (15, 30), "max_instances"),
        # 0 load: 0 decode -> min 3; prefill follows: ceil(3 / 2) = 2
        (0, (2, 3), "min_instances"),
    ],
)
def test_min_and_max_per_role(decode_tps, expected, clamp):
    policy = make_policy(
        decode={"min_instances": 3, "max_instances": 30}, scaling={"max_step_percent": 1000}
    )
    decision = decide(
        policy, fleet(10, 20), metrics(NOW, decode_tps=decode_tps), PolicyHistory(), NOW
    )
    assert (decision.prefill, decision.decode) == expected
    assert clamp in clamp_names(decision)


@pytest.mark.parametrize(
    ("fleet_now", "decode_tps", "expected"),
    [
        # decode_tps 3000 / (3 x 1000) = 1.0 holds decode at 3, but min is 5;
        # prefill follows: ceil(5 / 2) = 3
        ((1, 3), 3000, (3, 5)),
        # decode within tolerance at 6; prefill 1 is below the ratio target's ceil(6 / 2) = 3
        ((1, 6), 6000, (3, 6)),
    ],
)
def test_only_bounds_or_ratio_moving_the_size_says_bounds(fleet_now, decode_tps, expected):
    policy = make_policy(decode={"min_instances": 5} if fleet_now[1] == 3 else {})
    decision = decide(
        policy, fleet(*fleet_now), metrics(NOW, decode_tps=decode_tps), PolicyHistory(), NOW
    )
    assert (decision.prefill, decision.decode, decision.reason) == (*expected, "bounds")


def test_at_max_with_more_load_holds_with_reason_bounds():
    policy = make_policy(decode={"max_instances": 20})
    decision = decide(policy, fleet(10, 20), metrics(NOW, decode_tps=30000), PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode, decision.reason) == (10, 20, "bounds")
    assert "max_instances" in clamp_names(decision)


@pytest.mark.parametrize(
    ("step_instances", "step_percent", "decode_now", "wanted", "expected"),
    [
        # allowance max(4, 100% of 10) = 10 -> 10 + 10 = 20
        (4, 100, 10, 40, 20),
        # allowance max(2, 50% of 10 = 5) = 5 -> 15
        (2, 50, 10, 40, 15),
        # allowance max(4, 10% of 10 = 1) = 4 -> 14
        (4, 10, 10, 40, 14),
        # scale-in is limited too: 10 - max(2, 50% of 10) = 5
        (2, 50, 10, 1, 5),
        # allowance max(4, ceil(25% of 10 = 2.5) = 3) = 4 -> 14
        (4, 25, 10, 40, 14),
    ],
)
def test_max_step_per_cycle(step_instances, step_percent, decode_now, wanted, expected):
    policy = make_policy(
        scaling={"max_step_instances": step_instances, "max_step_percent": step_percent},
        pd_ratio={"min": "1:8"},
    )
    decision = decide(
        policy,
        fleet(decode_now // 2, decode_now),
        metrics(NOW, decode_tps=wanted * 1000),
        PolicyHistory(),
        NOW,
    )
    assert decision.decode == expected
    step = next(c for c in decision.clamps if c.name == "max_step" and c.role == "decode")
    assert (step.before, step.after) == (wanted, expected)
    assert (
        f"max step {step_instances} instances or {step_percent:g}% of {decode_now}" == step.detail
    )


def test_group_granularity_rounds_up_to_whole_groups():
    # Shape 2 prefill + 4 decode. 17000 tps -> 17 decode, 9 prefill;
    # groups = max(ceil(9 / 2) = 5, ceil(17 / 4) = 5) = 5 -> 10 prefill, 20 decode.
    policy = make_policy(scaling={"granularity": "group", "max_step_percent": 1000})
    decision = decide(policy, fleet(4, 8), metrics(NOW, decode_tps=17000), PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode) == (10, 20)
    assert "group" in clamp_names(decision)


def test_group_granularity_respects_max_in_whole_groups():
    # max 18 decode = 4 whole groups of 4 (16); prefill 4 x 2 = 8.
    policy = make_policy(
        scaling={"granularity": "group", "max_step_percent": 1000}, decode={"max_instances": 18}
    )
    decision = decide(policy, fleet(4, 8), metrics(NOW, decode_tps=50000), PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode) == (8, 16)


# --------------------------------------------------------------------------- rule 4


def stabilised_policy(**scaling):
    return make_policy(scaling={"scale_in_window_s": 300, "cooldown_s": 120, **scaling})


def test_scale_out_acts_at_once_even_in_cooldown():
    history = PolicyHistory(last_change_at_s=NOW - 10)
    decision = decide(
        stabilised_policy(), fleet(10, 20), metrics(NOW, decode_tps=30000), history, NOW
    )
    assert (decision.prefill, decision.decode, decision.reason) == (15, 30, "scale_out")


def test_scale_in_takes_the_highest_recommendation_over_the_window():
    # Window recommendations: 18 decode 200 s ago, otherwise 12; now the load asks
    # for 10 -> the highest in the window, 18.
    recs = list(steady_history(6, 12, until_s=NOW, span_s=300).recommendations)
    recs[6] = Recommendation(recs[6].at_s, 9, 18)
    history = PolicyHistory(recommendations=tuple(recs))
    decision = decide(
        stabilised_policy(), fleet(10, 20), metrics(NOW, decode_tps=10000), history, NOW
    )
    assert (decision.prefill, decision.decode, decision.reason) == (9, 18, "scale_in")
    window = next(c for c in decision.clamps if c.name == "scale_in_window" and c.role == "decode")
    assert (window.before, window.after) == (10, 18)


def test_recommendations_older_than_the_window_do_not_count():
    # The 18 was made 330 s ago, before the recommendation in force at the window's start.
    recs = [
        Recommendation(NOW - 330, 9, 18),
        *steady_history(6, 12, until_s=NOW, span_s=300).recommendations,
    ]
    decision = decide(
        stabilised_policy(),
        fleet(10, 20),
        metrics(NOW, decode_tps=10000),
        PolicyHistory(recommendations=tuple(recs)),
        NOW,
    )
    # 12 in the window vs 10 now -> 12 decode, prefill 6
    assert (decision.prefill, decision.decode) == (6, 12)


def test_cooldown_blocks_scale_in_after_any_change():
    history = steady_history(5, 10, until_s=NOW, span_s=300)
    history = PolicyHistory(recommendations=history.recommendations, last_change_at_s=NOW - 60)
    decision = decide(
        stabilised_policy(), fleet(10, 20), metrics(NOW, decode_tps=10000), history, NOW
    )
    assert (decision.prefill, decision.decode, decision.reason) == (10, 20, "stabilised")
    cooldown = next(c for c in decision.clamps if c.name == "cooldown" and c.role == "decode")
    assert cooldown.detail == "last change 60 s ago < cooldown 120 s"
    # After the cooldown the same inputs scale in.
    later = PolicyHistory(recommendations=history.recommendations, last_change_at_s=NOW - 121)
    decision = decide(
        stabilised_policy(), fleet(10, 20), metrics(NOW, decode_tps=10000), later, NOW
    )
    assert (decision.prefill, decision.decode) == (5, 10)


def test_a_change_dated_in_the_future_starts_no_cooldown():
    """A clock stepped back or a hand-edited state: a cooldown counted from a future
    change would never end, and the service would stop scaling in for good."""
    history = steady_history(5, 10, until_s=NOW, span_s=300)
    future = PolicyHistory(recommendations=history.recommendations, last_change_at_s=NOW + 1e9)
    decision = decide(
        stabilised_policy(), fleet(10, 20), metrics(NOW, decode_tps=10000), future, NOW
    )
    assert (decision.prefill, decision.decode) == (5, 10)
    assert not any(c.name == "cooldown" for c in decision.clamps)


def test_scale_out_window_takes_the_lowest_recommendation():
    # 60 s window; 45 s ago the recommendation was 22 -> scale out only to 22, not 30.
    policy = stabilised_policy(scale_out_window_s=60)
    recs = steady_history(10, 20, until_s=NOW, span_s=60).recommendations
    recs = (*recs[:-3], Recommendation(NOW - 45, 11, 22), *recs[-2:])
    decision = decide(
        policy,
        fleet(10, 20),
        metrics(NOW, decode_tps=30000),
        PolicyHistory(recommendations=recs),
        NOW,
    )
    assert decision.decode == 20  # 20 was in force at the window start: lowest wins
    recs = tuple(Recommendation(r.at_s, 11, 22) for r in recs)
    decision = decide(
        policy,
        fleet(10, 20),
        metrics(NOW, decode_tps=30000),
        PolicyHistory(recommendations=recs),
        NOW,
    )
    assert (decision.prefill, decision.decode) == (11, 22)


def test_history_is_trimmed_to_the_longest_window():
    policy = stabilised_policy(scale_out_window_s=60)
    history = steady_history(10, 20, until_s=NOW, span_s=3000)
    decision = decide(policy, fleet(10, 20), metrics(NOW, decode_tps=20000), history, NOW)
    kept = decision.history.recommendations
    # the one in force at NOW - 300 (made then), the 19 after it, and now's
    assert kept[0].at_s <= NOW - 300 < kept[1].at_s
    assert kept[-1] == Recommendation(NOW, 10, 20)
    assert len(kept) == 1 + 19 + 1


def test_history_is_returned_anew_never_mutated():
    history = steady_history(10, 20, until_s=NOW, span_s=300)
    before = history.recommendations
    decision = decide(
        stabilised_policy(), fleet(10, 20), metrics(NOW, decode_tps=30000), history, NOW
    )
    assert history.recommendations is before
    assert decision.history is not history
    assert decision.history.last_change_at_s == NOW


# --------------------------------------------------------------------------- rule 5


@pytest.mark.parametrize(
    ("sample", "why"),
    [
        (None, "decode_tps missing"),
        (Sample(float("nan"), NOW), "decode_tps is nan"),
        (Sample(float("inf"), NOW), "decode_tps is inf"),
        # A negative rate is broken (a custom query's subtraction, a counter reset),
        # never a reason to scale in.
        (Sample(-250.0, NOW), "decode_tps is negative (-250)"),
        (Sample(5e295, NOW), "decode_tps is beyond any real reading (5e+295)"),
        # default metric_max_age_s is 90 s; sampled 120 s ago
        (Sample(1.0, NOW - 120), "decode_tps stale (sampled 120 s ago > metric_max_age_s 90)"),
    ],
)
def test_a_missing_stale_or_out_of_range_primary_holds_and_says_why(sample, why):
    # The fleet is 10x too large for the (last known) load, and still holds.
    signals = ServiceMetrics("svc", decode_tps=sample, tbt=Sample(400.0, NOW))
    policy = make_policy(scaling={"latency_tiers": TIERS})
    decision = decide(policy, fleet(10, 20), signals, PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode, decision.reason) == (10, 20, "metrics_missing")
    assert decision.message.startswith(why + ": hold 10 prefill, 20 decode")


def test_a_primary_rate_reading_0_while_its_role_works_holds():
    """decode_tps at 0 while 160 requests run on decode is a counter that stopped, not
    an idle service: held as a missing rate is; with nothing running it is believed."""
    policy = make_policy()
    broken = ServiceMetrics("svc", decode_tps=Sample(0.0, NOW), decode_running=Sample(160.0, NOW))
    decision = decide(policy, fleet(10, 20), broken, PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode, decision.reason) == (10, 20, "metrics_missing")
    assert decision.message.startswith("decode_tps reads 0 while decode_running reads 160")
    idle = ServiceMetrics("svc", decode_tps=Sample(0.0, NOW), decode_running=Sample(0.0, NOW))
    assert decide(policy, fleet(10, 20), idle, PolicyHistory(), NOW).reason != "metrics_missing"


def test_missing_metrics_still_respect_min_and_max():
    policy = make_policy(decode={"max_instances": 15})
    decision = decide(policy, fleet(10, 20), metrics(NOW), PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode) == (10, 15)
    assert decision.reason == "metrics_missing"
    # Said as what it is: not a hold of 20, a cut to the bound.
    assert "hold, within the policy's min/max: 10 -> 10 prefill, 20 -> 15 decode" in (
        decision.message
    )


def test_a_hold_counts_as_a_recommendation_so_scale_in_waits_a_window_after_a_gap():
    policy = stabilised_policy(cooldown_s=0)
    history = steady_history(5, 10, until_s=NOW - 15, span_s=300)
    hold = decide(policy, fleet(10, 20), metrics(NOW - 15), history, NOW - 15)
    decision = decide(policy, fleet(10, 20), metrics(NOW, decode_tps=10000), hold.history, NOW)
    assert (decision.prefill, decision.decode) == (10, 20)


def test_utilisation_with_no_ready_instance_holds():
    policy = make_policy(scaling={"metric": "decode_gpu_util", "target_per_instance": 0.6})
    decision = decide(
        policy,
        fleet(2, 0, decode_starting=4),
        metrics(NOW, decode_gpu_util=0.0),
        PolicyHistory(),
        NOW,
    )
    assert (decision.prefill, decision.decode, decision.reason) == (2, 4, "metrics_missing")
    assert "no ready decode instance" in decision.message


def test_starting_instances_count_as_capacity():
    # 10 ready + 10 starting = 20 active; 20000 / (20 x 1000) = 1.0 -> hold, no
    # second scale-out while the first warms up.
    decision = decide(
        make_policy(),
        fleet(10, 10, decode_starting=10),
        metrics(NOW, decode_tps=20000),
        PolicyHistory(),
        NOW,
    )
    assert (decision.prefill, decision.decode, decision.reason) == (10, 20, "within_tolerance")


# --------------------------------------------------------------------------- rule 6


def dynamic_policy(**pd_ratio):
    return make_policy(
        pd_ratio={"dynamic": True, "dynamic_max_step": 0.05, **pd_ratio},
        scaling={"scale_in_window_s": 0},
    )


def test_dynamic_ratio_anchors_on_the_first_mix_and_starts_at_the_target():
    decision = decide(
        dynamic_policy(),
        fleet(10, 20),
        metrics(NOW, decode_tps=20000, prefill_tps=160000),
        PolicyHistory(),
        NOW,
    )
    assert decision.history.dynamic_ratio == pytest.approx(0.5)
    assert dict(decision.history.extra)["pd_mix_anchor"] == pytest.approx(8.0)
    assert (decision.prefill, decision.decode) == (10, 20)


def test_dynamic_ratio_moves_at_most_max_step_per_cycle_towards_the_balanced_ratio():
    # Anchor mix 8 at ratio 1:2; the prompt mix then grows to 12 (x 1.5), so the
    # balanced ratio is 0.5 x 12 / 8 = 0.75. With no smoothing window
    # (scale_in_window_s 0 -> time constant 1 s) each 15 s cycle moves 5%:
    # 0.5 -> 0.525 -> 0.55125 -> ... until within tolerance/2 of 0.75.
    policy = dynamic_policy()
    history = decide(
        policy, fleet(10, 20), metrics(0, decode_tps=20000, prefill_tps=160000), PolicyHistory(), 0
    ).history
    ratios = []
    for cycle in range(1, 12):
        now = cycle * 15.0
        decision = decide(
            policy, fleet(10, 20), metrics(now, decode_tps=20000, prefill_tps=240000), history, now
        )
        history = decision.history
        ratios.append(history.dynamic_ratio)
    assert ratios[0] == pytest.approx(0.525)
    assert ratios[1] == pytest.approx(0.525 * 1.05)
    for before, after in zip([0.5, *ratios], ratios, strict=False):
        assert after <= before * 1.05 + 1e-12
    assert abs(ratios[-1] / 0.75 - 1) <= 0.05
    assert all(0.25 <= r <= 1.0 for r in ratios)


def test_dynamic_ratio_explains_each_move():
    policy = dynamic_policy()
    first = decide(
        policy, fleet(10, 20), metrics(0, decode_tps=20000, prefill_tps=160000), PolicyHistory(), 0
    )
    moved = decide(
        policy, fleet(10, 20), metrics(15, decode_tps=20000, prefill_tps=240000), first.history, 15
    )
    assert "dynamic ratio 0.500 -> 0.525" in moved.message
    assert "prefill/decode tokens 12.00 vs 8.00 anchored" in moved.message
    # C_p = 8 x 1000 / (1/2) = 16000 tokens/s per prefill instance
    assert "C_p = 8.00 x 1000 / 1:2 = 16000 tps" in moved.message
    # 20 decode at 0.525 -> ceil(10.5) = 11 prefill
    assert moved.prefill == 11


def test_dynamic_ratio_stays_inside_its_bounds():
    # mix x 4 -> balanced 2.0, but pd_ratio.max is 1:1
    policy = dynamic_policy(dynamic_max_step=0.5)
    history = decide(
        policy, fleet(10, 20), metrics(0, decode_tps=20000, prefill_tps=80000), PolicyHistory(), 0
    ).history
    for cycle in range(1, 10):
        history = decide(
            policy,
            fleet(10, 20),
            metrics(cycle * 15.0, decode_tps=20000, prefill_tps=320000),
            history,
            cycle * 15.0,
        ).history
    assert history.dynamic_ratio == pytest.approx(1.0)


def test_dynamic_ratio_holds_without_usable_tps():
    policy = dynamic_policy()
    history = PolicyHistory(dynamic_ratio=0.6, extra=(("pd_mix_anchor", 8.0),))
    decision = decide(policy, fleet(10, 20), metrics(NOW, decode_tps=20000), history, NOW)
    assert decision.history.dynamic_ratio == pytest.approx(0.6)
    assert "dynamic ratio held at 3:5 (prefill_tps missing)" in decision.message


def test_dynamic_ratio_holds_on_an_idle_service_and_anchors_later():
    policy = dynamic_policy()
    idle = decide(
        policy, fleet(10, 20), metrics(0, decode_tps=0, prefill_tps=0), PolicyHistory(), 0
    )
    assert "no traffic to measure the token mix" in idle.message
    busy = decide(
        policy, fleet(10, 20), metrics(15, decode_tps=20000, prefill_tps=160000), idle.history, 15
    )
    assert dict(busy.history.extra)["pd_mix_anchor"] == pytest.approx(8.0)


def test_dynamic_ratio_ignores_a_constant_mix():
    policy = dynamic_policy()
    history = PolicyHistory()
    for cycle in range(20):
        history = decide(
            policy,
            fleet(10, 20),
            metrics(cycle * 15.0, decode_tps=20000, prefill_tps=160000),
            history,
            cycle * 15.0,
        ).history
    assert history.dynamic_ratio == pytest.approx(0.5)


def test_static_ratio_leaves_no_dynamic_state():
    decision = decide(
        make_policy(),
        fleet(10, 20),
        metrics(NOW, decode_tps=20000, prefill_tps=1e5),
        PolicyHistory(),
        NOW,
    )
    assert decision.history.dynamic_ratio is None


# --------------------------------------------------------------------------- rule 7


def kv_policy():
    return make_policy(
        scaling={"kv_cache_pressure": {"threshold": 0.9, "window_s": 60, "step_percent": 10}}
    )


def run_kv(values: list[float | None], load: float = 20000):
    """Feed KV usage samples every 15 s ending at NOW; return the last decision."""
    policy, history, decision = kv_policy(), PolicyHistory(), None
    for index, value in enumerate(values):
        now = NOW - 15 * (len(values) - 1 - index)
        decision = decide(
            policy,
            fleet(10, 20),
            metrics(now, decode_tps=load, decode_kv_usage=value),
            history,
            now,
        )
        history = decision.history
    return decision


@pytest.mark.parametrize(
    ("values", "expected_decode"),
    [
        # above 0.9 at t-60, -45, -30, -15, 0: held for the whole 60 s -> 20 x 1.1 = 22
        ([0.95, 0.95, 0.96, 0.97, 0.95], 22),
        # only 45 s of evidence -> no action
        ([0.5, 0.95, 0.96, 0.97, 0.95], 20),
        # a dip inside the window -> no action
        ([0.95, 0.95, 0.85, 0.97, 0.95], 20),
        # the current sample missing -> no action on old evidence
        ([0.95, 0.95, 0.96, 0.97, None], 20),
    ],
)
def test_kv_cache_pressure_scales_decode_when_held_above_threshold(values, expected_decode):
    decision = run_kv(values)
    assert decision.decode == expected_decode
    if expected_decode > 20:
        assert decision.reason == "kv_cache_pressure"
        assert (
            "decode_kv_usage 0.95 > 0.9 for 60 s: decode +10% of 20 ready -> 22" in decision.message
        )
        assert decision.prefill == 11  # follows the ratio: ceil(22 / 2)


def test_kv_samples_are_bounded_to_the_window():
    decision = run_kv([0.95] * 40)
    # the sample in force at NOW - 60 and the four after it
    assert len(decision.history.kv_usage) == 5


# --------------------------------------------------------------------------- interface


def test_autoscaler_protocol_and_decide_many_agree_with_decide():
    policy = make_policy()
    inputs = [
        (policy, fleet(10, 20), metrics(NOW, decode_tps=load), PolicyHistory())
        for load in (5000, 20000, 40000)
    ]
    expected = [decide(*item, NOW) for item in inputs]
    assert decide_many(inputs, NOW) == expected
    assert [
        CoordinatedAutoscaler().decide(DecisionInput(*item, NOW)) for item in inputs
    ] == expected
    assert CoordinatedAutoscaler.name == "heteroscale-paper"


def test_policy_numbers_are_read_once_per_policy_object():
    policy = make_policy()
    assert policy_numbers(policy) is policy_numbers(policy)
    changed = with_overrides(policy, scaling={"target_per_instance": 2000})
    assert policy_numbers(changed).target_per_instance == 2000


@pytest.mark.parametrize("name", ["chat", "summarize", "svc-a", "svc-b"])
def test_every_example_policy_sizes_a_doubling_of_load(name):
    # Each example service at its target with 20 decode, then twice that load.
    policy = paper_example_policy(name)
    target = policy.scaling.target_per_instance
    prefill = math.ceil(20 * policy.pd_ratio.target)
    signals = metrics(NOW, service=name, decode_tps=40 * target, prefill_tps=40 * target * 8)
    decision = decide(policy, fleet(prefill, 20), signals, PolicyHistory(), NOW)
    # 40 x target / target = 40 decode, reached in one step (allowance max(4, 100% of 20))
    assert decision.decode == 40
    assert policy.pd_ratio.min <= decision.prefill / decision.decode <= policy.pd_ratio.max
    assert decision.reason == "scale_out"
    assert "-> 40 decode" in decision.message


def _eighteen_then_one_low(now_s: float) -> PolicyHistory:
    """270 s of 9/18 recommendations, one low reading 30 s before ``now_s``, a change
    60 s before it."""
    steady = steady_history(9, 18, until_s=now_s - 30, span_s=270, cycle_s=30)
    return PolicyHistory(
        recommendations=(*steady.recommendations, Recommendation(now_s - 30, 5, 10)),
        last_change_at_s=now_s - 60,
    )


@pytest.mark.parametrize("gap_s", [0.0, 3600.0])
def test_a_gap_in_the_history_longer_than_the_window_holds_the_scale_in(gap_s: float) -> None:
    """The scale-in window needs a history that covers it; a recommendation made more
    than a window before the window's start was in force across a gap in which the
    policy saw nothing (a clock stepped forward an hour, a replica down for an hour),
    and one low reading after it scaled in at once, past the window and the cooldown."""
    policy = make_policy(
        scaling={
            "scale_in_window_s": 300,
            "cooldown_s": 120,
            "max_step_percent": 100,
            "max_step_instances": 100,
        }
    )
    now = 100_000.0
    later = now + gap_s
    decision = decide(
        policy, fleet(9, 18), metrics(later, decode_tps=10000), _eighteen_then_one_low(now), later
    )
    assert decision.decode == 18, decision.message
    if gap_s:
        assert "history covers" in decision.message


def test_after_a_gap_a_window_of_new_recommendations_lets_the_scale_in_happen() -> None:
    """The hold after a gap lasts one window of fresh recommendations, no more."""
    n = policy_numbers(make_policy(scaling={"scale_in_window_s": 300, "cooldown_s": 0}))
    old = Recommendation(0.0, 9, 18)
    fresh = tuple(Recommendation(3600.0 + 30 * k, 5, 10) for k in range(12))
    history = PolicyHistory(recommendations=(old, *fresh))
    held = stabilise(n, (5, 10), [9, 18], (old, *fresh[:5]), history, 3600.0 + 150, [])
    assert held == (9, 18)
    allowed = stabilise(n, (5, 10), [9, 18], (old, *fresh), history, 3600.0 + 330, [])
    assert allowed[1] < 18

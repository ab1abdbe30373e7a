"""The prefill floor (coordinated policy rule 5a, ``scaling.prefill_target_per_instance``).

A decode-driven policy sizes prefill through the P/D ratio, which cannot see a shift
of the token mix towards longer prompts. The floor is proportional control on
``prefill_tps`` with the primary metric's tolerance band; prefill takes the larger of
the floor and what the ratio and the TTFT tiers ask, and the pair is then shaped as
always (min/max, ratio bounds, groups, max step).

Unless a test says otherwise the policy is the synthetic ``svc`` of ``policy_testkit``
(decode target 1000 tokens/s per instance, tolerance 10%, ratio 1:2 within 1:4..1:1,
prefill 1..100, decode 1..200, no windows) with a prefill target of 5000 prompt
tokens/s per instance.
"""

from __future__ import annotations

import math

import pytest
from policy_testkit import fleet, make_policy, metrics, paper_example_policy, replay, with_overrides

from reconciler.policy import PolicyHistory, decide
from reconciler.policy.base import Recommendation
from reconciler.policy.coordinated import policy_numbers
from reconciler.state import Sample, ServiceMetrics

NOW = 1000.0
PREFILL_TARGET = 5000


def floor_policy(**overrides):
    scaling = {"prefill_target_per_instance": PREFILL_TARGET, **overrides.pop("scaling", {})}
    return make_policy(scaling=scaling, **overrides)


def clamp_names(decision) -> list[str]:
    return [c.name for c in decision.clamps]


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("decode_tps", "prefill_tps", "expected", "reason"),
    [
        # decode 20000 / (20 x 1000) = 1.0 holds 20 decode; ratio 1:2 -> 10 prefill.
        # prefill 50000 / (10 x 5000) = 1.0, inside 1 +- 0.1: the floor holds 10.
        (20000, 50000, (10, 20), "within_tolerance"),
        # 55000 / 50000 = 1.10 exactly: the band is inclusive -> hold 10
        (20000, 55000, (10, 20), "within_tolerance"),
        # 57500 / 50000 = 1.15 > 1.1 -> ceil(57500 / 5000) = ceil(11.5) = 12 prefill;
        # decode stays 20 (12 / 20 = 0.6 is inside 1:4..1:1)
        (20000, 57500, (12, 20), "scale_out"),
        # 75000 / 50000 = 1.5 -> 15 prefill, decode flat: the mix shifted to prefill
        (20000, 75000, (15, 20), "scale_out"),
        # 30000 / 50000 = 0.6 -> floor ceil(6.0) = 6 < the ratio's 10: the ratio wins
        (20000, 30000, (10, 20), "within_tolerance"),
        # 125000 / 5000 = 25 prefill > 20 decode x 1:1 max -> decode raised to 25
        # (ratio bounds: add to the short role, never starve the bottleneck)
        (20000, 125000, (25, 25), "scale_out"),
        # both grow: 30000 / 1000 = 30 decode -> ratio 15 prefill; floor
        # 100000 / 5000 = 20 > 15 -> 20 prefill
        (30000, 100000, (20, 30), "scale_out"),
        # both grow, ratio above the floor: 30 decode -> 15 prefill; floor
        # 60000 / 50000 = 1.2 -> 12 < 15 -> 15 prefill
        (30000, 60000, (15, 30), "scale_out"),
    ],
)
def test_prefill_takes_the_larger_of_the_ratio_and_the_floor(
    decode_tps, prefill_tps, expected, reason
):
    policy = floor_policy(scaling={"max_step_percent": 1000})
    decision = decide(
        policy,
        fleet(10, 20),
        metrics(NOW, decode_tps=decode_tps, prefill_tps=prefill_tps),
        PolicyHistory(),
        NOW,
    )
    assert (decision.prefill, decision.decode) == expected, decision.message
    assert decision.reason == reason


def test_ratio_bound_clamp_names_itself_when_the_floor_outgrows_decode():
    # 125000 / 5000 = 25 prefill against 20 decode: ratio 1.25 > max 1:1 -> decode 25
    policy = floor_policy(scaling={"max_step_percent": 1000})
    decision = decide(
        policy,
        fleet(10, 20),
        metrics(NOW, decode_tps=20000, prefill_tps=125000),
        PolicyHistory(),
        NOW,
    )
    clamp = next(c for c in decision.clamps if c.name == "ratio_max")
    assert (clamp.role, clamp.before, clamp.after) == ("decode", 20, 25)


def test_message_states_the_floor_with_its_numbers():
    # The example on the chat policy with its ratio pinned (no dynamic move):
    # decode_tps 39000 / (30 x 1300) = 1.0 holds 30 decode; ratio 3:4 -> ceil(22.5) = 23
    # prefill; prompt load 435000 / (23 x 10200) = 1.85 -> ceil(42.6) = 43 prefill.
    # Max step max(4, 100% of 23) = 23 allows +20; 43 / 30 = 1.43 is inside 1:3..3:2.
    policy = with_overrides(paper_example_policy("chat"), pd_ratio={"dynamic": False})
    assert policy.scaling.prefill_target_per_instance == 10200
    signals = metrics(
        NOW,
        service="chat",
        decode_tps=39000,
        prefill_tps=435000,
        tbt=30,
        ttft=500,
        decode_kv_usage=0.5,
    )
    decision = decide(policy, fleet(23, 30), signals, PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode, decision.reason) == (43, 30, "scale_out")
    assert decision.message == (
        "decode_tps 39000 / target 1300 per instance = 1.00 of 30 decode, within 10%: "
        "hold 30 decode; ratio 3:4 -> 23 prefill; "
        "prefill_tps 435000 / target 10200 per instance -> 43 prefill (floor)"
    )


def test_message_states_a_held_floor_inside_the_band():
    # 52000 / (10 x 5000) = 1.04
    decision = decide(
        floor_policy(),
        fleet(10, 20),
        metrics(NOW, decode_tps=20000, prefill_tps=52000),
        PolicyHistory(),
        NOW,
    )
    assert (
        "prefill_tps 52000 / target 5000 per instance = 1.04 of 10 prefill, within 10%: "
        "floor 10 prefill" in decision.message
    )


@pytest.mark.parametrize(
    ("sample", "why"),
    [
        (None, "prefill_tps missing"),
        (Sample(90000.0, NOW - 300), "prefill_tps stale (sampled 300 s ago > metric_max_age_s 90)"),
        (Sample(math.nan, NOW), "prefill_tps is nan"),
        (Sample(math.inf, NOW), "prefill_tps is inf"),
    ],
)
def test_unusable_prefill_tps_drops_the_floor_and_says_so(sample, why):
    # The decode rule still decides: 30000 / 1000 = 30 decode -> ratio 15 prefill.
    signals = ServiceMetrics("svc", decode_tps=Sample(30000.0, NOW), prefill_tps=sample)
    decision = decide(floor_policy(), fleet(10, 20), signals, PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode, decision.reason) == (15, 30, "scale_out")
    assert f"no prefill floor ({why})" in decision.message


def test_unusable_primary_metric_holds_both_roles_floor_or_not():
    # Rule 1 comes first: no decode signal, no decision -- however loud prefill_tps is.
    decision = decide(
        floor_policy(), fleet(10, 20), metrics(NOW, prefill_tps=500000), PolicyHistory(), NOW
    )
    assert (decision.prefill, decision.decode, decision.reason) == (10, 20, "metrics_missing")


@pytest.mark.parametrize("metric", ["prefill_tps", "prefill_gpu_util", "ttft"])
def test_a_prefill_driven_metric_ignores_the_field(metric):
    policy = floor_policy(scaling={"metric": metric, "target_per_instance": 0.5})
    assert policy_numbers(policy).prefill_floor_target is None


@pytest.mark.parametrize("metric", ["decode_tps", "decode_gpu_util", "decode_sm_active", "tbt"])
def test_every_decode_driven_metric_gets_the_floor(metric):
    policy = floor_policy(scaling={"metric": metric, "target_per_instance": 0.5})
    assert policy_numbers(policy).prefill_floor_target == PREFILL_TARGET


def test_unset_field_leaves_the_decision_as_before():
    # Without the field the prompt load is not consulted and not mentioned.
    signals = metrics(NOW, decode_tps=20000, prefill_tps=125000)
    decision = decide(make_policy(), fleet(10, 20), signals, PolicyHistory(), NOW)
    assert (decision.prefill, decision.decode) == (10, 20)
    assert "prefill_tps" not in decision.message and "floor" not in decision.message


# --------------------------------------------------------------------------- shaping


def test_floor_is_clipped_to_prefill_max_and_decode_is_cut_to_what_it_can_feed():
    # 100000 / 5000 = 20 prefill, max 12 -> 12; 12 / 20 = 0.6 is inside the bounds
    policy = floor_policy(prefill={"max_instances": 12}, scaling={"max_step_percent": 1000})
    decision = decide(
        policy,
        fleet(10, 20),
        metrics(NOW, decode_tps=20000, prefill_tps=100000),
        PolicyHistory(),
        NOW,
    )
    assert (decision.prefill, decision.decode) == (12, 20)
    assert "max_instances" in clamp_names(decision)


def test_floor_scale_out_is_limited_by_the_max_step():
    # 4 prefill, 16 decode (1:4, the min bound) held by decode_tps 16000.
    # 60000 / (4 x 5000) = 3.0 -> 12 prefill; allowance max(4, 100% of 4) = 4 -> 8.
    decision = decide(
        floor_policy(),
        fleet(4, 16),
        metrics(NOW, decode_tps=16000, prefill_tps=60000),
        PolicyHistory(),
        NOW,
    )
    assert (decision.prefill, decision.decode) == (8, 16)
    step = next(c for c in decision.clamps if c.name == "max_step")
    assert (step.role, step.before, step.after) == ("prefill", 12, 8)
    # The stored recommendation is the unstepped 12: the next cycle continues.
    assert decision.history.recommendations[-1].prefill == 12


def test_floor_rounds_up_to_whole_groups():
    # Shape 2 prefill + 4 decode. 75000 / 5000 = 15 prefill; groups
    # max(ceil(15 / 2) = 8, ceil(20 / 4) = 5) = 8 -> 16 prefill, 32 decode.
    policy = floor_policy(scaling={"granularity": "group", "max_step_percent": 1000})
    decision = decide(
        policy,
        fleet(10, 20),
        metrics(NOW, decode_tps=20000, prefill_tps=75000),
        PolicyHistory(),
        NOW,
    )
    assert (decision.prefill, decision.decode) == (16, 32)


def test_starting_prefill_instances_count_as_capacity():
    # 10 ready + 5 starting: 75000 / (15 x 5000) = 1.0 -> hold 15, ask for nothing more
    decision = decide(
        floor_policy(),
        fleet(10, 20, prefill_starting=5),
        metrics(NOW, decode_tps=20000, prefill_tps=75000),
        PolicyHistory(),
        NOW,
    )
    assert (decision.prefill, decision.decode) == (15, 20)


def test_floor_and_ttft_tier_take_the_larger():
    # TTFT 1.2 x SLO with a +20% tier: 10 ready x 1.2 = 12; floor 75000 / 5000 = 15 -> 15
    policy = floor_policy(
        scaling={"latency_tiers": [{"metric": "ttft", "above": 1.0, "step_percent": 20}]}
    )
    signals = metrics(NOW, decode_tps=20000, prefill_tps=75000, ttft=1200)
    decision = decide(policy, fleet(10, 20), signals, PolicyHistory(), NOW)
    assert (decision.prefill, decision.reason) == (15, "scale_out")
    # A larger tier wins over a smaller floor: +100% of 10 = 20 > 15.
    policy = floor_policy(
        scaling={"latency_tiers": [{"metric": "ttft", "above": 1.0, "step_percent": 100}]}
    )
    decision = decide(policy, fleet(10, 20), signals, PolicyHistory(), NOW)
    assert (decision.prefill, decision.reason) == (20, "latency_feedback")


# --------------------------------------------------------------------------- stabilisation


def test_floor_scales_out_at_once_through_a_scale_out_window():
    # A 60 s scale-out window full of (10, 20) recommendations holds any other
    # scale-out at 10; the floor's 75000 / 5000 = 15 goes through at once.
    policy = floor_policy(scaling={"scale_out_window_s": 60})
    history = PolicyHistory(
        recommendations=tuple(Recommendation(NOW - 15 * k, 10, 20) for k in range(5, 0, -1))
    )
    decision = decide(
        policy, fleet(10, 20), metrics(NOW, decode_tps=20000, prefill_tps=75000), history, NOW
    )
    assert decision.prefill == 15
    assert "scale_out_window" not in clamp_names(decision)
    # The ratio's scale-out is still held by the window: 30 decode -> 15 prefill, the
    # window's lowest is (10, 20). No floor asks (50000 / 50000 = 1.0 holds 10).
    held = decide(
        policy, fleet(10, 20), metrics(NOW, decode_tps=30000, prefill_tps=50000), history, NOW
    )
    assert (held.prefill, held.decode) == (10, 20)
    assert "scale_out_window" in clamp_names(held)


def test_floor_scale_in_waits_for_the_scale_in_window():
    # After a prompt surge: prefill 15 recommended over the last 300 s window, now the
    # prompt load is back to 50000 (floor ceil(50000 / 5000) = 10 -> ratio's 10).
    policy = floor_policy(scaling={"scale_in_window_s": 300})
    surge = PolicyHistory(
        recommendations=tuple(Recommendation(NOW - 15 * k, 15, 20) for k in range(21, 0, -1))
    )
    signals = metrics(NOW, decode_tps=20000, prefill_tps=50000)
    held = decide(policy, fleet(15, 20), signals, surge, NOW)
    assert (held.prefill, held.decode, held.reason) == (15, 20, "stabilised")
    # A full window of (10, 20) recommendations lets it go.
    calm = PolicyHistory(
        recommendations=tuple(Recommendation(NOW - 15 * k, 10, 20) for k in range(21, 0, -1))
    )
    released = decide(policy, fleet(15, 20), signals, calm, NOW)
    assert (released.prefill, released.decode, released.reason) == (10, 20, "scale_in")


def test_prompt_mix_shift_is_followed_within_a_cycle_and_undone_after_the_window():
    # Decode demand flat at 20000 tokens/s; the prompt load steps from 50000 to 90000
    # at t = 300 s and back at t = 1200 s. With the floor prefill goes to
    # ceil(90000 / 5000) = 18 on the first cycle after the step, and back to the
    # ratio's 10 a scale-in window (300 s) after the load fell; without it prefill
    # never moves (the ratio sees only decode).
    def signals(t: float) -> ServiceMetrics:
        prefill_tps = 90000 if 300 <= t < 1200 else 50000
        return metrics(t, decode_tps=20000, prefill_tps=prefill_tps)

    policy = floor_policy(scaling={"scale_in_window_s": 300})
    run = replay(policy, signals, prefill=10, decode=20, until_s=2000)
    changes = [(d.prefill, d.decode) for d in run.changes()]
    assert changes == [(18, 20), (10, 20)]
    up, down = run.changes()
    assert "-> 18 prefill (floor)" in up.message
    assert down.reason == "scale_in"
    times = [i * 15.0 for i, d in enumerate(run.decisions)]
    first_up = next(t for t, d in zip(times, run.decisions, strict=True) if d.prefill == 18)
    first_down = next(
        t for t, d in zip(times, run.decisions, strict=True) if t > 1200 and d.prefill == 10
    )
    assert first_up == 300
    assert 1200 + 300 <= first_down <= 1200 + 300 + 15

    baseline = replay(
        make_policy(scaling={"scale_in_window_s": 300}),
        signals,
        prefill=10,
        decode=20,
        until_s=2000,
    )
    assert baseline.changes() == []

"""Replays of load over time through the coordinated policy, every 15 s, against a
fleet that carries out each decision (new instances take ``startup_s`` = 120 s to
become ready): a step, a ramp up and down, and noisy plateaus that must cause
zero changes.

Policy ``svc`` with stabilisation on: decode target 1000 tokens/s per instance,
tolerance 10%, ratio 1:2 (1:4..1:1), scale-in window 300 s, cooldown 120 s.
"""

from __future__ import annotations

import math
import random

from policy_testkit import make_policy, metrics, paper_example_policy, replay

from reconciler.state import ServiceMetrics

TIERS = [
    {"metric": "tbt", "above": 1.0, "step_percent": 10},
    {"metric": "tbt", "above": 1.5, "step_percent": 30},
    {"metric": "ttft", "above": 1.0, "step_percent": 20},
]


def stabilised(**scaling):
    return make_policy(scaling={"scale_in_window_s": 300, "cooldown_s": 120, **scaling})


def test_step_up_scales_out_at_once_and_step_down_scales_in_after_the_window():
    def load(t: float) -> float:
        return 40000.0 if 600 <= t < 1800 else 20000.0

    run = replay(
        stabilised(), lambda t: metrics(t, decode_tps=load(t)), prefill=10, decode=20, until_s=3600
    )
    changes = run.changes()
    # Exactly two changes: out at the step, in after the drop.
    assert [(c.prefill, c.decode, c.reason) for c in changes] == [
        (20, 40, "scale_out"),  # 40000 / 1000 = 40 decode, ceil(40 / 2) = 20 prefill
        (10, 20, "scale_in"),
    ]
    out_at = changes[0].history.recommendations[-1].at_s
    in_at = changes[1].history.recommendations[-1].at_s
    assert out_at == 600  # the first cycle that sees the step
    # Scale-in waits until every recommendation in force during the last 300 s asks
    # for 20: the first low one was made at 1800, so 1800 + 300 = 2100.
    assert in_at == 2100
    # While the 20 new decode instances started (600..720 s), nothing more was asked.
    during_warmup = [d for d in run.decisions if 600 < d.history.recommendations[-1].at_s < 720]
    assert all((d.prefill, d.decode) == (20, 40) for d in during_warmup)


def test_ramp_up_and_down_tracks_load_monotonically_with_capacity_ahead():
    # 10000 -> 60000 tokens/s over 30 minutes, hold 10 minutes, back down over 30.
    def load(t: float) -> float:
        if t < 1800:
            return 10000 + 50000 * t / 1800
        if t < 2400:
            return 60000.0
        return max(10000.0, 60000 - 50000 * (t - 2400) / 1800)

    policy = stabilised(latency_tiers=TIERS)
    run = replay(
        policy,
        lambda t: metrics(t, decode_tps=load(t), tbt=30, ttft=500),
        prefill=5,
        decode=10,
        until_s=4800,
    )
    times = [d.history.recommendations[-1].at_s for d in run.decisions]
    decodes = [d.decode for d in run.decisions]
    for t, previous, current in zip(times[1:], decodes[:-1], decodes[1:], strict=True):
        if t <= 2400:
            assert current >= previous  # the way up never scales in
        else:
            assert current <= previous  # the way down never scales out
    for t, decision in zip(times, run.decisions, strict=True):
        # Capacity after each decision is never more than the tolerance short of load.
        assert decision.decode * 1000 * 1.1 >= load(t), (t, decision.message)
        assert 0.25 <= decision.prefill / decision.decode <= 1.0
    changes = run.changes()
    assert 5 <= len(changes) <= 40
    assert (run.decisions[-1].prefill, run.decisions[-1].decode) == (5, 10)


def test_noisy_plateau_makes_zero_changes():
    rng = random.Random(3)

    def signals(t: float) -> ServiceMetrics:
        noise = rng.uniform(-0.08, 0.08)  # inside the 10% band
        return metrics(
            t,
            decode_tps=30000 * (1 + noise),
            prefill_tps=30000 * 8 * (1 + rng.uniform(-0.08, 0.08)),
            tbt=40 * rng.uniform(0.6, 0.95),
            ttft=1000 * rng.uniform(0.4, 0.95),
        )

    policy = stabilised(latency_tiers=TIERS)
    run = replay(policy, signals, prefill=15, decode=30, until_s=7200)
    assert run.changes() == []
    assert {d.reason for d in run.decisions} == {"within_tolerance"}


def test_isolated_spikes_beyond_the_band_are_absorbed_by_the_windows():
    # +-25% single-cycle spikes every 10 minutes: a scale-out window of 60 s takes the
    # lowest recommendation (the plateau's), the scale-in window the highest.
    rng = random.Random(5)

    def load(t: float) -> float:
        cycle = int(t // 15)
        if cycle % 40 == 20:
            return 30000 * 1.25
        if cycle % 40 == 0 and cycle:
            return 30000 * 0.75
        return 30000 * (1 + rng.uniform(-0.05, 0.05))

    policy = stabilised(scale_out_window_s=60)
    run = replay(
        policy, lambda t: metrics(t, decode_tps=load(t)), prefill=15, decode=30, until_s=7200
    )
    assert run.changes() == []
    assert "stabilised" in {d.reason for d in run.decisions}


def test_example_chat_policy_on_a_noisy_plateau_with_dynamic_ratio_makes_zero_changes():
    # The repository's chat policy as it is (dynamic ratio, TBT/TTFT tiers, KV
    # pressure), sized from its own numbers: load = 0.99 x 26 instances' worth, so
    # 26 decode and ceil(26 x ratio) prefill; every signal noisy but inside its band.
    rng = random.Random(11)
    policy = paper_example_policy("chat")
    target, ratio = policy.scaling.target_per_instance, policy.pd_ratio.target
    load = 0.99 * 26 * target
    band = policy.scaling.tolerance * 0.8

    def signals(t: float) -> ServiceMetrics:
        decode_tps = load * (1 + rng.uniform(-band, band))
        return metrics(
            t,
            service="chat",
            decode_tps=decode_tps,
            prefill_tps=decode_tps * 5.5 * (1 + rng.uniform(-0.1, 0.1)),
            tbt=policy.slo.tbt_ms * rng.uniform(0.5, 0.95),
            ttft=policy.slo.ttft_ms * rng.uniform(0.3, 0.9),
            decode_kv_usage=rng.uniform(0.5, 0.85),
        )

    run = replay(policy, signals, prefill=math.ceil(26 * ratio), decode=26, until_s=7200)
    assert run.changes() == []
    assert abs(run.decisions[-1].history.dynamic_ratio / ratio - 1) <= 0.05


def test_metrics_gap_holds_an_oversized_fleet_then_scales_in_after_a_full_window():
    # Load is half the fleet throughout, but the signal is missing from 0 to 600 s.
    def signals(t: float) -> ServiceMetrics:
        return metrics(t) if t < 600 else metrics(t, decode_tps=10000)

    run = replay(stabilised(), signals, prefill=10, decode=20, until_s=1500)
    changes = run.changes()
    assert all(d.reason == "metrics_missing" for d in run.decisions[:40])
    assert [(c.prefill, c.decode) for c in changes] == [(5, 10)]
    # The hold at 585 s stays in force until the 600 s recommendation replaces it;
    # a whole window of good data ends at 600 + 300.
    assert changes[0].history.recommendations[-1].at_s == 900


def test_history_stays_bounded_over_a_long_run():
    policy = stabilised(scale_out_window_s=60)
    run = replay(
        policy, lambda t: metrics(t, decode_tps=20000), prefill=10, decode=20, until_s=20000
    )
    # 300 s window / 15 s cycles: the one in force at the window start + 20 after it.
    assert len(run.decisions[-1].history.recommendations) <= 300 // 15 + 2

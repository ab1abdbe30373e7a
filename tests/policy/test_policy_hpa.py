"""The Kubernetes HPA baselines on their own clock: ``hpa-gpu-util`` and
``hpa-decode-tps`` share one HPA algorithm (tolerance, scale-down stabilisation,
the scale-up limit, missing metrics) at the HPA's 15 s sync period; the tokens/s
HPA scales each role on its own signal with no P/D coordination. Also: the paper's
coordinated policy, ``heteroscale-paper``, decides exactly as it did while it was the
default (golden cases recorded then)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from policy_testkit import example_policy, fleet, make_policy, metrics, replay

from reconciler.policy import (
    AutoscalerConfigError,
    CoordinatedAutoscaler,
    HpaGpuUtilAutoscaler,
    HpaTokensAutoscaler,
    PerRoleHpa,
    PolicyHistory,
    decide,
)
from reconciler.policy.base import DecisionInput, Recommendation
from reconciler.policy.baselines import HPA_SYNC_PERIOD_S, NO_RECOMMENDATION, policy_tps_targets
from reconciler.sim.hand_targets import with_hand_targets
from reconciler.state import Sample, ServiceMetrics

NOW = 1000.0


def policy(**overrides):
    """``svc`` (decode target 1000 tokens/s, ratio 1:2) with prefill 1..50 and
    decode 1..60, plus ``overrides``."""
    base = {
        "prefill": {"min_instances": 1, "max_instances": 50},
        "decode": {"min_instances": 1, "max_instances": 60},
    }
    for role in ("prefill", "decode"):
        base[role].update(overrides.pop(role, {}))
    return make_policy(**base, **overrides)


def tokens_hpa() -> HpaTokensAutoscaler:
    return HpaTokensAutoscaler(prefill_tps_per_instance=8000, decode_tps_per_instance=1000)


# Each HPA with signals that hold prefill at 5 instances and drive decode: ``load``
# is decode's usage (observed / target) per instance of a 20-instance decode role.
Signals = Callable[[float, float], ServiceMetrics]
UTIL: tuple[Callable[[], PerRoleHpa], Signals] = (
    lambda: HpaGpuUtilAutoscaler(0.5),
    lambda t, load: metrics(t, decode_gpu_util=0.5 * load, prefill_gpu_util=0.5),
)
TOKENS: tuple[Callable[[], PerRoleHpa], Signals] = (
    tokens_hpa,
    lambda t, load: metrics(t, decode_tps=20 * 1000 * load, prefill_tps=5 * 8000),
)
BOTH = pytest.mark.parametrize(("make_hpa", "signals"), [UTIL, TOKENS], ids=["util", "tokens"])


def test_both_hpas_sync_every_15_s():
    assert HPA_SYNC_PERIOD_S == 15.0
    assert HpaGpuUtilAutoscaler().interval_s == 15.0
    assert tokens_hpa().interval_s == 15.0


# --------------------------------------------------------------------------- tokens/s formula


@pytest.mark.parametrize(
    ("decode_tps", "ready", "starting", "expected"),
    [
        # 15000 / 10 ready = 1500 per instance / 1000 = 1.5 -> ceil(1.5 x 10) = 15
        (15000, 10, 0, 15),
        # 10500 / 10 = 1050 / 1000 = 1.05, inside 10% -> hold 10
        (10500, 10, 0, 10),
        # 11500 / 10 = 1.15, outside -> ceil(11.5) = 12
        (11500, 10, 0, 12),
        # 5000 / 10 = 0.5 -> 5
        (5000, 10, 0, 5),
        # scale-up with 5 starting counted at 0: 15000 / 15 / 1000 = 1.0 -> hold 15
        (15000, 10, 5, 15),
        # 20000 / 12 / 1000 = 1.67 -> ceil(1.67 x 12) = 20
        (20000, 10, 2, 20),
        # scale-down is computed on ready instances: 5000 / 10 = 0.5 -> 5
        (5000, 10, 5, 5),
    ],
)
def test_tokens_hpa_is_an_average_value_target_per_ready_instance(
    decode_tps, ready, starting, expected
):
    decision = tokens_hpa().decide(
        DecisionInput(
            policy(),
            fleet(5, ready, decode_starting=starting),
            metrics(NOW, decode_tps=decode_tps, prefill_tps=5 * 8000),
            PolicyHistory(),
            NOW,
        )
    )
    assert decision.decode == expected
    assert decision.prefill == 5  # 40000 / 5 = 8000 = target: holds
    assert decision.reason == "baseline"
    assert decision.message.startswith("hpa-decode-tps: prefill_tps 40000 / 5 ready = 8000")


@BOTH
def test_tolerance_band_holds_and_its_edge_moves(make_hpa, signals):
    hpa = make_hpa()
    for load, expected in ((1.1, 20), (0.9, 20), (1.15, 23), (0.85, 17)):
        decision = hpa.decide(
            DecisionInput(policy(), fleet(5, 20), signals(NOW, load), PolicyHistory(), NOW)
        )
        assert (decision.prefill, decision.decode) == (5, expected), load


# --------------------------------------------------------------------------- the HPA's clock


@pytest.mark.parametrize(
    ("make_hpa", "at"),
    [
        (
            lambda: HpaGpuUtilAutoscaler(0.1),
            lambda t: metrics(t, decode_gpu_util=1.0, prefill_gpu_util=0.1),
        ),
        (tokens_hpa, lambda t: metrics(t, decode_tps=20000, prefill_tps=5 * 8000)),
    ],
    ids=["util", "tokens"],
)
def test_scale_up_limit_is_max_4_or_100_percent_per_15_s_sync(make_hpa, at):
    # Usage 10 on decode's 2 ready instances: it wants 20. New instances start for
    # 120 s (counted at 0, so the recommendation stays 20); per sync the limit is
    # max(4, 100% of current): 2 -> 6 (+4), 6 -> 12 (+6), 12 -> 20 (+12 allowed,
    # 8 wanted), then hold.
    run = replay(policy(), at, prefill=5, decode=2, until_s=45, autoscaler=make_hpa())
    assert [d.decode for d in run.decisions] == [6, 12, 20, 20]
    assert [any(c.name == "max_step" for c in d.clamps) for d in run.decisions] == [
        True,
        True,
        False,
        False,
    ]
    assert all(d.prefill == 5 for d in run.decisions)


@BOTH
def test_scale_down_waits_the_300_s_window_on_the_15_s_clock(make_hpa, signals):
    # At target until 600 s (recommendation 20), then half (recommendation 10). The
    # last 20 was recommended at 585 s; it leaves the window when 585 <= now - 300
    # (the HPA's cutoff is exclusive), so decode drops to 10 at 885 s and not before.
    def at(t: float) -> ServiceMetrics:
        return signals(t, 1.0 if t < 600 else 0.5)

    run = replay(policy(), at, prefill=5, decode=20, until_s=960, autoscaler=make_hpa())
    by_time = {index * 15.0: d for index, d in enumerate(run.decisions)}
    assert all(by_time[t].decode == 20 for t in by_time if t < 885)
    assert by_time[885.0].decode == 10
    assert any(c.name == "scale_in_window" for c in by_time[870.0].clamps)
    assert by_time[960.0].decode == 10


@BOTH
def test_stabilisation_reads_timestamps_not_cycle_counts(make_hpa, signals):
    # The same window whatever the cadence: a 20 recommended 299 s ago still holds,
    # one recommended 300 s ago no longer does.
    hpa = make_hpa()
    low = signals(NOW, 0.5)  # recommends 10
    for age_s, expected in ((299.0, 20), (300.0, 10)):
        history = PolicyHistory(recommendations=(Recommendation(NOW - age_s, 5, 20),))
        assert (
            hpa.decide(DecisionInput(policy(), fleet(5, 20), low, history, NOW)).decode == expected
        )


# --------------------------------------------------------------------------- missing metrics


@pytest.mark.parametrize(
    "sample",
    [None, Sample(float("nan"), NOW), Sample(5000.0, NOW - 500)],
    ids=["missing", "nan", "stale"],
)
def test_tokens_hpa_missing_metric_holds_and_stores_no_recommendation(sample):
    hpa = tokens_hpa()
    signals = ServiceMetrics("svc", decode_tps=sample, prefill_tps=Sample(40000.0, NOW))
    decision = hpa.decide(DecisionInput(policy(), fleet(5, 20), signals, PolicyHistory(), NOW))
    assert (decision.prefill, decision.decode) == (5, 20)
    assert decision.history.recommendations[-1] == Recommendation(NOW, 5, NO_RECOMMENDATION)
    # The skipped cycle is no recommendation of 20 for a later scale-down.
    later = hpa.decide(
        DecisionInput(
            policy(),
            fleet(5, 20),
            metrics(NOW + 15, decode_tps=10000, prefill_tps=40000),
            decision.history,
            NOW + 15,
        )
    )
    assert later.decode == 10


def test_an_hpa_reading_no_metric_at_all_holds_as_metrics_missing():
    """No role read its metric: a hold for want of a reading, which the cycle, a review
    and the status count as unsized (as the planner's), not a sized "baseline"; one
    role read is still the baseline's own decision."""
    hpa = tokens_hpa()
    blind = hpa.decide(
        DecisionInput(policy(), fleet(5, 20), ServiceMetrics("svc"), PolicyHistory(), NOW)
    )
    assert (blind.prefill, blind.decode, blind.reason) == (5, 20, "metrics_missing")
    half = ServiceMetrics("svc", prefill_tps=Sample(40000.0, NOW))
    read = hpa.decide(DecisionInput(policy(), fleet(5, 20), half, PolicyHistory(), NOW))
    assert read.reason == "baseline"


def test_tokens_hpa_holds_a_role_with_no_ready_instance():
    decision = tokens_hpa().decide(
        DecisionInput(
            policy(),
            fleet(5, 0, decode_starting=4),
            metrics(NOW, decode_tps=50000, prefill_tps=40000),
            PolicyHistory(),
            NOW,
        )
    )
    assert decision.decode == 4
    assert "no ready decode instance" in decision.message


# --------------------------------------------------------------------------- no coordination


@pytest.mark.parametrize(
    ("prefill_tps", "expected_prefill"), [(40000, 5), (80000, 10), (120000, 15)]
)
def test_tokens_hpa_prefill_load_does_not_move_decode(prefill_tps, expected_prefill):
    # Prefill 10 at 8000 each; decode 20 x 1000 = 20000: decode holds whatever prefill does.
    decision = tokens_hpa().decide(
        DecisionInput(
            policy(),
            fleet(10, 20),
            metrics(NOW, prefill_tps=prefill_tps, decode_tps=20000),
            PolicyHistory(),
            NOW,
        )
    )
    assert (decision.prefill, decision.decode) == (expected_prefill, 20)


@pytest.mark.parametrize(("decode_tps", "expected_decode"), [(10000, 10), (20000, 20), (30000, 30)])
def test_tokens_hpa_decode_load_does_not_move_prefill(decode_tps, expected_decode):
    signals = metrics(NOW, prefill_tps=80000, decode_tps=decode_tps)
    decision = tokens_hpa().decide(
        DecisionInput(policy(), fleet(10, 20), signals, PolicyHistory(), NOW)
    )
    assert (decision.prefill, decision.decode) == (10, expected_decode)


def test_the_coordinated_policy_on_the_same_signal_does_move_prefill():
    # The contrast that makes hpa-decode-tps a baseline for coordination alone: at
    # 30000 decode tokens/s both size decode at 30; heteroscale keeps the 1:2 ratio
    # (prefill 15), the per-role HPA leaves prefill at 10.
    signals = metrics(NOW, prefill_tps=80000, decode_tps=30000)
    ours = decide(policy(), fleet(10, 20), signals, PolicyHistory(), NOW)
    hpa = tokens_hpa().decide(DecisionInput(policy(), fleet(10, 20), signals, PolicyHistory(), NOW))
    assert (ours.prefill, ours.decode) == (15, 30)
    assert (hpa.prefill, hpa.decode) == (10, 30)


# --------------------------------------------------------------------------- targets


def test_tokens_hpa_targets_default_to_the_policys_own():
    with_floor = policy(scaling={"prefill_target_per_instance": 8000})
    assert policy_tps_targets(with_floor) == (8000, 1000)
    decision = HpaTokensAutoscaler().decide(
        DecisionInput(
            with_floor,
            fleet(10, 20),
            metrics(NOW, prefill_tps=120000, decode_tps=30000),
            PolicyHistory(),
            NOW,
        )
    )
    assert (decision.prefill, decision.decode) == (15, 30)
    # An explicit target wins over the policy's.
    explicit = HpaTokensAutoscaler(decode_tps_per_instance=1500).decide(
        DecisionInput(
            with_floor,
            fleet(10, 20),
            metrics(NOW, prefill_tps=80000, decode_tps=30000),
            PolicyHistory(),
            NOW,
        )
    )
    assert explicit.decode == 20


def test_tokens_hpa_without_a_target_for_a_role_is_an_error():
    # The base policy sets no prefill tokens/s target; a prefill-driven one no decode.
    assert policy_tps_targets(policy()) == (None, 1000)
    prefill_driven = policy(scaling={"metric": "prefill_tps", "target_per_instance": 8000})
    assert policy_tps_targets(prefill_driven) == (8000, None)
    utilisation = policy(scaling={"metric": "decode_gpu_util", "target_per_instance": 0.6})
    assert policy_tps_targets(utilisation) == (None, None)
    signals = metrics(NOW, prefill_tps=80000, decode_tps=20000)
    for p, role in ((policy(), "prefill"), (prefill_driven, "decode")):
        with pytest.raises(AutoscalerConfigError, match=f"no {role} tokens/s target"):
            HpaTokensAutoscaler().decide(
                DecisionInput(p, fleet(10, 20), signals, PolicyHistory(), NOW)
            )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prefill_tps_per_instance": 0},
        {"decode_tps_per_instance": -5},
        {"decode_tps_per_instance": math.inf},
        {"tolerance": 1.0},
        {"scale_down_window_s": -1},
    ],
)
def test_tokens_hpa_rejects_bad_settings(kwargs):
    with pytest.raises(AutoscalerConfigError, match="hpa-decode-tps"):
        HpaTokensAutoscaler(**kwargs)


# --------------------------------------------------------------------------- heteroscale-paper


def _paper_cases():
    # svc-b with the hand-set targets it carried while the paper policy was the default
    svc_b = with_hand_targets(example_policy("svc-b"))
    window = policy(scaling={"scale_in_window_s": 300, "cooldown_s": 120})
    return [
        # scale-out on decode tokens/s
        (policy(), fleet(10, 20), metrics(NOW, decode_tps=30000), PolicyHistory()),
        # inside the tolerance band
        (policy(), fleet(10, 20), metrics(NOW, decode_tps=20500), PolicyHistory()),
        # TBT above the SLO but below this policy's tiers
        (policy(), fleet(10, 20), metrics(NOW, decode_tps=20000, tbt=70), PolicyHistory()),
        # metrics missing
        (policy(), fleet(10, 20), metrics(NOW), PolicyHistory()),
        # scale-in held by the window's earlier recommendation, then the cooldown
        (
            window,
            fleet(10, 20),
            metrics(NOW, decode_tps=10000),
            PolicyHistory(
                recommendations=(Recommendation(NOW - 100, 10, 20),), last_change_at_s=NOW - 60
            ),
        ),
        # a real service with its prefill floor
        (
            svc_b,
            fleet(6, 10),
            metrics(NOW, decode_tps=15000, prefill_tps=200000, ttft=300, tbt=15),
            PolicyHistory(),
        ),
    ]


# (prefill, decode, reason, message) of each case, recorded at 40c834f, when this
# policy was the default ``heteroscale``.
PAPER_GOLDEN = [
    (
        15,
        30,
        "scale_out",
        "decode_tps 30000 / target 1000 per instance -> 30 decode; ratio 1:2 -> 15 prefill",
    ),
    (
        10,
        20,
        "within_tolerance",
        "decode_tps 20500 / target 1000 per instance = 1.02 of 20 decode, within 10%: hold 20 "
        "decode; ratio 1:2 -> 10 prefill; clamps: tolerance(decode: 21 -> 20; usage 1.02 "
        "within 1 +- 0.1) => 10 prefill, 20 decode (now 10, 20)",
    ),
    (
        10,
        20,
        "within_tolerance",
        "decode_tps 20000 / target 1000 per instance = 1.00 of 20 decode, within 10%: hold 20 "
        "decode; ratio 1:2 -> 10 prefill",
    ),
    (10, 20, "metrics_missing", "decode_tps missing: hold 10 prefill, 20 decode"),
    (
        10,
        20,
        "stabilised",
        "decode_tps 10000 / target 1000 per instance -> 10 decode; ratio 1:2 -> 5 prefill; "
        "clamps: scale_in_window(prefill: 5 -> 10; history covers 100 s of the 300 s "
        "window), scale_in_window(decode: 10 -> 20; history covers 100 s of the 300 s "
        "window) => 10 prefill, 20 decode (now 10, 20)",
    ),
    (
        9,
        12,
        "scale_out",
        "decode_tps 15000 / target 1250 per instance -> 12 decode; ratio 3:5 -> 8 prefill; "
        "prefill_tps 200000 / target 24050 per instance -> 9 prefill (floor)",
    ),
]


@pytest.mark.parametrize("case", range(6))
def test_heteroscale_paper_decides_as_it_did_as_the_default(case):
    p, current, signals, history = _paper_cases()[case]
    decision = CoordinatedAutoscaler().decide(DecisionInput(p, current, signals, history, NOW))
    assert (decision.prefill, decision.decode, decision.reason, decision.message) == (
        PAPER_GOLDEN[case]
    )
    assert decision == decide(p, current, signals, history, NOW)
    assert CoordinatedAutoscaler.name == "heteroscale-paper"


def test_heteroscale_paper_replays_as_it_did_as_the_default():
    def signals(t: float) -> ServiceMetrics:
        load = 20000 if t < 600 else 45000 if t < 1200 else 12000
        return metrics(t, decode_tps=load, tbt=30 if t < 900 else 50)

    p = policy(scaling={"scale_in_window_s": 300, "cooldown_s": 120})
    paper = replay(
        p, signals, prefill=10, decode=20, until_s=2400, autoscaler=CoordinatedAutoscaler()
    )
    counts = [(d.prefill, d.decode) for d in paper.decisions]
    # recorded at 40c834f: 40 cycles held, the step-limited scale-out, the rest of it,
    # then the scale-in once the window allowed
    assert counts == [(10, 20)] * 40 + [(20, 40)] + [(23, 45)] * 59 + [(6, 12)] * 61
    assert [(c.prefill, c.decode, c.reason) for c in paper.changes()] == [
        (20, 40, "scale_out"),
        (23, 45, "scale_out"),
        (6, 12, "scale_in"),
    ]

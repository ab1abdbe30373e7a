"""The baselines behind the same Autoscaler interface: Kubernetes HPA on GPU
utilisation per role and static peak provisioning; and the registry that builds them
by name."""

from __future__ import annotations

import pytest
from policy_testkit import fleet, make_policy, metrics, replay

from reconciler.errors import PermanentError
from reconciler.policy import (
    AUTOSCALERS,
    AutoscalerConfigError,
    CoordinatedAutoscaler,
    HpaGpuUtilAutoscaler,
    PlannerAutoscaler,
    PolicyHistory,
    StaticPeakAutoscaler,
    make_autoscaler,
)
from reconciler.policy.base import DecisionInput, Recommendation
from reconciler.policy.baselines import NO_RECOMMENDATION
from reconciler.state import Sample, ServiceMetrics

NOW = 1000.0


def policy(**overrides):
    """``svc`` with prefill 1..50 and decode 1..60, plus ``overrides``."""
    base = {
        "prefill": {"min_instances": 1, "max_instances": 50},
        "decode": {"min_instances": 1, "max_instances": 60},
    }
    for role in ("prefill", "decode"):
        base[role].update(overrides.pop(role, {}))
    return make_policy(**base, **overrides)


# --------------------------------------------------------------------------- HPA


@pytest.mark.parametrize(
    ("util", "ready", "starting", "expected"),
    [
        # usage 0.9 / 0.6 = 1.5 -> ceil(1.5 x 10 ready) = 15
        (0.9, 10, 0, 15),
        # 0.64 / 0.6 = 1.067, inside 10% -> hold 10
        (0.64, 10, 0, 10),
        # 0.3 / 0.6 = 0.5 -> ceil(0.5 x 10) = 5 (no earlier recommendation to hold it)
        (0.3, 10, 0, 5),
        # scale-up with 5 starting: they count at 0%: 0.9 x 10 / 15 / 0.6 = 1.0 -> hold 15
        (0.9, 10, 5, 15),
        # 1.0 x 10 / 12 / 0.6 = 1.39 -> ceil(1.39 x 12) = 17
        (1.0, 10, 2, 17),
        # 0.3 with 5 starting: scale-down is computed on ready pods: ceil(0.5 x 10) = 5
        (0.3, 10, 5, 5),
    ],
)
def test_hpa_replica_formula_per_role(util, ready, starting, expected):
    hpa = HpaGpuUtilAutoscaler(0.6)
    signals = metrics(NOW, decode_gpu_util=util, prefill_gpu_util=0.6)
    decision = hpa.decide(
        DecisionInput(
            policy(), fleet(5, ready, decode_starting=starting), signals, PolicyHistory(), NOW
        )
    )
    assert decision.decode == expected
    assert decision.prefill == 5  # 0.6 / 0.6 = 1.0: the prefill HPA holds
    assert decision.reason == "baseline"


def test_hpa_scale_up_rate_limit_is_the_default_behavior():
    # 1.0 / 0.1 = 10 x 2 ready = 20 wanted; limit max(4 pods, 100% of 2) = 4 -> 6
    hpa = HpaGpuUtilAutoscaler(0.1)
    decision = hpa.decide(
        DecisionInput(
            policy(),
            fleet(2, 2),
            metrics(NOW, decode_gpu_util=1.0, prefill_gpu_util=0.1),
            PolicyHistory(),
            NOW,
        )
    )
    assert decision.decode == 6
    assert any(c.name == "max_step" for c in decision.clamps)


def test_hpa_roles_are_independent_no_ratio():
    # prefill 0.9 / 0.6 x 4 = 6; decode 0.3 / 0.6 x 20 = 10; ratio 6:10 is not kept at 1:2
    hpa = HpaGpuUtilAutoscaler()
    decision = hpa.decide(
        DecisionInput(
            policy(),
            fleet(4, 20),
            metrics(NOW, prefill_gpu_util=0.9, decode_gpu_util=0.3),
            PolicyHistory(),
            NOW,
        )
    )
    assert (decision.prefill, decision.decode) == (6, 10)


def test_hpa_scale_down_stabilisation_takes_the_max_over_300_s():
    history = PolicyHistory(
        recommendations=(
            Recommendation(NOW - 400, 5, 30),  # outside the window: ignored
            Recommendation(NOW - 200, 5, 14),
            Recommendation(NOW - 100, 5, 12),
        )
    )
    hpa = HpaGpuUtilAutoscaler()
    # 0.3 / 0.6 x 20 = 10 now; highest in window 14 -> 14
    decision = hpa.decide(
        DecisionInput(
            policy(),
            fleet(5, 20),
            metrics(NOW, decode_gpu_util=0.3, prefill_gpu_util=0.6),
            history,
            NOW,
        )
    )
    assert decision.decode == 14
    # The new history keeps only what the window can reach, plus this cycle's.
    assert [r.at_s for r in decision.history.recommendations] == [NOW - 200, NOW - 100, NOW]
    assert decision.history.recommendations[-1] == Recommendation(NOW, 5, 10)


@pytest.mark.parametrize(
    "sample",
    [None, Sample(float("nan"), NOW), Sample(0.1, NOW - 500)],
)
def test_hpa_missing_metrics_hold_and_store_no_recommendation(sample):
    hpa = HpaGpuUtilAutoscaler()
    signals = ServiceMetrics("svc", decode_gpu_util=sample, prefill_gpu_util=Sample(0.6, NOW))
    decision = hpa.decide(DecisionInput(policy(), fleet(5, 20), signals, PolicyHistory(), NOW))
    assert decision.decode == 20
    assert decision.history.recommendations[-1].decode == NO_RECOMMENDATION
    # A later scale-down does not see the skipped cycle as a recommendation of 20.
    later = hpa.decide(
        DecisionInput(
            policy(),
            fleet(5, 20),
            metrics(NOW + 15, decode_gpu_util=0.3, prefill_gpu_util=0.6),
            decision.history,
            NOW + 15,
        )
    )
    assert later.decode == 10


def test_hpa_does_not_scale_from_zero_except_to_min():
    hpa = HpaGpuUtilAutoscaler()
    decision = hpa.decide(
        DecisionInput(
            policy(decode={"min_instances": 0}),
            fleet(5, 0),
            metrics(NOW, decode_gpu_util=0.9, prefill_gpu_util=0.6),
            PolicyHistory(),
            NOW,
        )
    )
    assert decision.decode == 0
    decision = hpa.decide(
        DecisionInput(
            policy(),
            fleet(5, 0),
            metrics(NOW, decode_gpu_util=0.9, prefill_gpu_util=0.6),
            PolicyHistory(),
            NOW,
        )
    )
    assert decision.decode == 1


def test_hpa_respects_min_and_max():
    hpa = HpaGpuUtilAutoscaler()
    decision = hpa.decide(
        DecisionInput(
            policy(),
            fleet(40, 50),
            metrics(NOW, decode_gpu_util=1.0, prefill_gpu_util=0.01),
            PolicyHistory(),
            NOW,
        )
    )
    assert (decision.prefill, decision.decode) == (1, 60)


def test_hpa_on_sm_activity():
    hpa = HpaGpuUtilAutoscaler(0.5, signal="sm_active")
    signals = metrics(NOW, decode_sm_active=0.75, prefill_sm_active=0.5)
    # 0.75 / 0.5 x 10 = 15
    assert (
        hpa.decide(DecisionInput(policy(), fleet(5, 10), signals, PolicyHistory(), NOW)).decode
        == 15
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"target_utilisation": 0}, {"target_utilisation": 1.5}, {"tolerance": 1.0}, {"signal": "tps"}],
)
def test_hpa_rejects_bad_settings(kwargs):
    with pytest.raises(AutoscalerConfigError):
        HpaGpuUtilAutoscaler(**kwargs)


def test_hpa_on_decode_utilisation_keeps_decode_large_when_load_falls():
    # The paper's point: decode GPU utilisation stays high at light load. Load halves
    # at 600 s but decode utilisation only drops from 0.9 to 0.7; the HPA (target 0.6)
    # never scales decode in, the coordinated policy on decode TPS halves it.
    def signals(t: float) -> ServiceMetrics:
        half = t >= 600
        return metrics(
            t,
            decode_tps=10000 if half else 20000,
            decode_gpu_util=0.7 if half else 0.9,
            prefill_gpu_util=0.6,
        )

    stabilised = policy(scaling={"scale_in_window_s": 300, "cooldown_s": 120})
    hpa_run = replay(
        stabilised, signals, prefill=10, decode=30, until_s=2400, autoscaler=HpaGpuUtilAutoscaler()
    )
    ours = replay(
        stabilised, signals, prefill=10, decode=20, until_s=2400, autoscaler=CoordinatedAutoscaler()
    )
    assert hpa_run.decisions[-1].decode >= 30
    assert ours.decisions[-1].decode == 10


# --------------------------------------------------------------------------- static peak


def test_static_peak_holds_fixed_counts():
    static = StaticPeakAutoscaler(prefill=12, decode=30)
    for load in (0, 10000, 90000):
        decision = static.decide(
            DecisionInput(
                policy(), fleet(3, 3), metrics(NOW, decode_tps=load), PolicyHistory(), NOW
            )
        )
        assert (decision.prefill, decision.decode, decision.reason) == (12, 30, "baseline")


def test_static_peak_per_service_counts_and_bounds():
    static = StaticPeakAutoscaler(counts={"svc": (80, 30)})
    decision = static.decide(
        DecisionInput(policy(), fleet(3, 3), metrics(NOW), PolicyHistory(), NOW)
    )
    assert (decision.prefill, decision.decode) == (50, 30)  # prefill max 50
    assert [c.name for c in decision.clamps] == ["max_instances"]
    other = make_policy(name="other")
    with pytest.raises(AutoscalerConfigError, match="no counts for service 'other'"):
        static.decide(
            DecisionInput(other, fleet(3, 3), metrics(NOW, service="other"), PolicyHistory(), NOW)
        )


def test_static_peak_from_peak_demand():
    # 130000 / 16000 = 8.1 -> 9 prefill; 41200 / 1600 = 25.75 -> 26 decode
    static = StaticPeakAutoscaler.from_peak_demand(130000, 41200, 16000, 1600)
    assert static.default == (9, 26)


def test_static_peak_needs_counts():
    with pytest.raises(AutoscalerConfigError):
        StaticPeakAutoscaler(prefill=3)
    with pytest.raises(AutoscalerConfigError):
        StaticPeakAutoscaler(prefill=-1, decode=3)


# --------------------------------------------------------------------------- registry


def test_registry_builds_every_autoscaler_by_name():
    assert set(AUTOSCALERS) == {
        "heteroscale",
        "heteroscale-paper",
        "hpa-gpu-util",
        "hpa-decode-tps",
        "static-peak",
    }
    assert isinstance(make_autoscaler("heteroscale"), PlannerAutoscaler)  # the default
    assert isinstance(make_autoscaler("heteroscale-paper"), CoordinatedAutoscaler)
    assert make_autoscaler("hpa-gpu-util", target_utilisation=0.7).target_utilisation == 0.7
    tokens = make_autoscaler(
        "hpa-decode-tps", prefill_tps_per_instance=8000, decode_tps_per_instance=1000
    )
    assert (tokens.prefill_tps_per_instance, tokens.decode_tps_per_instance) == (8000, 1000)
    assert make_autoscaler("static-peak", prefill=1, decode=2).default == (1, 2)
    for name in AUTOSCALERS:
        assert AUTOSCALERS[name].name == name


def test_registry_errors_are_permanent_and_helpful():
    with pytest.raises(AutoscalerConfigError, match="did you mean 'heteroscale'") as info:
        make_autoscaler("heteroscal")
    assert isinstance(info.value, PermanentError)
    with pytest.raises(AutoscalerConfigError, match="autoscaler 'heteroscale'"):
        make_autoscaler("heteroscale", bogus=1)

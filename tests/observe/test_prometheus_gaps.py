"""Fault: a rate window only partly covered by samples (after a Prometheus restart or a
gap in a series) reads low, and a policy would scale in on it. The adapter must report
such a window as missing (the policy holds) and read it normally once covered again.

On the session's backfilled history (``_gap_history``: every bf-gap series resumes
after a 120 s gap; bf-newpod has one decode pod whose history starts there) the
evaluation time fixes exactly how many samples each window holds; with 1 s samples
and a 10 s window a covered window holds 11 and the adapter needs 8
(``WindowCoverage``: three quarters of 10). The adapter's windows end
``WINDOW_OFFSET_S`` before the evaluation time, so a window ending at ``t`` is read at
``t + WINDOW_OFFSET_S``.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import pytest
import requests
from observe_helpers import (
    DECODE,
    GAP_DECODE_PER_S,
    GAP_RESUMED_BEFORE_END_S,
    PREFILL,
    RATE_TOLERANCE,
    RATE_WINDOW_S,
    RECORDING_LAG_S,
    WINDOW_OFFSET_S,
    PrometheusStack,
    Scenario,
    expected_metrics,
    make_policy,
    register,
    require_prometheus,
    settings_for,
    wait_for_clean_window,
)

from reconciler.cycle import with_missing_reasons
from reconciler.desired import ServicePolicy
from reconciler.observe.exporter import FleetExporter
from reconciler.observe.local_prometheus import LocalPrometheus
from reconciler.observe.presets import LENGTH_NAMES, SignalName, recording_rules
from reconciler.observe.prometheus import PrometheusMetricsSource
from reconciler.policy.base import PolicyHistory
from reconciler.policy.coordinated import decide
from reconciler.state import RoleCount, Sample, ServiceFleet, ServiceMetrics

pytestmark = [pytest.mark.prometheus, pytest.mark.fault]

WINDOWED = ("decode_tps", "ttft", *LENGTH_NAMES)
"""bf-gap's signals that are read over the rate window (its decode rate, TTFT, mix)."""


def _resumed(stack: PrometheusStack) -> float:
    return stack.backfill_end_s - GAP_RESUMED_BEFORE_END_S


def _fetch(
    stack: PrometheusStack, policies: list[ServicePolicy], now_s: float
) -> tuple[dict[str, ServiceMetrics], dict[tuple[str, str], str]]:
    with PrometheusMetricsSource(settings_for(stack.url)) as source:
        metrics = source.fetch(policies, now_s)
        report = source.last_report
    assert report is not None
    return metrics, {(g.service, g.signal): g.reason for g in report.gaps}


def _raw_decode_rate(stack: PrometheusStack, service: str, at_s: float) -> float:
    """What the plain ``sum(rate(...[10s]))`` says, without the coverage check."""
    response = requests.get(
        f"{stack.url}/api/v1/query",
        params={
            "query": f'sum(rate(vllm:generation_tokens_total{{service="{service}"}}[10s]))',
            "time": f"{at_s:.3f}",
        },
        timeout=10,
    )
    response.raise_for_status()
    return float(response.json()["data"]["result"][0]["value"][1])


def _fleet(prefill: int, decode: int) -> ServiceFleet:
    return ServiceFleet("bf-gap", RoleCount(ready=prefill), RoleCount(ready=decode))


def test_a_window_resumed_after_a_gap_is_missing_not_low_and_the_policy_holds(
    prometheus_stack: PrometheusStack,
) -> None:
    window_end_s = _resumed(prometheus_stack) + 3  # 4 samples in the 10 s window
    now_s = window_end_s + WINDOW_OFFSET_S
    true_rate = 3 * GAP_DECODE_PER_S
    raw = _raw_decode_rate(prometheus_stack, "bf-gap", window_end_s)
    assert raw < 0.5 * true_rate, "the fault itself: the partial window reads far too low"

    policy = make_policy("bf-gap", quantile=0.75)
    metrics, reasons = _fetch(prometheus_stack, [policy], now_s)
    gap = metrics["bf-gap"]
    for signal in WINDOWED:
        assert getattr(gap, signal) is None, signal
        assert reasons[("bf-gap", signal)] == (
            "window not covered: 4 of 10 samples (at least 8 needed)"
        ), signal

    fleet = _fleet(3, 3)
    held = decide(policy, fleet, gap, PolicyHistory(), now_s)
    assert held.reason == "metrics_missing"
    assert (held.prefill, held.decode) == (3, 3)
    # The metrics carry why, and the cycle's decision says it (it said only "decode_tps
    # missing", the reason left in the source's report that nothing read).
    assert dict(gap.gaps)["decode_tps"] == "window not covered: 4 of 10 samples (at least 8 needed)"
    told = with_missing_reasons(held, gap).message
    assert told.startswith(held.message + " (read as missing: decode_tps: window not covered")
    # Without stabilisation the low reading alone would have taken decode instances away:
    # that is what the hold prevents.
    eager = policy.model_copy(
        update={
            "scaling": policy.scaling.model_copy(
                update={"scale_in_window_s": 0.0, "cooldown_s": 0.0}
            )
        }
    )
    low = ServiceMetrics("bf-gap", decode_tps=Sample(raw, now_s))
    assert decide(eager, fleet, low, PolicyHistory(), now_s).decode < 3
    assert decide(eager, fleet, gap, PolicyHistory(), now_s).decode == 3


@pytest.mark.parametrize(("after_s", "covered"), [(6, False), (7, True), (10, True)])
def test_the_threshold_is_three_quarters_of_the_window(
    prometheus_stack: PrometheusStack, after_s: int, covered: bool
) -> None:
    """7 samples of 10 are missing, 8 are read: N = ceil(0.75 x 10 s / 1 s)."""
    now_s = _resumed(prometheus_stack) + after_s + WINDOW_OFFSET_S
    metrics, reasons = _fetch(prometheus_stack, [make_policy("bf-gap")], now_s)
    for signal in WINDOWED:
        assert (getattr(metrics["bf-gap"], signal) is not None) is covered, signal
    if not covered:
        assert reasons[("bf-gap", "decode_tps")] == (
            f"window not covered: {after_s + 1} of 10 samples (at least 8 needed)"
        )


def test_once_the_window_is_covered_again_every_signal_reads_exactly(
    prometheus_stack: PrometheusStack,
) -> None:
    now_s = _resumed(prometheus_stack) + 10 + WINDOW_OFFSET_S  # 11 samples: the whole window
    metrics, reasons = _fetch(prometheus_stack, [make_policy("bf-gap", quantile=0.75)], now_s)
    got = metrics["bf-gap"]
    assert not [r for (service, _), r in reasons.items() if service == "bf-gap" and "window" in r]
    assert got.decode_tps is not None
    assert got.decode_tps.value == pytest.approx(3 * GAP_DECODE_PER_S, rel=1e-9)
    assert got.ttft is not None and got.ttft.value == pytest.approx(750.0, rel=1e-9)
    assert got.prompt_tokens is not None and got.output_tokens is not None
    assert got.prompt_tokens.cumulative == pytest.approx((4.0, 10.0, 16.0), rel=1e-9)
    assert got.output_tokens.cumulative == pytest.approx((3.0, 9.0, 12.0), rel=1e-9)
    assert got.output_tokens.le == (100.0, 1000.0, math.inf)
    # And the policy acts on it again: 3,900 tokens/s on 3 decode instances is on target.
    decision = decide(make_policy("bf-gap"), _fleet(3, 3), got, PolicyHistory(), now_s)
    assert decision.reason != "metrics_missing"


def test_a_new_pod_with_a_short_history_does_not_blank_its_service(
    prometheus_stack: PrometheusStack,
) -> None:
    now_s = _resumed(prometheus_stack) + 3 + WINDOW_OFFSET_S  # new pod: 4 samples, others 11
    metrics, reasons = _fetch(prometheus_stack, [make_policy("bf-newpod")], now_s)
    decode = metrics["bf-newpod"].decode_tps
    assert decode is not None, reasons.get(("bf-newpod", "decode_tps"))
    # The two old pods count in full; the new one adds what rate() makes of its start.
    assert 2 * GAP_DECODE_PER_S <= decode.value < 3 * GAP_DECODE_PER_S


# ----------------------------------------------------------------------------- live restart

RESTART_SERVICE = "restart-live"


def _sample_times(url: str, at_s: float, span_s: int) -> list[float]:
    """Timestamps of one decode counter's raw samples over ``span_s`` before ``at_s``."""
    selector = f'vllm:generation_tokens_total{{service="{RESTART_SERVICE}",instance="{RESTART_SERVICE}-decode-0"}}'
    response = requests.get(
        f"{url}/api/v1/query",
        params={"query": f"{selector}[{span_s}s]", "time": f"{at_s:.3f}"},
        timeout=10,
    )
    response.raise_for_status()
    (series,) = response.json()["data"]["result"]
    return [float(t) for t, _ in series["values"]]


@pytest.mark.slow
def test_a_restarted_prometheus_holds_until_its_window_is_covered_in_both_modes(
    tmp_path: Path,
) -> None:
    """A real Prometheus (with the recording rules) stopped for longer than the window
    and started again on the same storage: its windows right after the restart are
    missing, raw and recorded mode alike, never low; once covered they read the load."""
    require_prometheus()
    scenario = Scenario().add("prefill", 2, PREFILL, RESTART_SERVICE)
    scenario.add("decode", 3, DECODE, RESTART_SERVICE)
    expected = expected_metrics(scenario, 0.9)
    expected_decode_tps = expected["decode_tps"]
    assert expected_decode_tps is not None
    exporter = FleetExporter()
    register(exporter, {RESTART_SERVICE: scenario})
    prometheus = LocalPrometheus(
        scrape_interval_s=1.0,
        workdir=tmp_path,
        rules=recording_rules(RATE_WINDOW_S, offset_s=WINDOW_OFFSET_S),
    )
    policy = make_policy(RESTART_SERVICE)
    exporter.start()
    try:
        prometheus.set_targets([exporter.address])
        prometheus.start()
        prometheus.wait_for_targets([exporter.address], timeout_s=30)
        time.sleep(RATE_WINDOW_S + 2)
        now_s = wait_for_clean_window(prometheus.url, [exporter.address])
        with PrometheusMetricsSource(settings_for(prometheus.url)) as source:
            before = source.fetch([policy], now_s)[RESTART_SERVICE]
        assert before.decode_tps is not None
        assert before.decode_tps.value == pytest.approx(expected["decode_tps"], rel=RATE_TOLERANCE)

        prometheus.stop()
        time.sleep(RATE_WINDOW_S + 1)  # the gap: longer than the window
        prometheus.start()
        prometheus.wait_for_targets([exporter.address], timeout_s=30)
        # Live cycles from the first scrape after the restart until the window is
        # covered: each reading is either missing or right, never low.
        readings: list[tuple[float | None, str]] = []
        with PrometheusMetricsSource(settings_for(prometheus.url)) as source:
            deadline = time.monotonic() + 3 * RATE_WINDOW_S
            while time.monotonic() < deadline:
                sample = source.fetch([policy], time.time())[RESTART_SERVICE].decode_tps
                assert source.last_report is not None
                reason = next(
                    (
                        g.reason
                        for g in source.last_report.gaps
                        if g.service == RESTART_SERVICE and g.signal == "decode_tps"
                    ),
                    "",
                )
                readings.append((None if sample is None else sample.value, reason))
                if sample is not None and len(readings) > 1:
                    break
                time.sleep(0.5)
        assert readings[-1][0] is not None, readings
        assert any(r.startswith("window not covered") for _, r in readings), readings
        for value, _reason in readings:
            # An accepted window holds 8 or more samples of 10: rate() then reads at
            # least 7.5 of 10 s worth (WindowCoverage), against 1.5 to 2.5 with 2 samples.
            assert value is None or value >= 0.7 * expected_decode_tps, readings

        # Deterministically, at the fourth sample after the gap, once Prometheus holds a
        # whole window after it (and the rules have evaluated over it).
        times = _sample_times(prometheus.url, time.time(), 4 * int(RATE_WINDOW_S))
        resumed = next(b for a, b in itertools.pairwise(times) if b - a > RATE_WINDOW_S)
        covered_at_s = resumed + RATE_WINDOW_S + 0.5 + WINDOW_OFFSET_S
        time.sleep(max(0.0, covered_at_s + RECORDING_LAG_S + 1.0 - time.time()))
        at_s = resumed + 3.5 + WINDOW_OFFSET_S
        for recorded in (False, True):
            settings = settings_for(prometheus.url, recorded_histograms=recorded)
            with PrometheusMetricsSource(settings) as source:
                early = source.fetch([policy], at_s)[RESTART_SERVICE]
                assert source.last_report is not None
                reasons = {
                    g.signal: g.reason
                    for g in source.last_report.gaps
                    if g.service == RESTART_SERVICE
                }
                covered = source.fetch([policy], covered_at_s)[RESTART_SERVICE]
            signals: tuple[SignalName, ...] = ("decode_tps", "prefill_tps", "ttft", "tbt")
            for signal in (*signals, *LENGTH_NAMES):
                assert getattr(early, signal) is None, (recorded, signal)
                assert reasons[signal].startswith("window not covered"), (recorded, signal)
                assert getattr(covered, signal) is not None, (recorded, signal)
            assert early.decode_kv_usage is not None  # a gauge: no window to cover
            fleet = ServiceFleet(RESTART_SERVICE, RoleCount(ready=2), RoleCount(ready=3))
            held = decide(policy, fleet, early, PolicyHistory(), at_s)
            assert held.reason == "metrics_missing" and (held.prefill, held.decode) == (2, 3)
    finally:
        exporter.stop()
        prometheus.cleanup()

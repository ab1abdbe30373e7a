"""Exact PromQL semantics on backfilled history (``promtool tsdb create-blocks-from
openmetrics``): the adapter evaluates at ``now_s``, so queries at the end of the
backfilled span see exactly the samples written there (``build_backfill``)."""

from __future__ import annotations

import pytest
from observe_helpers import (
    BACKFILL_SPAN_S,
    PrometheusStack,
    build_backfill,
    make_policy,
    require_prometheus,
    settings_for,
)

from reconciler.errors import MetricsUnavailable
from reconciler.observe.local_prometheus import LocalPrometheus
from reconciler.observe.presets import dcgm_pod_labels_join
from reconciler.observe.prometheus import PrometheusMetricsSource
from reconciler.state import ServiceMetrics

pytestmark = pytest.mark.prometheus


def _fetch(
    stack: PrometheusStack, policies: list, now_s: float | None = None
) -> dict[str, ServiceMetrics]:
    with PrometheusMetricsSource(settings_for(stack.url)) as source:
        return source.fetch(policies, stack.backfill_end_s if now_s is None else now_s)


def test_token_rates_are_exact_and_prefill_counts_cache_misses(
    prometheus_stack: PrometheusStack,
) -> None:
    metrics = _fetch(prometheus_stack, [make_policy("bf-tps")])["bf-tps"]
    assert metrics.decode_tps is not None and metrics.prefill_tps is not None
    assert metrics.decode_tps.value == pytest.approx(3 * 100.0, rel=1e-9)
    assert metrics.prefill_tps.value == pytest.approx(2 * (500.0 - 125.0), rel=1e-9)
    assert metrics.decode_tps.at_s == prometheus_stack.backfill_end_s


@pytest.mark.parametrize(
    ("quantile", "expected_ms"),
    # Buckets per second: 10 <= 0.1 s, 60 <= 0.5 s, 90 <= 1 s, 100 in all.
    # Linear inside the bucket holding the rank; beyond the last finite bound, that bound.
    [(0.75, 750.0), (0.5, 420.0), (0.05, 50.0), (0.95, 1000.0)],
)
def test_latency_quantiles_are_exact_histogram_quantiles_in_ms(
    prometheus_stack: PrometheusStack, quantile: float, expected_ms: float
) -> None:
    metrics = _fetch(prometheus_stack, [make_policy("bf-hist", quantile=quantile)])["bf-hist"]
    assert metrics.ttft is not None
    assert metrics.ttft.value == pytest.approx(expected_ms, rel=1e-9)


def test_values_older_than_the_policy_bound_are_missing(prometheus_stack: PrometheusStack) -> None:
    policies = [make_policy("bf-stale"), make_policy("bf-fresh")]
    with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as source:
        metrics = source.fetch(policies, prometheus_stack.backfill_end_s)
        report = source.last_report
    # Within Prometheus' 5 min lookback both still answer; the age bound (90 s) decides.
    assert metrics["bf-stale"].decode_kv_usage is None
    assert report is not None
    assert [
        g.reason for g in report.gaps if g.service == "bf-stale" and g.signal == "decode_kv_usage"
    ] == ["stale: newest sample 120 s old > 90 s"]
    fresh = metrics["bf-fresh"].decode_kv_usage
    assert fresh is not None and fresh.value == 0.3
    assert fresh.at_s == prometheus_stack.backfill_end_s - 30
    strict = _fetch(prometheus_stack, [make_policy("bf-fresh", max_age_s=20)])["bf-fresh"]
    assert strict.decode_kv_usage is None


def test_nan_and_infinite_values_are_missing(prometheus_stack: PrometheusStack) -> None:
    with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as source:
        metrics = source.fetch(
            [make_policy("bf-nan"), make_policy("bf-inf")], prometheus_stack.backfill_end_s
        )
        report = source.last_report
    assert metrics["bf-nan"].decode_kv_usage is None and metrics["bf-inf"].decode_kv_usage is None
    assert report is not None
    reasons = {(g.service, g.reason) for g in report.gaps if g.signal == "decode_kv_usage"}
    assert {("bf-nan", "value is NaN"), ("bf-inf", "value is +Inf")} <= reasons


def test_history_before_the_data_is_missing_not_zero(prometheus_stack: PrometheusStack) -> None:
    before = prometheus_stack.backfill_end_s - BACKFILL_SPAN_S - 3600
    metrics = _fetch(prometheus_stack, [make_policy("bf-tps")], now_s=before)["bf-tps"]
    assert metrics.decode_tps is None


def test_documented_dcgm_join_with_kube_state_metrics(prometheus_stack: PrometheusStack) -> None:
    """DCGM series that only name the GPU's pod are attributed through kube_pod_labels."""
    policy = make_policy(
        "bf-join",
        metrics={
            "queries": {
                "decode_gpu_util": dcgm_pod_labels_join(
                    "DCGM_FI_DEV_GPU_UTIL", "decode", scale=0.01
                ),
                "prefill_gpu_util": dcgm_pod_labels_join(
                    "DCGM_FI_DEV_GPU_UTIL", "prefill", scale=0.01
                ),
            }
        },
    )
    metrics = _fetch(prometheus_stack, [policy])["bf-join"]
    assert metrics.decode_gpu_util is not None and metrics.decode_gpu_util.value == pytest.approx(
        0.45
    )
    assert metrics.prefill_gpu_util is not None and metrics.prefill_gpu_util.value == pytest.approx(
        0.90
    )


def test_service_level_override_without_role_label(prometheus_stack: PrometheusStack) -> None:
    policy = make_policy(
        "bf-hist",
        quantile=0.75,
        metrics={
            "queries": {
                "tbt": "histogram_quantile($__quantile, sum by (service, le) "
                "(rate(vllm:time_to_first_token_seconds_bucket[$__window]))) * 1000"
            }
        },
    )
    metrics = _fetch(prometheus_stack, [policy])["bf-hist"]
    assert metrics.tbt is not None and metrics.tbt.value == pytest.approx(750.0)
    assert metrics.tbt.at_s == prometheus_stack.backfill_end_s  # evaluation time


def test_prometheus_stopped_mid_run_raises_metrics_unavailable() -> None:
    """A second server with the same history: read, stop it, read again. The reconciler
    treats ``MetricsUnavailable`` as temporary and holds every service (DESIGN.md)."""
    require_prometheus()  # it starts its own server: skip, with the reason, without one
    end_s = 1_700_000_000.0
    prometheus = LocalPrometheus()
    prometheus.backfill(build_backfill(end_s))
    with prometheus:
        source = PrometheusMetricsSource(settings_for(prometheus.url, retries=1, backoff_s=0.05))
        assert source.fetch([make_policy("bf-tps")], end_s)["bf-tps"].decode_tps is not None
        prometheus.stop()
        with pytest.raises(MetricsUnavailable) as raised:
            source.fetch([make_policy("bf-tps")], end_s)
    error = raised.value
    assert error.query is not None and "vllm:prompt_tokens_total" in error.query  # first signal
    assert error.cause is not None and "ConnectionError" in error.cause
    assert "after 2 attempts" in str(error)
    assert source.last_report is not None and source.last_report.now_s == end_s  # the earlier cycle

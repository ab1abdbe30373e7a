"""The adapter against a real Prometheus scraping the simulated fleet every second.

Tolerances: token rates within ``RATE_TOLERANCE`` (10 %; ``rate()`` over a full 10 s
window of linear counters is exact up to the jitter in the delay between a scrape's
timestamp and the exporter computing its values: typically a few ms, i.e. under 0.3 %,
but up to ~0.2 s when other processes saturate the CPU; every read waits until its
window was scraped cleanly, ``wait_for_clean_window``); latency quantiles within 1 % of what
``histogram_quantile`` must return for the injected distributions
(``expected_histogram_quantile_s``: linear interpolation inside the engine's buckets,
which is within one bucket of the true quantile); gauges exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from observe_helpers import (
    FLEET_DECODE,
    RATE_TOLERANCE,
    RATE_WINDOW_S,
    RECORDING_LAG_S,
    REQUESTS_PER_CYCLE,
    CountingProxy,
    PrometheusStack,
    expected_metrics,
    fleet_policies,
    make_policy,
    settings_for,
    wait_until,
)

from reconciler.observe.prometheus import PrometheusMetricsSource
from reconciler.state import METRIC_NAMES, ServiceMetrics

pytestmark = pytest.mark.prometheus

TPS_TOLERANCE = RATE_TOLERANCE


def _assert_matches(
    metrics: ServiceMetrics, expected: dict[str, float | None], now_s: float
) -> None:
    for signal in METRIC_NAMES:
        sample = metrics.get(signal)
        want = expected[signal]
        if want is None:
            assert sample is None, signal
            continue
        assert sample is not None, signal
        tolerance = TPS_TOLERANCE if signal.endswith("_tps") else 0.01
        assert sample.value == pytest.approx(want, rel=tolerance), signal
        assert now_s - 3.0 <= sample.at_s <= now_s, signal  # a 1 s scrape, not older


@pytest.mark.parametrize(
    ("service", "quantile"),
    [
        ("live-tps", 0.9),
        ("live-sglang", 0.9),
        ("live-p99", 0.99),
        ("om-vllm", 0.9),
        ("om-sglang", 0.5),
    ],
)
def test_every_signal_matches_the_injected_load(
    prometheus_stack: PrometheusStack, service: str, quantile: float
) -> None:
    scenario = prometheus_stack.scenarios[service]
    policy = make_policy(service, engine=scenario.engine, quantile=quantile)
    now_s = prometheus_stack.settled_now(service)
    with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as source:
        metrics = source.fetch([policy], now_s)
    _assert_matches(metrics[service], expected_metrics(scenario, quantile), now_s)


def test_underscore_spelling_of_engine_names_is_read_too(prometheus_stack: PrometheusStack) -> None:
    """The 'om-*' services are scraped through OpenMetrics negotiation, which stores
    ``vllm:...`` as ``vllm_...`` (prometheus/client_python#1177): same answers."""
    scenario = prometheus_stack.scenarios["om-vllm"]
    now_s = prometheus_stack.settled_now("om-vllm", "live-tps")
    with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as source:
        metrics = source.fetch([make_policy("om-vllm"), make_policy("live-tps")], now_s)
    assert metrics["om-vllm"].decode_tps is not None
    assert metrics["om-vllm"].decode_tps.value == pytest.approx(
        expected_metrics(scenario, 0.9)["decode_tps"], rel=TPS_TOLERANCE
    )


def test_gpu_signals_average_over_gpus_and_kv_over_instances(
    prometheus_stack: PrometheusStack,
) -> None:
    now_s = prometheus_stack.settled_now("live-gauges")
    with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as source:
        metrics = source.fetch([make_policy("live-gauges")], now_s)["live-gauges"]
    assert metrics.prefill_gpu_util is not None and metrics.prefill_gpu_util.value == pytest.approx(
        0.70
    )
    assert (
        metrics.prefill_sm_active is not None
        and metrics.prefill_sm_active.value == pytest.approx(0.40)
    )
    assert metrics.decode_gpu_util is not None and metrics.decode_gpu_util.value == pytest.approx(
        0.98
    )
    assert metrics.decode_sm_active is None  # not exported by those decode GPUs
    assert metrics.decode_kv_usage is not None and metrics.decode_kv_usage.value == pytest.approx(
        0.40
    )
    assert metrics.prefill_tps is not None and metrics.prefill_tps.value == 0.0  # idle, not missing
    assert metrics.ttft is None  # no TTFT observations exported


def test_quantile_groups_share_one_request_per_signal(prometheus_stack: PrometheusStack) -> None:
    policies = [make_policy("live-tps", quantile=0.9), make_policy("live-p99", quantile=0.99)]
    now_s = prometheus_stack.settled_now("live-tps", "live-p99")
    with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as source:
        metrics = source.fetch(policies, now_s)
        report = source.last_report
    assert report is not None
    tbt = next(q for q in report.queries if q.signal == "tbt")
    assert tbt.http_requests == 1
    assert "histogram_quantile(0.9," in tbt.promql and "histogram_quantile(0.99," in tbt.promql
    for policy in policies:
        scenario = prometheus_stack.scenarios[policy.name]
        _assert_matches(
            metrics[policy.name], expected_metrics(scenario, policy.slo.quantile), now_s
        )


def test_hundred_services_take_one_http_request_per_signal(
    prometheus_stack: PrometheusStack, counting_proxy: Callable[[str], CountingProxy]
) -> None:
    """100 services (vLLM and SGLang, three quantiles, five overrides) in one cycle:
    fifteen HTTP requests (thirteen signals, two request-mix histograms), counted
    independently by a loopback proxy."""
    proxy = counting_proxy(prometheus_stack.url)
    policies = fleet_policies()
    now_s = prometheus_stack.settled_now(*(policy.name for policy in policies))
    with PrometheusMetricsSource(settings_for(proxy.url)) as source:
        metrics = source.fetch(policies, now_s)
        report = source.last_report
    assert report is not None
    assert proxy.count == report.http_requests == REQUESTS_PER_CYCLE == 15
    assert all(path.startswith("/api/v1/query?") for path in proxy.paths)
    for policy in policies:
        decode_tps = metrics[policy.name].decode_tps
        assert decode_tps is not None, policy.name
        assert decode_tps.value == pytest.approx(FLEET_DECODE.generation_tps, rel=TPS_TOLERANCE)
        assert metrics[policy.name].tbt is not None
        assert metrics[policy.name].prompt_tokens is not None
        assert metrics[policy.name].output_tokens is not None
    assert report.gaps == ()


def test_a_broken_override_costs_only_its_own_service_that_signal(
    prometheus_stack: PrometheusStack,
) -> None:
    broken = make_policy(
        "live-broken",
        metrics={
            "queries": {
                "decode_tps": "sum by (service, role) (rate(vllm:generation_tokens_total[$__window])"
            }
        },
    )
    now_s = prometheus_stack.settled_now("live-tps")
    with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as source:
        metrics = source.fetch([make_policy("live-tps"), broken], now_s)
        report = source.last_report
    assert metrics["live-tps"].decode_tps is not None
    assert metrics["live-broken"].decode_tps is None
    assert report is not None
    gap = next(g for g in report.gaps if g.service == "live-broken" and g.signal == "decode_tps")
    assert gap.reason.startswith("query rejected by Prometheus: bad_data")
    decode_query = next(q for q in report.queries if q.signal == "decode_tps")
    assert decode_query.http_requests == 3  # the merged query, then each of its two parts


def test_unknown_service_comes_back_all_missing(prometheus_stack: PrometheusStack) -> None:
    with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as source:
        metrics = source.fetch([make_policy("nobody-serves-this")], time.time())
        report = source.last_report
    assert all(metrics["nobody-serves-this"].get(s) is None for s in METRIC_NAMES)
    assert metrics["nobody-serves-this"].prompt_tokens is None
    assert metrics["nobody-serves-this"].output_tokens is None
    assert report is not None and len(report.gaps) == REQUESTS_PER_CYCLE


def test_removed_instances_go_missing_at_the_next_scrape(prometheus_stack: PrometheusStack) -> None:
    policy = make_policy("live-remove")
    exporter = prometheus_stack.main
    with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as source:
        now_s = prometheus_stack.settled_now("live-remove")
        assert source.fetch([policy], now_s)["live-remove"].decode_tps is not None
        for key in exporter.instances():
            if key.service == "live-remove" and key.role == "decode":
                exporter.remove(key.service, key.role, key.instance)
        took_s = wait_until(
            lambda: source.fetch([policy], time.time())["live-remove"].decode_tps is None,
            timeout_s=2 * RATE_WINDOW_S,
        )
        metrics = source.fetch([policy], prometheus_stack.settled_now("live-remove"))["live-remove"]
    # Missing from the next scrape's staleness markers on (typically ~1 s), long before
    # rate() would run out of samples (the window) or the 5 min lookback would end.
    assert took_s < RATE_WINDOW_S
    assert metrics.decode_kv_usage is None and metrics.tbt is None
    assert metrics.prefill_tps is not None  # the prefill instances still export


def test_vanished_scrape_target_goes_missing(prometheus_stack: PrometheusStack) -> None:
    policies = [make_policy("live-vanish"), make_policy("live-tps")]
    with PrometheusMetricsSource(settings_for(prometheus_stack.url)) as source:
        now_s = prometheus_stack.settled_now("live-vanish", "live-tps")
        assert source.fetch(policies, now_s)["live-vanish"].decode_tps is not None
        prometheus_stack.vanishing.stop()  # the pod is gone: scrapes fail from now on
        took_s = wait_until(
            lambda: source.fetch(policies, time.time())["live-vanish"].decode_tps is None,
            timeout_s=2 * RATE_WINDOW_S,
        )
        # The vanished target cannot be clean any more: wait for live-tps's only.
        metrics = source.fetch(policies, prometheus_stack.settled_now("live-tps"))
        report = source.last_report
    assert took_s < RATE_WINDOW_S  # see test_removed_instances_go_missing_at_the_next_scrape
    assert all(metrics["live-vanish"].get(s) is None for s in METRIC_NAMES)
    assert metrics["live-vanish"].prompt_tokens is None
    assert metrics["live-vanish"].output_tokens is None
    assert metrics["live-tps"].decode_tps is not None  # other targets unaffected
    assert metrics["live-tps"].prompt_tokens is not None
    assert report is not None
    reasons = {
        g.reason for g in report.gaps if g.service == "live-vanish" and g.signal == "decode_tps"
    }
    # Within the rate window rate() still answers; the missing freshness row decides.
    assert reasons <= {
        "no current sample (series stale: target gone or not scraped)",
        "no series for role decode",
    }


def test_recorded_histograms_give_the_same_latencies(prometheus_stack: PrometheusStack) -> None:
    """With ``presets.recording_rules`` loaded (the session's Prometheus has them), the
    recorded mode reads pre-aggregated bucket rates (and, for the mean gap, sum and
    count rates): same answers, same request count."""
    policies = [
        make_policy("live-tps"),
        make_policy("live-p99", quantile=0.99),
        make_policy("live-sglang", engine="sglang", quantile=0.5),
        *fleet_policies()[:10],
    ]
    raw_settings = settings_for(prometheus_stack.url)
    recorded_settings = settings_for(prometheus_stack.url, recorded_histograms=True)
    now_s = prometheus_stack.settled_now(
        *(policy.name for policy in policies), extra_s=RECORDING_LAG_S
    )
    with (
        PrometheusMetricsSource(raw_settings) as raw,
        PrometheusMetricsSource(recorded_settings) as recorded,
    ):
        raw_metrics = raw.fetch(policies, now_s)
        recorded_metrics = recorded.fetch(policies, now_s)
        report = recorded.last_report
    assert report is not None and report.http_requests == REQUESTS_PER_CYCLE
    tbt_query = next(q.promql for q in report.queries if q.signal == "tbt")
    # The simulated engines export the pre-0.11 name; its series are in the record of
    # the histogram's first name, which covers all of them.
    assert "heteroscale:vllm_inter_token_latency_seconds_bucket:rate10s" in tbt_query
    assert "time_per_output_token_seconds_bucket" not in tbt_query
    mean_query = next(q.promql for q in report.queries if q.signal == "tbt_mean")
    assert "heteroscale:vllm_inter_token_latency_seconds_sum:rate10s" in mean_query
    assert "rate(" not in mean_query.split(" or ")[0]
    for policy in policies:
        for signal in ("ttft", "tbt", "tbt_mean"):
            want, got = (
                raw_metrics[policy.name].get(signal),
                recorded_metrics[policy.name].get(signal),
            )
            assert want is not None and got is not None, (policy.name, signal)
            # Rules evaluate every second: their rates may trail the raw ones by one scrape.
            assert got.value == pytest.approx(want.value, rel=0.01), (policy.name, signal)

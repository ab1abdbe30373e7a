"""The request mix (``ServiceMetrics.prompt_tokens`` / ``output_tokens``) against a real
Prometheus: live from the simulated fleet's length histograms, and exact on backfilled
history.

Live tolerances: per-bucket proportions within 1e-6 (every bucket of an instance is
computed at one instant, so scrape jitter moves all of them together and cancels in the
proportions); totals (requests/s) and the token rates within ``RATE_TOLERANCE``, as
everywhere live rates are read (observe_helpers says why).
"""

from __future__ import annotations

import math

import pytest
from observe_helpers import (
    MIX_STALE_LAST_S,
    RATE_TOLERANCE,
    RECORDING_LAG_S,
    WINDOW_OFFSET_S,
    PrometheusStack,
    expected_metrics,
    expected_mix,
    make_policy,
    settings_for,
)

from reconciler.desired import ServicePolicy
from reconciler.observe.presets import LENGTH_NAMES
from reconciler.observe.prometheus import PrometheusMetricsSource
from reconciler.state import METRIC_NAMES, LengthBuckets, ServiceMetrics

pytestmark = pytest.mark.prometheus

TOTAL_TOLERANCE = RATE_TOLERANCE


Reasons = dict[tuple[str, str], list[str]]


def _fetch(
    url: str, policies: list[ServicePolicy], now_s: float, **settings: object
) -> tuple[dict[str, ServiceMetrics], Reasons]:
    """Metrics and, per (service, signal), the gap reasons of one cycle."""
    with PrometheusMetricsSource(settings_for(url, **settings)) as source:
        metrics = source.fetch(policies, now_s)
        report = source.last_report
    assert report is not None
    reasons: Reasons = {}
    for gap in report.gaps:
        reasons.setdefault((gap.service, gap.signal), []).append(gap.reason)
    return metrics, reasons


def _proportions(cumulative: tuple[float, ...]) -> list[float]:
    return [c / cumulative[-1] for c in cumulative]


def _assert_exact(got: LengthBuckets | None, cumulative: tuple[float, ...], at_s: float) -> None:
    assert got is not None
    assert got.le == (100.0, 1000.0, math.inf) and got.at_s == at_s
    assert got.cumulative == pytest.approx(cumulative, rel=1e-9)


def _assert_mix_matches(
    metrics: ServiceMetrics, service: str, stack: PrometheusStack, now_s: float
) -> None:
    """``metrics`` as read at ``now_s``."""
    expected = expected_mix(stack.scenarios[service])
    for name in LENGTH_NAMES:
        got: LengthBuckets | None = getattr(metrics, name)
        want = expected[name]
        assert want is not None and got is not None, name
        bounds, cumulative = want
        assert got.le == bounds and got.le[-1] == math.inf, name
        assert _proportions(got.cumulative) == pytest.approx(
            _proportions(cumulative), rel=1e-6, abs=1e-9
        ), name
        assert got.cumulative[-1] == pytest.approx(cumulative[-1], rel=TOTAL_TOLERANCE), name
        assert now_s - 4.0 <= got.at_s <= now_s, name  # a 1 s scrape, not older
        assert got.is_usable(now_s, 90.0)


@pytest.mark.parametrize("service", ["live-tps", "live-sglang", "om-vllm", "om-sglang"])
def test_the_mix_has_the_injected_proportions_per_bucket(
    prometheus_stack: PrometheusStack, service: str
) -> None:
    """vLLM and SGLang names, in both spellings (the om-* services are stored as
    ``vllm_...`` / ``sglang_...``): every bucket holds the injected share of requests."""
    scenario = prometheus_stack.scenarios[service]
    policy = make_policy(service, engine=scenario.engine)
    now_s = prometheus_stack.settled_now(service)
    metrics, reasons = _fetch(prometheus_stack.url, [policy], now_s)
    _assert_mix_matches(metrics[service], service, prometheus_stack, now_s)
    assert not [key for key in reasons if key[1] in LENGTH_NAMES]


def test_the_expected_mix_is_not_trivial(prometheus_stack: PrometheusStack) -> None:
    """What the test above compares against: 40 % of prompts at or below 200 tokens,
    10 % beyond vLLM's last finite bound, and outputs as decode records them."""
    mix = expected_mix(prometheus_stack.scenarios["live-tps"])
    prompt, output = mix["prompt_tokens"], mix["output_tokens"]
    assert prompt is not None and output is not None
    shares = dict(zip(prompt[0], _proportions(prompt[1]), strict=True))
    assert shares[200.0] == pytest.approx(0.4) and shares[20000.0] == pytest.approx(0.9)
    assert prompt[1][-1] == pytest.approx(3 * 2.0)  # three prefill instances, 2 requests/s
    assert output[1][-1] == pytest.approx(5 * 2.0)  # five decode instances


def test_output_lengths_are_read_on_decode_not_from_prefill_handovers(
    prometheus_stack: PrometheusStack,
) -> None:
    """Every prefill instance records each request with one output token; reading them
    would put requests in the le=1 bucket. Prompt lengths come from the three prefill
    instances only (the five decode ones record them too, at 10 requests/s)."""
    now_s = prometheus_stack.settled_now("live-tps")
    metrics, _ = _fetch(prometheus_stack.url, [make_policy("live-tps")], now_s)
    output, prompt = metrics["live-tps"].output_tokens, metrics["live-tps"].prompt_tokens
    assert output is not None and prompt is not None
    assert output.le[0] == 1.0 and output.cumulative[0] == 0.0
    assert output.cumulative[-1] == pytest.approx(10.0, rel=TOTAL_TOLERANCE)
    assert prompt.cumulative[-1] == pytest.approx(6.0, rel=TOTAL_TOLERANCE)


def test_a_service_without_histograms_gets_none_and_keeps_its_signals(
    prometheus_stack: PrometheusStack,
) -> None:
    """live-nomix's engine exports no length histograms (SGLang without
    --collect-tokens-histogram); it is read in the same cycle as live-tps."""
    policies = [make_policy("live-nomix"), make_policy("live-tps")]
    now_s = prometheus_stack.settled_now("live-nomix", "live-tps")
    metrics, reasons = _fetch(prometheus_stack.url, policies, now_s)
    nomix = metrics["live-nomix"]
    assert nomix.prompt_tokens is None and nomix.output_tokens is None
    assert reasons[("live-nomix", "prompt_tokens")] == ["no histogram series for role prefill"]
    assert reasons[("live-nomix", "output_tokens")] == ["no histogram series for role decode"]
    expected = expected_metrics(prometheus_stack.scenarios["live-nomix"], 0.9)
    for signal in METRIC_NAMES:
        sample, want = nomix.get(signal), expected[signal]
        assert sample is not None and want is not None, signal
        assert sample.value == pytest.approx(want, rel=RATE_TOLERANCE), signal
    _assert_mix_matches(metrics["live-tps"], "live-tps", prometheus_stack, now_s)


def test_a_histogram_without_requests_in_the_window_is_missing_not_zero(
    prometheus_stack: PrometheusStack,
) -> None:
    now_s = prometheus_stack.settled_now("live-idle-mix")
    metrics, reasons = _fetch(prometheus_stack.url, [make_policy("live-idle-mix")], now_s)
    assert metrics["live-idle-mix"].prompt_tokens is None
    assert metrics["live-idle-mix"].output_tokens is None
    for name in LENGTH_NAMES:
        assert reasons[("live-idle-mix", name)] == ["empty: no request finished in the window"]
    assert metrics["live-idle-mix"].decode_tps is not None  # the rest is served


def test_recorded_mode_gives_the_same_mix(prometheus_stack: PrometheusStack) -> None:
    """The session's Prometheus has ``recording_rules`` loaded, length group included."""
    policies = [make_policy("live-tps"), make_policy("live-sglang", engine="sglang")]
    now_s = prometheus_stack.settled_now("live-tps", "live-sglang", extra_s=RECORDING_LAG_S)
    with (
        PrometheusMetricsSource(settings_for(prometheus_stack.url)) as raw,
        PrometheusMetricsSource(
            settings_for(prometheus_stack.url, recorded_histograms=True)
        ) as recorded,
    ):
        raw_metrics = raw.fetch(policies, now_s)
        recorded_metrics = recorded.fetch(policies, now_s)
        report = recorded.last_report
    assert report is not None
    query = next(q.promql for q in report.queries if q.signal == "prompt_tokens")
    assert "heteroscale:vllm_request_prompt_tokens_bucket:rate10s" in query
    assert "rate(" not in query.split(" or label_replace(")[0]
    for policy in policies:
        for name in LENGTH_NAMES:
            want = getattr(raw_metrics[policy.name], name)
            got = getattr(recorded_metrics[policy.name], name)
            assert want is not None and got is not None, (policy.name, name)
            assert got.le == want.le
            assert _proportions(got.cumulative) == pytest.approx(
                _proportions(want.cumulative), rel=1e-6, abs=1e-9
            )
            # Rules evaluate every second and may trail the raw rates by a scrape; on a
            # loaded machine a late evaluation shifts the 10 s window by a second or
            # two, so the totals agree to a few percent (the proportions exactly).
            assert got.cumulative[-1] == pytest.approx(want.cumulative[-1], rel=0.05)


def test_a_mix_override_reads_what_it_says(prometheus_stack: PrometheusStack) -> None:
    """An override that reads the decode instances' prompt histogram instead: same
    proportions, decode's request rate, stamped with the evaluation time."""
    policy = make_policy(
        "live-tps",
        metrics={
            "queries": {
                "prompt_tokens": "sum by (service, le) "
                '(rate(vllm:request_prompt_tokens_bucket{role="decode"}[$__window]))'
            }
        },
    )
    # The user's PromQL has no offset: evaluated at the end of a cleanly scraped window
    # (settled_now less the adapter's offset), every scrape it reads has finished.
    now_s = prometheus_stack.settled_now("live-tps") - WINDOW_OFFSET_S
    metrics, _ = _fetch(prometheus_stack.url, [policy], now_s)
    prompt = metrics["live-tps"].prompt_tokens
    want = expected_mix(prometheus_stack.scenarios["live-tps"])["prompt_tokens"]
    assert prompt is not None and want is not None
    assert _proportions(prompt.cumulative) == pytest.approx(_proportions(want[1]), rel=1e-6)
    assert prompt.cumulative[-1] == pytest.approx(10.0, rel=TOTAL_TOLERANCE)
    assert prompt.at_s == pytest.approx(now_s, abs=1e-3)


def test_a_rejected_mix_override_costs_only_that_histogram(
    prometheus_stack: PrometheusStack,
) -> None:
    broken = make_policy(
        "live-tps",
        metrics={"queries": {"output_tokens": "sum by (service, le) (rate(x[$__window])"}},
    )
    now_s = prometheus_stack.settled_now("live-tps")
    metrics, reasons = _fetch(prometheus_stack.url, [broken], now_s)
    assert metrics["live-tps"].output_tokens is None
    assert reasons[("live-tps", "output_tokens")][0].startswith(
        "query rejected by Prometheus: bad_data"
    )
    assert metrics["live-tps"].prompt_tokens is not None
    assert all(metrics["live-tps"].get(s) is not None for s in METRIC_NAMES)


# ----------------------------------------------------------------------------- backfilled


def test_backfilled_mix_is_exact(prometheus_stack: PrometheusStack) -> None:
    """bf-mix: two prefill instances observe prompts at 2 / 5 / 8 requests/s at or below
    100 / 1000 / +Inf tokens, three decode instances outputs at 1 / 3 / 4; the prefill
    instances' one-token outputs are not read."""
    end_s = prometheus_stack.backfill_end_s
    metrics, _ = _fetch(prometheus_stack.url, [make_policy("bf-mix")], end_s)
    _assert_exact(metrics["bf-mix"].prompt_tokens, (4.0, 10.0, 16.0), end_s)
    _assert_exact(metrics["bf-mix"].output_tokens, (3.0, 9.0, 12.0), end_s)


def test_a_nan_bucket_makes_only_that_histogram_missing(prometheus_stack: PrometheusStack) -> None:
    end_s = prometheus_stack.backfill_end_s
    metrics, reasons = _fetch(prometheus_stack.url, [make_policy("bf-mix-nan")], end_s)
    assert metrics["bf-mix-nan"].prompt_tokens is None
    assert reasons[("bf-mix-nan", "prompt_tokens")] == ["a bucket is NaN"]
    _assert_exact(metrics["bf-mix-nan"].output_tokens, (1.0, 3.0, 4.0), end_s)


def test_stale_histograms_are_missing(prometheus_stack: PrometheusStack) -> None:
    """bf-mix-stale's histograms end 30 s before the end. With a 60 s window rate() still
    answers; the age of their newest sample against the policy's bound decides first,
    and within the bound the window, half without samples, is not covered."""
    end_s = prometheus_stack.backfill_end_s
    policy = make_policy("bf-mix-stale")  # 90 s bound: young enough
    metrics, reasons = _fetch(prometheus_stack.url, [policy], end_s, rate_window_s=60.0)
    assert metrics["bf-mix-stale"].prompt_tokens is None
    assert reasons[("bf-mix-stale", "prompt_tokens")] == [
        # The window ends WINDOW_OFFSET_S before the evaluation: end - 61 s .. end - 30 s.
        "window not covered: 32 of 60 samples (at least 45 needed)"
    ]
    # Read as the same history 30 s earlier, with the window covered, it is usable.
    metrics, _ = _fetch(
        prometheus_stack.url, [policy], end_s - MIX_STALE_LAST_S, rate_window_s=60.0
    )
    prompt = metrics["bf-mix-stale"].prompt_tokens
    assert prompt is not None and prompt.at_s == end_s - MIX_STALE_LAST_S
    strict = make_policy("bf-mix-stale", max_age_s=20.0)
    metrics, reasons = _fetch(prometheus_stack.url, [strict], end_s, rate_window_s=60.0)
    assert metrics["bf-mix-stale"].prompt_tokens is None
    assert metrics["bf-mix-stale"].output_tokens is None
    for name in LENGTH_NAMES:
        assert reasons[("bf-mix-stale", name)] == ["stale: newest sample 30 s old > 20 s"]

"""Engines whose ``/metrics`` are written by whoever runs a pod: label values with
terminal escapes, bidirectional overrides and 10 KB of text, scraped by a real
Prometheus. Whatever such a series carries, the text it puts into a gap reason (a log
line, a status) is escaped and bounded, and its neighbours are read as usual; however
many other ``service`` values there are, the services asked about are read."""

from __future__ import annotations

import time

import pytest
from observe_helpers import RATE_WINDOW_S, PrometheusStack, make_policy, settings_for
from written_engines import (
    BYSTANDER,
    FLOOD_ANSWER_BYTES,
    FLOODED,
    HOSTILE,
    MANY_BUCKETS,
    TRUNCATED,
)

from reconciler.observe.prometheus import PrometheusMetricsSource
from reconciler.state import MAX_LENGTH_BUCKETS

pytestmark = pytest.mark.fault


@pytest.fixture
def hostile_prometheus(prometheus_stack: PrometheusStack) -> PrometheusStack:
    """The session's Prometheus, once it has scraped the hostile engines and the flood
    (``written_engines``) for a covered rate window."""
    prometheus_stack.wait_written_scraped_for(RATE_WINDOW_S + 2.0)
    return prometheus_stack


def test_a_hostile_bucket_label_is_missing_with_an_escaped_bounded_reason(
    hostile_prometheus: PrometheusStack,
) -> None:
    source = PrometheusMetricsSource(
        settings_for(hostile_prometheus.url, lengths=("prompt_tokens",))
    )
    metrics = source.fetch([make_policy(HOSTILE), make_policy(BYSTANDER)], time.time())

    assert metrics[HOSTILE].prompt_tokens is None
    assert metrics[BYSTANDER].prompt_tokens is not None  # its neighbour is read as usual
    assert source.last_report is not None
    reasons = [
        gap.reason
        for gap in source.last_report.gaps
        if gap.service == HOSTILE and gap.signal == "prompt_tokens"
    ]
    assert len(reasons) == 1
    assert "is not a bucket bound" in reasons[0]
    assert "\x1b" not in reasons[0] and "\u202e" not in reasons[0]
    assert len(reasons[0]) < 500  # the 10 KB value is cut, not copied into every cycle's report


def test_a_length_histogram_without_an_inf_bucket_is_missing_not_truncated(
    hostile_prometheus: PrometheusStack,
) -> None:
    # Requests longer than the largest bound would not be counted: the mix would read
    # shorter than it is, and the planner would size for lighter requests.
    source = PrometheusMetricsSource(
        settings_for(hostile_prometheus.url, lengths=("prompt_tokens",))
    )
    metrics = source.fetch([make_policy(TRUNCATED)], time.time())

    assert metrics[TRUNCATED].prompt_tokens is None
    assert source.last_report is not None
    assert [gap.reason for gap in source.last_report.gaps if gap.signal == "prompt_tokens"] == [
        "no +Inf bucket: requests above the largest bound are not counted"
    ]


# An override is the user's PromQL, sent as written but for ``$__services``: with it,
# the override asks for its services alone, as a preset query does.
FLOOD_OVERRIDE = (
    "sum by (service, role) (rate(vllm:generation_tokens_total"
    '{role="decode", service=~"$__services"}[$__window]))'
)


@pytest.mark.parametrize("override", [None, FLOOD_OVERRIDE], ids=["preset", "override"])
def test_a_flood_of_other_service_values_does_not_stop_the_services_asked_about(
    hostile_prometheus: PrometheusStack, override: str | None
) -> None:
    """Both services share one query part: it asks for them alone, so the answer holds
    their rows, not one per value of the flood (which would pass the answer cap and
    make the cycle's metrics unavailable: every service held)."""
    settings = settings_for(
        hostile_prometheus.url,
        signals=("decode_tps",),
        lengths=(),
        max_answer_bytes=FLOOD_ANSWER_BYTES,
    )
    queries = {"queries": {"decode_tps": override}} if override else None
    policies = [make_policy(service, metrics=queries) for service in FLOODED]
    source = PrometheusMetricsSource(settings)
    metrics = source.fetch(policies, time.time())

    for service in FLOODED:
        decode_tps = metrics[service].decode_tps
        assert decode_tps is not None, source.last_report
        assert decode_tps.value == pytest.approx(10.0, rel=0.2)


def test_a_length_histogram_with_more_buckets_than_any_engine_is_missing(
    hostile_prometheus: PrometheusStack,
) -> None:
    # The planner's work on a mix grows with its buckets: a histogram past the bound is
    # read as missing (the last known mix stands in), its neighbours as usual.
    source = PrometheusMetricsSource(
        settings_for(hostile_prometheus.url, lengths=("prompt_tokens",))
    )
    metrics = source.fetch([make_policy(MANY_BUCKETS), make_policy(BYSTANDER)], time.time())

    assert metrics[MANY_BUCKETS].prompt_tokens is None
    assert metrics[BYSTANDER].prompt_tokens is not None
    assert source.last_report is not None
    assert [
        gap.reason
        for gap in source.last_report.gaps
        if gap.service == MANY_BUCKETS and gap.signal == "prompt_tokens"
    ] == [f"{MAX_LENGTH_BUCKETS + 1} buckets, more than any engine exports ({MAX_LENGTH_BUCKETS})"]

"""Batching and result parsing of the Prometheus adapter, without a server: how
services are grouped into parts, how a merged answer becomes ``ServiceMetrics``, and
when a value counts as missing."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from observe_helpers import make_policy

from reconciler.desired import ServicePolicy
from reconciler.observe.presets import LENGTH_NAMES, PART_LABEL, SignalName, check_metrics_config
from reconciler.observe.prometheus import (
    PartOutcome,
    QueryFailed,
    QueryRejected,
    Row,
    SignalGap,
    WindowCoverage,
    assemble,
    evaluation_time,
    parse_vector,
    plan_requests,
)
from reconciler.state import METRIC_NAMES, LengthBuckets, MetricName, ServiceMetrics

NOW = 1_000_000.0


def _row(part: str, service: str | None, role: str | None, value: float, at: float = NOW) -> Row:
    labels = {PART_LABEL: part}
    if service is not None:
        labels["service"] = service
    if role is not None:
        labels["role"] = role
    return Row(labels, value, at)


class TestPlan:
    def test_one_request_per_signal_and_one_part_per_distinct_configuration(self) -> None:
        policies = [make_policy(f"s{i}", quantile=0.9 if i % 2 else 0.99) for i in range(10)]
        plan, gaps = plan_requests(policies, METRIC_NAMES, window_s=60)
        assert gaps == ()
        assert [r.signal for r in plan] == list(METRIC_NAMES)
        parts = {r.signal: len(r.parts) for r in plan}
        # Only the quantile signals depend on the quantile.
        assert parts["ttft"] == parts["tbt"] == 2
        assert all(parts[s] == 1 for s in METRIC_NAMES if s not in ("ttft", "tbt"))

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["vllm", "sglang", "dynamo"]),
                st.sampled_from([0.5, 0.9, 0.99]),
                st.booleans(),
            ),
            min_size=1,
            max_size=60,
        )
    )
    @settings(max_examples=40, deadline=None)
    def test_requests_are_bounded_by_signals_and_parts_by_distinct_configurations(
        self, configs: list[tuple[str, float, bool]]
    ) -> None:
        policies = [
            make_policy(
                f"s{i}",
                engine=engine,
                quantile=q,
                metrics={"queries": {"decode_tps": "sum by (service, role) (x)"}}
                if override
                else None,
            )
            for i, (engine, q, override) in enumerate(configs)
        ]
        plan, gaps = plan_requests(policies, METRIC_NAMES, window_s=60)
        assert gaps == ()
        assert len(plan) == len(METRIC_NAMES)
        distinct = len(set(configs))
        for request in plan:
            assert 1 <= len(request.parts) <= distinct
            served = [s for part in request.parts for s in part.services]
            assert sorted(served) == sorted(p.name for p in policies)  # each exactly once

    def test_several_parts_each_aggregate_only_their_own_services(self) -> None:
        policies = [make_policy(f"s{i}", quantile=0.9 if i < 2 else 0.99) for i in range(4)]
        policies.append(make_policy("o", metrics={"queries": {"ttft": "sum by (service) (x)"}}))
        plan, _ = plan_requests(policies, ["ttft", "decode_tps"], window_s=60)
        ttft, decode_tps = plan
        assert [p.services for p in ttft.parts] == [("s0", "s1"), ("s2", "s3"), ("o",)]
        assert 'service=~"s0|s1"' in ttft.parts[0].query.value
        assert 'service=~"s2|s3"' in ttft.parts[1].query.value
        assert ttft.parts[2].query.value == "sum by (service) (x)"  # overrides stay as written
        assert ttft.parts[0].query.sampled_at is not None
        assert 'service=~"s0|s1"' in ttft.parts[0].query.sampled_at
        # One part serves everyone: restricted to them all the same.
        assert len(decode_tps.parts) == 1
        assert 'service=~"o|s0|s1|s2|s3"' in decode_tps.parts[0].query.value

    def test_an_override_is_restricted_where_it_says_services(self) -> None:
        """``$__services`` becomes the regex of the services that share the override:
        they are grouped by its text, so they share one part, restricted to them."""
        text = 'sum by (service, role) (rate(t_total{service=~"$__services"}[$__window]))'
        policies = [make_policy(name, metrics={"queries": {"decode_tps": text}}) for name in "ba"]
        policies.append(make_policy("p.q", metrics={"queries": {"decode_tps": "sum(x)"}}))
        (decode_tps,), _ = plan_requests(policies, ["decode_tps"], window_s=60)
        shared, plain = decode_tps.parts
        assert shared.services == ("b", "a")
        assert shared.query.value == ('sum by (service, role) (rate(t_total{service=~"a|b"}[60s]))')
        assert plain.query.value == "sum(x)"  # no placeholder: as written
        assert check_metrics_config(policies[0]) == []  # a known placeholder

    def test_a_part_serving_every_service_still_asks_only_for_them(self) -> None:
        """Every selector of every query carries the services' matcher: each other
        ``service`` value Prometheus holds would be a row of the answer, and a flood of
        them would push it past ``max_answer_bytes`` (every service held)."""
        policies = [make_policy("a"), make_policy("b.c")]
        plan, _ = plan_requests(
            policies,
            [*METRIC_NAMES, *LENGTH_NAMES],
            window_s=60,
            coverage=WindowCoverage.of(60, 15, 0.75),
        )
        assert plan
        for request in plan:
            (part,) = request.parts
            for text in (part.query.value, part.query.sampled_at, part.query.samples):
                if text is None:
                    continue
                selectors = re.findall(r"\{[^}]*\}", text)
                assert selectors and all(
                    'service=~"a|b\\\\.c"' in selector for selector in selectors
                ), text

    def test_signals_without_source_are_gaps_not_queries(self) -> None:
        plan, gaps = plan_requests(
            [make_policy("t", engine="trtllm")], ["decode_tps", "ttft"], window_s=60
        )
        assert [r.signal for r in plan] == ["ttft"]
        assert [(g.service, g.signal) for g in gaps] == [("t", "decode_tps")]
        assert "no source" in gaps[0].reason

    def test_invalid_label_names_make_gaps(self) -> None:
        plan, gaps = plan_requests(
            [make_policy("bad", metrics={"service_label": "app-name"})], ["decode_tps"], window_s=60
        )
        assert plan == ()
        assert "invalid label names" in gaps[0].reason

    def test_merged_query_tags_values_and_freshness_of_each_part(self) -> None:
        policies = [make_policy("a", quantile=0.9), make_policy("b", quantile=0.99)]
        plan, _ = plan_requests(policies, ["ttft"], window_s=60)
        promql = plan[0].promql()
        for tag in ("0", "0t", "1", "1t"):
            assert f'"{PART_LABEL}", "{tag}", "", "")' in promql
        assert promql.count(" or label_replace(") == 3
        assert "histogram_quantile(0.9," in promql and "histogram_quantile(0.99," in promql


class TestParseVector:
    def test_values_including_nan_and_infinities(self) -> None:
        rows = parse_vector(
            [
                {"metric": {"service": "a"}, "value": [NOW, "1.5"]},
                {"metric": {"service": "b"}, "value": [NOW, "NaN"]},
                {"metric": {"service": "c"}, "value": [NOW, "+Inf"]},
                {"metric": {"service": "d"}, "value": [NOW, "-Inf"]},
            ]
        )
        assert rows[0] == Row({"service": "a"}, 1.5, NOW)
        assert math.isnan(rows[1].value)
        assert rows[2].value == math.inf and rows[3].value == -math.inf

    @pytest.mark.parametrize(
        "bad",
        [
            {"resultType": "matrix"},
            [{"metric": {}}],
            [{"metric": {}, "value": [1]}],
            [{"value": [1, "x"], "metric": {}}],
        ],
    )
    def test_anything_but_an_instant_vector_is_refused(self, bad: object) -> None:
        with pytest.raises(ValueError):
            parse_vector(bad)


class TestAssemble:
    def _assemble(
        self,
        rows: list[Row],
        policies: list[ServicePolicy] | None = None,
        signal: MetricName = "decode_tps",
    ) -> tuple[dict[str, ServiceMetrics], tuple[SignalGap, ...]]:
        policies = policies or [make_policy("a"), make_policy("b")]
        plan, _ = plan_requests(policies, [signal], window_s=60)
        outcomes: dict[tuple[SignalName, str], PartOutcome] = {
            (signal, part.part_id): rows for part in plan[0].parts
        }
        return assemble(plan, outcomes, policies, NOW)

    def test_value_with_fresh_sample_time(self) -> None:
        metrics, gaps = self._assemble(
            [_row("0", "a", "decode", 3500.0), _row("0t", "a", "decode", NOW - 3)]
        )
        assert metrics["a"].decode_tps is not None
        assert (metrics["a"].decode_tps.value, metrics["a"].decode_tps.at_s) == (3500.0, NOW - 3)
        assert metrics["b"].decode_tps is None
        assert [(g.service, g.reason) for g in gaps] == [("b", "no series for role decode")]

    def test_rows_of_the_wrong_role_are_ignored(self) -> None:
        metrics, _ = self._assemble(
            [_row("0", "a", "prefill", 1.0), _row("0t", "a", "prefill", NOW)]
        )
        assert metrics["a"].decode_tps is None

    def test_a_value_without_a_current_sample_is_missing(self) -> None:
        # rate() still answers for a window after the target vanished; timestamp() does not.
        metrics, gaps = self._assemble([_row("0", "a", "decode", 10.0)])
        assert metrics["a"].decode_tps is None
        assert "stale" in gaps[0].reason

    @pytest.mark.parametrize("sampled_at", [NOW + 3600.0, math.nan, math.inf])
    def test_a_sample_time_after_the_evaluation_or_not_a_number_is_missing(
        self, sampled_at: float
    ) -> None:
        # A broken or forged answer; a NaN time would pass every age comparison.
        metrics, gaps = self._assemble(
            [_row("0", "a", "decode", 5.0), _row("0t", "a", "decode", sampled_at)]
        )
        assert metrics["a"].decode_tps is None
        assert any(
            g.service == "a" and g.signal == "decode_tps" and "is not a time before" in g.reason
            for g in gaps
        )

    @pytest.mark.parametrize(
        ("age_s", "usable"), [(0.0, True), (90.0, True), (90.5, False), (3600.0, False)]
    )
    def test_age_bound_comes_from_the_policy(self, age_s: float, usable: bool) -> None:
        metrics, gaps = self._assemble(
            [_row("0", "a", "decode", 5.0), _row("0t", "a", "decode", NOW - age_s)]
        )
        assert (metrics["a"].decode_tps is not None) is usable
        if not usable:
            assert any(
                g.service == "a" and g.reason.startswith("stale: newest sample") for g in gaps
            )

    def test_freshness_is_the_oldest_contributor(self) -> None:
        policies = [make_policy("a")]
        plan, _ = plan_requests(policies, ["decode_tps"], window_s=60)
        rows = [_row("0", "a", "decode", 5.0), _row("0t", "a", "decode", NOW - 80)]
        metrics, _ = assemble(plan, {("decode_tps", "0"): rows}, policies, NOW)
        assert metrics["a"].decode_tps is not None and metrics["a"].decode_tps.at_s == NOW - 80

    @pytest.mark.parametrize(
        ("value", "reason"), [(math.nan, "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf")]
    )
    def test_non_finite_values_are_missing(self, value: float, reason: str) -> None:
        metrics, gaps = self._assemble(
            [_row("0", "a", "decode", value), _row("0t", "a", "decode", NOW)]
        )
        assert metrics["a"].decode_tps is None
        assert gaps[0].reason == f"value is {reason}"

    def test_override_rows_are_stamped_with_the_evaluation_time(self) -> None:
        policies = [make_policy("a", metrics={"queries": {"decode_tps": "q"}})]
        plan, _ = plan_requests(policies, ["decode_tps"], window_s=60)
        rows = [_row("0", "a", "decode", 7.0, at=NOW - 1)]
        metrics, gaps = assemble(plan, {("decode_tps", "0"): rows}, policies, NOW)
        assert gaps == ()
        assert metrics["a"].decode_tps is not None and metrics["a"].decode_tps.at_s == NOW - 1

    def test_service_level_rows_without_role_serve_any_role(self) -> None:
        policies = [make_policy("a", metrics={"queries": {"ttft": "q"}})]
        plan, _ = plan_requests(policies, ["ttft"], window_s=60)
        metrics, _ = assemble(plan, {("ttft", "0"): [_row("0", "a", None, 420.0)]}, policies, NOW)
        assert metrics["a"].ttft is not None and metrics["a"].ttft.value == 420.0

    def test_a_query_that_does_not_aggregate_is_reported(self) -> None:
        policies = [make_policy("a", metrics={"queries": {"decode_tps": "q"}})]
        plan, _ = plan_requests(policies, ["decode_tps"], window_s=60)
        rows = [_row("0", "a", "decode", 1.0), _row("0", "a", "decode", 2.0)]
        rows[1] = Row({**rows[1].labels, "instance": "x"}, 2.0, NOW)
        metrics, gaps = assemble(plan, {("decode_tps", "0"): rows}, policies, NOW)
        assert metrics["a"].decode_tps is None
        assert "aggregate by (service, role)" in gaps[0].reason

    def test_rejected_part_only_affects_its_services(self) -> None:
        policies = [
            make_policy("a"),
            make_policy("b", metrics={"queries": {"decode_tps": "broken("}}),
        ]
        plan, _ = plan_requests(policies, ["decode_tps"], window_s=60)
        outcomes: dict[tuple[SignalName, str], PartOutcome] = {
            ("decode_tps", "0"): [_row("0", "a", "decode", 1.0), _row("0t", "a", "decode", NOW)],
            ("decode_tps", "1"): QueryRejected("bad_data: parse error"),
        }
        metrics, gaps = assemble(plan, outcomes, policies, NOW)
        assert metrics["a"].decode_tps is not None
        assert metrics["b"].decode_tps is None
        assert gaps[0].reason == "query rejected by Prometheus: bad_data: parse error"

    def test_rows_of_other_parts_and_other_services_are_not_mixed_up(self) -> None:
        policies = [make_policy("a", quantile=0.9), make_policy("b", quantile=0.99)]
        plan, _ = plan_requests(policies, ["ttft"], window_s=60)
        rows = [
            # Part 0 (q=0.9) computes for every service; only a's row is a's answer.
            _row("0", "a", "prefill", 100.0),
            _row("0", "b", "prefill", 111.0),
            _row("0t", "a", "prefill", NOW),
            _row("0t", "b", "prefill", NOW),
            _row("1", "a", "prefill", 222.0),
            _row("1", "b", "prefill", 200.0),
            _row("1t", "a", "prefill", NOW),
            _row("1t", "b", "prefill", NOW),
        ]
        metrics, _ = assemble(plan, {("ttft", "0"): rows, ("ttft", "1"): rows}, policies, NOW)
        assert metrics["a"].ttft is not None and metrics["a"].ttft.value == 100.0
        assert metrics["b"].ttft is not None and metrics["b"].ttft.value == 200.0


def _bucket(part: str, service: str, le: str | None, value: float, role: str | None = None) -> Row:
    labels = {PART_LABEL: part, "service": service}
    if le is not None:
        labels["le"] = le
    if role is not None:
        labels["role"] = role
    return Row(labels, value, NOW)


class TestRequestMix:
    def test_one_request_per_histogram_read_on_the_role_that_sees_it(self) -> None:
        policies = [
            make_policy("v"),
            make_policy("d", engine="dynamo"),
            make_policy("s", engine="sglang"),
            make_policy("t", engine="trtllm"),
        ]
        plan, gaps = plan_requests(policies, LENGTH_NAMES, window_s=60)
        assert [(r.signal, r.role, r.optional) for r in plan] == [
            ("prompt_tokens", "prefill", True),
            ("output_tokens", "decode", True),
        ]
        # vLLM and Dynamo render the same query: one part; SGLang its own.
        assert [p.services for p in plan[0].parts] == [("v", "d"), ("s",)]
        assert sorted((g.service, g.signal) for g in gaps) == [
            ("t", "output_tokens"),
            ("t", "prompt_tokens"),
        ]
        assert all("no source" in g.reason for g in gaps)

    def _assemble(
        self, rows: list[Row], policies: list[ServicePolicy] | None = None
    ) -> tuple[dict[str, ServiceMetrics], tuple[SignalGap, ...]]:
        policies = policies or [make_policy("a"), make_policy("b")]
        plan, _ = plan_requests(policies, ["prompt_tokens"], window_s=60)
        outcomes: dict[tuple[SignalName, str], PartOutcome] = {
            ("prompt_tokens", part.part_id): rows for part in plan[0].parts
        }
        return assemble(plan, outcomes, policies, NOW)

    def test_buckets_are_sorted_by_bound_with_inf_last(self) -> None:
        rows = [
            _bucket("0", "a", "+Inf", 16.0),
            _bucket("0", "a", "1000.0", 10.0),
            _bucket("0", "a", "100.0", 4.0),
            _bucket("0", "b", "100.0", 1.0),  # another service's rows stay its own
            _bucket("0", "b", "+Inf", 1.0),
            _bucket("0t", "a", None, NOW - 5),
        ]
        metrics, gaps = self._assemble(rows)
        mix = metrics["a"].prompt_tokens
        assert mix == LengthBuckets((100.0, 1000.0, math.inf), (4.0, 10.0, 16.0), NOW - 5)
        assert metrics["a"].output_tokens is None and metrics["a"].decode_tps is None
        # b has rows but no current sample.
        assert metrics["b"].prompt_tokens is None
        assert [(g.service, g.reason) for g in gaps] == [
            ("b", "no current sample (series stale: target gone or not scraped)")
        ]

    @pytest.mark.parametrize(
        ("rows", "reason"),
        [
            ([], "no histogram series for role prefill"),
            (
                [_bucket("0", "a", "100.0", math.nan), _bucket("0", "a", "+Inf", 2.0)],
                "a bucket is NaN",
            ),
            (
                [_bucket("0", "a", "100.0", 0.0), _bucket("0", "a", "+Inf", 0.0)],
                "empty: no request finished in the window",
            ),
            (
                [_bucket("0", "a", None, 3.0)],
                "a series without an 'le' label; the query must aggregate by (service, le)",
            ),
            ([_bucket("0", "a", "lots", 3.0)], "le='lots' is not a bucket bound"),
            ([_bucket("0", "a", "NaN", 3.0)], "le='NaN' is not a bucket bound"),
            (
                [_bucket("0", "a", "100.0", 3.0)],
                "no +Inf bucket: requests above the largest bound are not counted",
            ),
        ],
    )
    def test_unusable_histograms_are_missing_with_a_reason(
        self, rows: list[Row], reason: str
    ) -> None:
        metrics, gaps = self._assemble([*rows, _bucket("0t", "a", None, NOW)], [make_policy("a")])
        assert metrics["a"].prompt_tokens is None
        assert [g.reason for g in gaps] == [reason]

    @pytest.mark.parametrize(("age_s", "usable"), [(90.0, True), (90.5, False)])
    def test_age_bound_comes_from_the_policy(self, age_s: float, usable: bool) -> None:
        rows = [_bucket("0", "a", "+Inf", 2.0), _bucket("0t", "a", None, NOW - age_s)]
        metrics, gaps = self._assemble(rows, [make_policy("a")])
        assert (metrics["a"].prompt_tokens is not None) is usable
        assert usable or gaps[0].reason == "stale: newest sample 90 s old > 90 s"

    def test_an_override_may_keep_one_role_but_not_two(self) -> None:
        policies = [make_policy("a", metrics={"queries": {"prompt_tokens": "q"}})]
        one_role = [_bucket("0", "a", "+Inf", 2.0, role="decode")]
        metrics, gaps = self._assemble(one_role, policies)
        assert gaps == ()
        assert metrics["a"].prompt_tokens == LengthBuckets((math.inf,), (2.0,), NOW)
        two_roles = [*one_role, _bucket("0", "a", "+Inf", 3.0, role="prefill")]
        metrics, gaps = self._assemble(two_roles, policies)
        assert metrics["a"].prompt_tokens is None
        assert "aggregate by (service, le)" in gaps[0].reason

    def test_a_failed_mix_query_is_a_gap_for_its_services(self) -> None:
        policies = [make_policy("a")]
        plan, _ = plan_requests(policies, ["decode_tps", "prompt_tokens"], window_s=60)
        outcomes: dict[tuple[SignalName, str], PartOutcome] = {
            ("decode_tps", "0"): [_row("0", "a", "decode", 1.0), _row("0t", "a", "decode", NOW)],
            ("prompt_tokens", "0"): QueryFailed("HTTP 503: busy"),
        }
        metrics, gaps = assemble(plan, outcomes, policies, NOW)
        assert metrics["a"].decode_tps is not None
        assert metrics["a"].prompt_tokens is None
        assert [(g.signal, g.reason) for g in gaps] == [
            ("prompt_tokens", "query failed: HTTP 503: busy")
        ]


@settings(max_examples=300, deadline=None)
@given(now_s=st.floats(0.0, 4e9, allow_nan=False, allow_infinity=False))
def test_a_query_is_evaluated_at_whole_milliseconds_never_after_the_cycles_clock(
    now_s: float,
) -> None:
    """Prometheus keeps milliseconds: rounded to the nearest, a query at 618.91085 s ran
    at 618.911, and its newest sample's timestamp came back after the cycle's clock."""
    text = evaluation_time(now_s)
    assert re.fullmatch(r"\d+\.\d{3}", text)
    assert float(text) <= now_s
    assert now_s - float(text) < 0.0011
    assert evaluation_time(1796502618.91085) == "1796502618.910"

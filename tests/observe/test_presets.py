"""Presets and PromQL rendering: which metric names, labels, units and windows each
signal's query uses. Pure: no Prometheus needed."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from observe_helpers import REPO_ROOT, make_policy

from reconciler.desired import load_desired_state
from reconciler.observe.presets import (
    LENGTH_NAMES,
    LENGTH_PRESETS,
    PRESETS,
    SIGNAL_ROLE,
    CounterRate,
    GaugeAverage,
    HistogramQuantile,
    check_metrics_config,
    dcgm_pod_labels_join,
    format_duration,
    format_number,
    is_label_name,
    recording_rules,
    render_override,
    render_spec,
    services_regex,
    signal_query,
    unrestricted_override_problems,
)
from reconciler.state import METRIC_NAMES


def _query(engine: str, signal: str, **kwargs: object) -> str:
    policy = make_policy("svc", engine=engine, **kwargs)  # type: ignore[arg-type]
    query = signal_query(policy, signal, window_s=60)  # type: ignore[arg-type]
    assert query is not None
    return query.value


class TestPresetCoverage:
    @pytest.mark.parametrize("preset", ["vllm", "sglang", "dynamo"])
    def test_full_engine_presets_cover_every_signal(self, preset: str) -> None:
        assert set(PRESETS[preset]) == set(METRIC_NAMES)

    def test_trtllm_has_no_token_counters_but_latencies_kv_and_dcgm(self) -> None:
        assert set(METRIC_NAMES) - set(PRESETS["trtllm"]) == {
            "prefill_tps",
            "decode_tps",
            "prefill_queue",
            "decode_queue",
            "decode_running",
        }

    def test_every_signal_is_read_from_a_role(self) -> None:
        assert set(SIGNAL_ROLE) == set(METRIC_NAMES)
        assert SIGNAL_ROLE["ttft"] == "prefill" and SIGNAL_ROLE["tbt"] == "decode"


class TestVllmQueries:
    def test_prefill_tps_subtracts_prefix_cache_hits_and_never_goes_negative(self) -> None:
        q = _query("vllm", "prefill_tps")
        assert q.startswith("clamp_min(")
        assert 'rate(vllm:prompt_tokens_total{role="prefill"}[60s])' in q
        assert 'rate(vllm:prefix_cache_hits_total{role="prefill"}[60s])' in q
        # Without a hit counter the subtraction falls back to zero, not to "no value".
        assert "* 0)" in q

    def test_decode_tps_sums_generation_rate_by_service_and_role(self) -> None:
        assert _query("vllm", "decode_tps") == (
            'sum by (service, role) (rate(vllm:generation_tokens_total{role="decode"}[60s])'
            ' or rate(vllm_generation_tokens_total{role="decode"}[60s]))'
        )

    def test_latencies_are_histogram_quantiles_at_the_policy_quantile_in_ms(self) -> None:
        ttft = _query("vllm", "ttft", quantile=0.99)
        assert ttft.startswith("histogram_quantile(0.99, sum by (service, role, le)")
        assert 'vllm:time_to_first_token_seconds_bucket{role="prefill"}[60s]' in ttft
        assert ttft.endswith("* 1000")
        tbt = _query("vllm", "tbt")
        # The inter-token histogram's current name first, its pre-0.11 name as fallback.
        assert tbt.index("vllm:inter_token_latency_seconds_bucket") < tbt.index(
            "vllm:time_per_output_token_seconds_bucket"
        )
        assert 'role="decode"' in tbt

    def test_the_mean_tbt_is_the_histograms_sum_over_its_count_in_ms(self) -> None:
        q = _query("vllm", "tbt_mean")
        assert q.endswith("* 1000")
        # Every name's sums over every name's counts, each pod under the same first
        # name in both unions (never one histogram's sum over another's count).
        names = [
            "vllm:inter_token_latency_seconds",
            "vllm_inter_token_latency_seconds",
            "vllm:time_per_output_token_seconds",
            "vllm_time_per_output_token_seconds",
        ]
        sums, counts = (
            " or ".join(f'rate({name}_{part}{{role="decode"}}[60s])' for name in names)
            for part in ("sum", "count")
        )
        assert q == f"sum by (service, role) ({sums}) / sum by (service, role) ({counts}) * 1000"
        policy = make_policy("svc", engine="vllm")
        query = signal_query(policy, "tbt_mean", window_s=60)
        assert query is not None and query.samples is not None and query.sampled_at is not None
        assert "_count" in query.samples and "_count" in query.sampled_at

    def test_queues_sum_the_waiting_requests_of_each_role(self) -> None:
        for signal, role in (("prefill_queue", "prefill"), ("decode_queue", "decode")):
            q = _query("vllm", signal)
            assert q == (
                f'sum by (service, role) (vllm:num_requests_waiting{{role="{role}"}} * 1'
                f' or vllm_num_requests_waiting{{role="{role}"}} * 1)'
            )
            assert "avg" not in q and "rate(" not in q  # the latest sample, summed
        assert "sglang:num_queue_reqs" in _query("sglang", "prefill_queue")

    def test_decode_running_sums_the_running_requests_of_decode(self) -> None:
        assert _query("vllm", "decode_running") == (
            'sum by (service, role) (vllm:num_requests_running{role="decode"} * 1'
            ' or vllm_num_requests_running{role="decode"} * 1)'
        )
        assert "sglang:num_running_reqs" in _query("sglang", "decode_running")

    def test_kv_usage_prefers_the_v1_gauge(self) -> None:
        q = _query("vllm", "decode_kv_usage")
        assert q.index("vllm:kv_cache_usage_perc") < q.index("vllm:gpu_cache_usage_perc")

    def test_colon_names_also_match_their_underscore_spelling(self) -> None:
        q = _query("vllm", "decode_tps")
        assert "vllm_generation_tokens_total" in q
        assert q.index("vllm:generation_tokens_total") < q.index("vllm_generation_tokens_total")


class TestOtherPresets:
    def test_sglang_names(self) -> None:
        assert "sglang:cached_tokens_total" in _query("sglang", "prefill_tps")
        assert "sglang:inter_token_latency_seconds_bucket" in _query("sglang", "tbt")
        assert "sglang:token_usage" in _query("sglang", "decode_kv_usage")

    def test_dcgm_util_is_converted_from_percent_and_averaged_over_the_window(self) -> None:
        q = _query("vllm", "decode_gpu_util")
        assert q == (
            'avg by (service, role) (avg_over_time(DCGM_FI_DEV_GPU_UTIL{role="decode"}[60s])) * 0.01'
        )
        assert _query("sglang", "prefill_sm_active") == (
            'avg by (service, role) (avg_over_time(DCGM_FI_PROF_SM_ACTIVE{role="prefill"}[60s]))'
        )

    def test_dynamo_reads_vllm_names_with_dynamo_kv_fallback(self) -> None:
        assert "vllm:generation_tokens_total" in _query("dynamo", "decode_tps")
        assert "dynamo_component_kvstats_gpu_cache_usage_percent" in _query(
            "dynamo", "decode_kv_usage"
        )

    def test_trtllm_latency_names_and_missing_tps(self) -> None:
        assert "trtllm_time_to_first_token_seconds_bucket" in _query("trtllm", "ttft")
        policy = make_policy("svc", engine="trtllm")
        assert signal_query(policy, "decode_tps", window_s=60) is None

    def test_preset_can_differ_from_engine(self) -> None:
        policy = make_policy("svc", engine="dynamo", metrics={"preset": "sglang"})
        query = signal_query(policy, "decode_tps", window_s=60)
        assert query is not None and "sglang:generation_tokens_total" in query.value


def _mix(engine: str, histogram: str) -> tuple[str, str]:
    """The value and freshness queries of a request-mix histogram (60 s window)."""
    policy = make_policy("svc", engine=engine)
    query = signal_query(policy, histogram, window_s=60)  # type: ignore[arg-type]
    assert query is not None and query.sampled_at is not None
    return query.value, query.sampled_at


class TestRequestMixQueries:
    def test_every_preset_says_where_its_mix_comes_from(self) -> None:
        assert set(LENGTH_PRESETS) == set(PRESETS)
        for preset in ("vllm", "sglang", "dynamo"):
            assert set(LENGTH_PRESETS[preset]) == set(LENGTH_NAMES)
        assert LENGTH_PRESETS["trtllm"] == {}

    def test_vllm_prompt_lengths_per_bucket_from_prefill_in_both_spellings(self) -> None:
        value, fresh = _mix("vllm", "prompt_tokens")
        assert value == (
            'sum by (service, le) (rate(vllm:request_prompt_tokens_bucket{role="prefill"}[60s])'
            ' or ignoring (le) rate(vllm_request_prompt_tokens_bucket{role="prefill"}[60s]))'
        )
        assert fresh == (
            'min by (service) (timestamp(vllm:request_prompt_tokens_count{role="prefill"})'
            ' or timestamp(vllm_request_prompt_tokens_count{role="prefill"}))'
        )

    def test_vllm_output_lengths_come_from_decode(self) -> None:
        # A prefill instance finishes every request after one token: decode has the lengths.
        value, fresh = _mix("vllm", "output_tokens")
        assert value == (
            'sum by (service, le) (rate(vllm:request_generation_tokens_bucket{role="decode"}[60s])'
            ' or ignoring (le) rate(vllm_request_generation_tokens_bucket{role="decode"}[60s]))'
        )
        assert 'vllm:request_generation_tokens_count{role="decode"}' in fresh

    def test_sglang_reads_its_token_histograms(self) -> None:
        value, _ = _mix("sglang", "prompt_tokens")
        assert value.startswith(
            'sum by (service, le) (rate(sglang:prompt_tokens_histogram_bucket{role="prefill"}[60s])'
        )
        value, fresh = _mix("sglang", "output_tokens")
        assert 'rate(sglang:generation_tokens_histogram_bucket{role="decode"}[60s])' in value
        assert 'rate(sglang_generation_tokens_histogram_bucket{role="decode"}[60s])' in value
        assert "sglang:generation_tokens_histogram_count" in fresh

    def test_dynamo_reads_the_vllm_workers_histograms(self) -> None:
        assert _mix("dynamo", "prompt_tokens") == _mix("vllm", "prompt_tokens")
        assert _mix("dynamo", "output_tokens") == _mix("vllm", "output_tokens")

    def test_trtllm_has_no_mix_unless_overridden(self) -> None:
        policy = make_policy("svc", engine="trtllm")
        assert signal_query(policy, "prompt_tokens", window_s=60) is None
        assert signal_query(policy, "output_tokens", window_s=60) is None
        override = "sum by (service, le) (rate(my_prompt_len_bucket[$__window]))"
        policy = make_policy(
            "svc", engine="trtllm", metrics={"queries": {"prompt_tokens": override}}
        )
        query = signal_query(policy, "prompt_tokens", window_s=30)
        assert query is not None
        assert query.value == "sum by (service, le) (rate(my_prompt_len_bucket[30s]))"
        assert query.sampled_at is None

    def test_custom_labels_and_service_restriction(self) -> None:
        policy = make_policy("svc", metrics={"service_label": "app", "role_label": "pd"})
        query = signal_query(policy, "output_tokens", window_s=60, services=["svc", "b"])
        assert query is not None and query.sampled_at is not None
        assert "sum by (app, le)" in query.value and "min by (app)" in query.sampled_at
        selectors = re.findall(r"\{[^}]*\}", query.value + query.sampled_at)
        assert selectors and all(sel == '{pd="decode", app=~"b|svc"}' for sel in selectors)

    def test_recorded_mode_reads_the_recorded_bucket_rates(self) -> None:
        policy = make_policy("svc")
        query = signal_query(policy, "prompt_tokens", window_s=60, recorded_histograms=True)
        assert query is not None and query.sampled_at is not None
        assert query.value == (
            "sum by (service, le) "
            '(heteroscale:vllm_request_prompt_tokens_bucket:rate60s{role="prefill"})'
        )
        assert "timestamp(vllm:request_prompt_tokens_count" in query.sampled_at

    def test_the_mix_keys_are_valid_query_overrides(self) -> None:
        from reconciler.desired.checks import check_policy

        good = make_policy(
            "svc",
            metrics={
                "queries": {
                    "prompt_tokens": "sum by (service, le) (rate(x_bucket[$__window]))",
                    "output_tokens": "sum by (service, le) (rate(y_bucket[$__window]))",
                }
            },
        )
        assert check_policy(good) == []
        bad = make_policy("svc", metrics={"queries": {"prompt_token": "x"}})
        assert check_policy(bad) == [
            (
                ("metrics", "queries", "prompt_token"),
                "unknown signal 'prompt_token'; did you mean 'prompt_tokens'?",
            )
        ]


class TestLabelsAndOverrides:
    def test_custom_labels_are_used_everywhere(self) -> None:
        policy = make_policy("svc", metrics={"service_label": "app", "role_label": "pd_role"})
        query = signal_query(policy, "ttft", window_s=30)
        assert query is not None
        assert "sum by (app, pd_role, le)" in query.value
        assert '{pd_role="prefill"}' in query.value
        assert query.sampled_at is not None and "min by (app, pd_role)" in query.sampled_at
        assert "service" not in query.value and "role=" not in query.value.replace("pd_role=", "")

    def test_override_replaces_the_preset_and_fills_placeholders(self) -> None:
        policy = make_policy(
            "svc",
            quantile=0.95,
            metrics={
                "queries": {
                    "ttft": "histogram_quantile($__quantile, sum by (service, le) "
                    "(rate(router_ttft_seconds_bucket[$__window]))) * 1000"
                }
            },
        )
        query = signal_query(policy, "ttft", window_s=90)
        assert query is not None
        assert query.value == (
            "histogram_quantile(0.95, sum by (service, le) (rate(router_ttft_seconds_bucket[90s]))) * 1000"
        )
        assert query.sampled_at is None  # overrides are stamped with the evaluation time

    def test_unknown_placeholders_and_label_replace_references_are_left_alone(self) -> None:
        text = 'label_replace(x, "service", "$1", "app", "(.*)") + $__nope'
        assert render_override(text, quantile=0.9, window_s=60).value == text

    def test_freshness_query_reads_raw_sample_timestamps(self) -> None:
        query = render_spec(
            HistogramQuantile(("m",)),
            role="decode",
            quantile=0.5,
            window_s=10,
            service_label="service",
            role_label="role",
        )
        assert query.sampled_at == 'min by (service, role) (timestamp(m_count{role="decode"}))'

    def test_a_gauges_names_are_one_union_of_nameless_series_before_averaging(self) -> None:
        # "* 1" drops the metric name: a pod exporting both names is counted once.
        query = render_spec(
            GaugeAverage(("a", "b"), scale=0.5),
            role="decode",
            quantile=0.5,
            window_s=10,
            service_label="s",
            role_label="r",
        )
        assert query.value == 'avg by (s, r) (a{r="decode"} * 1 or b{r="decode"} * 1) * 0.5'
        assert query.sampled_at == (
            'min by (s, r) (timestamp(a{r="decode"}) or timestamp(b{r="decode"}))'
        )

    def test_a_histograms_names_are_unioned_per_pod_not_per_bucket(self) -> None:
        # "ignoring (le)": a pod exporting both names gives all its buckets from the
        # first, never a mix of two bucket layouts.
        query = render_spec(
            HistogramQuantile(("a", "b")),
            role="decode",
            quantile=0.5,
            window_s=10,
            service_label="s",
            role_label="r",
        )
        assert query.value == (
            'histogram_quantile(0.5, sum by (s, r, le) (rate(a_bucket{r="decode"}[10s])'
            ' or ignoring (le) rate(b_bucket{r="decode"}[10s]))) * 1000'
        )
        assert query.samples == (
            'max by (s, r) (count_over_time(a_count{r="decode"}[10s])'
            ' or count_over_time(b_count{r="decode"}[10s]))'
        )

    def test_counter_without_minus_is_a_plain_sum_of_rates(self) -> None:
        query = render_spec(
            CounterRate(("c_total",)),
            role="prefill",
            quantile=0.5,
            window_s=1.5,
            service_label="s",
            role_label="r",
        )
        assert query.value == 'sum by (s, r) (rate(c_total{r="prefill"}[1500ms]))'

    def test_an_offset_shifts_the_rate_windows_and_their_counts_not_freshness_or_gauges(
        self,
    ) -> None:
        """``offset_s`` ends the rate windows (and their sample counts) that long before
        the evaluation time (``settled_range``); freshness and gauges stay at it."""
        policy = make_policy("svc")
        tps = signal_query(policy, "prefill_tps", window_s=60, offset_s=15)
        assert tps is not None and tps.samples is not None and tps.sampled_at is not None
        assert 'rate(vllm:prompt_tokens_total{role="prefill"}[60s] offset 15s)' in tps.value
        assert 'rate(vllm:prefix_cache_hits_total{role="prefill"}[60s] offset 15s)' in tps.value
        assert "[60s])" not in tps.value  # every window is shifted
        assert 'count_over_time(vllm:prompt_tokens_total{role="prefill"}[60s] offset 15s)' in (
            tps.samples
        )
        assert "offset" not in tps.sampled_at
        ttft = signal_query(policy, "ttft", window_s=10, offset_s=1)
        assert ttft is not None
        assert 'vllm:time_to_first_token_seconds_bucket{role="prefill"}[10s] offset 1s' in (
            ttft.value
        )
        mix = signal_query(policy, "prompt_tokens", window_s=10, offset_s=1.5)
        assert mix is not None and "[10s] offset 1500ms)" in mix.value
        gauge = signal_query(policy, "decode_gpu_util", window_s=60, offset_s=15)
        assert gauge is not None and "offset" not in gauge.value
        unshifted = signal_query(policy, "prefill_tps", window_s=60)
        assert unshifted is not None and "offset" not in unshifted.value

    def test_recording_rules_take_the_offset_too(self) -> None:
        rules = recording_rules(60, offset_s=15)["groups"][0]["rules"]
        records = {rule["record"]: rule["expr"] for rule in rules}
        assert records["heteroscale:vllm_time_to_first_token_seconds_bucket:rate60s"] == (
            "sum by (service, role, le) "
            "(rate(vllm:time_to_first_token_seconds_bucket[60s] offset 15s)"
            " or ignoring (le) rate(vllm_time_to_first_token_seconds_bucket[60s] offset 15s))"
        )


class TestServiceRestriction:
    def test_matcher_on_every_selector(self) -> None:
        policy = make_policy("svc")
        query = signal_query(policy, "prefill_tps", window_s=60, services=["svc", "b"])
        assert query is not None
        selectors = re.findall(r"\{[^}]*\}", query.value)
        assert selectors and all('service=~"b|svc"' in sel for sel in selectors)
        assert query.sampled_at is not None and 'service=~"b|svc"' in query.sampled_at

    def test_names_are_escaped_for_re2_and_promql(self) -> None:
        assert services_regex(["a.b", 'q"z', "c-1"]) == 'a\\\\.b|c-1|q\\"z'

    @given(
        st.lists(
            st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True),
            min_size=1,
            max_size=30,
        )
    )
    @settings(max_examples=20, deadline=None)
    def test_dns_label_names_need_no_escaping(self, names: list[str]) -> None:
        assert services_regex(names) == "|".join(sorted(set(names)))


class TestRecordingRules:
    def test_one_rule_per_histogram_covering_all_its_names(self) -> None:
        rules = recording_rules(60)["groups"][0]["rules"]
        records = {rule["record"]: rule["expr"] for rule in rules}
        assert len(records) == len(rules)  # no record name twice
        assert records["heteroscale:vllm_time_to_first_token_seconds_bucket:rate60s"] == (
            "sum by (service, role, le) (rate(vllm:time_to_first_token_seconds_bucket[60s])"
            " or ignoring (le) rate(vllm_time_to_first_token_seconds_bucket[60s]))"
        )
        # The inter-token histogram's pre-0.11 name is in its record, not in one of its own.
        tbt = records["heteroscale:vllm_inter_token_latency_seconds_bucket:rate60s"]
        assert "vllm:time_per_output_token_seconds_bucket" in tbt
        assert "heteroscale:vllm_time_per_output_token_seconds_bucket:rate60s" not in records
        # trtllm_* and trtllm:* are two spellings of one histogram.
        trt = records["heteroscale:trtllm_time_per_output_token_seconds_bucket:rate60s"]
        assert "trtllm:time_per_output_token_seconds_bucket" in trt

    def test_two_histograms_sharing_a_record_name_must_list_the_same_names(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # One record would otherwise hold one histogram's names and silently drop the
        # other's.
        import reconciler.observe.presets as presets

        clash = {"ttft": HistogramQuantile(("vllm_time_to_first_token_seconds", "other"))}
        monkeypatch.setitem(presets.PRESETS, "clash", clash)
        with pytest.raises(ValueError, match="must list the same names"):
            recording_rules(60)

    def test_the_mean_gap_records_its_sum_and_count_rates_per_service_and_role(self) -> None:
        rules = recording_rules(60)["groups"][0]["rules"]
        records = {rule["record"]: rule["expr"] for rule in rules}
        for part in ("sum", "count"):
            assert records[f"heteroscale:vllm_inter_token_latency_seconds_{part}:rate60s"] == (
                f"sum by (service, role) (rate(vllm:inter_token_latency_seconds_{part}[60s])"
                f" or rate(vllm_inter_token_latency_seconds_{part}[60s])"
                f" or rate(vllm:time_per_output_token_seconds_{part}[60s])"
                f" or rate(vllm_time_per_output_token_seconds_{part}[60s]))"
            )
        policy = make_policy("svc")
        query = signal_query(policy, "tbt_mean", window_s=60, recorded_histograms=True)
        assert query is not None
        assert query.value == (
            "sum by (service, role) "
            '(heteroscale:vllm_inter_token_latency_seconds_sum:rate60s{role="decode"}) '
            "/ sum by (service, role) "
            '(heteroscale:vllm_inter_token_latency_seconds_count:rate60s{role="decode"}) * 1000'
        )
        assert "rate(" not in query.value
        assert query.sampled_at is not None and "_count" in query.sampled_at

    def test_recorded_mode_reads_the_recorded_series_but_raw_freshness(self) -> None:
        policy = make_policy("svc", metrics={"service_label": "app"})
        query = signal_query(policy, "tbt", window_s=60, recorded_histograms=True)
        assert query is not None
        assert (
            'sum by (app, role, le) (heteroscale:vllm_inter_token_latency_seconds_bucket:rate60s{role="decode"})'
            in query.value
        )
        assert "rate(" not in query.value
        assert query.sampled_at is not None
        assert "timestamp(vllm:inter_token_latency_seconds_count" in query.sampled_at

    def test_a_second_group_records_the_request_mix_histograms(self) -> None:
        latency, lengths = recording_rules(60, interval_s=10)["groups"]
        assert latency["name"] == "heteroscale-latency-histograms"
        assert lengths["name"] == "heteroscale-length-histograms"
        assert lengths["interval"] == "10s"
        records = {rule["record"]: rule["expr"] for rule in lengths["rules"]}
        assert records["heteroscale:vllm_request_prompt_tokens_bucket:rate60s"] == (
            "sum by (service, role, le) (rate(vllm:request_prompt_tokens_bucket[60s])"
            " or ignoring (le) rate(vllm_request_prompt_tokens_bucket[60s]))"
        )
        assert set(records) == {
            f"heteroscale:{name}_bucket:rate60s"
            for name in (
                "vllm_request_prompt_tokens",
                "vllm_request_generation_tokens",
                "sglang_prompt_tokens_histogram",
                "sglang_generation_tokens_histogram",
            )
        }

    def test_rules_follow_custom_labels(self) -> None:
        rule = recording_rules(30, service_label="app", role_label="pd", interval_s=15)["groups"][0]
        assert rule["interval"] == "15s"
        assert rule["rules"][0]["expr"].startswith("sum by (app, pd, le) (rate(")


class TestFormatting:
    @given(st.integers(min_value=1, max_value=10**7))
    @settings(max_examples=200, deadline=None)
    def test_durations_are_exact_integers_with_unit(self, millis: int) -> None:
        text = format_duration(millis / 1000)
        match = re.fullmatch(r"(\d+)(ms|s)", text)
        assert match is not None
        value, unit = int(match.group(1)), match.group(2)
        assert (value * 1000 if unit == "s" else value) == millis

    def test_non_positive_duration_is_refused(self) -> None:
        with pytest.raises(ValueError):
            format_duration(0)

    @given(st.floats(min_value=1e-6, max_value=1e6, allow_nan=False))
    @settings(max_examples=200, deadline=None)
    def test_numbers_round_trip(self, value: float) -> None:
        assert float(format_number(value)) == value

    @pytest.mark.parametrize(
        ("name", "ok"),
        [
            ("service", True),
            ("app_kubernetes_io_name", True),
            ("_x", True),
            ("9a", False),
            ("a-b", False),
            ("__name__", False),
            ("", False),
        ],
    )
    def test_label_names(self, name: str, ok: bool) -> None:
        assert is_label_name(name) is ok


class TestCheckMetricsConfig:
    def test_example_policies_have_no_problems(self) -> None:
        for policy in load_desired_state(REPO_ROOT).policies.values():
            assert check_metrics_config(policy) == []

    def test_trtllm_scaling_on_decode_tps_needs_an_override(self) -> None:
        policy = make_policy("svc", engine="trtllm")
        problems = check_metrics_config(policy)
        assert problems == [
            (
                ("scaling", "metric"),
                "the 'trtllm' metrics preset has no source for decode_tps; add metrics.queries.decode_tps",
            )
        ]
        fixed = make_policy(
            "svc",
            engine="trtllm",
            metrics={
                "queries": {
                    "decode_tps": "sum by (service, role) (rate(my_tokens_total[$__window]))"
                }
            },
        )
        assert check_metrics_config(fixed) == []

    def test_bad_labels_and_placeholders_are_reported_with_their_paths(self) -> None:
        policy = make_policy(
            "svc",
            metrics={
                "service_label": "app-name",
                "role_label": "app-name",
                "queries": {"tbt": "x[$__windw]", "ttft": "  "},
            },
        )
        paths = [path for path, _message in check_metrics_config(policy)]
        assert ("metrics", "service_label") in paths
        assert ("metrics", "role_label") in paths
        assert ("metrics", "queries", "tbt") in paths
        assert ("metrics", "queries", "ttft") in paths


class TestUnrestrictedOverrides:
    """An override that selects no service reads every ``service`` value Prometheus
    holds; validate warns, where ``$__services`` or a matcher on the service label
    narrows it."""

    @staticmethod
    def _flagged(query: str, **metrics: object) -> list[str]:
        policy = make_policy("svc", metrics={"queries": {"decode_tps": query}, **metrics})
        return [".".join(map(str, path)) for path, _ in unrestricted_override_problems(policy)]

    @pytest.mark.parametrize(
        "query",
        [
            'sum by (service, role) (rate(tok_total{service=~"$__services"}[$__window]))',
            'sum by (service, role) (rate(tok_total{role="decode", service="svc"}[1m]))',
            "sum by (service, role) (rate(tok_total{service =~ 'svc|other'}[1m]))",
            dcgm_pod_labels_join("DCGM_FI_DEV_GPU_UTIL", "decode", scale=0.01),
        ],
    )
    def test_a_query_narrowed_to_its_services_is_not_flagged(self, query: str) -> None:
        assert self._flagged(query) == []

    @pytest.mark.parametrize(
        "query",
        [
            "sum by (service, role) (rate(tok_total[$__window]))",
            'sum by (service, role) (rate(tok_total{service!="batch"}[1m]))',
            'sum by (service, role) (rate(tok_total{my_service="svc"}[1m]))',
            'label_replace(sum by (app, role) (rate(tok_total[1m])), "service", "$1", '
            '"app", "(.*)")',
        ],
    )
    def test_a_query_that_selects_no_service_is_flagged_at_its_field(self, query: str) -> None:
        assert self._flagged(query) == ["metrics.queries.decode_tps"]

    def test_the_policy_s_own_service_label_is_the_one_matched(self) -> None:
        query = 'sum by (app, role) (rate(tok_total{app="svc"}[1m]))'
        assert self._flagged(query, service_label="app") == []
        assert self._flagged(query) == ["metrics.queries.decode_tps"]
        (problem,) = unrestricted_override_problems(
            make_policy("svc", metrics={"queries": {"decode_tps": "x"}, "service_label": "app"})
        )
        assert problem[1].endswith('restrict it with {app=~"$__services"}')

    def test_the_example_policies_carry_no_unrestricted_override(self) -> None:
        for policy in load_desired_state(REPO_ROOT).policies.values():
            assert unrestricted_override_problems(policy) == []

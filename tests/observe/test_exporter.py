"""The simulated-fleet exporter: deterministic counters and histograms under engine
names, and the reference ``histogram_quantile``. No Prometheus needed."""

from __future__ import annotations

import math

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.observe.exporter import (
    VLLM_ITL_BUCKETS_S,
    FleetExporter,
    InstanceLoad,
    Lognormal,
    bucket_quantile,
    expected_histogram_quantile_s,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(exporter: FleetExporter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(exporter.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(exporter: FleetExporter, name: str, **labels: str) -> float:
    matches = [
        v
        for (n, ls), v in samples(exporter).items()
        if n == name and labels.items() <= dict(ls).items()
    ]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


class TestCounters:
    def test_counters_grow_at_the_configured_rates(self) -> None:
        clock = Clock()
        exporter = FleetExporter(clock=clock)
        exporter.set_load(
            "svc", "prefill", "p0", InstanceLoad(prompt_tps=1000, cached_prompt_tps=250)
        )
        clock.now += 10
        assert value(exporter, "vllm:prompt_tokens_total", instance="p0") == 10_000
        assert value(exporter, "vllm:prefix_cache_hits_total", instance="p0") == 2_500
        assert value(exporter, "vllm:prefix_cache_queries_total", instance="p0") == 10_000

    def test_changing_the_load_continues_from_the_current_totals(self) -> None:
        clock = Clock()
        exporter = FleetExporter(clock=clock)
        exporter.set_load("svc", "decode", "d0", InstanceLoad(generation_tps=100))
        clock.now += 10
        exporter.set_load("svc", "decode", "d0", InstanceLoad(generation_tps=10))
        clock.now += 10
        assert value(exporter, "vllm:generation_tokens_total") == 1_100

    @given(st.lists(st.tuples(st.floats(0, 5000), st.floats(0, 100)), min_size=1, max_size=20))
    @settings(max_examples=50, deadline=None)
    def test_counters_are_the_integral_of_the_rates_and_never_decrease(
        self, steps: list[tuple[float, float]]
    ) -> None:
        clock = Clock()
        exporter = FleetExporter(clock=clock)
        expected, previous = 0.0, 0.0
        for rate, duration in steps:
            exporter.set_load("svc", "decode", "d0", InstanceLoad(generation_tps=rate))
            clock.now += duration
            expected += rate * duration
            current = value(exporter, "vllm:generation_tokens_total")
            assert current >= previous
            assert current == pytest.approx(expected, rel=1e-9, abs=1e-6)
            previous = current

    def test_sglang_names(self) -> None:
        clock = Clock()
        exporter = FleetExporter(clock=clock)
        exporter.set_load(
            "svc", "decode", "d0", InstanceLoad(generation_tps=5, kv_usage=0.25), engine="sglang"
        )
        clock.now += 2
        assert value(exporter, "sglang:generation_tokens_total") == 10
        assert value(exporter, "sglang:token_usage") == 0.25
        assert not any(name.startswith("vllm:") for name, _ in samples(exporter))


class TestHistogramsAndGauges:
    def test_buckets_are_cumulative_expected_counts(self) -> None:
        clock = Clock()
        tbt = Lognormal.from_median_p90(0.03, 0.05)
        exporter = FleetExporter(clock=clock)
        exporter.set_load("svc", "decode", "d0", InstanceLoad(generation_tps=100, tbt=tbt))
        clock.now += 10
        buckets = [
            value(exporter, "vllm:time_per_output_token_seconds_bucket", le=repr(le))
            for le in VLLM_ITL_BUCKETS_S
        ]
        assert buckets == sorted(buckets)
        assert buckets[2] == pytest.approx(1000 * tbt.cdf(0.05))
        assert value(exporter, "vllm:time_per_output_token_seconds_count") == pytest.approx(1000)
        assert value(exporter, "vllm:time_per_output_token_seconds_sum") == pytest.approx(
            1000 * tbt.mean_s
        )

    def test_inter_token_metric_name_is_configurable(self) -> None:
        exporter = FleetExporter(clock=Clock(), vllm_tbt_metric="vllm:inter_token_latency_seconds")
        exporter.set_load("svc", "decode", "d0", InstanceLoad(tbt=Lognormal(0.02, 0.3)))
        names = {name for name, _ in samples(exporter)}
        assert "vllm:inter_token_latency_seconds_count" in names
        assert "vllm:time_per_output_token_seconds_count" not in names

    def test_dcgm_series_per_gpu(self) -> None:
        exporter = FleetExporter(clock=Clock())
        exporter.set_load(
            "svc", "prefill", "p0", InstanceLoad(gpus=4, gpu_util_pct=55, sm_active=0.4)
        )
        keys = [labels for name, labels in samples(exporter) if name == "DCGM_FI_DEV_GPU_UTIL"]
        assert sorted(dict(k)["gpu"] for k in keys) == ["0", "1", "2", "3"]
        assert value(exporter, "DCGM_FI_PROF_SM_ACTIVE", gpu="2") == 0.4

    def test_removed_instances_stop_exporting(self) -> None:
        exporter = FleetExporter(clock=Clock())
        exporter.set_load("svc", "decode", "d0", InstanceLoad(kv_usage=0.1))
        exporter.remove("svc", "decode", "d0")
        assert samples(exporter) == {}

    def test_loads_are_validated(self) -> None:
        with pytest.raises(ValueError):
            InstanceLoad(prompt_tps=10, cached_prompt_tps=20)
        with pytest.raises(ValueError):
            InstanceLoad(generation_tps=-1)
        with pytest.raises(ValueError):
            Lognormal.from_median_p90(0.5, 0.4)


class TestExposition:
    def test_fast_text_rendering_equals_prometheus_clients(self) -> None:
        clock = Clock()
        exporter = FleetExporter(clock=clock)
        exporter.set_load(
            "a",
            "prefill",
            "p0",
            InstanceLoad(
                prompt_tps=3,
                requests_per_s=1,
                ttft=Lognormal(0.2, 0.4),
                gpus=2,
                gpu_util_pct=40,
                sm_active=0.3,
            ),
        )
        exporter.set_load(
            "a",
            "decode",
            "d0",
            InstanceLoad(generation_tps=7, tbt=Lognormal(0.02, 0.3), kv_usage=0.4),
        )
        exporter.set_load(
            'b"\\',
            "decode",
            "d1",
            InstanceLoad(generation_tps=7, tbt=Lognormal(0.02, 0.3)),
            engine="sglang",
        )
        clock.now += 12.5

        def parsed(text: str) -> dict[str, list[tuple[str, tuple[tuple[str, str], ...], float]]]:
            out = {}
            for family in text_string_to_metric_families(text):
                out[f"{family.name} {family.type} {family.documentation}"] = sorted(
                    (s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples
                )
            return out

        assert parsed(exporter.render().decode()) == parsed(
            generate_latest(exporter.registry).decode()
        )


class TestServing:
    def test_serves_colon_names_in_the_classic_text_format_whatever_is_asked(self) -> None:
        with FleetExporter() as exporter:
            exporter.set_load("svc", "decode", "d0", InstanceLoad(generation_tps=1))
            exporter.start()
            body = requests.get(
                f"http://{exporter.address}/metrics",
                headers={"Accept": "application/openmetrics-text; version=1.0.0"},
                timeout=5,
            ).text
        assert "vllm:generation_tokens_total{" in body

    def test_openmetrics_negotiation_reproduces_client_pythons_underscore_escaping(self) -> None:
        with FleetExporter(negotiate_openmetrics=True) as exporter:
            exporter.set_load("svc", "decode", "d0", InstanceLoad(generation_tps=1))
            exporter.start()
            body = requests.get(
                f"http://{exporter.address}/metrics",
                headers={"Accept": "application/openmetrics-text; version=1.0.0"},
                timeout=5,
            ).text
        assert "vllm_generation_tokens_total{" in body


class TestReferenceQuantile:
    def test_interpolates_inside_the_bucket_holding_the_rank(self) -> None:
        # 10 below 0.1, 50 in (0.1, 0.5], 30 in (0.5, 1], 10 above 1.
        assert bucket_quantile(0.75, (0.1, 0.5, 1.0), (10, 60, 90, 100)) == pytest.approx(0.75)
        assert bucket_quantile(0.05, (0.1, 0.5, 1.0), (10, 60, 90, 100)) == pytest.approx(0.05)

    def test_the_inf_bucket_answers_with_the_highest_finite_bound(self) -> None:
        assert bucket_quantile(0.95, (0.1, 0.5, 1.0), (10, 60, 90, 100)) == 1.0

    def test_no_observations_is_nan(self) -> None:
        assert math.isnan(bucket_quantile(0.5, (1.0,), (0, 0)))

    @given(st.floats(0.005, 0.5), st.floats(1.2, 3.0), st.floats(0.05, 0.95))
    @settings(max_examples=100, deadline=None)
    def test_expected_quantile_lies_in_the_bucket_of_the_true_quantile(
        self, median_s: float, spread: float, q: float
    ) -> None:
        dist = Lognormal.from_median_p90(median_s, median_s * spread)
        estimate = expected_histogram_quantile_s(q, VLLM_ITL_BUCKETS_S, [(1.0, dist)])
        truth = dist.quantile_s(q)
        bounds = (0.0, *VLLM_ITL_BUCKETS_S, math.inf)
        low = max(b for b in bounds if b <= truth)
        high = min(b for b in bounds if b >= truth)
        assert low <= estimate <= min(high, VLLM_ITL_BUCKETS_S[-1])

"""One service whose pods export a signal under different names, scraped by a real
Prometheus: a fleet mid-upgrade (vLLM renamed its inter-token histogram and its KV
gauge), or pods whose colons were escaped to ``_`` by an OpenMetrics scrape. Each pod
counts once, under the first name it exports, and no pod is left out because another
exports another name. Read raw and through the recording rules: the same answers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial

import pytest
from observe_helpers import (
    RATE_WINDOW_S,
    RECORDING_LAG_S,
    WINDOW_OFFSET_S,
    TextExporter,
    make_policy,
    scraping,
    settings_for,
)

from reconciler.observe.local_prometheus import LocalPrometheus
from reconciler.observe.presets import recording_rules
from reconciler.observe.prometheus import PrometheusMetricsSource

pytestmark = pytest.mark.prometheus

SERVICE = "mixed"
BOUNDS_S = ("0.025", "0.05", "0.1", "0.5", "+Inf")
GAPS_PER_S = 10.0  # inter-token gaps each decode pod observes a second


def _histogram(
    name: str, pod: str, gap_s: float, bounds: tuple[str, ...], age_s: float
) -> list[str]:
    """One decode pod's gap histogram: ``GAPS_PER_S`` a second, each ``gap_s`` long."""
    count = GAPS_PER_S * age_s
    labels = f'service="{SERVICE}",role="decode",pod="{pod}"'
    lines = [
        f'{name}_bucket{{{labels},le="{le}"}} {count if le == "+Inf" or gap_s <= float(le) else 0.0}'
        for le in bounds
    ]
    return [*lines, f"{name}_count{{{labels}}} {count}", f"{name}_sum{{{labels}}} {count * gap_s}"]


def _mixed_fleet_text(started_s: float) -> str:
    """Five decode pods of one service behind one ``/metrics`` (Prometheus honours
    their ``pod`` labels):

    - generated tokens: pods a-d export ``vllm_generation_tokens_total`` (an escaped
      scrape) at 100 tok/s each; pod e, ``vllm:generation_tokens_total`` at 1 tok/s;
    - KV usage: a-c only ``vllm:kv_cache_usage_perc`` (0.9), d only the V0 name
      ``vllm:gpu_cache_usage_perc`` (0.3), e both (0.6 under either);
    - inter-token gaps: a only the current name (20 ms gaps), b only the pre-0.11 name
      (80 ms), c both, 40 ms under the current name and 400 ms under the old one with a
      bucket layout of its own (an engine whose two histograms differ).
    """
    age_s = time.time() - started_s
    lines = []
    for pod, name, tps in (
        *((pod, "vllm_generation_tokens_total", 100.0) for pod in "abcd"),
        ("e", "vllm:generation_tokens_total", 1.0),
    ):
        lines.append(f'{name}{{service="{SERVICE}",role="decode",pod="{pod}"}} {tps * age_s}')
    for pod, name, usage in (
        ("a", "vllm:kv_cache_usage_perc", 0.9),
        ("b", "vllm:kv_cache_usage_perc", 0.9),
        ("c", "vllm:kv_cache_usage_perc", 0.9),
        ("d", "vllm:gpu_cache_usage_perc", 0.3),
        ("e", "vllm:kv_cache_usage_perc", 0.6),
        ("e", "vllm:gpu_cache_usage_perc", 0.6),
    ):
        lines.append(f'{name}{{service="{SERVICE}",role="decode",pod="{pod}"}} {usage}')
    current, old = "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"
    lines += _histogram(current, "a", 0.02, BOUNDS_S, age_s)
    lines += _histogram(old, "b", 0.08, BOUNDS_S, age_s)
    lines += _histogram(current, "c", 0.04, BOUNDS_S, age_s)
    lines += _histogram(old, "c", 0.4, ("0.3", "1", "+Inf"), age_s)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def mixed_prometheus() -> Iterator[LocalPrometheus]:
    fleet = TextExporter(partial(_mixed_fleet_text, time.time()))
    rules = recording_rules(RATE_WINDOW_S, offset_s=WINDOW_OFFSET_S)
    # A covered rate window, its offset, and the rules' first evaluations over it.
    settle_s = RATE_WINDOW_S + WINDOW_OFFSET_S + RECORDING_LAG_S + 2.0
    with scraping(fleet, settle_s=settle_s, rules=rules) as prometheus:
        yield prometheus


@pytest.mark.parametrize("recorded", [False, True], ids=["raw", "recorded"])
def test_every_pod_counts_once_under_the_first_name_it_exports(
    mixed_prometheus: LocalPrometheus, recorded: bool
) -> None:
    settings = settings_for(mixed_prometheus.url, recorded_histograms=recorded)
    with PrometheusMetricsSource(settings) as source:
        metrics = source.fetch([make_policy(SERVICE, quantile=0.5)], time.time())[SERVICE]

    # 400 + 1 tok/s: the one pod exporting the colon spelling no longer replaces the
    # four that export the escaped one (which read 1 tok/s: a scale-in).
    assert metrics.decode_tps is not None
    assert metrics.decode_tps.value == pytest.approx(401.0, rel=0.1)
    # (3 x 0.9 + 0.3 + 0.6) / 5 pods: pod e once, pod d not left out.
    assert metrics.decode_kv_usage is not None
    assert metrics.decode_kv_usage.value == pytest.approx(0.72)
    # Mean gap (20 + 80 + 40) / 3 ms: pod c's sum and count both under its current name.
    assert metrics.tbt_mean is not None
    assert metrics.tbt_mean.value == pytest.approx(140.0 / 3.0, rel=0.01)
    # Median of a's, b's and c's gaps, interpolated in the (25, 50] ms bucket as
    # histogram_quantile does: rank 15 of 30 requests a second, 10 below 25 ms.
    assert metrics.tbt is not None
    assert metrics.tbt.value == pytest.approx(37.5, rel=0.01)

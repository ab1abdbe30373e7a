"""One service whose pods export a signal under different names, scraped by a real
Prometheus: a fleet mid-upgrade (vLLM renamed its inter-token histogram and its KV
gauge), or pods whose colons were escaped to ``_`` by an OpenMetrics scrape. Each pod
counts once, under the first name it exports, and no pod is left out because another
exports another name. Read raw and through the recording rules: the same answers."""

from __future__ import annotations

import time

import pytest
from observe_helpers import (
    RATE_WINDOW_S,
    RECORDING_LAG_S,
    WINDOW_OFFSET_S,
    PrometheusStack,
    make_policy,
    settings_for,
)
from written_engines import MIXED_SERVICE as SERVICE

from reconciler.observe.prometheus import PrometheusMetricsSource

pytestmark = pytest.mark.prometheus


@pytest.mark.parametrize("recorded", [False, True], ids=["raw", "recorded"])
def test_every_pod_counts_once_under_the_first_name_it_exports(
    prometheus_stack: PrometheusStack, recorded: bool
) -> None:
    # A covered rate window, its offset, and the rules' first evaluations over it.
    prometheus_stack.wait_written_scraped_for(
        RATE_WINDOW_S + WINDOW_OFFSET_S + RECORDING_LAG_S + 2.0
    )
    settings = settings_for(prometheus_stack.url, recorded_histograms=recorded)
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

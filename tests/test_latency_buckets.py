"""Latency histogram bounds: which bucket a histogram_quantile reading lies in, and
which bounds a policy's readings come through (reconciler.latency_buckets)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from reconciler.desired import load_desired_state
from reconciler.latency_buckets import (
    SGLANG_ITL_BUCKETS_S,
    VLLM_ITL_BUCKETS_S,
    VLLM_TTFT_BUCKETS_S,
    bucket_around,
    policy_latency_buckets,
    reading_holds_slo,
    reading_likely_meets_slo,
    reading_meets_slo,
)


@pytest.mark.parametrize(
    ("value_s", "bucket"),
    [
        (0.0475, (0.025, 0.05)),  # vLLM's p90 reading of any step in (25, 50] ms
        (0.05, (0.025, 0.05)),  # on a bound: the rank is at the top of that bucket
        (0.005, (0.0, 0.01)),  # below the first bound
        (80.0, (40.0, math.inf)),  # the last bound: PromQL's answer for the +Inf bucket too
        (100.0, (80.0, math.inf)),
    ],
)
def test_a_reading_lies_in_the_bucket_that_holds_it(
    value_s: float, bucket: tuple[float, float]
) -> None:
    assert bucket_around(value_s, VLLM_ITL_BUCKETS_S) == bucket


@pytest.mark.parametrize(
    ("value_ms", "slo_ms", "holds"),
    [
        (23.5, 20.0, True),  # any step in (10, 25] ms reads 23.5: met or missed alike
        (11.0, 20.0, True),
        (47.5, 50.0, False),  # the SLO is the bucket's upper bound: met whatever it reads
        (30.0, 20.0, False),  # (25, 50] lies wholly above the SLO: a miss
        (9.0, 20.0, False),  # (0, 10] lies wholly below: met
        (25.0, 25.0, False),  # on a bound: the rank is at the top of (10, 25]
    ],
)
def test_a_reading_holds_the_slo_only_where_its_bucket_straddles_it(
    value_ms: float, slo_ms: float, holds: bool
) -> None:
    assert reading_holds_slo(value_ms, slo_ms, VLLM_ITL_BUCKETS_S) is holds


def test_each_engine_reads_through_its_own_bounds_and_overrides_through_none(
    repo_root: Path,
) -> None:
    state = load_desired_state(repo_root)
    chat, summarize = state.policies["chat"], state.policies["summarize"]
    assert chat.engine == "vllm" and summarize.engine == "sglang"
    assert policy_latency_buckets(chat, "tbt") == VLLM_ITL_BUCKETS_S
    assert policy_latency_buckets(summarize, "tbt") == SGLANG_ITL_BUCKETS_S
    assert policy_latency_buckets(summarize, "ttft") == VLLM_TTFT_BUCKETS_S
    trtllm = chat.model_copy(update={"engine": "trtllm"})
    assert policy_latency_buckets(trtllm, "tbt") is None
    metrics = chat.metrics.model_copy(update={"queries": {"tbt": "my_tbt_ms"}})
    overridden = chat.model_copy(update={"metrics": metrics})
    assert policy_latency_buckets(overridden, "tbt") is None
    assert policy_latency_buckets(overridden, "ttft") == VLLM_TTFT_BUCKETS_S


def test_a_reading_meets_the_slo_only_where_its_whole_bucket_does() -> None:
    """A p90 read as 0.9 s lies in vLLM's (0.75, 1.0] s bucket: it meets a 1.5 s SLO
    wherever in the bucket it truly is; read as 1.1 s, in (1.0, 2.5], it may not."""
    assert reading_meets_slo(900.0, 1500.0, VLLM_TTFT_BUCKETS_S)
    assert reading_meets_slo(900.0, 1000.0, VLLM_TTFT_BUCKETS_S)  # the edge is within
    assert not reading_meets_slo(1100.0, 1500.0, VLLM_TTFT_BUCKETS_S)
    assert reading_meets_slo(1100.0, 1500.0, None) and not reading_meets_slo(1600.0, 1500.0, None)


def test_a_reading_likely_meets_the_slo_where_its_bucket_does_or_it_does_within_one_around_it() -> (
    None
):
    """Read as 1.1 s, in (1.0, 2.5] around a 1.5 s SLO, a p90 likely meets it (a tail
    thinning out across the bucket reads high); read as 1.8 s, likely not. A reading in
    a bucket wholly above the SLO never does, one in a bucket wholly within it always."""
    assert reading_likely_meets_slo(1100.0, 1500.0, VLLM_TTFT_BUCKETS_S)
    assert not reading_likely_meets_slo(1800.0, 1500.0, VLLM_TTFT_BUCKETS_S)
    assert reading_likely_meets_slo(900.0, 1500.0, VLLM_TTFT_BUCKETS_S)
    assert not reading_likely_meets_slo(2600.0, 2500.0, VLLM_TTFT_BUCKETS_S)
    assert not reading_likely_meets_slo(1100.0, 1000.0, VLLM_TTFT_BUCKETS_S)
    assert reading_likely_meets_slo(1400.0, 1500.0, None)
    assert not reading_likely_meets_slo(1600.0, 1500.0, None)

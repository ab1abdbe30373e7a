"""The latency histogram bounds the engines export, in one place: the exporter that plays
engines for the tests, the simulator that reads its quantiles as Prometheus would, and
the planner that must know how coarse a quantile it reads is.

A quantile read through ``histogram_quantile`` is only known to lie in the bucket that
holds its rank: inside the bucket PromQL interpolates linearly, so when every token's
gap is 30 ms, vLLM's p90 reads 47.5 ms (``0.025 + 0.9 x (0.05 - 0.025)``). Whoever
compares such a reading with a prediction must compare buckets, not values
(:func:`bucket_around`).
"""

from __future__ import annotations

import bisect
import math
from typing import Literal

from reconciler.desired.models import ServicePolicy

# Bucket bounds (seconds) as the engines ship them (vLLM V1, ``vllm/v1/metrics/loggers.py``,
# and SGLang defaults), +Inf implied.
VLLM_TTFT_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
VLLM_ITL_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
SGLANG_ITL_BUCKETS_S: tuple[float, ...] = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040,
    0.060, 0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0,
)  # fmt: skip

LatencySignal = Literal["ttft", "tbt"]


def one_two_five_buckets(max_tokens: float) -> tuple[float, ...]:
    """Bucket upper bounds 1, 2, 5, 10, 20, 50, ... up to ``max_tokens``: the shape vLLM
    gives its token-count histograms (``build_1_2_5_buckets(max_model_len)``)."""
    bounds: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = float(mantissa * 10**exponent)
            if value > max_tokens:
                return tuple(bounds)
            bounds.append(value)
        exponent += 1


# Per preset (``metrics.preset``, default the engine): TTFT and TBT bounds. SGLang's
# TTFT histogram uses vLLM's bounds; Dynamo passes its vLLM workers' histograms
# through; TensorRT-LLM's bounds are not known here (its reading is taken as exact).
_BOUNDS: dict[str, dict[LatencySignal, tuple[float, ...]]] = {
    "vllm": {"ttft": VLLM_TTFT_BUCKETS_S, "tbt": VLLM_ITL_BUCKETS_S},
    "dynamo": {"ttft": VLLM_TTFT_BUCKETS_S, "tbt": VLLM_ITL_BUCKETS_S},
    "sglang": {"ttft": VLLM_TTFT_BUCKETS_S, "tbt": SGLANG_ITL_BUCKETS_S},
}


def policy_latency_buckets(
    policy: ServicePolicy, signal: LatencySignal
) -> tuple[float, ...] | None:
    """The bounds a policy's ``signal`` is read through, or None when unknown (an
    engine whose bounds are not known here, or a query override: the user's PromQL
    may read anything)."""
    if signal in policy.metrics.queries:
        return None
    return _BOUNDS.get(policy.metrics.preset or policy.engine, {}).get(signal)


def engine_latency_buckets(engine: str, signal: LatencySignal) -> tuple[float, ...]:
    """The bounds an engine exports ``signal`` with (vLLM's where not known)."""
    return _BOUNDS.get(engine, _BOUNDS["vllm"])[signal]


def bucket_around(value_s: float, bounds: tuple[float, ...]) -> tuple[float, float]:
    """The bucket ``(lower, upper]`` a ``histogram_quantile`` reading lies in: the rank
    fell in it, and PromQL interpolated. Below the first bound the lower edge is 0; a
    reading at the last finite bound may also mean the +Inf bucket (PromQL returns that
    bound for it), so its upper edge is infinite."""
    if value_s >= bounds[-1]:
        return bounds[-1] if value_s > bounds[-1] else bounds[-2], math.inf
    index = bisect.bisect_left(bounds, value_s)
    lower = bounds[index - 1] if index > 0 else 0.0
    return lower, bounds[index]


def reading_holds_slo(value_ms: float, slo_ms: float, bounds: tuple[float, ...]) -> bool:
    """Whether a ``histogram_quantile`` reading of ``value_ms`` lies in a bucket that
    holds ``slo_ms`` strictly inside: the true quantile may then be on either side of
    the SLO, and the reading cannot tell a tail that meets it from one that misses."""
    lower_s, upper_s = bucket_around(value_ms / 1000.0, bounds)
    return lower_s * 1000.0 < slo_ms < upper_s * 1000.0


def reading_meets_slo(value_ms: float, slo_ms: float, bounds: tuple[float, ...] | None) -> bool:
    """Whether a ``histogram_quantile`` reading of ``value_ms`` meets ``slo_ms`` wherever
    in its bucket the true quantile lies (the bucket's upper edge is within it); with
    unknown ``bounds`` the reading is taken as exact."""
    if bounds is None:
        return value_ms <= slo_ms
    return bucket_around(value_ms / 1000.0, bounds)[1] <= slo_ms / 1000.0


def reading_likely_meets_slo(
    value_ms: float, slo_ms: float, bounds: tuple[float, ...] | None
) -> bool:
    """Whether a ``histogram_quantile`` reading of ``value_ms`` says its quantile meets
    ``slo_ms``: its whole bucket does (``reading_meets_slo``), or its bucket holds the
    SLO (``reading_holds_slo``) and the reading itself is within it.

    Inside a bucket ``histogram_quantile`` interpolates as if the latencies were spread
    evenly over it. A TTFT tail (set by the prompt lengths' tail) thins out across a
    wide bucket (most of its requests sit near the lower edge), so the cumulative share
    rises faster than that straight line, and the interpolated quantile lies above the
    true one: a reading below the SLO in a bucket that straddles it is the likelier
    side, not a coin toss. For the TTFT only: inter-token gaps gather at the decode step
    time, wherever in the bucket it is, and their interpolated reading tells nothing."""
    if reading_meets_slo(value_ms, slo_ms, bounds):
        return True
    return (
        bounds is not None and reading_holds_slo(value_ms, slo_ms, bounds) and (value_ms <= slo_ms)
    )


__all__ = [
    "SGLANG_ITL_BUCKETS_S",
    "VLLM_ITL_BUCKETS_S",
    "VLLM_TTFT_BUCKETS_S",
    "bucket_around",
    "engine_latency_buckets",
    "policy_latency_buckets",
    "reading_holds_slo",
    "reading_likely_meets_slo",
    "reading_meets_slo",
]

"""Engines whose ``/metrics`` are written by hand, scraped by the session's Prometheus
(``conftest.prometheus_stack``) from its start, so that their rate windows fill while
the other tests run (one settle wait for every module, not one each):

- a service mid-upgrade whose pods export one signal under different names
  (``test_prometheus_mixed_names``);
- hostile engines and a flood of other ``service`` values
  (``test_prometheus_hostile_engines``).

Each text is a function of the time its exporter started, so its counters grow.
"""

from __future__ import annotations

import time

from reconciler.state import MAX_LENGTH_BUCKETS

# ---------------------------------------------------------------- a fleet mid-upgrade

MIXED_SERVICE = "mixed"
BOUNDS_S = ("0.025", "0.05", "0.1", "0.5", "+Inf")
GAPS_PER_S = 10.0  # inter-token gaps each decode pod observes a second


def _gap_histogram(
    name: str, pod: str, gap_s: float, bounds: tuple[str, ...], age_s: float
) -> list[str]:
    """One decode pod's gap histogram: ``GAPS_PER_S`` a second, each ``gap_s`` long."""
    count = GAPS_PER_S * age_s
    labels = f'service="{MIXED_SERVICE}",role="decode",pod="{pod}"'
    lines = [
        f'{name}_bucket{{{labels},le="{le}"}} {count if le == "+Inf" or gap_s <= float(le) else 0.0}'
        for le in bounds
    ]
    return [*lines, f"{name}_count{{{labels}}} {count}", f"{name}_sum{{{labels}}} {count * gap_s}"]


def mixed_fleet_text(started_s: float) -> str:
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
        lines.append(f'{name}{{service="{MIXED_SERVICE}",role="decode",pod="{pod}"}} {tps * age_s}')
    for pod, name, usage in (
        ("a", "vllm:kv_cache_usage_perc", 0.9),
        ("b", "vllm:kv_cache_usage_perc", 0.9),
        ("c", "vllm:kv_cache_usage_perc", 0.9),
        ("d", "vllm:gpu_cache_usage_perc", 0.3),
        ("e", "vllm:kv_cache_usage_perc", 0.6),
        ("e", "vllm:gpu_cache_usage_perc", 0.6),
    ):
        lines.append(f'{name}{{service="{MIXED_SERVICE}",role="decode",pod="{pod}"}} {usage}')
    current, old = "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"
    lines += _gap_histogram(current, "a", 0.02, BOUNDS_S, age_s)
    lines += _gap_histogram(old, "b", 0.08, BOUNDS_S, age_s)
    lines += _gap_histogram(current, "c", 0.04, BOUNDS_S, age_s)
    lines += _gap_histogram(old, "c", 0.4, ("0.3", "1", "+Inf"), age_s)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- hostile engines, a flood

HOSTILE = "mix-hostile"
BYSTANDER = "mix-bystander"
HOSTILE_LE = "\x1b[2J\u202e" + "A" * 10_000
TRUNCATED = "mix-truncated"
MANY_BUCKETS = "mix-many-buckets"
BOUNDS = ("128", "1024", "+Inf")


def _prompt_histogram(service: str, bounds: tuple[str, ...], requests: int) -> list[str]:
    """vLLM's prompt-length histogram of one prefill pod, ``requests`` observations in
    each bucket's share (cumulative), in the text exposition format."""
    name = "vllm:request_prompt_tokens"
    labels = f'service="{service}",role="prefill"'
    lines = [
        f'{name}_bucket{{{labels},le="{le}"}} {requests * (i + 1)}' for i, le in enumerate(bounds)
    ]
    lines += [f"{name}_count{{{labels}}} {requests * len(bounds)}", f"{name}_sum{{{labels}}} 0"]
    return lines


def _engines_text(started_s: float) -> str:
    """One ``/metrics`` for every service; its counters grow ten a second."""
    requests = int((time.time() - started_s) * 10)
    lines = _prompt_histogram(BYSTANDER, BOUNDS, requests)
    lines += _prompt_histogram(HOSTILE, ("128", HOSTILE_LE, "+Inf"), requests)
    lines += _prompt_histogram(TRUNCATED, ("128", "1024"), requests)
    many = (*(str(2 * k) for k in range(1, MAX_LENGTH_BUCKETS + 1)), "+Inf")
    lines += _prompt_histogram(MANY_BUCKETS, many, requests)
    return "\n".join(lines) + "\n"


# Two services asked about, among a flood of other ``service`` values: someone else's
# workloads, or a label whoever runs a pod may write. The answer cap is scaled down
# with the flood: 32 MiB is to some 100,000 values what 256 KiB is to 3,000.
FLOODED = ("flooded-a", "flooded-b")
FLOOD_VALUES = 3_000
FLOOD_ANSWER_BYTES = 256 * 1024


def _flooded_text(started_s: float) -> str:
    """One decode counter per ``service`` value, ten tokens a second each."""
    tokens = int((time.time() - started_s) * 10)
    services = (*FLOODED, *(f"other-{i}" for i in range(FLOOD_VALUES)))
    return "".join(
        f'vllm:generation_tokens_total{{service="{service}",role="decode"}} {tokens}\n'
        for service in services
    )


def hostile_and_flooded_text(started_s: float) -> str:
    return _engines_text(started_s) + _flooded_text(started_s)

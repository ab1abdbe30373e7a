"""Where each signal comes from in Prometheus: engine presets and PromQL rendering.

Pure code: no network. ``reconciler.observe.prometheus`` batches what is rendered here.

Signals and the role they are read from
---------------------------------------
Every signal of ``reconciler.state.ServiceMetrics`` is read from one role's series:

============================  =======  ==================================================
signal                        role     meaning (unit)
============================  =======  ==================================================
``prefill_tps``               prefill  prompt tokens/s that missed the prefix cache, summed
``decode_tps``                decode   generated tokens/s, summed over instances
``ttft``                      prefill  time to first token at the SLO quantile (ms)
``tbt``                       decode   time between tokens at the SLO quantile (ms)
``prefill_gpu_util``          prefill  DCGM GPU utilisation averaged over GPUs (0..1)
``decode_gpu_util``           decode   idem for decode
``prefill_sm_active``         prefill  DCGM SM activity averaged over GPUs (0..1)
``decode_sm_active``          decode   idem for decode
``decode_kv_usage``           decode   KV-cache usage averaged over instances (0..1)
``prefill_queue``             prefill  requests waiting to start prefill, summed (requests)
``decode_queue``              decode   requests waiting for a decode slot, summed (requests)
``decode_running``            decode   requests decoding (admitted, unfinished), summed
``tbt_mean``                  decode   mean time between tokens over the window (ms)
``prompt_tokens``             prefill  prompt-length histogram: requests/s per bucket
``output_tokens``             decode   output-length histogram: requests/s per bucket
============================  =======  ==================================================

*Prefill TPS counts cache misses*: raw prompt tokens/s is inflated by prefix-cache hits
(a hit costs no prefill compute), so where the engine counts hits in tokens
(vLLM ``vllm:prefix_cache_hits_total``, SGLang ``sglang:cached_tokens_total``) the preset
subtracts them; where it does not, the subtraction falls back to zero.

*Queues* are the engines' waiting-request gauges (vLLM ``vllm:num_requests_waiting``,
SGLang ``sglang:num_queue_reqs``), the latest sample summed over the role's instances.
Under overload the token counters stop at what the instances serve, so only the queue
shows the demand beyond it. Both are optional (the planner falls back to the served
rates), as is decode's running-request gauge (vLLM ``vllm:num_requests_running``, SGLang
``sglang:num_running_reqs``): decode's batch grows under overload too, and after it
drains faster than work arrives, so the planner reads decode's demand as what it
served plus the growth of all its work, waiting and running. With Dynamo's own prefill queue (NATS) the prefill workers' waiting count shows
only what they have pulled: point ``metrics.queries.prefill_queue`` at the queue's depth.
TensorRT-LLM exports none.

*TTFT is read on the prefill role*: in every P/D flow (proxy-first as in vLLM's
examples and llm-d, decode-first as in Dynamo, parallel as in SGLang's router) the
prefill engine records the queueing and prompt computation of each request, which is
the part prefill capacity controls. KV transfer time is not in it. For the user-facing
TTFT of a router or frontend, override ``metrics.queries.ttft`` with a query that
aggregates ``by (service)`` only (a result row without a role label is accepted for
any role).

*The request mix* (``prompt_tokens``, ``output_tokens``; ``reconciler.state.LengthBuckets``)
is one query per histogram, ``sum by (service, le) (rate(<name>_bucket{role=...}[w]))``:
the rate of requests per length bucket over the window, cumulative in ``le`` (only the
proportions matter). The engines observe both lengths once per request, when it
finishes on that instance, and in a P/D deployment every request finishes twice:

- on the prefill instance right after its first token (vLLM's P/D proxy and llm-d send
  it with ``max_tokens=1``, Dynamo's prefill worker likewise, SGLang's prefill server
  hands over after the first token), so its output histogram is all ones and useless;
  its prompt histogram is exactly the prompts prefill computes (with Dynamo's
  conditional disaggregation, short prompts prefilled on the decode worker cost prefill
  nothing and are rightly left out);
- on the decode instance when generation ends, with the full output length.

So prompt lengths are read on the prefill role and output lengths on the decode role.
Both are optional: a service whose engine exports no such histogram (TensorRT-LLM, SGLang
without ``--collect-tokens-histogram``) or that served no request in the window gets
``None``, and the planner keeps the last known mix.

Engine presets (``metrics.preset``, defaulting to the service's ``engine``)
--------------------------------------------------------------------------
- ``vllm``: ``vllm:prompt_tokens_total``, ``vllm:prefix_cache_hits_total``,
  ``vllm:generation_tokens_total``, ``vllm:time_to_first_token_seconds``,
  ``vllm:inter_token_latency_seconds`` (vLLM >= 0.11) falling back to
  ``vllm:time_per_output_token_seconds`` (its name before 0.11, removed in 0.13),
  ``vllm:kv_cache_usage_perc`` (V1) falling back to ``vllm:gpu_cache_usage_perc`` (V0).
  Both KV gauges are fractions 0..1 despite "perc". Request mix:
  ``vllm:request_prompt_tokens`` and ``vllm:request_generation_tokens`` (histograms with
  1-2-5 buckets up to ``max_model_len``, ``vllm/v1/metrics/loggers.py``).
- ``sglang``: ``sglang:prompt_tokens_total``, ``sglang:cached_tokens_total`` (all cache
  sources summed), ``sglang:generation_tokens_total``,
  ``sglang:time_to_first_token_seconds``, ``sglang:inter_token_latency_seconds`` falling
  back to ``sglang:time_per_output_token_seconds``, ``sglang:token_usage`` (0..1). Request
  mix: ``sglang:prompt_tokens_histogram`` and ``sglang:generation_tokens_histogram``
  (``TokenizerMetricsCollector`` in ``sglang/srt/metrics/collector.py``), exported only
  when the server runs with ``--collect-tokens-histogram``; without it the mix is missing.
- ``dynamo``: Dynamo workers pass the backend engine's metrics through on their system
  port; the preset assumes the most common backend, vLLM, and adds Dynamo's
  ``dynamo_component_kvstats_gpu_cache_usage_percent`` (0..1) as KV fallback.
  *Caveat*: with an SGLang or TensorRT-LLM backend set ``metrics.preset: sglang`` or
  ``trtllm``. Request mix: the vLLM workers' histograms. Dynamo's frontend has its own
  (``dynamo_frontend_input_sequence_tokens`` / ``dynamo_frontend_output_sequence_tokens``,
  labelled by ``model``, on a pod without a role); to use them instead, override
  ``metrics.queries.prompt_tokens`` with a service-level query, e.g.
  ``sum by (service, le) (rate(dynamo_frontend_input_sequence_tokens_bucket[$__window]))``
  once the frontend's series carry the service label.
- ``trtllm``: TensorRT-LLM (1.1) exports only latency histograms to Prometheus:
  ``trtllm_time_to_first_token_seconds`` and ``trtllm_time_per_output_token_seconds``
  (the ``trtllm:`` spelling of older Dynamo releases is accepted as fallback), KV usage
  via Dynamo's kvstats gauge. *Caveats*: its "TPOT" histogram is per request, not per
  token, so it is smoother than a true inter-token latency; and it exports **no token
  counters**, so ``prefill_tps`` and ``decode_tps`` are missing unless overridden in
  ``metrics.queries`` (``check_metrics_config`` reports a policy that scales on them
  without an override). Nor does it export prompt- or output-length histograms (neither
  1.1 nor the current ``tensorrt_llm/metrics/collector.py``, which has token counters
  only), so ``prompt_tokens`` and ``output_tokens`` are missing unless overridden.
- DCGM exporter (every preset): ``DCGM_FI_DEV_GPU_UTIL`` (percent 0..100, divided by
  100) and ``DCGM_FI_PROF_SM_ACTIVE`` (ratio 0..1), each averaged over the rate window
  per GPU and then over the role's GPUs.

Labels: which service and role a series belongs to
--------------------------------------------------
The applier labels every engine pod ``heteroscale.io/service=<policy name>`` and
``heteroscale.io/role=prefill|decode``. The usual Kubernetes pod scrape config turns pod
labels into ``__meta_kubernetes_pod_label_<sanitised name>`` and relabels them onto the
series; the defaults expect them as ``service`` and ``role``
(``metrics.service_label`` / ``metrics.role_label`` name other labels)::

    scrape_configs:
      - job_name: heteroscale-engines
        kubernetes_sd_configs:    # only the namespaces the policies serve in
          - {role: pod, namespaces: {names: [chat, summarize, svc-a, svc-b]}}
        relabel_configs:
          - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
            regex: "true"
            action: keep
          - source_labels: [__meta_kubernetes_pod_label_heteroscale_io_service]
            regex: (.+)
            action: keep                  # only pods the reconciler owns
          - source_labels: [__address__, __meta_kubernetes_pod_annotation_prometheus_io_port]
            regex: ([^:]+)(?::\\d+)?;(\\d+)
            replacement: $1:$2
            target_label: __address__
          - source_labels: [__meta_kubernetes_pod_label_heteroscale_io_service]
            target_label: service
          - source_labels: [__meta_kubernetes_pod_label_heteroscale_io_role]
            target_label: role
          - source_labels: [__meta_kubernetes_namespace]
            target_label: namespace
          - source_labels: [__meta_kubernetes_pod_name]
            target_label: pod

(``scripts/prometheus/kubernetes-scrape-config.example.yaml`` holds the full file; the
tests check it with ``promtool check config``.) Series are selected by these labels
alone, so the job must not discover pods outside the serving namespaces: one labelled
like a service's would be counted with it.

Every name a preset lists for a signal (a renamed metric, a colon escaped to ``_``) is
read as one union of series before aggregating: each pod counts once, under the first
name it exports, and a fleet mid-upgrade is read whole (``_union``).

DCGM series are exported by the DCGM exporter's own DaemonSet pod and carry the GPU's
consumer as ``pod``/``namespace`` labels, not its pod labels. Either enable the
exporter's pod-label enrichment (GPU Operator: ``dcgmExporter.enablePodLabels``) and
rename the enriched labels to ``service``/``role`` with ``metric_relabel_configs``, or
join with kube-state-metrics in a query override (kube-state-metrics must allow the
labels: ``--metric-labels-allowlist=pods=[heteroscale.io/service,heteroscale.io/role]``)::

    metrics:
      queries:
        decode_gpu_util: >
          avg by (service, role) (
            avg_over_time(DCGM_FI_DEV_GPU_UTIL[$__window])
            * on (namespace, pod) group_left (service, role)
              label_replace(label_replace(
                kube_pod_labels{label_heteroscale_io_role="decode",
                                label_heteroscale_io_service=~"$__services"},
                "service", "$1", "label_heteroscale_io_service", "(.+)"),
                "role", "$1", "label_heteroscale_io_role", "(.+)")
          ) * 0.01

(``dcgm_pod_labels_join`` renders this for any DCGM field and role; if the DCGM
exporter's scrape config keeps its own ``pod``/``namespace`` target labels, the consumer's
labels are ``exported_pod``/``exported_namespace`` and ``join_labels`` must say so.)

Large fleets: recording rules
-----------------------------
The latency histograms dominate a cycle's cost (every bucket of every instance goes
through ``rate``: 2,000 instances with ~20 buckets are 40,000 series). ``recording_rules``
generates a rules file that pre-aggregates their bucket rates by service, role and
``le``; with it loaded and the adapter's ``recorded_histograms`` on, the quantile queries
read those few series instead. One record per histogram covers all its names (named
after the first), so rules generated by an older release must be generated again. A
second rule group does the same for the request-mix histograms (their buckets are as
many: vLLM's 1-2-5 grid has ~15 up to 32k tokens).

Query overrides
---------------
``metrics.queries.<signal>`` replaces the preset's PromQL for one service. It must return
the signal in its unit (tokens/s, milliseconds, fraction) with one series per
``(service, role)`` — or per ``service`` — carrying the service's name in the service
label. ``$__quantile`` is replaced by the policy's SLO quantile and ``$__window`` by the
adapter's rate window (e.g. ``60s``), as in Grafana; ``$__services`` by a regex matching
exactly the services that share the override in one request, so
``{service=~"$__services"}`` restricts it as every preset query is restricted (without
it, an override that selects no service reads every ``service`` value Prometheus
holds, however many). ``prompt_tokens`` and
``output_tokens`` overrides return one series per ``(service, le)``: the request rate (or
count) at or below each bound ``le``, ``+Inf`` included. Overrides carry no sample age: the
adapter stamps them with the evaluation time and relies on Prometheus' own staleness
handling (series of a vanished target disappear at the next failed scrape).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from reconciler.desired.models import ServicePolicy
from reconciler.state import METRIC_NAMES, MetricName, Role

LengthName = Literal["prompt_tokens", "output_tokens"]
LENGTH_NAMES: tuple[LengthName, ...] = ("prompt_tokens", "output_tokens")
"""The request-mix histograms of ``ServiceMetrics`` (``LengthBuckets``, not ``Sample``)."""

SignalName = MetricName | LengthName
QUERY_KEYS: tuple[SignalName, ...] = (*METRIC_NAMES, *LENGTH_NAMES)
"""Every key ``metrics.queries`` accepts."""

# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class CounterRate:
    """Per-second increase of a counter, summed over the role's series.

    ``metrics`` are alternative names of one counter (newest first): each series is
    read under the first name it is exported with (``_union``), every series counted.
    ``minus`` are counters subtracted when present (prefix-cache hits), clamped so the
    result never goes below zero.
    """

    metrics: tuple[str, ...]
    minus: tuple[str, ...] = ()


@dataclass(frozen=True)
class HistogramQuantile:
    """``histogram_quantile`` over the rate of a histogram's buckets, times ``scale``
    (1000: the engines observe seconds, the policy wants milliseconds)."""

    metrics: tuple[str, ...]
    scale: float = 1000.0


@dataclass(frozen=True)
class HistogramMean:
    """The mean observation of a histogram over the window, its ``_sum``'s rate over its
    ``_count``'s, times ``scale``: exact where a quantile read from the buckets is known
    only to lie in one."""

    metrics: tuple[str, ...]
    scale: float = 1000.0


@dataclass(frozen=True)
class GaugeAverage:
    """Average of a gauge over the role's series, times ``scale``. ``over_window``
    first averages each series over the rate window (for sampled, noisy gauges such as
    GPU utilisation); otherwise the latest sample counts. ``total`` sums the series
    instead of averaging them (a queue length: the role's queue is every instance's)."""

    metrics: tuple[str, ...]
    scale: float = 1.0
    over_window: bool = False
    total: bool = False


@dataclass(frozen=True)
class LengthHistogram:
    """Request rate per bucket of a token-length histogram, summed over the role's
    series by service and ``le`` (``metrics``: alternative names, newest first, read as
    for every signal: one union of series, see ``_union``)."""

    metrics: tuple[str, ...]


SignalSpec = CounterRate | HistogramQuantile | HistogramMean | GaugeAverage

SIGNAL_ROLE: Mapping[MetricName, Role] = {
    "prefill_tps": "prefill",
    "decode_tps": "decode",
    "ttft": "prefill",
    "tbt": "decode",
    "prefill_gpu_util": "prefill",
    "decode_gpu_util": "decode",
    "prefill_sm_active": "prefill",
    "decode_sm_active": "decode",
    "decode_kv_usage": "decode",
    "prefill_queue": "prefill",
    "decode_queue": "decode",
    "tbt_mean": "decode",
    "decode_running": "decode",
}

_DCGM: dict[MetricName, SignalSpec] = {
    "prefill_gpu_util": GaugeAverage(("DCGM_FI_DEV_GPU_UTIL",), scale=0.01, over_window=True),
    "decode_gpu_util": GaugeAverage(("DCGM_FI_DEV_GPU_UTIL",), scale=0.01, over_window=True),
    "prefill_sm_active": GaugeAverage(("DCGM_FI_PROF_SM_ACTIVE",), over_window=True),
    "decode_sm_active": GaugeAverage(("DCGM_FI_PROF_SM_ACTIVE",), over_window=True),
}

# vLLM's and SGLang's tables are alike on purpose, each metric name spelled out in
# full (searchable, and free to diverge as the engines rename theirs).
_VLLM: dict[MetricName, SignalSpec] = {
    "prefill_tps": CounterRate(
        ("vllm:prompt_tokens_total",), minus=("vllm:prefix_cache_hits_total",)
    ),
    "decode_tps": CounterRate(("vllm:generation_tokens_total",)),
    "ttft": HistogramQuantile(("vllm:time_to_first_token_seconds",)),
    "tbt": HistogramQuantile(
        ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
    ),
    "tbt_mean": HistogramMean(
        ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
    ),
    "decode_kv_usage": GaugeAverage(("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    "prefill_queue": GaugeAverage(("vllm:num_requests_waiting",), total=True),
    "decode_queue": GaugeAverage(("vllm:num_requests_waiting",), total=True),
    "decode_running": GaugeAverage(("vllm:num_requests_running",), total=True),
    **_DCGM,
}

_SGLANG: dict[MetricName, SignalSpec] = {
    "prefill_tps": CounterRate(
        ("sglang:prompt_tokens_total",), minus=("sglang:cached_tokens_total",)
    ),
    "decode_tps": CounterRate(("sglang:generation_tokens_total",)),
    "ttft": HistogramQuantile(("sglang:time_to_first_token_seconds",)),
    "tbt": HistogramQuantile(
        ("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds")
    ),
    "tbt_mean": HistogramMean(
        ("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds")
    ),
    "decode_kv_usage": GaugeAverage(("sglang:token_usage",)),
    "prefill_queue": GaugeAverage(("sglang:num_queue_reqs",), total=True),
    "decode_queue": GaugeAverage(("sglang:num_queue_reqs",), total=True),
    "decode_running": GaugeAverage(("sglang:num_running_reqs",), total=True),
    **_DCGM,
}

_DYNAMO_KV = "dynamo_component_kvstats_gpu_cache_usage_percent"

_DYNAMO: dict[MetricName, SignalSpec] = {
    **_VLLM,
    "decode_kv_usage": GaugeAverage(
        ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", _DYNAMO_KV)
    ),
}

_TRTLLM: dict[MetricName, SignalSpec] = {
    "ttft": HistogramQuantile(
        ("trtllm_time_to_first_token_seconds", "trtllm:time_to_first_token_seconds")
    ),
    "tbt": HistogramQuantile(
        ("trtllm_time_per_output_token_seconds", "trtllm:time_per_output_token_seconds")
    ),
    "tbt_mean": HistogramMean(
        ("trtllm_time_per_output_token_seconds", "trtllm:time_per_output_token_seconds")
    ),
    "decode_kv_usage": GaugeAverage((_DYNAMO_KV,)),
    **_DCGM,
}

PRESETS: Mapping[str, Mapping[MetricName, SignalSpec]] = {
    "vllm": _VLLM,
    "sglang": _SGLANG,
    "dynamo": _DYNAMO,
    "trtllm": _TRTLLM,
}

# Prompt lengths as prefill computes them, output lengths as decode generates them (a
# prefill instance finishes every request after one token): see the module docstring.
LENGTH_ROLE: Mapping[LengthName, Role] = {"prompt_tokens": "prefill", "output_tokens": "decode"}

_VLLM_LENGTHS: dict[LengthName, LengthHistogram] = {
    "prompt_tokens": LengthHistogram(("vllm:request_prompt_tokens",)),
    "output_tokens": LengthHistogram(("vllm:request_generation_tokens",)),
}

LENGTH_PRESETS: Mapping[str, Mapping[LengthName, LengthHistogram]] = {
    "vllm": _VLLM_LENGTHS,
    "sglang": {
        # Only with --collect-tokens-histogram (newer releases: with --enable-metrics).
        "prompt_tokens": LengthHistogram(("sglang:prompt_tokens_histogram",)),
        "output_tokens": LengthHistogram(("sglang:generation_tokens_histogram",)),
    },
    "dynamo": _VLLM_LENGTHS,  # the vLLM workers' histograms, passed through
    "trtllm": {},  # TensorRT-LLM exports no length histograms
}


_ROLE_OF: dict[str, Role] = dict([*SIGNAL_ROLE.items(), *LENGTH_ROLE.items()])


_SPECS: dict[str, dict[str, SignalSpec | LengthHistogram]] = {
    preset: dict([*PRESETS[preset].items(), *LENGTH_PRESETS[preset].items()]) for preset in PRESETS
}


def preset_spec(preset: str, signal: SignalName) -> SignalSpec | LengthHistogram | None:
    """Where a preset reads a signal, or None if it has no source for it."""
    return _SPECS[preset].get(signal)


def signal_role(signal: SignalName) -> Role:
    """The role whose series a signal (or request-mix histogram) is read from."""
    return _ROLE_OF[signal]


PART_LABEL = "heteroscale_part"
"""Label the batching adds to tell the parts of one merged query apart."""

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_PLACEHOLDER = re.compile(r"\$__([a-zA-Z_]+)")
PLACEHOLDERS = ("quantile", "window", "services")


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class SignalQuery:
    """The PromQL of one signal for one group of services.

    ``value`` returns the signal per (service, role); ``sampled_at`` (None for
    overrides) returns, per (service, role), the timestamp of the oldest of the newest
    raw samples behind it, so a value can say how fresh it is; ``samples`` (None for
    overrides and gauges) returns, per (service, role), how many raw samples the
    best-covered series behind a windowed value holds in the window, so a value whose
    window is only partly covered (after a gap) can be told from a low one.
    """

    value: str
    sampled_at: str | None
    samples: str | None = None


def format_duration(seconds: float) -> str:
    """A PromQL duration: whole seconds as ``60s``, anything finer in milliseconds."""
    millis = round(seconds * 1000)
    if millis <= 0:
        raise ValueError(f"duration must be positive, got {seconds} s")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def format_number(value: float) -> str:
    """Shortest round-tripping text of a float (PromQL accepts ``0.9``, ``1000``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def settled_range(selector: str, window_s: float, offset_s: float = 0.0) -> str:
    """``selector[window]``, shifted back by ``offset_s`` (``offset``) when positive.

    Why the counter and histogram windows end a scrape interval before the evaluation
    time: the samples of a scrape are stamped with its start but become visible only
    when it ends (the whole scrape is appended at once), so while a scrape is in flight
    the newest sample lies up to one interval *plus the scrape's duration* before the
    evaluation time. ``rate()`` extrapolates to the window's end only when its last
    sample is within 1.1 average sample intervals of it; beyond that it assumes the
    series ended and extrapolates half an interval, reading low by about
    ``(lag - interval / 2) / window`` at once: 6 to 15 % for a 10 s window at 1 s
    scrapes, 15 % and more for 60 s at 15 s whenever an engine takes over 1.5 s to
    answer (and, in a recording rule, at every evaluation whose phase falls in such a
    scrape). A window ending one scrape interval back holds only finished scrapes
    (a scrape times out within its interval), so its last sample is within one
    interval of its end and the rate is read in full."""
    text = f"{selector}[{format_duration(window_s)}]"
    return f"{text} offset {format_duration(offset_s)}" if offset_s > 0 else text


def is_label_name(name: str) -> bool:
    """A Prometheus label name that a user may set (``__`` names are reserved)."""
    return bool(_LABEL_NAME.match(name)) and not name.startswith("__")


def _spellings(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """Each name, then its ``:``-to-``_`` spelling: prometheus-client 0.26 escapes colons
    in OpenMetrics scrapes (prometheus/client_python#1177), so an engine's
    ``vllm:prompt_tokens_total`` may be stored as ``vllm_prompt_tokens_total``."""
    out: list[str] = []
    for name in metrics:
        out.append(name)
        if ":" in name:
            out.append(name.replace(":", "_"))
    return tuple(dict.fromkeys(out))


def _union(exprs: Sequence[str], *, per_instance_of: str | None = None) -> str:
    """The series of every expression, each series once: ``a or b or ...``.

    Why a union of series and not a choice of names: the alternatives of a signal are
    one quantity under several names (a renamed metric, a colon escaped to ``_``), and
    which name a pod exports depends on its engine's version and its scrape's format.
    ``or`` keeps every series of ``a`` and those of ``b`` whose labels match none of
    ``a``'s, so an aggregate over the union counts each pod once, under the first name
    it exports, while pods exporting only another name still count. Choosing one name
    per service instead (``sum(a) or sum(b)``) let one stray pod exporting the first
    name replace the readings of all the others: 1 tok/s read where 400 were served.

    The expressions must have dropped the metric name (``rate``, ``timestamp``,
    ``*_over_time`` and arithmetic do), or no two would ever match.
    ``per_instance_of`` names a label that varies within one pod's series of one
    metric (a histogram's ``le``): matching ignores it, so a pod that exports two
    names of a histogram contributes all its buckets from the first, never a mix of
    two bucket layouts."""
    if len(exprs) == 1:
        return exprs[0]
    join = " or " if per_instance_of is None else f" or ignoring ({per_instance_of}) "
    return join.join(exprs)


def _nameless(selector: str) -> str:
    """An instant selector's series without their metric name (``* 1``), so that two
    names of one gauge can be told apart only by the labels that say where they come
    from (see ``_union``)."""
    return f"{selector} * 1"


def render_spec(
    spec: SignalSpec | LengthHistogram,
    *,
    role: Role,
    quantile: float,
    window_s: float,
    service_label: str,
    role_label: str,
    services: Sequence[str] | None = None,
    recorded_histograms: bool = False,
    offset_s: float = 0.0,
) -> SignalQuery:
    """The PromQL of a preset signal, grouped by service and role labels and filtered to
    one role: for every service at once, or only for ``services`` (a regex matcher on
    the service label: the answer then holds no other service's series however many
    there are, and one of several parts of a merged query does not recompute what the
    other parts compute; the adapter always restricts). ``recorded_histograms`` reads histogram
    bucket rates from the series of ``recording_rules`` instead of aggregating the
    engines' buckets (freshness still comes from the raw ``_count`` series).

    Every name a signal may be exported under is read, as one union of series before
    any aggregation (``_union``): each pod counts once whichever name it exports.

    A ``LengthHistogram`` is grouped by service and ``le`` only: its one role is fixed
    by the matcher, so the role label would add nothing.

    ``offset_s`` ends the counter and histogram windows (and their sample counts) that
    long before the evaluation time (see ``settled_range``); freshness and gauges are
    read at the evaluation time."""
    by = f"{service_label}, {role_label}"
    window = format_duration(window_s)

    def rng(selector: str) -> str:
        return settled_range(selector, window_s, offset_s)

    names = _spellings(spec.metrics)
    matchers = f'{role_label}="{role}"'
    if services is not None:
        matchers += f', {service_label}=~"{services_regex(services)}"'

    def sel(metric: str) -> str:
        return f"{metric}{{{matchers}}}"

    def freshness(metrics: tuple[str, ...], group: str = by) -> str:
        return f"min by ({group}) ({_union([f'timestamp({sel(m)})' for m in metrics])})"

    def coverage(metrics: tuple[str, ...], group: str = by) -> str:
        # max, not min: one new pod with a short history must not blank its service,
        # while after a Prometheus restart or a gap every series is short.
        counts = _union([f"count_over_time({rng(sel(m))})" for m in metrics])
        return f"max by ({group}) ({counts})"

    def part_rates(metrics: tuple[str, ...], part: str) -> str:
        """The union of a histogram's ``_bucket``, ``_sum`` or ``_count`` rates, raw or
        recorded (one recorded series covers every name: ``recording_rules``)."""
        if recorded_histograms:
            return sel(recorded_rate(metrics[0], part, window_s))
        rates = [f"rate({rng(sel(f'{m}_{part}'))})" for m in metrics]
        return _union(rates, per_instance_of="le" if part == "bucket" else None)

    def counter_rate(metrics: tuple[str, ...]) -> str:
        return f"sum by ({by}) ({_union([f'rate({rng(sel(m))})' for m in metrics])})"

    counts = tuple(f"{m}_count" for m in names)
    if isinstance(spec, LengthHistogram):
        value = f"sum by ({service_label}, le) ({part_rates(names, 'bucket')})"
        return SignalQuery(value, freshness(counts, service_label), coverage(counts, service_label))
    if isinstance(spec, CounterRate):
        total = counter_rate(names)
        value = total
        if spec.minus:
            hits = counter_rate(_spellings(spec.minus))
            # "or total * 0": no hit counter for this (service, role) subtracts nothing.
            value = f"clamp_min({total} - ({hits} or {total} * 0), 0)"
        # A short window of the hit counter only reads high (a hold), so only the
        # counter itself must cover it.
        return SignalQuery(value, freshness(names), coverage(names))
    if isinstance(spec, HistogramQuantile):
        buckets = part_rates(names, "bucket")
        value = f"histogram_quantile({format_number(quantile)}, sum by ({by}, le) ({buckets}))"
        return SignalQuery(_scaled(value, spec.scale), freshness(counts), coverage(counts))
    if isinstance(spec, HistogramMean):
        # Sums and counts come from the same name of each pod (the union keeps the
        # first name a pod exports in both), so no pod's sum is divided by another
        # histogram's count.
        total = f"sum by ({by}) ({part_rates(names, 'sum')})"
        value = f"{total} / sum by ({by}) ({part_rates(names, 'count')})"
        return SignalQuery(_scaled(value, spec.scale), freshness(counts), coverage(counts))
    if spec.over_window:
        series = [f"avg_over_time({sel(m)}[{window}])" for m in names]
    else:
        series = [sel(m) if len(names) == 1 else _nameless(sel(m)) for m in names]
    aggregate = "sum" if spec.total else "avg"
    value = f"{aggregate} by ({by}) ({_union(series)})"
    # No coverage for gauges: an average over part of the window is not biased low.
    return SignalQuery(_scaled(value, spec.scale), freshness(names))


def _scaled(value: str, scale: float) -> str:
    return value if scale == 1.0 else f"{value} * {format_number(scale)}"


def render_override(query: str, *, quantile: float, window_s: float) -> SignalQuery:
    """A user's PromQL with ``$__quantile`` and ``$__window`` filled in; ``$__services``
    stays until the services that share the query are known (``restrict_override``)."""
    values = {"quantile": format_number(quantile), "window": format_duration(window_s)}
    text = _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), query)
    return SignalQuery(text.strip(), None)


def restrict_override(query: SignalQuery, services: Sequence[str]) -> SignalQuery:
    """An override with ``$__services`` replaced by a regex matching exactly
    ``services`` (the ones that share it in one request), as a preset query is
    restricted: e.g. ``{service=~"$__services"}``."""
    regex = services_regex(services)
    return replace(
        query,
        value=_PLACEHOLDER.sub(
            lambda m: regex if m.group(1) == "services" else m.group(0), query.value
        ),
    )


def signal_query(
    policy: ServicePolicy,
    signal: SignalName,
    *,
    window_s: float,
    services: Sequence[str] | None = None,
    recorded_histograms: bool = False,
    offset_s: float = 0.0,
) -> SignalQuery | None:
    """The query that reads ``signal`` (or a request-mix histogram) for ``policy``: its
    override if it has one, else its preset's (restricted to ``services`` if given), else
    None (the preset has no source for the signal)."""
    config = policy.metrics
    override = config.queries.get(signal)
    if override is not None:
        return render_override(override, quantile=policy.slo.quantile, window_s=window_s)
    spec = preset_spec(config.preset or policy.engine, signal)
    if spec is None:
        return None
    return render_spec(
        spec,
        role=signal_role(signal),
        quantile=policy.slo.quantile,
        window_s=window_s,
        service_label=config.service_label,
        role_label=config.role_label,
        services=services,
        recorded_histograms=recorded_histograms,
        offset_s=offset_s,
    )


# ----------------------------------------------------------------------------- recording rules


def recorded_rate(metric: str, part: str, window_s: float) -> str:
    """Name of the recorded rate of a histogram's ``part`` (``bucket``: per service, role
    and ``le``; ``sum`` and ``count``: per service and role), e.g.
    ``heteroscale:vllm_time_to_first_token_seconds_bucket:rate60s``."""
    return f"heteroscale:{metric.replace(':', '_')}_{part}:rate{format_duration(window_s)}"


def recording_rules(
    window_s: float,
    *,
    service_label: str = "service",
    role_label: str = "role",
    interval_s: float | None = None,
    offset_s: float = 0.0,
) -> dict[str, Any]:
    """A Prometheus rules file (as a dict; dump it as YAML or JSON) that pre-aggregates
    the bucket rates of every preset's latency histograms by service, role and ``le``,
    and the sum and count rates of those it reads a mean of by service and role (first
    group), and the bucket rates of its request-mix histograms (second group).

    For large fleets: the histogram signals are the expensive part of a cycle (every
    bucket of every instance goes through ``rate``); with these rules loaded and the
    adapter's ``recorded_histograms`` on, a cycle reads a few series per service
    instead, and Prometheus pays the aggregation once per rule interval. The window and
    label names must match the adapter's ``rate_window_s`` and the policies'.
    ``offset_s`` (the scrape interval; see ``settled_range``) keeps an evaluation that
    falls while a scrape is still in flight from reading the rates low.
    """
    by = f"{service_label}, {role_label}"

    def rules(histograms: list[tuple[str, ...]], part: str) -> list[dict[str, str]]:
        grouping = f"{by}, le" if part == "bucket" else by
        # One record per histogram, named after its first name and covering all its
        # names as one union of series (as the raw queries read them: ``_union``).
        names_of: dict[str, tuple[str, ...]] = {}
        for metrics in histograms:
            record = recorded_rate(metrics[0], part, window_s)
            names = _spellings(metrics)
            if names_of.setdefault(record, names) != names:
                raise ValueError(
                    f"{record} would record both {names_of[record]} and {names}: "
                    "histograms whose first names share a spelling must list the same names"
                )
        per_instance_of = "le" if part == "bucket" else None
        return [
            {
                "record": record,
                "expr": f"sum by ({grouping}) ("
                + _union(
                    [f"rate({settled_range(f'{m}_{part}', window_s, offset_s)})" for m in names],
                    per_instance_of=per_instance_of,
                )
                + ")",
            }
            for record, names in names_of.items()
        ]

    def group(name: str, entries: list[dict[str, str]]) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name, "rules": entries}
        if interval_s is not None:
            out["interval"] = format_duration(interval_s)
        return out

    specs = [spec for preset in PRESETS.values() for spec in preset.values()]
    quantiles = [spec.metrics for spec in specs if isinstance(spec, HistogramQuantile)]
    means = [spec.metrics for spec in specs if isinstance(spec, HistogramMean)]
    lengths = [spec.metrics for preset in LENGTH_PRESETS.values() for spec in preset.values()]
    latency = rules(quantiles, "bucket") + rules(means, "sum") + rules(means, "count")
    return {
        "groups": [
            group("heteroscale-latency-histograms", latency),
            group("heteroscale-length-histograms", rules(lengths, "bucket")),
        ]
    }


_RE2_SPECIAL = re.compile(r"([\\.+*?()|\[\]{}^$])")


def services_regex(services: Sequence[str]) -> str:
    """An anchored alternation matching exactly these names, escaped for RE2 and for a
    PromQL double-quoted string."""
    escaped = (_RE2_SPECIAL.sub(r"\\\1", name) for name in sorted(set(services)))
    return "|".join(escaped).replace("\\", "\\\\").replace('"', '\\"')


def dcgm_pod_labels_join(
    field: str,
    role: Role,
    *,
    scale: float = 1.0,
    join_labels: tuple[str, str] = ("namespace", "pod"),
    service_pod_label: str = "label_heteroscale_io_service",
    role_pod_label: str = "label_heteroscale_io_role",
) -> str:
    """A query override that attributes a DCGM field to services and roles by joining
    with kube-state-metrics' ``kube_pod_labels`` on the GPU consumer's namespace and pod
    (for DCGM exporters without pod-label enrichment). ``scale`` 0.01 turns
    ``DCGM_FI_DEV_GPU_UTIL`` percent into a fraction. Uses ``$__window``, and
    ``$__services`` on the pods' labels, so only the policies' own pods join."""
    on = ", ".join(join_labels)
    text = (
        f"avg by (service, role) (avg_over_time({field}[$__window]) "
        f"* on ({on}) group_left (service, role) "
        f'label_replace(label_replace(kube_pod_labels{{{role_pod_label}="{role}", '
        f'{service_pod_label}=~"$__services"}}, '
        f'"service", "$1", "{service_pod_label}", "(.+)"), '
        f'"role", "$1", "{role_pod_label}", "(.+)"))'
    )
    return text if scale == 1.0 else f"{text} * {format_number(scale)}"


# ----------------------------------------------------------------------------- checks

Problem = tuple[tuple[object, ...], str]


def check_metrics_config(policy: ServicePolicy) -> list[Problem]:
    """Problems in a policy's ``metrics`` section, as ``(path, message)`` pairs in the
    shape of ``reconciler.desired.checks`` (paths start at the policy's root).

    Checks label names, override placeholders, and that every signal the policy acts
    on (its primary metric, latency tiers, KV-cache pressure) has a source.
    """
    problems: list[Problem] = []
    config = policy.metrics
    for key in ("service_label", "role_label"):
        name = getattr(config, key)
        if not is_label_name(name):
            problems.append(
                (
                    ("metrics", key),
                    f"'{name}' is not a Prometheus label name "
                    "(letters, digits and '_', not starting with a digit or '__')",
                )
            )
    if config.service_label == config.role_label:
        problems.append((("metrics", "role_label"), "must differ from service_label"))
    for signal, query in config.queries.items():
        if not query.strip():
            problems.append((("metrics", "queries", signal), "empty query"))
        for unknown in sorted(set(_PLACEHOLDER.findall(query)) - set(PLACEHOLDERS)):
            problems.append(
                (
                    ("metrics", "queries", signal),
                    f"unknown placeholder '$__{unknown}' (known: "
                    + ", ".join(f"$__{p}" for p in PLACEHOLDERS)
                    + ")",
                )
            )
    preset_name = config.preset or policy.engine
    preset = PRESETS[preset_name]
    used: dict[str, tuple[object, ...]] = {policy.scaling.metric: ("scaling", "metric")}
    for i, tier in enumerate(policy.scaling.latency_tiers):
        used.setdefault(tier.metric, ("scaling", "latency_tiers", i, "metric"))
    if policy.scaling.kv_cache_pressure is not None:
        used.setdefault("decode_kv_usage", ("scaling", "kv_cache_pressure"))
    for signal, path in used.items():
        if signal in METRIC_NAMES and signal not in preset and signal not in config.queries:
            problems.append(
                (
                    path,
                    f"the '{preset_name}' metrics preset has no source for {signal}; "
                    f"add metrics.queries.{signal}",
                )
            )
    return problems


def unrestricted_override_problems(policy: ServicePolicy) -> list[Problem]:
    """Query overrides that select no service: neither ``$__services`` nor a matcher
    on the service label (``service="x"``, ``service=~"..."``) narrows them, so they
    read every ``service`` value Prometheus holds. Warnings, not errors: such a query
    is valid and serves the policy, but a flood of other series (another team's
    services, a misbehaving exporter) makes its answer too large and the service holds
    each cycle, where every preset query is restricted to its own services."""
    matcher = re.compile(rf"(?<![\w]){re.escape(policy.metrics.service_label)}\s*=~?\s*[\"'`]")
    return [
        (
            ("metrics", "queries", signal),
            f"selects no service: it reads every '{policy.metrics.service_label}' value "
            "Prometheus holds, and when other series make its answer too large the "
            f"service holds; restrict it with {{{policy.metrics.service_label}"
            '=~"$__services"}',
        )
        for signal, query in policy.metrics.queries.items()
        if "$__services" not in query and not matcher.search(query)
    ]

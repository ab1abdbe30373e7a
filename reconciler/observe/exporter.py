"""A Prometheus exporter for a simulated fleet: engine-named metrics from a deterministic
load generator.

The simulator (or a test) says, per engine instance, how much load it carries — token
rates, request rate, latency distributions, KV-cache usage, GPU utilisation — and this
module exposes exactly the series a real vLLM or SGLang pod and the DCGM exporter would,
under the same names, through prometheus-client on a loopback port. Prometheus scrapes
it like a real fleet, so the whole path engine metrics -> scrape -> PromQL -> policy runs
for real.

Determinism: nothing is random. Counters grow linearly at the configured rates from the
moment an instance's load is set (``value(t) = value(t0) + rate * (t - t0)``, carried
over when the load changes, so counters never go backwards), and each histogram
bucket grows at ``observations/s * CDF(le)`` — the expected value of a real histogram
under that load. Bucket counts are therefore fractional; Prometheus does not mind, and
``histogram_quantile`` over them has an exact expected value
(``expected_histogram_quantile_s``), which is what the tests check against.

Labels: every series carries ``service``, ``role`` and ``instance`` (the engine
instance, i.e. the pod), plus ``model_name`` on engine metrics and ``gpu``/``UUID``/
``modelName`` on DCGM metrics. One exporter plays many pods behind one scrape target,
so its scrape job needs ``honor_labels: true`` (as for federation), or Prometheus would
rename ``instance`` to ``exported_instance``. With ``identity_labels=False`` an exporter
plays exactly one pod the way a real engine does — no ``service``/``role``/``instance``
labels — and the scrape config's relabelling must supply them (this is how the tests
check the documented Kubernetes relabelling).

Engines: ``vllm`` (``vllm:prompt_tokens_total``, ``vllm:prefix_cache_queries_total``,
``vllm:prefix_cache_hits_total``, ``vllm:generation_tokens_total``,
``vllm:time_to_first_token_seconds``, the inter-token histogram under
``vllm_tbt_metric`` — ``vllm:time_per_output_token_seconds`` by default, its name before
vLLM 0.11 — ``vllm:kv_cache_usage_perc``, ``vllm:num_requests_waiting``,
``vllm:num_requests_running``, and the request-length histograms
``vllm:request_prompt_tokens`` / ``vllm:request_generation_tokens``) and ``sglang``
(``sglang:prompt_tokens_total``, ``sglang:cached_tokens_total``,
``sglang:generation_tokens_total``, ``sglang:time_to_first_token_seconds``,
``sglang:inter_token_latency_seconds``, ``sglang:token_usage``, ``sglang:num_queue_reqs``,
``sglang:num_running_reqs``, and
``sglang:prompt_tokens_histogram`` / ``sglang:generation_tokens_histogram`` as with
``--collect-tokens-histogram``). DCGM: ``DCGM_FI_DEV_GPU_UTIL`` (percent) and
``DCGM_FI_PROF_SM_ACTIVE`` (ratio), one series per GPU of the instance.

Request lengths are observed once per request at ``requests_per_s`` (in steady state as
many finish as start), with the engines' own bucket bounds. As on a real P/D fleet, a
prefill instance's requests end after one generated token (``ONE_TOKEN``), and a decode
instance also sees every prompt: a scenario says so through its loads.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from socketserver import ThreadingMixIn
from statistics import NormalDist
from typing import Any, ClassVar, Literal, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from reconciler.latency_buckets import (  # re-exported: the tests read them from here
    SGLANG_ITL_BUCKETS_S,
    VLLM_ITL_BUCKETS_S,
    VLLM_TTFT_BUCKETS_S,
    one_two_five_buckets,
)
from reconciler.state import Role

ExporterEngine = Literal["vllm", "sglang"]


VLLM_MAX_MODEL_LEN = 32768
VLLM_LENGTH_BUCKETS: tuple[float, ...] = one_two_five_buckets(VLLM_MAX_MODEL_LEN)
# SGLang's defaults with --collect-tokens-histogram (sglang/srt/metrics/collector.py).
SGLANG_PROMPT_BUCKETS: tuple[float, ...] = (
    100, 300, 500, 700, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000,
    10000, 12000, 15000, 20000, 22000, 25000, 30000, 35000, 40000,
)  # fmt: skip
SGLANG_GENERATION_BUCKETS: tuple[float, ...] = (
    100, 300, 500, 1000, 1200, 1500, 1700, 2000, 2500, 3000, 3500, 4000, 4500, 5000,
    6000, 7000, 8000, 9000, 10000,
)  # fmt: skip


class LatencyDistribution(Protocol):
    """A latency distribution in seconds."""

    def cdf(self, seconds: float) -> float: ...

    @property
    def mean_s(self) -> float: ...


class LengthDistribution(Protocol):
    """A distribution of request lengths in tokens."""

    def cdf(self, tokens: float) -> float: ...

    @property
    def mean_tokens(self) -> float: ...


@dataclass(frozen=True)
class DiscreteLengths:
    """Requests of exactly these lengths: ``(tokens, weight)`` pairs (weights need not sum
    to one). The share at or below any bucket bound is exact, so tests know precisely
    what each bucket must hold."""

    weights: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.weights or any(t < 0 or w <= 0 for t, w in self.weights):
            raise ValueError("need (tokens >= 0, weight > 0) pairs")

    def cdf(self, tokens: float) -> float:
        total = sum(w for _, w in self.weights)
        return sum(w for t, w in self.weights if t <= tokens) / total

    @property
    def mean_tokens(self) -> float:
        return sum(t * w for t, w in self.weights) / sum(w for _, w in self.weights)


ONE_TOKEN = DiscreteLengths(((1.0, 1.0),))
"""The output length a prefill instance records for every request it hands over."""

_Z90 = NormalDist().inv_cdf(0.9)


@dataclass(frozen=True)
class Lognormal:
    """Log-normal latency: ``median_s`` and the standard deviation ``sigma`` of its log."""

    median_s: float
    sigma: float

    def __post_init__(self) -> None:
        if self.median_s <= 0 or self.sigma <= 0:
            raise ValueError("median_s and sigma must be positive")

    @classmethod
    def from_median_p90(cls, median_s: float, p90_s: float) -> Lognormal:
        """The log-normal with this median and 90th percentile (``p90_s > median_s``)."""
        if p90_s <= median_s:
            raise ValueError("p90_s must exceed median_s")
        return cls(median_s, math.log(p90_s / median_s) / _Z90)

    def cdf(self, seconds: float) -> float:
        if seconds <= 0:
            return 0.0
        if math.isinf(seconds):
            return 1.0
        z = (math.log(seconds) - math.log(self.median_s)) / self.sigma
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    def quantile_s(self, q: float) -> float:
        return self.median_s * math.exp(self.sigma * NormalDist().inv_cdf(q))

    @property
    def mean_s(self) -> float:
        return self.median_s * math.exp(self.sigma**2 / 2)


@dataclass(frozen=True)
class InstanceLoad:
    """What one engine instance is doing, as steady rates. ``None`` leaves a series out
    (an engine without that metric, or a GPU without DCGM profiling)."""

    prompt_tps: float = 0.0
    """Prompt tokens/s, including those served from the prefix cache."""
    cached_prompt_tps: float = 0.0
    """Of ``prompt_tps``, tokens/s that hit the prefix cache."""
    generation_tps: float = 0.0
    requests_per_s: float = 0.0
    """Requests/s reaching their first token here: the TTFT observation rate."""
    ttft: LatencyDistribution | None = None
    tbt: LatencyDistribution | None = None
    """Inter-token latency, observed once per generated token."""
    kv_usage: float | None = None
    """KV-cache usage, fraction 0..1."""
    waiting_requests: float | None = None
    """Requests queued on this instance, not yet started (a gauge)."""
    running_requests: float | None = None
    """Requests running on this instance, started and not finished (a gauge)."""
    gpus: int = 1
    gpu_util_pct: float | None = None
    """DCGM_FI_DEV_GPU_UTIL, percent 0..100 (the same on every GPU of the instance)."""
    sm_active: float | None = None
    """DCGM_FI_PROF_SM_ACTIVE, ratio 0..1."""
    prompt_lengths: LengthDistribution | None = None
    """Prompt lengths of the requests finishing here (observed at ``requests_per_s``)."""
    output_lengths: LengthDistribution | None = None
    """Output lengths of the requests finishing here (``ONE_TOKEN`` on prefill)."""

    def __post_init__(self) -> None:
        rates = (self.prompt_tps, self.cached_prompt_tps, self.generation_tps, self.requests_per_s)
        if any(r < 0 or not math.isfinite(r) for r in rates):
            raise ValueError("rates must be finite and >= 0")
        if self.cached_prompt_tps > self.prompt_tps:
            raise ValueError("cached_prompt_tps cannot exceed prompt_tps")
        if self.gpus < 1:
            raise ValueError("gpus must be >= 1")


@dataclass(frozen=True)
class InstanceKey:
    service: str
    role: Role
    instance: str


class _Cdf(Protocol):
    def cdf(self, x: float, /) -> float: ...


@dataclass(frozen=True)
class _Histogram:
    """One histogram's totals: cumulative counts per bound (+Inf last; empty before any
    observation) and the sum of what it observed. Its bounds are the engine's
    (``_Bounds``), given where it is grown or written."""

    buckets: tuple[float, ...] = ()
    sum: float = 0.0

    def grown(
        self, bounds: Sequence[float], dist: _Cdf | None, n: float, mean: float
    ) -> _Histogram:
        """After ``n`` more observations of ``dist`` (none without it), whose mean is
        ``mean``."""
        return _Histogram(
            _grow(self.buckets, bounds, dist, n), self.sum + (n * mean if dist else 0.0)
        )


@dataclass(frozen=True)
class _Totals:
    """Counter and histogram totals of one instance at one moment."""

    prompt: float = 0.0
    cached: float = 0.0
    generation: float = 0.0
    ttft: _Histogram = _Histogram()
    tbt: _Histogram = _Histogram()
    prompt_len: _Histogram = _Histogram()
    output_len: _Histogram = _Histogram()


@dataclass(frozen=True)
class _Bounds:
    """Bucket upper bounds (without +Inf) of one engine's histograms."""

    ttft: Sequence[float]
    tbt: Sequence[float]
    prompt_len: Sequence[float]
    output_len: Sequence[float]


@functools.lru_cache(maxsize=1024)
def _cdf_at_bounds(dist: _Cdf, bounds: tuple[float, ...]) -> tuple[float, ...]:
    """Share of observations at or below each bound, +Inf last (cached: a scrape of a
    large fleet would otherwise spend its time in erf)."""
    return (*(dist.cdf(le) for le in bounds), 1.0)


def _grow(
    buckets: tuple[float, ...], bounds: Sequence[float], dist: _Cdf | None, n: float
) -> tuple[float, ...]:
    """Cumulative bucket counts (last = +Inf) after ``n`` more observations of ``dist``."""
    base = buckets or (0.0,) * (len(bounds) + 1)
    if dist is None or n == 0:
        return base
    try:
        fractions = _cdf_at_bounds(dist, tuple(bounds))  # type: ignore[arg-type]  # checked below
    except TypeError:  # an unhashable distribution: compute each time
        fractions = (*(dist.cdf(le) for le in bounds), 1.0)
    return tuple(b + n * f for b, f in zip(base, fractions, strict=True))


@dataclass(frozen=True)
class _Instance:
    engine: ExporterEngine
    load: InstanceLoad
    since_s: float
    at_since: _Totals

    def totals(self, now_s: float, bounds: _Bounds) -> _Totals:
        dt = max(0.0, now_s - self.since_s)
        load, base = self.load, self.at_since
        ttft_n = load.requests_per_s * dt
        tbt_n = load.generation_tps * dt
        prompts, outputs = load.prompt_lengths, load.output_lengths
        return _Totals(
            prompt=base.prompt + load.prompt_tps * dt,
            cached=base.cached + load.cached_prompt_tps * dt,
            generation=base.generation + load.generation_tps * dt,
            ttft=base.ttft.grown(
                bounds.ttft, load.ttft, ttft_n, load.ttft.mean_s if load.ttft else 0.0
            ),
            tbt=base.tbt.grown(bounds.tbt, load.tbt, tbt_n, load.tbt.mean_s if load.tbt else 0.0),
            # One length observation per finished request, as many as reach a first token.
            prompt_len=base.prompt_len.grown(
                bounds.prompt_len, prompts, ttft_n, prompts.mean_tokens if prompts else 0.0
            ),
            output_len=base.output_len.grown(
                bounds.output_len, outputs, ttft_n, outputs.mean_tokens if outputs else 0.0
            ),
        )


class FleetExporter:
    """Engine and DCGM metrics of many simulated instances, served on one port.

    ``set_load`` and ``remove`` may be called while Prometheus scrapes (thread-safe).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        model_name: str = "sim-model",
        gpu_model: str = "NVIDIA H800",
        vllm_tbt_metric: str = "vllm:time_per_output_token_seconds",
        negotiate_openmetrics: bool = False,
        identity_labels: bool = True,
    ) -> None:
        self._clock = clock
        self.negotiate_openmetrics = negotiate_openmetrics
        self.identity_labels = identity_labels
        self.model_name = model_name
        self.gpu_model = gpu_model
        self.vllm_tbt_metric = vllm_tbt_metric
        self._instances: dict[InstanceKey, _Instance] = {}
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # a Collector is anything with collect()

    # -- the load generator API

    def set_load(
        self,
        service: str,
        role: Role,
        instance: str,
        load: InstanceLoad,
        *,
        engine: ExporterEngine = "vllm",
    ) -> None:
        """Start or change an instance's load. Counters continue from their current
        totals; changing an instance's engine restarts them (a new process)."""
        key = InstanceKey(service, role, instance)
        now_s = self._clock()
        with self._lock:
            if not self.identity_labels and set(self._instances) - {key}:
                raise ValueError("an exporter without identity labels plays exactly one instance")
            current = self._instances.get(key)
            if current is not None and current.engine == engine:
                totals = current.totals(now_s, _BOUNDS[engine])
            else:
                totals = _Totals()
            self._instances[key] = _Instance(engine, load, now_s, totals)

    def set_service(
        self,
        service: str,
        role: Role,
        instances: int,
        load: InstanceLoad,
        *,
        engine: ExporterEngine = "vllm",
        prefix: str | None = None,
    ) -> list[str]:
        """``instances`` identical instances named ``<prefix>-<i>``; returns their names."""
        names = [f"{prefix or f'{service}-{role}'}-{i}" for i in range(instances)]
        for name in names:
            self.set_load(service, role, name, load, engine=engine)
        return names

    def remove(self, service: str, role: Role, instance: str) -> None:
        """The instance stops exporting (its series go stale at the next scrape)."""
        with self._lock:
            self._instances.pop(InstanceKey(service, role, instance), None)

    def instances(self) -> list[InstanceKey]:
        with self._lock:
            return sorted(self._instances, key=lambda k: (k.service, k.role, k.instance))

    # -- exposition

    def bucket_bounds_s(
        self, engine: ExporterEngine, histogram: Literal["ttft", "tbt"]
    ) -> Sequence[float]:
        """Upper bounds (without +Inf) of an engine's TTFT or TBT histogram."""
        bounds = _BOUNDS[engine]
        return bounds.ttft if histogram == "ttft" else bounds.tbt

    @staticmethod
    def length_bounds(
        engine: ExporterEngine, histogram: Literal["prompt", "output"]
    ) -> Sequence[float]:
        """Upper bounds (without +Inf) of an engine's prompt- or output-length histogram."""
        bounds = _BOUNDS[engine]
        return bounds.prompt_len if histogram == "prompt" else bounds.output_len

    def _emit(self, sink: _Sink) -> None:
        """Every series of every instance, at one instant, into ``sink``."""
        now_s = self._clock()
        with self._lock:
            snapshot = list(self._instances.items())
        for key, inst in snapshot:
            bounds = _BOUNDS[inst.engine]
            totals = inst.totals(now_s, bounds)
            identity = (
                (("service", key.service), ("role", key.role), ("instance", key.instance))
                if self.identity_labels
                else ()
            )
            labels: Labels = (*identity, ("model_name", self.model_name))
            load = inst.load
            names = _VLLM_NAMES if inst.engine == "vllm" else _SGLANG_NAMES
            if inst.engine == "vllm":
                sink.sample("counter", "vllm:prefix_cache_queries", labels, totals.prompt)
            sink.sample("counter", names["prompt"], labels, totals.prompt)
            sink.sample("counter", names["cached"], labels, totals.cached)
            sink.sample("counter", names["generation"], labels, totals.generation)
            if load.ttft is not None:
                sink.histogram(names["ttft"], labels, bounds.ttft, totals.ttft)
            if load.tbt is not None:
                tbt_name = self.vllm_tbt_metric if inst.engine == "vllm" else names["tbt"]
                sink.histogram(tbt_name, labels, bounds.tbt, totals.tbt)
            if load.prompt_lengths is not None:
                sink.histogram(names["prompt_len"], labels, bounds.prompt_len, totals.prompt_len)
            if load.output_lengths is not None:
                sink.histogram(names["output_len"], labels, bounds.output_len, totals.output_len)
            if load.kv_usage is not None:
                sink.sample("gauge", names["kv"], labels, load.kv_usage)
            if load.waiting_requests is not None:
                sink.sample("gauge", names["waiting"], labels, load.waiting_requests)
            if load.running_requests is not None:
                sink.sample("gauge", names["running"], labels, load.running_requests)
            for gpu in range(load.gpus):
                gpu_labels: Labels = (
                    *labels,
                    ("gpu", str(gpu)),
                    ("UUID", f"GPU-{key.instance}-{gpu}"),
                    ("modelName", self.gpu_model),
                )
                if load.gpu_util_pct is not None:
                    sink.sample("gauge", "DCGM_FI_DEV_GPU_UTIL", gpu_labels, load.gpu_util_pct)
                if load.sm_active is not None:
                    sink.sample("gauge", "DCGM_FI_PROF_SM_ACTIVE", gpu_labels, load.sm_active)

    def collect(self) -> Iterator[Metric]:
        """The prometheus-client view (``self.registry``): metric families."""
        sink = _FamilySink()
        self._emit(sink)
        yield from sink.families.values()

    def render(self) -> bytes:
        """The classic text exposition (format 0.0.4) a scrape gets now.

        Written directly rather than through ``prometheus_client.generate_latest``,
        which spends ~25 us per line validating and escaping names: a 2,000-instance
        fleet would take seconds per scrape and miss 1 s scrape deadlines. The output
        is the same (the tests parse both and compare).
        """
        sink = _TextSink()
        self._emit(sink)
        return sink.text()

    # -- serving

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if self.negotiate_openmetrics:
            encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
            body = encoder(self.registry)
        else:
            body, content_type = self.render(), CONTENT_TYPE_LATEST
        start_response(
            "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        )
        return [body]

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve the metrics on ``http://host:port/`` (any path; 0 = a free port) and
        return the port.

        By default the classic text format is served whatever the scraper asks for:
        prometheus-client 0.26 answers OpenMetrics requests with ``:`` in metric names
        escaped to ``_`` (prometheus/client_python#1177), so real engines built on it
        end up as ``vllm_prompt_tokens_total`` in Prometheus. ``negotiate_openmetrics``
        reproduces that behaviour (the presets accept both spellings).
        """
        if self._server is not None:
            raise RuntimeError("exporter already started")
        server = make_server(host, port, self._wsgi, _ThreadingServer, handler_class=_QuietHandler)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="fleet-exporter", daemon=True
        )
        self._thread.start()
        return int(server.server_port)

    @property
    def address(self) -> str:
        """``host:port`` to scrape."""
        if self._server is None:
            raise RuntimeError("exporter not started")
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def stop(self) -> None:
        """Stop serving: the scrape target vanishes."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> FleetExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


Labels = tuple[tuple[str, str], ...]
_BOUNDS: dict[ExporterEngine, _Bounds] = {
    "vllm": _Bounds(
        VLLM_TTFT_BUCKETS_S, VLLM_ITL_BUCKETS_S, VLLM_LENGTH_BUCKETS, VLLM_LENGTH_BUCKETS
    ),
    "sglang": _Bounds(
        VLLM_TTFT_BUCKETS_S, SGLANG_ITL_BUCKETS_S, SGLANG_PROMPT_BUCKETS, SGLANG_GENERATION_BUCKETS
    ),
}
_VLLM_NAMES = {
    "prompt": "vllm:prompt_tokens",
    "cached": "vllm:prefix_cache_hits",
    "generation": "vllm:generation_tokens",
    "ttft": "vllm:time_to_first_token_seconds",
    "kv": "vllm:kv_cache_usage_perc",
    "waiting": "vllm:num_requests_waiting",
    "running": "vllm:num_requests_running",
    "prompt_len": "vllm:request_prompt_tokens",
    "output_len": "vllm:request_generation_tokens",
}
_SGLANG_NAMES = {
    "prompt": "sglang:prompt_tokens",
    "cached": "sglang:cached_tokens",
    "generation": "sglang:generation_tokens",
    "ttft": "sglang:time_to_first_token_seconds",
    "tbt": "sglang:inter_token_latency_seconds",
    "kv": "sglang:token_usage",
    "waiting": "sglang:num_queue_reqs",
    "running": "sglang:num_running_reqs",
    "prompt_len": "sglang:prompt_tokens_histogram",
    "output_len": "sglang:generation_tokens_histogram",
}
_HELP = {
    "vllm:prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "vllm:prompt_tokens": "Number of prefill tokens processed.",
    "vllm:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "vllm:generation_tokens": "Number of generation tokens processed.",
    "vllm:time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "sglang:num_queue_reqs": "The number of requests in the waiting queue.",
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "sglang:num_running_reqs": "The number of running requests.",
    "vllm:request_prompt_tokens": "Number of prefill tokens processed.",
    "vllm:request_generation_tokens": "Number of generation tokens processed.",
    "sglang:prompt_tokens": "Number of prefill tokens processed.",
    "sglang:cached_tokens": "Number of cached prompt tokens.",
    "sglang:generation_tokens": "Number of generation tokens processed.",
    "sglang:time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "sglang:inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "sglang:token_usage": "The token usage.",
    "sglang:prompt_tokens_histogram": "Histogram of prompt token length.",
    "sglang:generation_tokens_histogram": "Histogram of generation token length.",
    "DCGM_FI_DEV_GPU_UTIL": "GPU utilization (in %).",
    "DCGM_FI_PROF_SM_ACTIVE": "The ratio of cycles an SM has at least 1 warp assigned.",
}


def _help(name: str) -> str:
    return _HELP.get(name, "Inter-token latency in seconds.")


class _Sink(Protocol):
    """Where the exporter writes its samples; ``_FamilySink`` and ``_TextSink`` implement
    it, hence their matching signatures."""

    def sample(self, kind: str, name: str, labels: Labels, value: float) -> None: ...

    def histogram(
        self, name: str, labels: Labels, bounds: Sequence[float], histogram: _Histogram
    ) -> None: ...


class _FamilySink:
    """Collects prometheus-client metric families."""

    _CLASSES: ClassVar[dict[str, Any]] = {
        "counter": CounterMetricFamily,
        "gauge": GaugeMetricFamily,
        "histogram": HistogramMetricFamily,
    }

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}

    def _family(self, kind: str, name: str, label_names: Sequence[str]) -> Any:
        if name not in self.families:
            self.families[name] = self._CLASSES[kind](name, _help(name), labels=list(label_names))
        return self.families[name]

    def sample(self, kind: str, name: str, labels: Labels, value: float) -> None:
        self._family(kind, name, [n for n, _ in labels]).add_metric([v for _, v in labels], value)

    def histogram(
        self, name: str, labels: Labels, bounds: Sequence[float], histogram: _Histogram
    ) -> None:
        self._family("histogram", name, [n for n, _ in labels]).add_metric(
            [v for _, v in labels],
            buckets=_bucket_pairs(bounds, histogram.buckets),
            sum_value=histogram.sum,
        )


class _TextSink:
    """Writes the classic text format directly, family by family."""

    def __init__(self) -> None:
        self._lines: dict[str, list[str]] = {}

    def _lines_of(self, kind: str, name: str) -> list[str]:
        lines = self._lines.get(name)
        if lines is None:
            exposed = name + "_total" if kind == "counter" else name
            lines = self._lines[name] = [
                f"# HELP {exposed} {_help(name)}",
                f"# TYPE {exposed} {kind}",
            ]
        return lines

    @staticmethod
    def _labels(labels: Labels) -> str:
        return ",".join(f'{n}="{_escape(v)}"' for n, v in labels)

    def sample(self, kind: str, name: str, labels: Labels, value: float) -> None:
        exposed = name + "_total" if kind == "counter" else name
        self._lines_of(kind, name).append(f"{exposed}{{{self._labels(labels)}}} {_number(value)}")

    def histogram(
        self, name: str, labels: Labels, bounds: Sequence[float], histogram: _Histogram
    ) -> None:
        lines = self._lines_of("histogram", name)
        label_text = self._labels(labels)
        for le, count in _bucket_pairs(bounds, histogram.buckets):
            lines.append(f'{name}_bucket{{{label_text},le="{le}"}} {_number(count)}')
        lines.append(f"{name}_count{{{label_text}}} {_number(histogram.buckets[-1])}")
        lines.append(f"{name}_sum{{{label_text}}} {_number(histogram.sum)}")

    def text(self) -> bytes:
        return ("\n".join(line for lines in self._lines.values() for line in lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _bucket_pairs(bounds: Sequence[float], cumulative: Sequence[float]) -> list[tuple[str, float]]:
    return [(_le(b), c) for b, c in zip([*bounds, math.inf], cumulative, strict=True)]


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


# ----------------------------------------------------------------------------- expectations


def bucket_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[float]) -> float:
    """Prometheus' ``histogram_quantile`` over one histogram: ``bounds`` are the finite
    upper bounds, ``cumulative`` the counts per bound plus the +Inf count last. Linear
    interpolation inside the bucket holding the rank; the +Inf bucket answers with the
    highest finite bound; no observations give NaN."""
    if len(cumulative) != len(bounds) + 1:
        raise ValueError("cumulative needs one count per bound plus the +Inf count")
    total = cumulative[-1]
    if total <= 0:
        return math.nan
    rank = q * total
    b = next(i for i, c in enumerate(cumulative) if c >= rank)
    if b == len(bounds):
        return bounds[-1]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start = 0.0 if b == 0 else bounds[b - 1]
    below = 0.0 if b == 0 else cumulative[b - 1]
    in_bucket = cumulative[b] - below
    return start + (bounds[b] - start) * (rank - below) / in_bucket


def expected_histogram_quantile_s(
    q: float,
    bounds: Sequence[float],
    components: Iterable[tuple[float, LatencyDistribution]],
) -> float:
    """What ``histogram_quantile(q, sum(rate(..._bucket)))`` reports for instances that
    observe ``rate`` samples/s of each distribution into histograms with ``bounds``."""
    parts = list(components)
    cumulative = [sum(rate * dist.cdf(le) for rate, dist in parts) for le in bounds] + [
        sum(rate for rate, _ in parts)
    ]
    return bucket_quantile(q, bounds, cumulative)


def expected_length_buckets(
    bounds: Sequence[float], components: Iterable[tuple[float, LengthDistribution]]
) -> tuple[float, ...]:
    """What ``sum(rate(..._bucket))`` reports per bound (+Inf last) for instances that
    finish ``rate`` requests/s with each length distribution."""
    parts = list(components)
    return (
        *(sum(rate * dist.cdf(le) for rate, dist in parts) for le in bounds),
        sum(rate for rate, _ in parts),
    )


def scaled(load: InstanceLoad, factor: float) -> InstanceLoad:
    """``load`` with every rate multiplied by ``factor`` (latencies unchanged)."""
    return replace(
        load,
        prompt_tps=load.prompt_tps * factor,
        cached_prompt_tps=load.cached_prompt_tps * factor,
        generation_tps=load.generation_tps * factor,
        requests_per_s=load.requests_per_s * factor,
    )

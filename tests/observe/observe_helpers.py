"""Helpers of the observe tests: policies, the simulated fleet's scenarios, backfilled
history, and loopback servers (a counting proxy, a scriptable fake Prometheus).

A uniquely named module (not conftest) so test modules can import it without clashing
with other areas' conftest files.
"""

from __future__ import annotations

import json
import math
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from loopback import LoopbackServer
from ruamel.yaml import YAML

from reconciler.desired import ServicePolicy, load_desired_state
from reconciler.desired.models import MetricsConfig
from reconciler.observe.exporter import (
    ONE_TOKEN,
    SGLANG_ITL_BUCKETS_S,
    VLLM_ITL_BUCKETS_S,
    VLLM_TTFT_BUCKETS_S,
    DiscreteLengths,
    FleetExporter,
    InstanceLoad,
    Lognormal,
    expected_histogram_quantile_s,
    expected_length_buckets,
)
from reconciler.observe.local_prometheus import LocalPrometheus, find_binary
from reconciler.observe.presets import LENGTH_NAMES
from reconciler.observe.prometheus import PrometheusSettings
from reconciler.sim.hand_targets import with_hand_targets
from reconciler.state import METRIC_NAMES

REPO_ROOT = Path(__file__).resolve().parents[2]
# With the hand-set targets the paper policy's ``decide`` (used by these tests) scales on.
_BASE_POLICY: ServicePolicy = with_hand_targets(load_desired_state(REPO_ROOT).policies["chat"])

RATE_WINDOW_S = 10.0
"""Rate window of the live tests: ten 1 s scrape intervals. The simulated exporter
computes its counters a little after Prometheus stamps the scrape (its HTTP thread
shares the GIL with the other exporters and the test); a jitter d in that delay moves a
rate by about d / window, so a longer window keeps it well under 1 %."""

RATE_TOLERANCE = 0.1
"""How close a rate read over ``RATE_WINDOW_S`` must come to the injected one. The
jitter above is usually tens of milliseconds, but in full-suite runs on the 2-core
machine, with the API server and other fixtures' threads alive, a scrape answered
~0.7 s late has moved a rate by 7.7% (a mix total read 6.46 for 6.0). Every check that
uses this guards errors far larger (a missed prefix-cache subtraction is 25%, a wrong
window or role a factor); proportions and quantiles are compared exactly or to 1%."""


WINDOW_OFFSET_S = 1.0
"""The adapter's counter and histogram windows end one scrape interval (1 s) before the
evaluation time (``PrometheusSettings.window_offset``): a window ending at ``t`` is read
by evaluating at ``t + WINDOW_OFFSET_S``."""


def make_policy(
    name: str,
    *,
    engine: str = "vllm",
    quantile: float = 0.9,
    max_age_s: float = 90.0,
    metrics: dict[str, Any] | None = None,
    scaling_metric: str = "decode_tps",
) -> ServicePolicy:
    """A valid policy (the example 'chat' service) under another name and settings."""
    base = _BASE_POLICY
    return base.model_copy(
        update={
            "name": name,
            "engine": engine,
            "slo": base.slo.model_copy(update={"quantile": quantile}),
            "scaling": base.scaling.model_copy(
                update={"metric_max_age_s": max_age_s, "metric": scaling_metric}
            ),
            "metrics": MetricsConfig(**(metrics or {})),
        }
    )


REQUESTS_PER_CYCLE = len(METRIC_NAMES) + len(LENGTH_NAMES)
"""HTTP requests of one cycle: one per signal and one per request-mix histogram."""


def settings_for(url: str, **overrides: Any) -> PrometheusSettings:
    """Settings of the test Prometheus: 1 s scrapes (and history), ``RATE_WINDOW_S``."""
    values: dict[str, Any] = {
        "url": url,
        "rate_window_s": RATE_WINDOW_S,
        "scrape_interval_s": 1.0,
        "timeout_s": 5.0,
    }
    values.update(overrides)
    return PrometheusSettings(**values)


# ----------------------------------------------------------------------------- live scenarios

TTFT = Lognormal.from_median_p90(0.25, 0.5)
TBT = Lognormal.from_median_p90(0.03, 0.05)
SLOW_TBT = Lognormal.from_median_p90(0.06, 0.12)

# The request mix. 25,000-token prompts lie beyond vLLM's last finite bound (20,000 for
# max_model_len 32,768), so the +Inf bucket matters; SGLang's bounds reach 40,000.
PROMPTS = DiscreteLengths(((150.0, 0.4), (800.0, 0.3), (3000.0, 0.2), (25000.0, 0.1)))
OUTPUTS = DiscreteLengths(((40.0, 0.5), (300.0, 0.3), (1500.0, 0.2)))

# As on a real P/D fleet, both roles record both lengths: prefill ends every request
# after one token, decode sees the prompt too (at a different request rate here, so a
# query reading the wrong role would be caught by the totals).
PREFILL = InstanceLoad(
    prompt_tps=1200.0,
    cached_prompt_tps=300.0,
    requests_per_s=2.0,
    ttft=TTFT,
    gpus=2,
    gpu_util_pct=60.0,
    sm_active=0.5,
    prompt_lengths=PROMPTS,
    output_lengths=ONE_TOKEN,
    waiting_requests=4.0,
)
DECODE = InstanceLoad(
    generation_tps=700.0,
    requests_per_s=2.0,
    tbt=TBT,
    kv_usage=0.5,
    gpus=1,
    gpu_util_pct=95.0,
    sm_active=0.8,
    prompt_lengths=PROMPTS,
    output_lengths=OUTPUTS,
    waiting_requests=2.0,
    running_requests=24.0,
)


@dataclass
class Scenario:
    """Instances of one service: (role, instance name, load, engine)."""

    engine: str = "vllm"
    instances: list[tuple[str, str, InstanceLoad]] = field(default_factory=list)

    def add(self, role: str, count: int, load: InstanceLoad, prefix: str) -> Scenario:
        self.instances += [(role, f"{prefix}-{role}-{i}", load) for i in range(count)]
        return self

    def loads(self, role: str) -> list[InstanceLoad]:
        return [load for r, _name, load in self.instances if r == role]


def _standard(name: str, engine: str = "vllm") -> Scenario:
    return Scenario(engine).add("prefill", 3, PREFILL, name).add("decode", 5, DECODE, name)


def _mixed_tbt(name: str) -> Scenario:
    scenario = Scenario().add("prefill", 3, PREFILL, name).add("decode", 3, DECODE, name)
    return scenario.add(
        "decode", 1, InstanceLoad(generation_tps=700.0, tbt=SLOW_TBT), name + "-slow"
    )


def _without_mix(name: str) -> Scenario:
    """An engine that exports no length histograms (SGLang without
    --collect-tokens-histogram): every other signal as usual."""
    prefill = replace(PREFILL, prompt_lengths=None, output_lengths=None)
    decode = replace(DECODE, prompt_lengths=None, output_lengths=None)
    return Scenario().add("prefill", 3, prefill, name).add("decode", 5, decode, name)


def _idle_mix(name: str) -> Scenario:
    """Histograms exported but no request finishing: every bucket's rate is zero."""
    prefill, decode = replace(PREFILL, requests_per_s=0.0), replace(DECODE, requests_per_s=0.0)
    return Scenario().add("prefill", 1, prefill, name).add("decode", 1, decode, name)


def _gauges(name: str) -> Scenario:
    scenario = Scenario()
    scenario.instances += [
        ("prefill", f"{name}-p0", InstanceLoad(gpus=2, gpu_util_pct=60.0, sm_active=0.3)),
        ("prefill", f"{name}-p1", InstanceLoad(gpus=1, gpu_util_pct=90.0, sm_active=0.6)),
        ("decode", f"{name}-d0", InstanceLoad(kv_usage=0.2, gpus=1, gpu_util_pct=99.0)),
        ("decode", f"{name}-d1", InstanceLoad(kv_usage=0.6, gpus=1, gpu_util_pct=97.0)),
    ]
    return scenario


FLEET_SIZE = 100
FLEET_QUANTILES = (0.9, 0.95, 0.99)
FLEET_DECODE = InstanceLoad(
    generation_tps=100.0,
    requests_per_s=1.0,
    tbt=TBT,
    kv_usage=0.3,
    gpu_util_pct=80.0,
    sm_active=0.6,
    output_lengths=OUTPUTS,
    waiting_requests=0.0,
    running_requests=12.0,
)
FLEET_PREFILL = InstanceLoad(
    prompt_tps=400.0,
    requests_per_s=1.0,
    ttft=TTFT,
    gpu_util_pct=50.0,
    sm_active=0.4,
    prompt_lengths=PROMPTS,
    waiting_requests=1.0,
)
FLEET_DECODE_OVERRIDE = (
    'sum by (service, role) (rate(vllm:generation_tokens_total{role="decode"}[$__window]))'
)


def fleet_policies() -> list[ServicePolicy]:
    """100 services: vLLM and SGLang, three SLO quantiles, five with a query override."""
    policies = []
    for i in range(FLEET_SIZE):
        engine = "vllm" if i % 2 == 0 else "sglang"
        metrics = {"queries": {"decode_tps": FLEET_DECODE_OVERRIDE}} if i % 20 == 0 else None
        policies.append(
            make_policy(
                f"fleet-{i:03d}",
                engine=engine,
                quantile=FLEET_QUANTILES[i % len(FLEET_QUANTILES)],
                metrics=metrics,
            )
        )
    return policies


MAIN_SCENARIOS: dict[str, Scenario] = {
    "live-tps": _standard("live-tps"),
    "live-p99": _mixed_tbt("live-p99"),
    "live-sglang": _standard("live-sglang", engine="sglang"),
    "live-gauges": _gauges("live-gauges"),
    "live-remove": _standard("live-remove"),
    "live-nomix": _without_mix("live-nomix"),
    "live-idle-mix": _idle_mix("live-idle-mix"),
}
FLEET_SCENARIOS: dict[str, Scenario] = {
    policy.name: Scenario(policy.engine)
    .add("prefill", 1, FLEET_PREFILL, policy.name)
    .add("decode", 1, FLEET_DECODE, policy.name)
    for policy in fleet_policies()
}
OPENMETRICS_SCENARIOS: dict[str, Scenario] = {
    "om-vllm": _standard("om-vllm"),
    "om-sglang": _standard("om-sglang", engine="sglang"),
}
VANISHING_SCENARIOS: dict[str, Scenario] = {"live-vanish": _standard("live-vanish")}


def register(exporter: FleetExporter, scenarios: dict[str, Scenario]) -> None:
    for service, scenario in scenarios.items():
        for role, instance, load in scenario.instances:
            exporter.set_load(service, role, instance, load, engine=scenario.engine)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- backfill

BACKFILL_SPAN_S = 600
"""Ten minutes of history at 1 s resolution, ending at ``backfill_end_s``."""


class OpenMetricsWriter:
    """Untyped OpenMetrics samples for ``promtool tsdb create-blocks-from openmetrics``
    (one series at a time, timestamps increasing, ``# EOF`` at the end)."""

    def __init__(self) -> None:
        self._series: list[tuple[str, dict[str, str], list[tuple[float, float]]]] = []

    def add(
        self, name: str, labels: dict[str, str], samples: Iterable[tuple[float, float]]
    ) -> None:
        self._series.append((name, labels, list(samples)))

    def text(self) -> str:
        lines = []
        for name, labels, samples in sorted(self._series, key=lambda s: s[0]):
            label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            for at_s, value in samples:
                lines.append(f"{name}{{{label_text}}} {_om_value(value)} {at_s:.3f}")
        return "\n".join([*lines, "# EOF", ""])


def _om_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


HIST_BOUNDS = (0.1, 0.5, 1.0)
HIST_PER_S = (10.0, 60.0, 90.0, 100.0)  # cumulative observations/s per bound, +Inf last
JOIN_UTIL = {"p0": ("decode", 30.0), "p1": ("decode", 60.0), "p2": ("prefill", 90.0)}
MIX_BOUNDS = (100.0, 1000.0)
MIX_PROMPT_PER_S = (2.0, 5.0, 8.0)  # per prefill instance (2 of them), +Inf last
MIX_OUTPUT_PER_S = (1.0, 3.0, 4.0)  # per decode instance (3 of them), +Inf last
MIX_STALE_LAST_S = 30.0  # bf-mix-stale's histograms end this long before the end
# bf-gap and bf-newpod: history that resumes GAP_RESUMED_BEFORE_END_S before the end
# after GAP_S seconds without samples (a Prometheus restart, a target back after a gap).
GAP_RESUMED_BEFORE_END_S = 60.0
GAP_S = 120.0
GAP_DECODE_PER_S = 1300.0  # per decode instance (3 of them): the chat policy's target


def _histogram(
    w: OpenMetricsWriter,
    name: str,
    labels: dict[str, str],
    per_s: tuple[float, ...],
    times: list[float],
    *,
    nan_inf_bucket: bool = False,
) -> None:
    """Buckets (``MIX_BOUNDS`` and +Inf) growing at ``per_s`` observations/s, and the
    ``_count`` the freshness query reads."""
    start = times[0]
    for bound, rate in zip([*map(repr, MIX_BOUNDS), "+Inf"], per_s, strict=True):
        nan = nan_inf_bucket and bound == "+Inf"
        w.add(
            f"{name}_bucket",
            {**labels, "le": bound},
            [(t, math.nan if nan else rate * (t - start)) for t in times],
        )
    w.add(f"{name}_count", labels, [(t, per_s[-1] * (t - start)) for t in times])


def build_backfill(end_s: float) -> str:
    """Exactly known history (see the backfill tests for what each series proves)."""
    w = OpenMetricsWriter()
    times = [end_s - BACKFILL_SPAN_S + i for i in range(BACKFILL_SPAN_S + 1)]
    start = times[0]
    for i in range(3):  # bf-tps: decode 3 x 100 tokens/s
        labels = {"service": "bf-tps", "role": "decode", "instance": f"d{i}"}
        w.add("vllm:generation_tokens_total", labels, [(t, 100.0 * (t - start)) for t in times])
    for i in range(2):  # bf-tps: prefill 2 x (500 - 125 cached) tokens/s
        labels = {"service": "bf-tps", "role": "prefill", "instance": f"p{i}"}
        w.add("vllm:prompt_tokens_total", labels, [(t, 500.0 * (t - start)) for t in times])
        w.add("vllm:prefix_cache_hits_total", labels, [(t, 125.0 * (t - start)) for t in times])
    for i in range(2):  # bf-hist: TTFT histogram with exactly known bucket rates
        labels = {"service": "bf-hist", "role": "prefill", "instance": f"p{i}"}
        for bound, per_s in zip([*map(repr, HIST_BOUNDS), "+Inf"], HIST_PER_S, strict=True):
            w.add(
                "vllm:time_to_first_token_seconds_bucket",
                {**labels, "le": bound},
                [(t, per_s * (t - start)) for t in times],
            )
        w.add(
            "vllm:time_to_first_token_seconds_count",
            labels,
            [(t, HIST_PER_S[-1] * (t - start)) for t in times],
        )
    # bf-mix: exactly known request mix. The prefill instances' output histogram holds
    # their one-token hand-overs and must not be read.
    for i in range(2):
        labels = {"service": "bf-mix", "role": "prefill", "instance": f"p{i}"}
        _histogram(w, "vllm:request_prompt_tokens", labels, MIX_PROMPT_PER_S, times)
        _histogram(w, "vllm:request_generation_tokens", labels, (8.0, 8.0, 8.0), times)
    for i in range(3):
        labels = {"service": "bf-mix", "role": "decode", "instance": f"d{i}"}
        _histogram(w, "vllm:request_generation_tokens", labels, MIX_OUTPUT_PER_S, times)
    # bf-mix-nan: a NaN bucket in the prompt histogram; the output histogram is fine.
    labels = {"service": "bf-mix-nan", "role": "prefill", "instance": "p0"}
    _histogram(
        w, "vllm:request_prompt_tokens", labels, MIX_PROMPT_PER_S, times, nan_inf_bucket=True
    )
    labels = {"service": "bf-mix-nan", "role": "decode", "instance": "d0"}
    _histogram(w, "vllm:request_generation_tokens", labels, MIX_OUTPUT_PER_S, times)
    # bf-mix-stale: both histograms end MIX_STALE_LAST_S before the end.
    early = [t for t in times if t <= end_s - MIX_STALE_LAST_S]
    for role, name in (
        ("prefill", "vllm:request_prompt_tokens"),
        ("decode", "vllm:request_generation_tokens"),
    ):
        labels = {"service": "bf-mix-stale", "role": role, "instance": f"{role}-0"}
        _histogram(w, name, labels, MIX_PROMPT_PER_S, early)
    _gap_history(w, end_s, times)
    kv_series = {
        "bf-stale": (0.7, end_s - 120),  # last sample 120 s before the end: older than 90 s
        "bf-fresh": (0.3, end_s - 30),
        "bf-nan": (math.nan, end_s),
        "bf-inf": (math.inf, end_s),
    }
    for service, (value, last_s) in kv_series.items():
        labels = {"service": service, "role": "decode", "instance": "d0"}
        w.add("vllm:kv_cache_usage_perc", labels, [(t, value) for t in times if t <= last_s])
    for pod, (role, util) in JOIN_UTIL.items():  # bf-join: DCGM without service labels
        w.add(
            "DCGM_FI_DEV_GPU_UTIL",
            {"namespace": "ns-join", "pod": pod, "gpu": "0", "UUID": f"GPU-{pod}"},
            [(t, util) for t in times],
        )
        w.add(
            "kube_pod_labels",
            {
                "namespace": "ns-join",
                "pod": pod,
                "label_heteroscale_io_service": "bf-join",
                "label_heteroscale_io_role": role,
            },
            [(t, 1.0) for t in times],
        )
    return w.text()


def _gap_history(w: OpenMetricsWriter, end_s: float, times: list[float]) -> None:
    """bf-gap: every series of the service has no sample for ``GAP_S`` seconds before
    ``end_s - GAP_RESUMED_BEFORE_END_S`` (as after a Prometheus restart); the counters
    carry on where they were (the engines kept running). bf-newpod: two decode pods
    with the whole history and a third whose history starts at the resumption."""
    resumed = end_s - GAP_RESUMED_BEFORE_END_S
    start = times[0]
    gapped = [t for t in times if t < resumed - GAP_S or t >= resumed]
    for i in range(3):
        labels = {"service": "bf-gap", "role": "decode", "instance": f"d{i}"}
        w.add(
            "vllm:generation_tokens_total",
            labels,
            [(t, GAP_DECODE_PER_S * (t - start)) for t in gapped],
        )
        _histogram(w, "vllm:request_generation_tokens", labels, MIX_OUTPUT_PER_S, gapped)
    for i in range(2):
        labels = {"service": "bf-gap", "role": "prefill", "instance": f"p{i}"}
        for bound, per_s in zip([*map(repr, HIST_BOUNDS), "+Inf"], HIST_PER_S, strict=True):
            w.add(
                "vllm:time_to_first_token_seconds_bucket",
                {**labels, "le": bound},
                [(t, per_s * (t - start)) for t in gapped],
            )
        w.add(
            "vllm:time_to_first_token_seconds_count",
            labels,
            [(t, HIST_PER_S[-1] * (t - start)) for t in gapped],
        )
        _histogram(w, "vllm:request_prompt_tokens", labels, MIX_PROMPT_PER_S, gapped)
    late = [t for t in times if t >= resumed]
    for i, samples in enumerate((times, times, late)):
        labels = {"service": "bf-newpod", "role": "decode", "instance": f"d{i}"}
        first = samples[0]
        w.add(
            "vllm:generation_tokens_total",
            labels,
            [(t, GAP_DECODE_PER_S * (t - first)) for t in samples],
        )


# ----------------------------------------------------------------------------- the stack


EXAMPLE_SCRAPE_CONFIG = (
    REPO_ROOT / "scripts" / "prometheus" / "kubernetes-scrape-config.example.yaml"
)
ENGINE_JOB = "heteroscale-engines"
RELABEL_SERVICE = "relabel-svc"


def example_scrape_config() -> dict[str, Any]:
    return YAML(typ="safe").load(EXAMPLE_SCRAPE_CONFIG.read_text())  # type: ignore[no-any-return,unused-ignore]


def example_engine_job(file_sd: Path, scrape_interval: str = "1s") -> dict[str, Any]:
    """The example's engine job with Kubernetes discovery swapped for a file-SD file that
    carries the same ``__meta_kubernetes_*`` labels (Debian's Prometheus has no
    Kubernetes discovery, and the tests have no cluster)."""
    job = next(j for j in example_scrape_config()["scrape_configs"] if j["job_name"] == ENGINE_JOB)
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(file_sd)], "refresh_interval": "1s"}]
    job["scrape_interval"] = job["scrape_timeout"] = scrape_interval
    return job


def pod_target(address: str, *, service: str | None, role: str, pod: str) -> dict[str, Any]:
    """A file-SD target group shaped like a discovered engine pod."""
    host, port = address.rsplit(":", 1)
    labels = {
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": port,
        "__meta_kubernetes_pod_label_heteroscale_io_role": role,
        "__meta_kubernetes_namespace": "serving",
        "__meta_kubernetes_pod_name": pod,
    }
    if service is not None:
        labels["__meta_kubernetes_pod_label_heteroscale_io_service"] = service
    # Discovery reports the pod IP with the container port; the relabelling rewrites it.
    return {"targets": [f"{host}:1"], "labels": labels}


@dataclass
class PrometheusStack:
    prometheus: LocalPrometheus
    main: FleetExporter
    fleet: FleetExporter
    openmetrics: FleetExporter
    vanishing: FleetExporter
    pods: list[FleetExporter]
    backfill_end_s: float
    scenarios: dict[str, Scenario]
    written: list[TextExporter]  # engines written by hand (``written_engines``)
    scraping_since_s: float  # when Prometheus found every target up

    @property
    def url(self) -> str:
        return self.prometheus.url

    def wait_written_scraped_for(self, seconds: float) -> None:
        """Until the hand-written engines have been scraped for ``seconds``: the wait of
        the first test that needs it, none for the tests after."""
        time.sleep(max(0.0, self.scraping_since_s + seconds - time.time()))

    def targets_of(self, services: Iterable[str]) -> list[str]:
        """The scrape targets (exporter addresses) that export any of ``services``."""
        wanted = set(services)
        exporters = (self.main, self.fleet, self.openmetrics, self.vanishing, *self.pods)
        return [
            exporter.address
            for exporter in exporters
            if any(key.service in wanted for key in exporter.instances())
        ]

    def settled_now(self, *services: str, extra_s: float = 0.0) -> float:
        """An evaluation time at which the adapter reads ``services`` from cleanly
        scraped windows: ``wait_for_clean_window`` on the targets that export them."""
        return wait_for_clean_window(self.url, self.targets_of(services), extra_s=extra_s)


# ----------------------------------------------------------------------------- clean windows

MAX_CLEAN_SCRAPE_S = 0.75 * RATE_TOLERANCE * (RATE_WINDOW_S - 1.0)
"""The longest scrape of a window that counts as clean (0.675 s). A scrape's samples are
stamped with its start but the exporter computes its counters somewhere within it, so a
rate read over ``RATE_WINDOW_S`` (at least nine 1 s intervals between its first and last
sample) is off by at most this / 9: three quarters of ``RATE_TOLERANCE``. (Under four
CPU burners the OpenMetrics exporter's scrapes take 0.5 to 0.6 s for minutes on end.)"""

CLEAN_WINDOW_TIMEOUT_S = 60.0
"""How long a live test waits for a cleanly scraped window before it fails."""

RECORDING_LAG_S = 3.0
"""``extra_s`` for tests that read the recording rules too: a late rule evaluation reads
a window ending up to this much before the adapter's."""


@dataclass(frozen=True)
class ScrapeHealth:
    """Per target, over the window a read at ``at_s`` uses: the lowest ``up``, the
    longest scrape and the number of scrapes."""

    at_s: float
    up_min: dict[str, float]
    duration_max: dict[str, float]
    scrapes: dict[str, int]

    def problems(self, targets: Iterable[str], needed: int, max_duration_s: float) -> list[str]:
        out = []
        for target in targets:
            up, took = self.up_min.get(target), self.duration_max.get(target)
            count = self.scrapes.get(target, 0)
            if up is None or up < 1:
                out.append(f"{target}: a scrape failed (min up {up})")
            if took is None or took > max_duration_s:
                out.append(f"{target}: a scrape took {took} s (> {max_duration_s} s)")
            if count < needed:
                out.append(f"{target}: {count} scrapes in the window (< {needed})")
        return out


def _per_target(url: str, promql: str, at_s: float) -> dict[str, float]:
    response = requests.get(
        f"{url}/api/v1/query", params={"query": promql, "time": f"{at_s:.3f}"}, timeout=10
    )
    response.raise_for_status()
    return {
        series["metric"].get("instance", ""): float(series["value"][1])
        for series in response.json()["data"]["result"]
    }


def scrape_health(
    url: str, at_s: float, *, window_s: float, offset_s: float, extra_s: float = 0.0
) -> ScrapeHealth:
    """``ScrapeHealth`` of every target of the Prometheus at ``url``, evaluated at
    ``at_s``: ``up`` and durations from the window's start (``extra_s`` earlier) up to
    ``at_s``, the scrape count over the window itself (ending ``offset_s`` before)."""
    span = f"{math.ceil((window_s + offset_s + extra_s) * 1000)}ms"
    window = f"{math.ceil(window_s * 1000)}ms"
    offset = f" offset {math.ceil(offset_s * 1000)}ms" if offset_s > 0 else ""
    return ScrapeHealth(
        at_s,
        _per_target(url, f"min_over_time(up[{span}])", at_s),
        _per_target(url, f"max_over_time(scrape_duration_seconds[{span}])", at_s),
        {
            target: int(count)
            for target, count in _per_target(
                url, f"count_over_time(up[{window}]{offset})", at_s
            ).items()
        },
    )


def wait_for_clean_window(
    url: str,
    targets: Iterable[str],
    *,
    window_s: float = RATE_WINDOW_S,
    offset_s: float = WINDOW_OFFSET_S,
    scrape_interval_s: float = 1.0,
    extra_s: float = 0.0,
    max_duration_s: float = MAX_CLEAN_SCRAPE_S,
    timeout_s: float = CLEAN_WINDOW_TIMEOUT_S,
) -> float:
    """Wait until the window that a read *now* would use has been scraped cleanly from
    every one of ``targets`` and return that evaluation time; read at exactly it.

    Clean: every scrape from ``extra_s`` before the window's start on succeeded
    (``up`` 1) and took at most ``max_duration_s``, and the window (``window_s`` ending
    ``offset_s`` before the time) holds a scrape every ``scrape_interval_s``. On a
    starved machine scrapes time out, answer late or are skipped; Prometheus then
    really lacks samples and the adapter rightly reads the signal low or missing. The
    live tests assert what the adapter makes of a fully scraped window, so they wait
    for one; a window of scrapes already finished does not change afterwards (an
    unfinished one shows as a missing sample and is waited for). Fails, saying what
    was unclean, if no window is clean within ``timeout_s``: never reads an unclean one.
    """
    targets = sorted(set(targets))
    assert targets, "no scrape target exports the services to read"
    needed = math.floor(window_s / scrape_interval_s + 1e-9)
    deadline = time.monotonic() + timeout_s
    attempts = 0
    while True:
        at_s = time.time()
        health = scrape_health(url, at_s, window_s=window_s, offset_s=offset_s, extra_s=extra_s)
        attempts += 1
        problems = health.problems(targets, needed, max_duration_s)
        if not problems:
            return at_s
        if time.monotonic() > deadline:
            raise AssertionError(
                f"scrapes were not clean: no window of {window_s:g} s (ending {offset_s:g} s "
                f"before the read, plus {extra_s:g} s before it) was scraped cleanly from "
                f"{targets} within {timeout_s:g} s ({attempts} checks; the machine is "
                f"likely starved of CPU). Last check, at {at_s:.3f}: " + "; ".join(problems)
            )
        time.sleep(0.5)


# ----------------------------------------------------------------------------- loopback helpers


# The loopback base, under the name this module's servers and tests use.
_Server = LoopbackServer


class CountingProxy(_Server):
    """Forwards every request to ``upstream`` and counts them: an independent count of
    the HTTP requests an adapter sends. With ``authorization`` set it plays an
    authenticating proxy: a request whose ``Authorization`` header differs gets 401
    (counted, not forwarded)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.paths: list[str] = []
        self.authorization: str | None = None
        self.refused = 0
        self.lock = threading.Lock()
        super().__init__(_ProxyHandler)

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.paths)


class TlsProxy(CountingProxy):
    """A ``CountingProxy`` that answers over HTTPS with ``certfile``/``keyfile``: a
    Prometheus behind TLS signed by an internal CA."""

    def __init__(self, upstream: str, certfile: Path, keyfile: Path) -> None:
        super().__init__(upstream)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)

    @property
    def url(self) -> str:
        return super().url.replace("http://", "https://", 1)


def internal_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A certificate authority and a server certificate it signed for 127.0.0.1:
    (CA bundle, server certificate, server key), PEM files in ``directory``."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("heteroscale test CA"))
        .issuer_name(name("heteroscale test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class _ProxyHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        proxy: CountingProxy = self.server.owner  # type: ignore[attr-defined]
        with proxy.lock:
            proxy.paths.append(self.path)
            refuse = proxy.authorization not in (None, self.headers.get("Authorization"))
            proxy.refused += refuse
        if refuse:
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = requests.get(proxy.upstream + self.path, timeout=30)
        self.send_response(upstream.status_code)
        self.send_header("Content-Type", upstream.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(upstream.content)))
        self.end_headers()
        self.wfile.write(upstream.content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


EMPTY_VECTOR = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}})


@dataclass
class Reply:
    """One scripted answer: status, body, and a delay before answering."""

    status: int = 200
    body: str = EMPTY_VECTOR
    delay_s: float = 0.0


class FakePrometheus(_Server):
    """Answers each request with the next scripted ``Reply`` (the last one repeats), or
    with ``route(promql)`` when given (for concurrent requests, whose order is not fixed)."""

    def __init__(self, replies: list[Reply], route: Callable[[str], Reply] | None = None) -> None:
        self.replies = replies
        self.route = route
        self.received = 0
        self.lock = threading.Lock()
        super().__init__(_FakeHandler)


class _FakeHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        fake: FakePrometheus = self.server.owner  # type: ignore[attr-defined]
        with fake.lock:
            reply = fake.replies[min(fake.received, len(fake.replies) - 1)]
            fake.received += 1
        if fake.route is not None:
            query = parse_qs(urlsplit(self.path).query).get("query", [""])[0]
            reply = fake.route(query)
        time.sleep(reply.delay_s)
        body = reply.body.encode()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting: that is the point of a slow reply

    def log_message(self, format: str, *args: Any) -> None:
        pass


# ----------------------------------------------------------------------------- expectations


def expected_metrics(scenario: Scenario, quantile: float) -> dict[str, float | None]:
    """What the adapter should report for a scenario's injected load (None = no series)."""
    engine = scenario.engine
    ttft_bounds = VLLM_TTFT_BUCKETS_S
    tbt_bounds = VLLM_ITL_BUCKETS_S if engine == "vllm" else SGLANG_ITL_BUCKETS_S
    prefill, decode = scenario.loads("prefill"), scenario.loads("decode")

    def gpu_average(loads: list[InstanceLoad], attr: str, scale: float) -> float | None:
        weighted = [
            (load.gpus, getattr(load, attr)) for load in loads if getattr(load, attr) is not None
        ]
        if not weighted:
            return None
        return sum(n * v for n, v in weighted) / sum(n for n, _ in weighted) * scale

    def latency_ms(pairs: list[tuple[float, Any]], bounds: tuple[float, ...]) -> float | None:
        pairs = [(rate, dist) for rate, dist in pairs if dist is not None and rate > 0]
        if not pairs:
            return None
        return expected_histogram_quantile_s(quantile, bounds, pairs) * 1000

    kv = [load.kv_usage for load in decode if load.kv_usage is not None]

    def mean_ms(pairs: list[tuple[float, Any]]) -> float | None:
        """The histograms' sum over their count: observations weighted by their rate."""
        pairs = [(rate, dist) for rate, dist in pairs if dist is not None and rate > 0]
        if not pairs:
            return None
        return sum(rate * dist.mean_s for rate, dist in pairs) / sum(r for r, _ in pairs) * 1000

    def queue(loads: list[InstanceLoad]) -> float | None:
        waiting = [load.waiting_requests for load in loads if load.waiting_requests is not None]
        return sum(waiting) if waiting else None

    running = [load.running_requests for load in decode if load.running_requests is not None]

    return {
        "prefill_tps": sum(load.prompt_tps - load.cached_prompt_tps for load in prefill)
        if prefill
        else None,
        "decode_tps": sum(load.generation_tps for load in decode) if decode else None,
        "ttft": latency_ms([(load.requests_per_s, load.ttft) for load in prefill], ttft_bounds),
        "tbt": latency_ms([(load.generation_tps, load.tbt) for load in decode], tbt_bounds),
        "prefill_gpu_util": gpu_average(prefill, "gpu_util_pct", 0.01),
        "decode_gpu_util": gpu_average(decode, "gpu_util_pct", 0.01),
        "prefill_sm_active": gpu_average(prefill, "sm_active", 1.0),
        "decode_sm_active": gpu_average(decode, "sm_active", 1.0),
        "decode_kv_usage": sum(kv) / len(kv) if kv else None,
        "prefill_queue": queue(prefill),
        "decode_queue": queue(decode),
        "tbt_mean": mean_ms([(load.generation_tps, load.tbt) for load in decode]),
        "decode_running": sum(running) if running else None,
    }


def expected_mix(
    scenario: Scenario,
) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None]:
    """The request mix the adapter should report, per histogram: (bounds with +Inf,
    cumulative requests/s). Prompt lengths as the prefill instances record them, output
    lengths as the decode instances do (None: no such histogram, or no requests)."""
    engine = scenario.engine
    out: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {}
    for name, role, kind, attr in (
        ("prompt_tokens", "prefill", "prompt", "prompt_lengths"),
        ("output_tokens", "decode", "output", "output_lengths"),
    ):
        parts = [
            (load.requests_per_s, getattr(load, attr))
            for load in scenario.loads(role)
            if getattr(load, attr) is not None
        ]
        if not parts or sum(rate for rate, _ in parts) <= 0:
            out[name] = None
            continue
        bounds = tuple(FleetExporter.length_bounds(engine, kind))  # type: ignore[arg-type]
        out[name] = ((*bounds, math.inf), expected_length_buckets(bounds, parts))
    return out


def wait_until(
    condition: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.25
) -> float:
    """Poll until ``condition()`` holds; returns the seconds it took. Raises on timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - started


def require_prometheus() -> None:
    """Skip, with the reason, where the Prometheus binaries are not installed."""
    if find_binary("prometheus") is None or find_binary("promtool") is None:
        pytest.skip(
            "the prometheus/promtool binaries are not installed "
            "(apt-get install prometheus); CI installs them"
        )


class TextExporter(_Server):
    """A ``/metrics`` that serves whatever ``text()`` writes, in the text exposition
    format: for tests whose series are written by hand (hostile or unusual engines)."""

    def __init__(self, text: Callable[[], str]) -> None:
        self.text = text
        super().__init__(_TextHandler)


class _TextHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        exporter: TextExporter = self.server.owner  # type: ignore[attr-defined]
        body = exporter.text().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass

"""Benchmark: one metrics cycle for 100 services against a real Prometheus.

Starts a loopback Prometheus (the ``prometheus`` binary) scraping simulated-fleet
exporters that export 100 services x 20 engine instances (5 prefill + 15 decode, two
GPUs each; vLLM and SGLang names, three SLO quantiles), waits until the rate window is
full, then runs the ``PrometheusMetricsSource`` cycle several times in each mode — concurrency
1 and 4, raw histograms and ``recorded_histograms`` (``presets.recording_rules`` are
loaded for all modes) — alternating modes so all see the same machine load, and prints
per mode:

- the cycle's query time (target: under 1 s) and each signal's share of it,
- the HTTP requests per cycle, counted by the adapter and independently by Prometheus
  (``prometheus_http_requests_total`` of the query handler),
- how many series Prometheus holds, and a correctness check of the values read.

Run: ``python benchmarks/bench_metrics.py`` (about a minute; ``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.queues
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType

import requests

from reconciler.desired import load_desired_state
from reconciler.desired.models import ServicePolicy
from reconciler.observe.exporter import (
    ONE_TOKEN,
    DiscreteLengths,
    ExporterEngine,
    FleetExporter,
    InstanceLoad,
    Lognormal,
)
from reconciler.observe.local_prometheus import LocalPrometheus, find_binary
from reconciler.observe.presets import LENGTH_NAMES, recording_rules
from reconciler.observe.prometheus import CycleReport, PrometheusMetricsSource, PrometheusSettings
from reconciler.state import METRIC_NAMES, ServiceMetrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANTILES = (0.9, 0.95, 0.99)
# The request-mix histograms, as a P/D fleet exports them (prefill hands over after one token).
PROMPTS = DiscreteLengths(((200.0, 0.5), (2000.0, 0.4), (12000.0, 0.1)))
OUTPUTS = DiscreteLengths(((50.0, 0.4), (400.0, 0.5), (2000.0, 0.1)))
PREFILL = InstanceLoad(
    prompt_tps=3000.0,
    cached_prompt_tps=600.0,
    requests_per_s=1.0,
    ttft=Lognormal.from_median_p90(0.3, 0.7),
    gpus=2,
    gpu_util_pct=70.0,
    sm_active=0.6,
    prompt_lengths=PROMPTS,
    output_lengths=ONE_TOKEN,
    waiting_requests=3.0,
)
DECODE = InstanceLoad(
    generation_tps=1500.0,
    requests_per_s=1.0,
    tbt=Lognormal.from_median_p90(0.025, 0.04),
    kv_usage=0.6,
    gpus=2,
    gpu_util_pct=95.0,
    sm_active=0.8,
    prompt_lengths=PROMPTS,
    output_lengths=OUTPUTS,
    waiting_requests=1.0,
)


def policies(count: int) -> list[ServicePolicy]:
    base = load_desired_state(REPO_ROOT).policies["chat"]
    out = []
    for i in range(count):
        out.append(
            base.model_copy(
                update={
                    "name": f"bench-{i:03d}",
                    "engine": "vllm" if i % 2 == 0 else "sglang",
                    "slo": base.slo.model_copy(update={"quantile": QUANTILES[i % len(QUANTILES)]}),
                }
            )
        )
    return out


def query_requests_served(url: str) -> float:
    """Prometheus' own count of answered instant queries (read from its /metrics, which
    is not itself a query)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    prefix = 'prometheus_http_requests_total{code="200",handler="/api/v1/query"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


@dataclass
class Stats:
    durations: list[float] = field(default_factory=list)
    requests_adapter: list[int] = field(default_factory=list)
    requests_server: list[int] = field(default_factory=list)
    per_signal: dict[str, list[float]] = field(
        default_factory=lambda: {s: [] for s in (*METRIC_NAMES, *LENGTH_NAMES)}
    )
    worst_error: float = 0.0
    gaps: int = 0

    def add(
        self,
        report: CycleReport,
        served: int,
        metrics: dict[str, ServiceMetrics],
        fleet: list[ServicePolicy],
        decode_instances: int,
    ) -> None:
        self.durations.append(report.duration_s)
        self.requests_adapter.append(report.http_requests)
        self.requests_server.append(served)
        for timing in report.queries:
            self.per_signal[timing.signal].append(timing.seconds)
        self.gaps += len(report.gaps)
        want = decode_instances * DECODE.generation_tps
        for policy in fleet:
            sample = metrics[policy.name].decode_tps
            error = abs(sample.value / want - 1) if sample else 1.0
            self.worst_error = max(self.worst_error, error)


def serve_fleet(
    fleet: list[ServicePolicy],
    prefill: int,
    decode: int,
    exporters_count: int,
    ready: multiprocessing.queues.Queue[tuple[list[str], list[float]]],
    stop: EventType,
) -> None:
    """Child process: the simulated fleet's exporters, until ``stop``."""
    exporters = [FleetExporter() for _ in range(exporters_count)]
    for i, policy in enumerate(fleet):
        exporter = exporters[i % len(exporters)]
        engine: ExporterEngine = "vllm" if policy.engine == "vllm" else "sglang"
        exporter.set_service(policy.name, "prefill", prefill, PREFILL, engine=engine)
        exporter.set_service(policy.name, "decode", decode, DECODE, engine=engine)
    render_s = []
    for exporter in exporters:
        started = time.perf_counter()
        exporter.render()
        render_s.append(time.perf_counter() - started)
        exporter.start()
    ready.put(([e.address for e in exporters], render_s))
    stop.wait()
    for exporter in exporters:
        exporter.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--prefill", type=int, default=5, help="prefill instances per service")
    parser.add_argument("--decode", type=int, default=15, help="decode instances per service")
    parser.add_argument(
        "--exporters", type=int, default=4, help="scrape targets the fleet is split over"
    )
    parser.add_argument("--scrape-interval", type=float, default=5.0)
    parser.add_argument("--cycles", type=int, default=8, help="cycles per mode")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 4],
        help="max_concurrency levels to compare",
    )
    args = parser.parse_args()
    if find_binary("prometheus") is None:
        print("prometheus binary not found (apt-get install prometheus)", file=sys.stderr)
        return 2

    fleet = policies(args.services)
    window_s = 4 * args.scrape_interval
    # The simulated engines run in their own process, as real ones do: their rendering
    # must not compete with the adapter being measured for this process' GIL.
    context = multiprocessing.get_context("fork")
    ready: multiprocessing.queues.Queue[tuple[list[str], list[float]]] = context.Queue()
    stop = context.Event()
    engines = context.Process(
        target=serve_fleet, args=(fleet, args.prefill, args.decode, args.exporters, ready, stop)
    )
    engines.start()
    addresses, render_s = ready.get(timeout=120)

    # The rules are loaded in every mode, so every mode pays for their evaluation.
    prometheus = LocalPrometheus(
        scrape_interval_s=args.scrape_interval,
        rules=recording_rules(window_s, offset_s=args.scrape_interval),
    )
    try:
        prometheus.set_targets(addresses)
        prometheus.start()
        prometheus.wait_for_targets(addresses, timeout_s=60)
        time.sleep(window_s + 2 * args.scrape_interval)  # a full rate window of samples
        head_series = requests.get(f"{prometheus.url}/api/v1/status/tsdb", timeout=10).json()[
            "data"
        ]["headStats"]["numSeries"]

        # Cycles alternate between the modes, so all see the same machine load.
        modes = [
            (concurrency, recorded)
            for recorded in (False, True)
            for concurrency in args.concurrency
        ]
        sources = {
            mode: PrometheusMetricsSource(
                PrometheusSettings(
                    url=prometheus.url,
                    rate_window_s=window_s,
                    scrape_interval_s=args.scrape_interval,  # the window-coverage check
                    max_concurrency=mode[0],
                    recorded_histograms=mode[1],
                )
            )
            for mode in modes
        }
        stats = {mode: Stats() for mode in modes}
        for cycle in range(args.cycles * len(modes)):
            mode = modes[cycle % len(modes)]
            source = sources[mode]
            served_before = query_requests_served(prometheus.url)
            metrics = source.fetch(fleet, time.time())
            served_after = query_requests_served(prometheus.url)
            report = source.last_report
            assert report is not None
            stats[mode].add(report, int(served_after - served_before), metrics, fleet, args.decode)
            time.sleep(0.5)
        for source in sources.values():
            source.close()
    finally:
        stop.set()
        engines.join(timeout=30)
        prometheus.cleanup()

    instances = args.services * (args.prefill + args.decode)
    print(
        f"fleet: {args.services} services x {args.prefill + args.decode} instances = {instances} "
        f"instances over {args.exporters} exporters; Prometheus head series: {head_series}; "
        f"scrape every {args.scrape_interval:g} s, rate window {window_s:g} s"
    )
    print(
        "exporter render per scrape (separate process): "
        + ", ".join(f"{s * 1000:.0f} ms" for s in render_s)
    )
    for (concurrency, recorded), stat in stats.items():
        histograms = "recorded histograms" if recorded else "raw histograms"
        print(f"-- max_concurrency={concurrency}, {histograms}, {len(stat.durations)} cycles")
        print(
            f"   cycle query time: median {statistics.median(stat.durations) * 1000:.0f} ms, "
            f"max {max(stat.durations) * 1000:.0f} ms (target < 1000 ms)"
        )
        print(
            "   HTTP requests per cycle: adapter counted "
            f"{sorted(set(stat.requests_adapter))}, Prometheus served "
            f"{sorted(set(stat.requests_server))} (target: one per signal and mix histogram, "
            f"{len(METRIC_NAMES) + len(LENGTH_NAMES)})"
        )
        print(
            "   median per signal: "
            + ", ".join(
                f"{s} {statistics.median(v) * 1000:.0f} ms" for s, v in stat.per_signal.items() if v
            )
        )
        print(
            f"   correctness: worst decode_tps error {stat.worst_error * 100:.2f} % over all "
            f"services and cycles; missing signals {stat.gaps}"
        )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (1 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

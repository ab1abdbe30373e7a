"""Fixtures of the observe tests: one real Prometheus per session, loopback helpers.

The session's Prometheus (``prometheus_stack``) scrapes four simulated-fleet exporters
and the engines written by hand (``written_engines``) every second and also holds
backfilled history (``promtool``) and the latency recording rules, so that both live
scraping and exact, deterministic PromQL can be tested against one server. Every
scenario's load is registered before the server starts, so by the time a test runs its
rate window is already full; tests use their own service names and never disturb each
other.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from observe_helpers import (
    DECODE,
    FLEET_SCENARIOS,
    MAIN_SCENARIOS,
    OPENMETRICS_SCENARIOS,
    PREFILL,
    RATE_WINDOW_S,
    RELABEL_SERVICE,
    VANISHING_SCENARIOS,
    WINDOW_OFFSET_S,
    CountingProxy,
    FakePrometheus,
    PrometheusStack,
    Reply,
    TextExporter,
    build_backfill,
    example_engine_job,
    pod_target,
    register,
    require_prometheus,
)
from written_engines import hostile_and_flooded_text, mixed_fleet_text

from reconciler.observe.exporter import FleetExporter
from reconciler.observe.local_prometheus import LocalPrometheus, write_file_sd
from reconciler.observe.presets import recording_rules


@pytest.fixture(scope="session")
def prometheus_stack() -> Iterator[PrometheusStack]:
    """A real Prometheus (1 s scrapes, temporary storage) scraping four exporters, with
    backfilled history; stopped and deleted after the session."""
    require_prometheus()
    backfill_end_s = float(math.floor(time.time()) - 3 * 3600)
    main, fleet, openmetrics, vanishing = (
        FleetExporter(),
        FleetExporter(),
        FleetExporter(negotiate_openmetrics=True),
        FleetExporter(),
    )
    # Two engine pods that, like real ones, export no service/role labels: the
    # example scrape config's relabelling must add them.
    pods = [FleetExporter(identity_labels=False), FleetExporter(identity_labels=False)]
    pods[0].set_load(RELABEL_SERVICE, "prefill", "pod-p", PREFILL)
    pods[1].set_load(RELABEL_SERVICE, "decode", "pod-d", DECODE)
    started_s = time.time()
    written = [
        TextExporter(partial(mixed_fleet_text, started_s)),
        TextExporter(partial(hostile_and_flooded_text, started_s)),
    ]
    exporters = (main, fleet, openmetrics, vanishing, *pods)
    register(main, MAIN_SCENARIOS)
    register(fleet, FLEET_SCENARIOS)
    register(openmetrics, OPENMETRICS_SCENARIOS)
    register(vanishing, VANISHING_SCENARIOS)
    workdir = Path(tempfile.mkdtemp(prefix="heteroscale-prom-"))
    pods_sd = workdir / "pods.json"
    prometheus = LocalPrometheus(
        scrape_interval_s=1.0,
        workdir=workdir,
        extra_scrape_configs=[example_engine_job(pods_sd)],
        rules=recording_rules(RATE_WINDOW_S, offset_s=WINDOW_OFFSET_S),
    )
    try:
        prometheus.backfill(build_backfill(backfill_end_s))
        for exporter in exporters:
            exporter.start()
        targets = [exporter.address for exporter in (main, fleet, openmetrics, vanishing)]
        targets += [exporter.url.removeprefix("http://") for exporter in written]
        prometheus.set_targets(targets)
        write_file_sd(
            pods_sd,
            [
                pod_target(pods[0].address, service=RELABEL_SERVICE, role="prefill", pod="pod-p"),
                pod_target(pods[1].address, service=RELABEL_SERVICE, role="decode", pod="pod-d"),
                # Not ours (no heteroscale.io/service label): must not even be scraped.
                pod_target("127.0.0.1:9", service=None, role="decode", pod="someone-else"),
            ],
        )
        prometheus.start()
        prometheus.wait_for_targets([*targets, *(p.address for p in pods)], timeout_s=30)
        scraping_since_s = time.time()
        # Scraping began just now: let one full rate window (plus two scrapes) of
        # samples accumulate so rate() no longer extrapolates from a partial window.
        time.sleep(RATE_WINDOW_S + 2.0)
        yield PrometheusStack(
            prometheus,
            main,
            fleet,
            openmetrics,
            vanishing,
            pods,
            backfill_end_s,
            {**MAIN_SCENARIOS, **FLEET_SCENARIOS, **OPENMETRICS_SCENARIOS, **VANISHING_SCENARIOS},
            written,
            scraping_since_s,
        )
    finally:
        for exporter in exporters:
            exporter.stop()
        for text_exporter in written:
            text_exporter.close()
        prometheus.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def fake_prometheus() -> Iterator[Callable[..., FakePrometheus]]:
    servers: list[FakePrometheus] = []

    def start(replies: list[Reply], route: Callable[[str], Reply] | None = None) -> FakePrometheus:
        server = FakePrometheus(replies, route)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def counting_proxy() -> Iterator[Callable[[str], CountingProxy]]:
    proxies: list[CountingProxy] = []

    def start(upstream: str) -> CountingProxy:
        proxy = CountingProxy(upstream)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()

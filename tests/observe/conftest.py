"""Fixtures of the observe tests: one real Prometheus per session, loopback helpers.

The session's Prometheus (``prometheus_stack``) scrapes four simulated-fleet exporters
every second and also holds backfilled history (``promtool``), so that both live
scraping and exact, deterministic PromQL can be tested against one server. Every
scenario's load is registered before the server starts, so by the time a test runs its
rate window is already full; tests use their own service names and never disturb each
other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import pytest
from observe_helpers import (
    FLEET_SCENARIOS,
    MAIN_SCENARIOS,
    OPENMETRICS_SCENARIOS,
    RATE_WINDOW_S,
    VANISHING_SCENARIOS,
    CountingProxy,
    FakePrometheus,
    PrometheusStack,
    Reply,
    build_backfill,
    register,
)

from reconciler.observe.exporter import FleetExporter
from reconciler.observe.local_prometheus import LocalPrometheus, find_binary


def _require_prometheus() -> None:
    if find_binary("prometheus") is None or find_binary("promtool") is None:
        pytest.skip(
            "the prometheus/promtool binaries are not installed "
            "(apt-get install prometheus); CI installs them"
        )


@pytest.fixture(scope="session")
def prometheus_stack() -> Iterator[PrometheusStack]:
    """A real Prometheus (1 s scrapes, temporary storage) scraping four exporters, with
    backfilled history; stopped and deleted after the session."""
    _require_prometheus()
    backfill_end_s = float(math.floor(time.time()) - 3 * 3600)
    main, fleet, openmetrics, vanishing = (
        FleetExporter(),
        FleetExporter(),
        FleetExporter(negotiate_openmetrics=True),
        FleetExporter(),
    )
    exporters = (main, fleet, openmetrics, vanishing)
    register(main, MAIN_SCENARIOS)
    register(fleet, FLEET_SCENARIOS)
    register(openmetrics, OPENMETRICS_SCENARIOS)
    register(vanishing, VANISHING_SCENARIOS)
    prometheus = LocalPrometheus(scrape_interval_s=1.0)
    try:
        prometheus.backfill(build_backfill(backfill_end_s))
        targets = []
        for exporter in exporters:
            exporter.start()
            targets.append(exporter.address)
        prometheus.set_targets(targets)
        prometheus.start()
        prometheus.wait_for_targets(targets, timeout_s=30)
        # Scraping began just now: let one full rate window (plus two scrapes) of
        # samples accumulate so rate() no longer extrapolates from a partial window.
        time.sleep(RATE_WINDOW_S + 2.0)
        yield PrometheusStack(
            prometheus,
            main,
            fleet,
            openmetrics,
            vanishing,
            backfill_end_s,
            {**MAIN_SCENARIOS, **FLEET_SCENARIOS, **OPENMETRICS_SCENARIOS, **VANISHING_SCENARIOS},
        )
    finally:
        for exporter in exporters:
            exporter.stop()
        prometheus.cleanup()


@pytest.fixture
def fake_prometheus() -> Iterator[Callable[[list[Reply]], FakePrometheus]]:
    servers: list[FakePrometheus] = []

    def start(replies: list[Reply]) -> FakePrometheus:
        server = FakePrometheus(replies)
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

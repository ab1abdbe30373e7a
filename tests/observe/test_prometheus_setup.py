"""How the reconciler is pointed at a real Prometheus: the scrape interval it assumes
is checked against the one Prometheus uses (a slower scrape leaves every window short
of samples, and every service would hold for ever), and a bearer token file is read
every cycle for a Prometheus behind an authenticating proxy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from observe_helpers import (
    CountingProxy,
    PrometheusStack,
    TlsProxy,
    internal_ca,
    make_policy,
    settings_for,
)

from reconciler.errors import MetricsUnavailable
from reconciler.observe.prometheus import (
    PrometheusMetricsSource,
    parse_duration_s,
    recording_rules_problem,
    scrape_interval_problem,
)

pytestmark = pytest.mark.prometheus


@pytest.mark.parametrize(
    "text, seconds",
    [("15s", 15.0), ("1m", 60.0), ("1m30s", 90.0), ("500ms", 0.5), ("2h", 7200.0)],
)
def test_prometheus_durations_are_read(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "15", "s", "1x", "1m 30s", "-1s"])
def test_other_text_is_not_a_duration(text: str) -> None:
    assert parse_duration_s(text) is None


def test_a_prometheus_scraping_less_often_than_assumed_is_named(
    prometheus_stack: PrometheusStack,
) -> None:
    # The test Prometheus scrapes every second. Assumed every 0.5 s with a 1.5 s window,
    # a window must hold 3 samples (three quarters of 3) and holds about 1.5.
    problem = scrape_interval_problem(
        settings_for(prometheus_stack.url, scrape_interval_s=0.5, rate_window_s=1.5)
    )
    assert problem is not None
    assert "less often than the reconciler assumes (every 0.5 s; the slowest every 1 s)" in problem
    assert "holds 1.5 samples, fewer than the 3" in problem
    assert "set the scrape interval to 1 s (the rate window then at least 4 s)" in problem


def test_the_scrape_interval_prometheus_uses_passes(prometheus_stack: PrometheusStack) -> None:
    assert scrape_interval_problem(settings_for(prometheus_stack.url)) is None
    # Slower than assumed but still enough samples per window (10 of the 10 that three
    # quarters of 12.5 require): nothing to say.
    relaxed = settings_for(prometheus_stack.url, scrape_interval_s=0.8, rate_window_s=10.0)
    assert scrape_interval_problem(relaxed) is None


def test_an_unreachable_prometheus_is_left_to_the_cycles() -> None:
    assert scrape_interval_problem(settings_for("http://127.0.0.1:9", timeout_s=0.5)) is None


def test_a_bearer_token_file_is_read_again_every_cycle(
    prometheus_stack: PrometheusStack,
    counting_proxy: Callable[[str], CountingProxy],
    tmp_path: Path,
) -> None:
    proxy = counting_proxy(prometheus_stack.url)
    token = tmp_path / "token"
    token.write_text("first\n")
    proxy.authorization = "Bearer first"
    policy = make_policy("live-gauges")
    now_s = prometheus_stack.settled_now("live-gauges")
    settings = settings_for(proxy.url, bearer_token_file=str(token), retries=0)
    with PrometheusMetricsSource(settings) as source:
        assert source.fetch([policy], now_s)["live-gauges"].decode_kv_usage is not None
        assert proxy.refused == 0 and proxy.count > 0
        # The token rotates (a projected service-account token does, hourly).
        token.write_text("second")
        proxy.authorization = "Bearer second"
        assert source.fetch([policy], now_s)["live-gauges"].decode_kv_usage is not None
        assert proxy.refused == 0
        # Emptied or removed: the cycle's metrics are unavailable, nothing is sent.
        sent = proxy.count
        token.write_text("  \n")
        with pytest.raises(MetricsUnavailable, match=r"bearer token file .* is empty"):
            source.fetch([policy], now_s)
        token.unlink()
        with pytest.raises(MetricsUnavailable, match="cannot read the Prometheus bearer token"):
            source.fetch([policy], now_s)
        assert proxy.count == sent
    # Without the token the proxy refuses, and the adapter says so.
    with (
        PrometheusMetricsSource(settings_for(proxy.url, retries=0)) as source,
        pytest.raises(MetricsUnavailable),
    ):
        source.fetch([policy], now_s)
    assert proxy.refused > 0


def test_recording_rules_that_are_not_loaded_are_named(prometheus_stack: PrometheusStack) -> None:
    # The test Prometheus records the histograms for its own window only.
    loaded = settings_for(prometheus_stack.url, recorded_histograms=True)
    assert recording_rules_problem(loaded) is None
    other = settings_for(prometheus_stack.url, recorded_histograms=True, rate_window_s=20.0)
    problem = recording_rules_problem(other)
    assert problem is not None and "heteroscale:*:rate20s" in problem
    assert "heteroscale prometheus-rules" in problem
    # Not asked for, not checked.
    assert recording_rules_problem(settings_for(prometheus_stack.url, rate_window_s=20.0)) is None


def test_an_https_prometheus_signed_by_an_internal_ca_is_read_with_its_bundle(
    prometheus_stack: PrometheusStack, tmp_path: Path
) -> None:
    ca, cert, key = internal_ca(tmp_path)
    proxy = TlsProxy(prometheus_stack.url, cert, key)
    try:
        policy = make_policy("live-gauges")
        now_s = prometheus_stack.settled_now("live-gauges")
        trusted = settings_for(proxy.url, ca_file=str(ca), retries=0)
        with PrometheusMetricsSource(trusted) as source:
            assert source.fetch([policy], now_s)["live-gauges"].decode_kv_usage is not None
        assert scrape_interval_problem(replace(trusted, scrape_interval_s=0.5, rate_window_s=1.5))
        # The system's authorities do not know the internal CA: nothing is read.
        with (
            PrometheusMetricsSource(settings_for(proxy.url, retries=0)) as source,
            pytest.raises(MetricsUnavailable),
        ):
            source.fetch([policy], now_s)
    finally:
        proxy.close()


@pytest.mark.fault
def test_a_bearer_token_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """The token file is read as a regular file of at most 64 KiB: a FIFO named there
    (no writer) blocked ``plan`` for ever; now the metrics are unavailable, said so."""
    import os

    from reconciler.observe.prometheus import read_bearer_token

    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    with pytest.raises(MetricsUnavailable) as raised:
        read_bearer_token(str(fifo))
    assert "is not a regular file" in str(raised.value)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    with pytest.raises(MetricsUnavailable, match="larger than"):
        read_bearer_token(str(big))

"""How the adapter fails: timeouts, retries with backoff, and which answers mean
"metrics unavailable" (the reconciler holds) versus "this one query is wrong" (that
signal is missing for its services). Scripted loopback servers, no Prometheus needed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from loopback import unreachable_kubeconfig
from observe_helpers import (
    EMPTY_VECTOR,
    RATE_WINDOW_S,
    FakePrometheus,
    Reply,
    make_policy,
    settings_for,
)

from reconciler.commands.reconcile import cycle_settings, wire
from reconciler.desired import load_desired_state
from reconciler.errors import MetricsUnavailable, TemporaryError
from reconciler.observe.base import MetricsSource
from reconciler.observe.local_prometheus import free_loopback_port
from reconciler.observe.presets import LENGTH_NAMES
from reconciler.observe.prometheus import PrometheusMetricsSource, PrometheusSettings
from reconciler.state import METRIC_NAMES

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUESTS = len(METRIC_NAMES) + len(LENGTH_NAMES)
"""HTTP requests of one cycle: one per signal and one per request-mix histogram."""

StartFake = Callable[..., FakePrometheus]


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _source(url: str, sleeps: Sleeps | None = None, **settings: object) -> PrometheusMetricsSource:
    """One request at a time unless asked otherwise, so request counts are exact."""
    settings.setdefault("max_concurrency", 1)
    return PrometheusMetricsSource(
        settings_for(url, **settings), sleep=sleeps if sleeps is not None else Sleeps()
    )


def test_a_response_slower_than_the_timeout_is_unavailable(fake_prometheus: StartFake) -> None:
    server = fake_prometheus([Reply(delay_s=2.0)])
    source = _source(server.url, timeout_s=0.3, retries=1)
    started = time.monotonic()
    with pytest.raises(MetricsUnavailable) as raised:
        source.fetch([make_policy("a")], 1000.0)
    took_s = time.monotonic() - started
    assert raised.value.cause is not None and raised.value.cause.startswith(
        "no answer within 0.3 s"
    )
    assert raised.value.query is not None and "heteroscale_part" in raised.value.query
    assert server.received == 2  # first attempt + one retry, then the cycle stops
    assert took_s < 1.5  # does not wait for the slow server, nor query the other signals
    assert isinstance(raised.value, TemporaryError)


def test_server_errors_are_retried_with_backoff_then_succeed(fake_prometheus: StartFake) -> None:
    server = fake_prometheus(
        [
            Reply(status=503, body='{"status":"error","errorType":"unavailable","error":"busy"}'),
            Reply(),
        ]
    )
    sleeps = Sleeps()
    source = _source(server.url, sleeps, retries=2, backoff_s=0.1)
    metrics = source.fetch([make_policy("a")], 1000.0)
    assert all(metrics["a"].get(s) is None for s in METRIC_NAMES)  # empty answers: missing
    assert metrics["a"].prompt_tokens is None and metrics["a"].output_tokens is None
    assert sleeps == [0.1]
    assert server.received == REQUESTS + 1
    assert source.last_report is not None and source.last_report.http_requests == REQUESTS + 1


def test_backoff_doubles_up_to_its_cap_and_the_error_names_the_cause(
    fake_prometheus: StartFake,
) -> None:
    server = fake_prometheus(
        [
            Reply(
                status=503, body='{"status":"error","errorType":"unavailable","error":"overloaded"}'
            )
        ]
    )
    sleeps = Sleeps()
    source = _source(server.url, sleeps, retries=3, backoff_s=0.1, max_backoff_s=0.25)
    with pytest.raises(MetricsUnavailable) as raised:
        source.fetch([make_policy("a")], 1000.0)
    assert sleeps == [0.1, 0.2, 0.25]
    assert raised.value.cause == "HTTP 503: unavailable: overloaded"
    assert "after 4 attempts" in str(raised.value)


def test_too_many_requests_is_retried(fake_prometheus: StartFake) -> None:
    server = fake_prometheus([Reply(status=429, body="slow down"), Reply()])
    _source(server.url, retries=1).fetch([make_policy("a")], 1000.0)
    assert server.received == REQUESTS + 1


def test_authentication_failure_is_not_retried(fake_prometheus: StartFake) -> None:
    server = fake_prometheus([Reply(status=401, body="Unauthorized")])
    with pytest.raises(MetricsUnavailable) as raised:
        _source(server.url, retries=3).fetch([make_policy("a")], 1000.0)
    assert server.received == 1
    assert "(HTTP 401)" in str(raised.value) and raised.value.cause == "Unauthorized"


def test_an_answer_that_is_not_the_prometheus_api_is_unavailable(
    fake_prometheus: StartFake,
) -> None:
    server = fake_prometheus([Reply(body="<html>login</html>")])
    with pytest.raises(MetricsUnavailable, match="did not answer like the Prometheus HTTP API"):
        _source(server.url).fetch([make_policy("a")], 1000.0)


def test_a_non_vector_result_is_unavailable(fake_prometheus: StartFake) -> None:
    body = json.dumps({"status": "success", "data": {"resultType": "scalar", "result": [1, "2"]}})
    server = fake_prometheus([Reply(body=body)])
    with pytest.raises(MetricsUnavailable, match="unexpected answer"):
        _source(server.url).fetch([make_policy("a")], 1000.0)


def test_nothing_listening_is_unavailable_after_retries() -> None:
    url = f"http://127.0.0.1:{free_loopback_port()}"
    sleeps = Sleeps()
    with pytest.raises(MetricsUnavailable) as raised:
        _source(url, sleeps, retries=2, backoff_s=0.01).fetch([make_policy("a")], 1000.0)
    assert raised.value.cause is not None and raised.value.cause.startswith("ConnectionError")
    assert len(sleeps) == 2


def test_a_rejected_single_part_query_is_a_gap_not_an_outage(fake_prometheus: StartFake) -> None:
    rejected = json.dumps(
        {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}
    )
    server = fake_prometheus([Reply(status=400, body=rejected), Reply(body=EMPTY_VECTOR)])
    source = _source(server.url)
    metrics = source.fetch([make_policy("a")], 1000.0)
    assert metrics["a"].prefill_tps is None
    assert source.last_report is not None
    gap = source.last_report.gaps[0]
    assert (gap.signal, gap.reason) == (
        "prefill_tps",
        "query rejected by Prometheus: bad_data: parse error at char 3",
    )
    assert server.received == REQUESTS  # one part: no splitting needed


def test_parameters_sent_to_prometheus(fake_prometheus: StartFake) -> None:
    """The evaluation time is the cycle's ``now_s``; the server-side timeout matches."""
    captured: list[str] = []
    server = fake_prometheus([Reply()])
    source = PrometheusMetricsSource(
        PrometheusSettings(
            max_concurrency=1,
            url=server.url,
            timeout_s=2.5,
            signals=("decode_tps",),
            lengths=(),
            headers={"X-Scope-OrgID": "t1"},
        )
    )
    original = source._connections[0].session.send

    def spy(request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        captured.append(str(request.url))
        assert request.headers["X-Scope-OrgID"] == "t1"
        return original(request, **kwargs)

    source._connections[0].session.send = spy  # type: ignore[method-assign]
    source.fetch([make_policy("a")], 1234.5)
    assert len(captured) == 1
    assert "time=1234.500" in captured[0] and "timeout=2.5" in captured[0]


def test_concurrent_requests_stop_at_the_first_failure(fake_prometheus: StartFake) -> None:
    server = fake_prometheus([Reply(delay_s=2.0)])
    source = _source(server.url, timeout_s=0.3, retries=0, max_concurrency=4)
    started = time.monotonic()
    with pytest.raises(MetricsUnavailable) as raised:
        source.fetch([make_policy("a")], 1000.0)
    assert time.monotonic() - started < 1.5
    assert server.received == 4  # the four in flight; the other five never start
    assert "prefill_tps" in str(raised.value)  # the first failure in plan order
    source.close()


def test_concurrent_cycle_reports_every_signal_in_plan_order(fake_prometheus: StartFake) -> None:
    server = fake_prometheus([Reply(delay_s=0.05)])
    source = _source(server.url, max_concurrency=4)
    source.fetch([make_policy("a")], 1000.0)
    assert source.last_report is not None
    assert [q.signal for q in source.last_report.queries] == [*METRIC_NAMES, *LENGTH_NAMES]
    assert source.last_report.http_requests == server.received == REQUESTS
    source.close()


def test_two_clusters_fetching_at_once_each_report_their_own_requests(
    fake_prometheus: StartFake,
) -> None:
    # The loop runs each cluster's cycle on its own thread, all through one source.
    server = fake_prometheus([Reply(delay_s=0.05)])
    source = _source(server.url, max_concurrency=2)
    barrier = threading.Barrier(2)
    reports: dict[str, Any] = {}

    def cycle(cluster: str) -> None:
        barrier.wait(5)
        source.fetch([make_policy(f"svc-{cluster}")], 1000.0)
        reports[cluster] = source.last_report

    threads = [threading.Thread(target=cycle, args=(c,)) for c in ("east", "west")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    # Before: each counted the other's requests sent meanwhile too.
    assert [r.http_requests for r in reports.values()] == [REQUESTS, REQUESTS]
    assert server.received == 2 * REQUESTS
    source.close()


def test_run_reads_each_clusters_metrics_through_its_own_connections(
    fake_prometheus: StartFake, tmp_path: Path
) -> None:
    # One cluster's services have slow queries: they hold its connections, not the
    # other cluster's (run reconciles both at once, through wire's metrics_for).
    server = fake_prometheus(
        [Reply()], route=lambda promql: Reply(delay_s=1.5 if "svc-slow" in promql else 0.0)
    )
    config = unreachable_kubeconfig(tmp_path / "kubeconfig")
    state = load_desired_state(REPO_ROOT)
    settings = cycle_settings(
        repo=REPO_ROOT,
        kubeconfig=str(config),
        placer="greedy",
        prometheus_url=server.url,
        drain_window=0.0,
    )
    wiring = wire(settings, state)
    east = state.clusters["prod-east"]
    west = east.model_copy(update={"name": "prod-west"})
    assert wiring.metrics_for(east) is wiring.metrics_for(east)
    slow = threading.Thread(
        target=lambda: wiring.metrics_for(east).fetch([make_policy("svc-slow")], 1000.0)
    )
    slow.start()
    time.sleep(0.2)  # its queries hold every connection of its source
    started = time.monotonic()
    wiring.metrics_for(west).fetch([make_policy("svc-fast")], 1000.0)
    # Before: one source for every cluster, the fast one waited for a connection.
    assert time.monotonic() - started < 0.75
    slow.join(10)


@pytest.mark.parametrize(
    "bad",
    [
        {"timeout_s": 0},
        {"rate_window_s": -1},
        {"retries": -1},
        {"signals": ("nope",)},
        {"signals": ("prompt_tokens",)},
        {"lengths": ("decode_tps",)},
        {"max_concurrency": 0},
    ],
)
def test_settings_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PrometheusSettings(**bad)  # type: ignore[arg-type]


def test_the_adapter_is_a_metrics_source() -> None:
    source: MetricsSource = PrometheusMetricsSource(PrometheusSettings())  # checked by mypy
    assert callable(source.fetch)


def _every_role_answers(value: float, at_s: float) -> str:
    """A merged single-part answer in which every (service a, role) has ``value``,
    sampled at ``at_s`` with a fully covered window: whatever signal asked, it gets a
    usable number."""
    full = str(RATE_WINDOW_S)  # samples of a covered window at the helpers' 1 s scrapes
    rows = [
        {"metric": {"heteroscale_part": tag, "service": "a", "role": role}, "value": [at_s, v]}
        for role in ("prefill", "decode")
        for tag, v in (("0", str(value)), ("0t", str(at_s)), ("0c", full))
    ]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": rows}})


def test_a_failing_mix_query_leaves_only_the_mix_missing(fake_prometheus: StartFake) -> None:
    """The request-mix histograms are optional: Prometheus failing them for good (after
    the retries) costs the mix of this cycle, never the signals or the cycle."""
    down = Reply(status=503, body='{"status":"error","errorType":"unavailable","error":"down"}')
    # One at a time, signals first: every signal answers, then the two histograms fail.
    answers = [Reply(body=_every_role_answers(5.0, 1000.0))] * len(METRIC_NAMES)
    server = fake_prometheus([*answers, down])
    sleeps = Sleeps()
    source = _source(server.url, sleeps, retries=1, backoff_s=0.1)
    metrics = source.fetch([make_policy("a")], 1000.0)["a"]
    for signal in METRIC_NAMES:
        sample = metrics.get(signal)
        assert sample is not None and sample.value == 5.0, signal
    assert metrics.prompt_tokens is None and metrics.output_tokens is None
    assert server.received == len(METRIC_NAMES) + 2 * 2  # each histogram: 1 try + 1 retry
    assert sleeps == [0.1, 0.1]
    report = source.last_report
    assert report is not None
    assert [(g.signal, g.reason) for g in report.gaps] == [
        ("prompt_tokens", "query failed: HTTP 503: unavailable: down"),
        ("output_tokens", "query failed: HTTP 503: unavailable: down"),
    ]
    assert [q.signal for q in report.queries][-2:] == ["prompt_tokens", "output_tokens"]


def test_a_mix_timing_out_under_concurrency_fails_nothing_else(fake_prometheus: StartFake) -> None:
    """All requests in flight at once; the histograms' time out, the rest answer. (The
    timeout leaves a loaded two-core machine time to accept fifteen connections; the
    histograms' answer comes well after it.)"""
    slow = Reply(delay_s=4.0)
    ok = Reply(body=_every_role_answers(7.0, 1000.0))
    server = fake_prometheus([ok], route=lambda promql: slow if "vllm:request_" in promql else ok)
    source = _source(server.url, timeout_s=1.5, retries=0, max_concurrency=15)
    try:
        metrics = source.fetch([make_policy("a")], 1000.0)["a"]
    finally:
        source.close()
    assert all(metrics.get(s) is not None for s in METRIC_NAMES)
    assert metrics.prompt_tokens is None and metrics.output_tokens is None
    assert source.last_report is not None
    reasons = {g.reason for g in source.last_report.gaps}
    assert reasons == {"query failed: no answer within 1.5 s (ReadTimeout)"}


def test_a_failing_queue_query_leaves_only_the_queues_missing(fake_prometheus: StartFake) -> None:
    """The queues are optional like the mix: the planner reads the served rates
    without them, so Prometheus failing them costs nothing else."""
    down = Reply(status=503, body='{"status":"error","errorType":"unavailable","error":"down"}')
    ok = Reply(body=_every_role_answers(3.0, 1000.0))
    server = fake_prometheus([ok], route=lambda q: down if "num_requests_waiting" in q else ok)
    source = _source(server.url, retries=0)
    metrics = source.fetch([make_policy("a")], 1000.0)["a"]
    assert metrics.prefill_queue is None and metrics.decode_queue is None
    for signal in METRIC_NAMES:
        if signal not in ("prefill_queue", "decode_queue"):
            assert metrics.get(signal) is not None, signal
    assert source.last_report is not None
    failed = {g.signal for g in source.last_report.gaps if "503" in g.reason}
    assert failed == {"prefill_queue", "decode_queue"}


def test_a_failing_mean_gap_query_leaves_only_the_mean_gap_missing(
    fake_prometheus: StartFake,
) -> None:
    """The mean inter-token gap only sharpens the latency correction (the TBT p90 is
    read without it), so Prometheus failing it for good costs nothing else."""
    down = Reply(status=503, body='{"status":"error","errorType":"unavailable","error":"down"}')
    ok = Reply(body=_every_role_answers(3.0, 1000.0))
    server = fake_prometheus([ok], route=lambda q: down if "_seconds_sum" in q else ok)
    source = _source(server.url, retries=0)
    metrics = source.fetch([make_policy("a")], 1000.0)["a"]
    assert metrics.tbt_mean is None
    for signal in METRIC_NAMES:
        if signal != "tbt_mean":
            assert metrics.get(signal) is not None, signal
    assert source.last_report is not None
    failed = {g.signal for g in source.last_report.gaps if "503" in g.reason}
    assert failed == {"tbt_mean"}


def _with_credentials(url: str) -> str:
    return url.replace("http://", "http://user:secretpw@", 1)


def test_a_password_in_the_url_is_never_shown(fake_prometheus: StartFake) -> None:
    """``--prometheus-url http://user:pw@host`` works, and every message naming the
    Prometheus (the cycle's error, hence logs and status) shows it as ``user:***@``."""
    url = _with_credentials(f"http://127.0.0.1:{free_loopback_port()}")
    with pytest.raises(MetricsUnavailable) as unanswered:
        _source(url, retries=0).fetch([make_policy("a")], 1000.0)
    server = fake_prometheus([Reply(status=401, body="Unauthorized")])
    with pytest.raises(MetricsUnavailable) as refused:
        _source(_with_credentials(server.url)).fetch([make_policy("a")], 1000.0)
    for raised in (unanswered, refused):
        shown = f"{raised.value} {raised.value.cause}"
        assert "user:***@127.0.0.1" in shown and "secretpw" not in shown, shown

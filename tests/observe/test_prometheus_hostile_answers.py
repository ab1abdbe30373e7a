"""A Prometheus (or whatever answers at its address) that is broken or hostile: the
adapter reads a bounded answer within a bounded time from the configured host only,
and anything else makes the cycle's metrics unavailable, so every service holds."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from observe_helpers import EMPTY_VECTOR, FakePrometheus, Reply, _Server, make_policy, settings_for

from reconciler.errors import MetricsUnavailable
from reconciler.observe.prometheus import (
    MAX_ANSWER_OBJECTS,
    PrometheusMetricsSource,
    scrape_interval_problem,
)

StartFake = Callable[..., FakePrometheus]

pytestmark = pytest.mark.fault


def _source(url: str, **settings: Any) -> PrometheusMetricsSource:
    settings.setdefault("max_concurrency", 1)
    return PrometheusMetricsSource(settings_for(url, **settings), sleep=lambda _s: None)


def _vector_of(rows: int, label_bytes: int) -> str:
    result = [
        {
            "metric": {"service": f"s{i}-" + "x" * label_bytes, "role": "decode"},
            "value": [1000, "1"],
        }
        for i in range(rows)
    ]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})


def test_an_answer_larger_than_the_bound_is_unavailable_without_retrying(
    fake_prometheus: StartFake,
) -> None:
    server = fake_prometheus([Reply(body=_vector_of(rows=200, label_bytes=10_000))])
    source = _source(server.url, max_answer_bytes=1_000_000, retries=2)
    with pytest.raises(MetricsUnavailable) as raised:
        source.fetch([make_policy("a")], 1000.0)
    assert "max_answer_bytes" in str(raised.value)
    assert server.received == 1  # asking again would read as much again


class _Trickle(_Server):
    """Sends the headers at once, then the body a byte at a time: never idle long
    enough for a per-read timeout."""

    def __init__(self, byte_every_s: float) -> None:
        self.byte_every_s = byte_every_s
        super().__init__(_TrickleHandler)


class _TrickleHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        trickle: _Trickle = self.server.owner  # type: ignore[attr-defined]
        body = EMPTY_VECTOR.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(trickle.byte_every_s)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def trickling_server() -> Iterator[_Trickle]:
    server = _Trickle(byte_every_s=0.05)
    yield server
    server.close()


def test_an_answer_trickling_in_past_the_deadline_is_unavailable(
    trickling_server: _Trickle,
) -> None:
    source = _source(trickling_server.url, timeout_s=0.3, retries=0)
    started = time.monotonic()
    with pytest.raises(MetricsUnavailable) as raised:
        source.fetch([make_policy("a")], 1000.0)
    # The whole answer (about 70 bytes, 3.5 s at this pace) is bounded by twice the
    # timeout, though no single read waits longer than 0.05 s.
    assert time.monotonic() - started < 1.5
    assert raised.value.cause is not None and "did not arrive in full within 0.6 s" in (
        raised.value.cause
    )


class _Redirect(_Server):
    def __init__(self, location: str) -> None:
        self.location = location
        super().__init__(_RedirectHandler)


class _RedirectHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        redirect: _Redirect = self.server.owner  # type: ignore[attr-defined]
        self.send_response(302)
        self.send_header("Location", redirect.location + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_redirect_to_another_host_is_not_followed(fake_prometheus: StartFake) -> None:
    elsewhere = fake_prometheus([Reply(body=EMPTY_VECTOR)])
    redirect = _Redirect(elsewhere.url)
    try:
        source = _source(redirect.url, headers={"X-Api-Key": "secret"})
        with pytest.raises(MetricsUnavailable) as raised:
            source.fetch([make_policy("a")], 1000.0)
    finally:
        redirect.close()
    assert elsewhere.received == 0  # neither our headers nor our queries went there
    assert "HTTP 302" in str(raised.value)
    assert f"redirected to {elsewhere.url}" in str(raised.value)


def test_an_error_message_quoting_a_label_value_is_logged_escaped_and_bounded(
    fake_prometheus: StartFake, caplog: pytest.LogCaptureFixture
) -> None:
    # Prometheus' errors quote label sets ("found duplicate series for the match group
    # {service=...}"), and an engine's label value may hold anything.
    forged = "\x1b[31mAPPROVED\nfake line " + "A" * 10_000
    error = json.dumps({"status": "error", "errorType": "execution", "error": forged})
    server = fake_prometheus([Reply(status=422, body=error)])
    with caplog.at_level("WARNING"):
        metrics = _source(server.url).fetch([make_policy("a")], 1000.0)
    assert metrics["a"].decode_tps is None
    assert caplog.records
    for record in caplog.records:
        line = record.getMessage()
        assert "\x1b" not in line and "\n" not in line and len(line) < 500
    assert "\\x1b[31mAPPROVED\\nfake line" in caplog.records[0].getMessage()


def test_a_refusal_body_is_escaped_and_bounded_in_the_unavailable_error(
    fake_prometheus: StartFake,
) -> None:
    server = fake_prometheus([Reply(status=401, body="\x1b[2J" + "z" * 10_000)])
    with pytest.raises(MetricsUnavailable) as raised:
        _source(server.url).fetch([make_policy("a")], 1000.0)
    assert raised.value.cause is not None
    assert "\x1b" not in raised.value.cause and len(raised.value.cause) < 500


def test_an_error_body_sent_with_http_200_is_unavailable_with_its_own_message(
    fake_prometheus: StartFake,
) -> None:
    error = {"status": "error", "errorType": "timeout", "error": "query timed out in \x1b[2J"}
    server = fake_prometheus([Reply(status=200, body=json.dumps(error))])
    with pytest.raises(MetricsUnavailable) as raised:
        _source(server.url).fetch([make_policy("a")], 1000.0)
    assert "error body (HTTP 200)" in str(raised.value)
    assert raised.value.cause == "timeout: query timed out in \\x1b[2J"


def test_the_set_up_checks_read_a_trickling_answer_within_its_deadline(
    trickling_server: _Trickle,
) -> None:
    """The checks before the first cycle (the scrape interval from ``/api/v1/targets``)
    read as every query does: a server sending a byte now and then is given up on by
    twice the timeout (it kept ``plan`` from starting for good), and the cycles then
    say what is wrong."""
    started = time.monotonic()
    assert scrape_interval_problem(settings_for(trickling_server.url, timeout_s=0.3)) is None
    assert time.monotonic() - started < 1.5


def test_the_set_up_checks_follow_no_redirect(fake_prometheus: StartFake) -> None:
    elsewhere = fake_prometheus([Reply(body=EMPTY_VECTOR)])
    redirect = _Redirect(elsewhere.url)
    try:
        settings = settings_for(redirect.url, headers={"X-Api-Key": "secret"})
        assert scrape_interval_problem(settings) is None
    finally:
        redirect.close()
    assert elsewhere.received == 0  # neither our headers nor our request went there


def test_an_answer_of_too_many_json_objects_is_unavailable_without_retrying(
    fake_prometheus: StartFake,
) -> None:
    """Within its byte limit an answer of a million empty rows parses to ~600 MB (5 GB
    through ``plan`` with its queries in flight): refused by its count of objects."""
    rows = ",".join(['{"metric":{},"value":[1,"1"]}'] * (MAX_ANSWER_OBJECTS // 2 + 1))
    body = '{"status":"success","data":{"resultType":"vector","result":[' + rows + "]}}"
    server = fake_prometheus([Reply(body=body)])
    source = _source(server.url, retries=2)
    with pytest.raises(MetricsUnavailable) as raised:
        source.fetch([make_policy("a")], 1000.0)
    assert "max_answer_bytes" in str(raised.value)
    assert raised.value.cause is not None and "JSON objects" in raised.value.cause
    assert server.received == 1


@pytest.mark.parametrize(
    "body",
    [
        # Arrays nested deeper than the JSON parser recurses (0.4 MiB).
        "[" * 200_000 + "]" * 200_000,
        # A label value that is not a string.
        json.dumps(
            {
                "status": "success",
                "data": {
                    "resultType": "vector",
                    "result": [{"metric": {"service": ["a"]}, "value": [1000, "1"]}],
                },
            }
        ),
        # A value Prometheus never writes ("1_000" is a Python float, not a sample).
        json.dumps(
            {
                "status": "success",
                "data": {
                    "resultType": "vector",
                    "result": [{"metric": {"service": "a"}, "value": [1000, "1_000"]}],
                },
            }
        ),
    ],
    ids=["nested-arrays", "list-label", "underscored-number"],
)
def test_a_malformed_answer_makes_the_metrics_unavailable_not_the_cycle_crash(
    fake_prometheus: StartFake, body: str
) -> None:
    server = fake_prometheus([Reply(body=body)])
    with pytest.raises(MetricsUnavailable):
        _source(server.url, retries=0).fetch([make_policy("a")], 1000.0)

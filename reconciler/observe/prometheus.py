"""The Prometheus ``MetricsSource``: every signal of every service in a few batched queries.

Usage::

    source = PrometheusMetricsSource(PrometheusSettings(url="http://prometheus:9090"))
    metrics = source.fetch(list(state.policies.values()), now_s=time.time())
    source.last_report  # timings, HTTP requests, and why each missing signal is missing

Design
------
One cycle sends **one HTTP request per signal** (nine at most, plus one per request-mix
histogram: eleven), however many services there are. For a signal, services whose
rendered PromQL is identical (same preset, SLO quantile, label names) share one *part*;
services with a per-service override or a different quantile get their own part. All parts of a signal are merged into one
instant query::

    label_replace(<value of part 0>, "heteroscale_part", "0", "", "")
      or label_replace(<freshness of part 0>, "heteroscale_part", "0t", "", "")
      or label_replace(<value of part 1>, "heteroscale_part", "1", "", "")  ...

so the number of requests is bounded by the number of signals. Each preset part
carries a ``service=~"a|b|..."`` matcher for its own services: the answer holds rows
of the services asked about only, however many other ``service`` values Prometheus
holds (without it a flood of them would push every answer past ``max_answer_bytes``
and hold every service), and several parts together aggregate every series once
rather than once per part (for histograms at three quantiles this cuts the
evaluation time by about three). The query text grows with the number of services
(about 20 bytes each per selector), which matters only for proxies with short URL
limits. Query overrides are the user's PromQL and are sent as written, but for
``$__services``, which becomes the regex of the services that share the override
(``{service=~"$__services"}`` restricts an override as a preset is restricted).

Freshness: a value's ``Sample.at_s`` is the timestamp of the *oldest* of the newest raw
samples behind it (``min by (service, role) (timestamp(<series>))``), not the query
time, so a value is only as fresh as its stalest contributor. Series of a target that
stopped answering are staleness-marked by Prometheus at the next failed scrape and drop
out of ``timestamp()`` at once, while ``rate()`` over the window would still return a
(decaying) number for a while: the missing freshness row turns that value into missing.
Values older than the policy's ``scaling.metric_max_age_s``, NaN (e.g. a histogram
without observations in the window), +-Inf and missing series all come back as ``None``;
the reason is recorded in ``last_report.gaps``. Counter resets are handled by
``rate()``.

Window coverage: after a gap (Prometheus restarted, a target came back) ``rate()``
sees samples over only part of its window and reads low by about the uncovered part,
which would look like falling load. Each windowed preset part therefore also returns
``max by (service, role) (count_over_time(<series>[w]))``, tagged like the freshness
rows (``"0c"``), in the same request; a value whose best-covered series holds fewer
samples than ``WindowCoverage.required`` (three quarters of ``window / scrape
interval`` by default) is missing with the reason "window not covered: k of n
samples", so the policy holds. ``max`` over a service's series: one new pod with a
short history does not blank its service, a restart (every series short) does. This
covers the token rates, the latency histograms and the request mix, in the recorded
mode too (counted on the raw ``_count`` series); gauges (an average over part of the
window is not biased) and query overrides (the user's PromQL) are not counted. Query overrides carry no freshness query; they are stamped with the
evaluation time (see ``reconciler.observe.presets``).

Window end: the counter and histogram windows (and their sample counts) end one scrape
interval before the evaluation time (``offset``, ``PrometheusSettings.window_offset_s``).
A scrape's samples appear only when it finishes, so at the evaluation time the newest
sample can lie more than 1.1 intervals back; ``rate()`` then extrapolates only half an
interval to the window's end and reads 6 to 15 % low (``presets.settled_range``). A
window of finished scrapes is read in full; freshness is still taken at the evaluation
time, so a vanished target goes missing as fast as before.

The request mix (``ServiceMetrics.prompt_tokens`` / ``output_tokens``) comes from one
query per histogram, ``sum by (service, le) (rate(<name>_bucket{role=...}[w]))``, batched
and freshness-checked like the signals, and turned into ``LengthBuckets`` sorted by
``le`` (``+Inf`` as ``math.inf``). A histogram that is missing, empty (no request
finished in the window), NaN or stale comes back as ``None``, and the planner keeps the
last known mix. The mix is optional: when its query fails for good (timeouts, 5xx after
the retries) its services get ``None`` with the error as the gap reason, and neither
the cycle nor the other signals fail. The queues (``prefill_queue``, ``decode_queue``)
and the mean inter-token gap (``tbt_mean``) are optional the same way
(``OPTIONAL_SIGNALS``).

Queries are evaluated at ``now_s`` (the ``time`` parameter), so a cycle can be replayed
against recorded data.

The signals' requests are independent, so up to ``max_concurrency`` (default 4) are in
flight at once and Prometheus evaluates them on several cores; the number of requests
is unchanged. For large fleets, ``recorded_histograms`` reads the latency histograms
from ``presets.recording_rules`` (pre-aggregated by Prometheus once per rule interval),
which removes the dominant cost of a cycle (``benchmarks/bench_metrics.py``).

Failures: connection errors, timeouts, HTTP 429 and 5xx are retried with exponential
backoff; when a signal's request still fails the cycle stops at once (requests not yet
started are dropped) and raises
``MetricsUnavailable`` (carrying the query and the cause); the reconciler then holds
every service at its current size. HTTP 400/422 (Prometheus rejected the PromQL, e.g. a
broken override) is not a backend outage: the merged query is split into its parts to
find the culprit, the rejected part's services get ``None`` for that signal with the
error as the gap reason, and every other service is served normally. Other 4xx
(authentication, wrong URL) and non-JSON answers raise ``MetricsUnavailable`` without
retrying.

HTTP client: prometheus-api-client's ``PrometheusConnect.custom_query``. It has a
``timeout`` argument (passed to ``requests``: connect timeout and per-read timeout, not a
total deadline) which is used, and the same bound is sent to Prometheus as the
server-side evaluation ``timeout``. Its own urllib3 retries are disabled
so that retries, backoff and request counting are this module's. It hides the HTTP
status inside its exception text, so each connection's session records its last
response to classify failures (one session per concurrent request, never shared).
"""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import requests
import urllib3
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from reconciler.bounded_read import BoundedReadError, DeadlinePassed, read_answer, read_named_file
from reconciler.daemon_pool import DaemonThreadPool
from reconciler.desired.models import ServicePolicy
from reconciler.errors import MetricsUnavailable
from reconciler.observe.presets import (
    LENGTH_NAMES,
    PART_LABEL,
    LengthName,
    SignalName,
    SignalQuery,
    format_duration,
    format_number,
    is_label_name,
    restrict_override,
    signal_query,
    signal_role,
)
from reconciler.state import (
    MAX_LENGTH_BUCKETS,
    METRIC_NAMES,
    LengthBuckets,
    MetricName,
    Role,
    Sample,
    ServiceMetrics,
)
from reconciler.text_safety import quoted, redacted_url

log = logging.getLogger(__name__)

OPTIONAL_SIGNALS: frozenset[SignalName] = frozenset(
    (*LENGTH_NAMES, "prefill_queue", "decode_queue", "decode_running", "tbt_mean")
)
"""Signals whose query may fail for good without failing the cycle: the planner reads
around each of them (the last known mix, the served rates without a queue, the TBT p90
without the mean gap)."""


def evaluation_time(now_s: float) -> str:
    """``now_s`` as the ``time`` of an instant query: whole milliseconds (Prometheus'
    resolution), rounded down. Rounded to the nearest, a query at 618.91085 s ran at
    618.911, and the newest sample's timestamp (``timestamp()``, the freshness every
    signal reports) came back after the cycle's own clock."""
    millis = math.floor(now_s * 1000.0)
    return f"{millis // 1000}.{millis % 1000:03d}"


@dataclass(frozen=True)
class PrometheusSettings:
    """How to reach Prometheus and how to read it."""

    url: str = "http://127.0.0.1:9090"
    timeout_s: float = 5.0
    """Per HTTP request (connect, and each read), also sent as the evaluation timeout."""
    retries: int = 2
    """Further attempts after the first for connection errors, timeouts, 429 and 5xx."""
    backoff_s: float = 0.2
    """Delay before the first retry; doubles with each further retry."""
    max_backoff_s: float = 2.0
    rate_window_s: float = 60.0
    """Window of ``rate()``, ``histogram_quantile`` and gauge averaging: at least four
    scrape intervals, so that a missed scrape does not empty the window."""
    scrape_interval_s: float = 15.0
    """How often Prometheus scrapes the engines: with ``rate_window_s`` it says how many
    samples a covered window holds (see ``window_coverage``)."""
    window_offset_s: float | None = None
    """How long before the evaluation time the counter and histogram windows end
    (``offset``); None: one ``scrape_interval_s``, so that a scrape still in flight
    cannot make ``rate()`` read low (``presets.settled_range`` says why). 0 ends them
    at the evaluation time."""
    min_window_coverage: float = 0.75
    """Fraction of those samples that the best-covered series of a (service, role) must
    hold for a windowed signal to count (0 turns the check off)."""
    signals: tuple[MetricName, ...] = METRIC_NAMES
    """Signals to read each cycle (the rest stay ``None``)."""
    lengths: tuple[LengthName, ...] = LENGTH_NAMES
    """Request-mix histograms to read each cycle (optional: a failing query leaves
    only them missing); ``()`` reads none."""
    max_concurrency: int = 4
    """Signal requests in flight at once (Prometheus evaluates them in parallel);
    1 = one after the other."""
    recorded_histograms: bool = False
    """Read TTFT/TBT and request-mix bucket rates from
    ``presets.recording_rules(rate_window_s)`` (which must be loaded into Prometheus)
    instead of aggregating every engine's buckets."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra HTTP headers, e.g. ``Authorization`` for a secured Prometheus."""
    bearer_token_file: str | None = None
    """A file holding a bearer token for a Prometheus behind an authenticating proxy
    (a Kubernetes service-account token): read again every cycle, so a rotated token is
    used from the next cycle on; unreadable or empty, the cycle's metrics are
    unavailable (every service holds)."""
    max_answer_bytes: int = 32 * 1024 * 1024
    """Largest answer body read (decoded); a larger one makes the cycle's metrics
    unavailable. A preset answer holds a row per (service, role), or per (service,
    le) for the request mix: about 20 MB for 10,000 services."""
    verify_tls: bool = True
    ca_file: str | None = None
    """A PEM bundle of the certificate authorities to verify an HTTPS Prometheus with
    (an internal CA), instead of the system's."""

    @property
    def shown_url(self) -> str:
        """``url`` as messages, logs and statuses show it: without a password."""
        return redacted_url(self.url)

    @property
    def tls_verify(self) -> bool | str:
        """What ``requests`` verifies the server with: the CA bundle, or on/off."""
        return self.ca_file if self.verify_tls and self.ca_file else self.verify_tls

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.rate_window_s <= 0:
            raise ValueError("timeout_s and rate_window_s must be positive")
        if self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("retries and backoffs must not be negative")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_answer_bytes < 1:
            raise ValueError("max_answer_bytes must be positive")
        if self.window_offset_s is not None and self.window_offset_s < 0:
            raise ValueError("window_offset_s must not be negative")
        if self.scrape_interval_s <= 0 or not 0 <= self.min_window_coverage <= 1:
            raise ValueError("scrape_interval_s must be positive and min_window_coverage in [0, 1]")
        unknown = (set(self.signals) - set(METRIC_NAMES)) | (set(self.lengths) - set(LENGTH_NAMES))
        if unknown:
            raise ValueError(f"unknown signals: {sorted(unknown)}")

    @property
    def answer_deadline_s(self) -> float:
        """How long one HTTP request may take in full, body included: the evaluation
        timeout once more for the transfer (``timeout_s`` alone bounds each read)."""
        return 2 * self.timeout_s

    @property
    def window_offset(self) -> float:
        """``window_offset_s``, its default resolved."""
        return self.scrape_interval_s if self.window_offset_s is None else self.window_offset_s

    @property
    def window_coverage(self) -> WindowCoverage | None:
        """The sample count below which a windowed signal is missing (None: no check)."""
        if self.min_window_coverage == 0:
            return None
        return WindowCoverage.of(
            self.rate_window_s, self.scrape_interval_s, self.min_window_coverage
        )


@dataclass(frozen=True)
class WindowCoverage:
    """How many raw samples a rate window must hold to be read.

    ``rate()`` divides the increase it sees by the whole window: when samples cover
    only part of it (Prometheus restarted, a target came back after a gap) the rate
    reads low by about the uncovered share, and a policy would scale in on it. A
    window holds ``expected = window / scrape interval`` samples per series;
    ``required = max(2, ceil(fraction x expected))``: with the default three quarters a
    60 s window at 15 s scrapes needs 3 of 4, so one missed scrape mid-window (which
    does not bias ``rate()``) is tolerated, while a window covered by 2 samples (read
    40 to 60 % low) or fewer is missing. The price: a window just at the threshold
    after a gap still reads up to ``(expected - required + 0.5) / expected`` low (a
    quarter to three eighths at 3 of 4), for at most ``expected - required`` scrape
    intervals, which the policy's scale-in window absorbs; ``fraction`` 1 removes it
    but holds after every missed scrape. Two is the least ``rate()`` works with."""

    expected: float
    required: int

    @classmethod
    def of(cls, window_s: float, scrape_interval_s: float, fraction: float) -> WindowCoverage:
        expected = window_s / scrape_interval_s
        # The epsilon keeps 0.75 x 4 at 3 despite binary floating point.
        return cls(expected, max(2, math.ceil(fraction * expected - 1e-9)))

    def problem(self, samples: float) -> str | None:
        """Why a window holding ``samples`` (of its best-covered series) is not read."""
        if samples >= self.required:
            return None
        return (
            f"window not covered: {format_number(samples)} of "
            f"{format_number(round(self.expected, 1))} samples "
            f"(at least {self.required} needed)"
        )


# ----------------------------------------------------------------------------- plan (pure)


@dataclass(frozen=True)
class QueryPart:
    """One distinct query of a signal and the services it serves."""

    part_id: str
    query: SignalQuery
    services: tuple[str, ...]
    service_label: str
    role_label: str
    coverage: WindowCoverage | None = None
    """Set when the query counts its window's samples (``SignalQuery.samples``)."""

    def promql(self) -> str:
        """This part alone, tagged like inside a merged query."""
        text = f'label_replace({self.query.value}, "{PART_LABEL}", "{self.part_id}", "", "")'
        if self.query.sampled_at is not None:
            text += (
                f' or label_replace({self.query.sampled_at}, "{PART_LABEL}", '
                f'"{self.part_id}t", "", "")'
            )
        if self.coverage is not None and self.query.samples is not None:
            text += (
                f' or label_replace({self.query.samples}, "{PART_LABEL}", '
                f'"{self.part_id}c", "", "")'
            )
        return text


@dataclass(frozen=True)
class SignalRequest:
    """Everything one HTTP request reads: one signal (or request-mix histogram), all its
    parts."""

    signal: SignalName
    role: Role
    parts: tuple[QueryPart, ...]

    @property
    def histogram(self) -> bool:
        """A request-mix histogram: rows per ``le``, read as ``LengthBuckets``."""
        return self.signal in LENGTH_NAMES

    @property
    def optional(self) -> bool:
        """A request-mix histogram, a queue or the mean inter-token gap: its failure must
        not fail the cycle (``OPTIONAL_SIGNALS``)."""
        return self.signal in OPTIONAL_SIGNALS

    def promql(self) -> str:
        return " or ".join(part.promql() for part in self.parts)


@dataclass(frozen=True)
class SignalGap:
    """Why one service's signal came back missing."""

    service: str
    signal: SignalName
    reason: str


def plan_requests(
    policies: Sequence[ServicePolicy],
    signals: Sequence[SignalName],
    *,
    window_s: float,
    recorded_histograms: bool = False,
    coverage: WindowCoverage | None = None,
    offset_s: float = 0.0,
) -> tuple[tuple[SignalRequest, ...], tuple[SignalGap, ...]]:
    """Group services by identical PromQL, per signal. Each preset part is restricted to
    its own services (module doc), so an answer holds no series of anyone else's and
    the parts together aggregate every series once (overrides are the user's PromQL
    and stay as written, ``$__services`` filled with their services' regex). Services
    that cannot be read (no source in their preset, invalid label names) are gaps.
    ``coverage`` (``PrometheusSettings.window_coverage``) makes each windowed preset
    part count its window's samples too, in the same request. ``offset_s`` ends the
    presets' counter and histogram windows that long before the evaluation time
    (``PrometheusSettings.window_offset``)."""
    requests_out: list[SignalRequest] = []
    gaps: list[SignalGap] = []
    for signal in signals:
        groups: dict[tuple[SignalQuery, str, str], list[ServicePolicy]] = defaultdict(list)
        for policy in policies:
            config = policy.metrics
            if not (is_label_name(config.service_label) and is_label_name(config.role_label)):
                gaps.append(
                    SignalGap(
                        policy.name,
                        signal,
                        f"invalid label names service_label={config.service_label!r} "
                        f"role_label={config.role_label!r}",
                    )
                )
                continue
            query = signal_query(
                policy,
                signal,
                window_s=window_s,
                recorded_histograms=recorded_histograms,
                offset_s=offset_s,
            )
            if query is None:
                preset = config.preset or policy.engine
                gaps.append(
                    SignalGap(policy.name, signal, f"the '{preset}' preset has no source for it")
                )
                continue
            groups[(query, config.service_label, config.role_label)].append(policy)
        parts: list[QueryPart] = []
        for i, ((query, service_label, role_label), members) in enumerate(groups.items()):
            names = tuple(policy.name for policy in members)
            if query.sampled_at is not None:  # a preset's: grouped unrestricted, sent restricted
                restricted = signal_query(
                    members[0],
                    signal,
                    window_s=window_s,
                    services=names,
                    recorded_histograms=recorded_histograms,
                    offset_s=offset_s,
                )
                assert restricted is not None  # same preset as the unrestricted query
                query = restricted
            else:  # an override: restricted where it says where (``$__services``)
                query = restrict_override(query, names)
            part_coverage = coverage if query.samples is not None else None
            parts.append(QueryPart(str(i), query, names, service_label, role_label, part_coverage))
        if parts:
            requests_out.append(SignalRequest(signal, signal_role(signal), tuple(parts)))
    return tuple(requests_out), tuple(gaps)


# ----------------------------------------------------------------------------- parse (pure)


@dataclass(frozen=True)
class Row:
    """One series of an instant-query result: its labels, value and evaluation time."""

    labels: Mapping[str, str]
    value: float
    evaluated_at_s: float


def parse_vector(result: Any) -> list[Row]:
    """Rows of an instant vector (``data.result`` of ``/api/v1/query``). Prometheus
    encodes values as strings (``"NaN"``, ``"+Inf"`` included). Raises ValueError on
    anything that is not a vector."""
    if not isinstance(result, list):
        raise ValueError(f"expected a vector result (a list), got {type(result).__name__}")
    rows: list[Row] = []
    for item in result:
        try:
            labels = item["metric"]
            at_s, text = item["value"]
            if not (
                isinstance(labels, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
            ):
                raise TypeError("label names and values are strings")
            if not (isinstance(text, str) and SAMPLE_VALUE.fullmatch(text)):
                raise ValueError("a sample value is a number as Prometheus writes it")
            rows.append(Row(labels, float(text), float(at_s)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an instant-vector sample: {quoted(repr(item))}") from exc
    return rows


# A sample value as Prometheus writes one (Go's strconv.FormatFloat, and "NaN", "+Inf",
# "-Inf"): ASCII digits only. ``float`` alone also takes "1_000", Arabic-Indic digits
# and surrounding white space, none of which a Prometheus answer holds.
SAMPLE_VALUE = re.compile(r"[+-]?(?:Inf|NaN|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)", re.ASCII)


@dataclass(frozen=True)
class QueryRejected:
    """Prometheus refused a query (HTTP 400/422) with this message."""

    message: str


@dataclass(frozen=True)
class QueryFailed:
    """An optional query (request mix) found Prometheus unavailable; the cycle went on."""

    message: str


PartOutcome = list[Row] | QueryRejected | QueryFailed


def split_by_part(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Rows of a merged query by their part tag (``"0"``, ``"0t"``, ...); the tag label
    itself is removed."""
    out: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        labels = dict(row.labels)
        tag = labels.pop(PART_LABEL, None)
        if tag is not None:
            out[tag].append(Row(labels, row.value, row.evaluated_at_s))
    return out


def _describe(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


def assemble(
    plan: Sequence[SignalRequest],
    outcomes: Mapping[tuple[SignalName, str], PartOutcome],
    policies: Sequence[ServicePolicy],
    now_s: float,
    plan_gaps: Sequence[SignalGap] = (),
) -> tuple[dict[str, ServiceMetrics], tuple[SignalGap, ...]]:
    """Turn query results into one ``ServiceMetrics`` per policy, each carrying why its
    missing signals are missing (``ServiceMetrics.gaps``: those found here after the
    plan's own, ``plan_gaps``), and every gap.

    ``outcomes`` maps (signal, part id) to the rows of that part (value rows tagged
    with the part id, freshness rows with the id + ``t``) or to a rejection or failure.
    """
    by_name = {policy.name: policy for policy in policies}
    values: dict[str, dict[str, Sample]] = {name: {} for name in by_name}
    mixes: dict[str, dict[str, LengthBuckets]] = {name: {} for name in by_name}
    gaps: list[SignalGap] = list(plan_gaps)
    split_cache: dict[int, dict[str, list[Row]]] = {}
    for request in plan:
        role = request.role
        for part in request.parts:
            outcome = outcomes.get((request.signal, part.part_id))
            if outcome is None:
                gaps += [SignalGap(s, request.signal, "not queried") for s in part.services]
                continue
            if isinstance(outcome, QueryRejected | QueryFailed):
                why = "rejected by Prometheus" if isinstance(outcome, QueryRejected) else "failed"
                gaps += [
                    SignalGap(s, request.signal, f"query {why}: {outcome.message}")
                    for s in part.services
                ]
                continue
            key = id(outcome)  # all parts of a merged query share one answer: split it once
            if key not in split_cache:
                split_cache[key] = split_by_part(outcome)
            tagged = split_cache[key]
            value_rows = _index(tagged.get(part.part_id, []), part)
            fresh_rows = _index(tagged.get(part.part_id + "t", []), part)
            count_rows = _index(tagged.get(part.part_id + "c", []), part)
            if request.histogram:
                # Histogram rows: one per le, matched by service whatever their role label
                # (the preset aggregates it away; an override may keep one role).
                value_rows, fresh_rows = _by_service(value_rows), _by_service(fresh_rows)
                count_rows = _by_service(count_rows)
            for service in part.services:
                found: Sample | LengthBuckets | None
                found, reason = _pick(
                    service,
                    role,
                    value_rows,
                    fresh_rows if part.query.sampled_at is not None else None,
                    histogram=request.histogram,
                    now_s=now_s,
                    max_age_s=by_name[service].scaling.metric_max_age_s,
                )
                if found is not None and part.coverage is not None:
                    reason = _coverage_problem(service, role, count_rows, part.coverage) or ""
                    if reason:
                        found = None
                if found is None:
                    gaps.append(SignalGap(service, request.signal, reason))
                elif isinstance(found, LengthBuckets):
                    mixes[service][request.signal] = found
                else:
                    values[service][request.signal] = found
    # Keys are ServiceMetrics' field names (signals and mixes); Any spares mypy matching
    # every value type against every field.
    fields: dict[str, dict[str, Any]] = {name: {**values[name], **mixes[name]} for name in by_name}
    missing: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for gap in gaps:
        missing[gap.service].append((gap.signal, gap.reason))
    metrics = {
        name: ServiceMetrics(service=name, gaps=tuple(missing[name]), **fields[name])
        for name in by_name
    }
    return metrics, tuple(gaps)


def _index(rows: Sequence[Row], part: QueryPart) -> dict[tuple[str, str | None], list[Row]]:
    """Rows by (service, role); role None for service-level rows without a role label."""
    out: dict[tuple[str, str | None], list[Row]] = defaultdict(list)
    for row in rows:
        service = row.labels.get(part.service_label)
        if service is not None:
            out[(service, row.labels.get(part.role_label))].append(row)
    return out


def _by_service(
    rows: Mapping[tuple[str, str | None], list[Row]],
) -> dict[tuple[str, str | None], list[Row]]:
    """Rows re-keyed by (service, None): every role's rows of a service together."""
    out: dict[tuple[str, str | None], list[Row]] = defaultdict(list)
    for (service, _role), group in rows.items():
        out[(service, None)].extend(group)
    return out


def _coverage_problem(
    service: str,
    role: Role,
    count_rows: Mapping[tuple[str, str | None], list[Row]],
    coverage: WindowCoverage,
) -> str | None:
    """Why a value's window is not covered by samples, or None when it is. No count row
    means no sample in the window at all (``count_over_time`` returns nothing)."""
    rows = count_rows.get((service, role)) or count_rows.get((service, None)) or []
    return coverage.problem(max((row.value for row in rows), default=0.0))


_FUTURE_LEEWAY_S = 1.0
"""How far after the evaluation time a sample time may lie (float rounding), at most."""


def _sampled_at(
    rows: Sequence[Row],
    fresh_rows: Mapping[tuple[str, str | None], list[Row]] | None,
    key: tuple[str, str | None],
    *,
    now_s: float,
    max_age_s: float,
) -> tuple[float | None, str]:
    """When the value read from ``rows`` was sampled (the freshness rows under ``key``
    hold its newest sample's time; without them, the query's evaluation time), or None
    and why it is stale or too old."""
    if fresh_rows is None:
        at_s = min(row.evaluated_at_s for row in rows)
    else:
        fresh = fresh_rows.get(key)
        if not fresh:
            return None, "no current sample (series stale: target gone or not scraped)"
        at_s = min(row.value for row in fresh)
    # Prometheus evaluates at ``now_s`` and never returns a later sample; an answer
    # that does (or a NaN time, which every age comparison would pass) is broken.
    if not math.isfinite(at_s) or at_s > now_s + _FUTURE_LEEWAY_S:
        return (
            None,
            f"sample time {format_number(at_s)} is not a time before {format_number(now_s)}",
        )
    age_s = now_s - at_s
    if age_s > max_age_s:
        return None, f"stale: newest sample {age_s:.0f} s old > {format_number(max_age_s)} s"
    return at_s, ""


def _pick(
    service: str,
    role: Role,
    value_rows: Mapping[tuple[str, str | None], list[Row]],
    fresh_rows: Mapping[tuple[str, str | None], list[Row]] | None,
    *,
    histogram: bool,
    now_s: float,
    max_age_s: float,
) -> tuple[Sample | LengthBuckets | None, str]:
    """One service's value, or with ``histogram`` its request-mix histogram (rows
    keyed by ``_by_service``, one per ``le``), if fresh; else None and why."""
    key: tuple[str, str | None] = (service, role)
    rows = None if histogram else value_rows.get(key)
    if not rows:
        key = (service, None)
        rows = value_rows.get(key)
    if not rows:
        return None, f"no {'histogram ' if histogram else ''}series for role {role}"
    read, problem = _buckets(rows) if histogram else _value(rows)
    if read is None:
        return None, problem
    at_s, problem = _sampled_at(rows, fresh_rows, key, now_s=now_s, max_age_s=max_age_s)
    if at_s is None:
        return None, problem
    return read(at_s), ""


# What a row set reads as, given the time it was sampled at; or None and why not.
_Read = tuple[Callable[[float], Sample | LengthBuckets] | None, str]


def _value(rows: Sequence[Row]) -> _Read:
    if len(rows) > 1:
        return None, (
            f"{len(rows)} series for one (service, role); the query must aggregate "
            "by (service, role)"
        )
    value = rows[0].value
    if not math.isfinite(value):
        return None, f"value is {_describe(value)}"
    return partial(Sample, value), ""


def _buckets(rows: Sequence[Row]) -> _Read:
    if len(rows) > MAX_LENGTH_BUCKETS:
        return None, f"{len(rows)} buckets, more than any engine exports ({MAX_LENGTH_BUCKETS})"
    by_le: dict[float, float] = {}
    for row in rows:
        text = row.labels.get("le")
        if text is None:
            return None, "a series without an 'le' label; the query must aggregate by (service, le)"
        try:
            le = float(text)  # "+Inf" included
        except ValueError:
            le = math.nan
        if math.isnan(le):
            return None, f"le={quoted(repr(text))} is not a bucket bound"
        if le in by_le:
            return (
                None,
                f"several series for one (service, le={quoted(repr(text))}); the query must "
                "aggregate by (service, le) and each bound appear once",
            )
        by_le[le] = row.value
    if math.inf not in by_le:
        # Requests above the largest bound are not counted at all: the mix would read
        # shorter than it is (histogram_quantile calls such a histogram NaN too).
        return None, "no +Inf bucket: requests above the largest bound are not counted"
    bounds = tuple(sorted(by_le))
    cumulative = tuple(by_le[le] for le in bounds)
    for value in cumulative:
        if not math.isfinite(value):
            return None, f"a bucket is {_describe(value)}"
    if max(cumulative) <= 0:
        return None, "empty: no request finished in the window"
    return partial(LengthBuckets, bounds, cumulative), ""


# ----------------------------------------------------------------------------- I/O


@dataclass(frozen=True)
class QueryTiming:
    signal: SignalName
    promql: str
    seconds: float
    http_requests: int


@dataclass(frozen=True)
class CycleReport:
    """What one ``fetch`` did: for logs, the loop's status and benchmarks."""

    now_s: float
    duration_s: float
    http_requests: int
    queries: tuple[QueryTiming, ...]
    gaps: tuple[SignalGap, ...]


class AnswerTooLarge(Exception):
    """An answer's body exceeded ``PrometheusSettings.max_answer_bytes``."""


class AnswerTooSlow(requests.Timeout):
    """An answer's body did not arrive in full within the request's deadline (a server
    sending a byte now and then never trips the per-read timeout)."""


_READ_CHUNK_BYTES = 64 * 1024
# The most JSON objects an answer may hold (each "{" counted, those in strings too). Its
# byte limit does not bound the memory an answer takes parsed: 32 MiB of empty rows
# are 1.1 million of them, ~600 MB as Python objects (and as much again per query in
# flight: 5 GB through ``plan``, a hostile prober). The largest answer a cycle asks for
# is a length histogram's per service and bucket: 1,000 services (the most one
# durable state holds) x 2 histograms x ~25 buckets (vLLM's 1-2-5 bounds up to a
# million tokens) x 2 roles = 100,000 rows of 2 objects each; 2.5 times that is
# allowed, ~150 MB parsed at most.
MAX_ANSWER_OBJECTS = 500_000


class _RecordingSession(requests.Session):
    """A requests session that counts what it sends and keeps the last response, so the
    adapter can read the HTTP status that prometheus-api-client folds into a message.

    It also bounds every answer, which the client would read whole into memory: at
    most ``max_answer_bytes`` (decoded) and ``MAX_ANSWER_OBJECTS`` JSON objects, all of
    it within ``deadline_s`` of sending, and never a redirect followed (the 3xx comes back as a refused query: an answer
    from another host is not our Prometheus's, and our headers must not travel
    there)."""

    def __init__(self, *, max_answer_bytes: int, deadline_s: float) -> None:
        super().__init__()
        self.sent = 0
        self.last_response: requests.Response | None = None
        self.max_answer_bytes = max_answer_bytes
        self.deadline_s = deadline_s

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent += 1
        self.last_response = None
        deadline = time.monotonic() + self.deadline_s
        kwargs.update(stream=True, allow_redirects=False)
        response = super().send(request, **kwargs)
        try:
            body = self._bounded_body(response, deadline)
        finally:
            response.close()
        if body.count(b"{") > MAX_ANSWER_OBJECTS:
            raise AnswerTooLarge(f"holds more than {MAX_ANSWER_OBJECTS:,} JSON objects")
        # What requests itself stores after reading a body (``Response.content``).
        response._content = body
        response._content_consumed = True
        self.last_response = response
        return response

    def _bounded_body(self, response: requests.Response, deadline: float) -> bytes:
        try:
            return read_answer(
                # read1 returns what has arrived (at most a chunk, decompressed), so the
                # deadline is checked between a trickling server's bytes.
                lambda: response.raw.read1(_READ_CHUNK_BYTES, decode_content=True),
                declared_bytes=response.headers.get("Content-Length"),
                max_bytes=self.max_answer_bytes,
                deadline=deadline,
            )
        except urllib3.exceptions.ReadTimeoutError as exc:  # as requests would say it
            raise requests.ReadTimeout(str(exc)) from exc
        except DeadlinePassed:
            raise AnswerTooSlow(
                f"the answer did not arrive in full within {format_number(self.deadline_s)} s"
            ) from None
        except BoundedReadError as exc:
            raise AnswerTooLarge(f"the answer {exc.reason}") from None


class _Retryable(Exception):
    pass


_Result = tuple[dict[tuple[SignalName, str], PartOutcome], QueryTiming]


class _Connection:
    """One HTTP session and client; used by one query at a time."""

    def __init__(self, settings: PrometheusSettings) -> None:
        self.session = _RecordingSession(
            max_answer_bytes=settings.max_answer_bytes, deadline_s=settings.answer_deadline_s
        )
        self.session.verify = settings.tls_verify
        self.client = PrometheusConnect(
            url=settings.url.rstrip("/"),
            headers=dict(settings.headers) or None,
            disable_ssl=not settings.verify_tls,
            # No urllib3 retries (ours count and back off); read=False lets a read
            # timeout surface as requests' ReadTimeout instead of a ConnectionError.
            retry=Retry(total=0, read=False),
            session=self.session,
            timeout=settings.timeout_s,  # type: ignore[arg-type,unused-ignore]  # annotated int; floats work
        )


class PrometheusMetricsSource:
    """``MetricsSource`` over a Prometheus HTTP API (see the module docstring).

    The signals' requests run ``settings.max_concurrency`` at a time, each on its own
    connection; the first one that fails for good cancels those not yet started.

    Several clusters' cycles may fetch at once (``reconciler.loop`` runs each on its
    own thread): their requests share the connections and the query threads, each
    connection serving one request at a time; ``last_report`` is the report of the
    fetch that ended last, whichever cluster's it was.
    """

    def __init__(
        self,
        settings: PrometheusSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.settings = settings
        self._sleep = sleep
        self._clock = clock
        self._connections = [_Connection(settings) for _ in range(settings.max_concurrency)]
        self._idle: queue.SimpleQueue[_Connection] = queue.SimpleQueue()
        for connection in self._connections:
            self._idle.put(connection)
        self._executor: DaemonThreadPool | None = None
        self._executor_lock = threading.Lock()
        self.last_report: CycleReport | None = None

    @property
    def http_requests_sent(self) -> int:
        """HTTP requests sent since construction (every attempt counts)."""
        return sum(connection.session.sent for connection in self._connections)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for connection in self._connections:
            connection.session.close()

    def __enter__(self) -> PrometheusMetricsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(self, policies: Sequence[ServicePolicy], now_s: float) -> dict[str, ServiceMetrics]:
        started = self._clock()
        # Read once per fetch (a rotated token is picked up), set on each connection
        # when a request takes it: another fetch may be using the others.
        headers = token_headers(self.settings)
        plan, plan_gaps = plan_requests(
            policies,
            (*self.settings.signals, *self.settings.lengths),
            window_s=self.settings.rate_window_s,
            recorded_histograms=self.settings.recorded_histograms,
            coverage=self.settings.window_coverage,
            offset_s=self.settings.window_offset,
        )
        results = self._run_all(plan, now_s, headers)
        outcomes: dict[tuple[SignalName, str], PartOutcome] = {}
        for part_outcomes, _timing in results:
            outcomes.update(part_outcomes)
        metrics, gaps = assemble(plan, outcomes, policies, now_s, plan_gaps)
        self.last_report = CycleReport(
            now_s=now_s,
            duration_s=self._clock() - started,
            # This fetch's own: another cluster's fetch may send on the connections meanwhile.
            http_requests=sum(timing.http_requests for _outcomes, timing in results),
            queries=tuple(timing for _outcomes, timing in results),
            gaps=gaps,
        )
        for gap in self.last_report.gaps:
            if gap.reason.startswith("query rejected"):
                log.warning("%s/%s missing: %s", gap.service, gap.signal, gap.reason)
        return metrics

    def _run_all(
        self, plan: Sequence[SignalRequest], now_s: float, headers: Mapping[str, str]
    ) -> list[_Result]:
        """Every signal's request, in plan order; raises the first (in plan order)
        ``MetricsUnavailable`` after stopping the requests not yet started."""
        if self.settings.max_concurrency == 1 or len(plan) <= 1:
            return [self._timed(request, now_s, headers) for request in plan]
        with self._executor_lock:  # two fetches at once: one executor
            if self._executor is None:
                self._executor = DaemonThreadPool(
                    max_workers=self.settings.max_concurrency,
                    thread_name_prefix="prometheus-query",
                )
            executor = self._executor
        stop = threading.Event()

        def task(request: SignalRequest) -> _Result | None:
            if stop.is_set():
                return None
            try:
                return self._timed(request, now_s, headers)
            except BaseException:
                stop.set()
                raise

        futures = [executor.submit(task, request) for request in plan]
        wait(futures)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
        return [result for future in futures if (result := future.result()) is not None]

    def _timed(self, request: SignalRequest, now_s: float, headers: Mapping[str, str]) -> _Result:
        connection = self._idle.get()
        try:
            connection.session.headers.update(headers)
            started, sent = self._clock(), connection.session.sent
            try:
                outcomes = self._run(request, now_s, connection)
            except MetricsUnavailable as exc:
                if not request.optional:
                    raise
                # The request mix and the queues are optional (``SignalRequest.optional``).
                log.warning("%s missing for this cycle: %s", request.signal, exc)
                failed = QueryFailed(exc.cause or str(exc))
                outcomes = {(request.signal, part.part_id): failed for part in request.parts}
            timing = QueryTiming(
                request.signal,
                request.promql(),
                self._clock() - started,
                connection.session.sent - sent,
            )
            return outcomes, timing
        finally:
            self._idle.put(connection)

    def _run(
        self, request: SignalRequest, now_s: float, connection: _Connection
    ) -> dict[tuple[SignalName, str], PartOutcome]:
        """Outcomes of every part of one signal: one request, more only when Prometheus
        rejects the merged query and the culprit must be found."""
        outcome = self._query(request.promql(), request.signal, now_s, connection)
        if not isinstance(outcome, QueryRejected):
            return {(request.signal, part.part_id): outcome for part in request.parts}
        if len(request.parts) == 1:
            return {(request.signal, request.parts[0].part_id): outcome}
        return {
            (request.signal, part.part_id): self._query(
                part.promql(), request.signal, now_s, connection
            )
            for part in request.parts
        }

    def _query(
        self, promql: str, signal: SignalName, now_s: float, connection: _Connection
    ) -> PartOutcome:
        attempts = self.settings.retries + 1
        cause = ""
        for attempt in range(attempts):
            if attempt:
                self._sleep(
                    min(self.settings.backoff_s * 2 ** (attempt - 1), self.settings.max_backoff_s)
                )
            try:
                return self._attempt(promql, signal, now_s, connection)
            except _Retryable as exc:
                cause = str(exc)
        raise MetricsUnavailable(
            f"Prometheus at {self.settings.shown_url} did not answer the {signal} query "
            f"after {attempts} attempt{'s' if attempts > 1 else ''}",
            query=promql,
            cause=cause,
        )

    def _not_the_api(
        self, promql: str, exc: Exception, connection: _Connection
    ) -> MetricsUnavailable:
        """The error for an answer that is not the Prometheus HTTP API's (caught apart
        from the transport's errors: requests' JSONDecodeError is one of those too).
        An error body sent with HTTP 200 (a proxy's) says what went wrong itself."""
        response = connection.session.last_response
        if _is_error_body(response):
            return MetricsUnavailable(
                f"{self.settings.shown_url} answered with an error body (HTTP 200)",
                query=promql,
                cause=_error_message(response),
            )
        return MetricsUnavailable(
            f"{self.settings.shown_url} did not answer like the Prometheus HTTP API",
            query=promql,
            cause=quoted(f"{type(exc).__name__}: {exc}"),
        )

    def _attempt(
        self, promql: str, signal: SignalName, now_s: float, connection: _Connection
    ) -> PartOutcome:
        params = {"time": evaluation_time(now_s), "timeout": format_number(self.settings.timeout_s)}
        try:
            result = connection.client.custom_query(promql, params=params)
        except requests.exceptions.JSONDecodeError as exc:  # a 200 that is not JSON
            raise self._not_the_api(promql, exc, connection) from exc
        except AnswerTooLarge as exc:  # asking again would only read as much again
            raise MetricsUnavailable(
                f"Prometheus at {self.settings.shown_url} answered the {signal} query with more "
                "than max_answer_bytes",
                query=promql,
                cause=str(exc),
            ) from exc
        except AnswerTooSlow as exc:
            raise _Retryable(str(exc)) from exc
        except requests.Timeout as exc:
            raise _Retryable(
                f"no answer within {format_number(self.settings.timeout_s)} s ({type(exc).__name__})"
            ) from exc
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            # Its text may quote the URL asked for, credentials and all.
            raise _Retryable(redacted_url(f"{type(exc).__name__}: {exc}")) from exc
        except PrometheusApiClientException as exc:
            return self._classify_http_error(exc, promql, signal, connection)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            # Not the Prometheus API's JSON (RecursionError: arrays nested too deep for
            # the parser, a 0.4 MiB answer that crashed the cycle).
            raise self._not_the_api(promql, exc, connection) from exc
        try:
            return parse_vector(result)
        except ValueError as exc:
            raise MetricsUnavailable(
                f"unexpected answer from Prometheus at {self.settings.shown_url} to the {signal} query",
                query=promql,
                cause=str(exc),
            ) from exc

    def _classify_http_error(
        self,
        exc: PrometheusApiClientException,
        promql: str,
        signal: SignalName,
        connection: _Connection,
    ) -> QueryRejected:
        response = connection.session.last_response
        status = response.status_code if response is not None else None
        message = _error_message(response) or quoted(str(exc))
        if status in (400, 422):
            return QueryRejected(message)
        if status is not None and (status == 429 or status >= 500):
            raise _Retryable(f"HTTP {status}: {message}") from exc
        raise MetricsUnavailable(
            f"Prometheus at {self.settings.shown_url} refused the {signal} query (HTTP {status})",
            query=promql,
            cause=message,
        ) from exc


def _json_body(response: requests.Response) -> Any:
    """``response``'s body as JSON, or None where it is none the parser can read (not
    JSON, or nested deeper than it recurses)."""
    try:
        return response.json()
    except (ValueError, RecursionError):
        return None


def _is_error_body(response: requests.Response | None) -> bool:
    """Whether ``response`` carries a Prometheus API error (``"status": "error"``)."""
    if response is None:
        return False
    body = _json_body(response)
    return isinstance(body, dict) and body.get("status") == "error"


def _error_message(response: requests.Response | None) -> str:
    """The ``error`` field of a Prometheus API error body, or the body's start."""
    if response is None:
        return ""
    if response.is_redirect:
        return quoted(f"redirected to {response.headers.get('Location', '?')}, not followed")
    body = _json_body(response)
    if isinstance(body, dict) and "error" in body:
        kind = body.get("errorType")
        return quoted(f"{kind}: {body['error']}" if kind else str(body["error"]))
    return quoted(response.text)


# ------------------------------------------------------------------- set-up checks


def read_bearer_token(path: str) -> str:
    """The token in ``path`` (surrounding white space removed); ``MetricsUnavailable``
    when it cannot be read or is empty, so the cycle holds instead of querying
    unauthenticated."""
    try:
        # A regular file, at most 64 KiB: a FIFO named here blocked ``plan`` for ever.
        token = read_named_file(Path(path), 64 * 1024).decode("utf-8").strip()
    except BoundedReadError as exc:
        raise MetricsUnavailable(
            f"cannot read the Prometheus bearer token file {path}: it {exc.reason}"
        ) from None
    except UnicodeDecodeError as exc:
        raise MetricsUnavailable(
            f"cannot read the Prometheus bearer token file {path}: {exc}"
        ) from None
    if not token:
        raise MetricsUnavailable(f"the Prometheus bearer token file {path} is empty")
    return token


def token_headers(settings: PrometheusSettings) -> dict[str, str]:
    """The ``Authorization`` header of ``settings.bearer_token_file``, read now (none
    without one); ``MetricsUnavailable`` as ``read_bearer_token``."""
    if settings.bearer_token_file is None:
        return {}
    return {"Authorization": f"Bearer {read_bearer_token(settings.bearer_token_file)}"}


_DURATION_UNITS_S = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86_400.0,
    "w": 604_800.0,
    "y": 31_536_000.0,
}


def parse_duration_s(text: str) -> float | None:
    """Seconds in a Prometheus duration (``15s``, ``1m30s``, ``500ms``); None when
    ``text`` is not one."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|[smhdwy])", text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _DURATION_UNITS_S[u] for n, u in parts)


def _setup_query(settings: PrometheusSettings, path: str, params: Mapping[str, str]) -> Any:
    """The ``data`` of one API answer, read as the adapter would (headers, token, TLS,
    timeout), for the set-up checks; ``None`` when it cannot be read (the cycles report
    that themselves)."""
    # Bounded as every query's answer is (``_RecordingSession``): at most
    # max_answer_bytes, all of it by the answer deadline, no redirect followed. A bare
    # session here read a trickling answer for ever before the first cycle, a 1.5 GiB
    # one whole, and followed a redirect to another port (a hostile prober).
    session = _RecordingSession(
        max_answer_bytes=settings.max_answer_bytes, deadline_s=settings.answer_deadline_s
    )
    session.headers.update(settings.headers)
    try:
        session.headers.update(token_headers(settings))
        # ``verify`` per request, as the adapter's client passes it: a session's own is
        # overridden by $REQUESTS_CA_BUNDLE, which container images often set.
        response = session.get(
            settings.url.rstrip("/") + path,
            params=dict(params),
            timeout=settings.timeout_s,
            verify=settings.tls_verify,
        )
        if response.status_code != 200:  # a redirect too: not followed, not read
            return None
        return response.json()["data"]
    except (
        requests.RequestException,
        AnswerTooLarge,
        MetricsUnavailable,
        ValueError,
        KeyError,
        TypeError,
        RecursionError,
    ):
        return None
    finally:
        session.close()


def scrape_interval_problem(settings: PrometheusSettings) -> str | None:
    """What is wrong with the scrape interval ``settings`` assume, read from
    Prometheus's active targets (``/api/v1/targets``): a target scraped less often
    holds fewer samples per window than the coverage check requires, so every signal
    it carries stays missing and the services it serves hold for ever. None when every
    target is scraped often enough (or coverage is not checked), or when the targets
    cannot be read."""
    coverage = settings.window_coverage
    if coverage is None:
        return None
    data = _setup_query(settings, "/api/v1/targets", {"state": "active"})
    try:
        targets = data["activeTargets"]
        intervals = [parse_duration_s(str(t.get("scrapeInterval", ""))) for t in targets]
    except (KeyError, TypeError, AttributeError):
        return None
    too_slow = [
        i for i in intervals if i is not None and settings.rate_window_s / i < coverage.required
    ]
    if not too_slow:
        return None
    slowest = max(too_slow)
    samples = round(settings.rate_window_s / slowest, 1)
    return (
        f"Prometheus scrapes {len(too_slow)} of {len(targets)} active targets less often "
        f"than the reconciler assumes (every {format_number(settings.scrape_interval_s)} s; "
        f"the slowest every {format_number(slowest)} s): a "
        f"{format_number(settings.rate_window_s)} s window of theirs holds "
        f"{format_number(samples)} sample{'' if samples == 1 else 's'}, fewer than "
        f"the {coverage.required} the coverage check requires, so the services they serve "
        f"hold every cycle; set the scrape interval to {format_number(slowest)} s (the "
        f"rate window then at least {format_number(4 * slowest)} s)"
    )


def recording_rules_problem(settings: PrometheusSettings) -> str | None:
    """With ``recorded_histograms`` on: whether Prometheus holds any series the
    recording rules for ``rate_window_s`` record (``presets.recording_rules``). None
    when it does, when the mode is off, or when Prometheus cannot be asked; else why
    every histogram signal will be missing."""
    if not settings.recorded_histograms:
        return None
    suffix = f":rate{format_duration(settings.rate_window_s)}"
    query = f'group by (__name__) ({{__name__=~"heteroscale:.+{suffix}"}})'
    data = _setup_query(settings, "/api/v1/query", {"query": query})
    if not isinstance(data, dict) or not isinstance(data.get("result"), list) or data["result"]:
        return None
    return (
        f"no series of the recording rules for a {format_number(settings.rate_window_s)} s "
        f"window (heteroscale:*{suffix}) in Prometheus: the latency and request-mix "
        "histograms will be missing every cycle; load the rules `heteroscale "
        "prometheus-rules` prints (same scrape interval and rate window) into Prometheus"
    )

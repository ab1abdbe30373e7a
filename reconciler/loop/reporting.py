"""What the loop tells the outside: structured logs (``configure_logging``), its own
Prometheus metrics (``LoopMetrics``, with the leader election's counters read at
scrape time), the per-cycle records (decisions, held services, drift, the cycle's
summary line) and the HTTP endpoints (``serve_http``: /metrics, /healthz, /readyz).

It decides nothing: the schedule and the cluster cycle call it with what happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Container, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from reconciler.loop.protocols import LeaderElection
from reconciler.observe.base import OBJECT_DRIFT_KINDS, Drift
from reconciler.plan import Plan

if TYPE_CHECKING:
    from reconciler.desired.loader import DesiredState
    from reconciler.loop.cluster_cycle import ClusterOutcome
    from reconciler.loop.schedule import ReconcileLoop

# Every part of the loop logs under this one name, so log filters and the JSON
# "logger" field do not depend on how the loop is split into modules.
log = logging.getLogger("heteroscale.loop")


# --------------------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra``."""

    _RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
        "message",
        "asctime",
    }

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._RESERVED:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(*, json_format: bool = False, level: int = logging.INFO) -> logging.Handler:
    """Log the ``heteroscale`` loggers to stderr (JSON lines or text); returns the
    handler so a caller can remove it again."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if json_format
        else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    root = logging.getLogger("heteroscale")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return handler


def reset_logging(handler: logging.Handler) -> None:
    root = logging.getLogger("heteroscale")
    if handler in root.handlers:
        root.removeHandler(handler)
    root.propagate = True
    root.setLevel(logging.NOTSET)


# --------------------------------------------------------------------------- metrics


class LoopMetrics:
    """The loop's own Prometheus metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Alike by nature: each metric declared in full (name, help, labels), as
        # prometheus_client takes it, so each reads and greps as it is exported.
        self.cycle_duration = Histogram(
            "heteroscale_cycle_duration_seconds",
            "Wall time of one cluster's reconcile cycle",
            ["cluster"],
            registry=r,
            # Past a minute: a slow cluster's cycle, past its deadline (``running``).
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )
        self.cycles = Counter(
            "heteroscale_cycles_total",
            "Cluster cycles by outcome (ok, error, skipped, standby)",
            ["cluster", "outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "heteroscale_decisions_total",
            "Autoscaling decisions by reason",
            ["service", "reason"],
            registry=r,
        )
        self.target_instances = Gauge(
            "heteroscale_target_instances",
            "Instances the policy asks for",
            ["service", "role"],
            registry=r,
        )
        self.current_instances = Gauge(
            "heteroscale_current_instances",
            "Instances the fleet runs (ready) or starts when the cycle observed it",
            ["service", "role", "state"],
            registry=r,
        )
        self.slo_seconds = Gauge(
            "heteroscale_slo_seconds",
            "The latency SLO of the service's policy in force (slo: ttft, tbt)",
            ["service", "slo"],
            registry=r,
        )
        self.placement_solve = Histogram(
            "heteroscale_placement_solve_seconds",
            "Placement solver wall time",
            ["cluster", "solver"],
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
        )
        self._add_drift_and_error_metrics(r)
        self._add_state_metrics(r)

    def _add_drift_and_error_metrics(self, r: CollectorRegistry) -> None:
        self.drift = Gauge(
            "heteroscale_drift_items",
            "Drift items seen in the last cycle",
            ["cluster", "kind"],
            registry=r,
        )
        self.drift_total = Counter(
            "heteroscale_drift_total",
            "Drift items newly seen (an object field whose live value is not the desired "
            "one, a node that disagrees with the cluster file), by kind",
            ["cluster", "kind"],
            registry=r,
        )
        self.held = Gauge(
            "heteroscale_services_held",
            "Services held in the last cycle because a scale change was refused (drift)",
            ["cluster"],
            registry=r,
        )
        self.errors = Counter(
            "heteroscale_errors_total",
            "Errors by cluster and kind",
            ["cluster", "kind"],
            registry=r,
        )
        self.plan_changes = Gauge(
            "heteroscale_plan_changes", "Object changes in the last plan", ["cluster"], registry=r
        )

    def _add_state_metrics(self, r: CollectorRegistry) -> None:
        self.leader = Gauge(
            "heteroscale_is_leader", "1 while this replica holds the Lease", registry=r
        )
        self.desired_valid = Gauge(
            "heteroscale_desired_state_valid",
            "1 when the latest desired state loaded cleanly",
            registry=r,
        )
        self.last_cycle = Gauge(
            "heteroscale_last_cycle_timestamp_seconds", "When the last full cycle ended", registry=r
        )
        self.desired_from_store = Gauge(
            "heteroscale_desired_state_from_store",
            "1 while the desired state in force is the stored last known good revision "
            "(the latest was invalid when this process started)",
            registry=r,
        )
        self.metrics_available = Gauge(
            "heteroscale_metrics_available",
            "1 when the cluster's last cycle read its metrics source, 0 when the source was "
            "unavailable (MetricsUnavailable: every service of the cluster held its size)",
            ["cluster"],
            registry=r,
        )
        self.state_writes = Counter(
            "heteroscale_state_writes_total",
            "Writes of the durable state object by outcome (written, skipped, failed)",
            ["cluster", "outcome"],
            registry=r,
        )


class LeaseCollector(Collector):
    """The election's own counters, read at scrape time: the elector runs (and fails)
    before the loop exists, so nothing is lost by pulling instead of pushing."""

    def __init__(self, election: LeaderElection) -> None:
        self.election = election

    def collect(self) -> Any:
        errors = CounterMetricFamily(
            "heteroscale_lease_errors",
            "Failed leader-election rounds by error kind (each retried with backoff)",
            labels=["kind"],
        )
        for kind, count in sorted(self.election.error_counts().items()):
            errors.add_metric([kind], count)
        yield errors
        yield GaugeMetricFamily(
            "heteroscale_lease_decision_age_seconds",
            "Seconds since the leader election last reached a valid decision",
            value=self.election.decision_age_s(),
        )
        yield GaugeMetricFamily(
            "heteroscale_lease_healthy",
            "1 while the leader election reaches decisions within its bound",
            value=0.0 if self.election.health_problem() else 1.0,
        )


class RunningCollector(Collector):
    """How long each cluster's cycle in flight has run, read at scrape time (0 for a
    cluster with none): a cycle past its deadline shows here while it drags, and it
    may drag for minutes between two loop cycles."""

    def __init__(
        self, ages: Callable[[], dict[str, float]], clusters: Callable[[], Iterable[str]]
    ) -> None:
        self.ages = ages
        self.clusters = clusters

    def collect(self) -> Any:
        ages = self.ages()
        family = GaugeMetricFamily(
            "heteroscale_cycle_running_seconds",
            "Seconds the cluster's cycle in flight has run (0: none in flight); a cycle "
            "past its deadline (--cluster-deadline) keeps running, is not started again "
            'meanwhile and counts in heteroscale_errors_total{kind="CycleOverdue"}',
            labels=["cluster"],
        )
        for cluster in sorted({*self.clusters(), *ages}):
            family.add_metric([cluster], ages.get(cluster, 0.0))
        yield family


# ------------------------------------------------------------------ cycle records


def record_plan(metrics: LoopMetrics, cluster: str, plan: Plan) -> None:
    """Each decision (counted, its targets shown, logged), the solver's time and the
    services held."""
    for service, decision in plan.decisions.items():
        metrics.decisions.labels(service, decision.reason).inc()
        metrics.target_instances.labels(service, "prefill").set(decision.prefill)
        metrics.target_instances.labels(service, "decode").set(decision.decode)
        fleet = plan.current.service_fleet(service)
        for role, count in (("prefill", fleet.prefill), ("decode", fleet.decode)):
            metrics.current_instances.labels(service, role, "ready").set(count.ready)
            metrics.current_instances.labels(service, role, "starting").set(count.starting)
        log.info(
            f"{service}: {decision.message}",
            extra={
                "event": "decision",
                "cluster": cluster,
                "service": service,
                "reason": decision.reason,
                "prefill": decision.prefill,
                "decode": decision.decode,
            },
        )
    stats = plan.placement.stats
    if stats is not None:
        metrics.placement_solve.labels(cluster, stats.solver).observe(stats.wall_s)
    metrics.held.labels(cluster).set(len(plan.held))
    for service, why in plan.held.items():
        # A decision that raised is a bug to report, not a state of the fleet.
        failed = plan.decisions[service].reason == "decision_failed"
        log.log(
            logging.ERROR if failed else logging.WARNING,
            f"cluster {cluster}: {service} held: {why}",
            extra={
                "event": "decision_failed" if failed else "service_held",
                "cluster": cluster,
                "service": service,
            },
        )


def forget_removed(metrics: LoopMetrics, state: DesiredState) -> None:
    """Remove the label sets of every service and cluster the desired state in force no
    longer has: they were last set when it was there, and would be reported at those
    values (a target, instances running) for the life of the process. Called every loop
    cycle, so one an overdue cycle of a removed cluster sets again goes the next."""
    by_service: tuple[MetricWrapperBase, ...] = (
        metrics.decisions,
        metrics.target_instances,
        metrics.current_instances,
        metrics.slo_seconds,
    )
    by_cluster: tuple[MetricWrapperBase, ...] = (
        metrics.cycle_duration,
        metrics.cycles,
        metrics.placement_solve,
        metrics.drift,
        metrics.drift_total,
        metrics.held,
        metrics.errors,
        metrics.plan_changes,
        metrics.metrics_available,
        metrics.state_writes,
    )
    for metric in by_service:
        _remove_label_sets(metric, "service", state.policies)
    for metric in by_cluster:
        _remove_label_sets(metric, "cluster", state.clusters)


def _remove_label_sets(metric: MetricWrapperBase, label: str, keep: Container[str]) -> None:
    """Remove each label set of ``metric`` whose ``label`` is not in ``keep``. The label
    sets are read from its samples (``remove_by_labels`` is newer than the
    prometheus-client we support): a sample's labels are the metric's in declared
    order, then a histogram bucket's ``le``."""
    gone = {
        tuple(value for name, value in sample.labels.items() if name != "le")
        for family in metric.collect()
        for sample in family.samples
        if sample.labels[label] not in keep
    }
    for values in gone:
        metric.remove(*values)


def record_slos(metrics: LoopMetrics, state: DesiredState) -> None:
    """Each service's latency SLOs, as the policies in force state them (the
    dashboard draws the engines' latency against them)."""
    for service, policy in state.policies.items():
        metrics.slo_seconds.labels(service, "ttft").set(policy.slo.ttft_ms / 1000.0)
        metrics.slo_seconds.labels(service, "tbt").set(policy.slo.tbt_ms / 1000.0)


def record_cycle(
    metrics: LoopMetrics,
    cluster: str,
    plan: Plan,
    outcome: ClusterOutcome,
    *,
    leader: bool,
    dry_run: bool,
) -> None:
    """The cycle's summary line and its object change count."""
    changes = len(outcome.diff.changed) if outcome.diff is not None else len(plan.changes)
    metrics.plan_changes.labels(cluster).set(changes)
    log.info(
        f"cluster {cluster}: {len(plan.changes)} group change(s), {changes} object change(s)"
        + (
            " applied"
            if outcome.applied
            else " (dry run)"
            if dry_run
            else " (standby)"
            if not leader
            else ""
        ),
        extra={
            "event": "cycle",
            "cluster": cluster,
            "group_changes": [str(c) for c in plan.changes],
            "applied": outcome.applied,
            "leader": leader,
        },
    )


# Kinds always exported (0 when absent), so an alert on them has a series to watch.
DRIFT_KINDS = (
    "node_missing",
    "node_label",
    "node_capacity",
    "node_unexpected",
    *OBJECT_DRIFT_KINDS,
)


class DriftLog:
    """The drift items of each cluster's last cycle: each is logged and counted when
    first seen, logged again when it goes, and shown by kind while it lasts. Keyed by
    cluster, each entry written by its cluster's cycle only (one at a time), so the
    cycles of different clusters may record at once."""

    def __init__(self, metrics: LoopMetrics) -> None:
        self.metrics = metrics
        self._seen: dict[str, dict[tuple[str, str, str], Drift]] = {}

    def record(self, cluster: str, drift: tuple[Drift, ...]) -> None:
        seen = self._seen.get(cluster, {})
        now = {(d.kind, d.name, d.detail): d for d in drift}
        for key, item in now.items():
            if key not in seen:
                self._log_new(cluster, item)
        for key, item in seen.items():
            if key not in now:
                log.info(
                    f"cluster {cluster}: drift resolved: {item.kind} {item.name}",
                    extra={
                        "event": "drift_resolved",
                        "cluster": cluster,
                        "kind": item.kind,
                        "object": item.name,
                    },
                )
        self._seen[cluster] = now
        # A kind seen last cycle and gone now drops to 0 rather than keeping its count.
        kinds: dict[str, int] = {kind: 0 for kind in DRIFT_KINDS}
        kinds.update({kind: 0 for kind, _, _ in seen})
        for kind, _, _ in now:
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, count in kinds.items():
            self.metrics.drift.labels(cluster, kind).set(count)

    def _log_new(self, cluster: str, item: Drift) -> None:
        self.metrics.drift_total.labels(cluster, item.kind).inc()
        log.warning(
            f"cluster {cluster}: drift {item.kind} {item.name}: {item.detail}",
            extra={
                "event": "drift",
                "cluster": cluster,
                "kind": item.kind,
                "object": item.name,
                "field": getattr(item, "path", ""),
                "live": getattr(item, "live", None),
                "desired": getattr(item, "desired", None),
            },
        )


# ----------------------------------------------------------------------- serving


# A client that opened a connection and sent nothing (or a byte now and then) held a
# thread for good, and every new one another, until the process ran out of threads or
# memory. Each read or write of a client gets this long, and at most this many are
# served at once; a connection past them is closed unanswered (a scraper and the
# kubelet's probes open one or two at a time, and send their request at once).
HTTP_CLIENT_TIMEOUT_S = 5.0
MAX_HTTP_CLIENTS = 64
# A client sending a byte every few seconds never trips the per-read timeout, so 64 of
# them held every slot (and failed /healthz) for as long as they liked: a connection
# is also closed this long after it was accepted, answered or not. One request is
# served per connection (HTTP/1.0), and a scrape of /metrics, or a probe, takes well
# under a second; Prometheus' own scrape timeout defaults to 10 s.
HTTP_CONNECTION_DEADLINE_S = 10.0
# The deadline only rotates the slots: one client that reopens each connection as it
# is closed held all of them, and the kubelet's /healthz probes failed until it
# stopped (a hostile prober: 2 probes of 24 answered). One client address holds at
# most a quarter of them, so the probes (from the node) and Prometheus' scrapes (from
# its Pod) find a slot whatever one other address does; many addresses at once are
# for a NetworkPolicy on the port to keep out.
MAX_HTTP_CLIENTS_PER_ADDRESS = MAX_HTTP_CLIENTS // 4
# How often overdue connections are looked for: a deadline holds to within this.
_DEADLINE_CHECK_S = 0.25


def _client_host(client_address: Any) -> str:
    """The address part of a connection's peer (``(host, port)``), "" for none."""
    return str(client_address[0]) if client_address else ""


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` with at most ``MAX_HTTP_CLIENTS`` handler threads (of
    which one client address holds ``MAX_HTTP_CLIENTS_PER_ADDRESS``), each connection
    closed ``HTTP_CONNECTION_DEADLINE_S`` after it was accepted (by one watchdog thread,
    not a timer per connection)."""

    # socketserver's 5 dropped the connections of a burst past it (their SYN retried a
    # second later), a probe's among them.
    request_queue_size = MAX_HTTP_CLIENTS

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._slots = threading.BoundedSemaphore(MAX_HTTP_CLIENTS)
        self._per_address: dict[str, int] = {}  # open connections by client address
        self._per_address_lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}  # open connection -> monotonic
        self._deadlines_lock = threading.Lock()
        self._stopped = threading.Event()  # before binding: a failed bind closes the server
        super().__init__(address, handler)
        threading.Thread(
            target=self._close_overdue, name="heteroscale-http-deadline", daemon=True
        ).start()

    def _close_overdue(self) -> None:
        while not self._stopped.wait(_DEADLINE_CHECK_S):
            now = time.monotonic()
            with self._deadlines_lock:
                overdue = [conn for conn, at in self._deadlines.items() if at <= now]
            for conn in overdue:
                # The handler's blocked read returns end-of-file (or its write fails)
                # and its thread ends, releasing the slot.
                with contextlib.suppress(OSError):  # already closed
                    conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A connection closed at its deadline, or by its client, mid-answer is nothing
        # to report (socketserver printed a traceback to stderr for each); anything
        # else is logged as the loop's errors are.
        if isinstance(sys.exc_info()[1], OSError):
            return
        log.exception("serving an HTTP request failed")

    def shutdown(self) -> None:
        self._stopped.set()
        super().shutdown()

    def server_close(self) -> None:
        self._stopped.set()
        super().server_close()

    def _take_address_slot(self, host: str) -> bool:
        with self._per_address_lock:
            held = self._per_address.get(host, 0)
            if held >= MAX_HTTP_CLIENTS_PER_ADDRESS:
                return False
            self._per_address[host] = held + 1
            return True

    def _release_address_slot(self, host: str) -> None:
        with self._per_address_lock:
            held = self._per_address.pop(host, 1) - 1
            if held > 0:
                self._per_address[host] = held

    def process_request(self, request: Any, client_address: Any) -> None:
        host = _client_host(client_address)
        if not self._take_address_slot(host):
            self.shutdown_request(request)
            return
        if not self._slots.acquire(blocking=False):
            self._release_address_slot(host)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing will release the slots
            self._slots.release()
            self._release_address_slot(host)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._deadlines_lock:
            self._deadlines[request] = time.monotonic() + HTTP_CONNECTION_DEADLINE_S
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._deadlines_lock:
                del self._deadlines[request]
            self._slots.release()
            self._release_address_slot(_client_host(client_address))


def serve_http(loop: ReconcileLoop, host: str, port: int) -> ThreadingHTTPServer:
    """``/metrics`` (Prometheus text), ``/healthz`` (alive) and ``/readyz`` (a valid
    desired state is loaded) in a daemon thread. Port 0 picks a free port. Clients are
    bounded in number and time (``MAX_HTTP_CLIENTS``, ``HTTP_CLIENT_TIMEOUT_S`` a read
    or write, ``HTTP_CONNECTION_DEADLINE_S`` a connection), and none of them holds
    anything the reconcile loop waits for."""

    class Handler(BaseHTTPRequestHandler):
        timeout = HTTP_CLIENT_TIMEOUT_S  # set on the connection by ``setup``

        def do_GET(self) -> None:
            body, status, kind = _respond(loop, self.path)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = _BoundedHTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="heteroscale-http", daemon=True)
    thread.start()
    return server


def _respond(loop: ReconcileLoop, path: str) -> tuple[bytes, int, str]:
    """Body, status and content type for a GET of ``path``."""
    if path.startswith("/metrics"):
        return generate_latest(loop.metrics.registry), 200, CONTENT_TYPE_LATEST
    if path.startswith("/healthz"):
        problems = loop.health_problems()
        if problems:
            return ("\n".join(problems) + "\n").encode(), 503, "text/plain"
        return b"ok\n", 200, "text/plain"
    if path.startswith("/readyz"):
        if loop.last_good is not None:
            return b"ok\n", 200, "text/plain"
        return b"no valid desired state yet\n", 503, "text/plain"
    return b"not found\n", 404, "text/plain"

"""``heteroscale plan``, ``apply`` and ``run``: one dry-run cycle, one applied cycle,
and the continuous reconcile loop.

Where they act:
- with a kubeconfig (``--kubeconfig``, ``$KUBECONFIG``, ``~/.kube/config``, or
  in-cluster), on the real clusters: each cluster file's ``kube_context`` (none =
  the current context);
- with ``--simulate``, on the embedded default: the simulated fleet built from the
  same desired state (``reconciler.sim``), so the whole loop runs with nothing
  installed. ``plan`` (and ``status``) fall back to it when no kubeconfig is found,
  and say so; ``apply`` and ``run`` refuse instead (``checked_real_clusters``).

Exit codes (plan): 0 no change, 3 changes, 1 error (any cluster failed or the
desired state is invalid). apply: 0 done, 1 error. run: runs until interrupted.

``apply`` on real clusters records what it applied in the durable state ConfigMap
(``reconciler.apply.statestore``, next to the Lease: ``--lease-namespace``), so
``heteroscale status`` names the applied revision (``record_applied``).
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from reconciler.commands._options import (
    DAY_S,
    DEFAULT_LEASE_NAME,
    DEFAULT_LEASE_NAMESPACE,
    AutoscalerOpt,
    ClusterOpt,
    ClusterPrometheusUrlOpt,
    Command,
    DiffModeOpt,
    DiurnalHoursOpt,
    DrainWindowOpt,
    ForceOpt,
    FormatOpt,
    KubeconfigOpt,
    LeaseContextOpt,
    LeaseNameOpt,
    LeaseNamespaceOpt,
    PlacerOpt,
    PlotOpt,
    PrometheusCaFileOpt,
    PrometheusRateWindowOpt,
    PrometheusRecordingRulesOpt,
    PrometheusScrapeIntervalOpt,
    PrometheusTimeoutOpt,
    PrometheusTokenFileOpt,
    PrometheusUrlOpt,
    PruneRemovedServicesOpt,
    RateScaleOpt,
    RepoOpt,
    RevOpt,
    SeedOpt,
    SigningKeyFileOpt,
    SimulateOpt,
    StateMemoryShardsOpt,
    TraceOpt,
    WarmUpHoursOpt,
    checked_memory_shards,
    checked_output,
    checked_placer,
    checked_repository,
    checked_signing_keys,
    console,
    err_console,
    git_revision,
    in_range,
    option_group,
    report_config_error,
    writing,
)
from reconciler.errors import ConfigError, HeteroscaleError, MetricsUnavailable
from reconciler.text_safety import redacted_url, visible

if TYPE_CHECKING:
    from reconciler.apply.plansign import SigningKey
    from reconciler.apply.savedplan import SavedPlan
    from reconciler.desired.loader import DesiredState
    from reconciler.desired.models import ClusterSpec, ServicePolicy
    from reconciler.durable import Revision
    from reconciler.observe.prometheus import PrometheusSettings
    from reconciler.state import ServiceMetrics

Format = Literal["text", "markdown", "json"]
# run's cycles: faster than every 0.1 s they would only hammer the API servers with
# lists (tests run at 0.1 s); slower than a day the loop no longer reacts to load (and
# its health check waits three intervals).
MIN_RUN_INTERVAL_S = 0.1
# run's clusters reconciled at once, each cycle on a thread of its own (the loop's
# ``cluster_workers``): more than a fleet has clusters costs nothing (threads are
# started per cycle), fewer makes the rest wait for a slot behind slow ones.
DEFAULT_CLUSTER_WORKERS = 16
MAX_CLUSTER_WORKERS = 256
SIM_WARMUP_S = 300.0  # simulated seconds before the first cycle


# ------------------------------------------------------------------- wiring


@dataclass(frozen=True)
class PrometheusOptions:
    """How to read Prometheus beyond its URL: the other ``--prometheus-*`` options."""

    scrape_interval_s: float = 15.0
    rate_window_s: float | None = None  # None: four scrape intervals, at least 60 s
    bearer_token_file: str | None = None
    recording_rules: bool = False
    ca_file: str | None = None
    timeout_s: float = 5.0

    def settings(self, url: str) -> PrometheusSettings:
        """The adapter's ``PrometheusSettings`` for ``url``."""
        from reconciler.observe.prometheus import PrometheusSettings

        interval_s, window_s = prometheus_windows(self.scrape_interval_s, self.rate_window_s)
        return PrometheusSettings(
            url=url,
            scrape_interval_s=interval_s,
            rate_window_s=window_s,
            bearer_token_file=self.bearer_token_file,
            recorded_histograms=self.recording_rules,
            ca_file=self.ca_file,
            timeout_s=self.timeout_s,
        )

    def check(self) -> None:
        """A usage error (exit 2) naming the option that cannot work."""
        prometheus_windows(self.scrape_interval_s, self.rate_window_s)
        for option, path in (
            ("--prometheus-bearer-token-file", self.bearer_token_file),
            ("--prometheus-ca-file", self.ca_file),
        ):
            if path is not None and not os.access(path, os.R_OK):
                raise typer.BadParameter(f"{option}: cannot read {path}")


@dataclass(frozen=True)
class Settings:
    repo: Path
    rev: str | None
    kubeconfig: str | None
    simulate: bool
    clusters: tuple[str, ...]
    placer: str
    autoscaler: str
    prometheus_url: str | None
    force: bool
    drain_window_s: float
    diff_mode: str
    seed: int
    prune_removed_services: bool
    prometheus: PrometheusOptions = PrometheusOptions()
    # ``--cluster-prometheus-url CLUSTER=URL`` as given (``cluster_prometheus_urls``).
    cluster_prometheus_urls: tuple[str, ...] = ()


def prometheus_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a Prometheus's address; None when it can."""
    from urllib.parse import urlsplit

    shown = redacted_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError as exc:
        return f"{shown!r} is not a URL ({str(exc).replace(url, shown)})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{shown!r} is not an http:// or https:// URL with a host"
    return None


def cluster_prometheus_urls(settings: Settings) -> dict[str, str]:
    """Each ``--cluster-prometheus-url CLUSTER=URL`` as cluster -> URL; a usage error
    (exit 2) naming the option for one that is not CLUSTER=URL or names a cluster twice."""
    urls: dict[str, str] = {}
    for given in settings.cluster_prometheus_urls:
        cluster, sep, url = given.partition("=")
        problem = (
            f"{redacted_url(given)!r} is not CLUSTER=URL"
            if not sep or not cluster
            else f"cluster {cluster} is given twice"
            if cluster in urls
            else prometheus_url_problem(url)
        )
        if problem is not None:
            raise typer.BadParameter(problem, param_hint="--cluster-prometheus-url")
        urls[cluster] = url
    return urls


def prometheus_windows(interval_s: float, window_s: float | None) -> tuple[float, float]:
    """The scrape interval and rate window ``--prometheus-scrape-interval`` and
    ``--prometheus-rate-window`` give (the window four intervals and at least a minute
    when not given: a missed scrape then still leaves three of four samples); a usage
    error naming the option when they cannot work together (each alone is checked by
    its option's callback)."""
    if window_s is None:
        return interval_s, max(60.0, 4 * interval_s)
    if not window_s >= 2 * interval_s:
        raise typer.BadParameter(
            "--prometheus-rate-window must be at least two scrape intervals "
            f"({2 * interval_s:g} s): rate() needs two samples"
        )
    return interval_s, window_s


def kubeconfig_available(explicit: str | None) -> bool:
    """Is there any way to reach a real cluster?"""
    if explicit:
        return True
    if os.environ.get("KUBECONFIG") or os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    return Path("~/.kube/config").expanduser().exists()


def checked_real_clusters(settings: Settings) -> Settings:
    """``settings`` if the command can reach real clusters, or is told to act on the
    simulated fleet (``--simulate``); a usage error (exit 2) otherwise. ``apply`` and
    ``run`` change the fleet: falling back to the simulated one when no credentials
    are found would report success (and serve a healthy /healthz) while managing
    nothing. ``plan`` and ``status`` keep the fallback and say so in their output."""
    if not settings.simulate and not kubeconfig_available(settings.kubeconfig):
        raise typer.BadParameter(
            "no kubeconfig found ($KUBECONFIG unset, no ~/.kube/config, not inside a "
            "cluster): pass --kubeconfig PATH to act on real clusters, or --simulate "
            "for the simulated fleet",
            param_hint="--kubeconfig",
        )
    return settings


@dataclass(frozen=True)
class NoMetrics:
    """Used when no Prometheus is configured for a real cluster: every service holds."""

    cluster: str | None = None

    def fetch(self, policies: Sequence[ServicePolicy], now_s: float) -> dict[str, ServiceMetrics]:
        if self.cluster is None:
            where, options = "", "--prometheus-url"
        else:
            where = f" for cluster {self.cluster}"
            options = f"--prometheus-url or --cluster-prometheus-url {self.cluster}=URL"
        raise MetricsUnavailable(
            f"no metrics source configured{where} ({options}); every service holds its size"
        )


def make_placer(name: str) -> Any:
    if name == "greedy":
        from reconciler.placement.greedy import GreedyPlacer

        return GreedyPlacer()
    from reconciler.placement.cpsat import CpSatPlacer

    return CpSatPlacer()


def make_policy(name: str) -> Any:
    from reconciler.policy import make_autoscaler

    return make_autoscaler(name)


@dataclass
class Wiring:
    """Backends and metrics sources for every cluster, real or simulated."""

    simulated: bool
    backend_for: Any
    metrics_for: Any
    clock: Any
    describe: str


def wire(settings: Settings, state: DesiredState, *, watch: bool = False) -> Wiring:
    if settings.simulate or not kubeconfig_available(settings.kubeconfig):
        from reconciler.sim import default_simulated_fleet

        # Simulation time follows the wall clock from the first metrics read on
        # (time_origin_s=None); a short warm-up first, so the first cycle already has
        # a metrics window to act on.
        fleet = default_simulated_fleet(state, settings.seed)
        fleet.advance_to(SIM_WARMUP_S)
        reason = "--simulate" if settings.simulate else "no kubeconfig found"
        return Wiring(
            simulated=True,
            backend_for=lambda spec: fleet,
            metrics_for=lambda spec: fleet,
            clock=time.time,
            describe=f"simulated fleet ({reason}; the embedded default)",
        )

    from reconciler.apply.backend import ApplyOptions, KubernetesBackend
    from reconciler.apply.kubeclient import KubeClient

    options = ApplyOptions(
        force=settings.force,
        soft_scale_in_window_s=settings.drain_window_s,
        diff_mode=settings.diff_mode,  # type: ignore[arg-type]
        watch=watch,
    )

    def backend_for(spec: ClusterSpec) -> KubernetesBackend:
        if (
            settings.kubeconfig is None
            and os.environ.get("KUBERNETES_SERVICE_HOST")
            and not spec.kube_context
        ):
            client = KubeClient.in_cluster(name=spec.name)
        else:
            client = KubeClient.from_kubeconfig(settings.kubeconfig, spec.kube_context)
        return KubernetesBackend(client, state=state, options=options)

    urls = cluster_prometheus_urls(settings)
    if settings.prometheus_url or urls:
        from reconciler.observe.prometheus import PrometheusMetricsSource

        def url_for(spec: ClusterSpec) -> str | None:
            return urls.get(spec.name, settings.prometheus_url)

        unknown = sorted(set(urls) - set(state.clusters))
        if unknown:
            # Not an error: `run` keeps its flags while clusters come and go in Git.
            logging.getLogger("heteroscale.metrics").warning(
                f"--cluster-prometheus-url names cluster(s) {', '.join(unknown)} that the "
                "desired state does not have",
                extra={"event": "cluster_prometheus_url_unknown"},
            )
        used = {url_for(spec) for spec in state.clusters.values()}
        _warn_prometheus_setup(settings, sorted(u for u in used if u is not None))
        # One source per cluster: its own connections, so one cluster's slow queries
        # (run reconciles the clusters at once) never hold another's.
        sources: dict[str, PrometheusMetricsSource] = {}
        sources_lock = threading.Lock()

        def metrics_for(spec: ClusterSpec) -> Any:
            url = url_for(spec)
            if url is None:
                return NoMetrics(spec.name)
            with sources_lock:
                if spec.name not in sources:
                    sources[spec.name] = PrometheusMetricsSource(settings.prometheus.settings(url))
                return sources[spec.name]

    else:
        no_metrics = NoMetrics()

        def metrics_for(spec: ClusterSpec) -> Any:
            return no_metrics

    return Wiring(
        simulated=False,
        backend_for=backend_for,
        metrics_for=metrics_for,
        clock=time.time,
        describe="Kubernetes" + (f" ({settings.kubeconfig})" if settings.kubeconfig else ""),
    )


def _warn_prometheus_setup(settings: Settings, urls: Sequence[str]) -> None:
    """Set-up mistakes that would hold every service cycle after cycle, named once per
    Prometheus in ``urls`` (asked at once: one that does not answer delays the start by
    its timeout, not by one timeout per Prometheus)."""
    from concurrent.futures import ThreadPoolExecutor

    from reconciler.observe.prometheus import recording_rules_problem, scrape_interval_problem

    checks = (
        (
            "scrape_interval_mismatch",
            scrape_interval_problem,
            "--prometheus-scrape-interval, --prometheus-rate-window",
        ),
        (
            "recording_rules_missing",
            recording_rules_problem,
            "or drop --prometheus-recording-rules",
        ),
    )

    def problems(url: str) -> list[tuple[str, str]]:
        prometheus = settings.prometheus.settings(url)
        found = [(event, check(prometheus), hint) for event, check, hint in checks]
        named = f" (Prometheus {prometheus.shown_url})" if len(urls) > 1 else ""
        return [(event, f"{p}{named} ({hint})") for event, p, hint in found if p is not None]

    if not urls:
        return
    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        for found in pool.map(problems, urls):
            for event, message in found:
                logging.getLogger("heteroscale.metrics").warning(message, extra={"event": event})


# How long a stopping ``run`` waits for the planner memories to be written: a third of
# Kubernetes' default 30 s termination grace period, which the Lease's release and the
# exit must fit in too (an API server that does not answer would hold each write for
# its retries' read timeouts, minutes in all).
FLUSH_WAIT_S = 10.0


def flush_memories_bounded(store: Any, wait_s: float = FLUSH_WAIT_S) -> bool:
    """``store.flush_memories()`` on a daemon thread, waited for at most ``wait_s``;
    True when it finished. Past that the stop goes on (logged); a write still in flight
    dies with the process, each shard being written whole or not at all."""
    flusher = threading.Thread(target=store.flush_memories, name="flush-memories", daemon=True)
    flusher.start()
    flusher.join(wait_s)
    if flusher.is_alive():
        logging.getLogger("heteroscale.run").warning(
            f"planner memories not all written within {wait_s:g} s of the stop: the API "
            "server is slow or does not answer; the memories since their last write are lost",
            extra={"event": "state_memories_flush_timeout"},
        )
        return False
    return True


def listen_address(text: str) -> tuple[str, int] | None:
    """``--listen HOST:PORT`` (or ``:PORT``, ``PORT``) as the address to serve on, None
    for port 0 (no server); a usage error naming the option for anything else, found
    before the first cycle rather than when the server is started after it."""
    host, _, port_text = text.rpartition(":")
    port = int(port_text) if port_text.strip().isdigit() else -1
    if not 0 <= port <= 65535:
        raise typer.BadParameter(
            f"must be HOST:PORT with a port from 0 to 65535 (0: no server), got '{text}'",
            param_hint="--listen",
        )
    return (host or "0.0.0.0", port) if port else None


def checked_clusters(names: Sequence[str], state: DesiredState) -> None:
    """A usage error (exit 2) naming the known clusters when ``--cluster`` names one
    the desired state does not have: a typo would otherwise select nothing, and the
    command report "no changes" for a cluster it never looked at."""
    unknown = [name for name in names if name not in state.clusters]
    if unknown:
        known = ", ".join(sorted(state.clusters)) or "none"
        raise typer.BadParameter(
            f"unknown cluster {', '.join(repr(name) for name in unknown)} (known: {known})",
            param_hint="--cluster",
        )


def build_loop(
    settings: Settings,
    *,
    dry_run: bool,
    interval_s: float = 30.0,
    is_leader: Any = None,
    watch: bool = False,
    cluster_workers: int = 0,
    cluster_deadline_s: float | None = None,
) -> tuple[Any, Wiring]:
    """The loop for ``settings``; ``watch`` keeps Pods and Nodes in a watch cache
    between cycles (``run``), instead of listing them each cycle (one-shot commands).
    ``cluster_workers`` clusters' cycles at once, each within ``cluster_deadline_s``
    (``ReconcileLoop``; 0: one after another, as the one-shot commands run them);
    on the simulated fleet always one after another: it is one object for every
    cluster."""
    from reconciler.desired.loader import load_desired_state
    from reconciler.loop import ReconcileLoop

    loaded: list[DesiredState] = []  # the last state loaded, for load_desired_state

    def load() -> DesiredState:
        state = load_desired_state(
            settings.repo, rev=settings.rev, previous=loaded[-1] if loaded else None
        )
        loaded[:] = [state]
        return state

    state = load()  # fail fast (exit 1) when the desired state is invalid at start
    checked_clusters(settings.clusters, state)
    wiring = wire(settings, state, watch=watch)
    loop = ReconcileLoop(
        load_desired=load,
        backend_for=wiring.backend_for,
        metrics_for=wiring.metrics_for,
        autoscaler=make_policy(settings.autoscaler),
        placer=make_placer(settings.placer),
        dry_run=dry_run,
        clock=wiring.clock,
        is_leader=is_leader or (lambda: True),
        interval_s=interval_s,
        only_clusters=settings.clusters,
        prune_removed_services=settings.prune_removed_services,
        cluster_workers=0 if wiring.simulated else cluster_workers,
        cluster_deadline_s=cluster_deadline_s,
    )
    return loop, wiring


# ------------------------------------------------------------------- options
# Those several commands take are in ``_options``; the review's (only ``plan``
# takes them) below.


def _check_autoscaler(autoscaler: str) -> None:
    """An unknown ``--autoscaler`` is a usage error (exit 2), checked before anything
    runs, not a traceback when the policy is built."""
    from reconciler.policy import AUTOSCALERS

    if autoscaler not in AUTOSCALERS:
        raise typer.BadParameter(
            f"--autoscaler must be one of {', '.join(AUTOSCALERS)}, got '{autoscaler}'"
        )


def cycle_settings(
    repo: RepoOpt = Path("."),
    rev: RevOpt = None,
    kubeconfig: KubeconfigOpt = None,
    simulate: SimulateOpt = False,
    cluster: ClusterOpt = None,
    placer: PlacerOpt = "cp-sat",
    autoscaler: AutoscalerOpt = "heteroscale",
    prometheus_url: PrometheusUrlOpt = None,
    cluster_prometheus_url: ClusterPrometheusUrlOpt = None,
    prometheus_scrape_interval: PrometheusScrapeIntervalOpt = 15.0,
    prometheus_rate_window: PrometheusRateWindowOpt = None,
    prometheus_bearer_token_file: PrometheusTokenFileOpt = None,
    prometheus_recording_rules: PrometheusRecordingRulesOpt = False,
    prometheus_ca_file: PrometheusCaFileOpt = None,
    prometheus_timeout: PrometheusTimeoutOpt = 5.0,
    force: ForceOpt = False,
    drain_window: DrainWindowOpt = 120.0,
    diff_mode: DiffModeOpt = "auto",
    seed: SeedOpt = 0,
    prune_removed_services: PruneRemovedServicesOpt = False,
) -> Settings:
    """The options of one cycle, as given: their one list (``with_cycle_options``
    offers them to the commands that run a cycle), unchecked (``_checked``)."""
    return Settings(
        repo,
        rev,
        kubeconfig,
        simulate,
        tuple(cluster or ()),
        placer,
        autoscaler,
        prometheus_url,
        force,
        drain_window,
        diff_mode,
        seed,
        prune_removed_services,
        PrometheusOptions(
            prometheus_scrape_interval,
            prometheus_rate_window,
            prometheus_bearer_token_file,
            prometheus_recording_rules,
            prometheus_ca_file,
            prometheus_timeout,
        ),
        tuple(cluster_prometheus_url or ()),
    )


def _checked(settings: Settings) -> Settings:
    """``settings`` if valid; a usage error (exit 2) naming the option otherwise."""
    if settings.diff_mode not in ("auto", "server", "client"):
        raise typer.BadParameter("--diff-mode must be auto, server or client")
    checked_placer(settings.placer)
    _check_autoscaler(settings.autoscaler)
    settings.prometheus.check()
    if settings.prometheus_url is not None:
        problem = prometheus_url_problem(settings.prometheus_url)
        if problem is not None:
            raise typer.BadParameter(problem, param_hint="--prometheus-url")
    cluster_prometheus_urls(settings)
    checked_repository(settings.repo, rev=settings.rev)
    return settings


@dataclass(frozen=True)
class LeaseRef:
    """Where the reconciler's Lease and state ConfigMaps live (``--lease-namespace``,
    ``--lease-name``, ``--lease-context``) and how many memory shards the state is
    written with (``--state-memory-shards``; None: the store's default): ``_lease``."""

    namespace: str = DEFAULT_LEASE_NAMESPACE
    name: str = DEFAULT_LEASE_NAME
    context: str | None = None
    memory_shards: int | None = None


def _lease(
    lease_namespace: LeaseNamespaceOpt = DEFAULT_LEASE_NAMESPACE,
    lease_name: LeaseNameOpt = DEFAULT_LEASE_NAME,
    lease_context: LeaseContextOpt = None,
    state_memory_shards: StateMemoryShardsOpt = None,
) -> LeaseRef:
    """The options naming the reconciler's home and its state's layout
    (``with_lease_options``); a usage error (exit 2) for a shard count out of range."""
    return LeaseRef(
        lease_namespace, lease_name, lease_context, checked_memory_shards(state_memory_shards)
    )


def with_cycle_options(**fixed: Any) -> Callable[[Command], Command]:
    """``settings: Settings`` offered as the options of ``cycle_settings``: as given, for the
    command to check (``_checked``) where it checks its own."""
    return option_group("settings", cycle_settings, **fixed)


with_lease_options = option_group("lease", _lease)  # ``lease: LeaseRef`` as its four options


# Options only `plan --base/--head` (the review) takes, hence here and not in _options;
# declared in typer's form like every option, their meanings shared with no other.
BaseOpt = Annotated[
    str | None,
    typer.Option(
        "--base",
        help="review: the revision the change starts from (e.g. origin/main; default, "
        "when only --head is given: HEAD~1)",
        callback=git_revision,
    ),
]
HeadOpt = Annotated[
    str | None,
    typer.Option(
        "--head", help="review: the revision under review (default HEAD)", callback=git_revision
    ),
]
WhatIfOpt = Annotated[
    bool,
    typer.Option("--what-if/--no-what-if", help="review: replay both revisions in the simulator"),
]
TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout",
        help="review: time budget in seconds, at most 86400; what does not fit is skipped, "
        "named, and exits 1",
        callback=in_range(0.0, DAY_S, low_open=True, unit=" s"),
    ),
]


# The options of a cycle the review reads: it plans both revisions on the simulated
# fleet (``review.fleet_diff``), so it reaches no cluster and no Prometheus, applies
# nothing and reviews every cluster.
REVIEW_READS = frozenset({"repo", "placer", "autoscaler", "seed", "simulate"})


def _check_review_reads(ctx: typer.Context) -> None:
    """A usage error (exit 2) naming every option of a cycle given to the review that
    it does not read (``REVIEW_READS``), rather than accepting and ignoring it; one set
    in the environment (``$HETEROSCALE_PROMETHEUS_URL``) is only said to be ignored,
    since the same environment may serve ``run``."""
    unread = [
        param
        for param in ctx.command.params
        if param.name in inspect.signature(cycle_settings).parameters
        and param.name not in REVIEW_READS
    ]
    given, from_env = [], []
    for param in unread:
        source = ctx.get_parameter_source(param.name or "")
        if source is not None and source.name == "COMMANDLINE":
            given.append(param.opts[0])
        elif source is not None and source.name == "ENVIRONMENT":
            from_env.append(f"${param.envvar}")
    if given:
        raise typer.BadParameter(
            "the review plans both revisions on the simulated fleet and does not read "
            f"{'it' if len(given) == 1 else 'them'} (of a cycle's options it reads "
            "--repo, --placer, --autoscaler and --seed): leave them out, or drop --base "
            "and --head for a live cycle that reads them",
            param_hint=", ".join(given),
        )
    if from_env:
        err_console.print(
            f"note: {', '.join(from_env)} set; the review plans on the simulated fleet and "
            "ignores it",
            markup=False,
            soft_wrap=True,
        )


def _review(
    repo: Path,
    base: str,
    head: str,
    fmt: str,
    placer: str,
    autoscaler: str,
    seed: int,
    trace: Path | None,
    rate_scale: float | None,
    diurnal_hours: float | None,
    what_if: bool,
    plot: Path | None,
    timeout: float = 600.0,
    warm_up_hours: float = 0.0,
) -> int:
    """`plan --base --head`: the review lives in reconciler.review; this only wires it."""
    if fmt not in ("text", "markdown", "json"):
        raise typer.BadParameter("--format must be text, markdown or json")
    checked_placer(placer)
    if trace is not None and not trace.is_file():
        raise typer.BadParameter(f"--trace {trace}: no such file")
    checked_output(plot, "--plot")
    checked_repository(repo, rev=head)  # the review reads Git revisions, not the work tree
    from reconciler.review.command import plan_review
    from reconciler.review.review import ReviewOptions

    options = ReviewOptions(
        trace=trace,
        rate_scale=rate_scale,
        diurnal_hours=diurnal_hours,
        warm_up_hours=warm_up_hours,
        seed=seed,
        what_if=what_if,
        timeout_s=timeout,
    )
    # A what-if that cannot run is in the report (``Review.what_if_error``), exit 1.
    review, text, written = plan_review(
        repo,
        base,
        head,
        fmt=fmt,
        placer=make_placer(placer),
        autoscaler_name=autoscaler,
        options=options,
        plot=plot,
    )
    if fmt == "text":
        console.print(text, markup=False, soft_wrap=True, highlight=False, end="")
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    for path in written:
        err_console.print(f"wrote {path}", markup=False)
    return review.exit_code


def _render(result: Any, fmt: str, title: str) -> str:
    from reconciler.apply import cyclereport

    if fmt == "json":
        return cyclereport.format_json(result)
    if fmt == "markdown":
        return cyclereport.format_markdown(result, title=title)
    return cyclereport.format_text(result, title=title)


def _one_cycle(
    settings: Settings,
    *,
    dry_run: bool,
    fmt: str,
    out: Path | None = None,
    lease: LeaseRef | None = None,
    signing_key: SigningKey | None = None,
) -> int:
    """One cycle of ``plan`` (``dry_run``) or ``apply``; with ``lease`` (apply on real
    clusters) the applied plans are recorded in the state ConfigMaps next to it. The
    saved plan written to ``out`` is signed with ``signing_key``."""
    if fmt not in ("text", "markdown", "json"):
        raise typer.BadParameter("--format must be text, markdown or json")
    named_rev = settings.rev
    try:
        if out is not None and settings.rev:
            # Pin the commit first: a branch that moves during the cycle must not make
            # the plan record a revision other than the one it was computed from.
            settings = replace(settings, rev=_resolve_commit(settings.repo, settings.rev))
        loop, wiring = build_loop(settings, dry_run=dry_run)
    except ConfigError as exc:
        report_config_error(exc)
        return 1
    if out is not None and wiring.simulated:
        err_console.print(
            "plan --out needs a Kubernetes cluster: the simulated fleet has no "
            "resourceVersions to pin a plan to",
            markup=False,
        )
        return 1
    result = loop.run_cycle()
    records: list[StateRecord] | None = None
    if not dry_run and lease is not None and not wiring.simulated:
        records = _record_cycle(loop, result, settings, lease)
    verb = "plan" if dry_run else "apply"
    title = f"heteroscale {verb}: {result.source_label} -> {wiring.describe}"
    text = _render(result, fmt, title)
    if fmt == "json" and records is not None:
        import json

        from reconciler.apply import cyclereport

        data = cyclereport.to_json(result)
        data["state"] = [r.to_json() for r in records]
        text = json.dumps(data, indent=2, default=str)
    if fmt == "json":
        print(text)
    else:
        console.print(text, markup=False, soft_wrap=True, highlight=False)
    if records:
        _print_state(records)
    if result.has_errors or (result.desired_error and not result.clusters):
        if fmt != "text":
            err_console.print("one or more clusters failed; see the report")
        if out is not None:
            err_console.print(
                f"no plan written to {out}: a cluster failed or refused a write", markup=False
            )
        return 1
    if out is not None:
        from reconciler.apply.savedplan import write_plan

        with writing(out, "--out"):
            write_plan(_saved_plan(loop, result, settings, named_rev), out, signing_key)
        signed = "" if signing_key is None else f", signed with key {signing_key.key_id}"
        err_console.print(
            f"wrote plan {out}{signed}: `heteroscale apply {out}` applies exactly it",
            markup=False,
        )
    if dry_run:
        return 3 if result.has_changes else 0
    return 0


# ------------------------------------------------------- the reconciler's home


def home_client(kubeconfig: str | None, context: str | None, name: str) -> Any:
    """A client of the reconciler's home cluster: in-cluster inside a Pod (no
    kubeconfig, no context given), else the kubeconfig's context (default: current)."""
    from reconciler.apply.kubeclient import KubeClient

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and not context:
        return KubeClient.in_cluster(name=name)
    return KubeClient.from_kubeconfig(kubeconfig, context)


@dataclass(frozen=True)
class AppliedCluster:
    """One cluster whose plan ``apply`` carried out in full."""

    cluster: str
    plan_id: str
    changed: bool
    # A saved plan without writes applied nothing: it is recorded only where nothing is.
    only_if_unrecorded: bool = False


@dataclass(frozen=True)
class StateRecord:
    """What ``apply`` did with one cluster's state ConfigMap, and why."""

    cluster: str
    recorded: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "recorded": self.recorded, "detail": self.detail}


def record_applied(
    kubeconfig: str | None,
    lease: LeaseRef,
    applied: Sequence[AppliedCluster],
    revision: Revision,
    *,
    now_s: float,
    identity: str | None = None,
) -> list[StateRecord]:
    """Record, after a one-shot ``apply``, which plan and revision each cluster got, in
    its ``heteroscale-state-<cluster>`` ConfigMap. Never raises: what could not be
    recorded is returned with the reason (the clusters already have their changes).

    A ``heteroscale run`` leader may be active at the same time, and the object is its
    memory (the stabilisation windows). So:

    - the Lease is read first; while another holder's lease is live
      (``lease.live_holder``), the object is left alone: that leader records its
      own cycles (its next cycle plans from the live fleet this apply left); a Lease that cannot be read (403, unreachable) leaves it alone too, since a
      leader cannot be ruled out;
    - otherwise only the applied-plan identity (plan hash, revision, time) and the
      last known good revision (this revision loaded cleanly and was applied) are
      changed by a read-modify-write with the ``resourceVersion`` read as the
      precondition (``ConfigMapStateStore.update``): the windows, the cooldown and
      the planner memories stay as stored; a conflicting write in between makes it
      read again, and the Lease is read again before every attempt;
    - an object that cannot be read (corrupt, another schema version) is left alone.
    """
    from dataclasses import replace as replace_state

    from reconciler.apply.lease import live_holder, read_lease, shown_holder
    from reconciler.apply.statestore import WRITE_ATTEMPTS, ConfigMapStateStore
    from reconciler.durable import DurableState, StateFormatError, next_applied_plan

    if not applied:
        return []
    who = identity or f"heteroscale-apply@{socket.gethostname()}-{os.getpid()}"
    where_lease = f"Lease {lease.namespace}/{lease.name}"
    try:
        client = home_client(kubeconfig, lease.context, "state")
        store = ConfigMapStateStore(client, lease.namespace, who, memory_shards=lease.memory_shards)
    except Exception as exc:  # reported, never fatal: the apply itself is done
        why = f"not recorded: the reconciler's home cluster is unreachable: {type(exc).__name__}: {exc}"
        return [StateRecord(a.cluster, False, why) for a in applied]

    def foreign_holder() -> tuple[str | None, str]:
        """Another live holder of the Lease (or None), and a description of it."""
        record = read_lease(client, lease.namespace, lease.name)
        holder = live_holder(record, time.time())
        if holder is None or record is None:
            return None, ""
        renewed = record.renew_time or "never"
        return holder, f"{where_lease} is held by {shown_holder(holder)} (renewed {renewed})"

    def left_alone(cluster: str, why: str) -> StateRecord:
        return StateRecord(cluster, False, f"{store.describe(cluster)} left alone: {why}")

    try:
        holder, held_by = foreign_holder()
    except Exception as exc:
        why = (
            f"cannot read {where_lease} to rule out an active `heteroscale run` leader "
            f"({type(exc).__name__}: {exc})"
        )
        return [left_alone(a.cluster, why) for a in applied]
    if holder is not None:
        why = f"{held_by}; that leader records its own cycles"
        return [left_alone(a.cluster, why) for a in applied]
    store.is_leader = lambda: foreign_holder()[0] is None  # asked before every write

    out: list[StateRecord] = []
    for item in applied:

        def change(stored: DurableState | None, item: AppliedCluster = item) -> Any:
            previous = stored.last_plan if stored is not None else None
            if item.only_if_unrecorded and previous is not None:
                return None
            last_plan = next_applied_plan(previous, item.plan_id, item.changed, revision.id, now_s)
            if stored is None:
                return DurableState(item.cluster, now_s, who, revision, {}, last_plan)
            return replace_state(
                stored, saved_at_s=now_s, writer=who, revision=revision, last_plan=last_plan
            )

        where = store.describe(item.cluster)
        try:
            written = store.update(item.cluster, change)
        except StateFormatError as exc:
            out.append(left_alone(item.cluster, f"unreadable ({exc})"))
            continue
        except Exception as exc:  # StateTooLarge, API errors, ...: reported, never fatal
            out.append(
                StateRecord(
                    item.cluster, False, f"{where}: not recorded: {type(exc).__name__}: {exc}"
                )
            )
            continue
        if written:
            label = revision.label or revision.id[:12]
            out.append(
                StateRecord(
                    item.cluster,
                    True,
                    f"{where}: recorded revision {label}, plan {item.plan_id[:19]}",
                )
            )
            continue
        try:
            holder, held_by = foreign_holder()
        except Exception as exc:
            why = f"{where_lease} became unreadable ({type(exc).__name__}: {exc})"
            out.append(left_alone(item.cluster, why))
            continue
        if holder is not None:
            out.append(left_alone(item.cluster, f"{held_by}; that leader records its own cycles"))
        elif item.only_if_unrecorded:
            out.append(left_alone(item.cluster, "the plan wrote nothing; the record stands"))
        else:
            out.append(
                StateRecord(
                    item.cluster,
                    False,
                    f"{where}: not recorded after {WRITE_ATTEMPTS} conflicting writes",
                )
            )
    return out


def _print_state(records: Sequence[StateRecord]) -> None:
    for record in records:
        err_console.print(f"state: {visible(record.detail)}", markup=False, soft_wrap=True)


def _record_cycle(loop: Any, result: Any, settings: Settings, lease: LeaseRef) -> list[StateRecord]:
    """The clusters the cycle applied in full, recorded (``record_applied``). A cluster
    with a write refused does not run this revision (not all of it, or none of it: a
    refused rollout leaves the old pods): its previous record stands, as for a saved
    plan, and the line says so."""
    from reconciler.durable import plan_identity, revision_of

    if loop.last_good is None:
        return []
    applied = [
        AppliedCluster(c.cluster, plan_identity(c.plan), c.has_changes)
        for c in result.clusters
        if c.applied_in_full and c.plan is not None
    ]
    not_recorded = [
        StateRecord(
            c.cluster,
            False,
            f"cluster {c.cluster}: not recorded: {c.refused_objects} write(s) refused, so it "
            "does not run this revision; its previous record stands",
        )
        for c in result.clusters
        if c.applied and not c.applied_in_full
    ]
    if not applied:
        return not_recorded
    recorded = record_applied(
        settings.kubeconfig, lease, applied, revision_of(loop.last_good), now_s=time.time()
    )
    order = {c.cluster: i for i, c in enumerate(result.clusters)}
    return sorted(recorded + not_recorded, key=lambda r: order[r.cluster])


# ------------------------------------------------------------------ saved plans


def _resolve_commit(repo: Path, rev: str) -> str:
    from reconciler.desired.sources import GitSource, SourceError
    from reconciler.errors import ConfigIssue

    try:
        return GitSource(repo, rev).commit
    except SourceError as exc:
        raise ConfigError([ConfigIssue(exc.path, None, None, "", exc.message)]) from None


def _saved_plan(loop: Any, result: Any, settings: Settings, named_rev: str | None) -> Any:
    """The saved plan of the cycle ``loop`` just ran (dry run, Kubernetes backends)."""
    from reconciler.apply.cyclereport import to_json
    from reconciler.apply.savedplan import (
        PlanSource,
        SavedCluster,
        SavedPlan,
        desired_content_hash,
    )

    state = loop.last_good
    content = desired_content_hash(state)
    source = (
        PlanSource("git", content, rev=named_rev, commit=settings.rev)
        if settings.rev
        else PlanSource("directory", content)
    )
    report = {c["cluster"]: c for c in to_json(result)["clusters"]}
    clusters = []
    for outcome in result.clusters:
        backend = loop.backends[outcome.cluster]
        entry = report[outcome.cluster]
        clusters.append(
            SavedCluster(
                cluster=outcome.cluster,
                observed=backend.observed(),
                writes=backend.saved_writes(outcome.diff),
                decisions=entry.get("decisions", {}),
                group_changes=tuple(entry.get("group_changes", ())),
                report=outcome.diff.to_json(),
            )
        )
    return SavedPlan(
        source=source,
        clusters=tuple(clusters),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def saved_plan_identity(cluster: Any) -> str:
    """The applied-plan identity of a saved plan's cluster: a hash of its writes (a
    saved plan carries the writes, not the groups ``durable.plan_identity`` hashes;
    the next ``run`` cycle records its own identity)."""
    import dataclasses
    import hashlib
    import json

    writes = [dataclasses.asdict(w) for w in cluster.writes]
    text = json.dumps(writes, sort_keys=True, separators=(",", ":"), default=str)
    return "saved-plan:sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _only_clusters(
    saved: SavedPlan, clusters: Sequence[str], state: DesiredState, plan_file: Path
) -> SavedPlan:
    """``saved`` with only the clusters ``--cluster`` names (all without it): an
    operator who keeps a cluster out of an apply (an incident there, a staged rollout)
    gets none of its writes. Each cluster's writes stand on their own (checked against
    its own objects), so a subset applies as reviewed. A usage error (exit 2) for a
    name the desired state or the plan does not have: a typo would otherwise apply
    nothing and say so as success."""
    if not clusters:
        return saved
    checked_clusters(clusters, state)
    planned = [c.cluster for c in saved.clusters]
    absent = [name for name in clusters if name not in planned]
    if absent:
        raise typer.BadParameter(
            f"{plan_file} holds no plan for cluster {', '.join(repr(n) for n in absent)} "
            f"(it holds: {', '.join(planned) or 'none'})",
            param_hint="--cluster",
        )
    return replace(saved, clusters=tuple(c for c in saved.clusters if c.cluster in clusters))


def _apply_saved(
    plan_file: Path,
    settings: Settings,
    fmt: str,
    lease: LeaseRef | None = None,
    signing_keys: Sequence[SigningKey] = (),
) -> int:
    """`apply PLAN.json`: exactly the saved writes, or nothing when what the plan was
    computed from moved (desired-state revision, resourceVersions). With ``lease``,
    every cluster whose writes were all made is recorded (``record_applied``). With
    ``signing_keys``, only a plan signed with one of them and unchanged since is
    applied."""
    import json

    from reconciler.apply import names
    from reconciler.apply.savedplan import (
        PlanFileError,
        check_leftovers,
        check_scope,
        desired_content_hash,
        execute,
        moved_objects,
        read_plan,
    )
    from reconciler.desired.loader import load_desired_state

    if fmt not in ("text", "json"):
        raise typer.BadParameter("apply PLAN: --format must be text or json")

    def finish(
        moved: list[str],
        done: dict[str, list[str]],
        refused: str | None,
        records: Sequence[StateRecord] = (),
    ) -> int:
        ok = not moved and refused is None
        if fmt == "json":
            report: dict[str, Any] = {
                "plan": str(plan_file),
                "applied": ok,
                "stale": moved,
                "refused": refused,
                "done": done,
            }
            if lease is not None:
                report["state"] = [r.to_json() for r in records]
            print(json.dumps(report, indent=2))
        else:
            for cluster, steps in done.items():
                print(f"cluster {cluster}: {len(steps)} write(s)")
                print("".join(f"  {step}\n" for step in steps), end="")
        _print_state(records)
        if moved:
            err_console.print(
                f"refused: {plan_file} is stale, nothing applied; run `heteroscale plan --out` again:\n"
                + "".join(f"  {m}\n" for m in moved),
                markup=False,
                soft_wrap=True,
                end="",
            )
        if refused is not None:
            err_console.print(
                f"refused: {refused}; the writes listed before it were made, nothing after it",
                markup=False,
                soft_wrap=True,
            )
        return 0 if ok else 1

    try:
        saved = read_plan(plan_file, signing_keys)
    except PlanFileError as exc:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
        return 1
    if saved.signed_by is not None and not signing_keys:
        # Said, not refused: a team that signs may still apply by hand without the key.
        err_console.print(
            f"note: {plan_file} is signed (key {saved.signed_by}) but no --signing-key-file "
            "was given: the signature is not checked, the plan is checked as unsigned",
            markup=False,
            soft_wrap=True,
        )
    rev = settings.rev or (saved.source.rev if saved.source.kind == "git" else None)
    try:
        commit = _resolve_commit(settings.repo, rev) if rev else None
        state = load_desired_state(settings.repo, rev=commit)
    except ConfigError as exc:
        report_config_error(exc)
        return 1
    saved = _only_clusters(saved, settings.clusters, state, plan_file)
    moved: list[str] = []
    if saved.source.kind == "git" and commit != saved.source.commit:
        moved.append(
            f"desired state: {saved.source.describe()} in the plan, {rev} is now "
            f"{(commit or 'a directory')[:12]}"
        )
    elif desired_content_hash(state) != saved.source.content_hash:
        moved.append(f"desired state: content differs from the plan's {saved.source.describe()}")
    try:
        # Writes only where that desired state deploys, named and rendered as it renders
        # them: the digest is a checksum anyone can recompute, so the file itself is not
        # trusted. Against another revision than the plan's the rendering is not
        # compared (its templates may differ): such a plan is refused as stale below.
        check_scope(saved, state, plan_file, content=not moved)
    except PlanFileError as exc:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
        return 1
    wiring = wire(replace(settings, simulate=False), state)
    if wiring.simulated:
        err_console.print(
            f"error: {plan_file}: applying a saved plan needs a kubeconfig", markup=False
        )
        return 1
    backends = {}
    for cluster in saved.clusters:
        spec = state.clusters.get(cluster.cluster)
        if spec is None:
            moved.append(f"cluster {cluster.cluster}: not in the desired state")
            continue
        try:
            backend = backends[cluster.cluster] = wiring.backend_for(spec)
            backend.observe(spec, state.policies_for(spec.name))
        except (HeteroscaleError, OSError) as exc:  # as a cycle reports them (loop.schedule)
            err_console.print(
                f"error: cluster {spec.name}: {type(exc).__name__}: {exc}; nothing applied",
                markup=False,
                soft_wrap=True,
            )
            return 1
        moved += [
            f"cluster {spec.name}: {m}" for m in moved_objects(cluster.observed, backend.observed())
        ]
    if moved:
        return finish(moved, {}, None)
    try:
        # The live objects are those the plan observed: the prunes outside the managed
        # namespaces must remove what a moved service left behind, as they show it.
        check_leftovers(saved, state, {name: b.snapshot for name, b in backends.items()}, plan_file)
    except PlanFileError as exc:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
        return 1
    done: dict[str, list[str]] = {}
    complete: list[AppliedCluster] = []
    refused: str | None = None
    for cluster in saved.clusters:
        outcome = execute(
            backends[cluster.cluster].client,
            cluster,
            field_manager=names.FIELD_MANAGER,
            now_s=time.time(),
        )
        done[cluster.cluster] = outcome.done
        if outcome.refused is not None:
            refused = f"cluster {cluster.cluster}: {outcome.refused}"
            break
        complete.append(
            AppliedCluster(
                cluster.cluster,
                saved_plan_identity(cluster),
                changed=bool(cluster.writes),
                only_if_unrecorded=not cluster.writes,
            )
        )
    records: list[StateRecord] = []
    if lease is not None and complete:
        from reconciler.durable import Revision, revision_of

        revision = revision_of(state)
        if revision.kind == "git" and rev:
            revision = Revision("git", revision.id, f"{rev} ({revision.id[:12]})")
        records = record_applied(settings.kubeconfig, lease, complete, revision, now_s=time.time())
    return finish([], done, refused, records)


# ------------------------------------------------------------------ commands


# Each option is defined once, in ``_options`` (the ``*Opt`` types, spelling and help);
# the options of one cycle, which plan, apply, run and status share, are listed once,
# in ``cycle_settings`` (``with_cycle_options``).
def register(app: typer.Typer) -> None:
    @app.command()
    @with_cycle_options()
    def plan(
        ctx: typer.Context,
        settings: Settings,
        format: FormatOpt = "text",
        base: BaseOpt = None,
        head: HeadOpt = None,
        trace: TraceOpt = None,
        rate_scale: RateScaleOpt = None,
        diurnal_hours: DiurnalHoursOpt = None,
        warm_up_hours: WarmUpHoursOpt = 0.0,
        what_if: WhatIfOpt = True,
        plot: PlotOpt = None,
        timeout: TimeoutOpt = 600.0,
        out: Annotated[
            Path | None,
            typer.Option(
                "--out", help="also write the exact plan to this file, for `apply PLAN` (JSON)"
            ),
        ] = None,
        signing_key_file: SigningKeyFileOpt = None,
    ) -> None:
        """One dry-run cycle: decide, place and diff every cluster, and print exactly what
        `apply` would do. Exit 0: no change, 3: changes, 1: error.

        With --base REV (and --head REV, default HEAD): the pull-request review of the
        change from base to head: config diff, fleet diff and what-if replay (of
        --trace, or a synthetic day per service; --plot writes one PNG per service)."""
        if signing_key_file and out is None:
            raise typer.BadParameter(
                "only a saved plan is signed: add --out PLAN", param_hint="--signing-key-file"
            )
        if base is not None or head is not None:
            if out is not None:
                # A review compares two revisions; a saved plan is one cycle of one.
                raise typer.BadParameter(
                    "a review writes no saved plan: run `plan --rev REV --out` for one",
                    param_hint="--out",
                )
            _check_review_reads(ctx)
            _check_autoscaler(settings.autoscaler)
            raise typer.Exit(
                _review(
                    settings.repo,
                    base or "HEAD~1",
                    head or "HEAD",
                    format,
                    settings.placer,
                    settings.autoscaler,
                    settings.seed,
                    trace,
                    rate_scale,
                    diurnal_hours,
                    what_if,
                    plot,
                    timeout,
                    warm_up_hours,
                )
            )
        # What only the review's what-if replay reads: given without it, refused rather
        # than silently ignored.
        replay_only = {
            "--trace": trace is not None,
            "--rate-scale": rate_scale is not None,
            "--diurnal-hours": diurnal_hours is not None,
            "--warm-up-hours": warm_up_hours != 0.0,
            "--plot": plot is not None,
        }
        given = [option for option, is_given in replay_only.items() if is_given]
        if given:
            raise typer.BadParameter(
                "only a review's what-if replay reads it: add --base REV",
                param_hint=", ".join(given),
            )
        settings = _checked(settings)
        checked_output(out, "--out")
        keys = checked_signing_keys(signing_key_file)
        if len(keys) > 1:
            raise typer.BadParameter(
                "a plan is signed with one key (apply takes several, while rotating)",
                param_hint="--signing-key-file",
            )
        signing_key = keys[0] if keys else None
        raise typer.Exit(
            _one_cycle(settings, dry_run=True, fmt=format, out=out, signing_key=signing_key)
        )

    @app.command()
    @with_cycle_options()
    @with_lease_options
    def apply(
        plan_file: Annotated[
            Path | None,
            typer.Argument(
                metavar="[PLAN]",
                help="a plan written by `plan --out`: apply exactly it, or nothing if stale",
            ),
        ] = None,
        *,
        settings: Settings,
        format: FormatOpt = "text",
        lease: LeaseRef,
        signing_key_file: SigningKeyFileOpt = None,
    ) -> None:
        """One applied cycle: what `plan` prints, carried out (capacity first, soft
        scale-in). Exit 0: done, 1: error.

        With PLAN: exactly the writes of that saved plan, no new decision or placement;
        refused (exit 1, naming what moved) when the desired-state revision or any
        object it was computed from changed since.

        On real clusters the applied plan and revision are recorded in the state
        ConfigMap next to the reconciler's Lease (for `heteroscale status`), unless a
        `heteroscale run` leader holds the Lease: it records its own cycles, and the
        ConfigMap is left alone (said on stderr, and in the JSON under "state")."""
        if signing_key_file and plan_file is None:
            raise typer.BadParameter(
                "only a saved plan carries a signature: add PLAN", param_hint="--signing-key-file"
            )
        settings = _checked(settings)
        if plan_file is not None:
            keys = checked_signing_keys(signing_key_file)
            raise typer.Exit(_apply_saved(plan_file, settings, format, lease, keys))
        settings = checked_real_clusters(settings)
        raise typer.Exit(_one_cycle(settings, dry_run=False, fmt=format, lease=lease))

    @app.command()
    @with_cycle_options()
    @with_lease_options
    def run(
        *,
        settings: Settings,
        interval: Annotated[
            float,
            typer.Option(
                "--interval",
                help=f"seconds between cycles, {MIN_RUN_INTERVAL_S:g} to 86400",
                callback=in_range(MIN_RUN_INTERVAL_S, DAY_S, unit=" s"),
            ),
        ] = 30.0,
        cluster_workers: Annotated[
            int,
            typer.Option(
                "--cluster-workers",
                help=(
                    "clusters reconciled at once, each cycle on a thread of its own within "
                    f"--cluster-deadline, 0 to {MAX_CLUSTER_WORKERS} (0: one after another, "
                    "no deadline; the simulated fleet always runs them one after another)"
                ),
                callback=in_range(0, MAX_CLUSTER_WORKERS),
            ),
        ] = DEFAULT_CLUSTER_WORKERS,
        cluster_deadline: Annotated[
            float | None,
            typer.Option(
                "--cluster-deadline",
                help=(
                    "seconds a cluster's cycle may run before it is reported overdue (it is "
                    "not started again while it runs, the other clusters go on), "
                    f"{MIN_RUN_INTERVAL_S:g} to 86400 (default: the interval, at least 10 s)"
                ),
                callback=in_range(MIN_RUN_INTERVAL_S, DAY_S, unit=" s"),
            ),
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="plan and report every cycle, never apply")
        ] = False,
        log_format: Annotated[str, typer.Option("--log-format", help="text or json")] = "text",
        listen: Annotated[
            str,
            typer.Option(
                "--listen", help="host:port for /metrics, /healthz, /readyz (port 0: none)"
            ),
        ] = "0.0.0.0:9102",
        leader_elect: Annotated[
            bool,
            typer.Option(
                "--leader-elect/--no-leader-elect",
                help="coordinate replicas through a Lease (real clusters)",
            ),
        ] = True,
        lease: LeaseRef,
        identity: Annotated[
            str | None,
            typer.Option("--identity", envvar="POD_NAME", help="this replica's name in the Lease"),
        ] = None,
        cycles: Annotated[
            int,
            typer.Option(
                "--cycles",
                help="stop after this many cycles (0: run until interrupted)",
                callback=in_range(0, 2**63 - 1),
            ),
        ] = 0,
    ) -> None:
        """Reconcile every N seconds until interrupted: observe, decide, place, diff and
        apply (or only report with --dry-run), every cluster through its own context."""
        from reconciler.loop import configure_logging, reset_logging, serve_http

        if log_format not in ("text", "json"):
            raise typer.BadParameter("--log-format must be text or json")
        address = listen_address(listen)
        settings = checked_real_clusters(_checked(settings))
        # After the checks above: a refused option or path leaves logging as it was.
        handler = configure_logging(json_format=log_format == "json")
        log = logging.getLogger("heteroscale.run")
        elector = None
        store = None
        real = not settings.simulate and kubeconfig_available(settings.kubeconfig)
        who = identity or f"{socket.gethostname()}-{os.getpid()}"
        if real:
            from reconciler.apply.lease import LeaseElector
            from reconciler.apply.statestore import ConfigMapStateStore

            lease_client = home_client(settings.kubeconfig, lease.context, "lease")
            # The durable state lives next to the Lease (README, "Kubernetes").
            store = ConfigMapStateStore(
                lease_client, lease.namespace, who, memory_shards=lease.memory_shards
            )
        # A stop asked from here on ends the run through its own exit (the Lease
        # released, the memories flushed), start-up included: the election starts
        # below, and start-up may wait a --prometheus-timeout on set-up checks, where a
        # SIGTERM killed the process with the Lease held. SIGHUP (a closed terminal, a
        # supervisor's reload) stops it alike rather than killing it.
        stop = threading.Event()
        for stopping_signal in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(stopping_signal, lambda *_: stop.set())
        # A dry run never writes, so it never competes for the Lease the writers share:
        # holding it (a dry-run replica beside the real ones, at a rolling update) kept
        # the real replicas standby and nothing was applied.
        if leader_elect and real and not dry_run:
            elector = LeaseElector(lease_client, lease.namespace, lease.name, who)
            store.is_leader = elector.is_leader  # type: ignore[union-attr]
            store.holds_lease = elector.holds_lease  # type: ignore[union-attr]
            elector.start()
            log.info(
                f"leader election on Lease {lease.namespace}/{lease.name} as {who}",
                extra={"event": "leader_election", "identity": who},
            )

        def loop_for(loop_settings: Settings) -> tuple[Any, Wiring]:
            """The loop for ``loop_settings``, with this run's interval, leader and workers."""
            return build_loop(
                loop_settings,
                dry_run=dry_run,
                interval_s=interval,
                is_leader=elector.is_leader if elector else None,
                watch=True,
                cluster_workers=cluster_workers,
                cluster_deadline_s=cluster_deadline,
            )

        def give_up() -> None:
            """Before exiting without running: the Lease released, logging as it was."""
            if elector is not None:
                elector.stop(release=True)
            reset_logging(handler)

        try:
            loop, wiring = loop_for(settings)
        except typer.BadParameter:  # --cluster naming no cluster: nothing to run
            give_up()
            raise
        except ConfigError as exc:
            from reconciler.apply.statestore import resume_desired_state
            from reconciler.desired.loader import load_desired_state

            report_config_error(exc)
            resumed, why = (
                resume_desired_state(store, settings.repo, settings.rev, settings.clusters)
                if store is not None
                else (None, "no state store (simulated fleet)")
            )
            if resumed is None:
                log.error(f"cannot start: {why}", extra={"event": "desired_invalid_at_start"})
                give_up()
                raise typer.Exit(1) from None
            # Start on the stored last known good revision; every cycle still loads
            # the requested one and reports it while it stays invalid.
            loop, wiring = loop_for(replace(settings, rev=resumed.revision.id))
            loop.load_desired = lambda: load_desired_state(settings.repo, rev=settings.rev)
            loop.last_good = resumed.state
            loop.desired_error = (
                "desired state invalid at start; reconciling to the stored last known good "
                f"revision {resumed.revision.label or resumed.revision.id}: {exc}"
            )
            loop.metrics.desired_valid.set(0)
            loop.metrics.desired_from_store.set(1)
            log.error(loop.desired_error, extra={"event": "desired_from_store"})
        if store is not None:
            loop.state_store, loop.identity = store, who
        server = None
        if address is not None:
            try:
                server = serve_http(loop, *address)
            except OSError as exc:  # in use, not this host's address, a privileged port
                log.error(
                    f"cannot serve on --listen {listen}: {exc.strerror or exc}",
                    extra={"event": "http_bind_failed", "listen": listen},
                )
                give_up()
                raise typer.Exit(1) from None
            log.info(
                f"serving /metrics, /healthz, /readyz on {listen}",
                extra={"event": "http", "listen": listen},
            )
        log.info(
            f"reconciling every {interval:g} s against {wiring.describe}"
            + (" (dry run)" if dry_run else "")
            + (
                f", up to {loop.runs.workers} clusters at once, each cycle within "
                f"{loop.cluster_deadline_s:g} s"
                if loop.runs is not None
                else ", one cluster after another"
            ),
            extra={"event": "start"},
        )
        done = 0

        def on_cycle(result: Any) -> None:
            nonlocal done
            done += 1
            if cycles and done >= cycles:
                stop.set()

        try:
            loop.run_forever(stop, on_cycle=on_cycle)
        finally:
            if store is not None:  # before the Lease goes: only the leader writes
                flush_memories_bounded(store)
            if elector is not None:
                elector.stop(release=True)
            if server is not None:
                server.shutdown()
            log.info("stopped", extra={"event": "stop", "cycles": done})
            reset_logging(handler)

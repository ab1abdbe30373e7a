"""What several commands share, defined once so it reads alike everywhere: options
(and ``option_group``, for options several commands take together), the consoles, how invalid input is reported, and the repository-path check.

Light on purpose: the command line imports it before knowing which command runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, cast

import typer
from typer.core import TyperCommand, TyperOption

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from reconciler.apply.plansign import SigningKey
    from reconciler.desired.loader import DesiredState
    from reconciler.errors import ConfigError


class _ConsoleOnFirstUse:
    """A rich Console built when first used: importing rich costs ~20 ms, which a
    command that never prints through it (a valid ``validate``) does not pay."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def built(self) -> Console:
        """The Console itself, for what needs one rather than its attributes (a
        progress display enters it as a context manager, which no proxy can stand for)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.built(), name)


# User text (values, file names, errors) goes through these: no :emoji: codes, and
# every print of it escapes markup or turns it off (a value may contain "[/red]").
console = cast("Console", _ConsoleOnFirstUse(highlight=False, emoji=False))
_err_console = _ConsoleOnFirstUse(stderr=True, highlight=False, emoji=False)
err_console = cast("Console", _err_console)


def without_flag_types(params: list[Any]) -> list[Any]:
    """``params``, each flag given an empty metavar: a flag takes no value, yet
    typer's help would show ``<bool>`` where other options show their value's type.

    Parameters and contexts are Any: they are click's, which typer versions import
    from different places (some vendor click)."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class PlainFlagsCommand(TyperCommand):
    """Every command's class (``reconciler.cli`` gives it to each): help without
    ``<bool>`` after flags, ``--help`` included (click adds it in ``get_params``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return without_flag_types(super().get_params(ctx))


PLACERS = ("cp-sat", "greedy")

PlacerOpt = Annotated[
    str,
    typer.Option(
        "--placer",
        help="cp-sat (the topology-aware placement model) or greedy (the paper's scheduler)",
    ),
]


# ------------------------------------------------------------ number checks
# typer's min/max let NaN through (every comparison with it is false) and, without a
# max, infinity: each numeric option's range is checked here instead, once, as its
# definition's callback, so every command offering the option refuses the same values
# with the same usage error (exit 2, naming the option) before doing any work.

DAY_S = 24 * 3600.0


def number_problem(
    value: float, *, low: float, high: float, low_open: bool = False, unit: str = ""
) -> str | None:
    """Why ``value`` is not a finite number in ``[low, high]`` (``(low, high]`` when
    ``low_open``), or None when it is."""
    # An int may exceed what a float holds (math.isfinite would overflow): ints are
    # finite, and compare exactly.
    finite = isinstance(value, int) or math.isfinite(value)
    if finite and (low < value if low_open else low <= value) and value <= high:
        return None

    def shown(bound: float) -> str:
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    lower = f"above {shown(low)}" if low_open else f"at least {shown(low)}"
    return f"must be a number {lower} and at most {shown(high)}{unit}, got {value}"


def in_range(
    low: float, high: float, *, low_open: bool = False, unit: str = ""
) -> Callable[[Any], Any]:
    """An option callback refusing a value outside ``number_problem``'s range (None,
    an optional option left out, passes)."""

    def check(value: Any) -> Any:
        problem = (
            None
            if value is None
            else number_problem(value, low=low, high=high, low_open=low_open, unit=unit)
        )
        if problem is not None:
            raise typer.BadParameter(problem)
        return value

    return check


# ------------------------------------------------------------ shared options
# One definition per option name: a command offering an option uses the type here, so
# its spelling, help and checks are the same wherever it appears
# (tests/commands/test_options.py fails when two commands define one name apart).
# Alike in form by nature: each is typer's own declaration spelled out (flag, help,
# range and why), so it reads and greps as its --help shows it.


def git_revision(value: str | None) -> str | None:
    """An option callback refusing an empty (or blank) Git revision: in CI an unset
    variable (``--base "$BASE"``) would otherwise fall back to a default revision and
    review, validate or apply another commit than the one meant. None (the option left
    out) passes."""
    if value is not None and not value.strip():
        raise typer.BadParameter(
            "must name a Git revision, got an empty string (an unset variable?); "
            "leave the option out for its default"
        )
    return value


RepoOpt = Annotated[
    Path, typer.Option("--repo", help="repository root holding policies/ and clusters/")
]
RevOpt = Annotated[
    str | None,
    typer.Option(
        "--rev",
        help="read the desired state at this Git revision, without checking it out "
        "(run: re-resolved every cycle)",
        callback=git_revision,
    ),
]
KubeconfigOpt = Annotated[
    str | None,
    typer.Option(
        "--kubeconfig", help="kubeconfig path (default: $KUBECONFIG, ~/.kube/config, in-cluster)"
    ),
]
SimulateOpt = Annotated[
    bool,
    typer.Option("--simulate", help="act on the simulated fleet even when a kubeconfig exists"),
]
ClusterOpt = Annotated[
    list[str] | None, typer.Option("--cluster", help="only these clusters (repeatable)")
]
AutoscalerOpt = Annotated[
    str,
    typer.Option(
        "--autoscaler",
        help="autoscaling policy: heteroscale (the default: sized from the performance "
        "model), heteroscale-paper (the paper's, needs hand-set targets) or a baseline "
        "(tune: the first two)",
    ),
]
PrometheusUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--prometheus-url", envvar="HETEROSCALE_PROMETHEUS_URL", help="Prometheus for live metrics"
    ),
]
ClusterPrometheusUrlOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--cluster-prometheus-url",
        metavar="CLUSTER=URL",
        help="Prometheus for one cluster's engines in place of --prometheus-url "
        "(repeatable): with one per cluster, a slow or down one holds only its cluster",
    ),
]
PrometheusScrapeIntervalOpt = Annotated[
    float,
    typer.Option(
        "--prometheus-scrape-interval",
        envvar="HETEROSCALE_PROMETHEUS_SCRAPE_INTERVAL",
        help="seconds between Prometheus's scrapes of the engines, 0.1 to 86400 (what a "
        "covered rate window must hold follows from it)",
        # Sub-second scrapes exist (the tests run Prometheus at 0.5 s), and the rules'
        # durations are written in milliseconds; a scrape a day apart leaves no rate.
        callback=in_range(0.1, DAY_S, unit=" s"),
    ),
]
PrometheusRateWindowOpt = Annotated[
    float | None,
    typer.Option(
        "--prometheus-rate-window",
        envvar="HETEROSCALE_PROMETHEUS_RATE_WINDOW",
        help="seconds of rate() and latency windows, at most 86400 (default: four scrape "
        "intervals, at least 60)",
        # A day-long window averages away the load the autoscaler reacts to.
        callback=in_range(0.0, DAY_S, low_open=True, unit=" s"),
    ),
]
PrometheusRecordingRulesOpt = Annotated[
    bool,
    typer.Option(
        "--prometheus-recording-rules",
        help="read the histograms from the recording rules `heteroscale prometheus-rules` "
        "prints (large fleets; load them into Prometheus first)",
    ),
]
PrometheusCaFileOpt = Annotated[
    str | None,
    typer.Option(
        "--prometheus-ca-file",
        envvar="HETEROSCALE_PROMETHEUS_CA_FILE",
        help="PEM certificate authorities to verify an HTTPS Prometheus with (an internal CA)",
    ),
]
PrometheusTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--prometheus-timeout",
        help="seconds per Prometheus request (connect, and each read), at most 3600",
        # An hour per request would stall a cycle far past any interval.
        callback=in_range(0.0, 3600.0, low_open=True, unit=" s"),
    ),
]
PrometheusTokenFileOpt = Annotated[
    str | None,
    typer.Option(
        "--prometheus-bearer-token-file",
        envvar="HETEROSCALE_PROMETHEUS_BEARER_TOKEN_FILE",
        help="bearer token for a Prometheus behind an authenticating proxy (read every cycle)",
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="take back fields someone else changed (otherwise reported as drift)"
    ),
]
DrainWindowOpt = Annotated[
    float,
    typer.Option(
        "--drain-window",
        help="soft scale-in observation window, seconds, at most 86400 (0: delete at once)",
        # NaN or infinity would leave drained pods for ever; past a day a drain is stuck.
        callback=in_range(0.0, DAY_S, unit=" s"),
    ),
]
DiffModeOpt = Annotated[
    str,
    typer.Option("--diff-mode", help="auto (server dry run, client fallback), server, or client"),
]
SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed",
        help="seed of everything random: the simulated fleet, loads, sampling (0 or more)",
        callback=in_range(0, 2**63 - 1),  # numpy's generators take no negative seed
    ),
]
PruneRemovedServicesOpt = Annotated[
    bool,
    typer.Option(
        "--prune-removed-services",
        help="tear down groups of services whose policy file was removed (never those of "
        "a service whose policy moved it to another cluster)",
    ),
]
FormatOpt = Annotated[
    str, typer.Option("--format", help="text or json (plan and apply: also markdown)")
]


def kubernetes_name(kind: Literal["label", "subdomain"]) -> Callable[[Any], Any]:
    """An option callback refusing what Kubernetes would not take as a namespace (a
    DNS-1123 label) or an object name (a subdomain): such a value went into API paths
    (``--lease-namespace ../../x``)."""

    def check(value: Any) -> Any:
        from reconciler import dns1123

        judge = dns1123.label_problem if kind == "label" else dns1123.subdomain_problem
        problem = None if value is None else judge(value)
        if problem is not None:
            raise typer.BadParameter(f"not a Kubernetes {kind} name ({problem})")
        return value

    return check


LeaseNamespaceOpt = Annotated[
    str,
    typer.Option(
        "--lease-namespace",
        envvar="POD_NAMESPACE",
        help="namespace of the reconciler's Lease and state ConfigMaps",
        callback=kubernetes_name("label"),
    ),
]
LeaseNameOpt = Annotated[
    str,
    typer.Option(
        "--lease-name", help="the reconciler's Lease", callback=kubernetes_name("subdomain")
    ),
]
LeaseContextOpt = Annotated[
    str | None,
    typer.Option(
        "--lease-context",
        help="kube context holding the Lease and state (default: current / in-cluster)",
    ),
]
StateMemoryShardsOpt = Annotated[
    int | None,
    typer.Option(
        "--state-memory-shards",
        help="ConfigMaps per cluster holding the planners' memories, named after its "
        "state ConfigMap: <state>-memories-0 .. N-1 (RBAC must name each; 0: in the "
        "state ConfigMap itself; default 8, at most 64)",
    ),
]
DEFAULT_LEASE_NAMESPACE = "heteroscale-system"
DEFAULT_LEASE_NAME = "heteroscale-reconciler"

# What a trace drives (a replay, a sweep, a check) is in each command's description.
TraceOpt = Annotated[
    Path | None,
    typer.Option(
        "--trace",
        help="request trace (Azure CSV, Mooncake JSONL[.gz], BurstGPT or plain CSV); "
        "omitted: a synthetic diurnal day per service",
    ),
]
# The replay holds K copies of every request of the trace in memory: a thousand copies
# of a million-request trace are already more than a workstation holds.
MAX_RATE_SCALE = 1000.0
RateScaleOpt = Annotated[
    float | None,
    typer.Option(
        "--rate-scale",
        help=f"multiply the trace's arrival rate by K, above 0 and at most {MAX_RATE_SCALE:g}",
        callback=in_range(0.0, MAX_RATE_SCALE, low_open=True),
    ),
]
# The simulator's longest day: sim.workload.MAX_TRACE_SPAN_S in hours (a test pins it;
# not imported, so that the options import no simulator).
MAX_DAY_HOURS = 7 * 24.0
DiurnalHoursOpt = Annotated[
    float | None,
    typer.Option(
        "--diurnal-hours",
        help="tile the trace over H hours under a diurnal curve (no trace: a synthetic "
        "load of H hours)",
        callback=in_range(0.0, MAX_DAY_HOURS, unit=" h"),
    ),
]
WarmUpHoursOpt = Annotated[
    float,
    typer.Option(
        "--warm-up-hours",
        help="run the load's first H hours but judge only what follows (every policy "
        "meets it with the memory and fleet those hours left; static peak and oracle-min "
        "size and plan on the judged part alone)",
        callback=in_range(0.0, MAX_DAY_HOURS, unit=" h"),
    ),
]
# simulate and tune step simulated time; run's --interval is wall-clock time instead.
DecisionIntervalOpt = Annotated[
    float,
    typer.Option(
        "--interval",
        help="seconds between autoscaler decisions, 1 to 86400",
        # No policy decides more often than its metrics window; one decision a day
        # already leaves a simulated day (the longest is a week) without any.
        callback=in_range(1.0, DAY_S, unit=" s"),
    ),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot", help="write the command's plot as a PNG here (plan: one per replayed service)"
    ),
]
SigningKeyFileOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--signing-key-file",
        help="secret key (at least 32 bytes) to sign a saved plan with (plan --out) or to "
        "accept only plans signed with (apply PLAN; repeatable: the old key and the new "
        "while rotating)",
    ),
]


Command = Callable[..., None]


def option_group(
    param: str, build: Callable[..., Any], **fixed: Any
) -> Callable[[Command], Command]:
    """A command taking ``param`` offers, in its place, the options ``build`` takes
    (all but those ``fixed`` to a value), and is called with what ``build`` makes of
    them. Typer reads a command's options from its signature: the wrapper's is the
    command's, ``build``'s options spliced in where ``param`` stands."""
    shared = [
        p
        for p in inspect.signature(build, eval_str=True).parameters.values()
        if p.name not in fixed
    ]

    def decorate(command: Command) -> Command:
        own = inspect.signature(command, eval_str=True)
        params = list(own.parameters.values())
        at = [p.name for p in params].index(param)
        params[at : at + 1] = shared
        # Typer passes every parameter by name.
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]

        @functools.wraps(command)
        def with_group(**kwargs: Any) -> None:
            options = {p.name: kwargs.pop(p.name) for p in shared}
            command(**{param: build(**options, **fixed)}, **kwargs)

        with_group.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        with_group.__annotations__ = {p.name: p.annotation for p in params}
        return with_group

    return decorate


def checked_placer(placer: str) -> str:
    """``placer`` if it is one of ``PLACERS``; a usage error (exit 2) naming them
    otherwise."""
    if placer not in PLACERS:
        raise typer.BadParameter(
            f"must be {' or '.join(PLACERS)}, got '{placer}'", param_hint="--placer"
        )
    return placer


def checked_memory_shards(shards: int | None) -> int | None:
    """``shards`` (None: the default, ``reconciler.durable.DEFAULT_MEMORY_SHARDS``) if
    within 0..``MAX_MEMORY_SHARDS``; a usage error (exit 2) naming the option
    otherwise."""
    from reconciler.durable import MAX_MEMORY_SHARDS

    if shards is not None and not 0 <= shards <= MAX_MEMORY_SHARDS:
        raise typer.BadParameter(
            f"must be 0 to {MAX_MEMORY_SHARDS} (ConfigMaps per cluster), got {shards}",
            param_hint="--state-memory-shards",
        )
    return shards


def checked_output(path: Path | None, option: str, *, directory: bool = False) -> Path | None:
    """``path`` if a command can write its output there (a file, or with ``directory``
    a directory to write files into); a usage error (exit 2) naming ``option``
    otherwise, said before the work whose result it would hold. Missing parent
    directories are created when writing; the nearest existing one must be a
    directory this process may write into."""
    if path is None:
        return None
    if path.exists() and path.is_dir() != directory:
        kind = "not a directory" if directory else "a directory, not a file"
        raise typer.BadParameter(f"{path} is {kind}", param_hint=option)
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise typer.BadParameter(f"{path}: {parent} is not a directory", param_hint=option)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{path}: cannot write into {parent}", param_hint=option)
    return path


def checked_signing_keys(paths: list[Path] | None) -> tuple[SigningKey, ...]:
    """The keys in ``paths`` (``--signing-key-file``, in order); a usage error (exit 2)
    saying why one cannot serve, before any work is done."""
    from reconciler.apply.plansign import SigningKeyError, read_signing_key

    try:
        return tuple(read_signing_key(path) for path in paths or ())
    except SigningKeyError as exc:
        raise typer.BadParameter(str(exc), param_hint="--signing-key-file") from None


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Writes ``what`` (the option, or a description) to ``path`` inside it, its
    missing parent directories created first (as ``checked_output`` promises, for
    every writer alike); a failure (disk full, a path the checks could not foresee,
    /proc) is ``error: ...`` on stderr and exit 1, not a traceback."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as exc:
        err_console.print(
            f"error: {what} {path}: cannot write: {exc.strerror or exc}",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def usage_error(message: str) -> NoReturn:
    """``error: message`` on stderr (user text in it is never read as console markup)
    and exit 2, as every command's check of its arguments ends."""
    err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(2)


def checked_repository(path: Path, *, rev: str | None = None) -> Path:
    """``path`` if it can be the desired-state repository (read at Git revision
    ``rev`` when given, so only the directory must exist); otherwise
    ``error: PATH: why`` on stderr and a usage error (exit 2), worded alike by every
    command (``reconciler.desired.loader.repository_problem``)."""
    from reconciler.desired.loader import repository_problem

    problem = repository_problem(path, work_tree=rev is None)
    if problem is not None:
        usage_error(f"{path}: {problem}")
    return path


def desired_state_or_exit(repo: Path, *, rev: str | None = None) -> DesiredState:
    """The desired state in ``repo`` (at Git revision ``rev`` when given); when it is
    invalid, its problems on stderr (``report_config_error``) and exit 1. Check the
    path first (``checked_repository``): a path that cannot be a repository is a
    usage error instead."""
    from reconciler.desired.loader import load_desired_state
    from reconciler.errors import ConfigError

    try:
        return load_desired_state(repo, rev=rev)
    except ConfigError as exc:
        report_config_error(exc)
        raise typer.Exit(1) from None


def checked_service(state: DesiredState, name: str) -> str:
    """``name`` if ``state`` has that service; otherwise ``error: unknown service``
    naming the known ones on stderr and a usage error (exit 2), said alike by every
    command taking a service."""
    if name not in state.policies:
        known = ", ".join(sorted(state.policies)) or "none"
        usage_error(f"unknown service '{name}' in {state.source_label} (known: {known})")
    return name


def progress_bars(counter: str) -> Progress:
    """A progress display on stderr (``err_console``), kept when done: per task its
    description, a bar, ``counter`` (a rich format of the task's fields, e.g.
    ``"{task.percentage:>5.1f}%"``) and the time elapsed. Enter it with ``with``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        TextColumn(counter),
        TimeElapsedColumn(),
        console=_err_console.built(),
        transient=False,
    )


def report_config_error(exc: ConfigError) -> None:
    """One line per problem, on stderr, no traceback: the first of each file
    (``shown_issues``), then the count of all."""
    from rich.markup import escape

    from reconciler.errors import shown_issues
    from reconciler.text_safety import visible

    for line in shown_issues(exc.issues):
        # A file name may hold a control character: shown as an escape, never acted on.
        err_console.print(f"[red]error[/red] {escape(visible(line))}", soft_wrap=True, markup=True)
    count = len(exc.issues)
    err_console.print(f"{count:,} problem{'s' if count != 1 else ''} found", soft_wrap=True)


__all__ = [
    "DAY_S",
    "DEFAULT_LEASE_NAME",
    "DEFAULT_LEASE_NAMESPACE",
    "MAX_RATE_SCALE",
    "PLACERS",
    "AutoscalerOpt",
    "ClusterOpt",
    "Command",
    "DecisionIntervalOpt",
    "DiffModeOpt",
    "DiurnalHoursOpt",
    "DrainWindowOpt",
    "ForceOpt",
    "FormatOpt",
    "KubeconfigOpt",
    "LeaseContextOpt",
    "LeaseNameOpt",
    "LeaseNamespaceOpt",
    "PlacerOpt",
    "PlainFlagsCommand",
    "PlotOpt",
    "PrometheusCaFileOpt",
    "PrometheusRateWindowOpt",
    "PrometheusRecordingRulesOpt",
    "PrometheusScrapeIntervalOpt",
    "PrometheusTimeoutOpt",
    "PrometheusTokenFileOpt",
    "PrometheusUrlOpt",
    "PruneRemovedServicesOpt",
    "RateScaleOpt",
    "RepoOpt",
    "RevOpt",
    "SeedOpt",
    "SimulateOpt",
    "StateMemoryShardsOpt",
    "TraceOpt",
    "checked_memory_shards",
    "checked_output",
    "checked_placer",
    "checked_repository",
    "checked_service",
    "console",
    "desired_state_or_exit",
    "err_console",
    "git_revision",
    "in_range",
    "number_problem",
    "option_group",
    "progress_bars",
    "report_config_error",
    "usage_error",
    "without_flag_types",
    "writing",
]

"""The ``heteroscale`` command line.

Exit codes, everywhere: 0 success (and, for ``plan``, no change), 1 invalid input or
an error, 2 usage error, 3 ``plan`` found changes (like ``terraform plan
-detailed-exitcode``).

A command's module is imported when that command runs (help imports them all), and
each imports its heavy dependencies inside the command: ``validate`` pays for
pydantic and ruamel.yaml, not for the simulator, numpy or the Kubernetes client.
What commands share is in ``reconciler.commands._options``, so no module needs to
import this one (under ``python -m reconciler.cli`` that would load it twice).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from reconciler.atomic_write import replace_text
from reconciler.commands._options import (
    PlainFlagsCommand,
    RateScaleOpt,
    RevOpt,
    TraceOpt,
    checked_output,
    checked_repository,
    console,
    desired_state_or_exit,
    err_console,
    without_flag_types,
    writing,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from reconciler.desired.loader import DesiredState

# The module of reconciler.commands that registers each command, so running one
# imports only that module. A name missing here is found all the same (an unknown
# name imports every module); tests/commands/test_cli_lazy.py keeps it in step.
COMMAND_MODULES: dict[str, str] = {
    "plan": "reconcile",
    "apply": "reconcile",
    "prometheus-rules": "prometheus",
    "run": "reconcile",
    "simulate": "simulate",
    "status": "status",
    "tune": "tune",
}

_registered_modules: set[str] = set()


def _command_modules() -> list[str]:
    """Every module of ``reconciler.commands`` that adds commands (``_``-prefixed
    ones are shared helpers), listed without importing any."""
    import pkgutil

    import reconciler.commands as commands

    return sorted(
        info.name
        for info in pkgutil.iter_modules(commands.__path__)
        if not info.name.startswith("_")
    )


def _register(module_names: Iterable[str]) -> None:
    """Each module of ``reconciler.commands`` adds its commands with
    ``register(app)``, so features land without editing this file."""
    import importlib

    for name in module_names:
        if name not in _registered_modules:
            importlib.import_module(f"reconciler.commands.{name}").register(app)
            _registered_modules.add(name)
    for info in app.registered_commands:
        # Given here, so no module has to remember it (typer's default is TyperCommand).
        if info.cls in (None, TyperCommand):
            info.cls = PlainFlagsCommand

    # Help lists the commands in one order however they were loaded: this file's
    # first, then by module name, each module's in its own order.
    def order(info: Any) -> tuple[bool, str]:
        module = getattr(info.callback, "__module__", "")
        return module != __name__, module

    app.registered_commands.sort(key=order)


def _first_paragraph(text: str) -> str:
    """A help text's first paragraph on one line."""
    import inspect

    return " ".join(inspect.cleandoc(text).split("\n\n")[0].split())


class _LazyCommands(TyperGroup):
    """Registers a command's module on first use instead of at import.

    ``ctx`` is Any: it is click's Context, which typer versions import from different
    places."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            self._load([COMMAND_MODULES[cmd_name]])
        if cmd_name not in self.commands:
            self._load(_command_modules())
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: Any) -> list[str]:
        self._load(_command_modules())
        return super().list_commands(ctx)

    def get_params(self, ctx: Any) -> list[Any]:
        return without_flag_types(super().get_params(ctx))

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Each command with its whole first paragraph, wrapped to the terminal
        (click would cut it to one line with "...")."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, _first_paragraph(command.short_help or command.help or "")))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def _load(self, module_names: Iterable[str]) -> None:
        _register(module_names)
        self.commands = typer.main.get_group(app).commands


app = typer.Typer(
    name="heteroscale",
    help="Coordinated autoscaler for prefill/decode-disaggregated LLM serving, driven from Git.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's own help layout, not rich's panels: it wraps every option to the
    # terminal's width, where rich's tables cut long option names and env var names
    # short at 80 columns (``--prometheus-scrap…``). Up to 120 columns on a wide one.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
    cls=_LazyCommands,
)

SCHEMA_FILES = {"service-policy.json": "ServicePolicy", "cluster.json": "ClusterSpec"}


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"heteroscale {version('heteroscale')}", markup=False)
        raise typer.Exit()


@app.callback()
def _main(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", help="print the version and exit", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Coordinated autoscaler for prefill/decode-disaggregated LLM serving, driven from Git."""


@app.command(cls=PlainFlagsCommand)
def validate(
    path: Annotated[
        Path, typer.Argument(help="repository root holding policies/ and clusters/")
    ] = Path("."),
    rev: RevOpt = None,
    trace: TraceOpt = None,
    rate_scale: RateScaleOpt = None,
) -> None:
    """Validate the desired state (policies/, clusters/ and the templates they name).

    With --trace, also warn for every service that cannot meet its TTFT SLO for more
    than 1% of the trace's requests even on an idle instance, or one of whose roles no
    instance can serve within its SLO for the trace's mix, for every service whose
    pd_ratio bounds exclude the ratio the trace's mix needs (the bound then holds one
    role above what it needs), and for every service whose max_instances is below what
    the trace's busiest minute needs. Also warn for every query override that selects
    no service (neither $__services nor a service matcher)."""
    from reconciler.desired.checks import gpu_choice_warnings, model_fit_warnings
    from reconciler.observe.presets import unrestricted_override_problems
    from reconciler.text_safety import visible

    if rate_scale is not None and trace is None:
        raise typer.BadParameter("scales a trace's rate: add --trace F", param_hint="--rate-scale")
    checked_repository(path, rev=rev)
    state = desired_state_or_exit(path, rev=rev)
    gpus = sum(node.gpus for spec in state.clusters.values() for node in spec.nodes)
    nodes = sum(len(spec.nodes) for spec in state.clusters.values())
    # One unwrapped line, printed without rich: a valid run needs nothing more.
    typer.echo(
        f"valid: {len(state.policies)} service{'s' if len(state.policies) != 1 else ''}, "
        f"{len(state.clusters)} cluster{'s' if len(state.clusters) != 1 else ''} "
        f"({nodes} nodes, {gpus} GPUs) from {state.source_label}"
    )
    # Each warning is located as a loader error is: the file, line and field to fix.
    for name, policy in sorted(state.policies.items()):
        cluster = state.clusters.get(policy.cluster)
        for key_path, message in (
            *unrestricted_override_problems(policy),
            *(model_fit_warnings(policy, cluster) if cluster else ()),
            *(gpu_choice_warnings(policy, cluster) if cluster else ()),
        ):
            warning = visible(str(state.policy_issue(name, key_path, message)))
            err_console.print(f"warning: {warning}", soft_wrap=True, markup=False)
    if trace is not None:
        _check_trace(state, trace, rate_scale)


def _check_trace(state: DesiredState, trace: Path, rate_scale: float | None) -> None:
    """Warn (exit code unchanged) for every service that loses more than
    ``WARN_SHARE`` of the trace's requests to TTFT on any capacity, or whose P/D
    bounds or ``max_instances`` exclude what the trace needs (``trace_needs``); exit 1
    when the trace cannot be read."""
    from rich.markup import escape

    from reconciler.policy.attainability import WARN_SHARE, trace_attainability
    from reconciler.policy.trace_needs import (
        TraceLoad,
        trace_out_of_reach,
        trace_peak_need,
        trace_ratio_need,
    )
    from reconciler.sim.workload import TraceError, WorkloadError, read_trace

    try:
        # The same reader and seed (0) as `simulate --trace`.
        workload = read_trace(trace)
        if rate_scale is not None and rate_scale != 1.0:
            # The checks read every request: beyond what a load holds as arrays (where
            # simulate scales the binned load instead) the scale is refused.
            workload = workload.rate_scaled(rate_scale)
    except (TraceError, WorkloadError, OSError) as exc:
        err_console.print(f"[red]error[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    if workload.requests == 0:
        err_console.print(f"[red]error[/red] {escape(str(trace))}: no requests", soft_wrap=True)
        raise typer.Exit(1)
    load = TraceLoad.of(
        workload.arrival_s, workload.prompt_tokens, workload.output_tokens, workload.duration_s
    )
    for name, policy in sorted(state.policies.items()):
        cluster = state.clusters.get(policy.cluster)
        found = (
            None
            if cluster is None
            else trace_attainability(
                policy, cluster, workload.prompt_tokens, workload.output_tokens
            )
        )
        if cluster is None or found is None:
            err_console.print(
                f"warning: service {name}: no allowed GPU type of a role fits in cluster "
                f"{policy.cluster}; TTFT attainability and P/D ratio of {trace.name} not "
                "checked",
                soft_wrap=True,
                markup=False,
            )
            continue
        if found.share > WARN_SHARE:
            err_console.print(f"warning: {found.warning(trace.name)}", soft_wrap=True, markup=False)
        if load is None:
            continue
        for role, why in trace_out_of_reach(policy, cluster, load):
            err_console.print(
                f"warning: service {name}: {role} SLO out of reach for the mix in "
                f"{trace.name}: {why}; the planner holds {role} where it runs"
                + (", grown to keep up with the work" if role == "prefill" else ""),
                soft_wrap=True,
                markup=False,
            )
        for need in (
            trace_ratio_need(policy, cluster, load),
            trace_peak_need(policy, cluster, load),
        ):
            text = need.warning(trace.name) if need is not None else None
            if text is not None:
                err_console.print(f"warning: {text}", soft_wrap=True, markup=False)


def render_schemas() -> dict[str, str]:
    """The JSON Schema text of every desired-state file type, keyed by file name."""
    from reconciler.desired import models

    out = {}
    for filename, model_name in SCHEMA_FILES.items():
        model = getattr(models, model_name)
        schema = model.model_json_schema(by_alias=True)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://heteroscale.io/schemas/{filename}"
        out[filename] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


@app.command(cls=PlainFlagsCommand)
def schema(
    out_dir: Annotated[Path, typer.Option("--out", help="directory to write into")] = Path(
        "schemas"
    ),
    check: Annotated[
        bool, typer.Option("--check", help="exit 1 if the files on disk are stale")
    ] = False,
) -> None:
    """Write the JSON Schemas of policies/ and clusters/ files (used by editors via the
    `# yaml-language-server: $schema=` line)."""
    if not check:
        checked_output(out_dir, "--out", directory=True)
    stale = []
    for filename, text in render_schemas().items():
        target = out_dir / filename
        if check:
            if not target.exists() or target.read_text() != text:
                stale.append(str(target))
            continue
        with writing(target, "--out"):
            replace_text(target, text)
        console.print(f"wrote {target}", markup=False)
    if stale:
        err_console.print(f"stale: {', '.join(stale)}; run `heteroscale schema`", markup=False)
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

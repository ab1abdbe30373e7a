"""Options the commands share: one spelling, one check, and the package version."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import pytest
import typer
from typer.core import TyperOption
from typer.testing import CliRunner

from reconciler.cli import COMMAND_MODULES, app

runner = CliRunner()


def test_version_prints_the_package_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"heteroscale {version('heteroscale')}"


@pytest.mark.parametrize("command", ["plan", "apply", "status", "simulate", "tune"])
def test_every_placer_option_is_spelled_alike_and_checked_alike(command: str) -> None:
    """Each command that places offers exactly cp-sat and greedy, and refuses another
    spelling with a usage error (exit 2) that names both, before doing any work."""
    help_text = runner.invoke(app, [command, "--help"], terminal_width=200).output
    assert "--placer" in help_text and "cp-sat" in help_text
    args = [command, "--placer", "cpsat"]
    if command == "tune":
        args.insert(1, "chat")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "cp-sat or greedy" in result.output and "'cpsat'" in result.output


@pytest.mark.parametrize(
    "command", [[], ["validate"], ["schema"], *[[name] for name in sorted(COMMAND_MODULES)]]
)
def test_help_shows_no_value_type_after_a_flag(command: list[str]) -> None:
    """A flag takes no value, so its help row shows none (typer would print
    ``<bool>``), ``--help`` included; an option that takes a value shows its type."""
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    help_row = next(line for line in result.output.splitlines() if "--help " in line)
    assert "<" not in help_row


def test_help_still_shows_the_type_of_an_option_taking_a_value() -> None:
    rows = runner.invoke(app, ["plan", "--help"], terminal_width=200).output.splitlines()
    assert "<int>" in next(line for line in rows if "--seed " in line)
    assert "<" not in next(line for line in rows if "--simulate " in line)
    assert "<" not in next(line for line in rows if "--what-if " in line)


# Names two commands define apart on purpose, and why: each is checked alike within
# the commands that share its meaning.
DEFINED_PER_COMMAND = {
    # run sleeps this long in wall-clock time (tests use 0.1 s); simulate and tune
    # step simulated time, at least 1 s (both use _options.DecisionIntervalOpt).
    "--interval": "run vs simulate and tune",
    # plan writes a saved plan (a file); schema writes its files into a directory.
    "--out": "plan vs schema",
}


def _value_type(param: Any) -> object:
    """The option's value type; typer versions keep it under different names."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:
        return param.type.name
    return descriptor.annotation


def _definition(param: Any) -> tuple[object, ...]:
    """What an option means to its user, its default aside (a command may default
    differently, e.g. --placer)."""
    return (
        tuple(param.opts),
        tuple(param.secondary_opts),
        param.help,
        param.envvar,
        _value_type(param),
        param.is_flag,
        param.multiple,
        getattr(param, "min", None),
        getattr(param, "max", None),
    )


def test_an_option_name_means_the_same_in_every_command() -> None:
    """One spelling, one definition: a command offering an option another also offers
    uses the shared definition (``reconciler.commands._options``), not a copy that
    drifts (help, environment variable, type or bounds)."""
    group = typer.main.get_group(app)
    context = typer.Context(group)
    seen: dict[str, dict[tuple[object, ...], list[str]]] = {}
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None
        for param in command.params:
            if isinstance(param, TyperOption) and param.opts[0] not in DEFINED_PER_COMMAND:
                seen.setdefault(param.opts[0], {}).setdefault(_definition(param), []).append(name)
    differing = {option: defs for option, defs in seen.items() if len(defs) > 1}
    assert not differing, differing
    assert {"--repo", "--seed", "--format", "--lease-namespace"} <= {
        option for option, defs in seen.items() if len(next(iter(defs.values()))) > 1
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--prometheus-scrape-interval", "0"],
            "must be a number at least 0.1 and at most 86400 s",
        ),
        (["--prometheus-scrape-interval", "nan"], "at most 86400 s, got nan"),
        (["--prometheus-scrape-interval", "1e-300"], "at least 0.1 and at most 86400 s"),
        (["--prometheus-rate-window", "1e300"], "above 0 and at most 86400 s, got 1e+300"),
        (
            ["--prometheus-scrape-interval", "30", "--prometheus-rate-window", "45"],
            "--prometheus-rate-window must be at least two scrape intervals (60 s)",
        ),
        (
            ["--prometheus-bearer-token-file", "/nonexistent/token"],
            "--prometheus-bearer-token-file: cannot read /nonexistent/token",
        ),
        (["--prometheus-ca-file", "/nonexistent/ca.pem"], "--prometheus-ca-file: cannot read"),
        (["--prometheus-timeout", "0"], "above 0 and at most 3600 s, got 0.0"),
    ],
)
def test_prometheus_options_are_checked_before_any_work(args: list[str], message: str) -> None:
    for command in ("plan", "apply", "run"):
        result = runner.invoke(app, [command, *args], terminal_width=200)
        assert result.exit_code == 2, (command, result.output)
        assert args[-2] in result.output  # the option refused, named
        assert message in " ".join(result.output.replace("│", " ").split()), (
            command,
            result.output,
        )


def test_the_rate_window_follows_the_scrape_interval_unless_given() -> None:
    from pathlib import Path

    from reconciler.commands.reconcile import cycle_settings

    def window(**options: Any) -> float:
        settings = cycle_settings(Path("."), prometheus_url="http://p:9090", **options)
        return float(settings.prometheus.settings("http://p:9090").rate_window_s)

    assert window() == 60.0  # 15 s scrapes: four intervals, at least a minute
    assert window(prometheus_scrape_interval=30.0) == 120.0
    assert window(prometheus_scrape_interval=5.0) == 60.0
    assert window(prometheus_scrape_interval=30.0, prometheus_rate_window=90.0) == 90.0


@pytest.mark.parametrize("shards", ["-1", "65"])
def test_state_memory_shards_out_of_range_is_a_usage_error_naming_it(shards: str) -> None:
    """Every command taking the state options refuses a shard count RBAC could not
    list (0 to 64) before any work, with exit 2 naming the option."""
    for command in ("run", "apply", "status"):
        result = runner.invoke(app, [command, "--state-memory-shards", shards], terminal_width=200)
        assert result.exit_code == 2, (command, result.output)
        text = " ".join(result.output.replace("│", " ").split())
        assert "--state-memory-shards" in text and "must be 0 to 64" in text, text
        assert f"got {shards}" in text, text


def test_state_memory_shards_help_states_the_default_and_the_bound() -> None:
    from reconciler.durable import DEFAULT_MEMORY_SHARDS, MAX_MEMORY_SHARDS

    result = runner.invoke(app, ["run", "--help"], terminal_width=200)
    text = " ".join(result.output.replace("│", " ").split())
    assert "--state-memory-shards" in text
    assert f"default {DEFAULT_MEMORY_SHARDS}, at most {MAX_MEMORY_SHARDS}" in text


@pytest.mark.parametrize("hours", ["169", "1e9", "inf", "nan"])
def test_a_day_longer_than_the_simulator_takes_is_a_usage_error(hours: str) -> None:
    """A week at most (the longest span a trace may cover): 1e9 hours asked the
    simulator for 26 TiB of per-second arrays, inf raised an OverflowError."""
    from reconciler.commands._options import MAX_DAY_HOURS
    from reconciler.sim.workload import MAX_TRACE_SPAN_S

    assert MAX_DAY_HOURS * 3600 == MAX_TRACE_SPAN_S
    for command in (["simulate"], ["tune", "chat"]):
        result = runner.invoke(app, [*command, "--diurnal-hours", hours], terminal_width=200)
        assert result.exit_code == 2, (command, result.output)
        text = " ".join(result.output.replace("│", " ").split())
        assert "--diurnal-hours" in text and "at most 168 h" in text, text

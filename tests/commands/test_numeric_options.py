"""Every numeric option refuses what cannot work (NaN, infinity, a negative seed, a
zero rate scale, a value past its bound) with a usage error naming it, exit 2, before
any work: the same check wherever the option appears."""

from __future__ import annotations

import typing
from typing import Any

import pytest
import typer
from typer.core import TyperOption
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.commands._options import number_problem

runner = CliRunner()

# The arguments a command needs before its options (tune: the service).
LEADING = {"tune": ["chat"]}


def _invoke(command: str, *args: str) -> Any:
    return runner.invoke(app, [command, *LEADING.get(command, []), *args], terminal_width=200)


def _refused(result: Any, option: str) -> bool:
    text = " ".join(result.output.split())
    return result.exit_code == 2 and option in text and "Traceback" not in text


def _number_kind(param: Any) -> type | None:
    """float or int when the option takes a number (optional or not), else None."""
    annotation = param.type_descriptor.annotation
    kinds = [k for k in (*typing.get_args(annotation), annotation) if k in (float, int)]
    return kinds[0] if kinds else None


def _numeric_options() -> list[object]:
    group = typer.main.get_group(app)
    context = typer.Context(group)
    out: list[object] = []
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None
        for param in command.params:
            if isinstance(param, TyperOption) and not param.is_flag:
                kind = _number_kind(param)
                if kind is not None:
                    out.append(
                        pytest.param(name, param.opts[0], kind, id=f"{name} {param.opts[0]}")
                    )
    return out


@pytest.mark.parametrize(("command", "option", "kind"), _numeric_options())
def test_every_numeric_option_refuses_nan_infinity_and_huge_values(
    command: str, option: str, kind: type
) -> None:
    values = ["nan", "inf", "-inf", "1e300"] if kind is float else []
    values.append(str(10**30))
    for value in values:
        result = _invoke(command, option, value)
        assert _refused(result, option), (value, result.output)


@pytest.mark.parametrize(
    ("command", "args", "option"),
    [
        ("plan", ["--simulate", "--drain-window", "nan"], "--drain-window"),
        ("apply", ["--simulate", "--drain-window", "inf"], "--drain-window"),
        ("plan", ["--simulate", "--drain-window", "-1"], "--drain-window"),
        ("run", ["--simulate", "--interval", "nan"], "--interval"),
        ("run", ["--simulate", "--interval", "1e300"], "--interval"),
        ("run", ["--simulate", "--interval", "0.001"], "--interval"),
        ("run", ["--simulate", "--cycles", "-1"], "--cycles"),
        ("simulate", ["--rate-scale", "0"], "--rate-scale"),
        ("tune", ["--rate-scale", "0"], "--rate-scale"),
        ("plan", ["--base", "HEAD~1", "--rate-scale", "0"], "--rate-scale"),
        ("validate", ["--rate-scale", "0"], "--rate-scale"),
        ("simulate", ["--rate-scale", "1e300"], "--rate-scale"),
        ("plan", ["--simulate", "--seed", "-5"], "--seed"),
        ("simulate", ["--seed", "-1"], "--seed"),
        ("tune", ["--seed", "-1"], "--seed"),
        (
            "prometheus-rules",
            ["--prometheus-scrape-interval", "1e-300"],
            "--prometheus-scrape-interval",
        ),
        ("prometheus-rules", ["--prometheus-rate-window", "1e300"], "--prometheus-rate-window"),
        ("tune", ["--gpus", "99999999999"], "--gpus"),
        ("tune", ["--duration", "1e11"], "--duration"),
        ("tune", ["--duration", "100000000000"], "--duration"),
        ("simulate", ["--oracle-window", "99999999999"], "--oracle-window"),
        ("tune", ["--headroom", "nan"], "--headroom"),
        ("simulate", ["--warm-up-hours", "nan"], "--warm-up-hours"),
    ],
)
def test_what_the_tester_found_is_a_usage_error(command: str, args: list[str], option: str) -> None:
    result = _invoke(command, *args)
    assert _refused(result, option), result.output


def test_a_bound_is_said_with_the_value_refused() -> None:
    assert number_problem(float("nan"), low=0.0, high=86400.0, unit=" s") == (
        "must be a number at least 0 and at most 86400 s, got nan"
    )
    assert number_problem(0.0, low=0.0, high=1000.0, low_open=True) == (
        "must be a number above 0 and at most 1000, got 0.0"
    )
    assert number_problem(10**400, low=0, high=2**63 - 1) is not None  # no OverflowError
    assert number_problem(120.0, low=0.0, high=86400.0) is None


def test_the_bounds_are_in_the_help() -> None:
    for command, option, bound in [
        ("run", "--interval", "0.1 to 86400"),
        ("tune", "--gpus", "2 to 4096"),
        ("tune", "--duration", "120 to 3600"),
        ("simulate", "--rate-scale", "at most 1000"),
        ("plan", "--drain-window", "at most 86400"),
    ]:
        text = " ".join(runner.invoke(app, [command, "--help"], terminal_width=200).output.split())
        row = text[text.index(option) :][:300]
        assert bound in row, (command, option, row)

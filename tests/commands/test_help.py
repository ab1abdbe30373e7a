"""Help reads whole at any terminal width: nothing cut, every description shown."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from reconciler.cli import COMMAND_MODULES, app

runner = CliRunner()
COMMANDS = [[], ["validate"], ["schema"], *[[name] for name in sorted(COMMAND_MODULES)]]
WIDTHS = [60, 200]


def _flowing(text: str) -> str:
    """The text without its white space: wrapping may break a line at a space, at a
    hyphen or inside a word longer than the column, never drop a character."""
    return "".join(text.split())


def _help(command: list[str], width: int) -> str:
    result = runner.invoke(app, [*command, "--help"], terminal_width=width)
    assert result.exit_code == 0, result.output
    return result.output


def _click_command(command: list[str]) -> Any:
    """The command behind ``heteroscale *command`` (typer's own copy of click's
    classes, so read by duck typing)."""
    group = typer.main.get_command(app)
    if not command:
        return group
    found = group.get_command(group.context_class(group), command[0])  # type: ignore[attr-defined]
    assert found is not None
    return found


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_cuts_nothing_and_shows_every_option_whole(command: list[str], width: int) -> None:
    """No ellipsis anywhere; every option's name and its whole help text are there
    (wrapping may move words to the next line, never drop them)."""
    output = _help(command, width)
    body = "\n".join(line for line in output.splitlines() if not line.startswith("Usage:"))
    assert "…" not in body and "..." not in body  # the usage line's "[ARGS]..." aside
    flowing = _flowing(output)
    for param in _click_command(command).params:
        if param.param_type_name != "option" or param.hidden:
            continue
        for name in param.opts:
            assert name in output, f"{name} missing from {command} --help at {width}"
        if param.help:
            assert _flowing(param.help) in flowing, f"{name}'s help cut at {width}"


@pytest.mark.parametrize("width", WIDTHS)
def test_the_command_list_shows_each_whole_first_paragraph(width: int) -> None:
    flowing = _flowing(_help([], width))
    group = _click_command([])
    context = group.context_class(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None and command.help
        first = inspect.cleandoc(command.help).split("\n\n")[0]
        assert _flowing(first) in flowing, f"{name}: {first!r}"

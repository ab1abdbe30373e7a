"""Options the commands share: one spelling, one check, and the package version."""

from __future__ import annotations

from importlib.metadata import version

import pytest
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

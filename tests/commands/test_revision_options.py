"""An empty Git revision is a usage error wherever one is taken: in CI an unset
variable (``--base "$BASE"``) silently reviewed HEAD~1, or validated the work tree."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from reconciler.cli import app


@pytest.mark.parametrize(
    "command",
    [
        ["validate", "--rev", ""],
        ["plan", "--rev", ""],
        ["plan", "--base", ""],
        ["plan", "--base", "  "],
        ["plan", "--head", ""],
        ["plan", "--base", "HEAD~1", "--head", ""],
        ["apply", "--simulate", "--rev", ""],
        ["run", "--simulate", "--cycles", "1", "--listen", ":0", "--rev", ""],
        ["status", "--simulate", "--rev", ""],
        ["prometheus-rules", "--rev", ""],
    ],
)
def test_an_empty_revision_is_a_usage_error_naming_the_option(command: list[str]) -> None:
    result = CliRunner().invoke(app, command, terminal_width=200)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())
    option = next(a for a in reversed(command) if a.startswith("--"))
    assert option in text and "must name a Git revision, got an empty string" in text, text


def test_the_base_default_is_in_its_help() -> None:
    result = CliRunner().invoke(app, ["plan", "--help"], terminal_width=200)
    text = " ".join(result.output.replace("│", " ").split())
    assert "when only --head is given: HEAD~1" in text, text

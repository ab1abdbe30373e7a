"""``--cluster`` names clusters of the desired state: a name it does not have (a typo)
is a usage error naming the known ones, never a run over nothing that reports "no
changes" or "0 service(s)"."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from reconciler.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [
        ["plan", "--simulate"],
        ["apply", "--simulate"],
        ["status", "--simulate"],
        ["run", "--simulate", "--cycles", "1", "--listen", ":0"],
    ],
    ids=lambda command: command[0],
)
def test_an_unknown_cluster_is_a_usage_error_naming_the_known_ones(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--cluster", "nosuch"], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "unknown cluster 'nosuch' (known: prod-east)" in result.output
    assert "No changes" not in result.output and "service(s)" not in result.output


def test_a_known_cluster_is_planned() -> None:
    result = runner.invoke(app, ["plan", "--simulate", "--cluster", "prod-east"])
    assert result.exit_code == 3, result.output
    assert "cluster prod-east" in result.output or "prod-east" in result.output

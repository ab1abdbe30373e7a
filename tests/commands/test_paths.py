"""A wrong repository path reads the same in every command that takes one: the path,
what is wrong with it, exit 2 (a usage error), and nothing run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconciler.cli import app

runner = CliRunner()

# Every command that reads the desired state, with the arguments that make it act on
# the simulated fleet (never a real cluster) should the path check let it through.
COMMANDS: dict[str, Callable[[str], list[str]]] = {
    "validate": lambda repo: ["validate", repo],
    "plan": lambda repo: ["plan", "--repo", repo, "--simulate"],
    "plan --base (review)": lambda repo: ["plan", "--repo", repo, "--base", "HEAD~1"],
    "apply": lambda repo: ["apply", "--repo", repo, "--simulate"],
    "run": lambda repo: ["run", "--repo", repo, "--simulate", "--cycles", "1", "--listen", ":0"],
    "status": lambda repo: ["status", "--repo", repo, "--simulate"],
    "simulate": lambda repo: ["simulate", "--repo", repo],
    "tune": lambda repo: ["tune", "chat", "--repo", repo],
}


def absent(tmp_path: Path) -> Path:
    return tmp_path / "absent"


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "chat.yaml"
    path.write_text("name: chat\n")
    return path


def not_a_repository(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere"
    (path / "templates").mkdir(parents=True)
    return path


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (absent, "no such directory"),
    "a file": (a_file, "not a directory"),
    "no policies/ or clusters/": (
        not_a_repository,
        "not a desired-state repository (neither policies/ nor clusters/ in it)",
    ),
}


def params() -> list[object]:
    out: list[object] = []
    for command in COMMANDS:
        for case in CASES:
            # A review reads Git revisions: the work tree's content is not looked at.
            if command.startswith("plan --base") and case == "no policies/ or clusters/":
                continue
            out.append(pytest.param(command, case, id=f"{command}: {case}"))
    return out


@pytest.mark.parametrize(("command", "case"), params())
def test_a_wrong_repository_path_is_said_alike_by_every_command(
    command: str, case: str, tmp_path: Path
) -> None:
    make, problem = CASES[case]
    path = make(tmp_path)
    result = runner.invoke(app, COMMANDS[command](str(path)))
    assert result.exit_code == 2, result.output
    assert f"error: {path}: {problem}" in result.output
    assert "Traceback" not in result.output

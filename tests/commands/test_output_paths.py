"""Where a command writes its output is checked before the work (a usage error naming
the option), and a write that fails anyway (disk full, /proc) is an error, exit 1,
never a traceback after the whole run. A plot is written exactly where it is said. A
file rewritten in place (``tune --write``) is replaced whole or left as it was."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconciler.cli import app

runner = CliRunner()
# A short, cheap simulation: what the checks must come before.
SIMULATE = ["simulate", "--diurnal-hours", "0.5", "--policies", "static-peak"]


def a_directory(tmp_path: Path) -> Path:
    return tmp_path


def under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file.csv").write_text("")
    return tmp_path / "file.csv" / "x.json"


WRONG_FILE_PATHS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "a directory": (a_directory, "is a directory, not a file"),
    "under a file": (under_a_file, "file.csv is not a directory"),
}
FILE_OPTIONS = {
    "simulate --json": [*SIMULATE, "--json"],
    "simulate --plot": [*SIMULATE, "--plot"],
    "simulate --export-workload": [*SIMULATE, "--export-workload"],
    "tune --plot": ["tune", "chat", "--plot"],
    "plan --out": ["plan", "--simulate", "--out"],
    "plan --base --plot": ["plan", "--base", "HEAD~1", "--plot"],
}


@pytest.mark.parametrize("case", WRONG_FILE_PATHS)
@pytest.mark.parametrize("command", FILE_OPTIONS)
def test_an_output_file_that_cannot_be_is_a_usage_error_before_the_work(
    command: str, case: str, tmp_path: Path
) -> None:
    make, problem = WRONG_FILE_PATHS[case]
    args = FILE_OPTIONS[command]
    result = runner.invoke(app, [*args, str(make(tmp_path))], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert args[-1] in result.output and problem in result.output
    assert "static-peak:" not in result.output  # refused before simulating


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_a_write_that_fails_is_an_error_not_a_traceback(option: str) -> None:
    result = runner.invoke(app, [*SIMULATE, option, "/dev/full"])
    assert result.exit_code == 1, result.output
    assert f"error: {option} /dev/full: cannot write: No space left on device" in result.output


def test_a_plot_is_written_exactly_where_it_is_said(tmp_path: Path) -> None:
    target = tmp_path / "plots" / "day"  # no .png suffix, parents missing
    result = runner.invoke(app, [*SIMULATE, "--plot", str(target)])
    assert result.exit_code == 0, result.output
    assert f"wrote {target}" in result.output
    assert target.is_file() and not target.with_suffix(".png").exists()


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda tmp: tmp / "file", "is not a directory"),
        (lambda tmp: Path("/dev/null"), "/dev/null is not a directory"),
    ],
    ids=["a file", "/dev/null"],
)
def test_schema_out_must_be_a_directory(
    make: Callable[[Path], Path], problem: str, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["schema", "--out", str(make(tmp_path))], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and problem in result.output


def test_schema_into_a_directory_it_cannot_write_is_an_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["schema", "--out", "/proc/heteroscale-schemas"])
    assert result.exit_code in (1, 2), result.output
    assert "error" in result.output.lower() and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)

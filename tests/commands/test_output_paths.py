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


def test_an_output_cut_short_leaves_no_half_written_file(tmp_path: Path) -> None:
    """A write that fails part way (here the file-size limit, as a full disk would)
    leaves nothing under the output's name: an exported workload cut at 64 KiB was
    left behind, and read back as a valid, shorter trace."""
    import resource
    import subprocess
    import sys

    trace = tmp_path / "trace.csv"
    rows = "".join(f"{i * 0.03:.2f},{1000 + i % 700},{50 + i % 90}\n" for i in range(20_000))
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + rows)
    exported = tmp_path / "out" / "replayed.csv"
    limit = 64 * 1024

    def file_size_limit() -> None:  # Python ignores SIGXFSZ: a write past it is EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "reconciler.cli", *SIMULATE, "--trace", str(trace)]
    done = subprocess.run(
        [*command, "--export-workload", str(exported)],
        capture_output=True,
        text=True,
        preexec_fn=file_size_limit,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 1, done.stderr
    assert f"error: --export-workload {exported}: cannot write: File too large" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(exported.parent.iterdir()) == []  # neither the file nor a temporary one


def test_every_writer_creates_the_missing_parent_directories(tmp_path: Path) -> None:
    """``checked_output`` lets a path with missing parents through, promising they are
    created: ``writing`` (every command's writer: plan --out, simulate --json, --plot,
    schema --out, ...) creates them, so plan --out no longer failed after its cycle."""
    from reconciler.commands._options import checked_output, writing

    target = tmp_path / "missing" / "dirs" / "plan.json"
    assert checked_output(target, "--out") == target
    with writing(target, "--out"):
        target.write_text("{}")
    assert target.read_text() == "{}"

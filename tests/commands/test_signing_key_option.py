"""``--signing-key-file``: only where a saved plan is written or applied, and a key
file that cannot serve is a usage error naming it, before any cycle runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconciler.cli import app

runner = CliRunner()


def _key(tmp_path: Path, content: str = "k" * 40) -> str:
    path = tmp_path / "plan.key"
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["plan", "--simulate"], "only a saved plan is signed: add --out PLAN"),
        (["plan", "--base", "HEAD~1"], "only a saved plan is signed: add --out PLAN"),
        (["apply", "--simulate"], "only a saved plan carries a signature: add PLAN"),
    ],
)
def test_a_key_where_no_saved_plan_is_written_or_applied_is_a_usage_error(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    result = runner.invoke(app, [*args, "--signing-key-file", _key(tmp_path)], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_a_short_or_missing_key_file_is_a_usage_error_naming_it(
    tmp_path: Path, command: str
) -> None:
    short = _key(tmp_path, "too-short\n")
    plan = ["--out", str(tmp_path / "p.json")] if command == "plan" else [str(tmp_path / "p.json")]
    for key_file, reason in ((short, "holds 9 bytes"), (str(tmp_path / "nope"), "cannot be read")):
        result = runner.invoke(
            app,
            [command, "--simulate", *plan, "--signing-key-file", key_file],
            terminal_width=300,
        )
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert key_file in text and reason in text
        assert not (tmp_path / "p.json").exists()


def test_plan_signs_with_one_key_only(tmp_path: Path) -> None:
    first, second = _key(tmp_path), str(tmp_path / "second.key")
    Path(second).write_text("s" * 40)
    result = runner.invoke(
        app,
        [
            *("plan", "--simulate", "--out", str(tmp_path / "p.json")),
            *("--signing-key-file", first, "--signing-key-file", second),
        ],
        terminal_width=200,
    )
    assert result.exit_code == 2, result.output
    assert "a plan is signed with one key" in " ".join(result.output.split())

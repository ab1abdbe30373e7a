"""The pull-request review (``plan --base``) plans both revisions on the simulated
fleet: the options of a live cycle it does not read are refused, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconciler.cli import app

REPO = Path(__file__).resolve().parents[2]


def _text(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize(
    "options",
    [
        ["--cluster", "nosuch"],
        ["--cluster", "prod-east"],
        ["--kubeconfig", "/nonexistent/kubeconfig"],
        ["--force"],
        ["--prune-removed-services"],
        ["--diff-mode", "server"],
        ["--drain-window", "5"],
        ["--prometheus-url", "http://127.0.0.1:1"],
        ["--cluster-prometheus-url", "prod-east=http://127.0.0.1:1"],
        ["--prometheus-timeout", "2"],
        ["--rev", "HEAD"],
    ],
)
def test_an_option_the_review_does_not_read_is_a_usage_error(options: list[str]) -> None:
    result = CliRunner().invoke(
        app,
        ["plan", "--repo", str(REPO), "--base", "HEAD~1", "--no-what-if", *options],
        terminal_width=200,
    )
    assert result.exit_code == 2, result.output
    text = _text(result.output)
    assert f"Invalid value for {options[0]}:" in text and "does not read it" in text, text


def test_every_unread_option_is_named_at_once() -> None:
    result = CliRunner().invoke(
        app,
        ["plan", "--head", "HEAD", "--no-what-if", "--force", "--kubeconfig", "k", "--seed", "3"],
        terminal_width=200,
    )
    assert result.exit_code == 2, result.output
    assert "Invalid value for --kubeconfig, --force:" in _text(result.output)


def test_an_unread_option_set_in_the_environment_is_said_to_be_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HETEROSCALE_PROMETHEUS_URL", "http://127.0.0.1:1")
    # --trace that does not exist: refused right after the options are checked.
    result = CliRunner().invoke(
        app, ["plan", "--base", "HEAD~1", "--trace", "/nonexistent/trace.csv"], terminal_width=200
    )
    assert result.exit_code == 2, result.output
    text = _text(result.output)
    assert "note: $HETEROSCALE_PROMETHEUS_URL set; the review plans on the simulated fleet" in text
    assert "--trace /nonexistent/trace.csv: no such file" in text

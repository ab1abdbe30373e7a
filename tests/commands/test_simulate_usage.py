"""``simulate --policies`` and ``--engine-speed`` are checked before any load is built
(a trace's millions of requests), and ``validate --rate-scale`` needs a trace."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconciler.cli import app

REPO = Path(__file__).resolve().parents[2]


def _text(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the load fails the test: a usage error must come first."""
    from reconciler.sim import load

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("the load was built before the options were checked")

    monkeypatch.setattr(load, "load_with_requests", built)


@pytest.mark.parametrize(
    ("policies", "problem"),
    [
        ("nosuch", "unknown autoscaler 'nosuch'"),
        ("static-peak,nosuch", "unknown autoscaler 'nosuch'"),
        ("static:0+0", "expected static:PREFILL+DECODE"),
        ("static:-1+5", "expected static:PREFILL+DECODE"),
        ("static:1.5+2", "expected static:PREFILL+DECODE"),
        ("schedule:/nonexistent/schedule.csv", "/nonexistent/schedule.csv"),
        ("python:no_class", "expected python:MODULE:CLASS"),
        ("heteroscale,static-peak,heteroscale", "names heteroscale more than once"),
    ],
)
@pytest.mark.usefixtures("no_load")
def test_a_policy_that_cannot_run_is_a_usage_error_before_any_work(
    policies: str, problem: str
) -> None:
    result = CliRunner().invoke(
        app, ["simulate", "--repo", str(REPO), "--policies", policies], terminal_width=200
    )
    assert result.exit_code == 2, result.output
    text = _text(result.output)
    assert "--policies" in text and problem in text, text


@pytest.mark.parametrize("speed", ["prefill=1,prefill=2", "decode=0.5,decode=0.5"])
@pytest.mark.usefixtures("no_load")
def test_a_role_given_twice_to_engine_speed_is_refused(speed: str) -> None:
    result = CliRunner().invoke(
        app,
        ["simulate", "--repo", str(REPO), "--policies", "static-peak", "--engine-speed", speed],
        terminal_width=200,
    )
    assert result.exit_code == 2, result.output
    assert "--engine-speed" in result.output and "at most once" in _text(result.output)


def test_validate_refuses_a_rate_scale_without_a_trace() -> None:
    result = CliRunner().invoke(app, ["validate", str(REPO), "--rate-scale", "2"])
    assert result.exit_code == 2, result.output
    text = _text(result.output)
    assert "--rate-scale" in text and "add --trace" in text, text

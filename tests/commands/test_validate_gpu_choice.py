"""`heteroscale validate` warns (exit 0) where a role asks to rank its GPU types by
cost but will be ranked by its weights: no request_shape, or an unpriced cluster."""

from __future__ import annotations

from pathlib import Path

from repo_edits import edit, line_of
from typer.testing import CliRunner

from reconciler.cli import app

runner = CliRunner()


def test_the_example_repository_raises_no_gpu_choice_warning(repo_root: Path) -> None:
    result = runner.invoke(app, ["validate", str(repo_root)])
    assert result.exit_code == 0, result.output
    assert "ranks" not in result.stderr


def test_cost_ranking_without_a_request_shape_or_prices_is_warned(example_repo: Path) -> None:
    edit(
        example_repo / "policies/svc-a.yaml",
        "request_shape: {prompt_tokens: 3000, output_tokens: 350}\n",
        "",
    )
    result = runner.invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "ranks" in line]
    policy = example_repo / "policies/svc-a.yaml"
    # gpu_choice is not written (cost is the default): each is located at its role.
    assert lines == [
        f"warning: policies/svc-a.yaml:{line_of(policy, 'prefill:')}:1: prefill.gpu_choice: "
        "prefill ranks h800, h20 by cost, but the policy declares no request_shape to price "
        "them at: they are ranked by their weights",
        f"warning: policies/svc-a.yaml:{line_of(policy, 'decode:')}:1: decode.gpu_choice: "
        "decode ranks h20, h800 by cost, but the policy declares no request_shape to price "
        "them at: they are ranked by their weights",
    ]
    cluster = example_repo / "clusters/prod-east.yaml"
    for price in ("2.50", "1.00", "0.70"):
        edit(cluster, f"    cost_per_hour: {price}\n", "")
    result = runner.invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 0, result.output
    unpriced = [line for line in result.stderr.splitlines() if "no cost_per_hour" in line]
    # svc-a (no request_shape) says so first; svc-b's decode allows h20 and h800.
    assert any(
        line.startswith("warning: policies/svc-b.yaml:")
        and "decode.gpu_choice: decode ranks h20, h800 by cost" in line
        for line in unpriced
    )

"""`heteroscale validate` warns (exit 0), at the file, line and field, for every query
override that selects no service: it reads every ``service`` value Prometheus holds."""

from __future__ import annotations

from pathlib import Path

from repo_edits import line_of
from typer.testing import CliRunner

from reconciler.cli import app

runner = CliRunner()


def _add_overrides(policy: Path, queries: dict[str, str]) -> None:
    lines = "".join(f"    {signal}: '{query}'\n" for signal, query in queries.items())
    policy.write_text(policy.read_text() + "metrics:\n  queries:\n" + lines)


def test_the_example_repository_raises_no_override_warning(repo_root: Path) -> None:
    result = runner.invoke(app, ["validate", str(repo_root)])
    assert result.exit_code == 0, result.output
    assert "selects no service" not in result.stderr


def test_an_override_that_selects_no_service_is_warned_where_it_is_written(
    example_repo: Path,
) -> None:
    policy = example_repo / "policies/chat.yaml"
    _add_overrides(
        policy,
        {
            "decode_tps": "sum by (service, role) (rate(tok_total[$__window]))",
            "ttft": 'histogram_quantile($__quantile, sum by (service, role, le) (rate(t_bucket{service=~"$__services"}[$__window]))) * 1000',
        },
    )
    result = runner.invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "selects no service" in line]
    line = line_of(policy, "decode_tps: 'sum")
    assert warned == [
        f"warning: {policy.relative_to(example_repo)}:{line}:5: metrics.queries.decode_tps: "
        "selects no service: it reads every 'service' value Prometheus holds, and when other "
        "series make its answer too large the service holds; restrict it with "
        '{service=~"$__services"}'
    ]

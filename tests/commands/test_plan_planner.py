"""`heteroscale plan` with the default planner on the embedded default (the simulated
fleet): every decision's message, with the capacity the planner derived and the
requests it leaves unattainable, reaches the text and markdown reports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconciler.cli import app

SERVICES = ("chat", "summarize", "svc-a", "svc-b")
CAPACITY = re.compile(
    r"capacity from the model for prompts ~\d+ / outputs ~\d+ tokens: prefill \d+ prompt "
    r"tokens/s per \w+ instance .*decode \d+ output tokens/s per \w+ instance"
)
UNATTAINABLE = re.compile(
    r"(\d+\.\d\d)% of requests unattainable \(prompts > (\d+) tokens miss TTFT even on an "
    r"idle instance\)"
)


@pytest.fixture(autouse=True)
def no_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.kube/config


@pytest.fixture
def tight_ttft_repo(example_repo: Path) -> Path:
    """The repository's desired state with summarize's TTFT SLO cut from 3,000 to
    2,000 ms: a few percent of its (synthetic, log-normal) prompts are then too long
    for any instance, so the planner has an unattainable share to report."""
    policy = example_repo / "policies" / "summarize.yaml"
    text = policy.read_text()
    assert "ttft_ms: 3000" in text
    policy.write_text(text.replace("ttft_ms: 3000", "ttft_ms: 2000", 1))
    return example_repo


def decision_rows(output: str, fmt: str) -> dict[str, str]:
    """Each service's decision line (text) or table row (markdown): the first line
    naming it (its cost line follows the decisions)."""
    rows: dict[str, str] = {}
    for line in output.splitlines():
        for service in SERVICES:
            if (fmt == "text" and line.startswith(f"    {service} ")) or (
                fmt == "markdown" and line.startswith(f"| {service} |")
            ):
                rows.setdefault(service, line)
    return rows


@pytest.mark.parametrize("fmt", ["text", "markdown"])
def test_plan_reports_the_planners_capacity_and_unattainable_share(
    tight_ttft_repo: Path, fmt: str
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "plan",
            "--repo",
            str(tight_ttft_repo),
            "--format",
            fmt,
        ],
    )
    assert result.exit_code in (0, 3), result.output
    rows = decision_rows(result.stdout, fmt)
    assert set(rows) == set(SERVICES), result.stdout
    for service, row in rows.items():
        assert CAPACITY.search(row), f"{service}: {row}"
    found = UNATTAINABLE.search(rows["summarize"])
    assert found is not None, rows["summarize"]
    share_pct, above_tokens = float(found[1]), int(found[2])
    assert 1.0 < share_pct < 50.0
    # An 8 B model on a TP2 L20 prefills a few thousand tokens within 2 s, not 100,000.
    assert 2_000 < above_tokens < 100_000
    if fmt == "markdown":
        assert rows["summarize"].endswith(" |")


@pytest.mark.parametrize("review", [[], ["--base", "HEAD~1"]], ids=["plan", "review"])
def test_plan_rejects_an_unknown_autoscaler_as_a_usage_error(review: list[str]) -> None:
    result = CliRunner().invoke(app, ["plan", *review, "--autoscaler", "heteroscale-papr"])
    assert result.exit_code == 2, result.output
    assert "heteroscale-paper" in result.output  # the known names are listed

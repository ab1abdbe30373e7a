"""The cost lines of the `plan`/`apply` report: cost per hour per service, now and
planned, and the cluster's total, in the cluster's currency; unknown (never 0) where a
GPU type has no price, with the report naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconciler.apply import cyclereport
from reconciler.cli import app
from reconciler.cost import GpuPrices
from reconciler.loop import ClusterOutcome, CycleResult
from reconciler.placement.base import PlacementResult
from reconciler.plan import Plan
from reconciler.policy.base import Decision
from reconciler.state import DeploymentGroup, FleetState, GroupRole

SIZES = {("chat", "prefill"): 4, ("chat", "decode"): 2, ("rag", "prefill"): 1, ("rag", "decode"): 1}


def _group(service: str, prefill: GroupRole, decode: GroupRole) -> DeploymentGroup:
    return DeploymentGroup(service, "c", "g1", "pod-a", None, prefill, decode)


def _result(prices: GpuPrices | None) -> CycleResult:
    now = (
        _group("chat", GroupRole("h800", 2), GroupRole("h20", 3)),
        _group("rag", GroupRole("l20", 1), GroupRole("h20", 1)),
        # A service without a policy any more (kept: prune is off), sized as observed.
        _group("old", GroupRole("h20", 0), GroupRole("h20", 2, gpus_per_instance=8)),
    )
    planned = (
        _group("chat", GroupRole("h800", 2), GroupRole("h20", 4)),
        _group("rag", GroupRole("l20", 1), GroupRole("h20", 1)),
        now[2],
    )
    decisions = {
        "chat": Decision("chat", 2, 4, "scale_out", "more decode"),
        "rag": Decision("rag", 1, 1, "within_tolerance", "hold"),
    }
    plan = Plan(
        "c",
        decisions,
        PlacementResult("c", planned),
        (),
        FleetState("c", now),
        prices=prices,
        gpus_per_instance=SIZES,  # type: ignore[arg-type]
    )
    return CycleResult(clusters=[ClusterOutcome(cluster="c", plan=plan)], source_label="t")


ALL_PRICED = GpuPrices("USD", {"h800": 2.5, "h20": 1.0, "l20": 0.7})
# chat: 2 x 4 GPUs x 2.50 + 3 (then 4) x 2 x 1.00 = 26 -> 28; rag: 0.70 + 1.00;
# old: 2 x 8 x 1.00 = 16.
CHAT_NOW, CHAT_PLANNED, RAG, OLD = 26.0, 28.0, 1.7, 16.0


def test_the_text_report_gives_each_services_cost_per_hour_and_the_clusters_total() -> None:
    text = cyclereport.format_text(_result(ALL_PRICED), title="t")
    lines = text.splitlines()
    start = lines.index("  cost per hour (USD), now -> planned:")
    assert [" ".join(line.split()) for line in lines[start + 1 : start + 4]] == [
        "chat 26.00 -> 28.00 +2.00",
        "rag 1.70 -> 1.70 +0.00",
        f"cluster total {CHAT_NOW + RAG + OLD:.2f} -> {CHAT_PLANNED + RAG + OLD:.2f} +2.00",
    ]
    assert "unknown" not in text


def test_the_markdown_report_has_a_cost_table() -> None:
    text = cyclereport.format_markdown(_result(ALL_PRICED), title="t")
    assert "| cost per hour (USD) | now | planned | change |" in text
    assert "| chat | 26.00 | 28.00 | +2.00 |" in text
    assert "| cluster total | 43.70 | 45.70 | +2.00 |" in text


def test_the_json_report_carries_cost_per_hour_with_its_currency() -> None:
    cost = cyclereport.to_json(_result(ALL_PRICED))["clusters"][0]["cost_per_hour"]
    assert cost == {
        "currency": "USD",
        "services": {
            "chat": {"current": CHAT_NOW, "planned": CHAT_PLANNED, "delta": 2.0},
            "rag": {"current": RAG, "planned": RAG, "delta": 0.0},
        },
        "total": {
            "current": CHAT_NOW + RAG + OLD,
            "planned": CHAT_PLANNED + RAG + OLD,
            "delta": 2.0,
        },
        "unpriced_gpu_types": [],
    }


def test_a_type_without_a_price_is_unknown_not_zero_and_named() -> None:
    result = _result(GpuPrices("EUR", {"h800": 2.5, "h20": 1.0}))  # l20 unpriced
    text = cyclereport.format_text(result, title="t")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert "cost per hour (EUR), now -> planned:" in lines
    assert "chat 26.00 -> 28.00 +2.00" in lines  # chat runs on priced types only
    assert "rag unknown -> unknown unknown" in lines
    assert "cluster total unknown -> unknown unknown" in lines
    assert "unknown: no price for l20 (cost_per_hour in the cluster file)" in lines
    markdown = cyclereport.format_markdown(result, title="t")
    assert "| rag | unknown | unknown | unknown |" in markdown
    assert "Cost unknown: no price for l20 (`cost_per_hour` in the cluster file)." in markdown
    cost = cyclereport.to_json(result)["clusters"][0]["cost_per_hour"]
    assert cost["currency"] == "EUR"
    assert cost["services"]["rag"] == {"current": None, "planned": None, "delta": None}
    assert cost["total"]["current"] is None
    assert cost["unpriced_gpu_types"] == ["l20"]


def test_a_plan_without_prices_reports_no_cost() -> None:
    result = _result(None)
    assert "cost per hour" not in cyclereport.format_text(result, title="t")
    assert "cost per hour" not in cyclereport.format_markdown(result, title="t")
    assert "cost_per_hour" not in cyclereport.to_json(result)["clusters"][0]


@pytest.fixture
def no_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config


@pytest.mark.usefixtures("no_kubeconfig")
def test_plan_on_the_examples_prices_every_service_and_the_total_adds_up(
    repo_root: Path,
) -> None:
    result = CliRunner().invoke(app, ["plan", "--repo", str(repo_root), "--format", "json"])
    assert result.exit_code in (0, 3), result.output
    (cluster,) = json.loads(result.stdout)["clusters"]
    cost = cluster["cost_per_hour"]
    assert cost["currency"] == "USD" and cost["unpriced_gpu_types"] == []
    assert set(cost["services"]) == set(cluster["decisions"])
    for side in ("current", "planned"):
        services = sum(figures[side] for figures in cost["services"].values())
        assert cost["total"][side] == pytest.approx(services, abs=1e-3)
        assert cost["total"][side] > 0

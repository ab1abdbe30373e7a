"""`apply PLAN` against a cluster it cannot reach says which cluster and why, exit 1,
nothing applied: as `plan` and `status` report an unreachable cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconciler.apply.savedplan import (
    Observed,
    PlanSource,
    SavedCluster,
    SavedPlan,
    WriteStep,
    write_plan,
)
from reconciler.cli import app

runner = CliRunner()

KUBECONFIG_WITHOUT_PROD_EAST = """\
apiVersion: v1
kind: Config
clusters: [{name: other, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: other, user: {token: x}}]
contexts: [{name: other, context: {cluster: other, user: other}}]
current-context: other
"""
KUBECONFIG_UNREACHABLE = KUBECONFIG_WITHOUT_PROD_EAST.replace("other", "prod-east")


def _saved_plan(path: Path) -> Path:
    plan = SavedPlan(
        source=PlanSource("directory", "0" * 64),
        clusters=(SavedCluster("prod-east", Observed({}, {}, {}), ()),),
        created_at="2026-01-01T00:00:00Z",
    )
    write_plan(plan, path)
    return path


@pytest.mark.parametrize(
    "kubeconfig", [KUBECONFIG_WITHOUT_PROD_EAST, KUBECONFIG_UNREACHABLE], ids=["no context", "down"]
)
def test_an_unreachable_cluster_is_named_and_nothing_applied(
    kubeconfig: str, tmp_path: Path
) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig)
    plan = _saved_plan(tmp_path / "plan.json")
    result = runner.invoke(app, ["apply", str(plan), "--kubeconfig", str(config)])
    assert result.exit_code == 1, result.output
    assert "error: cluster prod-east: ClusterUnavailable" in result.output
    assert "nothing applied" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_write_outside_the_desired_states_namespaces_is_refused_before_any_cluster_is_asked(
    tmp_path: Path, repo_root: Path
) -> None:
    """The digest is a checksum anyone can recompute: a plan deleting a Pod in
    kube-system is refused by what the desired state deploys, with the cluster never
    contacted (its kubeconfig points at nothing)."""
    config = tmp_path / "kubeconfig"
    config.write_text(KUBECONFIG_UNREACHABLE)
    plan = SavedPlan(
        source=PlanSource("directory", "0" * 64),
        clusters=(
            SavedCluster(
                "prod-east",
                Observed({}, {"kube-system/coredns": "1"}, {}),
                (WriteStep("delete_pod", "kube-system", "coredns", "1"),),
            ),
        ),
        created_at="2026-01-01T00:00:00Z",
    )
    write_plan(plan, tmp_path / "plan.json")
    result = runner.invoke(
        app,
        [
            "apply",
            str(tmp_path / "plan.json"),
            "--kubeconfig",
            str(config),
            "--repo",
            str(repo_root),
        ],
    )
    assert result.exit_code == 1, result.output
    assert "writes outside what the desired state manages" in result.output
    assert "namespace kube-system is not one the desired state deploys to" in result.output
    assert "ClusterUnavailable" not in result.output


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--lease-namespace", "../../x"),
        ("--lease-namespace", "Kube_System"),
        ("--lease-name", "a/b"),
    ],
)
def test_a_lease_namespace_or_name_kubernetes_would_refuse_is_a_usage_error(
    option: str, value: str, tmp_path: Path
) -> None:
    plan = _saved_plan(tmp_path / "plan.json")
    result = runner.invoke(app, ["apply", str(plan), option, value])
    assert result.exit_code == 2, result.output
    assert "not a Kubernetes" in result.output

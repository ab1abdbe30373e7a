"""`heteroscale plan`, `apply` and `run` end to end against the real API server: the
plan's report is what apply then does, and a second plan finds nothing to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubetestkit import (
    ControlPlane,
    cluster_for_cli,
    create_nodes,
    ensure_namespace,
    list_deployments,
    make_desired_state,
    wait_for,
)
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.desired import load_desired_state

pytestmark = pytest.mark.kubernetes


def test_plan_then_apply_then_nothing_left_to_do(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    name = "cli-e2e"
    _state, common = cluster_for_cli(control_plane, tmp_path, name)
    client = control_plane.client()
    runner = CliRunner()

    # No Prometheus configured: every service holds, which from nothing means its floor.
    planned = runner.invoke(app, ["plan", *common, "--format", "json"])
    assert planned.exit_code == 3, planned.output
    report = json.loads(planned.stdout)
    (cluster,) = report["clusters"]
    assert cluster["cluster"] == name and cluster["objects"]["mode"] == "server-dry-run"
    promised = sorted(
        (o["key"], o["action"], o["replicas_after"]) for o in cluster["objects"]["objects"]
    )
    assert promised and {a for _, a, _ in promised} == {"create"}
    assert list_deployments(client, name) == {}, "plan changes nothing"

    applied = runner.invoke(app, ["apply", *common, "--format", "json"])
    assert applied.exit_code == 0, applied.output
    done = sorted(
        (o["key"], o["action"], o["replicas_after"])
        for o in json.loads(applied.stdout)["clusters"][0]["objects"]["objects"]
    )
    assert done == promised, "apply did exactly what plan printed"
    live = {f"{name}/{n}": d["spec"]["replicas"] for n, d in list_deployments(client, name).items()}
    assert live == {key: replicas for key, _, replicas in promised}

    # Once the scheduler has placed the Pods, a second plan has nothing to do.
    wait_for(
        lambda: all(
            p["spec"].get("nodeName") for p in client.list(f"/api/v1/namespaces/{name}/pods")
        ),
        what="scheduled pods",
    )
    again = runner.invoke(app, ["plan", *common])
    assert again.exit_code == 0, again.output
    assert "No changes" in again.output

    # The loop: two cycles, JSON logs, nothing to change.
    ran = runner.invoke(
        app,
        [
            "run",
            *common,
            "--cycles",
            "2",
            "--interval",
            "0.2",
            "--listen",
            "127.0.0.1:0",
            "--no-leader-elect",
            "--log-format",
            "json",
        ],
    )
    assert ran.exit_code == 0, ran.output


def test_each_cluster_uses_its_own_context_and_an_unreachable_one_is_skipped(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    make_desired_state(tmp_path, "ctx-up", services=("up",))
    make_desired_state(tmp_path, "ctx-down", services=("down",))
    for name, context in (("ctx-up", "up"), ("ctx-down", "down")):
        path = tmp_path / "clusters" / f"{name}.yaml"
        path.write_text(path.read_text() + f"kube_context: {context}\n")
    client = control_plane.client()
    ensure_namespace(client, "ctx-up")
    create_nodes(client, load_desired_state(tmp_path).clusters["ctx-up"])
    # Two contexts: one to the test API server, one to a port nothing listens on.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""\
apiVersion: v1
kind: Config
clusters:
- {{name: up, cluster: {{server: "{client.server}", certificate-authority: "{control_plane.ca_file}"}}}}
- {{name: down, cluster: {{server: "https://127.0.0.1:9", certificate-authority: "{control_plane.ca_file}"}}}}
users: [{{name: admin, user: {{token: test-token}}}}]
contexts:
- {{name: up, context: {{cluster: up, user: admin}}}}
- {{name: down, context: {{cluster: down, user: admin}}}}
current-context: down
""")
    result = CliRunner().invoke(
        app,
        [
            "plan",
            "--repo",
            str(tmp_path),
            "--kubeconfig",
            str(kubeconfig),
            "--placer",
            "greedy",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 1, "a failed cluster makes the run an error"
    clusters = {c["cluster"]: c for c in json.loads(result.stdout)["clusters"]}
    assert (
        clusters["ctx-down"]["outcome"] == "error"
        and "127.0.0.1:9" in clusters["ctx-down"]["error"]
    )
    assert clusters["ctx-up"]["outcome"] == "ok" and clusters["ctx-up"]["has_changes"]
    assert clusters["ctx-up"]["objects"]["mode"] == "server-dry-run"

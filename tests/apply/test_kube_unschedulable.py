"""Against the real API server: a cluster file whose topology label key no Node
carries (a typo) must not roll the Deployments onto Pods no Node can run. apply
refuses those writes, names the label, exits 1, and every Deployment keeps the pod
template it runs (the Deployment controller would otherwise stop a quarter of each
service's Pods for replacements that stay Pending)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubetestkit import (
    ControlPlane,
    create_nodes,
    ensure_namespace,
    list_deployments,
    make_desired_state,
)
from typer.testing import CliRunner

from reconciler.cli import app

pytestmark = [pytest.mark.kubernetes, pytest.mark.fault]


def test_a_label_key_no_node_has_refuses_the_rollout_and_changes_nothing(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    name = "unsched"
    state = make_desired_state(tmp_path, name)
    client = control_plane.client()
    ensure_namespace(client, name)
    create_nodes(client, state.clusters[name])
    common = ["--repo", str(tmp_path), "--kubeconfig", str(control_plane.kubeconfig)]
    common += ["--placer", "greedy"]
    first = CliRunner().invoke(app, ["apply", *common])
    assert first.exit_code == 0, first.output
    before = {n: d["spec"] for n, d in list_deployments(client, name).items()}
    assert before

    cluster_file = tmp_path / "clusters" / f"{name}.yaml"
    s2_key = state.clusters[name].labels.s2
    cluster_file.write_text(cluster_file.read_text().replace(f"s2: {s2_key},", f"s2: {s2_key}x,"))
    refused = CliRunner().invoke(app, ["apply", *common], terminal_width=400)
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1, refused.output
    assert f"no node has a label '{s2_key}x'" in text
    assert {n: d["spec"] for n, d in list_deployments(client, name).items()} == before

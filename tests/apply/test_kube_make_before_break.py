"""Against the real API server: a service whose policy moves it to another namespace
is made before it is broken. The first cycle creates its Deployments in the new
namespace and keeps the old ones serving (plan and apply say so, and exit 0); only
once the new Deployments' Pods are ready does a later cycle prune the old ones, live
or through a saved plan (whose writes in the namespace moved away from are in scope:
they remove what the move left behind)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubetestkit import (
    ControlPlane,
    cluster_for_cli,
    ensure_namespace,
    list_deployments,
    list_pods,
    mark_ready,
    wait_for,
)
from typer.testing import CliRunner

from reconciler.cli import app

pytestmark = [pytest.mark.kubernetes]


def _run(*args: str, exit_code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args), terminal_width=400)
    assert result.exit_code == exit_code, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("pruned_by", ["apply", "saved plan"])
def test_a_namespace_move_keeps_the_old_deployments_until_the_new_ones_are_ready(
    control_plane: ControlPlane, tmp_path: Path, pruned_by: str
) -> None:
    name = "mbb" if pruned_by == "apply" else "mbb-saved"
    moved = f"{name}-v2"
    _state, options = cluster_for_cli(control_plane, tmp_path, name)
    client = control_plane.client()
    _run("apply", *options)
    old = {n: d["spec"] for n, d in list_deployments(client, name).items()}
    assert old

    policy = tmp_path / "policies" / "svc.yaml"
    policy.write_text(policy.read_text().replace(f"namespace: {name}", f"namespace: {moved}"))
    ensure_namespace(client, moved)

    # First cycle: the new Deployments are created, the old ones kept as they run
    # (plan exits 3: it found changes, the creates; a hold is not an error).
    for command, exit_code in (("plan", 3), ("apply", 0)):
        text = _run(command, *options, exit_code=exit_code)
        for deployment in old:
            assert f"= keep Deployment {name}/{deployment} " in text, text
        assert f"kept until {moved}/" in text and "is ready (0 of 1 ready)" in text, text
    assert set(list_deployments(client, moved)) == set(old)
    assert {n: d["spec"] for n, d in list_deployments(client, name).items()} == old

    # Not ready yet: kept again, and said so again; a hold alone is no change.
    for command in ("plan", "apply"):
        text = _run(command, *options)
        assert f"kept until {moved}/" in text and "is ready (0 of 1 ready)" in text, text
    assert {n: d["spec"] for n, d in list_deployments(client, name).items()} == old

    pods = wait_for(
        lambda: (p := list_pods(client, moved)) and len(p) == len(old) and p,
        what="the new Deployments' Pods",
    )
    for pod in pods:
        mark_ready(client, moved, pod)
    wait_for(
        lambda: all(
            d.get("status", {}).get("readyReplicas") == d["spec"]["replicas"]
            for d in list_deployments(client, moved).values()
        ),
        what="the new Deployments ready",
    )

    # Ready: the next cycle prunes the old Deployments, as before.
    if pruned_by == "apply":
        text = _run("apply", *options)
    else:
        plan_file = tmp_path / "plan.json"
        text = _run("plan", *options, "--out", str(plan_file), exit_code=3)
        assert list_deployments(client, name), "plan --out changes nothing"
        _run("apply", str(plan_file), *options)
    assert "kept until" not in text, text
    for deployment in old:
        assert f"- delete Deployment {name}/{deployment} " in text, text
    wait_for(lambda: not list_deployments(client, name), what="the old Deployments pruned")
    assert set(list_deployments(client, moved)) == set(old)

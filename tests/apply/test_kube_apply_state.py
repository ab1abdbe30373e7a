"""`heteroscale apply` records what it applied in the durable state ConfigMap
(``heteroscale-state-<cluster>`` next to the Lease), on the real API server: the
revision and plan, so `heteroscale status` names them; the windows stored by a
`run` leader are kept (a read-modify-write at the resourceVersion read); and while
another holder's Lease is live the ConfigMap is not touched at all."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
from kubetestkit import (
    ControlPlane,
    commit_all,
    create_nodes,
    ensure_namespace,
    git,
    make_desired_state,
)
from typer.testing import CliRunner, Result

from reconciler.apply.kubeclient import KubeClient, NotFound, leases_path
from reconciler.apply.lease import format_micro_time
from reconciler.apply.statestore import ConfigMapStateStore, configmap_name, configmaps_path
from reconciler.cli import app
from reconciler.desired import load_desired_state
from reconciler.durable import AppliedPlan, DurableState, Revision, decode
from reconciler.policy.base import PolicyHistory, Recommendation

pytestmark = pytest.mark.kubernetes
HOME = "apply-state-home"
LEASE = "heteroscale-reconciler"


def _setup(plane: ControlPlane, repo: Path, cluster: str) -> tuple[KubeClient, str]:
    """A Git repository with one valid commit on main, the cluster's Nodes, no Lease
    and no state object; returns the client and the commit."""
    state = make_desired_state(repo, cluster)
    git(repo, "init", "-q", "-b", "main")
    commit = commit_all(repo, "first")
    client = plane.client()
    ensure_namespace(client, cluster)
    ensure_namespace(client, HOME)
    create_nodes(client, state.clusters[cluster])
    for path in (configmaps_path(HOME, configmap_name(cluster)), leases_path(HOME, LEASE)):
        with contextlib.suppress(NotFound):
            client.delete(path)
    return client, commit


def _args(plane: ControlPlane, repo: Path, cluster: str) -> list[str]:
    return [
        "--repo",
        str(repo),
        "--rev",
        "main",
        "--kubeconfig",
        str(plane.kubeconfig),
        "--placer",
        "greedy",
        "--cluster",
        cluster,
        "--lease-namespace",
        HOME,
    ]


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _stored(client: KubeClient, cluster: str) -> tuple[DurableState, str]:
    """The stored state and the object's resourceVersion."""
    obj = client.get(configmaps_path(HOME, configmap_name(cluster)))
    return decode(obj["data"]["state.json"]), obj["metadata"]["resourceVersion"]


def _hold_lease(client: KubeClient, holder: str, renewed_s: float) -> None:
    body = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LEASE, "namespace": HOME},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "renewTime": format_micro_time(renewed_s),
        },
    }
    try:
        current = client.get(leases_path(HOME, LEASE))
    except NotFound:
        client.request("POST", leases_path(HOME), body=body)
        return
    current["spec"] = body["spec"]
    client.request("PUT", leases_path(HOME, LEASE), body=current)


def _leaders_windows(cluster: str, commit: str) -> DurableState:
    """What a `run` leader stores: a scale-in window, a cooldown, its own plan (within
    the last hour: older entries are trimmed on every write)."""
    now = float(round(time.time()))
    history = PolicyHistory(
        recommendations=(Recommendation(now - 60, 2, 8), Recommendation(now - 30, 2, 6)),
        last_change_at_s=now - 30,
        dynamic_ratio=0.4,
    )
    return DurableState(
        cluster,
        now,
        "replica-a",
        Revision("git", commit, "main"),
        {"svc": history},
        AppliedPlan("sha256:leaders-plan", commit, now - 30),
    )


def test_apply_records_the_revision_for_status_and_keeps_a_leaders_windows(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    cluster = "apply-rec"
    repo = tmp_path / "repo"
    client, first = _setup(control_plane, repo, cluster)
    args = _args(control_plane, repo, cluster)

    # No state object yet: status says so.
    before = json.loads(_invoke("status", *args, "--format", "json").stdout)
    assert before["clusters"][0]["revision"]["revision"] == "unknown"

    applied = _invoke("apply", *args, "--format", "json")
    assert applied.exit_code == 0, applied.output
    report = json.loads(applied.stdout)
    ((record),) = report["state"]
    assert record["cluster"] == cluster and record["recorded"], record
    assert f"recorded revision main ({first[:12]})" in applied.stderr
    stored, _ = _stored(client, cluster)
    assert stored.revision is not None and stored.revision.id == first
    assert stored.last_plan is not None and stored.last_plan.revision == first
    assert stored.last_plan.id.startswith("sha256:") and stored.histories == {}
    assert stored.writer.startswith("heteroscale-apply@")

    status = json.loads(_invoke("status", *args, "--format", "json").stdout)
    revision = status["clusters"][0]["revision"]
    assert revision["revision"] == first and revision["label"] == f"main ({first[:12]})"
    assert revision["applied_at"]
    text = _invoke("status", *args).stdout
    assert f"revision {first[:19]} (main ({first[:12]})) applied" in text

    # A `run` leader wrote its windows since (and has stopped: no Lease). A new commit
    # is applied by hand: the revision moves, the windows and the cooldown stay.
    windows = _leaders_windows(cluster, first)
    assert ConfigMapStateStore(client, HOME, "replica-a").save(windows)
    template = repo / "templates" / "decode.yaml"
    template.write_text(template.read_text().replace("engine:decode", "engine:decode-v2"))
    second = commit_all(repo, "new image")
    again = _invoke("apply", *args)
    assert again.exit_code == 0, again.output
    assert f"recorded revision main ({second[:12]})" in again.stderr
    stored, _ = _stored(client, cluster)
    assert stored.revision is not None and stored.revision.id == second
    assert stored.last_plan is not None and stored.last_plan.revision == second
    assert stored.histories == windows.histories, "the leader's windows are kept"
    status = json.loads(_invoke("status", *args, "--format", "json").stdout)
    assert status["clusters"][0]["revision"]["revision"] == second


def test_apply_leaves_the_state_alone_while_a_run_leader_holds_the_lease(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    cluster = "apply-led"
    repo = tmp_path / "repo"
    client, commit = _setup(control_plane, repo, cluster)
    args = _args(control_plane, repo, cluster)
    windows = _leaders_windows(cluster, "0" * 40)
    assert ConfigMapStateStore(client, HOME, "replica-1").save(windows)
    _, version = _stored(client, cluster)
    _hold_lease(client, "replica-1", time.time())

    applied = _invoke("apply", *args, "--format", "json")
    assert applied.exit_code == 0, applied.output
    ((record),) = json.loads(applied.stdout)["state"]
    assert not record["recorded"]
    assert f"Lease {HOME}/{LEASE} is held by replica-1" in record["detail"]
    assert "left alone" in applied.stderr and "records its own cycles" in applied.stderr
    stored, after = _stored(client, cluster)
    assert after == version, "the ConfigMap was not written"
    assert stored == windows

    # The leader stopped renewing a lease duration (15 s) ago: nobody leads, record.
    _hold_lease(client, "replica-1", time.time() - 60)
    applied = _invoke("apply", *args)
    assert applied.exit_code == 0, applied.output
    assert "recorded revision" in applied.stderr
    stored, _ = _stored(client, cluster)
    assert stored.revision is not None and stored.revision.id == commit
    assert stored.histories == windows.histories


def test_a_hostile_lease_holder_is_cut_and_escaped_where_apply_names_it(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    # Anyone who may edit the Lease writes its holder: 10 KB with a screen-clearing
    # escape must neither flood apply's state line nor act on the terminal.
    cluster = "apply-hostile-holder"
    repo = tmp_path / "repo"
    client, _ = _setup(control_plane, repo, cluster)
    _hold_lease(client, "\x1b[2J" + "x" * 10_000, time.time())

    applied = _invoke("apply", *_args(control_plane, repo, cluster))
    assert applied.exit_code == 0, applied.output
    (line,) = [line for line in applied.stderr.splitlines() if "is held by" in line]
    assert "\x1b" not in line and "\\x1b[2J" in line
    # Cut at a Kubernetes name's 253 characters: the escape's 4, 248 x's and "…".
    assert "x" * 248 + "…" in line and "x" * 249 not in line


def test_apply_of_a_saved_plan_records_it(control_plane: ControlPlane, tmp_path: Path) -> None:
    cluster = "apply-saved"
    repo = tmp_path / "repo"
    client, commit = _setup(control_plane, repo, cluster)
    args = _args(control_plane, repo, cluster)
    plan_file = tmp_path / "plan.json"
    planned = _invoke("plan", *args[:-2], "--out", str(plan_file))  # no --lease-namespace
    assert planned.exit_code == 3, planned.output
    with pytest.raises(NotFound):
        client.get(configmaps_path(HOME, configmap_name(cluster)))  # plan records nothing

    applied = _invoke("apply", str(plan_file), *args, "--format", "json")
    assert applied.exit_code == 0, applied.output
    report = json.loads(applied.stdout)
    assert report["applied"] and report["state"][0]["recorded"], report
    stored, _ = _stored(client, cluster)
    assert stored.revision is not None and stored.revision.id == commit
    assert stored.last_plan is not None and stored.last_plan.revision == commit
    assert stored.last_plan.id.startswith("saved-plan:sha256:")
    status = json.loads(_invoke("status", *args, "--format", "json").stdout)
    assert status["clusters"][0]["revision"]["revision"] == commit


@pytest.mark.fault
def test_an_apply_whose_rollout_is_refused_keeps_the_previous_record(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """A commit that mistypes a topology label key: apply refuses every rollout (no
    Node could run the new Pods), exits 1 and changes nothing. The cluster still runs
    the first commit, so that stays the recorded revision `status` shows; apply says
    why it did not record (as a saved plan is recorded only where all its writes were
    made)."""
    cluster = "apply-refused"
    repo = tmp_path / "repo"
    client, first = _setup(control_plane, repo, cluster)
    args = _args(control_plane, repo, cluster)
    assert _invoke("apply", *args).exit_code == 0
    recorded, _ = _stored(client, cluster)
    assert recorded.revision is not None and recorded.revision.id == first

    cluster_file = repo / "clusters" / f"{cluster}.yaml"
    s2_key = load_desired_state(repo).clusters[cluster].labels.s2
    cluster_file.write_text(cluster_file.read_text().replace(f"s2: {s2_key},", f"s2: {s2_key}x,"))
    second = commit_all(repo, "a label key no node has")
    refused = _invoke("apply", *args, "--format", "json")
    assert refused.exit_code == 1, refused.output
    ((record),) = json.loads(refused.stdout)["state"]
    assert not record["recorded"] and "2 write(s) refused" in record["detail"], record
    assert "its previous record stands" in refused.stderr
    stored, _ = _stored(client, cluster)
    assert stored == recorded, f"{second[:12]} was refused; {first[:12]} stays recorded"
    status = json.loads(_invoke("status", *args, "--format", "json").stdout)
    assert status["clusters"][0]["revision"]["revision"] == first


@pytest.mark.fault
def test_a_write_between_read_and_write_is_read_again_not_overwritten(
    control_plane: ControlPlane,
) -> None:
    """``ConfigMapStateStore.update`` (what apply records with): a leader's write that
    lands between apply's read and its write makes the write fail its
    resourceVersion precondition; apply reads again and keeps the leader's windows."""
    client = control_plane.client()
    cluster = "apply-race"
    ensure_namespace(client, HOME)
    with contextlib.suppress(NotFound):
        client.delete(configmaps_path(HOME, configmap_name(cluster)))
    leader = ConfigMapStateStore(client, HOME, "replica-a")
    assert leader.save(DurableState(cluster, time.time(), "replica-a"))
    windows = _leaders_windows(cluster, "a" * 40)
    seen: list[DurableState | None] = []

    def change(stored: DurableState | None) -> DurableState:
        seen.append(stored)
        if len(seen) == 1:  # the leader writes its windows right after apply's read
            assert leader.save(windows)
        assert stored is not None
        plan = AppliedPlan("sha256:by-apply", "b" * 40, stored.saved_at_s)
        return DurableState(
            cluster, stored.saved_at_s, "apply", stored.revision, stored.histories, plan
        )

    applier = ConfigMapStateStore(control_plane.client(), HOME, "apply")
    assert applier.update(cluster, change)
    assert len(seen) == 2 and seen[1] == windows, "the conflict made it read again"
    stored, _ = _stored(client, cluster)
    assert stored.histories == windows.histories
    assert stored.last_plan == AppliedPlan("sha256:by-apply", "b" * 40, windows.saved_at_s)
    # Told it may not write (a leader appeared): nothing is written.
    applier.is_leader = lambda: False
    assert not applier.update(cluster, lambda stored: pytest.fail("not even read"))


def test_apply_without_the_reconcilers_namespace_applies_and_says_what_it_did_not_record(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    cluster = "apply-nohome"
    repo = tmp_path / "repo"
    _setup(control_plane, repo, cluster)
    args = [*_args(control_plane, repo, cluster)[:-1], "no-such-namespace"]
    applied = _invoke("apply", *args)
    assert applied.exit_code == 0, applied.output
    assert (
        "state: ConfigMap no-such-namespace/heteroscale-state-apply-nohome: not recorded: NotFound"
        in applied.stderr
    )

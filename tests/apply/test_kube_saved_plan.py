"""Saved plans against the real API server: `plan --out` then `apply PLAN` carries out
exactly the planned writes, and anything that moved between the two (a Deployment
scaled by someone else, before the check or between the check and the write; the
desired-state revision; the file itself) makes apply refuse, naming it."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from kubetestkit import (
    ControlPlane,
    create_nodes,
    ensure_namespace,
    list_deployments,
    make_desired_state,
    wait_for,
)
from typer.testing import CliRunner, Result

from reconciler.apply import names, savedplan
from reconciler.apply.kubeclient import KubeClient, nodes_path
from reconciler.cli import app
from reconciler.desired.loader import load_desired_state

pytestmark = pytest.mark.kubernetes


def _common(root: Path, plane: ControlPlane) -> list[str]:
    return ["--repo", str(root), "--kubeconfig", str(plane.kubeconfig), "--placer", "greedy"]


def _setup(plane: ControlPlane, root: Path, name: str) -> KubeClient:
    state = make_desired_state(root, name)
    client = plane.client()
    ensure_namespace(client, name)
    create_nodes(client, state.clusters[name])
    return client


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _specs(client: KubeClient, namespace: str) -> dict[str, Any]:
    return {n: d["spec"] for n, d in list_deployments(client, namespace).items()}


def _settled(client: KubeClient, namespace: str) -> None:
    """Wait until the controllers and the scheduler are done with our objects (their
    status writes move resourceVersions, which a saved plan counts as a change)."""

    def versions() -> tuple[Any, ...]:
        pods = client.list(f"/api/v1/namespaces/{namespace}/pods")
        deployments = list_deployments(client, namespace)
        return tuple(
            sorted((o["metadata"]["name"], o["metadata"]["resourceVersion"]) for o in pods)
        ) + tuple(sorted((n, d["metadata"]["resourceVersion"]) for n, d in deployments.items()))

    def still() -> bool:
        pods = client.list(f"/api/v1/namespaces/{namespace}/pods")
        if not all(p["spec"].get("nodeName") for p in pods):
            return False
        first = versions()
        time.sleep(1.0)
        return first == versions()

    wait_for(still, timeout_s=60, what="settled objects")


def _create_and_settle(plane: ControlPlane, root: Path, name: str) -> KubeClient:
    client = _setup(plane, root, name)
    assert _invoke("apply", *_common(root, plane)).exit_code == 0
    _settled(client, name)
    return client


def _planned(
    plane: ControlPlane, root: Path, name: str, *plan_options: str
) -> tuple[KubeClient, Path, list[str]]:
    """A cluster set up and planned with ``plan --out`` (and ``plan_options``): its
    client, the plan file and the options every command of the test takes."""
    client = _setup(plane, root, name)
    plan_file = root / "plan.json"
    common = _common(root, plane)
    planned = _invoke("plan", *common, "--out", str(plan_file), *plan_options)
    assert planned.exit_code == 3, planned.output
    return client, plan_file, common


def _change_image(root: Path) -> None:
    template = root / "templates" / "decode.yaml"
    template.write_text(template.read_text().replace("engine:decode", "engine:decode-v2"))


def test_apply_of_a_saved_plan_does_exactly_the_planned_writes_and_only_once(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    name = "saved-e2e"
    client = _setup(control_plane, tmp_path, name)
    plan_file = tmp_path / "plan.json"
    planned = _invoke("plan", *_common(tmp_path, control_plane), "--out", str(plan_file))
    assert planned.exit_code == 3, planned.output
    assert list_deployments(client, name) == {}, "plan --out changes nothing"
    data = json.loads(plan_file.read_text())
    assert data["schema_version"] == savedplan.SCHEMA_VERSION
    assert data["source"]["kind"] == "directory"
    (cluster,) = data["clusters"]
    promised = {o["key"]: o["replicas_after"] for o in cluster["report"]["objects"]}
    writes = cluster["writes"]
    assert promised and {w["op"] for w in writes} == {"apply"}
    assert {f"{w['namespace']}/{w['name']}" for w in writes} == set(promised)
    assert cluster["observed"]["nodes"], "the Nodes the placement read are recorded"
    # What `plan --out` writes is within what the desired state has heteroscale manage.
    savedplan.check_scope(savedplan.read_plan(plan_file), load_desired_state(tmp_path), plan_file)

    applied = _invoke("apply", str(plan_file), *_common(tmp_path, control_plane))
    assert applied.exit_code == 0, applied.output
    live = list_deployments(client, name)
    assert {f"{name}/{n}": d["spec"]["replicas"] for n, d in live.items()} == promised
    for w in writes:
        # The exact manifest of the plan, and owned by heteroscale's apply only (the
        # create's own "Update" entry was handed over), so later cycles do not conflict.
        d = live[w["name"]]
        hash_key = names.APPLIED_HASH_ANNOTATION
        assert (
            d["metadata"]["annotations"][hash_key]
            == w["manifest"]["metadata"]["annotations"][hash_key]
        )
        owners = {(f["manager"], f["operation"]) for f in d["metadata"]["managedFields"]}
        assert ("heteroscale", "Update") not in owners and ("heteroscale", "Apply") in owners

    # The same plan twice: the first apply created the objects, so it is stale now.
    again = _invoke("apply", str(plan_file), *_common(tmp_path, control_plane))
    assert again.exit_code == 1
    assert "stale" in again.output and f"Deployment {name}/" in again.output
    assert "appeared" in again.output

    _settled(client, name)
    after = _invoke("plan", *_common(tmp_path, control_plane))
    assert after.exit_code == 0 and "No changes" in after.output, after.output


def test_cluster_limits_a_saved_plan_to_the_clusters_it_names(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """`apply PLAN --cluster c1` makes c1's writes and none of c2's: an operator who
    keeps a cluster out of an apply (an incident there, a staged rollout) got its
    writes too, `--cluster` read by every command but this one (found by a hostile
    prober). A name the plan does not hold is a usage error, before any write."""
    make_desired_state(tmp_path, "limit-c1", ("s1",))
    state = make_desired_state(tmp_path, "limit-c2", ("s2",))
    client = control_plane.client()
    for name in ("limit-c1", "limit-c2"):
        ensure_namespace(client, name)
        create_nodes(client, state.clusters[name])
    common = _common(tmp_path, control_plane)
    plan_file = tmp_path / "plan.json"
    planned = _invoke("plan", *common, "--out", str(plan_file))
    assert planned.exit_code == 3, planned.output

    unknown = _invoke("apply", str(plan_file), *common, "--cluster", "limit-c3")
    assert unknown.exit_code == 2 and "limit-c3" in unknown.output
    only_c1 = tmp_path / "c1.json"
    planned = _invoke("plan", *common, "--cluster", "limit-c1", "--out", str(only_c1))
    assert planned.exit_code == 3, planned.output
    absent = _invoke("apply", str(only_c1), *common, "--cluster", "limit-c2")
    assert absent.exit_code == 2 and "holds no plan for cluster 'limit-c2'" in absent.output
    assert list_deployments(client, "limit-c1") == list_deployments(client, "limit-c2") == {}

    applied = _invoke("apply", str(plan_file), *common, "--cluster", "limit-c1")
    assert applied.exit_code == 0, applied.output
    assert list_deployments(client, "limit-c1")
    assert list_deployments(client, "limit-c2") == {}
    assert "cluster limit-c2" not in applied.output


@pytest.mark.fault
def test_a_plan_applied_where_every_node_is_another_object_is_refused(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Nodes of the same names, labels and GPUs that are other objects (new uids): what
    a plan meets when its kubeconfig context now reaches another cluster built from the
    same cluster file, or every Node was replaced. A plan made on one API server applied
    on such another and created its Deployments there (found by a hostile prober with
    two API servers); the Nodes' uids now enter their fingerprint, and the plan is
    refused as stale, saying so, with nothing written."""
    name = "saved-other-nodes"
    client = _setup(control_plane, tmp_path, name)
    plan_file = tmp_path / "plan.json"
    planned = _invoke("plan", *_common(tmp_path, control_plane), "--out", str(plan_file))
    assert planned.exit_code == 3, planned.output
    spec = load_desired_state(tmp_path).clusters[name]
    for node in spec.nodes:
        client.request("DELETE", nodes_path(node.name))
    create_nodes(client, spec)

    applied = _invoke("apply", str(plan_file), *_common(tmp_path, control_plane))
    assert applied.exit_code == 1
    # The session's API server also holds other tests' Nodes, unchanged: each of this
    # cluster's is named (alone, "every Node differs" heads the list: test_savedplan).
    for node in spec.nodes:
        assert f"Node {node.name} changed" in applied.output
    assert list_deployments(client, name) == {}


@pytest.mark.fault
def test_a_deployment_scaled_between_plan_and_apply_is_named_and_nothing_changes(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    name = "saved-scaled"
    client = _create_and_settle(control_plane, tmp_path, name)
    _change_image(tmp_path)
    plan_file = tmp_path / "plan.json"
    planned = _invoke("plan", *_common(tmp_path, control_plane), "--out", str(plan_file))
    assert planned.exit_code == 3, planned.output
    (cluster,) = json.loads(plan_file.read_text())["clusters"]
    targets = [w["name"] for w in cluster["writes"] if w["op"] == "apply"]
    assert targets, "the image change is planned"

    # Someone else: `kubectl scale` (the scale subresource) on one planned Deployment.
    victim = targets[0]
    client.request(
        "PATCH",
        f"/apis/apps/v1/namespaces/{name}/deployments/{victim}/scale",
        body={"spec": {"replicas": 7}},
        content_type="application/merge-patch+json",
    )
    before = _specs(client, name)
    refused = _invoke("apply", str(plan_file), *_common(tmp_path, control_plane))
    assert refused.exit_code == 1
    assert f"Deployment {name}/{victim} changed (resourceVersion" in refused.output
    assert "nothing applied" in refused.output
    assert _specs(client, name) == before, "no write at all"
    assert before[victim]["replicas"] == 7


@pytest.mark.fault
def test_a_create_interrupted_before_its_relabel_is_planned_and_applied_not_a_conflict(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """A process killed between a create's POST and its relabel leaves heteroscale's
    fields recorded as an "Update": every later plan called its own Deployment
    "changed outside Git" and never rolled it (a mixed-version service). Now `plan
    --out` plans the image change and `apply PLAN` relabels, then applies it."""
    name = "saved-interrupted"
    client = _create_and_settle(control_plane, tmp_path, name)
    victim = next(n for n in sorted(list_deployments(client, name)) if n.endswith("-d"))
    path = f"/apis/apps/v1/namespaces/{name}/deployments/{victim}"
    live = client.get(path)
    entries = [
        {**e, "operation": "Update"} if e.get("manager") == names.FIELD_MANAGER else e
        for e in live["metadata"]["managedFields"]
    ]
    client.merge_patch(
        path,
        {
            "metadata": {
                "managedFields": entries,
                "resourceVersion": live["metadata"]["resourceVersion"],
            }
        },
        field_manager=names.FIELD_MANAGER,
    )
    _settled(client, name)
    _change_image(tmp_path)
    plan_file = tmp_path / "plan.json"
    planned = _invoke("plan", *_common(tmp_path, control_plane), "--out", str(plan_file))
    assert planned.exit_code == 3, planned.output
    assert "changed outside Git" not in planned.output
    assert "relabelled as its apply" in planned.output
    applied = _invoke("apply", str(plan_file), *_common(tmp_path, control_plane))
    assert applied.exit_code == 0, applied.output
    images = {
        n: [c["image"] for c in d["spec"]["template"]["spec"]["containers"]]
        for n, d in list_deployments(client, name).items()
    }
    assert all(any("decode-v2" in i for i in v) for n, v in images.items() if "-d" in n), images
    owners = {(f["manager"], f["operation"]) for f in client.get(path)["metadata"]["managedFields"]}
    assert (names.FIELD_MANAGER, "Update") not in owners


@pytest.mark.fault
def test_a_change_between_the_check_and_the_write_is_refused_by_the_server(
    control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "saved-race"
    client = _create_and_settle(control_plane, tmp_path, name)
    _change_image(tmp_path)
    plan_file = tmp_path / "plan.json"
    assert (
        _invoke("plan", *_common(tmp_path, control_plane), "--out", str(plan_file)).exit_code == 3
    )
    (cluster,) = json.loads(plan_file.read_text())["clusters"]
    victim = cluster["writes"][0]["name"]

    # The edit lands after apply's staleness check, just before its first write: only
    # the resourceVersion precondition on the write can catch it.
    original = savedplan._write
    edited: list[str] = []

    def edit_then_write(kube: KubeClient, step: savedplan.WriteStep, *args: Any, **kw: Any) -> Any:
        if not edited:
            client.merge_patch(
                f"/apis/apps/v1/namespaces/{name}/deployments/{victim}",
                {"metadata": {"labels": {"edited-by": "someone"}}},
                field_manager="someone-else",
            )
            edited.append(victim)
        return original(kube, step, *args, **kw)

    monkeypatch.setattr(savedplan, "_write", edit_then_write)
    refused = _invoke("apply", str(plan_file), *_common(tmp_path, control_plane))
    assert edited and refused.exit_code == 1
    assert f"Deployment {name}/{victim}: changed since the plan" in refused.output
    live = list_deployments(client, name)
    assert "decode-v2" not in json.dumps(live), "no planned write reached the server"


@pytest.mark.fault
def test_a_new_desired_state_revision_makes_a_saved_plan_stale(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    name = "saved-rev"
    client = _setup(control_plane, tmp_path, name)

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    plan_file = tmp_path / "plan.json"
    common = _common(tmp_path, control_plane)
    assert _invoke("plan", *common, "--rev", "HEAD", "--out", str(plan_file)).exit_code == 3
    source = json.loads(plan_file.read_text())["source"]
    assert source["kind"] == "git" and source["rev"] == "HEAD" and len(source["commit"]) == 40

    _change_image(tmp_path)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "two")
    refused = _invoke("apply", str(plan_file), *common)
    assert refused.exit_code == 1
    assert f"desired state: revision HEAD ({source['commit'][:12]})" in refused.output
    assert list_deployments(client, name) == {}
    # Given explicitly, the planned commit itself is still the plan's revision.
    applied = _invoke("apply", str(plan_file), *common, "--rev", source["commit"])
    assert applied.exit_code == 0, applied.output
    assert list_deployments(client, name)


@pytest.mark.fault
def test_a_truncated_or_edited_plan_file_is_refused_and_nothing_is_written(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    name = "saved-garbled"
    client, plan_file, common = _planned(control_plane, tmp_path, name)
    text = plan_file.read_text()
    for bad in (text[: len(text) // 3], text.replace("engine:decode", "engine:evil", 1)):
        plan_file.write_text(bad)
        refused = _invoke("apply", str(plan_file), *common)
        assert refused.exit_code == 1
        assert str(plan_file) in refused.output.replace("\n", "")
        assert list_deployments(client, name) == {}


@pytest.mark.fault
def test_a_plan_whose_pod_template_was_forged_is_refused_and_nothing_is_written(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    # The digest is a checksum anyone can recompute: a forger who adds a privileged
    # container to a planned Deployment writes a plan whose every other check passes.
    name = "saved-forged"
    client, plan_file, common = _planned(control_plane, tmp_path, name)
    data = json.loads(plan_file.read_text())
    manifest = data["clusters"][0]["writes"][0]["manifest"]
    manifest["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    del data["digest"]
    data["digest"] = "sha256:" + savedplan._hash(data)
    plan_file.write_text(json.dumps(data))
    savedplan.read_plan(plan_file)  # the file itself reads as a valid plan

    refused = _invoke("apply", str(plan_file), *common)
    assert refused.exit_code == 1, refused.output
    assert str(plan_file) in refused.output.replace("\n", "")
    assert "differs at spec.template.spec.containers[0].securityContext" in " ".join(
        refused.output.split()
    )
    assert list_deployments(client, name) == {}


@pytest.mark.fault
def test_with_a_signing_key_only_the_signed_unchanged_plan_is_applied(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    # Replicas are not re-derived at apply time (they came from that cycle's metrics):
    # a plan whose replicas were raised, its digest recomputed, passes every other
    # check. Signed by the planning job, it is refused by an apply given the key.
    name = "saved-signed"
    key_file = tmp_path / "plan.key"
    key_file.write_text("a-32-byte-or-longer-secret-key-for-this-test\n")
    signing = ["--signing-key-file", str(key_file)]
    client, plan_file, common = _planned(control_plane, tmp_path, name, *signing)
    signed_text = plan_file.read_text()
    data = json.loads(signed_text)
    assert data["signature"].startswith("hmac-sha256:")
    manifest = data["clusters"][0]["writes"][0]["manifest"]
    manifest["spec"]["replicas"] += 40
    body = {k: v for k, v in data.items() if k not in ("digest", "signature")}
    data["digest"] = "sha256:" + savedplan._hash(body)
    plan_file.write_text(json.dumps(data))

    refused = _invoke("apply", str(plan_file), *common, *signing)
    assert refused.exit_code == 1, refused.output
    assert "changed after it was signed" in " ".join(refused.output.split())
    assert list_deployments(client, name) == {}

    unsigned = {k: v for k, v in data.items() if k != "signature"}
    plan_file.write_text(json.dumps(unsigned))
    refused = _invoke("apply", str(plan_file), *common, *signing)
    assert refused.exit_code == 1 and "is not signed" in " ".join(refused.output.split())
    assert list_deployments(client, name) == {}

    plan_file.write_text(signed_text)
    applied = _invoke("apply", str(plan_file), *common, *signing)
    assert applied.exit_code == 0, applied.output
    planned = {
        w["name"]: w["manifest"]["spec"]["replicas"]
        for w in json.loads(signed_text)["clusters"][0]["writes"]
    }
    assert {n: d["spec"]["replicas"] for n, d in list_deployments(client, name).items()} == planned

    # Without the key the signature is not checked, and apply says so (this plan is
    # stale now: it created what it planned).
    again = _invoke("apply", str(plan_file), *common)
    assert again.exit_code == 1 and "stale" in again.output
    assert "signature is not checked" in " ".join(again.output.split())

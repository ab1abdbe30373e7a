"""A plan file is input from whoever handed it over: its digest is a checksum anyone
can recompute. Every forged plan is refused with the file and the entry named, before
anything is written."""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from reconciler.apply import savedplan
from reconciler.apply.actions import effective_manifest
from reconciler.apply.names import DOMAIN_ANNOTATION as DOMAIN
from reconciler.apply.names import GPU_TYPE_ANNOTATION as GPU_TYPE
from reconciler.apply.names import SERVICE_LABEL as SERVICE
from reconciler.apply.plancheck import first_difference
from reconciler.apply.render import render_deployment
from reconciler.apply.savedplan import (
    PlanFileError,
    SavedCluster,
    WriteStep,
    _hash,
    check_scope,
    execute,
    read_plan,
    to_json,
    write_plan,
)
from reconciler.desired.loader import load_desired_state
from reconciler.state import DeploymentGroup, GroupRole, Role
from tests.apply.test_savedplan import OWNED, sample

Plan = dict[str, Any]


def forged(tmp_path: Path, edit: Callable[[Plan], None]) -> Path:
    """``sample()`` edited by ``edit``, its digest recomputed as a forger would."""
    data = to_json(sample())
    del data["digest"]
    edit(data)
    data["digest"] = "sha256:" + _hash(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(PlanFileError) as info:
        read_plan(path)
    assert str(path) in str(info.value)
    return str(info.value)


def writes(data: Plan) -> list[dict[str, Any]]:
    return data["clusters"][0]["writes"]  # type: ignore[no-any-return]


# ------------------------------------------------------------------ reading the file


def test_a_character_device_is_refused_without_reading_it() -> None:
    assert "not a regular file" in refusal(Path("/dev/zero"))


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)
    outcome: list[str] = []
    reader = threading.Thread(target=lambda: outcome.append(refusal(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert outcome and "not a regular file" in outcome[0]


def test_a_directory_and_a_file_over_the_limit_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "is a directory" in refusal(tmp_path)
    path = tmp_path / "plan.json"
    write_plan(sample(), path)
    monkeypatch.setattr(savedplan, "MAX_PLAN_BYTES", 100)
    assert "larger than the 100 bytes limit" in refusal(path)


def test_a_key_that_appears_twice_is_refused_naming_it(tmp_path: Path) -> None:
    # json.loads keeps the last: a reviewer reading the first would approve a drain
    # and apply a delete.
    path = tmp_path / "plan.json"
    write_plan(sample(), path)
    text = path.read_text().replace('"op": "drain",', '"op": "drain", "op": "delete_pod",', 1)
    path.write_text(text)
    assert "key 'op' appears twice" in refusal(path)


# ------------------------------------------------------------------ shape and bounds


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            lambda d: writes(d)[3].update(name="../../../namespaces/kube-system/pods/coredns"),
            "clusters[0].writes[3] (delete_pod): name '../../../namespaces/kube-system/pods/coredns'",
            id="path-traversal-in-a-name",
        ),
        pytest.param(
            lambda d: writes(d)[1].update(namespace="kube-system/pods"),
            "clusters[0].writes[1] (drain): namespace 'kube-system/pods'",
            id="slash-in-a-namespace",
        ),
        pytest.param(
            lambda d: writes(d)[3].update(name="Coredns"),
            "writes[3] (delete_pod): name 'Coredns'",
            id="upper-case-name",
        ),
        pytest.param(
            lambda d: writes(d)[3].update(resource_version=""),
            "writes[3] (delete_pod): resource_version must be a resourceVersion",
            id="empty-precondition-would-delete-unconditionally",
        ),
        pytest.param(
            lambda d: writes(d)[0].update(manifest={"spec": {"replicas": 1}}),
            "writes[0] (apply): manifest: must be an apps/v1 Deployment",
            id="manifest-without-metadata",
        ),
        pytest.param(
            lambda d: writes(d)[0]["manifest"].update(kind="ClusterRoleBinding"),
            "must be an apps/v1 Deployment, not 'apps/v1' 'ClusterRoleBinding'",
            id="another-kind",
        ),
        pytest.param(
            lambda d: writes(d)[0]["manifest"].pop("metadata"),
            "writes[0] (apply): manifest: metadata missing",
            id="no-metadata",
        ),
        pytest.param(
            lambda d: writes(d)[0]["manifest"]["metadata"].update(namespace="kube-system"),
            "metadata names 'kube-system'/'d0', not the entry's ns/d0",
            id="manifest-in-another-namespace",
        ),
        pytest.param(
            lambda d: writes(d)[0]["manifest"]["metadata"]["labels"].pop(
                "app.kubernetes.io/managed-by"
            ),
            "metadata.labels lack app.kubernetes.io/managed-by=heteroscale",
            id="not-labelled-as-ours",
        ),
        pytest.param(
            lambda d: writes(d)[0]["manifest"]["metadata"]["labels"].update(
                {"heteroscale.io/cluster": "west"}
            ),
            "heteroscale.io/cluster is 'west', not cluster east's 'east'",
            id="labelled-for-another-cluster",
        ),
        pytest.param(
            lambda d: writes(d)[0]["manifest"]["spec"]["template"]["metadata"].update(labels={}),
            "spec.template.metadata.labels lack app.kubernetes.io/managed-by",
            id="pods-not-labelled-as-ours",
        ),
        pytest.param(
            lambda d: writes(d)[0]["manifest"]["metadata"].update(
                ownerReferences=[{"kind": "Namespace", "name": "ns"}]
            ),
            "field(s) heteroscale never writes: ownerReferences",
            id="owner-references",
        ),
        pytest.param(
            lambda d: writes(d)[0]["manifest"]["spec"].update(replicas=True),
            "spec.replicas must be a whole number",
            id="replicas-not-a-number",
        ),
        pytest.param(
            lambda d: writes(d)[0]["manifest"]["spec"].update(replicas=10**9),
            "spec.replicas must be a whole number from 0 to 100000",
            id="replicas-out-of-bounds",
        ),
        pytest.param(
            lambda d: writes(d)[1].update(source="../d1"),
            "writes[1] (drain): source '../d1'",
            id="drain-source-not-a-name",
        ),
        pytest.param(
            lambda d: writes(d)[3].update(source="d1"),
            "only a drain names a source Deployment",
            id="source-on-a-delete",
        ),
        pytest.param(
            lambda d: d["clusters"][0].update(cluster="east/../west"),
            "clusters[0].cluster 'east/../west'",
            id="cluster-name",
        ),
        pytest.param(
            lambda d: d["clusters"][0]["observed"]["pods"].update({"ns/a/b": "1"}),
            "clusters[0].observed.pods['ns/a/b']: must be namespace/name",
            id="observed-key",
        ),
        pytest.param(
            lambda d: d["clusters"][0]["observed"]["deployments"]["ns/d1"].update(generation=True),
            "observed.deployments['ns/d1']: generation must be a whole number",
            id="observed-generation",
        ),
        pytest.param(
            lambda d: d["clusters"][0]["observed"]["nodes"].update({"n1": "x"}),
            "observed.nodes['n1'] must be a fingerprint",
            id="node-fingerprint",
        ),
        pytest.param(
            lambda d: d["source"].update(rev="--output=/tmp/owned"),
            "source.rev must not start with '-'",
            id="rev-read-as-a-git-option",
        ),
        pytest.param(
            lambda d: d["source"].update(commit="main"),
            "source.commit must be a full commit id",
            id="commit-not-an-id",
        ),
        pytest.param(
            lambda d: d["clusters"].append(d["clusters"][0]),
            "cluster(s) east appear more than once",
            id="a-cluster-twice",
        ),
        pytest.param(
            lambda d: d.update(extra={"op": "delete_pod"}),
            "unknown field(s) extra",
            id="unknown-top-level-field",
        ),
        pytest.param(
            lambda d: d["clusters"][0].update(decisions="all of them"),
            "clusters[0].decisions must be an object",
            id="decisions-not-an-object",
        ),
    ],
)
def test_a_forged_entry_is_refused_naming_it(
    tmp_path: Path, edit: Callable[[Plan], None], expected: str
) -> None:
    assert expected in refusal(forged(tmp_path, edit))


# ------------------------------------------------------------------ what was observed


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            lambda d: writes(d).append(
                {
                    "op": "delete_pod",
                    "namespace": "kube-system",
                    "name": "evil",
                    "resource_version": "1",
                }
            ),
            "writes[4] (delete Pod kube-system/evil): writes an object the plan did not observe",
            id="delete-of-an-unobserved-pod",
        ),
        pytest.param(
            lambda d: writes(d).append(
                {
                    "op": "delete_deployment",
                    "namespace": "ns",
                    "name": "other",
                    "resource_version": "7",
                }
            ),
            "writes an object the plan did not observe as heteroscale's own",
            id="delete-of-an-unobserved-deployment",
        ),
        pytest.param(
            lambda d: writes(d)[3].update(resource_version="39"),
            "writes[3] (delete Pod ns/p1): resourceVersion 39 is not the observed 40",
            id="precondition-not-the-observed-one",
        ),
        pytest.param(
            lambda d: writes(d)[2].pop("resource_version"),
            "writes[2] (create Deployment ns/d1): creates a Deployment the plan observed as existing",
            id="create-over-an-observed-deployment",
        ),
        pytest.param(
            lambda d: writes(d)[1].update(source="d9"),
            "drains from Deployment d9, which the plan did not observe",
            id="drain-from-an-unobserved-deployment",
        ),
    ],
)
def test_a_write_that_does_not_match_what_the_plan_observed_is_refused(
    tmp_path: Path, edit: Callable[[Plan], None], expected: str
) -> None:
    assert expected in refusal(forged(tmp_path, edit))


class _NoWrites:
    """A client that fails the test on any request."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the API server was called ({name})")


@pytest.mark.parametrize(
    "bad_step",
    [
        WriteStep("delete_pod", "chat", "../../../namespaces/kube-system/pods/coredns", "40"),
        WriteStep("apply", "ns", "d0", None, {"spec": {}}),
        WriteStep("delete_pod", "kube-system", "evil", "1"),
    ],
    ids=["traversal", "manifest-without-metadata", "unobserved"],
)
def test_execute_refuses_a_bad_plan_made_in_code_before_its_first_write(
    bad_step: WriteStep,
) -> None:
    cluster = sample().clusters[0]
    cluster = replace(cluster, writes=(*cluster.writes, bad_step))
    result = execute(_NoWrites(), cluster, field_manager="heteroscale", now_s=0.0)  # type: ignore[arg-type]
    assert result.done == [] and result.refused is not None
    assert result.refused.startswith("writes[4]") and "nothing written" in result.refused


# ------------------------------------------------------------------ the desired state's scope


EXAMPLES = load_desired_state(Path(__file__).resolve().parents[2])  # the repository's own


def rendered(
    service: str = "chat",
    role: Role = "decode",
    replicas: int = 3,
    *,
    domain: str = "mp-a1",
    gpu_type: str | None = None,
) -> WriteStep:
    """The create of a Deployment exactly as ``plan --out`` records it: rendered from the
    example repository's policy and pod template for group g1 on ``domain``."""
    policy = EXAMPLES.policies[service]
    cluster = EXAMPLES.clusters[policy.cluster]
    placed = GroupRole(gpu_type or next(iter(policy.role(role).gpu_types)), replicas)
    unplaced = replace(placed, instances=0)
    group = DeploymentGroup(
        service,
        cluster.name,
        "g1",
        domain,
        None,
        placed if role == "prefill" else unplaced,
        placed if role == "decode" else unplaced,
    )
    workload = render_deployment(group, role, policy, cluster, EXAMPLES.templates)
    manifest = effective_manifest(workload, replicas, None)
    return WriteStep("apply", workload.key.namespace, workload.key.name, None, manifest)


def edited(step: WriteStep, edit: Callable[[dict[str, Any]], object]) -> WriteStep:
    """``step`` with its manifest edited by ``edit`` (on a copy)."""
    assert step.manifest is not None
    manifest = copy.deepcopy(step.manifest)
    edit(manifest)
    return replace(step, manifest=manifest)


def scoped(*steps: WriteStep) -> Any:
    plan = sample()
    cluster = SavedCluster("prod-east", plan.clusters[0].observed, steps)
    return replace(plan, clusters=(cluster,))


def refused_scope(*steps: WriteStep) -> str:
    with pytest.raises(
        PlanFileError, match="writes outside what the desired state manages"
    ) as info:
        check_scope(scoped(*steps), EXAMPLES, Path("plan.json"))
    assert "plan.json" in str(info.value)
    return str(info.value)


def test_deployments_as_the_desired_state_renders_them_pass_at_any_replicas() -> None:
    check_scope(
        scoped(
            rendered("chat", "decode", 3),
            rendered("svc-a", "prefill", 17, domain="pod-a"),
            rendered("chat", "prefill", 0, domain="prod-east"),
        ),
        EXAMPLES,
        Path("plan.json"),
    )


def test_a_precondition_in_the_manifest_is_the_plans_own() -> None:
    step = edited(rendered(), lambda m: m["metadata"].update(resourceVersion="41"))
    check_scope(scoped(step), EXAMPLES, Path("plan.json"))


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        pytest.param(
            replace(rendered(), namespace="kube-system"),
            "writes[0] (create Deployment kube-system/chat-g1-d): namespace kube-system is not "
            "one the desired state deploys to in cluster prod-east",
            id="another-namespace",
        ),
        pytest.param(
            WriteStep("delete_pod", "kube-system", "coredns", "1"),
            "writes[0] (delete Pod kube-system/coredns): namespace kube-system is not one",
            id="a-delete-in-another-namespace",
        ),
        pytest.param(
            edited(rendered(), lambda m: m["metadata"]["labels"].update({SERVICE: "billing"})),
            "service 'billing' has no policy deploying to namespace chat",
            id="a-service-without-a-policy-there",
        ),
        pytest.param(
            replace(rendered(), name="evil"),
            "named evil, not chat-g1-d as service chat's decode of group g1",
            id="a-name-the-renderer-does-not-give",
        ),
    ],
)
def test_a_write_outside_what_the_desired_state_manages_is_refused_naming_it(
    step: WriteStep, expected: str
) -> None:
    assert expected in refused_scope(step)


def _engine(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def _pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]  # type: ignore[no-any-return]


# What a forger who recomputes the digest would add to a Deployment the plan creates.
@pytest.mark.parametrize(
    ("edit", "where"),
    [
        pytest.param(
            lambda m: _engine(m).update(image="registry.example/miner:latest"),
            "spec.template.spec.containers[0].image",
            id="another-image",
        ),
        pytest.param(
            lambda m: _engine(m).update(securityContext={"privileged": True}),
            "spec.template.spec.containers[0].securityContext",
            id="a-privileged-container",
        ),
        pytest.param(
            lambda m: _pod_spec(m).update(volumes=[{"name": "root", "hostPath": {"path": "/"}}]),
            "spec.template.spec.volumes",
            id="the-hosts-root-mounted",
        ),
        pytest.param(
            lambda m: _pod_spec(m)["containers"].append({"name": "sidecar", "image": "x"}),
            "spec.template.spec.containers[1]",
            id="one-more-container",
        ),
        pytest.param(
            lambda m: _engine(m)["env"].append({"name": "HF_TOKEN", "value": "leak"}),
            "spec.template.spec.containers[0].env[",
            id="an-environment-variable",
        ),
        pytest.param(
            lambda m: _pod_spec(m).pop("affinity"),
            "spec.template.spec.affinity",
            id="the-node-affinity-dropped",
        ),
        pytest.param(
            lambda m: _pod_spec(m).update(serviceAccountName="cluster-admin"),
            "spec.template.spec.serviceAccountName",
            id="another-service-account",
        ),
        pytest.param(
            lambda m: m["metadata"]["annotations"].update({"note": "x"}),
            "metadata.annotations.note",
            id="an-annotation",
        ),
        pytest.param(
            lambda m: _engine(m)["resources"]["limits"].update({"nvidia.com/gpu": 64}),
            "spec.template.spec.containers[0].resources.limits.nvidia.com/gpu",
            id="more-gpus-as-a-number",
        ),
    ],
)
def test_a_manifest_that_is_not_what_the_revision_renders_is_refused_naming_where(
    edit: Callable[[dict[str, Any]], object], where: str
) -> None:
    message = refused_scope(rendered("chat", "prefill", 4), edited(rendered(), edit))
    assert "writes[1] (create Deployment chat/chat-g1-d): differs at " + where in message
    assert "service chat's decode of group g1" in message
    assert "writes[0]" not in message  # the untouched Deployment passes


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        pytest.param(
            edited(
                rendered(),
                lambda m: m["metadata"]["annotations"].update({DOMAIN: "somewhere-else"}),
            ),
            "deployment-group domain 'somewhere-else' is neither an S1 or S2 switch",
            id="a-domain-the-cluster-lacks",
        ),
        pytest.param(
            edited(rendered(), lambda m: m["metadata"]["annotations"].update({GPU_TYPE: "B300"})),
            "GPU type 'B300' is not in its gpu_types catalogue",
            id="a-gpu-type-the-cluster-lacks",
        ),
        pytest.param(
            edited(rendered(), lambda m: m["metadata"]["annotations"].pop(GPU_TYPE)),
            "lacks the heteroscale.io/domain or heteroscale.io/gpu-type annotation",
            id="no-gpu-type",
        ),
    ],
)
def test_a_group_the_cluster_cannot_have_is_refused(step: WriteStep, expected: str) -> None:
    assert expected in refused_scope(step)


@pytest.mark.parametrize(
    ("written", "expected", "where"),
    [
        ({"a": [1, {"b": "x"}]}, {"a": [1, {"b": "x"}]}, None),
        ({"a": 1.0}, {"a": 1}, None),  # one number, however written
        ({"a": True}, {"a": 1}, "a"),  # a boolean is no number
        ({"a": [1, 2]}, {"a": [1]}, "a[1]"),
        ({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}, "a.c"),
        ({"a": {"b": 1}}, {"a": "b"}, "a"),
        ([], {}, "(the whole manifest)"),
    ],
)
def test_first_difference_names_the_path_of_the_first_difference(
    written: Any, expected: Any, where: str | None
) -> None:
    assert first_difference(written, expected) == where


def test_a_plan_for_a_cluster_the_desired_state_lacks_is_refused() -> None:
    plan = sample()
    elsewhere = replace(plan, clusters=(SavedCluster("west", plan.clusters[0].observed, ()),))
    with pytest.raises(PlanFileError, match="cluster west is not in the desired state"):
        check_scope(elsewhere, EXAMPLES, Path("plan.json"))


def test_the_ownership_labels_in_the_sample_are_those_the_renderer_writes() -> None:
    from reconciler.apply import names

    assert {
        names.MANAGED_BY_LABEL: names.MANAGED_BY_VALUE,
        names.CLUSTER_LABEL: names.label_value("east"),
    } == OWNED

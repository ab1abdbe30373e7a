"""A plan file is input from whoever handed it over: its digest is a checksum anyone
can recompute. Every forged plan is refused with the file and the entry named, before
anything is written."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from reconciler.apply import savedplan
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
from tests.apply.test_savedplan import OWNED, deployment, sample

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


def desired(*policies: tuple[str, str], cluster: str = "east") -> Any:
    """The parts of a desired state the scope check reads: (service, namespace) policies."""
    listed = [SimpleNamespace(name=n, namespace=ns, cluster=cluster) for n, ns in policies]
    return SimpleNamespace(
        clusters={cluster: object()},
        policies_for=lambda name: [p for p in listed if p.cluster == name],
    )


def rendered(service: str, namespace: str, group: str, role: str, name: str) -> WriteStep:
    manifest = deployment(name, namespace=namespace)
    manifest["metadata"]["labels"].update(
        {"heteroscale.io/service": service, "heteroscale.io/role": role}
    )
    manifest["metadata"]["annotations"] = {"heteroscale.io/group-id": group}
    return WriteStep("apply", namespace, name, None, manifest)


def scoped(*steps: WriteStep) -> Any:
    plan = sample()
    cluster = SavedCluster("east", plan.clusters[0].observed, steps)
    return replace(plan, clusters=(cluster,))


def test_a_plan_within_the_policies_namespaces_and_rendered_names_passes() -> None:
    step = rendered("svc", "chat", "g1", "decode", "svc-g1-d")
    check_scope(scoped(step), desired(("svc", "chat")), Path("plan.json"))


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        pytest.param(
            rendered("svc", "kube-system", "g1", "decode", "svc-g1-d"),
            "writes[0] (create Deployment kube-system/svc-g1-d): namespace kube-system is not "
            "one the desired state deploys to in cluster east (chat)",
            id="another-namespace",
        ),
        pytest.param(
            WriteStep("delete_pod", "kube-system", "coredns", "1"),
            "writes[0] (delete Pod kube-system/coredns): namespace kube-system is not one",
            id="a-delete-in-another-namespace",
        ),
        pytest.param(
            rendered("billing", "chat", "g1", "decode", "billing-g1-d"),
            "service 'billing' has no policy deploying to namespace chat",
            id="a-service-without-a-policy-there",
        ),
        pytest.param(
            rendered("svc", "chat", "g1", "decode", "evil"),
            "named evil, not svc-g1-d as service svc's decode of group g1",
            id="a-name-the-renderer-does-not-give",
        ),
    ],
)
def test_a_write_outside_what_the_desired_state_manages_is_refused_naming_it(
    step: WriteStep, expected: str
) -> None:
    with pytest.raises(
        PlanFileError, match="writes outside what the desired state manages"
    ) as info:
        check_scope(scoped(step), desired(("svc", "chat")), Path("plan.json"))
    assert "plan.json" in str(info.value) and expected in str(info.value)


def test_a_plan_for_a_cluster_the_desired_state_lacks_is_refused() -> None:
    with pytest.raises(PlanFileError, match="cluster east is not in the desired state"):
        check_scope(scoped(), desired(("svc", "chat"), cluster="west"), Path("plan.json"))


def test_the_ownership_labels_in_the_sample_are_those_the_renderer_writes() -> None:
    from reconciler.apply import names

    assert {
        names.MANAGED_BY_LABEL: names.MANAGED_BY_VALUE,
        names.CLUSTER_LABEL: names.label_value("east"),
    } == OWNED

"""The saved-plan file (pure): it round-trips exactly, and anything that is not
exactly what `plan --out` wrote is refused with the file named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.apply import names
from reconciler.apply.kubeclient import NotFound, ResourceConflict
from reconciler.apply.savedplan import (
    SCHEMA_VERSION,
    Observed,
    ObservedDeployment,
    PlanFileError,
    PlanSource,
    SavedCluster,
    SavedPlan,
    WriteStep,
    adopt_created,
    deployment_fingerprint,
    execute,
    moved_objects,
    node_fingerprint,
    read_plan,
    to_json,
    write_plan,
)

OWNED = {"app.kubernetes.io/managed-by": "heteroscale", "heteroscale.io/cluster": "east"}


def deployment(name: str, *, namespace: str = "ns", **metadata: Any) -> dict[str, Any]:
    """A Deployment manifest as the renderer writes it for cluster east (its shape)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**OWNED, "heteroscale.io/service": "svc"},
            **metadata,
        },
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"heteroscale.io/service": "svc"}},
            "template": {"metadata": {"labels": dict(OWNED)}, "spec": {"containers": []}},
        },
    }


MANIFEST = deployment("d1", resourceVersion="41")


def sample() -> SavedPlan:
    observed = Observed(
        deployments={"ns/d1": ObservedDeployment("41", 2, "f" * 32)},
        pods={"ns/p1": "40"},
        nodes={"n1": "a" * 32},
    )
    writes = (
        WriteStep("apply", "ns", "d0", None, deployment("d0")),
        WriteStep("drain", "ns", "p1", "40", source="d1"),
        WriteStep("apply", "ns", "d1", "41", MANIFEST),
        WriteStep("delete_pod", "ns", "p1", "40"),
    )
    return SavedPlan(
        source=PlanSource("git", "c" * 64, rev="main", commit="b" * 40),
        clusters=(
            SavedCluster(
                "east",
                observed,
                writes,
                decisions={"svc": {"prefill": 2, "decode": 4}},
                group_changes=({"kind": "create", "service": "svc"},),
                report={"mode": "server-dry-run"},
            ),
        ),
        created_at="2026-01-01T00:00:00Z",
    )


def test_a_plan_round_trips_exactly(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    write_plan(sample(), path)
    data = json.loads(path.read_text())
    assert data["format"] == "heteroscale-plan" and data["schema_version"] == SCHEMA_VERSION
    assert read_plan(path) == sample()
    assert not (tmp_path / "plan.json.tmp").exists()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: "\x00\xff garbage", "not valid JSON"),
        (lambda text: "[1, 2]", "not a JSON object"),
        (lambda text: text.replace('"replicas": 3', '"replicas": 30'), "digest does not match"),
        (
            lambda text: text.replace('"resource_version": "41"', '"resource_version": "42"', 1),
            "digest",
        ),
        (
            lambda text: text.replace('"schema_version": 1', '"schema_version": 2'),
            "schema_version 2",
        ),
        (lambda text: text.replace('"heteroscale-plan"', '"terraform"'), "not a heteroscale plan"),
    ],
)
def test_a_damaged_or_edited_plan_is_refused_naming_the_file(
    tmp_path: Path, damage, expected: str
) -> None:
    path = tmp_path / "plan.json"
    write_plan(sample(), path)
    path.write_text(damage(path.read_text()))
    with pytest.raises(PlanFileError) as info:
        read_plan(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_a_structurally_wrong_plan_with_a_valid_digest_is_refused(tmp_path: Path) -> None:
    # Someone recomputed the checksum: the structure is still checked whole.
    data = to_json(sample())
    del data["digest"]
    data["clusters"][0]["writes"][1]["op"] = "scale"
    from reconciler.apply.savedplan import _hash

    data["digest"] = "sha256:" + _hash(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanFileError, match=r"writes\[1\]\.op must be one of"):
        read_plan(path)


def test_a_missing_plan_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PlanFileError, match="cannot be read"):
        read_plan(tmp_path / "nope.json")


def test_moved_objects_names_what_changed_appeared_and_vanished() -> None:
    before = sample().clusters[0].observed
    after = Observed(
        deployments={
            "ns/d1": ObservedDeployment("44", 3, "e" * 32),
            "ns/d2": ObservedDeployment("45", 1, "e" * 32),
        },
        pods={},
        nodes={"n1": "a" * 32},
    )
    assert moved_objects(before, after) == [
        "Deployment ns/d1 changed (resourceVersion 41 -> 44)",
        "Deployment ns/d2 appeared",
        "Pod ns/p1 vanished",
    ]
    assert moved_objects(before, before) == []


def test_every_node_another_object_is_said_first() -> None:
    """Nodes of the same names and labels that are other objects (new uids, so other
    fingerprints): a kubeconfig context that now reaches another cluster built from the
    same cluster file, or every Node replaced. Said first, before each Node."""
    labels = {"gpu": "h800"}
    before = Observed(nodes={n: node_fingerprint(labels, 8, f"uid-{n}") for n in ("n1", "n2")})
    after = Observed(nodes={n: node_fingerprint(labels, 8, f"other-{n}") for n in ("n1", "n2")})
    moved = moved_objects(before, after)
    assert moved[0].startswith("every Node differs from the plan's: another cluster")
    assert [m.split(" (")[0] for m in moved[1:]] == ["Node n1 changed", "Node n2 changed"]
    one_replaced = Observed(nodes={**before.nodes, "n2": after.nodes["n2"]})
    assert [m.split(" (")[0] for m in moved_objects(before, one_replaced)] == ["Node n2 changed"]


def test_the_deployment_fingerprint_ignores_status_only() -> None:
    obj = {"metadata": {"labels": {"a": "1"}, "resourceVersion": "1"}, "spec": {"replicas": 1}}
    moved_status = {
        **obj,
        "status": {"replicas": 1},
        "metadata": {**obj["metadata"], "resourceVersion": "9"},
    }
    assert deployment_fingerprint(obj) == deployment_fingerprint(moved_status)
    assert deployment_fingerprint(obj) != deployment_fingerprint({**obj, "spec": {"replicas": 2}})


class _StatusRacingClient:
    """Answers the relabelling patch after a create with a conflict ``conflicts``
    times, as when the controllers write a new Deployment's status first."""

    def __init__(self, conflicts: int, generation_after: int = 1):
        self.conflicts = conflicts
        self.generation_after = generation_after
        self.patched_at: list[str] = []

    def merge_patch(self, path: str, body: dict, field_manager: str) -> dict:  # type: ignore[type-arg]
        self.patched_at.append(body["metadata"]["resourceVersion"])
        if self.conflicts > 0:
            self.conflicts -= 1
            raise ResourceConflict(409, "Conflict", "the object has been modified")
        return {"metadata": {"resourceVersion": "99"}}

    def get(self, path: str) -> dict:  # type: ignore[type-arg]
        version = str(10 + len(self.patched_at))
        return {
            "metadata": {
                "resourceVersion": version,
                "generation": self.generation_after,
                "managedFields": [{"manager": "heteroscale", "operation": "Update"}],
            }
        }


CREATED = {
    "metadata": {
        "resourceVersion": "10",
        "generation": 1,
        "managedFields": [{"manager": "heteroscale", "operation": "Update"}],
    }
}


def test_a_created_deployment_is_relabelled_past_its_controllers_status_writes() -> None:
    client = _StatusRacingClient(conflicts=2)
    assert adopt_created(client, "/p", CREATED, "heteroscale") == "99"  # type: ignore[arg-type]
    assert client.patched_at == ["10", "11", "12"]  # each time at the fresh version


def test_a_created_deployment_whose_spec_changed_is_not_relabelled() -> None:
    client = _StatusRacingClient(conflicts=1, generation_after=2)
    with pytest.raises(ResourceConflict):
        adopt_created(client, "/p", CREATED, "heteroscale")  # type: ignore[arg-type]
    assert client.patched_at == ["10"]


class _DeleteClient:
    """Answers each mark a Deployment's delete makes first (``delete_marked``) with the
    next of ``answers`` (an exception to raise, or None: marked, at a new version); the
    Deployment itself moved only in its status (``deleting``: and is being deleted).
    ``marked_at`` and ``deleted_at`` are the preconditions each write was made at."""

    def __init__(
        self,
        *answers: Exception | None,
        spec: dict | None = None,  # type: ignore[type-arg]
        deleting: bool = False,
    ):
        self.answers = list(answers)
        self.spec = spec or {"replicas": 3}
        self.deleting = deleting
        self.marks: list[dict] = []  # type: ignore[type-arg]
        self.deleted_at: list[str | None] = []

    @property
    def marked_at(self) -> list[str]:
        return [mark["body"]["metadata"]["resourceVersion"] for mark in self.marks]

    def merge_patch(self, path: str, body: dict, field_manager: str) -> dict:  # type: ignore[type-arg]
        self.marks.append({"body": body, "field_manager": field_manager})
        answer = self.answers.pop(0)
        if answer is not None:
            raise answer
        return {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"] + "-marked"}}

    def delete(self, path: str, propagation: str, resource_version: str | None) -> None:
        self.deleted_at.append(resource_version)

    def get(self, path: str) -> dict:  # type: ignore[type-arg]
        meta = {"resourceVersion": "77"}
        if self.deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:10:00Z"
        return {"metadata": meta, "spec": self.spec, "status": {}}


def _delete_plan() -> SavedCluster:
    recorded = deployment_fingerprint({"metadata": {}, "spec": {"replicas": 3}})
    observed = Observed(
        deployments={"ns/d1": ObservedDeployment("41", 3, recorded)}, pods={}, nodes={}
    )
    step = WriteStep("delete_deployment", "ns", "d1", "41")
    return SavedCluster("east", observed, (step,), decisions={}, group_changes=(), report={})


def _conflict() -> ResourceConflict:
    return ResourceConflict(409, "Conflict", "the object has been modified")


def test_a_write_whose_object_moved_only_in_status_is_retried_at_its_fresh_version() -> None:
    client = _DeleteClient(_conflict(), None)
    result = execute(client, _delete_plan(), field_manager="heteroscale", now_s=0.0)  # type: ignore[arg-type]
    assert result.refused is None and len(result.done) == 1
    assert client.marked_at == ["41", "77"]
    assert client.deleted_at == ["77-marked"]


def test_a_saved_plans_delete_marks_the_deployment_deleted_by_a_plan_first() -> None:
    """The observer tells a deletion a plan made from someone else's by this mark (a
    finalizer may hold the object long after): written at the observed version by a
    field manager of its own (heteroscale's "Update" entries are what an interrupted
    create leaves), and the DELETE made at the version the mark made, so what goes is
    what was marked."""
    client = _DeleteClient(None)
    result = execute(client, _delete_plan(), field_manager="heteroscale", now_s=1767225600.5)  # type: ignore[arg-type]
    assert result.refused is None
    (mark,) = client.marks
    assert mark["field_manager"] == names.DELETION_MARK_MANAGER != names.FIELD_MANAGER
    assert mark["body"] == {
        "metadata": {
            "annotations": {names.DELETED_BY_PLAN_ANNOTATION: "1767225600.500"},
            "resourceVersion": "41",
        }
    }
    assert client.deleted_at == ["41-marked"]


def test_a_deployment_deleted_by_someone_else_since_the_plan_is_neither_marked_nor_deleted() -> (
    None
):
    """Its deletion moved more than its status: its removal is under way (someone
    else's), and marked, it would read as the plan's, which nothing replaces."""
    client = _DeleteClient(_conflict(), None, deleting=True)
    result = execute(client, _delete_plan(), field_manager="heteroscale", now_s=0.0)  # type: ignore[arg-type]
    assert result.refused is not None and "changed since the plan" in result.refused
    assert client.marked_at == ["41"] and client.deleted_at == []


@pytest.mark.parametrize(
    ("retry_answer", "why"),
    [
        (_conflict(), "changed since the plan (resourceVersion precondition failed"),
        (NotFound(404, "NotFound", "gone"), "vanished since the plan"),
    ],
)
def test_a_retry_the_server_refuses_again_stops_the_cluster(
    retry_answer: Exception, why: str
) -> None:
    client = _DeleteClient(_conflict(), retry_answer)
    result = execute(client, _delete_plan(), field_manager="heteroscale", now_s=0.0)  # type: ignore[arg-type]
    assert result.done == [] and result.refused is not None and why in result.refused


def test_a_write_whose_object_changed_beyond_status_is_not_retried() -> None:
    client = _DeleteClient(_conflict(), spec={"replicas": 5})
    result = execute(client, _delete_plan(), field_manager="heteroscale", now_s=0.0)  # type: ignore[arg-type]
    assert result.refused is not None and "changed since the plan" in result.refused
    assert client.marked_at == ["41"] and client.deleted_at == []

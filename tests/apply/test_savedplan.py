"""The saved-plan file (pure): it round-trips exactly, and anything that is not
exactly what `plan --out` wrote is refused with the file named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.apply import names
from reconciler.apply.kubeclient import ApiRejected, Forbidden, NotFound, ResourceConflict
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
    delete_marked,
    deployment_fingerprint,
    execute,
    moved_objects,
    node_fingerprint,
    read_plan,
    to_json,
    write_plan,
)
from reconciler.errors import ClusterUnavailable

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
        delete_answers: tuple[Exception | None, ...] = (),
        unmark_answer: Exception | None = None,
    ):
        self.answers = list(answers)
        self.spec = spec or {"replicas": 3}
        self.deleting = deleting
        self.marks: list[dict] = []  # type: ignore[type-arg]
        self.deleted_at: list[str | None] = []
        # Each DELETE's answer in turn (None, or none left: deleted), and the answer to
        # taking a mark off again (a merge patch setting it to null).
        self.delete_answers = list(delete_answers)
        self.unmark_answer = unmark_answer
        self.unmarks: list[dict] = []  # type: ignore[type-arg]

    @property
    def marked_at(self) -> list[str]:
        return [mark["body"]["metadata"]["resourceVersion"] for mark in self.marks]

    def merge_patch(self, path: str, body: dict, field_manager: str) -> dict:  # type: ignore[type-arg]
        if body["metadata"]["annotations"][names.DELETED_BY_PLAN_ANNOTATION] is None:
            self.unmarks.append({"body": body, "field_manager": field_manager})
            if self.unmark_answer is not None:
                raise self.unmark_answer
            return {"metadata": {"resourceVersion": "unmarked"}}
        self.marks.append({"body": body, "field_manager": field_manager})
        answer = self.answers.pop(0)
        if answer is not None:
            raise answer
        return {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"] + "-marked"}}

    def delete(self, path: str, propagation: str, resource_version: str | None) -> None:
        self.deleted_at.append(resource_version)
        answer = self.delete_answers.pop(0) if self.delete_answers else None
        if answer is not None:
            raise answer

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
    result = execute(
        client,  # type: ignore[arg-type]
        _delete_plan(),
        field_manager="heteroscale",
        now_s=0.0,
        clock=lambda: 1767225600.5,
    )
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
    else's), and nothing is written to it."""
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


def _two_deletes_plan() -> SavedCluster:
    recorded = deployment_fingerprint({"metadata": {}, "spec": {"replicas": 3}})
    observed = Observed(
        deployments={
            f"ns/{name}": ObservedDeployment(rv, 3, recorded)
            for name, rv in (("d1", "41"), ("d2", "42"))
        },
        pods={},
        nodes={},
    )
    steps = (
        WriteStep("delete_deployment", "ns", "d1", "41"),
        WriteStep("delete_deployment", "ns", "d2", "42"),
    )
    return SavedCluster("east", observed, steps, decisions={}, group_changes=(), report={})


def test_each_delete_of_a_saved_plan_is_marked_at_its_own_time_not_the_plans_start() -> None:
    """A saved plan may run long (a rollout awaited before a put back, retries); its
    marks carry the reconciler's time of each, read just before it, where they all
    carried the plan's start. Each mark must change the annotation for the API server
    to time it afresh (the time the observer judges by)."""
    ticks = iter([1767225600.0, 1767226000.25])
    client = _DeleteClient(None, None)
    result = execute(
        client,  # type: ignore[arg-type]
        _two_deletes_plan(),
        field_manager="heteroscale",
        now_s=1767220000.0,
        clock=lambda: next(ticks),
    )
    assert result.refused is None and len(result.done) == 2
    assert [m["body"]["metadata"]["annotations"] for m in client.marks] == [
        {names.DELETED_BY_PLAN_ANNOTATION: "1767225600.000"},
        {names.DELETED_BY_PLAN_ANNOTATION: "1767226000.250"},
    ]


def _server_error() -> ClusterUnavailable:
    return ClusterUnavailable("API server east did not answer DELETE after 4 attempts: HTTP 503")


@pytest.mark.parametrize(
    "failure",
    [
        _server_error(),
        Forbidden(403, "Forbidden", 'admission webhook "keep.example.com" denied the request'),
        ApiRejected(422, "Invalid", "denied by a ValidatingAdmissionPolicy"),
    ],
    ids=["5xx", "webhook", "policy"],
)
@pytest.mark.parametrize("unmark_fails", [False, True])
def test_a_delete_that_fails_after_its_mark_takes_the_mark_off_again(
    failure: Exception, unmark_fails: bool
) -> None:
    """The mark is written, the DELETE then fails: the plan may keep the Deployment, and
    its mark says nothing true. It is taken off (a merge patch setting it to null, by
    the mark's own field manager, at the version the mark made: a DELETE that went
    through, its answer lost, moved the object and keeps its mark), best effort: a
    failure of that is not what the caller hears, the DELETE's is. Not on a 409 (the
    caller re-reads, and marks again, timed afresh, or leaves the object, which someone
    else may be deleting: within the margin of the mark, what the plan wanted anyway),
    nor when the object is gone."""
    for left in (_conflict(), NotFound(404, "NotFound", "gone")):
        untouched = _DeleteClient(None, delete_answers=(left,))
        with pytest.raises(type(left)):
            delete_marked(untouched, "/apis/apps/v1/namespaces/ns/deployments/d1", "41", now_s=1.0)  # type: ignore[arg-type]
        assert untouched.deleted_at == ["41-marked"] and untouched.unmarks == []
    client = _DeleteClient(
        None,
        delete_answers=(failure,),
        unmark_answer=_server_error() if unmark_fails else None,
    )
    with pytest.raises(type(failure)) as raised:
        delete_marked(client, "/apis/apps/v1/namespaces/ns/deployments/d1", "41", now_s=1.0)  # type: ignore[arg-type]
    assert raised.value is failure
    assert client.deleted_at == ["41-marked"]
    assert client.unmarks == [
        {
            "body": {
                "metadata": {
                    "annotations": {names.DELETED_BY_PLAN_ANNOTATION: None},
                    "resourceVersion": "41-marked",
                }
            },
            "field_manager": names.DELETION_MARK_MANAGER,
        }
    ]

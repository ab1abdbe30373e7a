"""Saved plans: ``plan --out PLAN.json`` records the exact writes of one dry-run cycle
and what they were computed from; ``apply PLAN.json`` carries out exactly those
writes, or nothing when the live state moved since.

The file (``SCHEMA_VERSION`` 1)::

    {"format": "heteroscale-plan", "schema_version": 1, "created_at": ...,
     "source": {"kind": "git"|"directory", "rev": ..., "commit": ..., "content_hash": ...},
     "clusters": [{"cluster", "decisions", "group_changes", "report",
                   "observed": {"deployments": {"ns/name": {"resource_version",
                                                            "generation", "fingerprint"}},
                                "pods": {"ns/name": "resourceVersion"},
                                "nodes": {"name": "fingerprint"}},
                   "writes": [WriteStep, ...]}],
     "digest": "sha256 of everything above",
     "signature": "hmac-sha256:<key id>:<hex>"}   (only when signed: ``plansign``)

Staleness is judged by resourceVersion for every Deployment and Pod the plan read or
writes. Nodes are the exception: a Node's resourceVersion moves with every kubelet
status heartbeat, which would make every plan stale within minutes, so a Node is
recorded by a fingerprint of exactly what the placement reads from it (its labels
and GPU capacity) and of its uid, which tells another cluster's Node of the same name
(or one replaced) from the one the plan read.

What the digest protects, and what not: it is a sha256 of the content, a checksum,
not a signature. It refuses a damaged file and a careless hand edit; anyone who edits
the file on purpose recomputes it in one line. So ``apply`` trusts nothing in the file
because of it: every entry is checked for shape and bounds and against what the plan
says it observed (``from_json``, ``reconciler.apply.plancheck``), each write must be
within what the desired-state revision the plan names has the reconciler manage
(``check_scope``), every Deployment it writes exactly what that revision's policy and
pod template render for the group, domain, GPU type and replicas it names, and the
live objects must still be those the plan observed. What remains trusted is those
replicas and that group's placement (within the cluster's switches and GPU types):
the plan file must come from a trusted ``plan --out`` for them to be the
reconciler's decisions. A signed plan (``plansign``) is that: ``apply PLAN
--signing-key-file`` refuses any plan not signed with the key, or changed since.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from reconciler.apply import names, plancheck, plansign
from reconciler.apply.kubeclient import (
    FieldOwnershipConflict,
    KubeClient,
    NotFound,
    ResourceConflict,
    deployments_path,
    pods_path,
    status_causes,
)
from reconciler.atomic_write import replace_text
from reconciler.bounded_read import BoundedReadError, read_named_file
from reconciler.dns1123 import label_problem, subdomain_problem
from reconciler.errors import PermanentError
from reconciler.strict_json import DuplicateKeyError, loads_unique

if TYPE_CHECKING:
    from reconciler.desired.loader import DesiredState
    from reconciler.observe.kubernetes import ClusterSnapshot

FORMAT = "heteroscale-plan"
SCHEMA_VERSION = 1
MAX_PLAN_BYTES = 64 * 1024 * 1024

WriteOp = Literal["apply", "drain", "put_back", "delete_deployment", "delete_pod"]
_OPS = ("apply", "drain", "put_back", "delete_deployment", "delete_pod")


class PlanFileError(PermanentError):
    """A plan file that cannot be read, is not a plan, or was edited."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        super().__init__(f"plan file {path}: {message}")


class StalePlan(PermanentError):
    """The live state or the desired state moved since the plan was computed."""

    def __init__(self, moved: list[str]):
        self.moved = moved
        super().__init__("the plan is stale: " + "; ".join(moved))


@dataclass(frozen=True)
class WriteStep:
    """One write to the API server, in the order apply makes them.

    ``resource_version`` is the precondition (the object as observed); None only for
    an ``apply`` that creates the object, which must then not exist."""

    op: WriteOp
    namespace: str
    name: str
    resource_version: str | None = None
    manifest: dict[str, Any] | None = None  # apply only
    source: str = ""  # drain only: the Deployment the Pod leaves

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        what = "Pod" if self.op in ("drain", "put_back", "delete_pod") else "Deployment"
        verb = {
            "apply": "create" if self.resource_version is None else "apply",
            "drain": "drain",
            "put_back": "put back",
            "delete_deployment": "delete",
            "delete_pod": "delete",
        }[self.op]
        return f"{verb} {what} {self.key}"


@dataclass(frozen=True)
class ObservedDeployment:
    resource_version: str
    generation: int
    fingerprint: str  # labels, annotations and spec: what someone else could edit


@dataclass(frozen=True)
class Observed:
    deployments: Mapping[str, ObservedDeployment] = field(default_factory=dict)
    pods: Mapping[str, str] = field(default_factory=dict)
    nodes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SavedCluster:
    cluster: str
    observed: Observed
    writes: tuple[WriteStep, ...]
    decisions: Mapping[str, Any] = field(default_factory=dict)  # for the reader
    group_changes: tuple[Mapping[str, Any], ...] = ()
    report: Mapping[str, Any] = field(default_factory=dict)  # the dry-run diff


@dataclass(frozen=True)
class PlanSource:
    """Which desired state the plan was computed from."""

    kind: Literal["git", "directory"]
    content_hash: str
    rev: str | None = None
    commit: str | None = None

    def describe(self) -> str:
        if self.kind == "git":
            return f"revision {self.rev} ({(self.commit or '')[:12]})"
        return f"directory content {self.content_hash[:16]}"


@dataclass(frozen=True)
class SavedPlan:
    source: PlanSource
    clusters: tuple[SavedCluster, ...]
    created_at: str = ""
    # The key id of the plan's signature: verified when ``read_plan`` was given the
    # key, only claimed (well-formed) when not. None: the plan is not signed.
    signed_by: str | None = None

    @property
    def writes(self) -> int:
        return sum(len(c.writes) for c in self.clusters)


# ------------------------------------------------------------------ fingerprints


def _hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def deployment_fingerprint(obj: Mapping[str, Any]) -> str:
    """What a person or another tool can change on a Deployment: status moves with
    the controllers (and with our own drains) and is left out."""
    meta = obj.get("metadata") or {}
    return _hash(
        {
            "labels": meta.get("labels") or {},
            "annotations": meta.get("annotations") or {},
            "spec": obj.get("spec") or {},
        }
    )[:32]


def node_fingerprint(labels: Mapping[str, str], gpus: int | None, uid: str) -> str:
    """``gpus`` None: the capacity did not read (``LiveNode.gpus``). ``uid``: which
    object of that name the Node is; without it a plan made on one cluster applied,
    through a kubeconfig context of the same name, to another built from the same
    cluster file (same Node names and labels), and wrote there."""
    return _hash({"labels": dict(labels), "gpus": gpus, "uid": uid})[:32]


def desired_content_hash(state: Any) -> str:
    """Hash of everything the cycle reads from the desired state (policies, clusters,
    pod templates), the same for a directory and the Git revision holding it."""
    return _hash(
        {
            "policies": {n: p.model_dump(mode="json") for n, p in state.policies.items()},
            "clusters": {n: c.model_dump(mode="json") for n, c in state.clusters.items()},
            "templates": dict(state.templates),
        }
    )


# ---------------------------------------------------------------- (de)serialising


def to_json(plan: SavedPlan, signing_key: plansign.SigningKey | None = None) -> dict[str, Any]:
    """The plan file's content; signed (``plansign``) with ``signing_key``."""
    body: dict[str, Any] = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_at": plan.created_at,
        "source": {k: v for k, v in asdict(plan.source).items() if v is not None},
        "clusters": [
            {
                "cluster": c.cluster,
                "decisions": dict(c.decisions),
                "group_changes": [dict(g) for g in c.group_changes],
                "report": dict(c.report),
                "observed": {
                    "deployments": {
                        k: asdict(v) for k, v in sorted(c.observed.deployments.items())
                    },
                    "pods": dict(sorted(c.observed.pods.items())),
                    "nodes": dict(sorted(c.observed.nodes.items())),
                },
                "writes": [
                    {k: v for k, v in asdict(w).items() if v not in (None, "")} for w in c.writes
                ],
            }
            for c in plan.clusters
        ],
    }
    body["digest"] = "sha256:" + _hash(body)
    if signing_key is not None:
        body["signature"] = plansign.signature_of(body, signing_key)
    return body


def write_plan(plan: SavedPlan, path: Path, signing_key: plansign.SigningKey | None = None) -> None:
    text = json.dumps(to_json(plan, signing_key), indent=2, sort_keys=True, default=str) + "\n"
    replace_text(path, text)  # never a half-written plan under the final name


def _want(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise PlanFileError(path, message)


def _versions(value: Any, path: Path, where: str) -> dict[str, str]:
    """``observed.pods``: namespace/name to resourceVersion."""
    _want(isinstance(value, dict), path, f"{where} must be an object")
    for key, version in value.items():
        problem = plancheck.key_problem(key) or plancheck.resource_version_problem(version)
        _want(problem is None, path, f"{where}[{key!r}]: {problem}")
    return dict(value)


def _node_fingerprints(value: Any, path: Path, where: str) -> dict[str, str]:
    _want(isinstance(value, dict), path, f"{where} must be an object")
    for name, fingerprint in value.items():
        problem = subdomain_problem(name)
        _want(problem is None, path, f"{where}[{name!r}]: node name {problem}")
        problem = plancheck.fingerprint_problem(fingerprint)
        _want(problem is None, path, f"{where}[{name!r}] {problem}")
    return dict(value)


def _known_fields(raw: Mapping[str, Any], allowed: set[str], path: Path, where: str) -> None:
    """Refuse a field ``plan --out`` never writes: one the applier would not read is
    one a reviewer of the file could be misled by."""
    unknown = set(raw) - allowed
    _want(not unknown, path, f"{where}unknown field(s) {', '.join(sorted(unknown))}")


_STEP_FIELDS = {"op", "namespace", "name", "resource_version", "manifest", "source"}
_CLUSTER_FIELDS = {"cluster", "observed", "writes", "decisions", "group_changes", "report"}


def _step(raw: Any, path: Path, where: str, cluster: str) -> WriteStep:
    _want(isinstance(raw, dict), path, f"{where} must be an object")
    _known_fields(raw, _STEP_FIELDS, path, f"{where}: ")
    op = raw.get("op")
    _want(op in _OPS, path, f"{where}.op must be one of {', '.join(_OPS)}")
    for key in ("namespace", "name"):
        _want(isinstance(raw.get(key), str) and raw[key], path, f"{where}.{key} missing")
    rv = raw.get("resource_version")
    _want(rv is None or isinstance(rv, str), path, f"{where}.resource_version must be a string")
    manifest = raw.get("manifest")
    if op == "apply":
        _want(isinstance(manifest, dict), path, f"{where}.manifest missing")
    else:
        _want(manifest is None, path, f"{where}: only an apply carries a manifest")
        _want(rv is not None, path, f"{where}.resource_version missing")
    source = raw.get("source", "")
    _want(isinstance(source, str), path, f"{where}.source must be a string")
    step = WriteStep(op, raw["namespace"], raw["name"], rv, manifest, source)
    problem = plancheck.step_problem(step, cluster)
    _want(problem is None, path, f"{where} ({op}): {problem}")
    return step


def _cluster(raw: Any, path: Path, where: str) -> SavedCluster:
    _want(isinstance(raw, dict), path, f"{where} must be an object")
    _known_fields(raw, _CLUSTER_FIELDS, path, f"{where}: ")
    name = raw.get("cluster")
    problem = label_problem(name)
    _want(problem is None, path, f"{where}.cluster {name!r}: {problem}")
    observed = raw.get("observed")
    _want(isinstance(observed, dict), path, f"{where}.observed missing")
    deployments = observed.get("deployments")
    _want(isinstance(deployments, dict), path, f"{where}.observed.deployments missing")
    parsed: dict[str, ObservedDeployment] = {}
    for key, value in deployments.items():
        entry = f"{where}.observed.deployments[{key!r}]"
        problem = plancheck.key_problem(key)
        _want(problem is None, path, f"{entry}: {problem}")
        _want(
            isinstance(value, dict)
            and set(value) == {"resource_version", "generation", "fingerprint"},
            path,
            f"{entry} is not a recorded Deployment",
        )
        generation = value["generation"]
        problem = (
            plancheck.resource_version_problem(value["resource_version"])
            or plancheck.fingerprint_problem(value["fingerprint"])
            or (
                None
                if isinstance(generation, int)
                and not isinstance(generation, bool)
                and generation >= 0
                else "generation must be a whole number"
            )
        )
        _want(problem is None, path, f"{entry}: {problem}")
        parsed[key] = ObservedDeployment(
            value["resource_version"], generation, value["fingerprint"]
        )
    writes = raw.get("writes")
    _want(isinstance(writes, list), path, f"{where}.writes missing")
    # Only for the reader (the applier never reads them): objects, or absent.
    decisions = raw.get("decisions", {})
    _want(isinstance(decisions, dict), path, f"{where}.decisions must be an object")
    report = raw.get("report", {})
    _want(isinstance(report, dict), path, f"{where}.report must be an object")
    group_changes = raw.get("group_changes", [])
    _want(
        isinstance(group_changes, list) and all(isinstance(g, dict) for g in group_changes),
        path,
        f"{where}.group_changes must be a list of objects",
    )
    cluster = SavedCluster(
        cluster=name,
        observed=Observed(
            parsed,
            _versions(observed.get("pods"), path, f"{where}.observed.pods"),
            _node_fingerprints(observed.get("nodes"), path, f"{where}.observed.nodes"),
        ),
        writes=tuple(_step(w, path, f"{where}.writes[{i}]", name) for i, w in enumerate(writes)),
        decisions=decisions,
        group_changes=tuple(group_changes),
        report=report,
    )
    problems = plancheck.writes_problems(cluster, f"{where}.")
    _want(not problems, path, _listed_problems(problems))
    return cluster


def _listed_problems(problems: list[plancheck.Problem], limit: int = 10) -> str:
    shown = [f"{entry}: {problem}" for entry, problem in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"... and {len(problems) - limit} more")
    return "; ".join(shown)


_TOP_LEVEL = {
    "format",
    "schema_version",
    "created_at",
    "source",
    "clusters",
    "digest",
    "signature",
}
_SOURCE_FIELDS = {"kind", "content_hash", "rev", "commit"}


def from_json(data: Any, path: Path, signing_keys: Sequence[plansign.SigningKey] = ()) -> SavedPlan:
    """The plan in ``data``, checked whole before anything is used: a file that is
    not exactly what ``plan --out`` wrote is refused. The digest catches damage and
    careless edits only; what may be written is checked entry by entry
    (``plancheck``), as if the file came from anyone. With ``signing_keys`` the plan
    must also be signed with one of them, and unchanged since (``plansign``)."""
    _want(isinstance(data, dict), path, "not a JSON object")
    _want(data.get("format") == FORMAT, path, f"not a heteroscale plan (format != '{FORMAT}')")
    version = data.get("schema_version")
    _want(
        version == SCHEMA_VERSION,
        path,
        f"schema_version {version!r} is not supported (this heteroscale reads {SCHEMA_VERSION})",
    )
    body = {k: v for k, v in data.items() if k not in ("digest", "signature")}
    _want(
        data.get("digest") == "sha256:" + _hash(body),
        path,
        "digest does not match the content: the file was edited or damaged after `plan --out`",
    )
    _known_fields(data, _TOP_LEVEL, path, "")
    signed_by = plansign.signed_key_id(data.get("signature"))
    _want(
        "signature" not in data or signed_by is not None,
        path,
        f"signature is not of the form {plansign.ALGORITHM}:<16 hex>:<64 hex>",
    )
    if signing_keys:
        problem = plansign.signature_problem(data, signing_keys)
        _want(problem is None, path, str(problem))
    created_at = data.get("created_at", "")
    problem = plancheck.text_problem(created_at, limit=64)
    _want(problem is None, path, f"created_at {problem}")
    source = data.get("source")
    _want(isinstance(source, dict), path, "source missing")
    _known_fields(source, _SOURCE_FIELDS, path, "source: ")
    kind = source.get("kind")
    _want(kind in ("git", "directory"), path, "source.kind must be git or directory")
    problem = plancheck.content_hash_problem(source.get("content_hash"))
    _want(problem is None, path, f"source.content_hash {problem}")
    if kind == "git":
        problem = plancheck.commit_problem(source.get("commit"))
        _want(problem is None, path, f"source.commit {problem}")
    if source.get("rev") is not None:
        problem = plancheck.rev_problem(source["rev"])
        _want(problem is None, path, f"source.rev {problem}")
    clusters = data.get("clusters")
    _want(isinstance(clusters, list), path, "clusters missing")
    parsed = tuple(_cluster(c, path, f"clusters[{i}]") for i, c in enumerate(clusters))
    seen = [c.cluster for c in parsed]
    twice = sorted({c for c in seen if seen.count(c) > 1})
    _want(not twice, path, f"cluster(s) {', '.join(twice)} appear more than once")
    return SavedPlan(
        source=PlanSource(kind, source["content_hash"], source.get("rev"), source.get("commit")),
        clusters=parsed,
        created_at=created_at,
        signed_by=signed_by,
    )


def check_scope(plan: SavedPlan, state: DesiredState, path: Path, *, content: bool = True) -> None:
    """Refuse (``PlanFileError``, every offending entry named) a plan that writes
    anything the desired state ``state`` (the revision the plan names, as loaded by
    ``apply``) does not have this reconciler manage (``plancheck.scope_problems``;
    ``content=False`` where ``state`` is not the plan's revision: its templates may
    differ, and such a plan is refused as stale anyway). ``apply PLAN`` must call it
    before its first write, and ``check_leftovers`` too: the removals of a moved
    service's leftovers are left to it."""
    problems = plancheck.scope_problems(plan, state, content=content)
    _want(
        not problems,
        path,
        "writes outside what the desired state manages: " + _listed_problems(problems),
    )


def check_leftovers(
    plan: SavedPlan,
    state: DesiredState,
    snapshots: Mapping[str, ClusterSnapshot | None],
    path: Path,
) -> None:
    """Refuse (``PlanFileError``) a plan whose removals outside the managed namespaces,
    which ``check_scope`` leaves to the live objects, remove anything but the leftovers
    of a service that moved to another namespace (``plancheck.leftover_problems``).
    ``apply PLAN`` must call it after reading each cluster, once the plan is found
    current (so the live objects are those the plan observed), before its first write."""
    problems = plancheck.leftover_problems(plan, state, snapshots)
    _want(
        not problems,
        path,
        "writes outside what the desired state manages: " + _listed_problems(problems),
    )


def read_plan(path: Path, signing_keys: Sequence[plansign.SigningKey] = ()) -> SavedPlan:
    """The plan in the file at ``path``, read as a regular file of at most
    ``MAX_PLAN_BYTES`` (a FIFO or ``/dev/zero`` is refused, not read for ever) and
    checked whole (``from_json``, with ``signing_keys`` its signature too);
    ``PlanFileError`` names the file and what is wrong."""
    try:
        raw = read_named_file(path, MAX_PLAN_BYTES)
    except BoundedReadError as exc:
        raise PlanFileError(path, exc.reason) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PlanFileError(path, "not UTF-8 text") from None
    try:
        data = loads_unique(text)
    except DuplicateKeyError as exc:
        raise PlanFileError(
            path,
            f"key {exc.key!r} appears twice in one object: a reader could see the one "
            "that is not applied",
        ) from None
    except ValueError as exc:  # JSONDecodeError, and RecursionError's cousins
        raise PlanFileError(path, f"not valid JSON ({exc})") from None
    except RecursionError:
        raise PlanFileError(path, "not valid JSON (nested too deeply)") from None
    return from_json(data, path, signing_keys)


# ------------------------------------------------------------------ staleness


def moved_objects(recorded: Observed, now: Observed, *, limit: int = 20) -> list[str]:
    """What differs between the state a plan was computed from and the state now,
    each named (at most ``limit``, then a count)."""
    moved: list[str] = []

    def compare(kind: str, before: Mapping[str, Any], after: Mapping[str, Any], what: str) -> None:
        for key in sorted(before.keys() | after.keys()):
            if key not in after:
                moved.append(f"{kind} {key} vanished")
            elif key not in before:
                moved.append(f"{kind} {key} appeared")
            elif before[key] != after[key]:
                moved.append(f"{kind} {key} changed ({what} {before[key]} -> {after[key]})")

    compare(
        "Deployment",
        {k: v.resource_version for k, v in recorded.deployments.items()},
        {k: v.resource_version for k, v in now.deployments.items()},
        "resourceVersion",
    )
    compare("Pod", recorded.pods, now.pods, "resourceVersion")
    compare("Node", recorded.nodes, now.nodes, "fingerprint of labels, GPUs and uid")
    if recorded.nodes and all(now.nodes.get(n) != f for n, f in recorded.nodes.items()):
        moved.insert(
            0,
            "every Node differs from the plan's: another cluster than the one it was made on "
            "(check the kubeconfig context), or every Node replaced",
        )
    if len(moved) > limit:
        moved = [*moved[:limit], f"... and {len(moved) - limit} more"]
    return moved


# ------------------------------------------------------------------ carrying out

# How long a put-back waits for the Deployment controller to pass the raised replicas
# on to the ReplicaSet (``await_rollout``).
ROLLOUT_WAIT_S = 10.0


def await_rollout(
    client: KubeClient,
    namespace: str,
    name: str,
    generation: int | None = None,
    *,
    timeout_s: float = ROLLOUT_WAIT_S,
) -> bool:
    """Wait until the Deployment controller has acted on the Deployment's spec
    (``status.observedGeneration`` >= ``generation``, default: the current one), so its
    ReplicaSet has the new replicas. A put-back must wait for it: the ReplicaSet adopts
    a relabelled Pod at once, and one still at the old, lower replicas would delete a
    serving Pod to make room (seen on 1.20: a ready instance lost). False on timeout."""
    deadline = time.monotonic() + timeout_s
    path = deployments_path(namespace, name)
    while True:
        obj = client.get(path)
        want = generation if generation is not None else obj["metadata"].get("generation", 0)
        if int(obj.get("status", {}).get("observedGeneration", 0)) >= int(want):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@dataclass
class SavedApplyResult:
    cluster: str
    done: list[str] = field(default_factory=list)
    refused: str | None = None  # what moved between the check and a write


def execute(
    client: KubeClient,
    saved: SavedCluster,
    *,
    field_manager: str,
    now_s: float,
    clock: Callable[[], float] = time.time,
) -> SavedApplyResult:
    """Carry out ``saved.writes`` in order, each with its precondition: a create must
    not find the object, every other write must find it at the recorded
    resourceVersion. The first write the server refuses stops the cluster (the
    writes before it stay: the order adds capacity before it removes any).

    Our own writes move resourceVersions (a drain, then deleting that Pod), so the
    precondition of a later write to the same object is what our last write returned.
    A Deployment whose resourceVersion moved while its labels, annotations and spec
    did not (its status, updated by the controllers, e.g. after our drain) is written
    at its new resourceVersion: status is not part of what the plan was approved on.

    ``now_s`` is the plan's start (a drain's time); ``clock`` is read at each
    Deployment delete's mark (``delete_marked``), which must differ from a mark left
    there before for the API server to time it afresh."""
    result = SavedApplyResult(saved.cluster)
    # ``read_plan`` checked all this; a plan made in code is checked here, and a bad
    # one refused before its first write, not halfway.
    for index, step in enumerate(saved.writes):
        problem = plancheck.step_problem(step, saved.cluster)
        if problem is not None:
            result.refused = f"writes[{index}] ({step.op}): {problem}; nothing written"
            return result
    for entry, problem in plancheck.writes_problems(saved):
        result.refused = f"{entry}: {problem}; nothing written"
        return result
    latest: dict[str, str] = {}
    for index, step in enumerate(saved.writes):
        previous = saved.writes[index - 1] if index else None
        if (
            step.op == "put_back"
            and previous is not None
            and previous.op == "apply"
            and not await_rollout(client, previous.namespace, previous.name)
        ):
            result.refused = (
                f"{step}: Deployment {previous.key} did not pass its new replicas on to its "
                f"ReplicaSet within {ROLLOUT_WAIT_S:g} s; not put back (a later cycle does)"
            )
            return result
        rv = latest.get(step.key, step.resource_version)
        try:
            new_rv = _write_past_status(
                client,
                step,
                rv,
                saved.observed,
                field_manager=field_manager,
                now_s=now_s,
                clock=clock,
            )
        except ResourceConflict as exc:
            result.refused = f"{step}: {_conflict_reason(step, exc)}"
            return result
        except FieldOwnershipConflict as exc:
            result.refused = f"{step}: changed by another field manager ({'; '.join(exc.conflicts) or exc.api_message})"
            return result
        except NotFound:
            result.refused = f"{step}: vanished since the plan"
            return result
        if new_rv:
            latest[step.key] = new_rv
        result.done.append(str(step))
    return result


def _write_past_status(
    client: KubeClient,
    step: WriteStep,
    rv: str | None,
    observed: Observed,
    *,
    field_manager: str,
    now_s: float,
    clock: Callable[[], float],
) -> str | None:
    """``_write`` at ``rv``; when the precondition fails only because the Deployment's
    status moved (``_status_only``), once more at its fresh resourceVersion."""
    try:
        return _write(client, step, rv, field_manager=field_manager, now_s=now_s, clock=clock)
    except ResourceConflict:
        moved = _status_only(client, step, observed)
        if moved is None:
            raise
    return _write(client, step, moved, field_manager=field_manager, now_s=now_s, clock=clock)


def _conflict_reason(step: WriteStep, exc: ResourceConflict) -> str:
    if step.op == "apply" and step.resource_version is None:
        return "appeared since the plan (it was to be created)"
    return f"changed since the plan (resourceVersion precondition failed: {exc.api_message})"


def _status_only(client: KubeClient, step: WriteStep, observed: Observed) -> str | None:
    """The fresh resourceVersion of a Deployment whose only change since the plan is
    its status; None when anything else moved (or it is not a Deployment)."""
    recorded = observed.deployments.get(step.key)
    if recorded is None or step.op not in ("apply", "delete_deployment"):
        return None
    try:
        fresh = client.get(deployments_path(step.namespace, step.name))
    except NotFound:
        return None
    # Being deleted since is more than its status: its removal is under way (someone
    # else's: a mark written after it would not make it the plan's), nothing is to be
    # written to it (``actions._leave_being_deleted``).
    if deployment_fingerprint(fresh) != recorded.fingerprint or being_deleted(fresh):
        return None
    return str(fresh["metadata"]["resourceVersion"])


# A Deployment just created gets its status written by the controllers at once, which
# moves its resourceVersion under our relabelling patch: retry on those moves only.
RELABEL_ATTEMPTS = 5


def adopt_created(
    client: KubeClient, path: str, created: dict[str, Any], field_manager: str
) -> str:
    """The POST's fields are recorded as our "Update", not our "Apply": our next
    server-side apply would then conflict with ourselves. Re-label that entry as our
    apply (what kubectl's client- to server-side apply upgrade does), at the created
    object's resourceVersion; when only its status moved since (same generation: the
    controllers, not a person), again at the new one. The new resourceVersion."""
    current = created
    generation = created["metadata"].get("generation")
    for attempt in range(RELABEL_ATTEMPTS):
        entries = [
            {**e, "operation": "Apply"} if names.is_update_entry_of(e, field_manager) else e
            for e in current["metadata"].get("managedFields") or []
        ]
        rv = str(current["metadata"]["resourceVersion"])
        try:
            answer = client.merge_patch(
                path,
                {"metadata": {"managedFields": entries, "resourceVersion": rv}},
                field_manager=field_manager,
            )
            return str(answer["metadata"]["resourceVersion"])
        except ResourceConflict:
            current = client.get(path)
            if (
                current["metadata"].get("generation") != generation
                or attempt == RELABEL_ATTEMPTS - 1
            ):
                raise  # its spec changed: not ours to relabel over
    raise AssertionError("unreachable")  # the loop returns or raises


def conflicts_only_with(exc: FieldOwnershipConflict, field_manager: str) -> bool:
    """Whether every field of a server-side apply's conflict is held by
    ``field_manager`` alone (``conflict with "MANAGER" using apps/v1``; several holders
    read ``conflicts with`` and a list). Our own name there is our create's "Update"
    entry that ``adopt_created`` never relabelled (the process died between the two):
    not a change made outside Git."""
    causes = status_causes(exc.body)
    prefix = f'conflict with "{field_manager}"'
    return bool(causes) and all(
        str(c.get("message", "")).startswith(prefix) and str(c.get("message", "")).count('"') == 2
        for c in causes
    )


def _write(
    client: KubeClient,
    step: WriteStep,
    rv: str | None,
    *,
    field_manager: str,
    now_s: float,
    clock: Callable[[], float],
) -> str | None:
    """One write with its precondition; the object's new resourceVersion."""
    if step.op == "apply":
        assert step.manifest is not None
        path = deployments_path(step.namespace, step.name)
        manifest = {**step.manifest, "metadata": dict(step.manifest["metadata"])}
        manifest["metadata"].pop("resourceVersion", None)
        if rv is None:
            # Server-side apply creates whatever resourceVersion it is given, so a
            # create that must not find the object is a POST (409 AlreadyExists)...
            created = client.request(
                "POST",
                deployments_path(step.namespace),
                query={"fieldManager": field_manager},
                body=manifest,
            )
            return adopt_created(client, path, created, field_manager)
        manifest["metadata"]["resourceVersion"] = rv
        try:
            answer = client.apply(path, manifest, field_manager=field_manager)
        except FieldOwnershipConflict as exc:
            if not conflicts_only_with(exc, field_manager):
                raise
            # Our own create's fields, never relabelled: relabelled now, at the
            # observed object (a spec moved since is refused there), then applied.
            observed = client.get(path)
            if str(observed["metadata"].get("resourceVersion")) != rv:
                raise
            manifest["metadata"]["resourceVersion"] = adopt_created(
                client, path, observed, field_manager
            )
            answer = client.apply(path, manifest, field_manager=field_manager)
        return str(answer["metadata"]["resourceVersion"])
    if step.op in ("drain", "put_back"):
        patch = relabel_patch(drain=step.op == "drain", now_s=now_s, source=step.source)
        patch["metadata"]["resourceVersion"] = rv
        answer = client.merge_patch(
            pods_path(step.namespace, step.name), patch, field_manager=field_manager
        )
        return str(answer["metadata"]["resourceVersion"])
    if step.op == "delete_deployment":
        assert rv is not None  # a saved plan's delete always names what it observed
        delete_marked(client, deployments_path(step.namespace, step.name), rv, now_s=clock())
    else:
        client.delete(
            pods_path(step.namespace, step.name), propagation="Background", resource_version=rv
        )
    return None


def being_deleted(obj: Mapping[str, Any]) -> bool:
    """Whether the object read carries a deletionTimestamp (a finalizer or the garbage
    collector holds it): its removal is under way, by whoever asked for it."""
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def delete_marked(client: KubeClient, path: str, resource_version: str, *, now_s: float) -> None:
    """Delete the Deployment at ``path`` as heteroscale does (apply and saved plans):
    first marked deleted by a plan (``names.DELETED_BY_PLAN_ANNOTATION``, written by
    ``names.DELETION_MARK_MANAGER``) at ``resource_version`` (the object as observed),
    then deleted at the version the mark made, so what goes is exactly what was marked.
    A finalizer may then hold it; the mark tells the observer nothing is to replace it.
    Either write answers ``ResourceConflict`` when the object moved; the caller's
    conflict handling decides.

    The observer times the mark by the API server, not by its value: the ``time`` its
    managedFields entry records, which a deletionTimestamp at most
    ``observe.kubernetes.OWN_DELETION_MARGIN_S`` later makes heteroscale's own deletion
    (``LiveDeployment.deleted_by_plan``). The value is for people: the reconciler's
    time of this mark, ``now_s`` (read just before it, not a plan's start). It must be
    new on every mark: a merge patch that changes nothing leaves the entry at the time
    of the mark before it (one left by a failed DELETE), and this deletion would read
    as someone else's.

    When the DELETE fails, other than on a conflict (the caller re-reads, and marks
    again or leaves the object) or on the object having gone, the mark is taken off
    again, best effort (``_unmark``)."""
    marked = client.merge_patch(
        path,
        {
            "metadata": {
                "annotations": {names.DELETED_BY_PLAN_ANNOTATION: names.deletion_mark(now_s)},
                "resourceVersion": resource_version,
            }
        },
        field_manager=names.DELETION_MARK_MANAGER,
    )
    marked_version = str(marked["metadata"]["resourceVersion"])
    try:
        client.delete(path, propagation="Background", resource_version=marked_version)
    except (ResourceConflict, NotFound):
        raise
    except Exception:
        _unmark(client, path, marked_version)
        raise


def _unmark(client: KubeClient, path: str, marked_version: str) -> None:
    """Take off the mark ``delete_marked`` wrote (at ``marked_version``) when its
    DELETE failed (a 5xx or timeout after the client's retries, an admission webhook
    or policy refusing it, a lost permission), so the object the plan may now keep
    carries no word of a deletion that did not happen. Best effort, any failure
    ignored: the observer's rule makes a mark left behind harmless anyway (someone
    else's deletion later comes long after the server's time of the mark, and reads as
    theirs, replaced). At the marked version: a DELETE that did go through, its answer
    lost, moved the object (a finalizer holds it) or removed it, and its mark stays."""
    with contextlib.suppress(Exception):
        client.merge_patch(
            path,
            {
                "metadata": {
                    "annotations": {names.DELETED_BY_PLAN_ANNOTATION: None},
                    "resourceVersion": marked_version,
                }
            },
            field_manager=names.DELETION_MARK_MANAGER,
        )


def relabel_patch(*, drain: bool, now_s: float, source: str) -> dict[str, Any]:
    """The merge patch that takes a Pod out of (or back into) service discovery."""
    if drain:
        return {
            "metadata": {
                "labels": {names.SERVING_LABEL: names.DRAINING},
                "annotations": {
                    names.DRAINED_AT_ANNOTATION: f"{now_s:.3f}",
                    names.DRAINED_FROM_ANNOTATION: source,
                },
                # Leave the ReplicaSet now, so deleting the Deployment cannot
                # garbage-collect a Pod that is still draining.
                "ownerReferences": None,
            }
        }
    return {
        "metadata": {
            "labels": {names.SERVING_LABEL: names.SERVING},
            "annotations": {
                names.DRAINED_AT_ANNOTATION: None,
                names.DRAINED_FROM_ANNOTATION: None,
            },
        }
    }

"""Read one cluster's live state from the Kubernetes API: our workloads, their Pods,
and the Nodes, turned into a ``FleetState`` and a list of ``Drift``.

The reading (``read_snapshot``) is the only I/O here: three list calls, parsed as
plain JSON. Everything after it is pure and tested without a server:

- ``fleet_from_snapshot``: our Deployments (ownership label + cluster label) grouped
  by (service, group id) into ``DeploymentGroup``s. ``instances`` is the Deployment's
  ``spec.replicas`` (what is placed); ``starting`` = replicas - readyReplicas;
  ``draining`` = Pods out of service discovery after a soft scale-in (label
  ``heteroscale.io/serving=false``), which no longer count as capacity.
- ``node_drift``: the cluster file against the Nodes: a Node missing, a topology or
  GPU-type label that disagrees, a GPU capacity that differs or does not read, a GPU
  Node the file does not know. Placement counts the cluster file's GPUs, never the
  live capacity, so a capacity that differs or does not read is reported and changes
  no plan.
- ``ownership_drift``: a Deployment whose spec fields are also managed by someone
  else (``managedFields``): it was changed outside Git.
- ``replica_drift``: a Deployment whose ``spec.replicas`` is not what heteroscale last
  applied (the ``heteroscale.io/applied-replicas`` annotation it writes with every
  apply). This catches what ``managedFields`` cannot: on Kubernetes 1.20 a change
  through the scale subresource (``kubectl scale``) leaves no managed-fields entry.

Replica drift, the behaviour (decided here, followed by the cycle and the loop): the
fleet counts a drifted Deployment at the replicas heteroscale last applied, never at
the hand-edited value, so the decision and the placement see every deployment group
in the shape heteroscale left it and a planned scale-in is never spread over the
other groups to make up for the hand edit. Then:

- nobody else owns ``spec.replicas`` (the scale subresource on 1.20, or any writer
  that leaves no managed-fields entry): the plan takes the hand edit back, in the
  group's shape, through the normal write path (a hand scale-up leaves through soft
  scale-in, a hand scale-down is scaled up again);
- another field manager owns it (``kubectl edit``/``patch``/``apply``, or the scale
  subresource on servers that record it): server-side apply refuses to overwrite
  it without ``--force``; the loop then holds the whole service (no group of it
  changes size this cycle, the cooldown is not re-armed) and reports why, until the
  edit is reverted or ``--force`` takes it back.

Either way the drift is a ``FieldDrift`` (object, field, live and desired value):
logged by the loop, counted in ``heteroscale_drift_total``, listed in every report.

Deployments are listed cluster-wide when allowed, else namespace by namespace (the
least-privilege RBAC of deploy/ grants only the managed namespaces).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, wraps
from typing import Any, Generic, TypeVar

from reconciler.apply import names
from reconciler.apply.kubeclient import (
    Forbidden,
    JsonObject,
    KubeClient,
    deployments_path,
    nodes_path,
    pods_path,
)
from reconciler.apply.lease import parse_micro_time
from reconciler.apply.render import ObjectKey, is_domain_of
from reconciler.daemon_pool import DaemonThreadPool
from reconciler.desired.models import (
    MAX_GPUS_PER_INSTANCE,
    MAX_GPUS_PER_NODE,
    MAX_INSTANCES,
    ClusterSpec,
    ServicePolicy,
)
from reconciler.errors import ClusterUnavailable
from reconciler.observe.base import Drift, Observation
from reconciler.placement.base import UngroupedInstances
from reconciler.state import ROLES, DeploymentGroup, FleetState, GroupRole, NodeInstances, Role
from reconciler.text_safety import quoted, visible

# Managers that write our objects as part of normal operation (status, revision
# annotations); anything else on spec fields is somebody changing them by hand.
SYSTEM_MANAGERS = frozenset(
    {"kube-controller-manager", names.FIELD_MANAGER, names.DELETION_MARK_MANAGER}
)
# A Kubernetes uid is a 36-character UUID; more is an answer to cut, not to hold.
MAX_UID_CHARS = 64


@dataclass(frozen=True)
class FieldDrift(Drift):
    """A drift item that names the field, its live value and the value heteroscale
    (or the cluster file) wants; ``detail`` is the same as one line."""

    path: str = ""
    live: str | None = None
    desired: str | None = None


# How long before a Deployment's deletionTimestamp the API server may have recorded
# heteroscale's mark of that deletion (``names.DELETED_BY_PLAN_ANNOTATION``, timed by
# the ``names.DELETION_MARK_MANAGER`` entry of its managedFields) for the deletion to
# be the plan's. Both times are the API server's clock, in whole seconds, so no clock
# skew is allowed for (API servers sharing one address keep NTP time; a second between
# them at worst makes a deletion read as before its mark: someone else's, replaced).
# The mark and the DELETE are written back to back (``savedplan.delete_marked``: one
# answer and one request apart, milliseconds), and cutting each time to its second
# adds under one. 5 s leaves room for a slow DELETE (the client's retries of a 5xx
# wait 1.4 s at most in all unless the server asks for longer; admission webhooks
# answer in milliseconds as a rule). A DELETE slower still (a webhook near its
# timeout, a read timeout then a retry) reads as someone else's deletion and is
# replaced: the behaviour without a mark, more capacity for a while, never less. Kept
# small because the other way loses capacity: a mark left by a DELETE that failed
# (``delete_marked`` takes it off again where it can) makes anyone's deletion within
# this margin after it read as heteroscale's, which nothing replaces.
OWN_DELETION_MARGIN_S = 5.0

# Kubernetes' default spec.progressDeadlineSeconds of a Deployment.
DEFAULT_PROGRESS_DEADLINE_S = 600.0


@dataclass(frozen=True)
class LiveDeployment:
    key: ObjectKey
    service: str
    group_id: str
    role: Role
    domain: str
    subgroup: str | None
    gpu_type: str
    replicas: int
    ready_replicas: int
    template_hash: str
    gpus_per_instance: int | None
    resource_version: str
    other_managers: tuple[str, ...]  # managers other than ours owning spec fields
    foreign_managers: tuple[str, ...]  # managers other than ours and the controllers, any field
    applied_hash: str
    raw: JsonObject = field(repr=False, compare=False)
    # spec.replicas as heteroscale last applied it (None: written before the annotation).
    applied_replicas: int | None = None
    replicas_managers: tuple[str, ...] = ()  # managers other than ours owning spec.replicas
    # Why heteroscale's own annotations on it cannot be trusted (someone wrote a value
    # heteroscale never writes); None when they read. Its service is held.
    unreadable: str | None = None
    # metadata.generation and status.observedGeneration: the Deployment controller has
    # not yet acted on the spec (and readyReplicas may be of the spec before) while the
    # second is behind the first.
    generation: int = 0
    observed_generation: int = 0
    # metadata.creationTimestamp as the API server writes it (RFC 3339 in UTC, whole
    # seconds: such strings order as their times do); "" when it does not read.
    created: str = ""
    # spec.progressDeadlineSeconds: how long Kubernetes lets a rollout go without
    # progress before it calls it failed (its default where unset or not a positive
    # whole number). A Pod not ready for longer is not on its way (``stuck_starting``).
    progress_deadline_s: float = DEFAULT_PROGRESS_DEADLINE_S
    # heteroscale's own fields recorded as an "Update" (its create's POST) rather than
    # as its server-side "Apply": a create interrupted before its relabel
    # (``savedplan.adopt_created``). Server-side apply tells the two apart, so every
    # later apply conflicted with heteroscale itself until the relabel is made.
    own_update_entry: bool = False
    # metadata.deletionTimestamp as read ("" while it is not being deleted): a finalizer
    # or the garbage collector holds it, and its instances go when it does.
    deleting_since: str = ""
    # When the API server recorded heteroscale's mark of it as deleted by a plan
    # (``names.DELETED_BY_PLAN_ANNOTATION``): the ``time`` of the managedFields entry
    # of ``names.DELETION_MARK_MANAGER``, seconds since the epoch, the server's clock
    # (``deletion_marked_s``). None without the annotation (or with a value heteroscale
    # never writes), or without that entry or its time.
    deletion_marked_s: float | None = None

    @property
    def rollout_observed(self) -> bool:
        """The Deployment controller has acted on the current spec."""
        return self.observed_generation >= self.generation

    @property
    def deleted_by_plan(self) -> bool:
        """Being deleted by heteroscale itself (a scale-in, the old copy of a move, a
        pruned leftover): marked so, and deleted at most ``OWN_DELETION_MARGIN_S``
        after the API server recorded the mark, never before it (both times the
        server's). A plan removed its capacity: nothing is to replace it. Anything else
        being deleted is someone else's, which a held service replaces before it goes
        (the side that never loses capacity): no mark, one that does not read, a mark
        without its managedFields time (``deletion_marked_s`` None), a deletion long
        after the mark (its DELETE failed, someone deleted the object later) or before
        it, a deletion time that does not read."""
        if not self.deleting_since or self.deletion_marked_s is None:
            return False
        deleted_s = parse_micro_time(self.deleting_since)
        return (
            deleted_s is not None
            and 0.0 <= deleted_s - self.deletion_marked_s <= OWN_DELETION_MARGIN_S
        )

    @property
    def replicas_drifted(self) -> bool:
        """``spec.replicas`` is not what heteroscale last applied."""
        return self.applied_replicas is not None and self.replicas != self.applied_replicas

    @property
    def counted_replicas(self) -> int:
        """The instances the fleet counts: what heteroscale applied, not a hand edit."""
        if self.replicas_drifted:
            assert self.applied_replicas is not None
            return self.applied_replicas
        return self.replicas


@dataclass(frozen=True)
class LivePod:
    key: ObjectKey
    service: str
    group_label: str
    role: str
    serving: bool
    ready: bool
    scheduled: bool
    node: str | None
    template_hash: str
    drained_at_s: float | None
    drained_from: str | None
    deleting: bool
    created: str
    resource_version: str
    # Why a container of a Pod not ready waits (status.containerStatuses[].state.waiting
    # .reason: CrashLoopBackOff, ImagePullBackOff, ...), as the kubelet wrote it; "" for
    # none (running, or no kubelet has reported).
    waiting: str = ""


@dataclass(frozen=True)
class LiveNode:
    name: str
    labels: Mapping[str, str]
    # status.capacity's GPUs; None when the value does not read (``gpus_unreadable``
    # says why): never 0, which would report a node that lost its GPUs.
    gpus: int | None
    gpus_unreadable: str | None = None
    # metadata.uid: which object of that name it is (a Node replaced, or another
    # cluster's of the same name, has another); "" where absent or not a string.
    uid: str = ""


# A deployment group of one namespace: (namespace, service, group id). Deployment names
# do not hold the namespace, so one group id may name a group in each of two namespaces
# (a namespace move's copy and the group replacing it).
GroupKey = tuple[str, str, str]


@dataclass(frozen=True)
class ClusterSnapshot:
    """What one read of the API server returned (our objects only, plus Nodes)."""

    cluster: str
    deployments: Mapping[ObjectKey, LiveDeployment]
    pods: tuple[LivePod, ...]
    nodes: tuple[LiveNode, ...]
    read_at_s: float

    def pods_of(self, deployment: LiveDeployment) -> list[LivePod]:
        """Serving Pods that belong to a Deployment (by its selector labels)."""
        key = (
            deployment.key.namespace,
            deployment.service,
            names.label_value(deployment.group_id),
            deployment.role,
        )
        return self._serving_index.get(key, [])

    @cached_property
    def _serving_index(self) -> dict[tuple[str, str, str, str], list[LivePod]]:
        # Built once per snapshot: a lookup per Deployment instead of a scan of every
        # Pod (thousands of each at fleet scale).
        index: dict[tuple[str, str, str, str], list[LivePod]] = defaultdict(list)
        for pod in self.pods:
            if pod.serving and not pod.deleting:
                index[(pod.key.namespace, pod.service, pod.group_label, pod.role)].append(pod)
        return index

    def drained_pods(self) -> list[LivePod]:
        return [p for p in self.pods if not p.serving and not p.deleting]

    @cached_property
    def groups_being_deleted(self) -> frozenset[GroupKey]:
        """The groups with a Deployment being deleted (``LiveDeployment.deleting_since``),
        as (namespace, service, group id): every Deployment of theirs is a leftover
        (``leftover_reason``)."""
        return frozenset(
            (d.key.namespace, d.service, d.group_id)
            for d in self.deployments.values()
            if d.deleting_since
        )


# ------------------------------------------------------------------------ parsing


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _foreign_managers(obj: JsonObject) -> tuple[str, ...]:
    entries = obj.get("metadata", {}).get("managedFields") or []
    return tuple(sorted({e.get("manager", "") for e in entries} - SYSTEM_MANAGERS))


def _spec_managers(obj: JsonObject) -> tuple[str, ...]:
    managers = set()
    for entry in obj.get("metadata", {}).get("managedFields") or []:
        manager = entry.get("manager", "")
        if manager in SYSTEM_MANAGERS:
            continue
        fields = entry.get("fieldsV1") or {}
        if "f:spec" in fields:
            managers.add(manager or "(unnamed)")
    return tuple(sorted(managers))


def _owns_replicas(fields: Mapping[str, Any]) -> bool:
    spec = fields.get("f:spec")
    return isinstance(spec, Mapping) and "f:replicas" in spec


def _replicas_managers(obj: JsonObject) -> tuple[str, ...]:
    return tuple(
        sorted(
            {
                entry.get("manager", "") or "(unnamed)"
                for entry in obj.get("metadata", {}).get("managedFields") or []
                if entry.get("manager", "") not in SYSTEM_MANAGERS
                and _owns_replicas(entry.get("fieldsV1") or {})
            }
        )
    )


def _spec_paths(obj: JsonObject, managers: Iterable[str], limit: int = 5) -> list[str]:
    """The spec fields ``managers`` own, as dotted paths (the first ``limit``)."""
    wanted = set(managers)
    out: list[str] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        children = [k for k in node if k != "."]
        if not children and prefix:
            out.append(prefix)
            return
        for key in sorted(children):
            if key.startswith("f:"):
                walk(node[key] or {}, f"{prefix}.{key[2:]}" if prefix else key[2:])
            elif key.startswith("k:"):
                walk(node[key] or {}, f"{prefix}[{key[2:]}]")
            elif key.startswith("v:"):
                out.append(f"{prefix}[{key[2:]}]")

    for entry in obj.get("metadata", {}).get("managedFields") or []:
        if (entry.get("manager", "") or "(unnamed)") in wanted:
            spec = (entry.get("fieldsV1") or {}).get("f:spec")
            if isinstance(spec, Mapping):
                walk(spec, "spec")
    unique = sorted(set(out))
    return unique[:limit] + ([f"... {len(unique) - limit} more"] if len(unique) > limit else [])


_COUNT = re.compile(r"0|[1-9][0-9]{0,9}")


Parsed = TypeVar("Parsed")


def _api_object(
    kind: str,
) -> Callable[[Callable[[JsonObject], Parsed]], Callable[[JsonObject], Parsed]]:
    """A parser of one API object, made to answer ``ClusterUnavailable`` for an object
    whose fields are not of the shapes the API server writes (``metadata`` a string,
    labels a list: a proxy's or a broken aggregated API's answer; the client checks
    only that each item is an object). Such an object raised AttributeError or
    TypeError out of the cycle's read, a traceback from ``plan`` and ``status``."""

    def wrap(parse: Callable[[JsonObject], Parsed]) -> Callable[[JsonObject], Parsed]:
        @wraps(parse)
        def checked(obj: JsonObject) -> Parsed:
            try:
                return parse(obj)
            except (AttributeError, TypeError, ValueError, KeyError) as exc:
                raise ClusterUnavailable(
                    f"the API server answered a {kind} not of a {kind}'s shape "
                    f"({type(exc).__name__}: {quoted(str(exc))})"
                ) from None

        return checked

    return wrap


def _whole_number(value: Any, what: str, *, least: int, most: int) -> int:
    """``value``, a string of plain decimal digits, as a number from ``least`` to
    ``most``; ValueError naming ``what`` and the value (escaped, cut) otherwise."""
    if not isinstance(value, str) or not _COUNT.fullmatch(value):
        raise ValueError(
            f"{what} is {visible(repr(str(value)[:40]))}, not a whole number in plain digits"
        )
    number = int(value)
    if not least <= number <= most:
        raise ValueError(f"{what} is {number}, outside {least}..{most}")
    return number


def _count_annotation(
    annotations: Mapping[str, Any], key: str, *, least: int, most: int
) -> int | None:
    """The whole number ``key`` holds (None when absent); ValueError when it is not one
    heteroscale writes (a decimal from ``least`` to ``most``: what the policy schema
    allows, so a hand-written 2**31 - 1 is not counted as instances)."""
    value = annotations.get(key)
    if value is None:
        return None
    return _whole_number(value, key, least=least, most=most)


@_api_object("Deployment")
def parse_deployment(obj: JsonObject) -> LiveDeployment | None:
    """Our view of a Deployment; None when it lacks the labels we render."""
    meta = obj.get("metadata", {})
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    role = labels.get(names.ROLE_LABEL)
    service = labels.get(names.SERVICE_LABEL)
    if role not in ROLES or not service:
        return None
    spec = obj.get("spec", {})
    status = obj.get("status", {})
    # Our annotations, as someone with edit rights may have rewritten them: a value
    # heteroscale never writes is not guessed at (not counted, no replica drift taken
    # back from it); the service is held until it reads again.
    unreadable: str | None = None
    try:
        applied_replicas = _count_annotation(
            annotations, names.APPLIED_REPLICAS_ANNOTATION, least=0, most=MAX_INSTANCES
        )
    except ValueError as exc:
        applied_replicas, unreadable = None, str(exc)
    try:
        gpus_per_instance = _count_annotation(
            annotations, names.GPUS_PER_INSTANCE_ANNOTATION, least=1, most=MAX_GPUS_PER_INSTANCE
        )
    except ValueError as exc:
        gpus_per_instance, unreadable = None, unreadable or str(exc)
    return LiveDeployment(
        key=ObjectKey(meta.get("namespace", ""), meta.get("name", "")),
        service=service,
        group_id=annotations.get(names.GROUP_ID_ANNOTATION) or labels.get(names.GROUP_LABEL, ""),
        role=role,
        domain=annotations.get(names.DOMAIN_ANNOTATION, ""),
        subgroup=annotations.get(names.SUBGROUP_ANNOTATION),
        gpu_type=annotations.get(names.GPU_TYPE_ANNOTATION, ""),
        replicas=_int(spec.get("replicas", 1)),
        ready_replicas=_int(status.get("readyReplicas", 0)),
        template_hash=annotations.get(names.TEMPLATE_HASH_ANNOTATION, ""),
        gpus_per_instance=gpus_per_instance,
        resource_version=meta.get("resourceVersion", ""),
        other_managers=_spec_managers(obj),
        foreign_managers=_foreign_managers(obj),
        applied_hash=annotations.get(names.APPLIED_HASH_ANNOTATION, ""),
        raw=obj,
        applied_replicas=applied_replicas,
        replicas_managers=_replicas_managers(obj),
        unreadable=unreadable,
        generation=_int(meta.get("generation", 0)),
        observed_generation=_int(status.get("observedGeneration", 0)),
        created=created if isinstance(created := meta.get("creationTimestamp"), str) else "",
        progress_deadline_s=_progress_deadline_s(spec.get("progressDeadlineSeconds")),
        deleting_since=since if isinstance(since := meta.get("deletionTimestamp"), str) else "",
        deletion_marked_s=deletion_marked_s(meta),
        own_update_entry=any(
            names.is_update_entry_of(entry, names.FIELD_MANAGER)
            for entry in meta.get("managedFields") or ()
        ),
    )


def deletion_marked_s(meta: Mapping[str, Any]) -> float | None:
    """When the API server recorded heteroscale's deletion mark on the object whose
    ``metadata`` this is, seconds since the epoch (its clock, whole seconds): the
    ``time`` of the ``names.DELETION_MARK_MANAGER`` "Update" entry of its
    managedFields, the latest where there are several (one per apiVersion written
    through). None unless the mark is there as heteroscale writes it
    (``names.deletion_mark_s``), or where no such entry's time reads: a deletion is
    then never taken as heteroscale's own (``LiveDeployment.deleted_by_plan``).

    The server moves that time on every write of the manager that changes a field:
    each mark carries a new value (the reconciler's time of it: ``delete_marked``), so
    the time is that of the latest mark, not of one left behind before it."""
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, Mapping) or (
        names.deletion_mark_s(annotations.get(names.DELETED_BY_PLAN_ANNOTATION)) is None
    ):
        return None
    entries = meta.get("managedFields") or ()
    times = [
        parse_micro_time(time_text)
        for entry in (entries if isinstance(entries, list) else ())
        if isinstance(entry, Mapping)
        and entry.get("manager") == names.DELETION_MARK_MANAGER
        and entry.get("operation") == "Update"
        and not entry.get("subresource")
        and isinstance(time_text := entry.get("time"), str)
    ]
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _progress_deadline_s(value: Any) -> float:
    """spec.progressDeadlineSeconds in seconds: a positive whole number as written
    (booleans are not), Kubernetes' default otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return float(value)
    return DEFAULT_PROGRESS_DEADLINE_S


@_api_object("Pod")
def parse_pod(obj: JsonObject) -> LivePod:
    meta = obj.get("metadata", {})
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    status = obj.get("status", {})
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    drained_at = annotations.get(names.DRAINED_AT_ANNOTATION)
    try:
        drained_at_s = float(drained_at) if drained_at is not None else None
    except ValueError:
        drained_at_s = None
    node = obj.get("spec", {}).get("nodeName")
    return LivePod(
        key=ObjectKey(meta.get("namespace", ""), meta.get("name", "")),
        service=labels.get(names.SERVICE_LABEL, ""),
        group_label=labels.get(names.GROUP_LABEL, ""),
        role=labels.get(names.ROLE_LABEL, ""),
        serving=labels.get(names.SERVING_LABEL) != names.DRAINING,
        ready=conditions.get("Ready") == "True",
        scheduled=bool(node),
        node=node,
        template_hash=annotations.get(names.TEMPLATE_HASH_ANNOTATION, ""),
        drained_at_s=drained_at_s,
        drained_from=annotations.get(names.DRAINED_FROM_ANNOTATION),
        deleting=bool(meta.get("deletionTimestamp")),
        created=meta.get("creationTimestamp", ""),
        resource_version=meta.get("resourceVersion", ""),
        waiting=_waiting_reason(status),
    )


def _waiting_reason(status: JsonObject) -> str:
    """The first reason a container of the Pod waits for (``state.waiting.reason``),
    init containers first; "" for none. The kubelet's text, shown escaped and cut."""
    for key in ("initContainerStatuses", "containerStatuses"):
        entries = status.get(key)
        for entry in entries if isinstance(entries, list) else ():
            state = entry.get("state") if isinstance(entry, dict) else None
            waiting = state.get("waiting") if isinstance(state, dict) else None
            reason = waiting.get("reason") if isinstance(waiting, dict) else None
            if isinstance(reason, str) and reason:
                return reason
    return ""


GPU_CAPACITY_PATH = f"status.capacity.{names.GPU_RESOURCE}"


@_api_object("Node")
def parse_node(obj: JsonObject) -> LiveNode:
    """A Node's name, labels and GPU capacity. The capacity reads as plain decimal
    digits, 0 to ``MAX_GPUS_PER_NODE``, or not at all. An extended resource is an
    integer quantity, and Kubernetes writes one below 1000 as plain digits (its
    canonical form): a suffix or an exponent ("4k", "1e9") means 1000 GPUs or more,
    beyond any node, and a sign, a fraction or other text ("-3", "4.5", "abc") was
    not written by a device plugin. Such a value is unreadable, not 0 GPUs; a Node
    without the resource has none."""
    meta = obj.get("metadata", {})
    capacity = obj.get("status", {}).get("capacity") or {}
    gpus: int | None = 0
    unreadable: str | None = None
    if names.GPU_RESOURCE in capacity:
        try:
            gpus = _whole_number(
                capacity[names.GPU_RESOURCE], GPU_CAPACITY_PATH, least=0, most=MAX_GPUS_PER_NODE
            )
        except ValueError as exc:
            gpus, unreadable = None, str(exc)
    uid = meta.get("uid")
    return LiveNode(
        name=meta.get("name", ""),
        labels=dict(meta.get("labels") or {}),
        gpus=gpus,
        gpus_unreadable=unreadable,
        # Only hashed (``savedplan.node_fingerprint``), never shown; cut all the same.
        uid=uid[:MAX_UID_CHARS] if isinstance(uid, str) else "",
    )


# --------------------------------------------------------------------------- reading


def _list_owned(
    client: KubeClient,
    cluster: str,
    namespaces: Iterable[str],
    path_for: Callable[[str | None], str],
    elsewhere: Callable[[], Iterable[str]] = tuple,
) -> list[JsonObject]:
    """Our objects of one kind (``path_for(namespace)`` lists them, all namespaces with
    None): one cluster-wide list when RBAC allows it, else per namespace: the managed
    ``namespaces``, then those ``elsewhere`` names where RBAC allows a list (any other
    is skipped: nothing there can be read, nor written)."""
    selector = names.ownership_selector(cluster)
    try:
        return list(client.list(path_for(None), label_selector=selector))
    except Forbidden:
        managed = set(namespaces)
        out: list[JsonObject] = []
        for namespace in sorted(managed):
            out.extend(client.list(path_for(namespace), label_selector=selector))
        for namespace in sorted(set(elsewhere()) - managed):
            try:
                out.extend(client.list(path_for(namespace), label_selector=selector))
            except Forbidden:
                continue
        return out


def list_owned_deployments(
    client: KubeClient,
    cluster: str,
    namespaces: Iterable[str],
    elsewhere: Callable[[], Iterable[str]] = tuple,
) -> list[JsonObject]:
    """Our Deployments (:func:`_list_owned`); ``elsewhere``: other namespaces that may
    hold some (where our Pods run: a namespace a service moved away from, whose
    Deployments are then kept until what replaces them serves, and pruned)."""
    return _list_owned(client, cluster, namespaces, deployments_path, elsewhere)


def list_owned_pods(
    client: KubeClient, cluster: str, namespaces: Iterable[str]
) -> list[JsonObject]:
    """Our Pods (:func:`_list_owned`)."""
    return _list_owned(client, cluster, namespaces, pods_path)


T = TypeVar("T")


class WatchedCollection(Generic[T]):
    """A cluster-wide collection kept current by list + watch (as client-go's
    reflector does), so a reconcile cycle reads it from memory instead of listing
    thousands of objects again.

    ``items()`` lists synchronously when the cache is not synced (first call, after
    ``invalidate()``, or when the watch expired: HTTP 410), then a daemon thread
    watches from the list's resourceVersion, applying ADDED / MODIFIED / DELETED and
    resuming after dropped connections. The cache is as fresh as the watch stream
    (milliseconds behind the API server); writes carry resourceVersion preconditions,
    so acting on a slightly old view fails safely (409) rather than wrongly.
    """

    def __init__(
        self,
        client: KubeClient,
        path: str,
        parse: Callable[[JsonObject], T],
        *,
        label_selector: str | None = None,
        retry_delay_s: float = 1.0,
    ):
        self.client = client
        self.path = path
        self.parse = parse
        self.label_selector = label_selector
        self.retry_delay_s = retry_delay_s
        self._items: dict[tuple[str, str], T] = {}
        self._version = ""
        self._synced = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.relists = 0
        self.events = 0

    @staticmethod
    def _key(obj: JsonObject) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return meta.get("namespace", ""), meta.get("name", "")

    def items(self) -> list[T]:
        with self._lock:
            if self._synced:
                return list(self._items.values())
        objs, version = self.client.list_with_version(self.path, label_selector=self.label_selector)
        fresh = {self._key(o): self.parse(o) for o in objs}
        with self._lock:
            self._items, self._version, self._synced = fresh, version, True
            self.relists += 1
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"watch {self.path}", daemon=True
            )
            self._thread.start()
        return list(fresh.values())

    def invalidate(self) -> None:
        """Relist on the next ``items()`` (e.g. after our own writes, so the next
        decision certainly sees them)."""
        with self._lock:
            self._synced = False

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                synced, version = self._synced, self._version
            if not synced:
                self._stop.wait(0.05)
                continue
            try:
                for event in self.client.watch(
                    self.path, resource_version=version, label_selector=self.label_selector
                ):
                    if self._stop.is_set() or not self._apply(event, version):
                        break
                    version = self._version
            except Exception:
                # Whatever broke the stream (unreachable server, refused, undecodable
                # event), the cache may have missed events: relist on the next read.
                self.invalidate()
                self._stop.wait(self.retry_delay_s)

    def _apply(self, event: JsonObject, watched_from: str) -> bool:
        """Apply one watch event; False when the watch must be restarted."""
        kind, obj = event.get("type"), event.get("object") or {}
        with self._lock:
            if self._version != watched_from:
                return False  # relisted meanwhile: this stream is from an older list
            if kind == "ERROR":
                if obj.get("code") == 410:  # resourceVersion too old: relist
                    self._synced = False
                return False
            version = (obj.get("metadata") or {}).get("resourceVersion")
            if kind in ("ADDED", "MODIFIED"):
                self._items[self._key(obj)] = self.parse(obj)
            elif kind == "DELETED":
                self._items.pop(self._key(obj), None)
            if version:
                self._version = version
            self.events += 1
        return True


@dataclass
class ClusterWatch:
    """Watched Pods (ours) and Nodes of one cluster; Deployments are listed each
    cycle (the least-privilege RBAC grants them per namespace only)."""

    pods: WatchedCollection[LivePod]
    nodes: WatchedCollection[LiveNode]

    @classmethod
    def start(cls, client: KubeClient, cluster: str) -> ClusterWatch:
        return cls(
            pods=WatchedCollection(
                client, pods_path(), parse_pod, label_selector=names.ownership_selector(cluster)
            ),
            nodes=WatchedCollection(client, nodes_path(), parse_node),
        )

    def close(self) -> None:
        self.pods.close()
        self.nodes.close()


def read_snapshot(
    client: KubeClient,
    cluster: ClusterSpec,
    namespaces: Iterable[str],
    *,
    now_s: float | None = None,
    watch: ClusterWatch | None = None,
) -> ClusterSnapshot:
    """One consistent-enough read of our objects and the Nodes: three list calls, or
    one plus the watched Pods and Nodes."""
    namespaces = list(namespaces)
    # The reads are independent: run them concurrently (the API server and the JSON
    # decoding overlap).
    with DaemonThreadPool(max_workers=3, thread_name_prefix="cluster-read") as pool:
        if watch is not None:
            pod_items = pool.submit(watch.pods.items)
            node_items = pool.submit(watch.nodes.items)
        else:
            pod_items = pool.submit(
                lambda: [parse_pod(o) for o in list_owned_pods(client, cluster.name, namespaces)]
            )
            node_items = pool.submit(lambda: [parse_node(o) for o in client.list(nodes_path())])
        # Listed namespace by namespace (per-namespace RBAC), our Deployments are also
        # looked for where our Pods run (Pods may be read cluster-wide): a namespace a
        # service moved away from is no managed one, and unlisted, what the move left
        # there was neither kept nor pruned, and its GPUs looked free.
        deployment_objs = pool.submit(
            list_owned_deployments,
            client,
            cluster.name,
            namespaces,
            lambda: {pod.key.namespace for pod in pod_items.result()},
        )
        deployments: dict[ObjectKey, LiveDeployment] = {}
        for obj in deployment_objs.result():
            parsed = parse_deployment(obj)
            if parsed is not None:
                deployments[parsed.key] = parsed
        pods = tuple(pod_items.result())
        nodes = tuple(node_items.result())
    return ClusterSnapshot(
        cluster=cluster.name,
        deployments=deployments,
        pods=pods,
        nodes=nodes,
        read_at_s=time.time() if now_s is None else now_s,
    )


# ------------------------------------------------------------------ pure derivations


def moved_away(service: str, namespace: str, policies: Mapping[str, ServicePolicy]) -> bool:
    """An object of ``service`` in ``namespace`` is the leftover of a move: the service
    still has a policy, which now deploys to another namespace. No placement can keep
    it (every group of the service renders into the policy's namespace), so it is never
    the service's capacity, only in the way until it is pruned. A service without a
    policy did not move (it was removed: prune is another matter)."""
    policy = policies.get(service)
    return policy is not None and policy.namespace != namespace


def leftover_reason(
    deployment: LiveDeployment,
    policies: Mapping[str, ServicePolicy],
    cluster: ClusterSpec | None = None,
    groups_being_deleted: Collection[GroupKey] = frozenset(),
) -> str | None:
    """Why ``deployment`` is a leftover, or None when it is not: no longer the capacity
    of its service, but still serving until the groups replacing it serve. Its service
    moved to another namespace (``moved_away``); with ``cluster``, the switch its group
    is pinned to is gone from the cluster file (no group can be rendered there, so
    placement must not keep it: the service is placed anew); or it, or with
    ``groups_being_deleted`` (``ClusterSnapshot.groups_being_deleted``) another
    Deployment of its group, is being deleted (``deletionTimestamp`` set: a finalizer or
    the garbage collector holds it, and its instances go when it does).

    The whole group of a Deployment being deleted is a leftover, not that Deployment
    alone: counted, its sibling would be a group missing one role, which placement
    fills under the group's own id, rendering the very name being deleted (a create
    that answers 409, or an apply onto the terminating object); and a prefill without
    its decode serves nothing anyway. A new group replaces the whole group, under an
    id of its own (``FleetState.reserved_group_ids``).

    Each depends only on the desired state and the live objects, never on a plan: a
    leftover stays one until it is pruned, or, being deleted, until it is gone. A
    service without a policy has no leftovers (nothing replaces its groups: they are
    kept or pruned by the prune setting)."""
    policy = policies.get(deployment.service)
    if policy is None:
        return None
    if deployment.deleting_since:
        return (
            f"being deleted (deletionTimestamp set {deployment.deleting_since}: a finalizer "
            "or the garbage collector holds it, and its instances go when it does)"
        )
    group = (deployment.key.namespace, deployment.service, deployment.group_id)
    if group in groups_being_deleted:
        return (
            f"another Deployment of its group {deployment.group_id} is being deleted "
            "(the group is replaced whole)"
        )
    if moved_away(deployment.service, deployment.key.namespace, policies):
        return f"service {deployment.service} moved to namespace {policy.namespace}"
    if cluster is not None and deployment.domain and not is_domain_of(cluster, deployment.domain):
        return f"switch {deployment.domain} of its group is gone from cluster {cluster.name}'s file"
    return None


def reserved_group_ids(
    snapshot: ClusterSnapshot, policies: Mapping[str, ServicePolicy]
) -> dict[str, frozenset[str]]:
    """Per service, the ids of its groups being deleted in its own namespace
    (``ClusterSnapshot.groups_being_deleted``): left out of the fleet as leftovers, but
    their names are taken until they are gone, so no new group may take the ids. One
    in a namespace the service moved away from reserves nothing: the group replacing a
    moved one reuses its id on purpose (names do not hold the namespace)."""
    out: dict[str, set[str]] = defaultdict(set)
    for namespace, service, group_id in snapshot.groups_being_deleted:
        policy = policies.get(service)
        if policy is not None and policy.namespace == namespace:
            out[service].add(group_id)
    return {service: frozenset(ids) for service, ids in out.items()}


def deleting_unreplaced(
    snapshot: ClusterSnapshot,
    policies: Mapping[str, ServicePolicy],
    kept: Iterable[LiveDeployment],
) -> dict[tuple[str, Role], int]:
    """Per (service, role), the instances of the service's groups being deleted in its
    own namespace (``ClusterSnapshot.groups_being_deleted``) that no group created since
    replaces yet. A hold keeps them (``RoleCount.hold_size``), so their replacement is
    made while they still serve; once it exists nothing more is kept (the groups being
    deleted counted beside their replacement grew the service by them every cycle).

    Told in time order, per role: each deletion (its ``deletionTimestamp``) adds its
    instances to those awaiting a replacement, and each Deployment created later
    (whole seconds, as ``reconciler.apply.actions`` tells them apart; a ``kept`` one,
    the fleet's, or one being deleted in its turn) takes its instances off them, never
    below 0. So a group that stayed (created no later than a deletion) replaces none
    of it; a replacement deleted in its turn is replaced once, not counted as what the
    service ran (a third group where it ran two); and what a group created while
    nothing awaited a replacement holds (a scale-out after an earlier deletion was
    replaced) is no replacement of a later deletion. A creation time that does not
    read counts as after every deletion, and a deletion time that does not read as
    before every creation: the side that never counts a group twice.

    A Deployment heteroscale deleted itself (``LiveDeployment.deleted_by_plan``: a
    scale-in, the old copy of a move, made before it was broken) adds nothing to await
    at its deletion: a plan removed its capacity, and counted, a finalizer holding it
    made a held service ask for it again (a move's replacement, created before the
    deletion, replaced none of it: 1 prefill and 1 decode held at 2 and 2). Its
    creation still replaces what awaited a replacement then.

    Not seen: a replacement grown into a group that stayed (its creation time is the
    group's)."""
    # Per (service, role): (time, 0 for a creation or 1 for a deletion, instances);
    # at one time a creation comes first (created in the second of a deletion: stayed).
    events: dict[tuple[str, Role], list[tuple[float, int, int]]] = defaultdict(list)
    being_deleted: list[LiveDeployment] = []
    # Per group being deleted: when its first Deployment was (-inf where none reads);
    # the group's other Deployments go with it (the group is replaced whole).
    group_s: dict[GroupKey, float] = {}
    for d in snapshot.deployments.values():
        policy = policies.get(d.service)
        if policy is None or policy.namespace != d.key.namespace:
            continue
        group = (d.key.namespace, d.service, d.group_id)
        if group not in snapshot.groups_being_deleted:
            continue
        being_deleted.append(d)
        at_s = parse_micro_time(d.deleting_since) if d.deleting_since else None
        group_s.setdefault(group, math.inf)
        if at_s is not None:
            group_s[group] = min(group_s[group], at_s)
    if not being_deleted:
        return {}
    for d in being_deleted:
        at_s = group_s[(d.key.namespace, d.service, d.group_id)]
        if not d.deleted_by_plan:
            events[(d.service, d.role)].append(
                (-math.inf if at_s == math.inf else at_s, 1, d.counted_replicas)
            )
        # Its own creation too, where its deletion time reads (before it, no deletion
        # it could replace but an earlier one's: a replacement deleted in its turn).
        created_s = parse_micro_time(d.created)
        if created_s is not None and at_s != math.inf:
            events[(d.service, d.role)].append((created_s, 0, -d.counted_replicas))
    services = {d.service for d in being_deleted}
    for d in kept:
        if d.service in services:
            created_s = parse_micro_time(d.created)
            at_s = math.inf if created_s is None else created_s
            events[(d.service, d.role)].append((at_s, 0, -d.counted_replicas))
    out: dict[tuple[str, Role], int] = {}
    for key, found in sorted(events.items()):
        awaiting = 0
        for _at_s, _order, instances in sorted(found):
            awaiting = max(0, awaiting + instances)
        if awaiting > 0:
            out[key] = awaiting
    return out


def fleet_from_snapshot(
    snapshot: ClusterSnapshot,
    policies: Mapping[str, ServicePolicy] | None = None,
    cluster: ClusterSpec | None = None,
) -> FleetState:
    """Our Deployments as deployment groups; starting and draining per (service, role).

    With ``policies``, a leftover (``leftover_reason``) is left out: after a namespace
    move it has the group id of the group that replaces it (names do not hold the
    namespace), and counted in would make one group of the two; on a switch gone from
    the cluster file it cannot be rendered; being deleted, it goes whatever the plan
    says, so it is not the capacity the service keeps (its id stays reserved while it
    exists: ``FleetState.reserved_group_ids``). Apply prunes it once its replacement
    serves, or leaves it to its deletion (``reconciler.apply.actions``)."""
    kept = [
        d
        for d in snapshot.deployments.values()
        if leftover_reason(d, policies or {}, cluster, snapshot.groups_being_deleted) is None
    ]
    # One group per namespace too: Deployment names do not hold the namespace, so the
    # two copies of a service whose policy was removed in the middle of a move (prune
    # off: neither is a leftover, both are kept) share their group ids, and made one
    # group, one copy's instances and GPUs were not counted (they looked free).
    by_group: dict[tuple[str, str, str], dict[Role, LiveDeployment]] = defaultdict(dict)
    for deployment in kept:
        group_key = (deployment.service, deployment.group_id, deployment.key.namespace)
        by_group[group_key][deployment.role] = deployment
    nodes_by_key: dict[ObjectKey, dict[str, int]] = {}
    for deployment in kept:
        counts: dict[str, int] = defaultdict(int)
        # At most as many Pods as the Deployment counts: the placers count instances
        # from the nodes, and Pods beyond the counted replicas (a hand scale-up being
        # taken back, or Pods the ReplicaSet is about to delete) are not the group's.
        # Kept: ready ones first, then the oldest (the ReplicaSet deletes unready
        # Pods first, soft scale-in drains the newest).
        pods = sorted(
            snapshot.pods_of(deployment),
            key=lambda p: (not (p.ready and p.scheduled), p.created, p.key.name),
        )
        for pod in pods[: deployment.counted_replicas]:
            if pod.node:
                counts[pod.node] += 1
        nodes_by_key[deployment.key] = counts

    starting: dict[tuple[str, Role], int] = defaultdict(int)
    stuck: dict[tuple[str, Role], int] = defaultdict(int)
    groups: list[DeploymentGroup] = []
    for (service, group_id, _namespace), roles in sorted(by_group.items()):
        any_role = next(iter(roles.values()))
        group_roles: dict[Role, GroupRole] = {}
        for role in ROLES:
            live = roles.get(role)
            if live is None:
                policy = (policies or {}).get(service)
                fallback = (
                    policy.role(role).preferred_gpu_types()[0] if policy else any_role.gpu_type
                )
                group_roles[role] = GroupRole(gpu_type=fallback, instances=0)
                continue
            node_counts = nodes_by_key.get(live.key, {})
            # A hand-edited replica count is not counted (replica drift, module doc):
            # the group keeps the shape heteroscale gave it.
            group_roles[role] = GroupRole(
                gpu_type=live.gpu_type,
                instances=live.counted_replicas,
                nodes=tuple(NodeInstances(n, c) for n, c in sorted(node_counts.items())),
                gpus_per_instance=live.gpus_per_instance,
            )
            not_ready = max(0, live.counted_replicas - live.ready_replicas)
            starting[(service, role)] += not_ready
            late = len(past_progress_deadline(snapshot, live))
            if late and not_ready:
                stuck[(service, role)] += min(late, not_ready)
        groups.append(
            DeploymentGroup(
                service=service,
                cluster=snapshot.cluster,
                group_id=group_id,
                domain=any_role.domain,
                subgroup=any_role.subgroup,
                prefill=group_roles["prefill"],
                decode=group_roles["decode"],
            )
        )
    draining: dict[tuple[str, Role], int] = defaultdict(int)
    for pod in snapshot.drained_pods():
        if pod.role in ROLES:
            draining[(pod.service, pod.role)] += 1
    return FleetState(
        cluster=snapshot.cluster,
        groups=tuple(groups),
        starting=dict(starting),
        draining=dict(draining),
        stuck=dict(stuck),
        reserved_group_ids=reserved_group_ids(snapshot, policies or {}),
        deleting_unreplaced=deleting_unreplaced(snapshot, policies or {}, kept),
    )


def node_drift(cluster: ClusterSpec, nodes: Sequence[LiveNode]) -> tuple[Drift, ...]:
    """Differences between the cluster file and the live Nodes."""
    live = {node.name: node for node in nodes}
    labels = cluster.labels
    out: list[Drift] = []
    for node in cluster.nodes:
        seen = live.get(node.name)
        if seen is None:
            out.append(
                FieldDrift(
                    "node_missing",
                    node.name,
                    f"in {cluster.name}'s cluster file, not in the cluster",
                    path="node",
                    live="absent",
                    desired="present",
                )
            )
            continue
        for key, want in cluster.node_labels(node).items():
            got = seen.labels.get(key)
            if got != want:
                shown = "missing" if got is None else f"'{got}'"
                out.append(
                    FieldDrift(
                        "node_label",
                        node.name,
                        f"label {key} is {shown}, the cluster file says '{want}'",
                        path=f"metadata.labels.{key}",
                        live=got,
                        desired=want,
                    )
                )
        if seen.gpus is None:
            out.append(
                FieldDrift(
                    "node_capacity",
                    node.name,
                    f"{seen.gpus_unreadable}: unreadable; the cluster file says "
                    f"{node.gpus}, which placement goes on counting",
                    path=GPU_CAPACITY_PATH,
                    live="unreadable",
                    desired=str(node.gpus),
                )
            )
        elif seen.gpus != node.gpus:
            out.append(
                FieldDrift(
                    "node_capacity",
                    node.name,
                    f"{names.GPU_RESOURCE} capacity is {seen.gpus}, the cluster file says {node.gpus}",
                    path=GPU_CAPACITY_PATH,
                    live=str(seen.gpus),
                    desired=str(node.gpus),
                )
            )
    known = cluster.node_by_name
    for live_node in nodes:
        if live_node.name not in known and labels.gpu_type in live_node.labels:
            out.append(
                FieldDrift(
                    "node_unexpected",
                    live_node.name,
                    f"GPU node ({labels.gpu_type}={live_node.labels[labels.gpu_type]}) not in {cluster.name}'s cluster file",
                    path="node",
                    live="present",
                    desired="absent",
                )
            )
    return tuple(out)


def ownership_drift(deployments: Iterable[LiveDeployment]) -> tuple[Drift, ...]:
    """Deployments whose spec someone else also manages (changed outside Git)."""
    out: list[Drift] = []
    for d in sorted(deployments, key=lambda d: (d.key.namespace, d.key.name)):
        if not d.other_managers:
            continue
        paths = _spec_paths(d.raw, d.other_managers)
        out.append(
            FieldDrift(
                "object_modified",
                str(d.key),
                f"spec fields also managed by {', '.join(d.other_managers)}"
                + (f" ({', '.join(paths)})" if paths else "")
                + " (changed outside Git; apply reports the conflicting fields and takes "
                "them back only with --force)",
                path=", ".join(paths) or "spec",
                live=f"managed by {', '.join(d.other_managers)}",
                desired=f"managed by {names.FIELD_MANAGER} only",
            )
        )
    return tuple(out)


def replica_drift(
    deployments: Iterable[LiveDeployment], *, force: bool = False
) -> tuple[Drift, ...]:
    """Deployments whose ``spec.replicas`` is not what heteroscale last applied, and
    what happens to each (module doc, "Replica drift")."""
    out: list[Drift] = []
    for d in sorted(deployments, key=lambda d: (d.key.namespace, d.key.name)):
        if not d.replicas_drifted:
            continue
        if not d.replicas_managers:
            how = (
                "changed without a managed-fields entry (e.g. `kubectl scale` through the "
                "scale subresource); taken back in the group's shape"
            )
        elif force:
            how = f"changed by {', '.join(d.replicas_managers)}; taken back (--force)"
        else:
            how = (
                f"changed by {', '.join(d.replicas_managers)}, which now owns the field; "
                f"not overwritten without --force (service {d.service} is held while it conflicts)"
            )
        out.append(
            FieldDrift(
                "replicas_changed",
                str(d.key),
                f"spec.replicas is {d.replicas}, heteroscale set {d.applied_replicas}: {how}",
                path="spec.replicas",
                live=str(d.replicas),
                desired=str(d.applied_replicas),
            )
        )
    return tuple(out)


def unreadable_drift(deployments: Iterable[LiveDeployment]) -> tuple[Drift, ...]:
    """Deployments whose heteroscale annotations hold values it never writes."""
    return tuple(
        FieldDrift(
            "annotations_unreadable",
            str(d.key),
            f"{d.unreadable} (written outside heteroscale); service {d.service} is held "
            "until the annotation reads again",
            path="metadata.annotations",
            live=d.unreadable,
            desired="as heteroscale writes them",
        )
        for d in sorted(deployments, key=lambda d: (d.key.namespace, d.key.name))
        if d.unreadable is not None
    )


def unreadable_services(deployments: Iterable[LiveDeployment]) -> dict[str, str]:
    """Services to hold (service -> why): one of their Deployments is unreadable."""
    held: dict[str, str] = {}
    for d in sorted(deployments, key=lambda d: (d.key.namespace, d.key.name)):
        if d.unreadable is not None:
            held.setdefault(d.service, f"Deployment {d.key}: {d.unreadable}")
    return held


def observation_from_snapshot(
    snapshot: ClusterSnapshot,
    cluster: ClusterSpec,
    policies: Mapping[str, ServicePolicy] | None = None,
    *,
    force: bool = False,
) -> Observation:
    deployments = snapshot.deployments.values()
    drift = (
        node_drift(cluster, snapshot.nodes)
        + ownership_drift(deployments)
        + replica_drift(deployments, force=force)
        + unreadable_drift(deployments)
    )
    return Observation(
        fleet=fleet_from_snapshot(snapshot, policies, cluster),
        drift=drift,
        held=unreadable_services(deployments),
        left_behind=left_behind(snapshot, policies or {}, cluster),
        draining=left_behind_draining(snapshot, policies or {}, cluster),
        stuck=stuck_starting(snapshot),
        deleting=being_deleted(deployments),
    )


# How many stuck Pods a service's line names (the count says how many there are).
STUCK_PODS_NAMED = 3


def past_progress_deadline(snapshot: ClusterSnapshot, deployment: LiveDeployment) -> list[LivePod]:
    """The serving Pods of ``deployment`` not ready longer after their creation than
    its progress deadline (``spec.progressDeadlineSeconds``), as the snapshot read them."""
    out = []
    for pod in snapshot.pods_of(deployment):
        if pod.ready or pod.deleting:
            continue
        created_s = parse_micro_time(pod.created)
        if (
            created_s is not None
            and snapshot.read_at_s - created_s > deployment.progress_deadline_s
        ):
            out.append(pod)
    return out


def stuck_starting(snapshot: ClusterSnapshot) -> dict[str, str]:
    """Per service, what of it has stopped being on its way to serving: its serving
    Pods still not ready longer after their creation than their Deployment's progress
    deadline (``spec.progressDeadlineSeconds``: how long Kubernetes itself lets a
    rollout go without progress, 600 s unless set), with the first few Pods and why
    they wait (the kubelet's reason: CrashLoopBackOff, ImagePullBackOff; "no node"
    for one never scheduled). The fleet still counts them as starting, and as stuck
    (``FleetState.stuck``: the planner does not wait for them); ``status`` calls the
    service Degraded rather than Progressing for ever."""
    late: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in sorted(snapshot.deployments, key=str):
        deployment = snapshot.deployments[key]
        for pod in past_progress_deadline(snapshot, deployment):
            why = pod.waiting or ("not ready" if pod.scheduled else "no node")
            late[deployment.service].append(
                (f"{quoted(str(pod.key))} {quoted(why)}", f"{deployment.progress_deadline_s:.0f}")
            )
    out: dict[str, str] = {}
    for service, pods in late.items():
        named = ", ".join(text for text, _ in pods[:STUCK_PODS_NAMED])
        more = f" and {len(pods) - STUCK_PODS_NAMED} more" if len(pods) > STUCK_PODS_NAMED else ""
        deadlines = sorted({deadline for _, deadline in pods}, key=float)
        out[service] = (
            f"{len(pods)} Pod(s) not ready past their Deployment's progress deadline "
            f"({'/'.join(deadlines)} s after creation): {named}{more}"
        )
    return out


def being_deleted(deployments: Iterable[LiveDeployment]) -> dict[str, str]:
    """Per service, its Deployments being deleted (``deletionTimestamp`` set: a
    finalizer or the garbage collector holds them), with the instances that go when
    they do, and whose deletion it is. They are leftovers (``leftover_reason``): the
    fleet leaves them out, apply writes nothing to them, and new groups replace
    someone else's deletion while it still serves, not heteroscale's own
    (``LiveDeployment.deleted_by_plan``: a plan removed that capacity); ``status`` calls
    the service Degraded until they are gone, where it read Synced and Healthy and
    ``apply`` said the clusters match."""
    found: dict[str, list[str]] = defaultdict(list)
    for deployment in sorted(deployments, key=lambda d: str(d.key)):
        if deployment.deleting_since:
            whose = (
                "deleted by heteroscale's plan: not replaced"
                if deployment.deleted_by_plan
                else "deleted by someone else: being replaced by new groups meanwhile"
            )
            found[deployment.service].append(
                f"Deployment {quoted(str(deployment.key))} ({deployment.replicas} "
                f"instance(s) of {deployment.role}, since {quoted(deployment.deleting_since)}, "
                f"{whose})"
            )
    return {
        service: "being deleted, its instances go when it does (a finalizer or the garbage "
        "collector holds it; it serves until then): "
        + ", ".join(items[:STUCK_PODS_NAMED])
        + (f" and {len(items) - STUCK_PODS_NAMED} more" if len(items) > STUCK_PODS_NAMED else "")
        for service, items in found.items()
    }


def left_behind(
    snapshot: ClusterSnapshot,
    policies: Mapping[str, ServicePolicy],
    cluster: ClusterSpec | None = None,
) -> tuple[UngroupedInstances, ...]:
    """The serving instances of the leftovers (``leftover_reason``), by node: the fleet
    leaves them out, placement holds their GPUs. Those not yet on a node hold none."""
    out: list[UngroupedInstances] = []
    for key in sorted(snapshot.deployments, key=str):
        deployment = snapshot.deployments[key]
        if leftover_reason(deployment, policies, cluster, snapshot.groups_being_deleted) is None:
            continue
        out.extend(
            _by_node(
                snapshot.pods_of(deployment),
                deployment.service,
                deployment.role,
                deployment.gpus_per_instance,
            )
        )
    return tuple(out)


def left_behind_draining(
    snapshot: ClusterSnapshot,
    policies: Mapping[str, ServicePolicy],
    cluster: ClusterSpec | None = None,
) -> tuple[UngroupedInstances, ...]:
    """The Pods soft scale-in drained from a leftover (from a Deployment
    ``leftover_reason`` names, or in a namespace its service moved away from, the
    Deployment maybe pruned already), by node. They run until their window ends, on GPUs far from
    the service's groups: held only as the fleet's draining count, they were held on
    the groups' nodes, or nowhere while the new copy has none
    (``PlacementRequest.draining`` holds them where they run instead)."""
    by_source: dict[tuple[str, Role, int], list[LivePod]] = defaultdict(list)
    for pod in snapshot.drained_pods():
        # Only the few drained Pods' sources are asked whether they are leftovers (every
        # cycle, of thousands of Deployments).
        found = snapshot.deployments.get(ObjectKey(pod.key.namespace, pod.drained_from or ""))
        source = (
            found
            if found
            and leftover_reason(found, policies, cluster, snapshot.groups_being_deleted) is not None
            else None
        )
        if source is None and not moved_away(pod.service, pod.key.namespace, policies):
            continue
        role = next((r for r in ROLES if r == pod.role), None)
        if role is None:
            continue
        # 0: not known (its Deployment is gone), the policy's size is held.
        gpus_per_instance = (source.gpus_per_instance if source is not None else None) or 0
        by_source[(pod.service, role, gpus_per_instance)].append(pod)
    out: list[UngroupedInstances] = []
    for (service, role, gpus_per_instance), pods in sorted(by_source.items()):
        out.extend(_by_node(pods, service, role, gpus_per_instance or None))
    return tuple(out)


def _by_node(
    pods: Iterable[LivePod], service: str, role: Role, gpus_per_instance: int | None
) -> list[UngroupedInstances]:
    """``pods`` of one service and role, counted by node (those on none hold no GPU and
    are left out)."""
    by_node: dict[str, int] = defaultdict(int)
    for pod in pods:
        if pod.node:
            by_node[pod.node] += 1
    return [
        UngroupedInstances(service, role, node, count, gpus_per_instance)
        for node, count in sorted(by_node.items())
    ]

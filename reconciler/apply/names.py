"""Names, labels and annotations of the objects the reconciler owns.

Everything the applier writes and the observer reads back is keyed by the constants
here, so the two sides cannot drift apart.

Object names are valid DNS labels and stable across cycles: the same (service,
group, role) always renders the same name. Names are at most 46 characters so the
Pod names Kubernetes derives from them (``<deployment>-<10-char hash>-<5 chars>``)
stay within the 63-character hostname limit; a longer or sanitised name keeps a
readable prefix and gets an 8-character hash of the full key as suffix, so two
different keys never share a name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from reconciler.state import Role

PREFIX = "heteroscale.io"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "heteroscale"
FIELD_MANAGER = "heteroscale"

SERVICE_LABEL = f"{PREFIX}/service"
GROUP_LABEL = f"{PREFIX}/group"
ROLE_LABEL = f"{PREFIX}/role"
CLUSTER_LABEL = f"{PREFIX}/cluster"
# The serving router selects on this label; it is also part of the Deployment's
# selector, so flipping it to "false" takes a Pod out of service discovery and out of
# its ReplicaSet in one patch (soft scale-in), while the Pod keeps running.
SERVING_LABEL = f"{PREFIX}/serving"
SERVING = "true"
DRAINING = "false"

# Exact values behind the (possibly sanitised) labels, for the observer.
GROUP_ID_ANNOTATION = f"{PREFIX}/group-id"
DOMAIN_ANNOTATION = f"{PREFIX}/domain"
SUBGROUP_ANNOTATION = f"{PREFIX}/subgroup"
GPU_TYPE_ANNOTATION = f"{PREFIX}/gpu-type"
GPUS_PER_INSTANCE_ANNOTATION = f"{PREFIX}/gpus-per-instance"
# Hash of the rendered pod template: a drained Pod is put back into service only if
# it still runs the current template.
TEMPLATE_HASH_ANNOTATION = f"{PREFIX}/template-hash"
# Hash of the whole manifest last applied (replicas included): when the live object
# still carries it, holds every value we set, and nobody else manages it, applying the
# same manifest again is provably a no-op and the diff skips its dry run.
APPLIED_HASH_ANNOTATION = f"{PREFIX}/applied-hash"
# The spec.replicas heteroscale last applied. A live value that differs was changed by
# someone else, even when the write left no managed-fields entry (the scale
# subresource on Kubernetes 1.20): replica drift (``observe.kubernetes.replica_drift``).
APPLIED_REPLICAS_ANNOTATION = f"{PREFIX}/applied-replicas"
# On a drained Pod: when it left service discovery (seconds since the epoch) and the
# Deployment it came from. Kept on the Pod so the drain survives reconciler restarts.
DRAINED_AT_ANNOTATION = f"{PREFIX}/drained-at"
DRAINED_FROM_ANNOTATION = f"{PREFIX}/drained-from"
# On a Deployment heteroscale deletes (a scale-in, the old copy of a move, a pruned
# leftover): written just before its DELETE (``savedplan.delete_marked``). A finalizer
# may hold the object for long after; the observer then tells a removal a plan made,
# which nothing is to replace, from someone else's deletion, which a held service
# replaces before it goes (``observe.kubernetes.LiveDeployment.deleted_by_plan``). Its
# value, the reconciler's time of the mark (``deletion_mark``), is for people; the
# observer times the mark by the API server: the ``time`` of DELETION_MARK_MANAGER's
# managedFields entry, against the deletionTimestamp (``observe.kubernetes
# .deletion_marked_s``).
DELETED_BY_PLAN_ANNOTATION = f"{PREFIX}/deleted-by-plan"
# The field manager of that mark, writing nothing else: its managedFields entry's time
# is the server's time of the latest mark. Not FIELD_MANAGER: its "Update" entries are
# how a create interrupted before its relabel looks (``is_update_entry_of``), and a
# Deployment whose DELETE failed after its mark would read as one.
DELETION_MARK_MANAGER = f"{FIELD_MANAGER}-deletion-mark"

GPU_RESOURCE = "nvidia.com/gpu"

MAX_OBJECT_NAME = 46
_LABEL_VALUE_MAX = 63
_INVALID_DNS = re.compile(r"[^a-z0-9-]+")
_INVALID_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]+")
# Exactly what ``deletion_mark`` writes: seconds since the epoch, three decimals.
_DELETION_MARK = re.compile(r"[0-9]{1,11}\.[0-9]{3}")


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def dns_label(text: str, max_length: int = 63) -> str:
    """``text`` as a DNS label (lower-case alphanumerics and '-', alphanumeric at both
    ends, at most ``max_length``); a hash suffix whenever ``text`` had to change."""
    clean = _INVALID_DNS.sub("-", text.lower()).strip("-")
    clean = re.sub("-{2,}", "-", clean)
    if clean == text and len(clean) <= max_length:
        return clean
    suffix = _hash8(text)
    head = clean[: max_length - len(suffix) - 1].rstrip("-")
    return f"{head}-{suffix}" if head else suffix


def label_value(text: str) -> str:
    """``text`` as a Kubernetes label value (hash-suffixed when it had to change)."""
    clean = _INVALID_LABEL_VALUE.sub("-", text).strip("-_.")
    if clean == text and len(clean) <= _LABEL_VALUE_MAX:
        return clean
    suffix = _hash8(text)
    head = clean[: _LABEL_VALUE_MAX - len(suffix) - 1].rstrip("-_.")
    return f"{head}-{suffix}" if head else suffix


def deployment_name(service: str, group_id: str, role: Role) -> str:
    """Stable name of the Deployment of one role of one deployment group. Two keys
    that join to the same text are caught by the renderer's duplicate check."""
    short_role = "p" if role == "prefill" else "d"
    return dns_label(f"{service}-{group_id}-{short_role}", max_length=MAX_OBJECT_NAME)


def service_name_prefix(service: str) -> str:
    """What the name of every Deployment ``deployment_name`` gives ``service``, and so of
    each of its Pods, begins with: the service and a dash, or as much of it as
    ``dns_label`` keeps before the hash suffix of a name it had to shorten."""
    kept = MAX_OBJECT_NAME - len(_hash8("")) - 1
    whole = f"{service}-"
    return whole if len(whole) <= kept else whole[:kept].rstrip("-")


def selector_labels(service: str, group_id: str, role: Role) -> dict[str, str]:
    """The Deployment's (immutable) selector: one role of one group, serving Pods only."""
    return {
        SERVICE_LABEL: service,
        GROUP_LABEL: label_value(group_id),
        ROLE_LABEL: role,
        SERVING_LABEL: SERVING,
    }


def ownership_selector(cluster: str) -> str:
    """Label selector for every object this reconciler owns in one cluster."""
    return f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{CLUSTER_LABEL}={label_value(cluster)}"


def owned_by_us(obj: Mapping[str, Any], cluster: str) -> bool:
    """The object carries this reconciler's ownership labels for ``cluster`` (what
    ``ownership_selector`` selects). RBAC cannot restrict writes by label, so every
    write path checks this in code before it touches an object it re-read."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(MANAGED_BY_LABEL) == MANAGED_BY_VALUE and labels.get(
        CLUSTER_LABEL
    ) == label_value(cluster)


def is_update_entry_of(entry: Any, field_manager: str) -> bool:
    """Whether a ``managedFields`` entry is ``field_manager``'s "Update": how a create's
    POST records its fields, which server-side apply counts as another manager than
    that one's "Apply" until the entry is relabelled (``savedplan.adopt_created``)."""
    return (
        isinstance(entry, Mapping)
        and entry.get("manager") == field_manager
        and entry.get("operation") == "Update"
    )


def deletion_mark(now_s: float) -> str:
    """The value of ``DELETED_BY_PLAN_ANNOTATION`` for a mark written at ``now_s``
    (the reconciler's clock; information only, the observer times the mark by the API
    server's managedFields entry)."""
    return f"{now_s:.3f}"


def deletion_mark_s(value: Any) -> float | None:
    """The reconciler's time a ``DELETED_BY_PLAN_ANNOTATION`` value says
    (``deletion_mark``); None for anything heteroscale does not write (a hand edit: not
    taken as heteroscale's mark)."""
    if not isinstance(value, str) or not _DELETION_MARK.fullmatch(value):
        return None
    return float(value)

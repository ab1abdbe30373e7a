"""Render a placement into Kubernetes manifests (pure: plan in, dicts out).

A pod template must meet the rules of ``reconciler.desired.templates`` (the loader
checks every template a policy names by them); one that does not is a
``RenderError`` naming the template and the field.

One apps/v1 Deployment per (service, deployment group, role) with instances > 0,
built from the service's pod template (``RolePolicy.template``, parsed by the
loader into ``DesiredState.templates``). The renderer adds:

- ``replicas`` = the group's instances of that role;
- ``nvidia.com/gpu`` requests and limits = ``gpus_per_instance`` on the engine
  container (the one named ``engine``, else the first);
- ``protocol: TCP`` on container ports that omit it (server-side apply before
  Kubernetes 1.21 needs it: it is part of the ports list's merge key);
- env ``MODEL_NAME`` (the template's args refer to ``$(MODEL_NAME)``) and
  ``HETEROSCALE_ROLE``;
- required node affinity to the group's scheduling domain (the S1 or S2 switch
  label, chosen by where the domain sits in the cluster file; none for loose
  affinity, whose domain is the cluster) and to the GPU type label (value
  ``GpuType.node_label`` or the type's name), ANDed into every node-selector term
  the template already has;
- labels ``heteroscale.io/service``, ``/group``, ``/role``, ``/cluster``, the
  ownership label ``app.kubernetes.io/managed-by: heteroscale`` and the serving label
  ``heteroscale.io/serving: "true"`` the router selects on (see ``names``);
- annotations with the exact group id, domain, subgroup and GPU type (labels may be
  sanitised) and a hash of the rendered pod template.

Only fields the reconciler means to own are written: server-side apply then owns
exactly these, and everything the API server defaults stays out of the diff.
The output is deterministic (same plan, same bytes), so applying twice is a no-op.
Other targets (LeaderWorkerSet for multi-node instances, any workload with a
``/scale`` subresource) can be added as further ``render_*`` functions over the
same inputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from reconciler.apply import names
from reconciler.desired.loader import format_key_path
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.desired.templates import template_problems
from reconciler.errors import PermanentError
from reconciler.state import ROLES, DeploymentGroup, Role

Manifest = dict[str, Any]


class RenderError(PermanentError):
    """The desired state cannot be turned into valid manifests (bad template, unknown
    domain, name clash). Names the service and what to fix."""


@dataclass(frozen=True)
class ObjectKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class RenderedWorkload:
    """One rendered Deployment and the plan coordinates it came from."""

    key: ObjectKey
    service: str
    group_id: str
    role: Role
    replicas: int
    gpus_per_instance: int
    template_hash: str
    manifest: Manifest


def domain_label_key(cluster: ClusterSpec, domain: str) -> str | None:
    """The node label that pins a group to ``domain``: the S2 label for an S2 switch,
    the S1 label for an S1 switch, none when the domain is the whole cluster."""
    if domain == cluster.name:
        return None
    for s2 in cluster.s2:
        if s2.name == domain:
            return cluster.labels.s2
        if any(s1.name == domain for s1 in s2.s1):
            return cluster.labels.s1
    raise RenderError(
        f"cluster {cluster.name}: deployment-group domain '{domain}' is neither an S1 or S2 "
        "switch of the cluster file nor the cluster itself"
    )


def is_domain_of(cluster: ClusterSpec, domain: str) -> bool:
    """``domain`` is one a group can be pinned to in ``cluster``: one of its S1 or S2
    switches, or the cluster itself (``domain_label_key`` has a label for it)."""
    try:
        domain_label_key(cluster, domain)
    except RenderError:
        return False
    return True


def gpu_type_label_value(cluster: ClusterSpec, gpu_type: str) -> str:
    spec = cluster.gpu_types.get(gpu_type)
    if spec is None:
        raise RenderError(
            f"cluster {cluster.name}: GPU type '{gpu_type}' is not in its gpu_types catalogue"
        )
    return spec.node_label or gpu_type


def _engine_container(containers: list[dict[str, Any]]) -> dict[str, Any]:
    for container in containers:
        if container.get("name") == "engine":
            return container
    return containers[0]


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    env = [e for e in container.get("env", []) if e.get("name") != name]
    env.append({"name": name, "value": value})
    container["env"] = env


def _add_node_affinity(pod_spec: dict[str, Any], expressions: list[dict[str, Any]]) -> None:
    """AND ``expressions`` into every required node-selector term (or add one term)."""
    if not expressions:
        return
    affinity = pod_spec.setdefault("affinity", {})
    node_affinity = affinity.setdefault("nodeAffinity", {})
    required = node_affinity.setdefault(
        "requiredDuringSchedulingIgnoredDuringExecution", {"nodeSelectorTerms": []}
    )
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({"matchExpressions": []})
    for term in terms:
        keys = {e["key"] for e in expressions}
        kept = [e for e in term.get("matchExpressions", []) if e.get("key") not in keys]
        term["matchExpressions"] = kept + copy.deepcopy(expressions)


def _check_template(template: Any, path: str, service: str, role: Role) -> dict[str, Any]:
    """``template`` when it meets the rules the rendering below relies on
    (``reconciler.desired.templates``, which the loader checks too); a RenderError
    naming the first field that breaks one, so malformed content never reaches code
    that would fail on it with a raw AttributeError or TypeError."""
    problems = template_problems(template)
    if problems:
        key_path, message = problems[0]
        field = f"{format_key_path(key_path)}: " if key_path else ""
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise RenderError(f"service {service}: {role} pod template {path}: {field}{message}{more}")
    return cast(dict[str, Any], template)


def template_hash(pod_template: Mapping[str, Any]) -> str:
    """Content hash of a rendered pod template (canonical JSON)."""
    text = json.dumps(pod_template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def render_deployment(
    group: DeploymentGroup,
    role: Role,
    policy: ServicePolicy,
    cluster: ClusterSpec,
    templates: Mapping[str, Any],
) -> RenderedWorkload:
    """The Deployment of one role of one deployment group."""
    role_policy = policy.role(role)
    group_role = group.role(role)
    path = role_policy.template
    if path not in templates:
        raise RenderError(f"service {policy.name}: {role} pod template {path} was not loaded")
    source = _check_template(templates[path], path, policy.name, role)
    pod = copy.deepcopy(source)

    selector = names.selector_labels(policy.name, group.group_id, role)
    common_labels = {
        names.MANAGED_BY_LABEL: names.MANAGED_BY_VALUE,
        names.CLUSTER_LABEL: names.label_value(cluster.name),
        **{k: v for k, v in selector.items() if k != names.SERVING_LABEL},
    }
    pod_meta = pod.setdefault("metadata", {})
    pod_meta["labels"] = {**pod_meta.get("labels", {}), **common_labels, **selector}
    gpus = str(role_policy.gpus_per_instance)
    spec = pod["spec"]
    engine = _engine_container(spec["containers"])
    resources = engine.setdefault("resources", {})
    resources["requests"] = {**resources.get("requests", {}), names.GPU_RESOURCE: gpus}
    resources["limits"] = {**resources.get("limits", {}), names.GPU_RESOURCE: gpus}
    for container in spec["containers"] + spec.get("initContainers", []):
        # Server-side apply on Kubernetes < 1.21 rejects a port without its protocol
        # (it is part of the list's merge key); TCP is what the server defaults to.
        for port in container.get("ports", []):
            port.setdefault("protocol", "TCP")
    _set_env(engine, "MODEL_NAME", policy.model.name)
    _set_env(engine, "HETEROSCALE_ROLE", role)

    expressions: list[dict[str, Any]] = []
    domain_key = domain_label_key(cluster, group.domain)
    if domain_key is not None:
        expressions.append({"key": domain_key, "operator": "In", "values": [group.domain]})
    expressions.append(
        {
            "key": cluster.labels.gpu_type,
            "operator": "In",
            "values": [gpu_type_label_value(cluster, group_role.gpu_type)],
        }
    )
    _add_node_affinity(spec, expressions)

    digest = template_hash(pod)
    pod_meta["annotations"] = {
        **pod_meta.get("annotations", {}),
        names.TEMPLATE_HASH_ANNOTATION: digest,
    }

    annotations = {
        names.GROUP_ID_ANNOTATION: group.group_id,
        names.DOMAIN_ANNOTATION: group.domain,
        names.GPU_TYPE_ANNOTATION: group_role.gpu_type,
        names.GPUS_PER_INSTANCE_ANNOTATION: gpus,
        names.TEMPLATE_HASH_ANNOTATION: digest,
    }
    if group.subgroup is not None:
        annotations[names.SUBGROUP_ANNOTATION] = group.subgroup
    key = ObjectKey(policy.namespace, names.deployment_name(policy.name, group.group_id, role))
    manifest: Manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": key.name,
            "namespace": key.namespace,
            "labels": dict(common_labels),
            "annotations": annotations,
        },
        "spec": {
            "replicas": group_role.instances,
            "selector": {"matchLabels": selector},
            "template": pod,
        },
    }
    return RenderedWorkload(
        key=key,
        service=policy.name,
        group_id=group.group_id,
        role=role,
        replicas=group_role.instances,
        gpus_per_instance=role_policy.gpus_per_instance,
        template_hash=digest,
        manifest=manifest,
    )


def render_groups(
    groups: Iterable[DeploymentGroup],
    policies: Mapping[str, ServicePolicy],
    cluster: ClusterSpec,
    templates: Mapping[str, Any],
) -> dict[ObjectKey, RenderedWorkload]:
    """Every Deployment the groups need (roles with zero instances render nothing),
    keyed by namespace/name. Raises ``RenderError`` on unknown services or name clashes."""
    out: dict[ObjectKey, RenderedWorkload] = {}
    for group in groups:
        policy = policies.get(group.service)
        if policy is None:
            raise RenderError(
                f"placement has a group for service '{group.service}', which has no policy "
                f"in cluster {cluster.name}"
            )
        for role in ROLES:
            if group.role(role).instances <= 0:
                continue
            workload = render_deployment(group, role, policy, cluster, templates)
            other = out.get(workload.key)
            if other is not None:
                raise RenderError(
                    f"Deployment name {workload.key} is used by both {other.service}/{other.group_id}/"
                    f"{other.role} and {workload.service}/{workload.group_id}/{workload.role}; "
                    "rename a group or service"
                )
            out[workload.key] = workload
    return out

"""What a saved plan may write: the checks ``apply PLAN`` makes before any write.

The plan's digest is a checksum anyone can recompute (``savedplan``), so a plan file
is input from whoever handed it over, not from ``plan --out``. What is checked here:

- shape and bounds (``*_problem``): every namespace and name a valid Kubernetes name
  (DNS-1123: a name is a URL path segment, see ``dns1123``), every resourceVersion
  a short printable token, every manifest a Deployment of the shape the applier reads
  (apiVersion, kind, metadata.name and metadata.namespace those of its entry) that
  carries this reconciler's ownership labels for the plan's cluster, itself and on
  its Pod template;
- consistency with what the plan says it observed (``writes_problems``): a write to
  an existing object names an object the plan recorded, at the recorded
  resourceVersion, and a create names one it did not. ``apply`` then compares the
  recorded objects with the live ones, which the observer lists by our ownership
  labels only: an update, drain or delete can reach only an object that is ours now;
- scope (``scope_problems``, needs the desired state the plan names): every write
  is in a namespace that a policy of the plan's cluster deploys to, and a manifest
  is the Deployment of a policy of that namespace, under the name the renderer gives
  it. The one exception is the prune of a service's leftovers in the namespace it
  moved away from (a drain, a Deployment's or a drained Pod's delete, named as the
  renderer names that service's objects): only the live object can tell a leftover
  from any other object of that name, so ``leftover_problems`` checks it once the
  cluster is read (and the plan found current), before any write: the object must
  be, live, of a service whose policy now deploys to another namespace
  (``moved_away``, what the fleet leaves out and apply prunes);
- content (``rendered_content_problem``, the same desired state): a manifest is,
  field for field, what the renderer makes from that revision's policy and pod
  template for the group, domain, GPU type and replicas the manifest names (the
  domain a switch of the cluster file or the cluster itself, the type one of its
  catalogue). A forged plan cannot add a container, an image, a privileged security
  context, a host path or an environment variable that the reviewed revision does
  not have.

What is not checked: the replicas, the group and where it is pinned (among the
cluster's switches and GPU types) are applied as the plan says; the plan file must
come from a trusted ``plan --out`` (the CI job's artifact, not a pull request's
file) for those to be the reconciler's decisions. A signed plan is (``plansign``:
``apply PLAN --signing-key-file`` refuses any plan not signed with the CI job's key,
or changed since it was signed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from reconciler.apply import names
from reconciler.apply.actions import effective_manifest
from reconciler.apply.render import RenderError, render_deployment
from reconciler.desired.models import MAX_INSTANCES
from reconciler.dns1123 import label_problem, subdomain_problem
from reconciler.observe.kubernetes import ClusterSnapshot, moved_away
from reconciler.state import DeploymentGroup, GroupRole
from reconciler.text_safety import quoted

if TYPE_CHECKING:
    from reconciler.apply.savedplan import SavedCluster, SavedPlan, WriteStep
    from reconciler.desired.loader import DesiredState
    from reconciler.desired.models import ClusterSpec, ServicePolicy

# An entry of a plan (``clusters[0].writes[3]``) and what is wrong with it.
Problem = tuple[str, str]

# resourceVersions are opaque to clients, but the API server's are decimal tokens;
# printable ASCII without spaces, bounded, keeps a forged one out of messages and URLs.
_RESOURCE_VERSION = re.compile(r"[!-~]{1,64}")
_FINGERPRINT = re.compile(r"[0-9a-f]{32}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256 repositories
MAX_REV = 255
MAX_TEXT = 1_000

_MANIFEST_KEYS = {"apiVersion", "kind", "metadata", "spec"}
# What the renderer writes (resourceVersion: the precondition, replaced at apply).
# Not ownerReferences (garbage collection), finalizers (blocked deletes) or the like.
_METADATA_KEYS = {"name", "namespace", "labels", "annotations", "resourceVersion"}


def _matching(pattern: re.Pattern[str], what: str) -> Callable[[object], str | None]:
    """A check that a value is a string ``pattern`` matches whole: None, or the rule."""

    def problem(value: object) -> str | None:
        if isinstance(value, str) and pattern.fullmatch(value):
            return None
        return f"must be {what}"

    return problem


resource_version_problem = _matching(
    _RESOURCE_VERSION, "a resourceVersion (1 to 64 printable characters, no spaces)"
)
fingerprint_problem = _matching(_FINGERPRINT, "a fingerprint (32 lower-case hex digits)")
commit_problem = _matching(_COMMIT, "a full commit id (40 or 64 lower-case hex digits)")
content_hash_problem = _matching(_HEX_DIGEST, "a sha256 (64 lower-case hex digits)")


def key_problem(key: object) -> str | None:
    """Why ``key`` is not ``namespace/name`` of valid Kubernetes names, or None."""
    if not isinstance(key, str) or key.count("/") != 1:
        return "must be namespace/name"
    namespace, name = key.split("/")
    return _names_problem(namespace, name)


def _names_problem(namespace: object, name: object) -> str | None:
    """Why ``namespace`` is not a namespace or ``name`` not an object name, or None."""
    problem = label_problem(namespace)
    if problem is not None:
        return f"namespace {namespace!r}: {problem}"
    problem = subdomain_problem(name)
    return None if problem is None else f"name {name!r}: {problem}"


def text_problem(value: object, *, limit: int = MAX_TEXT) -> str | None:
    """A short line of text (a revision, a timestamp): no control characters."""
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > limit:
        return f"{len(value)} characters, over {limit}"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        return "must not hold control characters"
    return None


def rev_problem(value: object) -> str | None:
    """A Git revision as the plan names it: it is handed to ``git rev-parse``, so
    one that reads as an option is refused."""
    problem = text_problem(value, limit=MAX_REV)
    if problem is None and str(value).startswith("-"):
        return "must not start with '-'"
    return problem


def _ownership_problem(labels: object, cluster: str, where: str) -> str | None:
    if not isinstance(labels, Mapping):
        return f"{where} missing"
    if labels.get(names.MANAGED_BY_LABEL) != names.MANAGED_BY_VALUE:
        return f"{where} lack {names.MANAGED_BY_LABEL}={names.MANAGED_BY_VALUE}: not an object heteroscale manages"
    if labels.get(names.CLUSTER_LABEL) != names.label_value(cluster):
        return (
            f"{where}: {names.CLUSTER_LABEL} is {labels.get(names.CLUSTER_LABEL)!r}, "
            f"not cluster {cluster}'s {names.label_value(cluster)!r}"
        )
    return None


def manifest_problem(manifest: object, namespace: str, name: str, cluster: str) -> str | None:
    """Why ``manifest`` is not a Deployment the applier may write as ``namespace/name``
    of ``cluster``, or None."""
    if not isinstance(manifest, Mapping):
        return "must be an object"
    unknown = set(manifest) - _MANIFEST_KEYS
    if unknown:
        return f"unknown field(s) {', '.join(sorted(map(str, unknown)))}"
    if manifest.get("apiVersion") != "apps/v1" or manifest.get("kind") != "Deployment":
        return (
            "must be an apps/v1 Deployment, not "
            f"{manifest.get('apiVersion')!r} {manifest.get('kind')!r}"
        )
    metadata = manifest.get("metadata")
    if not isinstance(metadata, Mapping):
        return "metadata missing"
    unknown = set(metadata) - _METADATA_KEYS
    if unknown:
        return (
            f"metadata: field(s) heteroscale never writes: {', '.join(sorted(map(str, unknown)))}"
        )
    if metadata.get("name") != name or metadata.get("namespace") != namespace:
        return (
            f"metadata names {metadata.get('namespace')!r}/{metadata.get('name')!r}, "
            f"not the entry's {namespace}/{name}"
        )
    if "resourceVersion" in metadata:
        problem = resource_version_problem(metadata["resourceVersion"])
        if problem is not None:
            return f"metadata.resourceVersion {problem}"
    annotations = metadata.get("annotations", {})
    if not isinstance(annotations, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        return "metadata.annotations must map names to strings"
    problem = _ownership_problem(metadata.get("labels"), cluster, "metadata.labels")
    if problem is not None:
        return problem
    if not isinstance(metadata["labels"].get(names.SERVICE_LABEL), str):
        return f"metadata.labels lack {names.SERVICE_LABEL}"
    spec = manifest.get("spec")
    if not isinstance(spec, Mapping):
        return "spec missing"
    replicas = spec.get("replicas")
    if (
        isinstance(replicas, bool)
        or not isinstance(replicas, int)
        or not 0 <= replicas <= MAX_INSTANCES
    ):
        return f"spec.replicas must be a whole number from 0 to {MAX_INSTANCES}"
    template = spec.get("template")
    template_meta = template.get("metadata") if isinstance(template, Mapping) else None
    # The Pods the Deployment makes must be ours too: the observer finds them by these.
    return _ownership_problem(
        template_meta.get("labels") if isinstance(template_meta, Mapping) else None,
        cluster,
        "spec.template.metadata.labels",
    )


def writes_problems(cluster: SavedCluster, prefix: str = "") -> list[Problem]:
    """Writes that do not match what the plan recorded as observed (module doc);
    each entry named ``{prefix}writes[i]``."""
    problems: list[Problem] = []
    created: set[str] = set()
    deployments = cluster.observed.deployments
    pods = cluster.observed.pods
    for index, step in enumerate(cluster.writes):
        entry = f"{prefix}writes[{index}] ({step})"
        if step.op == "apply" and step.resource_version is None:
            if step.key in deployments:
                problems.append((entry, "creates a Deployment the plan observed as existing"))
            elif step.key in created:
                problems.append((entry, "creates the same Deployment twice"))
            created.add(step.key)
            continue
        recorded = (
            pods.get(step.key)
            if step.op in ("drain", "put_back", "delete_pod")
            else (deployments[step.key].resource_version if step.key in deployments else None)
        )
        if recorded is None and step.key in created:
            continue  # written after our own create (the applier carries its version)
        if recorded is None:
            problems.append(
                (entry, "writes an object the plan did not observe as heteroscale's own")
            )
        elif step.resource_version != recorded:
            problems.append(
                (
                    entry,
                    f"resourceVersion {step.resource_version} is not the observed {recorded}",
                )
            )
        if step.op == "drain" and f"{step.namespace}/{step.source}" not in deployments:
            problems.append(
                (entry, f"drains from Deployment {step.source}, which the plan did not observe")
            )
    return problems


def step_problem(step: WriteStep, cluster: str) -> str | None:
    """The shape of one write (for ``execute``'s check of plans made in code)."""
    problem = _names_problem(step.namespace, step.name)
    if problem is not None:
        return problem
    if step.resource_version is not None:
        problem = resource_version_problem(step.resource_version)
        if problem is not None:
            return f"resource_version {problem}"
    elif step.op != "apply":
        return "resource_version missing (only a create has none)"
    if step.op == "apply":
        problem = manifest_problem(step.manifest, step.namespace, step.name, cluster)
        return None if problem is None else f"manifest: {problem}"
    if step.manifest is not None:
        return "only an apply carries a manifest"
    if step.op == "drain":
        problem = subdomain_problem(step.source)
        return None if problem is None else f"source {step.source!r}: {problem}"
    if step.source:
        return "only a drain names a source Deployment"
    return None


def scope_problems(plan: SavedPlan, state: DesiredState, *, content: bool = True) -> list[Problem]:
    """Writes outside what the desired state ``state`` has this reconciler manage:
    namespaces its policies of the plan's cluster deploy to, Deployments of those
    policies under the names the renderer gives them and, with ``content`` (``state``
    is the plan's own revision), as the renderer makes them."""
    problems: list[Problem] = []
    for c_index, cluster in enumerate(plan.clusters):
        where = f"clusters[{c_index}]"
        if cluster.cluster not in state.clusters:
            problems.append((where, f"cluster {cluster.cluster} is not in the desired state"))
            continue
        policies = state.policies_for(cluster.cluster)
        namespaces = {p.namespace for p in policies}
        for index, step in enumerate(cluster.writes):
            entry = f"{where}.writes[{index}] ({step})"
            if step.namespace not in namespaces:
                if _may_remove_a_leftover(step, policies):
                    continue  # checked against the live object: leftover_problems
                problems.append(
                    (
                        entry,
                        f"namespace {step.namespace} is not one the desired state deploys to "
                        f"in cluster {cluster.cluster} ({_listed(namespaces)})",
                    )
                )
            elif step.manifest is not None:
                problem = _rendered_name_problem(step, policies)
                if problem is None and content:
                    problem = rendered_content_problem(
                        step, policies, state.clusters[cluster.cluster], state.templates
                    )
                if problem is not None:
                    problems.append((entry, problem))
    return problems


# The writes that remove what a service left behind: never a create or a put-back.
_REMOVALS = frozenset({"drain", "delete_deployment", "delete_pod"})


def _may_remove_a_leftover(step: WriteStep, policies: Iterable[ServicePolicy]) -> bool:
    """``step`` removes an object outside its service's namespace that is named as the
    renderer names a service's objects (a drain's source Deployment too): possibly
    the leftover of a move, which ``leftover_problems`` confirms on the live object.
    Anything else outside the managed namespaces is refused before a cluster is asked."""
    if step.op not in _REMOVALS:
        return False
    return any(
        policy.namespace != step.namespace
        and all(
            name.startswith(names.service_name_prefix(policy.name))
            for name in (step.name, step.source or step.name)
        )
        for policy in policies
    )


def leftover_problems(
    plan: SavedPlan, state: DesiredState, snapshots: Mapping[str, ClusterSnapshot | None]
) -> list[Problem]:
    """The removals ``scope_problems`` left to the live objects (module doc): each must
    remove, as ``snapshots`` (each cluster read just now, found as the plan observed
    it) shows it, a Deployment or Pod of a service whose policy deploys to another
    namespace, and a drain must take its Pod from such a Deployment."""
    problems: list[Problem] = []
    for c_index, cluster in enumerate(plan.clusters):
        if cluster.cluster not in state.clusters:
            continue  # scope_problems refused it
        policies = {p.name: p for p in state.policies_for(cluster.cluster)}
        namespaces = {p.namespace for p in policies.values()}
        snapshot = snapshots.get(cluster.cluster)
        pods = {str(p.key): p for p in snapshot.pods} if snapshot is not None else {}
        deployments = (
            {str(k): d for k, d in snapshot.deployments.items()} if snapshot is not None else {}
        )
        for index, step in enumerate(cluster.writes):
            if step.namespace in namespaces:
                continue
            removed: list[tuple[str, str | None]] = []  # (what, its service; None: not ours)
            if step.op == "delete_deployment":
                found = deployments.get(step.key)
                removed.append((f"Deployment {step.key}", found.service if found else None))
            else:
                pod = pods.get(step.key)
                removed.append((f"Pod {step.key}", pod.service if pod else None))
                if step.op == "drain":
                    source = f"{step.namespace}/{step.source}"
                    found = deployments.get(source)
                    removed.append((f"Deployment {source}", found.service if found else None))
            for what, service in removed:
                if service is None or not moved_away(service, step.namespace, policies):
                    problems.append(
                        (
                            f"clusters[{c_index}].writes[{index}] ({step})",
                            f"{what} is outside the namespaces the desired state deploys to "
                            f"in cluster {cluster.cluster} ({_listed(namespaces)}) and, as the "
                            "cluster shows it, not left behind by a service that moved to "
                            + (
                                "another namespace"
                                if service is None
                                else f"another namespace (it is service {service}'s)"
                            ),
                        )
                    )
    return problems


def rendered_content_problem(
    step: WriteStep,
    policies: Iterable[ServicePolicy],
    cluster: ClusterSpec,
    templates: Mapping[str, Any],
) -> str | None:
    """Where the manifest of ``step`` (in scope: ``_rendered_name_problem`` passed)
    differs from what the renderer makes of its policy and pod template in the desired
    state for the group, domain, GPU type and replicas the manifest names; None when
    it does not. Only the precondition (``metadata.resourceVersion``) is the plan's own."""
    assert step.manifest is not None
    metadata = step.manifest["metadata"]
    annotations = metadata.get("annotations", {})
    service, role = metadata["labels"][names.SERVICE_LABEL], metadata["labels"][names.ROLE_LABEL]
    policy = next(p for p in policies if p.name == service and p.namespace == step.namespace)
    domain = annotations.get(names.DOMAIN_ANNOTATION)
    gpu_type = annotations.get(names.GPU_TYPE_ANNOTATION)
    if domain is None or gpu_type is None:
        return (
            f"lacks the {names.DOMAIN_ANNOTATION} or {names.GPU_TYPE_ANNOTATION} annotation "
            "the renderer writes"
        )
    replicas = step.manifest["spec"]["replicas"]
    placed, unplaced = GroupRole(gpu_type, replicas), GroupRole(gpu_type, 0)
    group = DeploymentGroup(
        service,
        cluster.name,
        annotations[names.GROUP_ID_ANNOTATION],
        domain,
        annotations.get(names.SUBGROUP_ANNOTATION),
        placed if role == "prefill" else unplaced,
        placed if role == "decode" else unplaced,
    )
    try:
        rendered = render_deployment(group, role, policy, cluster, templates)
    except RenderError as exc:
        return f"is not one the desired state renders: {quoted(str(exc))}"
    expected = effective_manifest(rendered, replicas, None)
    written = {
        **step.manifest,
        "metadata": {k: v for k, v in metadata.items() if k != "resourceVersion"},
    }
    where = first_difference(written, expected)
    if where is None:
        return None
    return (
        f"differs at {quoted(where)} from the Deployment the desired state renders for "
        f"service {service}'s {role} of group {group.group_id} (its policy's pod template "
        f"{policy.role(role).template}): a plan writes only what its revision renders"
    )


def first_difference(written: Any, expected: Any, path: str = "") -> str | None:
    """The path (``spec.template.spec.containers[0].image``) of the first place where
    ``written`` and ``expected`` differ, None where they are equal (JSON values)."""
    if isinstance(written, Mapping) and isinstance(expected, Mapping):
        for key in sorted({*written, *expected}, key=str):
            here = f"{path}.{key}" if path else str(key)
            if key not in written or key not in expected:
                return here
            found = first_difference(written[key], expected[key], here)
            if found is not None:
                return found
        return None
    if isinstance(written, list) and isinstance(expected, list):
        for index, (w, e) in enumerate(zip(written, expected, strict=False)):
            found = first_difference(w, e, f"{path}[{index}]")
            if found is not None:
                return found
        return (
            None if len(written) == len(expected) else f"{path}[{min(len(written), len(expected))}]"
        )
    # Numbers compare by value (YAML's 1 and JSON's 1.0 are one number); a boolean is
    # not the number it equals in Python.
    same = written == expected and isinstance(written, bool) == isinstance(expected, bool)
    return None if same else path or "(the whole manifest)"


def _rendered_name_problem(step: WriteStep, policies: Iterable[ServicePolicy]) -> str | None:
    """The manifest is of a policy in its namespace, named as the renderer names it."""
    assert step.manifest is not None
    metadata = step.manifest["metadata"]
    service = metadata["labels"][names.SERVICE_LABEL]
    if not any(p.name == service and p.namespace == step.namespace for p in policies):
        return f"service {service!r} has no policy deploying to namespace {step.namespace}"
    group_id = metadata.get("annotations", {}).get(names.GROUP_ID_ANNOTATION)
    role = metadata["labels"].get(names.ROLE_LABEL)
    if not isinstance(group_id, str) or role not in ("prefill", "decode"):
        return f"lacks the {names.GROUP_ID_ANNOTATION} annotation or {names.ROLE_LABEL} label"
    expected = names.deployment_name(service, group_id, role)
    if step.name != expected:
        return (
            f"named {step.name}, not {expected} as service {service}'s {role} of group {group_id}"
        )
    return None


def _listed(values: Iterable[str]) -> str:
    ordered = sorted(values)
    return ", ".join(ordered) if ordered else "none"

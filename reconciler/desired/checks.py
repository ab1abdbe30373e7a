"""Checks that span several fields or files.

Each check returns ``(file_key, path, message)`` problems instead of raising, so the
loader can place every one of them on its YAML line and report them all together.
``path`` is the key path inside the file, e.g. ``("s2", 0, "s1", 1, "name")``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from reconciler.desired.models import (
    Affinity,
    ClusterSpec,
    ServicePolicy,
    SubgroupClass,
    iter_s0,
)
from reconciler.desired.names import expand_range, range_size
from reconciler.dns1123 import label_value_problem
from reconciler.state import ROLES, group_id_prefix

Path = tuple[object, ...]
Problem = tuple[Path, str]

CLASS_MEANING: dict[str, str] = {
    "low": "S2-homogeneous: one GPU type under every switch",
    "medium": "S2-heterogeneous: several GPU types, each S1 one type",
    "high": "S1-heterogeneous: GPU types mixed under one S1",
}


def derive_subgroup_class(types_per_s1: Mapping[str, Iterable[str]]) -> SubgroupClass:
    """The scarcity class of an RDMA subgroup from the GPU types under each of its S1
    switches: one type overall -> low; several types but each S1 one type -> medium;
    any S1 with several types -> high."""
    per_s1 = {s1: set(types) for s1, types in types_per_s1.items()}
    all_types = set().union(*per_s1.values()) if per_s1 else set()
    if len(all_types) <= 1:
        return "low"
    if all(len(types) <= 1 for types in per_s1.values()):
        return "medium"
    return "high"


def subgroup_s1_members(spec: ClusterSpec, switches: Iterable[str]) -> dict[str, str] | None:
    """Map each S1 under the named S1/S2 switches to its S2. None if a name is unknown."""
    s1_parent = spec.s2_of_s1
    s2_children = spec.s1_under_s2
    members: dict[str, str] = {}
    for name in switches:
        if name in s2_children:
            members.update({s1: name for s1 in s2_children[name]})
        elif name in s1_parent:
            members[name] = s1_parent[name]
        else:
            return None
    return members


def subgroup_s1s(
    spec: ClusterSpec, s1_order: Iterable[str], s1_parent: Mapping[str, str]
) -> dict[str, tuple[list[str], bool]]:
    """The RDMA subgroups of a cluster: per name its S1 switches and whether it is
    declared. A declared subgroup takes the S1s no earlier one took (one with none left
    is no subgroup); the S1s of each S2 that none took make one implicit subgroup,
    named as the S2 (``<S2>-implicit`` where a declared one has that name)."""
    out: dict[str, tuple[list[str], bool]] = {}
    covered: set[str] = set()
    for declared in spec.rdma_subgroups:
        members = subgroup_s1_members(spec, declared.switches)
        if members is None:  # check_cluster rejects this; be defensive
            continue
        fresh = [s1 for s1 in members if s1 not in covered]
        if fresh:
            covered.update(fresh)
            out[declared.name] = (fresh, True)
    uncovered: dict[str, list[str]] = defaultdict(list)
    for s1 in s1_order:
        if s1 not in covered:
            uncovered[s1_parent[s1]].append(s1)
    for s2, s1s in uncovered.items():
        name = s2 if s2 not in out else f"{s2}-implicit"
        out[name] = (s1s, False)
    return out


def group_labels(spec: ClusterSpec, affinity: Affinity) -> tuple[str, ...]:
    """Every label a new group of a service with this affinity can get its id from in
    the cluster (``reconciler.topology.SchedulingDomain.group_label``), from the file
    alone (no topology is built): each S1 or S2 switch (every one lies in some
    subgroup), or for loose affinity each subgroup and the cluster itself (a group
    spanning subgroups)."""
    if affinity == "s1":
        return tuple(s1.name for s2 in spec.s2 for s1 in s2.s1)
    if affinity == "s2":
        return tuple(s2.name for s2 in spec.s2)
    s1_order = [s1.name for s2 in spec.s2 for s1 in s2.s1]
    return (*subgroup_s1s(spec, s1_order, spec.s2_of_s1), spec.name)


# Names that ranges may expand to over the whole fleet (every cluster file together),
# per kind. 100,000 nodes are 800,000 GPUs at eight a node, ten times the largest
# fleets this is built for; expanding and checking them takes a few seconds. Without
# a total, 40 lines of `hx-[1-100000]` (5.7 KB) would build 4 million nodes.
MAX_FLEET_NODES = 100_000
MAX_FLEET_SWITCHES = 100_000


def range_names(spec: ClusterSpec) -> list[tuple[Path, str, int]]:
    """``(path, kind, names)`` for every name pattern of a cluster, kind "node" or
    "switch", counted without expanding anything (a malformed pattern counts 0:
    ``check_cluster`` reports it)."""

    def size(pattern: str) -> int:
        try:
            return range_size(pattern)
        except ValueError:
            return 0

    out: list[tuple[Path, str, int]] = []
    for i2, s2 in enumerate(spec.s2):
        for i1, s1 in enumerate(s2.s1):
            for i0, s0 in enumerate(s1.s0):
                s0_path: Path = ("s2", i2, "s1", i1, "s0", i0)
                out.append(((*s0_path, "name"), "switch", size(s0.name)))
                if isinstance(s0.nodes, str):
                    out.append(((*s0_path, "nodes"), "node", size(s0.nodes)))
                    continue
                for j, entry in enumerate(s0.nodes):
                    name = entry if isinstance(entry, str) else entry.name
                    out.append(((*s0_path, "nodes", j), "node", size(name)))
    return out


def check_fleet_budget(spec: ClusterSpec, used: dict[str, int]) -> list[Problem]:
    """Count this cluster's range names into ``used`` (totals over the clusters
    checked so far); a problem when a total goes over its limit. It is placed at the
    largest range counted up to the one that crossed the limit (the later of equals):
    one ``h-[1-99999]`` followed by a range of 20 is the range to fix, not the 20.
    Run before ``check_cluster``, which expands the ranges."""
    limits = {"node": MAX_FLEET_NODES, "switch": MAX_FLEET_SWITCHES}
    total = dict(used)
    largest: dict[str, tuple[int, Path]] = {}
    for path, kind, count in range_names(spec):
        total[kind] = total.get(kind, 0) + count
        if count >= largest.get(kind, (0, ()))[0]:
            largest[kind] = (count, path)
        if total[kind] > limits[kind]:
            # A refused cluster is not counted: the next file is judged on its own.
            blamed_count, blamed = largest[kind]
            crossed = "" if blamed == path else f", and {_fmt(path)} takes the total over"
            return [
                (
                    blamed,
                    f"the fleet's {kind} names expand to more than {limits[kind]:,} "
                    f"(this range adds {blamed_count:,}{crossed}); no real fleet has that many",
                )
            ]
    used.update(total)
    return []


def check_cluster(spec: ClusterSpec) -> list[Problem]:
    """Names unique, ranges valid, GPU types known, every node typed, subgroups sound."""
    problems: list[Problem] = []

    # Switch names: unique across all levels (a switch has exactly one parent), and
    # each a label value, as it is the value of its level's topology label on a node
    # (and of the node affinity that pins a group to an S1 or S2 switch).
    seen: dict[str, Path] = {}
    unlabelled: set[Path] = set()  # one problem per pattern, not per name it expands to

    def claim(name: str, path: Path, label_key: str) -> None:
        if name in seen:
            problems.append(
                ((*path, "name"), f"switch '{name}' is declared twice (also at {_fmt(seen[name])})")
            )
            return
        seen[name] = path
        problem = label_value_problem(name)
        if problem is not None and path not in unlabelled:
            unlabelled.add(path)
            problems.append(
                (
                    (*path, "name"),
                    f"switch '{name}' is not a Kubernetes label value, as the value of node "
                    f"label {label_key} must be ({problem})",
                )
            )

    for i2, s2 in enumerate(spec.s2):
        claim(s2.name, ("s2", i2), spec.labels.s2)
        for i1, s1 in enumerate(s2.s1):
            claim(s1.name, ("s2", i2, "s1", i1), spec.labels.s1)
    try:
        for s0_name, _s0, _s1, _s2, path in iter_s0(spec):
            claim(s0_name, path, spec.labels.s0)
    except ValueError as exc:
        problems.append(((), str(exc)))
        return problems
    # A GPU type without a node_label is its own label value.
    for gpu_type, gpu in spec.gpu_types.items():
        problem = label_value_problem(gpu_type) if gpu.node_label is None else None
        if problem is not None:
            problems.append(
                (
                    ("gpu_types", gpu_type),
                    f"GPU type '{gpu_type}' is not a Kubernetes label value, as the value of "
                    f"node label {spec.labels.gpu_type} must be ({problem}); set its node_label",
                )
            )

    # Default GPU types must be in the catalogue.
    def check_defaults(defaults_path: Path, gpu_type: str | None) -> None:
        if gpu_type is not None and gpu_type not in spec.gpu_types:
            problems.append(
                (
                    (*defaults_path, "gpu_type"),
                    unknown_message("GPU type", gpu_type, spec.gpu_types),
                )
            )

    check_defaults(("defaults",), spec.defaults.gpu_type)
    for i2, s2 in enumerate(spec.s2):
        check_defaults(("s2", i2, "defaults"), s2.defaults.gpu_type)
        for i1, s1 in enumerate(s2.s1):
            check_defaults(("s2", i2, "s1", i1, "defaults"), s1.defaults.gpu_type)
            for i0, s0 in enumerate(s1.s0):
                check_defaults(("s2", i2, "s1", i1, "s0", i0, "defaults"), s0.defaults.gpu_type)

    # Nodes: expandable, typed, unique.
    try:
        nodes = spec.located_nodes
    except ValueError as exc:
        path = exc.args[1] if len(exc.args) > 1 else ()
        problems.append((path, exc.args[0]))
        return problems
    node_seen: dict[str, Path] = {}
    for node, path in nodes:
        if node.gpu_type not in spec.gpu_types:
            problems.append(
                (
                    path,
                    f"node {node.name}: {unknown_message('GPU type', node.gpu_type, spec.gpu_types)}",
                )
            )
        if node.name in node_seen:
            problems.append(
                (
                    path,
                    f"node '{node.name}' is declared twice (also at {_fmt(node_seen[node.name])})",
                )
            )
        else:
            node_seen[node.name] = path

    # RDMA subgroups: known switches, no switch in two subgroups, class as declared.
    types_per_s1: dict[str, set[str]] = defaultdict(set)
    for node, _path in nodes:
        types_per_s1[node.s1].add(node.gpu_type)
    owner: dict[str, str] = {}
    names = Counter(sg.name for sg in spec.rdma_subgroups)
    for i, subgroup in enumerate(spec.rdma_subgroups):
        path = ("rdma_subgroups", i)
        if names[subgroup.name] > 1:
            problems.append(((*path, "name"), f"subgroup '{subgroup.name}' is declared twice"))
        members = subgroup_s1_members(spec, subgroup.switches)
        if members is None:
            for j, name in enumerate(subgroup.switches):
                if subgroup_s1_members(spec, [name]) is None:
                    problems.append(
                        (
                            (*path, "switches", j),
                            unknown_message(
                                "S1/S2 switch", name, [*spec.s1_under_s2, *spec.s2_of_s1]
                            ),
                        )
                    )
            continue
        for s1_name in members:
            if s1_name in owner and owner[s1_name] != subgroup.name:
                problems.append(
                    (
                        (*path, "switches"),
                        f"S1 '{s1_name}' is already in subgroup '{owner[s1_name]}'",
                    )
                )
            owner[s1_name] = subgroup.name
        derived = derive_subgroup_class({name: types_per_s1[name] for name in members})
        if subgroup.declared_class is not None and subgroup.declared_class != derived:
            problems.append(
                (
                    (*path, "class"),
                    f"declared '{subgroup.declared_class}' but the GPUs below make it '{derived}' "
                    f"({CLASS_MEANING[derived]})",
                )
            )
    return problems


def check_policy(policy: ServicePolicy) -> list[Problem]:
    """Ranges inside one service file."""
    problems: list[Problem] = []
    for role in ("prefill", "decode"):
        rp = policy.role(role)
        if rp.min_instances > rp.max_instances:
            problems.append(
                (
                    (role, "min_instances"),
                    f"must be <= max_instances ({rp.min_instances} > {rp.max_instances})",
                )
            )
    ratio = policy.pd_ratio
    if ratio.min > ratio.max:
        problems.append((("pd_ratio", "min"), "must not exceed pd_ratio.max"))
    elif not ratio.min - 1e-9 <= ratio.target <= ratio.max + 1e-9:
        problems.append((("pd_ratio", "target"), "must lie inside [pd_ratio.min, pd_ratio.max]"))
    tiers = policy.scaling.latency_tiers
    for metric in ("ttft", "tbt"):
        thresholds = [t.above for t in tiers if t.metric == metric]
        if len(set(thresholds)) != len(thresholds):
            index = next(
                i
                for i, t in enumerate(tiers)
                if t.metric == metric and thresholds.count(t.above) > 1
            )
            problems.append(
                (
                    ("scaling", "latency_tiers", index, "above"),
                    f"two {metric} tiers share one threshold",
                )
            )
    # Imported here: the presets import this package's models.
    from reconciler.observe.presets import QUERY_KEYS, check_metrics_config

    for key in policy.metrics.queries:
        if key not in QUERY_KEYS:
            problems.append(
                (("metrics", "queries", key), unknown_message("signal", key, QUERY_KEYS))
            )
    # Label names, query placeholders, and a source for every signal the policy acts on.

    problems.extend(check_metrics_config(policy))
    return problems


def check_policy_against_cluster(policy: ServicePolicy, cluster: ClusterSpec) -> list[Problem]:
    """GPU types a service asks for exist in its cluster, and one instance fits a node."""
    problems: list[Problem] = []
    try:
        max_gpus_per_type = cluster.largest_node_gpus
    except ValueError as exc:
        # Only a cluster that passed check_cluster comes here; never skip silently.
        return [
            (
                ("cluster",),
                f"cluster '{cluster.name}' could not be read ({exc.args[0]}), so the service "
                "is not checked against it",
            )
        ]
    for role in ("prefill", "decode"):
        rp = policy.role(role)
        for gpu_type in rp.gpu_types:
            if gpu_type not in cluster.gpu_types:
                problems.append(
                    (
                        (role, "gpu_types", gpu_type),
                        unknown_message(
                            f"GPU type in cluster '{cluster.name}'", gpu_type, cluster.gpu_types
                        ),
                    )
                )
            elif (
                max_gpus_per_type.get(gpu_type, 0)
                and rp.gpus_per_instance > max_gpus_per_type[gpu_type]
            ):
                problems.append(
                    (
                        (role, "gpus_per_instance"),
                        f"{rp.gpus_per_instance} GPUs per instance do not fit a {gpu_type} node "
                        f"({max_gpus_per_type[gpu_type]} GPUs); multi-node instances are not supported yet",
                    )
                )
        known = [t for t in rp.gpu_types if t in cluster.gpu_types]
        if known and not any(max_gpus_per_type.get(t, 0) for t in known):
            # A pinned type (the only one allowed), or every allowed one, with no node
            # to run on: the role could never be placed.
            problems.append(
                (
                    (role, "gpu_types"),
                    f"no node of cluster '{cluster.name}' has GPU type "
                    f"{' or '.join(repr(t) for t in known)}: the {role} role can never be placed",
                )
            )
    problems.extend(check_model_fits(policy, cluster))
    return problems


def check_deployment_names(
    policies: Iterable[ServicePolicy], clusters: Mapping[str, ClusterSpec]
) -> list[tuple[str, Path, str]]:
    """``(service, path, message)`` for each service whose Deployments could be named
    as another's of the same cluster and namespace, at the later service's ``name``.

    A Deployment is ``deployment_name(service, group_id, role)``: the text
    ``<service>-<group_id>-<p|d>`` made a DNS label, where a group id is
    ``group_id_prefix(label)`` and a number, ``label`` being one of the cluster's
    ``group_labels`` for the service's affinity. So every name of a service in one
    domain is ``dns_label(P + "<n>-<p|d>")`` with ``P = <service>-g-<label>-``, and
    two services may share a name only if their P are equal:

    - Texts: P ends with '-' and the rest, ``<n>-<p|d>``, holds one '-'. If P1 were a
      proper prefix of P2, P1's rest would hold what P2 adds (ending in '-') and P2's
      rest: two '-'. Otherwise P1 and P2 differ inside both. Either way the texts differ.
    - Names: ``dns_label`` keeps a valid text of at most 46 characters as it is (ending
      in '-p' or '-d') and makes any other ``<head>-<8 hex digits of its hash>`` (no
      '-' before its last character), so a kept text never equals a hashed one, two kept
      ones differ as their texts do, and two hashed ones share a name only if the
      32-bit hashes of different texts collide (about 2**-32 a pair: the renderer's
      duplicate check stays the backstop, as for groups already running under another
      affinity or a renamed switch, which keep their ids).

    With equal P, the first group of either service in that domain has the same name."""
    out: list[tuple[str, Path, str]] = []
    # (cluster, namespace, P) -> the first service with that prefix, and its label
    claimed: dict[tuple[str, str, str], tuple[ServicePolicy, str]] = {}
    labels: dict[tuple[str, str], tuple[str, ...]] = {}  # per cluster and affinity
    for policy in policies:
        cluster = clusters.get(policy.cluster)
        if cluster is None:
            continue
        reported: set[str] = set()  # one problem per pair of services
        where = (cluster.name, policy.affinity)
        if where not in labels:
            labels[where] = group_labels(cluster, policy.affinity)
        for label in labels[where]:
            key = (cluster.name, policy.namespace, f"{policy.name}-{group_id_prefix(label)}")
            first = claimed.setdefault(key, (policy, label))
            other, other_label = first
            if other.name == policy.name or other.name in reported:
                continue
            reported.add(other.name)
            # Imported here, on the error path only: validation imports no applier.
            from reconciler.apply.names import deployment_name

            name = deployment_name(policy.name, f"{group_id_prefix(label)}1", "prefill")
            out.append(
                (
                    policy.name,
                    ("name",),
                    f"service '{policy.name}' in {_domain(cluster, policy, label)} and service "
                    f"'{other.name}' in {_domain(cluster, other, other_label)} would both name "
                    f"a Deployment '{name}' (cluster '{cluster.name}', namespace "
                    f"'{policy.namespace}'): rename one of the services or domains",
                )
            )
    return out


def _domain(cluster: ClusterSpec, policy: ServicePolicy, label: str) -> str:
    """How a user names the domain that ``label`` stands for under the policy's affinity."""
    if policy.affinity != "cluster":
        return f"{policy.affinity.upper()} switch '{label}'"
    return "the whole cluster" if label == cluster.name else f"subgroup '{label}'"


def check_model_fits(policy: ServicePolicy, cluster: ClusterSpec) -> list[Problem]:
    """Each role has an allowed GPU type in the cluster whose instance holds the
    model's weights and some KV cache: a role with none has no capacity, and the
    planner could only hold it. Judged as the planner judges which types it may size
    on (``reconciler.perfmodel.memory``, read by ``perf_context.fitting_perfs``); types
    missing from the cluster are reported by ``check_policy_against_cluster``."""
    return _model_fits(policy, cluster)[0]


def model_fit_warnings(policy: ServicePolicy, cluster: ClusterSpec) -> list[Problem]:
    """Allowed GPU types of a role that cannot hold the model where another type of
    the role can, at the role's ``gpu_types``: the planner sizes on the types that fit,
    and an instance placed on one that does not cannot serve. Warnings, not errors: the
    role still runs."""
    return _model_fits(policy, cluster)[1]


def _model_fits(policy: ServicePolicy, cluster: ClusterSpec) -> tuple[list[Problem], list[Problem]]:
    """Per role, the allowed GPU types that cannot hold the model: an error where none
    can (``check_model_fits``), a warning where another can (``model_fit_warnings``)."""
    # Imported here: the performance model imports this package's models.
    from reconciler.perfmodel.memory import memory_held, memory_need, role_memories

    errors: list[Problem] = []
    warnings: list[Problem] = []
    for role in ROLES:
        memories = role_memories(policy, cluster, role)
        misfits = [m for m in memories if not m.fits]
        if not misfits:
            continue
        gpus = policy.role(role).gpus_per_instance
        needs = f"it needs {memory_need(policy.model, misfits[0])}; an instance holds {memory_held(misfits)}"
        if len(misfits) == len(memories):
            errors.append(
                (
                    ("model", "params_b"),
                    f"no allowed {role} GPU type holds the model at {gpus} GPUs per instance "
                    f"({role}.gpus_per_instance): {needs}; allow a larger GPU type or more GPUs "
                    "per instance",
                )
            )
        else:
            warnings.append(
                (
                    (role, "gpu_types"),
                    f"{role} GPU type {', '.join(m.gpu_type for m in misfits)} cannot hold "
                    f"the model at {gpus} GPUs per instance: {needs}; the role is sized on "
                    f"{', '.join(m.gpu_type for m in memories if m.fits)}, and an instance "
                    "placed on a type that does not fit cannot serve",
                )
            )
    return errors, warnings


def gpu_choice_warnings(policy: ServicePolicy, cluster: ClusterSpec) -> list[Problem]:
    """Roles asked to rank several GPU types by cost (``gpu_choice: cost``) that will
    be ranked by their weights instead, and why: no ``request_shape`` to price the types
    at, or a cluster without prices (``reconciler.policy.gpu_economics``), at the role's
    ``gpu_choice``. Warnings, not errors: the weights' order is a valid ranking."""
    out: list[Problem] = []
    for role in ("prefill", "decode"):
        rp = policy.role(role)
        present = [t for t in rp.gpu_types if t in cluster.gpu_types]
        if rp.gpu_choice != "cost" or len(present) < 2:
            continue
        if policy.request_shape is None:
            why = "the policy declares no request_shape to price them at"
        elif any(cluster.gpu_types[t].cost_per_hour is None for t in present):
            why = f"cluster '{cluster.name}' has no cost_per_hour for them"
        else:
            continue
        out.append(
            (
                (role, "gpu_choice"),
                f"{role} ranks {', '.join(present)} by cost, but {why}: they are ranked by "
                "their weights",
            )
        )
    return out


def unknown_message(what: str, name: str, known: Iterable[str]) -> str:
    """``unknown WHAT 'NAME'`` with the closest known name, or else the known names
    (``known_names``); nothing more when none is known."""
    import difflib

    known_list = sorted(known)
    hint = difflib.get_close_matches(name, known_list, n=1)
    if hint:
        return f"unknown {what} '{name}'; did you mean '{hint[0]}'?"
    if not known_list:
        return f"unknown {what} '{name}'"
    return f"unknown {what} '{name}'; known: {known_names(known_list)}"


# How many names a "known: ..." list shows before it says how many more there are.
KNOWN_SHOWN = 8


def known_names(names: list[str]) -> str:
    """``names`` joined for a "known: ..." hint: the first ``KNOWN_SHOWN``, then how
    many more there are, so a cut list never reads as the whole."""
    shown = ", ".join(names[:KNOWN_SHOWN])
    more = len(names) - KNOWN_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _fmt(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


__all__ = [
    "CLASS_MEANING",
    "MAX_FLEET_NODES",
    "MAX_FLEET_SWITCHES",
    "check_cluster",
    "check_deployment_names",
    "check_fleet_budget",
    "check_model_fits",
    "check_policy",
    "check_policy_against_cluster",
    "derive_subgroup_class",
    "expand_range",
    "gpu_choice_warnings",
    "group_labels",
    "known_names",
    "model_fit_warnings",
    "subgroup_s1_members",
    "subgroup_s1s",
    "unknown_message",
]

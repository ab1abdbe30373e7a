"""Can any live Node run a rendered Deployment's Pods, by its labels? (pure)

A Deployment whose pod template changes is rolled by the Deployment controller: new
Pods start and old ones stop, up to ``maxUnavailable`` (25% by default) at once
without waiting for the new ones to be scheduled. If no Node matches the new
template's node affinity (a typo in a topology label key in the cluster file, a
GPU-type label no Node carries), the new Pods stay Pending and the old ones are gone:
capacity lost by a change that validated. So before a template change or a create
is written, the rendered Pods' required node affinity and ``nodeSelector`` are
matched against the live Nodes' labels, as the scheduler matches them
(``k8s.io/component-helpers/scheduling/corev1/nodeaffinity``): the selector terms are
ORed, the expressions and fields within a term ANDed, and a term without any
expression or field matches no Node. Taints, resources and readiness are not
considered: this asks only whether the labels leave any Node at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from reconciler.observe.kubernetes import LiveNode
from reconciler.text_safety import quoted

JsonObject = Mapping[str, Any]


def _integer(text: object) -> int | None:
    try:
        return int(str(text))
    except ValueError:
        return None


def _requirement_holds(requirement: JsonObject, value: str | None) -> bool:
    """One ``matchExpressions`` or ``matchFields`` entry against a Node's value for
    its key (None: the Node has no such label)."""
    operator = requirement.get("operator")
    values = [str(v) for v in requirement.get("values") or ()]
    if operator == "In":
        return value is not None and value in values
    if operator == "NotIn":
        return value is None or value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt") and value is not None and len(values) == 1:
        have, bound = _integer(value), _integer(values[0])
        if have is None or bound is None:
            return False
        return have > bound if operator == "Gt" else have < bound
    return False  # an operator the scheduler would refuse matches nothing


def _term_holds(term: JsonObject, node: LiveNode) -> bool:
    expressions = term.get("matchExpressions") or ()
    fields = term.get("matchFields") or ()
    if not expressions and not fields:
        return False
    return all(
        _requirement_holds(r, node.labels.get(str(r.get("key")))) for r in expressions
    ) and all(
        _requirement_holds(r, node.name if r.get("key") == "metadata.name" else None)
        for r in fields
    )


def _required_terms(pod_spec: JsonObject) -> Sequence[JsonObject] | None:
    """The required node-selector terms; None when the Pod has none (any Node)."""
    required = ((pod_spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    if "nodeSelectorTerms" not in required:
        return None
    return list(required.get("nodeSelectorTerms") or ())


def node_matches(pod_spec: JsonObject, node: LiveNode) -> bool:
    """Whether the scheduler's label checks let a Pod of ``pod_spec`` onto ``node``."""
    selector = pod_spec.get("nodeSelector") or {}
    if any(node.labels.get(str(k)) != str(v) for k, v in selector.items()):
        return False
    terms = _required_terms(pod_spec)
    return terms is None or any(_term_holds(term, node) for term in terms)


def _first_unmet(pod_spec: JsonObject, nodes: Sequence[LiveNode]) -> str:
    """The first requirement no Node meets, for the message (the reason in most
    cases: one label key or value no Node has)."""
    for key, want in (pod_spec.get("nodeSelector") or {}).items():
        if not any(n.labels.get(str(key)) == str(want) for n in nodes):
            return f"no node has label '{quoted(f'{key}={want}')}'"
    for term in _required_terms(pod_spec) or ():
        for requirement in term.get("matchExpressions") or ():
            key = str(requirement.get("key"))
            if not any(_requirement_holds(requirement, n.labels.get(key)) for n in nodes):
                if not any(key in n.labels for n in nodes):
                    return f"no node has a label '{quoted(key)}'"
                values = ", ".join(str(v) for v in requirement.get("values") or ())
                operator = quoted(str(requirement.get("operator")))
                return f"no node meets '{quoted(key)}' {operator} ['{quoted(values)}']"
    return "no node meets all of its requirements at once"


def unschedulable_problem(
    manifest: JsonObject,
    nodes: Sequence[LiveNode],
    seen: dict[str, str | None] | None = None,
) -> str | None:
    """Why no Node of ``nodes`` can run a Pod of the Deployment ``manifest`` by its
    labels; None when one can, or when no Node was listed (nothing to judge by).
    ``seen`` keeps the answer per distinct selector and affinity across calls over
    the same ``nodes``: a cycle's groups share a few switches and GPU types, and each
    answer scans the cluster's Nodes."""
    if not nodes:
        return None
    pod_spec = ((manifest.get("spec") or {}).get("template") or {}).get("spec") or {}
    key = json.dumps(
        [pod_spec.get("nodeSelector"), pod_spec.get("affinity")], sort_keys=True, default=str
    )
    if seen is not None and key in seen:
        return seen[key]
    problem = _problem(pod_spec, nodes)
    if seen is not None:
        seen[key] = problem
    return problem


def _problem(pod_spec: JsonObject, nodes: Sequence[LiveNode]) -> str | None:
    if any(node_matches(pod_spec, node) for node in nodes):
        return None
    return (
        f"none of the cluster's {len(nodes)} nodes matches its node affinity "
        f"({_first_unmet(pod_spec, nodes)}): not written, so its Pods are not replaced "
        "by Pods no node can run; check the cluster file's label keys and values "
        "against the nodes' labels"
    )

"""Pod templates (the files ``RolePolicy.template`` names): the rules a template must
meet for the renderer (``reconciler.apply.render``) to turn it into a Deployment.

The rules live here, once. The loader checks every template a policy names with
them, so a revision holding a template the renderer could not use is invalid (and
the loop holds the current state, as for any ``ConfigError``) instead of failing
the apply of a whole cluster later; the renderer checks them again before it
touches a template, so a template handed to it directly fails with a
``RenderError`` naming the field, never a raw ``AttributeError`` or ``TypeError``.

A template is a Kubernetes PodTemplateSpec: ``metadata`` and ``spec``. The parts the
renderer reads or writes must have the shape it expects (labels and annotations:
mappings of strings; ``spec.containers``: at least one container; each container's
``ports`` and ``env``: lists of mappings, ``resources`` and its ``requests`` and
``limits``: mappings; the required node affinity down to each term's
``matchExpressions``). A missing part is fine (the renderer adds it); ``null`` is
not. Everything else passes through to the API server as written, but must be JSON,
as the manifest and its hash are: string keys, finite numbers, no YAML timestamps,
binaries or sets.
"""

from __future__ import annotations

import math
from typing import Any

KeyPath = tuple[object, ...]
TemplateProblem = tuple[KeyPath, str]

# A hostile template may break every value it has; a few located problems tell the
# author what to fix, and the rest are counted.
MAX_TEMPLATE_PROBLEMS = 20

_TOP_LEVEL_KEYS = ("metadata", "spec")


def describe_kind(value: object) -> str:
    """What a YAML value is, in the words of an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a YAML {type(value).__name__} value"


class _Problems:
    """The problems found so far, one per key path, at most ``MAX_TEMPLATE_PROBLEMS``."""

    def __init__(self) -> None:
        self.found: dict[KeyPath, str] = {}

    @property
    def full(self) -> bool:
        return len(self.found) >= MAX_TEMPLATE_PROBLEMS

    def add(self, path: KeyPath, message: str) -> None:
        if path not in self.found and not self.full:
            self.found[path] = message

    def mapping(
        self, parent: dict[Any, Any], key: str, path: KeyPath, *, required: str = ""
    ) -> dict[Any, Any] | None:
        """``parent[key]`` when it is a mapping; a problem when it is anything else,
        or absent and ``required`` (which then says what belongs there)."""
        if key not in parent:
            if required:
                self.add((*path, key), f"required field is missing ({required})")
            return None
        value = parent[key]
        if not isinstance(value, dict):
            self.add((*path, key), f"must be a mapping, not {describe_kind(value)}")
            return None
        return value

    def mappings(
        self, parent: dict[Any, Any], key: str, path: KeyPath, *, required: str = ""
    ) -> list[tuple[KeyPath, dict[Any, Any]]]:
        """The items of the list ``parent[key]`` that are mappings, each with its path;
        a problem for a list that is not one, or an item that is not a mapping."""
        if key not in parent:
            if required:
                self.add((*path, key), f"required field is missing ({required})")
            return []
        value = parent[key]
        if not isinstance(value, list):
            self.add((*path, key), f"must be a list of mappings, not {describe_kind(value)}")
            return []
        if not value and required:
            self.add((*path, key), f"must not be empty ({required})")
        items = []
        for index, item in enumerate(value):
            if isinstance(item, dict):
                items.append(((*path, key, index), item))
            else:
                self.add((*path, key, index), f"must be a mapping, not {describe_kind(item)}")
        return items

    def strings(self, parent: dict[Any, Any], key: str, path: KeyPath) -> None:
        """``parent[key]``, if present, is a mapping of strings to strings (labels and
        annotations: the API server takes nothing else, YAML's unquoted ``true`` and
        ``8000`` included)."""
        mapping = self.mapping(parent, key, path)
        for name, value in (mapping or {}).items():
            if not isinstance(value, str):
                self.add(
                    (*path, key, name),
                    f"must be a string, not {describe_kind(value)}; quote it",
                )


def _check_shape(template: dict[Any, Any], problems: _Problems) -> None:
    """The parts of the template the renderer reads or writes."""
    for key in template:
        if key not in _TOP_LEVEL_KEYS:
            problems.add((key,), f"unknown key '{key}': a pod template has metadata and spec")
    metadata = problems.mapping(template, "metadata", ())
    if metadata is not None:
        problems.strings(metadata, "labels", ("metadata",))
        problems.strings(metadata, "annotations", ("metadata",))
    spec = problems.mapping(
        template, "spec", (), required="the pod spec, with at least one container"
    )
    if spec is None:
        return
    containers = problems.mappings(spec, "containers", ("spec",), required="at least one container")
    for path, container in [*containers, *problems.mappings(spec, "initContainers", ("spec",))]:
        problems.mappings(container, "ports", path)
        problems.mappings(container, "env", path)
        resources = problems.mapping(container, "resources", path)
        if resources is not None:
            problems.mapping(resources, "requests", (*path, "resources"))
            problems.mapping(resources, "limits", (*path, "resources"))
    # The renderer ANDs its node affinity into every required node-selector term.
    affinity = problems.mapping(spec, "affinity", ("spec",))
    if affinity is None:
        return
    node_affinity = problems.mapping(affinity, "nodeAffinity", ("spec", "affinity"))
    if node_affinity is None:
        return
    required_path: KeyPath = ("spec", "affinity", "nodeAffinity")
    required = problems.mapping(
        node_affinity, "requiredDuringSchedulingIgnoredDuringExecution", required_path
    )
    if required is None:
        return
    terms_path = (*required_path, "requiredDuringSchedulingIgnoredDuringExecution")
    for path, term in problems.mappings(required, "nodeSelectorTerms", terms_path):
        problems.mappings(term, "matchExpressions", path)


def _check_json(template: dict[Any, Any], problems: _Problems) -> None:
    """Every key a string and every value JSON, over the whole template (iterative:
    the loader bounds a document's nodes, aliases expanded, so this walk is bounded)."""
    stack: list[tuple[KeyPath, object]] = [((), template)]
    while stack and not problems.full:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                if not isinstance(key, str):
                    problems.add(
                        (*path, key), f"key must be a string, not {describe_kind(key)}; quote it"
                    )
                stack.append(((*path, key), child))
        elif isinstance(value, list):
            stack.extend(((*path, index), child) for index, child in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.add(path, f"must be a finite number, not {value}")
        elif value is not None and not isinstance(value, str | int | float):
            problems.add(path, f"{describe_kind(value)} is not JSON; quote it")


def template_problems(template: object) -> list[TemplateProblem]:
    """Every reason the renderer could not use ``template`` (the parsed YAML of one
    pod template), each with the key path it is at: ``[]`` for a usable template.
    At most ``MAX_TEMPLATE_PROBLEMS`` are located; a last one then says so."""
    if not isinstance(template, dict):
        return [
            (
                (),
                f"a pod template must be a mapping (metadata, spec), not {describe_kind(template)}",
            )
        ]
    problems = _Problems()
    _check_shape(template, problems)
    _check_json(template, problems)
    found = list(problems.found.items())
    if problems.full:
        # The walk stops at the limit: what it left behind is not counted.
        found.append(
            ((), f"only the first {MAX_TEMPLATE_PROBLEMS} problems are listed; fix these first")
        )
    return found

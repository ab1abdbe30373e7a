"""The configuration half of a pull-request review: what changed between two
revisions of the desired state, field by field, in words a reviewer reads, each
with the file and line where it changed.

Services are compared field by field (``decode target TPS per instance: 1600 ->
1400``); the P/D ratio bounds read as one range (``P/D ratio bounds: 1:4..1:2 ->
1:5..1:2``). Clusters are compared as hardware, not as YAML: nodes added, removed
or retyped are summarised per GPU type and switch, so reshuffling ranges that
describe the same machines reads as no change. Pod templates are compared by their
content as the renderer reads it: which template changed, which services use it,
and a bounded diff of it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from reconciler.desired.loader import DesiredState, ParsedFile, format_key_path
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.desired.ratio import format_ratio

ChangeKind = Literal["added", "removed", "modified"]
ObjectKind = Literal["service", "cluster", "template"]

# Bounds on what one change may add to a review, whatever the revision holds.
MAX_TEMPLATE_USERS = 10  # services named as users of one template
MAX_DIFF_LINES = 60  # lines of one template's content diff
MAX_DIFF_LINE_CHARS = 300  # one line of it
MAX_DIFF_INPUT_LINES = 4_000  # changed lines per side that are diffed line by line


@dataclass(frozen=True)
class ConfigChange:
    """One reviewable change. ``file``/``line`` point into head (base for removals).

    A template change is named by the template's path; its ``label`` says which
    services use it, ``before``/``after`` are content hashes and ``details`` is the
    diff of its content (bounded in lines and in characters per line)."""

    kind: ObjectKind
    name: str
    change: ChangeKind
    field: str  # key path, e.g. "scaling.target_per_instance"; "" for whole objects
    label: str  # what a reviewer reads, e.g. "decode target TPS per instance"
    before: str
    after: str
    file: str
    line: int | None
    details: tuple[str, ...] = ()

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def __str__(self) -> str:
        if self.kind == "template":
            return self._template_text()
        if self.change == "added":
            return f"{self.kind} {self.name}: added ({self.location})"
        if self.change == "removed":
            return f"{self.kind} {self.name}: removed (was {self.location})"
        return f"{self.kind} {self.name}: {self.label}: {self.before} -> {self.after} ({self.location})"

    def _template_text(self) -> str:
        if self.change == "added":
            return f"template {self.name}: added, {self.label} ({self.location})"
        if self.change == "removed":
            return f"template {self.name}: removed, was {self.label} (was {self.location})"
        return f"template {self.name}: content changed, {self.label} ({self.location})"


# Human labels for the fields reviewers look at most; others read as their key path.
_LABELS: dict[str, str] = {
    "slo.ttft_ms": "TTFT SLO (ms)",
    "slo.tbt_ms": "TBT SLO (ms)",
    "slo.quantile": "SLO quantile",
    "slo.attainment_goal": "SLO attainment goal",
    "pd_ratio.target": "P/D ratio target",
    "pd_ratio.dynamic": "dynamic P/D ratio",
    "scaling.metric": "scaling metric",
    "scaling.tolerance": "scaling tolerance",
    "scaling.scale_in_window_s": "scale-in window (s)",
    "scaling.scale_out_window_s": "scale-out window (s)",
    "scaling.cooldown_s": "cooldown (s)",
    "affinity": "scheduling affinity",
    "priority": "priority",
}
_METRIC_WORDS = {
    "decode_tps": "decode target TPS",
    "prefill_tps": "prefill target TPS",
    "prefill_gpu_util": "prefill target GPU utilisation",
    "decode_gpu_util": "decode target GPU utilisation",
    "prefill_sm_active": "prefill target SM activity",
    "decode_sm_active": "decode target SM activity",
    "ttft": "target TTFT",
    "tbt": "target TBT",
}


def _label(key: str, policy: ServicePolicy | None) -> str:
    if key in _LABELS:
        return _LABELS[key]
    if key == "scaling.target_per_instance" and policy is not None:
        return f"{_METRIC_WORDS[policy.scaling.metric]} per instance"
    for role in ("prefill", "decode"):
        if key.startswith(f"{role}."):
            rest = key[len(role) + 1 :]
            words = {
                "gpus_per_instance": "GPUs per instance",
                "min_instances": "min instances",
                "max_instances": "max instances",
                "startup_s": "startup (s)",
            }
            if rest in words:
                return f"{role} {words[rest]}"
            if rest.startswith("gpu_types."):
                return f"{role} GPU type {rest.split('.', 1)[1]} preference"
    return key


def _show(value: Any, key: str = "") -> str:
    if value is None:
        if ".gpu_types." in f".{key}":
            return "not allowed"
        # An unset capacity target is the default planner's derivation, not a gap.
        return "derived from the model" if key.endswith("target_per_instance") else "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if (isinstance(value, tuple | list) and not value) or value is _EMPTY_MAPPING:
        return "none"
    return str(value)


class _EmptyMapping:
    """The leaf an empty mapping flattens to (``labels: {}``); reads "none"."""

    def __repr__(self) -> str:
        return "none"


_EMPTY_MAPPING = _EmptyMapping()
KeyPath = tuple[Any, ...]


def _leaves(value: Any, prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """Flatten a model dump into (key path, leaf) pairs; lists of models index by position."""
    if isinstance(value, dict):
        if not value and prefix:
            yield prefix, _EMPTY_MAPPING
        for key, child in value.items():
            yield from _leaves(child, (*prefix, key))
    elif isinstance(value, list | tuple) and value and isinstance(value[0], dict):
        for index, child in enumerate(value):
            yield from _leaves(child, (*prefix, index))
    else:
        yield prefix, value


class _Parents:
    """The key paths that have leaves below them, in one revision's leaves; indexed
    on first use (most diffs never ask), then each question is one set lookup."""

    def __init__(self, leaves: Mapping[KeyPath, Any]) -> None:
        self._leaves = leaves
        self._parents: set[KeyPath] | None = None

    def __contains__(self, key_path: KeyPath) -> bool:
        if self._parents is None:
            self._parents = {p[:cut] for p in self._leaves for cut in range(1, len(p))}
        return key_path in self._parents


def _differing_leaves(
    old_leaves: Mapping[KeyPath, Any], new_leaves: Mapping[KeyPath, Any]
) -> Iterator[tuple[KeyPath, Any, Any]]:
    """(key path, old, new) for every leaf that differs (None where absent), in key
    order. A mapping that gains its first keys or loses its last is told by those
    keys: it is not also a change of its own from "none" to "unset" or back."""
    old_parents, new_parents = _Parents(old_leaves), _Parents(new_leaves)
    for key_path in sorted(
        old_leaves.keys() | new_leaves.keys(), key=lambda p: [str(x) for x in p]
    ):
        old, new = old_leaves.get(key_path), new_leaves.get(key_path)
        if old == new:
            continue
        if (old is _EMPTY_MAPPING and new is None and key_path in new_parents) or (
            new is _EMPTY_MAPPING and old is None and key_path in old_parents
        ):
            continue
        yield key_path, old, new


def _line(parsed: ParsedFile | None, key_path: tuple[Any, ...]) -> int | None:
    if parsed is None:
        return None
    loc = parsed.locate(key_path)
    return loc[0] if loc else None


class _ModifiedFields:
    """Collects the modified fields of one service or cluster, each located in head's file."""

    def __init__(self, kind: Literal["service", "cluster"], name: str, head: DesiredState):
        self.kind, self.name = kind, name
        self.file = (head.policy_files if kind == "service" else head.cluster_files)[name]
        self._parsed = head.files.get(self.file)
        self.changes: list[ConfigChange] = []

    def add(self, field: str, label: str, old: str, new: str, key_path: tuple[Any, ...]) -> None:
        line = _line(self._parsed, key_path)
        self.changes.append(
            ConfigChange(self.kind, self.name, "modified", field, label, old, new, self.file, line)
        )


def _policy_changes(name: str, base: DesiredState, head: DesiredState) -> list[ConfigChange]:
    before, after = base.policies[name], head.policies[name]
    modified = _ModifiedFields("service", name, head)
    add, changes = modified.add, modified.changes

    # The ratio bounds read as one range.
    old_bounds = (before.pd_ratio.min, before.pd_ratio.max)
    new_bounds = (after.pd_ratio.min, after.pd_ratio.max)
    if old_bounds != new_bounds:
        add(
            "pd_ratio.min..max",
            "P/D ratio bounds",
            f"{format_ratio(old_bounds[0])}..{format_ratio(old_bounds[1])}",
            f"{format_ratio(new_bounds[0])}..{format_ratio(new_bounds[1])}",
            ("pd_ratio", "min" if old_bounds[0] != new_bounds[0] else "max"),
        )

    old_leaves = dict(_leaves(before.model_dump(mode="python", by_alias=True)))
    new_leaves = dict(_leaves(after.model_dump(mode="python", by_alias=True)))
    for key_path, old, new in _differing_leaves(old_leaves, new_leaves):
        key = format_key_path(key_path)
        if key in ("pd_ratio.min", "pd_ratio.max"):
            continue
        if key == "pd_ratio.target":
            old_text, new_text = format_ratio(old), format_ratio(new)
        else:
            old_text, new_text = _show(old, key), _show(new, key)
        add(key, _label(key, after), old_text, new_text, key_path)
    return changes


def _node_summary(spec: ClusterSpec) -> dict[str, tuple[str, str, int]]:
    return {n.name: (n.gpu_type, n.s2, n.gpus) for n in spec.nodes}


def _cluster_changes(name: str, base: DesiredState, head: DesiredState) -> list[ConfigChange]:
    before, after = base.clusters[name], head.clusters[name]
    modified = _ModifiedFields("cluster", name, head)
    add, changes = modified.add, modified.changes

    old_nodes, new_nodes = _node_summary(before), _node_summary(after)
    if old_nodes != new_nodes:
        old_gpus: Counter[tuple[str, str]] = Counter()
        new_gpus: Counter[tuple[str, str]] = Counter()
        for gpu_type, s2, gpus in old_nodes.values():
            old_gpus[(gpu_type, s2)] += gpus
        for gpu_type, s2, gpus in new_nodes.values():
            new_gpus[(gpu_type, s2)] += gpus
        for gpu_type, s2 in sorted(old_gpus.keys() | new_gpus.keys()):
            old, new = old_gpus[(gpu_type, s2)], new_gpus[(gpu_type, s2)]
            if old != new:
                s2_index = next((i for i, s in enumerate(after.s2) if s.name == s2), None)
                path: tuple[Any, ...] = ("s2", s2_index) if s2_index is not None else ("s2",)
                add(f"s2.{s2}", f"{gpu_type} GPUs under {s2}", str(old), str(new), path)
        moved = sorted(
            n for n in old_nodes.keys() & new_nodes.keys() if old_nodes[n] != new_nodes[n]
        )
        if moved and not changes:
            add("s2", "nodes moved or retyped", ", ".join(moved[:5]), "changed", ("s2",))

    old_dump = before.model_dump(mode="python", by_alias=True, exclude={"s2"})
    new_dump = after.model_dump(mode="python", by_alias=True, exclude={"s2"})
    old_leaves, new_leaves = dict(_leaves(old_dump)), dict(_leaves(new_dump))
    for key_path in sorted(
        old_leaves.keys() | new_leaves.keys(), key=lambda p: [str(x) for x in p]
    ):
        old_value, new_value = old_leaves.get(key_path), new_leaves.get(key_path)
        if old_value != new_value:
            key = format_key_path(key_path)
            add(key, key, _show(old_value), _show(new_value), key_path)
    return changes


# ----------------------------------------------------------------- templates


def template_text(template: Any) -> list[str]:
    """A pod template's content as the renderer reads it, as JSON lines: keys sorted
    (their order in the file changes nothing the renderer makes, nor its hash) and
    every character outside printable ASCII escaped, so nothing in it is invisible,
    looks like something else, or means anything to a terminal."""
    text = json.dumps(template, indent=2, sort_keys=True, ensure_ascii=True, default=str)
    return text.splitlines()


def _content_hash(lines: list[str]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _template_users(state: DesiredState) -> dict[str, list[str]]:
    """Per template path, the services using it and for which roles."""
    users: dict[str, list[str]] = {}
    for name in sorted(state.policies):
        policy = state.policies[name]
        roles: dict[str, list[str]] = {}
        for role in ("prefill", "decode"):
            roles.setdefault(policy.role(role).template, []).append(role)
        for path, its_roles in roles.items():
            users.setdefault(path, []).append(f"{name} ({', '.join(its_roles)})")
    return users


def _used_by(users: list[str]) -> str:
    if not users:
        return "used by no service"
    shown = ", ".join(users[:MAX_TEMPLATE_USERS])
    more = len(users) - MAX_TEMPLATE_USERS
    return f"used by {shown}" + (f" and {more} more service(s)" if more > 0 else "")


def _bounded(lines: list[str]) -> tuple[str, ...]:
    """At most ``MAX_DIFF_LINES`` lines of at most ``MAX_DIFF_LINE_CHARS`` each; a
    last line says how many were left out."""
    cut = [
        line if len(line) <= MAX_DIFF_LINE_CHARS else line[: MAX_DIFF_LINE_CHARS - 1] + "…"
        for line in lines[: MAX_DIFF_LINES if len(lines) <= MAX_DIFF_LINES else MAX_DIFF_LINES - 1]
    ]
    if len(lines) > MAX_DIFF_LINES:
        cut.append(f"… {len(lines) - len(cut)} more line(s) of this diff not shown")
    return tuple(cut)


_HUNK = re.compile(r"^@@ -(\d+)(,\d+)? \+(\d+)(,\d+)? @@$")
_CONTEXT_LINES = 2


def _content_diff(old: list[str], new: list[str]) -> tuple[str, ...]:
    """A unified diff (no file header) of two templates' lines, bounded. The lines the
    two share at the start and the end are cut before diffing, so a small change to a
    large template costs little; a change of more than ``MAX_DIFF_INPUT_LINES`` lines
    is not diffed line by line but shown as the lines it replaces and the first of
    its new ones."""
    shortest = min(len(old), len(new))
    head = 0
    while head < shortest and old[head] == new[head]:
        head += 1
    tail = 0
    while tail < shortest - head and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    old_changed, new_changed = old[head : len(old) - tail], new[head : len(new) - tail]
    if max(len(old_changed), len(new_changed)) > MAX_DIFF_INPUT_LINES:
        return _bounded(
            [
                f"@@ from line {head + 1}: {len(old_changed)} line(s) replaced by "
                f"{len(new_changed)} @@",
                *(f"-{line}" for line in old_changed[: MAX_DIFF_LINES // 2]),
                *(f"+{line}" for line in new_changed[:MAX_DIFF_LINES]),
            ]
        )
    start = max(0, head - _CONTEXT_LINES)
    kept_tail = max(0, tail - _CONTEXT_LINES)
    diff = difflib.unified_diff(
        old[start : len(old) - kept_tail],
        new[start : len(new) - kept_tail],
        n=_CONTEXT_LINES,
        lineterm="",
    )
    lines = list(diff)[2:]  # the "---" and "+++" lines name no file here

    def whole_file_numbers(match: re.Match[str]) -> str:
        old_start, old_count, new_start, new_count = match.groups()
        return (
            f"@@ -{int(old_start) + start}{old_count or ''} "
            f"+{int(new_start) + start}{new_count or ''} @@"
        )

    return _bounded([_HUNK.sub(whole_file_numbers, line) for line in lines])


def _first_changed_line(old: Any, new: Any, parsed: ParsedFile | None) -> int | None:
    """The first line of head's template file where a value differs from base's."""
    if parsed is None:
        return None
    lines = [
        loc[0]
        for key_path, _old, _new in _differing_leaves(dict(_leaves(old)), dict(_leaves(new)))
        if (loc := parsed.locate(key_path)) is not None
    ]
    return min(lines, default=None)


def _template_changes(base: DesiredState, head: DesiredState) -> list[ConfigChange]:
    """Every pod template a policy names in either revision whose content differs,
    with the services that use it and the diff of its content. A template stops or
    starts being loaded when no policy or a first policy names it: removed, added."""
    base_users, head_users = _template_users(base), _template_users(head)
    changes: list[ConfigChange] = []
    for path in sorted(base.templates.keys() | head.templates.keys()):
        if path not in base.templates:
            text = template_text(head.templates[path])
            changes.append(
                ConfigChange(
                    "template",
                    path,
                    "added",
                    "",
                    _used_by(head_users.get(path, [])),
                    "",
                    _content_hash(text),
                    path,
                    None,
                    _bounded([f"@@ -0,0 +1,{len(text)} @@", *(f"+{line}" for line in text)]),
                )
            )
            continue
        old_text = template_text(base.templates[path])
        if path not in head.templates:
            changes.append(
                ConfigChange(
                    "template",
                    path,
                    "removed",
                    "",
                    _used_by(base_users.get(path, [])),
                    _content_hash(old_text),
                    "",
                    path,
                    None,
                )
            )
            continue
        new_text = template_text(head.templates[path])
        if old_text == new_text:
            continue
        line = _first_changed_line(
            base.templates[path], head.templates[path], head.template_files.get(path)
        )
        changes.append(
            ConfigChange(
                "template",
                path,
                "modified",
                "",
                _used_by(head_users.get(path, [])),
                _content_hash(old_text),
                _content_hash(new_text),
                path,
                line,
                _content_diff(old_text, new_text),
            )
        )
    return changes


# What is diffed per kind of object: its kind, its objects in base and in head, and the
# diff of one object present in both.
_Section = tuple[
    Literal["service", "cluster"],
    Mapping[str, object],
    Mapping[str, object],
    Callable[[str, DesiredState, DesiredState], list[ConfigChange]],
]


def config_diff(base: DesiredState, head: DesiredState) -> list[ConfigChange]:
    """Every change from ``base`` to ``head``: clusters first, then services, then pod
    templates, each by name."""
    changes: list[ConfigChange] = []

    def whole(
        kind: Literal["service", "cluster"], name: str, change: ChangeKind, state: DesiredState
    ) -> None:
        file = (state.policy_files if kind == "service" else state.cluster_files)[name]
        line = _line(state.files.get(file), ("name",))
        changes.append(ConfigChange(kind, name, change, "", "", "", "", file, line))

    sections: tuple[_Section, ...] = (
        ("cluster", base.clusters, head.clusters, _cluster_changes),
        ("service", base.policies, head.policies, _policy_changes),
    )
    for kind, in_base, in_head, modified_fields in sections:
        for name in sorted(in_base.keys() | in_head.keys()):
            if name not in in_base:
                whole(kind, name, "added", head)
            elif name not in in_head:
                whole(kind, name, "removed", base)
            else:
                changes.extend(modified_fields(name, base, head))
    changes.extend(_template_changes(base, head))
    return changes

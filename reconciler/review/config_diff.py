"""The configuration half of a pull-request review: what changed between two
revisions of the desired state, field by field, in words a reviewer reads, each
with the file and line where it changed.

Services are compared field by field (``decode target TPS per instance: 1600 ->
1400``); the P/D ratio bounds read as one range (``P/D ratio bounds: 1:4..1:2 ->
1:5..1:2``). Clusters are compared as hardware, not as YAML: nodes added, removed
or retyped are summarised per GPU type and switch, nodes that move to another S1 or
S0 switch (which moves them between placement domains) and node labels that change
are counted per move and per label, so reshuffling ranges that describe the same
machines reads as no change. Pod templates are compared by their content as the
renderer reads it: which template changed, which services use it, and a bounded
diff of it. Every list a hostile revision could make long is bounded.
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
from reconciler.desired.models import ClusterSpec, Node, NodeDefaults, NodeSpec, ServicePolicy
from reconciler.desired.ratio import format_ratio

ChangeKind = Literal["added", "removed", "modified"]
ObjectKind = Literal["service", "cluster", "template"]

# Bounds on what one change may add to a review, whatever the revision holds.
MAX_AGGREGATE_LINES = 20  # node moves, or node label changes, of one cluster
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
        if not self.before and not self.after:  # a summary with no before and after
            return f"{self.kind} {self.name}: {self.label} ({self.location})"
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


# ------------------------------------------------------------------ clusters

_AddChange = Callable[[str, str, str, str, KeyPath], None]


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def _gpu_changes(
    old_nodes: Mapping[str, Node],
    new_nodes: Mapping[str, Node],
    after: ClusterSpec,
    add: _AddChange,
) -> set[tuple[str, str]]:
    """One line per GPU type and S2 switch whose GPU count changed; returns those
    (type, S2) pairs."""
    old_gpus: Counter[tuple[str, str]] = Counter()
    new_gpus: Counter[tuple[str, str]] = Counter()
    for node in old_nodes.values():
        old_gpus[(node.gpu_type, node.s2)] += node.gpus
    for node in new_nodes.values():
        new_gpus[(node.gpu_type, node.s2)] += node.gpus
    changed = set()
    for gpu_type, s2 in sorted(old_gpus.keys() | new_gpus.keys()):
        old, new = old_gpus[(gpu_type, s2)], new_gpus[(gpu_type, s2)]
        if old != new:
            changed.add((gpu_type, s2))
            s2_index = next((i for i, s in enumerate(after.s2) if s.name == s2), None)
            path: KeyPath = ("s2", s2_index) if s2_index is not None else ("s2",)
            add(f"s2.{s2}", f"{gpu_type} GPUs under {s2}", str(old), str(new), path)
    return changed


def _replaced_nodes(
    old_nodes: Mapping[str, Node],
    new_nodes: Mapping[str, Node],
    changed_gpus: set[tuple[str, str]],
    add: _AddChange,
) -> None:
    """Nodes added, removed, retyped or resized where the GPUs per type and S2 switch
    came out the same (two nodes swapped for two others): the per-type lines do not
    show them, so one line counts them."""

    def hidden(*nodes: Node) -> bool:
        return all((node.gpu_type, node.s2) not in changed_gpus for node in nodes)

    added = [n.name for n in new_nodes.values() if n.name not in old_nodes and hidden(n)]
    removed = [n.name for n in old_nodes.values() if n.name not in new_nodes and hidden(n)]
    resized = [
        n.name
        for n in new_nodes.values()
        if n.name in old_nodes
        and (old_nodes[n.name].gpu_type, old_nodes[n.name].gpus) != (n.gpu_type, n.gpus)
        and hidden(old_nodes[n.name], n)
    ]
    if added or removed or resized:
        examples = ", ".join([*added, *removed, *resized][:5])
        add(
            "nodes",
            f"{_nodes(len(added))} added, {len(removed)} removed, {len(resized)} retyped or "
            f"resized, with the GPUs per type and pod unchanged (e.g. {examples})",
            "",
            "",
            ("s2",),
        )


def _switch_move(old: Node, new: Node) -> tuple[str, str, str] | None:
    """The highest switch level a node changed at: (level, from, to), or None.
    An S1 move is also an S0 move; it is told as the S1 one."""
    if old.s1 != new.s1:
        return ("S1", old.s1, new.s1)
    if old.s2 != new.s2:
        return ("S2", old.s2, new.s2)
    if old.s0 != new.s0:
        return ("S0", old.s0, new.s0)
    return None


# Where a switch of each level sits in a node's YAML path (s2, i, s1, j, s0, k, ...).
_SWITCH_PATH_DEPTH = {"S2": 2, "S1": 4, "S0": 6}


def _moved_nodes(
    old_nodes: Mapping[str, Node],
    new_nodes: Mapping[str, Node],
    node_paths: Callable[[], Mapping[str, KeyPath]],
    add: _AddChange,
) -> None:
    """Nodes that stay but sit under another switch, counted per (from, to) switch
    pair: S1 membership decides which placement domain a node is in, S0 the leaf
    label it carries. At most ``MAX_AGGREGATE_LINES`` pairs, most nodes first."""
    moves: dict[tuple[str, str, str], list[Any]] = {}  # -> [nodes, GPUs, a node's name]
    for node in new_nodes.values():
        old = old_nodes.get(node.name)
        move = _switch_move(old, node) if old is not None else None
        if move is not None:
            tally = moves.setdefault(move, [0, 0, node.name])
            tally[0] += 1
            tally[1] += node.gpus
    order = sorted(moves, key=lambda m: (-moves[m][0], m))
    for level, source, target in order[:MAX_AGGREGATE_LINES]:
        nodes, gpus, example = moves[(level, source, target)]
        path = node_paths()[example][: _SWITCH_PATH_DEPTH[level]]
        add(
            f"nodes.{level.lower()}",
            f"{_nodes(nodes)} ({gpus} GPUs) moved",
            f"{level} {source}",
            f"{level} {target}",
            path,
        )
    rest = order[MAX_AGGREGATE_LINES:]
    if rest:
        nodes = sum(moves[m][0] for m in rest)
        add(
            "nodes",
            f"{_nodes(nodes)} moved between {len(rest)} more pairs of switches (not listed)",
            "",
            "",
            ("s2",),
        )


def _label_source(spec: ClusterSpec, node_path: KeyPath, key: str) -> KeyPath:
    """Where the label ``key`` of the node declared at ``node_path`` is set: the node
    itself or the closest switch's defaults, as ``iter_nodes`` merges them; the node
    when none sets it (a removed label)."""
    s2 = spec.s2[node_path[1]]
    s1 = s2.s1[node_path[3]]
    s0 = s1.s0[node_path[5]]
    layers: list[tuple[NodeSpec | NodeDefaults, KeyPath]] = []
    if len(node_path) > 7 and not isinstance(s0.nodes, str):
        entry = s0.nodes[node_path[7]]
        if isinstance(entry, NodeSpec):
            layers.append((entry, node_path))
    layers += [
        (s0.defaults, (*node_path[:6], "defaults")),
        (s1.defaults, (*node_path[:4], "defaults")),
        (s2.defaults, (*node_path[:2], "defaults")),
        (spec.defaults, ("defaults",)),
    ]
    for layer, path in layers:
        if key in layer.labels:
            return (*path, "labels", key)
    return node_path


def _label_changes(
    old_nodes: Mapping[str, Node],
    new_nodes: Mapping[str, Node],
    after: ClusterSpec,
    node_paths: Callable[[], Mapping[str, KeyPath]],
    add: _AddChange,
) -> None:
    """Node labels that change on nodes in both revisions, counted per (label, old
    value, new value): the applier and drift checks expect exactly these labels on the
    nodes. At most ``MAX_AGGREGATE_LINES``, most nodes first."""
    changes: dict[tuple[str, str | None, str | None], list[Any]] = {}  # -> [nodes, a node]
    changed_on: dict[tuple[str, str | None, str | None], list[str]] = {}  # -> the nodes
    for node in new_nodes.values():
        old = old_nodes.get(node.name)
        if old is None or old.labels == node.labels:
            continue
        for key in sorted(old.labels.keys() | node.labels.keys()):
            if old.labels.get(key) != node.labels.get(key):
                change = (key, old.labels.get(key), node.labels.get(key))
                changes.setdefault(change, [0, node.name])[0] += 1
                changed_on.setdefault(change, []).append(node.name)
    order = sorted(changes, key=lambda c: (-changes[c][0], [str(part) for part in c]))
    for key, old_value, new_value in order[:MAX_AGGREGATE_LINES]:
        nodes, example = changes[(key, old_value, new_value)]
        add(
            f"nodes.labels.{key}",
            f"node label {key} on {_nodes(nodes)}",
            _show(old_value),
            _show(new_value),
            _label_source(after, node_paths()[example], key),
        )
    rest = order[MAX_AGGREGATE_LINES:]
    if rest:
        add(
            "nodes.labels",
            # Nodes, not (node, label) pairs: one node may change many labels.
            f"{len(rest)} more node label change(s) on "
            f"{_nodes(len({name for c in rest for name in changed_on[c]}))} (not listed)",
            "",
            "",
            ("s2",),
        )


def _cluster_changes(name: str, base: DesiredState, head: DesiredState) -> list[ConfigChange]:
    before, after = base.clusters[name], head.clusters[name]
    modified = _ModifiedFields("cluster", name, head)
    add, changes = modified.add, modified.changes

    old_nodes, new_nodes = before.node_by_name, after.node_by_name
    if old_nodes != new_nodes:
        paths: dict[str, KeyPath] = {}

        def node_paths() -> Mapping[str, KeyPath]:
            # Head's node paths, indexed once, and only when a line needs a location.
            if not paths:
                paths.update((node.name, path) for node, path in after.located_nodes)
            return paths

        changed_gpus = _gpu_changes(old_nodes, new_nodes, after, add)
        _replaced_nodes(old_nodes, new_nodes, changed_gpus, add)
        _moved_nodes(old_nodes, new_nodes, node_paths, add)
        _label_changes(old_nodes, new_nodes, after, node_paths, add)

    # The switches are compared as the nodes above, and so are the labels defaults
    # give every node (each node label line is located where the label is set).
    exclude: dict[str, Any] = {"s2": True, "defaults": {"labels"}}
    old_dump = before.model_dump(mode="python", by_alias=True, exclude=exclude)
    new_dump = after.model_dump(mode="python", by_alias=True, exclude=exclude)
    for key_path, old_value, new_value in _differing_leaves(
        dict(_leaves(old_dump)), dict(_leaves(new_dump))
    ):
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

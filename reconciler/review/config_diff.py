"""The configuration half of a pull-request review: what changed between two
revisions of the desired state, field by field, in words a reviewer reads, each
with the file and line where it changed.

Services are compared field by field (``decode target TPS per instance: 1600 ->
1400``); the P/D ratio bounds read as one range (``P/D ratio bounds: 1:4..1:2 ->
1:5..1:2``). Clusters are compared as hardware, not as YAML: nodes added, removed
or retyped are summarised per GPU type and switch, so reshuffling ranges that
describe the same machines reads as no change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from reconciler.desired.loader import DesiredState, ParsedFile, format_key_path
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.desired.ratio import format_ratio

ChangeKind = Literal["added", "removed", "modified"]


@dataclass(frozen=True)
class ConfigChange:
    """One reviewable change. ``file``/``line`` point into head (base for removals)."""

    kind: Literal["service", "cluster"]
    name: str
    change: ChangeKind
    field: str  # key path, e.g. "scaling.target_per_instance"; "" for whole objects
    label: str  # what a reviewer reads, e.g. "decode target TPS per instance"
    before: str
    after: str
    file: str
    line: int | None

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def __str__(self) -> str:
        if self.change == "added":
            return f"{self.kind} {self.name}: added ({self.location})"
        if self.change == "removed":
            return f"{self.kind} {self.name}: removed (was {self.location})"
        return f"{self.kind} {self.name}: {self.label}: {self.before} -> {self.after} ({self.location})"


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
    if isinstance(value, tuple | list) and not value:
        return "none"
    return str(value)


def _leaves(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Flatten a model dump into (key path, leaf) pairs; lists of models index by position."""
    if isinstance(value, dict):
        if not value and prefix:
            yield prefix, "none"
        for key, child in value.items():
            yield from _leaves(child, (*prefix, key))
    elif isinstance(value, list | tuple) and value and isinstance(value[0], dict):
        for index, child in enumerate(value):
            yield from _leaves(child, (*prefix, index))
    else:
        yield prefix, value


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
    for key_path in sorted(
        old_leaves.keys() | new_leaves.keys(), key=lambda p: [str(x) for x in p]
    ):
        key = format_key_path(key_path)
        if key in ("pd_ratio.min", "pd_ratio.max"):
            continue
        old, new = old_leaves.get(key_path), new_leaves.get(key_path)
        if old == new:
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


# What is diffed per kind of object: its kind, its objects in base and in head, and the
# diff of one object present in both.
_Section = tuple[
    Literal["service", "cluster"],
    Mapping[str, object],
    Mapping[str, object],
    Callable[[str, DesiredState, DesiredState], list[ConfigChange]],
]


def config_diff(base: DesiredState, head: DesiredState) -> list[ConfigChange]:
    """Every change from ``base`` to ``head``: clusters first, then services, by name."""
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
    return changes

"""Field-by-field comparison of Kubernetes objects (pure).

Objects are flattened into ``path -> value`` maps. Lists whose items are all
mappings with a unique ``name`` (containers, env, ports, volumes) are keyed by that
name (``spec.template.spec.containers[engine].env[MODEL_NAME].value``), so inserting
one env var reports one line, not a shifted tail; other lists are indexed.

Two comparisons:
- ``field_changes(live, result)``: the exact one. ``result`` is what a server-side
  apply dry run returned, so every difference is a change apply would make (server
  defaults appear on both sides and cancel out).
- ``client_side_changes(live, desired)``: the fallback when the server cannot dry
  run. Only the paths the desired manifest sets are compared (so server defaults
  never show up as changes), with both sides normalised the way the API server
  would store them (quantities and numbers as text). It cannot see fields we used to
  set and dropped; the server-side dry run can.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Bookkeeping the server writes on every object; never a change we cause.
_VOLATILE_METADATA = (
    "managedFields",
    "resourceVersion",
    "generation",
    "uid",
    "creationTimestamp",
    "selfLink",
)


_ABSENT = object()


@dataclass(frozen=True)
class FieldChange:
    path: str
    before: Any  # None: absent
    after: Any  # None: removed

    def __str__(self) -> str:
        if self.before is None:
            return f"{self.path}: + {_show(self.after)}"
        if self.after is None:
            return f"{self.path}: - {_show(self.before)}"
        return f"{self.path}: {_show(self.before)} -> {_show(self.after)}"


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def comparable(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of an object a diff is about: metadata without server bookkeeping,
    and spec; status and server-written metadata dropped."""
    metadata = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in _VOLATILE_METADATA}
    out: dict[str, Any] = {"metadata": metadata}
    if "spec" in obj:
        out["spec"] = obj["spec"]
    return out


def _named(items: list[Any]) -> bool:
    if not items or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
        return False
    return len({i["name"] for i in items}) == len(items)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` -> ``{"a.b[0]": 1}``; named lists keyed by name."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix] = {}
        for key, child in value.items():
            out.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list):
        if not value:
            out[prefix] = []
        elif _named(value):
            for item in value:
                path = f"{prefix}[{item['name']}]"
                rest = {k: v for k, v in item.items() if k != "name"}  # the name is in the path
                out.update(flatten(rest, path) if rest else {path: {}})
        else:
            for index, item in enumerate(value):
                out.update(flatten(item, f"{prefix}[{index}]"))
    else:
        out[prefix] = value
    return out


def field_changes(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> tuple[FieldChange, ...]:
    """Every path whose value differs between two objects (after ``comparable``)."""
    left = flatten(comparable(before)) if before else {}
    right = flatten(comparable(after)) if after else {}
    changes = [
        FieldChange(path, left.get(path), right.get(path))
        for path in sorted(left.keys() | right.keys())
        if left.get(path, _ABSENT) != right.get(path, _ABSENT)
    ]
    return tuple(changes)


def _normalise(value: Any) -> Any:
    """Scalars as the API server stores them for comparison: numbers that are
    quantities come back as strings; booleans stay booleans."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return str(value)
    return value


def project(live: Any, desired: Any) -> Any:
    """The part of ``live`` at the paths ``desired`` sets (named lists matched by
    name); what is absent in ``live`` is absent in the projection."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return None
        return {k: project(live[k], v) for k, v in desired.items() if k in live}
    if isinstance(desired, list):
        if not isinstance(live, list):
            return None
        if _named(desired) and all(isinstance(i, dict) for i in live):
            by_name = {i.get("name"): i for i in live}
            return [project(by_name[d["name"]], d) for d in desired if d["name"] in by_name]
        if len(live) != len(desired):
            return live
        return [project(lv, dv) for lv, dv in zip(live, desired, strict=True)]
    return live


def client_side_changes(
    live: Mapping[str, Any] | None, desired: Mapping[str, Any]
) -> tuple[FieldChange, ...]:
    """Changes applying ``desired`` would make to ``live``, judged on the client."""
    want = flatten(comparable(desired))
    have = flatten(comparable(project(live, desired))) if live else {}
    changes = []
    for path in sorted(want.keys()):
        before, after = have.get(path, _ABSENT), want[path]
        if before is _ABSENT or _normalise(before) != _normalise(after):
            changes.append(FieldChange(path, None if before is _ABSENT else before, after))
    # What the projection holds beyond the desired paths is the tail of a positional
    # list that desired sets shorter: applying it drops those items (``contains``
    # agrees). An empty-container marker on the way to a desired path is not extra.
    on_the_way = {path[:i] for path in want for i, c in enumerate(path) if c in ".["}
    for path in sorted(have.keys() - want.keys() - on_the_way):
        changes.append(FieldChange(path, have[path], None))
    return tuple(changes)


def contains(live: Any, desired: Any) -> bool:
    """Does ``live`` hold every value ``desired`` sets (named lists matched by name,
    scalars normalised as in ``client_side_changes``)? The same judgement as
    ``not client_side_changes(live, desired)``, without building the report: it stops
    at the first difference (the diff asks it for thousands of objects per cycle)."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return False
        for key, value in desired.items():
            if key not in live or not contains(live[key], value):
                return False
        return True
    if isinstance(desired, list):
        if not isinstance(live, list):
            return False
        if _named(desired) and all(isinstance(i, dict) for i in live):
            by_name = {i.get("name"): i for i in live}
            return all(d["name"] in by_name and contains(by_name[d["name"]], d) for d in desired)
        return len(live) == len(desired) and all(
            contains(lv, dv) for lv, dv in zip(live, desired, strict=True)
        )
    return _normalise(live) == _normalise(desired)

"""The object-level diff of one cluster, as data, text lines and JSON.

``ClusterDiff`` is both the dry-run report and the record of what apply did: the
applier fills it from a server-side dry run (or carries it out and marks each
object ``done``), so the two read the same way line for line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from reconciler.apply.fields import FieldChange
from reconciler.observe.base import Drift

ObjectAction = Literal["create", "update", "delete", "keep", "unchanged", "conflict", "error"]
DiffMode = Literal["server-dry-run", "client-side", "applied"]
PodActionKind = Literal["drain", "put_back", "finish"]

_SYMBOL = {
    "create": "+",
    "update": "~",
    "delete": "-",
    "keep": "=",
    "unchanged": " ",
    "conflict": "!",
    "error": "!",
}
MAX_FIELD_LINES = 25


@dataclass(frozen=True)
class PodAction:
    action: PodActionKind
    pod: str
    detail: str

    def __str__(self) -> str:
        verb = {"drain": "drain", "put_back": "put back", "finish": "delete drained"}[self.action]
        return f"{verb} pod {self.pod}: {self.detail}"


@dataclass(frozen=True)
class ObjectDiff:
    key: str  # namespace/name
    service: str
    group_id: str
    role: str
    action: ObjectAction
    replicas_before: int
    replicas_after: int
    fields: tuple[FieldChange, ...] = ()
    pods: tuple[PodAction, ...] = ()
    notes: tuple[str, ...] = ()
    summary: str = ""  # for creates: GPU type, GPUs per instance, domain

    @property
    def changes_something(self) -> bool:
        if self.action in ("create", "delete"):
            return True
        if self.action == "update":
            return bool(self.fields or self.pods)
        return bool(self.pods)

    def headline(self) -> str:
        what = f"{self.service}/{self.group_id}/{self.role}"
        sizes = f"replicas {self.replicas_before} -> {self.replicas_after}"
        if self.action == "update" and self.replicas_before == self.replicas_after:
            changed = sorted(
                {
                    f.path.split(".")[0] + "." + f.path.split(".")[1]
                    for f in self.fields
                    if "." in f.path
                }
            )
            sizes = f"replicas {self.replicas_after}" + (
                f", changes {', '.join(changed)}" if changed else ""
            )
        extra = f" ({self.summary})" if self.summary else ""
        return (
            f"{_SYMBOL[self.action]} {self.action:<9} Deployment {self.key} [{what}] {sizes}{extra}"
        )

    def lines(self) -> list[str]:
        out = [self.headline()]
        shown = self.fields if self.action != "create" else ()
        for change in shown[:MAX_FIELD_LINES]:
            out.append(f"      {change}")
        if len(shown) > MAX_FIELD_LINES:
            out.append(f"      ... {len(shown) - MAX_FIELD_LINES} more field(s)")
        out.extend(f"      {pod}" for pod in self.pods)
        out.extend(f"      note: {note}" for note in self.notes)
        return out

    def to_json(self) -> dict[str, Any]:
        """Every field, in order; the tuples as lists."""
        return {
            **asdict(self),
            "fields": [asdict(f) for f in self.fields],
            "pods": [asdict(p) for p in self.pods],
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ClusterDiff:
    cluster: str
    mode: DiffMode
    objects: tuple[ObjectDiff, ...]
    drift: tuple[Drift, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def changed(self) -> tuple[ObjectDiff, ...]:
        return tuple(o for o in self.objects if o.changes_something)

    @property
    def conflicts(self) -> tuple[ObjectDiff, ...]:
        return tuple(o for o in self.objects if o.action in ("conflict", "error"))

    @property
    def has_changes(self) -> bool:
        return bool(self.changed)

    def lines(self) -> list[str]:
        out: list[str] = []
        for obj in self.objects:
            if obj.changes_something or obj.action in ("conflict", "error", "keep") or obj.notes:
                out.extend(obj.lines())
        out.extend(f"  note: {note}" for note in self.notes)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "mode": self.mode,
            "objects": [o.to_json() for o in self.objects if o.action != "unchanged" or o.notes],
            "unchanged": sum(1 for o in self.objects if o.action == "unchanged" and not o.notes),
            "drift": [drift_json(d) for d in self.drift],
            "notes": list(self.notes),
        }


def drift_json(item: Drift) -> dict[str, Any]:
    """One drift item as JSON: kind, object, detail and, when known, the field with
    its live and desired value."""
    out: dict[str, Any] = {"kind": item.kind, "name": item.name, "detail": item.detail}
    path = getattr(item, "path", "")
    if path:
        out.update(
            field=path, live=getattr(item, "live", None), desired=getattr(item, "desired", None)
        )
    return out


def summarise_drift(drift: Sequence[Drift], limit: int = 10) -> list[str]:
    """Drift lines, the first ``limit`` of each kind, then a count."""
    by_kind: dict[str, list[Drift]] = {}
    for item in drift:
        by_kind.setdefault(item.kind, []).append(item)
    out = []
    for kind, items in sorted(by_kind.items()):
        for item in items[:limit]:
            out.append(f"drift {kind} {item.name}: {item.detail}")
        if len(items) > limit:
            out.append(f"drift {kind}: ... and {len(items) - limit} more")
    return out

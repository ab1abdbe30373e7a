"""The report of one reconcile cycle over all clusters: text, markdown and JSON.

Read top to bottom it answers: what did the policy decide per service and why, what
changes at the deployment-group level (in apply order), which objects change and how
(field by field, from the server-side dry run), what drift was seen, and what was
held back. ``plan`` prints it before anything happens; ``apply`` prints the same
report of what it did.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

from reconciler.apply.report import summarise_drift
from reconciler.cost import CostChange, money
from reconciler.loop import ClusterOutcome, CycleResult
from reconciler.tables import Column, plain_lines, transition
from reconciler.text_safety import visible

CLUSTER_TOTAL = "cluster total"  # a row label no service can have (names are DNS labels)


def _decision_rows(outcome: ClusterOutcome) -> list[tuple[str, str, str, str]]:
    """Per decided service: its name, instances now and decided, reason and message."""
    rows: list[tuple[str, str, str, str]] = []
    if outcome.plan is None:
        return rows
    fleet = outcome.plan.current
    for service, decision in sorted(outcome.plan.decisions.items()):
        current = fleet.service_fleet(service)
        sizes = (
            f"prefill {transition(current.prefill.active, decision.prefill)}, "
            f"decode {transition(current.decode.active, decision.decode)}"
        )
        # The message already names every clamp (JSON carries them separately).
        rows.append((service, sizes, decision.reason, decision.message))
    return rows


_DECISION_COLUMNS: tuple[Column[tuple[str, str, str, str]], ...] = (
    Column("service", lambda row: row[0], "left"),
    Column("instances", lambda row: row[1], "left"),
    Column("why", lambda row: f"{row[2]}: {row[3]}", "left"),
)


def _cost_rows(outcome: ClusterOutcome) -> list[tuple[str, CostChange]]:
    """Cost per hour of each decided service, then of the whole cluster (every group,
    services without a policy included); empty when the plan has no prices."""
    plan = outcome.plan
    total = plan.cost_per_hour() if plan is not None else None
    if plan is None or total is None:
        return []
    rows = [(service, plan.cost_per_hour(service)) for service in sorted(plan.decisions)]
    return [(name, change) for name, change in rows if change is not None] + [
        (CLUSTER_TOTAL, total)
    ]


def _cost_unknown_because(total: CostChange) -> str:
    """Why some cost is unknown ("" if none is): the GPU types without a price."""
    reasons = {total.current.why_unknown(), total.planned.why_unknown()} - {""}
    return "; ".join(sorted(reasons))


_COST_COLUMNS: tuple[Column[tuple[str, CostChange]], ...] = (
    Column("service", lambda row: row[0], "left"),
    Column("now", lambda row: money(row[1].current.amount)),
    Column("", lambda _row: "->", "left"),
    Column("planned", lambda row: money(row[1].planned.amount)),
    Column("change", lambda row: money(row[1].delta, signed=True)),
)


def _cost_lines(outcome: ClusterOutcome) -> list[str]:
    rows = _cost_rows(outcome)
    if not rows:
        return []
    total = rows[-1][1]
    out = [f"  cost per hour ({total.current.currency}), now -> planned:"]
    out.extend(f"    {line}" for line in plain_lines(_COST_COLUMNS, rows, header=False))
    why = _cost_unknown_because(total)
    if why:
        out.append(f"    unknown: {why} (cost_per_hour in the cluster file)")
    return out


def _cost_json(outcome: ClusterOutcome) -> dict[str, Any] | None:
    rows = _cost_rows(outcome)
    if not rows:
        return None

    def figures(change: CostChange) -> dict[str, float | None]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {
            "current": rounded(change.current.amount),
            "planned": rounded(change.planned.amount),
            "delta": rounded(change.delta),
        }

    total = rows[-1][1]
    return {
        "currency": total.current.currency,
        "services": {name: figures(change) for name, change in rows[:-1]},
        "total": figures(total),
        "unpriced_gpu_types": sorted(
            {*total.current.unpriced_types, *total.planned.unpriced_types}
        ),
    }


def _object_lines(outcome: ClusterOutcome) -> list[str]:
    if outcome.diff is not None:
        return outcome.diff.lines()
    if outcome.plan is not None and list(outcome.lines) == [str(c) for c in outcome.plan.changes]:
        return []  # a backend without objects (the simulator) carries out the group changes
    return list(outcome.lines)


def _drift_lines(outcome: ClusterOutcome) -> list[str]:
    if outcome.diff is not None:
        return summarise_drift(outcome.diff.drift)
    if outcome.observation is not None:
        return summarise_drift(outcome.observation.drift)
    return []


def _verb(outcome: ClusterOutcome) -> str:
    if outcome.applied:
        return "applied"
    if outcome.outcome == "standby":
        return "standby (not the leader; nothing applied)"
    return "dry run"


class ClusterLike(Protocol):
    """A cluster's part of a text report (``ClusterOutcome``, ``status``'s
    ``ClusterStatus``): what ``cluster_sections`` reads of it."""

    @property
    def cluster(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def error(self) -> str | None: ...


Cluster = TypeVar("Cluster", bound=ClusterLike)


def cluster_sections(
    out: list[str], desired_error: str | None, clusters: Iterable[Cluster]
) -> Iterator[Cluster]:
    """The frame of the text reports (``plan``/``apply``, ``status``), written to
    ``out``: the desired-state error, then per cluster a blank line and, when it failed
    or was skipped, the line saying why. Yields the other clusters, for the caller to
    write their part."""
    if desired_error:
        out.append(f"! {desired_error}")
    for cluster in clusters:
        out.append("")
        if cluster.outcome in ("error", "skipped"):
            out.append(f"cluster {cluster.cluster}: {cluster.outcome.upper()}: {cluster.error}")
            continue
        yield cluster


def format_text(result: CycleResult, *, title: str) -> str:
    out = [title]
    for outcome in cluster_sections(out, result.desired_error, result.clusters):
        plan = outcome.plan
        assert plan is not None
        mode = f", {outcome.diff.mode}" if outcome.diff is not None else ""
        out.append(
            f"cluster {outcome.cluster} ({_verb(outcome)}{mode}, {outcome.duration_s:.1f} s): "
            f"{len(plan.decisions)} services, {len(plan.changes)} group change(s)"
        )
        rows = _decision_rows(outcome)
        if rows:
            out.append("  decisions:")
            out.extend(f"    {line}" for line in plain_lines(_DECISION_COLUMNS, rows, header=False))
        out.extend(_cost_lines(outcome))
        if plan.changes:
            out.append("  group changes (apply order: capacity first):")
            out.extend(f"    {change}" for change in plan.changes)
        objects = _object_lines(outcome)
        if objects:
            out.append("  objects:")
            out.extend(f"    {line}" for line in objects)
        elif outcome.diff is None:
            out.append(
                "  objects: none (simulated fleet: it carries out the group changes directly)"
            )
        else:
            out.append("  objects: no change")
        drift = _drift_lines(outcome)
        if drift:
            out.append("  drift:")
            out.extend(f"    {line}" for line in drift)
        notes = [n for n in plan.notes if not n.startswith("drift ")]
        if notes:
            out.append("  notes:")
            out.extend(f"    {note}" for note in notes)
    out.append("")
    out.append(summary_line(result))
    # Drift details and notes quote annotations and managers from the live cluster,
    # which anyone with edit rights there wrote: no escape or line break may act.
    return "\n".join(visible(line) for line in out)


def summary_line(result: CycleResult) -> str:
    changed = [c for c in result.clusters if c.has_changes]
    failed = [c for c in result.clusters if c.outcome == "error"]
    applied = any(c.applied for c in result.clusters)
    parts = []
    if failed:  # first: a failed cluster is no "no changes", whatever the others say
        parts.append(f"{len(failed)} cluster(s) failed: {', '.join(c.cluster for c in failed)}.")
    refused = sum(c.refused_objects for c in result.clusters)
    if refused:  # nor is a cluster with a write refused "matching the desired state"
        parts.append(f"{refused} object(s) refused (! error above): not as desired.")
    matching = [c for c in result.clusters if c.outcome != "error" and not c.refused_objects]
    kept = sum(c.kept_objects for c in result.clusters)
    drifted = sum(c.drifted_objects for c in result.clusters)
    if not changed and len(matching) == len(result.clusters) and (kept or drifted):
        held = []
        if kept:
            held.append(
                f"{kept} object(s) kept as they run until what replaces them serves (= keep above)"
            )
        if drifted:
            held.append(f"{drifted} object(s) changed outside Git (drift above)")
        parts.append(f"No changes to make this cycle; {'; '.join(held)}: not yet as desired.")
    elif not changed and len(matching) == len(result.clusters):
        parts.append("No changes: the clusters match the desired state.")
    elif not changed:
        if matching:
            parts.append(f"The {len(matching)} other cluster(s) match the desired state.")
    elif applied:
        parts.append(f"Applied changes in {len(changed)} cluster(s).")
    else:
        parts.append(
            f"Plan: changes in {len(changed)} cluster(s). `heteroscale apply` with the same "
            "options carries out exactly these."
        )
    return " ".join(parts)


def format_markdown(result: CycleResult, *, title: str) -> str:
    out = [f"### {title}", ""]
    if result.desired_error:
        out += [f"> :warning: {result.desired_error}", ""]
    for outcome in result.clusters:
        if outcome.outcome in ("error", "skipped"):
            out += [
                f"#### Cluster `{outcome.cluster}`: {outcome.outcome}",
                "",
                f"`{outcome.error}`",
                "",
            ]
            continue
        plan = outcome.plan
        assert plan is not None
        out += [f"#### Cluster `{outcome.cluster}` ({_verb(outcome)})", ""]
        rows = _decision_rows(outcome)
        if rows:
            out += ["| service | instances | reason | why |", "|---|---|---|---|"]
            out += [f"| {s} | {z} | {r} | {m.replace('|', '/')} |" for s, z, r, m in rows]
            out.append("")
        costs = _cost_rows(outcome)
        if costs:
            currency = costs[-1][1].current.currency
            out += [
                f"| cost per hour ({currency}) | now | planned | change |",
                "|---|--:|--:|--:|",
            ]
            out += [
                f"| {name} | {money(c.current.amount)} | {money(c.planned.amount)} "
                f"| {money(c.delta, signed=True)} |"
                for name, c in costs
            ]
            why = _cost_unknown_because(costs[-1][1])
            out += (
                ["", f"Cost unknown: {why} (`cost_per_hour` in the cluster file)."] if why else []
            )
            out.append("")
        if plan.changes:
            out += ["**Group changes** (apply order):", ""]
            out += [f"- `{change}`" for change in plan.changes]
            out.append("")
        objects = _object_lines(outcome)
        if outcome.diff is not None or objects:
            headlines = len([o for o in objects if not o.startswith(" ")])
            out += [f"<details><summary>Objects ({headlines} changed)</summary>", "", "```diff"]
            out += objects or ["(no change)"]
            out += ["```", "", "</details>", ""]
        drift = _drift_lines(outcome)
        if drift:
            out += ["**Drift:**", ""] + [f"- {line}" for line in drift] + [""]
    out.append(summary_line(result))
    # Drift details and notes quote annotations and managers from the live cluster,
    # which anyone with edit rights there wrote: no escape or line break may act.
    return "\n".join(visible(line) for line in out)


def to_json(result: CycleResult) -> dict[str, Any]:
    clusters = []
    for outcome in result.clusters:
        entry: dict[str, Any] = {
            "cluster": outcome.cluster,
            "outcome": outcome.outcome,
            "error": outcome.error,
            "applied": outcome.applied,
            "has_changes": outcome.has_changes,
            "duration_s": round(outcome.duration_s, 3),
        }
        if outcome.plan is not None:
            entry["decisions"] = {
                s: {
                    "prefill": d.prefill,
                    "decode": d.decode,
                    "reason": d.reason,
                    "message": d.message,
                    "clamps": [str(c) for c in d.clamps],
                }
                for s, d in sorted(outcome.plan.decisions.items())
            }
            entry["group_changes"] = [c.to_json() for c in outcome.plan.changes]
            entry["notes"] = list(outcome.plan.notes)
            entry["held"] = dict(outcome.plan.held)
            cost = _cost_json(outcome)
            if cost is not None:
                entry["cost_per_hour"] = cost
        if outcome.diff is not None:
            entry["objects"] = outcome.diff.to_json()
        else:
            entry["lines"] = list(outcome.lines)
        clusters.append(entry)
    return {
        "source": result.source_label,
        "desired_error": result.desired_error,
        "has_changes": result.has_changes,
        "clusters": clusters,
    }


def format_json(result: CycleResult) -> str:
    return json.dumps(to_json(result), indent=2, default=str)

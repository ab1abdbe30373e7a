"""A review in three shapes: terminal text, a markdown pull-request comment (summary
table first, details folded), and JSON for bots. All three render the same
``Review``; none computes anything of its own."""

from __future__ import annotations

import json
from typing import Any

from reconciler.review.fleet_diff import ServiceFleetDiff
from reconciler.review.review import Review
from reconciler.sim.evaluate import PolicyResult


def _targets(value: tuple[int, int] | None) -> str:
    return "-" if value is None else f"{value[0]}P/{value[1]}D"


def _gpus(mapping: dict[str, int]) -> str:
    return ", ".join(f"{gpus} {gpu_type}" for gpu_type, gpus in mapping.items()) or "0"


def _delta(mapping: dict[str, int]) -> str:
    return ", ".join(f"{d:+d} {name}" for name, d in mapping.items()) or "no change"


def _headline(review: Review) -> str:
    if review.errors:
        return f"head {review.head_label} does not validate: {len(review.errors)} problem(s)"
    if review.base_errors:
        return f"base {review.base_label} does not validate: {len(review.base_errors)} problem(s)"
    if not review.has_changes:
        return "no change: the fleet would stay as it is"
    parts = [f"{len(review.config_changes)} config change(s)"]
    if review.fleet is not None:
        changed = [s for s in review.fleet.services if s.changed]
        parts.append(f"{len(changed)} service(s) sized or placed differently")
        parts.append(f"apply after merge: {review.fleet.apply_changes} group change(s)")
    return "; ".join(parts)


def _service_rows(review: Review) -> list[ServiceFleetDiff]:
    return [s for s in review.fleet.services if s.changed] if review.fleet else []


def _result_cells(result: PolicyResult | None) -> list[str]:
    if result is None:
        return ["-", "-", "-", "-"]
    return [
        f"{result.gpu_hours:.1f}",
        f"{100 * result.ttft_attainment:.2f}%",
        f"{100 * result.tbt_attainment:.2f}%",
        str(result.scaling_actions),
    ]


# --------------------------------------------------------------------------- text


def format_text(review: Review) -> str:
    lines = [f"heteroscale plan: {review.base_label} -> {review.head_label}", _headline(review), ""]
    for issue in (*review.errors, *review.base_errors):
        lines.append(f"  error {issue}")
    if review.errors or review.base_errors:
        return "\n".join(lines).rstrip() + "\n"
    lines.append("config changes:")
    lines += [f"  {change}" for change in review.config_changes] or ["  none"]
    if review.fleet is not None:
        lines += ["", f"fleet (from the {review.fleet.source}):"]
        rows = _service_rows(review)
        for row in rows:
            lines.append(
                f"  {row.service}: {_targets(row.base_targets)} -> {_targets(row.head_targets)}; "
                f"GPUs {_delta(row.gpu_delta())}; by domain {_delta(row.domain_delta())}"
            )
        if not rows:
            lines.append("  every service sized and placed the same under both revisions")
        lines += ["", "apply after merge (head plan against the fleet as it runs):"]
        changes = [c for plan in review.fleet.head_plans.values() for c in plan.changes]
        lines += [f"  {change}" for change in changes] or ["  nothing"]
        lines += [f"  note: {note}" for note in review.fleet.notes]
    if review.what_if:
        lines += ["", "what-if replay (heteroscale policy, same load and seed for both revisions):"]
        for item in review.what_if:
            lines.append(f"  {item.service} on {item.load}:")
            for side, result in (("base", item.base), ("head", item.head)):
                gpu_hours, ttft, tbt, actions = _result_cells(result)
                lines.append(
                    f"    {side}: {gpu_hours} GPU-hours, TTFT {ttft}, TBT {tbt}, {actions} scaling actions"
                )
            lines.append(f"    verdict: {item.verdict}")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------- markdown


def format_markdown(review: Review) -> str:
    out = [
        f"### heteroscale plan: `{review.base_label}` → `{review.head_label}`",
        "",
        f"**{_headline(review)}**",
        "",
    ]
    if review.errors or review.base_errors:
        out += ["```"] + [str(issue) for issue in (*review.errors, *review.base_errors)] + ["```"]
        return "\n".join(out) + "\n"
    if review.what_if:
        out += [
            "| service | GPU-hours base → head | TTFT attainment | TBT attainment | verdict |",
            "| --- | --- | --- | --- | --- |",
        ]
        for item in review.what_if:
            b, h = _result_cells(item.base), _result_cells(item.head)
            out.append(
                f"| {item.service} | {b[0]} → {h[0]} | {b[1]} → {h[1]} | {b[2]} → {h[2]} | {item.verdict} |"
            )
        out.append("")
    rows = _service_rows(review)
    if rows:
        out += [
            "| service | targets base → head | GPUs | by switch domain |",
            "| --- | --- | --- | --- |",
        ]
        for row in rows:
            out.append(
                f"| {row.service} | {_targets(row.base_targets)} → {_targets(row.head_targets)} "
                f"| {_delta(row.gpu_delta())} | {_delta(row.domain_delta())} |"
            )
        out.append("")
    out += ["<details><summary>Config changes</summary>", ""]
    out += [f"- {change}" for change in review.config_changes] or ["- none"]
    out += ["", "</details>", ""]
    if review.fleet is not None:
        changes = [c for plan in review.fleet.head_plans.values() for c in plan.changes]
        out += [
            f"<details><summary>Apply after merge: {len(changes)} group change(s)</summary>",
            "",
            "```",
        ]
        out += [str(change) for change in changes] or ["nothing"]
        out += ["```", ""]
        out += [f"- {note}" for note in review.fleet.notes]
        out += ["", f"Observed load: {review.fleet.source}.", "", "</details>", ""]
    if review.what_if:
        out += ["<details><summary>What-if details</summary>", ""]
        for item in review.what_if:
            out.append(f"- **{item.service}** on {item.load}: {item.verdict}")
        out += ["", "</details>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- json


def _policy_json(result: PolicyResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    data = result.to_json()
    data.pop("timeline", None)
    return data


def format_json(review: Review) -> str:
    data: dict[str, Any] = {
        "base": review.base_label,
        "head": review.head_label,
        "exit_code": review.exit_code,
        "has_changes": review.has_changes,
        "errors": [str(i) for i in review.errors],
        "base_errors": [str(i) for i in review.base_errors],
        "config_changes": [
            {
                "kind": c.kind,
                "name": c.name,
                "change": c.change,
                "field": c.field,
                "label": c.label,
                "before": c.before,
                "after": c.after,
                "file": c.file,
                "line": c.line,
            }
            for c in review.config_changes
        ],
    }
    if review.fleet is not None:
        data["fleet"] = {
            "source": review.fleet.source,
            "services": [
                {
                    "service": s.service,
                    "cluster": s.cluster,
                    "base_targets": s.base_targets,
                    "head_targets": s.head_targets,
                    "base_gpus": dict(s.base_gpus),
                    "head_gpus": dict(s.head_gpus),
                    "gpu_delta": s.gpu_delta(),
                    "domain_delta": s.domain_delta(),
                    "changed": s.changed,
                }
                for s in review.fleet.services
            ],
            "apply_after_merge": [
                {
                    "cluster": plan.cluster,
                    "kind": c.kind,
                    "service": c.service,
                    "group": c.group_id,
                    "role": c.role,
                    "gpu_type": c.gpu_type,
                    "domain": c.domain,
                    "before": c.before,
                    "after": c.after,
                    "gpu_delta": c.gpu_delta,
                }
                for plan in review.fleet.head_plans.values()
                for c in plan.changes
            ],
            "notes": list(review.fleet.notes),
        }
    data["what_if"] = [
        {
            "service": w.service,
            "load": w.load,
            "base": _policy_json(w.base),
            "head": _policy_json(w.head),
            "attainment_goal": w.attainment_goal,
            "verdict": w.verdict,
        }
        for w in review.what_if
    ]
    return json.dumps(data, indent=2, sort_keys=False)

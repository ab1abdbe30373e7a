"""A review in three shapes: terminal text, a markdown pull-request comment (summary
table first, details folded), and JSON for bots. All three render the same
``Review``; none computes anything of its own.

The markdown goes to a pull request whose files anyone may have written, so every
string that comes from them (names, values, file names, error messages, revision
labels) is made inert before it is placed: outside code it is escaped (no HTML,
emphasis, links, images, tables, math, @mentions or autolinks), inside code it
sits in a fence longer than any backtick run it contains, on one line. Each such
string is cut to a bounded length and the whole comment stays under GitHub's
65,536-character limit, with a note saying what was cut.
"""

from __future__ import annotations

import json
import re
from typing import Any

from reconciler.cost import money
from reconciler.errors import shown_issues
from reconciler.review.files import READ_CHANGED
from reconciler.review.fleet_diff import FleetReview, ServiceFleetDiff
from reconciler.review.review import Review
from reconciler.sim.evaluate import PolicyResult
from reconciler.tables import MISSING, decimal, percent, whole
from reconciler.text_safety import UNSAFE_RUN, cut, visible

MAX_VALUE_CHARS = 200  # one user string: a name, a label, a note
MAX_LINE_CHARS = 600  # one line that quotes user strings (a config change, an error)
MAX_COMMENT_CHARS = 65_536  # GitHub's limit for a comment
_COMMENT_BUDGET = MAX_COMMENT_CHARS - 1_536  # room for the closing tags and the note

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~$])")
_ZWSP = "&#8203;"  # a zero-width space: breaks a mention or an autolink, reads the same


def _one_line(text: object, limit: int) -> str:
    """Control characters and line breaks become spaces (one line can open nothing
    on the next), then the text is cut to ``limit`` characters."""
    return cut(UNSAFE_RUN.sub(" ", str(text)), limit)


def _terminal_line(text: object, limit: int) -> str:
    """User text for one line of the text report, cut to ``limit`` characters; any
    control character in it is shown as its escape when the report is put together
    (``_text``)."""
    return cut(str(text), limit)


def md(text: object, limit: int = MAX_VALUE_CHARS) -> str:
    """User text as inert inline markdown: one line, cut, escaped."""
    flat = _one_line(text, limit)
    flat = flat.replace("&", "&amp;").replace("<", "&lt;")  # no HTML, no entities of theirs
    flat = _MD_SPECIAL.sub(r"\\\1", flat)  # no code, emphasis, links, images, cells, math
    # No references to issues (#123): before any entity of ours (&#8203;) is written.
    flat = re.sub(r"#(?=\d)", "#" + _ZWSP, flat)
    flat = flat.replace("@", "@" + _ZWSP)  # no mentions
    flat = flat.replace("://", ":" + _ZWSP + "//")  # no autolinks
    return re.sub(r"(?i)www\.", lambda m: m.group()[:3] + _ZWSP + ".", flat)


def _fence(lines: list[str]) -> str:
    """A code fence longer than any backtick run in ``lines``, so none can close it."""
    longest = max((len(run) for line in lines for run in re.findall("`+", line)), default=0)
    return "`" * max(3, longest + 1)


def _code(text: object, limit: int = MAX_VALUE_CHARS) -> str:
    """User text as an inline code span (backticks inside cannot close it)."""
    flat = _one_line(text, limit)
    ticks = "`" * (max((len(r) for r in re.findall("`+", flat)), default=0) + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{ticks}{pad}{flat}{pad}{ticks}"


class _Comment:
    """Lines of a markdown comment under a character budget: once a line does not
    fit, the rest is left out, an open fence and open details are closed, and a note
    says how much was cut."""

    def __init__(self, budget: int = _COMMENT_BUDGET) -> None:
        self.lines: list[str] = []
        self.size = 0
        self.budget = budget
        self.omitted = 0
        self.fence: str | None = None
        self.open_details = 0

    def add(self, *lines: str) -> None:
        for line in lines:
            if self.omitted or self.size + len(line) + 1 > self.budget:
                self.omitted += 1
                continue
            self.lines.append(line)
            self.size += len(line) + 1
            if line and set(line) == {"`"} and (self.fence is None or line == self.fence):
                self.fence = None if self.fence else line
            elif self.fence is None and line.startswith("<details>"):
                self.open_details += 1
            elif self.fence is None and line == "</details>":
                self.open_details -= 1

    def code_block(self, lines: list[str]) -> None:
        body = [_one_line(line, MAX_LINE_CHARS) for line in lines]
        fence = _fence(body)
        self.add(fence, *body, fence)

    def text(self) -> str:
        out = list(self.lines)
        if self.omitted:
            if self.fence:
                out.append(self.fence)
            out += ["", "</details>"] * self.open_details
            out += [
                "",
                f"**This comment was cut to stay under GitHub's {MAX_COMMENT_CHARS:,}-character "
                f"limit: {self.omitted} line(s) left out. Run `heteroscale plan --base … --head …` "
                "(or `--format json`) for the whole review.**",
            ]
        text = "\n".join(out)
        return text if text.endswith("\n") else text + "\n"


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
    if review.incomplete and not review.has_changes:
        if review.files is not None and review.files.error:
            return "incomplete: the files the change touches could not be listed"
        return "incomplete: the time budget ran out before the change was evaluated"
    if not review.has_changes:
        after = review.fleet.apply_changes if review.fleet is not None else 0
        files = review.files.total if review.files is not None else 0
        # Files that change nothing are still the pull request's: say they are listed.
        listed = f"; it changes {files} file(s), none of them the desired state (listed)"
        if after:
            # Not the pull request's doing: base plans the same changes.
            return (
                "no change from this pull request: base and head plan the same; the "
                f'{after} group change(s) under "apply after merge" are made with or '
                "without it" + (listed if files else "")
            )
        return "no change: the fleet would stay as it is" + (listed if files else "")
    parts = [f"{len(review.config_changes)} config change(s)"]
    if review.fleet is not None:
        changed = [s for s in review.fleet.services if s.changed]
        parts.append(f"{len(changed)} service(s) sized or placed differently")
        if decided := _decision_rows(review):
            parts.append(f"{len(decided)} service(s) held unsized under one revision only")
        parts.append(f"apply after merge: {review.fleet.apply_changes} group change(s)")
    return "; ".join(parts)


def _cost_lines(fleet: FleetReview) -> list[str]:
    """Per cluster: the cost per hour of the base plan and the head plan, at head's
    prices, and the change a merge makes to it."""
    out = []
    for cluster, change in fleet.cost_per_hour().items():
        currency = change.planned.currency
        line = (
            f"cost per hour, cluster {cluster}: base plan {money(change.current.amount)} -> "
            f"head plan {money(change.planned.amount)} {currency} "
            f"({money(change.delta, signed=True)}, at head's prices)"
        )
        # Why a side is unknown: a GPU type without a price, or GPUs per instance
        # that neither revision's policy gives.
        why = sorted({change.current.why_unknown(), change.planned.why_unknown()} - {""})
        if why:
            line += f"; unknown: {'; '.join(why)}"
        out.append(line)
    return out


def _service_rows(review: Review) -> list[ServiceFleetDiff]:
    return [s for s in review.fleet.services if s.changed] if review.fleet else []


def _decision_rows(review: Review) -> list[ServiceFleetDiff]:
    """Services sized under one revision and held unsized under the other: their
    counts can look unchanged, so head's reason and message are shown."""
    return [s for s in review.fleet.services if s.decision_kind_changed] if review.fleet else []


def _what_if_error_line(review: Review) -> str:
    return f"error: {review.what_if_error}" if review.what_if_error else ""


def _result_cells(result: PolicyResult | None) -> list[str]:
    if result is None:
        return [MISSING] * 4
    return [
        decimal(result.gpu_hours),
        percent(result.ttft_attainment, 2),
        percent(result.tbt_attainment, 2),
        whole(result.scaling_actions),
    ]


# --------------------------------------------------------------------------- text


def format_text(review: Review) -> str:
    lines = [f"heteroscale plan: {review.base_label} -> {review.head_label}", _headline(review), ""]
    lines += [f"  error {line}" for line in shown_issues((*review.errors, *review.base_errors))]
    if review.errors or review.base_errors:
        return _text(lines)
    lines += [f"incomplete: {line}" for line in _skipped_lines(review)]
    if review.what_if_error:
        lines.append(_one_line(_what_if_error_line(review), MAX_LINE_CHARS))
    lines.append("config changes:")
    for change in review.config_changes:
        # One line each, whatever the files hold: no control character reaches the terminal.
        lines.append(f"  {_terminal_line(change, MAX_LINE_CHARS)}")
        lines += [f"      {_terminal_line(line, MAX_LINE_CHARS)}" for line in change.details]
    if not review.config_changes:
        lines.append("  none")
    if review.files is not None and review.files.error:
        lines += ["", _one_line(f"files changed: not listed: {review.files.error}", MAX_LINE_CHARS)]
    elif review.files is not None:
        lines += ["", f"files changed ({review.files.total}):"]
        lines += [
            f"  {_terminal_line(f'{f.change} {f.path}: {f.reading}', MAX_LINE_CHARS)}"
            for f in review.files.listed
        ] or ["  none"]
        if more := review.files.unlisted_line():
            lines.append(f"  {more}")
    if review.fleet is not None:
        lines += ["", f"fleet (from the {review.fleet.source}):"]
        rows = _service_rows(review)
        for row in rows:
            lines.append(
                f"  {row.service}: {_targets(row.base_targets)} -> {_targets(row.head_targets)}; "
                f"GPUs {_delta(row.gpu_delta())}; by domain {_delta(row.domain_delta())}"
            )
        decided = _decision_rows(review)
        for row in decided:
            lines.append(
                _one_line(
                    f"  {row.service}: decision {row.base_reason} -> {row.head_reason}; "
                    f"head: {row.head_message}",
                    MAX_LINE_CHARS,
                )
            )
        if not rows and not decided:
            lines.append("  every service sized and placed the same under both revisions")
        lines += [f"  {line}" for line in _cost_lines(review.fleet)]
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
    return _text(lines)


def _text(lines: list[str]) -> str:
    """The text review: each line with any control or invisible character it quotes
    (a file name, a revision label) shown as an escape, so no string in it can move the
    cursor, colour the terminal or start a line of its own."""
    return "\n".join(visible(line) for line in lines).rstrip() + "\n"


# ----------------------------------------------------------------------- markdown


def _skipped_lines(review: Review) -> list[str]:
    """What the time budget left out, one line each (plain text, names as given)."""
    out = []
    if review.fleet_skipped:
        out.append(
            f"fleet diff skipped: the review's time budget ({review.timeout_s:g} s, --timeout) "
            "ran out before both revisions were planned"
        )
    if review.skipped:
        out.append(
            f"what-if replay skipped for {len(review.skipped)} service(s) when the time budget "
            f"({review.timeout_s:g} s, --timeout) ran out: {', '.join(review.skipped)}"
        )
    return out


def format_markdown(review: Review) -> str:
    comment = _Comment()
    comment.add(
        f"### heteroscale plan: {_code(review.base_label)} → {_code(review.head_label)}",
        "",
        f"**{md(_headline(review), MAX_LINE_CHARS)}**",
        "",
    )
    if review.errors or review.base_errors:
        comment.code_block(shown_issues((*review.errors, *review.base_errors)))
        return comment.text()
    for line in _skipped_lines(review):
        comment.add(f"> **Incomplete review:** {md(line, MAX_LINE_CHARS)}", "")
    if review.what_if_error:
        comment.add(f"> **Error:** {md(review.what_if_error, MAX_LINE_CHARS)}", "")
    if review.what_if:
        comment.add(
            "| service | GPU-hours base → head | TTFT attainment | TBT attainment | verdict |",
            "| --- | --- | --- | --- | --- |",
        )
        for item in review.what_if:
            b, h = _result_cells(item.base), _result_cells(item.head)
            comment.add(
                f"| {md(item.service)} | {b[0]} → {h[0]} | {b[1]} → {h[1]} | {b[2]} → {h[2]} "
                f"| {md(item.verdict, MAX_LINE_CHARS)} |"
            )
        comment.add("")
    rows = _service_rows(review)
    if rows:
        comment.add(
            "| service | targets base → head | GPUs | by switch domain |",
            "| --- | --- | --- | --- |",
        )
        for row in rows:
            comment.add(
                f"| {md(row.service)} | {_targets(row.base_targets)} → {_targets(row.head_targets)} "
                f"| {md(_delta(row.gpu_delta()), MAX_LINE_CHARS)} "
                f"| {md(_delta(row.domain_delta()), MAX_LINE_CHARS)} |"
            )
        comment.add("")
    if decided := _decision_rows(review):
        comment.add("| service | decision base → head | head's reason |", "| --- | --- | --- |")
        for row in decided:
            comment.add(
                f"| {md(row.service)} | {md(row.base_reason)} → {md(row.head_reason)} "
                f"| {md(row.head_message, MAX_LINE_CHARS)} |"
            )
        comment.add("")
    if review.fleet is not None and (costs := _cost_lines(review.fleet)):
        comment.add(*[md(line, MAX_LINE_CHARS) for line in costs], "")
    comment.add("<details><summary>Config changes</summary>", "")
    for change in review.config_changes:
        comment.add(f"- {md(change, MAX_LINE_CHARS)}")
        if change.details:
            comment.code_block(list(change.details))
    if not review.config_changes:
        comment.add("- none")
    comment.add("", "</details>", "")
    if review.files is not None and review.files.error:
        comment.add(f"> **Files changed not listed:** {md(review.files.error, MAX_LINE_CHARS)}", "")
    elif review.files is not None and review.files.without_effect:
        # Not folded away: files that change nothing here are still merged.
        comment.add(
            f"**Files changed that do not change the desired state "
            f"({review.files.without_effect} of {review.files.total}):**",
            "",
        )
        for f in review.files.listed:
            if f.reading != READ_CHANGED:
                comment.add(f"- {md(f.change)} {_code(f.path)}: {md(f.reading)}")
        if more := review.files.unlisted_line():
            comment.add(f"- {md(more, MAX_LINE_CHARS)}")
        comment.add("")
    if review.fleet is not None:
        changes = [c for plan in review.fleet.head_plans.values() for c in plan.changes]
        comment.add(
            f"<details><summary>Apply after merge: {len(changes)} group change(s)</summary>", ""
        )
        comment.code_block([str(change) for change in changes] or ["nothing"])
        comment.add("")
        comment.add(*[f"- {md(note, MAX_LINE_CHARS)}" for note in review.fleet.notes])
        comment.add(
            "", f"Observed load: {md(review.fleet.source, MAX_LINE_CHARS)}.", "", "</details>", ""
        )
    if review.what_if:
        comment.add("<details><summary>What-if details</summary>", "")
        for item in review.what_if:
            comment.add(
                f"- **{md(item.service)}** on {md(item.load)}: {md(item.verdict, MAX_LINE_CHARS)}"
            )
        comment.add("", "</details>", "")
    return comment.text()


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
        "skipped": list(review.skipped),
        "fleet_skipped": review.fleet_skipped,
        "what_if_error": review.what_if_error or None,
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
                "details": list(c.details),
            }
            for c in review.config_changes
        ],
    }
    if review.files is not None:
        data["files"] = {
            "error": review.files.error or None,
            "total": review.files.total,
            "by_reading": dict(review.files.by_reading),
            "listed": [
                {"path": f.path, "change": f.change, "reading": f.reading}
                for f in review.files.listed
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
                    "base_reason": s.base_reason or None,
                    "head_reason": s.head_reason or None,
                    "head_message": s.head_message or None,
                    "decision_kind_changed": s.decision_kind_changed,
                }
                for s in review.fleet.services
            ],
            "apply_after_merge": [
                {"cluster": plan.cluster, **c.to_json(group_key="group")}
                for plan in review.fleet.head_plans.values()
                for c in plan.changes
            ],
            "notes": list(review.fleet.notes),
            "cost_per_hour": {
                cluster: {
                    "currency": change.planned.currency,
                    "base": change.current.amount,
                    "head": change.planned.amount,
                    "delta": change.delta,
                    "unpriced_gpu_types": sorted(
                        {*change.current.unpriced_types, *change.planned.unpriced_types}
                    ),
                }
                for cluster, change in review.fleet.cost_per_hour().items()
            },
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

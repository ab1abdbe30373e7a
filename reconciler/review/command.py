"""The command-line side of ``heteroscale plan --base REV --head REV``: run the review,
print it in the asked format, write the what-if plot, return the exit code.

Exit codes: 0 no change, 1 error (head or base invalid, the what-if could not run, out
of time), 3 changes present.
"""

from __future__ import annotations

from pathlib import Path

from reconciler.placement.base import Placer
from reconciler.policy import make_autoscaler
from reconciler.review.report import format_json, format_markdown, format_text
from reconciler.review.review import Review, ReviewOptions, run_review
from reconciler.review.whatif import WhatIf


def plot_paths(base: Path, services: list[str]) -> dict[str, Path]:
    """One PNG per replayed service: PATH itself for one, PATH-stem-SERVICE.png for more."""
    if len(services) == 1:
        return {services[0]: base}
    return {s: base.with_name(f"{base.stem}-{s}{base.suffix or '.png'}") for s in services}


def write_plots(review: Review, path: Path) -> list[Path]:
    from reconciler.commands.simulate import write_plot

    written = []
    items: dict[str, WhatIf] = {w.service: w for w in review.what_if}
    for service, target in plot_paths(path, list(items)).items():
        base_eval, head_eval = review.evaluations[service]
        reference = head_eval or base_eval
        if reference is None:
            continue
        combined = items[service].as_evaluation(
            dict(reference.slo), reference.horizon_s, reference.requests
        )
        # Both sides' timelines come with their PolicyResult, so the simulate plot
        # renders base and head as two rows.
        write_plot(combined, target)
        written.append(target)
    return written


def render(review: Review, fmt: str) -> str:
    if fmt == "json":
        return format_json(review)
    if fmt == "markdown":
        return format_markdown(review)
    return format_text(review)


def plan_review(
    repo: Path,
    base_rev: str,
    head_rev: str,
    *,
    fmt: str,
    placer: Placer,
    autoscaler_name: str = "heteroscale",
    options: ReviewOptions | None = None,
    plot: Path | None = None,
) -> tuple[Review, str, list[Path]]:
    """Run the review and render it; the caller prints and exits with ``review.exit_code``."""
    review = run_review(
        repo,
        base_rev,
        head_rev,
        autoscaler_factory=lambda: make_autoscaler(autoscaler_name),
        placer=placer,
        options=options,
    )
    written = write_plots(review, plot) if plot is not None and review.what_if else []
    return review, render(review, fmt), written

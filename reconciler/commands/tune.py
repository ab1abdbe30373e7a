"""``heteroscale tune SERVICE``: the paper's policy-curation stress test.

Sweeps the prefill/decode split of a GPU budget in the simulator, prints the
throughput-under-SLO curve (table and text bars; ``--plot`` for a PNG) and recommends
``pd_ratio.target``. Under the default planner (``--autoscaler heteroscale``) it checks
the capacity per instance the planner derives from the performance model against what
the sweep measured (and any override the policy sets); under ``--autoscaler
heteroscale-paper`` it also recommends the hand-set ``scaling.target_per_instance`` and
``prefill_target_per_instance`` that policy scales on. It verifies the recommendation by
replaying that autoscaler against the current values, and with ``--write`` writes the
changed values into the service's YAML file keeping its layout. It writes only values
that keep both SLOs for the goal's share of (attainable) requests on the verification
day and cost no more than the current ones when those already do
(``Verification.shortfall``); the comments that described the old values are replaced
by one saying what was verified. The method is documented in
``reconciler.review.tune``; this module reads inputs and renders.

Exit codes: 0 done (with or without changes), 1 invalid desired state, unreadable
trace, a sweep that cannot run, values that fall short of the goal with ``--write``
(nothing written), or a YAML file that cannot be read again, edited safely (a value
an alias shares, several documents: named and located) or written (a write goes
to a new file renamed over the old one: a failed one leaves the file as it was),
2 usage (an unknown service, ``--write`` with ``--no-verify``, an option out of
range).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from reconciler.atomic_write import replace_text
from reconciler.commands._options import (
    AutoscalerOpt,
    DecisionIntervalOpt,
    DiurnalHoursOpt,
    PlacerOpt,
    PlotOpt,
    RateScaleOpt,
    RepoOpt,
    SeedOpt,
    TraceOpt,
    checked_output,
    checked_placer,
    checked_repository,
    checked_service,
    console,
    desired_state_or_exit,
    err_console,
    in_range,
    progress_bars,
    report_config_error,
    usage_error,
    writing,
)
from reconciler.commands._table import (
    MISSING,
    Column,
    decimal,
    percent,
    print_table,
    render,
    whole,
)
from reconciler.commands.simulate import render_table, save_png
from reconciler.desired.models import ServicePolicy
from reconciler.desired.ratio import format_ratio
from reconciler.errors import ConfigError, PermanentError
from reconciler.policy.gpu_economics import choose_gpu_types
from reconciler.review.tune import (
    DEFAULT_HEADROOM,
    PAPER,
    PLANNER,
    QUICK_SETTINGS,
    TUNED_AUTOSCALERS,
    Recommendation,
    SplitResult,
    Sweep,
    SweepSettings,
    Verification,
    apply_changes,
    check_capacity,
    gpu_type_economics,
    length_pool,
    recommend,
    sweep_splits,
    unified_diff,
    verify,
    write_back,
)
from reconciler.sim.engine import SimConfig
from reconciler.sim.evaluate import EvaluationResult, default_placer
from reconciler.sim.load import load_with_requests
from reconciler.sim.workload import TraceError, read_trace

if TYPE_CHECKING:
    from rich.table import Table


BAR_WIDTH = 30
_EIGHTHS = " ▏▎▍▌▋▊▉"
QUICK_VERIFY_HOURS = 2.0


def text_bar(value: float, top: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of ``value / top`` x ``width`` cells, in eighths of a cell."""
    if top <= 0 or value <= 0 or not math.isfinite(value):
        return ""
    eighths = round(min(1.0, value / top) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[part] if part else "")


def sweep_columns(sweep: Sweep) -> list[Column[SplitResult]]:
    """The columns of the sweep's table, one row per split of the budget."""
    goal = sweep.attainment_goal
    top = max(s.throughput_tps for s in sweep.splits)
    best = sweep.best
    return [
        Column("P:D", lambda split: format_ratio(split.ratio)),
        Column("prefill", lambda split: whole(split.prefill)),
        Column("decode", lambda split: whole(split.decode)),
        Column("GPUs", lambda split: whole(split.gpus)),
        Column("max req/s", lambda split: decimal(split.max_rate_rps) if split.best else MISSING),
        Column("limit", lambda split: split.limited_by(goal), "left"),
        Column("output tok/s", lambda split: whole(split.throughput_tps)),
        Column("tok/s/GPU", lambda split: whole(split.throughput_tps / sweep.budget_gpus)),
        Column("decode tok/s/inst", lambda split: whole(split.decode_tps_per_instance)),
        Column("throughput", lambda split: text_bar(split.throughput_tps, top), "left"),
        Column("", lambda split: "◀ best" if split is best else "", "left"),
    ]


def render_sweep(sweep: Sweep) -> Table:
    best = sweep.best
    return render(
        f"{sweep.service}: throughput under SLO per prefill/decode split of "
        f"{whole(sweep.budget_gpus)} GPUs ({sweep.duration_s} s flat load, lengths from "
        f"{sweep.workload}, TTFT and TBT attainment >= {percent(sweep.attainment_goal)})",
        sweep_columns(sweep),
        sweep.splits,
        highlighted=lambda split: split is best,
    )


def render_recommendation(
    recommendation: Recommendation,
    sweep: Sweep,
    current_target: float | None,
    current_ratio: float,
    current_prefill_target: float | None = None,
) -> list[str]:
    best = sweep.best
    lines = [
        f"best split: {best.prefill} prefill + {best.decode} decode "
        f"(P/D {format_ratio(best.ratio)}), {whole(best.throughput_tps)} output tokens/s at "
        f"{decimal(best.max_rate_rps)} req/s"
        + ("" if sweep.has_interior_peak else " [yellow](peak at the edge of the sweep)[/yellow]"),
    ]
    if recommendation.capacity_per_instance is not None and (
        recommendation.target_per_instance is not None
    ):
        role = "decode" if recommendation.metric == "decode_tps" else "prefill"
        lines.append(
            f"{role} capacity at the SLO limit: {whole(recommendation.capacity_per_instance)} tokens/s "
            f"per instance; target = capacity x (1 - {recommendation.headroom:g} headroom) "
            f"/ (1 + {recommendation.tolerance:g} tolerance), rounded to 50"
        )
    lines.append(
        f"recommended: pd_ratio.target {format_ratio(recommendation.pd_ratio_target)} "
        f"(current {format_ratio(current_ratio)})"
        + (
            f", scaling.target_per_instance {recommendation.target_per_instance:g} "
            f"(current {'unset' if current_target is None else f'{current_target:g}'})"
            if recommendation.target_per_instance is not None
            else ""
        )
        + (
            f", scaling.prefill_target_per_instance {recommendation.prefill_target_per_instance:g} "
            f"(current {'unset' if current_prefill_target is None else f'{current_prefill_target:g}'})"
            if recommendation.prefill_target_per_instance is not None
            else ""
        )
    )
    return lines


def render_verification(
    verification: Verification,
    recommendation: Recommendation,
    policy: ServicePolicy,
    autoscaler: str = PLANNER,
) -> Table:
    """The replay as ``heteroscale simulate``'s table, one row per set of values."""
    policies = {"current": verification.current}
    if verification.recommended is not None:
        policies["recommended"] = verification.recommended
    return render_table(
        EvaluationResult(
            service=recommendation.service,
            workload=f"{autoscaler} on {verification.load}",
            horizon_s=verification.horizon_s,
            requests=verification.requests,
            slo={
                "ttft_ms": policy.slo.ttft_ms,
                "tbt_ms": policy.slo.tbt_ms,
                "quantile": policy.slo.quantile,
            },
            policies=policies,
        )
    )


def write_sweep_plot(sweep: Sweep, path: Path) -> None:
    """Throughput under SLO against the P/D ratio (log axis), best split marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [s.ratio for s in sweep.splits]
    throughput = [s.throughput_tps for s in sweep.splits]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(ratios, throughput, marker="o", color="tab:blue")
    best = sweep.best
    ax.plot([best.ratio], [best.throughput_tps], marker="*", markersize=16, color="tab:red")
    ax.annotate(
        f"best {format_ratio(best.ratio)}: {best.throughput_tps:,.0f} tok/s",
        (best.ratio, best.throughput_tps),
        textcoords="offset points",
        xytext=(8, -14),
        fontsize=9,
    )
    ax.set_xscale("log")
    ax.set_xticks(ratios)
    ax.set_xticklabels([format_ratio(r) for r in ratios], rotation=45, fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("P/D ratio (prefill : decode instances)")
    ax.set_ylabel("output tokens/s under SLO")
    ax.set_title(
        f"{sweep.service}: throughput under SLO, {sweep.budget_gpus} GPUs "
        f"(attainment >= {sweep.attainment_goal * 100:.1f}%)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    save_png(fig, path)


# Every split of the budget is simulated, each with up to that many GPUs busy: a sweep
# of a few thousand GPUs (a large cluster) already takes hours.
MAX_SWEEP_GPUS = 4096
# A probe measures a steady state, which minutes of flat load reach; its requests are
# all held in memory, so an hour (six times the default) is the most worth paying for.
MAX_PROBE_S = 3600


def _policy_text(repo: Path, path: str) -> str:
    """The service's YAML file as it is now (the sweep takes minutes: it may have been
    edited since it was loaded), read as the loader reads it; ``error: ...`` on stderr
    and exit 1 when it no longer reads."""
    from reconciler.desired.sources import DirectorySource, SourceError

    try:
        return DirectorySource(repo).read(path).decode()
    except (SourceError, UnicodeDecodeError) as exc:
        reason = exc.message if isinstance(exc, SourceError) else str(exc)
        err_console.print(
            f"error: {repo / path}: cannot read it again: {reason}", markup=False, soft_wrap=True
        )
        raise typer.Exit(1) from None


def _edited(
    before: str, recommendation: Recommendation, verification: Verification | None, path: str
) -> str:
    """The service file's text with the recommended values: and, when they are the
    ones written (verified, no shortfall), with the note saying what verified them."""
    if verification is None or verification.shortfall() is not None:
        return apply_changes(before, recommendation.changes, path=path)
    recommended = verification.recommended
    assert recommended is not None  # verified changes were replayed
    return write_back(
        before,
        recommendation.changes,
        f"heteroscale tune: verified on {verification.load} "
        f"({percent(recommended.slo_attainment)} within both SLOs, "
        f"{decimal(recommended.gpu_hours)} GPU-hours)",
        path=path,
    )


def register(app: typer.Typer) -> None:
    @app.command()
    def tune(
        service: Annotated[str, typer.Argument(help="service (policies/*.yaml name) to tune")],
        trace: TraceOpt = None,
        rate_scale: RateScaleOpt = None,
        diurnal_hours: DiurnalHoursOpt = None,
        gpus: Annotated[
            int | None,
            typer.Option(
                "--gpus",
                help=f"GPU budget the sweep splits, 2 to {MAX_SWEEP_GPUS} (default: 16 "
                "instances' worth)",
                callback=in_range(2, MAX_SWEEP_GPUS),
            ),
        ] = None,
        headroom: Annotated[
            float,
            typer.Option(
                "--headroom",
                help="target = capacity at the SLO limit x (1 - headroom) / (1 + scaling.tolerance)",
                callback=in_range(0.0, 0.9),
            ),
        ] = DEFAULT_HEADROOM,
        duration_s: Annotated[
            int | None,
            typer.Option(
                "--duration",
                help=f"seconds of flat load per probe, 120 to {MAX_PROBE_S} (default 600; "
                "--quick 300)",
                callback=in_range(120, MAX_PROBE_S, unit=" s"),
            ),
        ] = None,
        quick: Annotated[
            bool,
            typer.Option(
                "--quick",
                help="coarser sweep (300 s probes, 6% rate tolerance) and a 2 h synthetic verification",
            ),
        ] = False,
        widen_bounds: Annotated[
            bool,
            typer.Option(
                "--widen-bounds",
                help="when the best ratio lies outside [pd_ratio.min, max], move the bound instead of clamping",
            ),
        ] = False,
        do_verify: Annotated[
            bool,
            typer.Option(
                "--verify/--no-verify",
                help="replay the autoscaler with the current and recommended values",
            ),
        ] = True,
        write: Annotated[
            bool,
            typer.Option(
                "--write", help="write the recommended values into the service's YAML file"
            ),
        ] = False,
        plot_path: PlotOpt = None,
        repo: RepoOpt = Path("."),
        seed: SeedOpt = 0,
        interval_s: DecisionIntervalOpt = 30.0,
        placer: PlacerOpt = "greedy",
        autoscaler: AutoscalerOpt = PLANNER,
    ) -> None:
        """Sweep the P/D ratio in the simulator, check the planner's derived capacity
        (or, for heteroscale-paper, recommend hand-set targets) and verify the
        recommendation (--write puts it into the service's YAML).

        --trace: its lengths drive the sweep and its load the verification (without
        one: the service's synthetic shape, and a synthetic day of --diurnal-hours,
        default 8). --plot: the throughput curve."""
        checked_placer(placer)
        if autoscaler not in TUNED_AUTOSCALERS:
            usage_error(
                f"--autoscaler must be one of {', '.join(TUNED_AUTOSCALERS)}, got '{autoscaler}'"
            )
        if write and not do_verify:
            usage_error("--write writes only verified values: drop --no-verify")
        checked_repository(repo)
        checked_output(plot_path, "--plot")
        state = desired_state_or_exit(repo)
        checked_service(state, service)
        policy = state.policies[service]
        base = QUICK_SETTINGS if quick else SweepSettings()
        settings = SweepSettings(
            gpus=gpus,
            duration_s=duration_s or base.duration_s,
            rate_tolerance=base.rate_tolerance,
            seed=seed,
            interval_s=interval_s,
        )
        config = SimConfig()
        chosen_placer = default_placer(placer)
        try:
            workload = read_trace(trace, seed=seed) if trace is not None else None
            pool = length_pool(policy, workload, seed)
            with progress_bars("{task.completed:>3.0f}/{task.total:.0f}") as progress:
                task = progress.add_task("split sweep", total=1)

                def report(done: int, total: int) -> None:
                    progress.update(task, completed=done, total=total)

                sweep = sweep_splits(
                    state,
                    service,
                    pool,
                    settings,
                    config=config,
                    placer=chosen_placer,
                    progress=report,
                )
            recommendation = recommend(
                policy,
                sweep,
                headroom,
                widen_bounds=widen_bounds,
                hand_targets=autoscaler == PAPER,
            )
            print_table(console, render_sweep(sweep))
            for line in render_recommendation(
                recommendation,
                sweep,
                policy.scaling.target_per_instance,
                policy.pd_ratio.target,
                policy.scaling.prefill_target_per_instance,
            ):
                console.print(line, soft_wrap=True)  # numbers only, with markup
            warnings = list(recommendation.warnings)
            if autoscaler == PLANNER:
                checks = check_capacity(state, service, sweep, pool)
                if not checks:
                    warnings.append(
                        "no allowed GPU type fits the model: the planner cannot derive capacity"
                    )
                for check in checks:
                    console.print(check.line(), soft_wrap=True, markup=False)
                    warnings.extend(check.warnings())
                currency = state.clusters[policy.cluster].currency
                declared = choose_gpu_types(policy, state.clusters[policy.cluster])
                for economics, choice in zip(
                    gpu_type_economics(state, service, sweep, pool), declared, strict=True
                ):
                    if len(economics.types) > 1:  # a choice only where a role allows several
                        console.print(economics.line(currency), soft_wrap=True, markup=False)
                    drift = economics.ranking_drift(choice.first, currency)
                    if drift is not None:
                        warnings.append(drift)
                    warning = economics.warning(currency)
                    if warning is not None:
                        warnings.append(warning)
            for warning in warnings:
                console.print(f"[yellow]warning[/yellow] {escape(warning)}", soft_wrap=True)
            if plot_path is not None:
                write_sweep_plot(sweep, plot_path)
                console.print(f"wrote {plot_path}", markup=False, soft_wrap=True)
            verification: Verification | None = None
            if do_verify:
                hours = diurnal_hours
                if quick and trace is None and hours is None:
                    hours = QUICK_VERIFY_HOURS
                profile = load_with_requests(
                    state, service, trace, rate_scale, hours, seed, config
                ).profile
                for note in profile.notes:
                    err_console.print(f"note: {note}", soft_wrap=True, markup=False)
                err_console.print(f"replaying {autoscaler} (current vs recommended) ...")
                verification = verify(
                    state,
                    service,
                    profile,
                    recommendation,
                    seed=seed,
                    config=config,
                    placer=chosen_placer,
                    interval_s=interval_s,
                    autoscaler=autoscaler,
                )
                print_table(
                    console, render_verification(verification, recommendation, policy, autoscaler)
                )
                console.print(verification.verdict(), soft_wrap=True, markup=False)
                for note in verification.notes:
                    console.print(f"[yellow]note[/yellow] {escape(note)}", soft_wrap=True)
        except (TraceError, PermanentError) as exc:
            err_console.print(f"[red]error[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from None

        path = state.policy_files[service]
        if not recommendation.changes:
            console.print(
                f"{path}: already at the recommended values, nothing to change",
                markup=False,
                soft_wrap=True,
            )
            return
        file_path = repo / path
        before = _policy_text(repo, path)
        shortfall = verification.shortfall() if verification is not None else None
        try:
            after = _edited(before, recommendation, verification, path)
        except ConfigError as exc:  # a file tune cannot edit safely: left as it is
            report_config_error(exc)
            raise typer.Exit(1) from None
        console.print(
            unified_diff(path, before, after), markup=False, highlight=False, end="", soft_wrap=True
        )
        if write:
            if shortfall is not None:
                err_console.print(
                    f"[red]not written[/red]: {escape(shortfall)}; the best values found are "
                    "shown above",
                    soft_wrap=True,
                )
                raise typer.Exit(1)
            # Through a symlink, as the loader read it: the file it names is rewritten.
            with writing(file_path, "--write"):
                replace_text(file_path.resolve(), after)
            console.print(
                f"wrote {len(recommendation.changes)} value(s) to {file_path}",
                markup=False,
                soft_wrap=True,
            )
        else:
            console.print(
                f"(dry run: --write puts these {len(recommendation.changes)} value(s) into {path})",
                markup=False,
                soft_wrap=True,
            )

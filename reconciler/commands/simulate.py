"""``heteroscale simulate``: run autoscaling policies side by side on one trace in the
simulated fleet, and print / write every figure (table, JSON, PNG).

The heavy lifting is ``reconciler.sim.evaluate.evaluate`` (pure); this module only reads
inputs, shows progress and renders results.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from reconciler.atomic_write import replace_text, replaced
from reconciler.commands._options import (
    MAX_DAY_HOURS,
    DecisionIntervalOpt,
    DiurnalHoursOpt,
    PlacerOpt,
    PlotOpt,
    RateScaleOpt,
    RepoOpt,
    SeedOpt,
    TraceOpt,
    WarmUpHoursOpt,
    checked_output,
    checked_placer,
    checked_repository,
    checked_service,
    console,
    desired_state_or_exit,
    err_console,
    in_range,
    progress_bars,
    usage_error,
    writing,
)
from reconciler.commands._table import (
    MISSING,
    Column,
    cost,
    decimal,
    pair,
    percent,
    print_table,
    render,
    signed_percent,
    whole,
)
from reconciler.errors import PermanentError

if TYPE_CHECKING:
    from rich.table import Table

    from reconciler.sim.evaluate import EvaluationResult, PolicyResult

STATIC_PEAK = "static-peak"  # the policy "vs static" compares with


def _ratio_range(low: float | None, high: float | None) -> str:
    """Prefill/decode instance ratio range, as decimals (0.33 = 1:3)."""
    if low is None or high is None:
        return MISSING
    return f"{low:.2f}-{high:.2f}"


@dataclass(frozen=True)
class PolicyRow:
    """One policy's line of the table; ``static_gpu_hours`` is static-peak's (when it
    ran), the baseline of "vs static"."""

    name: str
    result: PolicyResult
    static_gpu_hours: float | None


def _vs_static(row: PolicyRow) -> str:
    static = row.static_gpu_hours
    if static is None or static <= 0 or row.name == STATIC_PEAK:
        return MISSING
    return signed_percent(row.result.gpu_hours / static - 1)


def policy_columns(currency: str, quantile_pct: int) -> list[Column[PolicyRow]]:
    """The columns of ``simulate``'s table (and of ``tune``'s replay)."""
    return [
        Column("policy", lambda row: row.name, "left"),
        Column("GPU-hours", lambda row: decimal(row.result.gpu_hours)),
        Column(f"cost {currency}", lambda row: cost(row.result.cost_usd)),
        Column(f"{currency}/Mtok", lambda row: cost(row.result.usd_per_mtok, 3)),
        Column("x oracle-min", lambda row: decimal(row.result.oracle_min_multiple, 2)),
        Column("vs static", _vs_static),
        Column(
            "util P / D",
            lambda row: pair(
                percent(row.result.mean_gpu_util_prefill), percent(row.result.mean_gpu_util_decode)
            ),
        ),
        Column(
            "SM P / D",
            lambda row: pair(
                percent(row.result.mean_sm_active_prefill),
                percent(row.result.mean_sm_active_decode),
            ),
        ),
        Column("TTFT ok", lambda row: percent(row.result.ttft_attainment)),
        Column("TBT ok", lambda row: percent(row.result.tbt_attainment)),
        Column("both ok", lambda row: percent(row.result.slo_attainment)),
        Column("unattainable", lambda row: percent(row.result.unattainable_share)),
        Column(f"TTFT p{quantile_pct} ms", lambda row: whole(row.result.ttft_quantile_ms)),
        Column(f"TBT p{quantile_pct} ms", lambda row: whole(row.result.tbt_token_quantile_ms)),
        Column("actions", lambda row: whole(row.result.scaling_actions)),
        Column("P/D", lambda row: _ratio_range(row.result.pd_ratio_min, row.result.pd_ratio_max)),
        Column("dropped", lambda row: whole(row.result.dropped)),
    ]


def render_table(result: EvaluationResult) -> Table:
    slo = result.slo
    q = round(float(slo["quantile"]) * 100)
    static = result.policies.get(STATIC_PEAK)
    static_gpu_hours = static.gpu_hours if static is not None and static.failed is None else None
    return render(
        f"{result.service}: {result.workload}, {result.horizon_s / 3600:.1f} h, "
        f"{whole(result.requests)} requests; "
        f"SLO TTFT {slo['ttft_ms']:g} ms, TBT {slo['tbt_ms']:g} ms at p{q}",
        policy_columns(result.currency, q),
        (PolicyRow(name, r, static_gpu_hours) for name, r in result.policies.items()),
        failed=lambda row: row.result.failed is not None,
    )


_ROLE_COLORS = (("prefill", "tab:blue"), ("decode", "tab:orange"))


def write_plot(result: EvaluationResult, path: Path) -> None:
    """One row per policy: load, instances per role, TTFT and TBT against the SLO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [name for name, r in result.policies.items() if r.failed is None]
    fig, axes = plt.subplots(
        len(names), 3, figsize=(16, 3.2 * len(names)), squeeze=False, sharex=True
    )
    slo = result.slo
    for row, name in enumerate(names):
        r = result.policies[name]
        tl = r.timeline
        hours = np.asarray(tl["t_min"]) / 60.0
        load_ax = axes[row][0]
        load_ax.plot(hours, tl["requests_per_s"], color="tab:gray", label="requests/s")
        load_ax.set_ylabel(f"{name}\nrequests/s")
        tps_ax = load_ax.twinx()
        for role, color in _ROLE_COLORS:
            tps_ax.plot(
                hours,
                np.asarray(tl[f"{role}_tps"]) / 1000.0,
                color=color,
                lw=0.8,
                label=f"{role} ktok/s",
            )
        tps_ax.set_ylabel("k tokens/s")
        if row == 0:
            load_ax.set_title("load")
            tps_ax.legend(loc="upper right", fontsize=7)
        inst_ax = axes[row][1]
        for role, color in _ROLE_COLORS:
            inst_ax.step(hours, tl[f"{role}_instances"], where="post", color=color, label=role)
        inst_ax.set_ylabel("instances")
        _corner_note(inst_ax, f"{r.gpu_hours:,.0f} GPU-h, {r.scaling_actions} actions")
        if row == 0:
            inst_ax.set_title("instances (ready + starting)")
            inst_ax.legend(loc="upper right", fontsize=7)
        lat_ax = axes[row][2]
        lat_ax.plot(hours, tl["ttft_ms"], color="tab:purple", lw=0.8, label="TTFT")
        lat_ax.plot(hours, tl["tbt_ms"], color="tab:green", lw=0.8, label="TBT")
        lat_ax.axhline(float(slo["ttft_ms"]), color="tab:purple", ls="--", lw=0.8)
        lat_ax.axhline(float(slo["tbt_ms"]), color="tab:green", ls="--", lw=0.8)
        lat_ax.set_yscale("log")
        lat_ax.set_ylabel(f"ms (p{round(float(slo['quantile']) * 100)})")
        _corner_note(
            lat_ax, f"TTFT ok {percent(r.ttft_attainment)}, TBT ok {percent(r.tbt_attainment)}"
        )
        if row == 0:
            lat_ax.set_title("latency vs SLO (dashed)")
            lat_ax.legend(loc="upper right", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("hours")
    fig.suptitle(f"{result.service}: {result.workload}", fontsize=10)
    save_png(fig, path)


def save_png(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG (parents created), as every command's plot
    is written, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    # Never a half-written PNG (replaced); the format given: matplotlib would otherwise
    # add ".png" to a path without it, and the file written would not be the one reported.
    with writing(path, "--plot"), replaced(path, binary=True) as handle:
        fig.savefig(handle, dpi=110, format="png")
    plt.close(fig)


def _corner_note(ax: Any, text: str) -> None:
    """A small note in the top left corner of one panel (``ax``: a matplotlib Axes)."""
    ax.text(0.01, 0.95, text, transform=ax.transAxes, va="top", fontsize=8)


def _hpa_target(text: str) -> float | None:
    """``--hpa-target``: None for ``auto`` (sweep), else a utilisation in (0, 1]."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:  # NaN fails too
        usage_error(f"--hpa-target must be 'auto' or a number in (0, 1], got '{text}'")
    return value


def _policy_names(text: str) -> list[str]:
    """``--policies``: the names in order; a usage error (exit 2), before any load is
    built, for an empty list, a name given twice or one that cannot run
    (``policy_name_problem``)."""
    from reconciler.sim.evaluate import policy_name_problem

    chosen = [p.strip() for p in text.split(",") if p.strip()]
    if not chosen:
        usage_error("--policies is empty")
    twice = sorted({name for name in chosen if chosen.count(name) > 1})
    if twice:
        usage_error(f"--policies names {', '.join(twice)} more than once")
    for name in chosen:
        problem = policy_name_problem(name)
        if problem is not None:
            usage_error(f"--policies: {problem}")
    return chosen


def _engine_speeds(text: str) -> tuple[float, float]:
    """``--engine-speed``: (prefill, decode) from ``F`` (both roles) or
    ``prefill=F,decode=F`` (a role left out: 1)."""
    speeds = {"prefill": 1.0, "decode": 1.0}
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if len(parts) == 1 and "=" not in parts[0]:
            speeds = dict.fromkeys(speeds, float(parts[0]))
        else:
            given: set[str] = set()
            for part in parts:
                role, _, value = part.partition("=")
                if role.strip() not in speeds or role.strip() in given:  # unknown, or twice
                    raise ValueError(role)
                given.add(role.strip())
                speeds[role.strip()] = float(value)
        if not parts or not all(math.isfinite(v) and 0.0 < v <= 100.0 for v in speeds.values()):
            raise ValueError(text)
    except ValueError:
        usage_error(
            "--engine-speed must be a number in (0, 100] or prefill=F,decode=F (each role "
            f"at most once), got '{text}'"
        )
    return speeds["prefill"], speeds["decode"]


def register(app: typer.Typer) -> None:
    # Option defaults; the rest of the simulator is imported when the command runs.
    from reconciler.sim.evaluate import DEFAULT_POLICIES
    from reconciler.sim.oracle import DEFAULT_WINDOW_S

    @app.command()
    def simulate(
        trace: TraceOpt = None,
        service: Annotated[
            str | None,
            typer.Option(
                "--service", help="service in policies/ the trace drives (default: the first)"
            ),
        ] = None,
        rate_scale: RateScaleOpt = None,
        diurnal_hours: DiurnalHoursOpt = None,
        seed: SeedOpt = 0,
        policies: Annotated[
            str,
            typer.Option(
                "--policies",
                help="comma-separated: heteroscale, heteroscale-paper, hpa-gpu-util, hpa-decode-tps, "
                "static-peak, static-past-peak (with --warm-up-hours), oracle-min, "
                "static:P+D, schedule:PATH, python:MODULE:CLASS",
            ),
        ] = ",".join(DEFAULT_POLICIES),
        json_path: Annotated[
            Path | None, typer.Option("--json", help="write every figure as JSON here")
        ] = None,
        plot_path: PlotOpt = None,
        repo: RepoOpt = Path("."),
        interval_s: DecisionIntervalOpt = 30.0,
        placer: PlacerOpt = "greedy",
        export_path: Annotated[
            Path | None,
            typer.Option(
                "--export-workload",
                help="write the requests replayed (after rate scaling and tiling) as a CSV "
                "arrival_s,prompt_tokens,output_tokens that --trace reads back",
            ),
        ] = None,
        hpa_target: Annotated[
            str,
            typer.Option(
                "--hpa-target",
                help="hpa-gpu-util's target utilisation in (0, 1], or 'auto': the cheapest of "
                "0.4-0.9 reaching the SLO attainment goal on this trace",
            ),
        ] = "auto",
        warm_up_hours: WarmUpHoursOpt = 0.0,
        oracle_window_s: Annotated[
            int,
            typer.Option(
                "--oracle-window",
                help="oracle-min's window in seconds: per window, the fewest instances meeting "
                "the SLO goal, at most a week",
                # No simulated day is longer (the simulator's longest is a week).
                callback=in_range(1, int(MAX_DAY_HOURS * 3600), unit=" s"),
            ),
        ] = DEFAULT_WINDOW_S,
        oracle_goal: Annotated[
            float | None,
            typer.Option(
                "--oracle-goal",
                help="oracle-min's share of each window's attainable requests, in (0, 1] "
                "(default: the policy's slo.attainment_goal): the bound for another goal; "
                "windows are sized one after another, so a lower goal can cost more",
            ),
        ] = None,
        engine_speed: Annotated[
            str,
            typer.Option(
                "--engine-speed",
                help="the simulated engines' speed against the cluster file's GPU figures "
                "(the share of declared compute and memory bandwidth they deliver): F for both "
                "roles or prefill=F,decode=F; the policies' models read the declared figures, "
                "so 0.77 is a model ~30% optimistic",
            ),
        ] = "1",
    ) -> None:
        """Run autoscaling policies side by side on one trace in the simulated fleet.

        Without --trace: a synthetic diurnal day for the service, sized to the fleet.
        --plot: one row per policy."""
        from reconciler.sim.engine import SimConfig
        from reconciler.sim.evaluate import (
            STATIC_PAST_PEAK,
            STATIC_PAST_PEAK_NEEDS_A_WARM_UP,
            EvaluationError,
            default_placer,
            evaluate,
            policy_labels,
        )
        from reconciler.sim.load import after_warm_up, load_with_requests
        from reconciler.sim.workload import TraceError

        checked_repository(repo)
        checked_output(json_path, "--json")
        checked_output(plot_path, "--plot")
        checked_output(export_path, "--export-workload")
        state = desired_state_or_exit(repo)
        if not state.policies:
            err_console.print(f"error: {repo}: no services in policies/", markup=False)
            raise typer.Exit(1)
        name = checked_service(state, service or sorted(state.policies)[0])
        checked_placer(placer)
        hpa_target_value = _hpa_target(hpa_target)
        if oracle_goal is not None and not 0.0 < oracle_goal <= 1.0:  # NaN fails too
            usage_error(f"--oracle-goal must be a number in (0, 1], got {oracle_goal}")
        chosen = _policy_names(policies)
        if STATIC_PAST_PEAK in chosen and not warm_up_hours:
            usage_error(f"--policies: {STATIC_PAST_PEAK_NEEDS_A_WARM_UP} with --warm-up-hours")
        prefill_speed, decode_speed = _engine_speeds(engine_speed)
        config = SimConfig(prefill_engine_speed=prefill_speed, decode_engine_speed=decode_speed)
        try:
            load = load_with_requests(state, name, trace, rate_scale, diurnal_hours, seed, config)
            profile = load.profile
            try:
                profile = after_warm_up(profile, warm_up_hours)
            except EvaluationError as exc:
                usage_error(str(exc))
            for note in (*profile.notes, config.engines_note):
                if note is not None:
                    err_console.print(f"note: {note}", soft_wrap=True, markup=False)
            if export_path is not None:
                if load.workload is None:
                    err_console.print(
                        f"[red]error[/red] --export-workload: {escape(str(load.fluid_reason))}; "
                        "there is no per-request workload to export (nothing simulated)",
                        soft_wrap=True,
                    )
                    raise typer.Exit(1)
                with writing(export_path, "--export-workload"):
                    load.workload.to_csv(export_path)
                console.print(
                    f"wrote {export_path} ({load.workload.requests:,} requests)",
                    markup=False,
                    soft_wrap=True,
                )
            with progress_bars("{task.percentage:>5.1f}%") as progress:
                labels = policy_labels(chosen)  # evaluate reports under these names
                tasks = {labels[p]: progress.add_task(labels[p], total=1.0) for p in chosen}

                def report(policy: str, fraction: float) -> None:
                    progress.update(tasks[policy], completed=fraction)

                result = evaluate(
                    state,
                    name,
                    profile,
                    chosen,
                    seed,
                    interval_s=interval_s,
                    config=config,
                    placer=default_placer(placer),
                    progress=report,
                    hpa_target=hpa_target_value,
                    oracle_window_s=oracle_window_s,
                    oracle_goal=oracle_goal,
                )
                for task in tasks.values():
                    progress.update(task, completed=1.0)
        except (TraceError, PermanentError, OSError) as exc:
            err_console.print(f"[red]error[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from None
        print_table(console, render_table(result))
        failed = {n: r.failed for n, r in result.policies.items() if r.failed is not None}
        for policy_name, r in result.policies.items():
            if r.description:
                console.print(f"  {policy_name}: {r.description}", soft_wrap=True, markup=False)
            if r.failed is not None:
                console.print(
                    f"  {policy_name}: [red]FAILED[/red]: {escape(r.failed)}", soft_wrap=True
                )
            for note in r.notes:
                console.print(f"  {policy_name}: note: {note}", soft_wrap=True, markup=False)
        if json_path is not None:
            document: dict[str, Any] = result.to_json()
            document["command"] = {
                "trace": str(trace) if trace else None,
                "service": name,
                "rate_scale": rate_scale,
                "diurnal_hours": diurnal_hours,
                "seed": seed,
                "policies": chosen,
                "interval_s": interval_s,
                "placer": placer,
                "hpa_target": hpa_target_value if hpa_target_value is not None else "auto",
                "oracle_window_s": oracle_window_s,
                "oracle_goal": oracle_goal,
                "warm_up_hours": warm_up_hours,
                "export_workload": str(export_path) if export_path else None,
                "engine_speed": {"prefill": prefill_speed, "decode": decode_speed},
            }
            with writing(json_path, "--json"):
                replace_text(json_path, json.dumps(document, indent=2) + "\n")
            console.print(f"wrote {json_path}", markup=False, soft_wrap=True)
        if plot_path is not None and len(failed) < len(result.policies):
            write_plot(result, plot_path)
            console.print(f"wrote {plot_path}", markup=False, soft_wrap=True)
        if failed:
            for error in failed.values():
                err_console.print(f"[red]error[/red] {escape(error)}", soft_wrap=True)
            err_console.print(
                f"{len(failed)} of {len(result.policies)} policies failed: {', '.join(failed)}",
                markup=False,
            )
            raise typer.Exit(1)

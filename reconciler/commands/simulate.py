"""``heteroscale simulate``: run autoscaling policies side by side on one trace in the
simulated fleet, and print / write every figure (table, JSON, PNG).

The heavy lifting is ``reconciler.sim.evaluate.evaluate`` (pure); this module only reads
inputs, shows progress and renders results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from reconciler.commands._options import PlacerOpt, checked_placer, checked_repository
from reconciler.cost import money
from reconciler.errors import ConfigError, PermanentError

if TYPE_CHECKING:
    from rich.table import Table

    from reconciler.sim.evaluate import EvaluationResult

console = Console(highlight=False, emoji=False)  # user text: no :emoji: codes
if not console.is_terminal:
    console = Console(
        highlight=False, emoji=False, width=260
    )  # logs and CI: one table row per line
err_console = Console(stderr=True, highlight=False, emoji=False)


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:,.0f}"


def _cost(amount: float | None, digits: int = 2) -> str:
    """Money as the table shows it: "-" when unknown (a GPU type without a price)."""
    return "-" if amount is None else money(amount, digits)


def _ratio_range(low: float | None, high: float | None) -> str:
    """Prefill/decode instance ratio range, as decimals (0.33 = 1:3)."""
    if low is None or high is None:
        return "-"
    return f"{low:.2f}-{high:.2f}"


def render_table(result: EvaluationResult) -> Table:
    from rich.table import Table

    slo = result.slo
    q = round(float(slo["quantile"]) * 100)
    table = Table(
        title=(
            f"{escape(result.service)}: {escape(result.workload)}, {result.horizon_s / 3600:.1f} h, "
            f"{result.requests:,.0f} requests; "
            f"SLO TTFT {slo['ttft_ms']:g} ms, TBT {slo['tbt_ms']:g} ms at p{q}"
        ),
        title_justify="left",
    )
    for column, justify in (
        ("policy", "left"),
        ("GPU-hours", "right"),
        (f"cost {result.currency}", "right"),
        (f"{result.currency}/Mtok", "right"),
        ("x oracle-min", "right"),
        ("vs static", "right"),
        ("util P / D", "right"),
        ("SM P / D", "right"),
        ("TTFT ok", "right"),
        ("TBT ok", "right"),
        ("both ok", "right"),
        ("unattainable", "right"),
        (f"TTFT p{q} ms", "right"),
        (f"TBT p{q} ms", "right"),
        ("actions", "right"),
        ("P/D", "right"),
        ("dropped", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    static = result.policies.get("static-peak")
    if static is not None and static.failed is not None:
        static = None
    for name, r in result.policies.items():
        if r.failed is not None:  # no figure of a failed run means anything
            table.add_row(escape(name), "[red]failed[/red]", *["-"] * (len(table.columns) - 2))
            continue
        saving = "-"
        if static is not None and static.gpu_hours > 0 and name != "static-peak":
            saving = f"{(r.gpu_hours / static.gpu_hours - 1) * 100:+.1f}%"
        table.add_row(
            escape(name),
            f"{r.gpu_hours:,.1f}",
            _cost(r.cost_usd),
            _cost(r.usd_per_mtok, 3),
            "-" if r.oracle_min_multiple is None else f"{r.oracle_min_multiple:.2f}",
            saving,
            f"{_pct(r.mean_gpu_util_prefill)} / {_pct(r.mean_gpu_util_decode)}",
            f"{_pct(r.mean_sm_active_prefill)} / {_pct(r.mean_sm_active_decode)}",
            _pct(r.ttft_attainment),
            _pct(r.tbt_attainment),
            _pct(r.slo_attainment),
            _pct(r.unattainable_share),
            _ms(r.ttft_quantile_ms),
            _ms(r.tbt_token_quantile_ms),
            str(r.scaling_actions),
            _ratio_range(r.pd_ratio_min, r.pd_ratio_max),
            f"{r.dropped:,.0f}",
        )
    return table


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
        tps_ax.plot(
            hours,
            np.asarray(tl["prefill_tps"]) / 1000.0,
            color="tab:blue",
            lw=0.8,
            label="prefill ktok/s",
        )
        tps_ax.plot(
            hours,
            np.asarray(tl["decode_tps"]) / 1000.0,
            color="tab:orange",
            lw=0.8,
            label="decode ktok/s",
        )
        tps_ax.set_ylabel("k tokens/s")
        if row == 0:
            load_ax.set_title("load")
            tps_ax.legend(loc="upper right", fontsize=7)
        inst_ax = axes[row][1]
        inst_ax.step(
            hours, tl["prefill_instances"], where="post", color="tab:blue", label="prefill"
        )
        inst_ax.step(
            hours, tl["decode_instances"], where="post", color="tab:orange", label="decode"
        )
        inst_ax.set_ylabel("instances")
        inst_ax.text(
            0.01,
            0.95,
            f"{r.gpu_hours:,.0f} GPU-h, {r.scaling_actions} actions",
            transform=inst_ax.transAxes,
            va="top",
            fontsize=8,
        )
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
        lat_ax.text(
            0.01,
            0.95,
            f"TTFT ok {_pct(r.ttft_attainment)}, TBT ok {_pct(r.tbt_attainment)}",
            transform=lat_ax.transAxes,
            va="top",
            fontsize=8,
        )
        if row == 0:
            lat_ax.set_title("latency vs SLO (dashed)")
            lat_ax.legend(loc="upper right", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("hours")
    fig.suptitle(f"{result.service}: {result.workload}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _hpa_target(text: str) -> float | None:
    """``--hpa-target``: None for ``auto`` (sweep), else a utilisation in (0, 1]."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:  # NaN fails too
        err_console.print(f"error: --hpa-target must be 'auto' or a number in (0, 1], got '{text}'")
        raise typer.Exit(2)
    return value


def register(app: typer.Typer) -> None:
    # Option defaults; the rest of the simulator is imported when the command runs.
    from reconciler.sim.evaluate import DEFAULT_POLICIES
    from reconciler.sim.oracle import DEFAULT_WINDOW_S

    @app.command()
    def simulate(
        trace: Annotated[
            Path | None,
            typer.Option(
                "--trace",
                help="request trace (Azure CSV, Mooncake JSONL[.gz], BurstGPT or plain CSV); "
                "omitted: a synthetic diurnal day for the service, sized to the fleet",
            ),
        ] = None,
        service: Annotated[
            str | None,
            typer.Option(
                "--service", help="service in policies/ the trace drives (default: the first)"
            ),
        ] = None,
        rate_scale: Annotated[
            float | None,
            typer.Option("--rate-scale", help="multiply the arrival rate by K", min=0.0),
        ] = None,
        diurnal_hours: Annotated[
            float | None,
            typer.Option(
                "--diurnal-hours", help="tile the trace over H hours under a diurnal curve", min=0.0
            ),
        ] = None,
        seed: Annotated[
            int, typer.Option("--seed", help="seed for scaling, jitter and sampling")
        ] = 0,
        policies: Annotated[
            str,
            typer.Option(
                "--policies",
                help="comma-separated: heteroscale, heteroscale-paper, hpa-gpu-util, hpa-decode-tps, "
                "static-peak, oracle-min, schedule:PATH, python:MODULE:CLASS",
            ),
        ] = ",".join(DEFAULT_POLICIES),
        json_path: Annotated[
            Path | None, typer.Option("--json", help="write every figure as JSON here")
        ] = None,
        plot_path: Annotated[
            Path | None, typer.Option("--plot", help="write a PNG (one row per policy) here")
        ] = None,
        repo: Annotated[
            Path, typer.Option("--repo", help="repository root holding policies/ and clusters/")
        ] = Path("."),
        interval_s: Annotated[
            float, typer.Option("--interval", help="seconds between autoscaler decisions", min=1.0)
        ] = 30.0,
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
        oracle_window_s: Annotated[
            int,
            typer.Option(
                "--oracle-window",
                help="oracle-min's window in seconds: per window, the fewest instances meeting "
                "the SLO goal",
                min=1,
            ),
        ] = DEFAULT_WINDOW_S,
    ) -> None:
        """Run autoscaling policies side by side on one trace in the simulated fleet."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from reconciler.desired.loader import load_desired_state
        from reconciler.sim.engine import SimConfig
        from reconciler.sim.evaluate import default_placer, evaluate, policy_labels
        from reconciler.sim.load import load_with_requests
        from reconciler.sim.workload import TraceError

        checked_repository(repo)
        try:
            state = load_desired_state(repo)
        except ConfigError as exc:
            for issue in exc.issues:
                err_console.print(f"[red]error[/red] {escape(str(issue))}", soft_wrap=True)
            raise typer.Exit(1) from None
        if not state.policies:
            err_console.print(f"error: {repo}: no services in policies/", markup=False)
            raise typer.Exit(1)
        name = service or sorted(state.policies)[0]
        if name not in state.policies:
            err_console.print(
                f"error: unknown service '{name}' (known: {', '.join(sorted(state.policies))})",
                markup=False,
            )
            raise typer.Exit(2)
        checked_placer(placer)
        hpa_target_value = _hpa_target(hpa_target)
        chosen = [p.strip() for p in policies.split(",") if p.strip()]
        if not chosen:
            err_console.print("error: --policies is empty")
            raise typer.Exit(2)
        config = SimConfig()
        try:
            load = load_with_requests(state, name, trace, rate_scale, diurnal_hours, seed, config)
            profile = load.profile
            for note in profile.notes:
                err_console.print(f"note: {note}", soft_wrap=True, markup=False)
            if export_path is not None:
                if load.workload is None:
                    err_console.print(
                        f"[red]error[/red] --export-workload: {escape(str(load.fluid_reason))}; "
                        "there is no per-request workload to export (nothing simulated)",
                        soft_wrap=True,
                    )
                    raise typer.Exit(1)
                export_path.parent.mkdir(parents=True, exist_ok=True)
                load.workload.to_csv(export_path)
                console.print(
                    f"wrote {export_path} ({load.workload.requests:,} requests)", markup=False
                )
            with Progress(
                TextColumn("{task.description:<16}"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TimeElapsedColumn(),
                console=err_console,
                transient=False,
            ) as progress:
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
                )
                for task in tasks.values():
                    progress.update(task, completed=1.0)
        except (TraceError, PermanentError, OSError) as exc:
            err_console.print(f"[red]error[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from None
        console.print(render_table(result))
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
                "export_workload": str(export_path) if export_path else None,
            }
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(document, indent=2) + "\n")
            console.print(f"wrote {json_path}", markup=False)
        if plot_path is not None and len(failed) < len(result.policies):
            write_plot(result, plot_path)
            console.print(f"wrote {plot_path}", markup=False)
        if failed:
            for error in failed.values():
                err_console.print(f"[red]error[/red] {escape(error)}", soft_wrap=True)
            err_console.print(
                f"{len(failed)} of {len(result.policies)} policies failed: {', '.join(failed)}",
                markup=False,
            )
            raise typer.Exit(1)

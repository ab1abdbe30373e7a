"""Placement at 20,000-GPU scale: CP-SAT against the paper's greedy scheduler.

Per seed (deterministic from it):
1. the fleet of benchmarks/fleetgen.py: 2,500 nodes x 8 GPUs under 8 S2, 40 S1 and
   ~313 S0 switches, 100 services (70% heterogeneous P/D, mixed shapes, affinities and
   priorities);
2. initial targets filling about --fill of the fleet, placed from scratch by CP-SAT
   (setup, not timed: generous time limit) -> the running state;
3. four scenarios, each placed by CP-SAT (timed; default options: 2 s limit,
   deterministic single-thread search; and with 2 parallel threads) and by the greedy
   scheduler, both layouts measured:
   - "~10% change": every service's targets up or down by about --change;
   - "prefill only": every service's prefill target grows by --prefill-growth, decode
     unchanged (TTFT feedback, the fleet half full: anchored groups where a group's
     domain is full);
   - "empty fleet": the initial targets on an empty fleet (the first cycle);
   - "short": every service grows by --short-growth, so capacity runs out and the
     placers must choose whom to serve.

Prints per run: topology build time, full placement time per placer (wall and process
CPU time; "cold" = first call on a new ClusterSpec, which builds the topology), CP-SAT
status, objective, bound and gap, the time per phase, and the quality measures of
reconciler.placement.quality side by side (the terms of "worse than greedy" first).
The CPU time is the figure to trust on a shared machine. Ends with a summary per
scenario over the seeds, the CP-SAT runs over 2 s of CPU, and the line

    cp-sat worse than greedy: K of M runs

(``reconciler.placement.quality.worse_than``, the deterministic CP-SAT run against the
greedy one, every scenario and seed).

    python benchmarks/bench_placement.py [--seed 0 | --seeds N] [--fill 0.5] [--workers 2]

With ``--gpus N[,N...]`` (the shared option of benchmarks/bench_validate.py), the run
is a curve instead: per size, a fleetgen fleet of N GPUs (100 services) filled to about
--fill by the initial targets (placed by CP-SAT, not timed), then the "~10% change"
scenario only (all four with --all-scenarios), both placers, the same table and summary
lines, and at the end one line per run (CPU and wall time per placer, CP-SAT status, the worse-than-greedy terms,
how many runs were worse):

    python benchmarks/bench_placement.py --gpus 10000,20000,40000,80000,160000 [--seeds 2]
        [--all-scenarios]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_validate import add_gpus_option
from benchmarks.fleetgen import GPUS_PER_NODE, large_desired_state
from reconciler.desired.models import ServicePolicy
from reconciler.placement.base import PlacementOptions, PlacementRequest, PlacementResult
from reconciler.placement.cpsat import CpSatPlacer
from reconciler.placement.greedy import GreedyPlacer
from reconciler.placement.quality import (
    PlacementQuality,
    first_worse_term,
    measure,
    objective_terms,
)
from reconciler.state import FleetState, Targets
from reconciler.topology import build_topology


def initial_targets(
    policies: dict[str, ServicePolicy], total_gpus: int, fill: float, seed: int
) -> dict[str, Targets]:
    """Targets that use about ``fill`` of the fleet, split unevenly over services and
    following each service's P/D ratio target."""
    rng = random.Random(seed)
    weights = {name: rng.uniform(0.4, 1.6) for name in sorted(policies)}
    scale = fill * total_gpus / sum(weights.values())
    out = {}
    for name, policy in sorted(policies.items()):
        ratio = policy.pd_ratio.target  # prefill / decode
        gpus = weights[name] * scale
        per_pair = policy.prefill.gpus_per_instance * ratio + policy.decode.gpus_per_instance
        decode = max(1, round(gpus / per_pair))
        prefill = max(1, round(decode * ratio))
        out[name] = Targets(
            name,
            min(prefill, policy.prefill.max_instances),
            min(decode, policy.decode.max_instances),
        )
    return out


def changed_targets(targets: dict[str, Targets], change: float, seed: int) -> dict[str, Targets]:
    """Every service up or down by about ``change`` (at least one instance per role)."""
    rng = random.Random(seed + 1)
    out = {}
    for name, t in sorted(targets.items()):
        sign = rng.choice([-1, 1])
        factor = 1 + sign * change * rng.uniform(0.5, 1.5)

        def move(n: int, factor: float = factor, sign: int = sign) -> int:
            moved = round(n * factor)
            if moved == n:
                moved = n + sign
            return max(1, moved)

        out[name] = Targets(name, move(t.prefill), move(t.decode))
    return out


def grown_targets(
    targets: dict[str, Targets], growth: float, roles: tuple[str, ...] = ("prefill", "decode")
) -> dict[str, Targets]:
    def grown(n: int, role: str) -> int:
        return max(n + 1, round(n * (1 + growth))) if role in roles else n

    return {
        n: Targets(n, grown(t.prefill, "prefill"), grown(t.decode, "decode"))
        for n, t in targets.items()
    }


def describe(result: PlacementResult) -> str:
    s = result.stats
    assert s is not None
    gap = f"{s.gap:.4%}" if s.gap is not None else "n/a"
    objective = f"{s.objective:,.0f}" if s.objective is not None else "n/a"
    bound = f"{s.best_bound:,.0f}" if s.best_bound is not None else "n/a"
    phases = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in s.phases_s)
    # One note per anchored group: summarised (the table counts them).
    shown = [n for n in s.notes if not n.startswith("anchored group")]
    if len(shown) < len(s.notes):
        shown.append(f"{len(s.notes) - len(shown)} anchored group(s)")
    notes = f"; notes: {' | '.join(shown)}" if shown else ""
    layout = " (greedy layout kept)" if s.kept_greedy else ""
    return (
        f"{s.wall_s:.3f} s, status {s.status}{layout}, objective {objective}, bound {bound}, "
        f"gap {gap} [{phases}]{notes}"
    )


def table(rows: dict[str, PlacementQuality]) -> None:
    names = list(rows)
    print(f"  {'measure':<72}" + "".join(f"{n:>12}" for n in names))

    def line(label: str, values: list[str]) -> None:
        print(f"  {label:<72}" + "".join(f"{v:>12}" for v in values))

    q = list(rows.values())
    print("  worse-than-greedy terms, in order (lower is better):")
    for i, (name, _value) in enumerate(objective_terms(q[0])):
        line(f"  {i + 1}. {name}", [f"{objective_terms(x)[i][1]:,.0f}" for x in q])
    line("groups in one RDMA subgroup (all groups)", [f"{x.share_in_one_subgroup:.1%}" for x in q])
    line(
        "groups in one RDMA subgroup (groups changed this cycle)",
        [f"{x.changed_share_in_one_subgroup:.1%}" for x in q],
    )
    line("  changed groups (count)", [str(x.changed_groups) for x in q])
    line(
        "scarce-subgroup GPUs added for services not needing them",
        [str(x.scarce_gpus_unneeded_added) for x in q],
    )
    line(
        "scarce-subgroup GPUs held by groups not needing them (all)",
        [str(x.scarce_gpus_unneeded) for x in q],
    )
    line("whole nodes left free", [str(x.whole_nodes_free) for x in q])
    line("unmet demand, GPUs", [str(x.unmet_gpus) for x in q])
    line("unmet demand, GPUs x (priority+1)", [f"{x.unmet_weighted:,}" for x in q])
    line("GPUs added this cycle", [str(x.gpus_added) for x in q])
    line(
        "  of them on the role's preferred GPU type", [f"{x.preferred_share_added:.1%}" for x in q]
    )
    line("anchored groups (a role growing alone)", [str(x.anchored_groups) for x in q])
    line("  GPUs beyond target held by their anchors", [str(x.overshoot_gpus) for x in q])


@dataclass
class Run:
    """One scenario of one seed: the measures and CPU times to summarise."""

    seed: int
    scenario: str
    cp_sat: PlacementQuality
    greedy: PlacementQuality
    cp_sat_cpu_s: float
    greedy_cpu_s: float
    kept_greedy: bool
    worse_on: str | None
    gpus: int = 0
    cp_sat_wall_s: float = 0.0
    greedy_wall_s: float = 0.0
    status: str = ""
    gap: float | None = None
    same_on_rerun: bool = True


def scenarios(
    args: argparse.Namespace, running: FleetState, targets0: dict[str, Targets]
) -> dict[str, tuple[FleetState, dict[str, Targets]]]:
    change = {
        f"~{args.change:.0%} change": (running, changed_targets(targets0, args.change, args.seed))
    }
    if args.change_only:
        return change
    return {
        **change,
        # Prefill alone grows (TTFT feedback) with the fleet half full: where a group's
        # domain is full, an anchored group (one decode beyond target) opens elsewhere.
        f"prefill only (+{args.prefill_growth:.0%})": (
            running,
            grown_targets(targets0, args.prefill_growth, roles=("prefill",)),
        ),
        "initial placement (empty fleet)": (FleetState("large"), targets0),
        f"short (+{args.short_growth:.0%})": (running, grown_targets(targets0, args.short_growth)),
    }


def run_seed(args: argparse.Namespace) -> list[Run]:
    state = large_desired_state(nodes=args.nodes, services=100, seed=args.seed)
    spec = state.clusters["large"]
    policies = {p.name: p for p in state.policies_for("large")}
    total_gpus = sum(n.gpus for n in spec.nodes)
    s0 = len({n.s0 for n in spec.nodes})
    s1 = len({n.s1 for n in spec.nodes})
    s2 = len({n.s2 for n in spec.nodes})
    print(
        f"\n=== seed {args.seed}: fleet {len(spec.nodes)} nodes, {total_gpus} GPUs, "
        f"{s0} S0 / {s1} S1 / {s2} S2 switches, {len(policies)} services"
    )

    start = time.perf_counter()
    build_topology(spec)
    aggregated_s = time.perf_counter() - start
    start = time.perf_counter()
    slotted = build_topology(spec, gpu_slots=True)
    slots_s = time.perf_counter() - start
    print(
        f"topology graph: {aggregated_s * 1000:.0f} ms with GPU slots as node attributes; "
        f"{slots_s * 1000:.0f} ms with one vertex per GPU ({slotted.graph.number_of_nodes()} vertices)"
    )

    # Setup: place the initial targets from scratch (not timed).
    targets0 = initial_targets(policies, total_gpus, args.fill, args.seed)
    # Deterministic (single-thread, deterministic-time budget): the same state every run.
    setup_options = PlacementOptions(time_limit_s=20.0, seed=args.seed)
    start = time.perf_counter()
    placed0 = CpSatPlacer().place(
        PlacementRequest(spec, policies, FleetState("large"), targets0, setup_options)
    )
    running = FleetState("large", groups=placed0.groups)
    used0 = sum(
        g.prefill.instances * policies[g.service].prefill.gpus_per_instance
        + g.decode.instances * policies[g.service].decode.gpus_per_instance
        for g in placed0.groups
    )
    print(
        f"setup: initial state placed in {time.perf_counter() - start:.1f} s: {len(placed0.groups)} groups, "
        f"{used0} GPUs in use ({used0 / total_gpus:.0%}), {len(placed0.shortfalls)} shortfalls"
    )

    options = PlacementOptions(time_limit_s=args.time_limit, workers=args.workers, seed=args.seed)
    parallel = PlacementOptions(
        time_limit_s=args.time_limit, workers=args.workers, seed=args.seed, deterministic=False
    )
    runs: list[Run] = []
    for label, (fleet, targets) in scenarios(args, running, targets0).items():
        grow = shrink = 0
        for name, t in targets.items():
            now = fleet.service_fleet(name)
            grow += max(0, t.prefill - now.prefill.active) + max(0, t.decode - now.decode.active)
            shrink += max(0, now.prefill.active - t.prefill) + max(0, now.decode.active - t.decode)
        print(
            f"\nscenario {label} (seed {args.seed}): +{grow} / -{shrink} instances against the running state"
        )
        request = PlacementRequest(spec, policies, fleet, targets, options)
        placements: list[tuple[str, PlacementRequest]] = []
        if label.startswith("~"):
            # Cold: a new ClusterSpec object (as after a Git revision) rebuilds the topology.
            placements.append(
                (
                    "cp-sat cold",
                    PlacementRequest(spec.model_copy(), policies, fleet, targets, options),
                )
            )
        placements += [
            ("cp-sat", request),
            ("cp-sat 2 threads", PlacementRequest(spec, policies, fleet, targets, parallel)),
            ("greedy", request),
        ]
        results: dict[str, PlacementResult] = {}
        cpu_s: dict[str, float] = {}
        wall_s: dict[str, float] = {}
        for name, req in placements:
            placer = GreedyPlacer() if name == "greedy" else CpSatPlacer()
            cpu = time.process_time()
            wall = time.perf_counter()
            result = placer.place(req)
            wall = time.perf_counter() - wall
            cpu = time.process_time() - cpu
            print(f"  {name:<17} {describe(result)}; CPU {cpu:.3f} s")
            if name in ("cp-sat", "greedy"):
                results[name] = result
                cpu_s[name] = cpu
                wall_s[name] = wall
        again = CpSatPlacer().place(request)
        same = again.groups == results["cp-sat"].groups
        print(f"  cp-sat rerun gives the same layout: {same}")
        measured = {name: measure(spec, policies, fleet, r, targets) for name, r in results.items()}
        table(measured)
        worse_on = first_worse_term(measured["cp-sat"], measured["greedy"])
        cp_stats = results["cp-sat"].stats
        assert cp_stats is not None
        runs.append(
            Run(
                seed=args.seed,
                scenario=label,
                cp_sat=measured["cp-sat"],
                greedy=measured["greedy"],
                cp_sat_cpu_s=cpu_s["cp-sat"],
                greedy_cpu_s=cpu_s["greedy"],
                kept_greedy=cp_stats.kept_greedy,
                worse_on=worse_on,
                gpus=total_gpus,
                cp_sat_wall_s=wall_s["cp-sat"],
                greedy_wall_s=wall_s["greedy"],
                status=cp_stats.status,
                gap=cp_stats.gap,
                same_on_rerun=same,
            )
        )
        print(
            f"  cp-sat {'worse than greedy on ' + worse_on if worse_on else 'not worse than greedy'}"
            f"; CPU cp-sat {cpu_s['cp-sat']:.3f} s, greedy {cpu_s['greedy']:.3f} s"
        )
    return runs


def summary(runs: list[Run], cpu_limit_s: float) -> None:
    """Per scenario over the seeds: the mean of every worse-than-greedy term, CPU
    times, how often the greedy layout was kept; then the runs over the CPU limit and
    the verdict line."""
    seeds = sorted({r.seed for r in runs})
    print(
        f"\n=== summary over seed(s) {', '.join(map(str, seeds))} (mean per run, cp-sat vs greedy)"
    )
    for label in dict.fromkeys(r.scenario for r in runs):
        mine = [r for r in runs if r.scenario == label]
        print(f"\n{label}: {len(mine)} run(s)")
        terms = [objective_terms(r.cp_sat) for r in mine]
        baseline = [objective_terms(r.greedy) for r in mine]
        for i, (name, _value) in enumerate(terms[0]):
            cp = sum(t[i][1] for t in terms) / len(mine)
            gr = sum(t[i][1] for t in baseline) / len(mine)
            print(f"  {name:<66} {cp:>12,.1f} {gr:>12,.1f}")
        share = [sum(r.cp_sat.share_in_one_subgroup for r in mine) / len(mine)]
        share.append(sum(r.greedy.share_in_one_subgroup for r in mine) / len(mine))
        print(f"  {'groups in one RDMA subgroup':<66} {share[0]:>12.1%} {share[1]:>12.1%}")
        scarce = [sum(r.cp_sat.scarce_gpus_unneeded for r in mine) / len(mine)]
        scarce.append(sum(r.greedy.scarce_gpus_unneeded for r in mine) / len(mine))
        label_scarce = "scarce-subgroup GPUs held by groups not needing them"
        print(f"  {label_scarce:<66} {scarce[0]:>12,.1f} {scarce[1]:>12,.1f}")
        cpu = [r.cp_sat_cpu_s for r in mine]
        cpu_greedy = [r.greedy_cpu_s for r in mine]
        print(
            f"  CPU s: cp-sat mean {sum(cpu) / len(cpu):.3f} max {max(cpu):.3f}; "
            f"greedy mean {sum(cpu_greedy) / len(cpu_greedy):.3f} max {max(cpu_greedy):.3f}; "
            f"greedy layout kept by cp-sat in {sum(r.kept_greedy for r in mine)} run(s)"
        )
    over = [r for r in runs if r.cp_sat_cpu_s >= cpu_limit_s]
    listed = ", ".join(f"{r.scenario} seed {r.seed} ({r.cp_sat_cpu_s:.2f} s)" for r in over)
    print(
        f"\ncp-sat runs at or over {cpu_limit_s:g} s CPU: {len(over)} of {len(runs)}"
        + (f": {listed}" if over else "")
    )
    worse = sum(r.worse_on is not None for r in runs)
    print(f"cp-sat worse than greedy: {worse} of {len(runs)} runs")


SHORT_TERMS = ("unmet", "anchor", "span", "scarce steps", "overflow", "pref cost", "-whole")


def curve(runs: list[Run], cpu_limit_s: float) -> None:
    """One line per run of the --gpus sizes: times, status and the worse-than-greedy
    terms of both placers (cp-sat / greedy), then per size the worse count."""
    print("\n=== curve (terms cp-sat / greedy, lower is better)")
    print("  terms, in order: " + ", ".join(f"{i + 1}. {t}" for i, t in enumerate(SHORT_TERMS)))
    print(
        f"  {'GPUs':>8} {'seed':>4} {'scenario':<14} {'cp-sat CPU':>10} {'wall':>7} "
        f"{'greedy CPU':>10} {'wall':>7} {'status':<16} {'kept':>4} {'rerun':>5}  "
        "terms 1-7 (cp-sat/greedy)"
    )
    for r in runs:
        terms = " ".join(
            f"{a:,.0f}/{b:,.0f}"
            for (_n, a), (_m, b) in zip(
                objective_terms(r.cp_sat), objective_terms(r.greedy), strict=True
            )
        )
        print(
            f"  {r.gpus:>8,} {r.seed:>4} {r.scenario[:14]:<14} {r.cp_sat_cpu_s:>8.3f} s "
            f"{r.cp_sat_wall_s:>5.2f} s {r.greedy_cpu_s:>8.3f} s {r.greedy_wall_s:>5.2f} s "
            f"{r.status:<16} {'yes' if r.kept_greedy else 'no':>4} "
            f"{'same' if r.same_on_rerun else 'DIFF':>5}  {terms}"
            + (f"  WORSE on {r.worse_on}" if r.worse_on else "")
        )
    for gpus in dict.fromkeys(r.gpus for r in runs):
        mine = [r for r in runs if r.gpus == gpus]
        worse = sum(r.worse_on is not None for r in mine)
        cpu = max(r.cp_sat_cpu_s for r in mine)
        over = " (at or over the limit)" if cpu >= cpu_limit_s else ""
        print(
            f"  {gpus:>8,} GPUs: cp-sat worse than greedy: {worse} of {len(mine)} runs; "
            f"cp-sat CPU max {cpu:.3f} s{over}, greedy CPU max "
            f"{max(r.greedy_cpu_s for r in mine):.3f} s; rerun differs in "
            f"{sum(not r.same_on_rerun for r in mine)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0, help="the one seed to run (without --seeds)")
    parser.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1")
    parser.add_argument("--fill", type=float, default=0.5)
    parser.add_argument("--change", type=float, default=0.10)
    parser.add_argument("--short-growth", type=float, default=0.5)
    parser.add_argument("--prefill-growth", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=2.0)
    add_gpus_option(parser, [])
    parser.add_argument(
        "--all-scenarios",
        action="store_true",
        help="with --gpus: all four scenarios per size, not only the ~10%% change",
    )
    args = parser.parse_args()
    seeds = list(range(args.seeds)) if args.seeds is not None else [args.seed]
    runs: list[Run] = []
    if not args.gpus:
        for seed in seeds:
            runs += run_seed(
                argparse.Namespace(
                    **{**vars(args), "seed": seed, "nodes": 2500, "change_only": False}
                )
            )
        summary(runs, cpu_limit_s=2.0)
        return
    for gpus in args.gpus:
        for seed in seeds:
            runs += run_seed(
                argparse.Namespace(
                    **{
                        **vars(args),
                        "seed": seed,
                        "nodes": gpus // GPUS_PER_NODE,
                        "change_only": not args.all_scenarios,
                    }
                )
            )
    summary(runs, cpu_limit_s=2.0)
    curve(runs, cpu_limit_s=2.0)


if __name__ == "__main__":
    main()

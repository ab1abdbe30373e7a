"""How long `heteroscale validate` takes, by fleet size, and what the command line
costs over the libraries it cannot do without.

For each size, generates a fleet of 100 services with benchmarks/fleetgen.py (nodes of
8 GPUs under 8 S2 and 40 S1 switches, ~8 nodes per S0) and times, median of --runs:
- the in-process load + validation (what the reconcile loop pays per revision), and
- the whole command (`heteroscale validate DIR`: interpreter start, imports, load).
Then, in the same run, the whole `heteroscale validate` on this repository's own
policies/ and clusters/ against `python -c "import pydantic, ruamel.yaml"`, run
alternately so both see the same machine load, and prints the ratio of the medians
(wall clock, and CPU time, which other work on the machine disturbs less).

Commands run as installed: with a bytecode cache (kept in a temporary directory, so
the work tree stays clean) even where PYTHONDONTWRITEBYTECODE is set, which would
otherwise recompile every module of the package on every run. The ratio without a
cache is printed too.

Targets: validation linear in the fleet (indexed once per cluster, never per
service), the whole command under 2 s at 160,000 GPUs on the 2-core reference
machine, and the ratio at most 3.5.

    python benchmarks/bench_validate.py [--gpus 20000,80000,160000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fleetgen import GPUS_PER_NODE, write_large_fleet
from reconciler.desired import load_desired_state

REPO_ROOT = Path(__file__).resolve().parent.parent
WHOLE_COMMAND_TARGET_S = 2.0
WHOLE_COMMAND_TARGET_GPUS = 160_000
RATIO_TARGET = 3.5
IMPORT_ONLY = [sys.executable, "-c", "import pydantic, ruamel.yaml"]


def validate_command() -> list[str]:
    """The installed console script of this interpreter, as a user runs it; the
    module when the package is not installed."""
    script = Path(sys.executable).with_name("heteroscale")
    return [str(script)] if script.exists() else [sys.executable, "-m", "reconciler.cli"]


def cached_bytecode_env(cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache_dir)
    return env


def uncached_bytecode_env() -> dict[str, str]:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def gpu_counts(text: str) -> list[int]:
    counts = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    for gpus in counts:
        if gpus <= 0 or gpus % GPUS_PER_NODE:
            raise argparse.ArgumentTypeError(
                f"{gpus}: a positive multiple of {GPUS_PER_NODE} (GPUs per node)"
            )
    return counts


def add_gpus_option(parser: argparse.ArgumentParser, default: list[int]) -> None:
    """``--gpus`` (also ``--sizes``): the generated fleet sizes a benchmark runs."""
    parser.add_argument(
        "--gpus",
        "--sizes",
        dest="gpus",
        type=gpu_counts,
        default=default,
        help="generated fleet sizes in GPUs, comma-separated (default "
        + ",".join(str(g) for g in default)
        + ")",
    )


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float  # user + system of the child process


def run(command: Sequence[str], env: Mapping[str, str]) -> Timing:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    wall_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timing(wall_s, cpu_s)


def median(timings: Sequence[Timing]) -> Timing:
    return Timing(
        statistics.median(t.wall_s for t in timings), statistics.median(t.cpu_s for t in timings)
    )


def time_fleets(
    sizes_gpus: Sequence[int], runs: int, command: Sequence[str], env: Mapping[str, str]
) -> dict[int, tuple[float, Timing]]:
    """Per fleet size, the median in-process seconds and whole-command timing. Sizes
    take turns, so a burst of other work on the machine hits them all alike."""
    in_process: dict[int, list[float]] = {gpus: [] for gpus in sizes_gpus}
    whole: dict[int, list[Timing]] = {gpus: [] for gpus in sizes_gpus}
    with tempfile.TemporaryDirectory(prefix="heteroscale-bench-") as tmp:
        roots = {
            gpus: write_large_fleet(Path(tmp) / str(gpus), nodes=gpus // GPUS_PER_NODE)
            for gpus in sizes_gpus
        }
        for _ in range(runs):
            for gpus, root in roots.items():
                start = time.perf_counter()
                state = load_desired_state(root)
                in_process[gpus].append(time.perf_counter() - start)
                loaded = sum(n.gpus for c in state.clusters.values() for n in c.nodes)
                assert loaded == gpus, f"generated {loaded} GPUs, asked for {gpus}"
                whole[gpus].append(run([*command, "validate", str(root)], env))
    return {gpus: (statistics.median(in_process[gpus]), median(whole[gpus])) for gpus in roots}


def time_ratio(runs: int, command: Sequence[str], env: Mapping[str, str]) -> tuple[Timing, Timing]:
    """Median timings of `validate` on this repository and of the bare imports,
    measured alternately (after one warm-up of each)."""
    validate = [*command, "validate", str(REPO_ROOT)]
    run(validate, env)
    run(IMPORT_ONLY, env)
    validate_t, import_t = [], []
    for _ in range(runs):
        validate_t.append(run(validate, env))
        import_t.append(run(IMPORT_ONLY, env))
    return median(validate_t), median(import_t)


def print_ratio(label: str, validate: Timing, imports: Timing, runs: int) -> float:
    ratio = validate.wall_s / imports.wall_s
    print(
        f"{label}: `heteroscale validate` {validate.wall_s:.3f} s (CPU {validate.cpu_s:.3f} s), "
        f'`python -c "import pydantic, ruamel.yaml"` {imports.wall_s:.3f} s '
        f"(CPU {imports.cpu_s:.3f} s); medians of {runs}, alternated"
    )
    print(f"  ratio {ratio:.2f} wall clock, {validate.cpu_s / imports.cpu_s:.2f} CPU time")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_gpus_option(parser, [20_000, 80_000, 160_000])
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (median)")
    args = parser.parse_args()
    command = validate_command()
    shown = " ".join([Path(command[0]).name, *command[1:]])

    # Other work on the machine stretches wall-clock times; CPU times are printed too.
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory(prefix="heteroscale-pycache-") as cache:
        env = cached_bytecode_env(Path(cache))
        run([*command, "validate", str(REPO_ROOT)], env)  # fills the bytecode cache
        print(f"`{shown} validate DIR`, a generated fleet of 100 services, median of {args.runs}:")
        print(
            f"{'GPUs':>9} {'nodes':>7} {'in process':>11} {'whole command':>14} "
            f"{'(its CPU)':>10} {'in process per 1k GPUs':>23}"
        )
        whole_at_target: float | None = None
        for gpus, (in_process_s, whole) in time_fleets(args.gpus, args.runs, command, env).items():
            print(
                f"{gpus:>9,} {gpus // GPUS_PER_NODE:>7,} {in_process_s:>9.3f} s "
                f"{whole.wall_s:>12.3f} s {whole.cpu_s:>8.3f} s {in_process_s / gpus * 1e6:>18.2f} ms"
            )
            if gpus == WHOLE_COMMAND_TARGET_GPUS:
                whole_at_target = whole.wall_s
        if whole_at_target is not None:
            verdict = "met" if whole_at_target < WHOLE_COMMAND_TARGET_S else "NOT met"
            print(
                f"whole command at {WHOLE_COMMAND_TARGET_GPUS:,} GPUs under "
                f"{WHOLE_COMMAND_TARGET_S:g} s: {verdict}"
            )
        print()
        ratio = print_ratio(
            "this repository, bytecode cached", *time_ratio(args.runs, command, env), args.runs
        )
    print_ratio(
        "this repository, no bytecode cache",
        *time_ratio(args.runs, command, uncached_bytecode_env()),
        args.runs,
    )
    verdict = "met" if ratio <= RATIO_TARGET else "NOT met"
    print(f"ratio (bytecode cached, wall clock) {ratio:.2f}: target <= {RATIO_TARGET:g} {verdict}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

"""How long a full `heteroscale plan --base --head` review takes, what-if included, by
fleet size.

Each fleet sits in a temporary Git repository with two commits: the base desired state,
then one service changed (its hand-set decode target lowered by 10%, or, where it sizes
from the performance model and has none, its TBT SLO tightened by 10%):
- the example fleet of this repository (4 services, 2,048 GPUs; change on chat);
- per --gpus size, a fleet of benchmarks/fleetgen.py (100 services; change on svc-001).

Per fleet: wall clock, the CPU of this process (config diff and fleet diff), of which
the synthetic load profiles the simulated fleet is warmed on, and the CPU of child
processes (the what-if replay runs in a second process beside the fleet diff; Git).
Target: under 10 s wall at 20,000 GPUs on the 2-core reference machine.

    python benchmarks/bench_review.py [--gpus 20000,40000] [--skip-example]
        [--diurnal-hours 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reconciler.sim.default as sim_default
from benchmarks.bench_validate import add_gpus_option
from benchmarks.fleetgen import GPUS_PER_NODE, write_large_fleet
from reconciler.desired import load_desired_state
from reconciler.placement.cpsat import CpSatPlacer
from reconciler.review.command import plan_review
from reconciler.review.review import ReviewOptions

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_GPUS = 20_000
TARGET_WALL_S = 10.0


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com"}
    env |= {"GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)


def make_repo(root: Path, service: str) -> str:
    """Commit ``root`` as base, then change ``service`` (module docstring); returns
    what changed."""
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    state = load_desired_state(root)
    policy = state.policies[service]
    path = root / state.policy_files[service]
    target = policy.scaling.target_per_instance
    if target is not None:
        old, new = (
            f"  target_per_instance: {target:g}",
            f"  target_per_instance: {round(target * 0.9):d}",
        )
        change = "decode target lowered by 10%"
    else:
        old, new = f"  tbt_ms: {policy.slo.tbt_ms:g}", f"  tbt_ms: {policy.slo.tbt_ms * 0.9:g}"
        change = "TBT SLO tightened by 10%"
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))
    git(root, "commit", "-qam", f"{service}: {change}")
    return f"{service}: {change}"


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float  # this process: config diff, fleet diff, rendering
    load_cpu_s: float  # of which building synthetic load profiles
    children_cpu_s: float  # the what-if replay process and Git


@contextmanager
def load_profile_cpu() -> Iterator[list[float]]:
    """CPU seconds spent in ``synthetic_load_for`` in this process while inside."""
    spent_s = [0.0]
    original: Callable[..., Any] = sim_default.synthetic_load_for

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent_s[0] += time.process_time() - start

    sim_default.synthetic_load_for = timed
    try:
        yield spent_s
    finally:
        sim_default.synthetic_load_for = original


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(label: str, root: Path, options: ReviewOptions) -> Timing:
    children_start_s = children_cpu_s()
    cpu_start_s = time.process_time()
    start_s = time.perf_counter()
    with load_profile_cpu() as load_cpu_s:
        review, _text, _ = plan_review(
            root, "HEAD~1", "HEAD", fmt="markdown", placer=CpSatPlacer(), options=options
        )
    timing = Timing(
        wall_s=time.perf_counter() - start_s,
        cpu_s=time.process_time() - cpu_start_s,
        load_cpu_s=load_cpu_s[0],
        children_cpu_s=children_cpu_s() - children_start_s,
    )
    changed = [s.service for s in review.fleet.services if s.changed] if review.fleet else []
    print(
        f"{label}: {timing.wall_s:.1f} s wall; CPU {timing.cpu_s:.1f} s here "
        f"({timing.load_cpu_s:.1f} s building load profiles), {timing.children_cpu_s:.1f} s "
        f"in the replay process and Git; {len(review.config_changes)} config change(s), "
        f"{len(changed)} service(s) sized differently, {len(review.what_if)} replayed, "
        f"exit code {review.exit_code}",
        flush=True,
    )
    for item in review.what_if:
        print(f"  {item.service}: {item.verdict}", flush=True)
    return timing


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_gpus_option(parser, [TARGET_GPUS])
    parser.add_argument("--skip-example", action="store_true", help="only the generated fleets")
    parser.add_argument(
        "--skip-large", action="store_true", help="only the example fleet (same as --gpus '')"
    )
    parser.add_argument(
        "--diurnal-hours", type=float, default=8.0, help="length of the replayed synthetic day"
    )
    args = parser.parse_args()
    sizes_gpus: list[int] = [] if args.skip_large else args.gpus
    options = ReviewOptions(diurnal_hours=args.diurnal_hours)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    curve: dict[int, Timing] = {}
    with tempfile.TemporaryDirectory(prefix="heteroscale-bench-") as tmp:
        if not args.skip_example:
            example = Path(tmp) / "example"
            for sub in ("policies", "clusters", "templates"):
                shutil.copytree(REPO_ROOT / sub, example / sub)
            change = make_repo(example, "chat")
            run(f"example fleet (4 services, 2,048 GPUs; {change})", example, options)
        for gpus in sizes_gpus:
            root = write_large_fleet(Path(tmp) / str(gpus), nodes=gpus // GPUS_PER_NODE)
            change = make_repo(root, "svc-001")
            curve[gpus] = run(
                f"generated fleet (100 services, {gpus:,} GPUs; {change})", root, options
            )
    if curve:
        print(f"plan --base --head with a {args.diurnal_hours:g} h what-if, by fleet size:")
        print(
            f"{'GPUs':>9} {'wall':>8} {'CPU here':>9} {'(loads)':>8} {'CPU replay+Git':>15} "
            f"{'wall per 10k GPUs':>18}"
        )
        for gpus, t in curve.items():
            print(
                f"{gpus:>9,} {t.wall_s:>6.1f} s {t.cpu_s:>7.1f} s {t.load_cpu_s:>6.1f} s "
                f"{t.children_cpu_s:>13.1f} s {t.wall_s / gpus * 1e4:>16.1f} s"
            )
        if TARGET_GPUS in curve:
            verdict = "met" if curve[TARGET_GPUS].wall_s < TARGET_WALL_S else "NOT met"
            print(f"{TARGET_GPUS:,} GPUs under {TARGET_WALL_S:g} s wall: {verdict}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

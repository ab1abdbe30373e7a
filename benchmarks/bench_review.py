"""How long a full `heteroscale plan --base --head` review takes, what-if included.

Two fleets, each in a temporary Git repository with two commits (the base desired
state, then one service's decode target lowered by 10%):
- the example fleet of this repository (4 services, 2,048 GPUs);
- the 20,000-GPU benchmark fleet from benchmarks/fleetgen.py (100 services).
Target: under 30 s for the large one on the 2-core reference machine.

    python benchmarks/bench_review.py [--skip-large] [--diurnal-hours 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fleetgen import write_large_fleet
from reconciler.desired import load_desired_state
from reconciler.placement.cpsat import CpSatPlacer
from reconciler.review.command import plan_review
from reconciler.review.review import ReviewOptions

REPO_ROOT = Path(__file__).resolve().parent.parent


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com"}
    env |= {"GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)


def make_repo(root: Path, service: str) -> None:
    """Commit ``root`` as base, then lower ``service``'s decode target by 10%."""
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    state = load_desired_state(root)
    path = root / state.policy_files[service]
    current = state.policies[service].scaling.target_per_instance
    text = path.read_text()
    line = f"  target_per_instance: {current:g}"
    assert line in text, f"{line!r} not in {path}"
    path.write_text(text.replace(line, f"  target_per_instance: {round(current * 0.9):d}", 1))
    git(root, "commit", "-qam", f"{service}: lower the decode target by 10%")


def run(label: str, root: Path, options: ReviewOptions) -> None:
    start = time.perf_counter()
    cpu_start = time.process_time()
    review, _text, _ = plan_review(
        root, "HEAD~1", "HEAD", fmt="markdown", placer=CpSatPlacer(), options=options
    )
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    changed = [s.service for s in review.fleet.services if s.changed] if review.fleet else []
    print(
        f"{label}: plan --base --head with what-if: {wall:.1f} s wall, {cpu:.1f} s CPU in this process (the replay runs in a second one); "
        f"{len(review.config_changes)} config change(s), {len(changed)} service(s) sized differently, "
        f"{len(review.what_if)} replayed, exit code {review.exit_code}"
    )
    for item in review.what_if:
        print(f"  {item.service}: {item.verdict}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument(
        "--diurnal-hours", type=float, default=8.0, help="length of the replayed synthetic day"
    )
    args = parser.parse_args()
    options = ReviewOptions(diurnal_hours=args.diurnal_hours)
    with tempfile.TemporaryDirectory() as tmp:
        example = Path(tmp) / "example"
        for sub in ("policies", "clusters", "templates"):
            shutil.copytree(REPO_ROOT / sub, example / sub)
        make_repo(example, "chat")
        run("example fleet (4 services, 2,048 GPUs)", example, options)
        if not args.skip_large:
            large = write_large_fleet(Path(tmp) / "large")
            make_repo(large, "svc-001")
            run("benchmark fleet (100 services, 20,000 GPUs)", large, options)
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()

"""How long `heteroscale validate` takes on a 20,000-GPU fleet with 100 services.

Generates the fleet with benchmarks/fleetgen.py (2,500 nodes x 8 GPUs under 8 S2,
40 S1 and ~320 S0 switches), then times, over several runs:
- the in-process load + validation (what the reconcile loop pays per revision), and
- the whole CLI process (`heteroscale validate DIR`: interpreter start, imports, load).
Target: under 2 s on the 2-core reference machine.

    python benchmarks/bench_validate.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fleetgen import write_large_fleet
from reconciler.desired import load_desired_state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_large_fleet(Path(tmp))
        in_process = []
        for _ in range(args.runs):
            start = time.perf_counter()
            state = load_desired_state(root)
            in_process.append(time.perf_counter() - start)
        gpus = sum(n.gpus for c in state.clusters.values() for n in c.nodes)
        cli = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "reconciler.cli", "validate", str(root)],
                check=True,
                capture_output=True,
            )
            cli.append(time.perf_counter() - start)
    print(f"fleet: {len(state.policies)} services, {gpus} GPUs")
    print(
        f"load+validate in process: median {statistics.median(in_process):.3f} s, max {max(in_process):.3f} s"
    )
    print(
        f"heteroscale validate (whole process): median {statistics.median(cli):.3f} s, max {max(cli):.3f} s"
    )
    print(f"target < 2 s: {'met' if statistics.median(cli) < 2 else 'NOT met'}")


if __name__ == "__main__":
    main()

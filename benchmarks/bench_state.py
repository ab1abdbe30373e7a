"""How many services keep their planner memory in the durable state object.

The reconciler's state of one cluster is one ConfigMap, under ``durable.MAX_STATE_BYTES``
(``reconciler.durable``). Past that, the planner memories of the last services (name
order) are left out, and those planners start afresh after a restart. This prints what
one service costs in it, with the memory a real run leaves: the default planner
(``heteroscale``) over the evaluation matrix's azure-x50 day (the Azure conversation
trace x50, 8-hour diurnal day, seed 7, service ``chat``; ``--hours`` shortens it), its
history and memory at the end of the day encoded as ``heteroscale run`` stores them.

Figures: the state of one service in bytes (all of it, and without the planner memory),
the planner memory as plain JSON (state version 1) against as stored (version 2,
compressed), how many such services fit under the limit with their memories in the
state object alone (``--state-memory-shards 0``), and how many keep them with the
default memory shards (``durable.DEFAULT_MEMORY_SHARDS`` more objects, each under the
limit; services named svc-0000, svc-0001, ..., so placed by the hash of their names):
the most services that all keep theirs, and how many of ``durable.MAX_SERVICES`` do.
Both are measured by encoding that many services as ``heteroscale run`` stores them.

    python benchmarks/bench_state.py [--hours 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reconciler.desired import load_desired_state  # noqa: E402
from reconciler.durable import (  # noqa: E402
    DEFAULT_MEMORY_SHARDS,
    MAX_SERVICES,
    MAX_STATE_BYTES,
    DurableState,
    _encode_value,  # the memory as state version 1 stored it (plain JSON)
    encode,
    encode_state,
)
from reconciler.perfmodel.calibrate import shared_dir  # noqa: E402
from reconciler.policy import planner  # noqa: E402
from reconciler.policy.base import PolicyHistory  # noqa: E402
from reconciler.sim.engine import SimConfig  # noqa: E402
from reconciler.sim.evaluate import evaluate  # noqa: E402
from reconciler.sim.load import load_with_requests  # noqa: E402

TRACE = "AzureLLMInferenceTrace_conv.csv"
SERVICE = "chat"


def last_history(hours: float) -> tuple[PolicyHistory, float]:
    """The default planner's history at the end of the day, and when."""
    state = load_desired_state(REPO)
    config = SimConfig()
    shared = shared_dir()
    if shared is None:
        raise SystemExit("shared/ not found: set HETEROSCALE_SHARED (it holds traces/)")
    profile = load_with_requests(
        state, SERVICE, shared / "traces" / TRACE, 50.0, hours, 7, config
    ).profile
    seen: dict[str, Any] = {}
    decide = planner.PlannerAutoscaler.decide

    def recording(self: planner.PlannerAutoscaler, inputs: Any) -> Any:
        decision = decide(self, inputs)
        seen["history"], seen["at_s"] = decision.history, inputs.now_s
        return decision

    planner.PlannerAutoscaler.decide = recording  # type: ignore[method-assign]
    try:
        evaluate(state, SERVICE, profile, ("heteroscale",), seed=7, config=config)
    finally:
        planner.PlannerAutoscaler.decide = decide  # type: ignore[method-assign]
    return seen["history"], seen["at_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=8.0, help="length of the day")
    args = parser.parse_args()
    started = time.perf_counter()
    history, at_s = last_history(args.hours)

    def size(histories: dict[str, PolicyHistory]) -> int:
        return len(encode(DurableState("east", at_s, histories=histories))[0].encode())

    empty = size({})
    whole = size({SERVICE: history}) - empty
    windows = size({SERVICE: replace(history, planner=None)}) - empty
    plain = len(json.dumps(_encode_value(history.planner), separators=(",", ":")))
    fit = (MAX_STATE_BYTES - empty) // whole
    print(f"the default planner over {args.hours:g} h of the azure-x50 day ({SERVICE}):")
    print(f"  one service's state: {whole:,} bytes ({windows:,} without its planner memory)")
    print(
        f"  its planner memory: {plain:,} bytes as plain JSON (state version 1), "
        f"{whole - windows:,} as stored (version 2, compressed)"
    )
    print(f"  services that keep their memories under {MAX_STATE_BYTES:,} bytes: {fit}")

    def sharded(count: int) -> tuple[int, int, int]:
        """Of ``count`` such services, how many keep their memories with the default
        shards; the fullest shard's memories and bytes."""
        histories = {f"svc-{i:04d}": history for i in range(count)}
        state = DurableState("east", at_s, histories=histories)
        encoded = encode_state(state, DEFAULT_MEMORY_SHARDS)
        fullest = max(encoded.shards, key=len)
        return count - encoded.dropped, len(json.loads(fullest)["memories"]), len(fullest)

    kept, memories, fullest_bytes = sharded(MAX_SERVICES)
    # The most services that all keep theirs: drops only grow with the count (each
    # shard's services are a superset), so a bisection finds it.
    low, high = (MAX_SERVICES, MAX_SERVICES) if kept == MAX_SERVICES else (0, MAX_SERVICES - 1)
    while low < high:
        middle = (low + high + 1) // 2
        if sharded(middle)[0] == middle:
            low = middle
        else:
            high = middle - 1
    print(
        f"  with {DEFAULT_MEMORY_SHARDS} memory shards (the default), each under the limit: "
        f"all of up to {low:,} services keep their memories ({kept:,} of {MAX_SERVICES:,}, "
        f"the most a state holds; its fullest shard: {memories} memories, "
        f"{fullest_bytes:,} bytes)"
    )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

"""The what-if half of a pull-request review: both revisions' policies replayed on the
same recorded load in the simulator, side by side, with a verdict a reviewer reads.

The replay is ``reconciler.sim.evaluate`` with the ``heteroscale`` policy, run once
per revision on the same load and seed, so its figures are the ones ``heteroscale
simulate`` prints for the same inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reconciler.desired.loader import DesiredState
from reconciler.sim.engine import LoadProfile, SimConfig
from reconciler.sim.evaluate import (
    EvaluationResult,
    PolicyResult,
    compare_results,
    evaluate,
    percent_text,
)

WHATIF_POLICY = "heteroscale"


@dataclass(frozen=True)
class WhatIf:
    """One service replayed under base and head."""

    service: str
    load: str  # what was replayed, e.g. "trace X x40 over 8 h" or "synthetic day"
    base: PolicyResult | None  # None: the service does not exist at base
    head: PolicyResult | None
    attainment_goal: float
    verdict: str

    def as_evaluation(
        self, service_slo: dict[str, float], horizon_s: int, requests: float
    ) -> EvaluationResult:
        """Both sides as one EvaluationResult (policies 'base' and 'head'), so the
        simulate command's table and plot render it unchanged."""
        policies = {
            name: result for name, result in (("base", self.base), ("head", self.head)) if result
        }
        return EvaluationResult(self.service, self.load, horizon_s, requests, service_slo, policies)


def verdict(base: PolicyResult | None, head: PolicyResult | None, goal: float) -> str:
    """One line: GPU-hours change and every attainment change, flagging the goal."""
    if head is None:
        return "service removed at head: its GPUs are freed"
    if base is None:
        return f"new service: {head.gpu_hours:.1f} GPU-hours over the replay"

    def goal_note(before: float, after: float) -> str:
        if after < goal <= before:
            return f", below the {percent_text(goal)} goal"
        if after < goal:
            return f", still below the {percent_text(goal)} goal"
        return ""

    return compare_results("head", base, head, goal_note)


def replay(
    base: DesiredState,
    head: DesiredState,
    services: list[str],
    load_for: Callable[[DesiredState, str], LoadProfile],
    describe_load: Callable[[str], str],
    *,
    seed: int = 0,
    config: SimConfig | None = None,
    deadline: float | None = None,
) -> tuple[
    list[WhatIf],
    dict[str, tuple[EvaluationResult | None, EvaluationResult | None]],
    list[str],
]:
    """Replay each service under both revisions on the same load, so both sides see
    identical requests: built from base's view of the service when it exists there,
    the traffic it serves today (a load sized from head's view would move with the
    change under review: a TBT no instance meets sized head's synthetic day at 0.1
    requests/s), else from head's. Services not started by ``deadline``
    (``time.monotonic()``) come back skipped."""
    out: list[WhatIf] = []
    raw: dict[str, tuple[EvaluationResult | None, EvaluationResult | None]] = {}
    skipped: list[str] = []
    for service in services:
        if deadline is not None and time.monotonic() >= deadline:
            skipped.append(service)
            continue
        reference = base if service in base.policies else head
        load = load_for(reference, service)
        results: list[EvaluationResult | None] = []
        for state in (base, head):
            if service in state.policies and state.policies[service].cluster in state.clusters:
                results.append(evaluate(state, service, load, [WHATIF_POLICY], seed, config=config))
            else:
                results.append(None)
        base_eval, head_eval = results
        base_result = base_eval.policies[WHATIF_POLICY] if base_eval else None
        head_result = head_eval.policies[WHATIF_POLICY] if head_eval else None
        # Head is judged against its own goal (the change may move it).
        goal = (head if service in head.policies else base).policies[service].slo.attainment_goal
        out.append(
            WhatIf(
                service=service,
                load=describe_load(service),
                base=base_result,
                head=head_result,
                attainment_goal=goal,
                verdict=verdict(base_result, head_result, goal),
            )
        )
        raw[service] = (base_eval, head_eval)
    return out, raw, skipped


def describe_trace(
    trace: Path | None,
    rate_scale: float | None,
    diurnal_hours: float | None,
    warm_up_hours: float = 0.0,
) -> str:
    # A reviewer reads the attainment of a service's first hour, where no policy
    # remembers a burst, as that of a running service unless told.
    warm_up = (
        f", judged after a {warm_up_hours:g} h warm-up"
        if warm_up_hours
        else ", from a cold start (no memory of earlier traffic)"
    )
    if trace is None:
        hours = diurnal_hours or 8.0
        scale = f", x{rate_scale:g}" if rate_scale else ""
        return f"synthetic diurnal load, {hours:g} h{scale}{warm_up}"
    text = trace.name
    if rate_scale:
        text += f" x{rate_scale:g}"
    if diurnal_hours:
        text += f" over {diurnal_hours:g} h diurnal"
    return text + warm_up

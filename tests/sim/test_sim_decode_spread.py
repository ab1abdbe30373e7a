"""Decode sized for the count of sequences running, not only its mean: at a tight TBT
SLO the batch each instance may run is small (about 20 sequences at 20 ms), and a few
instances' count running spreads by a large share of it. Sized by the mean batch
alone, the planner ran chat at 12 requests/s on 3-4 instances, each at 86 % of that
batch, and 2.7 % of requests missed the TBT while every reading sat in vLLM's 10-25 ms
bucket (no evidence for the tiers)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from reconciler.desired import DesiredState
from reconciler.policy.planner import PlannerAutoscaler
from reconciler.sim.engine import LoadProfile
from reconciler.sim.evaluate import run_autoscaler
from reconciler.sim.workload import synthetic_workload


@pytest.mark.parametrize("seed", [4, 5])
def test_a_tight_tbt_slo_is_met_on_steady_traffic(state: DesiredState, seed: int) -> None:
    """Chat with a 20 ms TBT SLO (a 5 s TTFT, out of the way), a steady 12 requests/s
    for 45 minutes from a cold start: the planner keeps 99 % of requests within both
    SLOs (sized by the mean batch, 97.4 % and 94.6 % on these two seeds)."""
    chat = state.policies["chat"]
    slo = chat.slo.model_copy(update={"tbt_ms": 20.0, "ttft_ms": 5000.0})
    tight = replace(
        state, policies={**state.policies, "chat": chat.model_copy(update={"slo": slo})}
    )
    workload = synthetic_workload(
        "chat", hours=0.75, peak_rps=12.0, seed=seed, trough_ratio=1.0, bursts=()
    )
    result = run_autoscaler(tight, "chat", LoadProfile.from_workload(workload), PlannerAutoscaler())
    assert result.slo_attainment >= 0.99, result.slo_attainment

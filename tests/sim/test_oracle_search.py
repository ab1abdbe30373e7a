"""oracle-min's search: estimates beyond what the trials decided, and trials that replay
the window's prefill side, change its cost, never its answers' validity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reconciler.desired import DesiredState
from reconciler.sim import oracle
from reconciler.sim.engine import LoadProfile, ServiceSim, idle_ttft_s
from reconciler.sim.oracle import (
    REACH,
    OracleMinPlan,
    _least_passing,
    plan_oracle_min,
    replay_window,
)

SERVICE = "chat"


@pytest.mark.parametrize("answer", [3, 60, 300, 1500])
@pytest.mark.parametrize("wrong", ["low", "high"])
def test_estimates_stuck_beyond_a_decided_count_step_away_from_it(answer: int, wrong: str) -> None:
    """An estimate that stays below a failing count (or above a passing one) is wrong
    there: the search steps away by a growing share instead of one count at a time,
    and still returns the least passing count."""
    tried: list[int] = []

    def passes(n: int) -> bool:
        tried.append(n)
        return n >= answer

    if wrong == "low":  # a count far below the answer has failed; the model says lower
        bad, good, stuck = answer // 4, None, 1.0
    else:  # one far above has passed; the model says higher
        bad, good, stuck = None, min(2000, answer * 4), 5000.0
    assert _least_passing(passes, 1, 2000, lambda: stuck, bad=bad, good=good) == (answer, True)
    assert len(tried) <= 3 * math.log2(2000) + 4
    if bad is not None and bad > 0:
        assert tried[0] - bad >= REACH * bad
        assert tried[1] - tried[0] >= 2 * REACH * tried[0] - 1  # twice as far
    if good is not None and good > answer:
        assert good - tried[0] >= REACH * good


def assert_same_plan(first: OracleMinPlan, second: OracleMinPlan) -> None:
    """The same windows, after the same trials, with the same simulated rows."""
    assert first.windows == second.windows
    assert first.trials == second.trials
    assert first.sim.series.data[: first.sim.t].tobytes() == (
        second.sim.series.data[: second.sim.t].tobytes()
    )


def test_prefill_tapes_change_no_trial(
    state: DesiredState, burst_load: LoadProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = state.policies[SERVICE]
    cluster = state.clusters[policy.cluster]
    taped = plan_oracle_min(policy, cluster, burst_load)
    monkeypatch.setattr(oracle, "PrefillTape", lambda start: None)
    assert_same_plan(taped, plan_oracle_min(policy, cluster, burst_load))


def test_every_window_passes_and_one_decode_fewer_fails(
    state: DesiredState, burst_load: LoadProfile
) -> None:
    """The bound's definition, window by window, for the decode role (the prefill role
    is checked in test_sim_oracle): each count passes a replayed trial, the one below
    fails it."""
    policy = state.policies[SERVICE]
    cluster = state.clusters[policy.cluster]
    goal = policy.slo.attainment_goal
    plan = plan_oracle_min(policy, cluster, burst_load)
    for k, window in enumerate(plan.windows):
        _ttft, both = replay_window(
            policy, cluster, burst_load, plan, k, window.prefill, window.decode
        )
        assert both >= goal
        if window.decode > max(policy.decode.min_instances, 1):
            _ttft, fewer = replay_window(
                policy, cluster, burst_load, plan, k, window.prefill, window.decode - 1
            )
            assert fewer < goal, f"window {k}: one decode instance fewer still meets it"


def test_the_prefill_models_kept_waits_change_no_trial(
    state: DesiredState, burst_load: LoadProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefill model keeps each count's queue wait for the window; working it out
    afresh every time gives the same trials, counts and rows."""
    policy = state.policies[SERVICE]
    cluster = state.clusters[policy.cluster]
    kept = plan_oracle_min(policy, cluster, burst_load)

    def afresh(model: oracle._PrefillModel, count: int) -> np.ndarray:
        wait: np.ndarray = model.wait_s(count)[model.index]
        return wait

    monkeypatch.setattr(oracle._PrefillModel, "request_wait_s", afresh)
    assert_same_plan(kept, plan_oracle_min(policy, cluster, burst_load))


def test_the_prefill_models_kept_waits_are_read_only_and_per_window(
    state: DesiredState, burst_load: LoadProfile
) -> None:
    policy = state.policies[SERVICE]
    sim = ServiceSim(policy, state.clusters[policy.cluster], burst_load)
    sample = burst_load.sample
    assert sample is not None
    model = oracle._PrefillModel(sim, "h800", policy.slo.attainment_goal)
    for start in (0, 300):
        lo, hi = np.searchsorted(sample.arrival_s, [start, start + 60])
        prompt = sample.prompt_tokens[lo:hi].astype(np.float64)
        model.begin(start, start + 60, 3, sample.arrival_s[lo:hi], idle_ttft_s(sim, prompt))
        for count in (1, 2, 5, 1, 40, 2):
            wait = model.request_wait_s(count)
            assert wait.tobytes() == model.wait_s(count)[model.index].tobytes()
            with pytest.raises(ValueError):
                wait[:1] = 0.0

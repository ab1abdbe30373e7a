"""Time every request's TTFT spends outside the instances (``SimConfig.ttft_outside_s``:
an API gateway, tokenisation, a network hop), which no performance model sees: the
simulator adds it to every TTFT, and the planner learns it as such instead of as a
slower prefill (``LatencyCorrection.prefill_ttft_offset_s``)."""

from __future__ import annotations

import math
import re

import pytest
from simkit import RecordingPlanner

from reconciler.desired import DesiredState
from reconciler.sim.engine import LoadProfile, ServiceSim, SimConfig, synthetic_profile
from reconciler.sim.evaluate import run_autoscaler


@pytest.mark.parametrize("seconds", [-0.1, math.nan, math.inf])
def test_a_ttft_outside_is_a_finite_non_negative_time(seconds: float) -> None:
    with pytest.raises(ValueError, match="ttft_outside_s"):
        SimConfig(ttft_outside_s=seconds)


def test_the_report_says_when_ttft_is_spent_outside_the_instances() -> None:
    assert SimConfig().engines_note is None
    note = SimConfig(ttft_outside_s=0.3).engines_note or ""
    assert "every TTFT holds 300 ms spent outside the instances" in note


def test_it_adds_to_every_ttft_whatever_the_load(state: DesiredState) -> None:
    """The TTFT quantile read over a window moves by exactly the time outside, on the
    same fleet and load (exact metrics: no histogram bucket in between)."""
    policy = state.policies["chat"]
    cluster = state.clusters[policy.cluster]
    profile = synthetic_profile("chat", hours=0.2, peak_rps=60, seed=4, bursts=(), trough_ratio=1.0)
    readings = []
    for outside_s in (0.0, 0.3):
        config = SimConfig(prometheus_like=False, ttft_outside_s=outside_s)
        sim = ServiceSim(policy, cluster, profile, config)
        sim.set_counts({("h800", "rdma"): 12.0}, {"h20": 40}, {})
        while sim.t < 600:
            sim.step()
        ttft_ms = sim.window_metrics(60.0)["ttft"]
        assert ttft_ms is not None
        readings.append(ttft_ms)
    assert readings[1] - readings[0] == pytest.approx(300.0, abs=1.0)


def test_the_planner_learns_it_as_an_offset_not_a_slower_prefill(state: DesiredState) -> None:
    """Behind 0.3 s of gateway on chat's 1.5 s TTFT SLO the planner's prefill factor
    stays the model's (its instances run as the model says) and it learns the 0.3 s to
    within the TTFT histogram's bucket; it spends a little more for the smaller TTFT
    budget, not the up to twice the prefill that a slower factor ratcheted to."""
    load: LoadProfile = synthetic_profile(
        "chat", hours=0.4, peak_rps=150, seed=3, bursts=(), trough_ratio=1.0
    )
    runs = {}
    for outside_s in (0.0, 0.3):
        planner = RecordingPlanner()
        runs[outside_s] = run_autoscaler(
            state, "chat", load, planner, config=SimConfig(ttft_outside_s=outside_s)
        )
        last = planner.decisions[-1].message
        factor = re.search(r"latency factors prefill x([\d.]+)", last)
        assert factor is not None, last
        assert 0.9 <= float(factor[1]) <= 1.1, last
        offset = re.search(r"TTFT \+(\d+) ms outside the instances", last)
        if outside_s == 0.0:
            assert offset is None, last
        else:
            assert offset is not None, last
            assert 50 <= int(offset[1]) <= 550, last
    assert runs[0.3].gpu_hours <= 1.15 * runs[0.0].gpu_hours

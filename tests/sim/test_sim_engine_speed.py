"""Simulated engines that run off the policies' performance model
(``SimConfig.prefill_engine_speed``): the planner derives capacity from the model, and
these say what it does when the model is wrong, as a real card's will be."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from simkit import RecordingPlanner
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.desired import DesiredState
from reconciler.policy.base import Decision
from reconciler.sim.engine import SimConfig, engine_gpu, synthetic_profile
from reconciler.sim.evaluate import evaluate, role_capacity, run_autoscaler
from reconciler.sim.workload import synthetic_workload


def slowed(speed: float) -> SimConfig:
    return SimConfig(prefill_engine_speed=speed, decode_engine_speed=speed)


@pytest.mark.parametrize("speed", [0.0, -1.0, math.nan, math.inf])
def test_an_engine_speed_is_a_positive_finite_number(speed: float) -> None:
    with pytest.raises(ValueError, match="prefill_engine_speed"):
        SimConfig(prefill_engine_speed=speed)
    with pytest.raises(ValueError, match="decode_engine_speed"):
        SimConfig(decode_engine_speed=speed)


def test_an_engine_runs_on_the_declared_card_scaled_in_compute_and_bandwidth(
    state: DesiredState,
) -> None:
    gpu = state.clusters["prod-east"].gpu_types["h20"]
    assert engine_gpu(gpu, 1.0) is gpu
    slow = engine_gpu(gpu, 0.77)
    assert slow.bf16_tflops == pytest.approx(gpu.bf16_tflops * 0.77)
    assert slow.memory_bandwidth_gbps == pytest.approx(gpu.memory_bandwidth_gbps * 0.77)
    # Its memory and price are the card's: only how fast it runs differs.
    assert (slow.memory_gib, slow.cost_per_hour) == (gpu.memory_gib, gpu.cost_per_hour)
    assert SimConfig().engines_note is None
    assert "0.77x (prefill) and 0.77x (decode)" in (slowed(0.77).engines_note or "")


def test_slower_engines_serve_less_and_static_peak_provisions_for_them(
    state: DesiredState,
) -> None:
    """Static peak is sized on the engines as they run (as a load test would measure
    them): slower engines, more instances for the same peak."""
    load = synthetic_profile("b", hours=0.1, peak_rps=8, seed=3)
    policy = state.policies["svc-b"]
    declared = role_capacity(state, policy, load)
    slow = role_capacity(state, policy, load, slowed(0.77))
    assert slow.prefill_tps < 0.85 * declared.prefill_tps
    assert slow.decode_tps < 0.9 * declared.decode_tps
    counts = []
    for config in (SimConfig(), slowed(0.77)):
        run = evaluate(state, "svc-b", load, ["static-peak"], seed=3, config=config)
        fixed = run.policies["static-peak"]
        counts.append((fixed.peak_prefill_instances, fixed.peak_decode_instances))
        assert (config.engines_note is None) == (config.engines_note not in run.notes)
    assert counts[1][0] > counts[0][0] and counts[1][1] >= counts[0][1], counts


def latency_factors(decision: Decision) -> tuple[float, float]:
    found = re.search(r"latency factors prefill x([\d.]+), decode x([\d.]+)", decision.message)
    assert found is not None, decision.message
    return float(found[1]), float(found[2])


def test_the_planner_learns_engines_slower_or_faster_than_its_model(
    state: DesiredState,
) -> None:
    """On engines at 0.77x the declared figures (the model ~30% optimistic) the
    planner's correction takes both roles as slower within the run, and spends more
    GPU-hours for the same steady load; at 1.3x (the model ~30% pessimistic) it takes
    both as faster, and spends less; on engines as declared it learns nothing. Prefill
    learns from its busy fraction, decode from its mean inter-token gap: their latency
    quantiles, known only to a bucket, could not say "faster"."""
    load = synthetic_profile("chat", hours=0.3, peak_rps=150, seed=3, bursts=(), trough_ratio=1.0)
    runs = {}
    for speed in (1.0, 0.77, 1.3):
        planner = RecordingPlanner()
        runs[speed] = run_autoscaler(state, "chat", load, planner, config=slowed(speed))
        prefill, decode = latency_factors(planner.decisions[-1])
        if speed == 1.0:
            assert 0.9 <= prefill <= 1.1 and 0.9 <= decode <= 1.1
        else:
            # Within 10% of the truth, 1 / speed.
            assert prefill * speed == pytest.approx(1.0, rel=0.1), (prefill, decode)
            assert decode * speed == pytest.approx(1.0, rel=0.1), (prefill, decode)
    assert runs[0.77].gpu_hours > 1.1 * runs[1.0].gpu_hours
    assert runs[1.3].gpu_hours < 0.95 * runs[1.0].gpu_hours


def test_simulate_command_runs_engines_off_the_model_and_says_so(
    repo_root: Path, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.csv"
    synthetic_workload("b", hours=0.1, peak_rps=4, seed=2).to_csv(trace)
    out = tmp_path / "result.json"
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--trace",
            str(trace),
            "--service",
            "svc-b",
            "--policies",
            "static-peak",
            "--engine-speed",
            "prefill=0.8",
            "--json",
            str(out),
            "--repo",
            str(repo_root),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "simulated engines at 0.8x (prefill) and 1x (decode)" in result.output.replace("\n", " ")
    document = json.loads(out.read_text())
    assert document["command"]["engine_speed"] == {"prefill": 0.8, "decode": 1.0}
    assert any("simulated engines at 0.8x" in note for note in document["notes"])


@pytest.mark.parametrize("value", ["0", "-1", "nan", "fast", "prefill=0.5,gpu=2", "decode="])
def test_simulate_command_rejects_a_bad_engine_speed(repo_root: Path, value: str) -> None:
    result = CliRunner().invoke(
        app, ["simulate", "--engine-speed", value, "--repo", str(repo_root)]
    )
    assert result.exit_code == 2
    assert "--engine-speed must be a number in (0, 100]" in result.output.replace("\n", "")

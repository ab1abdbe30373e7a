"""Side-by-side evaluation of policies, and the ``heteroscale simulate`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.desired import DesiredState
from reconciler.sim.engine import LoadProfile, synthetic_profile
from reconciler.sim.evaluate import EvaluationError, ScheduleAutoscaler, evaluate
from reconciler.sim.workload import Workload, synthetic_workload

SERVICE = "svc-b"


@pytest.fixture(scope="module")
def load() -> LoadProfile:
    return synthetic_profile("b", hours=0.5, peak_rps=30, seed=3)


@pytest.fixture(scope="module")
def result(state: DesiredState, load: LoadProfile):  # type: ignore[no-untyped-def]
    return evaluate(
        state, SERVICE, load, ["heteroscale", "hpa-gpu-util", "static-peak", "oracle"], seed=0
    )


def test_every_policy_reports_every_figure(result) -> None:  # type: ignore[no-untyped-def]
    document = json.loads(json.dumps(result.to_json()))
    assert set(document["policies"]) == {"heteroscale", "hpa-gpu-util", "static-peak", "oracle"}
    for name, figures in document["policies"].items():
        for key in (
            "gpu_hours",
            "ttft_attainment",
            "tbt_attainment",
            "slo_attainment",
            "mean_gpu_util",
            "scaling_actions",
        ):
            assert key in figures, (name, key)
        for key in ("ttft_attainment", "tbt_attainment", "slo_attainment"):
            assert 0.0 <= figures[key] <= 1.0
        assert figures["gpu_hours"] > 0
        assert len(figures["timeline"]["t_min"]) == 30


def test_static_peak_gpu_hours_are_its_counts_times_the_horizon(result, load: LoadProfile) -> None:  # type: ignore[no-untyped-def]
    static = result.policies["static-peak"]
    assert static.scaling_actions == 0
    gpus = static.peak_prefill_instances + static.peak_decode_instances  # svc-b: one GPU each
    assert static.gpu_hours == pytest.approx(gpus * load.horizon_s / 3600)
    assert static.pd_ratio_min == static.pd_ratio_max


def test_the_oracle_uses_fewer_gpu_hours_than_static_peak(result) -> None:  # type: ignore[no-untyped-def]
    assert result.policies["oracle"].gpu_hours < result.policies["static-peak"].gpu_hours
    assert result.policies["static-peak"].ttft_attainment > 0.95


def test_decode_utilisation_reads_busy_for_every_policy(result) -> None:  # type: ignore[no-untyped-def]
    """The paper's point, emerging from the model: decode looks ~fully utilised whatever
    its load, so an HPA on it keeps scaling decode up (until the instances outnumber
    the sequences)."""
    for name in ("static-peak", "oracle"):
        assert result.policies[name].mean_gpu_util_decode > 0.85
    hpa = result.policies["hpa-gpu-util"]
    assert hpa.peak_decode_instances > 2 * result.policies["static-peak"].peak_decode_instances


def test_same_seed_same_evaluation(state: DesiredState, load: LoadProfile) -> None:
    first = evaluate(state, SERVICE, load, ["oracle"], seed=5).to_json()
    second = evaluate(state, SERVICE, load, ["oracle"], seed=5).to_json()
    assert first == second


def _schedule(tmp_path: Path, rows: str) -> Path:
    path = tmp_path / "schedule.csv"
    path.write_text("t_s,service,prefill,decode\n" + rows)
    return path


def test_schedule_policy_replays_instance_counts(state: DesiredState, tmp_path: Path) -> None:
    load = synthetic_profile("b", hours=0.25, peak_rps=10, seed=1)
    path = _schedule(tmp_path, f"0,{SERVICE},3,5\n300,{SERVICE},6,9\n600,other,1,1\n")
    outcome = evaluate(state, SERVICE, load, [f"schedule:{path}"], seed=0)
    run = outcome.policies[f"schedule:{path}"]
    prefill = np.asarray(run.timeline["prefill_instances"])
    decode = np.asarray(run.timeline["decode_instances"])
    assert prefill[:5].tolist() == [3] * 5 and decode[:5].tolist() == [5] * 5
    assert prefill[5:].tolist() == [6] * 10 and decode[5:].tolist() == [9] * 10
    assert run.scaling_actions == 1


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("0,svc-b,-1,2\n", "must not be negative"),
        ("zero,svc-b,1,2\n", "t_s must be a number"),
        ("0,svc-b,1\n", "expected 4 fields"),
        ("0,chat,1,1\n", "no rows for service 'svc-b'"),
    ],
)
def test_bad_schedules_are_reported(
    state: DesiredState, load: LoadProfile, tmp_path: Path, rows: str, message: str
) -> None:
    path = _schedule(tmp_path, rows)
    with pytest.raises(EvaluationError, match=message):
        evaluate(state, SERVICE, load, [f"schedule:{path}"])
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("time,svc,p,d\n")
    with pytest.raises(EvaluationError, match="header"):
        ScheduleAutoscaler.from_csv(bad_header)


def test_a_fleet_too_small_to_serve_is_reported_not_a_crash(
    state: DesiredState, tmp_path: Path
) -> None:
    load = synthetic_profile("b", hours=0.1, peak_rps=5, seed=1)
    path = _schedule(tmp_path, f"0,{SERVICE},2,0\n")
    run = evaluate(state, SERVICE, load, [f"schedule:{path}"]).policies[f"schedule:{path}"]
    assert run.slo_attainment == 0.0
    assert run.dropped == pytest.approx(run.requests)
    assert any("no request completed" in note for note in run.notes)


def test_unknown_names_are_errors(state: DesiredState, load: LoadProfile) -> None:
    with pytest.raises(EvaluationError, match="unknown service 'nope'"):
        evaluate(state, "nope", load, ["oracle"])
    with pytest.raises(
        EvaluationError, match=r"unknown autoscaler 'orcale'.*did you mean 'oracle'"
    ):
        evaluate(state, SERVICE, load, ["orcale"])


# --------------------------------------------------------------------------- the command


def _trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.csv"
    synthetic_workload("b", hours=0.2, peak_rps=4, seed=2).to_csv(path)
    return path


def test_simulate_command_prints_the_table_and_writes_json_and_png(
    repo_root: Path, tmp_path: Path
) -> None:
    out_json, out_png = tmp_path / "out" / "result.json", tmp_path / "result.png"
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--trace",
            str(_trace(tmp_path)),
            "--service",
            SERVICE,
            "--rate-scale",
            "3",
            "--policies",
            "static-peak,oracle",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--repo",
            str(repo_root),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "GPU-hours" in result.output
        and "static-peak" in result.output
        and "oracle" in result.output
    )
    document = json.loads(out_json.read_text())
    assert set(document["policies"]) == {"static-peak", "oracle"}
    assert document["command"]["rate_scale"] == 3.0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_command_reports_a_bad_trace(repo_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,12,-3\n")
    result = CliRunner().invoke(app, ["simulate", "--trace", str(bad), "--repo", str(repo_root)])
    assert result.exit_code == 1
    assert f"{bad}:2: negative output tokens" in result.output.replace("\n", "")


def test_simulate_command_rejects_an_unknown_service(repo_root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--trace",
            str(_trace(tmp_path)),
            "--service",
            "nope",
            "--repo",
            str(repo_root),
        ],
    )
    assert result.exit_code == 2
    assert "unknown service 'nope'" in result.output


def test_rate_scale_keeps_request_arrays_unless_too_large(
    state: DesiredState, tmp_path: Path
) -> None:
    from reconciler.sim import load as command
    from reconciler.sim.engine import SimConfig

    trace = _trace(tmp_path)
    small = command.load_for(state, SERVICE, trace, 2.0, None, 0, SimConfig())
    assert small.sample_weight == 1.0 and "rate scaled x2" in " ".join(small.notes)
    original = command.MAX_REQUEST_ARRAYS
    try:
        command.MAX_REQUEST_ARRAYS = 10
        fluid = command.load_for(state, SERVICE, trace, 2.0, None, 0, SimConfig())
    finally:
        command.MAX_REQUEST_ARRAYS = original
    assert fluid.sample_weight == pytest.approx(2.0, rel=0.1)
    assert fluid.requests == pytest.approx(small.requests, rel=0.1)
    workload: Workload = small.sample  # type: ignore[assignment]
    assert workload.requests == small.requests

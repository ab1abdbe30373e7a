"""The performance model is fitted to real measurements and reproduces them.

The shipped ``calibration_fit.json`` must be exactly what refitting ``shared/calibration``
gives, and it must reproduce every ``graph_fused`` measurement within 5 %.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reconciler.desired.models import GpuType, ModelSpec
from reconciler.perfmodel import calibrate
from reconciler.perfmodel.instance import instance_perf, load_fit

TOLERANCE = 0.05


def _card(name: str) -> GpuType:
    spec = calibrate.MEASURED_CARDS[name]
    return GpuType(
        memory_gib=spec["memory_gib"],
        bf16_tflops=spec["bf16_tflops"],
        memory_bandwidth_gbps=spec["memory_bandwidth_gbps"],
    )


def _model(shape: calibrate.ModelShape) -> ModelSpec:
    return ModelSpec(
        name="measured",
        params_b=shape.params / 1e9,
        kv_bytes_per_token=int(shape.kv_bytes_per_token),
        weight_bytes_per_param=shape.weight_bytes / shape.params,
    )


@pytest.fixture(scope="module")
def data(shared: Path) -> calibrate.CalibrationData:
    return calibrate.load_calibration(shared / "calibration")


def test_refit_reproduces_the_shipped_coefficients(shared: Path) -> None:
    shipped = json.loads(calibrate.FIT_PATH.read_text())
    refit = json.loads(json.dumps(calibrate.fit_all(shared / "calibration")))
    difference = calibrate.first_difference(shipped, refit)
    assert difference is None, (
        f"calibration_fit.json is stale ({difference}): run `python -m reconciler.perfmodel.calibrate`"
    )


def test_a_changed_coefficient_is_detected() -> None:
    shipped = json.loads(calibrate.FIT_PATH.read_text())
    changed = json.loads(calibrate.FIT_PATH.read_text())
    changed["prefill"]["eta_compute"] *= 1.01
    assert "prefill.eta_compute" in (calibrate.first_difference(shipped, changed) or "")


def test_check_mode_passes_on_the_shipped_file(shared: Path) -> None:
    assert calibrate.main(["--calibration", str(shared / "calibration"), "--check"]) == 0


def test_decode_step_times_within_5_percent_of_every_measurement(
    data: calibrate.CalibrationData,
) -> None:
    errors = []
    for point in data.decode:
        perf = instance_perf(_model(point.model), point.card, _card(point.card), 1)
        ctx = point.ctx + 1
        predicted = float(perf.decode_step_s(point.batch, point.batch * ctx, ctx))
        errors.append(predicted / point.step_s - 1.0)
    assert len(errors) >= 40
    assert np.max(np.abs(errors)) <= TOLERANCE


def test_prefill_latencies_within_5_percent_of_every_measurement(
    data: calibrate.CalibrationData,
) -> None:
    errors = []
    for point in data.prefill:
        perf = instance_perf(_model(point.model), point.card, _card(point.card), 1)
        predicted = float(perf.prefill_latency_s(point.prompt, batch=point.batch))
        errors.append(predicted / point.latency_s - 1.0)
    assert len(errors) >= 20
    assert np.max(np.abs(errors)) <= TOLERANCE


def test_scalar_and_vector_step_times_agree(data: calibrate.CalibrationData) -> None:
    point = data.decode[5]
    perf = instance_perf(_model(point.model), point.card, _card(point.card), 2)
    vector = float(perf.decode_step_s(17.0, 17.0 * 3000, 3000))
    assert perf.decode_step_scalar_s(17.0, 17.0 * 3000, 3000) == pytest.approx(vector, rel=1e-12)


def test_counters_follow_the_measurements(data: calibrate.CalibrationData) -> None:
    util = load_fit()["util"]
    # Decode reads ~100 % busy at every batch; prefill tracks its busy fraction.
    assert util["decode_util_when_active"] > 0.99
    assert 0.9 < util["prefill_util_per_busy"] < 1.1
    # The SM-activity proxy (normalised power) rises with batch and saturates.
    values = util["decode_sm_active_value"]
    assert values == sorted(values)
    assert values[0] > 0.4 and values[-1] > 0.95


def test_missing_calibration_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(calibrate.CalibrationDataError, match=r"meta\.json"):
        calibrate.load_calibration(tmp_path)
    assert (
        calibrate.main(["--calibration", str(tmp_path), "--out", str(tmp_path / "fit.json")]) == 1
    )

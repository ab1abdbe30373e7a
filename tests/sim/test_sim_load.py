"""The load a simulation runs (``load_with_requests``): what it refuses, clearly, before
the simulator meets it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from reconciler.desired import DesiredState
from reconciler.sim.engine import SimConfig
from reconciler.sim.evaluate import EvaluationError
from reconciler.sim.load import SimulationLoad, load_with_requests
from reconciler.sim.workload import Workload, WorkloadError


def _plain_trace(tmp_path: Path, rows: list[tuple[float, int, int]]) -> Path:
    path = tmp_path / "trace.csv"
    Workload(
        np.array([r[0] for r in rows]),
        np.array([r[1] for r in rows]),
        np.array([r[2] for r in rows]),
    ).to_csv(path)
    return path


def _load(
    state: DesiredState, trace: Path | None, rate_scale: float | None, hours: float | None = None
) -> SimulationLoad:
    return load_with_requests(
        state, sorted(state.policies)[0], trace, rate_scale, hours, 0, SimConfig()
    )


@pytest.mark.parametrize("scale", [0.0, -2.0, math.inf, math.nan, 1e300])
@pytest.mark.parametrize("with_trace", [True, False])
def test_a_rate_scale_that_is_no_positive_finite_number_is_refused(
    state: DesiredState, tmp_path: Path, scale: float, with_trace: bool
) -> None:
    # 0 used to mean "unscaled"; infinity and 1e300 failed inside numpy's Poisson draws.
    trace = _plain_trace(tmp_path, [(0.0, 100, 10), (1.0, 100, 10)]) if with_trace else None
    with pytest.raises(
        EvaluationError, match=r"--rate-scale: .* is not a positive number up to 1e\+06"
    ):
        _load(state, trace, scale)


def test_a_rate_scale_that_leaves_no_requests_is_refused(
    state: DesiredState, tmp_path: Path
) -> None:
    trace = _plain_trace(tmp_path, [(float(t), 100, 10) for t in range(50)])
    with pytest.raises(EvaluationError, match=r"x1e-09 leaves no requests of the .*trace.csv"):
        _load(state, trace, 1e-9)
    with pytest.raises(EvaluationError, match=r"x1e-09 leaves no requests of the synthetic load"):
        _load(state, None, 1e-9)


def test_thinning_that_keeps_only_requests_without_prompt_tokens_is_refused(
    state: DesiredState, tmp_path: Path
) -> None:
    rows = [(0.0, 100, 10)] + [(float(t), 0, 10) for t in range(1, 2000)]
    with pytest.raises(EvaluationError, match="no prompt tokens in any of the"):
        _load(state, _plain_trace(tmp_path, rows), 0.01)


def test_a_trace_at_one_instant_is_rate_scaled_but_not_tiled_over_a_day(tmp_path: Path) -> None:
    burst = Workload(np.zeros(300), np.full(300, 100), np.full(300, 10), name="burst")
    doubled = burst.rate_scaled(2.0, seed=0)  # every request is the others' neighbour
    assert doubled.requests == 600 and not doubled.arrival_s.any()
    with pytest.raises(
        WorkloadError, match="all 300 requests arrive at one time, a trace spanning zero seconds"
    ):
        burst.diurnal(8.0)
    single = Workload(np.zeros(1), np.full(1, 100), np.full(1, 10))
    assert single.diurnal(1.0).requests > 0  # one request: a one-second tile, as before


@pytest.mark.parametrize(
    ("arrival_s", "hours"),
    [
        ((0.0, 1e-9), 168.0),  # 3e14 tiles: numpy was asked for 2.15 PiB
        ((0.0, 5e-324), 1.0),  # a subnormal span: the tile count overflowed
    ],
    ids=["nanosecond-trace-over-a-week", "subnormal-span"],
)
def test_a_trace_too_short_for_its_day_is_refused_before_its_tiles_are_drawn(
    state: DesiredState, tmp_path: Path, arrival_s: tuple[float, float], hours: float
) -> None:
    trace = _plain_trace(tmp_path, [(t, 100, 10) for t in arrival_s])
    with pytest.raises(WorkloadError, match=r"before the diurnal curve thins them, more than"):
        _load(state, trace, None, hours)


def test_tiling_stops_at_the_requests_a_load_holds_as_arrays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from reconciler.sim import workload as workload_module

    monkeypatch.setattr(workload_module, "MAX_REQUEST_ARRAYS", 36_000)
    ten_seconds = Workload(np.arange(100) / 10.0, np.full(100, 100), np.full(100, 10), name="t")
    assert ten_seconds.diurnal(1.0).requests > 0  # 360 tiles of 100: 36,000
    with pytest.raises(
        WorkloadError,
        match=r"t: 1\.01 h of its 100 requests over 9\.9 s is 36,360 requests before the "
        r"diurnal curve thins them, more than the 36,000 a load holds as arrays",
    ):
        ten_seconds.diurnal(1.01)


def test_a_workload_error_shows_the_traces_name_escaped() -> None:
    burst = Workload(np.zeros(3), np.full(3, 100), np.full(3, 10), name="b\x1b[2J\nforged")
    with pytest.raises(WorkloadError, match=r"^b\\x1b\[2J\\nforged: all 3 requests arrive"):
        burst.diurnal(8.0)

"""Fixtures for the simulator tests: the repository's desired state and a short chat
load with a burst."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.desired import DesiredState, load_desired_state
from reconciler.sim.engine import LoadProfile, synthetic_profile
from reconciler.sim.workload import Burst


@pytest.fixture(scope="session")
def state(repo_root: Path) -> DesiredState:
    return load_desired_state(repo_root)


@pytest.fixture(scope="module")
def burst_load() -> LoadProfile:
    """Twelve minutes of chat traffic with a 1.8x burst in the middle."""
    return synthetic_profile(
        "chat",
        hours=0.2,
        peak_rps=60.0,
        seed=3,
        trough_ratio=0.5,
        bursts=(Burst(start_s=290.0, duration_s=150.0, factor=1.8),),
        sample_limit=40_000,
    )

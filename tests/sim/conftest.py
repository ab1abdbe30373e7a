"""Fixtures for the simulator tests: the repository's desired state and the shared data
folder (``$HETEROSCALE_SHARED`` or ``<repo>/../shared``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.desired import DesiredState, load_desired_state
from reconciler.sim.calibrate import shared_dir


@pytest.fixture(scope="session")
def state(repo_root: Path) -> DesiredState:
    return load_desired_state(repo_root)


@pytest.fixture(scope="session")
def shared() -> Path:
    folder = shared_dir()
    if folder is None:
        pytest.skip(
            "shared data folder not found: set HETEROSCALE_SHARED or place shared/ next to the repository "
            "(it holds calibration/ and traces/)"
        )
    return folder


@pytest.fixture(scope="session")
def azure_trace(shared: Path) -> Path:
    path = shared / "traces" / "AzureLLMInferenceTrace_conv.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def mooncake_trace(shared: Path) -> Path:
    path = shared / "traces" / "mooncake_conversation_trace.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path

"""Fixtures shared by every test area."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reconciler.perfmodel.calibrate import shared_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def example_repo(tmp_path: Path) -> Path:
    """A private copy of the repository's own desired state (policies/, clusters/,
    templates/) that a test may break."""
    for sub in ("policies", "clusters", "templates"):
        shutil.copytree(REPO_ROOT / sub, tmp_path / sub)
    return tmp_path


def _missing_data(reason: str) -> None:
    """The calibration and trace tests need ``shared/``: a developer without it skips
    them, but CI (``$CI`` set) fails, so a run without the data cannot pass while
    testing none of it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the calibration and trace data are required)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared() -> Path:
    folder = shared_dir()
    if folder is None:
        _missing_data(
            "shared data folder not found: set HETEROSCALE_SHARED or place shared/ next to the repository "
            "(it holds calibration/ and traces/)"
        )
    return folder


@pytest.fixture(scope="session")
def azure_trace(shared: Path) -> Path:
    path = shared / "traces" / "AzureLLMInferenceTrace_conv.csv"
    if not path.is_file():
        _missing_data(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def mooncake_trace(shared: Path) -> Path:
    path = shared / "traces" / "mooncake_conversation_trace.jsonl.gz"
    if not path.is_file():
        _missing_data(f"{path} not found")
    return path

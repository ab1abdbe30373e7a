"""Fixtures for the simulator tests: the repository's desired state."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.desired import DesiredState, load_desired_state


@pytest.fixture(scope="session")
def state(repo_root: Path) -> DesiredState:
    return load_desired_state(repo_root)

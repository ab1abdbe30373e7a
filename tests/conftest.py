"""Fixtures shared by every test area."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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

"""Editing a copy of the example repository in a test, and reading the problems its
loading reports: one helper for every test directory that does so."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.desired import load_desired_state
from reconciler.errors import ConfigError


def edit(path: Path, old: str, new: str) -> None:
    """Replace the first ``old`` in the file with ``new``; ``old`` must be there."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def line_of(path: Path, needle: str) -> int:
    """The 1-based number of the first line of the file that contains ``needle``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def problems(repo: Path) -> list[str]:
    """What loading ``repo`` reports, one line per problem; loading must fail."""
    with pytest.raises(ConfigError) as caught:
        load_desired_state(repo)
    return [str(issue) for issue in caught.value.issues]

"""Every file a pull request changes, and how heteroscale reads it.

The config diff shows what a change does to the desired state; a file it does not
read (a YAML file in a subdirectory of ``policies/``, a template no service names, a
README) or reads the same (a comment, formatting, key order) does nothing to the fleet
and so appeared nowhere in the review: a pull request that only added such files read
"no change" with none of them named, although a reviewer approves every file it
brings (a hostile prober's "merge without review" comment and an unused template
running a miner). Here every changed file is named with how it is read, the list
bounded (``MAX_FILES_LISTED``, then counts by how they are read).
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.desired.loader import DesiredState
from reconciler.review.config_diff import ConfigChange

# Files named one by one; the rest are counted by how they are read.
MAX_FILES_LISTED = 200

# How a changed file is read (``ChangedFile.reading``).
READ_CHANGED = "read: its changes are listed under config changes"
READ_SAME = "read: the same desired state (comments, formatting or key order only)"
NOT_READ = "not read by heteroscale"

# git diff-tree's status letters.
_CHANGE_WORDS = {"A": "added", "D": "removed", "M": "modified", "T": "type changed"}


@dataclass(frozen=True)
class ChangedFile:
    path: str
    change: str  # added, removed, modified, type changed
    reading: str  # READ_CHANGED, READ_SAME or NOT_READ


@dataclass(frozen=True)
class ChangedFiles:
    """The files a pull request changes: the first ``MAX_FILES_LISTED`` (in path
    order), how many there are, and how many of them are read each way."""

    listed: tuple[ChangedFile, ...] = ()
    total: int = 0
    by_reading: Mapping[str, int] = field(default_factory=dict)
    # Why the files could not be listed ("" when they were): said in the report.
    error: str = ""

    @property
    def without_effect(self) -> int:
        """Changed files that do not change the desired state."""
        return self.total - self.by_reading.get(READ_CHANGED, 0)

    def unlisted_line(self) -> str:
        """What the list leaves out, counted ("" when it lists every file)."""
        left = self.total - len(self.listed)
        if left <= 0:
            return ""
        counts = Counter(f.reading for f in self.listed)
        rest = {r: n - counts.get(r, 0) for r, n in self.by_reading.items()}
        parts = [f"{n} {reading}" for reading, n in sorted(rest.items()) if n]
        return f"... and {left} more file(s): {'; '.join(parts)}"


def changed_paths(repo: Path, base_commit: str, head_commit: str) -> list[tuple[str, str]]:
    """(status letter, path) of every file that differs between two commits, renames
    as a removal and an addition, in Git's order (by path)."""
    result = subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "diff-tree",
            "-r",
            "-z",
            "--no-renames",
            "--no-commit-id",
            "--name-status",
            base_commit,
            head_commit,
        ],
        capture_output=True,
        check=True,
    )
    fields = result.stdout.split(b"\0")
    # -z: status, NUL, path, NUL for each file (names as raw bytes, never quoted).
    return [
        (status.decode(errors="replace")[:1], os.fsdecode(raw_path))
        for status, raw_path in zip(fields[0::2], fields[1::2], strict=False)
        if status
    ]


def classify(
    paths: Iterable[tuple[str, str]],
    base: DesiredState,
    head: DesiredState,
    changes: Iterable[ConfigChange],
) -> ChangedFiles:
    """How heteroscale reads each of ``paths`` (``changed_paths``) at either revision."""
    read = {*base.files, *head.files, *base.template_files, *head.template_files}
    changing = {c.file for c in changes} | {c.name for c in changes if c.kind == "template"}
    listed: list[ChangedFile] = []
    counts: Counter[str] = Counter()
    for status, path in paths:
        if path in changing:
            reading = READ_CHANGED
        elif path in read:
            reading = READ_SAME
        else:
            reading = NOT_READ
        counts[reading] += 1
        if len(listed) < MAX_FILES_LISTED:
            listed.append(ChangedFile(path, _CHANGE_WORDS.get(status, status), reading))
    return ChangedFiles(tuple(listed), sum(counts.values()), dict(counts))


def changed_files(
    repo: Path, base: DesiredState, head: DesiredState, changes: Iterable[ConfigChange]
) -> ChangedFiles | None:
    """The files changed from ``base`` to ``head`` as ``classify`` reads them; None
    where either was not read from a Git commit."""
    if not (base.revision and head.revision):
        return None
    try:
        paths = changed_paths(repo, base.revision, head.revision)
    except (OSError, subprocess.CalledProcessError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        why = stderr.decode(errors="replace").strip() or str(exc)
        return ChangedFiles(error=f"git diff-tree failed: {why}")
    return classify(paths, base, head, changes)

"""One error tree for the whole reconciler.

The type says whether retrying can help: a ``TemporaryError`` (metrics unavailable,
API conflict, unreachable cluster) is retried with backoff on the next cycle, a
``PermanentError`` (invalid configuration, infeasible placement) is not: it needs a
human to change the desired state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class HeteroscaleError(Exception):
    """Base of every error the reconciler raises on purpose."""


class TemporaryError(HeteroscaleError):
    """Retrying later may succeed (network, server load, conflicts)."""


class PermanentError(HeteroscaleError):
    """Retrying will not help until the input changes."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in one file, located as precisely as the YAML allows."""

    file: str
    line: int | None
    column: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        field = f"{self.field}: " if self.field else ""
        return f"{where}: {field}{self.message}"


# Problems shown per file: a file with 200,000 unknown keys is not 200,000 lines.
MAX_ISSUES_SHOWN_PER_FILE = 100


def shown_issues(issues: Iterable[ConfigIssue]) -> list[str]:
    """One line per problem to show a reader: the first ``MAX_ISSUES_SHOWN_PER_FILE``
    of each file, then a line saying how many more that file has."""
    by_file: dict[str, list[ConfigIssue]] = {}
    for issue in issues:
        by_file.setdefault(issue.file, []).append(issue)
    lines: list[str] = []
    for file, found in by_file.items():
        lines += [str(issue) for issue in found[:MAX_ISSUES_SHOWN_PER_FILE]]
        more = len(found) - MAX_ISSUES_SHOWN_PER_FILE
        if more > 0:
            lines.append(
                f"{file}: {more:,} more problem{'s' if more != 1 else ''} not shown (the "
                f"first {MAX_ISSUES_SHOWN_PER_FILE} of a file are)"
            )
    return lines


class ConfigError(PermanentError):
    """The desired state is invalid. Carries every problem found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = sorted(issues, key=lambda i: (i.file, i.line or 0, i.column or 0, i.field))
        super().__init__("\n".join(str(i) for i in self.issues))


class MetricsUnavailable(TemporaryError):
    """The metrics backend could not be read; the reconciler holds the current size."""

    def __init__(self, message: str, *, query: str | None = None, cause: str | None = None):
        self.query = query
        self.cause = cause
        parts = [message]
        if query:
            parts.append(f"query: {query}")
        if cause:
            parts.append(f"cause: {cause}")
        super().__init__("; ".join(parts))


class ClusterUnavailable(TemporaryError):
    """A Kubernetes API server could not be reached or answered with a server error."""


class ApplyConflict(TemporaryError):
    """An object changed under us (HTTP 409); re-read and retry."""


class PlacementInfeasible(PermanentError):
    """Raised only where a caller asks for a hard failure; placement normally reports
    shortfalls as data in ``PlacementResult``."""

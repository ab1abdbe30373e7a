"""What `validate` prints for an invalid desired state: every problem up to a bound
per file, then how many more that file has; the exit code stays 1."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.errors import MAX_ISSUES_SHOWN_PER_FILE


def test_a_file_with_very_many_problems_prints_a_bounded_list_and_says_how_many_more(
    example_repo: Path,
) -> None:
    policy = example_repo / "policies/svc-a.yaml"
    extra = MAX_ISSUES_SHOWN_PER_FILE + 1234
    policy.write_text(policy.read_text() + "".join(f"zz{i}: 1\n" for i in range(extra)))
    other = example_repo / "policies/svc-b.yaml"
    other.write_text(other.read_text() + "zq: 1\n")
    result = CliRunner().invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len([x for x in lines if x.startswith("error policies/svc-a.yaml:")]) == (
        MAX_ISSUES_SHOWN_PER_FILE + 1
    )
    assert (
        "error policies/svc-a.yaml: 1,234 more problems not shown (the first 100 of a file are)"
        in (lines)
    )
    # Another file's problems are still shown, and the count is of all of them.
    assert any(x.startswith("error policies/svc-b.yaml:") and "'zq'" in x for x in lines)
    assert lines[-1] == f"{extra + 1:,} problems found"

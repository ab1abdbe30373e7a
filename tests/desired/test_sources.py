"""Loading a Git revision straight from the object database, and schema freshness."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconciler.cli import app, render_schemas
from reconciler.desired import load_desired_state
from reconciler.desired.roundtrip import set_value
from reconciler.errors import ConfigError


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture
def git_repo(example_repo: Path) -> Path:
    git(example_repo, "init", "-q", "-b", "main")
    git(example_repo, "add", "-A")
    git(example_repo, "commit", "-qm", "base")
    return example_repo


def test_a_revision_loads_without_touching_the_work_tree(git_repo: Path) -> None:
    policy = git_repo / "policies/svc-a.yaml"
    policy.write_text(policy.read_text().replace("cooldown_s: 120", "cooldown_s: 240"))
    git(git_repo, "commit", "-qam", "longer cooldown")
    shutil.rmtree(git_repo / "clusters")  # the work tree is now broken; revisions are not
    head = load_desired_state(git_repo, rev="HEAD")
    base = load_desired_state(git_repo, rev="HEAD~1")
    assert head.policies["svc-a"].scaling.cooldown_s == 240
    assert base.policies["svc-a"].scaling.cooldown_s == 120
    assert head.source_label.startswith("HEAD (")


def test_a_revision_still_at_the_commit_loaded_before_is_not_read_again(git_repo: Path) -> None:
    """The loop loads its revision every cycle: while the branch stays on one commit
    the state it loaded comes back as it is (and everything cached per policy with
    it); a new commit is read."""
    first = load_desired_state(git_repo, rev="main")
    assert load_desired_state(git_repo, rev="main", previous=first) is first
    policy = git_repo / "policies/svc-a.yaml"
    policy.write_text(policy.read_text().replace("cooldown_s: 120", "cooldown_s: 240"))
    git(git_repo, "commit", "-qam", "longer cooldown")
    moved = load_desired_state(git_repo, rev="main", previous=first)
    assert moved is not first and moved.policies["svc-a"].scaling.cooldown_s == 240
    # A directory has no commit to go by: it is read again.
    assert load_desired_state(git_repo, previous=first) is not first


def test_an_invalid_revision_is_located_like_a_directory(git_repo: Path) -> None:
    policy = git_repo / "policies/svc-b.yaml"
    policy.write_text(policy.read_text().replace("tbt_ms: 20", "tbt_ms: -1"))
    git(git_repo, "commit", "-qam", "break")
    with pytest.raises(ConfigError) as caught:
        load_desired_state(git_repo, rev="main")
    assert [i.field for i in caught.value.issues] == ["slo.tbt_ms"]
    assert caught.value.issues[0].line is not None


def test_an_unknown_revision_is_a_config_error(git_repo: Path) -> None:
    with pytest.raises(ConfigError, match="not a revision"):
        load_desired_state(git_repo, rev="no-such-branch")


def test_a_committed_symlink_out_of_the_repository_is_refused(git_repo: Path) -> None:
    (git_repo / "policies/chat.yaml").unlink()
    (git_repo / "policies/chat.yaml").symlink_to("../../../etc/passwd")
    git(git_repo, "add", "-A")
    git(git_repo, "commit", "-qm", "link")
    with pytest.raises(ConfigError, match="outside the repository; refused"):
        load_desired_state(git_repo, rev="HEAD")


def test_a_gitattributes_that_rewrites_content_on_checkout_is_refused_located(
    git_repo: Path,
) -> None:
    """The review reads blobs; a reconciler in directory mode reads a checkout. A
    filter would make them see different text, so the revision is refused."""
    (git_repo / ".gitattributes").write_text(
        "*.png binary\n* text=auto eol=lf\npolicies/*.yaml filter=secret  # smudged\n"
    )
    git(git_repo, "add", "-A")
    git(git_repo, "commit", "-qm", "attributes")
    with pytest.raises(ConfigError) as caught:
        load_desired_state(git_repo, rev="HEAD")
    issue = caught.value.issues[0]
    assert (issue.file, issue.line) == (".gitattributes", 3)
    assert "'filter=secret' converts files on checkout" in issue.message


def test_line_ending_attributes_are_accepted(git_repo: Path) -> None:
    (git_repo / ".gitattributes").write_text("* text=auto\n*.yaml eol=crlf -ident\n")
    git(git_repo, "add", "-A")
    git(git_repo, "commit", "-qm", "line endings only")
    assert load_desired_state(git_repo, rev="HEAD").policies


def test_validate_accepts_a_revision(git_repo: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(git_repo), "--rev", "main"])
    assert result.exit_code == 0, result.output


def test_the_committed_json_schemas_are_fresh(repo_root: Path) -> None:
    for filename, text in render_schemas().items():
        committed = repo_root / "schemas" / filename
        assert committed.read_text() == text, f"{committed} is stale: run `heteroscale schema`"


def test_every_yaml_file_points_editors_at_its_schema(repo_root: Path) -> None:
    for folder, schema in (("policies", "service-policy.json"), ("clusters", "cluster.json")):
        for path in (repo_root / folder).glob("*.yaml"):
            assert (
                path.read_text().splitlines()[0]
                == f"# yaml-language-server: $schema=../schemas/{schema}"
            )


def test_schema_check_flags_a_stale_file(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["schema", "--out", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["schema", "--out", str(tmp_path), "--check"]).exit_code == 0
    (tmp_path / "cluster.json").write_text("{}")
    assert runner.invoke(app, ["schema", "--out", str(tmp_path), "--check"]).exit_code == 1


def test_round_trip_edits_change_only_the_edited_line(repo_root: Path) -> None:
    text = (repo_root / "policies/chat.yaml").read_text()
    edited = set_value(text, ["scaling", "cooldown_s"], 240)
    changed = [
        (a, b) for a, b in zip(text.splitlines(), edited.splitlines(), strict=True) if a != b
    ]
    assert changed == [("  cooldown_s: 180", "  cooldown_s: 240")]

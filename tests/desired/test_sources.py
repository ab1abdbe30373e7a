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
from reconciler.errors import ConfigError, ConfigIssue


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


def commit_attributes(repo: Path, files: dict[str, bytes]) -> None:
    for path, content in files.items():
        (repo / path).write_bytes(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "attributes")


def refusal(repo: Path) -> ConfigIssue:
    with pytest.raises(ConfigError) as caught:
        load_desired_state(repo, rev="HEAD")
    [issue] = caught.value.issues
    return issue


def test_a_gitattributes_that_rewrites_content_on_checkout_is_refused_located(
    git_repo: Path,
) -> None:
    """The review reads blobs; a reconciler in directory mode reads a checkout. A
    filter would make them see different text, so the revision is refused."""
    commit_attributes(
        git_repo,
        {".gitattributes": b"*.png binary\n* text=auto eol=lf\npolicies/*.yaml filter=secret\n"},
    )
    issue = refusal(git_repo)
    assert (issue.file, issue.line) == (".gitattributes", 3)
    assert "'filter=secret' converts files on checkout (policies/" in issue.message


@pytest.mark.parametrize(
    ("path", "content", "attribute", "line"),
    [
        pytest.param(".gitattributes", b"policies/chat.yaml ident\n", "ident", 1, id="plain"),
        # "#" starts a comment only at the start of a line: here it is in the pattern.
        pytest.param(
            ".gitattributes", b"policies/[c#]hat.yaml ident\n", "ident", 1, id="hash-in-pattern"
        ),
        # Git ends lines at LF only, and a CR separates attributes like a blank: line 1
        # gives a.txt "text" and "b.txt", line 2 gives policies/chat.yaml ident.
        pytest.param(
            ".gitattributes",
            b"a.txt text\rb.txt text\npolicies/chat.yaml\rident\n",
            "ident",
            2,
            id="carriage-returns",
        ),
        pytest.param(
            ".gitattributes", b'"policies/ch\\141t.yaml" ident\n', "ident", 1, id="quoted-pattern"
        ),
        pytest.param(
            ".gitattributes",
            b"*.png binary\npolicies/*.yaml\tworking-tree-encoding=UTF-16\n",
            "working-tree-encoding=UTF-16",
            2,
            id="tab-and-value",
        ),
        # A macro is named where it is defined: the line that names the filter.
        pytest.param(
            ".gitattributes",
            b"[attr]smudged filter=secret\npolicies/chat.yaml smudged\n",
            "filter=secret",
            1,
            id="macro",
        ),
        pytest.param("policies/.gitattributes", b"chat.yaml ident\n", "ident", 1, id="nested"),
    ],
)
def test_every_spelling_git_applies_is_refused_at_its_file_and_line(
    git_repo: Path, path: str, content: bytes, attribute: str, line: int
) -> None:
    commit_attributes(git_repo, {path: content})
    index = (git_repo / ".git/index").read_bytes()
    issue = refusal(git_repo)
    assert (issue.file, issue.line) == (path, line)
    assert f"'{attribute}' converts files on checkout (policies/" in issue.message
    # Git was asked about a private index of the revision: the repository's is as it was.
    assert (git_repo / ".git/index").read_bytes() == index


@pytest.mark.parametrize(
    "attributes",
    [
        b"*.png binary\n* text=auto eol=lf\n",
        b"* text=auto\n*.yaml eol=crlf -ident !filter\n",
        b"  # policies/chat.yaml ident\n",  # a comment, after blanks
        b"*.bin filter=lfs\n",  # no file of the revision is converted
        # A "#" after the pattern is no comment: Git drops the whole line, as the name
        # "#" is not a valid attribute, and so converts nothing.
        b"policies/*.yaml filter=secret  # smudged\n",
    ],
)
def test_attributes_that_convert_no_file_of_the_revision_are_accepted(
    git_repo: Path, attributes: bytes
) -> None:
    commit_attributes(git_repo, {".gitattributes": attributes})
    assert load_desired_state(git_repo, rev="HEAD").policies


def test_attributes_git_releases_read_differently_are_refused(git_repo: Path) -> None:
    """Git since 2.39.1 ignores a line of 2048 bytes or more, since 2.32 a symlinked
    .gitattributes; the releases before apply both."""
    long_line = b"policies/chat.yaml ident" + b" " * 2100 + b"\n"
    commit_attributes(git_repo, {".gitattributes": b"*.png binary\n" + long_line})
    issue = refusal(git_repo)
    assert (issue.file, issue.line) == (".gitattributes", 2)
    assert "Git since 2.39.1 ignores a line of 2048 bytes or more" in issue.message
    (git_repo / ".gitattributes").unlink()
    (git_repo / "attributes").write_bytes(b"policies/chat.yaml ident\n")
    (git_repo / ".gitattributes").symlink_to("attributes")
    git(git_repo, "add", "-A")
    git(git_repo, "commit", "-qm", "linked attributes")
    issue = refusal(git_repo)
    assert issue.file == ".gitattributes"
    assert "is a symlink, which Git before 2.32 follows" in issue.message


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
    edited = set_value(text, ["scaling", "cooldown_s"], 240, path="policies/chat.yaml")
    changed = [
        (a, b) for a, b in zip(text.splitlines(), edited.splitlines(), strict=True) if a != b
    ]
    assert changed == [("  cooldown_s: 180", "  cooldown_s: 240")]


def test_the_reviewing_repositorys_own_attributes_are_not_the_revisions(
    git_repo: Path,
) -> None:
    """``.git/info/attributes`` belongs to the machine running the review, outranks
    every ``.gitattributes`` and is in no other checkout: it neither hides a
    conversion the revision asks for nor refuses a revision that asks for none."""
    info = git_repo / ".git" / "info" / "attributes"
    info.parent.mkdir(exist_ok=True)
    commit_attributes(git_repo, {".gitattributes": b"policies/chat.yaml ident\n"})
    info.write_bytes(b"* -ident -filter -text -working-tree-encoding\n")
    issue = refusal(git_repo)
    assert "'ident' converts files on checkout (policies/chat.yaml" in issue.message

    commit_attributes(git_repo, {".gitattributes": b"*.png binary\n"})
    info.write_bytes(b"policies/*.yaml filter=secret\n")
    assert load_desired_state(git_repo, rev="HEAD").policies

"""A revision and its checkout name the same file by every path. The review reads a
revision's tree (GitSource), the reconciler the checkout on disk (DirectorySource);
both walk a path one name at a time as the kernel does, so a symlink on the way is
followed before a ``..`` after it applies. Each case is a tree committed to a
temporary repository whose work tree is that commit's checkout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from repo_edits import edit

from reconciler.desired import load_desired_state
from reconciler.desired.sources import (
    MAX_SYMLINKS,
    DirectorySource,
    GitSource,
    Source,
    SourceError,
)
from tests.desired.test_sources import git

FILES = {
    "alt/chat.yaml": b"alt\n",
    "deep/alt/chat.yaml": b"deep\n",
    "deep/x/inner.yaml": b"inner\n",
}
LINKS = {
    "lnk": "deep/x",  # a directory
    "policies/chat.yaml": "../lnk/../alt/chat.yaml",  # the reported case
    "chain": "lnk",  # a link to a directory link
    "up": "..",  # the repository's parent
    "self": "self",  # a loop
}


def commit_tree(repo: Path, files: dict[str, bytes], links: dict[str, str]) -> None:
    for path, content in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(content)
    for path, target in links.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).symlink_to(target)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tree")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("walk") / "repo"
    root.mkdir()
    commit_tree(root, FILES, LINKS)
    return root


def outcome(source: Source, path: str) -> bytes | str:
    """The bytes read at ``path``, or the path a refusal names."""
    try:
        return source.read(path)
    except SourceError as exc:
        return f"refused: {exc.path}"


def both(repo: Path, path: str) -> tuple[bytes | str, bytes | str]:
    """What the reconciler's checkout and the review's revision read at ``path``."""
    return outcome(DirectorySource(repo), path), outcome(GitSource(repo, "HEAD"), path)


@pytest.mark.parametrize(
    ("path", "content"),
    [
        # A ".." after a symlink goes up from where the link points.
        ("policies/chat.yaml", b"deep\n"),
        ("lnk/../alt/chat.yaml", b"deep\n"),
        ("chain/../alt/chat.yaml", b"deep\n"),
        ("lnk/../../alt/chat.yaml", b"alt\n"),
        # A symlinked directory on the way, without "..".
        ("lnk/inner.yaml", b"inner\n"),
        ("chain/inner.yaml", b"inner\n"),
        # Plain names, "." and repeated slashes.
        ("alt/../alt/chat.yaml", b"alt\n"),
        ("./alt//./chat.yaml", b"alt\n"),
    ],
)
def test_both_read_the_file_the_kernel_opens(repo: Path, path: str, content: bytes) -> None:
    assert both(repo, path) == (content, content)
    assert content == (repo / path).read_bytes()  # what the kernel opens


@pytest.mark.parametrize(
    "path",
    [
        "missing/../alt/chat.yaml",  # ".." does not cancel a name that is not there
        "alt/chat.yaml/../chat.yaml",  # nor a file used as a directory
        "alt/chat.yaml/",
        "alt",  # a directory is not a file
        "../repo/alt/chat.yaml",  # above the root, even on the way back into it
        "up/repo/alt/chat.yaml",
        "lnk/../../../repo/alt/chat.yaml",
        "self",
        "self/chat.yaml",
        "/etc/hostname",
    ],
)
def test_both_refuse_naming_only_the_path_asked_for(repo: Path, path: str) -> None:
    assert both(repo, path) == (f"refused: {path}", f"refused: {path}")


def test_a_symlink_loop_and_an_escape_say_why_in_both(repo: Path) -> None:
    for source in (DirectorySource(repo), GitSource(repo, "HEAD")):
        with pytest.raises(SourceError, match="is a symlink loop; refused"):
            source.read("self/chat.yaml")
        with pytest.raises(SourceError, match="is a symlink to a file outside the repository"):
            source.read("up/repo/alt/chat.yaml")
        with pytest.raises(SourceError, match="is outside the repository; refused"):
            source.read("../repo/alt/chat.yaml")


def test_a_chain_of_links_is_followed_as_far_as_the_kernel_follows_it(tmp_path: Path) -> None:
    links = {f"l{i}": f"l{i + 1}" for i in range(MAX_SYMLINKS)}
    links[f"l{MAX_SYMLINKS}"] = "file.yaml"  # l1 is MAX_SYMLINKS links from it, l0 one more
    commit_tree(tmp_path, {"file.yaml": b"end\n"}, links)
    assert (tmp_path / "l1").read_bytes() == b"end\n"
    assert both(tmp_path, "l1") == (b"end\n", b"end\n")
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        (tmp_path / "l0").read_bytes()
    assert both(tmp_path, "l0") == ("refused: l0", "refused: l0")


def test_the_reported_tree_loads_the_same_policy_in_both_modes(example_repo: Path) -> None:
    """policies/chat.yaml -> ../lnk/../alt/chat.yaml with lnk -> deep/x: the checkout
    opens deep/alt/chat.yaml (max 2), not alt/chat.yaml (max 128)."""
    shutil.copytree(example_repo / "policies", example_repo / "alt")
    shutil.copytree(example_repo / "policies", example_repo / "deep/alt")
    edit(example_repo / "deep/alt/chat.yaml", "  max_instances: 128", "  max_instances: 2")
    (example_repo / "deep/x").mkdir()
    (example_repo / "deep/x/.keep").touch()
    (example_repo / "lnk").symlink_to("deep/x")
    (example_repo / "policies/chat.yaml").unlink()
    (example_repo / "policies/chat.yaml").symlink_to("../lnk/../alt/chat.yaml")
    git(example_repo, "init", "-q", "-b", "main")
    git(example_repo, "add", "-A")
    git(example_repo, "commit", "-qm", "a link through a link")
    checkout = load_desired_state(example_repo)
    revision = load_desired_state(example_repo, rev="HEAD")
    assert checkout.policies["chat"].decode.max_instances == 2
    assert revision.policies == checkout.policies


def test_a_symlinked_policies_directory_lists_and_loads_alike(example_repo: Path) -> None:
    """policies -> services/policies, and a template named through a linked
    directory: both modes list the same files and load the same state."""
    (example_repo / "services").mkdir()
    (example_repo / "policies").rename(example_repo / "services/policies")
    (example_repo / "policies").symlink_to("services/policies")
    (example_repo / "tpl").symlink_to("templates")
    edit(
        example_repo / "services/policies/chat.yaml",
        "template: templates/vllm-decode.yaml",
        "template: tpl/vllm-decode.yaml",
    )
    git(example_repo, "init", "-q", "-b", "main")
    git(example_repo, "add", "-A")
    git(example_repo, "commit", "-qm", "linked directories")
    checkout = load_desired_state(example_repo)
    revision = load_desired_state(example_repo, rev="HEAD")
    assert "chat" in checkout.policies
    assert revision.policy_files == checkout.policy_files
    assert revision.policies == checkout.policies
    assert revision.templates == checkout.templates
    assert (
        GitSource(example_repo, "HEAD").list_yaml("policies")
        == DirectorySource(example_repo).list_yaml("policies")
        == sorted(f"policies/{name}" for name in os.listdir(example_repo / "policies"))
    )


def test_an_absolute_link_is_refused_by_the_review_even_into_the_repository(
    example_repo: Path,
) -> None:
    """Where the reconciler checks a revision out is unknown to the review, so it
    cannot place an absolute target; the directory mode follows one into its root.
    The review is then the stricter of the two, never the looser."""
    (example_repo / "templates/alias.yaml").symlink_to(example_repo / "templates/vllm-decode.yaml")
    git(example_repo, "init", "-q", "-b", "main")
    git(example_repo, "add", "-A")
    git(example_repo, "commit", "-qm", "absolute link")
    assert DirectorySource(example_repo).read("templates/alias.yaml")
    with pytest.raises(SourceError, match="outside the repository; refused"):
        GitSource(example_repo, "HEAD").read("templates/alias.yaml")

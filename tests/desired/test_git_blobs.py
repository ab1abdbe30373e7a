"""A revision's files are read through one ``git cat-file --batch`` process: the same
bytes as ``git show REV:PATH`` for any name and content, the size limit checked before
anything is read, a missing object located rather than a crash, and the process ends
with its source."""

from __future__ import annotations

import gc
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from reconciler.desired.sources import MAX_FILE_BYTES, GitSource, SourceError

# Names Git quotes or that a line-based protocol could trip on, and one that is not UTF-8.
NAMES: list[bytes] = [
    b"plain.yaml",
    b"with space.yaml",
    b"tab\tname.yaml",
    b"new\nline.yaml",
    b'quote"d.yaml',
    "ch\u00e4t.yaml".encode(),
    b"-dash.yaml",
    b"\xff\xfe.yaml",
    b"HEAD:x.yaml",
]
# Contents: empty, no final newline, NUL and CR bytes, every byte value, text that looks
# like a batch header, and the largest file the limit allows.
CONTENTS: list[bytes] = [
    b"",
    b"no newline at the end",
    b"a\0b\r\n\r\n",
    bytes(range(256)) * 3,
    b"0123456789012345678901234567890123456789 blob 3\nabc\n" * 4,
    b"x: 1\n" * (MAX_FILE_BYTES // 5) + b"#" * (MAX_FILE_BYTES % 5),
]


def git(repo: Path, *args: str | bytes) -> bytes:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
        capture_output=True,
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("blobs")
    folder = os.path.join(os.fsencode(root), b"files")
    os.makedirs(folder)
    for i, name in enumerate(NAMES):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(CONTENTS[i % len(CONTENTS)])
    with open(os.path.join(folder, b"too-big.yaml"), "wb") as f:
        f.write(b"#" * (MAX_FILE_BYTES + 1))
    os.symlink(b"plain.yaml", os.path.join(folder, b"link.yaml"))
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "hostile names and contents")
    return root


def shown(repo: Path, path: str) -> bytes:
    """What ``git show`` prints for the path at HEAD (the name as raw bytes)."""
    return git(repo, b"show", b"HEAD:" + os.fsencode(path))


def test_every_file_reads_as_git_show_prints_it(repo: Path) -> None:
    source = GitSource(repo, "HEAD")
    paths = [os.fsdecode(b"files/" + name) for name in NAMES]
    assert set(paths) <= set(source._tree)
    for i, path in enumerate(paths):
        data = source.read(path)
        assert data == CONTENTS[i % len(CONTENTS)], path
        assert data == shown(repo, path), path
    # A symlink inside the repository reads as its target.
    assert source.read("files/link.yaml") == source.read("files/plain.yaml")
    # Reading again (and out of order) gives the same bytes: the stream stays in step.
    for path in reversed(paths):
        assert source.read(path) == shown(repo, path)


def test_an_oversized_file_is_refused_before_it_is_read_and_others_still_read(
    repo: Path,
) -> None:
    source = GitSource(repo, "HEAD")
    with pytest.raises(SourceError, match="over the 5 MiB limit"):
        source.read("files/too-big.yaml")
    assert source.read("files/plain.yaml") == shown(repo, "files/plain.yaml")


def test_one_git_process_reads_every_file_of_a_revision(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[list[Any]] = []
    original = subprocess.Popen

    def counting(args: list[Any], *rest: Any, **kwargs: Any) -> Any:
        started.append(list(args))
        return original(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", counting)
    source = GitSource(repo, "HEAD")
    for name in NAMES:
        source.read(os.fsdecode(b"files/" + name))
    cat_files = [args for args in started if "cat-file" in args]
    assert cat_files == [["git", "-C", str(repo), "cat-file", "--batch"]]
    # The listing (rev-parse, ls-tree) and one reader: not one process per file.
    assert len(started) == 3


def test_the_reader_ends_with_its_source(repo: Path) -> None:
    source = GitSource(repo, "HEAD")
    source.read("files/plain.yaml")
    process = source._blobs._proc
    assert process is not None and process.poll() is None
    source.close()
    assert process.poll() is not None
    # Closed is not broken: the next read starts a new reader.
    assert source.read("files/plain.yaml") == shown(repo, "files/plain.yaml")
    process = source._blobs._proc
    assert process is not None
    del source
    gc.collect()
    assert process.poll() is not None


def test_a_missing_object_is_a_located_error_and_the_next_read_works(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.yaml").write_text("a: 1\n")
    (tmp_path / "b.yaml").write_text("b: 2\n")
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "two files")
    source = GitSource(tmp_path, "HEAD")
    sha = source._tree["a.yaml"][1]
    (tmp_path / ".git/objects" / sha[:2] / sha[2:]).unlink()  # a damaged repository
    with pytest.raises(SourceError) as caught:
        source.read("a.yaml")
    assert (caught.value.path, caught.value.message) == (
        "a.yaml",
        "cannot be read (object missing)",
    )
    assert source.read("b.yaml") == b"b: 2\n"

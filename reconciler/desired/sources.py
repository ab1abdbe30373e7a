"""Where desired-state files come from: a directory, or a Git revision read straight
from the object database (no checkout, so ``plan --base/--head`` never touches the
work tree).

Both refuse what a reviewer could not see in the repository: symlinks that point
outside it, files too large to be configuration, bytes that are not UTF-8.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import subprocess
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

MAX_FILE_BYTES = 5 * 1024 * 1024
YAML_SUFFIXES = (".yaml", ".yml")


# gitattributes that change what a file says between the committed blob and a
# checkout. Line-ending conversions (text, eol, crlf) are not among them: YAML reads
# LF and CRLF alike.
CHECKOUT_CONVERSIONS = frozenset({"filter", "working-tree-encoding", "ident"})


class SourceError(Exception):
    """A file could not be read as configuration; ``path`` is repository-relative."""

    def __init__(self, path: str, message: str, line: int | None = None):
        self.path = path
        self.message = message
        self.line = line  # 1-based, when the problem is on one line of the file
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


class Source(Protocol):
    """Read-only view of a repository tree (paths are POSIX, relative to its root)."""

    label: str

    def list_yaml(self, directory: str) -> list[str]: ...

    def read(self, path: str) -> bytes: ...

    def exists(self, path: str) -> bool: ...


def _reason(exc: BaseException) -> str:
    """An OS error without the file name it carries (which may be absolute)."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


def _check_size(path: str, size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise SourceError(
            path,
            f"file is {size / 1e6:.1f} MB, over the {MAX_FILE_BYTES // (1024 * 1024)} MiB limit for "
            "a configuration file (use node ranges and switch defaults to keep it compact)",
        )


@dataclass
class DirectorySource:
    """Files under a directory on disk."""

    root: Path
    label: str = ""

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.label = self.label or str(self.root)

    def _resolve(self, path: str) -> Path:
        full = self.root / path
        try:
            resolved = full.resolve()
        except RuntimeError:  # Python 3.11 raises this on a symlink loop
            raise SourceError(path, "is a symlink loop; refused") from None
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
            raise SourceError(path, f"cannot be read ({_reason(exc)})") from None
        # Anything that resolves outside the root (a symlink, or a link in a parent
        # directory) is refused: a reviewer could not see its content in the repo.
        # The target is not named: errors must not reveal paths outside the root.
        if not resolved.is_relative_to(self.root):
            raise SourceError(path, "is a symlink to a file outside the repository; refused")
        return resolved

    def list_yaml(self, directory: str) -> list[str]:
        base = self.root / directory
        if not base.is_dir():
            return []
        # Files and symlinks only, as Git lists blobs: a directory named x.yaml, a
        # FIFO or a socket is not configuration in either mode.
        return sorted(
            f"{directory}/{entry.name}"
            for entry in base.iterdir()
            if entry.name.endswith(YAML_SUFFIXES)
            and not entry.name.startswith(".")
            and (entry.is_symlink() or entry.is_file())
        )

    def read(self, path: str) -> bytes:
        resolved = self._resolve(path)
        try:
            if not resolved.is_file():
                raise SourceError(path, "no such file")
            _check_size(path, resolved.stat().st_size)
            return resolved.read_bytes()
        except OSError as exc:
            raise SourceError(path, f"cannot be read ({_reason(exc)})") from None

    def exists(self, path: str) -> bool:
        try:
            return self._resolve(path).is_file()
        except (SourceError, OSError):
            return False


class _BlobReader:
    """Blobs read through one ``git cat-file --batch`` process, started on the first
    read: a revision of a 100-service repository is hundreds of files, and one
    ``git`` process per file cost more than parsing them. Each request is one object
    id (hex, from ``ls-tree``, never a path from the tree), and the answer is framed by
    the size in its header, so no file name or content can desynchronise the stream;
    the size is checked against the tree's before anything is read (bounded memory)."""

    def __init__(self, repo: Path):
        self.repo = repo
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            self._proc = subprocess.Popen(
                ["git", "-C", str(self.repo), "cat-file", "--batch"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # failures show on stdout ("missing") or as EOF
            )
            # The owner (a GitSource) does not say when it is done: stop with it.
            self._finalizer = weakref.finalize(self, _stop_process, self._proc)
        return self._proc

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._proc = None
        self._finalizer = None

    def read(self, path: str, sha: str, size: int) -> bytes:
        """The blob ``sha`` of ``size`` bytes (as the tree lists it) at ``path``."""
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(sha.encode("ascii") + b"\n")
            proc.stdin.flush()
            header = proc.stdout.readline(512)
        except OSError:  # the process is gone (a broken pipe)
            header = b""
        fields = header.split()
        if fields != [sha.encode("ascii"), b"blob", str(size).encode()]:
            # Missing, gone, or not the size the tree lists: never read on from a
            # stream that may be out of step.
            self.close()
            missing = header.endswith(b" missing\n")
            raise SourceError(
                path, f"cannot be read (object {'missing' if missing else 'unreadable'})"
            )
        data = proc.stdout.read(size)  # a buffered read: all of it, or less only at EOF
        if len(data) != size or proc.stdout.read(1) != b"\n":
            self.close()
            raise SourceError(path, "cannot be read (object truncated)")
        return data


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """End a ``cat-file --batch`` process: EOF on its input ends it; kill if it lingers."""
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class GitSource:
    """Files of one revision of a Git repository, read with ``git cat-file``."""

    repo: Path
    rev: str
    label: str = ""
    _tree: dict[str, tuple[str, str, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.repo = Path(self.repo).resolve()
        self._blobs = _BlobReader(self.repo)
        try:
            commit = self._git("rev-parse", "--verify", "--quiet", f"{self.rev}^{{commit}}").strip()
        except SourceError:
            raise SourceError(self.rev, "not a revision of the Git repository") from None
        self.commit = commit
        self.label = self.label or f"{self.rev} ({commit[:12]})"
        # -z: names as raw bytes, never quoted (without it Git quotes names such as
        # chät.yaml or a"b.yaml and a line-based listing would not match them).
        # Decoded like os.listdir does, so both modes see the same names.
        listing = self._git("ls-tree", "-r", "-l", "-z", "--full-tree", commit, text=False)
        for record in listing.split(b"\0"):
            if not record:
                continue
            meta, raw_path = record.split(b"\t", 1)
            mode, kind, sha, size = meta.decode().split()
            if kind == "blob":
                path = os.fsdecode(raw_path)
                self._tree[path] = (mode, sha, int(size) if size != "-" else 0)
        self._refuse_checkout_conversions()

    def _refuse_checkout_conversions(self) -> None:
        """The review reads blobs as committed; a reconciler in directory mode reads a
        checkout. A ``.gitattributes`` that rewrites content on checkout (a filter, a
        working-tree encoding, ident expansion) would make them read different text:
        refused, located, rather than reviewed as something the reconciler will not
        see."""
        for path in sorted(p for p in self._tree if posixpath.basename(p) == ".gitattributes"):
            text = self.read(path).decode(errors="replace")
            for number, line in enumerate(text.splitlines(), start=1):
                fields = line.split("#", 1)[0].split()
                for attribute in fields[1:]:
                    name = attribute.split("=", 1)[0]
                    if name in CHECKOUT_CONVERSIONS:  # set, or set to a value
                        raise SourceError(
                            path,
                            f"'{attribute}' converts files on checkout, so the reconciler "
                            "would read other bytes than this review; remove it "
                            "(conversions are not supported in a desired-state repository)",
                            line=number,
                        )

    def _git(self, *args: str, text: bool = True) -> Any:
        result = subprocess.run(
            ["git", "-C", str(self.repo), *args], capture_output=True, check=False
        )
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip()
            # Git names the repository's absolute path in its errors; keep it out.
            raise SourceError(" ".join(args), message.replace(str(self.repo), "<repository>"))
        return result.stdout.decode() if text else result.stdout

    def close(self) -> None:
        """End the blob reader's process now (it also ends when this source is freed)."""
        self._blobs.close()

    def _blob(self, path: str, sha: str, size: int) -> bytes:
        return self._blobs.read(path, sha, size)

    def _follow(self, path: str, depth: int = 0) -> tuple[str, str, int]:
        entry = self._tree.get(path)
        if entry is None:
            raise SourceError(path, f"no such file at revision {self.rev}")
        mode, sha, size = entry
        if mode == "120000":
            if size > 4096:  # PATH_MAX: a bigger "symlink" is not one
                raise SourceError(path, "is a symlink with an impossibly long target; refused")
            target = self._blob(path, sha, size).decode(errors="replace")
            joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
            if target.startswith("/") or joined.startswith(".."):
                raise SourceError(path, "is a symlink to a file outside the repository; refused")
            if depth > 8:
                raise SourceError(path, "symlink chain too long")
            return self._follow(joined, depth + 1)
        return entry

    def list_yaml(self, directory: str) -> list[str]:
        prefix = directory.rstrip("/") + "/"
        return sorted(
            p
            for p in self._tree
            if p.startswith(prefix)
            and "/" not in p[len(prefix) :]
            and p.endswith(YAML_SUFFIXES)
            and not os.path.basename(p).startswith(".")
        )

    def read(self, path: str) -> bytes:
        _mode, sha, size = self._follow(path)
        _check_size(path, size)
        return self._blob(path, sha, size)

    def exists(self, path: str) -> bool:
        try:
            self._follow(path)
        except SourceError:
            return False
        return True

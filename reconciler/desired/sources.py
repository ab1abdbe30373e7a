"""Where desired-state files come from: a directory, or a Git revision read straight
from the object database (no checkout, so ``plan --base/--head`` never touches the
work tree).

Both refuse what a reviewer could not see in the repository: symlinks that point
outside it, files too large to be configuration, bytes that are not UTF-8. Both
resolve a path with the same walk (``_walk``), so a review of a revision reads
the very file a reconciler reading its checkout loads.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import stat
import subprocess
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from reconciler.bounded_read import BoundedReadError, read_regular_file

MAX_FILE_BYTES = 5 * 1024 * 1024
YAML_SUFFIXES = (".yaml", ".yml")


# gitattributes that change what a file says between the committed blob and a
# checkout. Line-ending conversions (text, eol, crlf) are not among them: YAML reads
# LF and CRLF alike.
CHECKOUT_CONVERSIONS = frozenset({"filter", "working-tree-encoding", "ident"})
# Git ignores a gitattributes line this long or longer since the security releases of
# January 2023 (2.39.1, and 2.30.7 to 2.38.3 on older branches); releases before
# them apply it.
GITATTRIBUTES_MAX_LINE = 2048


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


# Symlinks followed in resolving one path, as Linux's MAXSYMLINKS: a path the kernel
# opens is never refused for the number of links on its way.
MAX_SYMLINKS = 40
SYMLINK_MODE = "120000"  # a symlink's mode in a Git tree

EntryKind = Literal["file", "directory", "symlink"]


class _Tree(Protocol):
    """What resolving a path needs of a tree. Paths are repository-relative and their
    directories real directories (the walk has resolved them); nothing is followed."""

    def kind(self, path: str) -> EntryKind | None:
        """What is at ``path`` (as ``lstat`` sees it); None when nothing is, or nothing
        a checkout could hold (a FIFO, a device)."""
        ...

    def link_target(self, path: str) -> str:
        """The target of the symlink at ``path``, as written."""
        ...

    def inside(self, absolute: str) -> str | None:
        """``absolute`` (an absolute path) relative to the tree's root, or None when it
        is not under the root."""
        ...


class _NotFound(Exception):
    """A walk ended at nothing, or at a file with names still to walk after it."""


def _walk(tree: _Tree, path: str) -> tuple[EntryKind, str]:
    """The file or directory ``path`` names in ``tree``: its kind and its
    repository-relative path, with no symlink in it.

    The walk is the kernel's, one name at a time from the root. A symlink, whether the
    last name or a directory on the way, is replaced by its target before any name
    after it is walked, and ``..`` goes to the parent of the directory reached so
    far: ``link/..`` is the parent of where ``link`` points, not the directory
    ``link`` is in. (Normalising the text first cancels ``link/..`` and names another
    file than a checkout opens.) Both sources walk with this, each over its own tree,
    so a revision and its checkout resolve every path alike. Refused, named by
    ``path`` only (never a target, which may be outside the root): a path or target
    leading above the root, a symlink loop, more than MAX_SYMLINKS links."""
    if "\0" in path:
        raise SourceError(path, "cannot be read (a NUL byte in the name)")
    walked: list[str] = []  # the directories reached from the root
    pending: list[str] = []  # the names still to walk, the next one last
    followed = 0
    seen: set[tuple[str, tuple[str, ...]]] = set()

    def walk_next(text: str) -> None:
        """Walk ``text`` before what is pending: from the root when it is absolute."""
        if text.startswith("/"):
            relative = tree.inside(text)
            if relative is None:
                raise _outside(path, followed)
            walked.clear()
            text = relative
        pending.extend(reversed(text.split("/")))

    walk_next(path)
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if not walked:
                raise _outside(path, followed)
            walked.pop()
            continue
        here = "/".join([*walked, name])
        try:
            kind = tree.kind(here)
            target = tree.link_target(here) if kind == "symlink" else ""
        except SourceError as exc:  # named by the path asked for, not the one on the way
            raise SourceError(path, exc.message) from None
        if kind == "symlink":
            # The same link with the same names after it: the walk would repeat forever.
            state = (here, tuple(pending))
            if state in seen:
                raise SourceError(path, "is a symlink loop; refused")
            seen.add(state)
            followed += 1
            if followed > MAX_SYMLINKS:
                raise SourceError(path, f"goes through more than {MAX_SYMLINKS} symlinks; refused")
            walk_next(target)
        elif kind == "directory":
            walked.append(name)
        elif kind == "file" and not pending:
            return "file", here
        else:  # nothing there, or a file with names after it (ENOTDIR)
            raise _NotFound(path)
    return "directory", "/".join(walked)


def _outside(path: str, followed: int) -> SourceError:
    if followed:
        return SourceError(path, "is a symlink to a file outside the repository; refused")
    return SourceError(path, "is outside the repository; refused")


def _naming_line(
    attribute_files: dict[str, list[bytes]], path: str, attribute: str
) -> tuple[str, int | None]:
    """The .gitattributes file and line that give ``path`` ``attribute``, as far as
    can be told: Git says what a file's attributes are, not which line set them. The
    nearest file above ``path`` that names the attribute (a deeper file overrides),
    at its last line naming it outside a comment (a later line overrides); a macro
    is named where it is defined. (``path``, None) when no line names it."""
    name = re.escape(attribute.split("=", 1)[0].encode())
    # After the blanks Git separates attributes with, set or given a value.
    naming = re.compile(rb"[ \t\r]" + name + rb"(?:[ \t\r=]|$)")
    folder = posixpath.dirname(path)
    while True:
        candidate = posixpath.join(folder, ".gitattributes")
        lines = attribute_files.get(candidate, [])
        for number in range(len(lines), 0, -1):
            line = lines[number - 1]
            if not line.lstrip(b" \t\r").startswith(b"#") and naming.search(line):
                return candidate, number
        if not folder:
            return path, None
        folder = posixpath.dirname(folder)


@dataclass
class _DirectoryTree:
    """A directory on disk, as ``_walk`` sees it."""

    root: Path  # resolved

    def kind(self, path: str) -> EntryKind | None:
        try:
            mode = os.lstat(self.root / path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise SourceError(path, f"cannot be read ({_reason(exc)})") from None
        if stat.S_ISLNK(mode):
            return "symlink"
        if stat.S_ISDIR(mode):
            return "directory"
        return "file" if stat.S_ISREG(mode) else None

    def link_target(self, path: str) -> str:
        try:
            return os.readlink(self.root / path)
        except OSError as exc:
            raise SourceError(path, f"cannot be read ({_reason(exc)})") from None

    def inside(self, absolute: str) -> str | None:
        # The root is resolved, so its own path is the only way into it from "/" that
        # does not go through a symlink or "..": anything else is refused, not resolved.
        root = str(self.root)
        if absolute == root:
            return ""
        prefix = root.rstrip("/") + "/"
        return absolute[len(prefix) :] if absolute.startswith(prefix) else None


@dataclass
class DirectorySource:
    """Files under a directory on disk."""

    root: Path
    label: str = ""

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.label = self.label or str(self.root)

    def _find(self, path: str) -> tuple[EntryKind, Path] | None:
        """What ``path`` resolves to, or None when nothing is there."""
        try:
            kind, relative = _walk(_DirectoryTree(self.root), path)
        except _NotFound:
            return None
        return kind, self.root / relative

    def list_yaml(self, directory: str) -> list[str]:
        try:
            found = self._find(directory)
        except SourceError:
            return []
        if found is None or found[0] != "directory":
            return []
        # Files and symlinks only, as Git lists blobs: a directory named x.yaml, a
        # FIFO or a socket is not configuration in either mode.
        return sorted(
            f"{directory}/{entry.name}"
            for entry in found[1].iterdir()
            if entry.name.endswith(YAML_SUFFIXES)
            and not entry.name.startswith(".")
            and (entry.is_symlink() or entry.is_file())
        )

    def read(self, path: str) -> bytes:
        found = self._find(path)
        if found is None or found[0] != "file":
            raise SourceError(path, "no such file")
        try:
            _check_size(path, found[1].stat().st_size)
            # Bounded too: a file that grows between the stat and the read.
            return read_regular_file(found[1], MAX_FILE_BYTES)
        except BoundedReadError as exc:
            raise SourceError(path, exc.reason) from None
        except OSError as exc:
            raise SourceError(path, f"cannot be read ({_reason(exc)})") from None

    def exists(self, path: str) -> bool:
        try:
            found = self._find(path)
        except SourceError:
            return False
        return found is not None and found[0] == "file"


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
        directories: set[str] = set()
        for record in listing.split(b"\0"):
            if not record:
                continue
            meta, raw_path = record.split(b"\t", 1)
            mode, kind, sha, size = meta.decode().split()
            path = os.fsdecode(raw_path)
            if kind == "blob":
                self._tree[path] = (mode, sha, int(size) if size != "-" else 0)
            elif kind == "commit":  # a submodule: a checkout holds a directory there
                directories.add(path)
            while "/" in path:  # every directory a checkout creates for the entry
                path = posixpath.dirname(path)
                directories.add(path)
        self._paths = _RevisionTree(self._tree, directories, self._blob)
        self._refuse_checkout_conversions()

    def _refuse_checkout_conversions(self) -> None:
        """The review reads blobs as committed; a reconciler in directory mode reads a
        checkout. A ``.gitattributes`` that rewrites content on checkout (a filter, a
        working-tree encoding, ident expansion) would make them read different text:
        refused, located, rather than reviewed as something the reconciler will not
        see.

        Git itself says which files a checkout converts: reading gitattributes with a
        parser of our own was out-argued by its syntax (``#`` starts a comment only at
        the start of a line, lines end at LF alone and a CR separates attributes, C-style
        quoted patterns, macros), and any other corner would be the next way to hide an
        attribute. Refused before asking, as Git releases read them differently: a
        symlinked ``.gitattributes`` and an overlong line."""
        attribute_files: dict[str, list[bytes]] = {}
        for path in sorted(p for p in self._tree if posixpath.basename(p) == ".gitattributes"):
            if self._tree[path][0] == SYMLINK_MODE:
                raise SourceError(
                    path,
                    "is a symlink, which Git before 2.32 follows and later releases ignore; "
                    "refused (commit the attributes as a file)",
                )
            lines = self.read(path).split(b"\n")  # Git ends a line at LF only
            for number, line in enumerate(lines, start=1):
                if len(line) >= GITATTRIBUTES_MAX_LINE:
                    raise SourceError(
                        path,
                        f"line is {len(line)} bytes: Git since 2.39.1 ignores a line of "
                        f"{GITATTRIBUTES_MAX_LINE} bytes or more, older releases apply it; "
                        "refused (shorten it)",
                        line=number,
                    )
            attribute_files[path] = lines
        if not attribute_files:
            return  # nothing in the revision can ask for a conversion: no Git to ask
        for converted, attribute in self._checkout_conversions():
            where, line_number = _naming_line(attribute_files, converted, attribute)
            raise SourceError(
                where,
                f"'{attribute}' converts files on checkout ({converted} among them), so the "
                "reconciler would read other bytes than this review; remove it "
                "(conversions are not supported in a desired-state repository)",
                line=line_number,
            )

    def _checkout_conversions(self) -> list[tuple[str, str]]:
        """(file, attribute as "name" or "name=value") for every conversion Git would
        apply in checking the revision out, by its own .gitattributes files: the
        attributes of the machine running the review (system and user files, and the
        repository's own ``info/attributes``) are left out, as they are not the
        revision's and another checkout need not have them (the last, which outranks
        every ``.gitattributes``, could unset what the revision sets). Only regular
        files are converted."""
        files = [os.fsencode(p) for p, (mode, _, _) in self._tree.items() if mode != SYMLINK_MODE]
        objects = self._git("rev-parse", "--path-format=absolute", "--git-path", "objects").strip()
        with tempfile.TemporaryDirectory(prefix="heteroscale-attributes-") as scratch:
            # A private repository that borrows the objects (no ``info/attributes`` of
            # its own) and a private index of the revision, which ``check-attr
            # --cached`` reads the attributes from: the repository, its index and its
            # work tree stay untouched (``check-attr --source`` would do without the
            # index, but needs Git 2.40).
            git_dir = os.path.join(scratch, "git")
            env = {
                **os.environ,
                "GIT_DIR": git_dir,
                "GIT_ALTERNATE_OBJECT_DIRECTORIES": objects,
                "GIT_INDEX_FILE": os.path.join(scratch, "index"),
                "GIT_ATTR_NOSYSTEM": "1",
            }
            self._git("init", "-q", "--bare", git_dir, env=env)
            # A split index or an fsmonitor would write in the repository: off.
            self._git(
                "-c",
                "core.splitIndex=false",
                "-c",
                "core.fsmonitor=false",
                "read-tree",
                self.commit,
                env=env,
            )
            output = self._git(
                "-c",
                f"core.attributesFile={os.devnull}",
                "check-attr",
                "--cached",
                "--stdin",
                "-z",
                "--all",
                stdin=b"".join(name + b"\0" for name in files),
                env=env,
                text=False,
            )
        fields = output.split(b"\0")  # path, attribute, value; a NUL after each
        found: list[tuple[str, str]] = []
        for raw_path, raw_name, value in zip(
            fields[0::3], fields[1::3], fields[2::3], strict=False
        ):
            name = raw_name.decode(errors="replace")
            if name in CHECKOUT_CONVERSIONS and value not in (b"unset", b"unspecified"):
                shown = name if value == b"set" else f"{name}={value.decode(errors='replace')}"
                found.append((os.fsdecode(raw_path), shown))
        return found

    def _git(
        self,
        *args: str,
        text: bool = True,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> Any:
        result = subprocess.run(
            ["git", "-C", str(self.repo), *args],
            input=stdin,
            capture_output=True,
            check=False,
            env=env,
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

    def _find(self, path: str) -> tuple[EntryKind, str]:
        try:
            return _walk(self._paths, path)
        except _NotFound:
            raise SourceError(path, f"no such file at revision {self.rev}") from None

    def list_yaml(self, directory: str) -> list[str]:
        try:
            kind, folder = self._find(directory)
        except SourceError:
            return []
        if kind != "directory":
            return []
        # Named through ``directory`` as written, as a directory listing names them:
        # a symlinked directory's files are read through the link, as on disk.
        prefix = f"{folder}/" if folder else ""
        return sorted(
            f"{directory}/{p[len(prefix) :]}"
            for p in self._tree
            if p.startswith(prefix)
            and "/" not in p[len(prefix) :]
            and p.endswith(YAML_SUFFIXES)
            and not posixpath.basename(p).startswith(".")
        )

    def read(self, path: str) -> bytes:
        kind, found = self._find(path)
        if kind != "file":
            raise SourceError(path, f"no such file at revision {self.rev}")
        _mode, sha, size = self._tree[found]
        _check_size(path, size)
        return self._blob(path, sha, size)

    def exists(self, path: str) -> bool:
        try:
            kind, _found = self._find(path)
        except SourceError:
            return False
        return kind == "file"


@dataclass
class _RevisionTree:
    """A revision's tree as ``_walk`` sees it: what a checkout of it holds on disk."""

    entries: dict[str, tuple[str, str, int]]  # every blob: path -> (mode, sha, size)
    directories: set[str]
    read_blob: Callable[[str, str, int], bytes]

    def kind(self, path: str) -> EntryKind | None:
        entry = self.entries.get(path)
        if entry is not None:
            return "symlink" if entry[0] == SYMLINK_MODE else "file"
        return "directory" if path in self.directories else None

    def link_target(self, path: str) -> str:
        _mode, sha, size = self.entries[path]
        if size > 4096:  # PATH_MAX: a checkout could not create this link
            raise SourceError(path, "is a symlink with an impossibly long target; refused")
        target = self.read_blob(path, sha, size)
        if b"\0" in target:  # a checkout would cut the target short there: not guessed at
            raise SourceError(path, "is a symlink whose target holds a NUL byte; refused")
        return os.fsdecode(target)  # decoded as os.readlink decodes a target on disk

    def inside(self, absolute: str) -> str | None:
        # Where the reconciler checks the revision out is not known here, so no
        # absolute target can be placed in it: refused (a relative link works in
        # every checkout). The directory mode follows one into its root: the review
        # refuses what the reconciler would load, never the other way round.
        return None

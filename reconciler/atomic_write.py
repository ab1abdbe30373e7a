"""Writing a file whole or not at all.

A policy rewritten by ``tune --write``, a saved plan, a file-SD target list, what
``simulate`` writes (``--json``, ``--plot``, ``--export-workload``) and ``schema``'s
files: a reader (Git, ``apply``, Prometheus, ``--trace``) must never find one
half-written, and a write that fails
(a read-only directory, a full disk, a directory in the file's place) must leave the
old file as it was. So the text goes to a new file beside it, under a name no other
writer picks, is flushed to disk, and is renamed over the old one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def replace_text(path: Path, text: str) -> None:
    """Writes ``text`` to the file ``path`` whole or not at all (``replaced``)."""
    with replaced(path) as handle:
        handle.write(text)


@contextlib.contextmanager
def replaced(path: Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """A handle (text in UTF-8, or ``binary``) whose content becomes the file ``path``
    whole or not at all (module docstring) when the block ends without an exception.
    The new file keeps the old one's permissions; a file that did not exist gets what
    ``open`` would have given it (0666 less the umask), not ``mkstemp``'s 0600. A
    symlink's target is replaced, not the link. A path that names something other than
    a regular file (``/dev/stdout``, a FIFO) is written in place: there is no file to
    keep whole, and a rename would put a file where the device was. ``OSError`` when
    it fails, the new file removed."""
    if path.exists() and not path.is_file():  # stat follows /dev/stdout to its pipe
        with open(path, "wb" if binary else "w", **({} if binary else _TEXT)) as direct:
            yield direct
        return
    target = Path(os.path.realpath(path))  # a regular file, or none yet
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else _TEXT)) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it the file
        try:
            mode = stat.S_IMODE(target.stat().st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


_TEXT: dict[str, Any] = {"encoding": "utf-8", "newline": ""}


def _umask() -> int:
    # Read by setting it: the only portable way; set straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

"""Writing a file whole or not at all.

A policy rewritten by ``tune --write``, a saved plan, a file-SD target list: a reader
(Git, ``apply``, Prometheus) must never find one half-written, and a write that fails
(a read-only directory, a full disk, a directory in the file's place) must leave the
old file as it was. So the text goes to a new file beside it, under a name no other
writer picks, is flushed to disk, and is renamed over the old one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def replace_text(path: Path, text: str) -> None:
    """Writes ``text`` to the file ``path`` whole or not at all (module docstring). The
    new file keeps the old one's permissions; a file that did not exist gets what
    ``open`` would have given it (0666 less the umask), not ``mkstemp``'s 0600.
    ``OSError`` when it fails, the new file removed."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it the file
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    # Read by setting it: the only portable way; set straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

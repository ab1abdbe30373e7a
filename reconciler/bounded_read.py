"""Reading a file a user named, in bounded memory and time.

A trace or a saved plan is named on the command line, and in a pull request's CI the
file may come from the pull request itself. ``Path.read_bytes`` trusts it: a FIFO
blocks for ever, a character device (``/dev/zero``) reports size 0 and never ends,
and a 300 KB gzip stream can expand to gigabytes. Here a file must be a regular file
(after symlinks), is read up to a limit and no further, and a gzip stream is
inflated up to a limit and no further.
"""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"
_CHUNK_BYTES = 1 << 20


class BoundedReadError(Exception):
    """A file that cannot be read within the bounds; ``reason`` says why, for a
    message that names the file (the caller's error type carries the path)."""

    def __init__(self, reason: str, *, partial: bytes = b"", over_limit: bool = False):
        super().__init__(reason)
        self.reason = reason
        # The file or its inflated stream is larger than allowed (not unreadable).
        self.over_limit = over_limit
        # What a truncated gzip stream held before it stopped (to locate the cut).
        self.partial = partial


def _mib(size: int) -> str:
    """A limit as people write it: ``64 MiB``, or ``512 bytes`` below a MiB."""
    return f"{size / (1024 * 1024):g} MiB" if size >= 1024 * 1024 else f"{size:,} bytes"


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``max_bytes`` of them: a
    longer file, a directory, a FIFO, a device or a socket is refused without reading
    more than ``max_bytes + 1`` bytes (its size as ``stat`` reports it is not trusted:
    a file may grow while read). ``FileNotFoundError`` and other ``OSError``s pass."""
    # O_NONBLOCK: opening a FIFO without a writer would block before fstat could say
    # what it is. On a regular file the flag changes nothing.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise BoundedReadError("is a directory, not a file")
        raise BoundedReadError("is not a regular file (a FIFO, a device or a socket)")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BoundedReadError(f"is larger than the {_mib(max_bytes)} limit", over_limit=True)
    return data


def gunzip_bounded(raw: bytes, max_bytes: int) -> bytes:
    """``raw`` inflated (one or more gzip members, as ``gzip.decompress``), at most
    ``max_bytes`` of output: a stream that would inflate further is refused as soon as
    it passes the limit. A truncated stream raises with what it held
    (``BoundedReadError.partial``); a corrupt one with zlib's reason."""
    out = bytearray()
    data = raw
    while data:
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = decoder.decompress(data, max_bytes + 1 - len(out))
            out += chunk
            while decoder.unconsumed_tail and len(out) <= max_bytes:
                out += decoder.decompress(decoder.unconsumed_tail, max_bytes + 1 - len(out))
        except zlib.error as exc:
            raise BoundedReadError(f"not a readable gzip file ({exc})") from None
        if len(out) > max_bytes:
            raise BoundedReadError(
                f"inflates to more than the {_mib(max_bytes)} limit", over_limit=True
            )
        if not decoder.eof:
            raise BoundedReadError("truncated gzip stream", partial=bytes(out))
        data = decoder.unused_data
        if data and not data.startswith(GZIP_MAGIC):
            # gzip.decompress ignores zero padding after the last member and refuses
            # anything else; so does this.
            if data.strip(b"\0"):
                raise BoundedReadError("not a readable gzip file (trailing garbage)")
            break
    return bytes(out)

"""Reading a file a user named, or a server's answer, in bounded memory and time.

A trace or a saved plan is named on the command line, and in a pull request's CI the
file may come from the pull request itself. ``Path.read_bytes`` trusts it: a FIFO
blocks for ever, a character device (``/dev/zero``) reports size 0 and never ends,
and a 300 KB gzip stream can expand to gigabytes. Here a file must be a regular file
(after symlinks), is read up to a limit and no further, and a gzip stream is
inflated up to a limit and no further.

A server's answer (Prometheus', the Kubernetes API server's, or whatever answers at
their address) is read the same way: up to a limit of decoded bytes, and all of it
by a deadline (``read_answer``).
"""

from __future__ import annotations

import os
import stat
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from reconciler.text_safety import cut

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


def read_named_file(path: Path, max_bytes: int) -> bytes:
    """``read_regular_file`` for a file a user named, where any failure is said the
    same way: ``BoundedReadError`` with the reason, ``cannot be read (No such file or
    directory)`` for an ``OSError`` (the caller's error names the file)."""
    try:
        return read_regular_file(path, max_bytes)
    except OSError as exc:
        raise BoundedReadError(f"cannot be read ({exc.strerror or type(exc).__name__})") from None


def gunzip_bounded(raw: bytes, max_bytes: int) -> bytes:
    """``raw`` inflated (one or more gzip members, as ``gzip.decompress``), at most
    ``max_bytes`` of output: a stream that would inflate further is refused as soon as
    it passes the limit. A truncated stream raises with what it held
    (``BoundedReadError.partial``); a corrupt one with zlib's reason.

    Fed a chunk at a time, from 512 bytes up to 1 MiB as a member goes on: what zlib
    keeps after a member's end (``unused_data``) is a copy of the rest of its input, so
    fed whole, every member copied the rest of the file, and a 4 MB file of 200,000
    empty members took 30 s (a hostile prober)."""
    out = bytearray()
    view = memoryview(raw)
    position = 0
    while position < len(raw):
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        feed_bytes = _GUNZIP_FIRST_FEED_BYTES  # small for a small member, then growing
        try:
            while not decoder.eof and position < len(raw) and len(out) <= max_bytes:
                feed = view[position : position + feed_bytes]
                position += len(feed)
                feed_bytes = min(2 * feed_bytes, _GUNZIP_FEED_BYTES)
                out += decoder.decompress(feed, max_bytes + 1 - len(out))
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
        position -= len(decoder.unused_data)  # where the next member starts
        if position < len(raw) and bytes(view[position : position + 2]) != GZIP_MAGIC:
            # gzip.decompress ignores zero padding after the last member and refuses
            # anything else; so does this.
            if bytes(view[position:]).strip(b"\0"):
                raise BoundedReadError("not a readable gzip file (trailing garbage)")
            break
    return bytes(out)


# How much of a gzip stream is handed to zlib at once (``gunzip_bounded``): a member's
# first feed, and the most once it doubled.
_GUNZIP_FIRST_FEED_BYTES = 512
_GUNZIP_FEED_BYTES = 1 << 20


class DeadlinePassed(BoundedReadError):
    """An answer did not arrive in full by its deadline: a server sending a byte now
    and then never trips a per-read timeout."""


def read_answer(
    read_chunk: Callable[[], bytes],
    *,
    declared_bytes: str | None,
    max_bytes: int,
    deadline: float,
) -> bytes:
    """An HTTP answer's body, read by ``read_chunk`` (what has arrived, decoded, at most
    a chunk; b"" at the end), at most ``max_bytes`` of it and all by ``deadline``
    (``time.monotonic``): ``BoundedReadError`` (``over_limit``) for a larger answer,
    as soon as its Content-Length (``declared_bytes``) or its bytes pass the limit;
    ``DeadlinePassed`` for a slower one. ``read_chunk``'s own errors pass."""
    # ASCII digits only: str.isdigit also takes "²", which int() refuses, and int()
    # refuses more than 4,300 digits too (20 already pass any limit).
    declared = declared_bytes or ""
    if (
        declared.isascii()
        and declared.isdigit()
        and (len(declared) > 20 or int(declared) > max_bytes)
    ):
        raise BoundedReadError(
            f"declares {cut(declared, 24)} bytes, more than the {_mib(max_bytes)} limit",
            over_limit=True,
        )
    body = bytearray()
    while chunk := read_chunk():
        body += chunk
        if len(body) > max_bytes:
            raise BoundedReadError(f"is larger than the {_mib(max_bytes)} limit", over_limit=True)
        if time.monotonic() > deadline:
            raise DeadlinePassed("did not arrive in full by its deadline")
    return bytes(body)

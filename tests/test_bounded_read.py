"""Reading a file a user named: regular files only, never past a limit
(``reconciler.bounded_read``)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.bounded_read import BoundedReadError, gunzip_bounded, read_regular_file


def refusal(call: object, *args: object) -> BoundedReadError:
    with pytest.raises(BoundedReadError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value


def test_a_regular_file_within_the_limit_is_read_whole(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"0123456789")
    assert read_regular_file(tmp_path / "a", 10) == b"0123456789"
    too_large = refusal(read_regular_file, tmp_path / "a", 9)
    assert "larger than the 9 bytes limit" in too_large.reason and too_large.over_limit


def test_a_directory_a_fifo_and_a_device_are_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")  # no writer: a plain open would block for ever
    assert refusal(read_regular_file, tmp_path, 10).reason == "is a directory, not a file"
    for path in (tmp_path / "fifo", Path("/dev/zero")):
        assert "not a regular file" in refusal(read_regular_file, path, 10).reason


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert read_regular_file(tmp_path / "link", 1) == b"x"


def test_a_missing_file_is_the_callers_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_regular_file(tmp_path / "missing", 1)


@given(st.lists(st.binary(max_size=2_000), min_size=1, max_size=3))
def test_gunzip_inflates_every_member_as_gzip_does(members: list[bytes]) -> None:
    raw = b"".join(gzip.compress(member) for member in members)
    assert gunzip_bounded(raw, 6_000) == gzip.decompress(raw)


def test_a_gzip_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * 50_000_000)  # ~50 KB
    assert len(bomb) < 100_000
    refused = refusal(gunzip_bounded, bomb, 1 << 20)
    assert "inflates to more than the 1 MiB limit" in refused.reason and refused.over_limit


def test_a_truncated_or_corrupt_stream_says_so() -> None:
    text = b"".join(f"line {i}\n".encode() for i in range(5_000))
    raw = gzip.compress(text)
    truncated = refusal(gunzip_bounded, raw[: len(raw) // 2], 1 << 20)
    assert truncated.reason == "truncated gzip stream" and truncated.partial.startswith(b"line 0\n")
    assert "not a readable gzip file" in refusal(gunzip_bounded, b"\x1f\x8bnot gzip", 100).reason
    assert "trailing garbage" in refusal(gunzip_bounded, raw + b"junk", 1 << 20).reason
    assert gunzip_bounded(raw + b"\0\0\0", 1 << 20) == text

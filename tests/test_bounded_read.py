"""Reading a file a user named: regular files only, never past a limit
(``reconciler.bounded_read``)."""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.bounded_read import (
    BoundedReadError,
    DeadlinePassed,
    gunzip_bounded,
    read_answer,
    read_regular_file,
)


def refusal(call: object, *args: object, **kwargs: object) -> BoundedReadError:
    with pytest.raises(BoundedReadError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
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


@given(st.lists(st.sampled_from([0, 1, 700, 5_000, 300_000]), min_size=1, max_size=6))
def test_members_of_any_size_are_read_across_the_feeds_to_zlib(sizes: list[int]) -> None:
    """Members smaller and larger than a feed to zlib (512 bytes doubling to 1 MiB),
    incompressible ones too, end where they end: the next starts at its own bytes."""
    members = [os.urandom(size // 2) + bytes(size - size // 2) for size in sizes]
    raw = b"".join(gzip.compress(member) for member in members)
    assert gunzip_bounded(raw, sum(sizes) + 1) == b"".join(members)


def test_many_empty_members_are_read_once_each() -> None:
    """200,000 empty members before the data (4 MB): each is read from its own start
    (fed whole, each copied the rest of the file: 30 s for this one, now about 0.3 s,
    measured as `python -c` in the commit; time is not asserted here)."""
    raw = gzip.compress(b"") * 200_000 + gzip.compress(b"the data")
    assert gunzip_bounded(raw, 100) == b"the data"


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


# ----------------------------------------------------------------- HTTP answers


def _chunks(*parts: bytes) -> Callable[[], bytes]:
    """A ``read_chunk`` giving ``parts`` one per call, then b"" (the end)."""
    it: Iterator[bytes] = iter(parts)
    return lambda: next(it, b"")


def _never_ending(part: bytes) -> Callable[[], bytes]:
    return lambda: part


FAR_OFF = float("inf")


@given(st.lists(st.binary(min_size=1, max_size=64), max_size=20))
def test_an_answer_within_the_limit_is_read_whole(parts: list[bytes]) -> None:
    body = b"".join(parts)
    read = read_answer(
        _chunks(*parts), declared_bytes=str(len(body)), max_bytes=len(body), deadline=FAR_OFF
    )
    assert read == body


def test_an_answer_past_the_limit_is_refused_as_its_bytes_pass_it() -> None:
    # An endless body (a broken proxy) is read no further than the limit.
    error = refusal(
        read_answer, _never_ending(b"x" * 10), declared_bytes=None, max_bytes=100, deadline=FAR_OFF
    )
    assert error.over_limit and "larger than" in error.reason


@pytest.mark.parametrize("declared", ["101", "9" * 21, "9" * 5_000])
def test_a_declared_length_past_the_limit_is_refused_before_any_read(declared: str) -> None:
    # 5,000 digits: int() refuses more than 4,300, so the length is judged by its digits.
    def unread() -> bytes:
        raise AssertionError("read after a declared length past the limit")

    error = refusal(read_answer, unread, declared_bytes=declared, max_bytes=100, deadline=FAR_OFF)
    assert error.over_limit and "declares" in error.reason and len(error.reason) < 120


@pytest.mark.parametrize("declared", ["\u00b2", "", "-5", "abc", " 12"])
def test_a_declared_length_that_is_no_plain_number_is_ignored_and_the_bytes_bound_the_read(
    declared: str,
) -> None:
    # "\u00b2" passes str.isdigit and crashed int(); the body is still read within the limit.
    assert read_answer(
        _chunks(b"ok"), declared_bytes=declared, max_bytes=100, deadline=FAR_OFF
    ) == (b"ok")
    error = refusal(
        read_answer, _never_ending(b"x"), declared_bytes=declared, max_bytes=100, deadline=FAR_OFF
    )
    assert error.over_limit


def test_an_answer_still_arriving_at_its_deadline_is_refused() -> None:
    # A byte now and then never trips a per-read timeout; the whole answer has a deadline.
    with pytest.raises(DeadlinePassed):
        read_answer(
            _never_ending(b"x"),
            declared_bytes=None,
            max_bytes=1 << 30,
            deadline=time.monotonic() + 0.05,
        )

"""Writing a file whole or not at all (``reconciler.atomic_write``)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from reconciler.atomic_write import replace_text


def test_replace_text_writes_the_whole_file_and_keeps_its_permissions(tmp_path: Path) -> None:
    path = tmp_path / "chat.yaml"
    path.write_text("old\n")
    path.chmod(0o640)
    replace_text(path, "new\n")
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["chat.yaml"]


def test_replace_text_over_a_directory_fails_and_leaves_nothing_beside_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chat.yaml"
    path.mkdir()  # a directory where the file was
    with pytest.raises(IsADirectoryError):
        replace_text(path, "new\n")
    assert path.is_dir() and [p.name for p in tmp_path.iterdir()] == ["chat.yaml"]


def test_replace_text_that_fails_on_the_way_to_disk_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chat.yaml"
    path.write_text("old\n")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        replace_text(path, "new\n" * 1000)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["chat.yaml"]


def test_a_new_file_gets_what_open_would_give_it_not_mkstemps_0600(tmp_path: Path) -> None:
    # A saved plan written by one user and applied by another must stay readable.
    previous = os.umask(0o022)
    try:
        replace_text(tmp_path / "plan.json", "{}\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "plan.json").stat().st_mode) == 0o644


def test_a_symlink_keeps_pointing_where_it_did(tmp_path: Path) -> None:
    # A file through a link: the file is replaced, the link kept.
    real = tmp_path / "real.json"
    real.write_text("old\n")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    replace_text(link, "new\n")
    assert link.is_symlink() and real.read_text() == "new\n"
    # A device through a link (/dev/stdout is one, to a pipe or a terminal): written in
    # place, never replaced by a regular file.
    device = tmp_path / "stdout"
    device.symlink_to("/dev/null")
    replace_text(device, "to the device\n")
    assert device.is_symlink() and os.readlink(device) == "/dev/null"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json", "stdout"]


def test_a_handle_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    from reconciler.atomic_write import replaced

    path = tmp_path / "plot.png"
    with replaced(path, binary=True) as handle:
        handle.write(b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG"
    with pytest.raises(RuntimeError), replaced(path, binary=True) as handle:
        handle.write(b"half")
        raise RuntimeError("the plot failed half way")
    assert path.read_bytes() == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]

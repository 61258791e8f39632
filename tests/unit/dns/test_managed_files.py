"""Replacing and restoring files: regular, symlink, absent, bind mount (EBUSY)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kvpn.dns.managed_files import (
    FileKind,
    FileSnapshot,
    RestoreOutcome,
    is_mount_point,
    restore_file,
    sha256,
    snapshot_file,
    write_file,
)

NEW = b"nameserver 198.19.255.1\n"


def _no_mounts(tmp_path: Path) -> Path:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
    return mountinfo


def test_regular_file_replaced_and_restored_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_bytes(b"nameserver 10.0.0.2\n# odd \xff bytes, no final newline")
    path.chmod(0o640)
    mountinfo = _no_mounts(tmp_path)
    before = snapshot_file(path)
    assert write_file(path, NEW, mountinfo=mountinfo) == "replaced"
    assert path.read_bytes() == NEW
    assert restore_file(before, sha256(NEW), mountinfo=mountinfo) == RestoreOutcome.RESTORED
    assert path.read_bytes() == before.content
    assert (path.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mountinfo", "resolv.conf"]


def test_symlink_is_replaced_not_written_through_and_comes_back(tmp_path: Path) -> None:
    managed = tmp_path / "run" / "stub-resolv.conf"
    managed.parent.mkdir()
    managed.write_bytes(b"nameserver 127.0.0.53\n")
    path = tmp_path / "resolv.conf"
    os.symlink("run/stub-resolv.conf", path)
    mountinfo = _no_mounts(tmp_path)
    before = snapshot_file(path)
    assert before.kind == FileKind.SYMLINK and before.content == b"nameserver 127.0.0.53\n"
    write_file(path, NEW, mountinfo=mountinfo)
    assert not path.is_symlink() and path.read_bytes() == NEW
    assert managed.read_bytes() == b"nameserver 127.0.0.53\n"  # the manager's file untouched
    managed.write_bytes(b"nameserver 127.0.0.53\nsearch newer\n")  # manager updates meanwhile
    assert restore_file(before, sha256(NEW), mountinfo=mountinfo) == RestoreOutcome.RESTORED
    assert os.readlink(path) == "run/stub-resolv.conf"
    assert path.read_bytes() == b"nameserver 127.0.0.53\nsearch newer\n"


def test_absent_file_is_removed_again(tmp_path: Path) -> None:
    path = tmp_path / "cluster.local"
    before = snapshot_file(path)
    write_file(path, NEW, mountinfo=_no_mounts(tmp_path))
    assert restore_file(before, sha256(NEW)) == RestoreOutcome.RESTORED
    assert not path.exists()


def test_mount_point_written_in_place(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_bytes(b"nameserver 10.0.0.2\n")
    inode = path.stat().st_ino
    mountinfo = tmp_path / "mountinfo"
    escaped = str(path).replace(" ", "\\040")
    mountinfo.write_text(f"600 500 0:5 /netns/x/resolv.conf {escaped} rw - ext4 /dev/sda1 rw\n")
    assert is_mount_point(path, mountinfo=mountinfo)
    before = snapshot_file(path)
    assert write_file(path, NEW, mountinfo=mountinfo) == "in_place"
    assert path.stat().st_ino == inode and path.read_bytes() == NEW
    restore_file(before, sha256(NEW), mountinfo=mountinfo)
    assert path.stat().st_ino == inode and path.read_bytes() == before.content


def test_rename_ebusy_falls_back_to_writing_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "resolv.conf"
    path.write_bytes(b"old\n")

    def busy(src: object, dst: object) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(os, "replace", busy)
    assert write_file(path, NEW, mountinfo=_no_mounts(tmp_path)) == "in_place"
    assert path.read_bytes() == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mountinfo", "resolv.conf"]


def test_other_rename_errors_are_raised_and_leave_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "resolv.conf"
    path.write_bytes(b"old\n")

    def denied(src: object, dst: object) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError):
        write_file(path, NEW, mountinfo=_no_mounts(tmp_path))
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mountinfo", "resolv.conf"]


def test_restore_outcomes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"original\n")
    before = snapshot_file(path)
    assert restore_file(before, sha256(NEW)) == RestoreOutcome.ALREADY_ORIGINAL  # crash pre-write
    path.write_bytes(b"network manager wrote this\n")
    assert restore_file(before, sha256(NEW)) == RestoreOutcome.CHANGED_BY_OTHERS
    assert path.read_bytes() == b"network manager wrote this\n"


def test_snapshot_json_round_trip() -> None:
    snap = FileSnapshot("/etc/x", FileKind.SYMLINK, b"\x00\xff", 0o600, "../run/x")
    assert FileSnapshot.from_json(snap.to_json()) == snap

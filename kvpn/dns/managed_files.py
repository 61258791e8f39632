"""Replacing a system file and putting the original back exactly: regular, symlink, bind mount.

Theory of operation
-------------------
Before kvpn changes a file it takes a :class:`FileSnapshot`: absent, a regular file (bytes and
mode), or a symbolic link (its target text, exactly as ``readlink`` gives it).

- A regular file is replaced atomically: a temporary file in the same folder, fsynced, renamed
  over the path. Readers see the old or the new file, never half of one.
- A symlink (``/etc/resolv.conf -> ../run/systemd/resolve/stub-resolv.conf`` or NetworkManager's
  file) is *replaced by a regular file*, never written through: the file behind the link
  belongs to its manager, which may rewrite it at any time and which other programs read. On
  restore the link is recreated with the same target text, so the user then sees whatever the
  manager wrote meanwhile - nothing is lost, nothing is stale.
- A bind mount (``ip netns exec`` mounts ``/etc/netns/<ns>/resolv.conf`` over
  ``/etc/resolv.conf``; containers mount their ``/etc/hosts``) cannot be renamed over or
  unlinked (EBUSY). A path that ``/proc/self/mountinfo`` lists as a mount point is written in
  place (truncate, write, fsync); a rename that fails with EBUSY falls back to that too.

``restore`` compares what is there now with the snapshot and with the digest of what kvpn
wrote: already the original -> nothing to do; still kvpn's -> the original is put back;
anything else (another program rewrote the file meanwhile) -> left alone and reported, since
putting an old copy back would undo a newer change. The original bytes stay in the state
folder either way (the caller decides where).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FileKind",
    "FileSnapshot",
    "RestoreOutcome",
    "is_mount_point",
    "restore_file",
    "sha256",
    "snapshot_file",
    "write_file",
]

MOUNTINFO = Path("/proc/self/mountinfo")


class FileKind(enum.Enum):
    ABSENT = "absent"
    REGULAR = "regular"
    SYMLINK = "symlink"


class RestoreOutcome(enum.Enum):
    ALREADY_ORIGINAL = "already_original"
    RESTORED = "restored"
    CHANGED_BY_OTHERS = "changed_by_others"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class FileSnapshot:
    path: str
    kind: FileKind
    content: bytes = b""  # for a symlink: what reading through it gave (for parsing only)
    mode: int = 0o644
    link_target: str = ""

    def same_as(self, other: FileSnapshot) -> bool:
        if self.kind != other.kind:
            return False
        if self.kind == FileKind.SYMLINK:
            return self.link_target == other.link_target
        return self.kind == FileKind.ABSENT or self.content == other.content

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind.value,
            "content_hex": self.content.hex(),
            "mode": self.mode,
            "link_target": self.link_target,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileSnapshot:
        return cls(
            path=str(data["path"]),
            kind=FileKind(data["kind"]),
            content=bytes.fromhex(str(data.get("content_hex", ""))),
            mode=int(data.get("mode", 0o644)),
            link_target=str(data.get("link_target", "")),
        )


def snapshot_file(path: Path) -> FileSnapshot:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return FileSnapshot(str(path), FileKind.ABSENT)
    if stat.S_ISLNK(info.st_mode):
        try:
            content = path.read_bytes()
        except OSError:  # a dangling link
            content = b""
        return FileSnapshot(str(path), FileKind.SYMLINK, content, link_target=os.readlink(path))
    return FileSnapshot(str(path), FileKind.REGULAR, path.read_bytes(), stat.S_IMODE(info.st_mode))


def _unescape_mountinfo(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def is_mount_point(path: Path, *, mountinfo: Path = MOUNTINFO) -> bool:
    """Whether *path* itself (not following a final symlink) is a mount point."""
    target = os.path.abspath(path)
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
            return True
    return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _write_in_place(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _temporary_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.kvpn-{uuid.uuid4().hex[:8]}")


def write_file(path: Path, data: bytes, *, mode: int = 0o644, mountinfo: Path = MOUNTINFO) -> str:
    """Make *path* a regular file holding *data*; return how: "in_place" or "replaced"."""
    if is_mount_point(path, mountinfo=mountinfo) and not path.is_symlink():
        _write_in_place(path, data)
        return "in_place"
    temporary = _temporary_beside(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if exc.errno != errno.EBUSY:
            raise
        _write_in_place(path, data)
        return "in_place"
    return "replaced"


def _put_back(snapshot: FileSnapshot, *, mountinfo: Path) -> None:
    path = Path(snapshot.path)
    if snapshot.kind == FileKind.REGULAR:
        write_file(path, snapshot.content, mode=snapshot.mode, mountinfo=mountinfo)
    elif snapshot.kind == FileKind.SYMLINK:
        temporary = _temporary_beside(path)
        os.symlink(snapshot.link_target, temporary)
        try:
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def restore_file(
    before: FileSnapshot, written_sha256: str, *, mountinfo: Path = MOUNTINFO
) -> RestoreOutcome:
    now = snapshot_file(Path(before.path))
    if now.same_as(before):
        return RestoreOutcome.ALREADY_ORIGINAL
    if now.kind == FileKind.REGULAR and sha256(now.content) == written_sha256:
        _put_back(before, mountinfo=mountinfo)
        return RestoreOutcome.RESTORED
    return RestoreOutcome.CHANGED_BY_OTHERS
